"""Forward operators: the measurement models y = A(x) of cryoprior.

Every measurement in cryoprior is ``y = A(x) + n``. This module holds the operators ``A``
(the noise model and the statistics measured from images are in
:mod:`cryoprior.physics.measurement`); solvers (``cryoprior.solvers``) combine them with a
prior. Operators know nothing about priors (DESIGN.md), and solvers use them only through
this interface (STYLE.md point 3; never through a class name):

- :class:`Operator`: ``forward(x)`` (also ``op(x)``), ``domain_shape`` and ``range_shape``
  (one sample's shapes). ``x`` is ``(*batch, *domain_shape)`` and ``forward`` returns
  ``(*batch, *range_shape)``, so the same operator serves one map, a batch of maps
  (B, 1, D, D, D) or a batch of point clouds (B, N, 3).
- :class:`LinearOperator`: adds ``adjoint(y)`` (the true adjoint, tested:
  ⟨Ax, y⟩ = ⟨x, Aᵀy⟩) and ``normal(x) = AᵀA x``. ``forward`` and ``adjoint`` are
  differentiable w.r.t. their input, and the gradient of ``forward`` *is* the adjoint
  (a custom autograd function), so back-propagating through a projection costs one
  back-projection and keeps no autograd tape of the Fourier-slice internals. Linear
  operators compose (``A @ B``) and scale (``2.0 * A``).

Operators here, all in the convention of :mod:`cryoprior.physics.projection` and of the
particle simulator (:mod:`cryoprior.physics.simulator`), so that ``operator(map)`` is what
the simulator writes before noise: images are Σ_z V(Rᵀ(x, y, z)) in *voxel units* (a
sum over voxels, not a line integral in Å), then the CTF, then the shift.

- :class:`ProjectionCTFOperator` = shift ∘ CTF ∘ P_R, the cryo-EM image formation model,
  built from :class:`ProjectionOperator` (Fourier-slice projection P_R at known poses),
  :class:`PaddedProjectionOperator` and :class:`PaddedCTFOperator` (CTF and shift on the
  oversampled grid, then the crop: the simulator's model), or :class:`CTFOperator` and
  :class:`ShiftOperator` (on the image's own periodic grid);
- :class:`CalphaProjectionOperator`: non-linear, Cα clouds (B, N, 3) in Å rendered as
  Gaussian blobs, projected exactly (analytic line integrals), CTF, shift;
- :class:`MatrixOperator` (a dense matrix; toy problems and tests),
  :class:`GradientOperator` (periodic forward differences; smoothness regularisers),
  :class:`ScaledLinearOperator`, :class:`ComposedLinearOperator`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from cryoprior.core.errors import require, require_positive
from cryoprior.core.tensors import complex_dtype
from cryoprior.geometry.fft import fft2_c, ifft2_c
from cryoprior.physics.atoms import gaussians_to_images
from cryoprior.physics.ctf import CTFParams, apply_ctf, compute_ctf
from cryoprior.physics.fourier_slice import Kernel, check_kernel, check_rotations
from cryoprior.physics.projection import (
    Projector,
    backproject,
    crop_centred,
    pad_centred,
    padded_size,
)
from cryoprior.physics.shifts import shift_images, shift_spectra

# ---------------------------------------------------------------------------------------
# base classes


class Operator(ABC):
    """A forward model ``x -> y`` acting on the trailing ``domain_shape`` dims of ``x``.

    ``forward`` maps ``(*batch, *domain_shape)`` to ``(*batch, *range_shape)`` and is
    differentiable w.r.t. ``x`` wherever the model is.
    """

    domain_shape: tuple[int, ...]
    range_shape: tuple[int, ...]

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A(x), shape ``(*batch, *range_shape)``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def batch_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The leading dims of ``x`` in front of ``domain_shape`` (raises if they do not fit)."""
        return _split_batch(x, self.domain_shape, "input", type(self).__name__)

    def range_batch_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        """The leading dims of ``y`` in front of ``range_shape`` (raises if they do not fit)."""
        return _split_batch(y, self.range_shape, "measurement", type(self).__name__)


def _split_batch(x: torch.Tensor, shape: tuple[int, ...], what: str, name: str) -> tuple[int, ...]:
    n = len(shape)
    ok = isinstance(x, torch.Tensor) and x.ndim >= n and tuple(x.shape[x.ndim - n :]) == shape
    require(
        ok,
        f"{name}: the {what} must have shape (*batch, {', '.join(map(str, shape))}), got "
        f"{tuple(getattr(x, 'shape', ()))}",
    )
    return tuple(x.shape[: x.ndim - n])


