"""The model and data picker (Model page): widgets -> :class:`ModelSpec` / :class:`DataSpec`, checked and applied.

Server-side paths go through :mod:`studio.safety`'s one guard (allowed roots: the model and data fields, the
export's manifest kwargs, the "Extra timm kwargs", and every image the data lists, when it is loaded); uploads through
:func:`studio.safety.save_upload` (size and type limits, stored by content hash). A new selection only replaces the
current one after the model loaded and the data passed :func:`studio.summary.check_data`.
"""

from __future__ import annotations

import json

import streamlit as st
import torch

from ..data import DataSpec
from ..errors import StudioError
from ..models import LoadedModel, ModelSpec
from ..safety import (
    CHECKPOINT_SUFFIXES,
    check_path,
    check_timm_kwargs,
    guard_data,
    guard_model_source,
    max_upload_bytes,
    save_upload,
)
from ..summary import check_data
from . import state

MODEL_SOURCES = {
    "demo": "Demo: digits ViT (12 blocks)",
    "checkpoint": "Checkpoint on the server",
    "export": "Exported studio model",
    "upload": "Upload a checkpoint",
}
DATA_KINDS = {"demo": "Demo: digits", "imagefolder": "ImageFolder", "vtab": "VTAB-1k list files"}


def devices() -> list[str]:
    return ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def model_widgets() -> ModelSpec:
    """The model half of the form; raises :class:`StudioError` for an unusable choice."""
    source = st.radio(
        "Model", list(MODEL_SOURCES), format_func=MODEL_SOURCES.get, key="pick_model_source", horizontal=True
    )
    device = st.selectbox("Device", devices(), key="pick_device", help="auto: the GPU when there is one")
    if source == "demo":
        return ModelSpec("demo", device=device)
    if source == "export":
        path = st.text_input("Exported folder (manifest.json + model.safetensors)", key="pick_export_path")
        folder = check_path(path, what="Exported folder", kind="dir")
        return ModelSpec(guard_model_source(str(folder), what="Exported folder"), device=device)
    if source == "checkpoint":
        path = st.text_input(
            "Checkpoint file (.safetensors, .pth, .npz)", key="pick_ckpt_path", placeholder="~/vit.pth"
        )
    else:
        limit = max_upload_bytes() / 2**20
        up = st.file_uploader(
            f"Checkpoint (at most {limit:.0f} MB)",
            type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES],
            key="pick_upload",
        )
    c1, c2, c3 = st.columns(3)
    arch = c1.text_input("timm architecture", "vit_small_patch16_224", key="pick_arch")
    classes = c2.number_input("Classes (0: from the checkpoint)", 0, 100_000, 0, key="pick_classes")
    img = c3.number_input("Image size (0: the architecture's)", 0, 4096, 0, key="pick_img")
    c1, c2, c3 = st.columns([3, 1, 1])
    kwargs_text = c1.text_input("Extra timm kwargs (JSON)", "{}", key="pick_kwargs")
    reset = c2.checkbox("New classifier", key="pick_reset", help="drop the checkpoint's head (needs Classes)")
    scale = c3.number_input(
        "Convpass scale (0: none)",
        0.0,
        1e4,
        0.0,
        key="pick_convpass_scale",
        help="for a PETL-tuned checkpoint with Convpass adapters (SLS): the scale s they were trained with",
    )
    if source == "checkpoint":
        file = check_path(path, what="Checkpoint", kind="file")
    elif up is None:
        raise StudioError("Choose a checkpoint file to upload.")
    else:
        file = save_upload(up.name, up.getvalue())
    try:
        kwargs = json.loads(kwargs_text or "{}")
    except json.JSONDecodeError as e:
        raise StudioError(f"Extra timm kwargs are not valid JSON ({e.msg}).") from None
    if not isinstance(kwargs, dict):
        raise StudioError('Extra timm kwargs must be a JSON object, e.g. {"patch_size": 8}.')
    check_timm_kwargs(kwargs, where="Extra timm kwargs")
    return ModelSpec(
        str(file),
        arch=arch.strip() or None,
        num_classes=int(classes) or None,
        img_size=int(img) or None,
        reset_head=reset,
        device=device,
        kwargs=kwargs,
        convpass_scale=float(scale) or None,
    )


def data_widgets() -> DataSpec:
    kind = st.radio(
        "Data", list(DATA_KINDS), format_func=DATA_KINDS.get, key="pick_data_kind", horizontal=True
    )
    if kind == "demo":
        return DataSpec("demo")
    hint = "root/train/<class>/*.png, root/val/…" if kind == "imagefolder" else "train800.txt, test.txt, …"
    path = st.text_input(f"Folder ({hint})", key="pick_data_path")
    skip = st.checkbox("Skip unreadable images", key="pick_skip_bad")
    folder = check_path(path, what="Data folder", kind="dir")
    return DataSpec(kind, str(folder), skip_bad_files=skip)


def apply(model: ModelSpec, data: DataSpec) -> LoadedModel:
    """Make ``model``/``data`` the session's selection if the model loads and the data fits it; else keep the old."""

    previous = (state.model_spec(), state.data_spec())
    guard_data(data)  # every image the data lists, once per Load (too slow for every rerun of the form)
    state.set_specs(model, data)
    try:
        loaded = state.pristine_model()
        check_data(loaded, data)
    except BaseException:
        state.set_specs(*previous)
        raise
    if previous[0] != model:
        state.set_active_plan(None)  # a plan refers to its base model's indices
    return loaded


def form() -> None:
    """Draw the picker; on "Load" apply the selection, showing any problem as a message."""
    flash = st.session_state.pop("pick_flash", None)
    if flash:
        st.success(flash, icon=":material/check_circle:")
    with state.user_errors():
        model = data = None
        problems = []
        for build in (model_widgets, data_widgets):
            try:
                spec = build()
            except StudioError as e:
                problems.append(str(e))
                continue
            if isinstance(spec, ModelSpec):
                model = spec
            else:
                data = spec
        if st.button("Load", type="primary", key="pick_load", icon=":material/download_done:"):
            if problems:
                raise StudioError(" ".join(problems))
            assert model is not None and data is not None
            loaded = apply(model, data)
            st.session_state["pick_flash"] = (
                f"Loaded {loaded.base.arch} from {loaded.source} with data {data}."
            )
            st.rerun()  # the sidebar above was drawn with the previous selection
