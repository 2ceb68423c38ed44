"""The synthetic proxy of fusion v2: the three architectures trained alike, scored per phrase kind.

A synthetic proxy, not RefCOCO: the tiny twins (``tiny``: the decoder, ``tiny-fusion``,
``tiny-adapter``) on the tiny random-weight encoders, trained on one synthetic dataset whose
phrases are either attributes ("the small red circle") or relations that need the image read in
the light of the phrase ("the circle to the left of the red square", same-shape distractors).
Every preset gets the same data, epochs, batch size, learning rate, schedule and seed (the same
step budget); the test split's Acc@0.5 and mIoU are reported per phrase kind.

    python benchmarks/compare_architectures.py                     # the demo's budget: 16,000 images, 15 epochs
    python benchmarks/compare_architectures.py --num-images 2000 --epochs 3 --presets tiny tiny-fusion
    python benchmarks/compare_architectures.py --refcoco-like --augment scale+flip   # closer to RefCOCO

``--refcoco-like`` draws scenes closer to RefCOCO's: 3-6 objects, most scenes of one shape (same-
category distractors spread over the frame), some objects cut by the border: where the
per-expression crop and the unclipped boxes of the loss matter.

It prints a Markdown table (the README's) and writes JSON with every figure, the versions and
the machine (``--json``). Runs go under ``--out-dir`` (default ``outputs/compare``); the dataset
is a FiftyOne dataset named ``--dataset`` (kept, to look at in the App).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _bench_common  # (also puts the repository on sys.path)

PRESETS = ("tiny", "tiny-fusion", "tiny-adapter")
# scenes closer to RefCOCO's (synthetic.generate_scene)
REFCOCO_LIKE = dict(min_objects=3, max_objects=6, same_shape_fraction=0.7, border_fraction=0.3)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="architectures to train")
    p.add_argument("--num-images", type=int, default=16000, help="synthetic images (2 phrases each; 80/10/10 split)")
    p.add_argument("--relational-fraction", type=float, default=0.5,
                   help="share of the phrases that are relational, where the scene allows one")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every preset")
    p.add_argument("--batch-size", type=int, default=32, help="phrases per step")
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate of every preset")
    p.add_argument("--refcoco-like", action="store_true",
                   help="3-6 objects, 70%% of the scenes of one shape, 30%% of the objects cut by the border")
    p.add_argument("--augment", default="flip", help="TrainConfig.augment of every preset (flips are safe on "
                                                     "these mirror-symmetric shapes: the phrase swaps left and right)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the batch order")
    p.add_argument("--dataset", default=None, help="FiftyOne dataset name (default: grounding-synthetic-relational, "
                                                   "with --refcoco-like grounding-synthetic-refcoco-like)")
    p.add_argument("--out-dir", default="outputs/compare", help="runs and images go here")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _bench_common.set_threads(args.threads)
    from fiftyone import ViewField as F

    from fiftyone_grounding.evaluation.scoring import evaluate_grounding
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit

    progress = not args.no_progress
    out = Path(args.out_dir)
    scenes = REFCOCO_LIKE if args.refcoco_like else {}
    name = args.dataset or ("grounding-synthetic-refcoco-like" if args.refcoco_like else "grounding-synthetic-relational")
    dataset = make_synthetic_dataset(name, num_images=args.num_images, out_dir=str(out / "images"),
                                     seed=args.seed, relational_fraction=args.relational_fraction, progress=progress,
                                     **scenes)
    test = dataset.match(F("split") == "test")
    kinds = dataset.count_values("phrase_kind")
    print(f"{len(dataset)} phrases ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"test {len(test)}")
    results = {}
    for preset in args.presets:
        print(f"\n== {preset}: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}")
        t0 = time.time()
        run = fit(dataset, preset=preset, out_dir=str(out / preset), epochs=args.epochs, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, augment=args.augment, resume=False, progress=progress, cpu=True)
        train_s = time.time() - t0
        model = GroundingModel.from_checkpoint(run.best_dir, device="cpu")
        field = f"pred_{preset.replace('-', '_')}"
        test.apply_model(model, label_field=field, prompt_field="expression", batch_size=64, num_workers=0,
                         progress=progress)
        scores = evaluate_grounding(test, field, split_field="phrase_kind", print_table=False)
        results[preset] = {
            "parameters": model.model.num_parameters(), "trainable": model.model.num_parameters(trainable_only=True),
            "train_seconds": round(train_s, 1), "epochs": len(run.history),
            "overall": _figures(scores["overall"]),
            **{kind: _figures(scores["splits"][kind]) for kind in sorted(scores["splits"])},
        }
    table = format_table(results)
    print("\n" + table)
    return _bench_common.summarize("compare_architectures", argv, args, results, table)


def _figures(m: dict) -> dict:
    return {"acc50": m["acc50"], "miou": m["miou"], "count": m["count"]}


def format_table(results: dict) -> str:
    rows = ["| preset | trainable | attribute Acc@0.5 / mIoU | relational Acc@0.5 / mIoU | all Acc@0.5 | "
            "train time |", "|---|---:|---:|---:|---:|---:|"]
    for preset, r in results.items():
        def pair(kind):
            return f"{r[kind]['acc50']:.3f} / {r[kind]['miou']:.3f}" if kind in r else "-"

        rows.append(f"| `{preset}` | {r['trainable']:,} | {pair('attribute')} | {pair('relational')} | "
                    f"{r['overall']['acc50']:.3f} | {r['train_seconds'] / 60:.1f} min |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
