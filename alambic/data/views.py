"""Augmented views of each sample, and masked copies of them, as a pure function of (seed, epoch, batch).

Self-supervised distillation compares a student and a teacher on *different* views of the same samples:
DINO's global and local crops (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", 2021, arXiv:2104.14294), BYOL's two augmented views (Grill et al., "Bootstrap Your Own
Latent", 2020, arXiv:2006.07733), FixMatch's weak/strong pair (Sohn et al., 2020, arXiv:2001.07685), and
masked-image distillation where the student sees a masked view: iBOT (Zhou et al., 2021,
arXiv:2111.07832; the teacher sees the full view), G2SD (Huang et al., "Generic-to-Specific
Distillation of Masked Autoencoders", 2023, arXiv:2302.14771; the teacher's view carries the same mask)
and DMJD (Ma et al., "Disjoint Masking with Joint Distillation for Efficient Masked Image Modeling",
2023, arXiv:2301.00230; the two masks leave disjoint patches visible).

A recipe names view *groups* (``global`` x2, ``local`` x6; or ``weak``, ``strong``), each an
:class:`AugmentSpec`. DINO's setting, as an example (not the defaults): ``global: {count: 2, scale: [0.4,
1.0], flip: 0.5, jitter: 0.4, blur: 1.0}`` at the full size and ``local: {count: 6, scale: [0.05, 0.4],
size: round(96 / 224 * H)}``. Every random number comes from the ``torch.Generator`` handed in, drawn
in a fixed order (views in :func:`view_names` order, each view's stages in pipeline order, then the
masks), so a batch's views depend on nothing but that generator's seed; :class:`AugmentedLoader` seeds
one generator per batch from (seed, epoch, position), which makes a resumed epoch bit-identical and
leaves the global RNG (dropout's) untouched. All of it is batched tensor math: B = 512 MNIST digits with
2 + 6 crops take milliseconds on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError, ShapeMismatchError

_RESERVED_PREFIXES = ("masked_", "teacher_")
_ERASE_AREA = (0.02, 0.2)  # random erasing (Zhong et al., 2017, arXiv:1708.04896): fraction of the image
_ERASE_RATIO = (0.3, 1 / 0.3)  # and aspect range of the erased rectangle, torchvision's RandomErasing range
_BLOCK_ASPECT = (0.3, 1 / 0.3)  # BEiT's aspect range of one masked block
_BLOCK_MIN_PATCHES = 4  # BEiT's smallest block
_BLOCK_PATIENCE = 10  # BEiT's attempts per block before a sample gives up (then topped up at random)


# --------------------------------------------------------------------------------------------- configs
class AugmentSpec(BaseModel):
    """One group of views: how many, at what size, and which augmentations (each drawn per sample).

    The pipeline is crop (+resize to ``size``) -> flip -> rotate -> jitter -> blur -> solarize -> noise ->
    dropout -> erase. On flat vectors ``[B, D]`` only ``noise`` and ``dropout`` apply.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    count: int = Field(1, ge=1, description="how many views of this group")
    size: int | None = Field(None, ge=1, description="output side in pixels (square); None: the input's own side")
    scale: tuple[float, float] = Field(
        (1.0, 1.0), description="random-resized-crop area fraction range (0 < lo <= hi <= 1); (1, 1) = no crop"
    )
    ratio: tuple[float, float] = Field((0.75, 1.3333), description="aspect-ratio (w/h) range of the crop, log-uniform")
    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip (flips change digits)")
    rotate: float = Field(0.0, ge=0, le=180, description="max degrees of a random rotation, uniform in [-r, r]")
    jitter: float = Field(
        0.0, ge=0, le=1, description="brightness/contrast strength s: (x-mean)c + mean + b, c~U(1-s,1+s), b~U(-s,s)std"
    )
    blur: float = Field(0.0, ge=0, le=1, description="probability of a 3x3 Gaussian blur, sigma ~ U(0.1, 2.0)")
    solarize: float = Field(0.0, ge=0, le=1, description="probability of solarisation above the image's midpoint")
    noise: float = Field(0.0, ge=0, description="std of additive Gaussian noise, relative to each sample's std")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability of zeroing each feature (pixel) independently")
    erase: float = Field(0.0, ge=0, le=1, description="probability of erasing one rectangle (2-20% area) to the mean")

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {list(v)}")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {list(v)}")
        return v

    def image_only(self) -> list[str]:
        """The fields set here that need images [B, C, H, W] (everything but count, noise and dropout)."""
        off = {"size": None, "scale": (1.0, 1.0), "flip": 0.0, "rotate": 0.0, "jitter": 0.0, "blur": 0.0,
               "solarize": 0.0, "erase": 0.0}
        return [k for k, v in off.items() if getattr(self, k) != v]


