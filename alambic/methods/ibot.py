"""``ibot``: DINO on the class token plus masked-token self-distillation on the patch tokens (iBOT)."""

from __future__ import annotations

import torch
from pydantic import Field

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import masked_token_loss
from alambic.methods._ssl import cross_view_plan
from alambic.methods.base import MethodOutput
from alambic.methods.dino import DINO, DINOConfig, reduced_center
from alambic.models.heads import DEFAULT_TOKENS, EmbeddingNet, feature_path, tap_dim
from alambic.registry import METHODS

TOKENS = "token_out"


class IBOTConfig(DINOConfig):
    tokens: str | None = Field(None, description="tap path of the backbone's token sequence [B, N, D]; "
                                                 "None = the zoo default (vit: norm)")
    patch_weight: float = Field(1.0, ge=0, description="λ of the masked-token term (paper: 1)")
    patch_temperature: float = Field(0.04, gt=0, description="τ_t of the patch tokens (paper: 0.04 -> 0.07)")
    cls_weight: float = Field(1.0, ge=0, description="weight of the class-token DINO term (paper: 1)")


@METHODS.register("ibot")
class IBOT(DINO):
    """``cls_weight·L_[CLS] + patch_weight·L_MIM``: the student, given masked global views, predicts the EMA
    teacher's outputs on the unmasked views, for the class token across views and for each masked patch
    token within the same view.

    Needs a backbone with tokens (``student.arch: vit``) and masked views (``views.mask`` on the global
    group, ``teacher: unmasked``). The head is shared by the class token and the patch tokens (iBOT's
    default); the patch tokens have their own center (momentum ``center_momentum``). Tokens that are not
    patches (the class token at position 0) are dropped before the masked loss, whose mask comes from
    ``batch.extras["mask:<view>"]`` (True = masked for the student). Masking is in pixel space
    (:func:`alambic.data.views.apply_mask`): for a ViT whose patch equals the mask patch this is a fixed,
    not learned, mask embedding: a documented simplification of the paper's learnable ``[MASK]`` token.
    """

    paper = ('Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", 2022, arXiv:2111.07832, '
             'Eq. (1)-(2)')

    Config = IBOTConfig

    def __init__(self, config: IBOTConfig | None = None):
        super().__init__(config)
        self.register_buffer("patch_center", torch.zeros(1, self.config.out_dim))

    def use_views(self, names) -> None:
        self.student_views, self.teacher_views = cross_view_plan(names, "ibot", masked=True)

    def wrap_student(self, student, example, arch):
        cfg = self.config
        path = feature_path(arch, cfg.feature)
        tokens = cfg.tokens or DEFAULT_TOKENS.get(arch)
        if tokens is None:
            raise AlambicError(f"ibot needs a token sequence: model '{arch}' has none by default; set method.tokens")
        return EmbeddingNet(student, path, self.make_head(tap_dim(student, path, example)), tokens=tokens,
                            share_token_head=True)

    def student_taps(self) -> list[str]:
        return [TOKENS]

    def teacher_taps(self) -> list[str]:
        return [TOKENS]

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        cls, monitors = self.cls_loss(student, teacher, ctx)
        patch_losses, teacher_tokens = [], []
        for s_view, t_view in zip(self.student_views, self.teacher_views):
            mask = batch.extras.get(f"mask:{t_view}")
            if mask is None:
                raise AlambicError(f"ibot: the batch has no mask for view '{t_view}' (views.mask.views must list it)")
            s_tok, t_tok = student[s_view].features[TOKENS], teacher[t_view].features[TOKENS]
            if s_tok.shape[1] == mask.shape[1] + 1:  # a class token in front of the patches
                s_tok, t_tok = s_tok[:, 1:], t_tok[:, 1:]
            if s_tok.shape[1] != mask.shape[1]:
                raise ShapeMismatchError(f"ibot: {s_tok.shape[1]} tokens but the mask has {mask.shape[1]} patches: "
                                         f"views.mask.patch_size must equal the ViT's patch_size")
            patch_losses.append(masked_token_loss(s_tok, t_tok, mask, self.patch_center, cfg.student_temperature,
                                                  cfg.patch_temperature))
            teacher_tokens.append(t_tok.reshape(-1, t_tok.shape[-1]))
        patch = torch.stack(patch_losses).mean()
        if self.training:
            with torch.no_grad():
                new = reduced_center(self.patch_center, teacher_tokens, cfg.center_momentum)
                self.patch_center.copy_(new.reshape(self.patch_center.shape))
        loss = cfg.cls_weight * cls + cfg.patch_weight * patch
        return MethodOutput(loss, {"cls": (cfg.cls_weight * cls).detach(), "patch": (cfg.patch_weight * patch).detach()},
                            None, monitors)
