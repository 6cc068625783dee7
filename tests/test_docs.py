"""The documentation stays runnable: every config parses, every quoted ``dplightning`` command parses, every
relative link resolves.

Commands are checked in-process (one interpreter, so the Lightning/transformers import is paid once and the
whole module takes seconds): ``fit``/``validate``/``test``/``predict`` with ``--print_config`` appended (the
full LightningCLI parse and validation, nothing instantiated), ``dplightning privacy`` for real (it is a few
seconds of accounting) except ``lmo-search``, which is a minute-long search and is only parsed, and
``dplightning audit`` with the audit itself stubbed out (it needs a trained checkpoint). The negative tests
show the checker fails on an unknown key, so a green run means something.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from conftest import PRIVACY_EPSILON

from dplightning.cli import main
from dplightning.errors import DPLightningError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"^(?:\.venv/bin/)?dplightning\s+(\S.*)$", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def doc_commands(text: str) -> list[list[str]]:
    """The argv (after ``dplightning``) of every command quoted in a Markdown text: lines of shell code blocks
    and inline code spans that start with ``dplightning`` or ``.venv/bin/dplightning``.

    Shell comments and anything after ``;``, ``&&`` or ``|`` are dropped. A span with a literal ``...``
    argument is prose naming a command family ("`dplightning privacy ...`"), not a command, and is skipped;
    a bare subcommand ("`dplightning audit`") is kept and checked with ``--help``.
    """
    commands: list[list[str]] = []

    def add(snippet: str) -> None:
        match = COMMAND.match(" ".join(snippet.split()))
        if match is None:
            return
        line = re.split(r"\s(?:;|&&|\|\|?)\s", match.group(1))[0]
        argv = shlex.split(line, comments=True)
        if argv and "..." not in argv:
            commands.append(argv)

    for lang, body in FENCE.findall(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            for line in body.splitlines():
                add(line.strip())
    for span in INLINE_CODE.findall(FENCE.sub("", text)):
        add(span)
    return commands


def run_command(argv: list[str]) -> tuple[int, str]:
    """Check one ``dplightning`` command as described in the module docstring: (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    # LightningCLI warns when it gets `args` while sys.argv holds arguments too (here, pytest's own).
    with (
        mock.patch.object(sys, "argv", ["dplightning"]),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = _dispatch(argv)
        except SystemExit as exc:  # --print_config and --help end the parse with SystemExit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue() + err.getvalue()


def _dispatch(argv: list[str]) -> int:
    if len(argv) == 1:
        # Prose naming a subcommand ("`dplightning audit` runs both ..."): it must exist, i.e. answer --help.
        argv = [*argv, "--help"]
    if argv[:1] == ["privacy"] and argv[1:2] == ["lmo-search"]:
        from dplightning.privacy.cli import build_parser

        try:
            build_parser().parse_args(argv[1:])
        except DPLightningError as exc:
            print(f"error: {exc}")
            return 2
        return 0
    if argv[:1] == ["audit"]:
        calls: list[tuple[object, ...]] = []

        def fake_audit(*args: object) -> dict[str, float]:
            calls.append(args)
            return {"parsed": 0.0}

        with mock.patch("dplightning.auditing.cli.run_audit", fake_audit):
            code = main(argv)
        return code if calls else (code or 1)
    if argv[:1] and argv[0] in LIGHTNING_SUBCOMMANDS and "--help" not in argv and "-h" not in argv:
        return main([*argv, "--print_config"])
    return main(argv)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the documented commands use paths relative to the repository root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config: Path) -> None:
    code, output = run_command(["fit", "--config", str(config.relative_to(ROOT))])
    assert code == 0, output[-3000:]
    assert "trainer:" in output and "model:" in output


def _documented() -> Iterator[tuple[str, list[str]]]:
    for doc in DOCS:
        for argv in doc_commands(doc.read_text()):
            yield doc.relative_to(ROOT).as_posix(), argv


DOCUMENTED = list(_documented())


@pytest.mark.parametrize(
    ("doc", "argv"), DOCUMENTED, ids=[f"{d}: {' '.join(a)}"[:100] for d, a in DOCUMENTED]
)
def test_documented_command_parses(doc: str, argv: list[str]) -> None:
    code, output = run_command(argv)
    assert code == 0, f"{doc}: `dplightning {' '.join(argv)}` fails:\n{output[-3000:]}"


def test_docs_quote_every_kind_of_command() -> None:
    """Guards the extractor: if it silently found nothing, every parametrised case above would vanish."""
    kinds = {" ".join(argv[:2]) if argv[0] == "privacy" else argv[0] for _, argv in DOCUMENTED}
    assert {"fit", "privacy epsilon", "privacy noise", "privacy lmo-search", "audit"} <= kinds, kinds
    quoted_configs = {a for _, argv in DOCUMENTED for a in argv if a.startswith("configs/")}
    assert {
        "configs/dpsgd_recipe.yaml",
        "configs/dpsgd.yaml",
        "configs/rldp.yaml",
        "configs/dpzo.yaml",
        "configs/tiny.yaml",
    } <= quoted_configs


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_yaml_examples_parse(doc: str, tmp_path: Path) -> None:
    for i, (lang, body) in enumerate(FENCE.findall(Path(doc).read_text())):
        if lang not in ("yaml", "yml"):
            continue
        config = tmp_path / f"example_{i}.yaml"
        config.write_text(body)
        code, output = run_command(["fit", "--config", str(config)])
        assert code == 0, f"{doc}: YAML example {i} does not parse:\n{body}\n{output[-3000:]}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (``–`` included), spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in HEADING.findall(markdown)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    text = FENCE.sub(
        "", doc.read_text()
    )  # `# comments` in code blocks are not headings, links there not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif (
            anchor
            and resolved.suffix == ".md"
            and anchor not in _anchors(FENCE.sub("", resolved.read_text()))
        ):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.name}: {broken}"


