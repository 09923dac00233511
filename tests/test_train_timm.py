"""Recovery on timm's training parts: Mixup/CutMix with soft targets and a ModelEmaV3 weight EMA in the one
training loop, resumed exactly, and the recipe options that reach them."""

from __future__ import annotations

import copy

import pytest
import torch

from studio.errors import Cancelled, StudioError
from studio.events import CancelToken
from studio.recovery import resolve_recipe
from studio.train import TrainSpec, fit
from tests.test_train import _data, _model

MIX = TrainSpec(
    epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=1, mixup=0.8, cutmix=1.0, ema_decay=0.9
)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_mixup_and_ema_resume_exactly(tmp_path):
    ref = _model()
    fit(ref, _data(), None, MIX)
    plain = _model()
    fit(plain, _data(), None, TrainSpec(epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=1))
    assert not _same(ref, plain)  # mixing and the EMA changed the training
    model, cancel = _model(), CancelToken()

    class StopAt:
        def after_step(self, state):
            if state.step == 8:  # mid-epoch 1
                cancel.set()

    with pytest.raises(Cancelled):
        fit(model, _data(), None, MIX, hooks=[StopAt()], cancel=cancel, checkpoint=tmp_path / "ck.pt")
    resumed = _model()
    r = fit(resumed, _data(), None, MIX, checkpoint=tmp_path / "ck.pt", resume=True)
    assert r.steps == 12 and _same(ref, resumed)
    assert "train_top1" not in r.history[-1]  # accuracy on mixed images is not reported


def test_ema_is_timms_moving_average_of_the_steps():
    """With ``select='last'`` the model ends as the EMA of its weights after each step:
    e_1 = w_1, e_t = d·e_{t-1} + (1-d)·w_t (timm's ModelEmaV3 with step counting)."""
    d = 0.6
    seen: list[dict[str, torch.Tensor]] = []

    class Record:
        def after_step(self, state):
            seen.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    model = _model()
    spec = TrainSpec(epochs=1, batch_size=32, lr=2e-3, warmup_epochs=0, seed=1, ema_decay=d, select="last")
    fit(model, _data(), None, spec, hooks=[Record()])
    assert len(seen) == 3
    ema = copy.deepcopy(seen[0])
    for w in seen[1:]:
        for k in ema:
            if ema[k].is_floating_point():
                ema[k] = d * ema[k] + (1 - d) * w[k]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.head.weight, seen[-1]["head.weight"])  # not the last raw weights


def test_mixup_refusals_and_recipe_options():
    class OwnLoss:
        def loss(self, model, x, y, state):
            return None

    with pytest.raises(StudioError, match="plain cross-entropy"):
        fit(_model(), _data(32), None, TrainSpec(epochs=1, batch_size=16, mixup=0.8), hooks=[OwnLoss()])
    with pytest.raises(StudioError, match="EMA decay"):
        fit(_model(), _data(32), None, TrainSpec(epochs=1, batch_size=16, ema_decay=1.5))
    recipe = resolve_recipe("paper:savit", overrides={"mixup": 0.8, "cutmix": 1.0, "ema_decay": 0.9999})
    spec = recipe.train_spec()
    assert (spec.mixup, spec.cutmix, spec.ema_decay) == (0.8, 1.0, 0.9999) and spec.mixes
    with pytest.raises(StudioError, match="kd to none"):
        resolve_recipe("paper:isomorphic", overrides={"mixup": 0.8})  # hard distillation + mixup
    assert resolve_recipe("paper:savit").lr == 1e-3  # 5e-4 x 1024/512, the scripts' global batch


@pytest.mark.parametrize("n", [96, 80])  # 80: the last optimizer step has one micro-batch, not two
def test_gradient_accumulation_equals_the_larger_batch(n):
    big, acc = _model(), _model()
    base = dict(epochs=2, lr=2e-3, warmup_epochs=0.5, seed=1)
    fit(big, _data(n), None, TrainSpec(batch_size=32, **base))
    r = fit(acc, _data(n), None, TrainSpec(batch_size=16, accum_steps=2, **base))
    assert r.steps == 2 * -(-n // 32)
    for (k, p), q in zip(big.state_dict().items(), acc.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=k)


def test_accumulation_resumes_exactly_and_refuses_step_hooks(tmp_path):
    spec = TrainSpec(epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=1, accum_steps=2)
    ref = _model()
    fit(ref, _data(), None, spec)
    model, cancel = _model(), CancelToken()

    class Stop:
        def on_epoch_end(self, state):
            pass

        def loss(self, model, x, y, state):
            if state.step == 4 and state.batch is not None:
                cancel.set()  # seen at the next optimizer step's first micro-batch
            return None

    with pytest.raises(Cancelled):
        fit(model, _data(), None, spec, hooks=[Stop()], cancel=cancel, checkpoint=tmp_path / "ck.pt")
    resumed = _model()
    r = fit(resumed, _data(), None, spec, checkpoint=tmp_path / "ck.pt", resume=True)
    assert r.steps == 6 and _same(ref, resumed)

    class EveryStep:
        def after_step(self, state):
            pass

    with pytest.raises(StudioError, match="accum_steps to 1"):
        fit(_model(), _data(32), None, spec, hooks=[EveryStep()])
    with pytest.raises(StudioError, match="whole number"):
        resolve_recipe("quick", overrides={"accum_steps": 0})
