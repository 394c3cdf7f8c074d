"""MRC maps and image stacks (MRC2014, via mrcfile).

Maps are read as :class:`~cryoprior.core.containers.Volume` (float32 [z, y, x], pixel size
in Å/px from the header's voxel size). Stacks are read lazily through a memory map, so a
stack larger than RAM can be used image by image. Writers are atomic: a file is either
complete or absent.

Origin convention: cryoprior puts coordinate 0 Å at index N//2 on every axis, so maps are
written with header origin ``-(N//2) * pixel_size`` (Å) per axis; ChimeraX then places the
box centre at (0, 0, 0) and maps of different box sizes overlay.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import mrcfile
import numpy as np
import torch

from cryoprior.core.containers import ImageStack, Volume
from cryoprior.core.errors import InputError, require_positive
from cryoprior.core.files import atomic_path

# Real data modes (MRC2014) -> bytes per value: int8, int16, float32, uint16, float16.
_MODE_ITEMSIZE = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
# Largest relative difference between the x, y (and z) voxel sizes accepted as "cubic".
_ANISOTROPY_TOL = 1e-3


def _check_file(path: Path) -> None:
    """Raise InputError unless ``path`` is an existing, readable MRC file of the right size.

    The size check turns a truncated download or an interrupted write into a message that
    says so, instead of mrcfile's low-level memmap error.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable MRC file ({err})") from None
    if bytes(header.map)[:3] != b"MAP":
        raise InputError(f"{path}: not an MRC file (no 'MAP' identifier in the header)")
    mode = int(header.mode)
    if mode not in _MODE_ITEMSIZE:
        what = "complex" if mode in (3, 4) else "unsupported"
        raise InputError(
            f"{path}: MRC data mode {mode} is {what}; cryoprior reads real maps "
            "(modes 0, 1, 2, 6, 12). Convert the file to float32 (mode 2)."
        )
    nz, ny, nx = int(header.nz), int(header.ny), int(header.nx)
    if min(nz, ny, nx) < 1:
        raise InputError(f"{path}: header has an empty data block (nx={nx}, ny={ny}, nz={nz})")
    expected = 1024 + int(header.nsymbt) + nx * ny * nz * _MODE_ITEMSIZE[mode]
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(
            f"{path}: file is truncated or corrupt: the header describes "
            f"{nz}x{ny}x{nx} values ({expected} bytes in all) but the file has "
            f"{actual} bytes. Re-copy or re-write it."
        )


def _open(path: Path, mmap: bool) -> Any:
    """Open a checked MRC file read-only; mrcfile's validity problems become InputError.

    mrcfile runs in permissive mode so that files with harmless header quirks (a wrong
    machine stamp, an old map identifier) still open; those quirks are re-issued as
    warnings naming the file. The returned mrcfile object is a context manager.
    """
    _check_file(path)
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = opener(path, mode="r", permissive=True)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable MRC file ({err})") from None
    if mrc.data is None:
        mrc.close()
        problems = "; ".join(str(w.message) for w in caught) or "data block unreadable"
        raise InputError(f"{path}: malformed MRC file ({problems})")
    for w in caught:
        warnings.warn(f"{path}: {w.message}", RuntimeWarning, stacklevel=3)
    return mrc


def _float32_value(x: float) -> float:
    """A float32 header value as the decimal it was written from (7 significant digits)."""
    return float(f"{float(x):.7g}")


def _voxel_size(mrc: Any) -> tuple[float, float, float]:
    """(x, y, z) voxel size in Å from cella / (mx, my, mz); 0 where undefined."""
    h = mrc.header
    cell = (float(h.cella.x), float(h.cella.y), float(h.cella.z))
    grid = (int(h.mx), int(h.my), int(h.mz))
    return tuple(
        _float32_value(c / m) if m > 0 else 0.0  # type: ignore[return-value]
        for c, m in zip(cell, grid)
    )


