"""The P3B flow (Glandorf et al., arXiv 2506.23675): prune while fine-tuning, slice, fine-tune the slice, the tail.

The method's parts (gates, schedule, budget, :class:`~studio.prune.p3b.P3BPruner`) live in
:mod:`studio.prune.p3b`; this module runs them inside :func:`studio.train.fit` with checkpoints in the run folder
(``p3b_prune.pt``, ``p3b_finetune.pt``), so cancel stops at the next step with a checkpoint and ``resume``
continues where the run stopped (finished epochs are not trained again).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence

from .. import distributed
from ..analysis.block_benefit import SETUP_EVENT
from ..costs import with_summary
from ..data import prepare
from ..errors import StudioError
from ..evaluate import evaluate
from ..events import Callback, CancelToken, Event, emit
from ..models import LoadedModel
from ..plan import PrunePlan
from ..prune import get_method
from ..prune.p3b import P3BPruner, Schedule, settings_from_params
from ..runs import RunDir
from ..surgery import apply_plan
from ..train import TrainSpec, fit
from . import FLOWS, Flow
from .prune import PruneSpec, model_for
from .stages import RunResult, finish

PRUNE_CHECKPOINT, FINETUNE_CHECKPOINT = "p3b_prune.pt", "p3b_finetune.pt"


def _run_wide(
    callbacks: Sequence[Callback], *, phase: str, epoch_offset: int, step_offset: int, epochs: int, steps: int
) -> list[Callback]:
    """Callbacks that see one phase's epochs, steps and totals counted over the whole run.

    Each phase is its own :func:`~studio.train.fit` (pruning, then fine-tuning the slice), which counts from 0
    and announces only its own length; the job panel and ``events.jsonl`` should read "epoch 5 / 6" and one
    progress bar for the run, not "epoch 2 / 3".
    """

    def shifted(cb: Callback) -> Callback:
        def inner(event: Event) -> None:
            data = dict(event.data)
            if isinstance(data.get("epoch"), int):
                data["epoch"] += epoch_offset
            if "epochs" in data:
                data["epochs"] = epochs
            if "steps" in data:
                data["steps"] = steps
            if event.kind == "progress" and data.get("task") == "train":
                data["done"] = int(data.get("done", 0)) + step_offset
                data["total"] = steps
            data.setdefault("phase", phase)
            cb(Event(event.kind, data, event.time))

        return inner

    return [shifted(cb) for cb in callbacks]


def plan_digest(plan: PrunePlan) -> str:
    """SHA-256 of the plan's structure (the kept units): every rank of a torchrun group must slice alike."""
    d = plan.to_dict()
    kept = {"blocks": d["blocks"], "embed": d.get("embed")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def run_p3b(
    spec: PruneSpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult | None:
    """Prune while fine-tuning, slice, fine-tune the sliced model, then the shared tail.

    Runs single-process, or as one rank of a ``torchrun`` group (:mod:`studio.distributed`, as the paper's
    4-GPU command): only rank 0 writes into ``run`` and returns the result (other ranks return None).

    Args:
        spec: a :class:`~studio.flows.prune.PruneSpec` with ``method="p3b"`` and ``data`` set.
        run: the run folder receiving events, checkpoints, ``plan.json``, results and the export (without one
            nothing is saved and the job cannot be resumed).
        loaded: the starting model (e.g. the studio's cached one); never mutated.
        resume: continue from the run's checkpoints.
    """
    t0 = time.time()
    params = get_method("p3b").resolve(spec.params)
    if spec.data is None:
        raise StudioError("P3B fine-tunes while it prunes: give --data (e.g. --data demo).")
    ctx = distributed.setup(spec.model.device)
    main = ctx.is_main
    cbs: list[Callback] = list(callbacks) if main else []  # rank 0 alone writes events
    try:
        distributed.barrier(ctx)  # rank 0 has cleared a leftover CANCEL (run_folder) before any rank reads it
        plain = cancel or CancelToken(run.cancel_file if run is not None else None)
        token = distributed.SyncedCancel(plain, ctx) if ctx.distributed else plain
        out = _run(spec, params, run, loaded, ctx, cbs, token, plain, resume, t0)
        return out if main else None
    finally:
        distributed.teardown(ctx)


def _run(
    spec: PruneSpec,
    params: dict,
    run: RunDir | None,
    loaded: LoadedModel | None,
    ctx: distributed.DistContext,
    callbacks: Sequence[Callback],
    cancel: CancelToken,
    plain: CancelToken,
    resume: bool,
    t0: float,
) -> RunResult | None:
    """One rank's P3B: every rank trains on its shard through DDP (the pruner keeps gates, probes and benefits
    identical across ranks); rank 0 alone evaluates, measures and exports. ``cancel`` is the token every rank
    reads once per step (synchronised under torchrun); ``plain`` the one rank 0 alone reads in the tail."""
    main = ctx.is_main
    if ctx.distributed:  # each rank on its own device (torchrun's LOCAL_RANK), a fresh copy of the model
        loaded = None
        spec = dataclasses.replace(spec, model=spec.model.with_(device=str(ctx.device)))
    loaded = model_for(spec, loaded)
    base = loaded.base
    settings = settings_from_params(params, loaded.device, spec.seed)
    ncls = base.num_classes
    accum = int(params.get("accum_steps") or 1)
    emit(callbacks, "log", message="preparing data")
    train = prepare(spec.data, "train", loaded.data_config, ncls, class_names=loaded.known_class_names)
    val = prepare(spec.data, "val", loaded.data_config, ncls, class_names=loaded.known_class_names)
    test = prepare(spec.data, spec.eval_split, loaded.data_config, ncls, class_names=loaded.known_class_names)
    model = copy.deepcopy(loaded.model)
    epochs = int(params["epochs"])
    # optimizer steps per epoch, as fit counts them: this rank's shard, in groups of accum micro-batches
    spe = max(1, math.ceil(max(1, math.ceil(math.ceil(len(train) / ctx.world) / spec.batch_size)) / accum))
    schedule = Schedule.for_run(
        epochs,
        spe,
        start=params.get("start_epoch"),
        sparse=params.get("sparse_epoch"),
        finalize=params.get("finalize_epoch"),
        steps_per_update=params.get("steps_per_update"),
    )
    pruner = P3BPruner(model, base, schedule, settings, callbacks=callbacks, ctx=ctx)
    emit(callbacks, SETUP_EVENT, **pruner.setup_record(), world=ctx.world, accum_steps=accum)
    lr = float(params["lr"])
    common = dict(
        batch_size=spec.batch_size,
        weight_decay=float(params["weight_decay"]),
        label_smoothing=settings.label_smoothing,
        seed=spec.seed,
        accum_steps=accum,
    )
    # Q5: the reference prunes at a constant learning rate (no scheduler while a prune ratio is set)
    phase1 = TrainSpec(
        epochs=schedule.finalize_epoch, lr=lr, warmup_epochs=0, min_lr=lr, select="last", **common
    )
    emit(callbacks, "status", state="pruning", schedule=schedule.to_dict(), epochs=epochs)
    total_steps = epochs * spe
    dist_args = dict(rank=ctx.rank, world=ctx.world)
    fit(
        model,
        train,
        val,
        phase1,
        hooks=[pruner],
        callbacks=_run_wide(
            callbacks, phase="prune", epoch_offset=0, step_offset=0, epochs=epochs, steps=total_steps
        ),
        cancel=cancel,
        checkpoint=None if run is None else run.path / PRUNE_CHECKPOINT,
        resume=resume,
        ddp_model=distributed.wrap(model, ctx),
        **dist_args,
    )
    plan = pruner.finalize()
    masked_top1 = evaluate(model, test).top1 if main else None  # final hard masks, LN over all C (Q3)
    pruner.remove()
    plan = with_summary(plan)
    if run is not None and main:
        plan.save(run.plan_file)
    emit(callbacks, "log", message=plan.describe())
    pruned = apply_plan(model, plan)
    sliced_top1 = evaluate(pruned, test).top1 if main else None
    finetune = epochs - schedule.finalize_epoch
    best_epoch = None
    if finetune > 0:
        ft_lr = float(params.get("finetune_lr") or lr)
        phase2 = TrainSpec(
            epochs=finetune, lr=ft_lr, warmup_epochs=0, min_lr=min(ft_lr, 1e-5), select="val", **common
        )
        emit(callbacks, "status", state="finetuning", epochs=finetune)
        res = fit(
            pruned,
            train,
            val,
            phase2,
            callbacks=_run_wide(
                callbacks,
                phase="finetune",
                epoch_offset=schedule.finalize_epoch,
                step_offset=schedule.finalize_epoch * spe,
                epochs=epochs,
                steps=total_steps,
            ),
            cancel=cancel,
            checkpoint=None if run is None else run.path / FINETUNE_CHECKPOINT,
            resume=resume,
            ddp_model=distributed.wrap(pruned, ctx),  # the sliced model is a new module: a new DDP wrapper
            **dist_args,
        )
        best_epoch = None if res.best_epoch is None else res.best_epoch + schedule.finalize_epoch
    digests = distributed.gather_digests(pruned, ctx)
    plans = distributed.gather(plan_digest(plan), ctx)  # the masks each rank sliced by
    if not main:
        return None
    pruned.eval()
    return finish(
        kind="p3b",
        method="p3b",
        loaded=loaded,
        model=pruned,
        plan=plan,
        how=spec.measure,
        run=run,
        started=t0,
        eval_data=test,
        export_extra={"method": "p3b"},
        section=lambda before, after: {
            "masked_top1": masked_top1,
            "sliced_top1": sliced_top1,
            "final_top1": after.get("top1"),
            "best_epoch": best_epoch,
            "schedule": schedule.to_dict(),
            "probe": settings.patch_probe,
            "params_fraction": after["params"] / before["params"],
            "budget_params": (1 - settings.prune_ratio) * before["params"],
            "world": ctx.world,
            "accum_steps": accum,
            "replicas_identical": len(set(digests)) == 1,
            "replica_digests": digests,
            "plan_digests": plans,
        },
        callbacks=callbacks,
        cancel=plain,
    )


FLOWS.add(
    "p3b",
    Flow(
        "p3b",
        PruneSpec,
        run_p3b,
        "P3B: prune while fine-tuning by block benefit, then fine-tune",
        trains=True,
    ),
)
