"""Taps: capture intermediate outputs of an unmodified model by dotted module path.

``with Taps(model, ["body.act0"]) as taps: model(x); taps["body.act0"]`` registers forward hooks on the
named submodules and removes every one of them when the block exits (even on error), so a model leaves a
distillation run exactly as it entered. This is the torchdistill idea of hooks instead of rewritten
models, without its global state.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from alambic.errors import AlambicError


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model itself), with a clear error listing children."""
    module = model
    if not path:
        return module
    walked = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(walked) or "the model"
            known = ", ".join(children) or "none"
            raise AlambicError(f"tap '{path}': {where} has no submodule '{part}' (children: {known})")
        module = children[part]
        walked.append(part)
    return module


class Taps:
    """Forward hooks on named submodules; the captured outputs are read like a dict."""

    def __init__(self, model: nn.Module, paths: Iterable[str], detach: bool = False):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.detach = detach
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._modules = {p: resolve_module(model, p) for p in self.paths}  # fail before any hook exists

    def attach(self) -> "Taps":
        if self._handles:
            return self
        for path, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, path: str):
        def capture(_module: nn.Module, _inputs, output) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[path] = output.detach() if self.detach else output

        return capture

    def clear(self) -> None:
        self.outputs = {}

    def take(self) -> dict[str, Tensor]:
        """The outputs captured since the last ``take``; a missing one means the path was not run."""
        out, self.outputs = self.outputs, {}
        missing = [p for p in self.paths if p not in out]
        if missing:
            raise AlambicError(f"tap(s) {missing} captured nothing: the forward pass never ran those modules")
        return out

    def __getitem__(self, path: str) -> Tensor:
        return self.outputs[path]

    def __enter__(self) -> "Taps":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()
