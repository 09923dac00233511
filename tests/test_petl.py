"""PETL: LoRA adapters on a frozen ViT train through studio.train.fit, are seen by the feature bank, survive an
SLS depth cut and fuse back into a plain timm model."""

from __future__ import annotations

import copy

import pytest
import torch

from studio.errors import StudioError
from studio.petl import (
    ADAPTER_TRAINABLE,
    LoRALinear,
    LoRASpec,
    add_lora,
    fuse_lora,
    has_lora,
    lora_parameters,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapters_change_nothing_and_only_they_train(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tiny_vit(x)
    model = copy.deepcopy(tiny_vit)
    names = add_lora(model, LoRASpec(rank=4, targets=("qkv", "proj", "fc1", "fc2")))
    assert len(names) == 3 * 4 and has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert lora_parameters(model) == sum(
        4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert add_lora(model, LoRASpec(rank=4)) == []  # already adapted: nothing added twice


def test_fused_model_is_plain_timm_and_computes_the_same(tiny_vit):
    from studio.models import create_vit

    model = copy.deepcopy(tiny_vit)
    add_lora(model, LoRASpec(rank=2))
    _perturb(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - tiny_vit(x)).abs().max() > 1e-3  # the adapters do something
        fused = fuse_lora(model)
        torch.testing.assert_close(fused(x), adapted, rtol=1e-5, atol=1e-5)
    assert not has_lora(fused)
    fresh = create_vit("vit_tiny_patch16_224", **TINY)
    fresh.load_state_dict(fused.state_dict(), strict=True)  # the export format stays plain timm


def test_fit_trains_adapters_and_head_only(tiny_vit):
    from studio.data import TensorData
    from studio.train import TrainSpec, fit

    model = copy.deepcopy(tiny_vit)
    add_lora(model, LoRASpec(rank=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(32, 3, 32, 32, generator=g), torch.arange(32) % 5)
    fit(model, data, None, TrainSpec(epochs=1, batch_size=16, trainable=ADAPTER_TRAINABLE, select="last"))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.endswith("lora_B") for k in changed) and "head.weight" in changed
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("head.") for k in changed)


def test_feature_bank_sees_adapted_blocks_and_depth_cut_keeps_adapters(tiny_vit):
    from studio.data import TensorData
    from studio.features import extract
    from studio.models import describe_base
    from studio.prune.sls import sls_plan
    from studio.surgery import apply_plan

    model = copy.deepcopy(tiny_vit)
    add_lora(model, LoRASpec(rank=2))
    _perturb(model, 1)
    data = TensorData(torch.randn(8, 3, 32, 32), torch.arange(8) % 5)
    plain, adapted = extract(tiny_vit, data), extract(model, data)
    assert (plain.cls[-1] - adapted.cls[-1]).abs().max() > 1e-3
    cut = apply_plan(copy.deepcopy(model), sls_plan(describe_base(model, "vit_tiny_patch16_224", TINY), 2))
    assert len(cut.blocks) == 2 and isinstance(cut.blocks[1].attn.qkv, LoRALinear)
    x = data.images
    with torch.no_grad():
        ref = cut(x)
        torch.testing.assert_close(fuse_lora(copy.deepcopy(cut))(x), ref, rtol=1e-5, atol=1e-5)
        # block outputs captured by the bank equal the cut model's (the cut reuses blocks as they are)
        h = cut.blocks(cut._pos_embed(cut.patch_embed(x)))
    torch.testing.assert_close(h[:, 0], adapted.cls[1], rtol=1e-5, atol=1e-5)


def test_bad_specs_are_refused(tiny_vit):
    with pytest.raises(StudioError, match="rank"):
        LoRASpec(rank=0).validate()
    with pytest.raises(StudioError, match="target"):
        LoRASpec(targets=("head",)).validate()
    with pytest.raises(StudioError, match="out of range"):
        add_lora(copy.deepcopy(tiny_vit), LoRASpec(blocks=(7,)))


def test_width_surgery_refuses_unfused_lora_but_depth_cut_works():
    from studio.models import create_vit, describe_base
    from studio.petl import add_lora
    from studio.plan import BlockPlan, PrunePlan
    from studio.surgery import apply_plan

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    model = create_vit("vit_tiny_patch16_224", **kw)
    base = describe_base(model, "vit_tiny_patch16_224", kw)
    add_lora(model)
    heads = PrunePlan.dense(base).with_(blocks=(BlockPlan(0, heads=(0, 1)), BlockPlan(1), BlockPlan(2)))
    with pytest.raises(StudioError, match="fuse them first"):
        apply_plan(copy.deepcopy(model), heads)
    cut = PrunePlan.dense(base).with_(blocks=(BlockPlan(0), BlockPlan(1)))
    assert len(apply_plan(model, cut).blocks) == 2


# ------------------------------------------------------------------------------------------------ Convpass
def _convpass_model(tiny_vit, spec=None, seed: int = 0):
    from studio.petl import ConvpassSpec, add_convpass

    model = copy.deepcopy(tiny_vit)
    assert add_convpass(model, spec or ConvpassSpec()) == len(model.blocks)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking adapters: a non-zero up-projection
        for n, p in model.named_parameters():
            if ".adapter_" in f".{n}":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_fresh_convpass_changes_nothing_and_only_adapters_train(tiny_vit):
    from studio.petl import ConvpassBlock, ConvpassSpec, add_convpass, has_adapters

    x = torch.randn(2, 3, 32, 32)
    model = copy.deepcopy(tiny_vit)
    add_convpass(model, ConvpassSpec(dim=4))
    assert all(isinstance(b, ConvpassBlock) for b in model.blocks) and has_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tiny_vit(x), rtol=0, atol=0)  # zero up-projection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_attn." in n or ".adapter_mlp." in n for n in trainable)
    assert add_convpass(model, ConvpassSpec(dim=4)) == 0  # already adapted: nothing added twice


def test_convpass_is_the_papers_bypass(tiny_vit):
    """x + attn(n1 x) + s·C(n1 x), with C = up(drop(qgelu(conv3x3(qgelu(down(h)))))) on the 4x4 patch grid and the
    class token through the same conv as a 1x1 image (only the kernel's centre)."""
    import torch.nn.functional as F

    from studio.petl import ConvpassSpec

    model = _convpass_model(tiny_vit, ConvpassSpec(dim=4, scale=3.0))
    blk = model.blocks[0]
    x = torch.randn(2, 17, 48)

    def qgelu(t):
        return t * torch.sigmoid(1.702 * t)

    def bypass(c, h):
        z = qgelu(F.linear(h, c.adapter_down.weight, c.adapter_down.bias))  # (2, 17, 4)
        w, b = c.adapter_conv.weight, c.adapter_conv.bias
        out = torch.empty_like(z)
        grid = z[:, 1:].reshape(2, 4, 4, 4)  # (B, row, col, channel)
        padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
        for r in range(4):
            for q in range(4):
                patch = padded[:, r : r + 3, q : q + 3, :]  # (B, 3, 3, C_in)
                out[:, 1 + 4 * r + q] = torch.einsum("bijc,ocij->bo", patch, w) + b
        out[:, 0] = z[:, 0] @ w[:, :, 1, 1].T + b
        return F.linear(qgelu(out), c.adapter_up.weight, c.adapter_up.bias)

    with torch.no_grad():
        h = blk.norm1(x)
        want = x + blk.attn(h) + 3.0 * bypass(blk.adapter_attn, h)
        want = want + blk.mlp(blk.norm2(want)) + 3.0 * bypass(blk.adapter_mlp, blk.norm2(want))
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)