class MaskSpec(BaseModel):
    """Masked student copies of some views (masked image modelling distillation)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    views: list[str] = Field(default_factory=lambda: ["global"], min_length=1,
                             description="view groups whose views get masked student copies")
    patch_size: int = Field(4, ge=1, description="side of a mask patch in pixels (must divide the view's side)")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of patches masked (exactly round(ratio*N) per sample)")
    mode: Literal["block", "random"] = Field("random", description="random subset, or BEiT blockwise rectangles")
    teacher: Literal["unmasked", "same", "disjoint"] = Field(
        "unmasked", description="teacher's copy: full view (iBOT), same mask (G2SD), disjoint visible patches (DMJD)"
    )


class ViewsSpec(BaseModel):
    """The recipe's ``views:`` section: named groups of augmented views, and optional masking."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    groups: dict[str, AugmentSpec] = Field(description="group name -> its augmentations, in view order")
    mask: MaskSpec | None = Field(None, description="masked copies of some groups' views; None: no masking")

    @model_validator(mode="after")
    def _names(self) -> "ViewsSpec":
        if not self.groups:
            raise ValueError("groups needs at least one view group")
        for name in self.groups:
            if not name.isidentifier() or name == INPUT or name.startswith(_RESERVED_PREFIXES):
                raise ValueError(
                    f"group name {name!r} must be an identifier, not {INPUT!r} and not start with "
                    f"{' or '.join(map(repr, _RESERVED_PREFIXES))}"
                )
        if self.mask is not None:
            unknown = [v for v in self.mask.views if v not in self.groups]
            if unknown:
                raise ValueError(f"mask.views names unknown group {unknown[0]!r} (groups: {list(self.groups)})")
        names = view_names(self)
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ValueError(f"two groups both produce the view {dup!r}; rename one")
        return self


def _group_views(name: str, spec: AugmentSpec) -> list[str]:
    return [name] if spec.count == 1 else [f"{name}_{i}" for i in range(spec.count)]


def _masked_views(spec: ViewsSpec) -> list[str]:
    """The views that get a masked copy, in view order."""
    if spec.mask is None:
        return []
    return [v for g, s in spec.groups.items() if g in spec.mask.views for v in _group_views(g, s)]


def view_names(spec: ViewsSpec) -> list[str]:
    """Names of the views a :class:`ViewMaker` produces, in order.

    Each group in dict order gives ``<group>`` (count 1) or ``<group>_0 .. <group>_{count-1}``; then each
    masked view ``v`` gives ``masked_<v>``, followed by ``teacher_masked_<v>`` unless the teacher is unmasked.
    """
    names = [v for g, s in spec.groups.items() for v in _group_views(g, s)]
    for v in _masked_views(spec):
        names.append(f"masked_{v}")
        if spec.mask is not None and spec.mask.teacher != "unmasked":
            names.append(f"teacher_masked_{v}")
    return names


