"""Each method's studio default (the ``cpu`` preset) against its paper preset, on the demo, at one recovery budget.

For every method with a paper preset (``studio/prune/presets.py``), the same ``prune`` command runs twice, once as
it is and once with ``--preset paper``, each in its own process as a user types it. The options that set the
run's length are given explicitly to both (the MACs target, P3B's and SPLoRA's epochs, SPLoRA's end density), so
the two differ only in what the presets set; the methods that plan without training (Isomorphic, SAViT, SLS)
then recover with the same ``retrain`` command. Prints one markdown table per method
(``docs/results/presets_compare.md``):

    OMP_NUM_THREADS=1 .venv/bin/python bench/presets_compare.py --out /tmp/presets-compare \
        > docs/results/presets_compare.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.prune.presets import PRESETS, studio_default  # noqa: E402

RECOVERY_EPOCHS = 3
BACKBONE = ["--model", "demo-backbone", "--num-classes", "10", "--reset-head", "--data", "demo"]
TUNED = ["--model", "demo", "--data", "demo"]


@dataclass(frozen=True)
class Case:
    """One method's ``prune`` arguments (besides ``--method`` and ``--preset``), what they fix for both runs, and
    whether a ``retrain`` recovers the plan afterwards."""

    args: tuple[str, ...]
    fixed: tuple[str, ...]
    recover: bool


CASES = {
    "isomorphic": Case((*TUNED, "--target-macs", "0.5"), ("target_macs",), True),
    "savit": Case((*TUNED, "--target-macs", "0.5"), ("target_macs",), True),
    "sls": Case(tuple(TUNED), (), True),
    # the paper's 10 / 25 / 50 of a 50-epoch pruning run, scaled onto this job's 10-epoch pruning phase (the
    # studio default for 20 epochs), then 10 epochs of fine-tuning the sliced model for both
    "p3b": Case(
        (
            *BACKBONE,
            *("--prune-ratio", "0.5", "--epochs", "20"),
            *("--start-epoch", "2", "--sparse-epoch", "5", "--finalize-epoch", "10"),
        ),
        ("prune_ratio", "epochs", "start_epoch", "sparse_epoch", "finalize_epoch"),
        False,
    ),
    "splora": Case(
        (
            *BACKBONE,
            *("--epochs", "4", "--recovery-epochs", "1", "--prune-step", "0.1", "--target-density", "0.3"),
        ),
        ("epochs", "recovery_epochs", "prune_step", "target_density"),
        False,
    ),
}


def studio(*args: str) -> tuple[dict[str, Any], float]:
    """Run ``python -m studio ARGS --json`` in a fresh process; its one JSON object and the wall seconds."""
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run(
        [sys.executable, "-m", "studio", *args, "--json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if p.returncode != 0:
        raise SystemExit(f"studio {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), time.time() - t0


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def differences(method: str, fixed: tuple[str, ...]) -> list[str]:
    """The settings the paper preset sets differently from the studio default (those the comparison fixes for
    both runs are named as such)."""
    preset = PRESETS[f"paper:{method}"]
    out = []
    for key, s in [*preset.options.items(), *preset.run.items()]:
        ours = studio_default(method, key)
        if ours == s.value or s.value is None:
            continue
        note = " (fixed for both runs here)" if key in fixed else ""
        out.append(f"`{key}`: paper `{s.value}`, studio `{ours}`{note}")
    return out


def used(method: str, res: dict[str, Any]) -> str | None:
    """What a run could use of what its preset asked for, where the demo is smaller than the paper's data."""
    params = (res.get("plan") or {}).get("params") or {}
    got, asked = params.get("hvp_batches_used"), params.get("hvp_batches")
    if method == "savit" and got is not None and asked is not None and got < asked:
        return f"{got} of the {asked} HVP batches asked for"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs (must not exist)")
    ap.add_argument("--methods", nargs="+", default=list(CASES), choices=list(CASES))
    a = ap.parse_args()
    if a.out.exists():
        raise SystemExit(f"{a.out} exists: give a new folder")
    a.out.mkdir(parents=True)
    print("# Studio defaults vs paper presets on the demo\n")
    print(
        f"Measured with `bench/presets_compare.py` ({time.strftime('%Y-%m-%d')}, CPU, 1 thread per process):\n"
    )
    print(
        "```bash\nOMP_NUM_THREADS=1 .venv/bin/python bench/presets_compare.py --out /tmp/presets-compare \\"
    )
    print("    > docs/results/presets_compare.md\n```\n")
    print(
        "Each pair runs the same `prune` command with and without `--preset paper`; the options that set the run's "
        "length are given to both, so the two differ only in what the presets set (`docs/results/presets.md` "
        "lists every value with its source). Isomorphic, SAViT and SLS plan without training, so both plans then "
        f"recover with the same `retrain --epochs {RECOVERY_EPOCHS}` (the quick recipe, soft distillation from "
        "the unpruned model); P3B and SPLoRA train as they prune, and their top-1 is that of the finished job (P3B: "
        "20 epochs, the paper's schedule of 10 / 25 / 50 of a 50-epoch pruning run scaled onto the first 10, then "
        "10 epochs fine-tuning the sliced model, in both runs). "
        "Accuracy is on the demo's test split (270 images; one image is 0.37 points). Wall seconds come from a "
        "machine shared with other work, so read them as upper bounds, not as comparable timings.\n"
    )
    for method in a.methods:
        case = CASES[method]
        rows, notes = [], []
        for preset in ("cpu", "paper"):
            run = a.out / f"{method}-{preset}"
            res, secs = studio(
                "prune", "--method", method, "--preset", preset, *case.args, "--no-bench", "--out", str(run)
            )
            before, after = res["before"], res["after"]
            recovered = None
            if case.recover:
                rt, more = studio(
                    "retrain", "--model", str(run / "export"), "--data", "demo", "--epochs", str(RECOVERY_EPOCHS),
                    "--no-bench", "--out", str(a.out / f"{method}-{preset}-recovered"),
                )  # fmt: skip
                recovered, secs = rt["after"]["top1"], secs + more
            if (u := used(method, res)) is not None:
                notes.append(f"{'studio default' if preset == 'cpu' else 'paper preset'}: {u}")
            rows.append(
                (
                    preset,
                    after["macs"] / before["macs"],
                    after["params"] / before["params"],
                    after["top1"],
                    recovered,
                    secs,
                    bool(
                        ((res.get("plan") or {}).get("params") or {}).get("solved", {}).get("target_missed")
                    ),
                )
            )
        print(f"## {method}\n")
        cmd = " ".join(["python -m studio prune --method", method, *case.args, "[--preset paper]"])
        print(
            f"`{cmd}`"
            + (
                f", then `retrain --model RUN/export --data demo --epochs {RECOVERY_EPOCHS}`"
                if case.recover
                else ""
            )
        )
        print()
        head = "top-1 after pruning" if case.recover else "top-1 (finished job)"
        cols = f"| preset | MACs kept | params kept | {head} |"
        cols += f" top-1 after {RECOVERY_EPOCHS} recovery epochs |" if case.recover else ""
        print(cols + " wall s |")
        print("|---" * (cols.count("|")) + "|")
        for preset, macs, params, top1, rec, secs, missed in rows:
            line = f"| {'studio default' if preset == 'cpu' else 'paper preset'} | {pct(macs)}{' (missed)' if missed else ''} | {pct(params)} | {pct(top1)} |"
            line += f" {pct(rec)} |" if case.recover else ""
            print(line + f" {secs:.0f} |")
        if notes:
            print(
                "\nUsed (the demo's training split is smaller than the paper's data): "
                + "; ".join(notes)
                + "."
            )
        diffs = differences(method, case.fixed)
        print(
            "\nWhat the paper preset sets differently: " + ("; ".join(diffs) if diffs else "nothing") + ".\n"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
