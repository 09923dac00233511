"""The Export page's "checked on" table: on which deployment backends an export was checked for correctness
(the eager reload, ONNX Runtime parity) and timed (the newest benchmark run that measured it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..backends import BACKENDS
from ..export import RELOAD_CHECK
from .benchmark import benchmarks_of, rows_frame


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _timed(export_dir: Path, root: str | Path) -> dict[str, str]:
    """backend -> what the newest benchmark run that timed this export measured on it."""
    for run, names in benchmarks_of(root, str(export_dir)):
        df = rows_frame(run.results()["benchmark"]["rows"])
        out: dict[str, str] = {}
        for r in df[df["model"].isin(names)].sort_values(["batch_size", "dtype"]).to_dict("records"):
            text = (
                f"bs {r['batch_size']} {r['dtype']}: {r['images_per_s']:.1f} img/s, ×{r['measured_speedup']:.2f} "
                f"(efficiency {r['efficiency']:.0%})"
            )
            b = r["backend"]
            out[b] = f"{out[b]}; {text}" if b in out else f"{text} — run {run.path.name}"
        return out
    return {}


def backend_checks(export_dir: str | Path, root: str | Path) -> pd.DataFrame:
    """One row per registered backend: its correctness check and its timing, or what to do to get them."""
    export_dir = Path(export_dir)
    reload, onnx = _read(export_dir / RELOAD_CHECK), _read(export_dir / "onnx.json")
    timed = _timed(export_dir, root)
    correct = {
        "eager": (
            f"reloads with the same logits (max |diff| {reload['max_abs_diff']:.1e})"
            if reload.get("checked")
            else "not recorded (exported before the studio checked reloads)"
        ),
        "onnxruntime": (
            f"matches PyTorch (max |diff| {onnx['max_abs_diff']:.1e})"
            if onnx.get("checked")
            else "graph written, parity not checked"
            if (export_dir / "model.onnx").exists()
            else "not exported: Export ONNX below"
        ),
    }
    return pd.DataFrame(
        [
            {
                "backend": b,
                "runtime": BACKENDS.get(b).summary,
                "correctness": correct.get(b, "not checked"),
                "timed": timed.get(b, "not timed: the Benchmark page times it"),
            }
            for b in BACKENDS.names()
        ]
    )