# ------------------------------------------------------------------------------------ random numbers
def _rand(generator: torch.Generator, *shape: int, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device (a CPU generator can feed GPU data), then moved."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _box(area: Tensor, log_ratio_u: Tensor, ratio: tuple[float, float], aspect: float) -> tuple[Tensor, Tensor]:
    """Width and height fractions of a box of area fraction ``area`` [B] inside an image of aspect W/H.

    The pixel aspect w/h is log-uniform over ``ratio`` intersected with the aspects at which the box fits
    (``[area*W/H, W/(area*H)]``), or the nearest fitting aspect when they do not meet; so the area is
    always exactly ``area`` and the box always lies inside the image (torchvision's rejection sampling,
    without the rejection loop).
    """
    fit_lo, fit_hi = torch.log(area * aspect), torch.log(aspect / area)
    lo = torch.clamp(fit_lo, min=math.log(ratio[0]))
    hi = torch.clamp(fit_hi, max=math.log(ratio[1]))
    log_r = torch.minimum(torch.maximum(lo + log_ratio_u * (hi - lo), fit_lo), fit_hi)
    r = torch.exp(log_r)
    return torch.sqrt(area * r / aspect).clamp(max=1.0), torch.sqrt(area * aspect / r).clamp(max=1.0)


def _crop_theta(batch: int, hw: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator, device: torch.device) -> Tensor:
    """[B, 2, 3] float64 affine maps (``affine_grid`` convention) from output coords to each sample's crop box."""
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=device)
    if tuple(scale) == (1.0, 1.0):  # the only box of area 1 is the whole image: nothing to draw
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        return theta
    u = _rand(generator, 4, batch, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    w, h = _box(area, u[1], ratio, hw[1] / hw[0])
    x0, y0 = u[2] * (1 - w), u[3] * (1 - h)  # top-left corner, as fractions of the image
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2], theta[:, 1, 2] = 2 * x0 + w - 1, 2 * y0 + h - 1  # box centre in [-1, 1] coords
    return theta