def test_convpass_export_reloads_with_identical_logits_and_records_the_adapter(tiny_vit, tmp_path):
    from studio.export import export, load_exported, read_manifest
    from studio.models import describe_base
    from studio.petl import ConvpassSpec, has_convpass

    model = _convpass_model(tiny_vit, ConvpassSpec(dim=4, scale=0.5))
    base = describe_base(tiny_vit, "vit_tiny_patch16_224", TINY)
    folder = export(model, base, tmp_path / "export")
    manifest = read_manifest(folder)
    assert manifest["adapter"] == {
        "kind": "convpass",
        "dim": 4,
        "scale": 0.5,
        "dropout": 0.1,
        "xavier_init": False,
    }
    again = load_exported(folder, device="cpu")
    assert has_convpass(again.model)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(again.model(x), model(x))
        assert not torch.allclose(model(x), tiny_vit(x))  # the adapters do something


def test_convpass_refuses_width_pruning_but_cuts_depth(tiny_vit):
    from studio.models import describe_base
    from studio.plan import PrunePlan
    from studio.prune.sls import sls_plan
    from studio.surgery import apply_plan

    model = _convpass_model(tiny_vit)
    base = describe_base(tiny_vit, "vit_tiny_patch16_224", TINY)
    cut = apply_plan(copy.deepcopy(model), sls_plan(base, 2))
    assert len(cut.blocks) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the cut model is the first two adapted blocks, then the reused norm and head
        t = model.patch_embed(x)
        t = model.norm_pre(model._pos_embed(t))
        t = model.blocks[1](model.blocks[0](t))
        torch.testing.assert_close(cut(x), model.forward_head(model.norm(t)))
    narrow = PrunePlan.dense(base).with_(embed=tuple(range(24)))
    with pytest.raises(StudioError, match="Convpass adapters, which read and write every embedding channel"):
        apply_plan(copy.deepcopy(model), narrow)


