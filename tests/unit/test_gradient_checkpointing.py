"""train.gradient_checkpointing: the same gradients, each block really recomputed, other students refused.

Checkpointing recomputes a block's forward during the backward pass from its saved input, so the gradients
must equal those of the plain forward (on the CPU: bit for bit, dropout draws replayed), and each block must
run twice per training step (forward, recomputation) instead of once: counted with forward hooks, the
mechanism itself rather than a memory figure (benchmarks/gradient_checkpointing.py measures the memory).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alambic.errors import AlambicError
from alambic.models.vit import ViT
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train.checkpointing import enable_gradient_checkpointing
from tests.conftest import tiny_recipe


def _count_calls(modules) -> list[int]:
    """Calls of each module, counted as they start (a recomputation stops early, once it has rebuilt every
    tensor the backward needs, so a hook after the forward would not see it)."""
    calls = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _grads(model: torch.nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout draws of the forward (checkpointing replays them in the recomputation)
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_vit_gradients_are_unchanged_and_each_block_is_recomputed():
    torch.manual_seed(0)
    vit = ViT(1, (8, 8), 10, patch_size=4, dim=16, depth=3, heads=2, dropout=0.1).train()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss = lambda m: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    plain = _grads(vit, loss)
    calls = _count_calls(list(vit.blocks))
    assert enable_gradient_checkpointing(vit) == [""]
    checkpointed = _grads(vit, loss)
    _assert_same(plain, checkpointed)
    assert calls == [2, 2, 2]  # the forward and the recomputation in backward
    with torch.no_grad():  # evaluation keeps nothing for backward: nothing to recompute
        vit(x)
    assert calls == [3, 3, 3]


def test_tiny_llama_gradients_are_unchanged_and_each_layer_is_recomputed():
    transformers = pytest.importorskip("transformers")
    from alambic.models.causal_lm import TINY_LLAMA, CausalLMLogits

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": 50})
    net = CausalLMLogits(transformers.AutoModelForCausalLM.from_config(config)).train()
    ids = torch.randint(0, 50, (3, 12))
    loss = lambda m: torch.nn.functional.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # noqa: E731
    plain = _grads(net, loss)
    # transformers checkpoints each decoder layer's forward (its own hooks stay outside): count what it runs
    attention = [layer.self_attn for layer in net.lm.model.layers]
    calls = _count_calls(attention)
    assert enable_gradient_checkpointing(net) == ["lm"]
    checkpointed = _grads(net, loss)
    _assert_same(plain, checkpointed)
    assert calls == [2] * len(attention)


def test_a_vit_run_with_taps_inside_the_blocks_trains_the_same_weights(tmp_path):
    """token_relation taps the attention of each checkpointed block: the tapped q/k still carry gradients
    (non-reentrant checkpointing), so the run ends at the same weights as without checkpointing."""
    recipe = tiny_recipe(
        student={"arch": "vit", "patch_size": 4, "dim": 16, "depth": 2, "heads": 2, "dropout": 0.1},
        teacher={"model": {"arch": "vit", "patch_size": 4, "dim": 16, "depth": 2, "heads": 2}},
        method={"name": "token_relation", "student_taps": ["blocks.0.attn", "blocks.1.attn"],
                "teacher_taps": ["blocks.0.attn", "blocks.1.attn"], "num_heads": 2},
        train={"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5})
    run(load_recipe(recipe), tmp_path / "plain", progress=False)
    run(load_recipe(recipe, ["train.gradient_checkpointing=true"]), tmp_path / "ckpt", progress=False)
    a, b = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("plain", "ckpt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_student_without_transformer_blocks_is_refused_in_one_line(tmp_path):
    with pytest.raises(AlambicError) as info:
        run(load_recipe(tiny_recipe(), ["train.gradient_checkpointing=true"]), tmp_path / "r", progress=False)
    message = str(info.value)
    assert message.startswith("train.gradient_checkpointing: the student (MLP) has no transformer blocks")
    assert "\n" not in message


def test_a_run_resumed_with_checkpointing_switched_on_ends_at_the_uninterrupted_weights(tmp_path):
    """What a run that ran out of memory does: resume from its checkpoint with checkpointing on (the recipe
    check of --resume ignores the option, as it ignores the device)."""
    from tests.conftest import KillAt

    recipe = tiny_recipe(student={"arch": "vit", "patch_size": 4, "dim": 16, "depth": 2, "heads": 2,
                                  "dropout": 0.1},
                         train={"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5, "checkpoint_every": 4})
    run(load_recipe(recipe), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(recipe), tmp_path / "moved", progress=False, callbacks=[KillAt(10)])
    summary = run(load_recipe(recipe, ["train.gradient_checkpointing=true"]), tmp_path / "moved", resume=True,
                  progress=False)
    assert summary["train"]["resumed_from_step"] == 8
    a, b = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("straight", "moved"))
    assert all(torch.equal(a[k], b[k]) for k in a)
