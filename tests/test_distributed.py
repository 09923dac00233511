"""DistributedDataParallel under torchrun (gloo on CPU): rank 0 writes, replicas stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from studio import distributed
from studio.events import CancelToken
from studio.export import export
from studio.models import create_vit, describe_base
from studio.runs import RunDir, read_json
from studio.train import EpochSampler

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
DCFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
        "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip


def test_epoch_sampler_shards_are_disjoint_and_cover_the_epoch():
    shards = [EpochSampler(10, seed=1, epoch=2, rank=r, world=2).indices for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))
    odd = [EpochSampler(7, seed=1, epoch=0, rank=r, world=2).indices for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 4 and set(odd[0] + odd[1]) == set(range(7))  # padded like DDP


def test_single_process_context_and_token(monkeypatch):
    for var in distributed.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert distributed.wrap(torch.nn.Linear(2, 2), ctx) is None
    token = distributed.SyncedCancel(CancelToken(), ctx)
    assert not token.is_set
    token.set()
    assert token.is_set
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="torchrun"):
        distributed.setup("cpu")
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert distributed.params_digest(a) != distributed.params_digest(b)
    b.load_state_dict(a.state_dict())
    assert distributed.params_digest(a) == distributed.params_digest(b)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_torchrun_two_processes_gloo(tmp_path):
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **KW).eval()
    export(model, describe_base(model, "vit_tiny_patch16_224", KW), tmp_path / "model", data_config=DCFG)
    run = tmp_path / "runs" / "ddp"
    prep = [sys.executable, "-m", "studio", "retrain", "--model", str(tmp_path / "model"), "--teacher",
            str(tmp_path / "model"), "--kd", "soft", "--data", "demo", "--limit", "64", "--epochs", "2",
            "--batch-size", "8", "--no-bench", "--device", "cpu", "--out", str(run), "--dry-run"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in distributed.ENV_VARS:
        env.pop(var, None)
    subprocess.run(prep, check=True, env=env, capture_output=True, timeout=300)
    assert (run / "spec.json").exists() and not (run / "events.jsonl").exists()
    # what a job with nproc 2 runs (studio.jobs): every rank runs the run folder's spec
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "studio", "run", str(run),
           "--device", "cpu", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    res = read_json(run / "results.json")
    assert res["retrain"]["world"] == 2 and res["retrain"]["replicas_identical"] is True
    digests = res["retrain"]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert RunDir(run).checkpoint_file.exists()
    ckpt = torch.load(RunDir(run).checkpoint_file, weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 4  # 64 images / 2 ranks / batch 8 = 4 steps per epoch
    events = RunDir(run).events()
    metric = [e["data"] for e in events if e["kind"] == "metric" and "train_loss" in e["data"]]
    assert [m["epoch"] for m in metric] == [0, 1]  # one writer: each epoch once
    trains = [
        e["data"]["done"] for e in events if e["kind"] == "progress" and e["data"].get("task") == "train"
    ]
    assert trains and len(trains) == len(set(trains)) and max(trains) == 8
    assert sum(1 for e in events if e["kind"] == "status" and e["data"].get("state") == "training") == 1
    assert res["retrain"]["train"]["history"][0]["train_loss"] == metric[0]["train_loss"]
    assert read_json(run / "status.json")["state"] == "done"
    assert (run / "export" / "manifest.json").exists()


def _torchrun(run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in distributed.ENV_VARS:
        env.pop(var, None)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "studio", "run", str(run),
           "--device", "cpu", *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
def test_p3b_under_torchrun_two_ranks_agree_and_a_cancelled_run_resumes_to_the_same_model(tmp_path):
    """P3B as its paper runs it (several processes, gradient accumulation): the ranks keep identical gates,
    probes and benefits, so they slice alike and end with identical weights; a run cancelled mid-pruning
    (both ranks at the same step) and resumed ends exactly where the uninterrupted one does."""
    import time

    from safetensors.torch import load_file

    from studio.data import DataSpec
    from studio.flows import create_run
    from studio.flows.prune import PruneSpec
    from studio.models import ModelSpec

    params = {"epochs": 8, "probe": "mean", "steps_per_update": 1, "prune_ratio": 0.5, "accum_steps": 2}
    spec = PruneSpec(ModelSpec("demo", device="cpu"), "p3b", params, DataSpec("demo", limit=128), batch_size=16,
                     bench=False)  # fmt: skip
    whole, cut = create_run(spec, tmp_path / "whole"), create_run(spec, tmp_path / "cut")
    a = _torchrun(whole.path)
    b = _torchrun(cut.path)
    deadline = time.time() + 600
    while not (cut.path / "p3b_prune.pt").exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    cut.cancel_file.write_text("cancel\n")  # the Cancel button: both ranks stop at the same step
    _, err = b.communicate(timeout=600)
    assert read_json(cut.path / "status.json")["state"] == "cancelled", err[-2000:]
    resumed = _torchrun(cut.path, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err[-3000:]

    res, again = read_json(whole.path / "results.json"), read_json(cut.path / "results.json")
    p3b = res["p3b"]
    assert p3b["world"] == 2 and p3b["accum_steps"] == 2 and p3b["replicas_identical"] is True
    assert len(set(p3b["plan_digests"])) == 1 and len(p3b["replica_digests"]) == 2
    assert res["plan"] == again["plan"] and again["p3b"]["plan_digests"] == p3b["plan_digests"]
    ours, theirs = (
        load_file(str(whole.export_dir / "model.safetensors")),
        load_file(str(cut.export_dir / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    setup = next(e["data"] for e in RunDir(whole.path).events() if e["kind"] == "p3b_setup")
    assert setup["world"] == 2 and setup["accum_steps"] == 2
