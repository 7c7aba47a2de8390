"""``dml``: Deep Mutual Learning, the student and a peer of its own architecture teaching each other.

No pretrained teacher: both networks start from scratch and train together, each on its labels plus a KL
term towards the other's current prediction. The peer lives in the method (so the optimizer trains it
and checkpoints keep it) and is dropped at export; the deployed network is the student.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import Tensor, nn

from alambic.data.batch import INPUT
from alambic.losses import kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


def mutual_learning_losses(logits_a: Tensor, logits_b: Tensor, target: Tensor, temperature: float = 1.0,
                           all_labeled: bool = False) -> tuple[Tensor, Tensor]:
    """DML's two objectives (Zhang et al. Eq. 4–5), each with the other network's prediction as a constant.

    ``L_a = CE(a, y) + T²·KL(p_b ‖ p_a)`` and ``L_b = CE(b, y) + T²·KL(p_a ‖ p_b)``; ``L_a`` sends no
    gradient to ``b`` and ``L_b`` none to ``a``, so minimising ``L_a + L_b`` jointly takes exactly the
    paper's alternating per-network steps on one batch. Cross-entropies average over labelled rows.

    Args: logits_a, logits_b [B, C]; target [B] (IGNORE_INDEX where unlabelled); T > 0 (1 in the paper).
    Returns: (L_a, L_b), scalars.
    """
    ce_a = masked_cross_entropy(logits_a, target, all_labeled=all_labeled)
    ce_b = masked_cross_entropy(logits_b, target, all_labeled=all_labeled)
    return ce_a + kd_loss(logits_a, logits_b, temperature), ce_b + kd_loss(logits_b, logits_a, temperature)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every submodule's ``reset_parameters()`` re-run under ``seed``.

    The global RNG is left exactly as it was (so adding a peer does not shift the student's dropout or
    the rest of the run), and forward/backward hooks copied from ``model`` (taps) are removed.
    """
    peer = copy.deepcopy(model)
    for module in peer.modules():
        for name, value in vars(module).items():
            if name.startswith(("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")) \
                    and isinstance(value, dict):
                value.clear()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return peer


class DMLConfig(MethodConfig):
    temperature: float = Field(1.0, gt=0, description="temperature of the mutual KL (the paper: plain softmax, T = 1)")
    peer_seed: int = Field(1, description="seed of the peer's re-initialisation (the student's is the recipe seed)")


@METHODS.register("dml")
class DML(Method):
    """``CE(s) + KL(p_peer ‖ p_s) + CE(peer) + KL(p_s ‖ p_peer)``, the KL targets detached.

    The peer is a copy of the student's architecture re-initialised in ``setup`` (``peer_seed``), trained
    jointly by the same optimizer. Each KL's target is the other network's detached prediction, so the
    student's term moves only the student and the peer's term only the peer. The peer runs on the same
    input view as the student. Labelled samples only, as in the paper.
    """

    paper = 'Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384'

    Config = DMLConfig
    needs_teacher = False
    uses_unlabeled = False

    def __init__(self, config: DMLConfig | None = None):
        super().__init__(config)
        self.peer: nn.Module | None = None

    def setup(self, student, teacher, info) -> None:
        self.peer = fresh_copy(info.student, self.config.peer_seed)
        self.peer.train(self.training)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        s = student[INPUT].logits
        p = self.peer(batch.views[INPUT])
        loss_s, loss_p = mutual_learning_losses(s, p, batch.target, self.config.temperature, batch.all_labeled)
        return MethodOutput(loss_s + loss_p, {"student": loss_s.detach(), "peer": loss_p.detach()}, s)
