"""Zero-centre-of-mass helpers for point-cloud diffusion.

A point cloud is a tensor ``x`` of shape (B, N, D) (D = 3 for atoms) with an optional node
mask of shape (B, N) (1 for a real node, 0 for padding). A translation-invariant density
lives on the subspace where the centre of mass (COM) of the real nodes is zero, so noise is
drawn in that subspace and the COM is removed after every reverse step (Hoogeboom et al.
2022, "Equivariant Diffusion for Molecule Generation in 3D", section 3.2; e3_diffusion
``remove_mean_with_mask`` / ``sample_center_gravity_zero_gaussian_with_mask``). Padded
nodes are always set to exactly zero.
"""

from __future__ import annotations

import torch

from cryoprior.core.errors import require


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    require(x.ndim >= 3, f"a point cloud must have shape (B, N, D), got {tuple(x.shape)}")
    if mask is not None:
        require(
            tuple(mask.shape) == tuple(x.shape[:2]),
            f"node mask must have shape (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}",
        )


def node_mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a (B, N) node mask to broadcast against ``x`` (B, N, ...), in ``x``'s dtype."""
    m = mask.to(dtype=x.dtype, device=x.device)
    return m.reshape(*m.shape, *((1,) * (x.ndim - m.ndim)))


def remove_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Subtract each cloud's COM over its real nodes; padded nodes become 0.

    ``x`` (B, N, D), ``mask`` (B, N) or None (all nodes real). Returns a new tensor.
    """
    _check(x, mask)
    if mask is None:
        return x - x.mean(dim=1, keepdim=True)
    m = node_mask_like(mask, x)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    com = (x * m).sum(dim=1, keepdim=True) / n
    return (x - com) * m


def sample_zero_com_noise(
    shape: tuple[int, ...] | torch.Size,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard Gaussian noise projected onto the zero-COM subspace of the real nodes.

    Equivalent to N(0, I) restricted to that subspace (dimension (n_real - 1)·D per cloud);
    padded nodes are 0.
    """
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
    return remove_mean(z, mask)


def com(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Centre of mass of the real nodes, shape (B, 1, D)."""
    _check(x, mask)
    if mask is None:
        return x.mean(dim=1, keepdim=True)
    m = node_mask_like(mask, x)
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def assert_zero_com(x: torch.Tensor, mask: torch.Tensor | None = None, atol: float = 1e-4) -> None:
    """Raise AssertionError unless every cloud's COM is ~0 and padding is 0 (cheap check).

    The tolerance is relative to the cloud's scale: |COM| <= atol · (1 + max|x|). NaNs fail.
    """
    c = com(x, mask).abs().amax()
    scale = 1.0 + x.detach().abs().amax()
    if not bool(c <= atol * scale):
        raise AssertionError(f"point cloud centre of mass is not zero: max |COM| = {float(c):.3g}")
    if mask is not None:
        pad = (x * (1 - node_mask_like(mask, x))).abs().amax() if x.numel() else x.new_zeros(())
        if not bool(pad == 0):
            raise AssertionError(f"padded nodes are not zero: max |x_pad| = {float(pad):.3g}")


def draw_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    points: bool = False,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard Gaussian noise of ``shape``, in the zero-COM subspace when ``points``.

    Drawn on the generator's device (so a CPU generator gives the same numbers whatever
    ``device`` is), then moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    if points:
        m = None if mask is None else mask.to(gen_device)
        z = sample_zero_com_noise(shape, m, generator, dtype, gen_device)
    else:
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gen_device)
    return z.to(device) if device is not None else z
