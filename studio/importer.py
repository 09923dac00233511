"""Bring a published pruned model in safely: a whole pickled timm ViT (``torch.save(model)``) -> a studio export.

Isomorphic pruning's released DeiTs and every Torch-Pruning output are whole pickled modules, which the rest of
the studio refuses (unpickling can run any code). This is the one guarded place that reads them:

1. **Allow-list, nothing else runs.** Before anything is unpickled, the archive's pickle is scanned without
   executing it (``torch.serialization.get_unsafe_globals_in_checkpoint``) and every global it names must be on
   :data:`ALLOWED` (timm's VisionTransformer-family module classes, the ``torch.nn`` layers they are built of;
   tensor rebuild functions and containers are torch's own ``weights_only`` defaults). A file naming anything
   else is refused with a one-sentence :class:`StudioError` naming the class. Then it is loaded with torch's
   ``weights_only=True`` unpickler inside ``safe_globals(ALLOWED)``, which refuses the same globals a second time
   should the scan have missed one (e.g. a legacy non-zip file the scan cannot read).
2. **Read the structure off the module.** Per block: kept heads and head width (``attn.num_heads`` /
   ``head_dim``, which Torch-Pruning's users update), MLP hidden (``fc1``), and the embedding width (the patch
   conv). They are checked against the weights' own shapes (a stale ``num_heads`` is refused).
3. **Map it onto the unpruned base** (:class:`~studio.plan.BaseArch`): the architecture named by the user
   (``--arch``), else the one the pickled module records (``pretrained_cfg['architecture']``), else the unique
   timm ViT/DeiT whose structure fits the sizes; constructor kwargs from the user, else the module's own
   ``_model_args``, with image size and classes read off the weights. The plan keeps indices ``0..k-1``: the
   weights are already compacted, so a kept index is a position in the pruned tensors, not a base unit
   (``params.compacted`` says so).
4. **Write a normal export** (:func:`studio.export.export`: safetensors + manifest with checksum), reload it the
   way every export loads, and check it gives the pickled module's logits (``parity``); then it evaluates,
   benchmarks and retrains like any export.

Attention temperature: the rebuilt model always computes ``softmax(q k^T / sqrt(d_kept))`` (timm's fused SDPA
reads the head width off ``q``). A pickled module running unfused with another ``attn.scale`` (e.g. the base's
``1/sqrt(d)`` left in place) has that factor folded into its ``q`` rows, so the export computes what the pickled
module computed; ``scale_policy`` records which temperature that was (``keep``: the base one, ``reset``: the
kept width's).
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import pickletools
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed
from timm.layers.attention import Attention
from timm.layers.format import Format
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .costs import with_summary
from .errors import StudioError
from .export import export, load_exported
from .models import create_vit, data_config, describe_base
from .plan import BaseArch, BlockPlan, PrunePlan
from .surgery import apply_plan, check_supported

# --------------------------------------------------------------------------------------------- allow-list
# The classes a pickled timm ViT/DeiT is built of (what ``type(m)`` is over ``model.modules()`` of ViT, ViT with
# LayerScale and DropPath, and distilled DeiT), plus the Format enum PatchEmbed stores. Nothing that is a
# function: only classes, whose construction runs no code from the pickle (``__new__`` + ``__setstate__``).
_TIMM_CLASSES: tuple[type, ...] = (
    VisionTransformer,
    VisionTransformerDistilled,
    Block,
    Attention,
    Mlp,
    PatchEmbed,
    LayerScale,
    DropPath,
    LayerNorm,
    Format,
)
_TORCH_LAYERS: tuple[type, ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.LayerNorm,  # timm before 1.0 built ViTs with torch's own LayerNorm
    nn.GELU,
    nn.Dropout,
    nn.Identity,
    nn.Sequential,
    nn.ModuleList,
)
# Where older timm versions defined the same classes (pickles name a class by its module path at save time):
# Isomorphic's released DeiTs and Torch-Pruning examples were saved with timm 0.6-0.9.
_OLD_PATHS: dict[str, type] = {
    "timm.models.vision_transformer.Attention": Attention,
    "timm.models.vision_transformer.LayerScale": LayerScale,
    "timm.models.layers.mlp.Mlp": Mlp,
    "timm.models.layers.patch_embed.PatchEmbed": PatchEmbed,
    "timm.models.layers.drop.DropPath": DropPath,
    "timm.models.layers.format.Format": Format,
}


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


ALLOWED: tuple[type | tuple[type, str], ...] = (
    *_TIMM_CLASSES,
    *_TORCH_LAYERS,
    *((cls, name) for name, cls in _OLD_PATHS.items()),
)
ALLOWED_NAMES: frozenset[str] = frozenset(
    {_path(c) for c in (*_TIMM_CLASSES, *_TORCH_LAYERS)} | set(_OLD_PATHS)
)
PARITY_ATOL = 1e-4  # logits of the export vs the pickled module (float32, same weights; summation order only)


# --------------------------------------------------------------------------------------------- reading
def scan_globals(path: Path) -> list[str]:
    """Every global the file's pickles name that torch's own ``weights_only`` loader would refuse, read from their
    opcodes without executing any of them.

    A ``torch.save`` zip archive is read by torch's scanner; anything else (torch's legacy pre-1.6 format, a raw
    ``pickle.dumps``) by walking its leading pickles with :mod:`pickletools`.
    """
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception as e:  # damaged archives raise several types
            raise StudioError(f"{path.name} is not a readable PyTorch file ({str(e)[:100]}).") from None
    names: list[str] = []
    with open(path, "rb") as f:
        for _ in range(4):  # legacy torch.save: magic number, protocol, system info, then the object itself
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL":  # protocol 4+: module and name were pushed just before
                        names.append(".".join(strings[-2:]) if len(strings) >= 2 else "an unnamed global")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # past the pickles (raw storage bytes) or damaged: the loader decides
                break
    default = set(_torch_default_globals())
    # protocol 2 spells builtins the Python 2 way; the unpickler maps them back (fix_imports)
    names = [re.sub(r"^__builtin__\.", "builtins.", re.sub(r"^copy_reg\.", "copyreg.", n)) for n in names]
    return [n for n in names if n not in default]


def _torch_default_globals() -> list[str]:
    """What torch's ``weights_only`` loader allows by itself (tensor rebuilds, storages, containers, dtypes)."""
    from torch import _weights_only_unpickler

    return list(_weights_only_unpickler._get_allowed_globals())


