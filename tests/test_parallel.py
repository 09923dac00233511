"""Parallel blocks (issue 14): timm's fused ``ParallelScalingBlock`` (ViT-22B) split at load into the studio's
``ParallelBlock`` of the same function, in each of its configurations (separate or fused output projection,
``in_proj`` bias or ``mlp_bias``, qk-norm, LayerScale, the ``*_xp_*`` pre-norm RmsNorm variant), and
``ParallelThingsBlock`` (2 or 3 branches, LayerScale, biases or none) merged into one ``Block`` of the same
function; both pruned in every unit exactly; what cannot be split or merged refused in one sentence.

The every-method sweep (targets, export -> reload, ONNX, P3B/SPLoRA jobs) runs on this family in
``tests/test_families.py``; these cases cover the configurations its one example does not.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Block, ParallelScalingBlock, ParallelThingsBlock

from studio.bench import profile
from studio.costs import with_summary
from studio.errors import StudioError
from studio.families import SMALL, check
from studio.load import load_model
from studio.models import ModelSpec, create_vit, data_config, describe_base
from studio.parallel import MERGED, ParallelBlock, split_parallel
from studio.plan import BlockPlan, PrunePlan
from studio.prune import load_methods
from studio.surgery import apply_plan, mask_model

PWEE = "vit_pwee_patch16_reg1_gap_256"
_FUSED = partial(ParallelScalingBlock, fuse_out_proj=True)
VARIANTS = {
    "separate out projections, mlp_bias": (PWEE, {}),
    "fused out_proj, in_proj bias": (PWEE, {"block_fn": _FUSED, "qkv_bias": True}),
    "fused out_proj, qk-norm, no proj bias": (
        PWEE,
        {"block_fn": _FUSED, "qk_norm": True, "proj_bias": False, "init_values": 0.1},
    ),
    "xp: pre-norm, RmsNorm, qk-norm": ("vit_base_patch16_xp_224", {}),
}
THINGS = "vit_small_patch16_18x2_224"
THINGS_VARIANTS = {
    "2 branches, LayerScale, bias-free qkv": (THINGS, {}),
    "3 branches, qkv bias, no proj bias": (
        THINGS,
        {"block_fn": partial(ParallelThingsBlock, num_parallel=3), "qkv_bias": True, "proj_bias": False},
    ),
}


def _timm(arch: str, kw: dict) -> torch.nn.Module:
    """timm's own model with the fused blocks, random weights nudged off their zero inits."""
    torch.manual_seed(0)
    m = timm.create_model(arch, **{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(
        3, 3, SMALL["img_size"], SMALL["img_size"], generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_split_block_computes_timms_fused_block_with_the_same_weights(variant):
    arch, kw = VARIANTS[variant]
    fused = _timm(arch, kw)
    x = _x()
    with torch.inference_mode():
        ref = fused(x)
    split = split_parallel(copy.deepcopy(fused))
    assert all(type(b) is ParallelBlock for b in split.blocks)
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in fused.parameters())
    _same_structure(split, arch, kw)
    with torch.inference_mode():
        torch.testing.assert_close(split(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", THINGS_VARIANTS)
def test_parallel_things_branches_merge_into_one_block_of_the_same_function(variant):
    arch, kw = THINGS_VARIANTS[variant]
    things = _timm(arch, kw)
    P = len(things.blocks[0].attns)
    a, m = things.blocks[0].attns[0].attn, things.blocks[0].ffns[0].mlp
    x = _x()
    with torch.inference_mode():
        ref = things(x)
    merged = split_parallel(copy.deepcopy(things))
    blk = merged.blocks[0]
    assert type(blk) is Block and getattr(blk, MERGED) == P
    assert blk.attn.num_heads == P * a.num_heads and blk.attn.head_dim == a.head_dim
    assert blk.mlp.fc1.out_features == P * m.fc1.out_features
    _same_structure(merged, arch, kw)
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), ref, atol=1e-5, rtol=0)


def _same_structure(split: torch.nn.Module, arch: str, kw: dict) -> None:
    """What the studio builds (create_vit: what an export reloads into) has the split model's weights' shapes."""
    built = create_vit(arch, **{**SMALL, **kw})
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in split.state_dict().items()
    }


@pytest.mark.parametrize("arch", [PWEE, THINGS])
def test_a_timm_checkpoint_of_parallel_blocks_loads_split(arch, tmp_path):
    fused = _timm(arch, {})
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec(str(path), arch=arch, kwargs=SMALL, device="cpu"))
    assert all(type(b) is ParallelBlock or getattr(b, MERGED, 0) == 2 for b in loaded.model.blocks)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(_x()), fused(_x()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", [*VARIANTS, *THINGS_VARIANTS])
def test_every_unit_of_a_parallel_block_is_cut_exactly(variant):
    """Heads, head dims, MLP neurons and embedding channels at once: masked = pruned logits, counted = analytic
    params and MACs, and the pruned block is narrower where the plan says."""
    arch, kw = {**VARIANTS, **THINGS_VARIANTS}[variant]
    m = split_parallel(_timm(arch, kw))
    base = describe_base(m, arch, {**SMALL, **kw})
    d, E = base.head_dim, base.embed_dim
    plan = PrunePlan(
        base,
        tuple(
            BlockPlan(
                i,
                heads=(0, 2) if i == 1 else None,
                head_dims=tuple(range(i % 2, d, 2)),
                mlp=tuple(range(0, base.mlp_hidden[i], 3)),
            )
            for i in range(base.depth)
        ),
        embed=tuple(c for c in range(E) if c % 4),
    )
    plan = with_summary(plan)
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    blk = pruned.blocks[1]
    assert (
        type(blk) in (ParallelBlock, Block)
        and blk.attn.num_heads == 2
        and blk.attn.head_dim == len(range(1, d, 2))
    )
    assert blk.mlp.fc1.out_features == len(range(0, base.mlp_hidden[1], 3)) and blk.norm1.weight.shape == (
        E * 3 // 4,
    )
    counted = profile(pruned, data_config(m)["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    x = _x(1)
    with torch.inference_mode():
        out = pruned(x)
        torch.testing.assert_close(mask_model(m, plan)(x), out, atol=1e-4, rtol=0)
        assert not torch.allclose(out, m(x), atol=1e-3)  # a real cut, not the dense function


def test_a_removed_parallel_block_adds_nothing():
    m = split_parallel(_timm(PWEE, {"init_values": 0.1}))
    base = describe_base(m, PWEE, SMALL)
    plan = with_summary(PrunePlan(base, (BlockPlan(0), BlockPlan(2))))
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    assert len(pruned.blocks) == 2
    assert profile(pruned, data_config(m)["input_size"])["macs"] == plan.summary["macs_after"]
    with torch.inference_mode():
        torch.testing.assert_close(mask_model(m, plan)(_x()), pruned(_x()), atol=1e-4, rtol=0)


def test_unsupported_parallel_structures_are_refused_in_one_sentence():
    with pytest.raises(StudioError, match=r"ParallelScalingBlock.*Load the model through the studio"):
        check(_timm(PWEE, {}))  # built outside create_vit: still fused
    with pytest.raises(StudioError, match=r"ParallelThingsBlock.*Load the model through the studio"):
        check(_timm(THINGS, {}))  # built outside create_vit: still branched
    for arch, kw, says in (
        (THINGS, {"qk_norm": True}, "ParallelThingsBlock whose branches cannot be merged.*qk-norm"),
        (THINGS, {"scale_mlp_norm": True}, "cannot be merged.*scale norm"),
        ("vit_dpwee_patch16_reg1_gap_256", {}, "DiffParallelScalingBlock"),
    ):
        with pytest.raises(StudioError, match=says) as e, torch.device("meta"):
            create_vit(arch, **{**SMALL, **kw})
        assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_p3b_refuses_parallel_blocks_before_any_work_and_the_others_prune_them():
    m = create_vit(PWEE, **SMALL)
    why = load_methods().get("p3b").refused_units(m)
    assert why and all("parallel block" in s and "another method" in s for s in why.values())
    for name in ("isomorphic", "savit", "sls", "magnitude", "taylor", "random", "splora"):
        assert not load_methods().get(name).refused_units(m), name
    merged = create_vit(THINGS, **SMALL)  # merged branches are an ordinary Block: P3B prunes them too
    assert not any(load_methods().get(n).refused_units(merged) for n in load_methods().names())
