"""The one export format: ``model.safetensors`` + ``manifest.json``, loaded without any pickle.

The manifest records the base timm architecture and its kwargs, the applied plan, the data config, class
names, metrics and library versions. Loading rebuilds the base, applies the plan (same surgery as pruning),
then loads the weights strictly — so a pruned model reloads in a fresh process with identical logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .device import resolve_device
from .errors import StudioError
from .models import LoadedModel, create_vit, data_config
from .petl import adapter_of, attach_adapter
from .plan import BaseArch, PrunePlan
from .runs import atomic_path, write_json
from .surgery import apply_plan

MANIFEST_SCHEMA = "pruning-studio/model"
MANIFEST_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
# what the manifest's checksum covers: every field that changes what the loaded model computes, plus the weights
INTEGRITY_FIELDS = ("base", "plan", "data_config", "class_names")


def library_versions() -> dict[str, str]:
    import torch_pruning

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "studio": __version__,
    }


def export(
    model: torch.nn.Module,
    base: BaseArch,
    folder: str | Path,
    *,
    plan: PrunePlan | None = None,
    data_config: Mapping[str, Any] | None = None,
    class_names: list[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    class_names_known: bool | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/manifest.json`` as one atomic folder; return the folder.

    The export is written into a temporary sibling folder and renamed into place, so a reader sees the old
    export or the new one, never a mix (no stale ``model.onnx`` beside new weights).

    Args:
        model: the (pruned) timm model whose weights are saved.
        base: the unpruned architecture the plan refers to.
        plan: the plan applied to ``base`` to obtain ``model``'s structure (None: unpruned).
        class_names: the classes the model was trained with, in label order (None: unknown, "0".."N-1" stored).
        dtype: optionally store floating weights in a smaller dtype (e.g. ``torch.float16``).
        class_names_known: whether ``class_names`` are real (default: whether they were given); recorded so that
            loading data with other classes is refused, but a placeholder list never is.
        overwrite: replace a non-empty ``folder`` (refused otherwise: an existing output is never overwritten
            without the user asking).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise StudioError(
            f"{folder} already exists and is not empty: export into a new folder, or pass --overwrite to "
            "replace it."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        known = class_names is not None if class_names_known is None else class_names_known
        _write_export(staging, model, base, plan, data_config, class_names, known, metrics, extra, dtype)
        _check_reload(staging, model, (data_config or {}).get("input_size"), exact=dtype is None)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


RELOAD_CHECK = "reload.json"
RELOAD_ATOL = 1e-4


def _check_reload(
    folder: Path, model: torch.nn.Module, input_size: Sequence[int] | None, *, exact: bool
) -> None:
    """Load the written folder back the way a user will (no pickle, strict) and compare its logits with the
    model's on a seeded random batch; record the result in ``reload.json`` and refuse an export that does not
    reload to the same model (float32 weights; smaller stored dtypes are recorded, not refused)."""
    size = list(input_size or data_config(model)["input_size"])
    device = next(model.parameters()).device
    x = torch.randn(2, *size[-3:], generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    try:
        with torch.inference_mode():
            want = model.eval()(x).float()
            got = load_exported(folder, device=device).model(x).float()
    finally:
        model.train(was_training)
    diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
    write_json(
        folder / RELOAD_CHECK,
        {"backend": "eager", "checked": True, "max_abs_diff": diff, "atol": RELOAD_ATOL, "exact": exact},
    )
    if exact and not diff <= RELOAD_ATOL:
        raise StudioError(
            f"The export does not reload to the same model (max |logit difference| {diff:.2e} > {RELOAD_ATOL}): "
            "this is a studio bug for this architecture; please report it with the model name."
        )


def _replace_folder(new: Path, folder: Path) -> None:
    """Put ``new`` where ``folder`` is, with a rename (the old one, if any, is moved aside and then removed)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
    new.rename(folder)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _write_export(
    folder: Path,
    model: torch.nn.Module,
    base: BaseArch,
    plan: PrunePlan | None,
    data_config: Mapping[str, Any] | None,
    class_names: list[str] | None,
    class_names_known: bool,
    metrics: Mapping[str, Any] | None,
    extra: Mapping[str, Any] | None,
    dtype: torch.dtype | None,
) -> None:
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "version": MANIFEST_VERSION,
        "base": base.to_dict(),
        "plan": None if plan is None else plan.to_dict(),
        "data_config": dict(data_config or {}),
        "class_names": list(class_names or [str(i) for i in range(base.num_classes)]),
        "class_names_known": bool(class_names_known and class_names),
        "metrics": dict(metrics or {}),
        "versions": library_versions(),
        "weights_dtype": str(dtype or "float32").removeprefix("torch."),
        "adapter": adapter_of(model),  # unfoldable PETL adapters the reload rebuilds (Convpass), or None
        **dict(extra or {}),
    }
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt", "schema": MANIFEST_SCHEMA})
    write_json(folder / MANIFEST, manifest)
    # the checksum is taken over the manifest as it reads back (tuples as lists, numbers as JSON writes them)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    manifest["integrity"] = integrity(manifest, folder / WEIGHTS)
    write_json(folder / MANIFEST, manifest)


