"""Losses between intermediate features."""

from __future__ import annotations

from torch import Tensor

from alambic.errors import ShapeMismatchError


__all__ = ['hint_loss']


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets hint loss: ``½‖u_h(x) − r(v_g(x))‖²`` per sample, averaged over the batch.

    Romero et al., "FitNets: Hints for Thin Deep Nets", 2015, arXiv:1412.6550, Eq. (3): ``u_h`` is the
    teacher's hint layer, ``r(v_g)`` the student's guided layer passed through the learned regressor
    (the caller applies ``r``). The squared norm runs over every non-batch dimension.

    Args:
        student_feature: [B, ...] the regressed student feature.
        teacher_feature: [B, ...] same shape; treated as a constant.
    Returns: scalar.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ShapeMismatchError(
            f"hint_loss: regressed student feature {tuple(student_feature.shape)} and teacher hint "
            f"{tuple(teacher_feature.shape)} shapes differ"
        )
    diff = (student_feature - teacher_feature.detach()).flatten(1)
    return 0.5 * diff.pow(2).sum(1).mean()
