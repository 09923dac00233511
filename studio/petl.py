"""Parameter-efficient transfer learning (PETL) on a frozen timm ViT: LoRA adapters that fuse back.

SLS (Han & Tang, ECCV 2024) prunes PETL-tuned models: a frozen pre-trained backbone, small trained adapters
and a trained head. The reference code uses Convpass adapters (a conv bottleneck beside each branch); here the
adapter is LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on the blocks'
``qkv`` / ``proj`` / ``fc1`` / ``fc2`` linears, for one reason: a trained LoRA update ``ΔW = s·B·A`` folds into
the frozen weight, so after training (and after an SLS cut and retraining) :func:`fuse_lora` returns a plain
timm model, and the export format stays plain timm safetensors. Convpass has a nonlinearity and a 3x3 conv on
the patch grid, so it cannot be folded; it is not implemented.

:class:`LoRALinear` *is* an ``nn.Linear`` (same ``weight``/``bias`` names, same ``in/out_features``), so timm's
``Attention``/``Mlp`` run unchanged, the feature bank's block hooks see the adapted block outputs, and depth
cuts (:func:`studio.surgery.apply_plan` with dense kept blocks) work on adapted models. Width pruning of an
adapted linear is refused by :func:`check_unfused`: fuse first.

Training: ``studio.train.fit(model, ..., TrainSpec(trainable=ADAPTER_TRAINABLE))`` trains adapters + head only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import StudioError
from .families import mlp_layout
from .train import TrainSpec, fit

TARGETS = ("qkv", "proj", "fc1", "fc2")
#: ``TrainSpec.trainable`` rule for PETL: adapters and the classifier (the backbone stays frozen).
ADAPTER_TRAINABLE = r"re:(^|\.)lora_[AB]$|^(head|head_dist|fc_norm)\."


@dataclass(frozen=True)
class LoRASpec:
    """Where and how big the adapters are.

    Attributes:
        rank: the rank r of ``ΔW = (alpha / r)·B·A``.
        alpha: scaling numerator (the update is scaled by ``alpha / rank``).
        targets: which linears of every block get an adapter (``qkv``, ``proj``, ``fc1``, ``fc2``).
        dropout: dropout on the adapter's input during training.
        blocks: indices of the adapted blocks (None: all).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("qkv", "fc1", "fc2")
    dropout: float = 0.0
    blocks: tuple[int, ...] | None = None

    def validate(self) -> LoRASpec:
        if self.rank < 1:
            raise StudioError(f"LoRA rank must be at least 1, got {self.rank}.")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise StudioError(f"LoRA target '{bad[0] if bad else ''}' is unknown: use {', '.join(TARGETS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise StudioError(f"LoRA dropout must lie in [0, 1), got {self.dropout}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        return d


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = x Wᵀ + b + s·drop(x) Aᵀ Bᵀ``.

    ``B`` starts at zero, so a freshly adapted model computes exactly what the base model computes.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(self.lora_dropout(x), self.lora_A), self.lora_B
        )

    def delta(self) -> torch.Tensor:
        """The update ``s·B·A`` as a weight matrix."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def fused(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (weights ``W + s·B·A``)."""
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _block_linears(model: nn.Module, targets: Sequence[str], blocks: Sequence[int] | None):
    all_blocks = list(model.blocks)  # type: ignore[attr-defined]
    idx = range(len(all_blocks)) if blocks is None else blocks
    for i in idx:
        if not 0 <= i < len(all_blocks):
            raise StudioError(f"LoRA block {i} is out of range 0..{len(all_blocks) - 1}.")
        blk = all_blocks[i]
        for t in targets:
            parent = blk.attn if t in ("qkv", "proj") else blk.mlp
            # "fc1" is the MLP's input linears: one in timm's Mlp and a packed GLU, fc1_g and fc1_x in a SwiGLU
            names = mlp_layout(parent).names(parent) if t == "fc1" else [t]
            for name in names:
                yield i, name, parent, getattr(parent, name)


def add_lora(model: nn.Module, spec: LoRASpec | None = None) -> list[str]:
    """Wrap the target linears of ``model`` (in place) with LoRA adapters; return the adapted module names.

    Linears that already carry an adapter are left as they are. The base weights are frozen here; choose what
    else trains with ``TrainSpec.trainable`` (:data:`ADAPTER_TRAINABLE` for adapters + head).
    """
    spec = (spec or LoRASpec()).validate()
    if not hasattr(model, "blocks"):
        raise StudioError("LoRA adapters need a timm VisionTransformer (a model with .blocks).")
    names = []
    for i, t, parent, lin in _block_linears(model, spec.targets, spec.blocks):
        if isinstance(lin, LoRALinear):
            continue
        if type(lin) is not nn.Linear:
            raise StudioError(f"blocks.{i}.{t} is a {type(lin).__name__}, not a Linear; cannot add LoRA.")
        setattr(parent, t, LoRALinear(lin, spec.rank, spec.alpha, spec.dropout))
        names.append(f"blocks.{i}.{'attn' if t in ('qkv', 'proj') else 'mlp'}.{t}")
    for name, p in model.named_parameters():
        if not name.rsplit(".", 1)[-1].startswith("lora_"):
            p.requires_grad_(False)
    return names


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameters(model: nn.Module) -> int:
    """Number of adapter parameters."""
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))


@torch.no_grad()
def fuse_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its linear (in place) so the model is plain timm again; return it."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.fused())
    return model


def check_unfused(model: nn.Module) -> None:
    """Refuse width surgery on adapted linears (their adapters would not be sliced)."""
    if has_lora(model):
        raise StudioError(
            "This model carries LoRA adapters; fuse them first (studio.petl.fuse_lora) before pruning widths. "
            "Depth cuts (SLS) work on adapted models directly."
        )


def petl_finetune(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    lora: LoRASpec | None = None,
    spec: Any = None,
    *,
    callbacks: Sequence[Any] = (),
    cancel: Any = None,
) -> Any:
    """Add LoRA adapters to ``model`` (in place) and train adapters + head with :func:`studio.train.fit`.

    Args:
        spec: a ``TrainSpec``; its ``trainable`` is replaced by :data:`ADAPTER_TRAINABLE`. Default: the SLS
            recipe (AdamW 1e-3, wd 1e-4, cosine with 10 warm-up epochs to 1e-5, 100 epochs, batch 64).
    Returns:
        The :class:`~studio.train.TrainResult`.
    """
    from dataclasses import replace

    spec = spec or TrainSpec(epochs=100, lr=1e-3, weight_decay=1e-4, warmup_epochs=10, min_lr=1e-5)
    add_lora(model, lora)
    return fit(
        model,
        train_data,
        val_data,
        replace(spec, trainable=ADAPTER_TRAINABLE),
        callbacks=callbacks,
        cancel=cancel,
    )
