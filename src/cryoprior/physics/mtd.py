"""Multi-target detection (MTD): the measurement generator and the patch model.

The 2-D model of cryo-EM without particle picking (Zabatani, Kreymer & Bendory 2023,
Eq. 1; Kreymer, Singer & Bendory, IEEE SPL 2022): a large N×N measurement

    M[ℓ] = Σ_{i=1..p} F_{φ_i}[ℓ − ℓ_i] + ε[ℓ],   ε ~ N(0, σ²) i.i.d.,

holds p copies of an L×L image F, each rotated by an unknown angle φ_i and placed with its
top-left corner at an unknown position ℓ_i (row, column).

Conventions used here (and by :mod:`cryoprior.solvers.mtd_em`):

- Rotation R_φ turns an image counter-clockwise as displayed (row index down) about its
  geometric centre c = (L − 1)/2: ``(R_φ F)[u] = F[S_φ u]`` with centred coordinates
  u = (row − c, col − c) and source coordinates
  ``src_row = cos φ·u_row + sin φ·u_col``, ``src_col = −sin φ·u_row + cos φ·u_col``.
  At φ = kπ/2 this is exactly ``torch.rot90(F, k, dims=(-2, -1))`` (the convention of
  :func:`cryoprior.metrics.images.rotation_invariant_error`); other angles interpolate
  (bicubic, Keys a = −½, or bilinear), values falling outside the image are 0.
- SNR = ‖F‖²_F / (L² σ²): the mean square of the target over its own L×L box divided by
  the noise variance (the paper's definition, Sec. I; not the variance of the whole
  measurement, which would depend on the density).
- Separation: copies are placed so that their top-left corners differ by at least
  ``separation`` pixels in row or in column (Chebyshev distance). The default 2L is the
  paper's code; 2L − 1 is the least for which every L×L patch of the partition meets at
  most one copy (the approximate EM's assumption); L is the least for which copies do not
  overlap.
- Patch model (Zabatani et al., Eqs. 9–10): each L×L patch of the partition of M is
  ``C T_ℓ Z F_φ + ε`` with Z zero-padding to 2L×2L (right and bottom), T_ℓ the circular
  shift ``(T_ℓ X)[i, j] = X[(i + a) mod 2L, (j + b) mod 2L]`` for ℓ = (a, b) ∈ [0, 2L)²
  and C the crop to [0, L)². Shifts with a = L or b = L give an empty patch (4L − 1 of
  the (2L)² shifts). A copy with top-left (r, c) seen in the patch whose top-left is
  (r₀, c₀) has shift ((r₀ − r) mod 2L, (c₀ − c) mod 2L).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoprior.core.errors import InputError, require

INTERPOLATIONS = ("bicubic", "bilinear")
#: copies per (N/L)² used by the paper: density p L² / N² = 0.1
DEFAULT_DENSITY = 0.1
#: the paper's measurement side in units of L
DEFAULT_SIZE_FACTOR = 11


# ----------------------------------------------------------------------- rotations


def rotation_grid(k: int) -> torch.Tensor:
    """The K angles k·2π/K, k = 0..K−1, in radians (float64) (Zabatani et al., Eq. 11)."""
    require(int(k) >= 1, f"the number of rotations K must be >= 1, got {k}")
    return torch.arange(int(k), dtype=torch.float64) * (2 * math.pi / int(k))


def _keys_weight(d: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (Keys 1981, Eq. 15) at distances ``d``."""
    d = d.abs()
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


