"""Helpers shared by the benchmark scripts."""

from __future__ import annotations


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
