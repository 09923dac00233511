"""``load_model``: the one front door from a :class:`~studio.models.ModelSpec` to a :class:`LoadedModel`.

It sits above :mod:`studio.models` (architectures, checkpoints) and :mod:`studio.export` (exported folders),
so that neither of those imports the other: the demo and every exported folder are read by
:func:`studio.export.load_exported`, checkpoint files by timm plus a strict state-dict check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .device import resolve_device
from .errors import StudioError
from .eva import convert_eva
from .export import load_exported
from .models import (
    DEMO_SOURCES,
    LoadedModel,
    ModelSpec,
    create_vit,
    data_config,
    describe_base,
    plain_error,
    read_state_dict,
)
from .parallel import split_parallel
from .petl import ConvpassSpec, add_convpass
from .relpos import convert_relpos


def _head_classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    w = sd.get("head.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model ``spec`` describes, in eval mode on its device."""
    device = resolve_device(spec.device)
    src = spec.source
    if src in DEMO_SOURCES:
        folder = DEMO_SOURCES[src]
        if not (folder / "manifest.json").exists():
            raise StudioError(
                f"The embedded demo model is missing ({folder}). Rebuild it: python -m studio demo build"
            )
        return _load_folder(folder, spec, device, name=src)
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "manifest.json").exists():
            raise StudioError(
                f"{path} is a folder without manifest.json: point --model at an exported studio model "
                "or at a checkpoint file."
            )
        return _load_folder(path, spec, device, name=str(path))
    if not path.exists():
        raise StudioError(
            f"Model '{src}' not found: give 'demo', 'demo-backbone', a checkpoint file or an exported folder."
        )
    if not spec.arch:
        raise StudioError(
            f"{path.name} is a bare checkpoint: also give its timm architecture, e.g. "
            "--arch vit_small_patch16_224 (see `timm.list_models('vit_*')`)."
        )
    return _load_checkpoint(path, spec, device)


def _ctor_kwargs(spec: ModelSpec, num_classes: int | None) -> dict[str, Any]:
    kwargs = dict(spec.kwargs)
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _load_checkpoint(path: Path, spec: ModelSpec, device: torch.device) -> LoadedModel:
    assert spec.arch is not None
    if path.suffix.lower() == ".npz":
        kwargs = _ctor_kwargs(spec, spec.num_classes)
        model = create_vit(spec.arch, split=False, **kwargs)
        try:
            model.load_pretrained(str(path))
        except (KeyError, ValueError, RuntimeError, OSError) as e:
            raise StudioError(
                f"{path.name} does not fit '{spec.arch}' as a Google ViT .npz checkpoint "
                f"({plain_error(e)}). Check --arch and --img-size."
            ) from None
    else:
        sd = read_state_dict(path)
        ckpt_classes = _head_classes(sd)
        if spec.reset_head:
            sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist."))}
            if spec.num_classes is None:
                raise StudioError("--reset-head needs --num-classes N (the size of the new classifier).")
        elif spec.num_classes is not None and ckpt_classes is not None and ckpt_classes != spec.num_classes:
            raise StudioError(
                f"{path.name} has a classifier for {ckpt_classes} classes but {spec.num_classes} were asked for. "
                f"Use --num-classes {ckpt_classes}, or --reset-head to train a new {spec.num_classes}-class head."
            )
        num_classes = spec.num_classes if spec.num_classes is not None else ckpt_classes
        kwargs = _ctor_kwargs(spec, num_classes)
        adapter = _convpass_in(sd, spec, path)
        model = create_vit(spec.arch, split=False, **kwargs)
        if adapter is not None:  # a PETL-tuned checkpoint: the backbone with its trained bypasses
            add_convpass(model, adapter)
        _load_strict(model, sd, path, allow_missing_head=spec.reset_head)
    # timm's checkpoint went into timm's own blocks: parallel ones become the studio's now (studio.parallel), an
    # EVA the studio's ViT of rotary attentions (studio.eva), BEiT and the relative-position ViTs one of
    # relative-position attentions (studio.relpos)
    model = split_parallel(convert_relpos(convert_eva(model)))
    model.eval().to(device)
    base = describe_base(model, spec.arch, kwargs)
    return LoadedModel(
        model=model,
        base=base,
        data_config=data_config(model, spec.data),
        class_names=[str(i) for i in range(model.num_classes)],
        device=device,
        source=str(path),
    )