class _ApplyLinear(torch.autograd.Function):
    """y = A x (or Aᵀ x) whose backward is the other one: the gradient of a linear map."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: LinearOperator, transpose: bool) -> torch.Tensor:  # noqa: D102
        ctx.op, ctx.transpose = op, transpose
        return op.apply_adjoint(x) if transpose else op.apply(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: D102
        op = ctx.op
        return (op.forward(grad) if ctx.transpose else op.adjoint(grad)), None, None


class LinearOperator(Operator):
    """A linear operator with its true adjoint.

    Subclasses implement :meth:`apply` (A x) and :meth:`apply_adjoint` (Aᵀ y) on batched
    inputs; :meth:`forward` and :meth:`adjoint` wrap them so that autograd uses the adjoint
    as the gradient (gradients flow to the input only, not to operator parameters).
    """

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for ``x`` of shape ``(*batch, *domain_shape)``."""

    @abstractmethod
    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y for ``y`` of shape ``(*batch, *range_shape)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x; differentiable, with gradient Aᵀ."""
        self.batch_shape(x)
        return _ApplyLinear.apply(x, self, False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ y; differentiable, with gradient A."""
        self.range_batch_shape(y)
        return _ApplyLinear.apply(y, self, True)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """AᵀA x (the normal operator of least squares)."""
        return self.adjoint(self.forward(x))

    def __matmul__(self, other: LinearOperator) -> ComposedLinearOperator:
        return ComposedLinearOperator(self, other)

    def __mul__(self, factor: float) -> ScaledLinearOperator:
        return ScaledLinearOperator(self, factor)

    __rmul__ = __mul__

    def norm_estimate(
        self,
        n_iter: int = 30,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> float:
        """Largest singular value ‖A‖₂ by power iteration on AᵀA (from below, ~1e-3 rel.)."""
        x = torch.randn(self.domain_shape, generator=generator, dtype=dtype, device=device)
        x = x / x.norm()
        value = 0.0
        with torch.no_grad():
            for _ in range(int(n_iter)):
                z = self.normal(x)
                value = float(z.norm())
                if value == 0.0:
                    return 0.0
                x = z / value
        return math.sqrt(value)


class ScaledLinearOperator(LinearOperator):
    """``factor · A`` for a linear operator A and a real scalar factor."""

    def __init__(self, op: LinearOperator, factor: float) -> None:
        self.op, self.factor = op, float(factor)
        self.domain_shape, self.range_shape = op.domain_shape, op.range_shape

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * self.op.apply(x)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.factor * self.op.apply_adjoint(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """factor² AᵀA x, through A's own (possibly fused) normal operator."""
        return self.factor**2 * self.op.normal(x)


class ComposedLinearOperator(LinearOperator):
    """A₁ ∘ A₂ ∘ … ∘ Aₙ (``ops`` outermost first, as written in maths); adjoint in reverse."""

    def __init__(self, *ops: LinearOperator) -> None:
        require(len(ops) >= 1, "ComposedLinearOperator needs at least one operator")
        for outer, inner in zip(ops[:-1], ops[1:]):
            require(
                tuple(outer.domain_shape) == tuple(inner.range_shape),
                f"cannot compose: {type(outer).__name__} takes {outer.domain_shape} but "
                f"{type(inner).__name__} gives {inner.range_shape}",
            )
        self.ops = tuple(ops)
        self.domain_shape, self.range_shape = ops[-1].domain_shape, ops[0].range_shape

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            x = op.apply(x)
        return x

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            y = op.apply_adjoint(y)
        return y


# ---------------------------------------------------------------------------------------
# simple linear operators


class MatrixOperator(LinearOperator):
    """y = M x for a dense (m, n) matrix M; x (*batch, n) -> y (*batch, m)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        require(
            isinstance(matrix, torch.Tensor) and matrix.ndim == 2,
            f"matrix must be a 2-D tensor (m, n), got {tuple(getattr(matrix, 'shape', ()))}",
        )
        self.matrix = matrix
        self.range_shape, self.domain_shape = (matrix.shape[0],), (matrix.shape[1],)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.to(x).T

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.matrix.to(y)


class GradientOperator(LinearOperator):
    """Periodic forward differences along every axis of a grid of ``shape``.

    (D x)_a = x(r + e_a) − x(r) for each axis a, stacked first: x (*batch, *shape) ->
    (*batch, ndim, *shape). DᵀD is the (negated) periodic discrete Laplacian, so
    ‖D x‖² = Σ_a Σ_r (x(r + e_a) − x(r))², the smoothness penalty ‖∇x‖² in voxel units.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.domain_shape = tuple(int(s) for s in shape)
        require(
            len(self.domain_shape) >= 1 and all(s >= 1 for s in self.domain_shape),
            f"GradientOperator needs a grid shape, got {shape}",
        )
        self.range_shape = (len(self.domain_shape), *self.domain_shape)

    def _dims(self, x: torch.Tensor) -> range:
        n = len(self.domain_shape)
        return range(x.ndim - n, x.ndim)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [torch.roll(x, -1, d) - x for d in self._dims(x)], dim=-1 - len(self.domain_shape)
        )

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        n = len(self.domain_shape)
        parts = y.unbind(dim=y.ndim - n - 1)
        out = torch.zeros_like(parts[0])
        for part, d in zip(parts, self._dims(parts[0])):
            out = out + torch.roll(part, 1, d) - part
        return out


# ---------------------------------------------------------------------------------------
# cryo-EM image formation


def _check_image_stack(t: torch.Tensor, name: str, n: int | None, sizes: Sequence[int]) -> None:
    ok = isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[1] == t.shape[2]
    ok = ok and int(t.shape[-1]) in sizes
    want = " or ".join(f"(K, {d}, {d})" for d in sizes)
    require(ok, f"{name} must have shape {want}, got {tuple(getattr(t, 'shape', ()))}")
    require(n is None or t.shape[0] == n, f"{name} has {t.shape[0]} entries, expected {n}")
    require(not t.is_complex(), f"{name} must be real")


def _check_shifts(shifts: torch.Tensor, n: int | None) -> None:
    require(
        isinstance(shifts, torch.Tensor) and shifts.ndim == 2 and shifts.shape[-1] == 2,
        f"shifts must be a (K, 2) tensor of (dx, dy) pixels, got "
        f"{tuple(getattr(shifts, 'shape', ()))}",
    )
    require(n is None or shifts.shape[0] == n, f"got {shifts.shape[0]} shifts for {n} images")


class ProjectionOperator(LinearOperator):
    """Fourier-slice projections at known poses: V (*batch, D, D, D) -> (*batch, K, D, D).

    image_k(x, y) = Σ_z V(R_kᵀ(x, y, z)) in voxel units (:func:`cryoprior.physics.
    projection.project` with the same ``pad`` and ``kernel``); the adjoint is
    :func:`cryoprior.physics.projection.backproject`.
    """

    def __init__(
        self, rotations: torch.Tensor, box: int, pad: float = 2.0, kernel: Kernel = "cubic"
    ) -> None:
        check_rotations(rotations)
        check_kernel(kernel)
        self.rotations, self.box, self.pad, self.kernel = rotations, int(box), pad, kernel
        require(self.box >= 2, f"box must be >= 2 voxels, got {box}")
        n = rotations.shape[0]
        self.domain_shape, self.range_shape = (self.box,) * 3, (n, self.box, self.box)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, *self.domain_shape)
        rot = self.rotations.to(device=x.device)
        out = [Projector(v, self.pad, self.kernel).project(rot) for v in flat]
        return torch.stack(out).reshape(*x.shape[:-3], *self.range_shape)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.reshape(-1, *self.range_shape)
        rot = self.rotations.to(device=y.device)
        out = [backproject(im, rot, self.pad, kernel=self.kernel) for im in flat]
        return torch.stack(out).reshape(*y.shape[:-3], *self.domain_shape)