def _resample(x: Tensor, theta: Tensor, size: int) -> Tensor:
    """Bilinear sampling of ``x`` [B, C, H, W] through ``theta`` [B, 2, 3] into [B, C, size, size].

    ``align_corners=False`` makes the identity map with ``size == H == W`` return ``x`` itself; ``border``
    padding repeats the edge (the background of a digit) where a rotated grid leaves the image.
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------- public functions
def random_resized_crop(x: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator) -> Tensor:
    """Each sample's own random box, resized to ``size``: [B, C, H, W] -> [B, C, size, size].

    The inception crop (Szegedy et al., "Going deeper with convolutions", 2015, arXiv:1409.4842), with
    torchvision ``RandomResizedCrop`` semantics: area fraction ~ U(scale), aspect w/h log-uniform in
    ``ratio``; the box is continuous (not snapped to pixels) and always inside the image with exactly the
    drawn area (see :func:`_box`). One batched ``affine_grid``/``grid_sample`` (bilinear,
    ``align_corners=False``, no antialiasing) does all samples. ``scale == (1, 1)`` draws nothing.
    """
    _check_image(x, "random_resized_crop")
    theta = _crop_theta(x.shape[0], (x.shape[2], x.shape[3]), scale, ratio, generator, x.device)
    return _resample(x, theta, size)


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Sample ``i`` of ``x`` [B, C, H, W] rotated by ``k[i] * 90`` degrees, exactly (no interpolation).

    The direction is ``torch.rot90(x[i], k[i], dims=(-2, -1))``'s. Rotation views are the self-supervised
    task of LSSKD/HSAKD-style self-distillation (Gidaris et al., "Unsupervised Representation Learning by
    Predicting Image Rotations", 2018, arXiv:1803.07728). Odd ``k`` needs square images.
    """
    _check_image(x, "rotate90")
    k = torch.as_tensor(k, device=x.device).long().remainder(4)
    if k.shape != (x.shape[0],):
        raise ShapeMismatchError(f"rotate90: k must be [B] = [{x.shape[0]}], got {list(k.shape)}")
    if x.shape[2] != x.shape[3] and bool((k % 2 == 1).any()):
        raise AlambicError(f"rotate90: a quarter turn needs square images, got {x.shape[2]}x{x.shape[3]}")
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if bool(sel.any()):
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def patch_mask(batch: int, grid: tuple[int, int], ratio: float, mode: str, generator: torch.Generator) -> Tensor:
    """[B, N] bool, True = masked, over a row-major ``grid`` (gh, gw) of N patches; exactly
    ``round(ratio * N)`` True per row (Python's ``round``).

    ``random``: a uniform subset. ``block``: BEiT's blockwise masking (Bao et al., "BEiT: BERT
    Pre-Training of Image Transformers", 2021, arXiv:2106.08254, Alg. 1): rectangles of area
    ~ U(min(4, left), left) patches and aspect log-uniform in [0.3, 1/0.3] are added while they do not
    overshoot the budget; a sample stops after 10 rejected rectangles in a row and is topped up with
    random patches, so the count is exact. Unlike BEiT a rectangle may span the whole grid (on the 2x2
    grid of 8x8 digits BEiT's strict bound would allow single patches only). Batched over samples: one
    proposal per sample per round. The mask is on the generator's device.
    """
    gh, gw = grid
    n = gh * gw
    k = round(ratio * n)
    if not 0 <= k <= n:
        raise AlambicError(f"patch_mask: ratio must be in [0, 1], got {ratio}")
    dev = generator.device
    if mode == "random":
        order = torch.rand(batch, n, generator=generator, device=dev).argsort(dim=1)
        return torch.zeros(batch, n, dtype=torch.bool, device=dev).scatter_(1, order[:, :k], True)
    if mode != "block":
        raise AlambicError(f"patch_mask: mode must be 'block' or 'random', got {mode!r}")
    mask = torch.zeros(batch, gh, gw, dtype=torch.bool, device=dev)
    count = torch.zeros(batch, dtype=torch.long, device=dev)
    fails = torch.zeros(batch, dtype=torch.long, device=dev)
    rows = torch.arange(gh, device=dev).view(1, gh, 1)
    cols = torch.arange(gw, device=dev).view(1, 1, gw)
    log_lo, log_hi = math.log(_BLOCK_ASPECT[0]), math.log(_BLOCK_ASPECT[1])
    while True:
        active = (count < k) & (fails < _BLOCK_PATIENCE)
        if not bool(active.any()):
            break
        left = (k - count).double()
        u = _rand(generator, 4, batch, device=dev)
        smallest = left.clamp(max=_BLOCK_MIN_PATCHES)
        area = smallest + u[0] * (left - smallest)
        aspect = torch.exp(log_lo + u[1] * (log_hi - log_lo))
        h = torch.sqrt(area * aspect).round().clamp(1, gh).long()
        w = torch.sqrt(area / aspect).round().clamp(1, gw).long()
        top = (u[2] * (gh - h + 1)).floor().long()
        lft = (u[3] * (gw - w + 1)).floor().long()
        rect = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                & (cols >= lft.view(-1, 1, 1)) & (cols < (lft + w).view(-1, 1, 1)))
        new = (rect & ~mask).flatten(1).sum(1)
        ok = active & (new > 0) & (new <= k - count)
        mask |= rect & ok.view(-1, 1, 1)
        count += torch.where(ok, new, 0)
        fails = torch.where(ok, 0, fails + active.long())
    mask = mask.flatten(1)
    short = k - count
    if bool((short > 0).any()):  # top up with random unmasked patches: they sort before every masked one
        key = torch.rand(batch, n, generator=generator, device=dev) + mask.double() * 2
        rank = key.argsort(dim=1).argsort(dim=1)
        mask |= rank < short.view(-1, 1)
    return mask