def test_docs_have_no_references_outside_the_repo() -> None:
    """The rationale lives in these files; pointers to design notes or trackers outside the repo rot."""
    pattern = re.compile(r"\.\./shared|\bDESIGN(?:\.md|\s*§)|(?i:\bissues? #?\d+)")
    hits = [f"{d.name}: {m.group(0)}" for d in DOCS for m in pattern.finditer(d.read_text())]
    assert not hits, hits


# --- the checker can fail ---------------------------------------------------------------------------------


def test_extractor_reads_code_blocks_and_inline_spans() -> None:
    text = (
        "Run `dplightning fit --config configs/tiny.yaml` or, wrapped,\n`.venv/bin/dplightning privacy noise\n"
        "--epsilon 8`. Not a command: `dplightning privacy ...`, `make demo`.\n\n"
        "```bash\n.venv/bin/dplightning fit --config configs/dpsgd.yaml  # a comment\nmake test\n"
        "dplightning audit --ckpt a.ckpt --config b.yaml ; echo done\n```\n"
        "```yaml\n# dplightning fit --config not/a/command.yaml\n```\n"
    )
    assert doc_commands(text) == [
        ["fit", "--config", "configs/dpsgd.yaml"],
        ["audit", "--ckpt", "a.ckpt", "--config", "b.yaml"],
        ["fit", "--config", "configs/tiny.yaml"],
        ["privacy", "noise", "--epsilon", "8"],
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # An unknown key inside a strategy's init_args.
        (
            ["fit", "--config", "configs/tiny.yaml", "--trainer.strategy.init_args.bogus_knob", "1"],
            "bogus_knob",
        ),
        # The flag the README used to document: the strategy lives under trainer.
        (
            ["fit", "--config", "configs/dpsgd.yaml", "--strategy.init_args.target_epsilon", "2"],
            "--strategy.init_args.target_epsilon",
        ),
        (["fit", "--config", "configs/no_such_config.yaml"], "no_such_config.yaml"),
        ([*PRIVACY_EPSILON, "--bogus", "1"], "--bogus"),
        (
            [
                "privacy",
                "lmo-search",
                "--epsilon",
                "2",
                "--delta",
                "1e-5",
                "--sample-rate",
                "0.01",
                "--steps",
                "10",
                "--release",
                "matrix",
            ],
            "matrix",
        ),
        (["audit", "--ckpt", "run.ckpt", "--config", "run.yaml", "--bogus"], "--bogus"),
        (["audit", "--config", "run.yaml"], "--ckpt"),
    ],
)
def test_checker_rejects_bad_commands(argv: list[str], expected: str) -> None:
    code, output = run_command(argv)
    assert code != 0 and expected in output, output[-3000:]


def test_checker_rejects_an_unknown_key_in_a_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "  bogus_trainer_key: 1\n")
    code, output = run_command(["fit", "--config", str(config)])
    assert code != 0 and "bogus_trainer_key" in output, output[-3000:]


def test_a_doc_with_a_bad_command_fails_end_to_end() -> None:
    text = "```bash\n.venv/bin/dplightning fit --config configs/tiny.yaml --model.no_such_key 1\n```\n"
    results = [run_command(argv) for argv in doc_commands(text)]
    assert len(results) == 1 and results[0][0] != 0 and "no_such_key" in results[0][1]
