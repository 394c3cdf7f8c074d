"""Fourier shell correlation between two maps: curve, resolution at 0.143 and 0.5 (Å).

Writes fsc.json (the curve per shell in 1/Å and both resolutions) and fsc.png. The
resolution is where the curve first falls below the threshold, linearly interpolated
between shells; if it never does, the Nyquist limit is reported and flagged.
"""

from __future__ import annotations

import argparse

from cryoprior.cli._common import output_dir, run_record, write_json
from cryoprior.core.errors import InputError
from cryoprior.io.mrc import read_map
from cryoprior.metrics.fsc import fsc, plot_fsc, spherical_mask


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``cryoprior fsc``."""
    p.add_argument("map1", help="first map (.mrc)")
    p.add_argument("map2", help="second map (.mrc)")
    p.add_argument("--mask", default=None, help="mask map (.mrc), same box")
    p.add_argument(
        "--mask-radius",
        type=float,
        default=None,
        help="spherical mask radius in Å (soft edge 3 px) instead of a mask file",
    )
    p.add_argument("--label", default=None, help="curve label in the plot")
    p.add_argument("-o", "--out", default="fsc", help="output folder")


def main(args: argparse.Namespace) -> int:
    """Compute the FSC and write the JSON and PNG."""
    a, b = read_map(args.map1), read_map(args.map2)
    if a.data.shape != b.data.shape:
        raise InputError(
            f"{args.map1} is {tuple(a.data.shape)} but {args.map2} is "
            f"{tuple(b.data.shape)}: the maps need the same box"
        )
    if abs(a.pixel_size - b.pixel_size) > 1e-3 * a.pixel_size:
        raise InputError(
            f"{args.map1} has {a.pixel_size:.4f} Å/px but {args.map2} has "
            f"{b.pixel_size:.4f} Å/px: resample one map first"
        )
    mask = None
    if args.mask is not None:
        m = read_map(args.mask)
        if m.data.shape != a.data.shape:
            raise InputError(
                f"{args.mask}: mask box {tuple(m.data.shape)} differs from the "
                f"maps' {tuple(a.data.shape)}"
            )
        mask = m.data
    elif args.mask_radius is not None:
        mask = spherical_mask(tuple(a.data.shape), args.mask_radius / a.pixel_size, 3.0)
    result = fsc(a.data, b.data, a.pixel_size, mask=mask)
    out = output_dir(args.out)
    plot_fsc({args.label or "FSC": result}, out / "fsc.png")
    write_json(out / "fsc.json", run_record("fsc", args, **result.to_dict()))
    print(result.describe())
    return 0
