"""Band-limited multiplicative filter networks (coordinate networks) for volumes.

Two multiscale coordinate networks that map a position x to a density value, with an
exact, known Fourier support for every output:

- :class:`BACON` (Lindell et al., "BACON: Band-limited Coordinate Networks for
  Multiscale Scene Representation", CVPR 2022).
- :class:`ResidualMFN` (Shekarforoush et al., "Residual Multiplicative Filter Networks
  for Multiscale Reconstruction", NeurIPS 2022).

Both are multiplicative filter networks (MFN) with L layers and L + 1 sine filters:

    z_0 = g_0(x),   z_i = (W_i z_{i-1} + b_i) ⊙ g_i(x),   g_i(x) = sin(2π F_i x + φ_i),

for i = 1..L, and one linear output head per layer. Since sin(a)·sin(b) =
½[cos(a - b) - cos(a + b)], the spectrum of z_i holds only sums ±f_0 ± ... ± f_i of filter
frequencies, so if every component of the rows of F_k is bounded by B_k, output i contains
no frequency with a component above Σ_{k≤i} B_k (an L∞ box in Fourier space). The filter
frequencies F_k are buffers (never trained), so the bound holds during training; the
phases φ_k, W_i, b_i and the heads are trained.

Units. Coordinates are in *box units*: x = r / (D · pixel_size) for r in Å, so the box
spans [-0.5, 0.5) along every axis with the origin at voxel N//2. Frequencies are in
*cycles per box* (a DFT index offset on the centred grid); the grid's Nyquist is D/2
cycles per box and is the default ``max_frequency``. Division by D · pixel_size turns
cycles per box into cycles/Å.

Stages. ``set_stage(k)`` makes the network output only y_1..y_k and leaves only the
parameters of filters 0..k, layers 1..k and heads 1..k trainable (coarse-to-fine fitting,
Shekarforoush et al. §3.3). Every network starts at the last stage (all outputs).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from cryoprior.core.errors import InputError, require, require_positive
from cryoprior.geometry.grids import coordinate_grid


def lattice_directions(ndim: int) -> torch.Tensor:
    """The (3^d - 1)/2 nonzero vectors of {-1, 0, 1}^d whose last nonzero entry is +1.

    These are the lattice directions r of the residual MFN initialisation (13 in 3-D and
    4 in 2-D, as in the authors' code); r and -r give the same sine up to a phase, so one
    of each pair is kept. Shape (n, ndim), float64.
    """
    require(ndim >= 1, f"ndim must be >= 1, got {ndim}")
    rows = [
        v
        for v in itertools.product((-1, 0, 1), repeat=ndim)
        if any(v) and [c for c in v if c][-1] == 1
    ]
    return torch.tensor(rows, dtype=torch.float64)


class SineFilter(nn.Module):
    """g(x) = sin(2π x Fᵀ + φ): fixed frequencies F (cycles/box), trainable phases φ (rad).

    Args:
        frequency: (out_features, in_features) filter frequencies in cycles per box; stored
            as a buffer (saved in the state dict, never trained).
    """

    def __init__(self, frequency: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("frequency", frequency.to(torch.get_default_dtype()))
        self.phase = nn.Parameter(torch.empty(frequency.shape[0]).uniform_(-math.pi, math.pi))

    @property
    def bandwidth(self) -> float:
        """Largest frequency component |F_jk| of this filter, cycles per box."""
        return float(self.frequency.abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter responses, shape (..., out_features), for box-unit coordinates (..., d)."""
        return torch.sin(2.0 * math.pi * (x @ self.frequency.T) + self.phase)


def _mfn_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """Linear layer with the MFN weight init U(-√(6/n_in), √(6/n_in)) (Fathony et al. 2021)."""
    lin = nn.Linear(n_in, n_out, bias=bias)
    bound = math.sqrt(6.0 / n_in)
    nn.init.uniform_(lin.weight, -bound, bound)
    return lin


def _check_common(
    in_features: int, out_features: int, hidden_features: int, num_layers: int, box_size: int
) -> None:
    require(in_features >= 1, f"in_features must be >= 1, got {in_features}")
    require(out_features >= 1, f"out_features must be >= 1, got {out_features}")
    require(hidden_features >= 1, f"hidden_features must be >= 1, got {hidden_features}")
    require(num_layers >= 1, f"num_layers must be >= 1, got {num_layers}")
    require(box_size >= 2, f"box_size must be an integer >= 2, got {box_size}")


def _resolve_max_frequency(max_frequency: float | None, box_size: int) -> float:
    nyquist = box_size / 2
    if max_frequency is None:
        return float(nyquist)
    value = require_positive(max_frequency, "max_frequency")
    require(
        value <= nyquist,
        f"max_frequency={max_frequency} cycles/box is above the Nyquist frequency "
        f"{nyquist} of a {box_size}-voxel box; lower it or raise box_size",
    )
    return value


def _check_fractions(band_fractions: list[float] | None, num_layers: int) -> list[float]:
    """BACON's per-filter band fractions: equal shares 1/(L + 1) by default, else checked."""
    if band_fractions is None:
        return [1.0 / (num_layers + 1)] * (num_layers + 1)
    fractions = [float(f) for f in band_fractions]
    require(
        len(fractions) == num_layers + 1
        and all(f >= 0 for f in fractions)
        and sum(fractions) <= 1 + 1e-9,
        f"band_fractions needs {num_layers + 1} values >= 0 summing to <= 1 "
        f"(one per filter), got {band_fractions!r}",
    )
    return fractions


def _uniform_band_frequencies(
    fractions: list[float], fmax: float, shape: tuple[int, int], quantize: bool
) -> tuple[list[torch.Tensor], list[float]]:
    """BACON's init (Lindell et al. 2022, §3.2): filter k uniform in [-B_k, B_k]^d.

    B_k = fraction_k · fmax cycles/box; with ``quantize`` B_k is floored to an integer and
    the frequencies are integers in {-B_k, ..., B_k}. Returns the frequencies and the B_k.
    """
    frequencies, limits = [], []
    for fraction in fractions:
        b = fraction * fmax
        if quantize:
            b = float(math.floor(b + 1e-9))
            f = torch.randint(-int(b), int(b) + 1, shape).to(torch.float64)
        else:
            f = (2.0 * torch.rand(shape, dtype=torch.float64) - 1.0) * b
        frequencies.append(f)
        limits.append(b)
    return frequencies, limits


def marching_fractions(num_layers: int, spread: float = 0.3, offset: float = 2.0) -> list[float]:
    """BACON band fractions giving the bands of a frequency-marching :class:`ResidualMFN`.

    With growth g = 1 + spread + offset the residual MFN's output i reaches
    max_frequency / g^(L-i); filter fractions [g^-L, g^-(L-1) - g^-L, ..., 1 - 1/g] give a
    BACON (continuous frequencies) exactly the same band per output, so the two can be
    compared stage by stage.
    """
    require(num_layers >= 1, f"num_layers must be >= 1, got {num_layers}")
    growth = 1.0 + spread + offset
    cumulative = [growth ** -(num_layers - i) for i in range(num_layers + 1)]
    return [cumulative[0]] + [cumulative[i] - cumulative[i - 1] for i in range(1, num_layers + 1)]


class MultiplicativeFilterNetwork(nn.Module):
    """Shared MFN body: filters g_0..g_L, layers W_1..W_L, heads 1..L, stage control.

    Subclasses draw the filter frequencies and set ``self.bands`` (the guaranteed L∞ band
    limit of each output, cycles per box) and ``self.residual``.
    """

    residual: bool
    bands: list[float]

    def _build(
        self,
        frequencies: list[torch.Tensor],
        out_features: int,
        hidden_bias: bool,
        out_bias: bool,
    ) -> None:
        hidden = frequencies[0].shape[0]
        self.in_features = frequencies[0].shape[1]
        self.out_features = out_features
        self.num_layers = len(frequencies) - 1
        self.filters = nn.ModuleList(SineFilter(f) for f in frequencies)
        self.layers = nn.ModuleList(
            _mfn_linear(hidden, hidden, hidden_bias) for _ in range(self.num_layers)
        )
        self.heads = nn.ModuleList(
            _mfn_linear(hidden, out_features, out_bias) for _ in range(self.num_layers)
        )
        self.base_head: nn.Linear | None = None
        self.stage = self.num_layers

    def set_stage(self, k: int) -> None:
        """Activate outputs 1..k: forward stops at layer k, and only filters 0..k,
        layers 1..k and heads 1..k stay trainable (the others get requires_grad=False)."""
        require(
            isinstance(k, int) and 1 <= k <= self.num_layers,
            f"stage must be an integer in 1..{self.num_layers}, got {k!r}",
        )
        self.stage = k
        for i, module in enumerate(self.filters):
            module.requires_grad_(i <= k)
        for i, (layer, head) in enumerate(zip(self.layers, self.heads, strict=True), start=1):
            layer.requires_grad_(i <= k)
            head.requires_grad_(i <= k)

    def _check_coords(self, coords: torch.Tensor) -> None:
        if coords.ndim < 1 or coords.shape[-1] != self.in_features:
            raise InputError(
                f"{type(self).__name__} needs coordinates of shape (..., {self.in_features}) "
                f"in box units, got {tuple(coords.shape)}"
            )

    def features(self, coords: torch.Tensor) -> list[torch.Tensor]:
        """Hidden features z_1..z_k (k = active stage), each (..., hidden_features)."""
        self._check_coords(coords)
        z = self.filters[0](coords)
        feats = []
        for i in range(1, self.stage + 1):
            z = self.layers[i - 1](z) * self.filters[i](coords)
            feats.append(z)
        return feats

    def forward(self, coords: torch.Tensor) -> list[torch.Tensor]:
        """Outputs y_1..y_k for the active stage k, each (..., out_features).

        ``coords`` (..., in_features) are in box units ([-0.5, 0.5) spans the box). Output
        i is band-limited to ``self.bands[i - 1]`` cycles per box in every component.
        """
        outs: list[torch.Tensor] = []
        base = None
        if self.base_head is not None:
            self._check_coords(coords)
            base = self.base_head(self.filters[0](coords))
        for head, z in zip(self.heads, self.features(coords), strict=False):
            y = head(z)
            if outs and self.residual:
                y = outs[-1] + y
            elif base is not None:
                y = base + y
            outs.append(y)
        return outs


class BACON(MultiplicativeFilterNetwork):
    """BACON multiscale band-limited coordinate network (Lindell et al., CVPR 2022).

    Filter k (k = 0..L) draws its frequency components uniformly in [-B_k, B_k] with
    B_k = fraction_k · max_frequency (BACON §3.2, "frequencies uniform in the band"), so
    output i is band-limited to Σ_{k≤i} B_k cycles/box (``self.bands[i-1]``); the last
    output reaches ``max_frequency``. With ``quantize`` (BACON's default, its
    ``quantization_interval = 2π`` for [-0.5, 0.5] inputs) the frequencies are integers in
    {-⌊B_k⌋, ..., ⌊B_k⌋}, so every output is periodic on the box and its DFT on any grid
    finer than 2·band is exactly band-limited. Outputs are independent heads
    y_i = head_i(z_i) (not residual).

    Args:
        in_features: coordinate dimension (3 for volumes).
        out_features: values per position.
        hidden_features: width of the hidden features z_i.
        num_layers: L, the number of multiplicative layers and outputs.
        box_size: D, voxels per side of the grid the network represents.
        max_frequency: band limit of the last output in cycles per box (≤ D/2);
            default D/2, the grid's Nyquist.
        band_fractions: L + 1 nonnegative fractions of ``max_frequency`` given to filters
            0..L (summing to ≤ 1); default equal shares 1/(L + 1), as in BACON.
        quantize: integer frequencies (cycles/box).
        hidden_bias: bias b_i in the hidden layers.
        out_bias: bias in the output heads.
    """

    residual = False

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 1,
        hidden_features: int = 128,
        num_layers: int = 4,
        box_size: int = 64,
        max_frequency: float | None = None,
        band_fractions: list[float] | None = None,
        quantize: bool = True,
        hidden_bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_common(in_features, out_features, hidden_features, num_layers, box_size)
        fmax = _resolve_max_frequency(max_frequency, box_size)
        fractions = _check_fractions(band_fractions, num_layers)
        self.config = {
            "in_features": int(in_features),
            "out_features": int(out_features),
            "hidden_features": int(hidden_features),
            "num_layers": int(num_layers),
            "box_size": int(box_size),
            "max_frequency": None if max_frequency is None else float(max_frequency),
            "band_fractions": None if band_fractions is None else fractions,
            "quantize": bool(quantize),
            "hidden_bias": bool(hidden_bias),
            "out_bias": bool(out_bias),
        }
        frequencies, limits = _uniform_band_frequencies(
            fractions, fmax, (hidden_features, in_features), quantize
        )
        #: L∞ band limit of output i (cycles/box): Σ_{k≤i} B_k.
        self.bands = [sum(limits[: i + 1]) for i in range(1, num_layers + 1)]
        self._build(frequencies, out_features, hidden_bias, out_bias)


class ResidualMFN(MultiplicativeFilterNetwork):
    """Residual MFN with frequency marching init (Shekarforoush et al., NeurIPS 2022).

    Outputs are residual, y_i = y_{i-1} + head_i(z_i), so each scale refines the previous.
    With growth factor g = 1 + spread + offset (3.3 for the paper's spread 0.3, offset 2),
    output i is band-limited to b_i = max_frequency / g^(L-i) cycles/box (i = 0..L;
    ``self.bands = [b_1, ..., b_L]``, b_L = max_frequency):

    - filter 0 draws components uniformly in [-b_0, b_0];
    - filter i ≥ 1 draws rows ``U(-b_{i-1}, b_{i-1})^d · spread + offset · b_{i-1} · r``
      with r a random lattice direction (:func:`lattice_directions`): a cube of half-width
      spread·b_{i-1} around the lattice point offset·b_{i-1}·r, so each layer adds a shell
      of new frequencies above the previous band instead of re-covering it. Its components
      are bounded by (spread + offset)·b_{i-1}, so the band grows b_{i-1} → g·b_{i-1} = b_i.

    This is the authors' ``FrequencyMarchingBACON`` (their b_i = π·D/3.3^(L-i) rad per unit
    of [-0.5, 0.5] coordinates is our b_i = (D/2)/3.3^(L-i) cycles per box), minus its
    per-output ReLU (apply an output nonlinearity in the caller). As in their "new" init,
    the hidden layers have no bias by default. With ``quantize`` each frequency component
    is truncated towards zero to an integer (so bounds still hold and outputs are periodic
    on the box); filters whose band is below 1 cycle/box then become constants, so use it
    only when b_0 ≥ 1 (large boxes or few layers). Default: continuous, as in the paper.

    ``init="bacon"`` keeps the residual outputs but draws the filters as :class:`BACON`
    does (uniform in [-B_k, B_k], B_k = band_fractions[k] · max_frequency; default
    :func:`marching_fractions`, i.e. the same bands as the marching init), the paper's
    baseline initialisation; ``spread`` and ``offset`` then only set those default bands.

    Args:
        in_features, out_features, hidden_features, num_layers, box_size, max_frequency,
        hidden_bias, out_bias: as in :class:`BACON` (default L = 3, hidden bias off).
        spread: λ_1, relative half-width of each new frequency cube (paper: 0.3).
        offset: λ_2, distance of the cube centres in units of the previous band (paper: 2).
        quantize: integer frequencies (cycles/box), see above.
        init: ``"marching"`` (the paper's new initialisation) or ``"bacon"``.
        band_fractions: per-filter fractions of ``max_frequency`` for ``init="bacon"``.
        base_output: add a linear head on the first filter, y_0 = head_0(g_0(x)), to every
            output (y_1 = y_0 + head_1(z_1), ...). Not in the authors' code, where output 1
            holds only the sums f_1 ± f_0: with the marching init every such frequency has a
            component of at least (offset - spread - 1)·b_0 (0.7 b_0 for the paper's values)
            along its lattice direction, so the lowest frequencies (in 3-D the box's overall
            shape, the first Fourier shells) cannot be represented at all except the DC.
            The base head fills that band (b_0 ≤ b_1, so every band limit still holds).
    """

    residual = True

    def __init__(
        self,
        in_features: int = 3,
        out_features: int = 1,
        hidden_features: int = 128,
        num_layers: int = 3,
        box_size: int = 64,
        max_frequency: float | None = None,
        spread: float = 0.3,
        offset: float = 2.0,
        quantize: bool = False,
        hidden_bias: bool = False,
        out_bias: bool = True,
        init: str = "marching",
        band_fractions: list[float] | None = None,
        base_output: bool = False,
    ) -> None:
        super().__init__()
        _check_common(in_features, out_features, hidden_features, num_layers, box_size)
        fmax = _resolve_max_frequency(max_frequency, box_size)
        require_positive(spread, "spread")
        require(offset >= 0, f"offset must be >= 0, got {offset}")
        require(init in ("marching", "bacon"), f"init must be 'marching' or 'bacon', got {init!r}")
        require(
            band_fractions is None or init == "bacon",
            "band_fractions applies only to init='bacon' (the marching init sets its own bands)",
        )
        self.config = {
            "in_features": int(in_features),
            "out_features": int(out_features),
            "hidden_features": int(hidden_features),
            "num_layers": int(num_layers),
            "box_size": int(box_size),
            "max_frequency": None if max_frequency is None else float(max_frequency),
            "spread": float(spread),
            "offset": float(offset),
            "quantize": bool(quantize),
            "hidden_bias": bool(hidden_bias),
            "out_bias": bool(out_bias),
            "init": init,
            "band_fractions": None
            if band_fractions is None
            else [float(f) for f in band_fractions],
            "base_output": bool(base_output),
        }
        shape = (hidden_features, in_features)
        if init == "bacon":
            if band_fractions is None:
                band_fractions = marching_fractions(num_layers, spread, offset)
            fractions = _check_fractions(band_fractions, num_layers)
            frequencies, limits = _uniform_band_frequencies(fractions, fmax, shape, quantize)
            self.bands = [sum(limits[: i + 1]) for i in range(1, num_layers + 1)]
            self._build(frequencies, out_features, hidden_bias, out_bias)
            self._add_base_head(base_output, hidden_features, out_features, out_bias)
            return
        growth = 1.0 + spread + offset
        #: b_i for i = 0..L, cycles/box (Shekarforoush et al. "new" initialisation).
        band = [fmax / growth ** (num_layers - i) for i in range(num_layers + 1)]
        directions = lattice_directions(in_features)

        def uniform(b: float) -> torch.Tensor:
            return (2.0 * torch.rand(shape, dtype=torch.float64) - 1.0) * b

        frequencies = [uniform(band[0])]
        for i in range(1, num_layers + 1):
            r = directions[torch.randint(len(directions), (hidden_features,))]
            frequencies.append(uniform(band[i - 1]) * spread + offset * band[i - 1] * r)
        if quantize:
            frequencies = [torch.trunc(f) for f in frequencies]
        self.bands = band[1:]
        self._build(frequencies, out_features, hidden_bias, out_bias)
        self._add_base_head(base_output, hidden_features, out_features, out_bias)

    def _add_base_head(self, on: bool, hidden: int, out_features: int, out_bias: bool) -> None:
        if on:
            self.base_head = _mfn_linear(hidden, out_features, out_bias)


def render_grid(
    net: MultiplicativeFilterNetwork,
    box: int,
    scale: int | None = None,
    chunk_size: int = 65536,
    rotation: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate output ``scale`` of an MFN on the centred D^d voxel grid, shape (D,)*d.

    The voxel at index j (array order [z, y, x], last axis x) sits at box-unit coordinate
    (j - D//2)/D (:func:`cryoprior.geometry.grids.coordinate_grid` with pixel size 1/D),
    so ``box`` need not equal the network's ``box_size``: a larger box samples the same
    function more finely; a smaller one samples it more coarsely (exact for outputs whose
    band is below the grid's Nyquist, D/2 cycles/box). ``scale`` is 1..stage (default: the
    active stage, the finest output). For one output feature the trailing axis is dropped,
    else the result is (D,)*d + (out_features,). Points are evaluated in chunks of
    ``chunk_size``; gradients flow (wrap the call in ``torch.no_grad()`` for inference).

    ``rotation`` (d, d) and ``shift`` (d,) (box units) render the function after a rigid
    motion: y(Aᵀ(x - t)) with A = rotation, t = shift, i.e. the map rotated by A about the
    origin and then moved by t. Since the network is a function, this resamples exactly.
    """
    require(isinstance(box, int) and box >= 1, f"box must be an integer >= 1, got {box!r}")
    k = net.stage if scale is None else scale
    require(
        isinstance(k, int) and 1 <= k <= net.stage,
        f"scale must be an integer in 1..{net.stage} (the active stage), got {scale!r}",
    )
    require(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    ref = net.filters[0].frequency
    shape = (box,) * net.in_features
    coords = coordinate_grid(shape, 1.0 / box, ref.dtype, ref.device).reshape(-1, net.in_features)
    if shift is not None:
        t = torch.as_tensor(shift, dtype=ref.dtype, device=ref.device)
        require(t.shape == (net.in_features,), f"shift must have shape ({net.in_features},)")
        coords = coords - t
    if rotation is not None:
        a = torch.as_tensor(rotation, dtype=ref.dtype, device=ref.device)
        require(
            a.shape == (net.in_features, net.in_features),
            f"rotation must have shape ({net.in_features}, {net.in_features})",
        )
        coords = coords @ a  # rows: Aᵀ x as a row vector is x A
    out = torch.cat([net(c)[k - 1] for c in coords.split(chunk_size)])
    out = out.reshape(*shape, net.out_features)
    return out.squeeze(-1) if net.out_features == 1 else out
