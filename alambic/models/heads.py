"""Heads that self-supervised methods put on a backbone, and the network that carries them.

Self-supervised distillation trains a *backbone* through a projection head (DINO, iBOT, SwAV, BYOL);
the EMA teacher averages backbone and head together ("its heads included"), and after training the head
is thrown away and the backbone's representation is what a probe or a downstream task uses.
:class:`EmbeddingNet` is that pair as one ``nn.Module``: the trainer trains it, an
:class:`~alambic.teachers.ema.EmaTeacher` deep-copies it, and the run deploys ``net.backbone``.

The backbone is any network of the zoo or the user's own; its representation is read by a tap (a dotted
module path, :mod:`alambic.models.taps`) so no model has to be rewritten: ``body`` for ``mlp`` (the last
hidden activation), ``pool`` for ``cnn`` and ``vit``. Hooks are registered for one forward pass and
removed, so a deep copy of the network carries no hook pointing back at the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.models.taps import Taps, resolve_module

DEFAULT_FEATURES = {"mlp": "body", "cnn": "pool", "vit": "pool", "pointnet": "pool"}
"""The representation of each zoo architecture: the input of its classifier ``head``."""

DEFAULT_TOKENS = {"vit": "norm"}
"""The token sequence [B, N, dim] of each zoo architecture that has one (after the final LayerNorm)."""


def feature_path(arch: str, given: str | None) -> str:
    """The tap path of the representation: ``given``, or the default of a zoo ``arch``."""
    if given:
        return given
    if arch not in DEFAULT_FEATURES:
        raise AlambicError(
            f"no default representation for model '{arch}': set the method's `feature` to the dotted path "
            f"of the layer to read (the input of its classifier)"
        )
    return DEFAULT_FEATURES[arch]


class DINOHead(nn.Module):
    """MLP (``layers`` Linear layers, GELU) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer without bias to ``out_dim`` prototypes.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), 2021,
    arXiv:2104.14294, §3.1 and App. (projection head: 3 layers, hidden 2048, bottleneck 256, K = 65,536;
    the last layer's weight norm frozen at 1; BatchNorm after the hidden layers is the code's ``use_bn``
    option, the default for its ResNet-50 runs). Freezing the norm at 1 makes the last layer a cosine
    classifier, ``F.linear(z, W / ‖W_k‖)``, which is what is written here.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, bottleneck: int = 64, layers: int = 3,
                 batchnorm: bool = False):
        super().__init__()
        if layers < 1:
            raise AlambicError(f"DINOHead: layers must be >= 1, got {layers}")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                if batchnorm:
                    mlp.append(nn.BatchNorm1d(dims[i + 1]))
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:  # tokens [B, N, D]: per token (BatchNorm over batch and tokens together)
            b, n, d = x.shape
            return self.forward(x.reshape(b * n, d)).reshape(b, n, -1)
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class MLPHead(nn.Module):
    """Linear, BatchNorm, ReLU, Linear: BYOL's projector and predictor.

    Grill et al., "Bootstrap your own latent", 2020, arXiv:2006.07733, §3.3 (hidden 4096, output 256).
    BatchNorm over a [B, N, D] token input is applied per token (the batch and token axes are merged).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, batchnorm: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(),
                                 nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            b, n, d = x.shape
            return self.net(x.reshape(b * n, d)).reshape(b, n, -1)
        return self.net(x)


class EmbeddingNet(nn.Module):
    """A backbone and a head on its representation; optionally a head on its tokens.

    ``forward(x)`` returns ``head(representation)`` [B, K]. With ``tokens`` (a tap path of a [B, N, D]
    token sequence, such as ``norm`` of the ViT) the token head's output [B, N, K'] goes through the
    identity submodule ``token_out``, where a method taps it (masked-token distillation). The
    representation itself passes through ``feature_out`` (tap it to read the backbone's embedding, as SEED
    and the probes do). ``share_token_head`` uses ``head`` for the tokens too (iBOT shares it).
    """

    def __init__(self, backbone: nn.Module, feature: str, head: nn.Module, tokens: str | None = None,
                 token_head: nn.Module | None = None, share_token_head: bool = False):
        super().__init__()
        resolve_module(backbone, feature)  # fail now, with the list of children, on a wrong path
        if tokens is not None:
            resolve_module(backbone, tokens)
        self.backbone, self.head = backbone, head
        self.feature, self.tokens = feature, tokens
        self.share_token_head = share_token_head
        self.token_head = None if share_token_head or tokens is None else token_head
        if tokens is not None and not share_token_head and token_head is None:
            raise AlambicError("EmbeddingNet: tokens given without a token_head (or share_token_head=True)")
        self.feature_out = nn.Identity()
        self.token_out = nn.Identity()

    def representation(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The backbone's representation [B, D] (flattened) and, if configured, its tokens [B, N, D]."""
        paths = [self.feature] + ([self.tokens] if self.tokens is not None else [])
        with Taps(self.backbone, paths) as taps:
            self.backbone(x)
            feat = taps[self.feature]
            toks = taps[self.tokens] if self.tokens is not None else None
        return feat.flatten(1), toks

    def forward(self, x: Tensor) -> Tensor:
        feat, toks = self.representation(x)
        out = self.head(self.feature_out(feat))
        if toks is not None:
            head = self.head if self.share_token_head else self.token_head
            self.token_out(head(toks))
        return out


@torch.no_grad()
def output_dim(module: nn.Module, example: Tensor) -> int:
    """Width of ``module``'s flattened output on ``example`` (eval mode, restored afterwards)."""
    was = module.training
    module.eval()
    try:
        return int(module(example).flatten(1).shape[1])
    finally:
        module.train(was)


@torch.no_grad()
def tap_dim(module: nn.Module, path: str, example: Tensor) -> int:
    """Width of the flattened output of the submodule at ``path`` on ``example`` (last dim for tokens)."""
    was = module.training
    module.eval()
    try:
        with Taps(module, [path]) as taps:
            module(example)
            out = taps[path]
        return int(out.shape[-1]) if out.ndim == 3 else int(out.flatten(1).shape[1])
    finally:
        module.train(was)


class Representation(nn.Module):
    """A network's representation as its output: ``forward(x)`` = the flattened output of the submodule at
    ``feature`` (what a self-supervised run deploys and exports: its classifier, if any, was never trained)."""

    def __init__(self, model: nn.Module, feature: str):
        super().__init__()
        resolve_module(model, feature)
        self.model, self.feature = model, feature

    def forward(self, x: Tensor) -> Tensor:
        with Taps(self.model, [self.feature]) as taps:
            self.model(x)
            return taps[self.feature].flatten(1)
