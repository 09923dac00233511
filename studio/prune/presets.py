"""Paper presets: per method, the reference settings as data, with a named source for every number.

A method's registered option defaults are the studio's own (the ``cpu`` preset): where they differ from the
paper's, :attr:`MethodPreset.cpu_reasons` says why (CPU time, a documented deviation), and a test refuses a
difference without a reason. ``paper:<method>`` sets every value below, method options and the calibration
fields of the run (batches, batch size, split); options given on the command line or the page win over it.
What the studio cannot reproduce at all (another optimiser, multi-GPU batches) is listed in ``not_reproduced``.

The table in ``docs/results/presets.md`` is generated from this module (``python -m studio.prune.presets``),
and a test checks that it equals the code. Sources are the authors' repositories as read for the research notes
(``shared/research/methods_sls_p3b.md``, ``methods_savit_iso_spa.md``; section numbers in brackets).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import StudioError
from . import get_method
from .p3b import DEFAULT_GATE_WEIGHTS

RUN_FIELDS = ("calib_batches", "batch_size", "calib_split")  # PruneSpec fields a preset may set
CPU = "cpu"


@dataclass(frozen=True)
class Setting:
    """One preset value and where it comes from."""

    value: Any
    source: str


@dataclass(frozen=True)
class MethodPreset:
    """The reference settings of one method.

    Attributes:
        options: method options (``prune --OPTION``), each with its source.
        run: calibration fields of the run spec (:data:`RUN_FIELDS`), each with its source.
        cpu_reasons: per option (or run field) whose studio default differs from ``options``/``run``: why.
        not_reproduced: reference settings the studio has no option for.
    """

    name: str
    method: str
    options: Mapping[str, Setting]
    run: Mapping[str, Setting] = field(default_factory=dict)
    cpu_reasons: Mapping[str, str] = field(default_factory=dict)
    not_reproduced: tuple[str, ...] = ()

    def values(self) -> dict[str, Any]:
        return {k: s.value for k, s in self.options.items()}

    def run_values(self) -> dict[str, Any]:
        return {k: s.value for k, s in self.run.items()}


_RUN_DEFAULTS = {"calib_batches": None, "batch_size": 64, "calib_split": "train"}  # PruneSpec's / the CLI's

_SLS = "RuiZiHan/SLS prune.py"
_ISO = "VainF/Isomorphic-Pruning prune.py"
_SAVIT = "hikvision-research/SAViT"
_P3B = "PatGlan/Pruning_by_Block_Benefit"
_SPA = "LukasHedegaard/channel-spa-experiments main_vit.py"

PRESETS: dict[str, MethodPreset] = {
    "paper:sls": MethodPreset(
        "paper:sls",
        "sls",
        options={
            "alpha": Setting(0.3, f"{_SLS}: default alpha 0.3 of the top-down cut rule [§1.2 step 8]"),
            "keep_blocks": Setting(0, "the paper chooses the cut by the alpha rule, never by hand [§1.2]"),
            "embed": Setting("tsne", f"{_SLS}: sklearn TSNE(n_components=2, init='pca') [§1.2 step 6]"),
            "perplexity": Setting(
                30.0, f"{_SLS}: sklearn's default perplexity, not overridden [§1.2 step 6]"
            ),
            "lazy": Setting(
                True,
                f"{_SLS}: t-SNE one layer at a time from the top, stopping at the first failure [§1.2 step 8]",
            ),
            "samples": Setting(
                1000,
                f"{_SLS}: the VTAB-1k training loader (1,000 images; its drop_last batching at 64 reads 960 of "
                "them) [§1.2 step 5]",
            ),
        },
        run={
            "batch_size": Setting(64, f"{_SLS}: train_dl batch 64 [§1.2 step 5]"),
            "calib_split": Setting(
                "train", f"{_SLS}: features of the training loader, no augmentation [§1.2 step 5]"
            ),
        },
        cpu_reasons={
            "lazy": "off: the studio shows the whole silhouette curve; the cut is the same either way",
        },
    ),
    "paper:isomorphic": MethodPreset(
        "paper:isomorphic",
        "isomorphic",
        options={
            "ratio": Setting(0.5, "scripts/pruning, DeiT-4.2G: --pruning-ratio 0.5 [§2.6 table]"),
            "head_ratio": Setting(0.5, "scripts/pruning, DeiT-4.2G: --head-pruning-ratio 0.5 [§2.6 table]"),
            "head_dim_ratio": Setting(
                0.25, "scripts/pruning, DeiT-4.2G: --head-dim-pruning-ratio 0.25 [§2.6 table]"
            ),
            "target_macs": Setting(
                None, "the reference hand-tunes the ratio triple per target; no MACs search [§2.6]"
            ),
            "importance": Setting("taylor", f"{_ISO}: GroupTaylorImportance() [§2.4]"),
            "round_to": Setting(2, f"{_ISO}: MetaPruner(..., round_to=2) [§2.6]"),
            "scale_policy": Setting("reset", f"{_ISO}: scale = head_dim**-0.5 after pruning [§2.6, §2.10]"),
        },
        run={
            "calib_batches": Setting(50, f"{_ISO}: --taylor-batchs 50, gradients summed [§2.4]"),
            "batch_size": Setting(64, f"{_ISO}: 64 training images per gradient batch [§2.4]"),
            "calib_split": Setting("train", f"{_ISO}: training images with eval transforms [§2.4]"),
        },
        cpu_reasons={
            "ratio": "none: every method's budget is given (--ratio or --target-macs)",
            "round_to": "1: exact widths, the common default of every method (the Prune page offers 8)",
            "scale_policy": "keep: the pruned model computes the same function on the kept dims, which a short "
            "recovery needs (the reference fine-tunes for 300 epochs)",
            "calib_batches": "8 batches: seconds on a CPU, where 50 take minutes",
        },
    ),
    "paper:savit": MethodPreset(
        "paper:savit",
        "savit",
        options={
            "target_macs": Setting(
                0.5,
                f"{_SAVIT} scripts, DeiT-B: --pruning_flops_percentage 0.50 (the reference counts block MACs "
                "only; the studio's target is the whole model's) [§1.7]",
            ),
            "hessian_embed": Setting(6.0, f"{_SAVIT}: --hessian_embed default 6.0 [§1.4]"),
            "hvp_every": Setting(1, f"{_SAVIT}: --need_hessian, HVPs on every scoring batch [§1.4]"),
            "hvp_batches": Setting(
                4000,
                f"{_SAVIT}: --pruning_feed_percent 0.1, about 4,000 ImageNet batches of 32 [§1.7]",
            ),
            "protect": Setting(0.05, f"{_SAVIT}: --pruning_protect, 5 % of every layer kept [§1.6]"),
            "flops_tol": Setting(1e-4, f"{_SAVIT}: --pruning_flops_threshold 1e-4 [§1.7]"),
            "round_to": Setting(1, f"{_SAVIT}: no width rounding in the deploy step [§1.6]"),
        },
        run={
            "batch_size": Setting(32, f"{_SAVIT} scripts: scoring at batch 32 [§1.7]"),
            "calib_split": Setting("train", f"{_SAVIT}: ImageNet training images [§1.7]"),
        },
        cpu_reasons={
            "target_macs": "none: every method's budget is given",
            "hvp_batches": "8: an HVP batch costs about 7 forward passes, so 4,000 take hours on a CPU; the plan "
            "records the split's standard error (params.split_spread) so the noise is visible",
            "flops_tol": "1e-3: a small model's MACs move in coarse steps and 1e-4 is often unreachable",
            "batch_size": "64: the studio's common calibration batch",
        },
        not_reproduced=(
            "train-time augmentation and mixup/cutmix during scoring (the studio scores on eval transforms)",
            "the evolution strategy: replaced by the exact grid search over the same objective",
        ),
    ),
    "paper:p3b": MethodPreset(
        "paper:p3b",
        "p3b",
        options={
            "prune_ratio": Setting(0.5, f"{_P3B} README: IFOOD / INAT19 at prune ratio 50 % [§2.9]"),
            "epochs": Setting(50, f"{_P3B} README: the pruning run's 50 epochs [§2.8]"),
            "start_epoch": Setting(10, f"{_P3B} README: --prune-start-epoch 10 [§2.8]"),
            "sparse_epoch": Setting(25, f"{_P3B} utils/args.py: prune-sparse-epoch 25 [§2.8]"),
            "finalize_epoch": Setting(50, f"{_P3B} utils/args.py: prune-finalize-epoch 50 [§2.8]"),
            "steps_per_update": Setting(
                None, f"{_P3B} README: scale K to about 3 mask updates per epoch (the studio's rule) [§2.8]"
            ),
            "probe": Setting("conv", f"{_P3B} models/FmAnalyseHead.py: conv patch probes [§2.10]"),
            "lr": Setting(5e-4, f"{_P3B} utils/args.py: 5e-4 x batch·world/512 x accum = 5e-4 [§2.8]"),
            "probe_lr": Setting(5e-4, f"{_P3B}: probe heads at lr 5e-4 [§2.10]"),
            "weight_decay": Setting(0.05, f"{_P3B} utils/args.py: wd 0.05 [§2.8]"),
            "label_smoothing": Setting(0.1, f"{_P3B}: DeiT recipe, smoothing 0.1 [§2.8]"),
            "gamma": Setting(0.2, f"{_P3B} utils/args.py: pr-gamma 0.2 [§2.8]"),
            "alpha": Setting(0.5, f"{_P3B} utils/args.py: pr-alpha 0.5 [§2.8]"),
            "imp_scale": Setting(10.0, f"{_P3B} utils/args.py: pr-block-imp-scale 10 [§2.8]"),
            "tau_max": Setting(0.1, f"{_P3B} utils/args.py: pr-tau-max 0.1 [§2.8]"),
            "tau_min": Setting(0.0, f"{_P3B} utils/args.py: pr-tau-min 0.0 [§2.8]"),
            "gate_weights": Setting(
                DEFAULT_GATE_WEIGHTS, f"{_P3B} utils/args.py: prune-scale-gate-imp [§2.8]"
            ),
            "min_keep": Setting(0.0, f"{_P3B} PruneLoss.get_kr_blockwise: κ clamped to [0, 1] [§2.5]"),
            "block_params_only": Setting(False, f"{_P3B}: --prune-rate-by-block-param-only not set [§2.5]"),
            "zero_floor": Setting(False, f"{_P3B} transform_block_imp: the soft clamp alone [§2.4]"),
            "masks_in_optimizer": Setting(
                True,
                f"{_P3B} utils/optimizer.py: the gates land in AdamW's no-decay group (quirk Q2) [§2.11]",
            ),
            "accum_steps": Setting(2, f"{_P3B} README: 4 GPUs x batch 64, gradient accumulation 2 [§2.8]"),
        },
        run={"batch_size": Setting(64, f"{_P3B} README: batch 64 per GPU [§2.8]")},
        cpu_reasons={
            "epochs": "40: the demo's job length (docs/results/p3b.md), pruning and fine-tuning in one job",
            "start_epoch": "10 % of the epochs (args.py's 5 of 50), scaled with --epochs",
            "sparse_epoch": "25 % of the epochs, scaled with --epochs",
            "finalize_epoch": "50 %: the studio fine-tunes the sliced model in the same job; the reference slices "
            "at epoch 50 and fine-tunes in a separate 300-epoch run",
            "probe": "auto: conv on a GPU, mean-pool on a CPU (conv probes add ≈64 M parameters for DeiT-S)",
            "masks_in_optimizer": "off: AdamW moving the gates between updates looks unintended (Q2)",
            "accum_steps": "1: one process's batch of 64 is the step; the paper accumulates 2 to reach its global "
            "batch of 512 on 4 GPUs",
        },
        not_reproduced=(
            "the 4 GPUs themselves: start the job with 4 processes (the page's GPUs box, or torchrun "
            "--nproc_per_node 4 -m studio run RUN) for the global batch of 512",
            "mask-update steps count optimizer steps, where the reference counts micro-batches (Q7)",
            "RandAugment, mixup/cutmix, random erasing and repeated augmentation (the DeiT recipe)",
        ),
    ),
    "paper:splora": MethodPreset(
        "paper:splora",
        "splora",
        options={
            "protocol": Setting(
                "vit",
                f"{_SPA} main_vit.py: grouped L2 magnitude, uniform per layer (global off), SGD m0.9 wd 5e-4, "
                "OneCycleLR, grad-clip 1.0, head only for init/2 epochs, lr 3.0·bs/256 [§3.3]",
            ),
            "rank": Setting(8.0, f"{_SPA}: the ViT script's rank 8 [§3.1]"),
            "init_range": Setting(1e-3, f"{_SPA}: --init_range default 1e-3 [§3.1]"),
            "prune_step": Setting(0.05, f"{_SPA}: 5 % of the original channels per step [§3.3]"),
            "target_density": Setting(0.05, f"{_SPA}: down to 95 % channel sparsity (19 steps) [§3.3]"),
            "epochs": Setting(20, f"{_SPA}: init epochs 20 for CIFAR (head-only half, then all) [§3.3]"),
            "recovery_epochs": Setting(10, f"{_SPA}: 10 recovery epochs per step for CIFAR [§3.3]"),
            "score_batches": Setting(
                0, "src/filterprune.py: scores over one full pass of the training set [§3.2]"
            ),
        },
        run={"batch_size": Setting(16, f"{_SPA}: batch 16 [§3.3]")},
        cpu_reasons={
            "target_density": "0.3: fewer pruning steps on a CPU",
            "epochs": "10: the demo's sized run (docs/results/splora.md)",
            "recovery_epochs": "2: the demo's sized run",
            "batch_size": "64: the studio's common batch",
        },
        not_reproduced=(
            "torch-pruning itself: the studio sums w² over each unit's group of adapted weights, which torch-pruning's "
            "SPLoRA glue skipped for adapter-only groups (round_to = num_heads holds by construction: a head dim "
            "is pruned in every head at once)",
        ),
    ),
}


def preset_names(method: str | None = None) -> list[str]:
    """What ``prune --preset`` accepts (for ``method``): ``cpu`` (the studio defaults), ``paper`` (the
    method's), and each ``paper:<method>``."""
    names = [n for n, p in PRESETS.items() if method is None or p.method == method]
    return [CPU, "paper", *names] if names or method is None else [CPU]


def get_preset(name: str, method: str) -> MethodPreset | None:
    """The preset ``name`` means for ``method`` (None for ``cpu``: the registered defaults)."""
    if name == CPU:
        return None
    key = f"paper:{method}" if name == "paper" else name
    if key not in PRESETS:
        raise StudioError(
            f"Preset '{name}' is unknown for method '{method}'. Valid: {', '.join(preset_names(method))}."
        )
    preset = PRESETS[key]
    if preset.method != method:
        raise StudioError(
            f"Preset '{name}' is for method '{preset.method}', not '{method}': use --preset paper."
        )
    return preset


def apply_preset(
    name: str | None, method: str, given: Mapping[str, Any], run: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, run fields)``: the preset's values with the ``given`` ones (not None) on top."""
    preset = None if name is None else get_preset(name, method)
    params = {} if preset is None else preset.values()
    params.update({k: v for k, v in given.items() if v is not None})
    fields_ = {} if preset is None else preset.run_values()
    fields_.update({k: v for k, v in (run or {}).items() if v is not None})
    return params, fields_


def active_preset(method: str, params: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> str:
    """Which preset a run's settings are: ``paper:<method>``, ``cpu`` (the studio defaults) or ``custom``."""
    m = get_method(method)
    try:
        resolved = m.resolve({k: v for k, v in params.items() if v is not None})
    except StudioError:  # a bad value is refused elsewhere (spec.validate); here it is simply no preset
        return "custom"
    run_now = {**_RUN_DEFAULTS, **{k: v for k, v in (run or {}).items() if k in RUN_FIELDS and v is not None}}
    for preset in (p for p in PRESETS.values() if p.method == method):
        full = m.resolve(preset.values())
        if all(resolved.get(k) == full.get(k) for k in full) and all(
            run_now.get(k) == v for k, v in preset.run_values().items()
        ):
            return preset.name
    budgets = {b.option for b in m.budgets}
    defaults = m.resolve({})
    same = all(resolved[k] == defaults[k] for k in resolved if k not in budgets)
    same_run = run_now["batch_size"] == 64 and run_now["calib_split"] == "train"
    same_run &= run_now["calib_batches"] in (None, m.calib_batches(resolved, 64))
    return CPU if same and same_run else "custom"


def studio_default(method: str, key: str) -> Any:
    """The studio's (``cpu``) value of an option or run field, for the table."""
    if key in RUN_FIELDS:
        if key == "calib_batches":
            return get_method(method).calib_batches({}, 64)
        return _RUN_DEFAULTS[key]
    return get_method(method).resolve({}).get(key)


def _fmt(v: Any) -> str:
    return "–" if v is None else f"`{v}`"


def markdown() -> str:
    """The presets as ``docs/results/presets.md`` (one table per method), generated from :data:`PRESETS`."""
    out = [
        "# Paper presets",
        "",
        "Generated from `studio/prune/presets.py` by `python -m studio.prune.presets > docs/results/presets.md`;",
        "`tests/test_presets.py` checks that this file equals the code. `prune --preset paper` (or",
        "`paper:<method>`) sets the *paper* column; without a preset a run uses the *studio (cpu)* column, the",
        "registered defaults, and each difference says why. Section numbers refer to the research notes",
        "(`methods_sls_p3b.md`, `methods_savit_iso_spa.md`).",
        "",
    ]
    for preset in PRESETS.values():
        out += [
            f"## {preset.name}",
            "",
            "| setting | paper | source | studio (cpu) | why the studio differs |",
        ]
        out.append("|---|---|---|---|---|")
        rows = [(k, s) for k, s in preset.options.items()] + [(f"run.{k}", s) for k, s in preset.run.items()]
        for key, s in rows:
            bare = key.removeprefix("run.")
            ours = studio_default(preset.method, bare)
            why = preset.cpu_reasons.get(bare, "") if ours != s.value else ""
            out.append(f"| {key} | {_fmt(s.value)} | {s.source} | {_fmt(ours)} | {why} |")
        if preset.not_reproduced:
            out += ["", "Not reproduced:", *(f"- {t}" for t in preset.not_reproduced)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - the docs generator
    sys.stdout.write(markdown())
