"""Importance engine: criteria registry, grouped scores, ablation ground truth, correlations, page helpers, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from studio.analysis.importance import (
    CRITERIA,
    ImportanceResult,
    cells,
    compute_importance,
    edit_unit,
    head_ablation,
    marked,
    neuron_bins,
    removed_fraction,
    removed_heads,
    set_head,
    set_neurons,
    spearman,
    toggle_head,
    unit_labels,
)
from studio.errors import StudioError
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import apply_plan
from studio.ui.importance import MethodPlanner, plan_cost_of

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    torch.manual_seed(0)
    m = create_vit("vit_tiny_patch16_224", **KW).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # head 2 of block 0 contributes nothing: its ablation must be exactly 0 and its magnitude the lowest
        m.blocks[0].attn.qkv.weight.view(3, 3, 16, 48)[:, 2] = 0
        m.blocks[0].attn.qkv.bias.view(3, 3, 16)[:, 2] = 0
        m.blocks[0].attn.proj.weight.view(48, 3, 16)[:, 2] = 0
    return LoadedModel(
        m, describe_base(m, "vit_tiny_patch16_224", KW), data_config(m), list("abcde"), torch.device("cpu")
    )


def batches(n: int = 2, bs: int = 8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(bs, 3, 32, 32, generator=g), torch.randint(0, 5, (bs,), generator=g)) for _ in range(n)
    ]


@pytest.fixture(scope="module")
def result(tiny) -> ImportanceResult:
    return compute_importance(tiny, batches(), ("l1", "l2", "taylor", "taylor2", "ablation"))


def test_registry_lists_the_criteria_and_refuses_unknown_ones(tiny):
    assert {"l1", "l2", "taylor", "taylor2", "ablation"} <= set(CRITERIA.names())
    with pytest.raises(StudioError, match="Valid importance criterions: ablation, l1"):
        compute_importance(tiny, batches(), ("taylr",))
    with pytest.raises(StudioError, match="calibration data"):
        compute_importance(tiny, (), ("taylor",))


def test_shapes_and_kinds(result):
    assert result.criteria == ["l1", "l2", "taylor", "taylor2", "ablation"]
    for c in ("l1", "l2", "taylor"):
        s = result.get(c)
        assert len(s.heads) == 3 and len(s.heads[0]) == 3
        assert len(s.head_dims[0]) == 16 and len(s.mlp[0]) == 192 and len(s.embed) == 48
    assert result.get("taylor2").head_dims is None and len(result.get("taylor2").embed) == 48
    assert result.get("ablation").mlp is None
    assert result.samples == 16 and result.batches == 2
    with pytest.raises(StudioError, match="not computed"):
        result.get("random")


def test_ablation_is_the_loss_change_of_physically_removing_the_head(tiny, result):
    data = batches()
    abl, base_loss = head_ablation(tiny, data)
    assert abl == result.get("ablation").heads
    assert abs(abl[0][2]) < 1e-6  # the dead head (stacked passes: float round-off only)
    plan = PrunePlan(tiny.base, (BlockPlan(0), BlockPlan(1, heads=(0, 2)), BlockPlan(2)))
    pruned = apply_plan(copy.deepcopy(tiny.model), plan).eval()
    with torch.inference_mode():
        loss = sum(F.cross_entropy(pruned(x), y, reduction="sum") for x, y in data) / 16
    assert float(loss) - base_loss == pytest.approx(abl[1][1], abs=1e-5)


def test_dead_head_scores_lowest_by_magnitude_and_taylor(result):
    for c in ("l1", "l2", "taylor", "taylor2"):
        row = result.get(c).heads[0]
        assert row[2] == min(row), c


def test_correlations_are_spearman_against_ablation(result):
    truth = [v for r in result.get("ablation").heads for v in r]
    for c in ("l1", "l2", "taylor", "taylor2"):
        flat = [v for r in result.get(c).heads for v in r]
        assert result.correlation[c] == pytest.approx(spearman(flat, truth))
        assert -1 <= result.correlation[c] <= 1
    assert "ablation" not in result.correlation
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_result_round_trips_through_json(result):
    again = ImportanceResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_neuron_bins_partition_by_rank(result):
    values, members = neuron_bins(result.get("taylor").mlp, 8)
    assert len(values) == 3 and all(len(v) == 8 for v in values)
    for row, bins, scores in zip(values, members, result.get("taylor").mlp):
        assert sorted(i for b in bins for i in b) == list(range(192))
        assert row == sorted(row, reverse=True)
        assert max(scores) == pytest.approx(max(scores[i] for i in bins[0]))


def test_edits_overlay_and_cost(tiny, result):
    base = tiny.base
    plan = PrunePlan.dense(base)
    dropped = set_head(plan, 1, 2, keep=False)
    assert dropped.block(1).heads == (0, 1) and dropped.method == "manual"
    assert removed_heads(dropped, base)[1] == [False, False, True]
    assert set_head(dropped, 1, 2, keep=True).block(1).heads is None
    with pytest.raises(StudioError, match="last one"):
        set_head(set_head(dropped, 1, 1, keep=False), 1, 0, keep=False)
    _, members = neuron_bins(result.get("l2").mlp, 4)
    cut = set_neurons(dropped, 2, members[2][3], keep=False)
    assert removed_fraction(cut, base, members)[2] == [0.0, 0.0, 0.0, 1.0]
    assert cut.params["edits"] == ["block 1 head 2 drop", "block 2 48 MLP neurons drop"]
    assert toggle_head(cut, 1, 2).block(1).heads is None and toggle_head(cut, 0, 1).block(0).heads == (0, 2)
    assert edit_unit(cut, 0, "head 1", keep=False, members=members) == toggle_head(cut, 0, 1).with_(
        params={**cut.params, "edits": [*cut.params["edits"], "block 0 head 1 drop"]}
    )
    assert unit_labels(base, 0, members)[-1] == "neuron bin 3" and len(unit_labels(base, 0, None)) == 3
    with pytest.raises(StudioError, match="Unknown unit"):
        edit_unit(cut, 0, "layer 1", keep=False)
    assert cells([[1.0, 2.0], [3.0, 4.0]]) == ([0, 1, 0, 1], [0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0])
    assert marked(removed_heads(cut, base)) == ([2], [1])
    c0, c1 = plan_cost_of(None, base), plan_cost_of(cut, base)
    assert c0["macs_fraction"] == 1.0 and c1["macs"] < c0["macs"] and c1["params"] < c0["params"]


def test_method_planner_reuses_calibration_and_hits_budgets(tiny):
    planner = MethodPlanner(tiny, batches())
    p = planner.plan("savit", 0.6)
    assert abs(p.summary["macs_fraction"] - 0.6) <= 1e-3
    scores = planner._savit
    p2 = planner.plan("savit", 0.7)
    assert planner._savit is scores and p2.summary["macs_after"] > p.summary["macs_after"]
    assert planner.plan("savit", 0.6) is p
    r = planner.plan("random", 0.6)
    assert r.method == "random" and abs(r.summary["macs_fraction"] / 0.6 - 1) <= 0.02


def test_cli_prints_one_json_object(capsys):
    from studio.cli import main

    rc = main(
        [
            "analyze",
            "importance",
            "--model",
            "demo",
            "--criterion",
            "l1,l2",
            "--batches",
            "0",
            "--json",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n") == 1
    d = json.loads(out)
    assert d["criteria"] == ["l1", "l2"] and len(d["scores"]["l1"]["heads"]) == 12
    assert main(["analyze", "importance", "--criterion", "nope", "--batches", "0"]) == 2


@pytest.mark.parametrize("name", CRITERIA.names())
def test_every_registered_criterion_scores_the_units_and_repeats_exactly(name, tiny):
    """Parametrised over the one criteria registry: a new criterion is tested the moment it is registered."""
    from studio.analysis.importance import grouped_criteria, torch_pruning_importance

    crit = CRITERIA.get(name)
    data = batches() if crit.needs_data else []
    first, again = crit.fn(tiny, data, seed=3), crit.fn(tiny, data, seed=3)
    assert first.criterion == name and first.heads is not None
    assert [len(r) for r in first.heads] == list(tiny.base.num_heads)
    assert all(torch.isfinite(torch.tensor(r)).all() for r in first.heads)
    assert first.heads == again.heads, "a criterion is deterministic for a seed"
    assert (name in grouped_criteria()) == (crit.torch_pruning is not None)
    if crit.torch_pruning is None:
        with pytest.raises(StudioError, match="cannot rank torch-pruning groups"):
            torch_pruning_importance(name)
    else:
        import torch_pruning as tp

        assert isinstance(torch_pruning_importance(name), tp.importance.Importance)
