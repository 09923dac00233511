"""MACs counted at the dispatcher match the closed-form ViT formula; throughput is measured sanely."""

from __future__ import annotations

import pytest

from studio.bench import count_macs, count_params, measure_throughput
from studio.models import create_vit


def vit_macs(n_tokens: int, dim: int, depth: int, mlp: int, patches: int, patch: int, classes: int) -> int:
    """Per block: qkv + proj + fc1 + fc2 linears, plus QK^T and AV (2·N²·D); patch embedding; head."""
    block = n_tokens * (3 * dim * dim + dim * dim + 2 * dim * mlp) + 2 * n_tokens * n_tokens * dim
    return depth * block + patches * 3 * patch * patch * dim + dim * classes


@pytest.mark.parametrize(
    ("arch", "kw", "size"),
    [
        ("deit_tiny_patch16_224", {}, 224),
        (
            "vit_tiny_patch16_224",
            dict(img_size=32, patch_size=8, embed_dim=96, depth=12, num_heads=3, num_classes=10),
            32,
        ),
    ],
)
def test_macs_match_formula_within_1_percent(arch, kw, size):
    m = create_vit(arch, **kw).eval()
    patch = m.patch_embed.patch_size[0]
    patches = (size // patch) ** 2
    expected = vit_macs(
        patches + 1,
        m.embed_dim,
        len(m.blocks),
        m.blocks[0].mlp.fc1.out_features,
        patches,
        patch,
        m.num_classes,
    )
    macs = count_macs(m, (3, size, size))
    assert abs(macs["total"] - expected) / expected < 0.01
    assert macs["attention"] == len(m.blocks) * 2 * (patches + 1) ** 2 * m.embed_dim  # SDPA is counted
    assert macs["total"] == macs["attention"] + macs["linear"] + macs["conv"] + macs["other"]


def test_fused_attention_flag_is_restored(tiny_vit):
    flags = [b.attn.fused_attn for b in tiny_vit.blocks]
    count_macs(tiny_vit, (3, 32, 32))
    assert [b.attn.fused_attn for b in tiny_vit.blocks] == flags


def test_throughput_is_positive_and_recorded(tiny_vit):
    r = measure_throughput(tiny_vit, (3, 32, 32), batch_size=4, warmup=1, repeats=3)
    assert r.images_per_s > 0 and r.latency_ms > 0 and r.latency_ms_p90 >= r.latency_ms
    assert r.device == "cpu" and r.dtype == "float32" and r.repeats == 3
    assert count_params(tiny_vit) == sum(p.numel() for p in tiny_vit.parameters())


def test_gpu_suite_reduced_form_runs_every_step_on_cpu():
    """The GPU suite's code paths (feature bank, importance, three plans, paired throughput) on a tiny model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--reduced", "--device", "cpu"])
    steps = [r["step"] for r in rows]
    assert steps[0].startswith("feature bank") and steps[1].startswith("importance")
    for method in mod.METHODS:
        (plan,) = [r for r in rows if r["step"] == f"{method} plan at 50 % MACs"]
        kept = float(plan["note"].split()[-1].rstrip("%")) / 100
        assert kept == pytest.approx(0.5, abs=0.03)
        assert sum(r["step"].startswith(f"throughput {method}") for r in rows) == 2
    assert all(r["peak_gib"] is None or r["peak_gib"] > 0 for r in rows)
    assert rows[-1]["note"].startswith("skipped") or rows[-1]["note"] == "ok"
