"""The Benchmark page's view-model: the page's choices as a :class:`~studio.flows.benchmark.BenchmarkSpec`, and
the benchmark run to show (this session's, else the newest of the model, so a reload loses nothing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import StudioError
from ..flows.benchmark import BenchmarkSpec
from ..models import ModelSpec
from ..runs import RunDir, list_runs

DENSE = "dense"  # the page's key of the loaded (unpruned) model among the run folders


def benchmark_spec(
    model: ModelSpec,
    picked: Mapping[str, str],
    batch_sizes: Sequence[int],
    dtypes: Sequence[str],
    *,
    warmup: int,
    repeats: int,
) -> BenchmarkSpec:
    """The spec of the page's choices: ``picked`` maps ``dense`` or a run folder to its display name; a run's
    model is its export, on the loaded model's device."""
    models = tuple(
        (name, model if key == DENSE else ModelSpec(str(Path(key) / "export"), device=model.device))
        for key, name in picked.items()
    )
    return BenchmarkSpec(
        models=models,
        batch_sizes=tuple(sorted(int(b) for b in batch_sizes)),
        dtypes=tuple(dtypes),
        warmup=int(warmup),
        repeats=int(repeats),
    )


def last_benchmark(root: str | Path, source: str, session_run: str | None = None) -> RunDir | None:
    """``session_run`` when it has results, else the newest finished benchmark run that timed ``source``."""
    if session_run and RunDir(Path(session_run)).results():
        return RunDir(Path(session_run))
    for run in list_runs(root):
        try:
            spec, res = run.spec(), run.results()
        except (OSError, ValueError, StudioError):
            continue  # a damaged run is the Runs page's to report
        if spec.get("kind") != "benchmark" or not res or "benchmark" not in res:
            continue
        if any((m.get("model") or {}).get("source") == source for m in spec.get("models", [])):
            return run
    return None
