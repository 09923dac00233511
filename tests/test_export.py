"""Pickle-free export: a fresh process reloads identical logits; pickles and plans that do not fit are refused."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.export import MANIFEST, WEIGHTS, export, export_onnx, load_exported
from studio.models import create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.surgery import apply_plan

ROOT = Path(__file__).resolve().parent.parent
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pruned_export(tmp_path: Path, arch: str = "deit_tiny_distilled_patch16_224"):
    torch.manual_seed(0)
    model = create_vit(arch, **KW).eval()
    base = describe_base(model, arch, KW)
    plan = PrunePlan(
        base,
        (
            BlockPlan(0, heads=(0, 2), head_dims=tuple(range(8)), attn_in=tuple(range(0, 48, 4))),
            BlockPlan(2, mlp=tuple(range(50)), mlp_out=(2, 4, 6)),
        ),
        embed=tuple(range(0, 48, 2)),
    )
    pruned = apply_plan(copy.deepcopy(model), plan)
    folder = export(
        pruned,
        base,
        tmp_path / "export",
        plan=plan,
        class_names=list("abcde"),
        data_config={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    return pruned, folder


def test_fresh_process_reload_gives_identical_logits(tmp_path):
    archs = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
    exported = [pruned_export(tmp_path / a, a) for a in archs]
    torch.save(X, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from studio.export import load_exported\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "for i, folder in enumerate(sys.argv[2:]):\n"
        "    m = load_exported(folder, device='cpu')\n"
        "    with torch.inference_mode():\n"
        "        save_file({'y': m.model(x)}, f'{folder}/y.st')\n"
        "    print(m.class_names, m.plan.method)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.pt"), *(str(f) for _, f in exported)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("['a', 'b', 'c', 'd', 'e'] manual") == 2
    for pruned, folder in exported:
        with torch.inference_mode():
            ref = pruned(X)
        assert torch.equal(load_file(str(folder / "y.st"))["y"], ref)


def test_refuses_pickles(tmp_path):
    pruned, folder = pruned_export(tmp_path)
    torch.save(pruned.state_dict(), tmp_path / "model.pth")
    with pytest.raises(StudioError, match="pickled"):
        load_exported(tmp_path / "model.pth", device="cpu")
    torch.save(pruned.state_dict(), folder / WEIGHTS)  # a pickle disguised as safetensors
    with pytest.raises(StudioError, match="pickled PyTorch file"):
        load_exported(folder, device="cpu")


def _edit_manifest(folder: Path, fn) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def test_refuses_manifest_whose_plan_does_not_fit(tmp_path):
    _, folder = pruned_export(tmp_path)

    _edit_manifest(folder, lambda m: m["plan"]["base"].update(embed_dim=64))
    with pytest.raises(StudioError, match="another base architecture"):
        load_exported(folder, device="cpu")
    _, folder = pruned_export(tmp_path / "b")
    _edit_manifest(folder, lambda m: m["plan"]["blocks"][0].update(heads=[0, 5]))
    with pytest.raises(StudioError, match=r"plan is invalid.*blocks\[0\]\.heads"):
        load_exported(folder, device="cpu")
    _, folder = pruned_export(tmp_path / "c")

    def deeper(m):  # base says depth 3 but its kwargs build 4 blocks
        m["base"]["kwargs"]["depth"] = 4
        m["plan"]["base"]["kwargs"]["depth"] = 4

    _edit_manifest(folder, deeper)
    with pytest.raises(StudioError, match=r"does not fit its base.*depth=3"):
        load_exported(folder, device="cpu")


def test_half_precision_export_reloads(tmp_path):
    pruned, _ = pruned_export(tmp_path)
    folder = export(
        pruned,
        describe_base(
            create_vit("deit_tiny_distilled_patch16_224", **KW), "deit_tiny_distilled_patch16_224", KW
        ),
        tmp_path / "half",
        plan=load_exported(tmp_path / "export", device="cpu").plan,
        dtype=torch.float16,
    )
    loaded = load_exported(folder, device="cpu")
    with torch.inference_mode():
        assert (loaded.model(X) - pruned(X)).abs().max() < 1e-2
    assert loaded.model.blocks[0].attn_in.dtype == torch.long


def test_onnx_export_parity(tmp_path):
    pruned, _ = pruned_export(tmp_path)
    res = export_onnx(pruned, tmp_path / "m.onnx", (3, 32, 32))
    assert res["checked"] and res["max_abs_diff"] <= 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": torch.randn(5, 3, 32, 32).numpy()})[0]  # dynamic batch
    assert out.shape == (5, 5)


def test_every_export_is_reloaded_and_checked_before_it_lands(tmp_path, monkeypatch):
    """The export loads its own folder back (no pickle, strict) and compares logits; one that would not reload
    to the same model is refused and nothing is left behind."""
    import studio.export as ex

    _, folder = pruned_export(tmp_path)
    check = json.loads((folder / ex.RELOAD_CHECK).read_text())
    assert check["checked"] and check["backend"] == "eager" and 0 <= check["max_abs_diff"] <= ex.RELOAD_ATOL

    real = ex.load_exported

    def drifted(path, **kw):  # a reload that silently changes one weight: what the check exists to catch
        loaded = real(path, **kw)
        with torch.no_grad():
            loaded.model.head.bias.add_(0.5)
        return loaded

    monkeypatch.setattr(ex, "load_exported", drifted)
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", **KW).eval()
    with pytest.raises(StudioError, match="does not reload to the same model"):
        export(model, describe_base(model, "vit_tiny_patch16_224", KW), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
