"""Image quality metrics on (..., H, W) tensors: PSNR, SSIM, rotation-invariant error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cryoprior.core.errors import InputError


def _check_images(x: torch.Tensor, ref: torch.Tensor) -> None:
    if x.shape != ref.shape or x.ndim < 2:
        raise InputError(
            f"need two image tensors (..., H, W) of the same shape, got "
            f"{tuple(x.shape)} and {tuple(ref.shape)}"
        )


def _data_range(ref: torch.Tensor, data_range: float | torch.Tensor | None) -> torch.Tensor:
    if data_range is None:
        flat = ref.flatten(-2)
        return flat.amax(-1) - flat.amin(-1)
    rng = torch.as_tensor(data_range, dtype=ref.dtype, device=ref.device)
    if not bool((rng > 0).all()):
        raise InputError(f"data_range must be > 0, got {data_range!r}")
    return torch.broadcast_to(rng, ref.shape[:-2])


def psnr(
    x: torch.Tensor, ref: torch.Tensor, data_range: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(L^2 / MSE(x, ref)).

    L is ``data_range`` or, by default, max(ref) - min(ref) of each reference image.
    Returns shape (...) (a scalar for a single image); +inf where x equals ref.
    """
    _check_images(x, ref)
    ref = ref.to(torch.float64)
    mse = ((x.to(torch.float64) - ref) ** 2).flatten(-2).mean(-1)
    peak = _data_range(ref, data_range)
    return 10.0 * torch.log10(peak**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    t = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    ref: torch.Tensor,
    data_range: float | torch.Tensor | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13).

    Local means, variances and covariance use an 11 x 11 Gaussian window (sigma 1.5 px,
    the paper's choice) over the 'valid' region (no padding); SSIM is the mean of the SSIM
    map, with C1 = (k1 L)^2 and C2 = (k2 L)^2 and L as in :func:`psnr`. The window
    shrinks (odd size) for images smaller than it. Returns shape (...).
    """
    _check_images(x, ref)
    h, w = ref.shape[-2:]
    size = min(window_size, h, w)
    size = size if size % 2 == 1 else size - 1
    if size < 1:
        raise InputError(f"images of shape {(h, w)} are too small for SSIM")
    batch = ref.shape[:-2]
    a = x.to(torch.float64).reshape(-1, 1, h, w)
    b = ref.to(torch.float64).reshape(-1, 1, h, w)
    g = _gaussian_window(size, sigma, torch.float64)
    kernel = (g[:, None] * g[None, :])[None, None].to(a.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    peak = _data_range(ref.to(torch.float64), data_range).reshape(-1, 1, 1, 1)
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return smap.flatten(1).mean(-1).reshape(batch)


def rotation_invariant_error(est: torch.Tensor, truth: torch.Tensor, k: int = 4) -> torch.Tensor:
    """min over in-plane rotations by multiples of 360/k degrees of |rot(est) - truth| / |truth|.

    Frobenius norms over the last two dims, per image (shape (...)); ``k`` is 1, 2 or 4
    (exact rotations by 90-degree steps about the array centre, torch.rot90). Used for
    multi-target detection, where the target is recovered up to such a rotation.
    """
    _check_images(est, truth)
    if k not in (1, 2, 4):
        raise InputError(f"rotation_invariant_error supports k = 1, 2 or 4 rotations, got {k}")
    if k == 4 and est.shape[-1] != est.shape[-2]:
        raise InputError(f"90-degree rotations need square images, got {tuple(est.shape)}")
    norm = truth.to(torch.float64).flatten(-2).norm(dim=-1)
    if bool((norm == 0).any()):
        raise InputError("the reference image is all zeros: relative error undefined")
    step = 4 // k
    errors = [
        (torch.rot90(est.to(torch.float64), j * step, dims=(-2, -1)) - truth.to(torch.float64))
        .flatten(-2)
        .norm(dim=-1)
        / norm
        for j in range(k)
    ]
    return torch.stack(errors, -1).amin(-1)
