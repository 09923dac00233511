"""Model families (issue 14): every supported timm ViT variant through every planning method, and every
unsupported one refused at load with one sentence — never a library's AttributeError or IndexError.

Random weights at 32 px, 3 blocks, so each case takes about a second.
"""

from __future__ import annotations

import copy
import random

import pytest
import timm
import torch

from studio.analysis.criteria import CalibrationBatches
from studio.bench import profile
from studio.errors import StudioError
from studio.export import export_loaded, load_exported
from studio.models import LoadedModel, create_vit, data_config, describe_base
from studio.prune import PruneRequest, load_methods, make_plan
from studio.prune.target import TOLERANCE
from studio.surgery import apply_plan, mask_model

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
# family / variant -> (timm architecture, constructor arguments)
FAMILIES = {
    "vit (cls token)": ("vit_tiny_patch16_224", SMALL),
    "deit distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "deit-iii (layer scale)": ("deit3_small_patch16_224", {**SMALL, "init_values": 1e-1}),
    "dinov2 (patch 14, layer scale)": (
        "vit_small_patch14_dinov2",
        {**SMALL, "img_size": 28, "patch_size": 14, "init_values": 1e-1},
    ),
    "clip (pre-norm)": ("vit_base_patch16_clip_224", {**SMALL, "pre_norm": True}),
    "average pooling + fc_norm": ("vit_tiny_patch16_224", {**SMALL, "global_pool": "avg", "fc_norm": True}),
    "register tokens": ("vit_tiny_patch16_224", {**SMALL, "reg_tokens": 2}),
    "qk-norm": ("vit_tiny_patch16_224", {**SMALL, "qk_norm": True}),
}
PLANNERS = [n for n in load_methods().names() if load_methods().get(n).fn is not None]


def _loaded(family: str) -> LoadedModel:
    arch, kw = FAMILIES[family]
    torch.manual_seed(0)
    m = create_vit(arch, **kw).eval()
    with torch.no_grad():  # some variants start with zero-init parts: give every unit a score of its own
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return LoadedModel(m, describe_base(m, arch, kw), data_config(m), [str(i) for i in range(5)], "cpu")


def _batches(loaded: LoadedModel, n: int = 64) -> CalibrationBatches:
    g = torch.Generator().manual_seed(0)
    size = loaded.data_config["input_size"]
    ds = torch.utils.data.TensorDataset(
        torch.randn(n, *size, generator=g), torch.randint(0, 5, (n,), generator=g)
    )
    return CalibrationBatches(ds, 2, 32, 0, torch.device("cpu"))


def _params(name: str, family: str) -> dict:
    method = load_methods().get(name)
    budget = method.budgets[0]
    params = {budget.option: budget.default}
    if name == "sls":
        params["embed"] = "none"
    if name == "isomorphic" and FAMILIES[family][1].get("qk_norm"):
        params["head_dim_ratio"] = 0.0  # head dims of a qk-norm model are refused (tested below)
    return params


@pytest.mark.parametrize("name", PLANNERS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_method_prunes_every_supported_family_exactly(family, name, tmp_path):
    loaded = _loaded(family)
    method = load_methods().get(name)
    params = _params(name, family)
    plan = make_plan(name, PruneRequest(loaded, params, _batches(loaded) if method.needs_data else []))
    budget = method.budgets[0]
    if budget.option == "target_macs":
        assert abs(plan.summary["macs_fraction"] / budget.default - 1) <= TOLERANCE + 0.02, plan.summary
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    counted = profile(pruned, loaded.data_config["input_size"])
    assert counted["params"] == plan.summary["params_after"] and counted["macs"] == plan.summary["macs_after"]
    x = torch.randn(4, *loaded.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = pruned(x)
        if plan.depth == plan.base.depth and plan.embed is None:
            # masking (zeroed units on the full model) computes what the physical pruning computes
            torch.testing.assert_close(
                mask_model(copy.deepcopy(loaded.model), plan)(x), out, atol=1e-4, rtol=0
            )
    folder = export_loaded(pruned, loaded, tmp_path / "export", plan=plan)
    back = load_exported(folder, device="cpu").model
    with torch.inference_mode():
        assert torch.equal(back(x), out)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_parity_for_every_family(family, tmp_path):
    from studio.export import export_onnx

    loaded = _loaded(family)
    plan = make_plan("magnitude", PruneRequest(loaded, {"target_macs": 0.5}))
    pruned = apply_plan(copy.deepcopy(loaded.model), plan).eval()
    out = export_onnx(pruned, tmp_path / "m.onnx", loaded.data_config["input_size"])
    assert out["checked"] and out["max_abs_diff"] <= 1e-4


REFUSED = {
    "parallel blocks": ("vit_small_patch16_18x2_224", {**SMALL, "depth": 2}, "ParallelThingsBlock"),
    "parallel scaling blocks": (
        "vit_medium_patch16_gap_256",
        {**SMALL, "block_fn": "ps"},
        "ParallelScalingBlock",
    ),
    "attention-pool head (SigLIP)": ("vit_base_patch16_siglip_224", SMALL, "attention-pool head"),
    "EVA-02 (RoPE, SwiGLU)": (
        "eva02_tiny_patch14_224",
        {"img_size": 28, "num_classes": 5},
        "not a Vision Transformer",
    ),
    "relative-position ViT": (
        "vit_srelpos_small_patch16_224",
        {"img_size": 32, "num_classes": 5},
        "not a Vision",
    ),
    "GLU MLP": ("vit_tiny_patch16_224", {**SMALL, "mlp_layer": "glu"}, "GluMlp"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_families_are_refused_at_load_naming_the_module(case):
    arch, kw, says = REFUSED[case]
    kw = dict(kw)
    if kw.get("block_fn") == "ps":
        from timm.models.vision_transformer import ParallelScalingBlock

        kw["block_fn"] = ParallelScalingBlock
    if kw.get("mlp_layer") == "glu":
        from timm.layers import GluMlp

        kw["mlp_layer"] = GluMlp
    with pytest.raises(StudioError, match=says):
        create_vit(arch, **kw)


def test_isomorphic_refuses_head_dims_of_a_qk_norm_model_and_names_the_fix():
    loaded = _loaded("qk-norm")
    with pytest.raises(StudioError, match="--head-dim-ratio 0"):
        make_plan("isomorphic", PruneRequest(loaded, {"target_macs": 0.5}, _batches(loaded)))


def test_a_sample_of_timm_vits_loads_or_is_refused_with_a_studio_error():
    """At least 40 of timm's vit_*/deit*/eva* architectures: built (on the meta device: no memory) or refused
    with one StudioError sentence, never another exception type."""
    names = timm.list_models("vit_*") + timm.list_models("deit*") + timm.list_models("eva*")
    random.Random(0).shuffle(names)
    loaded, refused = 0, 0
    for name in names[:48]:
        try:
            with torch.device("meta"):
                create_vit(name, num_classes=5)
            loaded += 1
        except StudioError as e:
            assert "\n" not in str(e) and len(str(e)) < 400
            refused += 1
    assert loaded + refused == 48 and loaded >= 10 and refused >= 5
