"""Labelled image data: the embedded digits demo, ImageFolder trees and VTAB-1k list files.

Eval transforms come from the model's data config (timm ``create_transform``); a training split may instead take
timm's training transform (random resized crop, flip, a RandAugment/AutoAugment policy, random erasing: see
:func:`make_transform`), drawn per image from the seed, the epoch and the image's index (:class:`Augmented`). Bad
input is reported with the file (and line) at fault; ``skip_bad_files`` drops unreadable images instead, and lists
what it dropped.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import StudioError
from .registry import Registry

SPLITS = ("train", "val", "test")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs with a message instead of a warning
DATASETS: Registry[Callable[[DataSpec, str], ImageList]] = Registry("dataset kind")


@dataclass(frozen=True)
class DataSpec:
    """Which data: ``kind`` is ``demo``, ``imagefolder`` or ``vtab``; ``path`` for the latter two."""

    kind: str = "demo"
    path: str | None = None
    skip_bad_files: bool = False
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # a zero or negative limit used to slice silently (``[:-200]`` keeps all but 200): refuse it here, where
        # every caller (CLI, UI, stored run specs) builds its spec
        if self.limit is not None and (type(self.limit) is not int or self.limit <= 0):
            raise StudioError(
                f"Data limit must be a positive whole number of samples, not {self.limit!r}: "
                "pass --limit N with N >= 1, or leave it out to use every sample."
            )
        if self.path:
            # absolute from the start: a stored spec (a job resumed from another directory, a cache key) then
            # names the same folder whatever the working directory
            object.__setattr__(self, "path", os.path.abspath(os.path.expanduser(self.path)))

    @classmethod
    def parse(cls, text: str, **kw: Any) -> DataSpec:
        """``demo``, ``imagefolder:PATH`` or ``vtab:PATH``."""
        kind, _, path = text.partition(":")
        if kind not in DATASETS:
            DATASETS.get(kind)  # raises listing valid kinds
        if kind != "demo" and not path:
            raise StudioError(f"Data '{text}' needs a path: use {kind}:PATH.")
        return cls(kind=kind, path=path or None, **{k: v for k, v in kw.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "skip_bad_files": self.skip_bad_files,
            "limit": self.limit,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


@dataclass
class ImageList(Dataset):
    """A split as (image source, label) pairs; images are PIL-decoded lazily, then transformed.

    ``items`` hold either a path or an in-memory uint8 array (the demo).
    """

    items: list[tuple[Any, int]]
    class_names: list[str]
    transform: Callable[[Image.Image], torch.Tensor] | None = None
    origin: list[str] = field(default_factory=list)  # "file:line" for list-file datasets
    skipped: list[str] = field(default_factory=list)
    # True where ``class_names`` are the data's own names (ImageFolder class folders, the demo's digits); False
    # where they are only the label numbers (VTAB lists), which say nothing about what a label means
    named: bool = True

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([y for _, y in self.items], dtype=np.int64)

    def image(self, i: int) -> Image.Image:
        src, _ = self.items[i]
        if isinstance(src, np.ndarray):
            return to_rgb(Image.fromarray(src))
        return _open_image(Path(src))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        x = (
            self.transform(img)
            if self.transform is not None
            else torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
        )
        return x, self.items[i][1]

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> ImageList:
        return ImageList(self.items, self.class_names, transform, self.origin, self.skipped, self.named)

    def subset(self, n: int | None, seed: int = 0) -> ImageList:
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return ImageList(
            [self.items[i] for i in idx],
            self.class_names,
            self.transform,
            [self.origin[i] for i in idx] if self.origin else [],
            self.skipped,
            self.named,
        )


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise StudioError(
                    f"{path} is {im.width}x{im.height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel limit. "
                    "Downscale it or remove it."
                )
            return to_rgb(im)
    except FileNotFoundError:
        raise StudioError(f"Image {path} does not exist.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise StudioError(
            f"Image {path} cannot be decoded ({str(e)[:100]}). Remove or replace it, or pass "
            "--skip-bad-files to skip unreadable images."
        ) from None


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB, scaling high-bit-depth modes (``I;16``, ``I``, ``F``) down instead of clipping them.

    PIL's ``convert("RGB")`` clips ``I;16``/``I``/``F`` values to 0..255, so a 16-bit PNG would come out almost all
    white. 16-bit values are divided by 257 (65535 -> 255); ``I`` is taken as 16-bit when its values fit in
    0..65535 (what 16-bit PNGs and TIFFs hold), else scaled by its maximum; ``F`` is taken as 0..1 when its values
    fit there (the float-image convention), as 8-bit when they fit 0..255, then as 16-bit, else scaled by its maximum.
    """
    if im.mode not in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return im.convert("RGB")
    a = np.asarray(im, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    top = float(a.max()) if a.size else 0.0
    if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and top <= 65535):
        scale = 255.0 / 65535.0
    elif im.mode == "F" and top <= 1.0:
        scale = 255.0
    elif im.mode == "F" and top <= 255.0:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    grey = np.rint(a * scale).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")  # a 2-D uint8 array is mode L


