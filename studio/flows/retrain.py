"""The retrain flow: recover a pruned model (fine-tune, optionally distilled), also as ranks under torchrun.

The recipes and distillation live in :mod:`studio.recovery`; this module runs one recipe through
:func:`studio.train.fit` (checkpointed: cancel saves and stops, ``resume`` continues exactly) on one process or
as one rank of a ``torchrun`` group (:mod:`studio.distributed`); rank 0 alone measures, exports and writes
``results.json`` through the shared tail (``before`` = the model before recovery, same structure).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import distributed
from ..bench import profile
from ..data import DataSpec, prepare
from ..errors import StudioError
from ..evaluate import evaluate
from ..events import Callback, CancelToken, emit
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..recovery import Distillation, Recipe, is_distilled, resolve_recipe
from ..runs import RunDir
from ..teacher import check_teacher_spec, load_teacher
from ..train import fit, select_trainable
from . import FLOWS, Flow
from .stages import Measure, RunResult, finish


@dataclass(frozen=True)
class RecoverySpec:
    """What to recover and how (``spec.json`` of a retrain run).

    Attributes:
        model: the pruned model (usually an exported folder, ``runs/NAME/export``).
        data: the labelled data (train for training, val for selection, ``eval_split`` for the final number).
        teacher: the model to distil from (needed unless the recipe's ``kd`` is ``none``): the unpruned model, or
            a checkpoint of any timm architecture (``arch``: a CNN such as DeiT's RegNetY-160, or a ViT), fed the
            student's batches converted to its own input size and mean/std (:mod:`studio.teacher`).
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

    @property
    def kind(self) -> str:
        return "retrain"

    def validate(self) -> None:
        """Refuse an unknown preset or bad override before any work starts (one sentence, what to fix)."""
        self.recipe()
        if self.teacher is not None:
            check_teacher_spec(self.teacher)  # a known timm architecture, and one for a checkpoint file
        for k, v in self.overrides.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise StudioError(f"--{k.replace('_', '-')} must be a finite number, got {v}.")
        if self.eval_split not in ("train", "val", "test"):
            raise StudioError(f"eval_split must be train, val or test, not {self.eval_split!r}.")

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


def run_recovery(
    spec: RecoverySpec,
    *,
    run: RunDir | None = None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult | None:
    """Fine-tune ``spec.model`` (with distillation if the recipe says so), measure it and export it.

    Runs single-process, or as one rank of a torchrun group (see :mod:`studio.distributed`); only rank 0
    writes into ``run`` and returns the result (other ranks return None).

    Args:
        run: the :class:`~studio.runs.RunDir` receiving events, ``checkpoint``, ``results.json``, ``export/``.
        resume: continue from the run's checkpoint (an exact continuation on CPU).
        cancel: stop cleanly (checkpoint saved, :class:`~studio.errors.Cancelled` raised); the run's ``CANCEL``
            file also cancels.
    """
    t0 = time.time()
    ctx = distributed.setup(spec.model.device)
    main = ctx.is_main
    cbs: list[Callback] = list(callbacks) if main else []
    try:
        distributed.barrier(ctx)  # rank 0 has cleared a leftover CANCEL (run_folder) before any rank reads it
        plain = cancel or CancelToken(run.cancel_file if run is not None else None)
        # every rank reads the synchronised token once per step; rank 0 alone uses the plain one afterwards
        token = distributed.SyncedCancel(plain, ctx) if ctx.distributed else plain

        device = str(ctx.device)
        loaded = load_model(replace(spec.model, device=device))  # a fresh copy: it is trained in place
        method = loaded.plan.method if loaded.plan is not None else "dense"
        recipe = spec.recipe(method)
        emit(cbs, "log", message=f"recipe {recipe.name} ({recipe.source})")
        n_classes = loaded.base.num_classes
        ts = recipe.train_spec(seed=spec.seed)
        # the recipe's augmentation (timm's training transform) on the training split only; every rank, and a
        # resumed run, builds it from the same spec, and each image's draw is a function of (seed, epoch, index)
        train = prepare(
            spec.data,
            "train",
            loaded.data_config,
            n_classes,
            class_names=loaded.known_class_names,
            train_transform=ts.augment,
            auto_augment=ts.auto_augment,
            re_prob=ts.re_prob,
        )
        val = prepare(spec.data, "val", loaded.data_config, n_classes, class_names=loaded.known_class_names)
        test = (
            prepare(
                spec.data,
                spec.eval_split,
                loaded.data_config,
                n_classes,
                class_names=loaded.known_class_names,
            )
            if main
            else None
        )

        hooks: list[Any] = []
        teacher_info = None
        if recipe.kd != "none":
            if spec.teacher is None:
                raise StudioError(
                    f"Distillation '{recipe.kd}' needs a teacher: give --teacher (the unpruned model), "
                    "or --kd none."
                )
            # any timm architecture, fed the student's batches converted to its own preprocessing (DeiT's
            # RegNet teacher); a wrong architecture, checkpoint or class count is refused here, before training
            teacher = load_teacher(
                spec.teacher, student_config=loaded.data_config, num_classes=n_classes, device=device
            )
            hooks.append(
                Distillation(
                    teacher.module,
                    loaded.model,
                    mode=recipe.kd,
                    temperature=recipe.temperature,
                    alpha=recipe.alpha,
                    label_smoothing=recipe.label_smoothing,
                )
            )
            teacher_info = teacher.describe()
            if main and test is not None:
                teacher_info["top1"] = evaluate(teacher.module, test).top1
            emit(
                cbs,
                "log",
                message=f"teacher {teacher.arch} ({teacher.source})"
                + (
                    f", its input converted to {teacher.data_config['input_size'][-1]} px and its mean/std"
                    if teacher_info["converts_input"]
                    else ""
                ),
            )

        before: dict[str, Any] = profile(loaded.model, loaded.data_config["input_size"])
        if main and test is not None:
            ev = evaluate(loaded.model, test, num_classes=n_classes)
            before.update(top1=ev.top1, loss=ev.loss, n=ev.n)
            emit(cbs, "metric", stage="before", top1=ev.top1, loss=ev.loss)

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
        how = Measure(bench=spec.bench, bench_batch_sizes=spec.bench_batch_sizes, export=spec.export)
        out = finish(
            kind="retrain",
            method=method,
            loaded=loaded,
            model=model,
            plan=loaded.plan,
            how=how,
            run=run,
            started=t0,
            eval_data=test,
            before=before,
            export_extra={
                "recovery": {"recipe": recipe.to_dict(), "from": loaded.source, "teacher": teacher_info}
            },
            section=lambda before, after: {
                "recipe": recipe.to_dict(),
                "teacher": teacher_info,
                "train": result.to_dict(),
                "world": ctx.world,
                "replicas_identical": len(set(digests)) == 1,
                "replica_digests": digests,
                "best_val_top1": result.best_val_top1,
            },
            callbacks=cbs,
            cancel=plain,
        )
        return out
    finally:
        distributed.teardown(ctx)


FLOWS.add(
    "retrain",
    Flow(
        "retrain",
        RecoverySpec,
        run_recovery,
        "recover a pruned model: fine-tune, optionally distilled",
        trains=True,
    ),
)
