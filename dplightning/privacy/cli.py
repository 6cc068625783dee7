"""``dplightning privacy``: privacy figures from the command line.

::

    dplightning privacy epsilon --sigma 1.1 --sample-rate 0.004267 --steps 14062 --delta 1e-5
    dplightning privacy noise --epsilon 3 --sample-rate 0.004267 --steps 14062 --delta 1e-5 --json

``epsilon`` prints ε, ``noise`` the smallest noise multiplier σ (Laplace: scale / L1 sensitivity) meeting the
target. ``lmo-search`` searches the LMO noise (Laplace scale mixture, :mod:`dplightning.privacy.lmo_search`) with the
least variance meeting a target and prints its parameters next to the Gaussian mechanism's::

    dplightning privacy lmo-search --epsilon 1 --delta 1e-5 --sample-rate 0.01 --steps 1000 --release scalar
 Plain output is the number alone, rounded *up* to 6 significant digits (so it is safe to reuse);
``--json`` prints one JSON object with the exact value and the inputs. With ``--mechanism laplace --delta 0``
the figure is pure ε-DP (basic composition of the subsampled Laplace mechanism).

Each subcommand is one ``@subcommand``-decorated function that adds its parser and sets ``handler``; adding a
subcommand (e.g. ``lmo-search``) is adding one such function.
"""

from __future__ import annotations

import argparse
import decimal
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from dplightning.errors import DPLightningError
from dplightning.privacy.accounting import (
    ACCOUNTANTS,
    compute_epsilon,
    laplace_scale_for_pure_epsilon,
    noise_for_target,
    pure_epsilon_laplace,
)

PROG = "dplightning privacy"

Subparsers = Any  # argparse._SubParsersAction (private type)
Handler = Callable[[argparse.Namespace], dict[str, Any]]
_SUBCOMMANDS: list[Callable[[Subparsers], None]] = []