def _drop_bad(items: list[tuple[Any, int]], origin: list[str]) -> tuple[list, list, list[str]]:
    keep, keep_origin, skipped = [], [], []
    for i, (src, y) in enumerate(items):
        try:
            _open_image(Path(src))
        except StudioError as e:
            skipped.append(str(e).split(" (")[0])
            continue
        keep.append((src, y))
        if origin:
            keep_origin.append(origin[i])
    return keep, keep_origin, skipped


# --------------------------------------------------------------------------------------------------- demo
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 8x8 digits as uint8 images, split 70/15/15 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train, rest = train_test_split(idx, test_size=0.3, stratify=d.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=0)
    return {
        s: (images[i], d.target[i].astype(np.int64))
        for s, i in (("train", train), ("val", val), ("test", test))
    }


@DATASETS.register("demo")
def _demo(spec: DataSpec, split: str) -> ImageList:
    images, labels = _digits_splits()[split]
    return ImageList([(im, int(y)) for im, y in zip(images, labels)], [str(i) for i in range(10)])


# -------------------------------------------------------------------------------------------- imagefolder
@DATASETS.register("imagefolder")
def _imagefolder(spec: DataSpec, split: str) -> ImageList:
    root = Path(spec.path or "").expanduser()
    if not root.is_dir():
        raise StudioError(f"ImageFolder root {root} does not exist or is not a folder.")
    folder = root / split
    if not folder.is_dir():
        if split == "test" and (root / "val").is_dir():
            folder = root / "val"  # optional test/: evaluate on val, as documented
        else:
            raise StudioError(
                f"ImageFolder {root} has no '{split}/' folder. Expected {root}/train/<class>/*.png, "
                f"{root}/val/<class>/*.png and optionally {root}/test/."
            )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise StudioError(f"{folder} has no class folders: put images in {folder}/<class name>/.")
    train_classes = (
        sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if (root / "train").is_dir()
        else classes
    )
    if split != "train" and set(classes) - set(train_classes):
        raise StudioError(
            f"{folder} has classes not in train/: {sorted(set(classes) - set(train_classes))[:5]}."
        )
    items: list[tuple[Any, int]] = []
    for c in classes:
        files = sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise StudioError(
                f"Class folder {folder / c} has no images ({', '.join(sorted(IMAGE_EXTS))}). "
                "Add images or remove the folder."
            )
        items += [(str(f), train_classes.index(c)) for f in files]
    return ImageList(items, train_classes)


# --------------------------------------------------------------------------------------------------- vtab
VTAB_LISTS = {
    "train": "train800.txt",
    "val": "val200.txt",
    "test": "test.txt",
    "trainval": "train800val200.txt",
}


