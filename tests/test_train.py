"""The shared training loop: learns, is deterministic, resumes exactly, cancels cleanly."""

from __future__ import annotations

import pytest
import torch

from studio.data import TensorData
from studio.errors import Cancelled, StudioError
from studio.events import CancelToken
from studio.models import create_vit
from studio.train import TrainSpec, fit, lr_at, select_trainable
from tests.conftest import TINY_KWARGS


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 2  # learnable signal
    return TensorData(x, y)


def _model():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", **TINY_KWARGS)


SPEC = TrainSpec(epochs=3, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=1)


def test_loss_decreases_and_history_recorded():
    r = fit(_model(), _data(), _data(32, 1), SPEC)
    assert r.epochs_run == 3 and r.steps == 3 * 6
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    assert r.best_epoch is not None and 0 <= r.best_val_top1 <= 1


def test_deterministic_on_cpu():
    a, b = _model(), _model()
    fit(a, _data(), None, SPEC)
    fit(b, _data(), None, SPEC)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_cancel_then_resume_equals_uninterrupted(tmp_path):
    ref = _model()
    fit(ref, _data(), None, SPEC)

    model, cancel = _model(), CancelToken()

    class StopAt:
        def after_step(self, state):
            if state.step == 8:  # mid-epoch 1
                cancel.set()

    with pytest.raises(Cancelled):
        fit(model, _data(), None, SPEC, hooks=[StopAt()], cancel=cancel, checkpoint=tmp_path / "ck.pt")
    resumed = _model()
    r = fit(resumed, _data(), None, SPEC, checkpoint=tmp_path / "ck.pt", resume=True)
    assert r.steps == 18
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), resumed.parameters()))


def test_head_only_training_freezes_backbone():
    m = _model()
    before = m.blocks[0].attn.qkv.weight.detach().clone()
    fit(m, _data(), None, TrainSpec(epochs=1, batch_size=32, trainable="head"))
    assert torch.equal(before, m.blocks[0].attn.qkv.weight)
    assert select_trainable(m, "head") == ["head.weight", "head.bias"]


def test_bad_trainable_rule():
    with pytest.raises(StudioError, match="selects no parameter"):
        select_trainable(_model(), "re:^nothing$")


def test_schedule_warmup_then_cosine():
    spec = TrainSpec(epochs=10, lr=1.0, min_lr=0.0, warmup_epochs=1)
    assert lr_at(0, spec, 10) == pytest.approx(0.1)
    assert lr_at(9, spec, 10) == pytest.approx(1.0)
    assert lr_at(99, spec, 10) < 0.01
    assert all(lr_at(s, spec, 10) >= lr_at(s + 1, spec, 10) for s in range(10, 99))


def test_onecycle_is_torchs_onecyclelr_and_sgd_is_the_optimizer_asked_for():
    """SPLoRA's reference ViT run trains with SGD (momentum 0.9) and OneCycleLR: the studio's per-step schedule
    equals torch's scheduler, and fit builds the optimizer the spec names; unknown names are refused."""
    import torch

    from studio.errors import StudioError
    from studio.train import TrainSpec, lr_at

    spec = TrainSpec(epochs=4, lr=0.1, schedule="onecycle")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    for step in range(100):
        assert lr_at(step, spec, 25) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), step
        opt.step()
        if step < 99:
            sched.step()
    seen = []

    class Look:
        def after_step(self, state):
            seen.append((type(state.optimizer).__name__, state.optimizer.param_groups[0]["lr"]))

    sgd = TrainSpec(epochs=1, batch_size=16, lr=0.05, seed=1, optimizer="sgd", schedule="onecycle")
    fit(_model(), _data(), None, sgd, hooks=[Look()])
    assert {name for name, _ in seen} == {"SGD"} and seen[0][1] == pytest.approx(lr_at(0, sgd, 6))
    with pytest.raises(StudioError, match="optimizer must be one of adamw, sgd"):
        TrainSpec(optimizer="lamb").validate()
    with pytest.raises(StudioError, match="schedule must be one of cosine, onecycle"):
        TrainSpec(schedule="step").validate()


def test_activation_checkpointing_trains_to_the_same_weights_and_is_switched_off_after():
    from dataclasses import replace

    plain, ckpt = _model(), _model()
    fit(plain, _data(), None, replace(SPEC, epochs=1))
    fit(ckpt, _data(), None, replace(SPEC, epochs=1, grad_checkpointing=True))
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)  # recomputed activations: the same gradients
    assert not ckpt.grad_checkpointing


def test_activation_checkpointing_refuses_a_model_with_forward_hooks():
    from dataclasses import replace

    m = _model()
    m.blocks[0].mlp.fc1.register_forward_hook(lambda *_: None)
    with pytest.raises(StudioError, match="twice"):
        fit(m, _data(), None, replace(SPEC, epochs=1, grad_checkpointing=True))


def test_grad_checkpointing_flag_reaches_the_training_and_a_bad_value_is_refused():
    from studio.cli import build_parser
    from studio.commands.jobs import _spec_from_args
    from studio.recovery import resolve_recipe

    base = ["retrain", "--model", "demo", "--data", "demo", "--out", "runs/x"]
    on = _spec_from_args(build_parser().parse_args([*base, "--grad-checkpointing"]))
    assert on.recipe().train_spec().grad_checkpointing is True
    off = _spec_from_args(build_parser().parse_args(base))
    assert "grad_checkpointing" not in off.overrides and not off.recipe().train_spec().grad_checkpointing
    with pytest.raises(StudioError, match="true or false"):
        resolve_recipe("quick", overrides={"grad_checkpointing": "yes"})
