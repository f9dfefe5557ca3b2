"""The ``scn`` command line: one module per subcommand, each with an ``add_parser``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import data, demo, diagnose, eval, export, md, predict, relax, train

__all__ = ["main", "build_parser"]

#: Subcommand modules, in the order ``scn --help`` lists them.
COMMANDS = [train, eval, predict, diagnose, relax, md, data, export, demo]


def build_parser() -> argparse.ArgumentParser:
    """The ``scn`` argument parser (one subcommand per task)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="scn", description="Spherical Channel Networks for atomistic energies and forces."
    )
    parser.add_argument("--version", action="version", version=f"spherical-channels {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scn`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