@DATASETS.register("vtab")
def _vtab(spec: DataSpec, split: str) -> ImageList:
    root = Path(spec.path or "").expanduser()
    if not root.is_dir():
        raise StudioError(f"VTAB-1k folder {root} does not exist.")
    if split not in VTAB_LISTS:
        raise StudioError(f"VTAB split '{split}' is unknown; use one of {', '.join(VTAB_LISTS)}.")
    list_file = root / VTAB_LISTS[split]
    if not list_file.is_file():
        raise StudioError(
            f"{list_file} is missing. A VTAB-1k folder holds {', '.join(VTAB_LISTS.values())} "
            "with lines 'relative/path label'."
        )
    items, origin = [], []
    # utf-8-sig drops a byte-order mark (Windows editors write one), which would otherwise prefix the first path
    for n, line in enumerate(
        list_file.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1
    ):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        where = f"{list_file.name} line {n}"
        if len(parts) != 2:
            raise StudioError(f"{where}: expected 'relative/path label', got {line.strip()[:80]!r}.")
        rel, label = parts
        try:
            y = int(label)
        except ValueError:
            raise StudioError(f"{where}: label {label!r} is not an integer.") from None
        if y < 0:
            raise StudioError(f"{where}: label {y} is negative.")
        # VTAB-1k lists name images relative to their folder: an absolute or climbing entry would read any file
        # the process can (refused for every caller, before anything is looked up, so it tells nothing either)
        if (
            Path(rel).is_absolute()
            or rel.startswith(("/", "\\"))
            or ".." in Path(rel.replace("\\", "/")).parts
        ):
            raise StudioError(
                f"{where}: image path {rel[:80]!r} leaves the VTAB folder (absolute or '..'); list every image "
                f"relative to {root}, e.g. 'images/0001.jpg 3'."
            )
        path = root / rel
        if not path.is_file() and not spec.skip_bad_files:
            raise StudioError(
                f"{where}: image {rel} does not exist under {root}. Fix the list or pass --skip-bad-files."
            )
        items.append((str(path), y))
        origin.append(where)
    if not items:
        raise StudioError(f"{list_file} lists no images.")
    n_classes = max(y for _, y in items) + 1
    return ImageList(items, [str(i) for i in range(n_classes)], origin=origin, named=False)


# ------------------------------------------------------------------------------------------------ public
def load_split(
    spec: DataSpec,
    split: str,
    data_config: Mapping[str, Any] | None = None,
    *,
    train_transform: bool = False,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
) -> ImageList:
    """One split with the model's eval transform (or timm's train transform, see :func:`make_transform`), checked
    for bad files."""
    ds = DATASETS.get(spec.kind)(spec, split)
    if spec.skip_bad_files and spec.kind != "demo":
        items, origin, skipped = _drop_bad(ds.items, ds.origin)
        if not items:
            raise StudioError(f"Every image of split '{split}' was unreadable; nothing left to use.")
        ds = ImageList(items, ds.class_names, None, origin, skipped, ds.named)
    ds = ds.subset(spec.limit, spec.seed)
    if data_config is not None:
        ds = ds.with_transform(
            make_transform(data_config, train=train_transform, auto_augment=auto_augment, re_prob=re_prob)
        )
    return ds


def check_labels(
    ds: ImageList, num_classes: int, split: str = "", *, class_names: Sequence[str] | None
) -> None:
    """Refuse data a model cannot be scored or trained on: labels out of its range, or other classes than its own.

    This is where every model meets its data (:func:`prepare` calls it for every flow, evaluation and analysis).
    ``class_names`` are the classes the model was trained with, as its export recorded them, or None where they
    are unknown (a bare checkpoint, a fresh head): then only the label range can be checked.
    """
    if class_names is not None:
        check_classes(ds, class_names, split)
    for i, (_, y) in enumerate(ds.items):
        if not 0 <= y < num_classes:
            where = ds.origin[i] if ds.origin else f"sample {i}"
            raise StudioError(
                f"{where}{' of ' + split if split else ''}: label {y} is out of range for a "
                f"{num_classes}-class model. Use --num-classes {max(ds.labels) + 1} --reset-head, or fix the label."
            )


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(str(n)) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_classes(ds: ImageList, class_names: Sequence[str], split: str = "") -> None:
    """Refuse data whose classes are not the model's, in the model's order.

    An ImageFolder's label is the position of its class folder in the sorted list of ``train/``'s folders, so one
    missing or extra folder shifts every later label: every image would be scored (or trained) against another
    class without any error. Data without names of its own (VTAB lists: labels only) cannot be compared.
    """
    if not ds.named or list(ds.class_names) == [str(n) for n in class_names]:
        return
    model, data = [str(n) for n in class_names], list(ds.class_names)
    missing = [n for n in model if n not in data]
    extra = [n for n in data if n not in model]
    parts = []
    if missing:
        parts.append(f"it lacks {_names(missing)}")
    if extra:
        parts.append(f"it has {_names(extra)}, which the model does not know")
    if not parts:
        parts.append(f"they come in another order ({_names(data)} vs the model's {_names(model)})")
    raise StudioError(
        f"The data's classes{' (' + split + ')' if split else ''} are not the {len(model)} the model was "
        f"trained with: {'; '.join(parts)}, so every label would point at the wrong class. Give data with "
        "exactly the model's class folders, or train a new classifier on this data with --reset-head "
        f"--num-classes {len(data)}."
    )