def _convpass_in(sd: Mapping[str, torch.Tensor], spec: ModelSpec, path: Path) -> ConvpassSpec | None:
    """The Convpass adapters a checkpoint carries (their width read off the weights, their scale from the spec),
    or None; refused when the scale, which no checkpoint records, is missing or given for a plain checkpoint."""
    downs = sorted(k for k in sd if k.endswith(".adapter_attn.adapter_down.weight"))
    if not downs:
        if spec.convpass_scale is not None:
            raise StudioError(
                f"--convpass-scale was given but {path.name} carries no Convpass adapters (no "
                "blocks.N.adapter_attn.* weights): drop the option."
            )
        return None
    if spec.convpass_scale is None:
        raise StudioError(
            f"{path.name} carries Convpass adapters ({downs[0]}): give the scale s they were trained with "
            "(--convpass-scale S; the SLS reference sets it per dataset, e.g. 10 for EuroSAT)."
        )
    return ConvpassSpec(dim=int(sd[downs[0]].shape[0]), scale=float(spec.convpass_scale)).validate()


def misfits(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, allow_missing_head: bool = False
) -> list[str]:
    """How state dict ``sd`` does not fit ``model`` (shape mismatches, missing and unexpected keys), as phrases
    for one error sentence; empty when it fits. Shared by every strict load (models and teachers)."""
    own = model.state_dict()
    missing = [
        k for k in own if k not in sd and not (allow_missing_head and k.startswith(("head.", "head_dist.")))
    ]
    unexpected = [k for k in sd if k not in own]
    shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    parts = []
    if shape:
        parts.append(f"shape mismatch: {'; '.join(shape[:3])}")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    return parts


def non_float(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Float weights of ``model`` that ``sd`` stores as integers (``load_state_dict`` would cast them silently)."""
    own = model.state_dict()
    return [
        f"{k} ({sd[k].dtype})"
        for k, v in own.items()
        if k in sd and v.is_floating_point() and not sd[k].is_floating_point()
    ]


def _load_strict(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path, *, allow_missing_head: bool
) -> None:
    parts = misfits(model, sd, allow_missing_head=allow_missing_head)
    if parts:
        raise StudioError(
            f"{path.name} does not fit the architecture: {'; '.join(parts)}. Check --arch, --img-size and the "
            "timm kwargs (patch size, width, depth); for a different classifier use --num-classes N --reset-head."
        )
    # load_state_dict casts silently: integer (e.g. quantised) weights would become a different model
    cast = non_float(model, sd)
    if cast:
        raise StudioError(
            f"{path.name} stores non-float weights ({', '.join(cast[:2])}): a quantised or non-weight file. "
            "Give the float checkpoint (or dequantise it first)."
        )
    model.load_state_dict(sd, strict=not allow_missing_head)


def _load_folder(folder: Path, spec: ModelSpec, device: torch.device, *, name: str) -> LoadedModel:
    loaded = load_exported(folder, device=device, data_overrides=spec.data)
    loaded.source = name
    size = loaded.data_config["input_size"][-1]
    if spec.img_size is not None and spec.img_size != size:
        raise StudioError(
            f"{name} is a built model for {size} px inputs; --img-size applies to checkpoint files only (an "
            "export keeps the resolution it was trained at). Drop --img-size."
        )
    if spec.num_classes is not None and spec.num_classes != loaded.base.num_classes and not spec.reset_head:
        raise StudioError(
            f"{name} classifies {loaded.base.num_classes} classes but {spec.num_classes} were asked for. "
            f"Use --num-classes {loaded.base.num_classes}, or add --reset-head."
        )
    if spec.reset_head:
        if spec.num_classes is None:
            raise StudioError("--reset-head needs --num-classes N (the size of the new classifier).")
        loaded.model.reset_classifier(spec.num_classes)
        loaded.model.to(device).eval()
        loaded.base = replace(
            loaded.base,
            num_classes=spec.num_classes,
            kwargs={**loaded.base.kwargs, "num_classes": spec.num_classes},
        )
        loaded.class_names = [str(i) for i in range(spec.num_classes)]
        loaded.class_names_known = False  # a fresh classifier: it learns whatever classes its data has
    return loaded