def _refusal(path: Path, name: str) -> StudioError:
    return StudioError(
        f"{path.name} was refused and nothing in it was run: it holds {name}, which is not one of the timm "
        "ViT/DeiT module classes or torch.nn layers a pruned model is made of."
    )


def load_pickled_module(path: str | Path) -> nn.Module:
    """Unpickle a whole-module ``torch.save`` file through the allow-list (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"{path} does not exist or is not a file.")
    for name in scan_globals(path):
        if name not in ALLOWED_NAMES:
            raise _refusal(path, name)
    try:
        # safe_globals, not add_safe_globals: the widening lasts only for this load, so every other torch.load
        # in the process (state-dict checkpoints) keeps refusing module pickles
        with torch.serialization.safe_globals(list(ALLOWED)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "persistent_load" in str(e):  # legacy format: whole modules were saved with their source code
            raise StudioError(
                f"{path.name} is in torch's legacy (pre-1.6) format, which stores modules with their source code "
                "and cannot be read without running it; save it again with a current torch.save(model, path)."
            ) from None
        m = re.search(r"GLOBAL (\S+)", str(e))
        raise _refusal(path, m.group(1) if m else "an object outside the allow-list") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise StudioError(
            f"{path.name} is not a readable PyTorch file ({str(e).splitlines()[0][:100]})."
        ) from None
    if not isinstance(obj, VisionTransformer):
        raise StudioError(
            f"{path.name} holds a {type(obj).__name__}, not a whole timm VisionTransformer; a state dict is "
            "loaded with --model FILE --arch ARCH instead."
        )
    _refuse_hooks(obj, path)
    return obj.eval()


def _refuse_hooks(model: nn.Module, path: Path) -> None:
    """Hooks or a per-instance ``forward`` would make the module compute something its class does not say; they
    can only hold allow-listed objects, but a faithful import reads structure and weights, so refuse them."""
    for name, mod in model.named_modules():
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        if any(getattr(mod, h, None) for h in hooks) or "forward" in vars(mod):
            raise StudioError(
                f"{path.name} was refused: its module '{name or 'model'}' carries hooks or its own forward, so "
                "its weights alone do not say what it computes."
            )


@dataclass(frozen=True)
class Widths:
    """The kept structure read off a pruned module: embedding width and, per block, heads, head width, MLP."""

    embed: int
    heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    mlp: tuple[int, ...]
    scales: tuple[float, ...] = field(default=())  # each block's effective attention scale

    @property
    def depth(self) -> int:
        return len(self.heads)

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed": self.embed,
            "blocks": [
                {"heads": h, "head_dim": d, "mlp": m} for h, d, m in zip(self.heads, self.head_dims, self.mlp)
            ],
        }


def read_widths(model: nn.Module) -> Widths:
    """Per-block kept widths of a (pruned) timm ViT, each checked against the weights it describes."""
    vit = check_supported(model)
    E = int(vit.patch_embed.proj.weight.shape[0])
    heads, dims, mlp, scales = [], [], [], []
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        H, d = int(a.num_heads), int(getattr(a, "head_dim", a.qkv.out_features // (3 * max(a.num_heads, 1))))
        if a.qkv.out_features != 3 * H * d or a.proj.in_features != H * d:
            raise StudioError(
                f"Block {i} says it has {H} heads of width {d}, but its qkv has {a.qkv.out_features} outputs "
                f"(3 x {a.qkv.out_features // 3}): set attn.num_heads and attn.head_dim after pruning, as "
                "Torch-Pruning's ViT example does, and save it again."
            )
        widths = {
            "qkv input": a.qkv.in_features,
            "proj output": a.proj.out_features,
            "fc1 input": blk.mlp.fc1.in_features,
            "fc2 output": blk.mlp.fc2.out_features,
        }
        for what, w in widths.items():
            if w != E:
                raise StudioError(
                    f"Block {i}'s {what} is {w} wide but the embedding is {E}: only models whose residual "
                    "stream is pruned as one (Torch-Pruning, Isomorphic) can be imported."
                )
        heads.append(H)
        dims.append(d)
        mlp.append(int(blk.mlp.fc1.out_features))
        # what the module computes: fused SDPA divides by sqrt(q's width); the explicit path multiplies by scale
        fused = bool(getattr(a, "fused_attn", False))
        scales.append(d**-0.5 if fused else float(getattr(a, "scale", d**-0.5)))
    return Widths(E, tuple(heads), tuple(dims), tuple(mlp), tuple(scales))


# --------------------------------------------------------------------------------------------- the base
def _structure_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """Constructor arguments the pruned weights fix whatever the base: input size, patch size and classes.

    Not depth: a model with fewer blocks than its base was depth-pruned, which the weights cannot say how."""
    pe = model.patch_embed
    img = tuple(int(v) for v in pe.img_size)
    patch = tuple(int(v) for v in pe.proj.kernel_size)
    return {
        "img_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": patch[0] if patch[0] == patch[1] else list(patch),
        "num_classes": int(model.num_classes),
    }


def plan_for(base: BaseArch, w: Widths, *, source: str) -> PrunePlan:
    """The plan that gives ``base`` the widths ``w``, keeping positions 0..k-1 (the weights are compacted)."""
    if w.depth != base.depth:
        raise StudioError(
            f"The pruned model has {w.depth} blocks but {base.arch} has {base.depth}: give the base's depth "
            "in --timm-kwargs, or the matching --arch."
        )

    def keep(k: int, n: int, what: str) -> tuple[int, ...] | None:
        if k > n:
            raise StudioError(
                f"The pruned model keeps {k} {what} where {base.arch} has only {n}: it was not pruned from "
                "this architecture; give the right --arch."
            )
        return None if k == n else tuple(range(k))

    blocks = tuple(
        BlockPlan(
            i,
            heads=keep(w.heads[i], base.num_heads[i], f"heads in block {i}"),
            head_dims=keep(w.head_dims[i], base.head_dim, f"head dims in block {i}"),
            mlp=keep(w.mlp[i], base.mlp_hidden[i], f"MLP neurons in block {i}"),
        )
        for i in range(base.depth)
    )
    base_scale = base.head_dim**-0.5
    pruned_dims = [i for i in range(base.depth) if w.head_dims[i] < base.head_dim]
    keeps_base = bool(pruned_dims) and all(math.isclose(w.scales[i], base_scale) for i in pruned_dims)
    return PrunePlan(
        base=base,
        blocks=blocks,
        embed=keep(w.embed, base.embed_dim, "embedding channels"),
        method="imported",
        params={"source": source, "compacted": True},
        scale_policy="keep" if keeps_base else "reset",
    ).validate()


def _meta_vit(arch: str, kwargs: Mapping[str, Any]) -> VisionTransformer:
    """The architecture on the meta device: sizes only, no memory, and no weight init (timm's truncated normal
    takes most of a second per model on meta, and detection builds a dozen)."""
    from timm.models import is_model, model_entrypoint

    no_init = is_model(arch) and model_entrypoint(arch).__module__.endswith((".eva", ".beit"))
    skip = {} if no_init else {"weight_init": "skip"}  # timm's Eva and Beit take no weight_init
    with torch.device("meta"):
        return create_vit(arch, **{**kwargs, **skip})


def _base_of(arch: str, kwargs: Mapping[str, Any]) -> BaseArch:
    return describe_base(_meta_vit(arch, kwargs), arch, kwargs)


def _expected_shapes(plan: PrunePlan) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes the export of ``plan`` will have (the shared surgery, on the meta device)."""
    with torch.device("meta"):
        m = apply_plan(_meta_vit(plan.base.arch, plan.base.kwargs), plan)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _mismatch(plan: PrunePlan, sd: Mapping[str, torch.Tensor]) -> str | None:
    """None when ``sd`` is exactly the state dict ``plan`` builds, else the first difference, in words."""
    want = _expected_shapes(plan)
    for k in sorted(set(want) | set(sd)):
        if k not in sd:
            return f"the pruned model has no '{k}'"
        if k not in want:
            return f"the pruned model has '{k}', which {plan.base.arch} does not"
        if tuple(sd[k].shape) != want[k]:
            return f"'{k}' is {tuple(sd[k].shape)} where the plan gives {want[k]}"
    return None


