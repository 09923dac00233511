"""The SLS flow (Han & Tang, ECCV 2024): analyse per-layer separability, cut the depth, retrain, the tail.

The analysis (:mod:`studio.analysis.separability`), the cut rule (:mod:`studio.analysis.sls_cut`) and the
depth-cut plan and retraining recipes (:mod:`studio.prune.sls`) sit below; this module is the paper's
``prune.py`` end to end: measure the dense and the cut model (accuracy on val and the eval split, throughput of
the deployable form), retrain (checkpointed: cancel keeps the finished epochs, ``resume`` continues), measure
again, and hand the retrained model to the shared tail (export, ``results.json`` with an ``sls`` section of
every stage).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.separability import SeparabilitySpec, analyze
from ..analysis.sls_cut import DEFAULT_ALPHA
from ..bench import measure_throughput, profile
from ..costs import with_summary
from ..data import DataSpec, prepare
from ..errors import StudioError
from ..evaluate import evaluate
from ..events import Callback, CancelToken, check, emit
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..petl import (
    ConvpassSpec,
    LoRASpec,
    add_convpass,
    add_lora,
    deployable,
    fuse_lora,
    has_adapters,
    has_lora,
)
from ..prune.sls import (
    PAPER_SELECTION_NOTE,
    RETRAIN_PRESETS,
    TRAINABLE,
    retrain_train_spec,
    sls_plan,
    trainable_rule,
)
from ..runs import RunDir
from ..surgery import apply_plan
from ..train import fit
from . import FLOWS, Flow
from .stages import Measure, RunResult, finish


@dataclass(frozen=True)
class SLSRunSpec:
    """The SLS pipeline: analyse, cut, retrain, measure (``spec.json`` of an SLS run).

    Attributes:
        keep: blocks to keep; None chooses them with the α rule on the analysis curve.
        samples, analysis_split, embed, alpha, perplexity: the analysis (see ``SeparabilitySpec``).
        retrain: ``paper`` (100 epochs), ``cpu`` (20 epochs) or ``none``; ``auto`` picks paper on a GPU.
        trainable: what retrains (``auto``: adapters + head for PETL models, head + final norm otherwise).
        epochs: override the preset's epochs.
        eval_split: split of the reported accuracy (selection always uses ``val``).
        bench_batch_sizes: throughput batch sizes; batch 1 uses the paper's 50 warm-up / 100 timed passes.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    keep: int | None = None
    alpha: float = DEFAULT_ALPHA
    embed: str = "tsne"
    samples: int | None = 1000
    analysis_split: str = "train"
    perplexity: float = 30.0
    retrain: str = "auto"
    trainable: str = "auto"
    epochs: int | None = None
    eval_split: str = "test"
    seed: int = 0
    bench: bool = True
    bench_batch_sizes: tuple[int, ...] = (1, 64)
    export: bool = True

    @property
    def kind(self) -> str:
        return "sls"

    def validate(self) -> None:
        """Refuse what cannot run, with one sentence saying what to fix, before any work starts."""
        if self.keep is not None and (isinstance(self.keep, bool) or int(self.keep) < 1):
            raise StudioError(f"--keep must be at least 1 block, got {self.keep}.")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise StudioError(f"--alpha must be in (0, 1], got {self.alpha}.")
        if self.retrain not in (*RETRAIN_PRESETS, "auto"):
            raise StudioError(
                f"--retrain must be one of auto, {', '.join(RETRAIN_PRESETS)}, not {self.retrain!r}."
            )
        if self.trainable not in TRAINABLE:
            raise StudioError(f"--trainable must be one of {', '.join(TRAINABLE)}, not {self.trainable!r}.")
        if self.epochs is not None and int(self.epochs) < 1:
            raise StudioError(f"--epochs must be at least 1, got {self.epochs}.")
        if self.samples is not None and int(self.samples) < 10:
            raise StudioError(
                f"--samples must be at least 10 (or 0 for the whole split), got {self.samples}."
            )

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["model"], d["data"] = self.model.to_dict(), self.data.to_dict()
        d["bench_batch_sizes"] = list(self.bench_batch_sizes)
        return {"kind": "sls", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SLSRunSpec:
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["model"] = ModelSpec.from_dict(d.get("model") or {})
        kw["data"] = DataSpec.from_dict(d.get("data") or {})
        kw["bench_batch_sizes"] = tuple(d.get("bench_batch_sizes", (1, 64)))
        return cls(**kw)


def stage_table(stages: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage (dense, cut, retrained): blocks, params, MACs, accuracies, images/s."""
    rows = []
    for name, s in stages.items():
        row: dict[str, Any] = {
            "stage": name,
            "blocks": s["blocks"],
            "params": s["params"],
            "MACs": s["macs"],
            "val top-1": s.get("val_top1"),
            "test top-1": s.get("test_top1"),
        }
        for bs, t in s.get("throughput", {}).items():
            row[f"img/s bs{bs}"] = t["images_per_s"]
        rows.append(row)
    return rows


def _accuracy(model: torch.nn.Module, data: Mapping[str, Any], num_classes: int) -> dict[str, float]:
    return {f"{k}_top1": evaluate(model, ds, num_classes=num_classes).top1 for k, ds in data.items()}


def _speed(
    model: torch.nn.Module,
    input_size: Sequence[int],
    sizes: Sequence[int],
    *,
    callbacks: Sequence[Callback],
    cancel: CancelToken | None,
) -> dict[str, Any]:
    """Throughput of the deployable form (LoRA fused, Convpass kept); batch 1 with SLS's 50 warm-up and 100 timed
    passes."""
    m = deployable(model)
    out = {}
    for bs in sizes:
        check(cancel)
        warm, rep = (50, 100) if bs == 1 else (5, 20)
        r = measure_throughput(
            m, input_size, batch_size=bs, warmup=warm, repeats=rep, callbacks=callbacks, cancel=cancel
        )
        out[str(bs)] = r.to_dict()
    return out


def run_sls(
    spec: SLSRunSpec,
    *,
    loaded: LoadedModel | None = None,
    run: RunDir | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> RunResult:
    """Analyse (unless ``spec.keep``), cut, measure, retrain, measure, export: the SLS paper's ``prune.py``.

    Args:
        loaded: the model to cut (never mutated; the studio passes its cached pristine model).
        run: a :class:`~studio.runs.RunDir` receiving events (thinned, :func:`studio.jobs.job_logger`),
            ``plan.json``, a training checkpoint, ``results.json`` and ``export/``.
        resume: continue the retraining from the run's checkpoint.
    """
    t0 = time.time()
    loaded = loaded or load_model(spec.model)
    base = loaded.base
    device = loaded.device
    preset = spec.retrain if spec.retrain != "auto" else ("paper" if device.type == "cuda" else "cpu")
    notes = [PAPER_SELECTION_NOTE]

    analysis, cut = None, None
    keep = spec.keep
    if keep is None:
        emit(callbacks, "status", state="analysing")
        res = analyze(
            SeparabilitySpec(
                model=spec.model,
                data=spec.data,
                split=spec.analysis_split,
                samples=spec.samples,
                embed=spec.embed,
                alpha=spec.alpha,
                perplexity=spec.perplexity,
                seed=spec.seed,
            ),
            loaded=loaded,
            callbacks=callbacks,
            cancel=cancel,
        )
        cut, analysis = res.suggested, res.to_dict()
        keep = cut.keep
        emit(callbacks, "log", message=cut.reason)
    plan = with_summary(
        sls_plan(
            base,
            keep,
            params={
                "alpha": spec.alpha,
                "embed": spec.embed,
                "rule": "given" if spec.keep else "alpha",
                "samples": spec.samples,
                "analysis_split": spec.analysis_split,
            },
        )
    )
    if run is not None:
        plan.save(run.plan_file)

    n_cls = base.num_classes
    split_data = {
        s: prepare(spec.data, s, loaded.data_config, n_cls, class_names=loaded.known_class_names)
        for s in ("val", spec.eval_split)
    }
    input_size = loaded.data_config["input_size"]
    stages: dict[str, dict[str, Any]] = {}

    def measure(name: str, model: torch.nn.Module) -> None:
        check(cancel)
        emit(callbacks, "status", state=f"measuring {name}")
        plain = deployable(model)
        s: dict[str, Any] = {"blocks": len(model.blocks), **profile(plain, input_size)}  # type: ignore[arg-type]
        s.update(
            _accuracy(model, {"val": split_data["val"], spec.eval_split: split_data[spec.eval_split]}, n_cls)
        )
        if spec.bench and name != "retrained":  # same structure as the cut model: same speed
            s["throughput"] = _speed(
                model, input_size, spec.bench_batch_sizes, callbacks=callbacks, cancel=cancel
            )
        stages[name] = s
        emit(callbacks, "metric", stage=name, **{k: v for k, v in s.items() if isinstance(v, int | float)})

    measure("dense", loaded.model)
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    measure("cut", pruned)

    retrain_info = None
    if preset != "none":
        check(cancel)
        kind = (
            spec.trainable
            if spec.trainable != "auto"
            else ("adapters" if has_adapters(pruned) else "head+norm")
        )
        if kind == "lora" and not has_lora(pruned):
            add_lora(pruned, LoRASpec())
        if kind == "convpass" and not has_adapters(pruned):
            add_convpass(pruned, ConvpassSpec())
        rule = trainable_rule(kind, keep, pruned)
        tspec = retrain_train_spec(preset, trainable=rule, epochs=spec.epochs, seed=spec.seed)
        emit(callbacks, "status", state="retraining", preset=preset, trainable=kind, epochs=tspec.epochs)
        train = prepare(spec.data, "train", loaded.data_config, n_cls, class_names=loaded.known_class_names)
        result = fit(
            pruned,
            train,
            split_data["val"],
            tspec,
            callbacks=callbacks,
            cancel=cancel,
            checkpoint=None if run is None else run.checkpoint_file,
            resume=resume,
        )
        pruned.eval()
        measure("retrained", pruned)
        if "cut" in stages and "throughput" in stages["cut"]:
            stages["retrained"]["throughput"] = stages["cut"]["throughput"]
        retrain_info = {
            "preset": preset,
            "trainable": kind,
            "rule": rule,
            "train_spec": tspec.to_dict(),
            "trainable_params": sum(p.numel() for p in pruned.parameters() if p.requires_grad),
            "best_epoch": result.best_epoch,
            "best_val_top1": result.best_val_top1,
            "epochs_run": result.epochs_run,
            "seconds": result.seconds,
            "history": result.history,
        }
        if kind in ("head+norm", "head+norm+last", "lora", "convpass") and not has_adapters(loaded.model):
            fresh = {"lora": "fresh LoRA adapters + head", "convpass": "fresh Convpass adapters + head"}
            notes.append(
                "The model was fully fine-tuned (no adapters), so retraining trains "
                f"{fresh.get(kind, kind.replace('+', ' + '))}: an adaptation of the paper, which retrains "
                "adapters + head."
            )
    final = fuse_lora(pruned) if has_lora(pruned) else pruned
    last = stages.get("retrained", stages["cut"])

    def flat(s: dict[str, Any]) -> dict[str, Any]:  # the shape every flow's before/after has
        return {**s, "top1": s.get(f"{spec.eval_split}_top1")}

    section = {
        "keep": keep,
        "depth": base.depth,
        "removed": base.depth - keep,
        "cut": None if cut is None else cut.to_dict(),
        "analysis": analysis,
        "stages": stages,
        "table": stage_table(stages),
        "retrain": retrain_info,
        "notes": list(notes),
    }
    return finish(
        kind="sls",
        method="sls",
        loaded=loaded,
        model=final,
        plan=plan,
        how=Measure(evaluate=False, bench=False, export=spec.export),
        run=run,
        started=t0,
        before=flat(stages["dense"]),
        after=flat(last),
        section=section,
        callbacks=callbacks,
        cancel=cancel,
    )


FLOWS.add(
    "sls",
    Flow("sls", SLSRunSpec, run_sls, "SLS: separability analysis, depth cut, retraining", trains=True),
)
