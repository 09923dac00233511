"""One run's result as every page shows it: accuracy (before recovery for a prune run), params, MACs, ideal and
measured speed-up (flagged when above the ideal), and the plan diff grouped by change.

It reads the common shape of ``results.json`` (:mod:`studio.flows.stages`), so the Prune and Importance pages
(and any page that shows a run) draw the same block from the same numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import streamlit as st

from ..compare import speed_rows
from .charts import human, pct

ABOVE_IDEAL = 1.05  # a measured speed-up this much above the MACs ratio is not noise: it is said, with why


def speedup_note(res: Mapping[str, Any]) -> str | None:
    """A sentence when a measured speed-up exceeds the ideal (MACs ratio), else None.

    It happens and is real: a smaller model's weights and activations fit better in the caches, and narrower
    layers may pick faster kernels; or the dense model was timed while the machine was busier. Either way the
    figure should not pass without a word.
    """
    ideal = float(res.get("ideal_speedup") or 0)
    above = {bs: v for bs, v in (res.get("speedup") or {}).items() if ideal > 0 and v > ideal * ABOVE_IDEAL}
    if not above:
        return None
    where = ", ".join(f"×{v:.2f} at batch {bs}" for bs, v in above.items())
    return (
        f"Measured {where}: above the ideal ×{ideal:.2f} from the MACs. Likely cache effects (the smaller model's "
        "weights and activations fit better in the CPU/GPU caches, narrower layers may get faster kernels) or the "
        "dense model was timed under more load; re-measure both back to back on the Benchmark page to be sure."
    )


def group_diff(lines: Sequence[str]) -> list[str]:
    """Plan-diff lines with the same change in several blocks merged: ``blocks 0–5, 7: mlp 384 -> 192`` instead
    of one identical line per block; other lines are kept, in their first order."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for line in lines:
        m = re.fullmatch(r"block (\d+): (.*)", line)
        if m is None:
            order.append(line)
            continue
        change = m.group(2)
        if change not in groups:
            groups[change] = []
            order.append(f"\0{change}")
        groups[change].append(int(m.group(1)))
    out = []
    for item in order:
        if not item.startswith("\0"):
            out.append(item)
            continue
        blocks = sorted(groups[item[1:]])
        out.append(f"{'blocks' if len(blocks) > 1 else 'block'} {_ranges(blocks)}: {item[1:]}")
    return out


def _ranges(values: Sequence[int]) -> str:
    """``0, 1, 2, 5`` -> ``0–2, 5``."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def show_run_result(res: Mapping[str, Any], *, key: str) -> None:
    """Four metrics, the per-batch-size speed table, and warnings for a counted cost off the plan's or a
    missed MACs target."""
    before, after = res["before"], res["after"]
    k = st.columns(4)
    if after.get("top1") is not None and before.get("top1") is not None:
        k[0].metric(
            "Accuracy (no recovery)" if res["kind"] == "prune" else "Accuracy",
            pct(after["top1"]),
            f"{100 * (after['top1'] - before['top1']):+.1f} pts",
            help=f"before: {pct(before['top1'])}; a prune run has no retraining: an estimate of what "
            "recovery starts from",
        )
    k[1].metric("Params", human(after["params"]), f"{after['params'] / before['params'] - 1:+.0%}", "inverse")
    k[2].metric("MACs", human(after["macs"]), f"{after['macs'] / before['macs'] - 1:+.0%}", "inverse")
    k[3].metric("Ideal speed-up (MACs)", f"×{res['ideal_speedup']:.2f}")
    if res["speedup"]:
        speed = pd.DataFrame(speed_rows(res))
        st.dataframe(
            speed,
            hide_index=True,
            key=f"{key}_speed_table",
            column_config={c: st.column_config.NumberColumn(format="%.2f") for c in speed.columns[1:]},
        )
    note = speedup_note(res)
    if note:
        st.info(note, icon=":material/speed:")
    lat = (res.get(res["kind"]) or {}).get("latency")
    if (
        lat
    ):  # a latency target: target, predicted and measured side by side (dense and pruned timed back to back)
        text = (
            f"Latency target {pct(lat['target_latency'], digits=0)} of the dense {lat['dense_ms']:.2f} ms = "
            f"**{lat['target_ms']:.2f} ms** (batch {lat['batch']}, {lat['backend']}, {lat.get('dtype', 'float32')}): "
            f"predicted {lat['predicted_ms']:.2f} ms (latency model, held-out error {lat['fit_error']:.1%}), "
            f"measured **{lat['measured_ms']:.2f} ms** ({lat['measured_ms'] / lat['target_ms'] - 1:+.1%})."
        )
        (st.warning if lat["missed"] else st.success)(
            text + (" Missed by more than 10 %." if lat["missed"] else ""), icon=":material/timer:"
        )
    if not after.get("matches_plan", True):
        st.warning("The counted params/MACs of the pruned model differ from the plan's analytic cost.")
    solved = (res.get("params") or {}).get("solved") or {}
    if solved.get("target_missed"):
        st.warning(
            f"The closest plan keeps {pct(solved['macs_fraction'])} of the MACs: the scopes move in steps too "
            "coarse for this target. Add scopes (e.g. mlp, embed) for finer steps."
        )