def resolve_base(
    model: VisionTransformer,
    w: Widths,
    sd: Mapping[str, torch.Tensor],
    arch: str | None,
    kwargs: Mapping[str, Any],
) -> tuple[PrunePlan, str]:
    """The plan on the matching unpruned base, and how the base was found (``given``, ``recorded``, ``detected``).

    ``detected``: the smallest timm ViT/DeiT (by parameters) whose surgery gives exactly the module's state-dict
    shapes; among equal-sized ones (``vit_tiny_patch16_224`` / ``deit_tiny_patch16_224``) the first by name.
    """
    recorded = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    structural = _structure_kwargs(model)
    source = "given" if arch else "recorded" if recorded else "detected"
    if arch or recorded:
        name = str(arch or recorded)
        own = getattr(model, "_model_args", None)
        # the module's own constructor args only describe the named base when it is the one it was built as
        base_kw = dict(own) if isinstance(own, Mapping) and name == recorded and not kwargs else {}
        kw = {**base_kw, **dict(kwargs), **structural}
        plan = plan_for(_base_of(name, kw), w, source="pickled module")
        why = _mismatch(plan, sd)
        if why:
            raise StudioError(
                f"The pruned model does not fit {name} with {kw}: {why}; give the architecture it was pruned "
                "from with --arch (and its sizes with --timm-kwargs)."
            )
        return plan, source
    fits = []
    patch = structural["patch_size"]
    for name in _candidates(patch if isinstance(patch, int) else patch[0]):
        try:  # a candidate that cannot even be built with these sizes, or cut to these widths, does not fit
            plan = plan_for(_base_of(name, {**dict(kwargs), **structural}), w, source="pickled module")
            if _mismatch(plan, sd) is None:
                fits.append(plan)
        except (StudioError, TypeError, ValueError, RuntimeError, AssertionError, KeyError):
            continue
    if not fits:
        raise StudioError(
            "No timm ViT/DeiT architecture fits the pruned model's sizes; give the one it was pruned from with "
            "--arch (and its sizes with --timm-kwargs)."
        )
    # every larger base fits a model pruned from a smaller one; the smallest fitting base is the likeliest, and
    # the choice changes only what the kept fractions are relative to, never the weights (parity is checked)
    fits.sort(key=lambda p: (p.base.embed_dim, sum(p.base.mlp_hidden), sum(p.base.num_heads), p.base.arch))
    return fits[0], source


