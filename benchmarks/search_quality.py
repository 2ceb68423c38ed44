"""Phrase search quality: does the confidence rank the images that hold the phrase's object first?

A search ranks every image by the confidence of the phrase's box in it, and in most of them the
object is absent. One-box training data (RefCOCO) never shows a phrase with an image that lacks
its object, so the quality head has never seen absence; ``fit`` therefore pairs a share of each
batch's phrases with another image of the batch that lacks their referent (``negative_share``).

This trains a preset (``tiny`` by default) twice on one synthetic training set, alike but for
``negative_share`` (0, then the default), then searches scenes it never saw (2-4 drawn shapes,
another seed) for phrases of a colour and a shape ("the yellow triangle"). An image is relevant
when it holds an object of that colour and shape. Reported per phrase and averaged: the average
precision of the ranking (the mean precision at the rank of each relevant image), beside the
share of relevant images (what a random ranking scores).

    python benchmarks/search_quality.py --threads 2            # 8,000 training images, 15 epochs, 1,000 scenes
    python benchmarks/search_quality.py --num-images 1000 --epochs 3 --scenes 200   # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import _bench_common  # (also puts the repository on sys.path)

PHRASES = (("yellow", "triangle"), ("red", "circle"), ("blue", "square"), ("green", "triangle"),
           ("white", "circle"), ("red", "square"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=8000, help="synthetic training images (2 phrases each)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "tiny-fusion", "tiny-adapter"),
                   help="the one-box preset trained (the architectures' tiny twins)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of each run")
    p.add_argument("--batch-size", type=int, default=32, help="phrases per step")
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate")
    p.add_argument("--scenes", type=int, default=1000, help="unseen scenes searched")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, None],
                   help="negative_share of each run (None: TrainConfig's default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the training data, the weights and the batch order")
    p.add_argument("--dataset", default="grounding-synthetic-search", help="FiftyOne dataset of the training set")
    p.add_argument("--out-dir", default="outputs/search-quality", help="runs and images go here")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def average_precision(ranked_relevant: list[bool]) -> float:
    """The mean of the precision at the rank of each relevant item (0 relevant: nan)."""
    from fiftyone_grounding.evaluation.flagging import average_precision as ap_of_scores

    ap = ap_of_scores(-np.arange(len(ranked_relevant)), ranked_relevant)  # ranked: the first scores highest
    return float("nan") if ap is None else ap


def unseen_scenes(n: int, seed: int, folder: Path, name: str):
    """A FiftyOne dataset of ``n`` new scenes, one sample each, with the (colour, shape) pairs it holds."""
    import fiftyone as fo

    from fiftyone_grounding.data import synthetic as syn
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        image, objects = syn.generate_scene(syn.image_rng(seed, i))
        path = folder / f"{i:06d}.png"
        image.save(path)
        samples.append(fo.Sample(filepath=str(path), holds=sorted({f"{o['color']} {o['shape']}" for o in objects})))
    dataset = fo.Dataset(name)
    dataset.add_samples(samples, progress=False)
    return dataset


def search_scores(scenes, model) -> dict:
    """Average precision of each phrase's search over ``scenes``, and the share of relevant scenes."""
    from fiftyone_grounding.inference.search import search_phrase

    out = {}
    for color, shape in PHRASES:
        phrase = f"the {color} {shape}"
        ranked = search_phrase(scenes, phrase, model, label_field="search", use_cache=False, progress=False)
        relevant = [f"{color} {shape}" in holds for holds in ranked.values("holds")]
        out[phrase] = {"ap": average_precision(relevant), "random": float(np.mean(relevant))}
    out["mean"] = {k: float(np.nanmean([v[k] for v in out.values()])) for k in ("ap", "random")}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    _bench_common.set_threads(args.threads)
    from fiftyone_grounding.engine.config import TrainConfig
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit

    progress = not args.no_progress
    out = Path(args.out_dir)
    train = make_synthetic_dataset(args.dataset, num_images=args.num_images, out_dir=str(out / "images"),
                                   seed=args.seed, progress=progress)
    scenes = unseen_scenes(args.scenes, args.seed + 1000, out / "scenes", args.dataset + "-scenes")
    results = {}
    for share in args.shares:
        share = TrainConfig().negative_share if share is None else share
        print(f"\n== negative_share {share:g}: {args.epochs} epochs")
        t0 = time.time()
        run = fit(train, preset=args.preset, out_dir=str(out / f"{args.preset}-share-{share:g}"), epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment="flip", negative_share=share,
                  resume=False, progress=progress, cpu=True)
        model = GroundingModel.from_checkpoint(run.best_dir, device="cpu")
        results[f"{share:g}"] = {"train_seconds": round(time.time() - t0, 1), "best_val_iou": run.best_val_iou,
                                 **search_scores(scenes, model)}
    table = format_table(results)
    print("\n" + table)
    return _bench_common.summarize("search_quality", argv, args, results, table)


def format_table(results: dict) -> str:
    rows = ["| negative_share | val IoU | search mean AP | random ranking | " +
            " | ".join(f"the {c} {s}" for c, s in PHRASES) + " |",
            "|---:|---:|---:|---:|" + "---:|" * len(PHRASES)]
    for share, r in results.items():
        rows.append(f"| {share} | {r['best_val_iou']:.3f} | **{r['mean']['ap']:.3f}** | {r['mean']['random']:.3f} | "
                    + " | ".join(f"{r[f'the {c} {s}']['ap']:.3f}" for c, s in PHRASES) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
