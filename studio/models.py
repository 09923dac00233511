"""Loading fine-tuned timm ViT/DeiT models from every supported source, with errors that say how to fix them.

Sources (``ModelSpec.source``):
- ``demo``: the embedded digits ViT (``assets/demo/finetuned``); ``demo-backbone``: its backbone pre-trained on
  procedural shapes, before fine-tuning (SLS, P3B and SPLoRA start from a frozen/pre-trained backbone);
- a checkpoint file with ``arch``: ``.safetensors``, ``.pth``/``.pt``/``.bin`` (state dict, ``weights_only=True``;
  nested ``model``/``state_dict`` keys unwrapped), or Google's original ViT ``.npz``;
- an exported studio model folder (``manifest.json`` + ``model.safetensors``), pruned or not.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from . import families
from .errors import StudioError
from .eva import convert_eva
from .parallel import PARALLEL_TYPES, split_parallel
from .plan import BaseArch, PrunePlan
from .relpos import REBUILT_TYPES, convert_relpos

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo"
DEMO_SOURCES = {"demo": DEMO_DIR / "finetuned", "demo-backbone": DEMO_DIR / "backbone"}

# The embedded demo: 12 blocks so depth analyses mean something, small enough to train on 2 CPU cores.
DEMO_ARCH = "vit_tiny_patch16_224"
DEMO_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=96, depth=12, num_heads=3)


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``None`` fields are resolved from the checkpoint or the model's own config.

    Attributes:
        source: ``demo``, ``demo-backbone``, a checkpoint file, or an exported model folder.
        arch: timm architecture name (needed for checkpoint files).
        num_classes: classifier size; inferred from the checkpoint's head when omitted.
        img_size: input resolution, when it differs from the architecture's default.
        reset_head: drop the checkpoint's classifier and start a fresh one of ``num_classes``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        data: data-config overrides (``mean``, ``std``, ``interpolation``, ``crop_pct``).
        kwargs: extra timm constructor arguments (``patch_size``, ``embed_dim``, ...).
        convpass_scale: the scale ``s`` of the Convpass adapters a PETL-tuned checkpoint carries (the SLS
            reference sets it per dataset); the checkpoint itself does not record it.
    """

    source: str = "demo"
    arch: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    reset_head: bool = False
    device: str = "auto"
    data: Mapping[str, Any] = field(default_factory=dict)
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    convpass_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "img_size": self.img_size,
            "reset_head": self.reset_head,
            "device": self.device,
            "data": dict(self.data),
            "kwargs": dict(self.kwargs),
            "convpass_scale": self.convpass_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)


@dataclass
class LoadedModel:
    """A model ready for the engine: the module (eval mode, on its device) and everything needed to rebuild it."""

    model: VisionTransformer
    base: BaseArch
    data_config: dict[str, Any]
    class_names: list[str]
    device: torch.device
    plan: PrunePlan | None = None
    source: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # whether ``class_names`` are the classes the model was trained with (recorded in its export, or given),
    # rather than the placeholders "0".."N-1" of a bare checkpoint or a fresh classifier
    class_names_known: bool = False

    @property
    def name(self) -> str:
        return self.source

    @property
    def known_class_names(self) -> list[str] | None:
        """The model's class names where they are known (what data is checked against), else None."""
        return list(self.class_names) if self.class_names_known else None

    @classmethod
    def from_module(
        cls,
        model: VisionTransformer,
        arch: str,
        kwargs: Mapping[str, Any],
        *,
        data: Mapping[str, Any] | None = None,
        class_names: list[str] | None = None,
        source: str = "in-memory",
    ) -> LoadedModel:
        """Wrap a timm ViT built in memory with ``timm.create_model(arch, **kwargs)`` (unpruned)."""
        return cls(
            model=model,
            base=describe_base(model, arch, kwargs),
            data_config=dict(data) if data is not None else data_config(model),
            class_names=class_names or [str(i) for i in range(model.num_classes)],
            device=next(model.parameters()).device,
            source=source,
            class_names_known=bool(class_names),
        )


# ---------------------------------------------------------------------------------------------------------
def describe_base(model: VisionTransformer, arch: str, kwargs: Mapping[str, Any]) -> BaseArch:
    """The unpruned architecture of a timm ViT, as a plan refers to it."""
    blocks = list(model.blocks)
    return BaseArch(
        arch=arch,
        # the head size always travels with the rebuild kwargs, so a reset head reloads at its new size
        kwargs={**kwargs, "num_classes": int(model.num_classes)},
        depth=len(blocks),
        embed_dim=int(model.embed_dim),
        num_heads=tuple(int(b.attn.num_heads) for b in blocks),
        head_dim=int(blocks[0].attn.head_dim),
        mlp_hidden=tuple(families.mlp_hidden(b.mlp) for b in blocks),
        num_classes=int(model.num_classes),
        num_prefix_tokens=int(model.num_prefix_tokens),
    )