# ---------------------------------------------------------------------------------------------- integrity
def _sha256_json(value: Any) -> str:
    # canonical JSON (sorted keys, no spaces): the same value always hashes the same, however it was written
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def integrity(manifest: Mapping[str, Any], weights: Path) -> dict[str, Any]:
    """The manifest's ``integrity`` section: sha256 of the weights file and of each field that changes the model.

    One digest per part (not one over all) so a mismatch can say what was changed.
    """
    return {
        "algorithm": "sha256",
        "weights": _sha256_file(weights),
        **{k: _sha256_json(manifest.get(k)) for k in INTEGRITY_FIELDS},
    }


def verify_integrity(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse an export whose manifest or weights changed after it was written (checksum mismatch).

    A hand-edited kept index, architecture, activation, ``scale_policy`` or mean still builds a valid model, just
    not the one that was exported: without this check it would load and predict differently. Exports written
    before checksums existed load with a warning.
    """
    recorded = manifest.get("integrity")
    if recorded is None:
        warnings.warn(
            f"{folder} has no checksum (exported by an older studio), so changes to its manifest or weights "
            "cannot be detected; export it again to add one.",
            UserWarning,
            stacklevel=3,
        )
        return
    if not isinstance(recorded, dict) or recorded.get("algorithm") != "sha256":
        raise StudioError(
            f"{folder / MANIFEST} has an unreadable 'integrity' section: the export is damaged; export it again."
        )
    changed = [k for k in INTEGRITY_FIELDS if recorded.get(k) != _sha256_json(manifest.get(k))]
    if recorded.get("weights") != _sha256_file(folder / WEIGHTS):
        changed.append(f"weights ({WEIGHTS})")
    if changed:
        what = ", ".join(f"'{k}'" if k in INTEGRITY_FIELDS else k for k in changed)
        raise StudioError(
            f"{folder} was changed after export: the checksum recorded in {MANIFEST} no longer fits its {what}, "
            "so it would not compute what was exported; export the model again from its source."
        )


def export_loaded(
    model: torch.nn.Module,
    loaded: LoadedModel,
    folder: str | Path,
    *,
    plan: PrunePlan | None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """:func:`export` of ``model``, a pruned form of ``loaded`` (a LoadedModel): its base, data config and classes."""
    return export(
        model,
        loaded.base,
        folder,
        plan=plan,
        data_config=loaded.data_config,
        class_names=loaded.class_names,
        class_names_known=loaded.class_names_known,
        metrics=metrics,
        extra=extra,
        overwrite=overwrite,
    )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudioError(f"{folder} has no {MANIFEST}: it is not an exported studio model.") from None
    except json.JSONDecodeError as e:
        raise StudioError(
            f"{path} is not valid JSON (line {e.lineno}): the export is damaged; export again."
        ) from None
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise StudioError(f"{path} is not a Pruning Studio manifest (schema should be '{MANIFEST_SCHEMA}').")
    if manifest.get("version") != MANIFEST_VERSION:
        raise StudioError(
            f"{path} has manifest version {manifest.get('version')}; this studio reads {MANIFEST_VERSION}."
        )
    return manifest


def build_from_manifest(manifest: Mapping[str, Any]) -> tuple[torch.nn.Module, BaseArch, PrunePlan | None]:
    """Rebuild the (pruned) architecture of an export with random weights: base -> plan surgery."""

    if not isinstance(manifest.get("base"), dict):
        raise StudioError(
            f"{MANIFEST} has no 'base' architecture: the export is damaged; export the model again."
        )
    base = BaseArch.from_dict(manifest["base"])
    _check_kwargs_fit(base)  # before anything is allocated: the kwargs, not the base's sizes, build the model
    model = create_vit(base.arch, **base.kwargs)
    plan = None
    if manifest.get("plan") is not None:
        try:
            plan = PrunePlan.from_dict(manifest["plan"])
        except StudioError as e:
            raise StudioError(f"{MANIFEST}: its plan is invalid: {e}") from None
        if plan.base.to_dict() != base.to_dict():
            raise StudioError(
                "The manifest's plan was made for another base architecture than the manifest's "
                f"({plan.base.arch} {plan.base.depth}x{plan.base.embed_dim} vs {base.arch} "
                f"{base.depth}x{base.embed_dim}). Export the model again."
            )

        try:
            model = apply_plan(model, plan)
        except StudioError as e:
            raise StudioError(f"{MANIFEST}: the plan does not fit its base architecture: {e}") from None
    adapter = manifest.get("adapter")
    if adapter is not None and not isinstance(adapter, dict):
        raise StudioError(f"{MANIFEST}: its 'adapter' is not an object: the export is damaged; export again.")
    try:
        attach_adapter(model, adapter)
    except StudioError as e:
        raise StudioError(f"{MANIFEST}: its adapter cannot be rebuilt: {e}") from None
    return model, base, plan


MAX_IMG_SIZE = 8_192  # pixels a side; beyond it the position embedding alone would not fit in memory


def _check_kwargs_fit(base: BaseArch) -> None:
    """Refuse base kwargs that would build another model than the base's sizes describe (bounded by
    :meth:`BaseArch.check`): a 1 KB manifest with ``embed_dim: 1000000000`` must not allocate gigabytes first."""
    kw = base.kwargs
    sizes = {"depth": base.depth, "embed_dim": base.embed_dim, "num_classes": base.num_classes}
    if len(set(base.num_heads)) == 1:
        sizes["num_heads"] = base.num_heads[0]
    for name, expected in sizes.items():
        if (
            name == "num_heads"
            and isinstance(kw.get(name), int)
            and kw[name] > 0
            and expected % kw[name] == 0
        ):
            continue  # a merged ParallelThingsBlock runs its P branches' heads as one block (studio.parallel)
        if name in kw and kw[name] != expected:
            raise StudioError(
                f"{MANIFEST}: its base architecture does not fit its base's own sizes: kwargs give "
                f"{name}={kw[name]!r} where the base says {name}={expected}; export the model again."
            )
    for name in ("img_size", "patch_size"):
        value = kw.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        if value is not None and not all(type(v) is int and 1 <= v <= MAX_IMG_SIZE for v in values):
            raise StudioError(
                f"{MANIFEST}: base kwargs {name}={value!r} is not a size from 1 to {MAX_IMG_SIZE} pixels; "
                "export the model again."
            )


def _refuse_pickle(path: Path) -> None:
    """Pickles (``torch.save`` zip archives or raw pickle streams) can run code when loaded: refuse them."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise StudioError(
            f"{path} is a pickled PyTorch file. Exports are loaded without pickles (they can run code): "
            "use an exported folder (manifest.json + model.safetensors), or load a plain state dict "
            "with --model FILE --arch ARCH (read with weights_only=True)."
        )


