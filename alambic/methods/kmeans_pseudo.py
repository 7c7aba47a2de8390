"""``kmeans_pseudo``: a fresh student learns k-means cluster labels of a frozen teacher's representation."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, INPUT
from alambic.errors import AlambicError
from alambic.losses import masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class KMeansPseudoConfig(MethodConfig):
    teacher_tap: str | None = Field(
        None, description="dotted path of the teacher layer to cluster (e.g. body.act0); None = its logits",
    )
    n_clusters: int | None = Field(
        None, ge=2, description="k of k-means; None = the number of classes (UnFuSeD tunes it per dataset)",
    )
    normalize: bool = Field(True, description="L2-normalise the features before k-means (cosine geometry)")
    seed: int = Field(0, description="random_state of k-means: the same seed gives the same labels")
    n_init: int = Field(10, ge=1, description="k-means restarts (the best inertia is kept)")


def kmeans_labels(features: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10,
                  normalize: bool = False) -> np.ndarray:
    """[N] cluster ids of scikit-learn's k-means (Lloyd, k-means++ init, ``random_state=seed``) on [N, D] rows.

    A pure function of (features, n_clusters, seed, n_init): identical rows land in the same cluster, since
    each row goes to its nearest centroid.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if len(x) < n_clusters:
        raise AlambicError(f"kmeans_pseudo: {len(x)} samples cannot form n_clusters={n_clusters} clusters")
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(x)
    return km.labels_.astype(np.int64)


def embed_training_set(loader, teacher, tap: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every training sample embedded once by a frozen teacher on the plain input, in epoch 0's order.

    Returns ``index`` [N] (stable ids), ``features`` [N, D] float64 (the teacher's logits, or the tap
    ``tap`` flattened) and ``labels`` [N] (``IGNORE_INDEX`` where the sample has no label, or the loader
    gives none).
    """
    index, feats, labels = [], [], []
    for batch in loader.epoch(0):
        out = teacher.outputs(batch, [INPUT])[INPUT]
        f = out.logits if tap is None else out.features[tap]
        index.append(batch.index.cpu())
        feats.append(f.detach().reshape(len(f), -1).double().cpu())
        target = batch.target if batch.target is not None else torch.full_like(batch.index, IGNORE_INDEX)
        labels.append(torch.where(batch.labeled_mask(), target, torch.full_like(target, IGNORE_INDEX)).cpu())
    return torch.cat(index), torch.cat(feats), torch.cat(labels)


def majority_mapping(clusters: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """[K] class of each cluster: the most frequent label among its labelled members.

    ``labels`` holds ``IGNORE_INDEX`` for unlabelled samples; they do not vote. Ties go to the smallest
    class id. A cluster with no labelled member maps to ``IGNORE_INDEX`` (its samples are not trained on).
    """
    clusters, labels = np.asarray(clusters, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if clusters.shape != labels.shape:
        raise AlambicError(f"majority_mapping: clusters {clusters.shape} and labels {labels.shape} differ")
    mapping = np.full(n_clusters, IGNORE_INDEX, dtype=np.int64)
    voted = labels != IGNORE_INDEX
    for k in range(n_clusters):
        votes = labels[voted & (clusters == k)]
        if len(votes):
            mapping[k] = int(np.argmax(np.bincount(votes)))
    return mapping


@METHODS.register("kmeans_pseudo")
class KMeansPseudo(Method):
    """CE on per-sample pseudo-labels from k-means on the frozen teacher's features, computed once in setup.

    ``setup`` runs the teacher over the whole training split (``info.loader.epoch(0)``), clusters its
    logits, or the layer ``teacher_tap``, with k-means into ``n_clusters`` clusters and stores one
    pseudo-label per sample, keyed by ``batch.index``. UnFuSeD trains a randomly initialised network on
    the raw cluster ids and evaluates it after fine-tuning; here each cluster is named by the majority
    class of its labelled members (:func:`majority_mapping`) so the student predicts classes and its
    accuracy means something. Clusters without a labelled member are ignored, and every sample, labelled
    or not, trains on its cluster's class (the labels only name clusters). UnFuSeD's multi-branch
    self-distillation (BYOT-style auxiliary heads) is not part of this method.
    """

    paper = (
        'Seth et al., "UnFuSeD: UNsupervised Finetuning Using SElf supervised Distillation", 2023, '
        'arXiv:2303.05668 (stage 2: k-means pseudo-labels)'
    )

    Config = KMeansPseudoConfig
    needs_teacher = True
    uses_unlabeled = True

    def __init__(self, config: KMeansPseudoConfig | None = None):
        super().__init__(config)
        self.register_buffer("pseudo", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("cluster", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("cluster_class", torch.zeros(0, dtype=torch.int64))

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_tap] if self.config.teacher_tap else []

    def setup(self, student, teacher, info) -> None:
        cfg = self.config
        if info is None or info.loader is None or info.teacher is None:
            raise AlambicError("kmeans_pseudo: setup needs the training loader and the teacher (SetupInfo)")
        index_t, feats, labels = embed_training_set(info.loader, info.teacher, cfg.teacher_tap)
        labels_np = labels.numpy()
        if not (labels_np != IGNORE_INDEX).any():
            raise AlambicError("kmeans_pseudo: the training split has no labelled sample to name the clusters with")
        k = cfg.n_clusters or info.num_classes
        clusters = kmeans_labels(feats.numpy(), k, cfg.seed, cfg.n_init, cfg.normalize)
        mapping = majority_mapping(clusters, labels_np, k)
        self.cluster_class = torch.from_numpy(mapping)
        self.cluster = torch.full((info.num_samples,), -1, dtype=torch.int64)
        self.cluster[index_t] = torch.from_numpy(clusters)
        self.pseudo = torch.full((info.num_samples,), IGNORE_INDEX, dtype=torch.int64)
        self.pseudo[index_t] = torch.from_numpy(mapping[clusters])

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        s = student[INPUT].logits
        target = self.pseudo[batch.index.to(self.pseudo.device)].to(s.device)
        ce = masked_cross_entropy(s, target)
        return MethodOutput(ce, {"ce": ce.detach()}, s)
