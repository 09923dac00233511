"""Recovery: distillation losses against hand-computed values, recipes, exact resume with KD, end-to-end run."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from studio.data import DataSpec, TensorData
from studio.errors import Cancelled, StudioError
from studio.events import CancelToken
from studio.export import export, load_exported
from studio.flows import run_folder
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec, create_vit, describe_base
from studio.plan import BlockPlan, PrunePlan
from studio.recovery import (
    PRESETS,
    Distillation,
    infer_teacher,
    kd_loss,
    resolve_recipe,
)
from studio.runs import RunDir, read_json, write_json
from studio.surgery import apply_plan
from studio.train import TrainSpec, fit, lr_at

S = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
T_LOGITS = [[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]]
Y = [1, 2]


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _ce(logits: list[float], y: int, eps: float = 0.0) -> float:
    """Cross-entropy with label smoothing eps: (1 − eps)·(−log p_y) + eps·mean_c(−log p_c)."""
    p = _softmax(logits)
    return -(1 - eps) * math.log(p[y]) - eps / len(p) * sum(math.log(q) for q in p)


def test_soft_kd_equals_hand_computed_value():
    T, alpha, eps = 2.0, 0.3, 0.1
    ce = sum(_ce(s, y, eps) for s, y in zip(S, Y)) / 2
    kl = 0.0
    for s, t in zip(S, T_LOGITS):
        p, q = _softmax([v / T for v in s]), _softmax([v / T for v in t])
        kl += sum(qc * (math.log(qc) - math.log(pc)) for pc, qc in zip(p, q))
    expected = (1 - alpha) * ce + alpha * T * T * kl / 2
    loss, ce_t, kd_t = kd_loss(
        torch.tensor(S),
        torch.tensor(T_LOGITS),
        torch.tensor(Y),
        mode="soft",
        temperature=T,
        alpha=alpha,
        label_smoothing=eps,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert ce_t.item() == pytest.approx(ce, abs=1e-6)
    assert kd_t.item() == pytest.approx(T * T * kl / 2, abs=1e-6)


def test_hard_kd_equals_hand_computed_value_and_uses_the_distillation_head():
    alpha = 0.5
    dist = [[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]]
    # DeiT: ½ CE(class head, y) + ½ CE(distillation head, argmax teacher)
    expected = 0.5 * sum(_ce(s, y) for s, y in zip(S, Y)) / 2 + 0.5 * (_ce(dist[0], 0) + _ce(dist[1], 2)) / 2
    loss, _, _ = kd_loss(
        torch.tensor(S),
        torch.tensor(T_LOGITS),
        torch.tensor(Y),
        mode="hard",
        alpha=alpha,
        student_dist=torch.tensor(dist),
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    single, _, _ = kd_loss(torch.tensor(S), torch.tensor(T_LOGITS), torch.tensor(Y), mode="hard", alpha=alpha)
    assert single.item() == pytest.approx(
        0.5 * (sum(_ce(s, y) for s, y in zip(S, Y)) + _ce(S[0], 0) + _ce(S[1], 2)) / 2, abs=1e-6
    )


def test_kd_none_is_plain_cross_entropy():
    loss, _, kd = kd_loss(
        torch.tensor(S), torch.tensor(T_LOGITS), torch.tensor(Y), mode="none", label_smoothing=0.1
    )
    assert loss.item() == pytest.approx(sum(_ce(s, y, 0.1) for s, y in zip(S, Y)) / 2, abs=1e-6)
    assert kd.item() == 0.0
    with pytest.raises(StudioError, match="soft"):
        kd_loss(torch.tensor(S), torch.tensor(T_LOGITS), torch.tensor(Y), mode="medium")


KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
YB = torch.tensor([0, 3, 7, 9])


def test_distillation_hook_on_a_distilled_deit_student():
    torch.manual_seed(0)
    student = create_vit("deit_tiny_distilled_patch16_224", **KW).train()
    teacher = create_vit("vit_tiny_patch16_224", **KW)
    hook = Distillation(teacher, student, mode="soft", temperature=3.0, alpha=0.4, label_smoothing=0.1)
    assert student.distilled_training and not any(p.requires_grad for p in teacher.parameters())

    class _State:
        logits = None

    state = _State()
    loss = hook.loss(student, X, YB, state)  # type: ignore[arg-type]
    cls, dist = student(X)
    with torch.no_grad():
        t = teacher(X)
    ref, _, _ = kd_loss(
        cls, t, YB, mode="soft", temperature=3.0, alpha=0.4, label_smoothing=0.1, student_dist=dist
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(state.logits, (cls + dist) / 2)
    loss.backward()
    assert student.head_dist.weight.grad is not None and student.head.weight.grad is not None
    record = hook.on_epoch_end(state)  # type: ignore[arg-type]
    assert set(record) == {"train_ce", "train_kd"} and record["train_kd"] > 0


def test_recipes_name_their_sources_and_resolve_by_method():
    assert all(r.source for r in PRESETS.values())
    sls = resolve_recipe("paper", "sls")
    assert (sls.lr, sls.weight_decay, sls.epochs, sls.warmup_epochs) == (1e-3, 1e-4, 100, 10)
    iso = resolve_recipe("paper", "isomorphic")
    assert (iso.lr, iso.weight_decay, iso.epochs, iso.kd) == (5e-4, 0.05, 300, "hard")
    assert (
        resolve_recipe("paper", "savit").epochs == 300
        and resolve_recipe("paper", "p3b").label_smoothing == 0.1
    )
    assert resolve_recipe("paper", "magnitude").name == "paper:deit"
    quick = resolve_recipe("quick", None, {"epochs": 2, "kd": "none", "lr": None})
    assert (quick.epochs, quick.kd, quick.lr) == (2, "none", PRESETS["quick"].lr)
    ts = quick.train_spec(seed=3)
    assert (ts.epochs, ts.label_smoothing, ts.early_stop, ts.select, ts.seed) == (2, 0.1, 3, "val", 3)
    with pytest.raises(StudioError, match="Valid presets"):
        resolve_recipe("fast")
    with pytest.raises(StudioError, match="unknown"):
        resolve_recipe("quick", overrides={"epoch": 3})
    with pytest.raises(StudioError, match="alpha"):
        resolve_recipe("quick", overrides={"alpha": 1.5})


def test_cosine_schedule_with_warmup():
    spec = TrainSpec(epochs=10, lr=1e-3, min_lr=1e-5, warmup_epochs=2)
    lrs = [lr_at(s, spec, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 20) and lrs[19] == pytest.approx(1e-3)
    assert all(a < b for a, b in pairwise(lrs[:20]))  # linear warm-up
    assert all(a >= b for a, b in pairwise(lrs[20:]))  # cosine decay
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)


def _data(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    return TensorData(torch.randn(n, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) / 5, y)


def test_resume_with_distillation_and_drop_path_is_exact(tmp_path):
    """Two cancels (mid-epoch 0 and mid-epoch 1), two resumes: same weights and history as one run."""
    spec = TrainSpec(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5, seed=2)
    train, val = _data(96, 0), _data(32, 1)

    def student_and_hook():
        torch.manual_seed(0)
        s = create_vit("vit_tiny_patch16_224", drop_path_rate=0.2, drop_rate=0.1, **KW)
        torch.manual_seed(1)
        return s, Distillation(create_vit("vit_tiny_patch16_224", **KW), s, mode="soft", temperature=2.0)

    ref, hook = student_and_hook()
    ref_result = fit(ref, train, val, spec, hooks=[hook])

    ckpt = tmp_path / "ckpt"
    model = None
    for stop_at in (3, 9, None):
        model, hook = student_and_hook()
        token = CancelToken()

        def cb(ev, token=token, stop_at=stop_at):
            if ev.kind == "progress" and ev.data["done"] == stop_at:
                token.set()

        try:
            result = fit(
                model,
                train,
                val,
                spec,
                hooks=[hook],
                callbacks=[cb],
                cancel=token,
                checkpoint=ckpt,
                resume=True,
            )
        except Cancelled:
            assert stop_at is not None
            payload = torch.load(ckpt, weights_only=True)
            assert payload["skip"] == stop_at % 6 and payload["skip"] > 0  # mid-epoch
            continue
        assert stop_at is None
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    drop_time = [{k: v for k, v in r.items() if k != "time"} for r in ref_result.history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in result.history] == drop_time
    assert result.best_val_top1 == ref_result.best_val_top1


@pytest.fixture
def pruned_run(tmp_path):
    """A prune-run-like folder: spec.json naming the unpruned model, export/ holding a depth-cut model."""
    torch.manual_seed(0)
    base_model = create_vit("vit_tiny_patch16_224", **KW).eval()
    base = describe_base(base_model, "vit_tiny_patch16_224", KW)
    dcfg = {
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    export(base_model, base, tmp_path / "base", data_config=dcfg)
    plan = PrunePlan(base, (BlockPlan(0, mlp=tuple(range(0, 192, 2))),), method="sls")
    run = RunDir.create(
        tmp_path / "runs" / "p1", {"kind": "prune", "model": ModelSpec(str(tmp_path / "base")).to_dict()}
    )
    export(apply_plan(base_model, plan), base, run.export_dir, plan=plan, data_config=dcfg)
    return run


def test_run_recovery_end_to_end_with_early_stop(pruned_run, tmp_path):
    model = str(pruned_run.export_dir)
    teacher = infer_teacher(model)
    assert teacher is not None and teacher.source == str(tmp_path / "base")
    spec = RecoverySpec(
        ModelSpec(model, device="cpu"),
        DataSpec("demo", limit=48),
        teacher,
        preset="quick",
        overrides={"epochs": 4, "lr": 1e-9, "min_lr": 1e-10, "early_stop": 1, "batch_size": 16},
        bench=False,
    )
    run = RunDir.create(tmp_path / "runs" / "r1", spec.to_dict())
    result = run_folder(run)
    sec = result.section
    assert result.kind == "retrain" and result.method == "sls" and sec["recipe"]["kd"] == "soft"
    assert sec["train"]["epochs_run"] == 2  # lr ~0: no validation gain after epoch 0, patience 1
    saved = read_json(run.results_file)
    assert saved["after"]["top1"] == result.after["top1"] and saved["retrain"]["replicas_identical"] is True
    assert read_json(run.status_file)["state"] == "done"
    reloaded = load_exported(run.export_dir, device="cpu")
    assert reloaded.plan is not None and reloaded.plan.method == "sls"
    assert len(reloaded.model.blocks) == 1 and reloaded.model.blocks[0].mlp.fc1.out_features == 96
    assert (
        infer_teacher(str(run.export_dir)) == teacher
    )  # a recovered model's teacher is still the unpruned one
    assert RecoverySpec.from_dict(read_json(run.spec_file)) == spec


def test_missing_teacher_fails_with_status(pruned_run, tmp_path):
    spec = RecoverySpec(
        ModelSpec(str(pruned_run.export_dir), device="cpu"),
        DataSpec("demo", limit=16),
        None,
        overrides={"kd": "hard"},
        bench=False,
    )
    run = RunDir.create(tmp_path / "runs" / "r2", spec.to_dict())
    with pytest.raises(StudioError, match="teacher"):
        run_folder(run)
    status = read_json(run.status_file)
    assert status["state"] == "failed" and "teacher" in status["error"]
    write_json(run.spec_file, {"kind": "prune"})
    with pytest.raises(StudioError, match="not a retrain run"):
        RecoverySpec.from_dict(read_json(run.spec_file))
