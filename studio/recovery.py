"""Recovery after pruning: fine-tune the pruned model, optionally distilling from the unpruned one.

Losses (a hook for :func:`studio.train.fit`, see :class:`Distillation`):

- **soft KD** (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015):
  ``(1 − α)·CE(s, y; label smoothing) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``, KL averaged over the batch;
- **hard KD** as in DeiT (Touvron et al., "Training data-efficient image transformers & distillation through
  attention", ICML 2021): ``(1 − α)·CE(s_cls, y) + α·CE(s_dist, argmax t)`` with α = ½, where a distilled DeiT
  uses its class head for the label and its distillation head for the teacher (a plain ViT uses its one head
  for both). For a distilled student, soft KD also reads the distillation head, as DeiT does.

Schedules come from :func:`studio.train.lr_at` (linear warm-up then cosine per step); early stopping and model
selection use validation accuracy. Recipes are data (:data:`PRESETS`): ``quick`` sized for a CPU, and ``paper``,
which takes the epochs, learning rate, weight decay, warm-up, label smoothing and distillation of the method
that pruned the model (from its plan), each with its source. timm's own training parts are recipe options
(:class:`~studio.train.TrainSpec`): ``augment``/``auto_augment``/``re_prob`` (timm's training transform on the
training split, see :func:`studio.data.make_transform`: random resized crop and flip, a RandAugment/AutoAugment
policy string, random erasing in pixel mode), ``mixup``/``cutmix`` (``timm.data.Mixup`` with
``SoftTargetCrossEntropy``, plain cross-entropy only), ``ema_decay`` (``timm.utils.ModelEmaV3``: the EMA weights
are validated and kept) and ``accum_steps`` (gradient accumulation). The paper recipes that fine-tune with DeiT's
recipe (P3B, SAViT, Isomorphic, DeiT) set its RandAugment and random erasing 0.25, and Mixup 0.8 / CutMix 1.0
where they train without distillation (P3B, SAViT); ``quick`` leaves all of it off, as it was sized without it.
Repeated augmentation (DeiT's ``RASampler``) is not reproduced, EMA and accumulation are left off, and each paper
distils from its own teacher (e.g. RegNetY-160 for Isomorphic) where the studio uses the unpruned model unless
another is given: a teacher of any timm architecture, fed at its own input size and mean/std (:mod:`studio.teacher`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import check_auto_augment
from .errors import StudioError
from .models import ModelSpec
from .petl import ADAPTER_TRAINABLE
from .train import TrainSpec, TrainState

KD_MODES = ("none", "soft", "hard")


# ------------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """A recovery recipe: optimisation, schedule and distillation settings, and where they come from."""

    name: str
    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    min_lr: float
    label_smoothing: float
    batch_size: int = 64
    kd: str = "none"
    temperature: float = 1.0
    alpha: float = 0.5
    early_stop: int | None = None
    trainable: str = "all"
    grad_clip: float | None = None
    # timm's training parts (TrainSpec): Mixup/CutMix alphas with soft-target cross-entropy, weight EMA decay
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    accum_steps: int = 1  # micro-batches per optimizer step: batch_size x accum_steps is the effective batch
    # timm's training transform (TrainSpec.augment): random resized crop + flip, a RandAugment/AutoAugment policy
    # string and random erasing (pixel mode); auto_augment or re_prob imply augment
    augment: bool = False
    auto_augment: str | None = None
    re_prob: float = 0.0
    grad_checkpointing: bool = False  # TrainSpec.grad_checkpointing: recompute activations, bounded memory
    source: str = ""

    def __post_init__(self) -> None:
        # a hand-edited spec.json reaches here without argparse's checks: NaN passes every ``<=`` test below (and
        # would train on NaN losses), and a negative decay or warm-up would go unnoticed, so check numbers first
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in (
                "name",
                "kd",
                "trainable",
                "source",
                "augment",
                "auto_augment",
                "grad_checkpointing",
            ):
                continue
            if value is None:
                continue
            whole = f.name in ("epochs", "batch_size", "early_stop")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0 or (whole and value != int(value)):
                kind = "a whole number >= 0" if whole else "a finite number >= 0"
                raise StudioError(
                    f"Recipe setting '{f.name}' is {value!r}: it must be {kind}; fix it in the run's spec.json "
                    "(overrides) or pass a valid value."
                )
        if self.kd not in KD_MODES:
            raise StudioError(f"Distillation '{self.kd}' is unknown: use one of {', '.join(KD_MODES)}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise StudioError(f"The distillation weight alpha must be in [0, 1], not {self.alpha}.")
        if self.temperature <= 0:
            raise StudioError(f"The distillation temperature must be positive, not {self.temperature}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise StudioError("Epochs and batch size must be at least 1.")
        if self.lr <= 0:
            raise StudioError(f"The learning rate must be positive, not {self.lr}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise StudioError(f"Label smoothing must be in [0, 1), not {self.label_smoothing}.")
        if (self.mixup > 0 or self.cutmix > 0) and self.kd != "none":
            raise StudioError(
                "Mixup/CutMix runs with the plain cross-entropy only: set kd to none, or mixup and cutmix to 0."
            )
        if self.ema_decay is not None and not self.ema_decay < 1.0:
            raise StudioError(f"The EMA decay must be below 1, not {self.ema_decay}.")
        if self.accum_steps < 1 or self.accum_steps != int(self.accum_steps):
            raise StudioError(
                f"Gradient accumulation steps must be a whole number ≥ 1, not {self.accum_steps}."
            )
        if not isinstance(self.grad_checkpointing, bool):
            raise StudioError(
                f"Recipe setting 'grad_checkpointing' is {self.grad_checkpointing!r}: it must be true or false."
            )
        if not isinstance(self.augment, bool):
            raise StudioError(
                f"Recipe setting 'augment' is {self.augment!r}: it must be true or false; fix it in the run's "
                "spec.json (overrides) or pass --augment / --no-augment."
            )
        if self.re_prob > 1:
            raise StudioError(
                f"The random erasing probability re_prob must be in [0, 1] (DeiT: 0.25), not {self.re_prob}."
            )
        # "none" or "" (how a flag or the page turns a preset's policy off) is stored as None
        object.__setattr__(self, "auto_augment", check_auto_augment(self.auto_augment))

    def with_(self, **overrides: Any) -> Recipe:
        """This recipe with the given fields replaced (``None`` values are ignored: the recipe keeps its own)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise StudioError(
                f"Recipe option '{unknown[0]}' is unknown. Options: {', '.join(sorted(names))}."
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self

    def train_spec(self, *, seed: int = 0, amp: bool = True) -> TrainSpec:
        return TrainSpec(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            min_lr=self.min_lr,
            label_smoothing=self.label_smoothing,
            trainable=self.trainable,
            seed=seed,
            amp=amp,
            grad_clip=self.grad_clip,
            select="val",
            early_stop=self.early_stop,
            mixup=self.mixup,
            cutmix=self.cutmix,
            ema_decay=self.ema_decay,
            accum_steps=int(self.accum_steps),
            augment=self.augment,
            auto_augment=self.auto_augment,
            re_prob=float(self.re_prob),
            grad_checkpointing=self.grad_checkpointing,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEIT_SOURCE = (
    "DeiT (Touvron et al., ICML 2021), facebookresearch/deit main.py defaults: AdamW lr 5e-4 x batch/512, "
    "wd 0.05, 300 epochs, 5 warm-up epochs, cosine to 1e-5, label smoothing 0.1, hard distillation"
)
# DeiT's training augmentation, the main.py defaults that facebookresearch/deit, SAViT's main_deploy.py and P3B's
# utils/args.py share: RandAugment, random erasing 0.25 in pixel mode, Mixup 0.8 and CutMix 1.0 (and repeated
# augmentation, which the studio does not reproduce)
_DEIT_AA = "rand-m9-mstd0.5-inc1"
_DEIT_AUG = (
    "--aa rand-m9-mstd0.5-inc1, --reprob 0.25 (--remode pixel), --mixup 0.8, --cutmix 1.0; repeated "
    "augmentation (--repeated-aug) is not reproduced"
)
_KD_NO_MIX = "the studio mixes with the plain cross-entropy only, and this recipe distils"

# ``quick`` was sized on the demo (docs/results/jobs.md); the ``paper`` recipes are read from the authors' code,
# see shared/research/methods_*.md. Learning rates are the papers' at their global batch (not rescaled).
PRESETS: dict[str, Recipe] = {
    "quick": Recipe(
        "quick",
        epochs=10,
        lr=5e-4,
        weight_decay=0.05,
        warmup_epochs=1,
        min_lr=1e-6,
        label_smoothing=0.1,
        kd="soft",
        temperature=4.0,
        alpha=0.5,
        early_stop=3,
        source=(
            "this project: a short CPU recipe sized on the demo (docs/results/jobs.md), without training "
            "augmentation (the eval-transform images stay in memory)"
        ),
    ),
    "paper:sls": Recipe(
        "paper:sls",
        epochs=100,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_epochs=10,
        min_lr=1e-5,
        label_smoothing=0.0,
        # the paper trains every parameter named "adapter" or "head": Convpass's adapter_attn/adapter_mlp and
        # LoRA's lora_A/lora_B, the same rule as PETL training, so the final norm stays frozen as in the paper
        trainable=ADAPTER_TRAINABLE,
        source=(
            "SLS (Han et al., ECCV 2024, arXiv 2407.14330), RuiZiHan/SLS train.py: AdamW lr 1e-3, wd 1e-4, "
            "100 epochs, cosine with 10 warm-up epochs to 1e-5, batch 64, only adapters and head trained"
        ),
    ),
    "paper:p3b": Recipe(
        "paper:p3b",
        epochs=300,
        lr=5e-4,
        weight_decay=0.05,
        warmup_epochs=0,
        min_lr=1e-5,
        label_smoothing=0.1,
        auto_augment=_DEIT_AA,
        re_prob=0.25,
        mixup=0.8,
        cutmix=1.0,
        source=(
            "P3B (Glandorf et al., arXiv 2506.23675), PatGlan/Pruning_by_Block_Benefit utils/args.py and "
            "README: fine-tune with AdamW lr 5e-4 x batch/512, wd 0.05, cosine to 1e-5 without warm-up, "
            "300 epochs (the default; the README gives none), label smoothing 0.1; augmentation as DeiT's "
            f"(utils/args.py defaults): {_DEIT_AUG}"
        ),
    ),
    "paper:savit": Recipe(
        "paper:savit",
        epochs=300,
        lr=1e-3,  # 5e-4 x 1024/512: the scripts' 8 GPUs x 128 (research notes §1.8)
        weight_decay=0.05,
        warmup_epochs=0,
        min_lr=1e-5,
        label_smoothing=0.1,
        auto_augment=_DEIT_AA,
        re_prob=0.25,
        mixup=0.8,
        cutmix=1.0,
        source=(
            "SAViT (Zheng et al., NeurIPS 2022), hikvision-research/SAViT scripts: 300 epochs, AdamW lr 5e-4 x "
            "batch/512 = 1e-3 at its 8 x 128 images, wd 0.05, cosine to 1e-5, no warm-up, label smoothing 0.1; "
            "the README names a teacher but distillation defaults to none; augmentation as DeiT's (main_deploy.py "
            f"defaults, which the scripts keep): {_DEIT_AUG}"
        ),
    ),
    "paper:isomorphic": Recipe(
        "paper:isomorphic",
        epochs=300,
        lr=5e-4,
        weight_decay=0.05,
        warmup_epochs=0,
        min_lr=1e-5,
        label_smoothing=0.1,
        kd="hard",
        alpha=0.5,
        # torchvision's RandAugment (2 ops at magnitude 9 of its 31 bins, severity growing with the magnitude)
        # in timm's terms: 9/30 of the range is timm's m3 of 10, two ops, increasing
        auto_augment="rand-m3-n2-inc1",
        re_prob=0.25,
        source=(
            "Isomorphic Pruning (Fang et al., ECCV 2024, arXiv 2407.04616), VainF/Isomorphic-Pruning "
            "scripts/finetuning/deit_*.sh: 300 epochs, AdamW lr 5e-4, wd 0.05, cosine without warm-up, label "
            "smoothing 0.1, DeiT hard distillation (from RegNetY-160 there; here from the unpruned model, or "
            "a RegNetY-160 checkpoint given with --teacher FILE --teacher-arch regnety_160); "
            "--auto-augment ra (torchvision's RandAugment, 2 ops at magnitude 9 of 31 bins: timm's "
            "rand-m3-n2-inc1 here) and --random-erase 0.25 (torchvision erases to zero, timm's pixel mode to "
            "noise); --ra-sampler (repeated augmentation) is not reproduced, and its --mixup-alpha 0.8 and "
            f"--cutmix-alpha 1.0 are off here: {_KD_NO_MIX}"
        ),
    ),
    "paper:deit": Recipe(
        "paper:deit",
        epochs=300,
        lr=5e-4,
        weight_decay=0.05,
        warmup_epochs=5,
        min_lr=1e-5,
        label_smoothing=0.1,
        kd="hard",
        alpha=0.5,
        auto_augment=_DEIT_AA,
        re_prob=0.25,
        source=f"{_DEIT_SOURCE}; augmentation: {_DEIT_AUG}; Mixup and CutMix are off here: {_KD_NO_MIX}",
    ),
}

# plan.method -> its paper recipe; methods without one (baselines, SPA whose recovery uses SGD) take DeiT's
PAPER_BY_METHOD = {
    "sls": "paper:sls",
    "p3b": "paper:p3b",
    "savit": "paper:savit",
    "isomorphic": "paper:isomorphic",
}


def preset_names() -> list[str]:
    """What ``--preset`` accepts: ``quick``, ``paper`` (by method) and each ``paper:<method>`` explicitly."""
    return ["quick", "paper", *sorted(k for k in PRESETS if k.startswith("paper:"))]


def resolve_recipe(
    preset: str, method: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Recipe:
    """The recipe ``preset`` means for a model pruned by ``method``, with user overrides applied.

    ``paper`` picks the recipe of the method named in the model's plan (``paper:deit`` when it has none).
    """
    if preset == "paper":
        key = PAPER_BY_METHOD.get((method or "").lower().split(":")[0], "paper:deit")
    else:
        key = preset
    if key not in PRESETS:
        raise StudioError(f"Recipe preset '{preset}' is unknown. Valid presets: {', '.join(preset_names())}.")
    return PRESETS[key].with_(**dict(overrides or {}))


# ---------------------------------------------------------------------------------------------- distillation
def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str,
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    student_dist: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` of one batch (see the module docstring for the formulas).

    Args:
        student: the student's class-head logits (B, C).
        teacher: the teacher's logits (B, C); no gradient flows into them.
        student_dist: a distilled DeiT's distillation-head logits; None uses ``student`` for both terms.
    """
    if mode not in KD_MODES:
        raise StudioError(f"Distillation '{mode}' is unknown: use one of {', '.join(KD_MODES)}.")
    s = student.float()
    s_kd = s if student_dist is None else student_dist.float()
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    if mode == "none":
        return ce, ce, torch.zeros_like(ce)
    t = teacher.detach().float()
    if mode == "soft":
        T = temperature
        kd = F.kl_div(
            F.log_softmax(s_kd / T, dim=1),
            F.log_softmax(t / T, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (T * T)
    else:
        kd = F.cross_entropy(s_kd, t.argmax(dim=1))
    return (1.0 - alpha) * ce + alpha * kd, ce, kd


def is_distilled(model: torch.nn.Module) -> bool:
    """A DeiT with a distillation token and head (timm ``VisionTransformerDistilled``)."""
    return hasattr(model, "set_distilled_training") and hasattr(model, "head_dist")


class Distillation:
    """A :func:`studio.train.fit` hook training the student against labels and a frozen teacher.

    Args:
        teacher: the unpruned model (frozen, evaluation mode, same device and classes as the student).
        student: the model being trained; a distilled DeiT is switched to return both heads while training.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        *,
        mode: str = "soft",
        temperature: float = 1.0,
        alpha: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if mode not in ("soft", "hard"):
            raise StudioError(f"Distillation mode must be soft or hard, not '{mode}'.")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.mode, self.temperature, self.alpha, self.label_smoothing = (
            mode,
            temperature,
            alpha,
            label_smoothing,
        )
        if is_distilled(student):
            student.set_distilled_training(True)
        self._sums = {"ce": 0.0, "kd": 0.0, "n": 0.0}

    def loss(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, state: TrainState
    ) -> torch.Tensor:
        out = model(x)
        cls, dist = (out[0], out[1]) if isinstance(out, tuple | list) else (out, None)
        with torch.no_grad():
            t = self.teacher(x)
            if isinstance(t, tuple | list):
                t = (t[0] + t[1]) / 2
        loss, ce, kd = kd_loss(
            cls,
            t,
            y,
            mode=self.mode,
            temperature=self.temperature,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
            student_dist=dist,
        )
        state.logits = (cls if dist is None else (cls + dist) / 2).detach()
        n = float(len(y))
        self._sums["ce"] += float(ce.detach()) * n
        self._sums["kd"] += float(kd.detach()) * n
        self._sums["n"] += n
        return loss

    def on_epoch_end(self, state: TrainState) -> dict[str, float]:
        n = max(1.0, self._sums["n"])
        out = {"train_ce": self._sums["ce"] / n, "train_kd": self._sums["kd"] / n}
        self._sums = {"ce": 0.0, "kd": 0.0, "n": 0.0}
        return out

    def state_dict(self) -> dict[str, float]:
        return dict(self._sums)

    def load_state_dict(self, sd: Mapping[str, float]) -> None:
        self._sums = {k: float(sd.get(k, 0.0)) for k in ("ce", "kd", "n")}


# ------------------------------------------------------------------------------------------------ the run
def infer_teacher(model_source: str) -> ModelSpec | None:
    """The unpruned model a pruned export came from: the ``model`` of the run whose ``export/`` it is."""
    import json

    folder = Path(model_source)
    spec_file = folder.parent / "spec.json"
    if folder.name != "export" or not spec_file.is_file():
        return None
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return None
    if spec.get("kind") == "retrain":  # a recovered model: its own teacher is the unpruned one
        return None if spec.get("teacher") is None else ModelSpec.from_dict(spec["teacher"])
    if spec["model"].get("reset_head"):
        # the run started from a backbone with a fresh classifier (P3B, SPLoRA transfer runs): that starting
        # model never learned the task, so it cannot teach it
        return None
    return ModelSpec.from_dict(spec["model"])
