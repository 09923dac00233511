"""Parameter-efficient transfer learning (PETL) on a frozen timm ViT: LoRA adapters that fuse back, and Convpass.

SLS (Han & Tang, ECCV 2024) prunes PETL-tuned models: a frozen pre-trained backbone, small trained adapters
and a trained head. Two adapters are offered:

- **Convpass** (Jie & Deng, "Convolutional Bypasses Are Better Vision Transformer Adapters", 2022), the adapter
  of the SLS reference code: a bottleneck with a 3x3 conv on the patch grid beside attention and beside the MLP of
  every block, both reading the block's LayerNorm output, ``x + attn(n₁x) + s·C(n₁x)``. It has a nonlinearity and
  a conv, so it cannot be folded into the backbone: an export keeps its modules and the manifest records it
  (``adapter``), from which the reload rebuilds it (:func:`adapter_of`, :func:`attach_adapter`).
- **LoRA** (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on the blocks' ``qkv`` /
  ``proj`` / ``fc1`` / ``fc2`` linears: a trained update ``ΔW = s·B·A`` folds into the frozen weight, so after
  training (and after an SLS cut and retraining) :func:`fuse_lora` returns a plain timm model.

:class:`LoRALinear` *is* an ``nn.Linear`` (same ``weight``/``bias`` names, same ``in/out_features``), so timm's
``Attention``/``Mlp`` run unchanged, the feature bank's block hooks see the adapted block outputs, and depth
cuts (:func:`studio.surgery.apply_plan` with dense kept blocks) work on adapted models. Width pruning of an
adapted linear is refused by :func:`check_unfused`: fuse first.

Training: ``studio.train.fit(model, ..., TrainSpec(trainable=ADAPTER_TRAINABLE))`` trains adapters + head only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from .errors import StudioError
from .families import mlp_layout
from .train import TrainSpec, fit

TARGETS = ("qkv", "proj", "fc1", "fc2")
#: ``TrainSpec.trainable`` rule for PETL: adapters and the classifier (the backbone stays frozen), as the SLS
#: reference trains every parameter named ``adapter`` or ``head``.
ADAPTER_TRAINABLE = r"re:(^|\.)lora_[AB]$|(^|\.)adapter_(attn|mlp)\.|^(head|head_dist|fc_norm)\."


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


def width_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s widths cannot be pruned (its adapters would not be sliced), or None."""
    if has_lora(model):
        return (
            "This model carries LoRA adapters; fuse them first (studio.petl.fuse_lora) before pruning widths. "
            "Depth cuts (SLS) work on adapted models directly."
        )
    if has_convpass(model):
        return (
            "This model carries Convpass adapters, which read and write every embedding channel and cannot be "
            "folded: prune its depth (SLS), or prune the backbone before adapting it."
        )
    return None


def check_unfused(model: nn.Module) -> None:
    """Refuse width surgery on adapted models (their adapters would not be sliced)."""
    if (why := width_refusal(model)) is not None:
        raise StudioError(why)


def petl_finetune(
    model: nn.Module,
    train_data: Any,
    val_data: Any,
    adapter: LoRASpec | ConvpassSpec | None = None,
    spec: Any = None,
    *,
    callbacks: Sequence[Any] = (),
    cancel: Any = None,
) -> Any:
    """Add adapters to ``model`` (in place; LoRA unless ``adapter`` is a :class:`ConvpassSpec`) and train
    adapters + head with :func:`studio.train.fit`.

    Args:
        spec: a ``TrainSpec``; its ``trainable`` is replaced by :data:`ADAPTER_TRAINABLE`. Default: the SLS
            recipe (AdamW 1e-3, wd 1e-4, cosine with 10 warm-up epochs to 1e-5, 100 epochs, batch 64).
    Returns:
        The :class:`~studio.train.TrainResult`.
    """
    from dataclasses import replace

    spec = spec or TrainSpec(epochs=100, lr=1e-3, weight_decay=1e-4, warmup_epochs=10, min_lr=1e-5)
    if isinstance(adapter, ConvpassSpec):
        add_convpass(model, adapter)
    else:
        add_lora(model, adapter)
    return fit(
        model,
        train_data,
        val_data,
        replace(spec, trainable=ADAPTER_TRAINABLE),
        callbacks=callbacks,
        cancel=cancel,
    )


