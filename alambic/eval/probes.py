"""Probes of frozen representations: feature extraction, weighted kNN, linear probe, collapse monitors.

A self-supervised student has no classifier to score, so its backbone is judged by how well simple
classifiers do on its frozen features (kNN and logistic regression, the protocols of DINO and SimCLR), and
watched during training for collapse (the spread and effective rank of its features, the entropy of its
head's outputs).

The functions below take tensors (``features_ND`` [N, D], ``labels_N`` [N] int64 class ids) and return
tensors or Python floats, so a user's own loop can call them; only :func:`extract_features` touches a model.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.eval.classification import _logits_of, eval_mode
from alambic.models.taps import Taps

__all__ = [
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "output_entropy",
    "representation_stats",
]


def _features(features_ND: Tensor, name: str) -> None:
    if features_ND.dim() != 2:
        raise ShapeMismatchError(f"{name} must be [N, D], got shape {tuple(features_ND.shape)}")
    if features_ND.shape[0] == 0:
        raise AlambicError(f"{name} is empty (N = 0)")


def _labels(labels_N: Tensor, features_ND: Tensor, name: str, num_classes: int | None = None) -> None:
    if tuple(labels_N.shape) != (features_ND.shape[0],):
        raise ShapeMismatchError(
            f"{name} must be [N] = [{features_ND.shape[0]}] to match the features, got {tuple(labels_N.shape)}"
        )
    if labels_N.dtype.is_floating_point or labels_N.dtype == torch.bool:
        raise AlambicError(f"{name} must hold integer class ids, got dtype {labels_N.dtype}")
    if num_classes is not None and len(labels_N) and not 0 <= int(labels_N.min()) <= int(labels_N.max()) < num_classes:
        raise AlambicError(
            f"{name} must be class ids in [0, {num_classes}), got values in "
            f"[{int(labels_N.min())}, {int(labels_N.max())}]"
        )


@torch.no_grad()
def extract_features(model: nn.Module, x: Tensor, feature: str | None = None, batch_size: int = 512) -> Tensor:
    """The frozen features of ``x``: ``model``'s output, or a submodule's, as float32 [N, D] on the CPU.

    Runs in eval mode (dropout off, BatchNorm on running statistics) under ``no_grad``, in batches of
    ``batch_size`` moved to the device of the model's first parameter (or buffer), and restores every
    submodule's previous train/eval flag afterwards (see :func:`alambic.eval.classification.eval_mode`).

    Args:
        model: any module; its output is a tensor or an object with a ``.logits`` tensor.
        x: [N, ...] inputs.
        feature: dotted path of a submodule (``"body.pool"``) whose output is captured with a forward hook
            (:class:`alambic.models.taps.Taps`); None = the model's output. Everything after dim 0 is
            flattened, so a token tap [N, T, D] becomes [N, T·D]: pass the path of a pooled output (a CLS
            token or a mean pool) to probe a transformer.
        batch_size: inputs per forward pass.
    Returns: [N, D] float32 on the CPU.
    """
    if batch_size < 1:
        raise AlambicError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise AlambicError(f"extract_features: x is empty or 0-d (shape {tuple(x.shape)})")
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    device = tensor.device if tensor is not None else x.device
    chunks = []
    with eval_mode(model), Taps(model, [feature] if feature else [], detach=True) as taps:
        for start in range(0, x.shape[0], batch_size):
            output = model(x[start:start + batch_size].to(device))
            out = taps.take()[feature] if feature else _logits_of(output)
            chunks.append(out.detach().reshape(out.shape[0], -1).float().cpu())
    return torch.cat(chunks, dim=0)


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, batch_size: int = 1024, exclude_self: bool = False) -> Tensor:
    """Weighted k-nearest-neighbour class votes: ``score_c(q) = Σ_{j ∈ top-k(q)} exp(cos(q, x_j)/T)·1[y_j = c]``.

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", 2018,
    arXiv:1805.01978 (their weighted kNN classifier, neighbour weights ``exp(s_i/τ)``), as DINO's ``eval_knn`` uses it
    (Caron et al. 2021, arXiv:2104.14294: k = 20, T = 0.07): both sides are L2-normalised, so the
    similarity is the cosine; each query's k most similar training samples vote for their class with
    weight ``exp(cos/T)``. If k exceeds the training set (minus the query itself with ``exclude_self``),
    every training sample votes. Computed in float32, ``batch_size`` queries at a time, on the device of
    ``train_features``.

    Args:
        train_features: [N_train, D]; train_labels: [N_train] class ids in [0, num_classes).
        query_features: [N_query, D].
        num_classes: C.
        k: neighbours per query (≥ 1). temperature: T > 0.
        exclude_self: the query set is the training set (row i of both is the same sample): sample i never
            votes for itself, which gives leave-one-out kNN on the training set. This drops exactly the
            diagonal, i.e. the best match when there are no exact duplicates; an exact duplicate of the
            query (a different sample) still votes.
    Returns: [N_query, C] float32 vote scores (argmax = the prediction).
    """
    _features(train_features, "train_features")
    _features(query_features, "query_features")
    if train_features.shape[1] != query_features.shape[1]:
        raise ShapeMismatchError(
            f"knn_predict: train_features {tuple(train_features.shape)} and query_features "
            f"{tuple(query_features.shape)} have different feature dims"
        )
    if num_classes < 1:
        raise AlambicError(f"knn_predict: num_classes must be >= 1, got {num_classes}")
    _labels(train_labels, train_features, "train_labels", num_classes)
    if k < 1 or temperature <= 0 or batch_size < 1:
        raise AlambicError(
            f"knn_predict: need k >= 1, temperature > 0 and batch_size >= 1, got {k}, {temperature}, {batch_size}"
        )
    n_train = train_features.shape[0]
    if exclude_self and query_features.shape[0] != n_train:
        raise AlambicError(
            f"knn_predict: exclude_self needs the query set to be the training set, got {query_features.shape[0]} "
            f"queries for {n_train} training samples"
        )
    k = min(k, n_train - 1 if exclude_self else n_train)
    if k < 1:
        raise AlambicError("knn_predict: exclude_self with a single training sample leaves no neighbour")
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(device).long()
    votes = []
    for start in range(0, query_features.shape[0], batch_size):
        query = F.normalize(query_features[start:start + batch_size].to(device).float(), dim=1)
        sim = query @ train.T  # [b, N_train]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=device)
            sim[rows, rows + start] = -math.inf
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes, device=device)
        votes.append(scores.scatter_add_(1, labels[top_idx], weights))
    return torch.cat(votes, dim=0)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, query_features: Tensor, query_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of the weighted kNN classifier of :func:`knn_predict` on the query set."""
    _labels(query_labels, query_features, "query_labels")
    votes = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return (votes.argmax(dim=1) == query_labels.to(votes.device)).double().mean().item()


def linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor,
                 test_features: Tensor | None = None, test_labels: Tensor | None = None,
                 num_classes: int | None = None, c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
                 max_iter: int = 200, seed: int = 0) -> dict:
    """Linear probe: multinomial logistic regression on frozen, standardised features, C chosen on val.

    The linear evaluation protocol of self-supervised learning (e.g. Chen et al., "A Simple Framework for
    Contrastive Learning of Visual Representations", 2020, arXiv:2002.05709, following Kornblith et al.,
    "Do Better ImageNet Models Transfer Better?", 2019, arXiv:1805.08974, which fit L2-regularised
    multinomial logistic regression with L-BFGS and pick the regularisation on a validation split).
    Features are standardised with the training split's mean and std; for each inverse regularisation
    strength C in ``c_grid`` scikit-learn's ``LogisticRegression(solver="lbfgs")`` is fitted on the
    training split, the C with the best validation accuracy is kept (ties: the smallest C, the simplest
    model), and only that model is scored on the test split, which never influences the choice.
    ``max_iter`` is the L-BFGS budget per fit; a fit that has not converged by then is used as is (its
    ConvergenceWarning is silenced: a fixed budget is part of the protocol). Deterministic for given inputs.
    The classifier predicts among the classes present in the training split.

    Args:
        train_features [N_tr, D], train_labels [N_tr]; val_features [N_va, D], val_labels [N_va];
        test_features [N_te, D], test_labels [N_te] (optional, both or neither).
        num_classes: if given, every label must be in [0, num_classes).
        c_grid: candidate values of C > 0. max_iter: L-BFGS iterations per fit. seed: ``random_state``.
    Returns: ``{"c": best C, "val_accuracy": float, "test_accuracy": float or None}``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if (test_features is None) != (test_labels is None):
        raise AlambicError("linear_probe: pass both test_features and test_labels, or neither")
    splits = [("train", train_features, train_labels), ("val", val_features, val_labels)]
    if test_features is not None:
        splits.append(("test", test_features, test_labels))
    for name, feats, labels in splits:
        _features(feats, f"{name}_features")
        _labels(labels, feats, f"{name}_labels", num_classes)
        if feats.shape[1] != train_features.shape[1]:
            raise ShapeMismatchError(
                f"linear_probe: {name}_features has {feats.shape[1]} dims, train_features has {train_features.shape[1]}"
            )
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise AlambicError(f"linear_probe: c_grid must be non-empty with every C > 0, got {tuple(c_grid)}")
    if max_iter < 1:
        raise AlambicError(f"linear_probe: max_iter must be >= 1, got {max_iter}")

    def array(feats: Tensor) -> np.ndarray:
        return feats.detach().cpu().double().numpy()

    x_train = array(train_features)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-12] = 1.0  # a constant feature stays 0 instead of dividing by 0
    data = {name: ((array(f) - mean) / std, l.detach().cpu().numpy()) for name, f, l in splits}
    y_train = data["train"][1]
    if len(np.unique(y_train)) < 2:
        raise AlambicError("linear_probe: the training split holds a single class; nothing to fit")

    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    best = None
    # BLAS threads as many as torch's (train.threads): a probe must not grab every core of a shared machine
    with warnings.catch_warnings(), threadpool_limits(limits=torch.get_num_threads()):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
            clf.fit(data["train"][0], y_train)
            val_acc = float((clf.predict(data["val"][0]) == data["val"][1]).mean())
            if best is None or val_acc > best[1]:
                best = (c, val_acc, clf)
    c, val_acc, clf = best
    test_acc = None
    if "test" in data:
        test_acc = float((clf.predict(data["test"][0]) == data["test"][1]).mean())
    return {"c": c, "val_accuracy": val_acc, "test_accuracy": test_acc}


def representation_stats(features: Tensor) -> dict[str, float]:
    """Collapse monitors of a representation [N, D]: ``feature_std`` and effective ``rank``.

    - ``feature_std``: the std over samples of the L2-normalised features, averaged over dimensions. Chen &
      He, "Exploring Simple Siamese Representation Learning" (SimSiam), 2021, arXiv:2011.10566, §4.1: for
      unit vectors spread isotropically it is ≈ 1/√D, and it falls to 0 when every sample maps to one point
      (complete collapse). Unbiased std (N − 1).
    - ``rank``: RankMe, Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained
      Self-Supervised Representations by Their Rank", 2023, arXiv:2210.02885: with the singular
      values σ of the (raw, uncentred) feature matrix and ``p_k = σ_k/‖σ‖₁ + ε``, ``exp(−Σ_k p_k log p_k)``,
      between 1 (every sample on one line) and min(N, D) (flat spectrum).
    Computed in float64. Returns ``{"feature_std": float, "rank": float}``.
    """
    _features(features, "features")
    if features.shape[0] < 2:
        raise AlambicError(f"representation_stats needs at least 2 samples, got {features.shape[0]}")
    x = features.detach().double()
    feature_std = F.normalize(x, dim=1).std(dim=0).mean().item()
    sigma = torch.linalg.svdvals(x)
    if sigma.sum() <= 0:  # all-zero features: nothing spans any direction
        return {"feature_std": feature_std, "rank": 0.0}
    p = sigma / sigma.sum() + 1e-12
    rank = torch.exp(-(p * p.log()).sum()).item()
    return {"feature_std": feature_std, "rank": rank}


def output_entropy(logits: Tensor, temperature: float = 1.0) -> dict[str, float]:
    """Entropies of a head's output distributions ``softmax(logits/T)`` over a batch, in nats.

    ``entropy`` is the mean per-sample entropy and ``mean_entropy`` the entropy of the batch-mean
    distribution; ``max`` = ln K. In DINO (Caron et al. 2021, arXiv:2104.14294, §5.3 "Avoiding collapse") the two
    collapse modes read: one dimension dominating → both near 0; uniform outputs → per-sample entropy ≈
    ln K. A healthy head has a low per-sample entropy and a high ``mean_entropy`` (confident yet diverse).

    Args: logits [N, K] (or [..., K]: every leading position is a sample); temperature T > 0.
    Returns: ``{"entropy": float, "mean_entropy": float, "max": float}``. Computed in float64.
    """
    if logits.dim() < 1 or logits.numel() == 0:
        raise AlambicError(f"output_entropy: logits is empty, got shape {tuple(logits.shape)}")
    if temperature <= 0:
        raise AlambicError(f"output_entropy: temperature must be > 0, got {temperature}")
    k = logits.shape[-1]
    log_p = F.log_softmax(logits.detach().double().reshape(-1, k) / temperature, dim=-1)
    p = log_p.exp()
    entropy = (-(p * log_p).sum(-1)).mean().item()
    mean_p = p.mean(0)
    mean_entropy = -(mean_p * mean_p.clamp_min(1e-300).log()).sum().item()
    return {"entropy": entropy, "mean_entropy": mean_entropy, "max": math.log(k)}