class PaddedProjectionOperator(LinearOperator):
    """Uncropped projections on the oversampled grid: V (*batch, D, D, D) -> (*batch, K, Dp, Dp).

    Dp = round(pad · D). The padded images are the inverse FT of
    ``Projector(V, pad, kernel).project_ft(R)``; cropping them to D gives
    :class:`ProjectionOperator`. The adjoint is the back-projection of Dp images into a
    Dp³ grid without further padding (``backproject(y, R, pad=1)``) cropped to D³, which
    is exact because the Dp grid is the same oversampled grid (tested).
    """

    def __init__(
        self, rotations: torch.Tensor, box: int, pad: float = 2.0, kernel: Kernel = "cubic"
    ) -> None:
        check_rotations(rotations)
        check_kernel(kernel)
        self.rotations, self.box, self.pad, self.kernel = rotations, int(box), pad, kernel
        self.padded_box = padded_size(self.box, pad)
        n, dp = rotations.shape[0], self.padded_box
        self.domain_shape, self.range_shape = (self.box,) * 3, (n, dp, dp)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, *self.domain_shape)
        rot = self.rotations.to(device=x.device)
        out = [ifft2_c(Projector(v, self.pad, self.kernel).project_ft(rot)).real for v in flat]
        return torch.stack(out).reshape(*x.shape[:-3], *self.range_shape)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        flat = y.reshape(-1, *self.range_shape)
        rot = self.rotations.to(device=y.device)
        out = [
            crop_centred(backproject(im, rot, 1.0, kernel=self.kernel), self.box, 3) for im in flat
        ]
        return torch.stack(out).reshape(*y.shape[:-3], *self.domain_shape)