def _pixel_size(path: Path, voxel: tuple[float, ...], override: float | None) -> float:
    """The pixel size: ``override`` when given, else the header's (checked > 0, cubic)."""
    if override is not None:
        return require_positive(override, "pixel size (Å/px)")
    if min(voxel) <= 0:
        raise InputError(
            f"{path}: the header voxel size is {voxel} Å, so the pixel size is "
            "unknown. Pass the pixel size explicitly (pixel_size=... / "
            "--pixel-size), or set it in the file (e.g. `mrcfile` voxel_size)."
        )
    spread = (max(voxel) - min(voxel)) / max(voxel)
    if spread > _ANISOTROPY_TOL:
        raise InputError(
            f"{path}: voxels are not cubic (voxel size x, y, z = {voxel} Å); "
            "resample the map to cubic voxels first."
        )
    return float(voxel[0])


def _axis_permutation(mrc: Any) -> tuple[int, int, int]:
    """Permutation taking the stored (sections, rows, columns) array to [z, y, x].

    MRC2014's mapc/mapr/maps say which axis (1=x, 2=y, 3=z) runs along columns, rows and
    sections; almost every cryo-EM map uses (1, 2, 3), i.e. no permutation.
    """
    h = mrc.header
    order = (int(h.maps), int(h.mapr), int(h.mapc))  # axis stored in array dims 0, 1, 2
    if sorted(order) != [1, 2, 3]:
        return (0, 1, 2)  # undefined axis order: assume the standard layout
    return tuple(order.index(axis) for axis in (3, 2, 1))  # type: ignore[return-value]


def read_map(path: str | os.PathLike, pixel_size: float | None = None) -> Volume:
    """Read a 3-D MRC map as a float32 :class:`Volume` [z, y, x].

    The pixel size (Å/px) comes from the header voxel size unless ``pixel_size`` is given.
    Raises InputError for a missing, truncated or malformed file, a 2-D image or stack of
    volumes, a zero voxel size, non-cubic voxels, or non-finite values.
    """
    path = Path(path)
    with _open(path, mmap=True) as mrc:  # one copy, straight from the mapped file
        data = mrc.data
        if data.ndim != 3:
            kind = "a single 2-D image" if data.ndim == 2 else "a stack of volumes"
            raise InputError(
                f"{path}: expected a 3-D map but the file holds {kind} (shape {data.shape})"
            )
        px = _pixel_size(path, _voxel_size(mrc), pixel_size)
        data = np.array(data.transpose(_axis_permutation(mrc)), dtype=np.float32, order="C")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the map contains NaN or infinite values")
    return Volume(torch.from_numpy(data), px)


def read_map_origin(path: str | os.PathLike) -> tuple[float, float, float]:
    """The (x, y, z) position in Å of voxel [0, 0, 0], as ChimeraX reads it.

    That is the header ``origin`` when it is non-zero, otherwise ``n[xyz]start`` times the
    voxel size. A map written by :func:`write_map` gives ``-(N//2) * pixel_size`` per axis.
    """
    path = Path(path)
    with _open(path, mmap=True) as mrc:
        h = mrc.header
        origin = tuple(_float32_value(o) for o in (h.origin.x, h.origin.y, h.origin.z))
        if any(origin):
            return origin  # type: ignore[return-value]
        # n*start are per stored dimension (columns, rows, sections); map them onto x, y, z.
        starts = {
            int(h.mapc): int(h.nxstart),
            int(h.mapr): int(h.nystart),
            int(h.maps): int(h.nzstart),
        }
        voxel = _voxel_size(mrc)
        return tuple(
            _float32_value(starts.get(a + 1, 0) * voxel[a])  # type: ignore[return-value]
            for a in range(3)
        )


