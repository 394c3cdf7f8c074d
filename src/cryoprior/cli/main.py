"""Entry point of the ``cryoprior`` command.

Each subcommand lives in ``cryoprior.cli.<name>`` and defines ``add_args(parser)`` and
``main(args) -> int``; its module docstring is the help text. Errors the user can fix
(:class:`~cryoprior.core.errors.InputError`) are printed on one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryoprior import __version__
from cryoprior.core.errors import InputError

# (subcommand, module). Modules are imported only when the parser is built.
COMMANDS: list[tuple[str, str]] = [
    ("demo", "cryoprior.cli.demo"),
    ("simulate", "cryoprior.cli.simulate"),
    ("reconstruct", "cryoprior.cli.reconstruct"),
    ("fsc", "cryoprior.cli.fsc"),
    ("denoise", "cryoprior.cli.denoise"),
    ("refine", "cryoprior.cli.refine"),
    ("train", "cryoprior.cli.train"),
    ("sample", "cryoprior.cli.sample"),
    ("data", "cryoprior.cli.data"),
    ("mtd", "cryoprior.cli.mtd"),
    ("superres", "cryoprior.cli.superres"),
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="cryoprior",
        description="Learned diffusion priors for cryo-EM and 3D structure recovery.",
    )
    parser.add_argument("--version", action="version", version=f"cryoprior {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else "",
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except InputError as e:
        print(f"cryoprior {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoprior {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
