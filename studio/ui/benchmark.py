"""The Benchmark page's view-model: the page's choices as a :class:`~studio.flows.benchmark.BenchmarkSpec`, and
the benchmark run to show (this session's, else the newest of the model, so a reload loses nothing)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pandas as pd

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
    backends: Sequence[str] = ("eager",),
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
        backends=tuple(backends),
        warmup=int(warmup),
        repeats=int(repeats),
    )


def rows_frame(rows: Sequence[Mapping[str, object]]) -> pd.DataFrame:
    """A benchmark run's rows as a table; runs from before backends were recorded were timed eagerly."""
    df = pd.DataFrame(rows)
    if "backend" not in df:
        df.insert(1, "backend", "eager")
    if "efficiency" not in df:
        df["efficiency"] = df["measured_speedup"] / df["ideal_speedup"]
    df["setting"] = df["backend"] + " · " + df["dtype"]  # one line style per (backend, dtype) in the charts
    return df


def speedup_bars(rows: pd.DataFrame) -> pd.DataFrame:
    """The speed-up chart's long table for one batch size and dtype: a measured bar per backend, one ideal bar."""
    measured = rows.assign(series="measured · " + rows["backend"], factor=rows["measured_speedup"])
    ideal = rows.drop_duplicates("model").assign(series="ideal (MACs)", factor=lambda d: d["ideal_speedup"])
    keep = ["model", "series", "factor", "images_per_s", "efficiency", "macs"]
    return pd.concat([measured, ideal.assign(images_per_s=float("nan"), efficiency=1.0)])[keep]


def benchmarks_of(root: str | Path, source: str) -> Iterator[tuple[RunDir, list[str]]]:
    """Finished benchmark runs under ``root`` that timed ``source``, newest first, with the display names
    ``source`` had in each (the Benchmark page shows the last one, the Export page what it measured)."""
    for run in list_runs(root):
        try:
            spec, res = run.spec(), run.results()
        except (OSError, ValueError, StudioError):
            continue  # a damaged run is the Runs page's to report
        if spec.get("kind") != "benchmark" or not res or "benchmark" not in res:
            continue
        names = [m["name"] for m in spec.get("models", []) if (m.get("model") or {}).get("source") == source]
        if names:
            yield run, names


def last_benchmark(root: str | Path, source: str, session_run: str | None = None) -> RunDir | None:
    """``session_run`` when it has results, else the newest finished benchmark run that timed ``source``."""
    if session_run and RunDir(Path(session_run)).results():
        return RunDir(Path(session_run))
    return next((run for run, _ in benchmarks_of(root, source)), None)
