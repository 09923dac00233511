"""Activation checkpointing at real size: peak memory and time of fine-tuning steps with and without it.

    python bench/checkpointing.py [--arch deit_small_patch16_224] [--batch 32] [--steps 3] [--threads 2]

Each mode runs in a fresh process (peak RSS is per process) one after the other, under the same conditions:
``studio.train.fit`` for ``--steps`` optimizer steps of ``--batch`` random 224 px images on a random-weight
model, all parameters trained (AdamW). Prints a Markdown table: mode, peak RSS, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _child(arch: str, batch: int, steps: int, threads: int, checkpointing: bool) -> None:
    import torch

    from studio.data import TensorData
    from studio.memory import peak_bytes
    from studio.models import create_vit
    from studio.train import TrainSpec, fit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_vit(arch, num_classes=10)
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(batch * steps, 3, 224, 224, generator=g), torch.arange(batch * steps) % 10)
    spec = TrainSpec(
        epochs=1, batch_size=batch, lr=1e-4, warmup_epochs=0, amp=False, select="last",
        grad_checkpointing=checkpointing,
    )  # fmt: skip
    t0 = time.perf_counter()
    fit(model, data, None, spec)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss": peak_bytes()["rss"], "s_per_step": seconds / steps}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.arch, a.batch, a.steps, a.threads, a.child == "on")
        return
    rows = []
    for mode in ("off", "on"):
        argv = [sys.executable, __file__, "--arch", a.arch, "--batch", str(a.batch), "--steps", str(a.steps)]
        out = subprocess.run(
            [*argv, "--threads", str(a.threads), "--child", mode], capture_output=True, text=True, check=True
        )
        rows.append((mode, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"{a.arch}, 224 px, batch {a.batch}, {a.steps} steps, {a.threads} threads, float32, CPU\n")
    print("| activation checkpointing | peak RSS | s / step |\n|---|---|---|")
    for mode, r in rows:
        print(f"| {mode} | {r['rss'] / 2**30:.2f} GiB | {r['s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