def centred_origin(shape: tuple[int, ...], pixel_size: float) -> tuple[float, float, float]:
    """Header origin (x, y, z) in Å that puts index N//2 at 0 Å for a [z, y, x] ``shape``."""
    nz, ny, nx = shape
    return (-(nx // 2) * pixel_size, -(ny // 2) * pixel_size, -(nz // 2) * pixel_size)


def write_map(
    path: str | os.PathLike,
    volume: Volume,
    origin_angstrom: tuple[float, float, float] | None = None,
) -> None:
    """Write ``volume`` as a float32 MRC map, atomically.

    The voxel size is the volume's pixel size. The header origin is ``origin_angstrom``
    ((x, y, z) Å of voxel [0, 0, 0]) or, by default, :func:`centred_origin`, which makes
    ChimeraX put index N//2 at 0 Å.
    """
    data = volume.data.detach().to("cpu", torch.float32).numpy()
    origin = (
        origin_angstrom
        if origin_angstrom is not None
        else centred_origin(data.shape, volume.pixel_size)
    )
    if len(origin) != 3:
        raise InputError(f"origin_angstrom must be (x, y, z) in Å, got {origin!r}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data))
            mrc.set_volume()
            mrc.voxel_size = volume.pixel_size
            mrc.header.origin = tuple(float(o) for o in origin)


class MRCStack:
    """A read-only image stack: ``len(stack)`` images of ``shape`` (y, x), ``pixel_size`` Å.

    With ``mmap`` (default) the file is memory-mapped and only the images asked for are
    read, so stacks larger than RAM work; the map is opened on first use, released by
    :meth:`close` (or a ``with`` block), and a pickled stack (e.g. sent to a DataLoader
    worker) reopens the file on its own. Without ``mmap`` every image is loaded at once.
    """

    def __init__(
        self, path: str | os.PathLike, mmap: bool = True, pixel_size: float | None = None
    ) -> None:
        self.path = Path(path)
        self.mmap = mmap
        self._mrc: Any = None
        self._data: np.ndarray | None = None
        with _open(self.path, mmap=True) as mrc:  # header and a lazy map: nothing is read
            shape = mrc.data.shape
            if len(shape) not in (2, 3):
                raise InputError(
                    f"{self.path}: expected an image stack but the file holds "
                    f"a stack of volumes (shape {shape})"
                )
            self.pixel_size = _pixel_size(self.path, _voxel_size(mrc)[:2], pixel_size)
        self.shape: tuple[int, int] = (int(shape[-2]), int(shape[-1]))
        self._n = 1 if len(shape) == 2 else int(shape[0])
        if not mmap:
            with _open(self.path, mmap=False) as mrc:
                self._data = np.asarray(mrc.data).reshape(self._n, *self.shape)

    def _array(self) -> np.ndarray:
        """The data as an (n, y, x) array, opening the memory map if needed."""
        if self._data is None:
            self._mrc = _open(self.path, mmap=True)
            self._data = self._mrc.data.reshape(self._n, *self.shape)
        return self._data

    def __len__(self) -> int:
        return self._n

    def get(self, indices: int | slice | np.ndarray | torch.Tensor | list[int]) -> torch.Tensor:
        """Images at 0-based ``indices`` as a float32 tensor [k, y, x] (reads only those)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        if isinstance(indices, slice):
            idx = np.arange(self._n)[indices]
        else:
            idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            bad = idx[(idx < 0) | (idx >= self._n)][0]
            raise InputError(
                f"{self.path}: image index {bad} (0-based) is out of range; the "
                f"stack holds {self._n} images"
            )
        images = np.array(self._array()[idx], dtype=np.float32)  # a copy of just these
        return torch.from_numpy(images)

    def read_all(self) -> ImageStack:
        """Every image, loaded into memory, as an :class:`ImageStack`."""
        return ImageStack(self.get(slice(None)), self.pixel_size)

    def close(self) -> None:
        """Release the memory map (the next :meth:`get` reopens it)."""
        if self._mrc is not None:
            self._mrc.close()
            self._mrc = None
            self._data = None

    def __enter__(self) -> MRCStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.mmap:
            state.update(_mrc=None, _data=None)
        return state

    def __repr__(self) -> str:
        return (
            f"MRCStack({str(self.path)!r}, n={self._n}, shape={self.shape}, "
            f"pixel_size={self.pixel_size})"
        )


def read_stack(
    path: str | os.PathLike, mmap: bool = True, pixel_size: float | None = None
) -> MRCStack:
    """Open an MRC image stack (.mrcs, or a single 2-D image as a stack of one).

    With ``mmap`` (default) images are read from disk on demand; otherwise the whole stack
    is loaded at once. The pixel size (Å/px) is the header's unless ``pixel_size`` is given.
    """
    return MRCStack(path, mmap=mmap, pixel_size=pixel_size)


class StackWriter:
    """Write an MRC image stack of ``n`` images of ``shape`` (y, x) in chunks, atomically.

    The file is created with ``mrcfile.new_mmap``, so memory use stays at one chunk. Data
    go to a temporary file that is renamed onto ``path`` when the ``with`` block exits
    normally with every image written; on an exception the temporary file is removed.
    The header marks an image stack (ispg 0, mz 1), float32 (mode 2), voxel size
    ``pixel_size`` Å, and min / max / mean / rms of the data::

        with StackWriter("particles.mrcs", n, (64, 64), 1.5) as out:
            for start in range(0, n, 256):
                out.write(start, images[start:start + 256])
    """

    def __init__(
        self, path: str | os.PathLike, n: int, shape: tuple[int, int], pixel_size: float
    ) -> None:
        if int(n) < 1 or len(shape) != 2 or min(shape) < 1:
            raise InputError(
                f"{path}: a stack needs n >= 1 images of shape (y, x) >= 1, got "
                f"n={n}, shape={shape}"
            )
        self.path = Path(path)
        self.n = int(n)
        self.shape = (int(shape[0]), int(shape[1]))
        self.pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
        self._guard: contextlib.ExitStack | None = None
        self._mrc: Any = None
        self._written = np.zeros(self.n, dtype=bool)
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares

    def __enter__(self) -> StackWriter:
        with contextlib.ExitStack() as guard:
            tmp = guard.enter_context(atomic_path(self.path))
            self._mrc = mrcfile.new_mmap(
                tmp, shape=(self.n, *self.shape), mrc_mode=2, overwrite=True
            )
            guard.callback(self._mrc.close)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size
            self._guard = guard.pop_all()
        return self

    def write(self, start_index: int, images: torch.Tensor | np.ndarray) -> None:
        """Write ``images`` [k, y, x] (or one [y, x]) at 0-based positions start..start+k-1."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write called outside its `with` block")
        if isinstance(images, torch.Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 2:
            images = images[None]
        k = images.shape[0]
        if k == 0:
            return
        if images.shape[1:] != self.shape:
            raise InputError(
                f"{self.path}: images of shape {images.shape[1:]} do not fit a "
                f"stack of shape {self.shape}"
            )
        if start_index < 0 or start_index + k > self.n:
            raise InputError(
                f"{self.path}: images {start_index}..{start_index + k - 1} are "
                f"outside the stack of {self.n}"
            )
        self._mrc.data[start_index : start_index + k] = images
        self._written[start_index : start_index + k] = True
        values = images.astype(np.float64)
        s = self._stats
        s[0] = min(s[0], float(values.min()))
        s[1] = max(s[1], float(values.max()))
        s[2] += float(values.sum())
        s[3] += float((values * values).sum())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guard, self._guard = self._guard, None
        if guard is None:
            return
        if exc_type is not None:
            guard.__exit__(exc_type, exc, tb)  # closes and removes the temporary file
            return
        with guard:  # closes the file, then renames it onto path (or removes it on error)
            missing = int((~self._written).sum())
            if missing:
                raise RuntimeError(
                    f"{self.path}: {missing} of {self.n} images were never "
                    "written; the stack was not saved"
                )
            self._finish_header()
        self._mrc = None

    def _finish_header(self) -> None:
        """Header statistics from the running sums (rms is the standard deviation)."""
        lo, hi, total, squares = self._stats
        count = self.n * self.shape[0] * self.shape[1]
        mean = total / count
        h = self._mrc.header
        h.dmin, h.dmax, h.dmean = lo, hi, mean
        h.rms = float(np.sqrt(max(squares / count - mean * mean, 0.0)))


def write_stack(path: str | os.PathLike, stack: ImageStack, chunk: int = 1024) -> None:
    """Write an in-memory :class:`ImageStack` as an MRC stack (.mrcs), atomically."""
    n = len(stack)
    with StackWriter(path, n, tuple(stack.data.shape[1:]), stack.pixel_size) as out:
        for start in range(0, n, chunk):
            out.write(start, stack.data[start : start + chunk])
