"""EVA (issue 14): timm's ``Eva`` rebuilt at load (:func:`studio.eva.convert_eva`) into a ViT of rotary
attentions with the same function, in each configuration the studio supports (EVA-02 tiny's packed SwiGLU,
EVA-02 base's separate q/k/v and SwiGLU with a hidden norm, class-token pooling with a sub-LayerNorm and
half-rotation RoPE, register tokens with qk-norm, no class token or absolute position embedding, EVA-01 without
RoPE); every unit cut exactly (EVA-02's head dims as whole rotary pairs, half a pair refused); the methods'
choice of EVA-02 head dims in whole rotary pairs (SPLoRA and P3B refuse them) and the structures the rebuild cannot express, each in one sentence.

The every-method sweep (targets, export -> reload, ONNX, P3B/SPLoRA jobs) runs on the EVA families in
``tests/test_families.py``; these cases cover the configurations their examples do not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from studio.bench import profile
from studio.costs import with_summary
from studio.errors import StudioError
from studio.eva import RopeAttention, convert_eva, rope_pairs
from studio.families import SMALL, check
from studio.load import load_model
from studio.models import ModelSpec, create_vit, data_config, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.prune import PruneRequest, load_methods, make_plan
from studio.surgery import apply_plan, mask_model
from tests.test_parallel import _timm, _x  # timm's own model, nudged off its zero inits; a seeded batch

TINY, BASE = "eva02_tiny_patch14_224", "eva02_base_patch14_224"
VARIANTS = {
    "EVA-02 tiny: fused qkv, q/v bias, packed SwiGLU, LayerScale": (TINY, {"init_values": 0.1}),
    "EVA-02 base: separate q/k/v, SwiGLU with a hidden norm": (BASE, {}),
    "token pool, sub-LayerNorm, rotate-half RoPE, no qkv bias": (
        TINY,
        {"global_pool": "token", "scale_attn_inner": True, "rope_rotate_half": True, "qkv_bias": False},
    ),
    "register tokens, qk-norm": (TINY, {"num_reg_tokens": 2, "qk_norm": True, "init_values": 0.1}),
    "no class token or absolute position embedding, pre-norm": (
        TINY,
        {"class_token": False, "use_abs_pos_emb": False, "use_pre_transformer_norm": True},
    ),
    "EVA-01 (no RoPE, plain Mlp)": ("eva_giant_patch14_224", {"mlp_ratio": 4.0}),
    "EVA-02 at a dynamic image size, pruned at the loaded one": (TINY, {"dynamic_img_size": True}),
    "DINOv3: its rotary table, register tokens, dynamic size": (
        "vit_small_patch16_dinov3",
        {"init_values": 0.1},
    ),
    "DINOv3 with q/k/v biases, token pool": (
        "vit_small_patch16_dinov3_qkvb",
        {"init_values": 0.1, "global_pool": "token"},
    ),
    "DINOv3 huge+: SwiGLU": ("vit_huge_plus_patch16_dinov3", {"init_values": 0.1}),
    "DINOv3, rotary coordinate augmentation in training only": (
        "vit_small_patch16_dinov3",
        {"init_values": 0.1, "rope_rescale_coords": 2.0},
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rebuilt_eva_gives_timms_logits_with_the_same_weights(variant):
    arch, kw = VARIANTS[variant]
    eva = _timm(arch, kw)
    with torch.inference_mode():
        ref = eva(_x())
    vit = convert_eva(copy.deepcopy(eva)).eval()
    assert all(type(b.attn) is RopeAttention for b in vit.blocks)
    assert all((b.attn.rope is None) == (eva.rope is None) for b in vit.blocks)
    # the fused qkv gains one zero k bias per block where EVA has q/v biases; nothing else changes
    extra = sum(b.attn.qkv.bias.numel() // 3 for b in vit.blocks if b.attn.qkv.bias is not None)
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in eva.parameters()) + extra
    built = create_vit(arch, **{**SMALL, **kw})  # what an export reloads into
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in vit.state_dict().items()
    }
    with torch.inference_mode():
        torch.testing.assert_close(vit(_x()), ref, atol=1e-5, rtol=0)
        if eva.rope is not None:  # the rotation is what makes it EVA-02: without it attention differs
            a = copy.deepcopy(vit.blocks[0].attn)
            a.qkv.weight.mul_(30)  # sharp attention, so the positions the rotation encodes matter
            y = torch.randn(2, vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim)
            rotated = a(y)
            a.rope = None
            assert not torch.allclose(a(y), rotated, atol=1e-3)


def test_a_timm_eva_checkpoint_loads_rebuilt(tmp_path):
    eva = _timm(BASE, {})
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec(str(path), arch=BASE, kwargs=SMALL, device="cpu"))
    assert all(type(b.attn) is RopeAttention for b in loaded.model.blocks)
    assert loaded.data_config["mean"] == list(eva.pretrained_cfg["mean"])  # EVA's own normalisation
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(_x()), eva(_x()), atol=1e-5, rtol=0)


def _pairs_kept(attn: torch.nn.Module, i: int) -> tuple[int, ...]:
    """Every other rotary pair of a head (which ones by block), as sorted kept head dims."""
    return tuple(
        sorted(
            j for k, p in enumerate(rope_pairs(attn.head_dim, attn.rotate_half)) if k % 2 == i % 2 for j in p
        )
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_unit_of_an_eva_is_cut_exactly(variant):
    """Heads, head dims (whole rotary pairs under RoPE), MLP neurons and embedding channels at once: masked =
    pruned logits, counted = analytic params and MACs, and the pruned block is narrower where the plan says."""
    arch, kw = VARIANTS[variant]
    eva = _timm(arch, kw)
    m = convert_eva(copy.deepcopy(eva)).eval()
    base = describe_base(m, arch, {**SMALL, **kw})
    d, E, rope = base.head_dim, base.embed_dim, eva.rope is not None
    plan = PrunePlan(
        base,
        tuple(
            BlockPlan(
                i,
                heads=(0, 2) if i == 1 else None,
                head_dims=_pairs_kept(m.blocks[i].attn, i) if rope else tuple(range(i % 2, d, 2)),
                mlp=tuple(range(0, base.mlp_hidden[i], 3)),
            )
            for i in range(base.depth)
        ),
        embed=tuple(c for c in range(E) if c % 4),
    )
    plan = with_summary(plan)
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    blk = pruned.blocks[1]
    assert blk.attn.num_heads == 2 and blk.norm1.weight.shape == (E * 3 // 4,) and blk.attn.head_dim == d // 2
    if rope:  # each kept dim keeps its own frequency's sin/cos columns
        full, cut = m.blocks[1].attn.rope, blk.attn.rope
        kept = list(_pairs_kept(m.blocks[1].attn, 1))
        assert torch.equal(cut, torch.cat([full[:, kept], full[:, [d + j for j in kept]]], dim=1))
    assert blk.mlp.fc2.in_features == len(range(0, base.mlp_hidden[1], 3))
    counted = profile(pruned, data_config(m)["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    with torch.inference_mode():
        out = pruned(_x(1))
        torch.testing.assert_close(mask_model(m, plan)(_x(1)), out, atol=1e-4, rtol=0)
        assert not torch.allclose(out, m(_x(1)), atol=1e-3)  # a real cut, not the dense function


@pytest.mark.parametrize("rotate_half", [False, True])
def test_head_dims_that_split_a_rotary_pair_are_refused_in_one_sentence(rotate_half):
    m = create_vit(TINY, **SMALL, rope_rotate_half=rotate_half).eval()
    base = describe_base(m, TINY, {**SMALL, "rope_rotate_half": rotate_half})
    half_a_pair = (0, 2, 4, 6) if not rotate_half else (0, 1, 2, 3)  # first dims of pairs only
    plan = PrunePlan(base, tuple(BlockPlan(i, head_dims=half_a_pair if i == 1 else None) for i in range(3)))
    for cut in (apply_plan, mask_model):
        with pytest.raises(StudioError, match=r"Block 1's kept head dims .* rotary pairs") as e:
            cut(copy.deepcopy(m), plan)
        assert "\n" not in str(e.value)


def test_a_removed_eva_block_adds_nothing():
    m = create_vit(TINY, **SMALL, init_values=0.1).eval()
    base = describe_base(m, TINY, {**SMALL, "init_values": 0.1})
    plan = with_summary(PrunePlan(base, (BlockPlan(0), BlockPlan(2))))
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    assert len(pruned.blocks) == 2
    assert profile(pruned, data_config(m)["input_size"])["macs"] == plan.summary["macs_after"]
    with torch.inference_mode():
        torch.testing.assert_close(mask_model(m, plan)(_x()), pruned(_x()), atol=1e-4, rtol=0)


def _pairs_only(plan: PrunePlan, pairs: list[tuple[int, int]]) -> None:
    kept = [b for b in plan.blocks if b.head_dims is not None]
    assert kept, "the plan prunes no head dims"
    for b in kept:
        assert any(p[0] in b.head_dims for p in pairs) and len(b.head_dims) < 2 * len(pairs)
        assert all((p[0] in b.head_dims) == (p[1] in b.head_dims) for p in pairs), (b.index, b.head_dims)


@pytest.mark.parametrize("rotate_half", [False, True])
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("magnitude", {"scope": "heads,head_dims", "target_macs": 0.7}),
        ("magnitude", {"scope": "head_dims", "ratio": 0.4, "mode": "global", "round_to": 3}),
        ("taylor", {"scope": "head_dims,mlp", "ratio": 0.3}),
        ("random", {"scope": "head_dims", "ratio": 0.5}),
        ("isomorphic", {"target_macs": 0.7, "importance": "l2"}),
        ("isomorphic", {"ratio": 0.2, "head_ratio": 0.0, "head_dim_ratio": 0.3, "importance": "taylor"}),
    ],
)
def test_eva02_head_dims_are_chosen_in_whole_rotary_pairs_and_cut_exactly(name, params, rotate_half):
    kw = {**SMALL, "rope_rotate_half": rotate_half, "init_values": 0.1}
    torch.manual_seed(0)
    m = create_vit(TINY, **kw).eval()
    with torch.no_grad():  # off the zero inits, so every dim has a score of its own
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    from studio.models import LoadedModel
    from tests.test_families import _batches

    loaded = LoadedModel.from_module(m, TINY, kw)
    method = load_methods().get(name)
    plan = make_plan(
        name, PruneRequest(loaded, params, _batches(loaded) if method.data_needed(params) else [])
    )
    pairs = rope_pairs(m.blocks[0].attn.head_dim, rotate_half)
    _pairs_only(plan, pairs)
    if params.get("round_to") == 3:
        assert all(len(b.head_dims) % 6 == 0 for b in plan.blocks if b.head_dims is not None)
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    assert profile(pruned, data_config(m)["input_size"])["macs"] == plan.summary["macs_after"]
    with torch.inference_mode():
        torch.testing.assert_close(mask_model(copy.deepcopy(m), plan)(_x()), pruned(_x()), atol=1e-4, rtol=0)


def test_methods_whose_masks_act_on_single_dims_refuse_eva02_head_dims_in_one_sentence():
    plain = create_vit(TINY, **SMALL, swiglu_mlp=False)  # SPLoRA's adapters need timm's Mlp
    for name in ("p3b", "splora"):
        why = load_methods().get(name).refused_units(plain).get("head_dims", "")
        assert "rotary" in why and "another method" in why and "\n" not in why, (name, why)
    # EVA-01 has no rotation: its head dims are pruned like any ViT's
    assert not load_methods().get("splora").refused_units(create_vit("eva_giant_patch14_224", **SMALL))


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"use_post_norm": True}, "EvaBlockPostNorm"),
        ({"attn_type": "rope"}, "AttentionRope"),
        ({"patch_drop_rate": 0.1}, "patch dropout"),
        ({"rope_type": "mixed"}, "RotaryEmbeddingCat"),
        ({"global_pool": "map"}, "global_pool='map'"),
    ],
)
def test_eva_structures_the_rebuild_cannot_express_are_refused_in_one_sentence(kw, says):
    with pytest.raises(StudioError, match=says) as e:
        create_vit(TINY, **{**SMALL, **kw})
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_an_eva_built_outside_the_studio_is_refused_naming_the_fix():
    with pytest.raises(StudioError, match="Load the model through the studio"):
        check(_timm(TINY, {}))


def test_a_plan_of_whole_rotary_pairs_exports_reloads_and_converts_to_onnx_identically(tmp_path):
    from studio.export import export_loaded, export_onnx, load_exported
    from studio.models import LoadedModel

    kw = {**SMALL, "init_values": 0.1, "rope_rotate_half": True}
    m = create_vit(TINY, **kw).eval()
    loaded = LoadedModel.from_module(m, TINY, kw)
    plan = with_summary(
        PrunePlan(
            loaded.base,
            tuple(BlockPlan(i, heads=(0, 1), head_dims=_pairs_kept(m.blocks[i].attn, i)) for i in range(3)),
        )
    )
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    back = load_exported(export_loaded(pruned, loaded, tmp_path / "export", plan=plan), device="cpu").model
    with torch.inference_mode():
        assert torch.equal(back(_x()), pruned(_x()))
    out = export_onnx(pruned, tmp_path / "m.onnx", loaded.data_config["input_size"])
    assert out["checked"] and out["max_abs_diff"] <= 1e-4


def test_training_time_rotary_coordinate_augmentation_stays_out_of_the_rebuilt_table():
    """A DINOv3 built with rope_rescale_coords rescales its rotary coordinates at random in training: a model
    rebuilt in train mode holds the same un-augmented table as one rebuilt in eval mode, every time."""
    arch, kw = VARIANTS["DINOv3, rotary coordinate augmentation in training only"]
    eva = _timm(arch, kw)
    assert eva.rope.aug_active
    tables = [
        convert_eva(copy.deepcopy(eva).train(train)).blocks[0].attn.rope for train in (True, True, False)
    ]
    assert all(torch.equal(t, tables[-1]) for t in tables)