class _Parser(argparse.ArgumentParser):
    """Usage errors become one-line :class:`DPLightningError` (printed as ``error: ...``, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise DPLightningError(f"{message}; see `{self.prog} --help`")


def subcommand(register: Callable[[Subparsers], None]) -> Callable[[Subparsers], None]:
    """Register a function that adds one subcommand parser (with ``set_defaults(handler=..., key=...)``).

    The handler receives the parsed arguments and returns the JSON record; ``key`` names the record's figure,
    which plain (non ``--json``) output prints alone.
    """
    _SUBCOMMANDS.append(register)
    return register


def build_parser() -> argparse.ArgumentParser:
    """The ``dplightning privacy`` parser with every registered subcommand."""
    parser = _Parser(
        prog=PROG, description="Privacy accounting (dp_accounting PLD / RDP) for DP training runs."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    for register in _SUBCOMMANDS:
        register(subparsers)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sample-rate", "-q", type=float, required=True, help="Poisson sampling rate q in (0, 1]"
    )
    parser.add_argument("--steps", "-T", type=_positive_int, required=True, help="number of noisy releases")
    parser.add_argument(
        "--delta", type=float, required=True, help="δ in (0, 1); 0 only with --mechanism laplace (pure ε-DP)"
    )
    parser.add_argument(
        "--accountant", choices=ACCOUNTANTS, default="pld", help="PLD (tight, default) or RDP"
    )
    parser.add_argument(
        "--mechanism",
        choices=("gaussian", "laplace"),
        default="gaussian",
        help="noise distribution (LMO: lmo-search)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object with the figure and the inputs"
    )


def _pure(args: argparse.Namespace) -> bool:
    """True for pure ε-DP (Laplace, δ = 0); δ = 0 with Gaussian noise is an error."""
    if args.delta != 0:
        return False
    if args.mechanism != "laplace":
        raise DPLightningError(
            "δ = 0 needs --mechanism laplace (Gaussian noise is never pure ε-DP); pass --delta > 0"
        )
    return True


def _inputs(args: argparse.Namespace, pure: bool) -> dict[str, Any]:
    return {
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "delta": args.delta,
        "accountant": "pure" if pure else args.accountant,
        "mechanism": args.mechanism,
    }


@subcommand
def _epsilon_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "epsilon",
        help="ε spent by T releases at noise multiplier σ",
        description="Print ε after --steps Poisson-sampled releases with noise multiplier --sigma.",
    )
    parser.add_argument(
        "--sigma",
        "--noise-multiplier",
        dest="sigma",
        type=float,
        required=True,
        help="noise multiplier: Gaussian std / L2 sensitivity, or Laplace scale / L1 sensitivity",
    )
    _add_common(parser)
    parser.set_defaults(handler=_run_epsilon, key="epsilon")


def _epsilon(args: argparse.Namespace, sigma: float, pure: bool) -> float:
    """ε of ``args.steps`` releases at multiplier ``sigma``: pure ε-DP (Laplace, δ = 0) or at ``args.delta``."""
    if pure:
        return pure_epsilon_laplace(sigma, args.sample_rate, args.steps)
    return compute_epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant, args.mechanism)


def _run_epsilon(args: argparse.Namespace) -> dict[str, Any]:
    pure = _pure(args)
    eps = _epsilon(args, args.sigma, pure)
    return {"epsilon": eps, "noise_multiplier": args.sigma, **_inputs(args, pure)}


@subcommand
def _noise_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "noise",
        help="smallest σ meeting a target (ε, δ)",
        description="Print the smallest noise multiplier σ with ε(σ) ≤ --epsilon after --steps releases.",
    )
    parser.add_argument("--epsilon", type=float, required=True, help="target ε > 0")
    _add_common(parser)
    parser.set_defaults(handler=_run_noise, key="noise_multiplier")


def _run_noise(args: argparse.Namespace) -> dict[str, Any]:
    pure = _pure(args)
    if pure:
        sigma = laplace_scale_for_pure_epsilon(args.epsilon, args.sample_rate, args.steps)
    else:
        sigma = noise_for_target(
            args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant, args.mechanism
        )
    eps = _epsilon(args, sigma, pure)
    return {"noise_multiplier": sigma, "epsilon": eps, "target_epsilon": args.epsilon, **_inputs(args, pure)}


@subcommand
def _lmo_search_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "lmo-search",
        help="least-variance LMO noise meeting (ε, δ), compared with the Gaussian mechanism",
        description=(
            "Search the LMO noise (Laplace(0, 1/U), U = a1·Gamma + a3·Exp + a4·Uniform) with the least variance meeting "
            "--epsilon at --delta after --steps releases at --sample-rate, within --time-budget seconds. "
            "scalar: one coordinate (DP-ZO), PLD accounting, compared with Gaussian noise on the same scalar. "
            "vector: L1-clipped vector (DP-SGD flat_l1), RDP accounting with the convexity check; per-coordinate std "
            "compared with Gaussian noise for L2 clipping at the same threshold C (L1 clipping to C is stricter)."
        ),
    )
    parser.add_argument("--epsilon", type=float, required=True, help="target ε > 0")
    parser.add_argument("--delta", type=float, required=True, help="δ in (0, 1)")
    parser.add_argument(
        "--sample-rate", "-q", type=float, required=True, help="Poisson sampling rate q in (0, 1]"
    )
    parser.add_argument("--steps", "-T", type=_positive_int, required=True, help="number of noisy releases")
    parser.add_argument("--release", choices=("scalar", "vector"), default="scalar", help="what is released")
    parser.add_argument("--time-budget", type=float, default=90.0, help="seconds for the search (default 90)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="print each improvement to stderr")
    parser.set_defaults(handler=_run_lmo_search, key=None)


def _run_lmo_search(args: argparse.Namespace) -> dict[str, Any]:
    from dplightning.privacy.lmo_search import lmo_search  # scipy.optimize only when searching

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    result = lmo_search(
        args.epsilon,
        args.delta,
        args.sample_rate,
        args.steps,
        args.release,
        args.time_budget,
        log if args.verbose else None,
    )
    compared = (
        "variance of the noise on one scalar of sensitivity 1, LMO vs Gaussian"
        if args.release == "scalar"
        else "per-coordinate noise variance, LMO with L1 clipping to C vs Gaussian with L2 clipping to the same C"
    )
    return {
        "lmo": result.mechanism.to_dict(),
        "noise_multiplier": result.noise_multiplier,
        "epsilon": result.epsilon,
        "noise_std": result.std,
        "gaussian_noise_multiplier": result.gaussian_sigma,
        "variance_ratio": result.variance_ratio,
        "compared": compared,
        "release": args.release,
        "accountant": "pld" if args.release == "scalar" else "rdp",
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
    }


def _format_lmo(record: dict[str, Any]) -> str:
    params = " ".join(f"{k}={v:.6g}" for k, v in record["lmo"].items())
    return "\n".join(
        [
            f"lmo: {params}",
            f"noise_multiplier: {_round_up(record['noise_multiplier'])} (noise = multiplier · C · n)",
            f"epsilon: {_round_up(record['epsilon'])} at delta {record['delta']:g} ({record['accountant']})",
            f"noise_std: {_round_up(record['noise_std'])} per unit sensitivity; Gaussian: "
            f"{_round_up(record['gaussian_noise_multiplier'])}",
            f"variance_ratio (LMO / Gaussian): {record['variance_ratio']:.4f} — {record['compared']}",
        ]
    )


def _round_up(value: float, digits: int = 6) -> str:
    """``value`` rounded up (towards +∞) to ``digits`` significant digits, for conservative display."""
    if not math.isfinite(value):
        return str(value)
    context = decimal.Context(prec=digits, rounding=decimal.ROUND_CEILING)
    return format(context.create_decimal(value).normalize(context), "g")


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats as strings ("inf"), so the output is strict JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def privacy_main(argv: Sequence[str] | None = None) -> int:
    """Run ``dplightning privacy`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    User errors print one ``error: ...`` line to stderr and return 2.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(args_list)
        record = args.handler(args)
    except DPLightningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    if args.json:
        print(json.dumps(_jsonable(record)))
    elif args.key is None:
        print(_format_lmo(record))
    else:
        print(_round_up(record[args.key]))
    return 0


if __name__ == "__main__":
    raise SystemExit(privacy_main())
