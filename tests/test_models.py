"""Model loading from every checkpoint format, and the clear errors for each bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.errors import StudioError
from studio.load import load_model
from studio.models import ModelSpec, create_vit
from tests.conftest import TINY_KWARGS

ARCH = "vit_tiny_patch16_224"
KW = {k: v for k, v in TINY_KWARGS.items() if k not in ("num_classes", "img_size")}
X = torch.randn(2, 3, 32, 32)


def spec(path, **kw):
    return ModelSpec(str(path), arch=ARCH, img_size=32, kwargs=KW, device="cpu", **kw)


def same_logits(a, b):
    with torch.inference_mode():
        return torch.equal(a(X), b(X))


def test_safetensors_roundtrip(tiny_vit, tmp_path):
    save_file(tiny_vit.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = load_model(spec(tmp_path / "m.safetensors"))
    assert loaded.base.num_classes == 5  # inferred from the head
    assert same_logits(loaded.model, tiny_vit)


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_pth_state_dict_nested_keys(tiny_vit, tmp_path, wrap):
    sd = tiny_vit.state_dict()
    torch.save(sd if wrap is None else {wrap: sd, "epoch": 3}, tmp_path / "m.pth")
    assert same_logits(load_model(spec(tmp_path / "m.pth")).model, tiny_vit)


def test_ddp_prefix_is_stripped(tiny_vit, tmp_path):
    torch.save({f"module.{k}": v for k, v in tiny_vit.state_dict().items()}, tmp_path / "m.pt")
    assert same_logits(load_model(spec(tmp_path / "m.pt")).model, tiny_vit)


def test_google_npz_loads_through_timm(tmp_path):
    """A Google-format .npz (as the SLS seed's ViT-B_16.npz) is read by timm's converter."""
    torch.manual_seed(0)
    m = create_vit(ARCH, **TINY_KWARGS)
    w = {
        "embedding/kernel": m.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": m.patch_embed.proj.bias,
        "cls": m.cls_token,
        "Transformer/posembed_input/pos_embedding": m.pos_embed,
        "Transformer/encoder_norm/scale": m.norm.weight,
        "Transformer/encoder_norm/bias": m.norm.bias,
        "head/kernel": m.head.weight.t(),
        "head/bias": m.head.bias,
    }
    d, h = m.embed_dim, m.blocks[0].attn.num_heads
    for i, b in enumerate(m.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = b.norm1.weight, b.norm1.bias
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = b.norm2.weight, b.norm2.bias
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * d, (j + 1) * d)
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = (
                b.attn.qkv.weight[rows].t().reshape(d, h, -1)
            )
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = b.attn.qkv.bias[rows].reshape(h, -1)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = b.attn.proj.weight.t().reshape(h, -1, d)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = b.attn.proj.bias
        for j, fc in enumerate((b.mlp.fc1, b.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{j}/kernel"], w[p + f"MlpBlock_3/Dense_{j}/bias"] = (
                fc.weight.t(),
                fc.bias,
            )
    np.savez(tmp_path / "ViT.npz", **{k: v.detach().numpy() for k, v in w.items()})
    loaded = load_model(spec(tmp_path / "ViT.npz", num_classes=5))
    with torch.inference_mode():
        assert torch.allclose(loaded.model(X), m.eval()(X), atol=1e-5)


def test_demo_loads_with_data_config(demo_loaded):
    assert demo_loaded.base.depth == 12 and demo_loaded.base.embed_dim == 96
    assert demo_loaded.data_config["input_size"] == [3, 32, 32]
    assert demo_loaded.metrics["test_top1"] >= 0.95


@pytest.mark.parametrize(
    ("make", "kw", "needle"),
    [
        (lambda p, m: torch.save({"model": m, "x": 1}, p / "m.pth"), {}, "pickled Python objects"),
        (lambda p, m: (p / "m.pth").write_bytes(b"\x80\x04garbage"), {}, "damaged"),
        (lambda p, m: (p / "m.safetensors").write_bytes(b"\x00" * 20), {}, "not a readable safetensors"),
        (
            lambda p, m: save_file(m.state_dict(), str(p / "m.safetensors")),
            {"num_classes": 7},
            "--num-classes 5",
        ),
        (
            lambda p, m: save_file(
                {k: v for k, v in m.state_dict().items() if "blocks.2" not in k}, str(p / "m.safetensors")
            ),
            {},
            "missing keys",
        ),
        (
            lambda p, m: save_file(m.state_dict(), str(p / "m.safetensors")),
            {"arch": "resnet18"},
            "not a Vision Transformer",
        ),
        (
            lambda p, m: save_file(m.state_dict(), str(p / "m.safetensors")),
            {"arch": "vit_nope_xyz"},
            "no architecture",
        ),
        (lambda p, m: save_file(m.state_dict(), str(p / "m.safetensors")), {"arch": None}, "--arch"),
        (lambda p, m: (p / "m.onnx").write_bytes(b"x"), {}, "Unsupported checkpoint type"),
    ],
)
def test_bad_checkpoints_give_clear_errors(tiny_vit, tmp_path, make, kw, needle):
    make(tmp_path, tiny_vit)
    path = next(p for p in tmp_path.iterdir())
    s = spec(path)
    if "arch" in kw:
        s = s.with_(arch=kw.pop("arch"))
    with pytest.raises(StudioError, match=needle) as e:
        load_model(s.with_(**kw))
    assert "Traceback" not in str(e.value)


def test_pickled_payload_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open('PWNED', 'w').write('x')",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Boom()}))
    with pytest.raises(StudioError, match="refused because loading it can run code"):
        load_model(spec(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()


def test_reset_head_for_new_class_count(tiny_vit, tmp_path):
    save_file(tiny_vit.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = load_model(spec(tmp_path / "m.safetensors", num_classes=7, reset_head=True))
    assert loaded.model.head.out_features == 7 and loaded.base.num_classes == 7
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, tiny_vit.blocks[0].attn.qkv.weight)


def test_unknown_model_source():
    with pytest.raises(StudioError, match="not found"):
        load_model(ModelSpec("/no/such/file.pth"))


def test_reset_head_export_reloads_at_the_new_size(tmp_path):
    from studio.export import export_loaded, load_exported

    loaded = load_model(ModelSpec("demo-backbone", num_classes=10, reset_head=True, device="cpu"))
    assert loaded.base.kwargs["num_classes"] == 10  # the rebuild kwargs follow the new head
    export_loaded(loaded.model, loaded, tmp_path / "e", plan=None)
    again = load_exported(tmp_path / "e")
    assert again.model.head.out_features == 10
    with torch.inference_mode():
        assert torch.equal(again.model(X), loaded.model(X))
