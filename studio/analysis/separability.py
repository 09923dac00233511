"""Per-layer class separability of the CLS token — the analysis behind SLS (Han & Tang, ECCV 2024,
arXiv 2407.14330, "Straightforward Layer-wise Pruning for More Efficient Visual Adaptation").

For every block, the CLS token of the block's output (after both residual additions, before the final norm)
over a labelled analysis set is taken from the feature bank (:mod:`studio.features`, one forward pass for all
blocks). Two kinds of scores per layer:

- **fast, high-dimensional** (well under a second per layer): k-nearest-neighbour accuracy (5-fold stratified
  cross-validation on standardised features) and the silhouette coefficient of the raw D-dimensional features
  against the true labels. Not in the paper; they let a user see the curve before the 2-D embeddings finish.
- **the paper's score**: a 2-D embedding of the layer's CLS tokens — t-SNE with SLS's settings (``init="pca"``,
  ``random_state=0``, perplexity 30, the rest sklearn defaults), or UMAP / PCA at the user's choice (recorded in
  the result) — **min-max scaled per axis to [0, 1]**, then ``silhouette_score`` (Euclidean) against the true
  labels (not against a clustering).

t-SNE is noisy and version-dependent (pitfall P4): the seed, init and perplexity are pinned and the
scikit-learn / umap-learn versions are recorded. Embeddings are cached on disk per layer, keyed by the layer's
features and the embedding settings, so re-analysing or moving a slider never recomputes them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..data import DataSpec, check_labels, in_memory, load_split
from ..errors import StudioError
from ..events import Callback, CancelToken, check, emit, progress
from ..features import bank_path, cache_dir, cached_extract
from ..load import load_model
from ..models import LoadedModel, ModelSpec
from ..runs import atomic_path
from .sls_cut import DEFAULT_ALPHA, Cut, sls_cut

EMBEDDINGS = ("tsne", "umap", "pca")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SeparabilitySpec:
    """What to analyse.

    Attributes:
        model, data: the model and the labelled data.
        split: the analysis split. SLS uses the training split (its shuffled training loader, no augmentation).
        samples: analyse a seeded random subset of at most this many images (None: the whole split).
        embed: ``tsne`` (the paper's), ``umap``, ``pca`` or ``none`` (fast scores only).
        alpha: the SLS threshold factor of the cut rule.
        perplexity: t-SNE perplexity (SLS: sklearn's default 30).
        seed: seeds the subset, the embeddings and the kNN folds (SLS: ``random_state=0``).
        lazy: embed only the layers the top-down scan reads (top layer down to the first failure), as the
            reference code does; the curve below the stop stays empty.
        knn_k: neighbours of the fast kNN score.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    split: str = "train"
    samples: int | None = 1000
    embed: str = "tsne"
    alpha: float = DEFAULT_ALPHA
    perplexity: float = 30.0
    seed: int = 0
    lazy: bool = False
    knn_k: int = 10

    @property
    def kind(self) -> str:
        return "separability"

    def validate(self) -> SeparabilitySpec:
        if self.split not in SPLITS:
            raise StudioError(f"Unknown analysis split '{self.split}': use {', '.join(SPLITS)}.")
        if self.embed not in (*EMBEDDINGS, "none"):
            raise StudioError(f"Unknown embedding '{self.embed}': use {', '.join(EMBEDDINGS)} or none.")
        if self.samples is not None and self.samples < 10:
            raise StudioError(f"--samples must be at least 10 (got {self.samples}); SLS used about 1000.")
        if not 0.0 <= self.alpha <= 1.0:
            raise StudioError(f"--alpha must lie in [0, 1] (the paper uses 0.3), got {self.alpha}.")
        if self.perplexity <= 0:
            raise StudioError(f"--perplexity must be positive (SLS: 30), got {self.perplexity}.")
        if self.knn_k < 1:
            raise StudioError(f"The kNN score needs k >= 1, got {self.knn_k}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "separability",
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "split": self.split,
            "samples": self.samples,
            "embed": self.embed,
            "alpha": self.alpha,
            "perplexity": self.perplexity,
            "seed": self.seed,
            "lazy": self.lazy,
            "knn_k": self.knn_k,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeparabilitySpec:
        try:
            samples = d.get("samples", 1000)
            return cls(
                model=ModelSpec.from_dict(d.get("model") or {}),
                data=DataSpec.from_dict(d.get("data") or {}),
                split=str(d.get("split", "train")),
                samples=None if samples is None else int(samples),
                embed=str(d.get("embed", "tsne")),
                alpha=float(d.get("alpha", DEFAULT_ALPHA)),
                perplexity=float(d.get("perplexity", 30.0)),
                seed=int(d.get("seed", 0)),
                lazy=bool(d.get("lazy", False)),
                knn_k=int(d.get("knn_k", 10)),
            )
        except (TypeError, ValueError) as e:
            raise StudioError(f"The separability spec is malformed ({e}).") from None

    def with_(self, **changes: Any) -> SeparabilitySpec:
        return replace(self, **changes)


# ------------------------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class LayerFeatures:
    """CLS tokens of every block's output over the analysis set (numpy, picklable for ``st.cache_data``).

    Attributes:
        cls: ``(L, N, D)`` float32.
        labels: ``(N,)`` true labels.
        indices: ``(N,)`` index of each sample in its split (shown on hover).
        class_names: names of the classes.
        split: the split the samples come from.
        key: a content hash of the features (the key of the embedding caches).
    """

    cls: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    class_names: tuple[str, ...]
    split: str
    key: str

    @property
    def depth(self) -> int:
        return int(self.cls.shape[0])

    @property
    def n(self) -> int:
        return int(self.cls.shape[1])


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:24]


def features_from_bank(
    cls: np.ndarray,
    labels: np.ndarray,
    *,
    indices: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    split: str = "custom",
) -> LayerFeatures:
    """Wrap per-layer CLS features ``(L, N, D)`` (e.g. a FeatureBank's ``cls``) with their labels."""
    cls = np.ascontiguousarray(np.asarray(cls, dtype=np.float32))
    labels = np.asarray(labels, dtype=np.int64)
    if cls.ndim != 3 or cls.shape[1] != labels.shape[0]:
        raise StudioError(f"Features must be (layers, samples, dims) matching the labels, got {cls.shape}.")
    names = tuple(class_names) or tuple(str(c) for c in range(int(labels.max()) + 1))
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
    return LayerFeatures(cls, labels, idx, names, split, _digest(cls.tobytes(), labels.tobytes()))


def _subset(
    loaded: LoadedModel, data: DataSpec, split: str, samples: int | None, seed: int
) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """The split, the seeded subset's indices and the feature bank's cache key of that subset."""
    ds = load_split(data, split, loaded.data_config)
    check_labels(ds, loaded.base.num_classes, split, class_names=loaded.known_class_names)
    idx = np.arange(len(ds))
    if samples is not None and samples < len(ds):
        idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:samples])
    key = {
        "data": data.to_dict(),
        "split": split,
        "transform": loaded.data_config,
        "subset": _digest(idx.astype(np.int64).tobytes()),
    }
    return ds, idx, key


