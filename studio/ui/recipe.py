"""The Retrain page's recipe form: a preset resolved for the pruning method, and a widget per recipe option
whose values become the run's overrides (the one form a recovery spec takes: :class:`RecoverySpec`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from ..recovery import KD_MODES, preset_names, resolve_recipe

# the widgets showing the recipe: cleared when another recipe is picked, so they show its values
RECIPE_KEYS = [
    f"retrain_{k}"
    for k in (
        "kd",
        "t",
        "alpha",
        "epochs",
        "lr",
        "ls",
        "patience",
        "augment",
        "aa",
        "re",
        "mixup",
        "cutmix",
        "ckpt",
    )
]


@dataclass(frozen=True)
class RecipeChoice:
    """What the form chose: the preset, the distillation mode and teacher (source, and the timm architecture of a
    checkpoint file, empty otherwise), and the overrides of the preset."""

    preset: str
    kd: str
    teacher: str
    overrides: dict[str, Any]
    teacher_arch: str = ""


def recipe_form(method: str, teacher_default: str, teacher_arch_default: str = "") -> RecipeChoice:
    """Draw the recipe widgets for a model pruned by ``method``; ``teacher_default``: the inferred teacher (and
    ``teacher_arch_default`` its architecture, when it is a checkpoint file)."""
    r1, r2 = st.columns([1, 2])
    preset = r1.selectbox(
        "Preset",
        preset_names(),
        key="retrain_preset",
        help="quick: a few CPU minutes. paper: the recipe of the method that pruned the model.",
    )
    recipe = resolve_recipe(preset, method)
    r2.caption(f"**{recipe.name}** — {recipe.source}")
    # another recipe (preset, or the method behind "paper"): its widgets show its values, not the last ones typed
    if st.session_state.get("retrain_recipe_shown") != recipe.name:
        for key in RECIPE_KEYS:
            st.session_state.pop(key, None)
        st.session_state["retrain_recipe_shown"] = recipe.name

    k1, k2, k3 = st.columns(3)
    kd = k1.radio(
        "Distillation",
        KD_MODES,
        index=KD_MODES.index(recipe.kd),
        horizontal=True,
        key="retrain_kd",
        help="soft: KL to the teacher's softened outputs (Hinton); hard: CE to its argmax (DeiT).",
    )
    temperature = k2.number_input(
        "Temperature T", 0.5, 20.0, float(recipe.temperature), 0.5, key="retrain_t", disabled=kd != "soft"
    )
    alpha = k3.slider(
        "Distillation weight α",
        0.0,
        1.0,
        float(recipe.alpha),
        0.05,
        key="retrain_alpha",
        disabled=kd == "none",
    )
    t1, t2 = st.columns([2, 1])
    teacher = t1.text_input(
        "Teacher",
        value=teacher_default,
        key="retrain_teacher",
        disabled=kd == "none",
        help="the unpruned model (an exported folder or demo), or a checkpoint file of any timm architecture.",
    )
    teacher_arch = t2.text_input(
        "Teacher architecture",
        value=teacher_arch_default,
        key="retrain_teacher_arch",
        disabled=kd == "none",
        placeholder="e.g. regnety_160",
        help="the timm architecture of a teacher checkpoint file, CNN or ViT (DeiT distils from RegNetY-160); "
        "empty for an exported folder. The teacher keeps its own input size and mean/std: each batch is "
        "converted for it.",
    ).strip()
    o1, o2, o3, o4 = st.columns(4)
    epochs = o1.number_input("Epochs", 1, 1000, recipe.epochs, key="retrain_epochs")
    lr = o2.number_input("Learning rate", 1e-6, 1.0, recipe.lr, format="%.1e", key="retrain_lr")
    smoothing = o3.number_input("Label smoothing", 0.0, 0.5, recipe.label_smoothing, 0.05, key="retrain_ls")
    patience = o4.number_input(
        "Early stop (epochs, 0 = off)", 0, 100, recipe.early_stop or 0, key="retrain_patience"
    )
    # timm's training parts, as the recipe sets them (the DeiT-recipe papers: RandAugment, erasing, Mixup/CutMix)
    a1, a2, a3, a4, a5 = st.columns([1.2, 1.6, 1, 1, 1])
    augment = a1.checkbox(
        "Augment training images",
        value=recipe.train_spec().augments,
        key="retrain_augment",
        help="timm's training transform: random resized crop and flip, then the policy and random erasing. "
        "Off: the images the model is evaluated on, decoded once.",
    )
    policy = a2.text_input(
        "RandAugment / AutoAugment policy",
        value=recipe.auto_augment or "",
        key="retrain_aa",
        disabled=not augment,
        help="a timm policy string, e.g. rand-m9-mstd0.5-inc1 (DeiT's RandAugment); empty: none.",
    )
    re_prob = a3.number_input(
        "Random erasing p", 0.0, 1.0, float(recipe.re_prob), 0.05, key="retrain_re", disabled=not augment
    )
    mixup = a4.number_input(
        "Mixup α",
        0.0,
        10.0,
        float(recipe.mixup),
        0.1,
        key="retrain_mixup",
        disabled=kd != "none",
        help="timm's Mixup (DeiT: 0.8); with the plain cross-entropy only, so off while distilling.",
    )
    cutmix = a5.number_input(
        "CutMix α",
        0.0,
        10.0,
        float(recipe.cutmix),
        0.1,
        key="retrain_cutmix",
        disabled=kd != "none",
        help="timm's CutMix (DeiT: 1.0); with the plain cross-entropy only, so off while distilling.",
    )
    checkpointing = st.checkbox(
        "Activation checkpointing",
        value=recipe.grad_checkpointing,
        key="retrain_ckpt",
        help="recompute each block's activations in the backward pass instead of keeping them: about a third "
        "more compute for a much lower peak memory (a ViT-B at 224 px on a small GPU or a CPU machine).",
    )
    overrides = {
        "kd": kd,
        "epochs": int(epochs),
        "lr": float(lr),
        "label_smoothing": float(smoothing),
        "early_stop": int(patience),
        **({"alpha": float(alpha), "temperature": float(temperature)} if kd != "none" else {}),
        "augment": bool(augment),
        "auto_augment": (policy.strip() or "none") if augment else "none",
        "re_prob": float(re_prob) if augment else 0.0,
        "grad_checkpointing": bool(checkpointing),
        "mixup": float(mixup) if kd == "none" else 0.0,
        "cutmix": float(cutmix) if kd == "none" else 0.0,
    }
    return RecipeChoice(preset, kd, teacher, overrides, teacher_arch)
