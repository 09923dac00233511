"""Engine behind the product pages: run comparison, Pareto fronts, benchmark, model card, reproduce command,
export of the active plan, allowed roots and uploads."""

from __future__ import annotations

import copy
import io
import json
import shlex
import zipfile
from pathlib import Path

import pytest
import torch

from studio.compare import collect, label, pareto_mask, per_class_change, plan_diff, plan_of, speed_columns
from studio.data import DataSpec
from studio.errors import StudioError
from studio.models import ModelSpec
from studio.runs import RunDir


def _pruned_run(root: Path, demo_loaded, target: float = 0.5, *, bench: bool = False):
    from studio.flows import start
    from studio.flows.prune import PruneSpec

    spec = PruneSpec(
        model=ModelSpec("demo", device="cpu"),
        method="magnitude",
        params={"target_macs": target, "round_to": 8},
        data=DataSpec("demo"),
        bench=bench,
        bench_batch_sizes=(1, 8),
        bench_repeats=3,
        bench_warmup=1,
    )
    return start(spec, root=root, loaded=demo_loaded)


def test_pareto_mask_keeps_only_non_dominated_points():
    pts = [[0.9, 100], [0.8, 200], [0.85, 150], [0.7, 120], [0.9, 90], [None, 500], [float("nan"), 10]]
    assert pareto_mask(pts, [True, True]) == [True, True, True, False, False, False, False]
    # minimising the second objective flips which points are dominated
    assert pareto_mask([[0.9, 10], [0.8, 5], [0.7, 20]], [True, False]) == [True, True, False]


def test_per_class_change_and_mismatch():
    rows = per_class_change({"a": 1.0, "b": 0.5}, {"a": 0.75, "b": 0.5})
    assert [r["change"] for r in rows] == [-0.25, 0.0]
    with pytest.raises(StudioError, match="different classes"):
        per_class_change({"a": 1.0, "z": 1.0}, {"a": 1.0})


def test_prune_run_is_recorded_and_compared(tmp_path, demo_loaded):
    params_before = sum(p.numel() for p in demo_loaded.model.parameters())
    run, result = _pruned_run(tmp_path, demo_loaded, bench=True)
    assert run.status()["state"] == "done"
    assert sum(p.numel() for p in demo_loaded.model.parameters()) == params_before  # never pruned in place
    rows = collect(tmp_path, model="demo")
    assert [r["stage"] for r in rows] == ["pruned (before recovery)", "dense"]
    pruned, dense = rows
    assert pruned["macs"] == result.after["macs"] and dense["macs"] == result.before["macs"]
    assert pruned["ideal_speedup"] == pytest.approx(result.ideal_speedup)
    assert pruned["top1_before_recovery"] == pruned["top1"] == pytest.approx(result.after["top1"])
    flat = {r["run"]: r for r in speed_columns(rows, 8)}
    assert flat["dense"]["measured_speedup"] == 1.0
    assert flat[run.path.name]["measured_speedup"] == pytest.approx(result.speedup["8"])
    assert collect(tmp_path, model="some-other-model") == []
    assert label(pruned).startswith("magnitude ") and label(dense) == "dense"
    # plan of the run, and its diff against the dense model
    plan = plan_of(run)
    assert plan is not None and plan.to_dict() == result.plan.to_dict()
    assert any("mlp 384 ->" in line for line in plan_diff(None, plan))
    assert plan_diff(plan, plan) == []


def test_a_retrain_run_links_back_to_its_prune_run(tmp_path, demo_loaded):
    run, result = _pruned_run(tmp_path, demo_loaded)
    retrain = RunDir.create(
        tmp_path / "20990101-000000-retrain",
        {"kind": "retrain", "model": ModelSpec(str(run.export_dir)).to_dict(), "data": DataSpec().to_dict()},
    )
    after = {"top1": 0.95, "params": result.after["params"], "macs": result.after["macs"]}
    retrain.write_results({"kind": "retrain", "method": "magnitude", "before": {"top1": 0.9}, "after": after})
    rows = {r["run"]: r for r in collect(tmp_path, model="demo")}
    rec = rows[retrain.path.name]
    assert rec["stage"] == "recovered" and rec["from_run"] == run.path.name
    assert rec["top1_before_recovery"] == 0.9 and rec["top1"] == 0.95 and rec["target_macs"] == 0.5
    assert rows["dense"]["top1"] == pytest.approx(result.before["top1"])  # not the retrain run's "before"


