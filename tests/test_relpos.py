"""BEiT and timm's relative-position ViTs (issue 14): rebuilt at load (:func:`studio.relpos.convert_relpos`) into a
ViT of relative-position attentions with timm's logits, in each configuration the studio supports (BEiT with a
per-block, a shared or both tables and an absolute position embedding; BEiT-v2; relpos ViTs with the RelPosMlp
bias with and without a class token, in timm's and Swin-V2's mode, the RelPosBias table with and without a class
token, and the shared srelpos bias); a pruned head keeping its own bias column or MLP row; the structures the
rebuild cannot express, each refused in one sentence.

The every-method sweep (targets, masked = pruned, export -> reload in a fresh process, ONNX, counted = analytic
MACs, and P3B's and SPLoRA's tiny jobs) runs on the five BEiT / relpos families in ``tests/test_families.py``;
these cases cover the configurations their examples do not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

from studio.bench import profile
from studio.costs import with_summary
from studio.errors import StudioError
from studio.export import export_loaded, load_exported
from studio.families import FAMILIES, SMALL, check
from studio.load import load_model
from studio.models import LoadedModel, ModelSpec, create_vit, data_config, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.prune import load_methods
from studio.relpos import RelPosAttention, RelPosMlpBias, RelPosTable, convert_relpos
from studio.surgery import apply_plan, mask_model
from tests.test_parallel import _timm, _x  # timm's own model, nudged off its zero inits; a seeded batch

BEIT, RELPOS = "beit_base_patch16_224", "vit_relpos_small_patch16_224"
VARIANTS = {
    "BEiT: per-block table, LayerScale": (BEIT, {}),
    "BEiT: shared table": (BEIT, {"use_rel_pos_bias": False, "use_shared_rel_pos_bias": True}),
    "BEiT: shared + per-block tables, absolute position embedding, token pool": (
        BEIT,
        {"use_shared_rel_pos_bias": True, "use_abs_pos_emb": True, "global_pool": "token"},
    ),
    "BEiT-v2": ("beitv2_base_patch16_224", {}),
    "relpos: RelPosMlp, no class token, fc_norm": (RELPOS, {}),
    "relpos: RelPosMlp, class token (zero-padded bias), token pool": (
        "vit_relpos_medium_patch16_cls_224",
        {},
    ),
    "relpos: RelPosMlp in Swin-V2's mode (16·sigmoid), qk-norm": (
        RELPOS,
        {"rel_pos_type": "mlp_swin", "qk_norm": True},
    ),
    "relpos: RelPosBias table, no class token": (RELPOS, {"rel_pos_type": "bias"}),
    "relpos: RelPosBias table, class token rows": (
        RELPOS,
        {"rel_pos_type": "bias", "class_token": True, "global_pool": "token"},
    ),
    "srelpos: one shared RelPosMlp": ("vit_srelpos_small_patch16_224", {}),
}


def _model(arch: str, kw: dict) -> torch.nn.Module:
    """timm's model with biases large enough to move the attention (timm starts BEiT's tables at zero)."""
    m = _timm(arch, kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if (
                "relative_position_bias_table" in name
                or "rel_pos.mlp" in name
                or "shared_rel_pos.mlp" in name
            ):
                p.copy_(torch.randn_like(p))
    return m


def _bias_tables(timm_model: torch.nn.Module) -> int:
    return sum(
        p.numel() for n, p in timm_model.named_parameters() if "rel_pos" in n or "relative_position" in n
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rebuilt_model_gives_timms_logits_with_the_same_weights(variant):
    arch, kw = VARIANTS[variant]
    src = _model(arch, kw)
    with torch.inference_mode():
        ref = src(_x())
    vit = convert_relpos(copy.deepcopy(src)).eval()
    assert all(type(b.attn) is RelPosAttention and b.attn.rel_pos is not None for b in vit.blocks)
    # no grid function is a weight: the lookup index and the log-spaced coordinates are recomputed by every build
    assert not any("relative_position_index" in k or "rel_coords_log" in k for k in vit.state_dict())
    built = create_vit(arch, **{**SMALL, **kw})  # what an export reloads into
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in vit.state_dict().items()
    }
    # one bias per block (a shared one copied), and BEiT's q/v biases gain a zero k bias per block
    shared = getattr(src, "rel_pos_bias", None) or getattr(src, "shared_rel_pos", None)
    per_block = sum(p.numel() for p in vit.blocks[0].attn.rel_pos.parameters())
    k_bias = sum(b.attn.qkv.bias.numel() // 3 for b in vit.blocks) if arch.startswith("beit") else 0
    own = _bias_tables(src) - (0 if shared is None else sum(p.numel() for p in shared.parameters()))
    assert own in (0, per_block * len(vit.blocks))
    extra = k_bias + len(vit.blocks) * per_block - _bias_tables(src)
    assert sum(p.numel() for p in vit.parameters()) == sum(p.numel() for p in src.parameters()) + extra
    x = _x()
    with torch.inference_mode():
        torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=0)
        for b in vit.blocks:  # the explicit path (what the MACs counter and attention maps run) too
            b.attn.fused_attn = False
        torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=0)
        a = copy.deepcopy(vit.blocks[0].attn)  # the bias is what makes it relative-position attention
        y = torch.randn(2, vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim)
        biased = a(y)
        a.rel_pos = None
        assert not torch.allclose(a(y), biased, atol=1e-3)


@pytest.mark.parametrize("arch,kw", [(BEIT, {}), ("vit_relpos_medium_patch16_cls_224", {})])
def test_a_timm_checkpoint_loads_rebuilt(arch, kw, tmp_path):
    src = _model(arch, kw)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec(str(path), arch=arch, kwargs={**SMALL, **kw}, device="cpu"))
    assert all(type(b.attn) is RelPosAttention for b in loaded.model.blocks)
    assert loaded.data_config["mean"] == list(src.pretrained_cfg["mean"])  # the model's own normalisation
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(_x()), src(_x()), atol=1e-5, rtol=0)


def _bias_rows(attn: RelPosAttention) -> torch.Tensor:
    """The bias parameters of each head, one row per head (a table's column, an MLP's output row + bias)."""
    rp = attn.rel_pos
    if isinstance(rp, RelPosTable):
        return rp.relative_position_bias_table.detach().T
    fc2 = rp.mlp.fc2
    return torch.cat([fc2.weight.detach(), fc2.bias.detach()[:, None]], dim=1)


@pytest.mark.parametrize(
    "variant",
    [
        "BEiT: shared + per-block tables, absolute position embedding, token pool",
        "relpos: RelPosMlp, class token (zero-padded bias), token pool",
        "relpos: RelPosBias table, class token rows",
    ],
)
def test_a_pruned_head_keeps_its_own_bias_and_every_unit_is_cut_exactly(variant):
    """Heads, head dims, MLP neurons and embedding channels at once: each kept head keeps its
    bias column or MLP row, masked = pruned logits (a masked head's v is zero, so its bias adds nothing), and
    counted = analytic params and MACs (the bias MLP included)."""
    arch, kw = VARIANTS[variant]
    m = convert_relpos(_model(arch, kw)).eval()
    base = describe_base(m, arch, {**SMALL, **kw})
    d, E = base.head_dim, base.embed_dim
    heads = {0: (0, 2), 1: (1,)}
    plan = PrunePlan(
        base,
        tuple(
            BlockPlan(
                i,
                heads=heads.get(i),
                head_dims=tuple(range(i % 2, d, 2)) if i == 2 else None,
                mlp=tuple(range(0, base.mlp_hidden[i], 3)),
            )
            for i in range(base.depth)
        ),
        embed=tuple(c for c in range(E) if c % 4),
    )
    plan = with_summary(plan)
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    for i, kept in heads.items():
        assert pruned.blocks[i].attn.num_heads == len(kept)
        assert torch.equal(_bias_rows(pruned.blocks[i].attn), _bias_rows(m.blocks[i].attn)[list(kept)])
    assert torch.equal(_bias_rows(pruned.blocks[2].attn), _bias_rows(m.blocks[2].attn))  # head dims only
    counted = profile(pruned, data_config(m)["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    with torch.inference_mode():
        out = pruned(_x(1))
        torch.testing.assert_close(mask_model(m, plan)(_x(1)), out, atol=1e-4, rtol=0)
        assert not torch.allclose(out, m(_x(1)), atol=1e-3)  # a real cut, not the dense function


def test_a_pruned_model_exports_and_reloads_with_its_pruned_biases(tmp_path):
    arch, kw = VARIANTS["srelpos: one shared RelPosMlp"]
    m = convert_relpos(_model(arch, kw)).eval()
    loaded = LoadedModel.from_module(m, arch, {**SMALL, **kw})
    plan = PrunePlan(loaded.base, tuple(BlockPlan(i, heads=(i % 3,)) for i in range(loaded.base.depth)))
    pruned = apply_plan(copy.deepcopy(m), plan).eval()
    export_loaded(pruned, loaded, tmp_path / "out", plan=plan)
    back = load_exported(tmp_path / "out", device="cpu").model
    assert all(
        isinstance(b.attn.rel_pos, RelPosMlpBias) and b.attn.rel_pos.mlp.fc2.out_features == 1
        for b in back.blocks
    )
    with torch.inference_mode():
        torch.testing.assert_close(back(_x()), pruned(_x()), atol=1e-5, rtol=0)


def test_post_norm_relpos_blocks_are_refused_in_one_sentence():
    with pytest.raises(
        StudioError, match=r"^Block 0 is timm's post-norm ResPostRelPosBlock.*without '_rpn'"
    ) as e:
        create_vit("vit_relpos_small_patch16_rpn_224", **SMALL)
    assert "\n" not in str(e.value)


def test_another_bias_module_and_an_unconverted_model_are_refused_in_one_sentence():
    with torch.device("meta"):
        m = VisionTransformerRelPos(**{**SMALL, "depth": 2})
    m.blocks[1].attn.rel_pos = torch.nn.Linear(1, 1)  # a user's own bias module
    with pytest.raises(StudioError, match=r"^The relative position module of block 1's bias is a Linear; .*"):
        check(m)
    with torch.device("meta"):
        beit = _timm_meta(BEIT)
    with pytest.raises(StudioError, match=r"^This timm Beit is pruned rebuilt .* through the studio\.$"):
        check(beit)


def _timm_meta(arch: str) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, **SMALL)


@pytest.mark.parametrize("family", [n for n in FAMILIES.names() if "BEiT" in n or "relative-position" in n])
@pytest.mark.parametrize("method", ["p3b", "splora"])
def test_p3b_and_splora_refuse_no_unit_of_the_new_families(family, method):
    """Neither training method refuses a unit up front (their tiny jobs run in tests/test_families.py): P3B's
    gates and SPLoRA's masks zero whole heads, and the bias of a zeroed head adds nothing (its v is zero)."""
    f = FAMILIES.get(family)
    with torch.device("meta"):
        m = create_vit(f.example, **f.build_kwargs())
    assert load_methods().get(method).refused_units(m) == {}


def test_the_bias_tables_take_no_weight_decay_as_in_timms_beit():
    from studio.train import _param_groups

    m = create_vit(BEIT, **SMALL)
    decay, no_decay = _param_groups(m, 0.05)
    tables = {id(b.attn.rel_pos.relative_position_bias_table) for b in m.blocks}
    assert tables <= {id(p) for p in no_decay["params"]} and not tables & {id(p) for p in decay["params"]}
