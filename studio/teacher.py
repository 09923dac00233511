"""Distillation teachers of any timm architecture (CNN or ViT), each seeing the batch the way it was trained to.

DeiT (Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021)
distils its students from a RegNetY-16GF CNN, and SAViT and Isomorphic Pruning fine-tune their pruned DeiTs the
same way. A teacher is a :class:`~studio.models.ModelSpec` (the one spec form, in ``RecoverySpec.teacher``):

- ``demo``, ``demo-backbone``, an exported studio folder or a Google ViT ``.npz`` load as every model does
  (:func:`studio.load.load_model`);
- a checkpoint file with ``arch`` naming **any** timm architecture is built with ``timm.create_model`` (random
  init, no download) and filled from the file by the studio's pickle-free reader
  (:func:`studio.models.read_state_dict`), strictly: no family check, since a teacher is only run, never pruned.
  Its class count is read off the checkpoint's classifier (timm's ``pretrained_cfg['classifier']``).

A teacher keeps its **own preprocessing** (timm's data config: input size, mean/std, interpolation). The student's
batch, normalised with the student's mean/std at the student's size, is converted on the fly
(:class:`TeacherInput`): back to pixels with the student's mean/std, resized to the teacher's input size with its
interpolation, normalised with the teacher's mean/std. When nothing differs the batch passes through untouched.

Refusals (:func:`check_teacher_spec` before a run is created, :func:`load_teacher` before training starts), one
sentence each: an architecture unknown to timm, a bare checkpoint without its architecture, a checkpoint that does
not fit the architecture, and a teacher classifying another number of classes than the student.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .device import resolve_device
from .errors import StudioError
from .load import load_model, misfits, non_float  # the demo and exported folders load as every model does
from .models import DEMO_SOURCES, ModelSpec, data_config, plain_error, read_state_dict

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")  # what studio.models reads
# timm interpolation names -> torch's resize modes. torch has no Lanczos, and timm's "random" (a training-time
# draw) has no single meaning for a teacher: both resize bicubically, the closest of torch's filters
_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "area": "area"}


# ------------------------------------------------------------------------------------------------ the input
def _stats(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(1, -1, 1, 1)


class TeacherInput(nn.Module):
    """Convert a batch prepared for the student into the one the teacher expects (DeiT's teacher at its own size).

    ``x·std_s + mean_s`` (back to pixels), resized to the teacher's ``input_size`` with its interpolation (torch's
    antialiased bilinear/bicubic when shrinking, as PIL's resize filters are), then ``(· − mean_t)/std_t``.
    The student's crop is kept: the teacher sees the same view of each image, as in DeiT. No clamping to [0, 1]:
    random erasing writes normal noise in normalised space, which a clamp would distort.

    Args:
        student: the student's data config (``input_size``, ``mean``, ``std``).
        teacher: the teacher's data config (``input_size``, ``mean``, ``std``, ``interpolation``).
    """

    def __init__(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> None:
        super().__init__()
        self.size = (int(teacher["input_size"][-2]), int(teacher["input_size"][-1]))
        self.resize = self.size != (int(student["input_size"][-2]), int(student["input_size"][-1]))
        self.mode = _MODES.get(str(teacher.get("interpolation", "bicubic")), "bicubic")
        self.renormalise = [float(v) for v in student["mean"]] != [float(v) for v in teacher["mean"]] or [
            float(v) for v in student["std"]
        ] != [float(v) for v in teacher["std"]]
        self.register_buffer("s_mean", _stats(student["mean"]), persistent=False)
        self.register_buffer("s_std", _stats(student["std"]), persistent=False)
        self.register_buffer("t_mean", _stats(teacher["mean"]), persistent=False)
        self.register_buffer("t_std", _stats(teacher["std"]), persistent=False)

    @property
    def identity(self) -> bool:
        """Whether the teacher takes the student's batch as it is (same size, mean and std)."""
        return not (self.resize or self.renormalise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x  # exactly the student's batch: no round trip through pixels
        x = x.float()
        if self.renormalise:
            x = x * self.s_std + self.s_mean
        if self.resize:
            smooth = self.mode in ("bilinear", "bicubic")
            x = F.interpolate(
                x,
                size=self.size,
                mode=self.mode,
                align_corners=False if smooth else None,
                antialias=smooth,  # only acts when shrinking
            )
        if self.renormalise:
            x = (x - self.t_mean) / self.t_std
        return x


class Teacher(nn.Module):
    """A frozen teacher behind its input conversion: ``teacher(student_batch)`` gives the teacher's logits."""

    def __init__(self, model: nn.Module, convert: TeacherInput) -> None:
        super().__init__()
        self.convert = convert
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(self.convert(x))


@dataclass
class LoadedTeacher:
    """A teacher ready to distil from: the wrapped module and what the results record about it."""

    module: Teacher
    arch: str
    source: str
    num_classes: int
    data_config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a run records: architecture, source, input size and normalisation, and whether it converts."""
        cfg = self.data_config
        return {
            "arch": self.arch,
            "source": self.source,
            "num_classes": self.num_classes,
            "input_size": list(cfg["input_size"]),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "interpolation": cfg.get("interpolation"),
            "converts_input": not self.module.convert.identity,
        }


# ------------------------------------------------------------------------------------------------ checks
def is_checkpoint_source(source: str) -> bool:
    """A teacher read here from a checkpoint file of any architecture: not the demo, not an exported folder, and
    not a Google ViT ``.npz`` (a ViT by definition, which :func:`studio.load.load_model` reads)."""
    path = Path(source).expanduser()
    return source not in DEMO_SOURCES and not path.is_dir() and path.suffix.lower() != ".npz"


def check_arch(arch: str) -> None:
    """Refuse an architecture timm does not know, naming similar ones."""
    if not timm.is_model(arch):
        # the closest spellings among timm's names (resnet10x -> resnet10t, regnety_16x -> regnety_160)
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        raise StudioError(
            f"timm has no architecture '{arch}' (similar: {', '.join(close) or 'none'}): give --teacher-arch a "
            "name from timm.list_models()."
        )


def _bare(name: str) -> StudioError:
    return StudioError(
        f"The teacher {name} is a bare checkpoint: also give its timm architecture, e.g. --teacher-arch "
        "regnety_160 (the Teacher architecture field on the Retrain page)."
    )


def check_teacher_spec(spec: ModelSpec) -> None:
    """The checks a teacher spec passes without loading or reading anything (run before a run folder is written,
    and by the Retrain page before its submit button): a known architecture, and one for a checkpoint file."""
    if spec.arch:
        check_arch(spec.arch)
    elif Path(spec.source).suffix.lower() in CHECKPOINT_SUFFIXES:
        raise _bare(Path(spec.source).name)


# ------------------------------------------------------------------------------------------------ loading
def _classifier_key(arch: str) -> str | None:
    """The classifier's weight key, from timm's pretrained config (``fc`` for ResNets, ``head.fc`` for RegNets)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    name = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(name, list | tuple):  # a distilled DeiT: (head, head_dist), both of the same size
        name = name[0] if name else None
    return f"{name}.weight" if isinstance(name, str) and name else None


def _create(arch: str, kwargs: Mapping[str, Any], img_size: int | None) -> tuple[nn.Module, bool]:
    """``timm.create_model`` with ``img_size`` where the architecture takes it (ViTs); whether it took it."""
    if img_size is not None:
        try:
            sized = {**kwargs, "img_size": img_size}  # the spec's size wins over one in its timm kwargs
            return timm.create_model(arch, pretrained=False, **sized), True
        except TypeError as e:
            if "img_size" not in str(e):
                raise StudioError(
                    f"Teacher architecture '{arch}' does not accept these options ({plain_error(e)})."
                ) from None
            # a CNN: no size in its constructor, the size is only the input it is fed (its data config)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs), False
    except TypeError as e:
        raise StudioError(
            f"Teacher architecture '{arch}' does not accept these options ({plain_error(e)})."
        ) from None


def _fit_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    parts = misfits(model, sd)
    if cast := non_float(model, sd):
        parts.append(f"non-float weights in {', '.join(cast[:2])}")
    if parts:
        raise StudioError(
            f"The teacher checkpoint {path.name} does not fit the architecture '{arch}' ({'; '.join(parts)}): give "
            "the --teacher-arch (and timm kwargs) it was saved from."
        )
    model.load_state_dict(sd, strict=True)


def _from_checkpoint(spec: ModelSpec, device: torch.device) -> LoadedTeacher:
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise StudioError(
            f"Teacher '{spec.source}' not found: give 'demo', an exported studio folder or a checkpoint file "
            "(with --teacher-arch)."
        )
    if not spec.arch:
        raise _bare(path.name)
    check_arch(spec.arch)
    # the studio's one checkpoint reader: safetensors, or a plain state dict under weights_only=True (no pickled
    # object is ever built)
    sd = read_state_dict(path)
    key = _classifier_key(spec.arch)
    head = sd.get(key) if key else None
    ckpt_classes = int(head.shape[0]) if head is not None and head.ndim >= 2 else None
    if spec.num_classes is not None and ckpt_classes is not None and spec.num_classes != ckpt_classes:
        raise StudioError(
            f"The teacher checkpoint {path.name} has a classifier for {ckpt_classes} classes, not the "
            f"{spec.num_classes} its spec asks for: drop num_classes from the teacher, or give the right checkpoint."
        )
    kwargs = dict(spec.kwargs)
    n = spec.num_classes if spec.num_classes is not None else ckpt_classes
    if n is not None:
        kwargs["num_classes"] = n
    model, sized = _create(spec.arch, kwargs, spec.img_size)
    _fit_strict(model, sd, path, spec.arch)
    model.eval().to(device)
    cfg = data_config(model, spec.data)
    if spec.img_size is not None and not sized and "input_size" not in spec.data:
        cfg["input_size"] = [3, int(spec.img_size), int(spec.img_size)]  # a CNN fed at the asked size
    num_classes = int(getattr(model, "num_classes", n or 0))
    return LoadedTeacher(
        module=Teacher(model, TeacherInput(cfg, cfg)),  # the student's side is set by load_teacher
        arch=spec.arch,
        source=str(path),
        num_classes=num_classes,
        data_config=cfg,
    )


def load_teacher(
    spec: ModelSpec,
    *,
    student_config: Mapping[str, Any],
    num_classes: int,
    device: str | torch.device | None = None,
) -> LoadedTeacher:
    """Load the teacher ``spec`` names, frozen in eval mode, converting the student's batches for it.

    Args:
        student_config: the student's data config (what its batches are prepared with).
        num_classes: the student's class count; a teacher with another one is refused here, before training.
        device: where to put it (default: the spec's).
    """
    dev = resolve_device(str(device) if device is not None else spec.device)
    if is_checkpoint_source(spec.source):
        teacher = _from_checkpoint(spec, dev)
    else:
        loaded = load_model(spec.with_(device=str(dev), reset_head=False))
        teacher = LoadedTeacher(
            module=Teacher(loaded.model, TeacherInput(loaded.data_config, loaded.data_config)),
            arch=loaded.base.arch,
            source=loaded.source,
            num_classes=int(loaded.base.num_classes),
            data_config=dict(loaded.data_config),
        )
    if teacher.num_classes != num_classes:
        raise StudioError(
            f"The teacher ({teacher.arch}, {Path(teacher.source).name}) classifies {teacher.num_classes} classes, the "
            f"student {num_classes}: give a teacher trained on the student's {num_classes} classes."
        )
    teacher.module.convert = TeacherInput(student_config, teacher.data_config).to(dev)
    teacher.module.eval()
    for p in teacher.module.parameters():
        p.requires_grad_(False)
    return teacher
