"""SLS: the cut rule against its closed form, the separability scores, the depth-cut plan and the pipeline."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from studio.analysis.separability import (
    SeparabilitySpec,
    analyze_features,
    embed_2d,
    embed_layer,
    fast_curve,
    features_from_bank,
    knn_accuracy,
    minmax,
    silhouette,
)
from studio.analysis.sls_cut import closed_form, sls_cut
from studio.errors import StudioError

TINY = dict(
    img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5
)  # = conftest's tiny_vit


# ----------------------------------------------------------------------------------------------- the cut rule
def test_cut_monotone_curve_matches_closed_form():
    scores = [0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.8]  # threshold 0.24: layers 4..8 pass, layer 3 fails
    cut = sls_cut(scores, 0.3)
    assert cut.keep == closed_form(scores, 0.3) == 4
    assert cut.stopped_at == 3 and cut.removed == 4
    assert cut.threshold == pytest.approx(0.24)
    assert cut.passed == (False, False, False, True, True, True, True, True)


def test_cut_stops_at_first_failure_even_if_lower_layers_rise_again():
    # dip then rise (pitfall P3): layer 4 fails, layers 1-3 would pass but the scan never reaches them
    scores = [0.9, 0.9, 0.9, 0.1, 0.8, 0.9, 1.0]
    cut = sls_cut(scores, 0.3)
    assert cut.keep == closed_form(scores, 0.3) == 5
    assert cut.stopped_at == 4
    lowest_above = min(i + 1 for i, s in enumerate(scores) if s >= 0.3)
    assert lowest_above == 1 != cut.keep  # not "the lowest layer above T"


def test_negative_top_score_keeps_everything():
    scores = [0.2, 0.1, -0.05]
    assert closed_form(scores, 0.3) is None  # the set of the closed form is empty
    cut = sls_cut(scores, 0.3)
    assert cut.keep == 3 and cut.removed == 0
    assert "negative" in cut.reason


def test_all_layers_pass_keeps_one_block_and_alpha_bounds():
    assert sls_cut([0.5, 0.6, 0.7], 0.3).keep == 1
    assert sls_cut([0.5, 0.6, 0.7], 1.0).keep == 3  # alpha 1: only layers as good as the last
    assert sls_cut([0.9], 0.3).keep == 1
    with pytest.raises(StudioError, match="alpha"):
        sls_cut([0.1, 0.2], 1.5)
    with pytest.raises(StudioError, match="finite"):
        sls_cut([float("nan"), 0.2], 0.3)


def test_larger_alpha_never_removes_more_layers():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = rng.uniform(-0.3, 1.0, size=rng.integers(1, 13)).tolist()
        keeps = [sls_cut(s, a).keep for a in (0.0, 0.2, 0.3, 0.5, 0.8, 1.0)]
        assert keeps == sorted(keeps)


@pytest.mark.parametrize("seed", range(5))
def test_cut_equals_closed_form_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    for _ in range(100):
        s = rng.uniform(-0.2, 1.0, size=rng.integers(1, 13)).tolist()
        alpha = float(rng.uniform(0, 1))
        expected = closed_form(s, alpha)
        assert sls_cut(s, alpha).keep == (len(s) if expected is None else expected)


def test_lazy_scores_below_the_stop_are_not_needed():
    cut = sls_cut([None, None, 0.05, 0.5, 0.9], 0.3)
    assert cut.keep == 4
    with pytest.raises(StudioError, match="not computed"):
        sls_cut([None, 0.5, 0.6, 0.9], 0.3)


# ----------------------------------------------------------------------------------------------- the scores
def _blobs(n_per: int = 40, classes: int = 4, dim: int = 8, sep: float = 50.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per)
    return x, y


def test_silhouette_is_one_on_separated_blobs_and_zero_on_shuffled_labels():
    x, y = _blobs(n_per=100)
    assert silhouette(x, y) > 0.95
    shuffled = np.random.default_rng(1).permutation(y)
    assert abs(silhouette(x, shuffled)) < 0.1
    assert knn_accuracy(x, y) == pytest.approx(1.0)
    assert knn_accuracy(x, shuffled) < 0.5


def test_tsne_embedding_is_minmax_scaled_and_keeps_blobs_apart():
    x, y = _blobs(n_per=30)
    pts = embed_2d(x, "tsne", seed=0)
    assert pts.shape == (120, 2)
    assert np.allclose(pts.min(0), 0) and np.allclose(pts.max(0), 1)
    assert silhouette(pts, y) > 0.8
    assert np.array_equal(pts, embed_2d(x, "tsne", seed=0))  # seeded: reproducible
    assert np.allclose(minmax(np.array([[1.0, 5.0], [3.0, 5.0]])), [[0, 0], [1, 0]])


def test_analysis_on_synthetic_layers_finds_the_separating_depth(tmp_path):
    # layer 1: noise; layers 2-3: clearly separated classes -> the cut keeps 2 of 3 blocks
    x, y = _blobs(n_per=30, dim=6)
    noise = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    feats = features_from_bank(np.stack([noise, x, x * 2]), y, split="train")
    res = analyze_features(feats, SeparabilitySpec(embed="pca"))
    assert res.silhouette[0] < 0.1 < 0.8 < res.silhouette[1]
    assert res.cut is not None and res.cut.keep == 2 and res.suggested is res.cut
    assert res.fast_cut.keep == 2
    d = res.to_dict(points=True)
    assert [r["layer"] for r in d["layers"]] == [1, 2, 3]
    assert len(d["embeddings"]["2"]["points"]) == len(y)
    json.dumps(d)  # JSON-able
    # per-layer cache: the second call reads the saved embedding
    again = embed_layer(feats, 1, "pca")
    assert again.cached and np.array_equal(again.points, res.embeddings[1].points)
    lazy = analyze_features(feats, SeparabilitySpec(embed="pca", lazy=True))
    assert lazy.silhouette[0] is not None and lazy.cut.keep == 2  # it had to read layer 1 to stop


def test_fast_curve_and_none_embedding_use_the_fast_cut():
    x, y = _blobs(n_per=20)
    feats = features_from_bank(np.stack([x, x]), y)
    fast = fast_curve(feats)
    assert len(fast.knn) == 2 and fast.seconds >= 0
    res = analyze_features(feats, SeparabilitySpec(embed="none"))
    assert res.cut is None and res.suggested is res.fast_cut
    assert all(v is None for v in res.silhouette)


def test_bad_inputs_raise_studio_errors():
    with pytest.raises(StudioError, match="two classes"):
        silhouette(np.zeros((5, 2)), np.zeros(5, dtype=int))
    with pytest.raises(StudioError, match="embedding"):
        SeparabilitySpec(embed="mds").validate()
    with pytest.raises(StudioError, match="samples"):
        SeparabilitySpec(samples=3).validate()


# ------------------------------------------------------------------------------------------- plan and method
def test_sls_plan_keeps_first_blocks_and_reuses_norm_and_head(tiny_vit):
    from studio.costs import plan_cost
    from studio.models import describe_base
    from studio.prune.sls import preview_cut, sls_plan
    from studio.surgery import apply_plan

    base = describe_base(tiny_vit, "vit_tiny_patch16_224", TINY)
    plan = sls_plan(base, 2)
    assert [b.index for b in plan.blocks] == [0, 1] and plan.method == "sls"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = tiny_vit._pos_embed(tiny_vit.patch_embed(x))
        h = tiny_vit.blocks[1](tiny_vit.blocks[0](h))
        expected = tiny_vit.head(tiny_vit.norm(h)[:, 0])
        cut = apply_plan(copy.deepcopy(tiny_vit), plan)
        torch.testing.assert_close(cut(x), expected)
    assert len(cut.blocks) == 2
    assert sum(p.numel() for p in cut.parameters()) == plan_cost(plan)["params"]

    class L:  # preview needs only .base
        pass

    loaded = L()
    loaded.base = base
    pv = preview_cut(loaded, 2, base_images_per_s=100.0)
    assert pv["params"] == plan_cost(plan)["params"] and pv["macs_fraction"] < 1
    assert pv["est_images_per_s"] == pytest.approx(100.0 * pv["ideal_speedup"])
    for bad in (0, 4):
        with pytest.raises(StudioError, match="keeps between"):
            sls_plan(base, bad)


def test_registered_method_plans_from_calibration_batches(tiny_vit):
    from studio.models import LoadedModel, describe_base
    from studio.prune import PruneRequest, get_method, make_plan

    assert get_method("sls").data_needed() and not get_method("sls").data_needed({"keep_blocks": 2})
    loaded = LoadedModel(
        tiny_vit,
        describe_base(tiny_vit, "vit_tiny_patch16_224", TINY),
        {"input_size": [3, 32, 32]},
        [str(i) for i in range(5)],
        torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 3, 32, 32, generator=g), torch.arange(40) % 5) for _ in range(2)]
    plan = make_plan("sls", PruneRequest(loaded, {"embed": "pca"}, batches))
    assert 1 <= plan.depth <= 3 and len(plan.params["curve"]) == 3
    assert plan.params["samples"] == 80 and plan.summary["params_after"] <= plan.summary["params_before"]
    given = make_plan("sls", PruneRequest(loaded, {"keep_blocks": 1}, batches))
    assert given.depth == 1 and given.params["rule"] == "given"
    with pytest.raises(StudioError, match="no option 'target_macs'"):  # SLS budgets depth, not MACs
        make_plan("sls", PruneRequest(loaded, {"target_macs": 0.5, "keep_blocks": 2}, batches))


def test_trainable_rules_select_the_right_parameters(tiny_vit):
    from studio.prune.sls import trainable_rule
    from studio.train import select_trainable

    names = select_trainable(tiny_vit, trainable_rule("head+norm+last", 2, tiny_vit))
    assert {n.split(".")[0] for n in names} == {"head", "norm", "blocks"}
    assert all(n.startswith("blocks.1.") for n in names if n.startswith("blocks"))
    names = select_trainable(tiny_vit, trainable_rule("auto", 3, tiny_vit))
    assert sorted(names) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    with pytest.raises(StudioError, match="no adapters"):
        trainable_rule("adapters", 3, tiny_vit)


# -------------------------------------------------------------------------------------------- on the demo
@pytest.mark.slow
def test_run_sls_on_the_demo_cuts_retrains_and_exports(demo_loaded, tmp_path):
    from studio.flows import create_run, run_folder
    from studio.flows.sls import SLSRunSpec
    from studio.load import load_model
    from studio.models import ModelSpec

    spec = SLSRunSpec(keep=6, retrain="cpu", epochs=2, bench=False, model=ModelSpec("demo", device="cpu"))
    run = create_run(spec, tmp_path / "sls-run")
    sec = run_folder(run, loaded=demo_loaded).section
    assert len(demo_loaded.model.blocks) == 12  # the loaded model is never changed
    assert [r["stage"] for r in sec["table"]] == ["dense", "cut", "retrained"]
    stages = sec["stages"]
    assert stages["cut"]["blocks"] == 6 and stages["cut"]["params"] < stages["dense"]["params"]
    assert stages["retrained"]["val_top1"] >= stages["cut"]["val_top1"]
    assert (
        sec["retrain"]["train_spec"]["weight_decay"] == 1e-4
        and sec["retrain"]["train_spec"]["select"] == "val"
    )
    saved = json.loads((run.path / "results.json").read_text())
    assert saved["kind"] == "sls" and saved["after"]["top1"] == stages["retrained"]["test_top1"]
    reloaded = load_model(ModelSpec(str(run.export_dir), device="cpu"))
    assert len(reloaded.model.blocks) == 6 and reloaded.plan.method == "sls"


def test_cli_analyze_sls_prints_one_json_object(capsys):
    from studio.cli import main

    assert main(["analyze", "sls", "--embed", "none", "--samples", "200", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["depth"] == 12 and out["samples"] == 200 and len(out["layers"]) == 12
    assert 1 <= out["keep"] <= 12 and out["cut"] is None and out["fast_cut"]["keep"] == out["keep"]
    with pytest.raises(SystemExit) as e:  # refused while parsing: --alpha is a fraction
        main(["analyze", "sls", "--alpha", "3", "--device", "cpu"])
    assert e.value.code == 2


def test_sls_spec_round_trips_through_spec_json():
    from studio.data import DataSpec
    from studio.flows import spec_from_dict
    from studio.flows.sls import SLSRunSpec
    from studio.models import ModelSpec

    spec = SLSRunSpec(
        model=ModelSpec("demo-backbone", num_classes=10, reset_head=True, kwargs={"drop_path_rate": 0.1}),
        data=DataSpec("demo", limit=500),
        keep=5,
        alpha=0.4,
        embed="umap",
        samples=800,
        retrain="paper",
        trainable="head+norm+last",
        epochs=7,
        bench=False,
    )
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(StudioError, match="--alpha"):
        SLSRunSpec(alpha=3.0).validate()


def test_the_feature_bank_is_found_whatever_working_directory_names_the_folder(
    demo_loaded, tmp_path, monkeypatch
):
    """``imagefolder:data`` from the project and ``imagefolder:/abs/.../data`` are the same images: one bank."""
    from PIL import Image

    from studio.analysis.separability import SeparabilitySpec, features_cached, layer_features
    from studio.data import DataSpec

    rng = np.random.default_rng(0)
    for c in range(10):
        for i in range(2):
            d = tmp_path / "data" / "train" / str(c)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path / "cache"))
    absolute = DataSpec.parse(f"imagefolder:{tmp_path / 'data'}")
    layer_features(demo_loaded, absolute, samples=None)
    monkeypatch.chdir(tmp_path)
    relative = SeparabilitySpec(data=DataSpec.parse("imagefolder:data"), samples=None)
    assert features_cached(demo_loaded, relative)
