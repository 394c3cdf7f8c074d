"""Central slices of a centred 3-D Fourier grid: extraction and its exact adjoint, insertion.

Everything here works in index units on a cubic centred grid of side M (DC at index M//2,
:mod:`cryoprior.geometry.fft`). A grid is indexed [kz, ky, kx]; frequency vectors are
ordered (kx, ky, kz). The slice of pose R is the plane of points Rᵀ(kx, ky, 0) for the 2-D
frequencies (kx, ky) of an M×M centred grid (the Fourier slice theorem; Bracewell 1956):
the centred 2-D FT of the projection of a real-space volume along z after rotation by R.

Values between grid points come from a separable interpolation kernel:

- ``"linear"``: trilinear, 2 taps per axis (8 voxels), weights (1-f, f). Its real-space
  profile on a grid of side M is sinc²(x/M) per axis.
- ``"cubic"``: cubic B-spline, 4 taps per axis (64 voxels), weights β₃(f+1), β₃(f),
  β₃(1-f), β₃(2-f) (Unser 1999, IEEE SPM 16(6):22). Profile sinc⁴(x/M); its side lobes
  are much smaller, so after the gridding correction it is ~50× more accurate than
  trilinear at the same oversampling, at ~8× the cost.

Only frequencies with |k| <= ``radius`` are sampled (0 elsewhere); the default,
``M//2 - taps/2``, keeps every tap inside the grid, so the grid never has to be extended,
and a real volume gives exactly Hermitian slices (the taps of -q are those of q, negated).

Two slice layouts:

- full: (M, M), centred on both axes (``fft2_c`` layout);
- half: (M, M//2 + 1), columns kx = 0..M//2, rows centred ky (``fftshift(rfft2(.), -2)``,
  see :func:`rfft2_c`). For real images the half layout holds everything, at half the cost.

:func:`extract_slices` and :func:`insert_slices` are exact adjoints of each other for the
same layout, kernel, radius and rotations (tested ⟨E v, s⟩ = ⟨v, Eᵀ s⟩), and each one's
autograd backward is the other.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from cryoprior.core.errors import require

Kernel = Literal["linear", "cubic"]
TAPS: dict[str, int] = {"linear": 2, "cubic": 4}

# A corner table stores 8 (linear) or 4 (cubic) copies of the grid; beyond this, gather directly.
_TABLE_LIMIT_BYTES = 512 * 2**20
# Sampled points x taps handled per chunk: bounds the (chunk, P, taps) work arrays.
_TAP_POINTS_PER_CHUNK = 2**22


# ---------------------------------------------------------------------------------------
# layouts and small helpers


def check_kernel(kernel: str) -> int:
    """The number of taps per axis of ``kernel``; InputError for an unknown name."""
    require(kernel in TAPS, f"kernel must be one of {sorted(TAPS)}, got {kernel!r}")
    return TAPS[kernel]


def default_radius(size: int, kernel: Kernel = "linear") -> int:
    """Largest sampling radius (index units) whose interpolation taps stay on the grid."""
    return size // 2 - check_kernel(kernel) // 2


def gridding_correction(
    size: int,
    padded: int,
    ndim: int,
    kernel: Kernel = "linear",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Real-space profile of ``kernel`` on a grid of side ``padded``, on the central box.

    sinc²(x/padded) (linear) or sinc⁴(x/padded) (cubic B-spline) per axis, for x the voxel
    offset from index size//2; shape (size,)*ndim. Dividing a map by it before sampling its
    FT (or after inserting into it) undoes the kernel's apodisation (gridding correction;
    Jackson et al. 1991, IEEE TMI 10:473, eq. 9).
    """
    power = check_kernel(kernel)
    x = (torch.arange(size, dtype=torch.float64, device=device) - size // 2) / padded
    c = torch.sinc(x) ** power
    out = c
    for _ in range(ndim - 1):
        out = out.unsqueeze(-1) * c
    return out.to(dtype)


def slice_shape(size: int, half: bool) -> tuple[int, int]:
    """Shape of one slice of a grid of side ``size``: (M, M//2 + 1) if ``half`` else (M, M)."""
    return (size, size // 2 + 1) if half else (size, size)


def slice_points(
    size: int,
    half: bool,
    radius: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2-D frequencies sampled on a slice and where they sit in the slice array.

    Returns ``points`` (P, 2) as (kx, ky) in index units, and ``positions`` (P,) long, the
    flat index of each point in a slice of :func:`slice_shape`. Only |k| <= radius is kept.
    """
    rows, cols = slice_shape(size, half)
    ky = torch.arange(rows, device=device) - size // 2
    kx = torch.arange(cols, device=device) - (0 if half else size // 2)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    inside = (KX * KX + KY * KY).to(torch.float64) <= float(radius) ** 2
    positions = torch.nonzero(inside.reshape(-1)).squeeze(-1)
    points = torch.stack([KX.reshape(-1)[positions], KY.reshape(-1)[positions]], -1)
    return points.to(dtype), positions


def rfft2_c(images: torch.Tensor) -> torch.Tensor:
    """Half-layout centred 2-D FFT of real images [..., y, x] -> [..., ky, kx >= 0].

    Unnormalised. Row i is ky = i - M//2, column j is kx = j (0..M//2); the full centred
    spectrum is ``fft2_c`` and the two agree on kx >= 0.
    """
    x = torch.fft.ifftshift(images, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.rfft2(x), dim=-2)


def irfft2_c(spectra: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_c`: half-layout spectra -> real ``size``×``size`` images."""
    x = torch.fft.irfft2(torch.fft.ifftshift(spectra, dim=-2), s=(size, size))
    return torch.fft.fftshift(x, dim=(-2, -1))


def flip_centred(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x(-k) on a centred grid along ``dims`` (periodic, so -(-M/2) ≡ -M/2 for even M)."""
    y = torch.flip(x, dims)
    even = tuple(d for d in dims if x.shape[d] % 2 == 0)
    return torch.roll(y, shifts=(1,) * len(even), dims=even) if even else y


def half_to_full(spectra: torch.Tensor, size: int) -> torch.Tensor:
    """Half-layout spectra of real images [..., M, M//2+1] -> full centred [..., M, M].

    The kx < 0 half follows from Hermitian symmetry, S(kx, ky) = conj S(-kx, -ky).
    """
    c = size // 2
    full = torch.empty(*spectra.shape[:-1], size, dtype=spectra.dtype, device=spectra.device)
    full[..., c:] = spectra[..., : size - c]
    mirrored = torch.conj(flip_centred(spectra, (-2,)))
    full[..., :c] = mirrored[..., 1 : c + 1].flip(-1)
    return full


def full_to_half(spectra: torch.Tensor) -> torch.Tensor:
    """Full centred spectra [..., M, M] -> half layout [..., M, M//2+1] (columns kx >= 0).

    For even M the kx = M/2 column is the kx = -M/2 column (periodicity), as in rfft.
    """
    size = spectra.shape[-1]
    c = size // 2
    if size % 2:
        return spectra[..., c:]
    return torch.cat([spectra[..., c:], spectra[..., :1]], dim=-1)


# ---------------------------------------------------------------------------------------
# interpolation plan: first tap and fractional offset of every rotated point


def _index_dtype(size: int) -> torch.dtype:
    """int32 flat indices where they fit (half the memory traffic of int64 gathers)."""
    return torch.int32 if size**3 < 2**31 else torch.int64


def _tap_offsets(size: int, taps: int, device: torch.device) -> torch.Tensor:
    """Flat offsets of the taps³ voxels from the first tap, ordered [dz, dy, dx]."""
    r = range(taps)
    return torch.tensor(
        [(dz * size + dy) * size + dx for dz in r for dy in r for dx in r],
        dtype=_index_dtype(size),
        device=device,
    )


def _plan(
    points: torch.Tensor, rotations: torch.Tensor, size: int, taps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """First tap (flat index, (n, P) int) and fractions f (n, P, 3) as (fx, fy, fz).

    The sampled point is q = Rᵀ(kx, ky, 0) = kx R[0, :] + ky R[1, :] (rows of R), at array
    coordinate q + M//2 on every axis; f is its offset from the voxel below. That voxel is
    clamped to [taps/2 - 1, M - 1 - taps/2]; this only moves points lying exactly on the
    last allowed plane (f = 0 -> f = 1, same weights), so no tap leaves the grid.
    """
    half_taps = taps // 2
    q = torch.matmul(points, rotations[:, :2, :]) + size // 2
    lower = q.detach().floor().clamp_(half_taps - 1, size - 1 - half_taps)
    frac = q - lower
    exact = torch.float64 if size**3 >= 2**24 else lower.dtype
    stride = torch.tensor([1.0, size, size * size], dtype=exact, device=q.device)
    first = torch.matmul(lower.to(exact) - (half_taps - 1), stride).to(_index_dtype(size))
    return first, frac


def _axis_weights(frac: torch.Tensor, taps: int) -> torch.Tensor:
    """Per-axis tap weights (..., 3, taps) for fractions (..., 3)."""
    if taps == 2:
        return torch.stack([1 - frac, frac], -1)
    f2 = frac * frac
    f3 = f2 * frac
    g = 1 - frac
    return (
        torch.stack([g * g * g, 3 * f3 - 6 * f2 + 4, -3 * f3 + 3 * f2 + 3 * frac + 1, f3], -1) / 6
    )


def _weights(frac: torch.Tensor, taps: int) -> torch.Tensor:
    """All taps³ weights (..., taps³) ordered [dz, dy, dx], the outer product of the axes."""
    w = _axis_weights(frac, taps)
    wyx = w[..., 1, :, None] * w[..., 0, None, :]
    return (w[..., 2, :, None, None] * wyx[..., None, :, :]).flatten(-3)


def _interpolate(corners: torch.Tensor, frac: torch.Tensor, taps: int) -> torch.Tensor:
    """Interpolate tap values (..., taps, taps, taps) [dz, dy, dx] at fractions (..., 3).

    Works on the real view of complex values (real × complex products are slow).
    """
    is_complex = corners.is_complex()
    v = torch.view_as_real(corners) if is_complex else corners.unsqueeze(-1)
    if taps == 2:  # trilinear as three nested lerps: fewer operations than 8 weights
        fx, fy, fz = frac.unsqueeze(-1).unbind(-2)
        v = v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fx[..., None, None, :]
        v = v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fy[..., None, :]
        v = v[..., 0, :] + (v[..., 1, :] - v[..., 0, :]) * fz
    else:  # one small matrix product per point: faster than three separable sums
        v = torch.matmul(_weights(frac, taps).unsqueeze(-2), v.flatten(-4, -2)).squeeze(-2)
    return torch.view_as_complex(v) if is_complex else v.squeeze(-1)


def corner_table(vol_ft: torch.Tensor, kernel: Kernel = "linear") -> torch.Tensor:
    """Neighbouring values stored side by side, so that a gather reads whole rows.

    linear: (M³, 8), row i holds grid[i + offset] for the 8 corners [dz, dy, dx];
    cubic: (M³, 4), row i holds the run grid[i], …, grid[i + 3] along x.
    Gathering rows is much faster than scattered reads; the table costs 8 (4) copies of
    the grid, so it pays off only when many slices are taken from the same grid.
    """
    if check_kernel(kernel) == 2:
        shifts = [(-dz, -dy, -dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    else:
        shifts = [(0, 0, -dx) for dx in range(4)]
    shifted = [torch.roll(vol_ft, shifts=sh, dims=(0, 1, 2)) for sh in shifts]
    return torch.stack(shifted, -1).reshape(-1, len(shifts))


def _table_row_offsets(size: int, taps: int, device: torch.device) -> torch.Tensor:
    """Flat offsets of the table rows that make up one point's taps³ values."""
    if taps == 2:
        return torch.zeros(1, dtype=_index_dtype(size), device=device)
    r = range(taps)
    return torch.tensor(
        [(dz * size + dy) * size for dz in r for dy in r], dtype=_index_dtype(size), device=device
    )


def table_pays_off(vol_ft: torch.Tensor, n_points: int, kernel: Kernel = "linear") -> bool:
    """Whether a :func:`corner_table` is worth building to sample ``n_points`` from ``vol_ft``.

    Yes when the points outnumber the voxels 4 to 1 and the table stays under 512 MiB.
    """
    copies = 8 if check_kernel(kernel) == 2 else 4
    nbytes = copies * vol_ft.numel() * vol_ft.element_size()
    return n_points >= 4 * vol_ft.numel() and nbytes <= _TABLE_LIMIT_BYTES


# ---------------------------------------------------------------------------------------
# extraction and insertion kernels (chunked over slices)


def _chunk(n_points: int, taps: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, _TAP_POINTS_PER_CHUNK // max(n_points * taps**3, 1))


def _extract(
    vol_ft: torch.Tensor,
    rotations: torch.Tensor,
    half: bool,
    kernel: Kernel,
    radius: float,
    chunk_size: int | None,
    table: torch.Tensor | None,
) -> torch.Tensor:
    size, taps = vol_ft.shape[-1], TAPS[kernel]
    real = vol_ft.real.dtype if vol_ft.is_complex() else vol_ft.dtype
    points, positions = slice_points(size, half, radius, real, vol_ft.device)
    rotations = rotations.to(real)
    n = rotations.shape[0]
    flat = vol_ft.reshape(-1)
    offsets = _tap_offsets(size, taps, vol_ft.device)
    row_offsets = _table_row_offsets(size, taps, vol_ft.device)
    chunk = _chunk(points.shape[0], taps, chunk_size)
    out = []
    for start in range(0, n, chunk):
        first, frac = _plan(points, rotations[start : start + chunk], size, taps)
        if table is not None:
            corners = table.index_select(0, (first.unsqueeze(-1) + row_offsets).reshape(-1))
        else:
            corners = flat.index_select(0, (first.unsqueeze(-1) + offsets).reshape(-1))
        out.append(_interpolate(corners.view(*first.shape, taps, taps, taps), frac, taps))
    rows, cols = slice_shape(size, half)
    slices = flat.new_zeros(n, rows * cols)
    if out:
        slices[:, positions] = torch.cat(out) if len(out) > 1 else out[0]
    return slices.view(n, rows, cols)


def _insert(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    size: int,
    weights: torch.Tensor | None,
    half: bool,
    kernel: Kernel,
    radius: float,
    chunk_size: int | None,
    out: tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, ...]:
    taps = TAPS[kernel]
    real = slices.real.dtype if slices.is_complex() else slices.dtype
    points, positions = slice_points(size, half, radius, real, slices.device)
    rotations = rotations.to(real)
    n = rotations.shape[0]
    values = slices.reshape(n, -1)[:, positions]
    wvalues = None if weights is None else weights.reshape(n, -1)[:, positions].to(real)
    if out is None:
        out = (slices.new_zeros(size**3),)
        if weights is not None:
            out += (torch.zeros(size**3, dtype=real, device=slices.device),)
    grids = tuple(g.view(-1) for g in out)
    offsets = _tap_offsets(size, taps, slices.device)
    chunk = _chunk(points.shape[0], taps, chunk_size)
    for start in range(0, n, chunk):
        first, frac = _plan(points, rotations[start : start + chunk], size, taps)
        w = _weights(frac, taps)
        index = (first.unsqueeze(-1) + offsets).reshape(-1)
        grids[0].index_add_(0, index, _scale(values[start : start + chunk], w).reshape(-1))
        if wvalues is not None:
            wsrc = (wvalues[start : start + chunk, :, None] * w).reshape(-1)
            grids[1].index_add_(0, index, wsrc)
    return tuple(g.view(size, size, size) for g in grids)


def _scale(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """values (n, P) times weights (n, P, T) -> (n, P, T), real arithmetic for complex."""
    if not values.is_complex():
        return values.unsqueeze(-1) * w
    return torch.view_as_complex(torch.view_as_real(values).unsqueeze(-2) * w.unsqueeze(-1))


class _ExtractFn(torch.autograd.Function):
    """Slice extraction whose backward is insertion (the adjoint; the weights are real)."""

    @staticmethod
    def forward(ctx, vol_ft, rotations, half, kernel, radius, chunk_size, table):  # noqa: D102
        ctx.save_for_backward(rotations)
        ctx.conf = (vol_ft.shape[-1], vol_ft.is_complex(), half, kernel, radius, chunk_size)
        return _extract(vol_ft, rotations, half, kernel, radius, chunk_size, table)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (rotations,) = ctx.saved_tensors
        size, is_complex, half, kernel, radius, chunk_size = ctx.conf
        (g,) = _insert(grad, rotations, size, None, half, kernel, radius, chunk_size, None)
        return (g if is_complex else g.real), None, None, None, None, None, None


class _InsertFn(torch.autograd.Function):
    """Slice insertion whose backward is extraction (the adjoint)."""

    @staticmethod
    def forward(ctx, slices, rotations, size, half, kernel, radius, chunk_size):  # noqa: D102
        ctx.save_for_backward(rotations)
        ctx.conf = (slices.is_complex(), half, kernel, radius, chunk_size)
        return _insert(slices, rotations, size, None, half, kernel, radius, chunk_size, None)[0]

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (rotations,) = ctx.saved_tensors
        is_complex, half, kernel, radius, chunk_size = ctx.conf
        g = _extract(grad, rotations, half, kernel, radius, chunk_size, None)
        return (g if is_complex else g.real), None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# public API


def check_rotations(rotations: torch.Tensor) -> None:
    """Raise InputError unless ``rotations`` is a float (N, 3, 3) stack of rotations."""
    require(
        isinstance(rotations, torch.Tensor)
        and rotations.ndim == 3
        and rotations.shape[-2:] == (3, 3),
        f"rotations must be a tensor of shape (N, 3, 3), got "
        f"{tuple(getattr(rotations, 'shape', ()))}",
    )
    require(rotations.is_floating_point(), "rotations must be a floating-point tensor")
    if rotations.shape[0] == 0:
        return
    with torch.no_grad():
        r = rotations.to(torch.float64)
        eye = torch.eye(3, dtype=torch.float64, device=r.device)
        err = float((r @ r.transpose(-1, -2) - eye).abs().amax())
    require(
        err < 1e-3, f"rotations must be orthonormal (R Rᵀ = I); the worst deviates by {err:.2g}"
    )


def _resolve_radius(size: int, kernel: Kernel, radius: float | None) -> float:
    check_kernel(kernel)
    limit = default_radius(size, kernel)
    if radius is None:
        return limit
    require(
        0 <= radius <= limit,
        f"radius must lie in [0, {limit}] for a grid of side {size} and the {kernel} "
        f"kernel (every interpolation tap must stay on the grid), got {radius}",
    )
    return float(radius)


def extract_slices(
    vol_ft: torch.Tensor,
    rotations: torch.Tensor,
    *,
    half: bool = False,
    kernel: Kernel = "linear",
    radius: float | None = None,
    chunk_size: int | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Central slices of a centred 3-D Fourier grid, interpolated with ``kernel``.

    Args:
        vol_ft: (M, M, M) centred grid [kz, ky, kx], complex (or real, e.g. weights).
        rotations: (N, 3, 3) poses R; slice n samples ``vol_ft`` at Rₙᵀ(kx, ky, 0).
        half: return the half layout (M, M//2+1) (kx >= 0) instead of the full (M, M).
        kernel: ``"linear"`` (trilinear) or ``"cubic"`` (cubic B-spline).
        radius: sample only |k| <= radius (index units), 0 elsewhere; default and maximum
            M//2 - taps/2 (M//2 - 1 linear, M//2 - 2 cubic).
        chunk_size: slices per chunk (default: about 4 M point-taps per chunk).
        table: ``corner_table(vol_ft, kernel)`` to reuse across calls; built here when
            :func:`table_pays_off` and ``vol_ft`` needs no grad.

    Returns:
        (N, M, M) or (N, M, M//2+1) slices, dtype of ``vol_ft``. Differentiable w.r.t.
        ``vol_ft`` (backward = :func:`insert_slices`) and, when ``rotations`` require
        grad, w.r.t. the rotations through the interpolation weights.
    """
    require(
        isinstance(vol_ft, torch.Tensor) and vol_ft.ndim == 3 and len(set(vol_ft.shape)) == 1,
        f"vol_ft must be a cubic (M, M, M) grid, got shape {tuple(getattr(vol_ft, 'shape', ()))}",
    )
    check_rotations(rotations)
    size = vol_ft.shape[-1]
    radius = _resolve_radius(size, kernel, radius)
    require(
        table is None or table.shape == (size**3, 8 if kernel == "linear" else 4),
        "table must be corner_table(vol_ft, kernel) for the same kernel",
    )
    if rotations.requires_grad:
        return _extract(vol_ft, rotations, half, kernel, radius, chunk_size, None)
    if vol_ft.requires_grad:
        table = None
    elif table is None:
        n_points = rotations.shape[0] * slice_points(size, half, radius)[0].shape[0]
        if table_pays_off(vol_ft, n_points, kernel):
            table = corner_table(vol_ft, kernel)
    return _ExtractFn.apply(vol_ft, rotations, half, kernel, radius, chunk_size, table)


@overload
def insert_slices(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    grid_size: int | tuple[int, int, int],
    weights: None = None,
    *,
    half: bool = ...,
    kernel: Kernel = ...,
    radius: float | None = ...,
    chunk_size: int | None = ...,
    out: tuple[torch.Tensor, ...] | None = ...,
) -> torch.Tensor: ...


@overload
def insert_slices(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    grid_size: int | tuple[int, int, int],
    weights: torch.Tensor,
    *,
    half: bool = ...,
    kernel: Kernel = ...,
    radius: float | None = ...,
    chunk_size: int | None = ...,
    out: tuple[torch.Tensor, ...] | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def insert_slices(
    slices: torch.Tensor,
    rotations: torch.Tensor,
    grid_size: int | tuple[int, int, int],
    weights: torch.Tensor | None = None,
    *,
    half: bool = False,
    kernel: Kernel = "linear",
    radius: float | None = None,
    chunk_size: int | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scatter slices into a centred 3-D grid: the exact adjoint of :func:`extract_slices`.

    Each slice value at |k| <= radius is added to the taps³ voxels around Rᵀ(kx, ky, 0)
    with the weights extraction uses (``index_add_``).

    Args:
        slices: (N, M, M) full or (N, M, M//2+1) half-layout (``half``) slices, complex or
            real.
        rotations: (N, 3, 3) poses.
        grid_size: M, the side of the cubic grid (or its shape (M, M, M)).
        weights: optional real slices of the same shape (e.g. CTF²), inserted with the same
            kernel into a second, real grid in the same pass (one interpolation plan).
        half, kernel, radius, chunk_size: as in :func:`extract_slices`.
        out: grids to accumulate into, ``(grid,)`` or ``(grid, weight_grid)``, each
            (M, M, M); new zero grids when None.

    Returns:
        The (M, M, M) grid, or ``(grid, weight_grid)`` when ``weights`` is given.
        Differentiable w.r.t. ``slices`` (backward = :func:`extract_slices`).
    """
    check_rotations(rotations)
    if isinstance(grid_size, (tuple, list, torch.Size)):
        require(
            len(grid_size) == 3 and len(set(grid_size)) == 1,
            f"the grid must be cubic (M, M, M), got {tuple(grid_size)}",
        )
        grid_size = int(grid_size[0])
    rows, cols = slice_shape(grid_size, half)
    require(
        isinstance(slices, torch.Tensor) and slices.shape == (rotations.shape[0], rows, cols),
        f"slices must have shape {(rotations.shape[0], rows, cols)} for "
        f"{rotations.shape[0]} rotations, grid side {grid_size} and half={half}; got "
        f"{tuple(getattr(slices, 'shape', ()))}",
    )
    require(
        weights is None or weights.shape == slices.shape,
        f"weights must have the shape of slices {tuple(slices.shape)}, got "
        f"{tuple(getattr(weights, 'shape', ()))}",
    )
    require(
        out is None or len(out) == (1 if weights is None else 2),
        "out must hold one grid, or two (grid, weight_grid) when weights are given",
    )
    radius = _resolve_radius(grid_size, kernel, radius)
    if weights is None and out is None and not rotations.requires_grad:
        return _InsertFn.apply(slices, rotations, grid_size, half, kernel, radius, chunk_size)
    grids = _insert(slices, rotations, grid_size, weights, half, kernel, radius, chunk_size, out)
    return grids[0] if weights is None else grids
