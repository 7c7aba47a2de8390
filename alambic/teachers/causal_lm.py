"""A causal language model as a frozen teacher: eval mode, no gradients, its tokenizer in its fingerprint."""

from __future__ import annotations

from typing import Any

from torch import nn

from alambic.models.causal_lm import CausalLMLogits, tokenizer_fingerprint
from alambic.teachers.frozen import FrozenTeacher, state_fingerprint


class CausalLMTeacher(FrozenTeacher):
    """A transformers causal LM behind :class:`CausalLMLogits` (token ids -> next-token logits), frozen as
    every :class:`FrozenTeacher` is. Its fingerprint covers the weights and the tokenizer (the same weights
    under another tokenizer teach other text), so ``--resume`` and caches refuse a changed one."""

    def __init__(self, model: nn.Module, tokenizer: Any, source: str = "", shard: str = "none"):
        super().__init__(CausalLMLogits(model), shard=shard)
        self.tokenizer, self.source = tokenizer, source

    @property
    def lm(self) -> nn.Module:
        """The transformers model itself (for generation)."""
        return self.model.lm

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.model, tokenizer_fingerprint(self.tokenizer))
        return self._fingerprint
