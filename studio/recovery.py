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
that pruned the model (from its plan), each with its source. The papers' data augmentation (RandAugment,
mixup/cutmix, random erasing, repeated augmentation) is not reproduced, and each paper distils from its own
teacher (e.g. RegNetY-160 for Isomorphic) where the studio uses the unpruned model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import DataSpec
from .errors import Cancelled, StudioError
from .events import Callback, CancelToken, emit
from .models import ModelSpec
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
    source: str = ""

    def __post_init__(self) -> None:
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
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEIT_SOURCE = (
    "DeiT (Touvron et al., ICML 2021), facebookresearch/deit main.py defaults: AdamW lr 5e-4 x batch/512, "
    "wd 0.05, 300 epochs, 5 warm-up epochs, cosine to 1e-5, label smoothing 0.1, hard distillation"
)

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
        source="this project: a short CPU recipe sized on the demo (docs/results/jobs.md)",
    ),
    "paper:sls": Recipe(
        "paper:sls",
        epochs=100,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_epochs=10,
        min_lr=1e-5,
        label_smoothing=0.0,
        trainable=r"re:^(head|head_dist|norm|fc_norm)\.|adapter",
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
        source=(
            "P3B (Glandorf et al., arXiv 2506.23675), PatGlan/Pruning_by_Block_Benefit utils/args.py and "
            "README: fine-tune with AdamW lr 5e-4 x batch/512, wd 0.05, cosine to 1e-5 without warm-up, "
            "300 epochs (the default; the README gives none), label smoothing 0.1"
        ),
    ),
    "paper:savit": Recipe(
        "paper:savit",
        epochs=300,
        lr=5e-4,
        weight_decay=0.05,
        warmup_epochs=0,
        min_lr=1e-5,
        label_smoothing=0.1,
        source=(
            "SAViT (Zheng et al., NeurIPS 2022), hikvision-research/SAViT scripts: 300 epochs, AdamW lr 5e-4 x "
            "batch/512, wd 0.05, cosine to 1e-5, no warm-up, label smoothing 0.1; the README names a teacher "
            "but distillation defaults to none"
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
        source=(
            "Isomorphic Pruning (Fang et al., ECCV 2024, arXiv 2407.04616), VainF/Isomorphic-Pruning "
            "scripts/finetuning/deit_*.sh: 300 epochs, AdamW lr 5e-4, wd 0.05, cosine without warm-up, label "
            "smoothing 0.1, DeiT hard distillation (from RegNetY-160 there; from the unpruned model here)"
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
        source=_DEIT_SOURCE,
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
@dataclass(frozen=True)
class RecoverySpec:
    """What to recover and how (``spec.json`` of a retrain run).

    Attributes:
        model: the pruned model (usually an exported folder, ``runs/NAME/export``).
        data: the labelled data (train for training, val for selection, ``eval_split`` for the final number).
        teacher: the unpruned model to distil from (needed unless the recipe's ``kd`` is ``none``).
        preset: ``quick``, ``paper`` or ``paper:<method>`` (see :data:`PRESETS`).
        overrides: recipe fields to change (``epochs``, ``lr``, ``kd``, ``temperature``, ``alpha``, ...).
    """

    model: ModelSpec
    data: DataSpec
    teacher: ModelSpec | None = None
    preset: str = "quick"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    eval_split: str = "test"
    bench: bool = True
    bench_batch_sizes: tuple[int, ...] = (1, 64)
    export: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "retrain",
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "teacher": None if self.teacher is None else self.teacher.to_dict(),
            "preset": self.preset,
            "overrides": dict(self.overrides),
            "seed": self.seed,
            "eval_split": self.eval_split,
            "bench": self.bench,
            "bench_batch_sizes": list(self.bench_batch_sizes),
            "export": self.export,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecoverySpec:
        if d.get("kind", "retrain") != "retrain":
            raise StudioError(
                f"This run is a '{d.get('kind')}' run, not a retrain run: it cannot be retrained."
            )
        try:
            return cls(
                model=ModelSpec.from_dict(d["model"]),
                data=DataSpec.from_dict(d["data"]),
                teacher=None if d.get("teacher") is None else ModelSpec.from_dict(d["teacher"]),
                preset=str(d.get("preset", "quick")),
                overrides=dict(d.get("overrides") or {}),
                seed=int(d.get("seed", 0)),
                eval_split=str(d.get("eval_split", "test")),
                bench=bool(d.get("bench", True)),
                bench_batch_sizes=tuple(int(b) for b in d.get("bench_batch_sizes", (1, 64))),
                export=bool(d.get("export", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StudioError(f"The retrain spec is incomplete or malformed ({e}).") from None

    def recipe(self, method: str | None = None) -> Recipe:
        return resolve_recipe(self.preset, method, self.overrides)


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
    return ModelSpec.from_dict(spec["model"])


@dataclass(frozen=True)
class RecoveryResult:
    """Numbers of one recovery run (``results.json``; same top-level keys as a prune run's)."""

    method: str
    recipe: Recipe
    summary: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    teacher: dict[str, Any] | None
    train: dict[str, Any]
    export: str | None
    device: str
    world: int
    replicas_identical: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "retrain",
            "method": self.method,
            "recipe": self.recipe.to_dict(),
            "summary": self.summary,
            "before": self.before,
            "after": self.after,
            "teacher": self.teacher,
            "train": self.train,
            "export": self.export,
            "device": self.device,
            "world": self.world,
            "replicas_identical": self.replicas_identical,
            "seconds": self.seconds,
        }


def run_recovery(
    spec: RecoverySpec,
    *,
    run: Any = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> RecoveryResult | None:
    """Fine-tune ``spec.model`` (with distillation if the recipe says so), measure it and export it.

    Runs single-process, or as one rank of a torchrun group (see :mod:`studio.distributed`); only rank 0
    writes into ``run`` and returns the result (other ranks return None).

    Args:
        run: the :class:`~studio.runs.RunDir` receiving events, ``checkpoint``, ``results.json``, ``export/``.
        resume: continue from the run's checkpoint (an exact continuation on CPU).
        cancel: stop cleanly (checkpoint saved, :class:`~studio.errors.Cancelled` raised); the run's ``CANCEL``
            file also cancels.
    """
    from . import distributed
    from .bench import measure_throughput, profile
    from .data import prepare
    from .device import describe_device
    from .evaluate import evaluate
    from .models import load_model
    from .train import fit, select_trainable

    t0 = time.time()
    ctx = distributed.setup(spec.model.device)
    main = ctx.is_main
    from .jobs import RunLogger

    cbs: list[Callback] = [*callbacks, *([RunLogger(run)] if run is not None else [])] if main else []
    try:
        if run is not None and main:
            run.cancel_file.unlink(missing_ok=True)  # a leftover request must not stop the new attempt
            run.set_status("running", pid=os.getpid(), world=ctx.world, resumed=resume)
        distributed.barrier(ctx)
        plain = cancel or CancelToken(run.cancel_file if run is not None else None)
        # every rank reads the synchronised token once per step; rank 0 alone uses the plain one afterwards
        token = distributed.SyncedCancel(plain, ctx) if ctx.distributed else plain

        device = str(ctx.device)
        loaded = load_model(replace(spec.model, device=device))
        method = loaded.plan.method if loaded.plan is not None else "dense"
        recipe = spec.recipe(method)
        emit(cbs, "log", message=f"recipe {recipe.name} ({recipe.source})")
        n_classes = loaded.base.num_classes
        train = prepare(spec.data, "train", loaded.data_config, n_classes)
        val = prepare(spec.data, "val", loaded.data_config, n_classes)
        test = prepare(spec.data, spec.eval_split, loaded.data_config, n_classes) if main else None

        hooks: list[Any] = []
        teacher_info = None
        if recipe.kd != "none":
            if spec.teacher is None:
                raise StudioError(
                    f"Distillation '{recipe.kd}' needs a teacher: give --teacher (the unpruned model), "
                    "or --kd none."
                )
            teacher = load_model(replace(spec.teacher, device=device))
            if teacher.base.num_classes != n_classes:
                raise StudioError(
                    f"The teacher classifies {teacher.base.num_classes} classes, the student {n_classes}: "
                    "distil from the unpruned model the student was pruned from."
                )
            hooks.append(
                Distillation(
                    teacher.model,
                    loaded.model,
                    mode=recipe.kd,
                    temperature=recipe.temperature,
                    alpha=recipe.alpha,
                    label_smoothing=recipe.label_smoothing,
                )
            )
            if main and test is not None:
                teacher_info = {"source": teacher.source, "top1": evaluate(teacher.model, test).top1}

        before: dict[str, Any] = {}
        if main and test is not None:
            ev = evaluate(loaded.model, test, num_classes=n_classes)
            before = {"top1": ev.top1, "loss": ev.loss, "n": ev.n}
            emit(cbs, "metric", stage="before", top1=ev.top1, loss=ev.loss)

        ts = recipe.train_spec(seed=spec.seed)
        select_trainable(loaded.model, ts.trainable)  # before DDP: it only syncs what requires grad
        ddp = distributed.wrap(loaded.model, ctx)
        checkpoint = run.checkpoint_file if run is not None else None
        result = fit(
            loaded.model,
            train,
            val,
            ts,
            hooks=hooks,
            callbacks=cbs,
            cancel=token,
            checkpoint=checkpoint,
            resume=resume,
            rank=ctx.rank,
            world=ctx.world,
            ddp_model=ddp,
        )
        digests = distributed.gather_digests(loaded.model, ctx)
        if not main:
            return None

        model = loaded.model.eval()
        if is_distilled(model):
            model.set_distilled_training(False)
        emit(cbs, "status", state="measuring")
        after: dict[str, Any] = profile(model, loaded.data_config["input_size"])
        assert test is not None
        ev = evaluate(model, test, num_classes=n_classes, cancel=plain)
        after.update(top1=ev.top1, loss=ev.loss, n=ev.n, val_top1=result.best_val_top1)
        if spec.bench:
            after["throughput"] = {
                str(bs): measure_throughput(
                    model, loaded.data_config["input_size"], batch_size=bs, warmup=3, repeats=10, cancel=plain
                ).to_dict()
                for bs in spec.bench_batch_sizes
            }
        export_dir = None
        if spec.export and run is not None:
            from .export import export

            export(
                model,
                loaded.base,
                run.export_dir,
                plan=loaded.plan,
                data_config=loaded.data_config,
                class_names=loaded.class_names,
                metrics={k: after[k] for k in ("top1", "loss", "params", "macs")},
                extra={"recovery": {"recipe": recipe.to_dict(), "from": loaded.source}},
            )
            export_dir = str(run.export_dir)
        out = RecoveryResult(
            method=method,
            recipe=recipe,
            summary=dict(loaded.plan.summary) if loaded.plan is not None else {},
            before=before,
            after=after,
            teacher=teacher_info,
            train=result.to_dict(),
            export=export_dir,
            device=describe_device(ctx.device),
            world=ctx.world,
            replicas_identical=len(set(digests)) == 1,
            seconds=time.time() - t0,
        )
        if run is not None:
            run.write_results({**out.to_dict(), "replica_digests": digests})
            run.set_status("done", top1=ev.top1)
        emit(cbs, "status", state="done")
        return out
    except Cancelled:
        if run is not None and main:
            run.set_status("cancelled", resumable=run.checkpoint_file.exists())
        raise
    except Exception as e:
        if run is not None and main:
            run.set_status(
                "failed", error=str(e) if isinstance(e, StudioError) else f"{type(e).__name__}: {e}"
            )
        raise
    finally:
        distributed.teardown(ctx)
