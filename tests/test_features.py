"""The feature bank captures what the model computes."""

from __future__ import annotations

import copy

import torch

from studio.data import TensorData
from studio.features import cached_extract, extract


def test_last_block_cls_is_prenorm_cls_token(tiny_vit):
    x = torch.randn(10, 3, 32, 32)
    data = TensorData(x, torch.arange(10) % 5)
    bank = extract(tiny_vit, data, batch_size=4, with_inputs=True)
    assert bank.cls.shape == (3, 10, 48) and bank.labels.tolist() == (torch.arange(10) % 5).tolist()
    with torch.inference_mode():
        tokens = tiny_vit.blocks(tiny_vit.norm_pre(tiny_vit._pos_embed(tiny_vit.patch_embed(x))))
    assert torch.allclose(bank.cls[-1], tokens[:, 0], atol=1e-6)
    assert torch.allclose(bank.patch_mean[-1], tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(bank.inputs_cls[1], bank.cls[0])  # block 1 reads what block 0 wrote


def test_cache_hit_returns_same_bank_and_misses_on_new_weights(tiny_vit, tmp_path):
    data = TensorData(torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long))
    a = cached_extract(tiny_vit, data, {"data": "x"})
    b = cached_extract(tiny_vit, data, {"data": "x"})
    assert torch.equal(a.cls, b.cls)
    with torch.no_grad():
        tiny_vit.blocks[0].mlp.fc2.bias += 1.0
    c = cached_extract(tiny_vit, data, {"data": "x"})
    assert not torch.equal(a.cls[0], c.cls[0])


def test_fingerprint_tells_apart_models_whose_weights_are_permutations():
    """Reordering heads keeps every per-tensor sum: the cache key must still differ (issue 13)."""
    from studio.features import model_fingerprint
    from studio.models import create_vit

    torch.manual_seed(0)
    a = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    b = copy.deepcopy(a)
    with torch.no_grad():
        w = b.blocks[0].attn.proj.weight
        w.copy_(w.flip(1))  # same sums and shapes, other model
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(copy.deepcopy(a))


def test_the_bank_keeps_only_the_tokens_it_captures_not_whole_block_outputs(tiny_vit, monkeypatch):
    """Held per batch until the end, a slice that is a view kept each block's whole output alive (9 GB for
    1,000 images on ViT-B): every captured piece must own just its own bytes."""
    held = []
    real_cat = torch.cat

    def cat(ts, *a, **kw):
        held.extend(ts)
        return real_cat(ts, *a, **kw)

    monkeypatch.setattr(torch, "cat", cat)
    extract(tiny_vit, TensorData(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)), batch_size=4)
    captured = [t for t in held if t.dim() == 2]  # per batch: (images, embed) CLS tokens and patch means
    assert len(captured) == 2 * 2 * len(tiny_vit.blocks)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in captured)
