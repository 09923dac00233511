"""Importing whole pickled pruned models (Torch-Pruning / Isomorphic outputs) through the allow-list."""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import load_file
from torch import nn

from studio.bench import count_macs
from studio.errors import StudioError
from studio.export import MANIFEST, load_exported, read_manifest
from studio.importer import ALLOWED_NAMES, import_pruned, load_pickled_module, read_widths
from studio.load import load_model
from studio.models import ModelSpec, create_vit

ROOT = Path(__file__).resolve().parent.parent
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def tp_pruned(
    arch: str = "vit_tiny_patch16_224", *, update: bool = True, fused: bool = True, **kw
) -> nn.Module:
    """A tiny timm ViT pruned by torch-pruning itself, as Isomorphic's ``prune.py`` calls it (heads, head dims,
    MLP, embedding), with the attention bookkeeping set afterwards the way its ViT example does."""
    torch.manual_seed(0)
    m = create_vit(arch, **{**KW, **kw}).eval()
    x = torch.randn(2, 3, *m.patch_embed.img_size)
    qkvs = [b.attn.qkv for b in m.blocks]
    num_heads = {b.attn.qkv: b.attn.num_heads for b in m.blocks}
    heads = [h for h in (m.head, getattr(m, "head_dist", None)) if h is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            m,
            x,
            importance=tp.importance.GroupMagnitudeImportance(),
            global_pruning=True,
            isomorphic=True,
            pruning_ratio=0.25,
            pruning_ratio_dict={tuple(qkvs): 0.25},
            ignored_layers=heads,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=True,
            head_pruning_ratio=0.34,
        )
        pruner.step()
    for b in m.blocks:
        a = b.attn
        a.fused_attn = fused
        if update:
            a.num_heads = num_heads[a.qkv]
            a.head_dim = a.qkv.out_features // (3 * a.num_heads)
            a.attn_dim = a.num_heads * a.head_dim
    return m


