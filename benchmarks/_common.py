"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path


@cache
def git_commit() -> str:
    """The short commit of the checkout the benchmark runs from ("" outside git)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB; NaN where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def write_results(
    result: dict,
    out: Path,
    name: str,
    summarise: Callable[[dict], str],
    plot: Callable[[dict, Path], None],
) -> None:
    """``name``.json (the result), ``name``.md (``summarise``) and, once there are rows,
    ``name``.png (``plot``) in ``out``, each written atomically."""
    from cryoprior.core.files import write_text_atomic

    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=1))
    write_text_atomic(out / f"{name}.md", summarise(result))
    if result["rows"]:
        plot(result, out / f"{name}.png")
