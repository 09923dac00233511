"""SPLoRA (Hedegaard et al., arXiv 2211.10155): adapter layers, masks, criteria, schedule, export parity."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from studio.data import DataSpec, TensorData
from studio.demo import DEMO_DATA_CONFIG
from studio.errors import StudioError
from studio.export import export, load_exported
from studio.flows import run_folder
from studio.flows.prune import PruneSpec
from studio.flows.splora import run_splora
from studio.models import LoadedModel, ModelSpec, create_vit, describe_base
from studio.plan import PrunePlan
from studio.prune import get_method
from studio.prune.splora import (
    MaskHook,
    SeriesResult,
    SploraOptions,
    UnitMasks,
    choose_pruned,
    fused_pruned,
    learned_in_task,
    load_task,
    normalise,
    parity,
    raw_scores,
    read_curves,
    save_task,
    task_tensors,
    weight_density,
)
from studio.runs import RunDir
from studio.splora import (
    MaskedNorm,
    SPLoRALinear,
    apply_splora,
    count_learned,
    fuse_splora,
    resolve_rank,
    splora_layers,
    trainable_rule,
)
from studio.train import TrainSpec, fit, select_trainable

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
ARCH = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    m = create_vit(ARCH, **KW).eval()
    return m, describe_base(m, ARCH, KW)


def random_adapters(model: nn.Module, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in splora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
            if layer.bias is not None:
                layer.bias.add_(torch.randn(layer.bias.shape, generator=g) * std)


def random_masks(base, seed: int = 2) -> UnitMasks:
    g = torch.Generator().manual_seed(seed)
    m = UnitMasks.full(base)
    m.heads[0][1] = False
    m.head_dims[1][torch.randperm(base.head_dim, generator=g)[:5]] = False
    for i in range(base.depth):
        m.mlp[i][torch.randperm(base.mlp_hidden[i], generator=g)[: base.mlp_hidden[i] // 3]] = False
    m.embed[torch.randperm(base.embed_dim, generator=g)[:7]] = False
    return m


def digits_like(n: int = 96, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() / 10
    return TensorData(x, y)


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("init_range", [1e-3, 1e-4])
def test_fused_weight_at_init_is_within_the_init_range(init_range):
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    layer = SPLoRALinear(lin, rank=8, init_range=init_range)
    delta = layer.fuse().weight - lin.weight
    # |(BA)_ij| = |Σ_k B_ik A_kj| <= init_range · Σ_k |A_kj| <= init_range · r / sqrt(d_in)
    bound_per_col = init_range * layer.lora_A.abs().sum(0)
    assert (delta.abs() <= bound_per_col[None, :] + 1e-9).all()
    assert delta.abs().max() <= init_range * 8 / math.sqrt(48) + 1e-9
    assert delta.abs().max() > 0  # small random B, not zero: the adapted model is not bit-identical
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(48) + 1e-7  # kaiming-uniform(a=√5) like nn.Linear
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad and layer.bias.requires_grad
    assert torch.equal(layer.fuse().bias, lin.bias)


def test_rank_int_or_fraction_and_bad_values():
    assert resolve_rank(8, 96) == 8 and resolve_rank(8.0, 96) == 8
    assert resolve_rank(0.25, 96) == 24 and resolve_rank(0.001, 96) == 1
    layer = SPLoRALinear(nn.Linear(16, 40), rank=0.1)
    assert layer.rank == 4 and layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (40, 4)
    for bad in (-1, 2.5):
        with pytest.raises(StudioError):
            resolve_rank(bad, 96)


def test_apply_and_fuse_roundtrip_keeps_timm_structure():
    m, _ = tiny()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    sm = apply_splora(copy.deepcopy(m), 4, 1e-4)
    assert sum(isinstance(v, SPLoRALinear) for v in sm.modules()) == 4 * 2
    assert isinstance(sm.blocks[0].norm1, MaskedNorm) and isinstance(sm.norm_pre, MaskedNorm)
    assert (sm(x) - ref).abs().max() < 1e-2  # near the backbone at init
    fused = fuse_splora(copy.deepcopy(sm))
    assert not any(isinstance(v, SPLoRALinear | MaskedNorm) for v in fused.modules())
    assert set(fused.state_dict()) == set(m.state_dict())
    assert torch.allclose(fused(x), sm(x), atol=1e-5)
    with pytest.raises(StudioError):
        apply_splora(sm, 4)


def test_learned_params_formula_matches_brute_force_count():
    m, base = tiny()
    sm = apply_splora(m, 4)
    # dense: the paper's count equals the numel of exactly the trainable task parameters
    names = set(select_trainable(sm, trainable_rule(False)))
    assert not any(n.endswith(".weight") and ("qkv" in n or "fc" in n or "proj" in n) for n in names)
    assert count_learned(sm).total == sum(p.numel() for p in sm.parameters() if p.requires_grad)
    masks = random_masks(base)
    masks.apply(sm)
    brute = 0
    for _, layer in splora_layers(sm):  # count kept entries one by one, independently of the formula
        m_in = [j for j in range(layer.in_features) if layer.mask_in is None or layer.mask_in[j] != 0]
        m_out = [i for i in range(layer.out_features) if layer.mask_out is None or layer.mask_out[i] != 0]
        brute += layer.lora_A[:, m_in].numel() + layer.lora_B[m_out, :].numel() + layer.bias[m_out].numel()
        assert layer.learned_params() == layer.rank * (len(m_in) + len(m_out)) + len(m_out)
    e = int(masks.embed.sum())
    norms = 2 * e * (2 * base.depth + 1)  # norm1, norm2 per block + final norm, weight and bias
    head = base.num_classes * e + base.num_classes
    assert count_learned(sm).total == brute + norms + head
    assert learned_in_task(task_tensors(sm, masks)) == brute + norms + head


# ------------------------------------------------------------------------------------------------- masks
def test_pruned_channels_stay_zero_during_recovery():
    m, base = tiny()
    sm = apply_splora(m, 4)
    random_adapters(sm)
    masks = random_masks(base)
    masks.apply(sm)
    data = digits_like()
    spec = TrainSpec(
        epochs=2, batch_size=32, lr=1e-2, warmup_epochs=0, trainable=trainable_rule(False), select="last"
    )
    fit(sm, data, None, spec, hooks=[MaskHook()])
    blk = sm.blocks[0]
    dropped = ~masks.mlp[0]
    assert blk.mlp.fc1.lora_B[dropped].abs().max() == 0 and blk.mlp.fc1.bias[dropped].abs().max() == 0
    assert blk.mlp.fc2.lora_A[:, dropped].abs().max() == 0
    assert blk.mlp.fc1.adapted_weight()[dropped].abs().max() == 0
    assert blk.mlp.fc1.lora_B[~dropped].abs().max() > 0  # kept rows did train
    e_drop = ~masks.embed
    assert blk.attn.proj.lora_B[e_drop].abs().max() == 0 and blk.attn.qkv.lora_A[:, e_drop].abs().max() == 0
    acts = []
    h = blk.mlp.fc1.register_forward_hook(lambda mod, i, o: acts.append(o))
    sm(data.images[:4])
    h.remove()
    assert acts[0][..., dropped].abs().max() == 0
    # the paper's CNN code zeroed once and trained unmasked: the same channels regrow
    for _, layer in splora_layers(sm):
        layer.set_masks(None, None)
    fit(sm, data, None, spec)
    assert blk.mlp.fc1.lora_B[dropped].abs().max() > 0


def test_fine_pruning_masks_the_trained_base_weights_too():
    m, base = tiny()
    fm = apply_splora(m, 0, train_base=True)
    assert all(layer.lora_A is None and layer.weight.requires_grad for _, layer in splora_layers(fm))
    masks = random_masks(base)
    masks.apply(fm)
    fit(
        fm,
        digits_like(),
        None,
        TrainSpec(epochs=1, batch_size=32, lr=1e-3, trainable=trainable_rule(True), select="last"),
        hooks=[MaskHook()],
    )
    fc1 = fm.blocks[1].mlp.fc1
    assert fc1.weight[~masks.mlp[1]].abs().max() == 0 and fc1.weight[masks.mlp[1]].abs().max() > 0
    assert fm.patch_embed.proj.weight.requires_grad  # full fine-tuning


def test_fused_and_physically_pruned_model_matches_masked_adapters():
    m, base = tiny()
    sm = apply_splora(m, 4)
    random_adapters(sm)
    masks = random_masks(base)
    masks.apply(sm)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    pruned, plan = fused_pruned(SeriesResult("splora", sm, masks), base)
    assert parity(sm, pruned, x) <= 1e-5
    k = plan.kept(0)
    assert k["heads"] == 2 and pruned.blocks[0].mlp.fc1.out_features == int(masks.mlp[0].sum())
    assert pruned.embed_dim == int(masks.embed.sum())
    assert plan.summary["params_after"] == sum(p.numel() for p in pruned.parameters())
    assert 0 < weight_density(sm) < 1


def test_export_reload_and_compact_task_roundtrip(tmp_path):
    m, base = tiny()
    loaded = LoadedModel(m, base, dict(DEMO_DATA_CONFIG), [str(i) for i in range(10)], torch.device("cpu"))
    sm = apply_splora(copy.deepcopy(m), 4)
    random_adapters(sm)
    masks = random_masks(base)
    masks.apply(sm)
    x = torch.randn(4, 3, 32, 32)
    pruned, plan = fused_pruned(SeriesResult("splora", sm, masks), base)
    export(pruned, base, tmp_path / "export", plan=plan)
    again = load_exported(tmp_path / "export", device="cpu")
    assert parity(sm, again.model, x) <= 1e-5
    info = save_task(
        tmp_path / "task", sm, masks, backbone={"source": "unused"}, opts=SploraOptions(rank=4), plan=plan
    )
    assert info["learned_params"] == count_learned(sm).total
    assert 0 < info["bytes"] < (tmp_path / "export" / "model.safetensors").stat().st_size
    rebuilt, plan2 = load_task(tmp_path / "task", backbone=loaded)
    assert plan2.to_dict()["blocks"] == plan.to_dict()["blocks"]
    assert parity(sm, rebuilt, x) <= 1e-6


# ---------------------------------------------------------------------------------------------- criteria
def test_normalisation_per_layer_and_global_choice():
    s = torch.tensor([1.0, 3.0, 4.0, 100.0])
    alive = torch.tensor([True, True, True, False])
    w = normalise(s, alive, "weight")
    assert torch.allclose(w[:3].sum(), torch.tensor(1.0, dtype=torch.float64)) and math.isinf(w[3])
    t = normalise(s, alive, "taylor")
    assert torch.allclose(t[:3].norm(), torch.tensor(1.0, dtype=torch.float64))
    _, base = tiny()
    masks = UnitMasks.full(base)
    scores = {key: torch.arange(len(m), dtype=torch.float64) + 1 for key, m in masks.layers(("mlp", "embed"))}
    scores[("mlp", 1)] = scores[("mlp", 1)] * 1000  # per-layer normalisation makes the scale irrelevant
    chosen = choose_pruned(scores, masks, ("mlp", "embed"), 10, "weight")
    assert sum(len(v) for v in chosen.values()) == 10
    assert chosen.get(("mlp", 0)) == chosen.get(("mlp", 1))  # same normalised scores, same units
    # every layer keeps one unit even when asked for more
    tiny_masks = UnitMasks.full(base)
    tiny_masks.embed[1:] = False
    chosen = choose_pruned(scores, tiny_masks, ("embed",), 5, "taylor")
    assert chosen == {}


def test_weight_and_l2_criteria_score_whole_groups_of_the_adapted_weights():
    """A neuron's group is its fc1 row (weight and bias) and its fc2 column, each as W0 + BA: weight sums |w|,
    l2 sums w² over it (the reference ViT run's grouped L2 magnitude); an embedding channel's group reaches the
    norms and the classifier too."""
    m, _ = tiny()
    sm = apply_splora(m, 4)
    random_adapters(sm)
    fc1, fc2 = sm.blocks[0].mlp.fc1, sm.blocks[0].mlp.fc2
    with torch.no_grad():
        fc1.lora_B[5] = 10.0
    w1, w2 = fc1.weight + fc1.lora_B @ fc1.lora_A, fc2.weight + fc2.lora_B @ fc2.lora_A
    for criterion, power in (("weight", 1), ("l2", 2)):
        s = raw_scores(sm, criterion, [])
        expected = w1.abs().pow(power).sum(1) + fc1.bias.abs().pow(power) + w2.abs().pow(power).sum(0)
        assert torch.allclose(s[("mlp", 0)], expected.double(), rtol=1e-5), criterion
        assert int(s[("mlp", 0)].argmax()) == 5
    s = raw_scores(sm, "weight", [])
    with torch.no_grad():
        sm.head.weight[:, 3] += 100.0  # the classifier reads embedding channel 3
    assert raw_scores(sm, "weight", [])[("embed", -1)][3] > s[("embed", -1)][3] + 100


def test_uniform_selection_takes_the_same_fraction_from_every_layer():
    """The default (ViT) protocol prunes heads, head dims and MLP neurons uniformly per layer."""
    _, base = tiny()
    masks = UnitMasks.full(base)
    scopes = ("heads", "head_dims", "mlp")
    default = SploraOptions.from_params({})
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(len(m), dtype=torch.float64, generator=g) for k, m in masks.layers(scopes)}
    half = len(scores[("mlp", 1)]) // 2
    scores[("mlp", 1)][:half] = 1e-9  # many near-dead units in one layer: the global ranking takes them all
    total = sum(m.numel() for _, m in masks.layers(scopes))
    n = total // 4
    chosen = choose_pruned(scores, masks, scopes, n, default.criterion, default.selection)
    assert sum(len(v) for v in chosen.values()) == n
    for key, m in masks.layers(scopes):
        taken = chosen.get(key, [])
        assert abs(len(taken) - m.numel() / 4) <= 1, key  # the same fraction of every layer
        rest = [j for j in range(m.numel()) if j not in taken]
        if taken:  # a 3-head layer may lose none of its heads at a quarter
            assert max(float(scores[key][j]) for j in taken) <= min(float(scores[key][j]) for j in rest)
    glob = choose_pruned(scores, masks, scopes, n, "l2", "global")
    assert len(glob[("mlp", 1)]) >= min(n, half) > len(chosen[("mlp", 1)])


def test_taylor_and_grad_scores_match_a_manual_computation():
    m, _ = tiny()
    sm = apply_splora(m, 4)
    random_adapters(sm)
    data = digits_like(16)
    batches = [(data.images[:8], data.labels[:8]), (data.images[8:], data.labels[8:])]
    s = raw_scores(sm, "taylor", batches)
    g_s = raw_scores(sm, "grad", batches)
    tay = torch.zeros(sm.blocks[1].mlp.fc1.out_features, dtype=torch.float64)
    grad = torch.zeros_like(tay)
    store: dict[str, torch.Tensor] = {}
    h = sm.blocks[1].mlp.fc1.register_forward_hook(lambda mod, i, o: store.__setitem__("a", o))
    sm.requires_grad_(True)
    for x, y in batches:
        out = sm(x)
        store["a"].retain_grad()
        nn.functional.cross_entropy(out, y).backward()
        a, g = store["a"].detach(), store["a"].grad
        tay += (a * g).reshape(-1, a.shape[-1]).double().mean(0)
        grad += g.reshape(-1, g.shape[-1]).double().mean(0)
        sm.zero_grad(set_to_none=True)
    h.remove()
    assert torch.allclose(s[("mlp", 1)], tay.abs(), rtol=1e-4, atol=1e-9)
    assert torch.allclose(g_s[("mlp", 1)], grad.abs(), rtol=1e-4, atol=1e-9)
    assert set(s) >= {("heads", 0), ("head_dims", 1), ("embed", -1)}


def test_options_are_checked():
    with pytest.raises(StudioError, match="target-density"):
        SploraOptions.from_params({"target_density": 1.5})
    with pytest.raises(StudioError, match="no option 'target_macs'"):
        get_method("splora").resolve({"target_macs": 0.5})
    with pytest.raises(StudioError, match="scope"):
        SploraOptions.from_params({"scope": "heads,bogus"})
    assert SploraOptions.from_params({"compare": True}).series == ("splora", "finetune")
    with pytest.raises(StudioError, match="criterion"):
        get_method("splora").resolve({"criterion": "lrp"})


# ---------------------------------------------------------------------------------------------- schedule
def tiny_loaded() -> LoadedModel:
    m, base = tiny()
    return LoadedModel(m, base, dict(DEMO_DATA_CONFIG), [str(i) for i in range(10)], torch.device("cpu"))


def test_schedule_end_to_end_with_comparison(tmp_path):
    params = {
        "compare": True,
        "rank": 2,
        "epochs": 1,
        "recovery_epochs": 1,
        "prune_step": 0.25,
        "target_density": 0.5,
        "criterion": "taylor",
        "score_batches": 2,
        "scope": "heads,mlp,embed",
    }
    spec = PruneSpec(
        model=ModelSpec("demo"),
        method="splora",
        params=params,
        data=DataSpec("demo", limit=128),
        batch_size=32,
        bench=False,
    )
    run = RunDir.create(tmp_path / "run", spec.to_dict())
    result = run_folder(run, spec=spec, loaded=tiny_loaded())
    curves = read_curves(run)
    for name in ("splora", "finetune"):
        steps = [c for c in curves if c["series"] == name]
        assert [c["step"] for c in steps] == [0, 1, 2]
        dens = [c["unit_density"] for c in steps]
        assert (
            dens[0] == 1.0 and dens[-1] == pytest.approx(0.5, abs=2e-3) and dens == sorted(dens, reverse=True)
        )
        assert all(0 <= c["val_top1"] <= 1 and "test_top1" in c for c in steps)
        for c in steps:  # the density per unit type, and the overall one its weighted mean
            by, kept = c["density_by_unit"], c["kept"]
            assert set(by) == {"heads", "mlp", "embed"} and all(0 < v <= 1 for v in by.values())
            full = {k: kept[k] / by[k] for k in by}
            assert sum(kept.values()) / sum(full.values()) == pytest.approx(c["unit_density"])
        macs = [c["macs"] for c in steps]
        assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0]
        assert result.section["series"][name]["parity_max_abs_diff"] <= 1e-5
    sp = [c for c in curves if c["series"] == "splora"]
    ft = [c for c in curves if c["series"] == "finetune"]
    assert sp[-1]["learned_params"] < ft[-1]["learned_params"]  # the storage argument
    assert sp[-1]["learned_params"] < sp[0]["learned_params"]
    saved = json.loads((run.path / "results.json").read_text())
    assert saved["kind"] == "splora"
    saved = {**saved, **saved["splora"]}
    assert set(saved["series"]) == {"splora", "finetune"} and "density_definition" in saved
    assert saved["after"]["matches_plan"] is True
    assert saved["series"]["splora"]["task"]["bytes"] < saved["series"]["finetune"]["export_bytes"]
    plan = PrunePlan.load(run.plan_file)
    assert plan.method == "splora" and not plan.is_dense
    again = load_exported(run.export_dir, device="cpu")
    x = torch.randn(3, 3, 32, 32)
    pruned, _ = fused_pruned(SeriesResult("splora", *_rebuild(tmp_path / "run")), again.base)
    assert torch.allclose(again.model(x), pruned(x), atol=1e-5)
    assert Path(saved["series"]["finetune"]["export"]).is_dir()
    assert not list(run.path.glob("splora-*.pt"))  # resume checkpoints are removed once the job is done


def _rebuild(run_path: Path) -> tuple[nn.Module, UnitMasks]:
    model, plan = load_task(run_path / "task", backbone=tiny_loaded())
    from safetensors.torch import load_file

    masks = UnitMasks.from_tensors(load_file(str(run_path / "task" / "task.safetensors")), plan.base.depth)
    return model, masks


def test_needs_data_and_refuses_plan_only_use():
    spec = PruneSpec(model=ModelSpec("demo"), method="splora", params={}, data=None, bench=False)
    with pytest.raises(StudioError, match="--data"):
        spec.validate()
    with pytest.raises(StudioError, match="--data"):
        run_splora(spec, run=None, loaded=tiny_loaded())
    from studio.prune import PruneRequest, make_plan

    with pytest.raises(StudioError, match="job"):
        make_plan("splora", PruneRequest(tiny_loaded(), {}))


def test_cancel_then_resume_equals_an_uninterrupted_schedule(tmp_path):
    from studio.errors import Cancelled
    from studio.events import CancelToken
    from studio.prune.splora import Splits, run_series

    loaded = tiny_loaded()
    splits = Splits(train=digits_like(64, seed=1), val=digits_like(32, seed=2), test=None)
    opts = SploraOptions(
        rank=2,
        epochs=1,
        recovery_epochs=1,
        prune_step=0.25,
        target_density=0.25,
        scope=("mlp", "embed"),
        score_batches=1,
        batch_size=32,
    )
    full = run_series(loaded, loaded.base, splits, "splora", opts)
    token = CancelToken()

    def stop_after_first_step(event):
        if event.kind == "prune_step" and event.data["step"] == 1:
            token.set()

    ckpt = tmp_path / "splora-splora.pt"
    with pytest.raises(Cancelled):
        run_series(
            loaded,
            loaded.base,
            splits,
            "splora",
            opts,
            callbacks=[stop_after_first_step],
            cancel=token,
            checkpoint=ckpt,
        )
    resumed = run_series(loaded, loaded.base, splits, "splora", opts, checkpoint=ckpt, resume=True)
    assert [s["step"] for s in resumed.steps] == [0, 1, 2, 3]
    for a, b in zip(full.steps, resumed.steps):
        assert a["unit_density"] == b["unit_density"] and a["val_top1"] == pytest.approx(
            b["val_top1"], abs=1e-6
        )
    for k, v in full.model.state_dict().items():
        assert torch.allclose(v, resumed.model.state_dict()[k], atol=1e-6), k
    done = run_series(loaded, loaded.base, splits, "splora", opts, checkpoint=ckpt, resume=True)
    assert len(done.steps) == 4  # a finished series is not trained again


def test_the_vit_protocol_is_the_reference_vit_run(monkeypatch):
    """protocol=vit: grouped L2 magnitude, uniform per layer, SGD + OneCycle with clipping, the head alone for
    the first half of the adapter epochs, lr 3·bs/256; an explicit option still wins."""
    import studio.prune.splora as sp
    from studio.prune.splora import Splits, run_series

    opts = SploraOptions.from_params({"protocol": "vit", "epochs": 2}, batch_size=16)
    assert (opts.criterion, opts.selection) == ("l2", "uniform") and opts.lr_for("splora") == 3.0 * 16 / 256
    assert opts.lr_for("finetune") == pytest.approx(0.0125 * 16 / 32)
    assert SploraOptions.from_params({"protocol": "vit", "criterion": "taylor"}).criterion == "taylor"
    default = SploraOptions.from_params({})  # the ViT protocol is the default for ViTs
    assert (default.protocol, default.criterion, default.selection) == ("vit", "l2", "uniform")
    cnn = SploraOptions.from_params({"protocol": "cnn"})
    assert (cnn.criterion, cnn.selection) == ("taylor", "global")
    with pytest.raises(StudioError, match="--protocol must be one of"):
        SploraOptions.from_params({"protocol": "resnet"})

    seen: list[TrainSpec] = []
    real_fit = sp.fit
    monkeypatch.setattr(
        sp,
        "fit",
        lambda model, tr, va, spec, **kw: (seen.append(spec), real_fit(model, tr, va, spec, **kw))[1],
    )
    loaded = tiny_loaded()
    splits = Splits(train=digits_like(64, seed=1), val=digits_like(32, seed=2), test=None)
    opts = SploraOptions.from_params(
        {"protocol": "vit", "rank": 2, "epochs": 2, "recovery_epochs": 1, "prune_step": 0.25,
         "target_density": 0.5, "scope": "head_dims,mlp"},
        batch_size=32,
    )  # fmt: skip
    series = run_series(loaded, loaded.base, splits, "splora", opts)
    head, adapters, *recovery = seen
    assert (
        head.trainable == "head"
        and head.epochs == 1
        and adapters.epochs == 1
        and adapters.trainable != "head"
    )
    assert all(s.optimizer == "sgd" and s.schedule == "onecycle" and s.grad_clip == 1.0 for s in seen)
    assert all(s.weight_decay == 5e-4 for s in seen) and recovery
    for scope in ("head_dims", "mlp"):  # every layer kept the same fraction
        kept = {round(float(m.float().mean()), 2) for m in getattr(series.masks, scope)}
        assert len(kept) == 1 and kept.pop() == pytest.approx(0.5, abs=0.05), scope