def disjoint_mask(student_mask: Tensor, generator: torch.Generator) -> Tensor:
    """The teacher's [B, N] bool mask for DMJD (Ma et al., 2023, arXiv:2301.00230): same masked count per
    row, and the patches it leaves visible are drawn from the student's *masked* ones, so the two visible
    sets are disjoint whenever that is possible (ratio >= 0.5); below that the overlap is the least
    possible (every student-masked patch is teacher-visible, the rest is drawn from the student-visible).
    """
    if student_mask.dtype != torch.bool or student_mask.ndim != 2:
        raise ShapeMismatchError(
            f"disjoint_mask: wants a [B, N] bool mask, got {student_mask.dtype} {list(student_mask.shape)}"
        )
    b, n = student_mask.shape
    visible = n - student_mask.sum(dim=1, keepdim=True)  # [B, 1] patches each copy leaves visible
    noise = torch.rand(b, n, generator=generator, device=generator.device).to(student_mask.device)
    key = noise + (~student_mask).double() * 2  # student-masked patches first, each part in random order
    rank = key.argsort(dim=1).argsort(dim=1)
    return rank >= visible


def apply_mask(x: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """``x`` [B, C, H, W] with the pixels of masked patches set to 0; ``mask`` [B, N] bool is row-major
    over the (H/p) x (W/p) grid. For a ViT whose patch size equals ``patch_size``, a zero patch embeds to
    the patch-embedding bias alone, the same token for every masked position: a fixed mask embedding
    (iBOT/BEiT learn theirs), and zeroing works for any network, convolutional ones included.
    """
    _check_image(x, "apply_mask")
    b, _, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise AlambicError(f"apply_mask: patch_size {patch_size} does not divide the image side {h}x{w}")
    gh, gw = h // patch_size, w // patch_size
    if mask.shape != (b, gh * gw):
        raise ShapeMismatchError(f"apply_mask: mask must be [B, N] = [{b}, {gh * gw}], got {list(mask.shape)}")
    pixels = mask.to(x.device).view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, patch_size, gw, patch_size)
    return x.masked_fill(pixels.reshape(b, 1, h, w), 0)


def _check_image(x: Tensor, who: str) -> None:
    if x.ndim != 4:
        raise ShapeMismatchError(f"{who}: wants images [B, C, H, W], got {list(x.shape)}")


