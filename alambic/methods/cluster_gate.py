"""``cluster_gate``: the second stage of DLG-LC: k-means pseudo-labels of a frozen self-supervised encoder,
trained through a GMM loss gate with label correction, without a single true label."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from alambic.data.batch import INPUT
from alambic.errors import AlambicError
from alambic.methods._ssl import one_view
from alambic.methods.base import MethodOutput, ReadsStudentFeature
from alambic.methods.kmeans_pseudo import embed_training_set, kmeans_labels
from alambic.methods.pseudo_label import LossGate, LossGateConfig
from alambic.registry import METHODS


class ClusterGateConfig(LossGateConfig):
    teacher_feature: str = Field("pool", description="tap path of the frozen encoder's embedding (mlp encoders: body)")
    n_clusters: int | None = Field(None, ge=2, description="k of k-means; None = the number of classes of the data "
                                                           "(a count, never a label)")
    normalize: bool = Field(True, description="L2-normalise the embeddings before k-means (cosine geometry)")
    n_init: int = Field(10, ge=1, description="k-means restarts")
    feature: str | None = Field(None, description="tap path of the student's representation; None = the zoo default")
    view: str | None = Field(None, description="the view the student trains on; None = the first augmented view, "
                                               "else the plain input")


@METHODS.register("cluster_gate")
class ClusterGate(ReadsStudentFeature, LossGate):
    """CE of a cluster classifier on k-means pseudo-labels, gated per epoch by a 2-component GMM on the losses.

    Stage 1 is any self-supervised run (``dino``, ``byol``...); this method is stage 2 (Han et al.: the
    iterative pseudo-label training of DLG-LC). In ``setup`` the frozen encoder (``teacher: {run: ...}``,
    tap ``teacher_feature``) embeds every training sample once (the plain input, no augmentation); k-means
    (:func:`~alambic.methods.kmeans_pseudo.kmeans_labels`) gives each sample a cluster id, stored by
    stable index. The student is a fresh backbone plus a linear classifier over the clusters (owned by the
    method, dropped after training), trained on augmented views through the loss gate of
    :class:`~alambic.methods.pseudo_label.LossGate`: in epoch 0 every pseudo-label is used, afterwards a
    sample whose loss lies above the GMM threshold of the previous epoch's losses trains on the student's
    own arg-max (label correction) or is dropped. The result is judged like every self-supervised run, by
    probes of the backbone's representation. Not reproduced: the cluster-aware *sampling* of positives in
    the DINO stage of Cluster-aware DINO, and re-clustering between iterations.
    """

    paper = ('Han, Chen, Qian, "Self-Supervised Speaker Verification Using Dynamic Loss-Gate and Label Correction" '
             '(DLG-LC), 2022, arXiv:2208.01928; Cluster-aware DINO, 2023, arXiv:2304.05754')

    Config = ClusterGateConfig
    needs_teacher = True
    uses_unlabeled = True
    self_supervised = True

    def __init__(self, config: ClusterGateConfig | None = None):
        super().__init__(config)
        self.register_buffer("pseudo", torch.zeros(0, dtype=torch.int64))

    def use_views(self, names) -> None:
        self.student_views, self.teacher_views = (one_view(names, self.config.view, "cluster_gate"),), (INPUT,)

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_feature]

    def setup(self, student, teacher, info) -> None:
        super().setup(student, teacher, info)
        cfg = self.config
        if info.loader is None or info.teacher is None:
            raise AlambicError("cluster_gate: setup needs the training loader and the frozen encoder (teacher)")
        index, feats, _ = embed_training_set(info.loader, info.teacher, cfg.teacher_feature)
        k = cfg.n_clusters or info.num_classes
        clusters = kmeans_labels(feats.numpy(), k, cfg.seed, cfg.n_init, cfg.normalize)
        self.pseudo = torch.full((info.num_samples,), -1, dtype=torch.int64)
        self.pseudo[index] = torch.from_numpy(clusters)
        width = student[self.student_views[0]].features[self.feature].flatten(1).shape[1]
        self.classifier = nn.Linear(width, k)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        feat = student[self.student_views[0]].features[self.feature].flatten(1)
        logits = self.classifier(feat)
        pseudo = self.pseudo[batch.index.to(self.pseudo.device)].to(logits.device)
        rows = pseudo >= 0
        loss = self.gated_loss(logits, pseudo.clamp_min(0), batch.index, rows, ctx.epoch)
        with torch.no_grad():
            kept = (torch.nn.functional.cross_entropy(logits, pseudo.clamp_min(0), reduction="none") < float(self.gate))
            monitors = {"kept": kept.float().mean()}
        return MethodOutput(loss, {"cluster_ce": loss.detach()}, None, monitors)
