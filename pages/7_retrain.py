"""Retrain: recover a pruned model's accuracy as a background job, with optional distillation, and watch it."""

from pathlib import Path

import streamlit as st

from studio import jobs
from studio.errors import StudioError
from studio.flows.retrain import RecoverySpec
from studio.models import ModelSpec
from studio.recovery import KD_MODES, infer_teacher, preset_names, resolve_recipe
from studio.runs import RunDir
from studio.ui import guide, state
from studio.ui.charts import human, pct
from studio.ui.jobs import device_picker, job_panel, start_job_button
from studio.ui.run_actions import result_actions, started_as_job, unfinished

st.title("Retrain")
st.caption(
    "Fine-tune a pruned model to win back accuracy, optionally distilling from the unpruned one. The job runs "
    "in its own process: close the tab or reload, it keeps going, and the Runs page lists it."
)

root = state.runs_root()
exported = [r for r in jobs.exports(root) if r["kind"] != "retrain" or r["status"] == "done"]
exported.sort(key=lambda r: r["kind"] == "retrain")  # pruned models first (stable: newest first within)
if not exported:
    guide.needs(
        "No pruned model yet: prune one on the Prune page (each prune run exports its model).",
        "pages/6_prune.py",
        "Prune a model",
    )
    st.stop()


def _label(r: dict) -> str:
    acc = f" · top-1 {pct(r['top1'])}" if r.get("top1") is not None else ""
    return f"{r['run']} · {r['kind']} {r['method']} · {human(r['params'])} params{acc}"


labels = {_label(r): r for r in exported}
wanted = st.session_state.pop("retrain_pick", None)  # a run sent here by another page's Retrain button
if wanted is not None:
    same = [k for k, r in labels.items() if Path(r["path"]).resolve() == Path(wanted).resolve()]
    st.session_state["retrain_model"] = same[0] if same else None
if st.session_state.get("retrain_model") not in labels:
    st.session_state.pop("retrain_model", None)
picked = labels[st.selectbox("Pruned model", list(labels), key="retrain_model")]
model = str(Path(picked["path"]) / "export")
teacher_spec = infer_teacher(model)

st.markdown("##### Recipe")
_RECIPE_KEYS = [f"retrain_{k}" for k in ("kd", "t", "alpha", "epochs", "lr", "ls", "patience")]
_RECIPE_KEYS += [
    f"retrain_{k}" for k in ("augment", "aa", "re", "mixup", "cutmix")
]  # widgets showing the recipe
r1, r2 = st.columns([1, 2])
preset = r1.selectbox(
    "Preset",
    preset_names(),
    key="retrain_preset",
    help="quick: a few CPU minutes. paper: the recipe of the method that pruned the model.",
)
with state.user_errors():
    recipe = resolve_recipe(preset, picked["method"])
    r2.caption(f"**{recipe.name}** — {recipe.source}")
    # another recipe (preset, or the method behind "paper"): its widgets show its values, not the last ones typed
    if st.session_state.get("retrain_recipe_shown") != recipe.name:
        for key in _RECIPE_KEYS:
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
    teacher = st.text_input(
        "Teacher (the unpruned model)",
        value=teacher_spec.source if teacher_spec else "demo",
        key="retrain_teacher",
        disabled=kd == "none",
    )
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
    device, nproc = device_picker("retrain")
    data = state.data_spec()
    st.caption(f"Data: {data} (train to fit, val to select and stop early, test for the final number).")


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
spec = RecoverySpec(
    model=ModelSpec(model, device=device),
    data=data,
    teacher=ModelSpec(teacher, device=device) if kd != "none" and teacher else None,
    preset=preset,
    overrides=overrides,
)


busy = jobs.device_holder(device, root)
if busy:
    st.info(f"{device} is busy with job {Path(busy['run']).name}; this job will be refused until it ends.")
start_job_button("Start retraining", spec, key="retrain_start", device=device, nproc=nproc)


def _is_retrain(run: str) -> bool:
    """A retraining started as a job (a damaged spec.json is not one)."""
    try:
        return started_as_job(run) and RunDir(run).spec().get("kind") == "retrain"
    except StudioError:
        return False


current = st.session_state.get("retrain_start_run")
if not current or not Path(current).is_dir():
    # nothing started in this session (or a reload): follow the newest retraining still running or resumable
    current = next((s.run for s in jobs.list_jobs(root) if _is_retrain(s.run) and unfinished(s.run)), None)
if current:
    st.subheader("Job", divider="gray")
    job_panel(current)
    if jobs.job_status(current).state == "done" and RunDir(current).results_file.exists():
        result_actions(current, key="retrain_result")
    guide.next_step(("pages/8_runs.py", "compare it with your other runs"))