class CTFOperator(LinearOperator):
    """Images convolved with their CTFs on their own (periodic) grid: (*batch, K, H, W).

    ``ctf`` (K, H, W) are real CTFs on the centred grid of the images (e.g. from
    :func:`cryoprior.physics.ctf.compute_ctf`); the operation is
    :func:`cryoprior.physics.ctf.apply_ctf`, which is self-adjoint for a real CTF. The
    CTF's point-spread function wraps around the box; :class:`PaddedCTFOperator` avoids it.
    """

    def __init__(self, ctf: torch.Tensor) -> None:
        require(
            isinstance(ctf, torch.Tensor) and ctf.ndim == 3 and not ctf.is_complex(),
            f"ctf must be a real (K, H, W) tensor, got {tuple(getattr(ctf, 'shape', ()))}",
        )
        self.ctf = ctf
        self.domain_shape = self.range_shape = tuple(ctf.shape)

    @property
    def ctf_at_zero(self) -> torch.Tensor:
        """CTF(0) of every image, shape (K,): the factor on each image's DC term."""
        h, w = self.ctf.shape[-2:]
        return self.ctf[:, h // 2, w // 2]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return apply_ctf(x, self.ctf.to(device=x.device))

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return apply_ctf(y, self.ctf.to(device=y.device))


class ShiftOperator(LinearOperator):
    """In-plane shifts on the images' own (periodic) grid: image k moves by ``shifts[k]``.

    ``shifts`` (K, 2) = (dx, dy) pixels; content moves toward +x, +y
    (:func:`cryoprior.physics.shifts.shift_images`, a Fourier phase ramp); the adjoint is
    the shift by −(dx, dy). For RELION origins in Å the particle sits at −origin, so
    ``shifts = −origin / pixel_size``.
    """

    def __init__(self, shifts: torch.Tensor, box: int) -> None:
        _check_shifts(shifts, None)
        self.shifts = shifts
        self.domain_shape = self.range_shape = (shifts.shape[0], int(box), int(box))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return shift_images(x, self.shifts.to(device=x.device, dtype=x.dtype))

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return shift_images(y, -self.shifts.to(device=y.device, dtype=y.dtype))


class PaddedCTFOperator(LinearOperator):
    """CTF and shift applied on the padded grid, then cropped: (*batch, K, Dp, Dp) -> (K, D, D).

    image = crop_D(Re F⁻¹[CTF_p · ramp(shift) · F(padded image)]), as the particle
    simulator renders particles (:class:`cryoprior.physics.simulator.ParticleRenderer`):
    the padded box stands in for the surrounding micrograph, so the CTF's point-spread
    function does not wrap around. ``ctf`` (K, Dp, Dp) is on the padded grid (frequency
    step 1/(Dp · pixel size)) or None; ``shifts`` (K, 2) pixels or None (see
    :class:`ShiftOperator`). Adjoint: zero-pad, the conjugate filter (CTF · ramp(−shift)).
    """

    def __init__(
        self,
        box: int,
        padded_box: int,
        n_images: int,
        ctf: torch.Tensor | None = None,
        shifts: torch.Tensor | None = None,
    ) -> None:
        self.box, self.padded_box = int(box), int(padded_box)
        require(self.padded_box >= self.box >= 1, "need padded_box >= box >= 1")
        if ctf is not None:
            _check_image_stack(ctf, "padded ctf", n_images, (self.padded_box,))
        if shifts is not None:
            _check_shifts(shifts, n_images)
        self.ctf, self.shifts = ctf, shifts
        self.domain_shape = (n_images, self.padded_box, self.padded_box)
        self.range_shape = (n_images, self.box, self.box)

    @property
    def ctf_at_zero(self) -> torch.Tensor:
        """CTF(0) of every image, shape (K,)."""
        if self.ctf is None:
            return torch.ones(self.domain_shape[0], dtype=torch.float64)
        c = self.padded_box // 2
        return self.ctf[:, c, c]

    def _filter(self, x: torch.Tensor, sign: float) -> torch.Tensor:
        spectra = fft2_c(x.to(complex_dtype(x.dtype)))
        if self.ctf is not None:
            spectra = spectra * self.ctf.to(device=x.device, dtype=x.dtype)
        if self.shifts is not None:
            spectra = shift_spectra(spectra, sign * self.shifts.to(device=x.device))
        return ifft2_c(spectra).real

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return crop_centred(self._filter(x, 1.0), self.box, 2)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._filter(pad_centred(y, self.padded_box, 2), -1.0)


class ProjectionCTFOperator(ComposedLinearOperator):
    """The cryo-EM image formation model at known poses: y = shift(CTF ∗ P_R V).

    V (*batch, D, D, D) -> images (*batch, K, D, D): Fourier-slice projection at poses
    ``rotations`` (K, 3, 3) (voxel units, see :class:`ProjectionOperator`), the CTFs
    (optional) and the shifts (K, 2) in pixels (optional; see :class:`ShiftOperator`).

    Where the CTF acts depends on the shape of ``ctf``:

    - (K, Dp, Dp), Dp = round(pad · D) (what :meth:`from_ctf_params` builds), or no CTF:
      on the padded projection, before the crop (:class:`PaddedCTFOperator`), exactly as
      the particle simulator renders particles, so a simulated stack is ``op(map) + noise``;
    - (K, D, D): on the cropped image with wrap-around (:class:`CTFOperator`, then
      :class:`ShiftOperator`), as ``apply_ctf`` on projections does.

    Adjoint: back-projection of the CTF-filtered, un-shifted images.
    """

    def __init__(
        self,
        rotations: torch.Tensor,
        box: int,
        ctf: torch.Tensor | None = None,
        shifts: torch.Tensor | None = None,
        pad: float = 2.0,
        kernel: Kernel = "cubic",
    ) -> None:
        check_rotations(rotations)
        box, n = int(box), rotations.shape[0]
        dp = padded_size(box, pad)
        if ctf is not None:
            _check_image_stack(ctf, "ctf", n, (dp, box))
        if shifts is not None:
            _check_shifts(shifts, n)
        ops: list[LinearOperator]
        if ctf is None and shifts is None:
            ops = [ProjectionOperator(rotations, box, pad, kernel)]
            ctf_at_zero = torch.ones(n, dtype=torch.float64)
        elif ctf is not None and ctf.shape[-1] == box and dp != box:
            ctf_op = CTFOperator(ctf)
            ops = [ctf_op, ProjectionOperator(rotations, box, pad, kernel)]
            if shifts is not None:
                ops.insert(0, ShiftOperator(shifts, box))
            ctf_at_zero = ctf_op.ctf_at_zero
        else:
            image_op = PaddedCTFOperator(box, dp, n, ctf, shifts)
            ops = [image_op, PaddedProjectionOperator(rotations, box, pad, kernel)]
            ctf_at_zero = image_op.ctf_at_zero
        super().__init__(*ops)
        #: CTF(0) of every image (K,), the factor on each image's DC term
        self.ctf_at_zero = ctf_at_zero

    @classmethod
    def from_ctf_params(
        cls,
        rotations: torch.Tensor,
        box: int,
        pixel_size: float,
        ctf_params: CTFParams | None = None,
        shifts: torch.Tensor | None = None,
        pad: float = 2.0,
        kernel: Kernel = "cubic",
    ) -> ProjectionCTFOperator:
        """The operator for CTF parameters (e.g. a ``ParticleBatch``'s ``ctf``), with the
        CTFs evaluated on the padded grid: the particle simulator's model."""
        ctf = None
        if ctf_params is not None:
            dp = padded_size(int(box), pad)
            ctf = compute_ctf(ctf_params, (dp, dp), pixel_size, torch.float64)
        return cls(rotations, box, ctf, shifts, pad, kernel)


class CalphaProjectionOperator(Operator):
    """Cα clouds -> particle images: Gaussian blobs, exact projection, CTF, shift.

    Coordinates (*batch, N, 3) in Å (box frame, origin at index D//2) -> images
    (*batch, K, D, D). Each atom is an isotropic Gaussian of standard deviation ``sigma``
    Å and integral ``amplitude``; its projection along z is the 2-D Gaussian of the same
    sigma (:func:`cryoprior.physics.atoms.gaussians_to_images`, pixel-averaged), divided
    by the pixel size so that the images are in the voxel units of
    :class:`ProjectionCTFOperator`: ``op(coords)`` ≈ ``ProjectionCTFOperator(...)(
    gaussians_to_map(coords, ...))`` for the same ``ctf`` and ``shifts``. With a CTF of
    shape (K, Dp, Dp) (Dp = round(pad · D)) or shifts, the blobs are drawn on the Dp grid
    and filtered there before the crop (:class:`PaddedCTFOperator`, the simulator's
    model); a (K, D, D) CTF acts on the D grid (:class:`CTFOperator`). Non-linear;
    differentiable w.r.t. the coordinates.

    ``amplitudes`` (N,) or a scalar (per atom, in map units × Å³) and ``mask`` (N,) (1 for
    a real atom, 0 for padding) are fixed properties of the molecule.
    """

    def __init__(
        self,
        rotations: torch.Tensor,
        box: int,
        pixel_size: float,
        sigma: float,
        n_atoms: int,
        amplitudes: torch.Tensor | float = 1.0,
        mask: torch.Tensor | None = None,
        ctf: torch.Tensor | None = None,
        shifts: torch.Tensor | None = None,
        pad: float = 2.0,
    ) -> None:
        check_rotations(rotations)
        self.rotations, self.box = rotations, int(box)
        self.pixel_size = require_positive(pixel_size, "pixel size (Å/px)")
        self.sigma = require_positive(sigma, "Gaussian sigma (Å)")
        n, k = int(n_atoms), rotations.shape[0]
        require(n >= 1, f"n_atoms must be >= 1, got {n_atoms}")
        amps = torch.as_tensor(amplitudes, dtype=torch.float64)
        require(
            amps.ndim == 0 or tuple(amps.shape) == (n,),
            f"amplitudes must be a scalar or shape ({n},), got {tuple(amps.shape)}",
        )
        weights = amps.expand(n).clone()
        if mask is not None:
            require(
                tuple(mask.shape) == (n,), f"mask must have shape ({n},), got {tuple(mask.shape)}"
            )
            weights = weights * mask.to(torch.float64)
        self.weights = weights
        self.domain_shape = (n, 3)
        self.range_shape = (k, self.box, self.box)
        dp = padded_size(self.box, pad)
        if ctf is not None:
            _check_image_stack(ctf, "ctf", k, (dp, self.box))
        if shifts is not None:
            _check_shifts(shifts, k)
        self.image_operator: LinearOperator | None
        if ctf is not None and ctf.shape[-1] == self.box and dp != self.box:
            ctf_op = CTFOperator(ctf)
            ops: list[LinearOperator] = [ctf_op]
            if shifts is not None:
                ops.insert(0, ShiftOperator(shifts, self.box))
            self.render_box = self.box
            self.image_operator = ComposedLinearOperator(*ops)
            self.ctf_at_zero = ctf_op.ctf_at_zero
        elif ctf is None and shifts is None:
            self.render_box, self.image_operator = self.box, None
            self.ctf_at_zero = torch.ones(k, dtype=torch.float64)
        else:
            padded = PaddedCTFOperator(self.box, dp, k, ctf, shifts)
            self.render_box, self.image_operator = dp, padded
            self.ctf_at_zero = padded.ctf_at_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (*batch, K, D, D) of the clouds ``x`` (*batch, N, 3) in Å."""
        self.batch_shape(x)
        rot = self.rotations.to(device=x.device, dtype=x.dtype)
        w = self.weights.to(device=x.device, dtype=x.dtype)
        images = gaussians_to_images(
            x.unsqueeze(-3), rot, self.render_box, self.pixel_size, self.sigma, amplitudes=w
        )
        images = images / self.pixel_size
        if self.image_operator is not None:
            images = self.image_operator.forward(images)
        return images


__all__ = [
    "CTFOperator",
    "CalphaProjectionOperator",
    "ComposedLinearOperator",
    "GradientOperator",
    "LinearOperator",
    "MatrixOperator",
    "Operator",
    "PaddedCTFOperator",
    "PaddedProjectionOperator",
    "ProjectionCTFOperator",
    "ProjectionOperator",
    "ScaledLinearOperator",
    "ShiftOperator",
]