def make_transform(
    cfg: Mapping[str, Any], *, train: bool = False, auto_augment: str | None = None, re_prob: float = 0.0
) -> Callable[[Image.Image], torch.Tensor]:
    """The model's eval transform, or with ``train`` timm's training transform (``create_transform(is_training=
    True)``): a random resized crop (scale 0.08-1) and a horizontal flip, then the ``auto_augment`` policy (a timm
    policy string, e.g. DeiT's ``rand-m9-mstd0.5-inc1``) or, without one, timm's colour jitter 0.4, and random
    erasing with probability ``re_prob`` in timm's ``pixel`` mode (per-pixel noise, DeiT's ``--remode``).
    ``auto_augment`` or ``re_prob`` imply ``train``.
    """
    from timm.data import create_transform

    train = train or bool(auto_augment) or re_prob > 0
    extra: dict[str, Any] = {}
    if train:
        extra = {"auto_augment": auto_augment or None, "re_prob": float(re_prob), "re_mode": "pixel"}
    return create_transform(
        input_size=tuple(cfg["input_size"]),
        is_training=train,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        crop_pct=cfg.get("crop_pct", 1.0),
        crop_mode=cfg.get("crop_mode", "center"),
        **extra,
    )


AUTO_AUGMENT_EXAMPLES = "'rand-m9-mstd0.5-inc1' (DeiT's RandAugment), 'v0', 'original' or 'augmix-m5-w4-d2'"
_RAND_OP_SETS = ("weights", "3a", "3aw")  # timm.data.auto_augment.rand_augment_choices
_PROBE_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}


def check_auto_augment(policy: Any) -> str | None:
    """``policy`` as the training transform takes it (``None`` for none, also from ``""`` or ``"none"``), or one
    sentence saying why timm cannot use it: timm builds the policy here, before any training, and a section that
    timm would silently skip (``rand-m9-zz``: no number) is refused too."""
    if policy is None:
        return None
    if not isinstance(policy, str):
        raise StudioError(
            f"The auto-augment policy must be a timm policy string such as {AUTO_AUGMENT_EXAMPLES}, not "
            f"{policy!r}."
        )
    text = policy.strip()
    if text.lower() in ("", "none"):
        return None
    problem = _policy_problem(text)
    if problem:
        raise StudioError(
            f"Auto-augment policy {text!r} is not valid ({problem}): give a timm policy string such as "
            f"{AUTO_AUGMENT_EXAMPLES}, or none."
        )
    return text


@functools.lru_cache(maxsize=64)
def _policy_problem(text: str) -> str | None:
    name, *sections = text.split("-")
    for s in sections:
        if name == "rand" and s.startswith("t"):  # a named op set: timm takes any other name for its default
            if s[1:] not in _RAND_OP_SETS:
                return f"its op set {s!r} is none of {', '.join('t' + n for n in _RAND_OP_SETS)}"
        elif not re.search(r"\d", s):
            return f"its section {s!r} has no number, so timm would ignore it"
    try:
        make_transform(_PROBE_CONFIG, train=True, auto_augment=text)
    except Exception as e:  # timm asserts (AssertionError) or fails to parse a number (ValueError)
        return f"timm cannot build it: {str(e).strip()[:80] or type(e).__name__}"
    return None