def load_exported(
    folder: str | Path,
    *,
    device: str | torch.device = "auto",
    data_overrides: Mapping[str, Any] | None = None,
):
    """Load an exported model folder (no pickle anywhere); returns a :class:`~studio.models.LoadedModel`."""

    folder = Path(folder)
    if folder.is_file():
        _refuse_pickle(folder)
        raise StudioError(
            f"{folder} is a file; load_exported takes an exported folder (manifest.json + {WEIGHTS})."
        )
    manifest = read_manifest(folder)
    weights = folder / WEIGHTS
    if not weights.exists():
        raise StudioError(f"{folder} has a manifest but no {WEIGHTS}; export the model again.")
    _refuse_pickle(weights)
    model, base, plan = build_from_manifest(manifest)  # structural faults first, each with its own message
    verify_integrity(folder, manifest)  # then a valid but changed manifest, before any weight is loaded
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for damaged files
        raise StudioError(
            f"{weights} is damaged or not a safetensors file ({str(e)[:120]}). Export again."
        ) from None
    own = model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in sd.items()}
    bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if bad:
        raise StudioError(
            f"{weights.name} does not match the structure its manifest describes (e.g. {bad[0]}). "
            "The plan or the weights were changed after export; export again."
        )
    model.load_state_dict(sd, strict=True)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.eval().to(dev)
    cfg = dict(manifest.get("data_config") or {}) or data_config(model)
    for k, v in (data_overrides or {}).items():
        cfg[k] = v
    names = [str(n) for n in manifest.get("class_names") or []]
    return LoadedModel(
        model=model,
        base=base,
        data_config=cfg,
        class_names=names,
        class_names_known=_names_known(manifest, names),
        device=dev,
        plan=plan,
        source=str(folder),
        metrics=dict(manifest.get("metrics") or {}),
        meta={
            k: v
            for k, v in manifest.items()
            if k not in ("base", "plan", "data_config", "class_names", "class_names_known", "metrics")
        },
    )


