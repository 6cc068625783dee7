"""`dplightning privacy epsilon|noise`: output, --json, round trips, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dplightning.privacy.accounting import (
    compute_epsilon,
    laplace_scale_for_pure_epsilon,
    noise_for_target,
    pure_epsilon_laplace,
)
from dplightning.privacy.cli import build_parser, privacy_main

COMMON = ["--sample-rate", "0.01", "--steps", "500", "--delta", "1e-5"]


def small_epsilon(*extra: str, sigma: str = "1") -> list[str]:
    """``epsilon`` at ``sigma``, q = 0.1, 10 steps and δ = 1e-5 (valid and instant), then ``extra``."""
    return ["epsilon", "--sigma", sigma, "-q", "0.1", "--steps", "10", "--delta", "1e-5", *extra]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = privacy_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_epsilon_json_equals_compute_epsilon(capsys: pytest.CaptureFixture[str], accountant: str) -> None:
    code, out, err = run(capsys, "epsilon", "--sigma", "1.1", *COMMON, "--accountant", accountant, "--json")
    assert code == 0 and err == ""
    record = json.loads(out)
    assert record["epsilon"] == compute_epsilon(1.1, 0.01, 500, 1e-5, accountant)  # type: ignore[arg-type]
    assert record | {"epsilon": None} == {
        "epsilon": None,
        "noise_multiplier": 1.1,
        "sample_rate": 0.01,
        "steps": 500,
        "delta": 1e-5,
        "accountant": accountant,
        "mechanism": "gaussian",
    }


def test_epsilon_plain_output_is_the_number_rounded_up(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "epsilon", "--sigma", "1.1", *COMMON)
    assert code == 0
    exact = compute_epsilon(1.1, 0.01, 500, 1e-5)
    shown = float(out.strip())
    assert out.count("\n") == 1
    assert exact <= shown <= exact * (1 + 1e-5)


def test_noise_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "noise", "--epsilon", "3", *COMMON, "--accountant", "rdp", "--json")
    assert code == 0
    record = json.loads(out)
    sigma = record["noise_multiplier"]
    assert sigma == noise_for_target(3.0, 1e-5, 0.01, 500, "rdp")
    assert record["epsilon"] == compute_epsilon(sigma, 0.01, 500, 1e-5, "rdp") <= 3.0
    # the plain output (rounded up) fed back into `epsilon` stays within the target
    code, out, _ = run(capsys, "noise", "--epsilon", "3", *COMMON, "--accountant", "rdp")
    shown = out.strip()
    assert float(shown) >= sigma
    code, out, _ = run(capsys, "epsilon", "--sigma", shown, *COMMON, "--accountant", "rdp", "--json")
    assert 0.99 * 3.0 <= json.loads(out)["epsilon"] <= 3.0


def test_noise_pld_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "noise", "--epsilon", "2", *COMMON, "--json")
    assert code == 0
    record = json.loads(out)
    assert record["accountant"] == "pld" and record["target_epsilon"] == 2.0
    assert record["epsilon"] == compute_epsilon(record["noise_multiplier"], 0.01, 500, 1e-5) <= 2.0


def test_laplace_pure_and_approximate(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--sample-rate", "0.01", "--steps", "100", "--mechanism", "laplace", "--json"]
    code, out, _ = run(capsys, "epsilon", "--sigma", "2", "--delta", "0", *args)
    assert code == 0
    record = json.loads(out)
    assert record["epsilon"] == pure_epsilon_laplace(2.0, 0.01, 100) and record["accountant"] == "pure"
    code, out, _ = run(capsys, "noise", "--epsilon", "1", "--delta", "0", *args)
    assert json.loads(out)["noise_multiplier"] == laplace_scale_for_pure_epsilon(1.0, 0.01, 100)
    code, out, _ = run(capsys, "epsilon", "--sigma", "2", "--delta", "1e-5", *args)
    assert json.loads(out)["epsilon"] == compute_epsilon(2.0, 0.01, 100, 1e-5, "pld", "laplace")


def test_no_noise_gives_infinite_epsilon(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "epsilon", "--sigma", "0", *COMMON, "--json")
    assert code == 0 and json.loads(out)["epsilon"] == "inf"  # strict JSON
    code, out, _ = run(capsys, "epsilon", "--sigma", "0", *COMMON)
    assert out.strip() == "inf"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["epsilon", "--sigma", "1", "--sample-rate", "1.5", "--steps", "10", "--delta", "1e-5"],
            "sample_rate",
        ),
        (["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"], "delta"),
        (["epsilon", "--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0"], "laplace"),
        (["noise", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "epsilon"),
        (
            [
                "noise",
                "--epsilon",
                "1e-4",
                "--sample-rate",
                "1",
                "--steps",
                "10000",
                "--delta",
                "1e-10",
                "--accountant",
                "rdp",
            ],
            "unreachable",
        ),
        (small_epsilon("--mechanism", "laplace", "--accountant", "rdp"), "pld"),
        (["epsilon", "--sigma", "1", "--steps", "10"], "required"),
        (small_epsilon(sigma="x"), "invalid float"),
        (["epsilon", "--sigma", "1", "-q", "0.1", "--steps", "0", "--delta", "1e-5"], "positive integer"),
        (small_epsilon("--accountant", "moments"), "invalid choice"),
        (["lmo"], "invalid choice"),
        ([], "required"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "epsilon" in out and "noise" in out
    code, out, _ = run(capsys, "noise", "--help")
    assert code == 0 and "--epsilon" in out


def test_parser_lists_subcommands() -> None:
    parser = build_parser()
    assert parser.prog == "dplightning privacy"
    assert parser.parse_args(["epsilon", "--sigma", "1", *COMMON]).command == "epsilon"


def test_module_entry_point_and_no_lightning_import() -> None:
    code = (
        "import sys, runpy; sys.argv = ['x', 'epsilon', '--sigma', '1', '-q', '0.01', '--steps', '10', '--delta', '1e-5'];"
        "import dplightning.privacy.cli, dplightning.privacy.accounting;"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torch') for m in sys.modules), 'heavy import';"
        "runpy.run_module('dplightning.privacy.cli', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) == pytest.approx(compute_epsilon(1.0, 0.01, 10, 1e-5), rel=1e-5)
