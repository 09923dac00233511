"""Latency (issue 17): the per-unit latency model recovers a known cost function, every backend runs a pruned
model, and ONNX Runtime computes what PyTorch does for uneven head dims."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from studio.backends import BACKENDS
from studio.errors import StudioError
from studio.export import export_onnx
from studio.latency import FEATURES, design, features, fit, profile_latency, time_ms
from studio.models import create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import apply_plan

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def make():
    torch.manual_seed(0)
    m = create_vit("vit_tiny_patch16_224", **KW).eval()
    return m, describe_base(m, "vit_tiny_patch16_224", KW)


def structure_cost(model: torch.nn.Module, _size, _batch) -> float:
    """A known 'device': 0.4 ms fixed, 0.3 ms per block, 0.05 ms per head, 0.002 ms per MLP neuron."""
    blocks = list(model.blocks)
    heads = sum(b.attn.num_heads for b in blocks)
    mlp = sum(b.mlp.fc1.out_features for b in blocks)
    return 0.4 + 0.3 * len(blocks) + 0.05 * heads + 0.002 * mlp


def test_the_fit_recovers_a_known_cost_function():
    m, base = make()
    lm = profile_latency(m, base, [3, 32, 32], variants=16, timer=structure_cost)
    coef = dict(zip(FEATURES, lm.coef))
    assert coef["const"] == pytest.approx(0.4, abs=1e-6) and coef["blocks"] == pytest.approx(0.3, abs=1e-6)
    assert coef["heads"] == pytest.approx(0.05, abs=1e-6) and coef["mlp"] == pytest.approx(0.002, abs=1e-7)
    assert lm.fit_error < 1e-6 and lm.dense_ms == pytest.approx(structure_cost(m, None, None))
    for p in design(base, 5, seed=9):  # unseen structures are predicted exactly too
        assert lm.predict(p) == pytest.approx(structure_cost(apply_plan(copy.deepcopy(m), p), None, None))


def test_fit_keeps_coefficients_non_negative():
    rows = [([1.0, b, 2.0 * b, 0.0, 0.0], 1.0 + 0.5 * b) for b in range(1, 6)]
    coef = fit(rows)
    assert all(c >= 0 for c in coef)
    assert np.dot(coef, [1.0, 3, 6.0, 0, 0]) == pytest.approx(2.5, rel=1e-6)


def test_design_varies_widths_and_depth_and_features_count_units():
    _, base = make()
    plans = design(base, 12, seed=0)
    assert len({len(p.blocks) for p in plans}) > 1 and len({features(p)[2] for p in plans}) > 3
    dense = features(PrunePlan.dense(base))
    assert dense[1:4] == [4.0, 12.0, 4.0 * 192]


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_every_fast_backend_times_a_pruned_model(backend):
    m, base = make()
    plan = PrunePlan(base, tuple(BlockPlan(i, heads=(0,) if i % 2 else None) for i in range(4))).validate()
    ms = time_ms(
        apply_plan(copy.deepcopy(m), plan).eval(), [3, 32, 32], 2, backend=backend, warmup=1, repeats=3
    )
    assert 0 < ms < 10_000


def test_unknown_backend_and_too_few_variants_are_refused():
    m, base = make()
    with pytest.raises(StudioError, match="backend"):
        time_ms(m, [3, 32, 32], 1, backend="tensorrt")
    with pytest.raises(StudioError, match="at least 8"):
        profile_latency(m, base, [3, 32, 32], variants=3, timer=structure_cost)
    assert set(BACKENDS.names()) >= {"eager", "compile", "onnxruntime"}


def test_onnxruntime_equals_pytorch_for_uneven_head_dims(tmp_path):
    m, base = make()
    plan = PrunePlan(
        base,
        (
            BlockPlan(0, heads=(0, 2), head_dims=tuple(range(0, 16, 2))),
            BlockPlan(1, head_dims=(1, 3, 5, 7, 9)),
            BlockPlan(2, heads=(1,), mlp=tuple(range(0, 192, 3))),
            BlockPlan(3),
        ),
    ).validate()
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    assert {b.attn.head_dim for b in pruned.blocks} == {8, 5, 16}
    out = export_onnx(pruned, tmp_path / "m.onnx", [3, 32, 32], atol=1e-4)
    assert out["checked"] and out["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("method", ["magnitude", "isomorphic", "savit"])
def test_a_latency_target_is_met_on_a_fake_timer(method, monkeypatch, tmp_path):
    """The solver aims at the latency model's prediction, not MACs: on a device whose latency is a known
    function of the structure, the pruned model's latency lands on the target."""
    import studio.latency as lat
    from studio.models import LoadedModel, data_config
    from studio.prune import PruneRequest, make_plan

    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(lat, "time_ms", lambda m, size, batch, **_: structure_cost(m, size, batch))
    monkeypatch.setattr(
        lat, "measured_fraction", lambda d, p, *_, **__: structure_cost(p, 0, 0) / structure_cost(d, 0, 0)
    )
    m, base = make()
    loaded = LoadedModel(m, base, data_config(m), [str(i) for i in range(5)], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g))]
    plan = make_plan(
        method, PruneRequest(loaded, {"target_latency": 0.6}, batches if method != "magnitude" else [])
    )
    dense = structure_cost(m, None, None)
    measured = structure_cost(apply_plan(copy.deepcopy(m), plan), None, None)
    assert measured / dense == pytest.approx(0.6, rel=0.05)
    rec = plan.params["latency"]
    assert rec["predicted_ms"] == pytest.approx(measured, rel=1e-6) and rec["target_latency"] == 0.6
    # and MACs were not the target: the plan keeps a different fraction of them
    assert abs(plan.summary["macs_fraction"] - 0.6) > 0.02


