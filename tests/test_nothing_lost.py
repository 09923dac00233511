"""Nothing lost (issue: write-once outputs, cancel before start): an existing output is never overwritten
without the user asking, a replaced export leaves nothing stale, and a cancel sent before the job runs holds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from studio.cli import main
from studio.data import DataSpec
from studio.flows.prune import PruneSpec
from studio.models import ModelSpec

FAST = ["--no-eval", "--no-bench", "--device", "cpu"]


def _one_line_error(capsys, code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_prune_out_into_a_folder_with_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "plan.json").write_text("my own notes")
    rc = main(["prune", "--method", "magnitude", "--target-macs", "0.5", *FAST, "--out", str(out)])
    assert rc == 2 and "already exists" in _one_line_error(capsys)
    assert [p.name for p in out.iterdir()] == ["plan.json"] and (
        out / "plan.json"
    ).read_text() == "my own notes"


def test_out_at_a_file_is_one_clear_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = main(["prune", "--method", "magnitude", "--target-macs", "0.5", *FAST, "--out", str(f)])
    assert rc == 2 and "is a file" in _one_line_error(capsys) and f.read_text() == "x"


def test_export_refuses_an_existing_export_and_replaces_it_whole_when_asked(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "--model", "demo", "--device", "cpu", "--out", str(out), "--json"]) == 0
    (out / "model.onnx").write_bytes(b"stale graph of an older model")
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["export", "--model", "demo", "--device", "cpu", "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert (out / "model.onnx").exists() and (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["export", "--model", "demo", "--device", "cpu", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "reload.json",
    ]  # no ONNX
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]  # no staging folders left


def test_a_cancel_sent_before_the_job_starts_is_not_lost(tmp_path):
    from studio import jobs

    spec = PruneSpec(
        ModelSpec("demo", device="cpu"),
        "p3b",
        {"prune_ratio": 0.5, "epochs": 4, "probe": "mean", "steps_per_update": 2},
        DataSpec("demo", limit=96),
        bench=False,
    )
    run = tmp_path / "runs" / "early-cancel"
    jobs.submit(spec, run, device="cpu", threads=1, env={"STUDIO_LOCK_DIR": str(tmp_path / "locks")})
    jobs.cancel_job(run)  # the process is only starting: it has not even imported torch yet
    t0 = time.time()
    while jobs.job_status(run).active and time.time() - t0 < 300:
        time.sleep(0.5)
    st = jobs.job_status(run)
    assert st.state == "cancelled", (st, (Path(run) / "stderr.log").read_text()[-2000:])
    assert not (Path(run) / "results.json").exists()


def test_a_refused_start_leaves_no_run_folder(tmp_path):
    from studio import jobs
    from studio.errors import StudioError

    spec = PruneSpec(
        ModelSpec("demo"), "p3b", {"epochs": 4, "start_epoch": 0, "finalize_epoch": 0}, DataSpec("demo")
    )
    with pytest.raises(StudioError, match="finalize"):
        jobs.submit(spec, tmp_path / "runs" / "refused", device="cpu")
    assert not (tmp_path / "runs" / "refused").exists()


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"state_dict": {"w": "tensor"}}, "it lacks 'model', 'optimizer', 'epoch', 'skip' and more"),
        ("a tensor", "it holds a Tensor"),
    ],
)
def test_resuming_from_a_foreign_checkpoint_is_one_line(tmp_path, capsys, payload, needle):
    """A readable torch file that the training loop did not write used to stop the resume with KeyError: 'model'."""
    import torch

    from studio.runs import RunDir

    run = tmp_path / "r"
    rc = main(
        [
            "retrain",
            "--model",
            "demo",
            "--data",
            "demo",
            "--out",
            str(run),
            "--dry-run",
            "--limit",
            "64",
            "--kd",
            "none",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    value = {"state_dict": {"w": torch.zeros(2)}} if isinstance(payload, dict) else torch.zeros(2)
    torch.save(value, RunDir(run).checkpoint_file)
    rc = main(["retrain", "--run", str(run), "--resume", "--no-bench", "--no-export", "--device", "cpu"])
    err = capsys.readouterr().err.strip()  # progress lines (the recipe, data) come first on stderr
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and err.endswith(errors[0]), err
    assert "is not a training checkpoint written by the studio" in errors[0] and needle in errors[0], err
    assert "KeyError" not in err and "Traceback" not in err


def test_resuming_a_studio_checkpoint_of_another_model_is_one_line(tmp_path):
    """A studio checkpoint whose weights do not fit the model (another width) is refused, not a RuntimeError."""
    import torch

    from studio.errors import StudioError
    from studio.models import create_vit
    from studio.train import TrainSpec, fit

    kw = dict(img_size=16, patch_size=8, depth=1, num_heads=2, num_classes=3)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    data = torch.utils.data.TensorDataset(x, y)
    ckpt = tmp_path / "checkpoint.pt"
    spec = TrainSpec(epochs=1, batch_size=6, lr=1e-3)
    fit(create_vit("vit_tiny_patch16_224", embed_dim=32, **kw), data, None, spec, checkpoint=ckpt)
    assert ckpt.exists()
    with pytest.raises(StudioError, match=r"was saved by another model or recipe than this run's \(") as e:
        fit(
            create_vit("vit_tiny_patch16_224", embed_dim=48, **kw),
            data,
            None,
            spec,
            checkpoint=ckpt,
            resume=True,
        )
    assert "\n" not in str(e.value)
