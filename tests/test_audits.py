"""Privacy audits: membership-inference metrics, canary exposure/extraction, one-run ε lower bound, callbacks, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import run_dplightning
from torch import Tensor, nn

from dplightning.auditing.canaries import (
    Canary,
    audit_canaries,
    exposure,
    make_canaries,
    secret_token_split,
    token_jaccard,
)
from dplightning.auditing.lower_bound import epsilon_lower_bound, one_run_audit, p_value
from dplightning.auditing.membership import (
    evaluate_attack,
    loss_attack,
    min_k_percent_scores,
    roc_auc,
    roc_curve,
)
from dplightning.callbacks import CanaryAudit, MembershipInferenceAudit
from dplightning.errors import DPLightningError
from dplightning.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- membership maths
def test_auc_is_one_for_separated_and_half_for_identical_distributions() -> None:
    rng = np.random.default_rng(0)
    assert roc_auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0, 2.0], [5.0, 6.0, 7.0]) == 0.0
    assert roc_auc([1.0, 1.0], [1.0, 1.0]) == 0.5  # ties count one half
    same = [roc_auc(rng.normal(size=2000), rng.normal(size=2000)) for _ in range(5)]
    assert all(abs(a - 0.5) < 0.03 for a in same), same
    # loss attack: lower loss = member
    perfect = loss_attack(member_losses=[0.1, 0.2, 0.3], nonmember_losses=[1.0, 2.0, 3.0, 4.0])
    assert perfect.auc == 1.0 and perfect.tpr_at_fpr[0.01] == 1.0 and perfect.tpr_at_fpr[0.001] == 1.0


def test_roc_curve_and_tpr_at_low_fpr_match_a_brute_force_count() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 1000)
    result = evaluate_attack("x", pos, neg)
    fpr, tpr = roc_curve(pos, neg)
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # AUC by the trapezoid rule over the exact curve equals the Mann-Whitney statistic
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(result.auc, abs=1e-9)
    for level in (0.01, 0.001):
        brute = max((pos >= t).mean() for t in np.r_[neg, pos, np.inf] if (neg >= t).mean() <= level)
        assert result.tpr_at_fpr[level] == pytest.approx(brute)
    with pytest.raises(DPLightningError, match="empty"):
        roc_auc([], [1.0])


def test_min_k_percent_averages_the_lowest_token_log_probs() -> None:
    logp = torch.tensor([[-1.0, -5.0, -2.0, -4.0, 0.0], [-3.0, -1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = min_k_percent_scores(logp, mask, 0.5)  # row 0: lowest 2 of 4 = (-5, -4); row 1: lowest 1 of 2 = -3
    torch.testing.assert_close(out, torch.tensor([-4.5, -3.0]))


# ----------------------------------------------------------------------------------------- lower bound
def test_lower_bound_p_value_and_monotonicity() -> None:
    # δ = 0, all r guesses correct: p-value is q^r exactly (Binomial tail)
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 20, 20, 1.0, 0.0) == pytest.approx(q**20, rel=1e-9)
    # the bound at 95 %: q(ε)^r = 0.05 ⇒ ε = logit(0.05^(1/r))
    r = 40
    expected = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(expected, rel=1e-6)
    assert epsilon_lower_bound(r, r, r, 1e-3, 0.95) < expected  # δ > 0 weakens the bound
    assert epsilon_lower_bound(r, r, r, 0.0, 0.99) < expected  # higher confidence too
    assert epsilon_lower_bound(r, r, r // 2, 0.0, 0.95) == 0.0  # chance accuracy proves nothing
    with pytest.raises(DPLightningError):
        p_value(10, 5, 6, 1.0, 0.0)


def test_one_run_audit_is_calibrated_on_randomised_response() -> None:
    """Guesses from ε-DP randomised response must (at 95 %) give a bound ≤ ε; perfect guesses a high bound."""
    rng = np.random.default_rng(0)
    m, eps = 200, 1.0
    above = 0
    for _ in range(40):
        inc = rng.random(m) < 0.5
        keep = rng.random(m) < 1 / (1 + math.exp(-eps))  # ε-DP randomised response of each bit
        noisy = np.where(keep, inc, ~inc).astype(float) + rng.normal(0, 1e-3, m)
        above += one_run_audit(noisy, inc, delta=0.0).epsilon > eps
    assert above <= 6  # ≤ 5 % expected false alarms (+ slack for 40 trials)
    inc = rng.random(m) < 0.5
    assert one_run_audit(inc.astype(float), inc, delta=1e-5).epsilon > 2.0


# ------------------------------------------------------------------------------------------- canaries
class Memoriser(nn.Module):
    """Predicts token ``ids[t+1]`` of one fixed sequence at position t: a perfectly memorised canary."""

    def __init__(self, sequence: list[int], vocab: int) -> None:
        super().__init__()
        self.register_buffer("seq", torch.tensor(sequence))
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        nxt = self.seq[1 : ids.shape[1] + 1]
        logits[:, : len(nxt), :].scatter_(-1, nxt[None, :, None].expand(ids.shape[0], -1, 1), 20.0)
        return logits


def test_exposure_is_maximal_for_a_memorised_canary_and_low_otherwise() -> None:
    tok = load_tokenizer("tiny-llama")
    canary, other = make_canaries(2, seed=3, length=5)
    full, start = secret_token_split(tok, canary.prefix, canary.secret)
    assert start < len(full)
    model = Memoriser(full, vocab=len(tok))
    res = audit_canaries(model, tok, [canary, other], [True, False], [1, 1], reference_samples=200, seed=0)
    assert res[0].exposure == pytest.approx(math.log2(10**5))  # rank 1 of |R| = 10^5
    assert res[0].extracted and res[0].jaccard == 1.0
    assert res[1].exposure < 3.0 and not res[1].extracted  # this model knows nothing about the other secret
    # a model indifferent between secrets ranks the canary in the middle: exposure ≈ 1 bit
    assert exposure(2.0, np.full(100, 2.0), 1e5) == pytest.approx(1.0, abs=1e-4)
    assert token_jaccard([1, 2, 3], [3, 4]) == pytest.approx(0.25)


def test_canaries_are_reproducible_and_distinct() -> None:
    a, b = make_canaries(16, seed=5), make_canaries(16, seed=5)
    assert a == b and len({c.prefix for c in a}) == 16
    assert all(c.secret.isdigit() and len(c.secret) == 8 for c in a)
    cb = CanaryAudit(num_canaries=10, repeats=[1, 4], seed=2)
    assert len(cb.canaries) == 20 and cb.repeats.count(4) == 10
    assert 0 < sum(cb.included) < 20
    with pytest.raises(DPLightningError, match="tag"):
        make_canaries(2, template="no field")
    assert isinstance(cb.canaries[0], Canary)


# ---------------------------------------------------------------------------------- training end to end
def _fit(
    private: bool, tmp_path: Path, steps: int, callbacks: list[pl.Callback]
) -> tuple[pl.Trainer, Any, Any]:
    from dplightning.data import TextDataModule
    from dplightning.module import DPLoRAModule
    from dplightning.strategies import DPSGDStrategy

    model = DPLoRAModule(model_name="tiny-llama", lora_rank=8, learning_rate=0.05, seed=0)
    data = TextDataModule(
        tokenizer="tiny-llama",
        num_records=48,
        max_length=40,
        batch_size=8,
        test_fraction=0.25,
        val_fraction=0.0,
        data_seed=0,
    )
    kw: dict[str, Any] = {"accelerator": "cpu"}
    if private:
        kw = {
            "strategy": DPSGDStrategy(target_epsilon=1.0, target_delta=1e-3, max_grad_norm=1.0, device="cpu")
        }
    trainer = pl.Trainer(
        max_steps=steps,
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )
    trainer.fit(model, datamodule=data)
    return trainer, model, data


@pytest.mark.slow
def test_audits_have_power_without_privacy_and_respect_the_accountant_with_it(tmp_path: Path) -> None:
    """Non-private heavy training: inserted canaries exposed, MIA AUC > 0.5, high ε lower bound. DP-SGD at ε=1:
    lower bound ≤ accountant ε and clearly below the non-private one."""

    def callbacks() -> tuple[CanaryAudit, MembershipInferenceAudit]:
        return (
            CanaryAudit(
                num_canaries=32, secret_length=6, template="ID {tag}: ", reference_samples=50, seed=1
            ),
            MembershipInferenceAudit(max_examples=64, roc_png_dir=str(tmp_path / "roc")),
        )

    open_canary, open_mia = callbacks()
    _fit(False, tmp_path, 300, [open_canary, open_mia])
    m = open_canary.metrics
    assert m["audit/canary/r1/exposure"] > m["audit/canary/not_inserted/exposure"] + 4.0, m
    assert m["audit/canary/not_inserted/exposure"] < 4.0
    assert open_mia.results["loss"].auc > 0.6, open_mia.metrics
    assert any((tmp_path / "roc").glob("roc_*.png"))
    lb_open = open_canary.lower_bound
    assert lb_open is not None and lb_open.epsilon > 1.0, lb_open

    dp_canary, dp_mia = callbacks()
    trainer, _, _ = _fit(True, tmp_path, 60, [dp_canary, dp_mia])
    accountant_eps = trainer.strategy.epsilon()
    lb_dp = dp_canary.lower_bound
    assert lb_dp is not None and accountant_eps <= 1.0
    assert lb_dp.epsilon <= accountant_eps, (lb_dp, accountant_eps)
    print(f"lower bounds: open {lb_open}, dp {lb_dp}, accountant ε {accountant_eps:.3f}; open {m}")
    assert lb_open.epsilon > lb_dp.epsilon + 0.8
    assert dp_canary.metrics["audit/accountant_epsilon"] == pytest.approx(accountant_eps)


@pytest.mark.slow
def test_audit_command_prints_table_and_json(tmp_path: Path) -> None:
    from dplightning.cli import main

    cfg = tmp_path / "audit.yaml"
    cfg.write_text(
        "seed_everything: 0\nmodel:\n  model_name: tiny-llama\n  lora_rank: 2\ndata:\n  num_records: 60\n"
        "  max_length: 32\n  batch_size: 8\n  test_fraction: 0.25\ntrainer:\n  max_steps: 3\n  limit_val_batches: 0\n"
        "  logger: false\n  enable_progress_bar: false\n  enable_model_summary: false\n  default_root_dir: "
        f"{tmp_path}\n  strategy:\n    class_path: dplightning.strategies.DPSGDStrategy\n    init_args:\n"
        "      target_epsilon: 4.0\n      target_delta: 1.0e-3\n      device: cpu\n  callbacks:\n"
        "    - class_path: dplightning.callbacks.CanaryAudit\n      init_args:\n        num_canaries: 4\n"
        "        secret_length: 4\n        reference_samples: 20\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {tmp_path / 'ck'}\n        filename: last\n"
    )
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = tmp_path / "ck" / "last.ckpt"
    out = run_dplightning(["audit", "--ckpt", str(ckpt), "--config", str(cfg), "--json"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0 < figures["privacy/epsilon"] <= 4.0
    assert 0.0 <= figures["audit/mia/loss/auc"] <= 1.0 and "audit/mia/reference/auc" in figures
    assert (
        "audit/epsilon_lower_bound" in figures
        and figures["audit/epsilon_lower_bound"] <= figures["privacy/epsilon"]
    )
    table = run_dplightning(
        ["audit", "--ckpt", str(ckpt), "--config", str(cfg), "--max-examples", "8"], cwd=tmp_path
    )
    assert (
        table.returncode == 0 and "audit/mia/loss/auc" in table.stdout and "privacy/epsilon" in table.stdout
    )
    bad = run_dplightning(
        ["audit", "--ckpt", str(tmp_path / "nope.ckpt"), "--config", str(cfg)], cwd=tmp_path
    )
    assert bad.returncode == 2 and "nope.ckpt" in bad.stderr and "Traceback" not in bad.stderr


def test_audit_of_a_peft_adapter_directory_and_mismatch_error(tmp_path: Path) -> None:
    from dplightning.auditing.cli import run_audit
    from dplightning.module import DPLoRAModule

    cfg = tmp_path / "a.yaml"
    cfg.write_text(
        "model:\n  model_name: tiny-llama\n  lora_rank: 2\ndata:\n  num_records: 40\n  max_length: 24\n"
        "  test_fraction: 0.25\ntrainer:\n  max_steps: 1\n"
    )
    DPLoRAModule(model_name="tiny-llama", lora_rank=2).save_adapter(tmp_path / "ok")
    figures = run_audit(str(tmp_path / "ok"), str(cfg), max_examples=8)
    assert figures["audit/mia/reference/auc"] == 0.5  # untrained adapter = base model: every score ties
    assert "privacy/epsilon" not in figures  # an adapter carries no accountant state
    DPLoRAModule(model_name="tiny-llama", lora_rank=4).save_adapter(tmp_path / "bad")
    with pytest.raises(DPLightningError, match="does not fit this model"):
        run_audit(str(tmp_path / "bad"), str(cfg))


def test_auc_standard_error_matches_the_spread_of_auc_over_resampled_audits() -> None:
    # Hanley–McNeil's SE, from one audit's AUC and sizes, against the spread of AUCs over many audits
    rng = np.random.default_rng(0)
    n1, n0, shift = 200, 300, 0.5
    aucs = [evaluate_attack("x", rng.normal(shift, 1, n1), rng.normal(0, 1, n0)).auc for _ in range(400)]
    one = evaluate_attack("x", rng.normal(shift, 1, n1), rng.normal(0, 1, n0))
    assert one.auc_se == pytest.approx(float(np.std(aucs)), rel=0.15)
    figures = one.metrics()
    assert figures["audit/mia/x/auc_se"] == one.auc_se and figures["audit/mia/x/members"] == n1
    # chance level: SE of an AUC of 0.5 is about sqrt((n1 + n0 + 1) / (12 n1 n0))
    half = evaluate_attack("y", np.zeros(n1), np.zeros(n0))
    assert half.auc == 0.5 and half.auc_se == pytest.approx(
        math.sqrt((n1 + n0 + 1) / (12 * n1 * n0)), rel=0.05
    )


def test_membership_audit_can_draw_non_members_from_validation_and_test() -> None:
    from dplightning.callbacks.membership_inference_audit import audit_loaders
    from dplightning.data import TextDataModule

    data = TextDataModule(num_records=100, max_length=16, val_fraction=0.2, test_fraction=0.1)
    data.setup()
    test_only = audit_loaders(data, 1000, 8)
    both = audit_loaders(data, 1000, 8, nonmembers="val+test")
    assert len(test_only[1].dataset) == len(data.test_dataset) == len(test_only[0].dataset)
    assert len(both[1].dataset) == len(data.val_dataset) + len(data.test_dataset) == len(both[0].dataset)
    with pytest.raises(DPLightningError, match="nonmembers must be one of"):
        MembershipInferenceAudit(nonmembers="train")