def data_config(model: torch.nn.Module, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's data config of the model (input size, mean/std, interpolation, crop), with user overrides."""
    cfg = timm.data.resolve_model_data_config(model)
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    input_size = [3, *img] if img else list(cfg["input_size"])  # timm's cfg keeps the preset size
    out = {
        "input_size": input_size,
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }
    for k, v in (overrides or {}).items():
        if k not in out:
            raise StudioError(f"Unknown data-config override '{k}'. Valid: {', '.join(out)}.")
        out[k] = list(v) if isinstance(v, list | tuple) else v
    return out


def check_family(model: nn.Module, *, blocks: tuple[type[nn.Module], ...] = (Block,)) -> VisionTransformer:
    """Refuse, in one sentence naming the module and the block, a model the studio cannot prune exactly
    (:func:`studio.families.check`, the registry of refused structures).

    Called where every model is created (:func:`create_vit`), so an unsupported family is refused at load,
    before any library code trips over a missing attribute. ``blocks``: the block types accepted (the surgery
    adds its pruned block).
    """
    return families.check(model, blocks=blocks)


def create_vit(arch: str, *, split: bool = True, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model`` restricted to VisionTransformer-family models, with a clear refusal otherwise.

    Parallel blocks become the studio's of the same function (:func:`studio.parallel.split_parallel`) and timm's
    EVA a VisionTransformer of rotary attentions (:func:`studio.eva.convert_eva`), BEiT and the relative-position
    ViTs one of relative-position attentions (:func:`studio.relpos.convert_relpos`), the structure every plan and
    export refers to. ``split=False`` keeps timm's own blocks, to load a timm checkpoint
    into before splitting (the family check then runs on a split copy built on the meta device).
    """
    model = _timm_model(arch, kwargs)
    if split:
        return check_family(split_parallel(convert_relpos(convert_eva(model))))
    if isinstance(model, (Eva, *REBUILT_TYPES)):  # rebuilt after the checkpoint loads
        with torch.device("meta"):  # so check the rebuild of a meta copy
            check_family(convert_relpos(convert_eva(_timm_model(arch, kwargs))))
    elif any(type(b) in PARALLEL_TYPES for b in getattr(model, "blocks", ())):
        with torch.device("meta"):
            check_family(split_parallel(_timm_model(arch, {**kwargs, "weight_init": "skip"})))
    else:
        check_family(model)
    return model


def _timm_model(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
            raise StudioError(
                f"timm has no architecture '{arch}'. Similar names: {', '.join(close) or 'none'}."
            ) from None
        raise
    except TypeError as e:
        module = timm.models.model_entrypoint(arch).__module__
        if (
            "vision_transformer" not in module
            and not module.endswith((".eva", ".beit"))
            and "deit" not in arch
        ):
            raise StudioError(
                f"'{arch}' is not a Vision Transformer; Pruning Studio prunes timm VisionTransformer "
                "models (ViT, DeiT, DeiT-distilled)."
            ) from None
        raise StudioError(f"Architecture '{arch}' does not accept these options ({e}).") from None
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling arbitrary objects."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise StudioError(
                    f"{path.name} is not a readable safetensors file ({e}). Re-export it."
                ) from None
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if "global" not in str(e).lower():  # no object reference seen: damaged, or a raw pickle
                    raise StudioError(
                        f"{path.name} cannot be read safely: it is damaged (e.g. truncated) or is a raw pickled "
                        "Python object, which is refused because loading it can run code. Save a plain state "
                        "dict with torch.save(model.state_dict(), ...) or a .safetensors file."
                    ) from None
                raise StudioError(
                    f"{path.name} contains pickled Python objects, which are refused because loading them can run "
                    "code. Save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file."
                ) from None
            except (RuntimeError, EOFError, OSError) as e:
                raise StudioError(
                    f"{path.name} is not a readable PyTorch checkpoint ({plain_error(e)}). "
                    "It may be truncated; save it again."
                ) from None
            return _unwrap_state_dict(obj, path)
    except StudioError:
        raise
    raise StudioError(
        f"Unsupported checkpoint type '{suffix}' ({path.name}). Use .safetensors, .pth/.pt or .npz."
    )


def plain_error(e: BaseException, limit: int = 120) -> str:
    """The first line of a library error, without terminal colour codes."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    sentence = (lines[0] if lines else type(e).__name__).split(". ")[0].rstrip(".")
    return sentence[:limit]


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StudioError(f"{path.name} does not hold a state dict of tensors (found {type(obj).__name__}).")
    return {k.removeprefix("module."): v for k, v in obj.items()}
