"""SLS — Straightforward Layer-wise Pruning (Han & Tang, ECCV 2024, arXiv 2407.14330): a depth cut chosen
from per-layer CLS separability, then retraining of the head (and adapters).

- The cut: :func:`sls_plan` keeps blocks ``0..L*-1`` (the paper's layers ``1..L*``); the patch embedding, the
  final norm and the classifier are **reused** as they are (no new head), exactly as in the paper. ``L*`` comes
  from the α rule (:mod:`studio.analysis.sls_cut`) on the per-layer t-SNE silhouette curve
  (:mod:`studio.analysis.separability`), or is given (``keep_blocks``, e.g. from the studio's slider).
- Registered as method ``sls`` in :data:`studio.prune.METHODS` (``python -m studio prune --method sls``); its
  analysis set is the calibration batches (``--calib-split train --calib-batches 16`` ≈ 1,000 images at batch 64).
- :func:`run_sls` is the whole paper pipeline in one call: analysis → cut → accuracy of the cut model →
  retraining → accuracy and measured throughput (batch 1 with the paper's 50 warm-up / 100 timed passes, and a
  large batch) → export. Used by the studio's Layer separability page and ``bench/sls_demo.py``.

Retraining follows the SLS recipe (``paper:sls`` in :mod:`studio.recovery`: AdamW lr 1e-3, wd 1e-4, cosine with
10 warm-up epochs to 1e-5, batch 64, 100 epochs; ``cpu`` shortens it to 20 epochs with 2 warm-up epochs). What
trains: adapters + head for a PETL model (the paper); a fully fine-tuned model has no adapters, so it retrains
head + final norm (optionally the last kept block, or fresh LoRA adapters) — an adaptation, not in the paper.
Model selection uses the **validation** split; the paper's code reports the best of ten **test** evaluations
(pitfall P7), which overstates accuracy — the studio never selects on test.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.sls_cut import DEFAULT_ALPHA, Cut
from ..data import DataSpec
from ..errors import StudioError
from ..events import Callback, CancelToken, check, emit
from ..models import LoadedModel, ModelSpec
from ..plan import BaseArch, BlockPlan, PrunePlan
from . import METHODS, Method, Option, PruneRequest

RETRAIN_PRESETS = ("paper", "cpu", "none")
TRAINABLE = ("auto", "head", "head+norm", "head+norm+last", "adapters", "lora")
PAPER_SELECTION_NOTE = (
    "The SLS paper's code reports the best of ten test-set evaluations during retraining (model selection on "
    "test); the studio selects the retrained model on the validation split and reports test once."
)


# --------------------------------------------------------------------------------------------------- plan
def sls_plan(base: BaseArch, keep: int, *, params: Mapping[str, Any] | None = None) -> PrunePlan:
    """The depth cut as a plan: blocks ``0..keep-1`` kept whole; embedding, final norm and head reused."""
    if not isinstance(keep, int) or not 1 <= keep <= base.depth:
        raise StudioError(f"SLS keeps between 1 and {base.depth} blocks, got {keep!r}.")
    return PrunePlan(
        base=base,
        blocks=tuple(BlockPlan(i) for i in range(keep)),
        method="sls",
        params={"keep": keep, **dict(params or {})},
    ).validate()


def preview_cut(loaded: LoadedModel, keep: int, *, base_images_per_s: float | None = None) -> dict[str, Any]:
    """Params and MACs of the cut model (analytic, exact) and an estimated throughput, without building it.

    The estimate scales a measured base throughput by the MACs ratio (ideal: the real gain is usually lower).
    """
    from ..costs import plan_cost

    dense = plan_cost(PrunePlan.dense(loaded.base))
    cut = plan_cost(sls_plan(loaded.base, keep))
    out: dict[str, Any] = {
        "keep": keep,
        "removed": loaded.base.depth - keep,
        "params": cut["params"],
        "macs": cut["macs"],
        "params_dense": dense["params"],
        "macs_dense": dense["macs"],
        "params_fraction": cut["params"] / dense["params"],
        "macs_fraction": cut["macs"] / dense["macs"],
        "ideal_speedup": dense["macs"] / cut["macs"],
    }
    if base_images_per_s is not None:
        out["est_images_per_s"] = base_images_per_s * out["ideal_speedup"]
    return out


# --------------------------------------------------------------------------------------- registered method
def _plan_sls(req: PruneRequest, *, callbacks: Sequence[Callback] = (), cancel: CancelToken | None = None):
    from ..analysis.separability import SeparabilitySpec, analyze_features, features_from_bank
    from ..data import TensorData
    from ..features import extract

    p = dict(req.params)
    ignored = [n for n in ("target_macs", "ratio") if p.get(n) is not None]
    if ignored:  # the common budget options reach every method (the Prune page always sends one)
        emit(
            callbacks,
            "log",
            message=f"SLS ignores {', '.join(ignored)}: the depth comes from the alpha rule or keep_blocks.",
        )
    keep = int(p.get("keep_blocks") or 0)
    common = {
        "alpha": p["alpha"],
        "embed": p["embed"],
        "perplexity": p["perplexity"],
        "seed": req.seed,
        "ignored_budget": ignored,
    }
    if keep:
        return sls_plan(req.loaded.base, keep, params={**common, "keep_blocks": keep, "rule": "given"})
    if not req.batches:
        raise StudioError("SLS needs labelled data to score the layers: give --data (or --keep-blocks N).")
    x = torch.cat([b[0].detach().cpu() for b in req.batches])
    y = torch.cat([torch.as_tensor(b[1]).detach().cpu() for b in req.batches])
    bank = extract(req.loaded.model, TensorData(x, y), callbacks=callbacks, cancel=cancel)
    feats = features_from_bank(
        bank.cls.numpy(), bank.labels.numpy(), class_names=req.loaded.class_names, split="calibration"
    )
    spec = SeparabilitySpec(
        embed=p["embed"], alpha=p["alpha"], perplexity=p["perplexity"], seed=req.seed, lazy=bool(p["lazy"])
    )
    res = analyze_features(feats, spec, callbacks=callbacks, cancel=cancel)
    cut = res.suggested
    emit(callbacks, "log", message=cut.reason)
    return sls_plan(
        req.loaded.base,
        cut.keep,
        params={
            **common,
            "keep_blocks": None,
            "rule": "alpha",
            "lazy": bool(p["lazy"]),
            "samples": res.samples,
            "curve": list(res.silhouette),
            "knn": list(res.fast.knn),
            "silhouette_hd": list(res.fast.silhouette_hd),
            "scored_on": "silhouette" if res.cut is not None else "silhouette_hd",
            "reason": cut.reason,
            "versions": res.versions,
        },
    )


METHODS.add(
    "sls",
    Method(
        "sls",
        _plan_sls,
        "SLS (Han & Tang, ECCV 2024): cut the last blocks where per-layer CLS separability falls below α·SC_last",
        options=(
            Option(
                "alpha",
                float,
                DEFAULT_ALPHA,
                "SLS threshold factor: keep layers scoring >= alpha * last layer's score",
            ),
            Option("keep_blocks", int, 0, "SLS: blocks to keep, overriding the alpha rule (0: use the rule)"),
            Option(
                "embed",
                str,
                "tsne",
                "SLS 2-D embedding scored by the silhouette (none: fast high-dim score)",
                choices=("tsne", "umap", "pca", "none"),
            ),
            Option("perplexity", float, 30.0, "SLS t-SNE perplexity (paper: 30)"),
            Option(
                "lazy", bool, False, "SLS: embed only the layers the top-down scan reads, as the paper's code"
            ),
        ),
        needs_data=True,
    ),
)


# ------------------------------------------------------------------------------------------ retraining
def trainable_rule(kind: str, keep: int, model: torch.nn.Module) -> str:
    """The ``TrainSpec.trainable`` rule of a retraining choice on a model cut to ``keep`` blocks."""
    from ..petl import ADAPTER_TRAINABLE, has_lora

    if kind == "auto":
        kind = "adapters" if has_lora(model) else "head+norm"
    heads = r"^(head|head_dist|fc_norm)\."
    rules = {
        "head": "re:" + heads,
        "head+norm": r"re:^(head|head_dist|fc_norm|norm)\.",
        "head+norm+last": rf"re:^(head|head_dist|fc_norm|norm)\.|^blocks\.{keep - 1}\.",
        "adapters": ADAPTER_TRAINABLE,
        "lora": ADAPTER_TRAINABLE,
    }
    if kind not in rules:
        raise StudioError(f"Unknown retraining choice '{kind}': use one of {', '.join(TRAINABLE)}.")
    if kind == "adapters" and not has_lora(model):
        raise StudioError(
            "This model has no adapters to retrain. Use trainable 'head+norm' (fully fine-tuned models) or "
            "'lora' (adds fresh LoRA adapters to the kept blocks)."
        )
    return rules[kind]


def retrain_train_spec(preset: str, *, trainable: str, epochs: int | None = None, seed: int = 0):
    """The SLS recipe (``paper:sls`` of :mod:`studio.recovery`) as a ``TrainSpec``; ``cpu`` is its short form."""
    from ..recovery import resolve_recipe

    if preset not in RETRAIN_PRESETS or preset == "none":
        raise StudioError(f"Unknown SLS retraining preset '{preset}': use paper or cpu (or none to skip).")
    over: dict[str, Any] = {"trainable": trainable}
    if preset == "cpu":
        over.update(epochs=20, warmup_epochs=2)
    if epochs is not None:
        over.update(epochs=epochs, warmup_epochs=max(1, round(epochs / 10)))
    return resolve_recipe("paper:sls", "sls", over).train_spec(seed=seed)


# ------------------------------------------------------------------------------------------ the pipeline
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


@dataclass(frozen=True)
class SLSRunResult:
    """Before/after numbers of an SLS run: ``stages`` holds ``dense``, ``cut`` and (if retrained) ``retrained``."""

    keep: int
    depth: int
    cut: Cut | None
    analysis: dict[str, Any] | None
    plan: PrunePlan
    stages: dict[str, dict[str, Any]]
    speedup: dict[str, float]
    ideal_speedup: float
    retrain: dict[str, Any] | None
    export: str | None
    device: str
    seconds: float
    notes: tuple[str, ...] = ()

    def table(self) -> list[dict[str, Any]]:
        """One row per stage: blocks, params, MACs, accuracy, images/s."""
        rows = []
        for name, s in self.stages.items():
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

    def to_dict(self) -> dict[str, Any]:
        final = self.stages.get("retrained", self.stages["cut"])
        top1 = next((k for k in final if k.endswith("_top1") and k != "val_top1"), "val_top1")

        def flat(s: dict[str, Any]) -> dict[str, Any]:  # the shape prune results have (read by the Runs page)
            return {**s, "top1": s.get(top1)}

        return {
            "method": "sls",
            "before": flat(self.stages["dense"]),
            "after": flat(final),
            "summary": dict(self.plan.summary),
            "params": dict(self.plan.params),
            "keep": self.keep,
            "depth": self.depth,
            "removed": self.depth - self.keep,
            "cut": None if self.cut is None else self.cut.to_dict(),
            "analysis": self.analysis,
            "plan": self.plan.to_dict(),
            "stages": self.stages,
            "table": self.table(),
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "retrain": self.retrain,
            "export": self.export,
            "device": self.device,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


def _accuracy(model: torch.nn.Module, data: Mapping[str, Any], num_classes: int) -> dict[str, float]:
    from ..evaluate import evaluate

    return {f"{k}_top1": evaluate(model, ds, num_classes=num_classes).top1 for k, ds in data.items()}


def _speed(
    model: torch.nn.Module,
    input_size: Sequence[int],
    sizes: Sequence[int],
    *,
    callbacks: Sequence[Callback],
    cancel: CancelToken | None,
) -> dict[str, Any]:
    """Throughput of the deployable form (LoRA fused); batch 1 with SLS's 50 warm-up and 100 timed passes."""
    from ..bench import measure_throughput
    from ..petl import fuse_lora, has_lora

    m = fuse_lora(copy.deepcopy(model)) if has_lora(model) else model
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
    run: Any = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> SLSRunResult:
    """Analyse (unless ``spec.keep``), cut, measure, retrain, measure, export: the SLS paper's ``prune.py``.

    Args:
        loaded: the model to cut (never mutated; the studio passes its cached pristine model).
        run: a :class:`~studio.runs.RunDir` receiving events (thinned, :func:`studio.jobs.job_logger`),
            ``plan.json``, a training checkpoint, ``results.json`` and ``export/``.
        resume: continue the retraining from the run's checkpoint.
    """
    from ..analysis.separability import SeparabilitySpec, analyze
    from ..bench import profile
    from ..costs import with_summary
    from ..data import prepare
    from ..device import describe_device
    from ..models import load_model
    from ..petl import LoRASpec, add_lora, fuse_lora, has_lora
    from ..surgery import apply_plan
    from ..train import fit

    t0 = time.time()
    if run is not None:
        from ..jobs import job_logger

        callbacks = [*callbacks, job_logger(run)]
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
    split_data = {s: prepare(spec.data, s, loaded.data_config, n_cls) for s in ("val", spec.eval_split)}
    input_size = loaded.data_config["input_size"]
    stages: dict[str, dict[str, Any]] = {}

    def measure(name: str, model: torch.nn.Module) -> None:
        check(cancel)
        emit(callbacks, "status", state=f"measuring {name}")
        plain = fuse_lora(copy.deepcopy(model)) if has_lora(model) else model
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
            spec.trainable if spec.trainable != "auto" else ("adapters" if has_lora(pruned) else "head+norm")
        )
        if kind == "lora" and not has_lora(pruned):
            add_lora(pruned, LoRASpec())
        rule = trainable_rule(kind, keep, pruned)
        tspec = retrain_train_spec(preset, trainable=rule, epochs=spec.epochs, seed=spec.seed)
        emit(callbacks, "status", state="retraining", preset=preset, trainable=kind, epochs=tspec.epochs)
        train = prepare(spec.data, "train", loaded.data_config, n_cls)
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
        if kind in ("head+norm", "head+norm+last", "lora") and not has_lora(loaded.model):
            notes.append(
                "The model was fully fine-tuned (no adapters), so retraining trains "
                f"{'fresh LoRA adapters + head' if kind == 'lora' else kind.replace('+', ' + ')}: an adaptation of "
                "the paper, which retrains adapters + head."
            )
    export_dir = None
    if spec.export and run is not None:
        from ..export import export

        final = fuse_lora(pruned) if has_lora(pruned) else pruned
        last = stages.get("retrained", stages["cut"])
        export(
            final,
            base,
            run.export_dir,
            plan=plan,
            data_config=loaded.data_config,
            class_names=loaded.class_names,
            metrics={
                k: last[k] for k in ("params", "macs", "val_top1", f"{spec.eval_split}_top1") if k in last
            },
        )
        export_dir = str(run.export_dir)
    speedup = {
        bs: stages["cut"]["throughput"][bs]["images_per_s"]
        / stages["dense"]["throughput"][bs]["images_per_s"]
        for bs in stages["cut"].get("throughput", {})
    }
    result_ = SLSRunResult(
        keep=keep,
        depth=base.depth,
        cut=cut,
        analysis=analysis,
        plan=plan,
        stages=stages,
        speedup=speedup,
        ideal_speedup=stages["dense"]["macs"] / stages["cut"]["macs"],
        retrain=retrain_info,
        export=export_dir,
        device=describe_device(device),
        seconds=time.time() - t0,
        notes=tuple(notes),
    )
    if run is not None:
        run.write_results(result_.to_dict())
    emit(callbacks, "status", state="done")
    return result_