# ------------------------------------------------------------------------------------------------ Convpass
@dataclass(frozen=True)
class ConvpassSpec:
    """Convpass adapters on every block (the SLS reference's defaults; its EuroSAT config sets ``scale`` 10).

    Attributes:
        dim: the bottleneck width (8 in the paper).
        scale: ``s``, the bypasses' output scale (set per dataset in the reference, 0.01 to 100).
        dropout: dropout before the up-projection during training (0.1).
        xavier_init: Xavier-initialise the conv instead of the identity.
    """

    dim: int = 8
    scale: float = 10.0
    dropout: float = 0.1
    xavier_init: bool = False

    def validate(self) -> ConvpassSpec:
        if isinstance(self.dim, bool) or int(self.dim) < 1:
            raise StudioError(f"The Convpass width must be at least 1, got {self.dim}.")
        if not math.isfinite(float(self.scale)) or float(self.scale) <= 0:
            raise StudioError(f"The Convpass scale must be a positive number, got {self.scale}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise StudioError(f"The Convpass dropout must lie in [0, 1), got {self.dropout}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "convpass", **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvpassSpec:
        if d.get("kind", "convpass") != "convpass":
            raise StudioError(
                f"Unknown adapter kind {d.get('kind')!r}: the studio exports Convpass adapters."
            )
        return cls(
            dim=int(d.get("dim", 8)),
            scale=float(d.get("scale", 10.0)),
            dropout=float(d.get("dropout", 0.1)),
            xavier_init=bool(d.get("xavier_init", False)),
        ).validate()


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # QuickGELU, the activation of the Convpass reference


class Convpass(nn.Module):
    """One convolutional bypass: Linear D→dim, QuickGELU, 3x3 conv over the patch grid, QuickGELU, dropout,
    Linear dim→D. Each prefix token (class, register, distillation) goes through the same conv as a 1x1 image
    (only the kernel's centre sees it), as the reference treats the class token.

    The up-projection starts at zero, so a freshly adapted model computes what the backbone computes.
    """

    def __init__(self, embed_dim: int, spec: ConvpassSpec, grid: tuple[int, int], prefix: int) -> None:
        super().__init__()
        d = int(spec.dim)
        self.grid, self.prefix = (int(grid[0]), int(grid[1])), int(prefix)
        self.adapter_down = nn.Linear(embed_dim, d)
        self.adapter_conv = nn.Conv2d(d, d, 3, padding=1)
        self.adapter_up = nn.Linear(d, embed_dim)
        self.dropout = nn.Dropout(spec.dropout)
        nn.init.xavier_uniform_(self.adapter_down.weight)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        nn.init.zeros_(self.adapter_conv.bias)
        if spec.xavier_init:
            nn.init.xavier_uniform_(self.adapter_conv.weight)
        else:  # the identity: the conv passes the bottleneck features through at the start
            with torch.no_grad():
                self.adapter_conv.weight.zero_()
                self.adapter_conv.weight[:, :, 1, 1] = torch.eye(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        gh, gw = self.grid
        p = self.prefix
        if p + gh * gw != N:
            raise StudioError(
                f"Convpass was built for {p} prefix tokens and a {gh}x{gw} patch grid, but got {N} tokens: "
                "run the model at the input size it was adapted at."
            )
        h = _quick_gelu(self.adapter_down(x))
        c = h.shape[-1]
        grid = self.adapter_conv(h[:, p:].transpose(1, 2).reshape(B, c, gh, gw)).flatten(2).transpose(1, 2)
        parts = [grid]
        if p:
            tokens = self.adapter_conv(h[:, :p].reshape(B * p, 1, 1, c).permute(0, 3, 1, 2))
            parts.insert(0, tokens.reshape(B, p, c))
        h = self.dropout(_quick_gelu(torch.cat(parts, dim=1)))
        return self.adapter_up(h)


class ConvpassBlock(Block):
    """timm's ``Block`` with a Convpass bypass beside attention and beside the MLP, both reading the block's
    LayerNorm output (each branch with its own drop-path draw, as the reference):
    ``x + attn(n₁x) + s·C_attn(n₁x)``, then ``x + mlp(n₂x) + s·C_mlp(n₂x)``."""

    adapter_attn: Convpass
    adapter_mlp: Convpass
    convpass: ConvpassSpec

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        s = float(self.convpass.scale)
        h = self.norm1(x)
        a = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(a)) + self.drop_path1(self.adapter_attn(h)) * s
        h = self.norm2(x)
        return x + self.drop_path2(self.ls2(self.mlp(h))) + self.drop_path2(self.adapter_mlp(h)) * s


def add_convpass(model: nn.Module, spec: ConvpassSpec | None = None) -> int:
    """Give every block of ``model`` Convpass bypasses (in place; blocks that have them are left as they are);
    freeze everything but the adapters; return the number of adapted blocks.

    Refused (one sentence) for blocks other than timm's ``Block`` and for models carrying LoRA.
    """
    spec = (spec or ConvpassSpec()).validate()
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise StudioError("Convpass adapters need a timm VisionTransformer (a model with .blocks).")
    if has_lora(model):
        raise StudioError(
            "This model carries LoRA adapters; fuse them (studio.petl.fuse_lora) before Convpass."
        )
    grid = tuple(model.patch_embed.grid_size)  # type: ignore[union-attr]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    dim = int(model.embed_dim)  # type: ignore[arg-type]
    ref = next(model.parameters())
    added = 0
    for i, blk in enumerate(model.blocks):  # type: ignore[union-attr]
        if isinstance(blk, ConvpassBlock):
            continue
        if type(blk) is not Block:
            raise StudioError(
                f"Block {i} is a {type(blk).__name__}; Convpass adapters go beside timm's pre-norm Block only."
            )
        blk.__class__ = ConvpassBlock  # the same module with the bypasses added: names and weights stay
        blk.convpass = spec
        for name in ("adapter_attn", "adapter_mlp"):
            setattr(blk, name, Convpass(dim, spec, grid, prefix).to(ref.device, ref.dtype))  # type: ignore[arg-type]
        added += 1
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter_" in f".{name}")
    return added


def has_convpass(model: nn.Module) -> bool:
    return any(isinstance(m, ConvpassBlock) for m in model.modules())


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries PETL adapters of either kind."""
    return has_lora(model) or has_convpass(model)


def adapter_of(model: nn.Module) -> dict[str, Any] | None:
    """What an export's manifest records as ``adapter``: the Convpass spec, or None (LoRA is fused before export,
    so an exported model never carries it)."""
    blocks = [m for m in model.modules() if isinstance(m, ConvpassBlock)]
    if not blocks:
        return None
    if len(blocks) != len(model.blocks):  # type: ignore[arg-type]
        raise StudioError("Only some blocks carry Convpass adapters; the studio exports all or none.")
    return blocks[0].convpass.to_dict()


def attach_adapter(model: nn.Module, adapter: Mapping[str, Any] | None) -> nn.Module:
    """Rebuild what a manifest's ``adapter`` describes on a freshly built model (in place); return it."""
    if adapter:
        add_convpass(model, ConvpassSpec.from_dict(adapter))
    return model


def deployable(model: nn.Module) -> nn.Module:
    """The form a model is measured and deployed in: a copy with LoRA folded in (Convpass cannot be folded and
    stays), or the model itself without LoRA."""
    return fuse_lora(copy.deepcopy(model)) if has_lora(model) else model
