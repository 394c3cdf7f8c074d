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


def truth_map(rec, box: int, px: float):
    """The ground-truth potential (D, D, D) of a corpus record, centred on its atoms'
    centroid, at the "auto" B-factor of the priors' training maps (torch float32)."""
    import numpy as np

    from cryoprior.data.volumes import auto_bfactor
    from cryoprior.physics.atoms import atoms_to_map

    xyz, el, _ = rec.atoms()
    return atoms_to_map(xyz - xyz.mean(0), el, box, px, bfactors=np.full(len(el), auto_bfactor(px)))


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


def merge_rows(
    result: dict,
    others: list[dict],
    key: Callable[[dict], tuple],
    sort_key: Callable[[dict], tuple] | None = None,
) -> dict:
    """``result`` with the rows of side-by-side passes ``others`` added, each replacing a
    row of the same ``key``; every pass's command kept in ``result["commands"]``."""
    commands = list(result.get("commands") or [result.get("command")])
    for other in others:
        keys = {key(r) for r in other["rows"]}
        result["rows"] = [r for r in result["rows"] if key(r) not in keys] + other["rows"]
        if other.get("command") and other["command"] not in commands:
            commands.append(other["command"])
    result["commands"] = [c for c in commands if c]
    if sort_key is not None:
        result["rows"].sort(key=sort_key)
    return result
