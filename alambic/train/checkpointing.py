"""``train.gradient_checkpointing``: a transformer student keeps only its blocks' inputs while training and
recomputes each block during the backward pass (Chen et al., "Training Deep Nets with Sublinear Memory Cost",
2016, arXiv:1604.06174). The gradients are the same (the same operations run again on the same inputs, with
the same dropout draws); the activation memory of the blocks falls from all their intermediates to one
tensor per block, for about one more forward pass of compute (benchmarks/gradient_checkpointing.py).

Two kinds of student have blocks to checkpoint:

- a transformers model (a language run's causal LM): its own ``gradient_checkpointing_enable`` with
  ``use_reentrant=False`` (``activation_checkpointing_enable``, its name since transformers 5), which
  checkpoints each decoder layer;
- alambic's ViT (``student.arch: vit``, :mod:`alambic.models.vit`): each block goes through
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

Non-reentrant checkpointing builds the autograd graph as usual and drops only the saved tensors, so a tap
inside a block (``blocks.0.attn.q`` of token-relation KD) still carries its gradient; its forward hooks fire
again during the recomputation, which is why the loop clears the student's taps after each backward.
Any other student is refused in one line naming its architecture: an MLP or a CNN has no block structure
that checkpointing would pay for here.
"""

from __future__ import annotations

import sys

from torch import nn

from alambic.errors import AlambicError
from alambic.models.vit import ViT


def enable_gradient_checkpointing(student: nn.Module) -> list[str]:
    """Turn on recomputation in every transformer inside ``student`` (the outermost one of each nesting);
    returns their module paths (``""``: the student itself). One line naming the architecture when there is none."""
    done: list[str] = []
    for path, module in student.named_modules():
        if any(d == "" or path.startswith(d + ".") for d in done):
            continue  # inside a model already handled
        if isinstance(module, ViT):
            module.gradient_checkpointing_enable()
            done.append(path)
        elif _is_transformers_model(module):
            if not getattr(module, "supports_gradient_checkpointing", False):
                raise AlambicError(f"train.gradient_checkpointing: the transformers model {type(module).__name__} "
                                   "does not support gradient checkpointing: set it to false")
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            done.append(path)
    if not done:
        raise AlambicError(f"train.gradient_checkpointing: the student ({architecture(student)}) has no transformer "
                           "blocks to checkpoint (supported: transformers causal LMs and student.arch: vit): set it "
                           "to false")
    return done


def architecture(student: nn.Module) -> str:
    """``MLP``, or ``EmbeddingNet(CNN)`` for a method's wrapper around a backbone: what an error names."""
    name = type(student).__name__
    inner = getattr(student, "backbone", None)
    return f"{name}({type(inner).__name__})" if isinstance(inner, nn.Module) else name


def _is_transformers_model(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: no transformers model can exist here
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return base is not None and isinstance(module, base)
