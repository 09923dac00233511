"""Model families: which timm Vision Transformers the studio prunes exactly, and which it refuses at load.

Two registries, so a new variant is one entry here and the tests, the README table (``python -m
studio.families``) and the Model page follow without being edited:

- :data:`FAMILIES`: the variants of timm's ``VisionTransformer`` the plan, surgery, masking, analytic costs,
  export and every method handle (class token, distillation token, LayerScale, patch 14, pre-norm, average
  pooling, register tokens, qk-norm, scale norms, GLU/SwiGLU MLPs, attention-pool heads, ViT-22B's parallel
  scaling blocks and "three things" parallel blocks, split or merged at load by :mod:`studio.parallel`), and
  timm's EVA-02/EVA-01 (``Eva``), rebuilt at load as a VisionTransformer of rotary attentions by
  :mod:`studio.eva` (head dims in whole rotary pairs), and BEiT (``Beit``) and timm's relative-position ViTs
  (``VisionTransformerRelPos``), rebuilt at load as a VisionTransformer of attentions with a per-head relative
  position bias by :mod:`studio.relpos`. Each one detects itself on a built model, says which
  plan units it lets a method prune, and carries a small example that ``tests/test_families.py`` builds and runs
  every planning method on.
- :data:`REFUSALS`: structures the surgery cannot slice exactly (ParallelThingsBlock branches with their own
  qk-norm or scale norms, differential attention, custom MLPs, gated attention,
  other attention pools, EVA structures the rebuild cannot express (post-norm, AttentionRope, mixed RoPE),
  the relative-position ViTs' post-norm ``ResPostRelPosBlock``, non-ViT models). Each finds itself on a built
  model and returns the one sentence shown at load, naming the module type, the block index, what is supported
  and what the user can do; the checks run in ``rank`` order where every model is created (:func:`check`), so no library ``AttributeError``
  or ``IndexError`` is ever the first thing a user sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from timm.layers import LayerScale
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import StudioError
from .eva import ROPE_TYPE, RopeAttention, eva_refusal, has_rope, is_eva
from .parallel import MERGED, ParallelBlock, things_refusal
from .registry import Registry
from .relpos import (
    ORIGIN,
    REBUILT_TYPES,
    SHARED,
    RelPosAttention,
    RelPosMlpBias,
    RelPosTable,
    bias_kind,
    relpos_refusal,
)

# the plan's units (studio.plan): what a method may remove, in the order the UI lists them
UNITS = ("blocks", "heads", "head_dims", "mlp", "embed", "residual")
# constructor arguments of the small examples (random weights, 32 px, 3 blocks: about a second per method)
SMALL: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


@dataclass(frozen=True)
class Family:
    """A supported variant of timm's VisionTransformer.

    Attributes:
        name: what the README and the Model page call it.
        detect: whether a built model is of this variant (a model may be of several: DINOv2 is patch 14 with
            LayerScale).
        example: a timm architecture of the variant, and ``kwargs`` small constructor arguments for the tests.
        docs: the architecture a user would bring (README).
        units: the plan units a method may prune in this variant (all of them unless one is unsafe).
        note: what the studio does with the variant's own modules, where a paper defines no rule for them.
    """

    name: str
    detect: Callable[[VisionTransformer], bool]
    example: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    docs: str = ""
    units: tuple[str, ...] = UNITS
    note: str = ""
    factory: Callable[[], Mapping[str, Any]] | None = None  # kwargs that hold classes (an MLP type)

    def build_kwargs(self) -> dict[str, Any]:
        return {**SMALL, **self.kwargs, **(self.factory() if self.factory else {})}


@dataclass(frozen=True)
class Refusal:
    """A structure the studio refuses at load.

    Attributes:
        find: the refusal sentence for a built model, or None where it does not apply. ``blocks`` are the block
            types accepted (the surgery adds its own pruned block).
        example: a timm architecture that is refused, with small ``kwargs`` (the tests build it on the meta
            device and match ``says``); ``factory`` builds kwargs that hold classes (a block or MLP type).
        rank: order of the checks (the first that applies is the one reported).
    """

    name: str
    find: Callable[[nn.Module, tuple[type[nn.Module], ...]], str | None]
    example: str
    says: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: Callable[[], Mapping[str, Any]] | None = None
    docs: str = ""
    rank: int = 50

    def build_kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, **(self.factory() if self.factory else {})}


FAMILIES: Registry[Family] = Registry("model family")
REFUSALS: Registry[Refusal] = Registry("refused model structure")

SUPPORTED = (
    "timm VisionTransformers of pre-norm `Block`s (standard Attention; Mlp, GLU or SwiGLU MLP) or "
    "`ParallelScalingBlock`/`ParallelThingsBlock`s, timm's pre-norm EVA-02/EVA-01/DINOv3, BEiT and relative-position "
    "ViTs: ViT, DeiT, DeiT-III, DINOv2, CLIP, SigLIP, AIMv2 and the rest of the README's family table"
)


# -------------------------------------------------------------------------------------------- MLP layouts
@dataclass(frozen=True)
class MlpLayout:
    """Which weights an MLP hidden neuron owns, for every MLP kind the studio prunes.

    A neuron ``n`` owns column ``n`` of ``fc2`` (the hidden width is ``fc2.in_features`` in every kind) and, in
    each ``(linear, offset)`` of ``inputs``, row ``offset + n`` (weight and bias): one row of ``fc1`` in timm's
    ``Mlp``; the value and the gate half of the packed ``fc1`` in ``GluMlp`` / ``SwiGLUPacked`` (both halves kept
    as a pair); the rows of ``fc1_g`` and ``fc1_x`` in ``SwiGLU``. A GLU has no single pre-activation per neuron,
    so gates that the reference puts on ``fc1``'s output (SAViT) scale the hidden product (``drop1``'s output)
    there; P3B's mask on the activation's output zeroes the product in every kind.
    """

    name: str
    inputs: Callable[[nn.Module], tuple[tuple[str, int], ...]]

    def names(self, mlp: nn.Module) -> list[str]:
        """The distinct input linears' attribute names (each once, in order: a packed GLU's fc1 once)."""
        return list(dict.fromkeys(a for a, _ in self.inputs(mlp)))

    def linears(self, mlp: nn.Module) -> list[nn.Linear]:
        """The distinct input linears (each once, in order)."""
        return [getattr(mlp, a) for a in self.names(mlp)]

    def rows(self, mlp: nn.Module, neurons: Iterable[int]) -> dict[str, list[int]]:
        """Input linear name -> the rows the ``neurons`` own in it, in the order the surgery keeps them."""
        kept = list(neurons)
        out: dict[str, list[int]] = {}
        for attr, offset in self.inputs(mlp):
            out.setdefault(attr, []).extend(offset + n for n in kept)
        return out

    def copies(self, mlp: nn.Module) -> int:
        """Input rows per neuron (1 for ``Mlp``, 2 for a GLU)."""
        return len(self.inputs(mlp))

    def biases(self, mlp: nn.Module) -> int:
        """Input bias entries per neuron."""
        return sum(getattr(mlp, a).bias is not None for a, _ in self.inputs(mlp))


MLP_LAYOUTS: Registry[MlpLayout] = Registry("MLP layout")
MLP_LAYOUTS.add("Mlp", MlpLayout("Mlp", lambda m: (("fc1", 0),)))
MLP_LAYOUTS.add("GluMlp", MlpLayout("GluMlp", lambda m: (("fc1", 0), ("fc1", m.fc2.in_features))))
MLP_LAYOUTS.add("SwiGLU", MlpLayout("SwiGLU", lambda m: (("fc1_g", 0), ("fc1_x", 0))))


def mlp_layout(mlp: nn.Module) -> MlpLayout:
    """The layout of ``mlp`` (by its class name, so the surgery's own MLPs keep theirs)."""
    return MLP_LAYOUTS.get(type(mlp).__name__)


def mlp_hidden(mlp: nn.Module) -> int:
    return int(mlp.fc2.in_features)


def split_packed_glu(model: nn.Module) -> nn.Module:
    """Make every packed ``GluMlp`` of ``model`` a timm ``SwiGLU`` computing the same function, **in place**.

    For torch-pruning: its dependency graph does not follow the packed ``fc1``'s ``chunk`` (its index mapping
    runs past the halves), while the two separate linears of a ``SwiGLU`` it couples exactly. The gate half
    becomes ``fc1_g`` and the value half ``fc1_x``, weights, biases and ``.grad`` alike; the act, norm, dropouts
    and ``fc2`` are the same modules. Neuron ``n`` owns the same weights before and after.
    """
    from timm.layers import SwiGLU

    for blk in getattr(model, "blocks", ()):
        glu = getattr(blk, "mlp", None)
        if type(glu).__name__ != "GluMlp":
            continue
        M, fc1 = mlp_hidden(glu), glu.fc1
        halves = (slice(M, 2 * M), slice(0, M)) if glu.gate_last else (slice(0, M), slice(M, 2 * M))
        new = SwiGLU(fc1.in_features, M, glu.fc2.out_features, bias=(fc1.bias is not None, True))
        new = new.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        for lin, rows in zip((new.fc1_g, new.fc1_x), halves, strict=True):
            for name in ("weight", "bias"):
                src = getattr(fc1, name)
                if src is None:
                    continue
                p = nn.Parameter(src.detach()[rows].clone(), requires_grad=src.requires_grad)
                p.grad = None if src.grad is None else src.grad[rows].clone()
                setattr(lin, name, p)
        new.act, new.drop1, new.norm, new.fc2, new.drop2 = glu.act, glu.drop1, glu.norm, glu.fc2, glu.drop2
        blk.mlp = new
    return model


# ---------------------------------------------------------------------------------------------- families
def _blocks(m: VisionTransformer) -> list[nn.Module]:
    return list(m.blocks)


def _attn(m: VisionTransformer) -> list[nn.Module]:
    return [b.attn for b in _blocks(m) if getattr(b, "attn", None) is not None]


for _family in (
    Family(
        "ViT (class token)",
        lambda m: getattr(m, "cls_token", None) is not None and m.global_pool == "token",
        "vit_tiny_patch16_224",
        docs="`vit_base_patch16_224`",
    ),
    Family(
        "DeiT distilled",
        lambda m: getattr(m, "dist_token", None) is not None,
        "deit_tiny_distilled_patch16_224",
        docs="`deit_small_distilled_patch16_224`",
        note="both classifiers (`head`, `head_dist`) read the kept embedding channels",
    ),
    Family(
        "DeiT-III (LayerScale)",
        lambda m: any(isinstance(getattr(b, "ls1", None), LayerScale) for b in _blocks(m)),
        "deit3_small_patch16_224",
        {"init_values": 1e-1},
        docs="`deit3_small_patch16_224`",
        note="LayerScale's gamma follows the channels its branch writes",
    ),
    Family(
        "DINOv2 (patch 14, LayerScale)",
        lambda m: tuple(m.patch_embed.patch_size) == (14, 14),
        "vit_small_patch14_dinov2",
        {"img_size": 28, "patch_size": 14, "init_values": 1e-1},
        docs="`vit_small_patch14_dinov2`",
    ),
    Family(
        "CLIP (pre-norm)",
        lambda m: not isinstance(m.norm_pre, nn.Identity),
        "vit_base_patch16_clip_224",
        {"pre_norm": True},
        docs="`vit_base_patch16_clip_224`",
    ),
    Family(
        "average pooling + fc_norm",
        lambda m: m.global_pool == "avg",
        "vit_tiny_patch16_224",
        {"global_pool": "avg", "fc_norm": True},
        docs="`vit_base_patch16_224` with `global_pool='avg'`",
    ),
    Family(
        "register tokens",
        lambda m: int(getattr(m, "num_reg_tokens", 0)) > 0,
        "vit_tiny_patch16_224",
        {"reg_tokens": 2},
        docs="`vit_base_patch16_reg4_gap_256`",
    ),
    Family(
        "qk-norm",
        lambda m: any(not isinstance(getattr(a, "q_norm", nn.Identity()), nn.Identity) for a in _attn(m)),
        "vit_tiny_patch16_224",
        {"qk_norm": True},
        docs="any ViT with `qk_norm=True`",
        note="q_norm/k_norm are sliced to the kept head dims (their statistics are then over those dims); the "
        "temperature fold of head-dim pruning goes into q_norm's affine weight; the norms are not scored",
    ),
    Family(
        "scale norms (NormFormer)",
        lambda m: any(
            not isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity)
            or not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity)
            for b in _blocks(m)
            if getattr(b, "attn", None) is not None and getattr(b, "mlp", None) is not None
        ),
        "vit_tiny_patch16_224",
        {"scale_attn_norm": True, "scale_mlp_norm": True},
        docs="any ViT with `scale_attn_norm` / `scale_mlp_norm`",
        note="the attention-output norm keeps the kept (head, dim) channels and the MLP's hidden norm the kept "
        "neurons (statistics over those); the norms are not scored",
    ),
    Family(
        "GLU MLP (SwiGLUPacked: DINOv2-giant)",
        lambda m: any(type(getattr(b, "mlp", None)).__name__ == "GluMlp" for b in _blocks(m)),
        "vit_giant_patch14_dinov2",
        {"img_size": 28, "patch_size": 14, "init_values": 1e-1},
        docs="`vit_giant_patch14_dinov2` (`mlp_layer=SwiGLUPacked`)",
        note="a neuron keeps its value and its gate row of the packed fc1 as a pair",
    ),
    Family(
        "SwiGLU MLP (AIMv2)",
        lambda m: any(type(getattr(b, "mlp", None)).__name__ == "SwiGLU" for b in _blocks(m)),
        "aimv2_large_patch14_224",
        {"img_size": 28, "patch_size": 14},
        docs="`aimv2_large_patch14_224` (`mlp_layer=SwiGLU`, RmsNorm)",
        note="a neuron keeps its fc1_g and fc1_x rows as a pair; RmsNorm is sliced like LayerNorm",
    ),
    Family(
        "parallel scaling block (ViT-22B)",
        lambda m: any(isinstance(b, ParallelBlock) for b in _blocks(m)),
        "vit_pwee_patch16_reg1_gap_256",
        {"init_values": 1e-1},
        docs="`vit_pwee_patch16_reg1_gap_256`, `vit_base_patch16_xp_224` (`block_fn=ParallelScalingBlock`)",
        units=tuple(u for u in UNITS if u != "residual"),
        note="split at load into timm's Attention and Mlp of the same function (a head keeps its q/k/v rows of "
        "`in_proj` and its `out_proj` columns, a neuron its MLP row, `mlp_bias` entry and `out_proj` column); "
        "exports carry the split names; no residual subsets (both branches read one norm); P3B refused (it "
        "needs the stream between the branches)",
    ),
    Family(
        "parallel things block (18x2)",
        lambda m: any(getattr(b, MERGED, 0) > 1 for b in _blocks(m)),
        "vit_small_patch16_18x2_224",
        {"init_values": 1e-1},
        docs="`vit_small_patch16_18x2_224` (`block_fn=ParallelThingsBlock`)",
        note="merged at load into one Block of P·H heads and P·M neurons (each branch's norm affine folded into "
        "its qkv/fc1, its LayerScale into its proj/fc2; one norm per kind and biased linears, so up to 0.1 % fewer "
        "parameters than timm counts); a unit is one branch's head or neuron; exports carry the merged block; "
        "stochastic depth drops the summed branches together",
    ),
    Family(
        "EVA-02 (RoPE, SwiGLU)",
        has_rope,
        "eva02_tiny_patch14_224",
        {"init_values": 1e-1},
        docs="`eva02_tiny_patch14_224`, `eva02_base_patch14_224` (timm `Eva`, `use_rot_pos_emb=True`)",
        note="rebuilt at load as a ViT of the same function (studio.eva: rotary attention on timm's Attention, "
        "q/k/v biases or separate projections fused into qkv with a zero, trainable k bias, gamma_1/gamma_2 as "
        "LayerScale); head dims are kept or dropped in whole rotary pairs (ranked by summed score), the rotary "
        "table sliced with them; SPLoRA and P3B do not prune them",
    ),
    Family(
        "DINOv3 (RoPE, register tokens, dynamic size)",
        lambda m: getattr(m, ROPE_TYPE, None) == "RotaryEmbeddingDinoV3",
        "vit_small_patch16_dinov3",
        {"init_values": 1e-1},
        docs="`vit_small_patch16_dinov3`, `vit_base_patch16_dinov3`, `vit_huge_plus_patch16_dinov3` (timm `Eva`, "
        "`rope_type='dinov3'`)",
        note="rebuilt at load as EVA-02 is (studio.eva), with DINOv3's rotary table; `dynamic_img_size` models "
        "are pruned at the loaded image size (the table is computed for its grid, the export is fixed-size); "
        "training-time rotary coordinate augmentation is left out of recovery; head dims in whole "
        "rotary pairs",
    ),
    Family(
        "EVA-01",
        lambda m: is_eva(m) and not has_rope(m),
        "eva_giant_patch14_224",
        {"mlp_ratio": 4.0},
        docs="`eva_giant_patch14_224` (timm `Eva`, no RoPE)",
        note="rebuilt at load as a ViT of the same function (studio.eva; q/v biases fused into qkv with a zero, "
        "trainable k bias)",
    ),
    Family(
        "BEiT (relative position bias)",
        lambda m: getattr(m, ORIGIN, None) == "beit" and not getattr(m, SHARED, False),
        "beit_base_patch16_224",
        docs="`beit_base_patch16_224`, `beitv2_base_patch16_224` (timm `Beit`)",
        note="rebuilt at load as a ViT of the same function (studio.relpos: timm's Attention adding a per-head bias "
        "table to the logits, q/v biases fused into qkv with a zero, trainable k bias, gamma_1/gamma_2 as "
        "LayerScale); a pruned head keeps its table column",
    ),
    Family(
        "BEiT shared relative position bias",
        lambda m: getattr(m, ORIGIN, None) == "beit" and bool(getattr(m, SHARED, False)),
        "beit_base_patch16_224",
        {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True},
        docs="`Beit` with `use_shared_rel_pos_bias=True`",
        note="the model-level table becomes one copy per block (heads are pruned per block); fine-tuning trains "
        "the copies apart",
    ),
    Family(
        "relative-position ViT (RelPosMlp)",
        lambda m: (
            getattr(m, ORIGIN, None) == "vit_relpos"
            and bias_kind(m) is RelPosMlpBias
            and not getattr(m, SHARED, False)
        ),
        "vit_relpos_small_patch16_224",
        {"init_values": 1e-1},
        docs="`vit_relpos_base_patch16_224`, `vit_relpos_medium_patch16_cls_224` (timm `VisionTransformerRelPos`)",
        note="rebuilt at load as a ViT of the same function (studio.relpos); a pruned head keeps its output row of "
        "the bias MLP (Swin-V2's log-spaced continuous position bias), whose MACs the costs count",
    ),
    Family(
        "relative-position ViT (RelPosBias, class token)",
        lambda m: getattr(m, ORIGIN, None) == "vit_relpos" and bias_kind(m) is RelPosTable,
        "vit_relpos_small_patch16_224",
        {"init_values": 1e-1, "rel_pos_type": "bias", "class_token": True, "global_pool": "token"},
        docs="`VisionTransformerRelPos` with `rel_pos_type='bias'`",
        note="rebuilt at load as a ViT of the same function (studio.relpos); a pruned head keeps its table column",
    ),
    Family(
        "relative-position ViT, shared bias (srelpos)",
        lambda m: getattr(m, ORIGIN, None) == "vit_relpos" and bool(getattr(m, SHARED, False)),
        "vit_srelpos_small_patch16_224",
        {"init_values": 1e-1, "rel_pos_dim": 16},
        docs="`vit_srelpos_small_patch16_224`",
        note="the shared bias module becomes one copy per block (heads are pruned per block); fine-tuning trains "
        "the copies apart",
    ),
    Family(
        "attention-pool head (SigLIP)",
        lambda m: getattr(m, "attn_pool", None) is not None,
        "vit_base_patch16_siglip_224",
        docs="`vit_base_patch16_siglip_224` (`global_pool='map'`)",
        note="the pool reads and writes the kept embedding channels (kv input, proj output, its norm and MLP); "
        "its latent query and attention width are kept whole (no method scores them)",
    ),
):
    FAMILIES.add(_family.name, _family)


