"""SPLoRA layers: a frozen weight plus a trainable low-rank adapter, with channel masks on the adapted weight.

Implements the channel-based Structured Pruning Low-rank Adapter of Hedegaard et al., "Structured Pruning
Adapters" (arXiv 2211.10155) for timm ViTs. Every target ``nn.Linear`` of a block (``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``) becomes :class:`SPLoRALinear`::

    W_task = diag(m_out) · (W0 + B·A) · diag(m_in),    b_task = b ⊙ m_out

with ``W0`` frozen (shared by every task), ``A ∈ R^{r×d_in}`` initialised like ``nn.Linear`` (Kaiming-uniform,
a=√5, i.e. U(±1/√d_in)), ``B ∈ R^{d_out×r}`` ~ U(±init_range) (1e-3 as in the paper's experiments, 1e-4 as in its
library), no α/r scaling (unlike LoRA), and a trainable bias. So at initialisation ``|W − W0| ≤ init_range ·
Σ_k |A_kj| ≤ init_range · r / √d_in`` — close to, but not exactly, the backbone. The classifier stays a plain
trainable ``nn.Linear``. Rank ``0`` with a trainable ``W0`` is plain fine-tuning through the same masked layer (the
paper's fine-pruning baseline).

Masks are applied in ``forward`` (not once, as in the paper's CNN code, whose pruned filters could regrow during
recovery), and :meth:`SPLoRALinear.zero_pruned_` also zeroes the pruned rows/columns of ``A``, ``B`` and the bias.
Residual-stream (embedding) channels are masked where the stream is created (``norm_pre``) and where blocks write
it (``proj``/``fc2`` rows); LayerNorms reading the stream become :class:`MaskedNorm`, whose statistics cover the
kept channels only — so the masked model computes exactly what the physically pruned model computes.

The learned parameters per task are counted as in the paper: ``r·(|m_in| + |m_out|) + |m_out|`` per adapted layer
(``A[:, m_in]``, ``B[m_out, :]``, ``b[m_out]``; the masks are bits, not parameters), plus the kept channels of the
norms and the classifier.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import StudioError

TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
DEFAULT_INIT_RANGE = 1e-3


def resolve_rank(rank: float, d_out: int) -> int:
    """An int rank, or a fraction ``0 < rank < 1`` of ``d_out`` (rounded, at least 1); 0 means no adapter."""
    if rank < 0 or (rank >= 1 and rank != int(rank)):
        raise StudioError(
            f"Adapter rank must be a non-negative integer or a fraction in (0, 1) of the output width, got {rank}."
        )
    if 0 < rank < 1:
        return max(1, round(rank * d_out))
    return int(rank)


class SPLoRALinear(nn.Module):
    """``y = m_out ⊙ ((x ⊙ m_in) W0ᵀ + b + ((x ⊙ m_in) Aᵀ) Bᵀ)`` — a masked low-rank-adapted linear layer.

    Attributes:
        weight: ``W0``, frozen unless ``train_base`` (fine-pruning).
        bias: trainable bias (only if the wrapped layer had one, so fused weights keep timm's state-dict keys).
        lora_A, lora_B: the adapter (absent for rank 0).
        mask_in, mask_out: 0/1 float buffers, or None when every channel is kept.
    """

    mask_in: torch.Tensor | None
    mask_out: torch.Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        rank: float = 8,
        init_range: float = DEFAULT_INIT_RANGE,
        *,
        train_base: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if init_range < 0:
            raise StudioError(f"Adapter init range must be >= 0, got {init_range}.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight
        self.train_base = train_base
        self.weight = nn.Parameter(w.detach().clone(), requires_grad=train_base)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.rank = resolve_rank(rank, self.out_features)
        self.init_range = float(init_range)
        if self.rank:
            a = torch.empty(self.rank, self.in_features, dtype=w.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.empty(self.out_features, self.rank, dtype=w.dtype)
            nn.init.uniform_(b, -self.init_range, self.init_range, generator=generator)
            self.lora_A = nn.Parameter(a.to(w.device))
            self.lora_B = nn.Parameter(b.to(w.device))
        else:
            self.lora_A = self.lora_B = None
        self.register_buffer("mask_in", None)
        self.register_buffer("mask_out", None)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"base={'trainable' if self.train_base else 'frozen'}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask_in is not None:
            x = x * self.mask_in
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None and self.lora_B is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)  # B(Ax): cheap gradients, never forms BA
        if self.mask_out is not None:
            y = y * self.mask_out
        return y

    def set_masks(self, mask_in: torch.Tensor | None, mask_out: torch.Tensor | None) -> None:
        """Set 0/1 masks (bool or float; None keeps all); an all-ones mask is stored as None."""
        dev, dt = self.weight.device, self.weight.dtype
        self.mask_in = _as_mask(mask_in, self.in_features, dev, dt)
        self.mask_out = _as_mask(mask_out, self.out_features, dev, dt)

    def kept_in(self) -> torch.Tensor:
        return _kept(self.mask_in, self.in_features, self.weight.device)

    def kept_out(self) -> torch.Tensor:
        return _kept(self.mask_out, self.out_features, self.weight.device)

    @torch.no_grad()
    def adapted_weight(self) -> torch.Tensor:
        """``diag(m_out)(W0 + BA)diag(m_in)``, detached."""
        w = self.weight.detach().clone()
        if self.lora_A is not None and self.lora_B is not None:
            w += self.lora_B.detach() @ self.lora_A.detach()
        if self.mask_out is not None:
            w *= self.mask_out[:, None]
        if self.mask_in is not None:
            w *= self.mask_in[None, :]
        return w

    @torch.no_grad()
    def adapted_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.detach().clone()
        return b * self.mask_out if self.mask_out is not None else b

    @torch.no_grad()
    def zero_pruned_(self) -> None:
        """Zero what the masks drop: pruned rows of ``B`` and the bias, pruned columns of ``A``; and ``W0``'s
        pruned rows/columns when ``W0`` is trained (fine-pruning). A frozen ``W0`` is shared and left alone."""
        train_base = self.train_base
        if self.mask_out is not None:
            keep = self.mask_out
            if self.lora_B is not None:
                self.lora_B.mul_(keep[:, None])
            if self.bias is not None:
                self.bias.mul_(keep)
            if train_base:
                self.weight.mul_(keep[:, None])
        if self.mask_in is not None:
            keep = self.mask_in
            if self.lora_A is not None:
                self.lora_A.mul_(keep[None, :])
            if train_base:
                self.weight.mul_(keep[None, :])

    def learned_params(self) -> int:
        """The paper's per-task count ``r·(|m_in| + |m_out|) + |m_out|`` (bias only if the layer has one)."""
        n_in, n_out = len(self.kept_in()), len(self.kept_out())
        return self.rank * (n_in + n_out) + (n_out if self.bias is not None else 0)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the masked adapted weight and bias (what inference needs)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin = lin.to(device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.adapted_weight())
        if self.bias is not None:
            lin.bias.copy_(self.adapted_bias())
        return lin


class MaskedNorm(nn.Module):
    """A norm that sees only the kept residual channels and outputs zeros on the others.

    With ``mask=None`` it is the wrapped norm. With a mask, a LayerNorm's mean and variance are taken over the kept
    channels only (what the same LayerNorm sliced to those channels computes); an ``nn.Identity`` (timm's
    ``norm_pre``) just zeroes the dropped channels, which is how the residual stream is masked where it is created.
    """

    mask: torch.Tensor | None

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        if not isinstance(norm, nn.LayerNorm | nn.Identity):
            raise StudioError(
                f"SPLoRA masks residual channels through LayerNorms; this model uses {type(norm).__name__}. "
                "Drop 'embed' from the pruning scope."
            )
        self.norm = norm
        self.register_buffer("mask", None)

    def set_mask(self, mask: torch.Tensor | None, width: int) -> None:
        ref = next(iter(self.norm.parameters()), None)
        dev = ref.device if ref is not None else (mask.device if mask is not None else torch.device("cpu"))
        self.mask = _as_mask(mask, width, dev, torch.float32 if ref is None else ref.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if m is None:
            return self.norm(x)
        if isinstance(self.norm, nn.Identity):
            return x * m
        k = m.sum()
        mean = (x * m).sum(-1, keepdim=True) / k
        xc = (x - mean) * m
        var = xc.pow(2).sum(-1, keepdim=True) / k
        y = xc * torch.rsqrt(var + self.norm.eps)
        if self.norm.weight is not None:
            y = y * self.norm.weight
        if self.norm.bias is not None:
            y = y + self.norm.bias
        return y * m


def _as_mask(
    mask: torch.Tensor | None, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask).to(device=device).flatten()
    if m.numel() != n:
        raise StudioError(f"A channel mask has {m.numel()} entries for a layer of width {n}.")
    m = (m != 0).to(dtype)
    if not bool(m.any()):
        raise StudioError("A channel mask keeps no channel; keep at least one per layer.")
    return None if bool(m.all()) else m


def _kept(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.arange(n, device=device)
    return torch.nonzero(mask, as_tuple=False).flatten()


# -------------------------------------------------------------------------------------------- the model
def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


STREAM_NORMS = ("norm_pre", "patch_embed.norm", "norm", "fc_norm")


def apply_splora(
    model: nn.Module,
    rank: float = 8,
    init_range: float = DEFAULT_INIT_RANGE,
    *,
    train_base: bool = False,
    seed: int = 0,
) -> nn.Module:
    """Wrap every block's ``qkv``/``proj``/``fc1``/``fc2`` in :class:`SPLoRALinear` and every LayerNorm that reads
    the residual stream (plus ``norm_pre``) in :class:`MaskedNorm`, **in place**; return the model.

    ``rank=0, train_base=True`` gives the fine-pruning baseline through the same layers. Adapters are drawn from a
    generator seeded with ``seed``, so two calls build the same adapters.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise StudioError("SPLoRA needs a timm VisionTransformer (a model with `blocks`).")
    if any(isinstance(m, SPLoRALinear) for m in model.modules()):
        raise StudioError("This model already has SPLoRA adapters; fuse them first (fuse_splora).")
    gen = torch.Generator().manual_seed(seed)
    for blk in blocks:
        for path in TARGETS:
            lin = _get(blk, path)
            if not isinstance(lin, nn.Linear):
                raise StudioError(f"Block layer '{path}' is a {type(lin).__name__}, not nn.Linear.")
            _set(blk, path, SPLoRALinear(lin, rank, init_range, train_base=train_base, generator=gen))
        for name in ("norm1", "norm2"):
            setattr(blk, name, MaskedNorm(getattr(blk, name)))
    for path in STREAM_NORMS:
        norm = _get(model, path) if _has(model, path) else None
        if norm is not None and (path == "norm_pre" or not isinstance(norm, nn.Identity)):
            _set(model, path, MaskedNorm(norm))
    return model


def _has(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
    except AttributeError:
        return False
    return True


def splora_layers(model: nn.Module) -> Iterator[tuple[str, SPLoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, SPLoRALinear):
            yield name, m


def masked_norms(model: nn.Module) -> Iterator[tuple[str, MaskedNorm]]:
    for name, m in model.named_modules():
        if isinstance(m, MaskedNorm):
            yield name, m


@torch.no_grad()
def fuse_splora(model: nn.Module) -> nn.Module:
    """Replace every :class:`SPLoRALinear` by its fused ``nn.Linear`` and unwrap every :class:`MaskedNorm`, in place.

    The result is a plain timm model with the masked channels zeroed (the surgery then removes them exactly).
    """
    for name, layer in list(splora_layers(model)):
        _set(model, name, layer.fuse())
    for name, norm in list(masked_norms(model)):
        _set(model, name, norm.norm)
    return model


@torch.no_grad()
def zero_pruned(model: nn.Module) -> None:
    """Re-zero every pruned row/column of the adapters, biases (and trained base weights)."""
    for _, layer in splora_layers(model):
        layer.zero_pruned_()


def trainable_rule(train_base: bool) -> str:
    """The :func:`studio.train.select_trainable` rule: everything (fine-pruning), or the SPLoRA task parameters —
    adapters, biases of the adapted layers, norms and the classifier (patch embedding, tokens and ``W0`` stay
    frozen, as in the paper's ViT runs)."""
    if train_base:
        return "all"
    return (
        r"re:^(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.(lora_A|lora_B|bias)"
        r"|(.*\.)?(norm\d?|norm_pre|fc_norm)\.(norm\.)?(weight|bias)"
        r"|head(_dist)?\.(weight|bias))$"
    )


@dataclass(frozen=True)
class LearnedParams:
    """Per-task learned parameters, counted as the paper does (kept channels only)."""

    adapters: int  # r·(|m_in| + |m_out|) summed over adapted layers
    biases: int  # |m_out| summed over adapted layers with a bias
    norms: int  # kept channels of every trained norm (weight + bias)
    head: int  # classifier over the kept features
    total: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_learned(model: nn.Module) -> LearnedParams:
    """The paper's ΔParams of a SPLoRA model: adapters + biases of the kept channels, norms and classifier."""
    adapters = biases = 0
    for _, layer in splora_layers(model):
        n_in, n_out = len(layer.kept_in()), len(layer.kept_out())
        adapters += layer.rank * (n_in + n_out)
        biases += n_out if layer.bias is not None else 0
    norms = 0
    for _, mn in masked_norms(model):
        per_channel = sum(p.numel() for p in mn.norm.parameters()) // max(1, _width(mn.norm))
        kept = _width(mn.norm) if mn.mask is None else int(mn.mask.sum())
        norms += per_channel * kept
    head = 0
    for name in ("head", "head_dist"):
        lin = getattr(model, name, None)
        if isinstance(lin, nn.Linear):
            e = _embed_kept(model, lin.in_features)
            head += lin.out_features * e + (lin.out_features if lin.bias is not None else 0)
    return LearnedParams(adapters, biases, norms, head, adapters + biases + norms + head)


def _width(norm: nn.Module) -> int:
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[0]) if shape else 1


def _embed_kept(model: nn.Module, width: int) -> int:
    pre = getattr(model, "norm_pre", None)
    if isinstance(pre, MaskedNorm) and pre.mask is not None:
        return int(pre.mask.sum())
    return width
