"""Issue #13, the last cases: exports name the data's classes, hand-edited recipes are checked, and a run folder
that turns unwritable mid-job never leaves its status at "running"."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio import jobs
from studio.data import DataSpec
from studio.errors import StudioError
from studio.flows import create_run, run_folder
from studio.flows.prune import PruneSpec
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec, create_vit
from studio.runs import JOB_FILE, RunDir, read_json, write_json
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


# ------------------------------------------------------------------------------------ exports name classes
def test_an_export_of_a_bare_checkpoint_records_the_data_class_names(tmp_path):
    torch.manual_seed(0)
    save_file(create_vit("vit_tiny_patch16_224", num_classes=2, **TINY).state_dict(), str(tmp_path / "m.st"))
    (tmp_path / "m.st").rename(tmp_path / "m.safetensors")
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), color=40 * i).save(tmp_path / "imgs" / split / c / f"{i}.png")
    spec = PruneSpec(
        model=ModelSpec(str(tmp_path / "m.safetensors"), arch="vit_tiny_patch16_224", kwargs=TINY),
        method="magnitude",
        params={"ratio": 0.5},
        data=DataSpec("imagefolder", str(tmp_path / "imgs")),
        bench=False,
        batch_size=4,
    )
    run = RunDir.create(tmp_path / "runs" / "bare", spec.to_dict())
    run_folder(run, spec=spec)
    manifest = json.loads((run.export_dir / "manifest.json").read_text())
    assert manifest["class_names"] == ["ant", "bee"]  # was ["0", "1"]: what the outputs mean was lost
    assert manifest["class_names_known"] is True


# ------------------------------------------------------------------------------- recipes from a spec.json
@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", math.nan), ("lr", math.inf), ("weight_decay", -0.1), ("warmup_epochs", -5.0), ("epochs", 2.5)],
)
def test_a_hand_edited_recipe_refuses_nan_inf_and_negative_numbers(field, value):
    spec = RecoverySpec(model=ModelSpec("demo"), data=DataSpec("demo"), overrides={field: value})
    with pytest.raises(StudioError, match=rf"^Recipe setting '{field}' is .*: it must be a") as e:
        spec.validate()
    assert str(e.value).count(". ") == 0  # one sentence


def test_run_of_a_spec_json_with_lr_nan_is_one_line(tmp_path):
    spec = RecoverySpec(model=ModelSpec("demo"), data=DataSpec("demo"), preset="quick").to_dict()
    spec["overrides"] = {"lr": float("nan")}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "spec.json").write_text(json.dumps(spec))  # json writes NaN, as a hand edit would
    out = subprocess.run(
        [sys.executable, "-m", "studio", "run", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Recipe setting 'lr' is nan" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# --------------------------------------------------------------------- a run folder unwritable mid-job
@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new files, as a read-only folder does (root ignores modes: ``chattr +i`` then)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i refused)")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("this file system ignores read-only folders")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_tracking_keeps_the_work_error_when_the_end_cannot_be_recorded(tmp_path, capfd):
    run = RunDir.create(tmp_path / "r", {"kind": "x"})
    readonly = unwritable(run.path)  # entered inside the run, left after it has tried to record its end
    try:
        with pytest.raises(ValueError, match="the work's own error"), run.tracking():
            readonly.__enter__()
            raise ValueError("the work's own error")
    finally:
        readonly.__exit__(None, None, None)
    assert run.status()["state"] == "running"  # it could not be rewritten...
    assert run.status()["pid_start"] is not None  # ...but a reader can tell this process from a reused pid
    assert "cannot record the run's end (failed)" in capfd.readouterr().err


def test_a_running_status_whose_pid_is_now_another_process_is_failed(tmp_path):
    run = RunDir.create(tmp_path / "r", {"kind": "x"})
    # a trainer that died without recording its end, its pid since reused (here: by this very process)
    write_json(run.status_file, {"state": "running", "pid": os.getpid(), "pid_start": 1, "time": time.time()})
    st = jobs.job_status(run.path)
    assert st.state == "failed" and "still said 'running'" in st.error, st


def test_a_job_whose_folder_turns_read_only_mid_training_is_reported_failed(tmp_path):
    demo = ModelSpec("demo", device="cpu")
    data = DataSpec("demo", limit=96)
    src = tmp_path / "src"
    run_folder(create_run(PruneSpec(demo, "magnitude", {"target_macs": 0.5}, data, bench=False), src))
    spec = RecoverySpec(
        ModelSpec(str(src / "export"), device="cpu"),
        data,
        demo,
        overrides={"epochs": 50, "batch_size": 32},
        bench=False,
    )
    run = tmp_path / "runs" / "ro"
    st = jobs.submit(spec, run, device="cpu", threads=1)
    try:
        _wait(lambda: RunDir(run).has_checkpoint, 240)  # training, with an epoch saved
        with unwritable(run):
            _wait(lambda: not jobs._alive(st.pid, read_json(run / JOB_FILE)["pid_start"]), 240)
            assert RunDir(run).status()["state"] == "running"  # what the trainer could not rewrite
            after = jobs.job_status(run)  # the launcher's parent polls: it must not fail on the folder
            assert after.state == "failed", after
            assert "still said 'running'" in after.error and "not writable" in after.error, after.error
            assert [j.state for j in jobs.list_jobs(run.parent)] == ["failed"]
        assert jobs.job_status(run).state == "failed"  # writable again: still the truth
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(st.pid, signal.SIGKILL)


_wait = wait_until