def test_a_method_without_a_latency_model_refuses_the_latency_target():
    from studio.models import LoadedModel, data_config
    from studio.prune import PruneRequest, make_plan

    m, base = make()
    loaded = LoadedModel(m, base, data_config(m), [str(i) for i in range(5)], torch.device("cpu"))
    with pytest.raises(StudioError, match="no option 'target_latency'"):
        make_plan(
            "sls",
            PruneRequest(loaded, {"target_latency": 0.5}, [(torch.randn(4, 3, 32, 32), torch.arange(4))]),
        )


def aligned_cost(model: torch.nn.Module, _size, _batch) -> float:
    """A device that runs widths divisible by 16 at full speed and anything else at a third of it."""
    ms = 0.0
    for b in model.blocks:
        for width in (b.mlp.fc1.out_features, b.attn.head_dim):
            ms += width * (1.0 if width % 16 == 0 else 3.0) * 1e-3
    return ms


def test_width_payoff_finds_where_rounding_pays_on_a_known_device():
    """On a device that is fast only at multiples of 16, rounding up to 16 or 32 pays (faster despite more
    MACs), rounding to 8 does not; the uneven widths are odd and rounding adds arithmetic."""
    from studio.latency import width_payoff

    m, base = make()
    rows = width_payoff(m, base, [3, 32, 32], keep=0.5, timer=aligned_cost)
    assert {(r["unit"], r["multiple"]) for r in rows} == {
        (u, k) for u in ("mlp", "head_dim") for k in (1, 8, 16, 32)
    }
    mlp = {r["multiple"]: r for r in rows if r["unit"] == "mlp"}
    assert (
        mlp[1]["width"] == 97
        and mlp[8]["width"] == 104
        and mlp[16]["width"] == 112
        and mlp[32]["width"] == 128
    )
    assert mlp[1]["macs"] < mlp[8]["macs"] < mlp[16]["macs"] < mlp[32]["macs"]
    assert not mlp[1]["pays"] and not mlp[8]["pays"] and mlp[16]["pays"] and mlp[32]["pays"]
    assert mlp[16]["ms_vs_uneven"] < 1 < mlp[8]["ms_vs_uneven"]
    with pytest.raises(StudioError, match="keep must be a fraction"):
        width_payoff(m, base, [3, 32, 32], keep=1.0, timer=aligned_cost)


def test_the_latency_bench_runs_its_gpu_table_path_on_the_cpu(tmp_path):
    """The GPU table is the same script under bfloat16: on this CPU it runs that path (autocast timings, the
    latency model and target in bfloat16) and says which backend has no bfloat16."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "STUDIO_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = ["--models", "demo", "--methods", "magnitude", "--backends", "eager", "onnxruntime"]
    argv += ["--targets", "0.7", "--variants", "8", "--dtype", "bfloat16", "--device", "cpu"]
    # batch 16: at batch 1 the demo's time on a fast CPU is mostly per-layer overhead, so no width reaches 70 %
    argv += ["--batch", "16"]
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "latency.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    ).stdout
    assert out.startswith("device cpu") and "dtype bfloat16" in out.splitlines()[0]
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| demo")]
    eager = [r for r in rows if r[1].strip() == "eager"]
    assert len(eager) == 1 and float(eager[0][6]) > 0 and float(eager[0][7]) > 0  # predicted and measured ms
    assert any("onnxruntime has no bfloat16" in "|".join(r) for r in rows)
    cached = [json.loads(f.read_text()) for f in (tmp_path / "latency").glob("*.json")]
    assert len(cached) == 1 and cached[0]["backend"] == "eager"


def test_a_latency_model_off_at_the_plan_is_corrected_by_measuring_the_plan(monkeypatch, tmp_path):
    """A device whose latency the linear model cannot fit (MLP widths cost quadratically): the first solve
    misses, the correction rounds measure the plan, rescale the model there and land within 3 % of the target."""
    import studio.latency as lat
    from studio.models import LoadedModel, data_config
    from studio.prune import LATENCY_TOL, PruneRequest, make_plan

    def curved(model: torch.nn.Module, _size, _batch) -> float:
        return 0.2 + sum((b.mlp.fc1.out_features / 192) ** 2 + 0.1 * b.attn.num_heads for b in model.blocks)

    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path))
    monkeypatch.setattr(lat, "time_ms", lambda m, size, batch, **_: curved(m, size, batch))
    monkeypatch.setattr(lat, "measured_fraction", lambda d, p, *_, **__: curved(p, 0, 0) / curved(d, 0, 0))
    m, base = make()
    loaded = LoadedModel(m, base, data_config(m), [str(i) for i in range(5)], torch.device("cpu"))
    plan = make_plan("magnitude", PruneRequest(loaded, {"target_latency": 0.6, "scope": "mlp"}))
    rounds = plan.params["latency"]["rounds"]
    assert len(rounds) >= 2 and abs(rounds[0]["measured"] / 0.6 - 1) > LATENCY_TOL  # the model alone misses
    measured = curved(apply_plan(copy.deepcopy(m), plan), None, None) / curved(m, None, None)
    assert measured == pytest.approx(0.6, rel=LATENCY_TOL) and rounds[-1]["measured"] == pytest.approx(
        measured, abs=1e-4
    )
