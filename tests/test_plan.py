"""The plan contract: JSON round trip, refusal of invalid plans naming the field, diff, and exact analytic costs."""

from __future__ import annotations

import copy
import json

import pytest

from studio.bench import count_macs
from studio.costs import plan_cost, with_summary
from studio.errors import StudioError
from studio.models import create_vit, describe_base
from studio.plan import BaseArch, BlockPlan, PrunePlan, diff
from studio.surgery import apply_plan

BASE = BaseArch(
    arch="vit_tiny_patch16_224",
    kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5),
    depth=3,
    embed_dim=48,
    num_heads=(3, 3, 3),
    head_dim=16,
    mlp_hidden=(192, 192, 192),
    num_classes=5,
)


def sample_plan() -> PrunePlan:
    return PrunePlan(
        base=BASE,
        blocks=(
            BlockPlan(0, heads=(0, 2), head_dims=(1, 2, 3), mlp=tuple(range(0, 192, 2))),
            BlockPlan(2, attn_in=(0, 2, 4), attn_out=(4, 6), mlp_in=(0, 2), mlp_out=(2,)),
        ),
        embed=tuple(range(0, 48, 2)),
        method="magnitude",
        params={"ratio": 0.5, "scope": "heads,mlp"},
        scale_policy="reset",
    )


def test_json_round_trip(tmp_path):
    plan = with_summary(sample_plan())
    assert PrunePlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan and again.to_dict() == plan.to_dict()
    assert json.loads((tmp_path / "plan.json").read_text())["version"] == 1
    assert again.summary["params_after"] < again.summary["params_before"]


def _bad(**block) -> dict:
    d = sample_plan().to_dict()
    d["blocks"][0].update(block)
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_bad(heads=[0, 3]), r"'blocks\[0\]\.heads' has index 3 out of range 0\.\.2"),
        (_bad(heads=[1, 1]), r"'blocks\[0\]\.heads' has duplicate indices"),
        (_bad(heads=[]), r"'blocks\[0\]\.heads' is empty"),
        (_bad(mlp=[5, 3]), r"'blocks\[0\]\.mlp' must be sorted"),
        (_bad(head_dims=[16]), r"'blocks\[0\]\.head_dims' has index 16"),
        (_bad(attn_in=[1, 3]), r"'blocks\[0\]\.attn_in' uses channels outside 'embed'"),
        (_bad(heads="0,1"), r"'blocks\[0\]\.heads' must be a list of integers"),
        (_bad(index=7), r"'blocks\[7\]\.index' = 7 is out of range"),
    ],
)
def test_invalid_plan_names_the_field(change, message):
    with pytest.raises(StudioError, match=message):
        PrunePlan.from_dict(change)


def test_invalid_plan_top_level_fields():
    d = sample_plan().to_dict()
    with pytest.raises(StudioError, match="'version'"):
        PrunePlan.from_dict({**d, "version": 99})
    with pytest.raises(StudioError, match="'scale_policy'"):
        PrunePlan.from_dict({**d, "scale_policy": "warm"})
    with pytest.raises(StudioError, match="'blocks' is empty"):
        PrunePlan.from_dict({**d, "blocks": []})
    with pytest.raises(StudioError, match="'blocks' must list block indices once"):
        PrunePlan.from_dict({**d, "blocks": [d["blocks"][1], d["blocks"][0]]})
    with pytest.raises(StudioError, match="not valid JSON"):
        PrunePlan.from_json("{nope")


def test_diff_names_changes():
    a = sample_plan()
    b = a.with_(blocks=(a.blocks[0], BlockPlan(1), a.blocks[1]), method="taylor")
    lines = diff(a, b)
    assert "method: magnitude -> taylor" in lines
    assert "block 1: removed -> kept" in lines
    assert diff(a, a) == []


def test_dense_and_is_dense():
    assert PrunePlan.dense(BASE).is_dense and not sample_plan().is_dense


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("vit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        (
            "vit_tiny_patch16_224",
            dict(
                qkv_bias=False,
                init_values=1e-5,
                class_token=False,
                global_pool="avg",
                fc_norm=True,
                reg_tokens=2,
            ),
        ),
    ],
)
def test_plan_cost_equals_counted(arch, extra):
    kw = dict(BASE.kwargs, **extra)
    model = create_vit(arch, **kw).eval()
    base = describe_base(model, arch, kw)
    plan = sample_plan().with_(base=base)
    for p in (PrunePlan.dense(base), plan):
        pruned = apply_plan(copy.deepcopy(model), p)
        cost, counted = plan_cost(p), count_macs(pruned, (3, 32, 32))
        assert cost["params"] == sum(t.numel() for t in pruned.parameters())
        assert (cost["macs"], cost["macs_attention"], cost["macs_linear"], cost["macs_conv"]) == (
            counted["total"],
            counted["attention"],
            counted["linear"],
            counted["conv"],
        )
