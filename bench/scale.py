"""The whole flow at real size: each step's wall time and peak memory on DeiT-S and ViT-B/16 at 224 px.

What users bring is a DeiT/ViT at 224 px, not the 32 px demo. No weights can be downloaded here, so each model
is built with random weights (seeded) and saved as a ``.safetensors`` checkpoint, with a generated 6-class
ImageFolder of 224 px images. Every step then runs as the CLI command a user would type, in its own process;
its peak resident memory is that process's (``wait4`` rusage), its wall time the process's. Prints a markdown
table (the one in ``docs/results/scale.md``)::

    .venv/bin/python bench/scale.py --models deit_small_patch16_224 vit_base_patch16_224 --threads 2

``--steps`` picks a subset (``load eval sls importance isomorphic savit export recovery bench``); ``--quick``
runs a reduced form (few images, no t-SNE) as a smoke test of the code paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = ("load", "eval", "sls", "importance", "isomorphic", "savit", "export", "recovery", "bench")
CLASSES = 6


def make_imagefolder(root: Path, per_class: dict[str, int], size: int = 224) -> Path:
    """A 6-class ImageFolder of smooth random colour fields (PNG), seeded: train/, val/, test/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(CLASSES):
            d = root / split / f"class_{c}"
            if d.is_dir() and len(list(d.glob("*.png"))) >= n:
                continue
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = rng.integers(0, 255, (7, 7, 3), dtype=np.uint8)
                low[..., c % 3] = np.clip(low[..., c % 3].astype(int) + 40 * (c + 1), 0, 255)
                img = Image.fromarray(low).resize((size, size), Image.BILINEAR)
                img.save(d / f"{i:04d}.png")
    return root


def make_checkpoint(arch: str, path: Path) -> Path:
    """Random (seeded) weights of ``arch`` with a 6-class head, as safetensors."""
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file

    from studio.models import create_vit

    torch.manual_seed(0)
    m = create_vit(arch, num_classes=CLASSES)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


# the child records its own peak resident memory when it exits (also through sys.exit)
_CHILD = (
    "import atexit, resource, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "sys.argv[0] = 'studio'\n"
    "runpy.run_module('studio', run_name='__main__')\n"
)


def run_step(argv: list[str], threads: int, peak_file: Path) -> dict:
    """Run one CLI command in its own process: wall seconds, peak RSS (KiB), exit code, stdout, stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    peak_file.unlink(missing_ok=True)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(peak_file), *argv, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.time() - t0
    peak = int(peak_file.read_text()) if peak_file.exists() else None
    return {
        "rc": proc.returncode,
        "seconds": seconds,
        "peak_kib": peak,
        "out": proc.stdout,
        "err": proc.stderr,
    }


def steps_for(arch: str, ckpt: Path, data: str, work: Path, quick: bool) -> dict[str, list[str]]:
    model = ["--model", str(ckpt), "--arch", arch, "--num-classes", str(CLASSES), "--device", "cpu"]
    limit = ["--limit", "24"] if quick else []
    sls_samples = "48" if quick else "1000"
    calib = ["--calib-batches", "1", "--batch-size", "8"] if quick else ["--calib-batches", "2"]
    return {
        "load": ["info", *model],
        "eval": ["eval", *model, "--data", data, "--split", "test", *limit],
        "sls": [
            "analyze",
            "sls",
            *model,
            "--data",
            data,
            "--samples",
            sls_samples,
            "--embed",
            "none" if quick else "tsne",
        ],
        "importance": [
            "analyze",
            "importance",
            *model,
            "--data",
            data,
            *(["--batches", "1", "--batch-size", "8"] if quick else ["--batches", "2"]),
            "--ablation-samples",
            "4" if quick else "16",
        ],
        "isomorphic": [
            "prune",
            *model,
            "--data",
            data,
            "--method",
            "isomorphic",
            "--target-macs",
            "0.5",
            *calib,
            "--no-bench",
            "--no-export",
            *limit,
            "--out",
            str(work / f"iso-{arch}"),
        ],
        "savit": [
            "prune",
            *model,
            "--data",
            data,
            "--method",
            "savit",
            "--target-macs",
            "0.5",
            *calib,
            "--no-bench",
            *limit,
            "--out",
            str(work / f"savit-{arch}"),
        ],
        "recovery": [
            "retrain",
            "--model",  # the SAViT plan's export (the export step): recovery starts from a pruned checkpoint
            str(work / f"export-{arch}"),
            "--kd",
            "soft",
            "--teacher",  # a standalone export does not name its unpruned model: the teacher is given
            str(ckpt),
            "--teacher-arch",
            arch,
            "--data",
            data,
            "--epochs",
            "1",
            "--limit",
            "24" if quick else "300",
            "--batch-size",
            "8" if quick else "32",
            "--no-bench",
            "--no-export",
            "--device",
            "cpu",
            "--out",
            str(work / f"recovery-{arch}"),
        ],
        "bench": ["bench", *model, "--batch-sizes", "1", "8", "--repeats", "2" if quick else "5"],
        "export": [
            "export",
            *model,
            "--plan",
            str(work / f"savit-{arch}" / "plan.json"),
            "--out",
            str(work / f"export-{arch}"),
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--quick", action="store_true", help="reduced sizes: a smoke test of the code paths")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument(
        "--calibration-only",
        action="store_true",
        help="prune steps without accuracy, throughput and export: the calibration's time and peak memory",
    )
    args = ap.parse_args()
    work = args.work / ("quick" if args.quick else "full")
    per_class = {"train": 8, "val": 4, "test": 4} if args.quick else {"train": 170, "val": 20, "test": 30}
    folder = make_imagefolder(work / "data", per_class)
    data = f"imagefolder:{folder}"
    rows = []
    for arch in args.models:
        ckpt = make_checkpoint(arch, work / "ckpt" / f"{arch}.safetensors")
        plan = steps_for(arch, ckpt, data, work, args.quick)
        for step in args.steps:
            argv = plan[step]
            if args.calibration_only and argv[0] == "prune":
                argv = [a for a in argv if a not in ("--no-bench", "--no-export")]
                argv += ["--no-eval", "--no-bench", "--no-export"]
            if "--out" in argv:  # write-once outputs: a rerun of the bench starts each folder afresh
                shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
            r = run_step(argv, args.threads, work / "peak.txt")
            figure = ""
            if r["rc"] == 0:
                try:
                    d = json.loads(r["out"])
                except json.JSONDecodeError:
                    d = {}
                after = d.get("after") or {}
                if argv[0] == "prune" and "macs" in after and "macs" in (d.get("before") or {}):
                    figure = f"MACs kept {after['macs'] / d['before']['macs']:.1%}"
                if after.get("top1") is not None:
                    figure += f"{', ' if figure else ''}top-1 after {after['top1']:.3f}"
                scores = d.get("scores")
                if isinstance(scores, dict):  # analyze importance: each criterion's own seconds
                    figure = ", ".join(f"{c} {s['seconds']:.0f} s" for c, s in scores.items())
            else:
                figure = "failed: " + (r["err"].strip().splitlines() or ["?"])[-1][:120]
            row = {
                "model": arch,
                "step": step,
                "seconds": round(r["seconds"], 1),
                "peak_rss_gb": None if r["peak_kib"] is None else round(r["peak_kib"] / 2**20, 2),
                "rc": r["rc"],
                "note": figure,
                "command": "python -m studio " + " ".join(argv),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| model | step | wall s | peak RSS GB | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['step']} | {r['seconds']} | {r['peak_rss_gb']} | {r['note']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
