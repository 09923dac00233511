"""CLS attention maps from the models' own attention: a dense plan equals the unpruned model, removed heads are
absent, and the model handed in is never changed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from studio.attention import cls_attention
from studio.errors import StudioError
from studio.models import create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import apply_plan

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def make(arch: str = "vit_tiny_patch16_224"):
    torch.manual_seed(0)
    m = create_vit(arch, **KW).eval()
    with torch.no_grad():  # away from timm's init, so heads attend differently
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m, describe_base(m, arch, KW)


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_a_dense_plans_maps_equal_the_unpruned_models(arch):
    m, base = make(arch)
    plan = PrunePlan.dense(base)
    dense = cls_attention(m, X)
    same = cls_attention(apply_plan(copy.deepcopy(m), plan), X, plan=plan)
    assert dense.grid == (4, 4) and [b.block for b in dense.blocks] == [0, 1, 2]
    for a, b in zip(dense.blocks, same.blocks):
        assert a.heads == b.heads == (0, 1, 2) and a.removed == b.removed == ()
        assert a.maps.shape == (2, 3, 4, 4)
        assert torch.allclose(a.maps, b.maps, atol=1e-6)
    assert torch.allclose(dense.rollout, same.rollout, atol=1e-6)
    # CLS rows are probabilities over all tokens: the patches get a share of 1 (the prefix tokens the rest)
    total = dense.blocks[0].maps.sum(dim=(-2, -1))
    assert ((total > 0) & (total < 1 + 1e-6)).all()
    assert not torch.allclose(dense.blocks[0].maps[:, 0], dense.blocks[0].maps[:, 1])  # heads differ


def test_a_removed_head_is_absent_and_kept_heads_keep_their_maps():
    m, base = make()
    plan = PrunePlan(
        base, (BlockPlan(0, heads=(0, 2)), BlockPlan(2, heads=(1,), mlp=tuple(range(100)))), method="manual"
    )
    pruned = apply_plan(copy.deepcopy(m), plan)
    dense, cut = cls_attention(m, X), cls_attention(pruned, X, plan=plan)
    b0 = cut.block(0)
    assert b0 is not None and b0.heads == (0, 2) and b0.removed == (1,) and b0.maps.shape[1] == 2
    # block 0 sees the same input in both models and its kept heads are unchanged: the same maps
    assert torch.allclose(b0.maps, dense.block(0).maps[:, [0, 2]], atol=1e-6)
    assert cut.block(1) is None and cut.removed_blocks == (1,)
    b2 = cut.block(2)
    assert b2 is not None and b2.heads == (1,) and b2.removed == (0, 2) and b2.maps.shape == (2, 1, 4, 4)
    d = cut.to_dict()
    assert [b["heads"] for b in d["blocks"]] == [[0, 2], [1]] and d["removed_blocks"] == [1]


def test_the_model_handed_in_is_not_changed_and_a_wrong_plan_is_refused():
    m, base = make()
    flags = [b.attn.fused_attn for b in m.blocks]
    with torch.inference_mode():
        ref = m(X)
    cls_attention(m, X)
    assert [b.attn.fused_attn for b in m.blocks] == flags
    assert not any(b.attn.attn_drop._forward_hooks for b in m.blocks)
    with torch.inference_mode():
        assert torch.equal(m(X), ref)
    plan = PrunePlan(base, (BlockPlan(0, heads=(0,)), BlockPlan(1), BlockPlan(2)))
    with pytest.raises(StudioError, match="give the plan it was pruned with"):
        cls_attention(m, X, plan=plan)  # the dense model does not run the plan's one head


def test_compare_page_shows_dense_and_pruned_maps_with_removed_heads_marked(tmp_path, monkeypatch):
    import json

    from streamlit.testing.v1 import AppTest

    from studio.data import DataSpec
    from studio.flows import create_run, run_folder
    from studio.flows.prune import PruneSpec
    from studio.models import ModelSpec
    from studio.plan import PrunePlan as Plan

    root = tmp_path / "runs"
    monkeypatch.setenv("STUDIO_RUNS", str(root))
    spec = PruneSpec(
        ModelSpec("demo", device="cpu"),
        "magnitude",
        {"target_macs": 0.5},
        DataSpec("demo", limit=96),
        bench=False,
    )
    run = create_run(spec, root / "p")
    run_folder(run)
    plan = Plan.load(run.plan_file)
    block = next(b.index for b in plan.blocks if b.heads is not None)  # a block that lost a head
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/10_compare.py").run()
    at.number_input(key="cmp_attn_block").set_value(block).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "cmp_attn_maps" in c.proto.id)
    removed = [a for a in fig["layout"]["annotations"] if a.get("text") == "removed"]
    kept = plan.block(block).heads
    assert len(removed) == 3 - len(kept)  # only in the pruned row, one per removed head
    # dense row: every head and the rollout; pruned row: the kept heads and the rollout
    assert len(fig["data"]) == (3 + 1) + (len(kept) + 1)


def test_importance_page_shows_the_active_plans_attention_with_removed_heads_marked(monkeypatch, tmp_path):
    """The Importance page's view: which heads matter for this image, dense vs the active plan."""
    import json
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from studio.plan import BlockPlan, PrunePlan
    from studio.ui.state import PLAN_KEY

    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
    at.run()
    from studio.load import load_model
    from studio.models import ModelSpec

    base = load_model(ModelSpec("demo", device="cpu")).base
    plan = PrunePlan(base, tuple(BlockPlan(i, heads=(0, 1) if i == 0 else None) for i in range(base.depth)))
    at.session_state[PLAN_KEY] = plan.validate()
    at.switch_page("pages/4_importance.py").run()
    at.toggle(key="imp_attn_on").set_value(True).run()
    assert not at.exception, at.exception
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "imp_attn_maps" in c.proto.id)
    removed = [a for a in spec["layout"].get("annotations", []) if a.get("text") == "removed"]
    assert len(removed) == 1  # head 2 of block 0, in the pruned row only