def _names_known(manifest: Mapping[str, Any], names: list[str]) -> bool:
    """Whether an export's class names are real: its own flag, or for exports older than the flag, whether
    they differ from the placeholders "0".."N-1" that were written when the names were unknown."""
    if "class_names_known" in manifest:
        return bool(manifest["class_names_known"]) and bool(names)
    return bool(names) and names != [str(i) for i in range(len(names))]


@contextlib.contextmanager
def _decomposed_rms_norm() -> Iterator[None]:
    """timm's RmsNorm (AIMv2 and other SwiGLU ViTs) calls ``torch.rms_norm``, which the TorchScript exporter has
    no symbolic for at opset 17; while exporting, it runs timm's own decomposed form (the same math in pow, mean
    and rsqrt), restored afterwards."""
    import timm.layers.fast_norm as fast
    import timm.layers.norm as norm

    saved = norm.rms_norm
    norm.rms_norm = fast.rms_norm
    try:
        yield
    finally:
        norm.rms_norm = saved


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    input_size: Sequence[int],
    *,
    opset: int = 17,
    check: bool = True,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write an ONNX graph of ``model`` (dynamic batch) and, when onnxruntime is importable, check its parity.

    Uses the TorchScript exporter (``dynamo=False``): it needs no ``onnxscript`` and handles timm's fused SDPA.
    Returns ``{"path", "checked", "max_abs_diff"}``; raises :class:`StudioError` if the parity check fails.
    """
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(2, *input_size[-3:], generator=torch.Generator().manual_seed(0)).to(device)
    with atomic_path(path) as tmp, warnings.catch_warnings(), _decomposed_rms_norm():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    result: dict[str, Any] = {"path": str(path), "checked": False, "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        model.train(was_training)
        return result
    if check:
        xc = torch.randn(3, *input_size[-3:], generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = model(xc.to(device)).float().cpu()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"images": xc.numpy()})[0])
        diff = float((out - ref).abs().max())
        result.update(checked=True, max_abs_diff=diff)
        if not diff <= atol:
            raise StudioError(
                f"The ONNX export of {path.name} differs from PyTorch by {diff:.3g} (> {atol}). "
                "Use the safetensors export, or report the model configuration."
            )
    model.train(was_training)
    return result
