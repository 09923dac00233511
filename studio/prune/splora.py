"""SPLoRA: channel pruning while training low-rank adapters over a frozen backbone, and its fine-pruning baseline.

Hedegaard et al., "Structured Pruning Adapters" (arXiv 2211.10155), channel-based SPA, on timm ViTs. The adapter
layers are :mod:`studio.splora`; this module masks the studio's structural groups on the *adapted* weights, scores
them, and runs the paper's schedule:

1. train the task parameters (SPLoRA: adapters, biases, norms, head; fine-pruning: everything) for ``epochs``;
2. repeat {score every alive unit over the training split → prune ``prune_step`` of the ORIGINAL unit count (the
   ``vit`` protocol, the default: the same fraction from every layer by grouped L2 magnitude, as the reference's
   ViT run; ``cnn``: the globally lowest Taylor scores after per-layer normalisation, the paper's ResNet protocol)
   → recover ``recovery_epochs`` at lr/3} until the unit
   density reaches ``target_density``; every step's accuracy, densities, MACs and learned parameters are emitted
   as ``prune_step`` events (the paper's accuracy-vs-density curves);
3. fuse the adapters into the weights, remove the pruned channels with the studio's one surgery
   (:func:`studio.surgery.apply_plan`) and export; also store the compact per-task form (masks + sliced A/B +
   biases + norms + head) the paper's storage argument is about.

Units (a "layer" for the per-layer normalisation is one scope of one block; embedding channels are one layer):
``mlp`` neurons (``fc1`` rows + ``fc2`` columns), ``heads`` (q/k/v rows of a head + its ``proj`` columns),
``head_dims`` (one dim of q/k/v in every head of a block, as the plan keeps them) and ``embed`` residual channels
(everything that writes or reads the stream at that channel).

Criteria (the paper's ``--norm`` variants, ``src/filterprune.py``), with a unit's "filter" = the rows of the
adapted weight that produce it and its "activation" = those rows' outputs (``fc1`` output for neurons, ``qkv``
output for heads / head dims, the stream where it is created and every ``proj``/``fc2`` output for embedding):

- ``weight`` (Li et al. 2017): ``Σ|W0 + BA|`` over the unit's rows, normalised ``s / Σ_layer s``;
- ``grad`` (Sun et al. 2017): ``|Σ_batches mean_{batch,tokens} ∂L/∂a|``, normalised ``s / ‖s‖₂``;
- ``taylor`` (Molchanov et al. 2017): ``|Σ_batches mean_{batch,tokens} a·∂L/∂a|``, normalised ``s / ‖s‖₂``.

Scores of several channels of one unit (q, k, v rows; several writers of a residual channel) are summed after the
absolute value. Already pruned units are never picked again, and every layer keeps at least one unit.

LRP is not offered: the paper's LRP criterion relies on ResNet-specific rules (z^β, α1β0 for convolutions,
ε for linear and sum nodes) and no conservative rule set for ViT blocks is implemented there; a plain ε-rule through
LayerNorm, softmax attention (a product of two input-dependent terms) and GELU is not conservative, so its scores
would not mean "relevance". Transformer LRP needs dedicated rules (e.g. Ali et al. 2022, Achtibat et al. 2024).

Deliberate departures from the reference code (``LukasHedegaard/channel-spa-experiments``), implementing its intent:

- masks stay applied during recovery (in ``forward``, and pruned adapter rows/columns, biases and — for
  fine-pruning — base weights are re-zeroed after every optimizer step), whereas the CNN code zeroed weights once
  so pruned filters could regrow while FLOPs were still counted from the mask;
- every group is scored directly (the reference ViT run used torch-pruning importances, which skip customised
  SPLoRA layers, so adapter-only groups such as MLP neurons were never scored).

Density: ``unit_density`` is the fraction of the original prunable units kept (what the schedule steps, the
paper's x-axis); ``weight_density`` the fraction of the adapted layers' weights kept
(``Σ |m_out|·|m_in| / Σ d_out·d_in`` over qkv/proj/fc1/fc2); ``macs_fraction``/``params_fraction`` those of the
whole pruned model. All are recorded at every step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.groups import unit_scores
from ..costs import arch_facts, plan_cost, with_summary
from ..data import make_loader
from ..errors import StudioError
from ..evaluate import evaluate, logits_of
from ..events import Callback, CancelToken, Event, check, emit, progress
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..plan import BaseArch, BlockPlan, PrunePlan
from ..runs import RunDir, atomic_path, read_json, write_json
from ..splora import (
    DEFAULT_INIT_RANGE,
    SPLoRALinear,
    apply_splora,
    count_learned,
    fuse_splora,
    masked_norms,
    splora_layers,
    trainable_rule,
    zero_pruned,
)
from ..surgery import apply_plan
from ..train import TrainSpec, fit
from . import METHODS, Budget, Method, Option
from .select import SCOPES

CRITERIA = ("weight", "l2", "grad", "taylor")
SELECTIONS = ("global", "uniform")
# the two protocols of the reference code (channel-spa-experiments): main_cnn.py's and main_vit.py's, each as the
# defaults of the options it sets; an option given explicitly wins
PROTOCOLS: dict[str, dict[str, Any]] = {
    "cnn": {"criterion": "taylor", "selection": "global"},
    "vit": {"criterion": "l2", "selection": "uniform"},
}
VIT_TRAINING = {  # main_vit.py: SGD m0.9, wd 5e-4, OneCycleLR, grad-clip 1.0, head only for the first half
    "optimizer": "sgd",
    "schedule": "onecycle",
    "weight_decay": 5e-4,
    "grad_clip": 1.0,
}
MODES = ("splora", "finetune")
DEFAULT_LR = {"splora": 1e-2, "finetune": 1e-3}
RECOVERY_LR_FACTOR = 1 / 3  # the paper's recovery lr = lr / 3
DENSITY_DEFINITION = (
    "unit_density = kept / original prunable units (heads, head dims, MLP neurons, embedding channels in scope), "
    "the quantity the schedule steps; weight_density = kept / original weights of the adapted layers "
    "(qkv, proj, fc1, fc2); macs_fraction / params_fraction = of the whole pruned model."
)
TASK_DIR = "task"
TASK_WEIGHTS = "task.safetensors"
TASK_MANIFEST = "task.json"
TASK_SCHEMA = "pruning-studio/splora-task"

OPTIONS: tuple[Option, ...] = (
    Option(
        "mode",
        str,
        "splora",
        "splora: adapters over the frozen backbone; finetune: fine-pruning baseline",
        choices=MODES,
    ),
    Option("compare", bool, False, "run SPLoRA and fine-pruning with the same schedule (one curve each)"),
    Option(
        "rank", float, 8.0, "adapter rank: an integer, or a fraction in (0, 1) of each layer's output width"
    ),
    Option(
        "init_range", float, DEFAULT_INIT_RANGE, "adapter B ~ U(±init_range) (paper: 1e-3; library: 1e-4)"
    ),
    Option(
        "criterion",
        str,
        None,
        "channel criterion (default: the protocol's, l2 for vit, taylor for cnn); weight/l2 are |w| / w² summed "
        "over each unit's whole group of adapted weights",
        choices=CRITERIA,
    ),
    Option(
        "protocol",
        str,
        "vit",
        "vit (the default): the reference ViT run (grouped L2 magnitude, uniform per layer, SGD + OneCycle, "
        "grad-clip 1, head only for the first half of the adapter epochs, lr 3·bs/256 for SPLoRA and "
        "0.0125·bs/32 for fine-pruning); cnn: the paper's ResNet protocol (Taylor criterion, global ranking, "
        "AdamW + cosine here)",
        choices=tuple(PROTOCOLS),
    ),
    Option(
        "selection",
        str,
        None,
        "global: normalise per layer, then rank all layers together (the paper's CNN protocol); uniform: every "
        "layer loses the same fraction per step (the reference ViT run); default: the protocol's",
        choices=SELECTIONS,
    ),
    Option(
        "target_density",
        float,
        None,
        "fraction of the original prunable units to keep at the end (default 0.3, or 1 - --ratio)",
    ),
    Option(
        "prune_step", float, 0.05, "fraction of the ORIGINAL units removed per pruning step (paper: 0.05)"
    ),
    Option("epochs", int, 10, "epochs of adapter (or full fine-tuning) training before pruning", low=0),
    Option("recovery_epochs", int, 2, "training epochs after every pruning step (at lr/3)", low=0),
    Option(
        "lr",
        float,
        None,
        "learning rate of --mode's run (default 1e-2 for SPLoRA, 1e-3 for fine-pruning; "
        "AdamW; with --compare the other run keeps its default)",
    ),
    Option(
        "scope", str, "head_dims,mlp,embed", "units to prune, comma-separated: heads, head_dims, mlp, embed"
    ),
    Option(
        "score_batches", int, 0, "batches of the training split scored per step (0: the whole split, paper)"
    ),
)


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SploraOptions:
    """The resolved method options (``spec.json``/``results.json`` record them)."""

    mode: str = "splora"
    compare: bool = False
    rank: float = 8.0
    init_range: float = DEFAULT_INIT_RANGE
    protocol: str = "vit"
    criterion: str = "l2"
    selection: str = "uniform"
    target_density: float = 0.3
    prune_step: float = 0.05
    epochs: int = 10
    recovery_epochs: int = 2
    lr: float | None = None
    scope: tuple[str, ...] = ("head_dims", "mlp", "embed")
    score_batches: int = 0
    batch_size: int = 64
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, batch_size: int = 64, seed: int = 0) -> SploraOptions:
        """Check the method's options (and the common budget options) and say how to fix bad ones."""
        given = {k: v for k, v in params.items() if k in cls.__dataclass_fields__ and v is not None}
        protocol = str(given.get("protocol", "vit"))
        if protocol not in PROTOCOLS:
            raise StudioError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}.")
        given = {**PROTOCOLS[protocol], **given}
        if "scope" in given:
            given["scope"] = parse_scope(given["scope"])
        opts = cls(**{**given, "batch_size": batch_size, "seed": seed})
        if not 0.0 < opts.target_density <= 1.0:
            raise StudioError(f"--target-density must be in (0, 1], got {opts.target_density}.")
        if not 0.0 < opts.prune_step <= 1.0:
            raise StudioError(f"--prune-step must be in (0, 1], got {opts.prune_step}.")
        if opts.epochs < 0 or opts.recovery_epochs < 0 or opts.score_batches < 0:
            raise StudioError("--epochs, --recovery-epochs and --score-batches must be >= 0.")
        if opts.lr is not None and not opts.lr > 0:
            raise StudioError(f"--lr must be positive, got {opts.lr}.")
        if opts.mode not in MODES:
            raise StudioError(f"--mode must be one of {', '.join(MODES)}, not {opts.mode!r}.")
        if opts.criterion not in CRITERIA:
            raise StudioError(
                f"--criterion must be one of {', '.join(CRITERIA)} (LRP is not supported on ViTs)."
            )
        if opts.selection not in SELECTIONS:
            raise StudioError(f"--selection must be one of {', '.join(SELECTIONS)}, not {opts.selection!r}.")
        return opts

    @property
    def series(self) -> tuple[str, ...]:
        """The runs to make: the chosen mode, or both (SPLoRA first) with ``compare``."""
        return MODES if self.compare else (self.mode,)

    def lr_for(self, series: str) -> float:
        if self.lr is not None and (series == self.mode or not self.compare):
            return self.lr
        if self.protocol == "vit":  # main_vit.py's linear scaling rules
            return 3.0 * self.batch_size / 256 if series == "splora" else 0.0125 * self.batch_size / 32
        return DEFAULT_LR[series]

    @property
    def training(self) -> dict[str, Any]:
        """The optimizer, schedule, weight decay and clipping of the protocol (TrainSpec fields)."""
        return dict(VIT_TRAINING) if self.protocol == "vit" else {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scope"] = list(self.scope)
        return d


def parse_scope(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    bad = [s for s in items if s not in SCOPES]
    if bad or not items:
        raise StudioError(
            f"Unknown SPLoRA scope '{bad[0] if bad else text}'. Valid: {', '.join(SCOPES)} "
            "(comma-separated, e.g. head_dims,mlp,embed)."
        )
    return tuple(dict.fromkeys(items))


# ------------------------------------------------------------------------------------------------- masks
LayerKey = tuple[str, int]  # (scope, block); the embedding is ("embed", -1)


@dataclass
class UnitMasks:
    """Which units are kept (bool tensors, base-model indices) — the source of every layer mask and the plan."""

    heads: list[torch.Tensor]
    head_dims: list[torch.Tensor]
    mlp: list[torch.Tensor]
    embed: torch.Tensor

    @classmethod
    def full(cls, base: BaseArch) -> UnitMasks:
        return cls(
            heads=[torch.ones(h, dtype=torch.bool) for h in base.num_heads],
            head_dims=[torch.ones(base.head_dim, dtype=torch.bool) for _ in range(base.depth)],
            mlp=[torch.ones(m, dtype=torch.bool) for m in base.mlp_hidden],
            embed=torch.ones(base.embed_dim, dtype=torch.bool),
        )

    def layers(self, scopes: Iterable[str]) -> list[tuple[LayerKey, torch.Tensor]]:
        """Every (layer key, mask) of the given scopes, in a fixed order (ties in the ranking go by it)."""
        out: list[tuple[LayerKey, torch.Tensor]] = []
        for scope in SCOPES:
            if scope not in scopes:
                continue
            if scope == "embed":
                out.append((("embed", -1), self.embed))
            else:
                out += [((scope, i), m) for i, m in enumerate(getattr(self, scope))]
        return out

    def get(self, key: LayerKey) -> torch.Tensor:
        return self.embed if key[0] == "embed" else getattr(self, key[0])[key[1]]

    def kept(self, scopes: Iterable[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (scope, _), m in self.layers(scopes):
            counts[scope] = counts.get(scope, 0) + int(m.sum())
        return counts

    def apply(self, model: nn.Module) -> None:
        """Write the layer masks of every :class:`SPLoRALinear` and :class:`MaskedNorm` of ``model``."""
        e = self.embed
        width = len(e)
        for i, blk in enumerate(model.blocks):
            hd = (
                self.heads[i][:, None] & self.head_dims[i][None, :]
            ).flatten()  # (H*d,), timm's head-major order
            qkv, proj, fc1, fc2 = blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2
            if not all(isinstance(m, SPLoRALinear) for m in (qkv, proj, fc1, fc2)):
                raise StudioError("Masks need a model with SPLoRA layers (apply_splora first).")
            qkv.set_masks(e, hd.repeat(3))
            proj.set_masks(hd, e)
            fc1.set_masks(e, self.mlp[i])
            fc2.set_masks(self.mlp[i], e)
        for _, norm in masked_norms(model):
            norm.set_mask(e, width)

    def to_plan(
        self, base: BaseArch, *, method: str = "splora", params: Mapping[str, Any] | None = None
    ) -> PrunePlan:
        def idx(m: torch.Tensor) -> tuple[int, ...] | None:
            return None if bool(m.all()) else tuple(int(i) for i in torch.nonzero(m).flatten())

        blocks = tuple(
            BlockPlan(i, heads=idx(self.heads[i]), head_dims=idx(self.head_dims[i]), mlp=idx(self.mlp[i]))
            for i in range(base.depth)
        )
        return PrunePlan(
            base=base, blocks=blocks, embed=idx(self.embed), method=method, params=dict(params or {})
        ).validate()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        t = {"mask.embed": self.embed.clone()}
        for scope in ("heads", "head_dims", "mlp"):
            for i, m in enumerate(getattr(self, scope)):
                t[f"mask.blocks.{i}.{scope}"] = m.clone()
        return t

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], depth: int) -> UnitMasks:
        try:
            return cls(
                heads=[t[f"mask.blocks.{i}.heads"].bool() for i in range(depth)],
                head_dims=[t[f"mask.blocks.{i}.head_dims"].bool() for i in range(depth)],
                mlp=[t[f"mask.blocks.{i}.mlp"].bool() for i in range(depth)],
                embed=t["mask.embed"].bool(),
            )
        except KeyError as e:
            raise StudioError(f"The task file lacks mask {e}; export the task again.") from None


def weight_density(model: nn.Module) -> float:
    """Kept / original weights over the adapted layers (``Σ |m_out|·|m_in| / Σ d_out·d_in``)."""
    kept = total = 0
    for _, layer in splora_layers(model):
        kept += len(layer.kept_in()) * len(layer.kept_out())
        total += layer.in_features * layer.out_features
    return kept / max(1, total)


class MaskHook:
    """A :func:`studio.train.fit` hook keeping pruned channels at zero: re-zero them after every optimizer step.

    The masks in ``forward`` already make pruned channels output zero; this also keeps the stored adapter rows,
    biases (and fine-pruned base weights) at zero, so nothing regrows and the compact task form is exact.
    """

    def after_step(self, state: Any) -> None:
        zero_pruned(state.model)


# ---------------------------------------------------------------------------------------------- scoring
class _ChannelStats:
    """``Σ_batches mean_{batch,tokens}`` of ``∂L/∂a`` (grad) or ``a·∂L/∂a`` (taylor), per channel, signed."""

    def __init__(self, taylor: bool) -> None:
        self.taylor = taylor
        self.total: torch.Tensor | None = None

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        a = output.detach()

        def on_grad(g: torch.Tensor) -> None:
            v = a * g if self.taylor else g
            s = v.reshape(-1, v.shape[-1]).double().mean(0).cpu()
            self.total = s if self.total is None else self.total + s

        output.register_hook(on_grad)

    def abs(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float64) if self.total is None else self.total.abs()


def raw_scores(
    model: nn.Module,
    criterion: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    n_batches: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[LayerKey, torch.Tensor]:
    """Un-normalised scores of every unit of every scope (float64, CPU), keyed by layer."""
    blocks = list(model.blocks)
    E = int(model.embed_dim)
    out: dict[LayerKey, torch.Tensor] = {}
    if criterion in ("weight", "l2"):
        # the whole group of each unit (the studio's one grouped sum, studio.analysis.groups) on the adapted weights
        power = 1 if criterion == "weight" else 2
        scores = unit_scores(
            model, {n: t.abs().pow(power) for n, t in adapted_tensors(model).items()}, SCOPES
        )
        for i in range(len(blocks)):
            for scope in ("heads", "head_dims", "mlp"):
                out[(scope, i)] = torch.tensor(getattr(scores, scope)[i], dtype=torch.float64)
        out[("embed", -1)] = torch.tensor(scores.embed, dtype=torch.float64)
        return out
    if criterion not in ("grad", "taylor"):
        raise StudioError(f"Unknown SPLoRA criterion '{criterion}'. Valid: {', '.join(CRITERIA)}.")
    taylor = criterion == "taylor"
    stats: dict[str, _ChannelStats] = {}
    handles = []

    def watch(name: str, module: nn.Module) -> None:
        stats[name] = _ChannelStats(taylor)
        handles.append(module.register_forward_hook(stats[name].hook))

    for i, blk in enumerate(blocks):
        watch(f"qkv{i}", blk.attn.qkv)
        watch(f"fc1.{i}", blk.mlp.fc1)
        watch(f"proj{i}", blk.attn.proj)
        watch(f"fc2.{i}", blk.mlp.fc2)
    watch("stream", model.norm_pre)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for p in model.parameters():  # so every watched activation has a gradient, frozen backbone included
            p.requires_grad_(True)
        total = n_batches or None
        for k, (x, y) in enumerate(batches):
            if n_batches and k >= n_batches:
                break
            check(cancel)
            loss = F.cross_entropy(
                logits_of(model, x.to(device)).float(), torch.as_tensor(y).to(device).long()
            )
            loss.backward()
            model.zero_grad(set_to_none=True)
            progress(callbacks, f"{criterion} scores", k + 1, total or k + 1)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    embed = stats["stream"].abs(E)
    for i, blk in enumerate(blocks):
        H, d = blk.attn.num_heads, blk.attn.head_dim
        qkv = stats[f"qkv{i}"].abs(3 * H * d).view(3, H, d)
        out[("heads", i)], out[("head_dims", i)] = qkv.sum((0, 2)), qkv.sum((0, 1))
        out[("mlp", i)] = stats[f"fc1.{i}"].abs(blk.mlp.fc1.out_features)
        embed = embed + stats[f"proj{i}"].abs(E) + stats[f"fc2.{i}"].abs(E)
    out[("embed", -1)] = embed
    return out


def adapted_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` under its plain timm name, the adapted layers' weights as ``W0 + BA`` (masked):
    what a unit's group holds once the adapters are fused (adapter factors and masks themselves left out)."""
    wrapped = {f"{name}.norm.": f"{name}." for name, _ in masked_norms(model)}
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        for (
            inner,
            plain,
        ) in wrapped.items():  # a MaskedNorm's LayerNorm: blocks.0.norm1.norm.weight -> norm1.weight
            if name.startswith(inner):
                name = plain + name[len(inner) :]
                break
        out[name] = p.detach()
    for name, layer in splora_layers(model):
        out[f"{name}.weight"] = layer.adapted_weight()
    return out


def normalise(scores: torch.Tensor, alive: torch.Tensor, criterion: str) -> torch.Tensor:
    """The paper's per-layer normalisation over the alive units: ``s/Σs`` (weight) or ``s/‖s‖₂`` (grad, taylor);
    pruned units get ``+inf`` so they are never picked again."""
    s = scores.double().clone()
    live = s[alive]
    denom = live.sum() if criterion in ("weight", "l2") else live.norm(p=2)
    if float(denom) > 0:
        s = s / denom
    s[~alive] = math.inf
    return s


def choose_pruned(
    scores: Mapping[LayerKey, torch.Tensor],
    masks: UnitMasks,
    scopes: Sequence[str],
    n_remove: int,
    criterion: str,
    selection: str = "global",
) -> dict[LayerKey, list[int]]:
    """The ``n_remove`` alive units to prune, every layer keeping one.

    ``global`` (the paper's CNN protocol): the globally lowest scores after per-layer normalisation. ``uniform``
    (the reference ViT run, torch-pruning's default): each layer's share of ``n_remove`` is proportional to its
    original size (largest remainders), taken from its own lowest scores, so every layer keeps the same fraction.
    Ties go by layer order, then unit index, so the choice is deterministic.
    """
    if selection == "uniform":
        return _choose_uniform(scores, masks, scopes, n_remove)
    candidates: list[tuple[float, int, int, LayerKey]] = []
    alive: dict[LayerKey, int] = {}
    for order, (key, m) in enumerate(masks.layers(scopes)):
        s = normalise(scores[key], m, criterion)
        alive[key] = int(m.sum())
        candidates += [(float(v), order, j, key) for j, v in enumerate(s.tolist()) if m[j]]
    candidates.sort(key=lambda c: c[:3])
    chosen: dict[LayerKey, list[int]] = {}
    for _, _, j, key in candidates:
        if n_remove <= 0:
            break
        if alive[key] <= 1:
            continue
        chosen.setdefault(key, []).append(j)
        alive[key] -= 1
        n_remove -= 1
    return chosen


def _choose_uniform(
    scores: Mapping[LayerKey, torch.Tensor], masks: UnitMasks, scopes: Sequence[str], n_remove: int
) -> dict[LayerKey, list[int]]:
    layers = masks.layers(scopes)
    total = sum(m.numel() for _, m in layers)
    exact = [n_remove * m.numel() / max(1, total) for _, m in layers]
    share = [math.floor(e) for e in exact]
    # largest remainders first (then layer order), so the shares add up to n_remove
    for k in sorted(range(len(layers)), key=lambda k: (share[k] - exact[k], k))[: n_remove - sum(share)]:
        share[k] += 1
    chosen: dict[LayerKey, list[int]] = {}
    for (key, m), n in zip(layers, share):
        n = min(n, int(m.sum()) - 1)  # every layer keeps at least one unit
        if n <= 0:
            continue
        s = scores[key].double()
        order = sorted((float(s[j]), j) for j in range(len(m)) if m[j])
        chosen[key] = [j for _, j in order[:n]]
    return chosen


# --------------------------------------------------------------------------------------------- schedule
@dataclass
class Splits:
    train: Any
    val: Any
    test: Any | None


@dataclass
class SeriesResult:
    """One schedule's outcome: the masked (unfused) model, its masks, and the per-step records."""

    name: str
    model: nn.Module
    masks: UnitMasks
    steps: list[dict[str, Any]] = field(default_factory=list)
    dense: nn.Module | None = None  # fused copy after the initial training (the "before" model)


def build_model(loaded: LoadedModel, series: str, opts: SploraOptions) -> nn.Module:
    """A private copy of the loaded model with SPLoRA layers (``finetune``: rank 0, trainable base)."""
    model = copy.deepcopy(loaded.model)
    if series == "finetune":
        return apply_splora(model, 0, 0.0, train_base=True, seed=opts.seed)
    return apply_splora(model, opts.rank, opts.init_range, train_base=False, seed=opts.seed)


def _tagged(callbacks: Sequence[Callback], **tags: Any) -> list[Callback]:
    def wrap(cb: Callback) -> Callback:
        return lambda e: cb(Event(e.kind, {**e.data, **tags}, e.time))

    return [wrap(cb) for cb in callbacks]


def _train(
    model: nn.Module,
    splits: Splits,
    series: str,
    opts: SploraOptions,
    *,
    epochs: int,
    lr: float,
    warmup: float,
    seed: int,
    callbacks: Sequence[Callback],
    cancel: CancelToken | None,
    checkpoint: Path | None = None,
    resume: bool = False,
    trainable: str | None = None,
) -> None:
    """One training phase (the adapter training, or one step's recovery) through :func:`studio.train.fit`;
    with ``checkpoint`` it saves every epoch and on cancel, and ``resume`` continues from it exactly.
    ``trainable``: what trains (default: the series' task parameters; ``head`` for the ViT protocol's warm-up)."""
    if epochs <= 0:
        return
    spec = TrainSpec(
        epochs=epochs,
        batch_size=opts.batch_size,
        lr=lr,
        warmup_epochs=warmup,
        seed=seed,
        trainable=trainable or trainable_rule(series == "finetune"),
        select="val",
        **opts.training,
    )
    fit(
        model,
        splits.train,
        splits.val,
        spec,
        hooks=[MaskHook()],
        callbacks=callbacks,
        cancel=cancel,
        checkpoint=checkpoint,
        resume=resume,
    )


def phase_checkpoint(checkpoint: Path | None, step: int) -> Path | None:
    """The training-loop checkpoint of one phase of a series (step 0: the adapter training, k: the k-th
    recovery), next to the series checkpoint: ``splora-<series>.pt`` -> ``splora-<series>.step<k>.pt``."""
    return None if checkpoint is None else checkpoint.with_name(f"{checkpoint.stem}.step{step}.pt")


def _record(
    series: SeriesResult,
    base: BaseArch,
    facts: Any,
    splits: Splits,
    opts: SploraOptions,
    step: int,
    t0: float,
    dense_cost: dict[str, int],
) -> dict[str, Any]:
    model, masks = series.model, series.masks
    plan = masks.to_plan(base)
    cost = plan_cost(plan, facts)
    kept = masks.kept(opts.scope)
    full = UnitMasks.full(base).kept(opts.scope)
    original = sum(full.values())
    learned = count_learned(model).total if series.name == "splora" else cost["params"]
    rec: dict[str, Any] = {
        "series": series.name,
        "step": step,
        "unit_density": sum(kept.values()) / original,
        "weight_density": weight_density(model),
        "params": cost["params"],
        "params_fraction": cost["params"] / dense_cost["params"],
        "macs": cost["macs"],
        "macs_fraction": cost["macs"] / dense_cost["macs"],
        "learned_params": learned,
        "kept": kept,
        # per unit type: a global ranking may empty one type long before another (the wide MLP first on DeiT)
        "density_by_unit": {k: kept[k] / full[k] for k in kept if full.get(k)},
    }
    ev = evaluate(model, splits.val, batch_size=256)
    rec.update(val_top1=ev.top1, val_loss=ev.loss)
    if splits.test is not None:
        rec["test_top1"] = evaluate(model, splits.test, batch_size=256).top1
    rec["seconds"] = time.time() - t0
    return rec


def run_series(
    loaded: LoadedModel,
    base: BaseArch,
    splits: Splits,
    name: str,
    opts: SploraOptions,
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
) -> SeriesResult:
    """Train, then prune-and-recover step by step down to the target density (one curve).

    With ``checkpoint``, the state after the initial training and after every finished step is saved there,
    and each training phase in between keeps its own training-loop checkpoint (:func:`phase_checkpoint`: weights,
    optimizer, learning-rate position, epoch, RNG state; saved every epoch and on cancel). ``resume`` continues
    from both: the finished steps are kept, an interrupted step redoes its (deterministic) scoring and continues
    its training where it stopped, so a resumed series equals an uninterrupted one on CPU.
    """

    t0 = time.time()
    cbs = _tagged(callbacks, series=name)
    lr = opts.lr_for(name)
    model = build_model(loaded, name, opts)
    masks = UnitMasks.full(base)
    series = SeriesResult(name, model, masks)
    facts = arch_facts(base)
    dense_cost = plan_cost(PrunePlan.dense(base), facts)
    original = sum(masks.kept(opts.scope).values())
    keep_final = max(1, math.ceil(opts.target_density * original - 1e-9))
    per_step = max(1, round(opts.prune_step * original))
    n_steps = math.ceil(max(0, original - keep_final) / per_step)
    if resume and checkpoint is not None and checkpoint.exists():
        done = _load_checkpoint(checkpoint, series, loaded, opts)
        emit(cbs, "log", message=f"[{name}] resumed after step {series.steps[-1]['step']}")
        if done:
            return series
        masks = series.masks
    else:
        emit(cbs, "log", message=f"[{name}] training for {opts.epochs} epochs (lr {lr:g})")
        # the ViT protocol trains the head alone for the first half (main_vit.py), then the task parameters
        warm = opts.epochs // 2 if opts.protocol == "vit" else 0
        if warm:
            _train(
                model,
                splits,
                name,
                opts,
                epochs=warm,
                lr=lr,
                warmup=0.0,
                seed=opts.seed,
                callbacks=_tagged(cbs, phase="train-head"),
                cancel=cancel,
                checkpoint=phase_checkpoint(checkpoint, 0).with_suffix(".head.pt") if checkpoint else None,
                resume=resume,
                trainable="head",
            )
        _train(
            model,
            splits,
            name,
            opts,
            epochs=opts.epochs - warm,
            lr=lr,
            warmup=min(1.0, opts.epochs / 3) if not warm else 0.0,
            seed=opts.seed,
            callbacks=_tagged(cbs, phase="train"),
            cancel=cancel,
            checkpoint=phase_checkpoint(checkpoint, 0),
            resume=resume,
        )
        series.dense = fuse_splora(copy.deepcopy(model)).eval()
        rec = _record(series, base, facts, splits, opts, 0, t0, dense_cost)
        series.steps.append(rec)
        emit(cbs, "prune_step", **rec)
        _save_checkpoint(checkpoint, series, done=False, phase=0)
    step = series.steps[-1]["step"]
    while sum(masks.kept(opts.scope).values()) > keep_final:
        check(cancel)
        step += 1
        alive = sum(masks.kept(opts.scope).values())
        n = min(per_step, alive - keep_final)
        batches = make_loader(splits.train, batch_size=opts.batch_size, shuffle=True, seed=opts.seed + step)
        scores = raw_scores(
            model, opts.criterion, batches, n_batches=opts.score_batches, callbacks=cbs, cancel=cancel
        )
        chosen = choose_pruned(scores, masks, opts.scope, n, opts.criterion, opts.selection)
        if not chosen:
            emit(cbs, "log", message=f"[{name}] every layer is down to one unit; stopping at step {step}")
            break
        for key, idx in chosen.items():
            masks.get(key)[idx] = False
        masks.apply(model)
        zero_pruned(model)
        _train(
            model,
            splits,
            name,
            opts,
            epochs=opts.recovery_epochs,
            lr=lr * RECOVERY_LR_FACTOR,
            warmup=0.0,
            seed=opts.seed + step,
            callbacks=_tagged(cbs, phase="recover", step=step),
            cancel=cancel,
            checkpoint=phase_checkpoint(checkpoint, step),
            resume=resume,
        )
        rec = _record(series, base, facts, splits, opts, step, t0, dense_cost)
        series.steps.append(rec)
        emit(cbs, "prune_step", **rec)
        _save_checkpoint(checkpoint, series, done=False, phase=step)
        progress(cbs, f"{name} schedule", step, n_steps)
        emit(
            cbs,
            "log",
            message=f"[{name}] step {step}: unit density {rec['unit_density']:.3f}, "
            f"val top-1 {rec['val_top1']:.4f}, learned params {rec['learned_params']:,}",
        )
    _save_checkpoint(checkpoint, series, done=True)
    return series


def _save_checkpoint(
    path: Path | None, series: SeriesResult, *, done: bool, phase: int | None = None
) -> None:
    """Model (masks included), unit masks, the dense fused model and the curve so far; loadable without pickles.

    ``phase``: the step just finished, whose training-loop checkpoint is removed once this one is written (the
    series checkpoint now holds everything that phase produced).
    """
    if path is None:
        return
    assert series.dense is not None
    payload = {
        "model": series.model.state_dict(),
        "masks": series.masks.to_tensors(),
        "dense": series.dense.state_dict(),
        "steps": json.dumps(series.steps),
        "done": done,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if phase is not None:
        ckpt = phase_checkpoint(path, phase)
        assert ckpt is not None
        ckpt.unlink(missing_ok=True)


def _load_checkpoint(path: Path, series: SeriesResult, loaded: LoadedModel, opts: SploraOptions) -> bool:
    try:
        p = torch.load(path, map_location=loaded.device, weights_only=True)
        series.masks = UnitMasks.from_tensors(
            {k: v.cpu() for k, v in p["masks"].items()}, len(series.model.blocks)
        )
        series.masks.apply(series.model)
        series.model.load_state_dict(p["model"])
        series.dense = fuse_splora(build_model(loaded, series.name, opts)).eval()
        series.dense.load_state_dict(p["dense"])
        series.steps = json.loads(p["steps"])
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise StudioError(
            f"SPLoRA checkpoint {path} cannot be used ({str(e)[:120]}); delete it to start over, "
            "or start a new run with the same options."
        ) from None
    return bool(p["done"])


# ----------------------------------------------------------------------------------------------- export
def fused_pruned(
    series: SeriesResult, base: BaseArch, params: Mapping[str, Any] | None = None
) -> tuple[nn.Module, PrunePlan]:
    """Adapters fused into the weights, then the pruned channels physically removed by the studio's surgery."""

    plan = with_summary(series.masks.to_plan(base, method="splora", params=params))
    fused = fuse_splora(copy.deepcopy(series.model)).eval()
    return apply_plan(fused, plan).eval(), plan


@torch.no_grad()
def parity(masked: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    """max |logits(masked adapter model) − logits(fused + physically pruned model)|."""
    was = masked.training
    masked.eval()
    a = logits_of(masked, x).float()
    b = logits_of(pruned.eval(), x).float()
    masked.train(was)
    return float((a - b).abs().max())


def task_tensors(model: nn.Module, masks: UnitMasks) -> dict[str, torch.Tensor]:
    """The compact per-task form: unit masks + ``A[:, m_in]``, ``B[m_out]``, ``b[m_out]`` of every adapted layer,
    the norms' kept channels and the classifier over the kept features. Everything else is the shared backbone."""
    t: dict[str, torch.Tensor] = {k: v.to(torch.uint8) for k, v in masks.to_tensors().items()}
    for name, layer in splora_layers(model):
        if layer.lora_A is None or layer.lora_B is None:
            raise StudioError("The compact task form is for SPLoRA models (rank > 0), not fine-pruning.")
        ki, ko = layer.kept_in(), layer.kept_out()
        t[f"{name}.lora_A"] = layer.lora_A.detach()[:, ki]
        t[f"{name}.lora_B"] = layer.lora_B.detach()[ko]
        if layer.bias is not None:
            t[f"{name}.bias"] = layer.bias.detach()[ko]
    keep_e = torch.nonzero(masks.embed).flatten()
    for name, norm in masked_norms(model):
        for pname, p in norm.norm.named_parameters():
            t[f"{name}.{pname}"] = p.detach()[keep_e.to(p.device)]
    for hname in ("head", "head_dist"):
        lin = getattr(model, hname, None)
        if isinstance(lin, nn.Linear):
            t[f"{hname}.weight"] = lin.weight.detach()[:, keep_e.to(lin.weight.device)]
            if lin.bias is not None:
                t[f"{hname}.bias"] = lin.bias.detach()
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def learned_in_task(tensors: Mapping[str, torch.Tensor]) -> int:
    """Parameters stored in a compact task (everything but the masks)."""
    return sum(v.numel() for k, v in tensors.items() if not k.startswith("mask."))


def save_task(
    folder: str | Path,
    model: nn.Module,
    masks: UnitMasks,
    *,
    backbone: Mapping[str, Any],
    opts: SploraOptions,
    plan: PrunePlan,
) -> dict[str, Any]:
    """Write ``task.safetensors`` + ``task.json``; return ``{"path", "bytes", "learned_params", "tensors"}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = task_tensors(model, masks)
    with atomic_path(folder / TASK_WEIGHTS) as tmp:
        save_file(t, str(tmp), metadata={"schema": TASK_SCHEMA})
    size = (folder / TASK_WEIGHTS).stat().st_size
    ranks = sorted({layer.rank for _, layer in splora_layers(model)})
    info = {"path": str(folder), "bytes": size, "learned_params": learned_in_task(t), "tensors": len(t)}
    write_json(
        folder / TASK_MANIFEST,
        {
            "schema": TASK_SCHEMA,
            "backbone": dict(backbone),
            "rank": opts.rank,
            "ranks": ranks,
            "init_range": opts.init_range,
            "plan": plan.to_dict(),
            **info,
        },
    )
    return info


def load_task(folder: str | Path, backbone: LoadedModel | None = None) -> tuple[nn.Module, PrunePlan]:
    """Rebuild a task's masked SPLoRA model from the shared backbone and the compact task file.

    Args:
        backbone: the frozen backbone (loaded from the task's recorded model spec when omitted); never mutated.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / TASK_MANIFEST)
    if meta.get("schema") != TASK_SCHEMA:
        raise StudioError(f"{folder / TASK_MANIFEST} is not a SPLoRA task manifest.")
    plan = PrunePlan.from_dict(meta["plan"])
    loaded = backbone or load_model(ModelSpec.from_dict(meta["backbone"]))
    t = load_file(str(folder / TASK_WEIGHTS))
    model = copy.deepcopy(loaded.model)
    if getattr(model, "num_classes", None) != plan.base.num_classes:
        model.reset_classifier(plan.base.num_classes)
    model = apply_splora(model, float(meta["rank"]), float(meta["init_range"]))
    masks = UnitMasks.from_tensors(t, plan.base.depth)
    masks.apply(model)
    keep_e = torch.nonzero(masks.embed).flatten()
    with torch.no_grad():
        for name, layer in splora_layers(model):
            ki, ko = layer.kept_in(), layer.kept_out()
            assert layer.lora_A is not None and layer.lora_B is not None
            layer.lora_A.zero_()[:, ki] = t[f"{name}.lora_A"].to(layer.lora_A)
            layer.lora_B.zero_()[ko] = t[f"{name}.lora_B"].to(layer.lora_B)
            if layer.bias is not None:
                layer.bias.zero_()[ko] = t[f"{name}.bias"].to(layer.bias)
        for name, norm in masked_norms(model):
            for pname, p in norm.norm.named_parameters():
                p[keep_e.to(p.device)] = t[f"{name}.{pname}"].to(p)
        for hname in ("head", "head_dist"):
            lin = getattr(model, hname, None)
            if isinstance(lin, nn.Linear):
                lin.weight.zero_()[:, keep_e.to(lin.weight.device)] = t[f"{hname}.weight"].to(lin.weight)
                if lin.bias is not None:
                    lin.bias.copy_(t[f"{hname}.bias"])
    return model.eval(), plan


def stream_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = [(f"blocks.{i}.{n}", getattr(b, n)) for i, b in enumerate(model.blocks) for n in ("norm1", "norm2")]
    out += [(n, getattr(model, n)) for n in ("norm", "fc_norm", "norm_pre") if hasattr(model, n)]
    return out


# ------------------------------------------------------------------------------------------ for the page
SERIES_LABELS = {"splora": "SPLoRA", "finetune": "fine-pruning"}


def read_curves(run: RunDir) -> list[dict[str, Any]]:
    """Every ``prune_step`` record of a run (live while it runs), oldest first."""
    return [dict(e.get("data", {})) for e in run.events("prune_step")]


def is_splora_run(run: RunDir) -> bool:
    try:
        spec = run.spec()
    except StudioError:
        return False
    return spec.get("method") == "splora"


def curve_rows(runs: Sequence[RunDir]) -> list[dict[str, Any]]:
    """The curves of several runs as flat rows: ``run``, ``series`` (a label; prefixed by the run when there are
    several), the step record, and ``top1`` (test accuracy when evaluated, else validation)."""
    rows = []
    for run in runs:
        for rec in read_curves(run):
            name = SERIES_LABELS.get(rec.get("series", ""), str(rec.get("series")))
            row = {k: v for k, v in rec.items() if k not in ("series", "kept")}
            row.update(run=run.path.name, series=name if len(runs) == 1 else f"{run.path.name} · {name}")
            row["top1"] = rec.get("test_top1", rec.get("val_top1"))
            rows.append(row)
    return rows


def at_densities(
    rows: Sequence[Mapping[str, Any]], targets: Sequence[float] = (0.7, 0.5, 0.3), tolerance: float = 0.051
) -> list[dict[str, Any]]:
    """Per series, the recorded step nearest to each target unit density (within ``tolerance``): the paper's
    "accuracy at equal density" table."""
    out = []
    for series in dict.fromkeys(r["series"] for r in rows):
        part = [r for r in rows if r["series"] == series]
        for t in targets:
            best = min(part, key=lambda r: abs(r["unit_density"] - t))
            if abs(best["unit_density"] - t) <= tolerance:
                out.append({"series": series, "target": t, **best})
    return out


# ------------------------------------------------------------------------------------------ registration
def unit_refusals(model: nn.Module) -> dict[str, str]:
    """:attr:`Method.unit_refusals` of SPLoRA: units whose masked form a norm would undo.

    SPLoRA trains with masks on the adapted layers' rows and the residual LayerNorms; a norm after a masked
    output renormalises its zeros, so the masked model would not be the pruned one: head dims under qk-norm,
    heads and head dims under an attention-output norm, MLP neurons under a hidden norm, and the embedding
    under an attention-pool head (its norm and MLP are not masked). The paper has no rule for them.
    """
    out: dict[str, str] = {}

    def no(units: tuple[str, ...], what: str) -> None:
        for u in units:
            out.setdefault(
                u,
                f"SPLoRA cannot mask {u.replace('_', ' ')} of this model exactly ({what}): drop '{u}' from --scope "
                "(e.g. --scope mlp), or prune it with another method.",
            )

    for blk in getattr(model, "blocks", ()):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if attn is not None and not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
            no(("head_dims",), "qk-norm normalises the masked q/k dims")
        if getattr(attn, "rope", None) is not None:
            no(("head_dims",), "EVA-02's rotary embedding rotates head dims in pairs")
        if attn is not None and not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            no(("heads", "head_dims"), "a norm over the attention output, scale_attn_norm")
        if mlp is not None and not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            no(("mlp",), "a norm over the MLP's hidden units, scale_mlp_norm")
    if getattr(model, "attn_pool", None) is not None:
        no(("embed",), "the attention-pool head reads and writes the embedding unmasked")
    glu = next(
        (type(b.mlp).__name__ for b in getattr(model, "blocks", ()) if type(b.mlp).__name__ != "Mlp"), None
    )
    if glu is not None:  # its adapters wrap fc1 as one linear whose rows are the neurons
        why = (
            f"SPLoRA's adapters are built for timm's Mlp (one fc1 row per neuron), not a {glu}: prune this model "
            "with another method (Isomorphic, SAViT, the baselines)."
        )
        out.update(dict.fromkeys(SCOPES, why))
    return out


METHODS.add(
    "splora",
    Method(
        "splora",
        None,
        "SPLoRA (Hedegaard et al.): low-rank adapters over a frozen backbone + iterative channel pruning; "
        "--mode finetune / --compare for the fine-pruning baseline",
        options=OPTIONS,
        needs_data=True,
        budgets=(Budget("target_density", "Fraction of the prunable units to keep", 0.05, 1.0, 0.3, 0.05),),
        rounds=False,
        flow="splora",
        check=SploraOptions.from_params,
        unit_refusals=unit_refusals,
        selects=lambda p: parse_scope(p["scope"]),
    ),
)