def families_of(model: VisionTransformer) -> list[str]:
    """The supported variants ``model`` is of (names of :data:`FAMILIES`)."""
    return [n for n in FAMILIES.names() if FAMILIES.get(n).detect(model)]


def prunable_units(model: VisionTransformer) -> tuple[str, ...]:
    """The plan units every variant of ``model`` lets a method prune."""
    allowed = set(UNITS)
    for name in families_of(model):
        allowed &= set(FAMILIES.get(name).units)
    return tuple(u for u in UNITS if u in allowed)


# ---------------------------------------------------------------------------------------------- refusals
def _not_a_vit(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    if isinstance(model, VisionTransformer):
        return None
    return (
        f"A timm {type(model).__name__} is not a Vision Transformer the studio can prune yet; it prunes "
        f"{SUPPORTED}. Pick one of those architectures."
    )


def _eva(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    from timm.models.eva import Eva

    if not isinstance(model, Eva):
        return None
    return eva_refusal(model) or (  # an Eva that studio.eva.convert_eva left as it is, or never saw
        "This timm Eva is pruned rebuilt as a Vision Transformer of rotary attentions (studio.eva.convert_eva, "
        "which studio.models.create_vit applies). Load the model through the studio."
    )


def _relpos(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    if not isinstance(model, REBUILT_TYPES):
        return None
    return relpos_refusal(model) or (  # a model that studio.relpos.convert_relpos left as it is, or never saw
        f"This timm {type(model).__name__} is pruned rebuilt as a Vision Transformer of relative-position "
        "attentions (studio.relpos.convert_relpos, which studio.models.create_vit applies). Load the model "
        "through the studio."
    )


def _first(blocks: Iterable[nn.Module], bad: Callable[[nn.Module], str | None]) -> str | None:
    for i, blk in enumerate(blocks):
        why = bad(blk)
        if why is not None:
            return f"Block {i} {why}"
    return None


def _block_type(model: nn.Module, blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    def bad(b: nn.Module) -> str | None:
        if type(b) in blocks_ok or type(b) is ParallelBlock:
            return None
        if type(b).__name__ == "ParallelScalingBlock":  # built outside studio.models.create_vit
            return (
                "is timm's fused ParallelScalingBlock; the studio prunes it split (studio.parallel.split_parallel, "
                "which studio.models.create_vit applies). Load the model through the studio."
            )
        if type(b).__name__ == "ParallelThingsBlock":
            why = things_refusal(b)
            return (
                f"is a ParallelThingsBlock whose branches cannot be merged into one Block: {why}. Build it "
                "without those (timm's Attention and Mlp, no qk_norm or scale norms)."
                if why is not None
                else "is timm's ParallelThingsBlock; the studio prunes it merged (studio.parallel.split_parallel, "
                "which studio.models.create_vit applies). Load the model through the studio."
            )
        return (
            f"is a {type(b).__name__}; the studio prunes timm's pre-norm `Block`, `ParallelScalingBlock` and "
            "`ParallelThingsBlock` only (no differential attention or other blocks): use an architecture built of "
            "those blocks."
        )

    return _first(model.blocks, bad)


def _branch_types(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    def bad(b: nn.Module) -> str | None:
        attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
        if attn is None or mlp is None:
            return None  # a pruned block whose attention or MLP the plan removed
        if (
            type(attn) not in (Attention, RopeAttention, RelPosAttention)
            or type(mlp).__name__ not in MLP_LAYOUTS
        ):
            return (
                f"uses {type(attn).__name__}/{type(mlp).__name__}; the studio supports timm's standard Attention "
                f"and the MLPs {', '.join(MLP_LAYOUTS.names())} (no fused variants): build the "
                "model with those attention and mlp layers, or use another architecture."
            )
        if getattr(mlp, "chunk_dim", -1) != -1:
            return "uses a convolutional GluMlp (use_conv=True), which the studio does not support."
        return None

    return _first(model.blocks, bad)


def _gated(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    return _first(
        model.blocks,
        lambda b: (
            "uses gated attention, which the studio does not support: build it with `gated=False`."
            if getattr(getattr(b, "attn", None), "gate", None) is not None
            else None
        ),
    )


def _other_pool(model: nn.Module, _blocks_ok: tuple[type[nn.Module], ...]) -> str | None:
    from timm.layers.attention_pool import AttentionPoolLatent

    pool = getattr(model, "attn_pool", None)
    if pool is None or (isinstance(pool, AttentionPoolLatent) and getattr(pool, "mlp", None) is not None):
        return None  # the surgery's pruned pool is an AttentionPoolLatent too
    return (
        f"The attention-pool head {type(pool).__name__} is not supported (the studio prunes timm's "
        "AttentionPoolLatent with its projection and MLP, global_pool='map'): build the model with "
        "global_pool='map', 'token' or 'avg'."
    )


def _custom_mlp() -> dict[str, Any]:
    from timm.layers import Mlp

    class CustomMlp(Mlp):  # a user's own MLP: the studio cannot know which weights a neuron owns
        pass

    return {"mlp_layer": CustomMlp}


def _gated_attention() -> dict[str, Any]:
    class GatedAttention(Attention):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, gated=True, **kwargs)

    return {"attn_layer": GatedAttention}


for _refusal in (
    Refusal(
        "EVA post-norm blocks",
        _eva,
        "eva02_tiny_patch14_224",
        "EvaBlockPostNorm",
        {**SMALL, "use_post_norm": True},
        docs="`Eva` with `use_post_norm=True`",
        rank=0,
    ),
    Refusal(
        "EVA with AttentionRope (grouped-query)",
        _eva,
        "eva02_tiny_patch14_224",
        "AttentionRope",
        {**SMALL, "attn_type": "rope"},
        docs="`Eva` with `attn_type='rope'`",
        rank=0,
    ),
    Refusal(
        "relative-position ViT post-norm blocks",
        _relpos,
        "vit_relpos_small_patch16_rpn_224",
        "ResPostRelPosBlock",
        {**SMALL, "init_values": 1e-1},
        docs="`vit_relpos_small_patch16_rpn_224` (`block_fn=ResPostRelPosBlock`)",
        rank=0,
    ),
    Refusal(
        "other attention pools",
        _other_pool,
        "vit_tiny_patch16_224",
        "AttentionPoolPrr",
        {**SMALL, "global_pool": "prr"},
        docs="`global_pool='prr'`",
        rank=10,
    ),
    Refusal(
        "parallel things blocks with qk-norm or scale norms",
        _block_type,
        "vit_small_patch16_18x2_224",
        "ParallelThingsBlock whose branches cannot be merged",
        {**SMALL, "depth": 2, "qk_norm": True},
        docs="`vit_small_patch16_18x2_224` with `qk_norm=True`",
        rank=20,
    ),
    Refusal(
        "differential-attention parallel blocks",
        _block_type,
        "vit_dpwee_patch16_reg1_gap_256",
        "DiffParallelScalingBlock",
        SMALL,
        docs="`vit_dpwee_patch16_reg1_gap_256`",
        rank=21,
    ),
    Refusal(
        "fused or custom MLP",
        _branch_types,
        "vit_tiny_patch16_224",
        "CustomMlp",
        SMALL,
        factory=_custom_mlp,
        docs="a custom `mlp_layer` class",
        rank=30,
    ),
    Refusal(
        "gated attention",
        _gated,
        "vit_tiny_patch16_224",
        "gated attention",
        SMALL,
        factory=_gated_attention,
        docs="`Attention(gated=True)`",
        rank=25,
    ),
):
    REFUSALS.add(_refusal.name, _refusal)


def check(model: nn.Module, *, blocks: tuple[type[nn.Module], ...] = (Block,)) -> VisionTransformer:
    """Refuse, in one sentence naming the module and the block, a model the studio cannot prune exactly.

    The checks of :data:`REFUSALS` run in rank order; the first that applies is raised as a
    :class:`StudioError`.
    """
    for name in sorted(REFUSALS.names(), key=lambda n: REFUSALS.get(n).rank):
        why = REFUSALS.get(name).find(model, blocks)
        if why is not None:
            raise StudioError(why)
    return model  # type: ignore[return-value]  # _not_a_vit ran first


def markdown_table() -> str:
    """The README's table of supported and refused families (``python -m studio.families``)."""
    rows = ["| family / variant | example timm architecture | supported |", "|---|---|---|"]
    for name in FAMILIES.names():
        f = FAMILIES.get(name)
        units = "every unit" if f.units == UNITS else ", ".join(f.units)
        rows.append(f"| {f.name} | {f.docs} | yes ({units}){': ' + f.note if f.note else ''} |")
    for name in sorted(REFUSALS.names(), key=lambda n: REFUSALS.get(n).rank):
        r = REFUSALS.get(name)
        rows.append(f"| {r.name} | {r.docs} | refused at load |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