class ImageRotation:
    """The linear operators R_φk for K angles on L×L images, as sparse gathers.

    ``apply(F)`` (..., L, L) → (..., K, L, L) holds R_φk F; ``adjoint(G)`` (..., K, L, L)
    → (..., L, L) is Σ_k R_φkᵀ G_k (the exact adjoint of ``apply``). Each output pixel is
    a weighted sum of ``taps`` input pixels (16 for bicubic, 4 for bilinear). Source
    coordinates within 1e-9 of a pixel are snapped to it, so multiples of 90° are exact
    permutations (``exact`` is True when every angle is one).
    """

    def __init__(self, size: int, angles: torch.Tensor, interpolation: str = "bicubic") -> None:
        require(int(size) >= 1, f"image size must be >= 1, got {size}")
        require(
            interpolation in INTERPOLATIONS,
            f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}",
        )
        angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        require(angles.numel() >= 1, "need at least one rotation angle")
        self.size = L = int(size)
        self.angles = angles
        self.interpolation = interpolation
        c = (L - 1) / 2
        u = torch.arange(L, dtype=torch.float64) - c
        ur, uc = torch.meshgrid(u, u, indexing="ij")
        cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
        src_r = (cos * ur + sin * uc + c).reshape(len(angles), -1)
        src_c = (-sin * ur + cos * uc + c).reshape(len(angles), -1)
        src_r = torch.where((src_r - src_r.round()).abs() < 1e-9, src_r.round(), src_r)
        src_c = torch.where((src_c - src_c.round()).abs() < 1e-9, src_c.round(), src_c)
        r0, c0 = src_r.floor(), src_c.floor()
        if interpolation == "bicubic":
            offsets = torch.arange(-1, 3, dtype=torch.float64)
            wr = _keys_weight(src_r[..., None] - (r0[..., None] + offsets))
            wc = _keys_weight(src_c[..., None] - (c0[..., None] + offsets))
        else:
            offsets = torch.arange(0, 2, dtype=torch.float64)
            wr = (1 - (src_r[..., None] - (r0[..., None] + offsets)).abs()).clamp(min=0)
            wc = (1 - (src_c[..., None] - (c0[..., None] + offsets)).abs()).clamp(min=0)
        rows = r0[..., :, None] + offsets  # (K, L², T1)
        cols = c0[..., :, None] + offsets
        rr = rows[..., :, None].expand(*rows.shape, len(offsets))  # (K, L², T1, T1)
        cc = cols[..., None, :].expand(*cols.shape[:-1], len(offsets), len(offsets))
        w = wr[..., :, None] * wc[..., None, :]
        inside = (rr >= 0) & (rr < L) & (cc >= 0) & (cc < L)
        w = torch.where(inside, w, torch.zeros_like(w))
        idx = torch.where(inside, rr * L + cc, torch.zeros_like(rr)).long()
        self.index = idx.reshape(len(angles), L * L, -1)  # (K, L², T)
        self.weight = w.reshape(len(angles), L * L, -1)  # (K, L², T)
        frac = torch.cat([(src_r - src_r.round()).abs(), (src_c - src_c.round()).abs()])
        self.exact = bool((frac == 0).all())

    @property
    def num_angles(self) -> int:
        """K, the number of rotations."""
        return int(self.angles.numel())

    def _check(self, x: torch.Tensor, batch_k: bool) -> None:
        L = self.size
        tail = (self.num_angles, L, L) if batch_k else (L, L)
        require(
            x.ndim >= len(tail) and tuple(x.shape[-len(tail) :]) == tail,
            f"expected images (..., {', '.join(map(str, tail))}), got {tuple(x.shape)}",
        )

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """R_φk F for every k: (..., L, L) → (..., K, L, L)."""
        self._check(image, batch_k=False)
        L = self.size
        flat = image.reshape(*image.shape[:-2], L * L)
        w = self.weight.to(image)
        out = (flat[..., self.index.to(image.device)] * w).sum(-1)
        return out.reshape(*image.shape[:-2], self.num_angles, L, L)

    def adjoint(self, images: torch.Tensor) -> torch.Tensor:
        """Σ_k R_φkᵀ G_k: (..., K, L, L) → (..., L, L)."""
        self._check(images, batch_k=True)
        L = self.size
        lead = images.shape[:-3]
        g = images.reshape(-1, self.num_angles, L * L)
        vals = (g[..., None] * self.weight.to(images)).reshape(g.shape[0], -1)
        out = torch.zeros(g.shape[0], L * L, dtype=images.dtype, device=images.device)
        out.index_add_(1, self.index.reshape(-1).to(images.device), vals)
        return out.reshape(*lead, L, L)

    def normal_diagonal(self, weights: torch.Tensor) -> torch.Tensor:
        """The diagonal of Σ_k R_φkᵀ diag(c_k) R_φk for per-pixel weights c (..., K, L, L)."""
        self._check(weights, batch_k=True)
        L = self.size
        lead = weights.shape[:-3]
        c = weights.reshape(-1, self.num_angles, L * L)
        vals = (c[..., None] * self.weight.to(weights) ** 2).reshape(c.shape[0], -1)
        out = torch.zeros(c.shape[0], L * L, dtype=weights.dtype, device=weights.device)
        out.index_add_(1, self.index.reshape(-1).to(weights.device), vals)
        return out.reshape(*lead, L, L)


def rotate_image(
    image: torch.Tensor, angles: torch.Tensor | float, interpolation: str = "bicubic"
) -> torch.Tensor:
    """``image`` (..., L, L) rotated by each angle (radians): (..., K, L, L) (see the module
    doc for the convention; multiples of 90° are exact)."""
    require(image.ndim >= 2 and image.shape[-1] == image.shape[-2], "need square images")
    op = ImageRotation(image.shape[-1], torch.as_tensor(angles), interpolation)
    return op.apply(image)


# ----------------------------------------------------------------------- patch model


def num_patches_per_side(n: int, size: int) -> int:
    """⌊N/L⌋: the partition uses the top-left ⌊N/L⌋L × ⌊N/L⌋L part of M."""
    return int(n) // int(size)