X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_torch_pruning_module_imports_with_identical_logits_in_a_fresh_process(tmp_path, arch):
    m = tp_pruned(arch)
    w = read_widths(m)
    assert min(w.heads) < 3 and min(w.head_dims) < 16 and w.embed < 48 and max(w.mlp) < 192  # really pruned
    with torch.inference_mode():
        ref = m(X)
    torch.save(m, tmp_path / "pruned.pth")  # the whole module, as the published models are
    torch.save(X, tmp_path / "x.pt")
    out = tmp_path / "export"
    argv = ["import", str(tmp_path / "pruned.pth"), "--arch", arch, "--out", str(out), "--json"]
    cli = subprocess.run(
        [sys.executable, "-m", "studio", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert cli.returncode == 0, cli.stderr
    res = json.loads(cli.stdout)
    assert res["arch"] == arch and res["base_from"] == "given" and res["parity_max_abs_diff"] == 0.0
    assert res["widths"]["embed"] == w.embed
    # the plan keeps positions 0..k-1 of the compacted weights, block by block as torch-pruning left them
    plan = res["plan"]
    assert plan["method"] == "imported" and plan["params"]["compacted"] is True
    assert plan["embed"] == list(range(w.embed))
    for b, h, d, n in zip(plan["blocks"], w.heads, w.head_dims, w.mlp):
        assert (b["heads"] or [0, 1, 2]) == list(range(h)) and (b["head_dims"] or list(range(16))) == list(
            range(d)
        )
        assert (b["mlp"] or list(range(192))) == list(range(n))
    manifest = read_manifest(out)
    assert manifest["integrity"]["algorithm"] == "sha256" and manifest["imported"]["sha256"] == res["sha256"]
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from studio.export import load_exported\n"
        "m = load_exported(sys.argv[2], device='cpu')\n"
        "with torch.inference_mode():\n"
        "    save_file({'y': m.model(torch.load(sys.argv[1], weights_only=True))}, sys.argv[3])\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), str(out), str(tmp_path / "y.st")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert torch.equal(load_file(str(tmp_path / "y.st"))["y"], ref)
    # and it is an export like any other: the front door loads it, its MACs are the plan's
    loaded = load_model(ModelSpec(str(out), device="cpu"))
    assert loaded.plan is not None and loaded.plan.method == "imported"
    assert count_macs(loaded.model, loaded.data_config["input_size"])["total"] == res["summary"]["macs_after"]


def test_unfused_module_with_the_base_temperature_is_folded_into_q(tmp_path):
    """A module that runs its explicit attention with the base ``1/sqrt(d)`` left in ``attn.scale`` (timm never
    updates it after head-dim pruning) is imported computing the same function: ``scale_policy`` keep."""
    m = tp_pruned(fused=False)
    assert all(b.attn.scale == 16**-0.5 for b in m.blocks)
    with torch.inference_mode():
        ref = m(X)
    torch.save(m, tmp_path / "pruned.pth")
    res = import_pruned(tmp_path / "pruned.pth", tmp_path / "export")
    assert res.base_from == "recorded" and res.plan.scale_policy == "keep"  # arch and kwargs from the module
    with torch.inference_mode():
        got = load_exported(tmp_path / "export", device="cpu").model(X)
    assert torch.allclose(got, ref, atol=1e-5) and res.parity_max_abs_diff < 1e-5


def test_the_base_is_detected_by_its_sizes_without_arch_or_recorded_config(tmp_path):
    m = tp_pruned("deit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3, patch_size=16)
    m.pretrained_cfg = {}  # as an old pickle without timm's recorded config
    del m._model_args
    torch.save(m, tmp_path / "pruned.pth")
    res = import_pruned(tmp_path / "pruned.pth", tmp_path / "export")
    base = res.plan.base
    assert res.base_from == "detected" and base.embed_dim == 192 and base.num_heads == (3,) * 12
    assert base.arch in ("deit_tiny_patch16_224", "vit_tiny_patch16_224") and res.parity_max_abs_diff == 0.0


class _Evil:
    """Unpickling this would run a shell command creating a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


class _Custom(nn.Module):
    """A module class outside the allow-list (its code is not timm's or torch's)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_with_another_class_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    payloads = {
        "alone": _Evil(marker),
        "beside a model": {"model": tp_pruned(), "extra": _Evil(marker)},
        "inside a model": tp_pruned(),
    }
    payloads["inside a model"].blocks[0].attn.note = _Evil(marker)
    for what, obj in payloads.items():
        path = tmp_path / f"{what}.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        if what == "alone" and legacy:  # and a raw pickle.dumps (protocol 5: STACK_GLOBAL) named .pth
            path.write_bytes(pickle.dumps(obj, protocol=5))
        with pytest.raises(StudioError) as e:
            import_pruned(path, tmp_path / "out")
        msg = str(e.value)
        assert "posix.system" in msg and "nothing in it was run" in msg, (what, msg)
        assert msg.count(". ") == 0 and msg.endswith("."), msg  # one sentence
        assert not marker.exists(), f"the payload {what} ran"
        assert not (tmp_path / "out").exists()
    if legacy:  # a clean whole module in the legacy format carries its source code: refused, saying why
        torch.save(tp_pruned(), tmp_path / "clean.pth", _use_new_zipfile_serialization=False)
        with pytest.raises(StudioError, match=r"legacy \(pre-1\.6\) format"):
            import_pruned(tmp_path / "clean.pth", tmp_path / "out")
    # the CLI says it in one line, exit 2
    cli = subprocess.run(
        [sys.executable, "-m", "studio", "import", str(tmp_path / "alone.pth"), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert cli.returncode == 2 and "posix.system" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_a_module_class_outside_the_allow_list_is_named(tmp_path):
    torch.save(_Custom(), tmp_path / "custom.pth")
    with pytest.raises(
        StudioError, match=r"holds test_importer\._Custom|holds tests\.test_importer\._Custom"
    ):
        load_pickled_module(tmp_path / "custom.pth")
    torch.save(tp_pruned().state_dict(), tmp_path / "sd.pth")  # allowed content, but not a whole module
    with pytest.raises(StudioError, match="holds a OrderedDict, not a whole timm VisionTransformer"):
        load_pickled_module(tmp_path / "sd.pth")


def test_stale_head_bookkeeping_and_hooks_are_refused(tmp_path):
    torch.save(tp_pruned(update=False), tmp_path / "stale.pth")
    with pytest.raises(StudioError, match=r"set attn\.num_heads and attn\.head_dim"):
        import_pruned(tmp_path / "stale.pth", tmp_path / "out")
    m = tp_pruned()
    m.blocks[1].register_forward_hook(nn.Identity())
    torch.save(m, tmp_path / "hooked.pth")
    with pytest.raises(StudioError, match=r"'blocks\.1' carries hooks"):
        import_pruned(tmp_path / "hooked.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_it_cannot_come_from_is_refused_naming_what_does_not_fit(tmp_path):
    torch.save(tp_pruned(), tmp_path / "pruned.pth")
    with pytest.raises(StudioError, match="has 3 blocks but vit_small_patch16_224 has 12"):
        import_pruned(tmp_path / "pruned.pth", tmp_path / "out", arch="vit_small_patch16_224")
    narrow = {**KW, "embed_dim": 24}  # 8-wide heads: narrower than the 11-13 dims the model kept
    with pytest.raises(
        StudioError, match=r"keeps 1\d head dims in block 0 where vit_tiny_patch16_224 has only 8"
    ):
        import_pruned(tmp_path / "pruned.pth", tmp_path / "out", arch="vit_tiny_patch16_224", kwargs=narrow)
    assert not (tmp_path / "out").exists()


def test_the_allow_list_covers_the_vit_family_and_does_not_outlive_the_import(tmp_path):
    with torch.device("meta"):
        models = [
            create_vit("vit_tiny_patch16_224", init_values=1e-5, drop_path_rate=0.1, weight_init="skip"),
            create_vit("deit_tiny_distilled_patch16_224", weight_init="skip"),
        ]
    used = {f"{type(x).__module__}.{type(x).__qualname__}" for m in models for x in m.modules()}
    assert used <= ALLOWED_NAMES
    assert not any(n.startswith(("os.", "posix.", "builtins.", "subprocess.")) for n in ALLOWED_NAMES)
    # torch keeps the allow-list in a set-backed registry: its order is not stable, its contents are
    before = collections.Counter(map(repr, torch.serialization.get_safe_globals()))
    torch.save(tp_pruned(), tmp_path / "pruned.pth")
    import_pruned(tmp_path / "pruned.pth", tmp_path / "export")
    assert collections.Counter(map(repr, torch.serialization.get_safe_globals())) == before
    # so the ordinary checkpoint reader still refuses a whole pickled module
    with pytest.raises(StudioError, match="pickled Python objects"):
        load_model(
            ModelSpec(str(tmp_path / "pruned.pth"), arch="vit_tiny_patch16_224", kwargs=KW, device="cpu")
        )
    assert (tmp_path / "export" / MANIFEST).exists()
