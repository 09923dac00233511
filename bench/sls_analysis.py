"""Time the full 12-layer SLS analysis on the demo: features, fast curve, and every layer's 2-D embedding.

Targets (issue 4): the separability curve from the fast score in <= 5 s and all t-SNE panels in <= 60 s, for
1,000 analysis images on 2 CPU cores. Nothing is read from a cache: the features are extracted and every layer
is embedded from scratch. Run::

    OMP_NUM_THREADS=2 python bench/sls_analysis.py --samples 1000 --threads 2

Prints a per-layer table and the totals (``--json`` for one JSON object).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--split", default="train")
    ap.add_argument("--embed", default="tsne", choices=["tsne", "umap", "pca"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set OMP_NUM_THREADS to match)")
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds of features + fast curve (median reported)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from studio.analysis.separability import (
        embed_2d,
        embedding_versions,
        fast_curve,
        features_from_bank,
        silhouette,
    )
    from studio.analysis.sls_cut import sls_cut
    from studio.data import DataSpec, prepare
    from studio.device import describe_device
    from studio.features import extract
    from studio.load import load_model
    from studio.models import ModelSpec

    t0 = time.perf_counter()
    loaded = load_model(ModelSpec("demo", device="cpu"))
    data = prepare(
        DataSpec("demo", limit=args.samples),
        args.split,
        loaded.data_config,
        10,
        class_names=loaded.known_class_names,
    )
    t_load = time.perf_counter() - t0

    import statistics

    feat_s, fast_s = [], []
    for _ in range(args.repeats):  # the first round is cold (first forward pass, sklearn imports)
        t0 = time.perf_counter()
        bank = extract(loaded.model, data)
        feats = features_from_bank(bank.cls.numpy(), bank.labels.numpy(), split=args.split)
        feat_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fast = fast_curve(feats)
        fast_s.append(time.perf_counter() - t0)
    t_feat, t_fast = statistics.median(feat_s), statistics.median(fast_s)

    rows, sil = [], []
    t_embed0 = time.perf_counter()
    for b in range(feats.depth - 1, -1, -1):  # SLS scans from the top
        t0 = time.perf_counter()
        pts = embed_2d(feats.cls[b], args.embed, seed=0)
        s = silhouette(pts, feats.labels)
        rows.append(
            {
                "layer": b + 1,
                "seconds": time.perf_counter() - t0,
                "silhouette": s,
                "knn": fast.knn[b],
                "silhouette_hd": fast.silhouette_hd[b],
            }
        )
        sil.insert(0, s)
    t_embed = time.perf_counter() - t_embed0
    rows.sort(key=lambda r: r["layer"])
    cut = sls_cut(sil, args.alpha)
    out = {
        "samples": feats.n,
        "split": args.split,
        "embed": args.embed,
        "threads": args.threads,
        "device": describe_device(loaded.device),
        "versions": embedding_versions(),
        "load_s": t_load,
        "features_s": t_feat,
        "fast_curve_s": t_fast,
        "fast_total_s": t_feat + t_fast,
        "embed_total_s": t_embed,
        "layers": rows,
        "cut": cut.to_dict(),
        "fast_cut": fast.cut(args.alpha).to_dict(),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{feats.n} {args.split} images, {args.threads} threads, {args.embed}, {out['versions']}")
    print(f"{'layer':>5} {'kNN':>6} {'SC hd':>7} {'SC 2-D':>7} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['layer']:>5} {r['knn']:>6.3f} {r['silhouette_hd']:>7.3f} {r['silhouette']:>7.3f} {r['seconds']:>8.2f}"
        )
    print(
        f"cold first round: features {feat_s[0]:.2f} s + fast curve {fast_s[0]:.2f} s; median of {len(feat_s)} rounds: "
        f"features (one forward pass, 12 blocks) {t_feat:.2f} s; fast curve (kNN + high-dim SC): {t_fast:.2f} s; "
        f"curve total {t_feat + t_fast:.2f} s (target <= 5 s)"
    )
    print(f"all {feats.depth} {args.embed} panels: {t_embed:.1f} s (target <= 60 s)")
    print(f"cut at alpha {args.alpha}: keep {cut.keep} ({cut.reason})")


if __name__ == "__main__":
    main()
