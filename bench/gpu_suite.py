"""The GPU benchmark suite: ViT-B/16 at 224 px in bf16 on one GPU, in under 8 minutes.

Steps (each timed, with its peak memory — CUDA max allocated on a GPU, resident memory on CPU):

1. the feature bank of 1,000 images (every block's CLS and mean patch token; bf16 autocast);
2. importance: l2, taylor, taylor2 on 2 calibration batches of 64 (float32 gradients, micro-batched), and head
   ablation on 64 of those images;
3. isomorphic, SAViT and magnitude plans at 50 % of the MACs, each applied by the one surgery;
4. throughput at batch 1, 64 and 256, dense vs each pruned model, as the median of back-to-back pairs
   (``studio.bench.paired_speedup``), with the speed-up efficiency measured / ideal (MACs ratio);
5. with two or more GPUs, a 2-process NCCL retraining smoke test (``torchrun -m studio retrain``).

Weights are random (nothing can be downloaded) — speed and memory do not depend on them. Without a GPU,
``--reduced`` runs the same code paths on a 32 px, 3-block model in seconds (the test suite does this)::

    .venv/bin/python bench/gpu_suite.py              # on a GPU machine: the table for the README
    .venv/bin/python bench/gpu_suite.py --reduced    # anywhere: a test of the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio import memory  # noqa: E402
from studio.analysis.importance import compute_importance  # noqa: E402
from studio.bench import count_macs, paired_speedup  # noqa: E402
from studio.features import extract  # noqa: E402
from studio.models import LoadedModel, create_vit, data_config, describe_base  # noqa: E402
from studio.prune import PruneRequest, make_plan  # noqa: E402
from studio.surgery import apply_plan  # noqa: E402

FULL = dict(arch="vit_base_patch16_224", kwargs=dict(num_classes=10), images=1000, calib=(2, 64), abl=64)
REDUCED = dict(
    arch="vit_tiny_patch16_224",
    kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10),
    images=64,
    calib=(2, 8),
    abl=8,
)
BATCHES = (1, 64, 256)
METHODS = ("isomorphic", "savit", "magnitude")
BUDGET_S = 480


def _peak(device: torch.device) -> float:
    """Peak memory in GiB since the last reset (CUDA allocated on a GPU, else resident)."""
    p = memory.peak_bytes(device)
    return round(p.get("cuda", p["rss"]) / 2**30, 2)


def step(rows: list[dict[str, Any]], device: torch.device, name: str, fn: Callable[[], str]) -> None:
    memory.reset_peak(device)
    t0 = time.perf_counter()
    note = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rows.append(
        {"step": name, "seconds": round(time.perf_counter() - t0, 1), "peak_gib": _peak(device), "note": note}
    )
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)


def suite(reduced: bool, device: torch.device) -> list[dict[str, Any]]:
    cfg = REDUCED if reduced else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    model = create_vit(cfg["arch"], **cfg["kwargs"]).eval().to(device)
    base = describe_base(model, cfg["arch"], cfg["kwargs"])
    dc = data_config(model)
    loaded = LoadedModel(model, base, dc, [str(i) for i in range(10)], device)
    size = dc["input_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(cfg["images"], *size, generator=g)
    labels = torch.randint(0, 10, (cfg["images"],), generator=g)
    n, bs = cfg["calib"]
    batches = [
        (images[i * bs : (i + 1) * bs].to(device), labels[i * bs : (i + 1) * bs].to(device)) for i in range(n)
    ]
    rows: list[dict[str, Any]] = []

    def bank() -> str:
        ds = torch.utils.data.TensorDataset(images, labels)
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            fb = extract(model, ds, batch_size=256)
        return f"{tuple(fb.cls.shape)} CLS features"

    step(rows, device, f"feature bank ({cfg['images']} images)", bank)

    def importance() -> str:
        r = compute_importance(
            loaded, batches, ("l2", "taylor", "taylor2", "ablation"), ablation_samples=cfg["abl"]
        )
        rho = r.correlation.get("taylor")
        return "spearman(taylor, ablation) " + ("n/a" if rho is None else f"{rho:.2f}")

    step(rows, device, f"importance ({n}x{bs}; ablation on {cfg['abl']})", importance)

    pruned: dict[str, torch.nn.Module] = {}
    for method in METHODS:

        def plan(method: str = method) -> str:
            p = make_plan(method, PruneRequest(loaded, {"target_macs": 0.5}, batches, seed=0))
            pruned[method] = apply_plan(copy.deepcopy(model), p).eval()
            return f"MACs kept {p.summary['macs_fraction']:.1%}"

        step(rows, device, f"{method} plan at 50 % MACs", plan)

    dense_macs = count_macs(model, size)["total"]
    for method, m in pruned.items():
        ideal = dense_macs / count_macs(m, size)["total"]
        for b in BATCHES if not reduced else (1, 8):

            def speed(m: torch.nn.Module = m, b: int = b, ideal: float = ideal) -> str:
                s = paired_speedup(model, m, size, b, warmup=5, repeats=10 if not reduced else 3, dtype=dtype)
                return f"x{s:.2f} measured, x{ideal:.2f} ideal, efficiency {s / ideal:.0%}"

            step(rows, device, f"throughput {method} batch {b}", speed)

    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        step(rows, device, "2-process NCCL retrain (demo, 1 epoch)", _nccl_smoke)
    else:
        rows.append(
            {"step": "2-process NCCL retrain", "seconds": None, "peak_gib": None, "note": "skipped: <2 GPUs"}
        )
    return rows


def _nccl_smoke() -> str:
    out = Path(tempfile.mkdtemp()) / "ddp"
    try:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "studio", "retrain",
            "--model", "demo", "--data", "demo", "--epochs", "1", "--kd", "none", "--no-bench",
            "--no-export", "--out", str(out),
        ]  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
        return "ok" if r.returncode == 0 else "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:100]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def markdown(rows: list[dict[str, Any]], device: torch.device, total: float) -> str:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    lines = [
        f"GPU suite on {name}, total {total:.0f} s (budget {BUDGET_S} s)",
        "",
        "| step | s | peak GiB | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['seconds']} | {r['peak_gib']} | {r['note']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--reduced", action="store_true", help="tiny model: a test of the code paths (any device)"
    )
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type != "cuda" and not args.reduced:
        raise SystemExit("No GPU is visible: run with --reduced to test the code paths on CPU.")
    t0 = time.perf_counter()
    rows = suite(args.reduced, device)
    total = time.perf_counter() - t0
    print(markdown(rows, device, total))
    if not args.reduced and total > BUDGET_S:
        print(f"warning: the suite took {total:.0f} s, over its {BUDGET_S} s budget", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