def cli_args(spec: SLSRunSpec, out: str) -> list[str]:
    """The ``python -m studio`` arguments that run ``spec`` into run folder ``out`` (a background job)."""
    m, d = spec.model, spec.data
    argv = ["analyze", "sls", "--apply", "--model", m.source, "--data", str(d), "--split", spec.eval_split]
    for flag, value in (
        ("--arch", m.arch),
        ("--num-classes", m.num_classes),
        ("--img-size", m.img_size),
        ("--limit", d.limit),
        ("--keep", spec.keep),
        ("--epochs", spec.epochs),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if m.reset_head:
        argv.append("--reset-head")
    if m.kwargs:
        import json

        argv += ["--timm-kwargs", json.dumps(dict(m.kwargs))]
    for name in ("mean", "std"):
        if name in m.data:
            argv += [f"--{name}", *(str(v) for v in m.data[name])]
    if d.skip_bad_files:
        argv.append("--skip-bad-files")
    argv += [
        "--alpha",
        str(spec.alpha),
        "--embed",
        spec.embed,
        "--samples",
        str(spec.samples or 0),
        "--analysis-split",
        spec.analysis_split,
        "--perplexity",
        str(spec.perplexity),
        "--retrain",
        spec.retrain,
        "--trainable",
        spec.trainable,
        "--seed",
        str(spec.seed),
        "--out",
        out,
    ]
    if not spec.bench:
        argv.append("--no-bench")
    return argv
