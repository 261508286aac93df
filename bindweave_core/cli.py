"""Command line: ``python -m bindweave_core {inspect,generate,evaluate} ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import BindWeaveError, GenerationCancelled
from .evaluate.cli import add_evaluate_parser
from .generate_cli import add_generate_parser
from .signals import EXIT_INTERRUPTED, exit_code, signal_name, terminate_as_interrupt

EXIT_BAD_INPUT = 2  # argparse's own code for a bad command line
EXIT_CANCELLED = EXIT_INTERRUPTED  # 128 + SIGINT, what shells report for Ctrl-C (143 for SIGTERM)


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_report(report)) + "\n")
    return 1 if report["problems"] or report.get("kind") == "unknown" else 0  # unknown: not a usable model file


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad command line gets the one line that matters and where to look, not the whole usage block
    (the usage is what ``--help`` prints). Sub-commands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]  (argparse's exits)
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m bindweave_core",
                                     description="BindWeave multi-subject video generation (core library CLI)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="report what a model file is, without loading its weights")
    p.add_argument("path", help="a .safetensors file, a directory of shards, a .pt/.pth state dict or a SAT "
                                "checkpoint folder (Kaleido's model/)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_inspect)
    add_generate_parser(sub)
    add_evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        with terminate_as_interrupt():  # SIGTERM: the same cleanup and one line as Ctrl-C
            return args.func(args)
    except GenerationCancelled as e:  # Ctrl-C / SIGTERM during a run: one line, the shell's 128 + signal
        sys.stderr.write(f"{e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:
        how = "cancelled" if signal_name(e) == "Ctrl-C" else "terminated (SIGTERM)"
        sys.stderr.write(f"{how}; no file was written\n")
        return exit_code(e)
    except BindWeaveError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_BAD_INPUT