def tensorize(ds: ImageList, *, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and transform a whole (small) split once into memory: ``(images, labels)``."""
    xs, ys = [], []
    for x, y in make_loader(ds, batch_size=batch_size, shuffle=False):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise StudioError("The split is empty.")
    return torch.cat(xs), torch.cat(ys)


class TensorData(Dataset):
    """An in-memory split (from :func:`tensorize`), so repeated epochs skip image decoding."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str] = (),
        *,
        named: bool = False,
    ) -> None:
        self.images, self.labels, self.class_names = images, labels, list(class_names)
        self.named = named  # as :attr:`ImageList.named`: whether ``class_names`` are the data's own names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def in_memory(ds: ImageList) -> TensorData:
    x, y = tensorize(ds)
    return TensorData(x, y, ds.class_names, named=ds.named)


def make_loader(
    ds: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        generator=gen,
        num_workers=num_workers,
        drop_last=drop_last,
        sampler=sampler,
        persistent_workers=num_workers > 0,
    )


# a split whose decoded tensors fit this is decoded once and kept in memory (about 1,780 images at 224 px);
# a bigger one is decoded per pass (a count limit of 20,000 images used to hold 12 GB at 224 px)
IN_MEMORY_BYTES = 1 << 30


def prepare(
    spec: DataSpec,
    split: str,
    data_config: Mapping[str, Any],
    num_classes: int,
    *,
    class_names: Sequence[str] | None,
    train_transform: bool = False,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    keep_in_memory: bool = True,
) -> Dataset:
    """A split ready for a model: its transform, labels and classes checked against the model's, small splits in
    memory (``keep_in_memory``: whose decoded images fit :data:`IN_MEMORY_BYTES`).

    ``class_names`` is required (give ``loaded.known_class_names``): every caller states the model's classes, so
    no flow can skip the check that the data's labels mean what the model's outputs mean. With
    ``train_transform`` (implied by ``auto_augment`` or ``re_prob``, see :func:`make_transform`) the split is
    :class:`Augmented`: decoded and transformed anew each epoch, never kept in memory.
    """
    auto_augment = check_auto_augment(auto_augment)  # "none" -> None; a bad policy -> one sentence
    augmenting = train_transform or bool(auto_augment) or re_prob > 0
    ds = load_split(
        spec, split, data_config, train_transform=augmenting, auto_augment=auto_augment, re_prob=re_prob
    )
    check_labels(ds, num_classes, split, class_names=class_names)
    if augmenting:
        return Augmented(ds)
    size = data_config.get("input_size", (3, 224, 224))
    if keep_in_memory and len(ds) * 4 * math.prod(size) <= IN_MEMORY_BYTES:
        return in_memory(ds)
    return ds


class Augmented(Dataset):
    """A split under a random (training) transform, drawn per image from ``(seed, epoch, index)``.

    Each item seeds torch's CPU generator, ``random`` and numpy's global generator (what timm's and torchvision's
    transforms draw from) from those three numbers, and restores them afterwards. So an image's augmentation does
    not depend on the batch order, the number of loader workers, the rank or a resume, and the rest of training
    draws what it would draw without augmentation. :func:`studio.train.fit` calls :meth:`set_epoch` before each
    epoch's loader: another epoch gives other crops of the same images.
    """

    def __init__(self, ds: ImageList, *, seed: int = 0, epoch: int = 0) -> None:
        self.ds, self.seed, self.epoch = ds, seed, epoch
        self.class_names, self.named = ds.class_names, ds.named

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def labels(self) -> np.ndarray:
        return self.ds.labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        words = [self.seed % 2**32, self.seed // 2**32 % 2**32, self.epoch % 2**32, int(i) % 2**32]
        s = int(np.random.SeedSequence(words).generate_state(1)[0])
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            torch.default_generator.manual_seed(s)  # the CPU generator only: CUDA's stays the training's
            random.seed(s)
            np.random.seed(s)
            return self.ds[i]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