def test_benchmark_rows_and_speedups(demo_loaded):
    from studio.benchmark import Target, benchmark
    from studio.costs import with_summary
    from studio.plan import BlockPlan, PrunePlan
    from studio.surgery import apply_plan

    base = demo_loaded.base
    plan = with_summary(PrunePlan(base, tuple(BlockPlan(i) for i in range(6))))  # half the depth
    half = copy.copy(demo_loaded)
    half.model = apply_plan(copy.deepcopy(demo_loaded.model), plan).eval()
    rows = benchmark(
        [Target("dense", demo_loaded), Target("half", half)],
        (1, 4),
        ("float32", "bfloat16"),
        warmup=1,
        repeats=3,
    )
    assert len(rows) == 8 and {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["images_per_s"] > 0 and r["latency_ms"] > 0
        if r["model"] == "dense":
            assert r["ideal_speedup"] == 1.0 and r["measured_speedup"] == 1.0
        else:
            assert r["ideal_speedup"] == pytest.approx(
                plan.summary["macs_before"] / plan.summary["macs_after"]
            )
    with pytest.raises(StudioError, match="not measured on cpu"):
        benchmark([Target("dense", demo_loaded)], (1,), ("float16",))
    with pytest.raises(StudioError, match="at least one"):
        benchmark([], (1,))


def test_benchmark_times_every_backend_and_reports_efficiency(demo_loaded):
    """Each backend's speed-up is against the reference on the same backend; ONNX Runtime, which runs the float32
    export only, is skipped in bfloat16 and the spec says so before anything is timed."""
    from studio.benchmark import Target, benchmark, plan_pairs
    from studio.costs import with_summary
    from studio.flows.benchmark import BenchmarkSpec
    from studio.models import ModelSpec
    from studio.plan import BlockPlan, PrunePlan
    from studio.surgery import apply_plan

    plan = with_summary(PrunePlan(demo_loaded.base, tuple(BlockPlan(i) for i in range(6))))
    half = copy.copy(demo_loaded)
    half.model = apply_plan(copy.deepcopy(demo_loaded.model), plan).eval()
    backends, dtypes = ("eager", "onnxruntime"), ("float32", "bfloat16")
    rows = benchmark(
        [Target("dense", demo_loaded), Target("half", half)],
        (1, 4),
        dtypes,
        backends=backends,
        warmup=1,
        repeats=3,
        rounds=1,
    )
    timed, skipped = plan_pairs(backends, dtypes)
    assert skipped == [("onnxruntime", "bfloat16")] and len(timed) == 3
    assert len(rows) == 3 * 2 * 2
    assert {(r["backend"], r["dtype"]) for r in rows} == set(timed)
    for r in rows:
        if r["model"] == "dense":  # the reference on its own backend, not eager's
            assert r["measured_speedup"] == 1.0 and r["efficiency"] == 1.0
        else:
            assert r["ideal_speedup"] == pytest.approx(2.0, rel=0.05)
            assert r["efficiency"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
    demo = ModelSpec("demo")
    with pytest.raises(StudioError, match="Unknown backend 'tensorrt'"):
        BenchmarkSpec((("dense", demo),), backends=("tensorrt",)).validate()
    with pytest.raises(StudioError, match="onnxruntime cannot time bfloat16: add float32"):
        BenchmarkSpec((("dense", demo),), dtypes=("bfloat16",), backends=("onnxruntime",)).validate()
    spec = BenchmarkSpec((("dense", demo),), backends=backends)
    assert BenchmarkSpec.from_dict(spec.to_dict()) == spec


def _cli(argv: list[str], capsys) -> dict:
    """Run the CLI in this process (same parsing as the shell command) and return its --json output."""
    from studio.cli import main

    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return json.loads(out.out)


def test_reproduce_command_replays_the_same_plan(tmp_path, demo_loaded, capsys):
    from studio.modelcard import reproduce_command

    run, result = _pruned_run(tmp_path, demo_loaded, 0.6)
    cmd = reproduce_command(run.spec(), out=str(tmp_path / "replay"), spec_file=str(run.spec_file))
    assert cmd.startswith("python -m studio run --spec ")
    replayed = _cli([*shlex.split(cmd)[3:], "--json"], capsys)
    replay = json.loads((tmp_path / "replay" / "plan.json").read_text())
    original = result.plan.to_dict()
    assert replay["blocks"] == original["blocks"] and replay["embed"] == original["embed"]
    assert replayed["after"]["top1"] == result.after["top1"] and replayed["kind"] == "prune"


def test_model_card_zip_and_export_of_the_active_plan(tmp_path, demo_loaded, capsys):
    from studio.export import load_exported, read_manifest
    from studio.modelcard import export_zip, model_card, reproduce_command
    from studio.surgery import apply_plan
    from studio.workflow import export_plan_run

    _, result = _pruned_run(tmp_path, demo_loaded)
    run = export_plan_run(demo_loaded, result.plan, root=tmp_path, model_spec=ModelSpec("demo"))
    manifest = read_manifest(run.export_dir)
    cmd = reproduce_command(run.spec(), spec_file=str(run.spec_file))
    card = model_card(manifest, name=run.path.name, spec=run.spec(), results=run.results(), command=cmd)
    assert "`magnitude`" in card and "load_exported" in card and cmd in card
    assert f"{result.after['params']:,}" in card
    data = export_zip(run.export_dir, {"README.md": card})
    out = tmp_path / "unzipped"
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert set(z.namelist()) == {"manifest.json", "model.safetensors", "README.md"}
        z.extractall(out)
    reloaded = load_exported(out, device="cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = apply_plan(copy.deepcopy(demo_loaded.model), result.plan).eval()
    with torch.inference_mode():
        assert torch.allclose(reloaded.model(x), expected(x), atol=1e-5)
    # the export command replays it from the CLI: same parameters
    out = _cli([*shlex.split(cmd)[3:-2], "--out", str(tmp_path / "cli-export"), "--json"], capsys)
    assert out["after"]["params"] == result.after["params"] and out["kind"] == "prune"


def test_onnx_of_an_export_records_its_parity(tmp_path, demo_loaded):
    from studio.load import load_model
    from studio.workflow import export_onnx_for

    run, _ = _pruned_run(tmp_path, demo_loaded)
    loaded = load_model(ModelSpec(str(run.export_dir), device="cpu"))
    res = export_onnx_for(run.export_dir, loaded)
    assert res["checked"] and res["max_abs_diff"] < 1e-4
    assert json.loads((run.export_dir / "onnx.json").read_text())["max_abs_diff"] == res["max_abs_diff"]


def test_allowed_roots_and_uploads(tmp_path, monkeypatch):
    from studio.safety import check_path, save_upload

    inside = tmp_path / "ok.pth"
    inside.write_bytes(b"x")
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))
    assert check_path(str(inside), what="Checkpoint", kind="file") == inside.resolve()
    with pytest.raises(StudioError, match="is a file; give a folder"):
        check_path(str(inside), what="Data", kind="dir")
    (tmp_path / "link").symlink_to("/etc")  # a symlink must not lead outside the roots
    with pytest.raises(StudioError, match="outside the folders"):
        check_path(str(tmp_path / "link" / "hostname"), what="Checkpoint")
    with pytest.raises(StudioError, match="outside the folders"):
        check_path(str(tmp_path / ".." / ".." / "etc"), what="Data")
    with pytest.raises(StudioError, match="enter a path"):
        check_path("  ", what="Checkpoint")
    a = save_upload("../../evil name.pth", b"abc")
    assert a.parent.name == "pruning-studio-uploads" and a.suffix == ".pth" and a.read_bytes() == b"abc"
    assert save_upload("other.pth", b"abc") == a  # content-addressed
    with pytest.raises(StudioError, match="is empty"):
        save_upload("e.safetensors", b"")