def features_cached(loaded: LoadedModel, spec: SeparabilitySpec) -> bool:
    """Whether the features ``spec`` analyses are already on disk (so reading them takes a moment, not an
    extraction over every image): what lets a page skip the job a separability run has done."""
    _, _, key = _subset(loaded, spec.data, spec.split, spec.samples, spec.seed)
    return bank_path(loaded.model, key).exists()


def layer_features(
    loaded: LoadedModel,
    data: DataSpec,
    *,
    split: str = "train",
    samples: int | None = 1000,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> LayerFeatures:
    """Per-block CLS tokens of a seeded subset of ``split``, through the (disk-cached) feature bank."""
    ds, idx, key = _subset(loaded, data, split, samples, seed)
    sub = type(ds)([ds.items[i] for i in idx], ds.class_names, ds.transform)
    emit(callbacks, "log", message=f"analysing {len(sub)} of {len(ds)} {split} images")
    bank = cached_extract(loaded.model, in_memory(sub), key, callbacks=callbacks, cancel=cancel)
    return features_from_bank(
        bank.cls.numpy(), bank.labels.numpy(), indices=idx, class_names=ds.class_names, split=split
    )


# ------------------------------------------------------------------------------------------------ scores
def _label_check(labels: np.ndarray) -> None:
    counts = np.bincount(labels)
    if (counts > 0).sum() < 2:
        raise StudioError(
            "Separability needs at least two classes in the analysis set; use more samples or another split."
        )


def knn_accuracy(x: np.ndarray, labels: np.ndarray, *, k: int = 10, seed: int = 0) -> float:
    """Cross-validated k-NN accuracy on standardised features (stratified folds, at most 5)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _label_check(labels)
    counts = np.bincount(labels)
    folds = int(min(5, counts[counts > 0].min()))
    if folds < 2:
        return float("nan")
    n_train = len(labels) * (folds - 1) // folds
    clf = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(k, max(1, n_train - 1))))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, x, labels, cv=cv).mean())


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean) of the points against the true labels, in [-1, 1]."""
    from sklearn.metrics import silhouette_score

    _label_check(labels)
    if len(np.unique(labels)) >= len(labels):
        raise StudioError("The silhouette needs fewer classes than samples; analyse more samples.")
    return float(silhouette_score(x, labels, metric="euclidean"))


@dataclass(frozen=True)
class FastCurve:
    """The fast per-layer scores (layer 1 first) and the cut the α rule gives on the high-dim silhouette."""

    knn: tuple[float, ...]
    silhouette_hd: tuple[float, ...]
    seconds: float

    def cut(self, alpha: float = DEFAULT_ALPHA) -> Cut:
        return sls_cut(self.silhouette_hd, alpha)

    def to_dict(self) -> dict[str, Any]:
        return {"knn": list(self.knn), "silhouette_hd": list(self.silhouette_hd), "seconds": self.seconds}


def fast_curve(
    feats: LayerFeatures,
    *,
    k: int = 10,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> FastCurve:
    """kNN accuracy and high-dimensional silhouette of every layer's CLS tokens (a second or so in total)."""
    t0 = time.perf_counter()
    knn, sil = [], []
    for b in range(feats.depth):
        check(cancel)
        x = feats.cls[b]
        knn.append(knn_accuracy(x, feats.labels, k=k, seed=seed))
        sil.append(silhouette(x, feats.labels))
        progress(
            callbacks, "fast scores", b + 1, feats.depth, layer=b + 1, knn=knn[-1], silhouette_hd=sil[-1]
        )
    return FastCurve(tuple(knn), tuple(sil), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ embedding
def embedding_versions() -> dict[str, str]:
    """Library versions that change t-SNE/UMAP output (recorded with every result, pitfall P4)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("scikit-learn", "umap-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def minmax(points: np.ndarray) -> np.ndarray:
    """Scale each axis to [0, 1] as SLS does before the silhouette (a constant axis becomes 0)."""
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return ((points - lo) / span).astype(np.float32)


def embed_2d(x: np.ndarray, method: str = "tsne", *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """A 2-D embedding of ``x`` (N, D), min-max scaled per axis.

    ``tsne``: sklearn ``TSNE(2, init="pca", random_state=seed, perplexity=perplexity)``, other settings at their
    defaults (SLS); perplexity is clamped below N, which sklearn requires (only matters for tiny sets).
    ``umap``: ``umap.UMAP(n_components=2, random_state=seed)``. ``pca``: the first two principal components.
    """
    n = len(x)
    if n < 4:
        raise StudioError(f"A 2-D embedding needs at least 4 samples, got {n}.")
    x = np.asarray(x, dtype=np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE

        pts = TSNE(
            n_components=2, init="pca", random_state=seed, perplexity=min(perplexity, (n - 1) / 3)
        ).fit_transform(x)
    elif method == "umap":
        try:
            import umap
        except ImportError:
            raise StudioError("UMAP needs the umap-learn package: pip install umap-learn.") from None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": expected with a seed
            pts = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(x)
    elif method == "pca":
        from sklearn.decomposition import PCA

        pts = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise StudioError(f"Unknown embedding '{method}': use {', '.join(EMBEDDINGS)}.")
    return minmax(np.asarray(pts, dtype=np.float64))


@dataclass(frozen=True)
class LayerEmbedding:
    """One layer's 2-D embedding (min-max scaled) and its silhouette against the true labels."""

    block: int  # 0-based block index; the paper's layer number is block + 1
    method: str
    points: np.ndarray  # (N, 2) in [0, 1]
    silhouette: float
    seconds: float
    cached: bool

    def to_dict(self, *, points: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "block": self.block,
            "layer": self.block + 1,
            "method": self.method,
            "silhouette": self.silhouette,
            "seconds": self.seconds,
            "cached": self.cached,
        }
        if points:
            d["points"] = self.points.round(5).tolist()
        return d


def _embed_cache_path(feats: LayerFeatures, block: int, method: str, seed: int, perplexity: float):

    params = (
        f"{method}|seed={seed}|perplexity={perplexity if method == 'tsne' else '-'}|{embedding_versions()}"
    )
    x = feats.cls[block]
    return cache_dir().parent / "embeddings" / f"{_digest(x.tobytes(), params)}.npy"


def embed_layer(
    feats: LayerFeatures,
    block: int,
    method: str = "tsne",
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    use_cache: bool = True,
) -> LayerEmbedding:
    """Embed block ``block``'s CLS tokens in 2-D and score the silhouette; cached on disk per layer."""

    if not 0 <= block < feats.depth:
        raise StudioError(f"Block {block} is out of range 0..{feats.depth - 1}.")
    t0 = time.perf_counter()
    path = _embed_cache_path(feats, block, method, seed, perplexity)
    pts, cached = None, False
    if use_cache and path.exists():
        try:
            pts, cached = np.load(path, allow_pickle=False), True
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a damaged cache file: recompute
    if pts is None:
        pts = embed_2d(feats.cls[block], method, seed=seed, perplexity=perplexity)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, pts, allow_pickle=False)
    return LayerEmbedding(block, method, pts, silhouette(pts, feats.labels), time.perf_counter() - t0, cached)


def embed_layers(
    feats: LayerFeatures,
    method: str = "tsne",
    *,
    blocks: Sequence[int] | None = None,
    seed: int = 0,
    perplexity: float = 30.0,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> Iterator[LayerEmbedding]:
    """Embed the given blocks (default: all, top layer first), yielding each as soon as it is done."""
    order = list(range(feats.depth - 1, -1, -1)) if blocks is None else list(blocks)
    for j, b in enumerate(order):
        check(cancel)
        e = embed_layer(feats, b, method, seed=seed, perplexity=perplexity)
        progress(callbacks, f"{method} embeddings", j + 1, len(order), layer=b + 1, silhouette=e.silhouette)
        emit(callbacks, "layer", **e.to_dict(points=False))
        yield e


# ------------------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class SeparabilityResult:
    """The per-layer curves and the SLS cut. Layer ``l`` (1-based) is block ``l - 1``."""

    spec: SeparabilitySpec
    depth: int
    samples: int
    split: str
    class_names: tuple[str, ...]
    labels: np.ndarray
    indices: np.ndarray
    fast: FastCurve
    silhouette: tuple[float | None, ...]  # 2-D embedding silhouette per layer; None where not computed
    embeddings: dict[int, LayerEmbedding]
    cut: Cut | None  # on the embedding silhouette (the paper's rule); None with embed="none"
    fast_cut: Cut  # the same rule on the high-dimensional silhouette (a preview)
    seconds: dict[str, float]
    versions: dict[str, str]

    @property
    def suggested(self) -> Cut:
        """The cut to propose: the paper's when the embeddings were computed, else the fast preview."""
        return self.cut or self.fast_cut

    def layers(self) -> list[dict[str, Any]]:
        """One row per layer: the scores and whether the scan keeps it."""
        cut = self.suggested
        return [
            {
                "layer": b + 1,
                "knn": self.fast.knn[b],
                "silhouette_hd": self.fast.silhouette_hd[b],
                "silhouette": self.silhouette[b],
                "kept": b + 1 <= cut.keep,
            }
            for b in range(self.depth)
        ]

    def to_dict(self, *, points: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "spec": self.spec.to_dict(),
            "depth": self.depth,
            "samples": self.samples,
            "split": self.split,
            "embed": self.spec.embed,
            "alpha": self.spec.alpha,
            "layers": self.layers(),
            "cut": None if self.cut is None else self.cut.to_dict(),
            "fast_cut": self.fast_cut.to_dict(),
            "keep": self.suggested.keep,
            "seconds": self.seconds,
            "versions": self.versions,
        }
        if points:
            d["labels"] = self.labels.tolist()
            d["indices"] = self.indices.tolist()
            d["embeddings"] = {str(b + 1): e.to_dict(points=True) for b, e in sorted(self.embeddings.items())}
        return d


def scan_embeddings(
    feats: LayerFeatures,
    spec: SeparabilitySpec,
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
) -> dict[int, LayerEmbedding]:
    """Embed layers top-down; with ``spec.lazy`` stop after the first layer failing the α rule (as SLS does)."""
    out: dict[int, LayerEmbedding] = {}
    threshold: float | None = None
    for e in embed_layers(
        feats, spec.embed, seed=spec.seed, perplexity=spec.perplexity, callbacks=callbacks, cancel=cancel
    ):
        out[e.block] = e
        if threshold is None:
            threshold = spec.alpha * e.silhouette
            if e.silhouette < 0 and spec.lazy:
                break  # P2 guard: no reference, the cut keeps everything
        elif spec.lazy and e.silhouette < threshold:
            break
    return out


def analyze_features(
    feats: LayerFeatures,
    spec: SeparabilitySpec,
    *,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    on_fast: Callable[[FastCurve], None] | None = None,
    seconds: dict[str, float] | None = None,
) -> SeparabilityResult:
    """Fast curve -> per-layer 2-D embeddings and silhouettes -> the SLS cut, on features already extracted."""
    spec.validate()
    fast = fast_curve(feats, k=spec.knn_k, seed=spec.seed, callbacks=callbacks, cancel=cancel)
    emit(callbacks, "fast_curve", **fast.to_dict())
    if on_fast is not None:
        on_fast(fast)
    t1 = time.perf_counter()
    embs = {} if spec.embed == "none" else scan_embeddings(feats, spec, callbacks=callbacks, cancel=cancel)
    sil = tuple(embs[b].silhouette if b in embs else None for b in range(feats.depth))
    cut = sls_cut(sil, spec.alpha) if embs else None
    secs = {**(seconds or {}), "fast": fast.seconds, "embed": time.perf_counter() - t1}
    secs["total"] = sum(v for k, v in secs.items() if k in ("features", "fast", "embed"))
    return SeparabilityResult(
        spec=spec,
        depth=feats.depth,
        samples=feats.n,
        split=feats.split,
        class_names=feats.class_names,
        labels=feats.labels,
        indices=feats.indices,
        fast=fast,
        silhouette=sil,
        embeddings=embs,
        cut=cut,
        fast_cut=fast.cut(spec.alpha),
        seconds=secs,
        versions=embedding_versions(),
    )


def analyze(
    spec: SeparabilitySpec,
    *,
    loaded: LoadedModel | None = None,
    callbacks: Sequence[Callback] = (),
    cancel: CancelToken | None = None,
    on_fast: Callable[[FastCurve], None] | None = None,
) -> SeparabilityResult:
    """Features of the analysis set, then :func:`analyze_features`: the full SLS analysis of one model.

    Args:
        loaded: an already loaded model (never mutated); loaded from ``spec.model`` otherwise.
        on_fast: called with the fast curve as soon as it exists (before the embeddings start).
    """

    spec.validate()
    if spec.split not in SPLITS:
        raise StudioError(f"Unknown analysis split '{spec.split}': use {', '.join(SPLITS)}.")
    t0 = time.perf_counter()
    loaded = loaded or load_model(spec.model)
    t_load = time.perf_counter() - t0
    feats = layer_features(
        loaded,
        spec.data,
        split=spec.split,
        samples=spec.samples,
        seed=spec.seed,
        callbacks=callbacks,
        cancel=cancel,
    )
    return analyze_features(
        feats,
        spec,
        callbacks=callbacks,
        cancel=cancel,
        on_fast=on_fast,
        seconds={"load": t_load, "features": time.perf_counter() - t0 - t_load},
    )