def test_bad_convpass_specs_are_refused(tiny_vit):
    from studio.petl import ConvpassSpec, add_convpass

    for bad, text in [
        (ConvpassSpec(dim=0), "width must be at least 1"),
        (ConvpassSpec(scale=0.0), "scale must be a positive number"),
        (ConvpassSpec(dropout=1.0), r"dropout must lie in \[0, 1\)"),
    ]:
        with pytest.raises(StudioError, match=text):
            add_convpass(copy.deepcopy(tiny_vit), bad)
    lora = copy.deepcopy(tiny_vit)
    add_lora(lora, LoRASpec(rank=2))
    with pytest.raises(StudioError, match="LoRA adapters; fuse them"):
        add_convpass(lora)


def test_a_convpass_tuned_checkpoint_loads_with_its_scale_and_only_its_depth_is_prunable(tiny_vit, tmp_path):
    from safetensors.torch import save_file

    from studio.load import load_model
    from studio.models import ModelSpec
    from studio.petl import ConvpassSpec, has_convpass
    from studio.prune import load_methods

    model = _convpass_model(tiny_vit, ConvpassSpec(dim=4, scale=2.0))
    path = tmp_path / "petl.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    spec = ModelSpec(str(path), arch="vit_tiny_patch16_224", kwargs=TINY, device="cpu")
    with pytest.raises(StudioError, match=r"carries Convpass adapters .*--convpass-scale S"):
        load_model(spec)
    loaded = load_model(spec.with_(convpass_scale=2.0))
    assert has_convpass(loaded.model) and loaded.model.blocks[0].convpass.dim == 4
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()}, str(plain))
    with pytest.raises(StudioError, match="carries no Convpass adapters"):
        load_model(ModelSpec(str(plain), arch="vit_tiny_patch16_224", kwargs=TINY, convpass_scale=2.0))
    methods = load_methods()
    with pytest.raises(StudioError, match="Convpass adapters, which read and write"):
        methods.get("magnitude").refuse(loaded.model, {"target_macs": 0.5})
    assert "blocks" not in methods.get("sls").refused_units(loaded.model)