_CANONICAL = re.compile(
    r"(vit|deit|deit3)_(tiny|small|medium|base|large|huge|giant)_(distilled_)?patch(\d+)_(\d+)"
)


def _candidates(patch: int) -> list[str]:
    """The canonical timm ViT/DeiT/DeiT-III architectures with this patch size, one per input resolution family
    (the image size is forced to the model's own, so ``_224`` and ``_384`` variants build the same network)."""
    seen: dict[str, str] = {}
    for name in timm.list_models(f"*patch{patch}_*"):
        m = _CANONICAL.fullmatch(name)
        if m and int(m.group(4)) == patch:
            seen.setdefault(name[: m.start(5)], name)
    return sorted(seen.values())


# --------------------------------------------------------------------------------------------- import
@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_pruned` wrote: the export folder, its plan, how the base was found, and the parity."""

    out: str
    plan: PrunePlan
    widths: Widths
    base_from: str
    sha256: str
    parity_max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "arch": self.plan.base.arch,
            "base_from": self.base_from,
            "sha256": self.sha256,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "widths": self.widths.to_dict(),
            "summary": dict(self.plan.summary),
            "plan": self.plan.to_dict(),
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folded_state_dict(model: VisionTransformer, w: Widths) -> dict[str, torch.Tensor]:
    """The module's weights with each block's attention scale folded into q, so ``q k^T / sqrt(d_kept)`` (what the
    rebuilt model computes) equals what the module computed."""
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    for i in range(len(model.blocks)):
        r = w.scales[i] * math.sqrt(w.head_dims[i])
        if math.isclose(r, 1.0, rel_tol=0, abs_tol=1e-12):
            continue  # untouched: bit-for-bit the module's weights
        a = w.heads[i] * w.head_dims[i]
        for name in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{name}"
            if key in sd:
                sd[key][:a] *= r
    return sd


def import_pruned(
    path: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import a whole pickled pruned timm ViT (``torch.save(model)``) as a studio export in ``out``.

    Args:
        path: the pickled module (refused unless every class in it is on :data:`ALLOWED`).
        arch: the timm architecture it was pruned from (default: recorded in the module, else detected).
        kwargs: timm constructor arguments of that base (default: the module's recorded ones).
        class_names: the classes in label order, when known.
    """
    path = Path(path)
    model = load_pickled_module(path)
    w = read_widths(model)
    sd = _folded_state_dict(model, w)
    plan, base_from = resolve_base(model, w, sd, arch, dict(kwargs or {}))
    plan = with_summary(plan)
    digest = _sha256(path)
    plan = plan.with_(params={**plan.params, "source": path.name, "sha256": digest, "base_from": base_from})
    built = create_vit(plan.base.arch, **plan.base.kwargs)
    built = apply_plan(built, plan).eval()
    built.load_state_dict(sd, strict=True)
    cfg = data_config(model) if getattr(model, "pretrained_cfg", None) else data_config(built)
    if class_names is not None and len(class_names) != plan.base.num_classes:
        raise StudioError(
            f"{len(class_names)} class names were given but the model has {plan.base.num_classes} classes."
        )
    out = Path(out)
    export(
        built,
        plan.base,
        out,
        plan=plan,
        data_config=cfg,
        class_names=list(class_names) if class_names else None,
        extra={"imported": {"source": path.name, "sha256": digest, "base_from": base_from}},
        overwrite=overwrite,
    )
    # the export as every export loads (checksums, strict weights), against the pickled module
    diff = _parity(model, load_exported(out, device="cpu").model, cfg["input_size"])
    if not diff <= PARITY_ATOL:
        shutil.rmtree(out, ignore_errors=True)
        raise StudioError(
            f"The converted export differs from the pickled module by {diff:.3g} in its logits, so it was not "
            "kept; report the model's configuration."
        )
    return ImportResult(str(out), plan, w, base_from, digest, diff)


@torch.inference_mode()
def _parity(source: nn.Module, rebuilt: nn.Module, input_size: Sequence[int]) -> float:
    x = torch.randn(2, *list(input_size)[-3:], generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(source).float().eval()(x)
    return float((rebuilt.float().eval()(x) - ref).abs().max())
