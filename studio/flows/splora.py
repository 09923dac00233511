"""The SPLoRA flow (Hedegaard et al., "Structured Pruning Adapters"): adapters + iterative channel pruning.

The method's parts (masks, criteria, series, task files) live in :mod:`studio.prune.splora`; this module runs
every series the options ask for (SPLoRA, and fine-pruning with ``compare``) with per-series checkpoints in
the run folder (``splora-<series>.pt``, written after the initial training and after every pruning step) and a
training-loop checkpoint per phase (``splora-<series>.step<k>.pt``: adapter weights, optimizer, schedule
position, epoch, RNG state), so cancel stops at the next training step without losing the adapter training, and
``resume`` continues exactly where the run stopped. The primary series' fused, pruned model
goes through the shared tail (before = the dense adapted model); the other series export beside it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench import count_params
from ..data import prepare
from ..errors import StudioError
from ..events import Callback, CancelToken, emit
from ..export import export
from ..models import LoadedModel
from ..prune import get_method
from ..prune.splora import (
    DENSITY_DEFINITION,
    TASK_DIR,
    SeriesResult,
    Splits,
    SploraOptions,
    fused_pruned,
    parity,
    run_series,
    save_task,
    stream_norms,
)
from ..runs import RunDir
from ..splora import count_learned
from . import FLOWS, Flow
from .prune import PruneSpec, model_for
from .stages import RunResult, finish


def checkpoint_name(series: str) -> str:
    return f"splora-{series}.pt"


def export_size(info: dict[str, Any]) -> dict[str, int]:
    """``export_bytes`` of a series' exported weights (none when the run saved nothing)."""
    if "export" not in info:
        return {}
    return {"export_bytes": (Path(info["export"]) / "model.safetensors").stat().st_size}


def load_splits(loaded: LoadedModel, spec: PruneSpec) -> Splits:
    if spec.data is None:
        raise StudioError("SPLoRA trains while it prunes: give --data (e.g. --data demo).")
    n = loaded.base.num_classes
    return Splits(
        train=prepare(spec.data, "train", loaded.data_config, n, class_names=loaded.known_class_names),
        val=prepare(spec.data, "val", loaded.data_config, n, class_names=loaded.known_class_names),
        test=prepare(spec.data, spec.eval_split, loaded.data_config, n, class_names=loaded.known_class_names)
        if spec.evaluate
        else None,
    )


def run_splora(
    spec: PruneSpec,
    *,
    run: RunDir | None,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    resume: bool = False,
) -> RunResult:
    """Every series, fused + pruned exports, the compact task file, then the shared tail (module docstring)."""
    t0 = time.time()
    params = get_method("splora").resolve(spec.params)
    opts = SploraOptions.from_params(params, batch_size=spec.batch_size, seed=spec.seed)
    torch.manual_seed(spec.seed)
    loaded = model_for(spec, loaded)
    if "embed" in opts.scope:
        for _, norm in stream_norms(loaded.model):
            if not isinstance(norm, nn.LayerNorm | nn.Identity):
                raise StudioError(
                    f"Embedding pruning needs LayerNorms; this model has {type(norm).__name__}. "
                    "Use --scope head_dims,mlp."
                )
    base = loaded.base
    splits = load_splits(loaded, spec)
    emit(callbacks, "status", state="training", method="splora", series=list(opts.series))
    results: dict[str, SeriesResult] = {}
    for name in opts.series:
        results[name] = run_series(
            loaded,
            base,
            splits,
            name,
            opts,
            callbacks=callbacks,
            cancel=cancel,
            checkpoint=None if run is None else run.path / checkpoint_name(name),
            resume=resume,
        )
    emit(callbacks, "status", state="exporting")
    x = next(iter(torch.utils.data.DataLoader(splits.val, batch_size=64)))[0].to(loaded.device)
    summary: dict[str, Any] = {}
    primary = opts.series[0]
    fused: dict[str, tuple[nn.Module, Any]] = {}
    for name, res in results.items():
        pruned, plan = fused_pruned(res, base, params={**opts.to_dict(), "series": name})
        fused[name] = (pruned, plan)
        info: dict[str, Any] = {
            "steps": res.steps,
            "plan_summary": dict(plan.summary),
            "parity_max_abs_diff": parity(res.model, pruned, x),
            "final": res.steps[-1] if res.steps else None,
            "learned": count_learned(res.model).to_dict()
            if name == "splora"
            else {"total": count_params(pruned)},
        }
        if run is not None:
            folder = run.export_dir if name == primary else run.path / f"export-{name}"
            if name != primary:  # the primary series is exported by the shared tail
                metrics = {k: res.steps[-1][k] for k in ("val_top1", "test_top1") if k in res.steps[-1]}
                export(
                    pruned,
                    base,
                    folder,
                    plan=plan,
                    data_config=loaded.data_config,
                    class_names=loaded.known_class_names,
                    metrics=metrics,
                    extra={"splora": {"series": name, "options": opts.to_dict()}},
                    overwrite=True,  # the run's own folder (a resumed attempt replaces it)
                )
            info["export"] = str(folder)
            if name == "splora":
                info["task"] = save_task(
                    run.path / TASK_DIR,
                    res.model,
                    res.masks,
                    backbone=spec.model.to_dict(),
                    opts=opts,
                    plan=plan,
                )
        summary[name] = info
    dense = results[primary].dense
    assert dense is not None
    model, plan = fused[primary]
    result = finish(
        kind="splora",
        method="splora",
        loaded=loaded,
        model=model,
        plan=plan,
        how=spec.measure,
        run=run,
        started=t0,
        eval_data=splits.test,
        before_model=dense,
        export_extra={"splora": {"series": primary, "options": opts.to_dict()}},
        section=lambda before, after: {  # called after the tail exported the primary series too
            "series": {n: {**info, **export_size(info)} for n, info in summary.items()},
            "options": opts.to_dict(),
            "density_definition": DENSITY_DEFINITION,
        },
        callbacks=callbacks,
        cancel=cancel,
    )
    if run is not None:
        for name in opts.series:  # the job is complete: the resume checkpoints have no further use
            for ckpt in run.path.glob(f"{Path(checkpoint_name(name)).stem}*.pt"):
                ckpt.unlink(missing_ok=True)
    return result


FLOWS.add(
    "splora",
    Flow(
        "splora",
        PruneSpec,
        run_splora,
        "SPLoRA: adapters over a frozen backbone with iterative channel pruning (and the fine-pruning baseline)",
        trains=True,
    ),
)