# ------------------------------------------------------------------------------- per-sample stages
def _per_sample(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _where(apply: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(apply.view(-1, *([1] * (a.ndim - 1))), a, b)


def _blur(x: Tensor, sigma: Tensor) -> Tensor:
    """3x3 Gaussian blur with each sample's own sigma [B] (separable; replicated edges)."""
    e = torch.exp(-0.5 / sigma**2).to(x.dtype).view(-1, 1, 1, 1)
    side, centre = e / (1 + 2 * e), 1 / (1 + 2 * e)
    p = F.pad(x, (1, 1, 0, 0), mode="replicate")
    x = side * (p[..., :-2] + p[..., 2:]) + centre * p[..., 1:-1]
    p = F.pad(x, (0, 0, 1, 1), mode="replicate")
    return side * (p[..., :-2, :] + p[..., 2:, :]) + centre * p[..., 1:-1, :]


def _erase_mask(batch: int, side: int, g: torch.Generator, device: torch.device) -> Tensor:
    """[B, 1, side, side] bool: one rectangle per sample, 2-20% of the image, aspect in [0.3, 3.3]."""
    u = _rand(g, 4, batch, device=device)
    area = _ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * u[0]
    wf, hf = _box(area, u[1], _ERASE_RATIO, 1.0)
    w = (wf * side).round().clamp(1, side).long().view(-1, 1, 1, 1)
    h = (hf * side).round().clamp(1, side).long().view(-1, 1, 1, 1)
    top = (u[2].view(-1, 1, 1, 1) * (side - h + 1)).floor().long()
    lft = (u[3].view(-1, 1, 1, 1) * (side - w + 1)).floor().long()
    i = torch.arange(side, device=device)
    rows, cols = i.view(1, 1, -1, 1), i.view(1, 1, 1, -1)
    return (rows >= top) & (rows < top + h) & (cols >= lft) & (cols < lft + w)


# ------------------------------------------------------------------------------------------ the maker
class ViewMaker:
    """Makes every view a :class:`ViewsSpec` names from a batch, validated against the data shape first.

    ``input_shape`` is the shape of one sample (``DataBundle.input_shape``): ``(C, H, W)`` for images or
    ``(D,)`` for flat vectors. ``names`` lists the views in order, ``shapes`` each view's per-sample shape.
    """

    def __init__(self, spec: ViewsSpec | Mapping[str, Any], input_shape: tuple[int, ...]):
        self.spec = spec if isinstance(spec, ViewsSpec) else ViewsSpec.model_validate(spec)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.names = view_names(self.spec)
        self.image = len(self.input_shape) == 3
        if len(self.input_shape) not in (1, 3):
            raise ShapeMismatchError(
                f"views: input_shape must be one sample's (C, H, W) or (D,), got {self.input_shape} "
                "(pass x.shape[1:], not x.shape)"
            )
        self.sizes: dict[str, int] = {}
        for name, g in self.spec.groups.items():
            if not self.image:
                bad = g.image_only()
                if bad:
                    raise AlambicError(
                        f"views.groups.{name}.{bad[0]} needs images [B, C, H, W], but the data are flat "
                        f"vectors [B, {self.input_shape[0]}]; only noise and dropout apply to them"
                    )
                continue
            _, h, w = self.input_shape
            if g.size is None and h != w:
                raise AlambicError(
                    f"views.groups.{name}.size is None (the input's own side) but the images are {h}x{w}, "
                    "not square; set size"
                )
            self.sizes[name] = g.size if g.size is not None else h
        m = self.spec.mask
        if m is not None:
            if not self.image:
                raise AlambicError(
                    f"views.mask needs images [B, C, H, W], but the data are flat vectors [B, {self.input_shape[0]}]"
                )
            for name in m.views:
                if self.sizes[name] % m.patch_size:
                    raise AlambicError(
                        f"views.mask.patch_size {m.patch_size} does not divide the side {self.sizes[name]} "
                        f"of group '{name}'"
                    )
        self._views = [(v, name) for name, g in self.spec.groups.items() for v in _group_views(name, g)]
        self.shapes = {v: self._shape(group) for v, group in self._views}
        for v in _masked_views(self.spec):
            self.shapes[f"masked_{v}"] = self.shapes[v]
            if m is not None and m.teacher != "unmasked":
                self.shapes[f"teacher_masked_{v}"] = self.shapes[v]

    def _shape(self, group: str) -> tuple[int, ...]:
        if not self.image:
            return self.input_shape
        return (self.input_shape[0], self.sizes[group], self.sizes[group])

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(views, extras): views name -> [B, *shape] in ``x``'s dtype; extras ``mask:<v>`` (and
        ``teacher_mask:<v>``) -> [B, N] bool, True = masked, row-major over the patch grid."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeMismatchError(
                f"views: batch of samples {list(x.shape[1:])}, but the maker was built for {list(self.input_shape)}"
            )
        if not x.is_floating_point():
            raise AlambicError(f"views: wants floating-point data, got {x.dtype}")
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        views = {v: self._augment(work, group, generator).to(x.dtype) for v, group in self._views}
        extras: dict[str, Tensor] = {}
        m = self.spec.mask
        for v in _masked_views(self.spec):
            assert m is not None
            side = views[v].shape[-1] // m.patch_size
            mask = patch_mask(x.shape[0], (side, side), m.ratio, m.mode, generator).to(x.device)
            views[f"masked_{v}"], extras[f"mask:{v}"] = apply_mask(views[v], mask, m.patch_size), mask
            if m.teacher == "same":  # G2SD: the very same masked tensor (never modified in place)
                views[f"teacher_masked_{v}"], extras[f"teacher_mask:{v}"] = views[f"masked_{v}"], mask
            elif m.teacher == "disjoint":
                tmask = disjoint_mask(mask, generator)
                views[f"teacher_masked_{v}"] = apply_mask(views[v], tmask, m.patch_size)
                extras[f"teacher_mask:{v}"] = tmask
        return {n: views[n] for n in self.names}, extras

    def _augment(self, x: Tensor, group: str, g: torch.Generator) -> Tensor:
        """One view of the batch through the group's pipeline; a stage set to 0 draws nothing."""
        s, b, dev = self.spec.groups[group], x.shape[0], x.device
        if self.image:
            size = self.sizes[group]
            theta = _crop_theta(b, (x.shape[2], x.shape[3]), s.scale, s.ratio, g, dev)
            flip = _rand(g, b, device=dev) < s.flip if s.flip > 0 else None
            if s.rotate > 0:  # rotate the output grid: crop and rotation in one interpolation
                a = torch.deg2rad((2 * _rand(g, b, device=dev) - 1) * s.rotate)
                rot = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], 1).view(b, 2, 2)
                theta = torch.cat([theta[:, :, :2] @ rot, theta[:, :, 2:]], dim=2)
            if s.scale != (1.0, 1.0) or s.rotate > 0 or x.shape[2:] != (size, size):
                x = _resample(x, theta, size)
            if flip is not None:  # flip after rotating: the angle's law is symmetric, so the order is moot
                x = _where(flip, x.flip(-1), x)
            dims = _per_sample(x)
            if s.jitter > 0:
                u = _rand(g, 2, b, device=dev).to(x.dtype).view(2, b, 1, 1, 1)
                mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True, correction=0)
                x = (x - mean) * (1 + s.jitter * (2 * u[0] - 1)) + mean + s.jitter * (2 * u[1] - 1) * std
            if s.blur > 0:
                u = _rand(g, 2, b, device=dev)
                x = _where(u[0] < s.blur, _blur(x, 0.1 + 1.9 * u[1]), x)
            if s.solarize > 0:
                lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
                sol = torch.where(x > (lo + hi) / 2, lo + hi - x, x)
                x = _where(_rand(g, b, device=dev) < s.solarize, sol, x)
        dims = _per_sample(x)
        if s.noise > 0:
            eps = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(dev)
            x = x + s.noise * x.std(dims, keepdim=True, correction=0) * eps
        if s.dropout > 0:
            x = x.masked_fill(_rand(g, *x.shape, device=dev, dtype=x.dtype) < s.dropout, 0)
        if self.image and s.erase > 0:
            box = _erase_mask(b, x.shape[-1], g, dev) & (_rand(g, b, device=dev) < s.erase).view(-1, 1, 1, 1)
            x = torch.where(box, x.mean(dims, keepdim=True), x)
        return x


