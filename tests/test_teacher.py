"""Teachers of any timm architecture (issue #15 item 7): DeiT-style distillation from a CNN teacher at its own
input size and mean/std, through the input conversion, the losses, the refusals, the spec, the CLI, the real
retrain flow, the model card and the Retrain page."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from studio.cli import main
from studio.data import DataSpec
from studio.errors import StudioError
from studio.export import export
from studio.flows import run_folder
from studio.flows.retrain import RecoverySpec
from studio.modelcard import model_card
from studio.models import ModelSpec, create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.recovery import Distillation
from studio.runs import RunDir, read_json
from studio.surgery import apply_plan
from studio.teacher import TeacherInput, load_teacher

ROOT = Path(__file__).resolve().parents[1]
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
STUDENT = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CNN = "resnet10t"  # timm's smallest ResNet: a CNN teacher, BatchNorm and all


@pytest.fixture
def cnn_teacher(tmp_path) -> Path:
    """A random-weight 10-class resnet10t saved as safetensors (no download: the weights are the file's)."""
    torch.manual_seed(1)
    model = timm.create_model(CNN, pretrained=False, num_classes=10).eval()
    path = tmp_path / "teacher" / "resnet10t.safetensors"
    path.parent.mkdir()
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def pruned_run(tmp_path) -> RunDir:
    """A prune-run-like folder: spec.json naming the unpruned model, export/ holding a pruned tiny ViT."""
    torch.manual_seed(0)
    base_model = create_vit("vit_tiny_patch16_224", **KW).eval()
    base = describe_base(base_model, "vit_tiny_patch16_224", KW)
    export(base_model, base, tmp_path / "base", data_config=STUDENT)
    plan = PrunePlan(base, (BlockPlan(0, mlp=tuple(range(0, 192, 2))),), method="sls")
    run = RunDir.create(
        tmp_path / "runs" / "p1", {"kind": "prune", "model": ModelSpec(str(tmp_path / "base")).to_dict()}
    )
    export(apply_plan(base_model, plan), base, run.export_dir, plan=plan, data_config=STUDENT)
    return run


# ------------------------------------------------------------------------------------------ the conversion
def test_conversion_is_exact_when_the_teacher_preprocesses_like_the_student():
    x = torch.randn(2, 3, 32, 32)
    convert = TeacherInput(STUDENT, dict(STUDENT))
    assert convert.identity and convert(x) is x  # untouched, not a round trip through pixels
    # only the interpolation differs: nothing to resize, so still the identity
    assert TeacherInput(STUDENT, {**STUDENT, "interpolation": "bicubic"}).identity


def test_conversion_renormalises_at_the_same_size_by_the_formula():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    teacher = {**STUDENT, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    out = TeacherInput(STUDENT, teacher)(x)
    for c in range(3):  # (x·0.5 + 0.5 − mean_c) / std_c, channel by channel
        ref = (x[:, c] * 0.5 + 0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[:, c], ref, atol=1e-6)


def test_conversion_of_a_flat_colour_is_the_teachers_normalised_colour_at_its_size():
    colour = [0.2, 0.6, 0.9]  # any resize filter keeps a flat image flat
    x = torch.stack([torch.full((32, 32), (v - 0.5) / 0.5) for v in colour]).unsqueeze(0)
    out = TeacherInput(STUDENT, {**STUDENT, "input_size": [3, 48, 48], "mean": IMAGENET_MEAN,
                                 "std": IMAGENET_STD, "interpolation": "bicubic"})(x)  # fmt: skip
    assert out.shape == (1, 3, 48, 48)
    for c, v in enumerate(colour):
        assert torch.allclose(
            out[0, c], torch.full((48, 48), (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-5
        )


def test_conversion_matches_timms_own_transform_for_the_teacher():
    """A 64 px student batch converted for a 32 px teacher (bicubic, ImageNet mean/std) is what timm's eval
    transform of the teacher gives the same image: PIL's antialiased bicubic resize, then its normalisation."""
    # smooth and inside (0, 255): PIL clips a filter's overshoot to 8 bits, the float conversion rightly does not
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    waves = [127 + 100 * np.sin(2 * np.pi * (xx * a + yy * b)) for a, b in ((1, 0.5), (0.5, 1.5), (2, 1))]
    smooth = np.stack(waves, axis=-1).astype(np.uint8)
    img = Image.fromarray(smooth)
    student = {**STUDENT, "input_size": [3, 64, 64]}
    teacher = {"input_size": [3, 32, 32], "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    as_student = timm.data.create_transform(**student)(img).unsqueeze(0)
    as_teacher = timm.data.create_transform(**teacher)(img).unsqueeze(0)
    converted = TeacherInput(student, teacher)(as_student)
    assert converted.shape == as_teacher.shape
    # PIL resizes in two 8-bit passes (rows, then columns), each rounding to a whole grey level: the two agree
    # within 1.5 levels (1.5/255/std ≈ 0.026), and about a quarter level on average; the filter is the same
    diff = (converted - as_teacher).abs()
    assert diff.max().item() < 1.5 / 255 / min(IMAGENET_STD) and diff.mean().item() < 0.01
    # without the conversion the teacher would see another picture altogether
    assert (F.interpolate(as_student, size=(32, 32), mode="bicubic") - as_teacher).abs().max().item() > 0.1


# ------------------------------------------------------------------------------------------ the losses
def _hand_teacher_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits computed step by step: pixels, 48 px bicubic, ImageNet normalisation, forward."""
    pixels = x * 0.5 + 0.5
    resized = F.interpolate(pixels, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return teacher((resized - mean) / std)


def _log_softmax(v: torch.Tensor) -> torch.Tensor:
    return v - torch.log(torch.exp(v).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_distillation_from_a_cnn_teacher_equals_the_hand_computed_loss(cnn_teacher, mode):
    torch.manual_seed(0)
    student = create_vit("vit_tiny_patch16_224", **KW).train()
    teacher = load_teacher(
        ModelSpec(str(cnn_teacher), arch=CNN, img_size=48),
        student_config=STUDENT,
        num_classes=10,
        device="cpu",
    )
    assert not teacher.module.convert.identity and teacher.data_config["input_size"] == [3, 48, 48]
    T, alpha, eps = 3.0, 0.4, 0.1
    hook = Distillation(teacher.module, student, mode=mode, temperature=T, alpha=alpha, label_smoothing=eps)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 7, 9])

    class _State:
        logits = None

    loss = hook.loss(student, x, y, _State())  # type: ignore[arg-type]

    raw = timm.create_model(CNN, pretrained=False, num_classes=10).eval()
    from safetensors.torch import load_file

    raw.load_state_dict(load_file(str(cnn_teacher)))
    t = _hand_teacher_logits(raw, x)
    with torch.no_grad():
        s = student(x)
    logp = _log_softmax(s)
    ce = (-(1 - eps) * logp[torch.arange(4), y] - eps * logp.mean(dim=1)).mean()  # smoothed cross-entropy
    if mode == "soft":  # Hinton: T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch
        q, log_q, log_p = torch.softmax(t / T, 1), _log_softmax(t / T), _log_softmax(s / T)
        kd = T * T * (q * (log_q - log_p)).sum(dim=1).mean()
    else:  # DeiT: cross-entropy to the teacher's argmax, no smoothing
        kd = -logp[torch.arange(4), t.argmax(dim=1)].mean()
    expected = (1 - alpha) * ce + alpha * kd
    assert math.isfinite(expected.item()) and kd.item() > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_a_vit_checkpoint_teacher_of_another_size_loads_any_family_and_converts(tmp_path):
    """A distilled DeiT checkpoint (two heads) at 48 px teaching a 32 px student: classes read off ``head``, both
    heads averaged in eval mode, and the batch resized for it."""
    kw = {**KW, "img_size": 48}
    torch.manual_seed(2)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **kw).eval()
    path = tmp_path / "deit.safetensors"
    save_file(deit.state_dict(), str(path))
    kwargs = {k: v for k, v in kw.items() if k not in ("img_size", "num_classes")}
    spec = ModelSpec(str(path), arch="deit_tiny_distilled_patch16_224", img_size=48, kwargs=kwargs)
    teacher = load_teacher(spec, student_config=STUDENT, num_classes=10, device="cpu")
    assert teacher.num_classes == 10 and teacher.data_config["input_size"] == [3, 48, 48]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    up = F.interpolate(x * 0.5 + 0.5, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher.module(x), deit((up - mean) / std), atol=1e-5)


# ------------------------------------------------------------------------------------------ refusals
def test_each_refusal_is_one_sentence_saying_what_to_fix(cnn_teacher):
    def refuse(spec: ModelSpec, classes: int = 10) -> str:
        with pytest.raises(StudioError) as e:
            load_teacher(spec, student_config=STUDENT, num_classes=classes, device="cpu")
        return str(e.value)

    unknown = refuse(ModelSpec(str(cnn_teacher), arch="resnet10x"))
    assert unknown.startswith("timm has no architecture 'resnet10x' (similar: resnet10t")
    assert unknown.endswith("give --teacher-arch a name from timm.list_models().")
    wrong = refuse(ModelSpec(str(cnn_teacher), arch="resnet18"))
    assert wrong.startswith(
        "The teacher checkpoint resnet10t.safetensors does not fit the architecture 'resnet18' ("
    )
    assert "missing keys" in wrong and wrong.endswith(
        "give the --teacher-arch (and timm kwargs) it was saved from."
    )
    assert refuse(ModelSpec(str(cnn_teacher), arch=CNN), classes=3) == (
        "The teacher (resnet10t, resnet10t.safetensors) classifies 10 classes, the student 3: give a teacher "
        "trained on the student's 3 classes."
    )
    assert refuse(ModelSpec(str(cnn_teacher))) == (
        "The teacher resnet10t.safetensors is a bare checkpoint: also give its timm architecture, e.g. "
        "--teacher-arch regnety_160 (the Teacher architecture field on the Retrain page)."
    )
    assert refuse(ModelSpec(str(cnn_teacher), arch=CNN, num_classes=5)).startswith(
        "The teacher checkpoint resnet10t.safetensors has a classifier for 10 classes, not the 5"
    )


def test_the_spec_refuses_an_unknown_architecture_before_any_run_exists(tmp_path):
    spec = RecoverySpec(ModelSpec("demo"), DataSpec("demo"), ModelSpec("t.safetensors", arch="regnety_16x"))
    with pytest.raises(StudioError, match=r"^timm has no architecture 'regnety_16x' \(similar: regnety_160"):
        spec.validate()
    with pytest.raises(StudioError, match=r"^The teacher t.safetensors is a bare checkpoint"):
        RecoverySpec(ModelSpec("demo"), DataSpec("demo"), ModelSpec("t.safetensors")).validate()
    RecoverySpec(ModelSpec("demo"), DataSpec("demo"), ModelSpec("demo")).validate()  # folders need no arch


def test_a_teacher_of_other_classes_fails_the_run_before_training(pruned_run, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model(CNN, pretrained=False, num_classes=3).state_dict(), str(path))
    spec = RecoverySpec(
        ModelSpec(str(pruned_run.export_dir), device="cpu"),
        DataSpec("demo", limit=16),
        ModelSpec(str(path), arch=CNN, img_size=32, device="cpu"),
        overrides={"kd": "hard", "epochs": 1},
        bench=False,
    )
    run = RunDir.create(tmp_path / "runs" / "r3", spec.to_dict())
    with pytest.raises(StudioError, match=r"classifies 3 classes, the student 10"):
        run_folder(run)
    assert read_json(run.status_file)["state"] == "failed" and not run.has_checkpoint


# ------------------------------------------------------------------------------------------ the spec
def test_spec_json_round_trips_the_teacher_and_reads_old_specs(tmp_path):
    teacher = ModelSpec("t.safetensors", arch="regnety_160", img_size=224, data={"interpolation": "bicubic"})
    spec = RecoverySpec(ModelSpec("demo"), DataSpec("demo"), teacher, overrides={"kd": "hard"})
    text = json.dumps(spec.to_dict())
    back = RecoverySpec.from_dict(json.loads(text))
    assert back == spec and back.teacher is not None and back.teacher.arch == "regnety_160"
    assert back.teacher.img_size == 224
    # spec.json written before any-architecture teachers: a teacher of a source alone, or none at all
    old = {
        "kind": "retrain",
        "model": {"source": "demo"},
        "data": {"kind": "demo"},
        "teacher": {"source": "demo"},
    }
    read = RecoverySpec.from_dict(old)
    assert read.teacher == ModelSpec("demo") and read.teacher.arch is None
    read.validate()
    assert RecoverySpec.from_dict({k: v for k, v in old.items() if k != "teacher"}).teacher is None


def test_cli_flags_write_the_teacher_into_the_spec_and_refuse_without_a_checkpoint(tmp_path, capsys):
    base = ["retrain", "--model", "demo", "--data", "demo", "--dry-run", "--kd", "hard"]
    out = tmp_path / "runs" / "r"
    teacher = ["--teacher", "t.safetensors", "--teacher-arch", "regnety_002", "--teacher-img-size", "64"]
    assert main([*base, "--out", str(out), *teacher]) == 0
    saved = read_json(out / "spec.json")["teacher"]
    assert (saved["source"], saved["arch"], saved["img_size"]) == ("t.safetensors", "regnety_002", 64)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "r2"), "--teacher-arch", "regnety_002"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --teacher-arch and --teacher-img-size describe a --teacher checkpoint: also give --teacher FILE."
    )
    assert (
        main([*base, "--out", str(tmp_path / "r3"), "--teacher", "t.pth", "--teacher-arch", "nope_net"]) == 2
    )
    assert capsys.readouterr().err.startswith("error: timm has no architecture 'nope_net'")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


# ------------------------------------------------------------------------------------------ the real flow
def test_retrain_with_a_cnn_teacher_runs_to_the_end_and_records_it(pruned_run, cnn_teacher, tmp_path):
    out = tmp_path / "runs" / "kd-cnn"
    rc = main([
        "retrain", "--model", str(pruned_run.export_dir), "--data", "demo", "--limit", "48", "--out", str(out),
        "--teacher", str(cnn_teacher), "--teacher-arch", CNN, "--teacher-img-size", "48", "--kd", "hard",
        "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--dry-run",
    ])  # fmt: skip
    assert rc == 0
    run = RunDir(out)
    result = run_folder(run)
    rec = result.section["teacher"]
    assert (rec["arch"], rec["source"], rec["num_classes"]) == (CNN, str(cnn_teacher), 10)
    assert rec["input_size"] == [3, 48, 48] and rec["mean"] == pytest.approx(IMAGENET_MEAN)
    assert rec["converts_input"] is True and 0.0 <= rec["top1"] <= 1.0
    saved = read_json(run.results_file)
    assert saved["retrain"]["teacher"] == rec and saved["retrain"]["recipe"]["kd"] == "hard"
    assert saved["retrain"]["train"]["epochs_run"] == 1 and read_json(run.status_file)["state"] == "done"
    manifest = read_json(run.export_dir / "manifest.json")
    assert manifest["recovery"]["teacher"] == rec
    card = model_card(manifest, name=out.name, results=saved)
    assert f"- **Teacher**: `{CNN}` from `{cnn_teacher}`, test top-1 " in card and "fed at 48 px" in card


# ------------------------------------------------------------------------------------------ the page
def test_retrain_page_checks_the_teacher_architecture_before_submit(
    pruned_run, cnn_teacher, tmp_path, monkeypatch
):
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("STUDIO_DATA_ROOTS", str(tmp_path))
    pruned_run.write_results({"method": "sls", "after": {"top1": 0.5, "params": 100, "macs": 1000}})
    pruned_run.set_status("done")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.session_state["studio_data_spec"] = DataSpec("demo", limit=16)
    at.run()
    at.switch_page("pages/7_retrain.py").run()
    assert not at.exception, at.exception
    assert at.text_input(key="retrain_teacher_arch").value == ""  # the unpruned export records its own
    at.text_input(key="retrain_teacher").set_value(str(cnn_teacher)).run()
    assert (
        any("is a bare checkpoint" in e.value for e in at.error) and at.button(key="retrain_start").disabled
    )
    at.text_input(key="retrain_teacher_arch").set_value("resnet10x").run()
    assert any("timm has no architecture 'resnet10x'" in e.value for e in at.error)
    assert at.button(key="retrain_start").disabled
    at.text_input(key="retrain_teacher_arch").set_value(CNN).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not at.button(key="retrain_start").disabled
