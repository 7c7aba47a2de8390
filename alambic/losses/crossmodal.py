"""Cross-modal distillation losses: a teacher on one modality teaches a student on another through pairings.

Pure tensor functions (shapes in the docstrings, no configs, no modules, no state):

- region pooling: :func:`offset_ids` (per-sample region ids made unique across a batch) and
  :func:`scatter_mean` (mean of the rows of each region);
- SLidR's superpixel-pooled InfoNCE (:func:`slidr_pool`, :func:`slidr_loss`) and its point-level PPKT
  baseline (:func:`ppkt_loss`), both on :func:`info_nce_loss`;
- COMODO's similarity distributions over a queue of teacher embeddings (:func:`comodo_loss`) and the FIFO
  queue update it needs (:func:`queue_push`, returning the new queue and pointer so both checkpoint);
- a generic region contrast (CALICO's idea, :func:`region_contrast_loss`);
- 2D-to-3D feature lifting as in 3D-OVS: cosine match of rendered or projected student features to frozen
  2D teacher features (:func:`feature_lifting_loss`) and the correlation term weighted by the teacher's
  feature similarity (:func:`feature_correlation_loss`).

Which side carries gradient differs by method, and each function says so: in SLidR and PPKT both sides
do (the frozen 2D encoder is followed by a *trainable* 1x1-conv decoder whose output is the 2D side: freeze
or detach upstream what must not learn); in COMODO, region contrast and lifting the teacher side is a
constant (detached here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses.ssl import _positive  # the same "> 0" check, one copy

__all__ = [
    "comodo_loss",
    "feature_correlation_loss",
    "feature_lifting_loss",
    "info_nce_loss",
    "offset_ids",
    "ppkt_loss",
    "queue_push",
    "region_contrast_loss",
    "scatter_mean",
    "slidr_loss",
    "slidr_pool",
]


def _rows(x: Tensor, name: str, what: str) -> None:
    if x.dim() != 2:
        raise ShapeMismatchError(f"{what}: {name} must be [N, D], got shape {tuple(x.shape)}")


# --- region pooling ---------------------------------------------------------------------------------

def offset_ids(ids: Tensor, num_per_sample: int) -> Tensor:
    """Per-sample region ids made unique across the batch: ``id + b · num_per_sample`` for sample ``b``.

    SLidR (valeoai/SLidR ``loss_superpixels_average``) adds ``b · superpixel_size`` (150) to the
    superpixel map of image ``b`` so that superpixel 3 of image 0 and superpixel 3 of image 1 are different
    regions; without it they would pool together. Negative ids (pixels or points in no region) stay
    negative (``-1``) and are ignored by :func:`scatter_mean`.

    Args:
        ids: [B, ...] integer region ids, each in ``[0, num_per_sample)`` or negative (no region).
        num_per_sample: the number of region ids a sample may use.
    Returns: [B, ...] int64 ids in ``[0, B · num_per_sample)`` (or -1).
    """
    what = "offset_ids"
    if ids.dim() < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ShapeMismatchError(f"{what}: ids must be an integer tensor [B, ...], got {ids.dtype} {tuple(ids.shape)}")
    if num_per_sample < 1:
        raise AlambicError(f"{what}: num_per_sample must be >= 1, got {num_per_sample}")
    ids = ids.long()
    if ids.numel() and int(ids.max()) >= num_per_sample:
        raise AlambicError(f"{what}: region id {int(ids.max())} >= num_per_sample = {num_per_sample}")
    shape = (ids.shape[0],) + (1,) * (ids.dim() - 1)
    offsets = torch.arange(ids.shape[0], device=ids.device).reshape(shape) * num_per_sample
    return torch.where(ids >= 0, ids + offsets, torch.full_like(ids, -1))


def _counts(ids: Tensor, num_ids: int) -> Tensor:
    return torch.bincount(ids[ids >= 0], minlength=num_ids)[:num_ids]


def scatter_mean(values: Tensor, ids: Tensor, num_ids: int) -> Tensor:
    """Mean of the rows of ``values`` that share an id: ``out[r] = mean_{i: ids[i] = r} values[i]``.

    The region pooling of SLidR (Sautier et al., "Image-to-Lidar Self-Supervised Distillation for
    Autonomous Driving Data", CVPR 2022, arXiv:2203.16258, §3: ``k_s = mean_{points in s} f_3D``), which
    the official code computes with a sparse one-hot matrix divided by its row sums. Rows with a negative id
    are ignored; a region with no member gets a zero row (drop it with the counts, as :func:`slidr_pool`
    does). Differentiable w.r.t. ``values``; the mean is not re-normalised.

    Args:
        values: [N, D] per-member features.
        ids: [N] integer region ids in ``[0, num_ids)``, or negative for "no region".
        num_ids: R, the number of regions.
    Returns: [R, D].
    """
    what = "scatter_mean"
    _rows(values, "values", what)
    if ids.shape != values.shape[:1] or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ShapeMismatchError(
            f"{what}: ids must be an integer [N] with N = {values.shape[0]}, got {ids.dtype} {tuple(ids.shape)}"
        )
    if num_ids < 1:
        raise AlambicError(f"{what}: num_ids must be >= 1, got {num_ids}")
    ids = ids.long()
    if ids.numel() and int(ids.max()) >= num_ids:
        raise AlambicError(f"{what}: id {int(ids.max())} >= num_ids = {num_ids}")
    keep = ids >= 0
    sums = values.new_zeros(num_ids, values.shape[1]).index_add(0, ids[keep], values[keep])
    counts = _counts(ids, num_ids).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]


# --- InfoNCE, PPKT, SLidR ---------------------------------------------------------------------------

def info_nce_loss(anchors: Tensor, positives: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE with the other rows as negatives: ``CE(a pᵀ / τ, diag)`` = ``−mean_i log softmax_j(a_i·p_j/τ)[i]``.

    van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018,
    arXiv:1807.03748, Eq. (4); in the form of SLidR's and PPKT's ``NCELoss`` (valeoai/SLidR
    ``pretrain/criterion.py``): logits ``k qᵀ / τ``, target ``arange``, one direction (rows are anchors).
    Dot products, not cosines: normalise the inputs first if they should be. Both sides carry gradient.

    Args:
        anchors: [N, D] (the 3D student's pooled or point features in SLidR/PPKT).
        positives: [N, D], row i the positive of anchor i and a negative of every other anchor.
        temperature: τ > 0 (0.07 in SLidR and PPKT).
    Returns: scalar.
    """
    what = "info_nce_loss"
    _rows(anchors, "anchors", what)
    if positives.shape != anchors.shape:
        raise ShapeMismatchError(
            f"{what}: anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be [N, D]"
        )
    if anchors.shape[0] < 1:
        raise AlambicError(f"{what}: no rows to contrast")
    _positive(temperature, "temperature", what)
    logits = anchors @ positives.t() / temperature
    return F.cross_entropy(logits, torch.arange(anchors.shape[0], device=anchors.device))


def _pairs(point_features: Tensor, image_features: Tensor, pairing_points: Tensor, pairing_images: Tensor,
           what: str) -> None:
    _rows(point_features, "point_features", what)
    if image_features.dim() != 4 or image_features.shape[1] != point_features.shape[1]:
        raise ShapeMismatchError(
            f"{what}: image_features must be [I, D, H, W] with D = {point_features.shape[1]}, "
            f"got {tuple(image_features.shape)}"
        )
    if pairing_points.dim() != 1 or pairing_images.shape != (pairing_points.shape[0], 3):
        raise ShapeMismatchError(
            f"{what}: pairing_points must be [M] and pairing_images [M, 3] (image, row, col), got "
            f"{tuple(pairing_points.shape)} and {tuple(pairing_images.shape)}"
        )


def _pixel_rows(image_features: Tensor, pairing_images: Tensor) -> Tensor:
    """[M, D] the image features at the (image, row, col) triples."""
    b, r, c = pairing_images.long().unbind(1)
    return image_features.permute(0, 2, 3, 1)[b, r, c]


def ppkt_loss(point_features: Tensor, image_features: Tensor, pairing_points: Tensor, pairing_images: Tensor,
              num_matches: int = 4096, temperature: float = 0.07,
              generator: torch.Generator | None = None) -> Tensor:
    """PPKT's point-level InfoNCE over a random sample of paired point/pixel features.

    Liu et al., "Learning from 2D: Contrastive Pixel-to-Point Knowledge Transfer for 3D Pretraining"
    (PPKT), 2021, arXiv:2104.04687, the pixel-to-point NCE loss; as the baseline in SLidR's code
    (``LightningPretrain.loss``): draw ``num_matches`` of the M pairs without replacement (all of them when
    M ≤ num_matches; the official code would fail there), then :func:`info_nce_loss` with the points as
    anchors. The other sampled pairs are the negatives, even when they lie on the same object, which is
    the weakness SLidR's superpixel pooling addresses.

    Args:
        point_features: [P, D] 3D student features (L2-normalised in SLidR).
        image_features: [I, D, H, W] 2D features (frozen encoder + trainable decoder, per-pixel normalised).
        pairing_points: [M] indices into the points.
        pairing_images: [M, 3] (image, row, col) of the pixel each paired point projects to.
        num_matches: pairs sampled per call (4096 in SLidR's PPKT config).
        temperature: τ (0.07).
        generator: for the sample; the global generator when None.
    Returns: scalar.
    """
    what = "ppkt_loss"
    _pairs(point_features, image_features, pairing_points, pairing_images, what)
    m = pairing_points.shape[0]
    if m == 0 or num_matches < 1:
        raise AlambicError(f"{what}: needs at least one pair and num_matches >= 1 (got M = {m}, {num_matches})")
    idx = torch.randperm(m, generator=generator)[: min(num_matches, m)].to(pairing_points.device)
    k = point_features[pairing_points[idx].long()]
    q = _pixel_rows(image_features, pairing_images[idx])
    return info_nce_loss(k, q, temperature)


def slidr_pool(point_features: Tensor, image_features: Tensor, superpixels: Tensor, pairing_points: Tensor,
               pairing_images: Tensor, num_superpixels: int = 150) -> tuple[Tensor, Tensor]:
    """SLidR's superpixel pooling: ``(k_s, q_s)`` for every superpixel of the batch that has a paired point.

    Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving Data", CVPR 2022,
    arXiv:2203.16258, §3 (superpixel-driven contrastive loss); details checked against valeoai/SLidR
    ``pretrain/lightning_trainer.py::loss_superpixels_average``:

    - superpixel ids are offset per image (``+ i · num_superpixels``) so they are unique in the batch;
    - ``k_s = mean`` of the 3D features of the **paired points** whose pixel lies in ``s``;
    - ``q_s = mean`` of the 2D features of **all pixels** of ``s`` (paired or not);
    - superpixels with no paired point are dropped (the official code tests ``k[:, 0] != 0``, a proxy that
      would also drop a non-empty region whose first coordinate is exactly 0; here the point count is used);
    - the pooled vectors are **not** re-normalised (the official code also adds 1e-6 to the counts, a
      ≤1e-6 relative scale omitted here).

    Every region gets equal weight in the loss whatever its number of points (the paper's argument).

    Args:
        point_features: [P, D] 3D student features.
        image_features: [I, D, H, W] 2D features of the I images of the batch.
        superpixels: [I, H, W] integer superpixel ids per image, in ``[0, num_superpixels)``; negative =
            no superpixel (ignored).
        pairing_points: [M] indices into the points, each paired to one pixel.
        pairing_images: [M, 3] (image, row, col) of that pixel; image indexes the batch's I images.
        num_superpixels: the per-image id range (150 in SLidR: SLIC with at most 150 segments).
    Returns: ``(k, q)``, both [S, D], S the superpixels with at least one paired point, in id order.
    """
    what = "slidr_pool"
    _pairs(point_features, image_features, pairing_points, pairing_images, what)
    i, d, h, w = image_features.shape
    if superpixels.shape != (i, h, w):
        raise ShapeMismatchError(
            f"{what}: superpixels must be [I, H, W] = {(i, h, w)}, got {tuple(superpixels.shape)}"
        )
    ids = offset_ids(superpixels, num_superpixels)  # [I, H, W], unique across the batch
    num_ids = i * num_superpixels
    b, r, c = pairing_images.long().unbind(1)
    point_ids = ids[b, r, c]  # [M]
    k = scatter_mean(point_features[pairing_points.long()], point_ids, num_ids)
    q = scatter_mean(image_features.permute(0, 2, 3, 1).reshape(-1, d), ids.reshape(-1), num_ids)
    keep = _counts(point_ids, num_ids) > 0
    return k[keep], q[keep]


def slidr_loss(point_features: Tensor, image_features: Tensor, superpixels: Tensor, pairing_points: Tensor,
               pairing_images: Tensor, num_superpixels: int = 150, temperature: float = 0.07) -> Tensor:
    """SLidR's superpixel-driven InfoNCE: :func:`info_nce_loss` over the pooled pairs of :func:`slidr_pool`.

    Sautier et al., CVPR 2022, arXiv:2203.16258, §3: ``L = −(1/S) Σ_s log [exp(k_s·q_s/τ) / Σ_{s'}
    exp(k_s·q_{s'}/τ)]`` over the S non-empty superpixels of the batch (superpoint features as anchors),
    τ = 0.07. Gradient reaches both the 3D features and the 2D features (SLidR trains the 2D decoder; its
    encoder is frozen by the method, not here). Args as :func:`slidr_pool`; returns a scalar.
    """
    k, q = slidr_pool(point_features, image_features, superpixels, pairing_points, pairing_images, num_superpixels)
    if k.shape[0] == 0:
        raise AlambicError("slidr_loss: no superpixel has a paired point")
    return info_nce_loss(k, q, temperature)


# --- COMODO -----------------------------------------------------------------------------------------

def comodo_loss(student_embeddings: Tensor, teacher_embeddings: Tensor, queue: Tensor,
                student_temperature: float = 0.05, teacher_temperature: float = 0.1) -> Tensor:
    """COMODO's cross-modal distillation of similarity distributions over a queue of teacher embeddings.

    Chen et al., "COMODO: Cross-Modal Video-to-IMU Distillation for Efficient Egocentric Human Activity
    Recognition", 2025, arXiv:2503.07259, the distillation objective (§3); details
    checked against Breezelled/COMODO ``comodo/loss.py::COMODOLoss``. With keys ``Q' = cat(Q, z_v)`` (the
    queue of cached teacher embeddings, then the current batch's, so every teacher row has its own
    self-similarity column):

        P_v = softmax(z_v Q'ᵀ / τ_t),   log P_x = log_softmax(ẑ_x Q'ᵀ / τ_s),   L = −(1/B) Σ_b Σ_j P_v log P_x

    with ``ẑ_x`` the L2-normalised student embedding (normalised here, as in the official loss). The
    teacher embeddings and the queue are constants (detached) and are expected unit-norm (the official
    teacher normalises when it encodes). After the loss, push the batch with :func:`queue_push`.

    Args:
        student_embeddings: [B, D] student (IMU) embeddings, not yet normalised.
        teacher_embeddings: [B, D] the batch's teacher (video) embeddings; constants.
        queue: [K, D] cached teacher embeddings (any order: the loss does not depend on it); constants.
        student_temperature: τ_s (0.05).
        teacher_temperature: τ_t (0.1).
    Returns: scalar.
    """
    what = "comodo_loss"
    _rows(student_embeddings, "student_embeddings", what)
    if teacher_embeddings.shape != student_embeddings.shape:
        raise ShapeMismatchError(
            f"{what}: student_embeddings {tuple(student_embeddings.shape)} and teacher_embeddings "
            f"{tuple(teacher_embeddings.shape)} must both be [B, D]"
        )
    if queue.dim() != 2 or queue.shape[1] != student_embeddings.shape[1]:
        raise ShapeMismatchError(
            f"{what}: queue must be [K, D] with D = {student_embeddings.shape[1]}, got {tuple(queue.shape)}"
        )
    _positive(student_temperature, "student_temperature", what)
    _positive(teacher_temperature, "teacher_temperature", what)
    z_v = teacher_embeddings.detach()
    keys = torch.cat([queue.detach().to(z_v.dtype), z_v], dim=0)  # [K + B, D]
    p_v = F.softmax(z_v @ keys.t() / teacher_temperature, dim=1)
    z_x = F.normalize(student_embeddings, dim=1)
    log_p_x = F.log_softmax(z_x @ keys.t().to(z_x.dtype) / student_temperature, dim=1)
    return -(p_v * log_p_x).sum() / student_embeddings.shape[0]


@torch.no_grad()
def queue_push(queue: Tensor, pointer: int, keys: Tensor) -> tuple[Tensor, int]:
    """FIFO update of a ring-buffer queue: write ``keys`` over the oldest rows; returns ``(new_queue, pointer)``.

    The queue of COMODO (arXiv:2503.07259; official ``Q ← cat(Q, z_v)[B:]``) and of MoCo (He et al.,
    "Momentum Contrast for Unsupervised Visual Representation Learning", 2020, arXiv:1911.05722, Alg. 1
    enqueue/dequeue) as a pure function, so that the method can keep ``(queue, pointer)`` as state and
    checkpoint both (the official COMODO code does not save its queue). ``pointer`` is the row of the
    oldest key; ``torch.roll(queue, -pointer, 0)`` lists the keys oldest first, which equals the
    official shifted queue. Writes wrap around the end; with B ≥ K only the newest K keys are kept.
    ``queue`` is not modified; the result has no gradient.

    Args:
        queue: [K, D].
        pointer: int in ``[0, K)``, the oldest row.
        keys: [B, D] the newest keys (e.g. the batch's teacher embeddings), oldest first.
    Returns: ``(queue' [K, D], (pointer + B) mod K)``.
    """
    what = "queue_push"
    if queue.dim() != 2 or keys.dim() != 2 or keys.shape[1] != queue.shape[1]:
        raise ShapeMismatchError(
            f"{what}: queue [K, D] and keys [B, D] must share D, got {tuple(queue.shape)} and {tuple(keys.shape)}"
        )
    k = queue.shape[0]
    if k < 1 or not 0 <= pointer < k:
        raise AlambicError(f"{what}: pointer must be in [0, {k}), got {pointer}")
    keys = keys.detach().to(queue.dtype)
    b = keys.shape[0]
    if b >= k:
        keys, start = keys[b - k:], (pointer + b - k) % k
    else:
        start = pointer
    rows = (start + torch.arange(keys.shape[0], device=queue.device)) % k
    new = queue.detach().clone()
    new[rows] = keys
    return new, (pointer + b) % k


# --- region contrast (CALICO, generic) --------------------------------------------------------------

def region_contrast_loss(student_features: Tensor, teacher_features: Tensor, student_regions: Tensor,
                         teacher_regions: Tensor, num_regions: int, temperature: float = 0.07,
                         normalize: bool = True) -> Tensor:
    """Region-level cross-modal InfoNCE: pool each modality per region, same region = positive.

    The generic form of the region-aware contrastive distillation of CALICO (Sun et al., "CALICO:
    Self-Supervised Camera-LiDAR Contrastive Pre-training for BEV Perception", ICLR 2024, arXiv:2306.00349,
    RAD); no official code exists, so only the idea is implemented: region features are the
    :func:`scatter_mean` of each modality's members (regions from clustering or segments, ids unique across
    the batch, see :func:`offset_ids`), regions present in both modalities are kept, optionally
    L2-normalised (unlike SLidR, which does not), and the student's region ``r`` must pick the teacher's
    region ``r`` among the kept regions (:func:`info_nce_loss`). The teacher side is a constant.

    Args:
        student_features: [N, D] student members (e.g. camera BEV cells), with gradient.
        teacher_features: [M, D] teacher members (e.g. LiDAR BEV cells); constants.
        student_regions: [N] region ids (negative = none); teacher_regions: [M] likewise.
        num_regions: R, ids in ``[0, R)``.
        temperature: τ (0.07).
        normalize: L2-normalise the pooled region vectors before the dot products.
    Returns: scalar.
    """
    what = "region_contrast_loss"
    _rows(student_features, "student_features", what)
    _rows(teacher_features, "teacher_features", what)
    if student_features.shape[1] != teacher_features.shape[1]:
        raise ShapeMismatchError(
            f"{what}: student_features {tuple(student_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must share D"
        )
    s = scatter_mean(student_features, student_regions, num_regions)
    t = scatter_mean(teacher_features.detach(), teacher_regions, num_regions)
    keep = (_counts(student_regions.long(), num_regions) > 0) & (_counts(teacher_regions.long(), num_regions) > 0)
    if not bool(keep.any()):
        raise AlambicError(f"{what}: no region has members in both modalities")
    s, t = s[keep], t[keep]
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    return info_nce_loss(s, t, temperature)


# --- 2D-to-3D lifting (3D-OVS) ------------------------------------------------------------------------

def feature_lifting_loss(rendered_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Cosine match of rendered/projected 3D student features to frozen 2D teacher features: ``1 − mean cos``.

    Liu et al., "Weakly Supervised 3D Open-vocabulary Segmentation" (3D-OVS), NeurIPS 2023,
    arXiv:2305.14093, the feature distillation loss of the NeRF feature field (checked against
    Kunhao-Liu/3D-OVS ``train_seg.py``: ``feature_loss = −cos(feature_map, normalize(clip)).mean()``; here
    shifted by 1 so that a perfect match gives 0, with the same gradient). The same term serves for
    point features projected into a view (GaussianCross-style splatting, or any 3D student rendered to
    pixels). The teacher rows are constants.

    Args:
        rendered_features: [N, D] student features rendered (or projected) at N pixels or rays.
        teacher_features: [N, D] the frozen 2D teacher's features at the same pixels.
    Returns: scalar in [0, 2].
    """
    what = "feature_lifting_loss"
    _rows(rendered_features, "rendered_features", what)
    if teacher_features.shape != rendered_features.shape:
        raise ShapeMismatchError(
            f"{what}: rendered_features {tuple(rendered_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must both be [N, D]"
        )
    return 1.0 - F.cosine_similarity(rendered_features, teacher_features.detach(), dim=1).mean()


def _pairwise_divergence(log_p: Tensor, divergence: str) -> Tensor:
    """[B, L, L] pairwise divergence between the rows' distributions ``p_i`` and ``p_j``."""
    p = log_p.exp()
    if divergence == "kl":  # KL(p_i || p_j) = Σ p_i (log p_i − log p_j)
        return (p * log_p).sum(-1)[:, :, None] - torch.einsum("bic,bjc->bij", p, log_p)
    # JS(p_i, p_j) = ½ KL(p_i || m) + ½ KL(p_j || m), m = (p_i + p_j) / 2
    log_m = torch.log((p[:, :, None, :] + p[:, None, :, :]) / 2)  # [B, L, L, C]
    kl_im = (p[:, :, None, :] * (log_p[:, :, None, :] - log_m)).sum(-1)
    kl_jm = (p[:, None, :, :] * (log_p[:, None, :, :] - log_m)).sum(-1)
    return (kl_im + kl_jm) / 2


def feature_correlation_loss(student_log_probs: Tensor, teacher_features: Tensor, shift: float = 0.7,
                             pos_weight: float = 200.0, neg_weight: float = 0.22,
                             divergence: str = "js") -> Tensor:
    """3D-OVS's correlation term: pairs the teacher finds similar get similar student distributions.

    Liu et al., "Weakly Supervised 3D Open-vocabulary Segmentation" (3D-OVS), NeurIPS 2023,
    arXiv:2305.14093, the Feature-Distribution Alignment (FDA) loss; checked against Kunhao-Liu/3D-OVS
    ``models/losses.py::CorrelationLoss`` and ``train_seg.py``. Within each of the B patches (or views),
    with the teacher (DINO) correlation ``F_ij = cos(t_i, t_j) − shift`` (constant) and the pairwise
    divergence ``D_ij`` of the student's class distributions ``p_i`` (rendered features against text
    embeddings, log-softmax at a temperature, built by the caller):

        L = w_+ · Σ max(F, 0) D / #{F > 0}  +  w_− · Σ min(F, 0) D / #{F < 0}

    The first term pulls the distributions of teacher-similar pairs together, the second (F < 0) pushes
    dissimilar pairs apart. A count of 0 gives that term 0. Defaults are the official configs
    (``dino_shift 0.7``, ``dino_pos_weight 2e2``, ``dino_neg_weight 0.22``). ``divergence="js"`` is the
    Jensen-Shannon divergence the paper and the code's ``js_correlation`` name; the official code builds
    the mixture before broadcasting, so it actually computes ``KL(p_i || p_j)``: ``divergence="kl"``
    reproduces that.

    Args:
        student_log_probs: [B, L, C] log-probabilities of the student at L positions of each of B patches.
        teacher_features: [B, L, E] the frozen 2D teacher's features at the same positions; constants.
        shift: b, subtracted from the cosine correlation.
        pos_weight, neg_weight: w_+ and w_−.
        divergence: "js" (paper) or "kl" (official code's effective value).
    Returns: scalar.
    """
    what = "feature_correlation_loss"
    if student_log_probs.dim() != 3 or teacher_features.dim() != 3 \
            or student_log_probs.shape[:2] != teacher_features.shape[:2]:
        raise ShapeMismatchError(
            f"{what}: student_log_probs {tuple(student_log_probs.shape)} must be [B, L, C] and "
            f"teacher_features {tuple(teacher_features.shape)} [B, L, E] with the same B, L"
        )
    if divergence not in ("js", "kl"):
        raise AlambicError(f"{what}: divergence must be 'js' or 'kl', got {divergence!r}")
    with torch.no_grad():
        t = F.normalize(teacher_features.detach(), dim=-1)
        corr = torch.einsum("bie,bje->bij", t, t) - shift
        pos, neg = corr.clamp(min=0), corr.clamp(max=0)
        n_pos, n_neg = torch.count_nonzero(pos).clamp(min=1), torch.count_nonzero(neg).clamp(min=1)
    d = _pairwise_divergence(student_log_probs, divergence)
    return pos_weight * (pos * d).sum() / n_pos + neg_weight * (neg * d).sum() / n_neg
