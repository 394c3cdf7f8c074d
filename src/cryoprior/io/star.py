"""RELION particle STAR files (3.0 and 3.1+ with optics groups), via starfile + pandas.

In code, angles are radians, shifts Å, defocus Å, voltage kV, Cs mm; in files, angles and
phase shifts are degrees (RELION). Shifts follow RELION 3.1: ``rlnOriginX/YAngst`` is the
shift that re-centres the particle, whose centre sits at ``-origin`` in the image.
RELION 3.0 files give ``rlnOriginX/Y`` in pixels; they are converted to Å on reading.
Writing always produces RELION 3.1 format (an optics table plus a particles table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryoprior.core.errors import InputError, require_positive
from cryoprior.core.files import atomic_path
from cryoprior.geometry.rotations import euler_to_matrix
from cryoprior.io.mrc import read_stack

# Optics values used when a file has no CTF at all (a typical 300 kV microscope).
DEFAULT_VOLTAGE = 300.0
DEFAULT_CS = 2.7
DEFAULT_AMPLITUDE_CONTRAST = 0.1

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_SHIFTS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
_SHIFTS_PX = ("rlnOriginX", "rlnOriginY")
_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_PIXEL = ("rlnImagePixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnImageSize")
_CTF = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor")
# Columns turned into Particles fields; every other column is carried in `extra`.
_KNOWN = {
    "rlnImageName",
    "rlnOpticsGroup",
    *_ANGLES,
    *_SHIFTS_A,
    *_SHIFTS_PX,
    *_OPTICS,
    *_PIXEL,
    *_CTF,
}
_KNOWN_OPTICS = {
    "rlnOpticsGroup",
    *_OPTICS,
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
}
_STRING_COLUMNS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"]


@dataclass
class Particles:
    """Per-particle metadata of a particle set (N particles).

    Attributes:
        image_index: (N,) int64, 1-based image number within its stack (RELION).
        image_stack: (N,) object array of stack paths (str), resolved when read.
        pixel_size: Å/px, shared by all particles.
        image_size: box size in px, shared by all particles.
        angles: (N, 3) float64 RELION (rot, tilt, psi) in radians (zeros when unknown).
        shifts: (N, 2) float64 (rlnOriginXAngst, rlnOriginYAngst) in Å.
        defocus_u, defocus_v: (N,) Å; defocus_angle: (N,) radians.
        voltage: (N,) kV; cs: (N,) mm; amplitude_contrast: (N,) fraction.
        phase_shift: (N,) radians; bfactor: (N,) Å² (CTF B-factor envelope).
        optics_group: (N,) int64 RELION optics group.
        has_poses: whether the angles are real (all three angle columns were present).
        has_ctf: whether CTF parameters are known (defocus columns present).
        extra: other per-particle columns, kept for a read -> write round trip.
        optics_extra: other optics-table columns, one row per input optics group.
        star_path: the STAR file these came from (for error messages), if any.

    Arrays left as None are filled with defaults: zero poses and shifts, zero defocus,
    300 kV, 2.7 mm, 0.1, zero phase shift and B-factor, optics group 1. Scalars given for
    per-particle fields are broadcast.
    """

    image_index: np.ndarray
    image_stack: np.ndarray
    pixel_size: float
    image_size: int
    angles: np.ndarray | None = None
    shifts: np.ndarray | None = None
    defocus_u: np.ndarray | None = None
    defocus_v: np.ndarray | None = None
    defocus_angle: np.ndarray | None = None
    voltage: np.ndarray | float | None = None
    cs: np.ndarray | float | None = None
    amplitude_contrast: np.ndarray | float | None = None
    phase_shift: np.ndarray | float | None = None
    bfactor: np.ndarray | float | None = None
    optics_group: np.ndarray | None = None
    has_poses: bool | None = None
    has_ctf: bool | None = None
    extra: pd.DataFrame | None = None
    optics_extra: pd.DataFrame | None = None
    star_path: str | None = None

    def __post_init__(self) -> None:
        self.image_index = np.asarray(self.image_index, dtype=np.int64).reshape(-1)
        n = self.image_index.size
        stacks = np.empty(n, dtype=object)
        stacks[:] = [str(s) for s in np.asarray(self.image_stack, dtype=object).reshape(-1)]
        if stacks.size != n:
            raise InputError(f"image_stack has {stacks.size} entries for {n} particles")
        self.image_stack = stacks
        if n and self.image_index.min() < 1:
            raise InputError("image indices are 1-based (RELION); found an index < 1")
        self.pixel_size = require_positive(self.pixel_size, "pixel size (Å/px)")
        self.image_size = int(require_positive(self.image_size, "image size (px)"))
        if self.has_poses is None:
            self.has_poses = self.angles is not None
        if self.has_ctf is None:
            self.has_ctf = self.defocus_u is not None
        if self.defocus_v is None and self.defocus_u is not None:
            self.defocus_v = self.defocus_u
        defaults = {
            "angles": (0.0, (n, 3)),
            "shifts": (0.0, (n, 2)),
            "defocus_u": (0.0, (n,)),
            "defocus_v": (0.0, (n,)),
            "defocus_angle": (0.0, (n,)),
            "voltage": (DEFAULT_VOLTAGE, (n,)),
            "cs": (DEFAULT_CS, (n,)),
            "amplitude_contrast": (DEFAULT_AMPLITUDE_CONTRAST, (n,)),
            "phase_shift": (0.0, (n,)),
            "bfactor": (0.0, (n,)),
        }
        for name, (default, shape) in defaults.items():
            value = getattr(self, name)
            array = np.asarray(default if value is None else value, dtype=np.float64)
            if array.ndim == 0:
                array = np.full(shape, float(array))
            if array.shape != shape:
                raise InputError(f"{name} has shape {array.shape}, expected {shape}")
            setattr(self, name, array)
        group = np.ones(n) if self.optics_group is None else self.optics_group
        self.optics_group = np.asarray(group, dtype=np.int64).reshape(-1)
        if self.optics_group.size != n:
            raise InputError(f"optics_group has {self.optics_group.size} entries, expected {n}")
        if self.extra is None:
            self.extra = pd.DataFrame(index=pd.RangeIndex(n))
        if len(self.extra) != n:
            raise InputError(f"extra has {len(self.extra)} rows, expected {n}")
        self.extra = self.extra.reset_index(drop=True)

    def __len__(self) -> int:
        return int(self.image_index.size)

    def rotation_matrices(self) -> torch.Tensor:
        """Pose rotation matrices (N, 3, 3) float64 from the RELION Euler angles."""
        return euler_to_matrix(torch.from_numpy(self.angles))

    def subset(self, indices: np.ndarray | list[int] | torch.Tensor) -> Particles:
        """A new Particles with the selected particles (integer indices or a boolean mask)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.arange(len(self))[np.asarray(indices)]
        changes = {
            f.name: getattr(self, f.name)[idx]
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        return replace(self, **changes, extra=self.extra.iloc[idx].reset_index(drop=True))

    def image_names(self, relative_to: str | os.PathLike | None = None) -> list[str]:
        """RELION ``rlnImageName`` strings, ``000001@stack.mrcs``.

        Stack paths are written relative to the folder ``relative_to`` when given.
        """
        paths = _relative_paths(self.image_stack, relative_to)
        return [f"{i:06d}@{p}" for i, p in zip(self.image_index, paths)]


def _relative_paths(stacks: np.ndarray, folder: str | os.PathLike | None) -> np.ndarray:
    """Stack paths relative to ``folder`` (computed once per distinct stack)."""
    if folder is None:
        return stacks
    start = os.path.abspath(folder)
    unique, inverse = np.unique(stacks.astype(str), return_inverse=True)
    rel = np.array([os.path.relpath(os.path.abspath(s), start) for s in unique], dtype=object)
    return rel[inverse]


def _numeric(table: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A column as float64, or InputError naming the file, column and bad value."""
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}: column {column} has a non-numeric or non-finite value "
            f"{table[column].iloc[row]!r} (row {row + 1})"
        )
    return values


def _single_value(values: np.ndarray, what: str, path: Path) -> float:
    """The one value shared by all particles, or InputError when they differ."""
    distinct = np.unique(values)
    if distinct.size and not np.allclose(distinct, distinct[0], rtol=1e-6, atol=0):
        raise InputError(
            f"{path}: particles have several {what}s {distinct.tolist()}; "
            "cryoprior needs one. Split the file by optics group."
        )
    return float(distinct[0])


def _tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particles table and the optics table (None for RELION 3.0) of a STAR file."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS)
    except Exception as err:  # starfile raises many types for malformed text
        raise InputError(f"{path}: not a readable STAR file ({err})") from None
    loops = {name: b for name, b in blocks.items() if isinstance(b, pd.DataFrame)}
    optics = loops.get("optics")
    if "particles" in loops:
        particles = loops["particles"]
    else:
        named = [b for name, b in loops.items() if name != "optics" and "rlnImageName" in b]
        others = [b for name, b in loops.items() if name != "optics"]
        if named:
            particles = named[0]
        elif len(others) == 1:
            particles = others[0]
        else:
            raise InputError(f"{path}: no particle table found (a loop with rlnImageName)")
    if "rlnImageName" not in particles:
        raise InputError(
            f"{path}: the particle table has no rlnImageName column (required: "
            "it names each particle's image as index@stack.mrcs)"
        )
    return particles.reset_index(drop=True), optics


def _parse_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``index@stack`` strings -> (1-based indices, stack paths as written)."""
    names = names.astype(str)
    has_at = names.str.contains("@", regex=False)
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:
        parts[1] = None
    index_text = parts[0].where(has_at, "1")
    stack = parts[1].where(has_at, names)
    index = pd.to_numeric(index_text, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}: rlnImageName {names.iloc[row]!r} (row {row + 1}) is not "
            "of the form index@stack with a 1-based integer index"
        )
    return index.astype(np.int64), stack.to_numpy(dtype=object)


def _resolve_stacks(stacks: np.ndarray, star_dir: Path) -> np.ndarray:
    """Stack paths resolved against the STAR file's folder.

    A relative path that does not exist there but does exist relative to the working
    directory (RELION project layout) is taken from the working directory.
    """
    unique, inverse = np.unique(stacks.astype(str), return_inverse=True)
    resolved = []
    for name in unique:
        candidate = star_dir / name
        if not Path(name).is_absolute() and not candidate.exists() and Path(name).exists():
            candidate = Path(name)
        resolved.append(os.path.normpath(candidate))
    return np.array(resolved, dtype=object)[inverse]


def read_particles(path: str | os.PathLike, pixel_size: float | None = None) -> Particles:
    """Read a RELION particle STAR file (3.1+ with optics groups, or 3.0) as Particles.

    Optics values (voltage, Cs, amplitude contrast, pixel and image size) come from each
    particle's optics group; a value in the particle table overrides its group's. The pixel
    size is ``pixel_size`` when given, else rlnImagePixelSize, else (RELION 3.0)
    rlnDetectorPixelSize [µm] * 1e4 / rlnMagnification. Missing angles give zeros and
    ``has_poses=False``; missing shifts, phase shift and B-factor give zeros. If any defocus
    column is present, rlnDefocusU, rlnDefocusV, rlnVoltage, rlnSphericalAberration and
    rlnAmplitudeContrast are required. Stack paths are resolved relative to the STAR file's
    folder. Raises InputError naming the file and column for anything missing or malformed.
    """
    path = Path(path)
    particles, optics = _tables(path)
    n = len(particles)
    if n == 0:
        raise InputError(f"{path}: the particle table is empty")

    group = np.ones(n, dtype=np.int64)
    optics_rows = None
    if optics is not None:
        if "rlnOpticsGroup" not in optics:
            raise InputError(f"{path}: the optics table has no rlnOpticsGroup column")
        groups = _numeric(optics, "rlnOpticsGroup", path).astype(np.int64)
        if np.unique(groups).size != groups.size:
            raise InputError(f"{path}: the optics table lists an rlnOpticsGroup twice")
        if "rlnOpticsGroup" in particles:
            group = _numeric(particles, "rlnOpticsGroup", path).astype(np.int64)
        elif len(optics) != 1:
            raise InputError(
                f"{path}: the particle table has no rlnOpticsGroup column but "
                f"there are {len(optics)} optics groups"
            )
        else:
            group = np.full(n, groups[0])
        lookup = pd.Series(np.arange(len(groups)), index=groups)
        unknown = ~np.isin(group, groups)
        if unknown.any():
            raise InputError(
                f"{path}: particle {int(np.flatnonzero(unknown)[0]) + 1} is in "
                f"optics group {group[unknown][0]}, which the optics table lacks"
            )
        optics_rows = lookup.loc[group].to_numpy()

    def column(name: str) -> np.ndarray | None:
        """Per-particle values of ``name`` from the particle table, else the optics table."""
        if name in particles:
            return _numeric(particles, name, path)
        if optics_rows is not None and name in optics:
            return _numeric(optics, name, path)[optics_rows]
        return None

    def require(name: str, why: str) -> np.ndarray:
        values = column(name)
        if values is None:
            raise InputError(f"{path}: missing column {name} ({why})")
        return values

    # Pixel size (Å/px) and the per-particle shifts that depend on it.
    if pixel_size is not None:
        px = require_positive(pixel_size, "pixel size (Å/px)")
    elif (image_px := column("rlnImagePixelSize")) is not None:
        px = _single_value(image_px, "pixel size", path)
    elif (detector := column("rlnDetectorPixelSize")) is not None and (
        mag := column("rlnMagnification")
    ) is not None:
        px = _single_value(detector * 1e4 / mag, "pixel size", path)
    else:
        raise InputError(
            f"{path}: no pixel size (no rlnImagePixelSize, nor "
            "rlnDetectorPixelSize with rlnMagnification); pass it explicitly "
            "(pixel_size=... / --pixel-size)"
        )
    if px <= 0:
        raise InputError(f"{path}: pixel size must be > 0, got {px} Å/px")

    index, stack_names = _parse_image_names(particles["rlnImageName"], path)
    stacks = _resolve_stacks(stack_names, path.parent)

    image_size = column("rlnImageSize")
    if image_size is not None:
        size = int(_single_value(image_size, "image size", path))
    else:
        try:
            size = read_stack(stacks[0], pixel_size=px).shape[-1]
        except InputError as err:
            raise InputError(
                f"{path}: missing column rlnImageSize, and the box size cannot "
                f"be read from the first stack ({err})"
            ) from None

    angles = None
    if any(a in particles for a in _ANGLES):
        angles = np.stack(
            [np.deg2rad(column(a)) if a in particles else np.zeros(n) for a in _ANGLES], axis=1
        )
    has_poses = all(a in particles for a in _ANGLES)

    shifts = np.zeros((n, 2))
    for axis, (in_angstrom, in_pixels) in enumerate(zip(_SHIFTS_A, _SHIFTS_PX)):
        if in_angstrom in particles:
            shifts[:, axis] = column(in_angstrom)
        elif in_pixels in particles:
            shifts[:, axis] = column(in_pixels) * px

    has_ctf = any(c in particles for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    ctf_why = "needed with the other CTF columns"
    if has_ctf:
        ctf = dict(
            defocus_u=require("rlnDefocusU", ctf_why),
            defocus_v=require("rlnDefocusV", ctf_why),
            voltage=require("rlnVoltage", ctf_why),
            cs=require("rlnSphericalAberration", ctf_why),
            amplitude_contrast=require("rlnAmplitudeContrast", ctf_why),
        )
    else:
        ctf = dict(
            voltage=column("rlnVoltage"),
            cs=column("rlnSphericalAberration"),
            amplitude_contrast=column("rlnAmplitudeContrast"),
        )
    for key, name in (("defocus_angle", "rlnDefocusAngle"), ("phase_shift", "rlnPhaseShift")):
        values = column(name)
        ctf[key] = None if values is None else np.deg2rad(values)
    ctf["bfactor"] = column("rlnCtfBfactor")

    if optics is None:
        # RELION 3.0: one optics group per distinct (voltage, Cs, amplitude contrast).
        settings = pd.DataFrame(
            {
                k: np.zeros(n) if ctf[k] is None else ctf[k]
                for k in ("voltage", "cs", "amplitude_contrast")
            }
        )
        group = settings.groupby(list(settings.columns), sort=False).ngroup().to_numpy() + 1
        optics_extra = None
    else:
        optics_extra = optics.drop(columns=[c for c in optics if c in _KNOWN_OPTICS])
        optics_extra.index = _numeric(optics, "rlnOpticsGroup", path).astype(np.int64)

    return Particles(
        image_index=index,
        image_stack=stacks,
        pixel_size=px,
        image_size=size,
        angles=angles,
        shifts=shifts,
        optics_group=group,
        has_poses=has_poses,
        has_ctf=has_ctf,
        extra=particles.drop(columns=[c for c in particles if c in _KNOWN]),
        optics_extra=optics_extra,
        star_path=str(path),
        **ctf,
    )


def _optics_table(particles: Particles) -> tuple[pd.DataFrame, np.ndarray]:
    """One optics group per distinct (input group, voltage, Cs, amplitude contrast).

    Returns the optics table and each particle's new group number (1-based).
    """
    settings = pd.DataFrame(
        {
            "group": particles.optics_group,
            "voltage": particles.voltage,
            "cs": particles.cs,
            "amp": particles.amplitude_contrast,
        }
    )
    new_group = settings.groupby(list(settings.columns), sort=False).ngroup().to_numpy() + 1
    first = pd.Series(np.arange(len(particles))).groupby(new_group).first()
    rows = settings.iloc[first.to_numpy()]
    table = pd.DataFrame(
        {
            "rlnOpticsGroup": first.index.to_numpy(dtype=np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in first.index],
            "rlnVoltage": rows["voltage"].to_numpy(),
            "rlnSphericalAberration": rows["cs"].to_numpy(),
            "rlnAmplitudeContrast": rows["amp"].to_numpy(),
            "rlnImagePixelSize": particles.pixel_size,
            "rlnImageSize": particles.image_size,
            "rlnImageDimensionality": 2,
        }
    )
    extra = particles.optics_extra
    if extra is not None and len(extra.columns):
        source = rows["group"].to_numpy()
        for name in extra.columns:
            values = extra[name].reindex(source).to_numpy()
            present = pd.notna(values)
            if name in table:
                table.loc[present, name] = values[present]
            elif present.all():
                table[name] = values
    return table, new_group


def write_particles(path: str | os.PathLike, particles: Particles) -> None:
    """Write ``particles`` as a RELION 3.1 STAR file (optics + particles tables), atomically.

    Angles and phase shifts are written in degrees, shifts as rlnOriginX/YAngst in Å,
    images as ``000001@stack.mrcs`` with stack paths relative to the STAR file's folder.
    Angle columns are written when ``has_poses`` (or a column is non-zero); CTF columns
    when ``has_ctf``. Extra columns follow the known ones unchanged.
    """
    path = Path(path)
    optics, group = _optics_table(particles)
    table = {"rlnImageName": particles.image_names(relative_to=path.parent.resolve())}
    for axis, name in enumerate(_ANGLES):
        if particles.has_poses or np.any(particles.angles[:, axis]):
            table[name] = np.rad2deg(particles.angles[:, axis])
    table.update(rlnOriginXAngst=particles.shifts[:, 0], rlnOriginYAngst=particles.shifts[:, 1])
    if particles.has_ctf:
        table.update(
            rlnDefocusU=particles.defocus_u,
            rlnDefocusV=particles.defocus_v,
            rlnDefocusAngle=np.rad2deg(particles.defocus_angle),
            rlnPhaseShift=np.rad2deg(particles.phase_shift),
            rlnCtfBfactor=particles.bfactor,
        )
    table["rlnOpticsGroup"] = group
    frame = pd.DataFrame(table)
    extra = particles.extra.drop(columns=[c for c in particles.extra if c in frame])
    frame = pd.concat([frame, extra.reset_index(drop=True)], axis=1)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": frame}, tmp, float_format="%.10g")


def check_stack_references(particles: Particles) -> None:
    """Check every referenced stack exists, holds the image index and has the right box.

    Raises InputError naming the STAR file, the stack and the first bad index.
    """
    source = particles.star_path or "particle set"
    unique, inverse = np.unique(particles.image_stack.astype(str), return_inverse=True)
    for k, stack_path in enumerate(unique):
        if not Path(stack_path).is_file():
            raise InputError(f"{source}: references stack {stack_path}, which does not exist")
        stack = read_stack(stack_path, pixel_size=particles.pixel_size)
        wanted = particles.image_index[inverse == k]
        if wanted.max() > len(stack):
            raise InputError(
                f"{source}: image {int(wanted.max())}@{stack_path} is out of "
                f"range; that stack holds {len(stack)} images"
            )
        if stack.shape != (particles.image_size, particles.image_size):
            raise InputError(
                f"{source}: stack {stack_path} holds images of "
                f"{stack.shape[0]}x{stack.shape[1]} px but the image size is "
                f"{particles.image_size} px"
            )


def read_particle_images(
    particles: Particles, indices: np.ndarray | list[int] | None = None
) -> torch.Tensor:
    """Images of the particles at 0-based ``indices`` (all when None), float32 [k, y, x].

    Reads only those images, memory-mapping each stack once. The images are as stored:
    shifts and CTF are not applied.
    """
    idx = np.arange(len(particles)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = torch.empty(idx.size, particles.image_size, particles.image_size)
    names = particles.image_stack[idx].astype(str)
    for name in np.unique(names):
        rows = np.flatnonzero(names == name)
        with read_stack(name, pixel_size=particles.pixel_size) as stack:
            out[torch.from_numpy(rows)] = stack.get(particles.image_index[idx[rows]] - 1)
    return out