# ------------------------------------------------------------------------------------------ the loader
def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The generator seed of batch ``position`` of epoch ``epoch``: SplitMix64 (Steele et al., 2014) chained
    over the three numbers, so nearby triples give unrelated streams. In [0, 2**63)."""
    z = 0
    for v in (seed, epoch, position):
        z = (z ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z >> 1


class AugmentedLoader:
    """A loader whose batches carry the maker's views beside the unaugmented ``"input"``.

    Wraps any loader with ``epoch(epoch, start=0)`` yielding :class:`Batch` (``TensorLoader``,
    ``DatasetLoader``); its other attributes (``split``, ``dataset``, ``batch_size`` ...) stay reachable.
    Batch ``p`` of epoch ``e`` is augmented with ``torch.Generator().manual_seed(batch_seed(seed, e, p))``,
    so ``epoch(e, start=k)`` yields exactly batches ``k..`` of ``epoch(e)`` and the global RNG is never
    touched. The mask extras are merged over the batch's own extras.
    """

    def __init__(self, loader: Any, maker: ViewMaker, seed: int = 0):
        self.loader, self.maker, self.seed = loader, maker, int(seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        loader = self.__dict__.get("loader")
        if loader is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(loader, name)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for p, batch in enumerate(self.loader.epoch(epoch, start=start), start=start):
            if INPUT not in batch.views:
                raise AlambicError(f"AugmentedLoader: batches need an {INPUT!r} view, got {list(batch.views)}")
            g = torch.Generator().manual_seed(batch_seed(self.seed, epoch, p))
            views, extras = self.maker(batch.views[INPUT], g)
            yield replace(batch, views={**batch.views, **views}, extras={**batch.extras, **extras})
