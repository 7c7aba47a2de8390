"""Hard pseudo-labels from a teacher: a confidence threshold (``pseudo_label``) or a GMM loss gate (``loss_gate``).

Both train ``CE(labelled) + λ·(pseudo-label CE on the unlabelled samples)`` with the teacher's arg-max
class as the pseudo-label; the teacher may be frozen (``teacher: {run: ...}``) or an EMA of the student
(``teacher: {ema: ...}``). They differ in which pseudo-labels they trust: the teacher's confidence, or
the student's own loss on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from alambic.data.batch import INPUT
from alambic.losses import masked_cross_entropy, pseudo_label_loss
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class PseudoLabelConfig(MethodConfig):
    threshold: float = Field(
        0.95, ge=0, le=1, description="τ: keep a pseudo-label when the teacher's max probability ≥ τ (FixMatch: 0.95)",
    )
    weight: float = Field(1.0, ge=0, description="λ of the pseudo-label term (FixMatch λ_u = 1)")
    unlabeled_only: bool = Field(
        True, description="pseudo-label only the unlabelled samples (labelled ones keep their label only)",
    )
    student_view: str = Field(INPUT, description="the view the student learns from (FixMatch: a strong view)")
    teacher_view: str = Field(INPUT, description="the view the teacher pseudo-labels (FixMatch: a weak view)")


@METHODS.register("pseudo_label")
class PseudoLabel(Method):
    """``CE(labelled) + λ·(1/|U|) Σ_{u∈U} 1(max q_u ≥ τ)·CE(s_u, argmax q_u)``, q the teacher's softmax.

    Lee's Pseudo-Label trains on the arg-max of every unlabelled prediction (``threshold: 0``); FixMatch's
    threshold keeps only confident ones. By default the student and the teacher see the same input; with
    a recipe ``views: {groups: {weak: {...}, strong: {...}}}`` and ``teacher_view: weak``,
    ``student_view: strong`` the teacher pseudo-labels the weak view and the student learns both terms on
    the strong one (FixMatch computes the labelled CE on the weak view; here it uses the student's view).
    The normaliser is the number of unlabelled samples in the batch, not the number kept (FixMatch Eq. 4).
    """

    paper = (
        'Lee, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep Neural '
        'Networks", ICML 2013 workshop; threshold from Sohn et al., "FixMatch", 2020, arXiv:2001.07685'
    )

    Config = PseudoLabelConfig
    needs_teacher = True
    uses_unlabeled = True

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s, t = student[cfg.student_view].logits, teacher[cfg.teacher_view].logits
        ce = masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled)
        rows = ~batch.labeled_mask() if cfg.unlabeled_only else None
        pseudo = cfg.weight * pseudo_label_loss(s, t, cfg.threshold, rows)
        return MethodOutput(ce + pseudo, {"ce": ce.detach(), "pseudo": pseudo.detach()}, s)


# -- the GMM loss gate -----------------------------------------------------------------------------------


def gmm_loss_threshold(losses: np.ndarray | Tensor, seed: int = 0) -> float:
    """The loss below which a pseudo-label is trusted: where a 2-component 1-D GMM's posteriors cross.

    Han, Chen, Qian, "Self-Supervised Speaker Verification Using Dynamic Loss-Gate and Label Correction",
    2022, arXiv:2208.01928: the per-sample losses of pseudo-labelled data are bimodal (clean labels are
    fit fast, wrong ones slowly); a two-component Gaussian mixture (scikit-learn, ``random_state=seed``)
    models them, and the gate is the point between the two means where the posterior of the low-loss
    component falls to 0.5, ``w₁N(x; μ₁, σ₁²) = w₂N(x; μ₂, σ₂²)``, found by bisection. If the low
    component wins (or loses) over the whole interval, the gate is the upper (or lower) mean. Fewer than
    two distinct losses cannot be split: the gate is +inf (every label kept).

    Args: losses: [N] finite per-sample losses. Returns: the threshold (a Python float).
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses.detach().cpu() if isinstance(losses, Tensor) else losses, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():
        raise ValueError("gmm_loss_threshold: the losses contain NaN or inf")
    if len(np.unique(x)) < 2:
        return math.inf
    gmm = GaussianMixture(n_components=2, random_state=seed, reg_covar=1e-6).fit(x[:, None])
    means, variances, weights = gmm.means_[:, 0], gmm.covariances_.reshape(-1), gmm.weights_
    lo, hi = int(np.argmin(means)), int(np.argmax(means))
    if lo == hi:
        return math.inf

    def log_ratio(v: float) -> float:  # log w_lo N(v; lo) − log w_hi N(v; hi): > 0 where the low component wins
        def log_joint(k: int) -> float:
            return math.log(weights[k]) - 0.5 * math.log(2 * math.pi * variances[k]) - (v - means[k]) ** 2 / (2 * variances[k])

        return log_joint(lo) - log_joint(hi)

    a, b = float(means[lo]), float(means[hi])
    if log_ratio(a) <= 0:
        return a
    if log_ratio(b) >= 0:
        return b
    for _ in range(100):
        mid = 0.5 * (a + b)
        if log_ratio(mid) > 0:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


def correct_labels(pseudo: Tensor, keep: Tensor, model_logits: Tensor) -> Tensor:
    """Label correction: a kept sample keeps its pseudo-label, a gated-out one takes the model's arg-max.

    Args: pseudo: [B] int64; keep: [B] bool; model_logits: [B, C] (read without gradient). Returns: [B] int64.
    """
    return torch.where(keep, pseudo, model_logits.detach().argmax(-1))


class LossGateConfig(MethodConfig):
    weight: float = Field(1.0, ge=0, description="λ of the pseudo-label term")
    label_correction: bool = Field(
        True, description="gated-out samples train on the student's own arg-max (DLG-LC) instead of being dropped",
    )
    seed: int = Field(0, description="random_state of the GaussianMixture fits")


@METHODS.register("loss_gate")
class LossGate(Method):
    """Pseudo-labels gated by a per-epoch GMM on their own losses (DLG), with label correction (LC).

    The pseudo-label of an unlabelled sample is the teacher's arg-max. During epoch e every unlabelled
    sample's CE against its pseudo-label is recorded in a per-sample store keyed by ``batch.index``. At the
    first step of epoch e + 1 a 2-component GMM is fit to the stored losses (:func:`gmm_loss_threshold`)
    and the store is cleared. From then on a sample whose current loss is below the gate trains on its
    pseudo-label; one above it trains on the student's own (detached) arg-max when ``label_correction`` is
    on, and is dropped otherwise. During epoch 0 there is no gate yet: every pseudo-label is used. The
    store, the gate and the epoch it belongs to are buffers, so they are checkpointed and a resumed run
    gates exactly as the uninterrupted one. Labelled samples always train on their labels.

    The DLG-LC paper's pseudo-labels come from clustering speaker embeddings, with no true label; here
    they come from a teacher and the labelled samples add a plain CE term. Whether the paper's label
    correction also requires a confident prediction is not verified; here it does not.
    """

    distributed_safe = False  # its per-sample losses: not reduced across ranks yet

    paper = (
        'Han, Chen, Qian, "Self-Supervised Speaker Verification Using Dynamic Loss-Gate and Label '
        'Correction" (DLG-LC), 2022, arXiv:2208.01928; extended in "Self-Supervised Learning with '
        'Cluster-Aware-DINO for High-Performance Robust Speaker Verification", 2023, arXiv:2304.05754'
    )

    Config = LossGateConfig
    needs_teacher = True
    uses_unlabeled = True

    def __init__(self, config: LossGateConfig | None = None):
        super().__init__(config)
        self.register_buffer("gate", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("gate_epoch", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("sample_loss", torch.zeros(0))
        self.register_buffer("sample_seen", torch.zeros(0, dtype=torch.bool))

    def setup(self, student, teacher, info) -> None:
        self.sample_loss = torch.zeros(info.num_samples)
        self.sample_seen = torch.zeros(info.num_samples, dtype=torch.bool)

    def refit_gate(self) -> float:
        """Fit the gate to the losses stored so far, clear the store; returns the new gate."""
        seen = self.sample_seen
        if bool(seen.any()):
            self.gate.fill_(gmm_loss_threshold(self.sample_loss[seen].cpu().numpy(), self.config.seed))
        self.sample_seen.zero_()
        self.sample_loss.zero_()
        return float(self.gate)

    def gated_loss(self, logits: Tensor, pseudo: Tensor, index: Tensor, rows: Tensor, epoch: int) -> Tensor:
        """``weight · Σ_{i∈rows} CE(logits_i, gated label_i) / |rows|`` with this epoch's losses recorded.

        ``pseudo`` [B] are the pseudo-labels, ``rows`` [B] bool the samples they apply to, ``index`` [B] the
        stable sample ids. At the first call of a new epoch the gate is refit on the previous epoch's losses.
        A sample whose loss is below the gate keeps its pseudo-label; one above it takes the model's own
        arg-max (label correction) or is dropped.
        """
        cfg = self.config
        if epoch > int(self.gate_epoch):
            self.refit_gate()
            self.gate_epoch.fill_(epoch)
        per_sample = F.cross_entropy(logits, pseudo, reduction="none")
        with torch.no_grad():  # record this epoch's losses of the pseudo-labelled samples
            dev = self.sample_loss.device
            picked = rows.to(dev)
            ids = index.to(dev)[picked]
            self.sample_loss[ids] = per_sample.detach().to(dev, self.sample_loss.dtype)[picked]
            self.sample_seen[ids] = True
        keep = per_sample.detach() < float(self.gate)
        if cfg.label_correction:
            target, used = correct_labels(pseudo, keep, logits), rows
        else:
            target, used = pseudo, rows & keep
        terms = F.cross_entropy(logits, target, reduction="none")
        return cfg.weight * (terms * used).sum() / rows.sum().clamp_min(1)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        s, t = student[INPUT].logits, teacher[INPUT].logits
        ce = masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled)
        unlabeled = ~batch.labeled_mask()
        pl = self.gated_loss(s, t.detach().argmax(-1), batch.index, unlabeled, ctx.epoch)
        return MethodOutput(ce + pl, {"ce": ce.detach(), "pseudo": pl.detach()}, s)