def extract_patches(measurement: torch.Tensor, size: int) -> torch.Tensor:
    """The non-overlapping L×L patches of M, row by row: (D, L, L), D = ⌊N/L⌋².

    Patch m = i·⌊N/L⌋ + j has its top-left at (i L, j L). Rows and columns beyond
    ⌊N/L⌋ L are dropped.
    """
    require(measurement.ndim == 2, f"the measurement must be 2-D, got {tuple(measurement.shape)}")
    L = int(size)
    nr, nc = measurement.shape[0] // L, measurement.shape[1] // L
    require(
        nr >= 1 and nc >= 1,
        f"the measurement {tuple(measurement.shape)} is smaller than one {L}×{L} patch",
    )
    m = measurement[: nr * L, : nc * L]
    return m.reshape(nr, L, nc, L).permute(0, 2, 1, 3).reshape(nr * nc, L, L)


def patch_model(image: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """C T_ℓ Z F: the L×L patch that ``image`` (..., L, L) produces at shift ℓ = (a, b).

    Zabatani et al. Eqs. 9–10: zero-pad to 2L×2L, circularly shift by ℓ, crop to [0, L)².
    """
    L = image.shape[-1]
    require(image.shape[-2] == L, "need square images")
    a, b = int(shift[0]), int(shift[1])
    require(0 <= a < 2 * L and 0 <= b < 2 * L, f"shift must be in [0, {2 * L})², got {shift}")
    z = torch.nn.functional.pad(image, (0, L, 0, L))
    return torch.roll(z, shifts=(-a, -b), dims=(-2, -1))[..., :L, :L]


def empty_shifts(size: int) -> torch.Tensor:
    """(2L, 2L) bool: True where the shift ℓ = (a, b) gives an empty patch (a = L or b = L)."""
    L = int(size)
    idx = torch.arange(2 * L)
    return (idx[:, None] == L) | (idx[None, :] == L)


def patch_shifts(positions: torch.Tensor, size: int, n: int) -> dict[int, tuple[int, int, int]]:
    """For each patch met by a copy: ``{patch index: (copy index, a, b)}``.

    ``positions`` (p, 2) are the copies' top-left (row, col); ``n`` is the measurement
    side. Used to check the patch model against the generator.
    """
    L = int(size)
    per_side = num_patches_per_side(n, L)
    out: dict[int, tuple[int, int, int]] = {}
    for i, (r, c) in enumerate(positions.tolist()):
        for pr in range(per_side):
            for pc in range(per_side):
                r0, c0 = pr * L, pc * L
                if -L < r - r0 < L and -L < c - c0 < L:
                    out[pr * per_side + pc] = (i, (r0 - r) % (2 * L), (c0 - c) % (2 * L))
    return out


# ----------------------------------------------------------------------- generator


@dataclass(frozen=True)
class MTDMeasurement:
    """A simulated MTD measurement and its truth (all tensors float64).

    measurement: M (N, N); clean: M without noise; target: F (L, L); positions: (p, 2)
    int64 top-left (row, col) of each copy; angles: (p,) rotation of each copy, radians;
    sigma: noise standard deviation; snr: ‖F‖²/(L²σ²) (inf when noiseless);
    rotations: K for angles on the grid k·2π/K, or None for continuous angles;
    separation: least Chebyshev distance between top-left corners used.
    """

    measurement: torch.Tensor
    clean: torch.Tensor
    target: torch.Tensor
    positions: torch.Tensor
    angles: torch.Tensor
    sigma: float
    snr: float
    rotations: int | None
    separation: int
    interpolation: str = "bicubic"

    @property
    def size(self) -> int:
        """L, the target's side."""
        return int(self.target.shape[-1])

    @property
    def n(self) -> int:
        """N, the measurement's side."""
        return int(self.measurement.shape[-1])

    @property
    def density(self) -> float:
        """p L² / N²."""
        return len(self.positions) * self.size**2 / self.n**2


def mtd_snr(target: torch.Tensor, sigma: float) -> float:
    """SNR = ‖F‖²_F / (A σ²) with A = the number of pixels of F (Zabatani et al., Sec. I)."""
    energy = float(target.to(torch.float64).pow(2).sum())
    if sigma == 0:
        return math.inf
    return energy / (target.numel() * float(sigma) ** 2)


def noise_sigma_for_mtd_snr(target: torch.Tensor, snr: float) -> float:
    """σ with ‖F‖²_F / (A σ²) = ``snr`` (0 for snr = inf, a noiseless measurement)."""
    snr = float(snr)
    require(snr > 0, f"SNR must be > 0 (‖F‖²/(L²σ²); inf for no noise), got {snr}")
    energy = float(target.to(torch.float64).pow(2).sum())
    require(energy > 0, "the target is all zeros: an SNR is undefined")
    if math.isinf(snr):
        return 0.0
    return math.sqrt(energy / (target.numel() * snr))


def place_copies(
    n: int,
    size: int,
    count: int,
    separation: int,
    generator: torch.Generator | None = None,
    max_tries: int = 200,
    max_restarts: int = 50,
) -> torch.Tensor:
    """Top-left corners (count, 2) int64 of L×L copies inside an N×N field, uniformly at
    random subject to max(|Δrow|, |Δcol|) >= ``separation`` between any two.

    Random sequential placement: each copy draws up to ``max_tries`` candidates and is
    rejected while too close to a placed one; when a copy cannot be placed, placement
    starts over (up to ``max_restarts`` times), then an InputError asks for a lower
    density or separation.
    """
    n, L, count, sep = int(n), int(size), int(count), int(separation)
    span = n - L + 1
    require(span >= 1, f"the measurement side N={n} is smaller than the target side L={L}")
    require(count >= 0, f"number of copies must be >= 0, got {count}")
    for _ in range(max_restarts):
        placed = torch.empty(0, 2, dtype=torch.int64)
        for _copy in range(count):
            cand = torch.randint(0, span, (max_tries, 2), generator=generator)
            if len(placed):
                cheb = (cand[:, None, :] - placed[None, :, :]).abs().amax(-1)
                ok = (cheb >= sep).all(-1)
            else:
                ok = torch.ones(max_tries, dtype=torch.bool)
            hits = ok.nonzero().flatten()
            if len(hits) == 0:
                break
            placed = torch.cat([placed, cand[hits[0]][None]])
        if len(placed) == count:
            return placed
    raise InputError(
        f"could not place {count} copies of side {L} with separation {sep} in a {n}×{n} "
        "measurement; lower the density or the separation, or enlarge the measurement"
    )


def simulate_mtd(
    target: torch.Tensor,
    snr: float,
    *,
    n: int | None = None,
    density: float = DEFAULT_DENSITY,
    separation: int | None = None,
    rotations: int | None = 4,
    interpolation: str = "bicubic",
    generator: torch.Generator | None = None,
) -> MTDMeasurement:
    """Simulate an MTD measurement (Zabatani et al., Eq. 1) of an L×L ``target``.

    Args:
        target: F (L, L), in whatever units the data have (MNIST: [0, 1)).
        snr: ‖F‖²/(L²σ²); ``math.inf`` for no noise.
        n: measurement side N (default 11 L, the paper's).
        density: p L²/N² (default 0.1); p = round(density N²/L²) >= 1 copies.
        separation: least max(|Δrow|, |Δcol|) between copies' top-left corners
            (default 2L; must be >= L so that copies never overlap).
        rotations: K, angles drawn uniformly from {k 2π/K} (K = 4: multiples of 90°, the
            paper's case, exact); None for continuous angles uniform in [0, 2π).
        interpolation: how off-grid rotations are computed ("bicubic" or "bilinear").
        generator: the random source (positions, angles, noise, in that order).
    """
    require(
        target.ndim == 2 and target.shape[0] == target.shape[1],
        f"the target must be a square image (L, L), got {tuple(target.shape)}",
    )
    F = target.detach().to("cpu", torch.float64)
    L = int(F.shape[-1])
    n = DEFAULT_SIZE_FACTOR * L if n is None else int(n)
    sep = 2 * L if separation is None else int(separation)
    require(sep >= L, f"separation must be >= L = {L} so copies do not overlap, got {sep}")
    require(0 < density < 1, f"density p L²/N² must be in (0, 1), got {density}")
    require(rotations is None or int(rotations) >= 1, f"rotations must be >= 1, got {rotations}")
    sigma = noise_sigma_for_mtd_snr(F, snr)
    count = max(1, round(density * n * n / (L * L)))
    positions = place_copies(n, L, count, sep, generator)
    if rotations is None:
        angles = torch.rand(count, generator=generator, dtype=torch.float64) * (2 * math.pi)
    else:
        k = torch.randint(0, int(rotations), (count,), generator=generator)
        angles = rotation_grid(int(rotations))[k]
    copies = ImageRotation(L, angles, interpolation).apply(F)
    clean = torch.zeros(n, n, dtype=torch.float64)
    for (r, c), copy in zip(positions.tolist(), copies):
        clean[r : r + L, c : c + L] += copy
    noise = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return MTDMeasurement(
        measurement=clean + sigma * noise,
        clean=clean,
        target=F,
        positions=positions,
        angles=angles,
        sigma=sigma,
        snr=float(snr),
        rotations=None if rotations is None else int(rotations),
        separation=sep,
        interpolation=interpolation,
    )
