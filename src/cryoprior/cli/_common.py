"""Small helpers shared by the CLI modules: run records and output folders."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from cryoprior import __version__
from cryoprior.core.errors import InputError
from cryoprior.core.files import write_text_atomic


def add_common_args(parser: Any, seed: bool = True, threads: bool = True) -> None:
    """Add --seed, --threads and --quiet to a subcommand parser."""
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if threads:
        parser.add_argument(
            "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def output_dir(path: str | os.PathLike, force: bool = True) -> Path:
    """Create (if needed) and return an output folder; refuse a path that is a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a folder; choose another output path with -o")
    p.mkdir(parents=True, exist_ok=True)
    return p


def run_record(command: str, args: Any, **results: Any) -> dict[str, Any]:
    """What a run was given and what it produced, so it can be repeated (STYLE.md point 7)."""
    given = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if not k.startswith("_")
    }
    return {
        "command": command,
        "argv": sys.argv,
        "arguments": given,
        "cryoprior_version": __version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **results,
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
