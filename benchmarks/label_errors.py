"""Label-error detection on injected errors: does ``compute_label_errors`` rank the wrong
annotations first, and by how much more than the baselines?

A ``tiny`` model is trained on the clean train split of a synthetic set it has never seen (scenes
of 2-4 drawn shapes, another seed than the demo's). Errors are then injected into the test split
only, at each rate (5%, 10%, 20% by default), of four kinds drawn evenly (``qa/inject.py``): the
box moved to another object of the image; the box shifted and rescaled by 35-60% of its size; the
phrase replaced by one of an object the image lacks; the phrase swapped with another object's
phrase in the same image. The test split is then scored by the product (the checkpoint's honest
path: it did not train on the test split; the score is fitted on errors it injects into a copy of
those annotations itself) and by the baselines on the same predictions: random, 1 - confidence,
1 - IoU, confidence x (1 - IoU), FiftyOne Brain's ``compute_mistakenness`` (its sample
``mistakenness`` and its ``possible_spurious`` flag) and cleanlab's object-detection
``get_label_quality_scores`` (a benchmark-only dependency: ``pip install cleanlab``; reported as
skipped without it). Reported: AUROC, average precision, precision and recall at review budgets of
1%, 5% and 10% of the split, overall and per kind.

    python benchmarks/label_errors.py --threads 2            # 16,000 images, 15 epochs (about 15 min on 2 cores)
    python benchmarks/label_errors.py --num-images 1000 --epochs 2 --rates 0.1   # a quick look

With ``--ref-l4`` it scores instead a RefCOCO-family dataset already imported and joined with
Ref-L4's review (``import_refcoco(..., ref_l4=...)``) against Ref-L4's ``ref_l4_wrong`` marks, with
the checkpoint given by ``--checkpoint`` (real errors; Ref-L4 is CC BY-NC 4.0: evaluation only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import _bench_common  # (also puts the repository on sys.path)

SCORES = ("product", "random", "1 - confidence", "1 - IoU", "confidence x (1 - IoU)", "Brain mistakenness",
          "Brain possible_spurious", "cleanlab")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=16000, help="synthetic images (2 phrases each; 80/10/10 split)")
    p.add_argument("--preset", default="tiny", help="the preset trained on the clean train split")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument("--lr", type=float, default=7e-4, help="peak learning rate")
    p.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="shares of the test split made wrong")
    p.add_argument("--seed", type=int, default=3, help="seeds the scenes, the weights and the injected errors")
    p.add_argument("--dataset", default="grounding-synthetic-label-errors", help="FiftyOne dataset name")
    p.add_argument("--out-dir", default="outputs/label-errors", help="runs and images go here")
    p.add_argument("--ref-l4", action="store_true",
                   help="score --dataset (RefCOCO-family, joined with Ref-L4) against Ref-L4's marks instead")
    p.add_argument("--checkpoint", default=None,
                   help="score with this checkpoint: with --ref-l4, a model trained on the train split; else one an "
                        "earlier run of this script trained on --dataset (no training)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda where there is one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def scene_objects(dataset) -> dict:
    """filepath -> every drawn object's box (the scene, regenerated from the dataset's spec)."""
    from fiftyone_grounding.data.synthetic import SyntheticSpec

    info = dict(dataset.info["synthetic"])
    spec = SyntheticSpec(**{k: v for k, v in info.items() if k in SyntheticSpec.__dataclass_fields__
                            and k != "split_fractions"},
                         split_fractions=tuple(tuple(s) for s in info["split_fractions"]))
    out = {}
    for path, image_id in zip(*dataset.values(["filepath", "image_id"])):
        if path not in out:
            out[path] = [o["box_xyxy"] for o in spec.example(int(image_id))[1]]
    return out


def inject(view, rate: float, seed: int, objects: dict) -> list[str]:
    """Write errors into ``rate`` of ``view``'s annotations (phrase and box); each sample's kind."""
    from fiftyone_grounding.data.records import read_records
    from fiftyone_grounding.qa.inject import choose_rows, plan_corruptions, write_corruptions

    records = read_records(view)
    rng = np.random.default_rng([seed, int(rate * 1000)])
    kinds = write_corruptions(view, records, plan_corruptions(records, choose_rows(records, rate, rng), rng,
                                                              objects=objects))
    view.set_values("injected_kind", kinds, key_field="id")
    return [kinds[sid] for sid in view.values("id")]


def restore(view, originals: tuple) -> None:
    ids, phrases, truths = originals
    view.set_values("expression", dict(zip(ids, phrases)), key_field="id")
    view.set_values("ground_truth", dict(zip(ids, truths)), key_field="id")


def baseline_scores(view, model, seed: int) -> dict:
    """Each baseline's score per sample of ``view`` (in ``view.values("id")`` order)."""
    import fiftyone.brain as fob

    from fiftyone_grounding.data.labels import detection_xyxy
    from fiftyone_grounding.inference.apply import apply_grounding_model
    from fiftyone_grounding.models.boxes import box_iou

    apply_grounding_model(view, model.with_options(prompt_field="expression"), label_field="pred", progress=False)
    preds, truths = view.values("pred.detections"), view.values("ground_truth.detections")
    conf = np.asarray([d[0].confidence if d else 0.0 for d in preds], dtype=np.float64)
    iou = np.asarray([float(box_iou(np.asarray(detection_xyxy(p[0].bounding_box)),
                                    np.asarray(detection_xyxy(t[0].bounding_box)))) if p and t else 0.0
                      for p, t in zip(preds, truths)])
    out = {"1 - confidence": 1 - conf, "1 - IoU": 1 - iou, "confidence x (1 - IoU)": conf * (1 - iou)}
    fob.compute_mistakenness(view, "pred", label_field="ground_truth", progress=False)
    out["Brain mistakenness"] = np.asarray([m if m is not None else 0.0 for m in view.values("mistakenness")])
    out["Brain possible_spurious"] = np.asarray([s or 0 for s in view.values("possible_spurious")], dtype=np.float64)
    out["cleanlab"] = cleanlab_scores(view, preds, truths)
    return out


def cleanlab_scores(view, preds, truths):
    """1 - cleanlab's label quality of each sample's box (one class; the model's box and confidence
    as its prediction), or None without cleanlab."""
    try:
        from cleanlab.object_detection.rank import get_label_quality_scores
    except ImportError:
        return None
    from fiftyone_grounding.data.labels import detection_xyxy

    labels, predictions = [], []
    for p, t in zip(preds, truths):
        labels.append({"bboxes": np.asarray([detection_xyxy(t[0].bounding_box)], dtype=np.float32) * 100,
                       "labels": np.zeros(1, dtype=np.int64)})
        boxes = [detection_xyxy(d.bounding_box) + [d.confidence or 0.0] for d in (p or [])]
        arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
        arr[:, :4] *= 100
        predictions.append([arr])
    return 1 - np.asarray(get_label_quality_scores(labels, predictions, verbose=False))


def score_rate(dataset, test, model, checkpoint, rate, seed, objects, progress) -> dict:
    from fiftyone_grounding.evaluation.flagging import flagging_metrics
    from fiftyone_grounding.qa.label_errors import compute_label_errors

    originals = (test.values("id"), test.values("expression"), test.values("ground_truth"))
    kinds = inject(test, rate, seed, objects)
    try:
        t0 = time.time()
        scored = compute_label_errors(test, model=checkpoint, progress=progress, say=lambda line: None)
        seconds = time.time() - t0
        scores = {"product": np.asarray(test.values("label_error"), dtype=np.float64),
                  **baseline_scores(test, model, seed)}
        out = {"errors": int(sum(k != "" for k in kinds)), "samples": len(kinds), "product_seconds": round(seconds, 1)}
        for name in SCORES:
            if name != "random":
                out[name] = None if scores[name] is None else flagging_metrics(scores[name], kinds)
        out["random"] = random_ranking(kinds, seed)
        out["kind_accuracy"] = kind_accuracy(test)
        out["estimated_error_rate"] = scored.error_rate
        return out
    finally:
        restore(test, originals)


def random_ranking(kinds: list, seed: int, draws: int = 50) -> dict:
    """The figures of a random ranking, averaged over ``draws`` shuffles (one draw strays by
    +-0.04 AUROC on a few hundred samples)."""
    from fiftyone_grounding.evaluation.flagging import flagging_metrics

    rng = np.random.default_rng([seed, 7])
    runs = [flagging_metrics(rng.random(len(kinds)), kinds) for _ in range(draws)]
    return {part: {k: (float(np.mean([r[part][k] for r in runs])) if runs[0][part][k] is not None else None)
                   for k in runs[0][part]} for part in runs[0]}


def kind_accuracy(view):
    """The share of the injected errors whose reported kind is what a user would fix (a moved box or a
    swapped phrase: wrong_object; a shifted box: bad_box; an absent object's phrase: no_target)."""
    from fiftyone_grounding.qa.combine import REPORTED_KIND

    pairs = [(r, k) for r, k in zip(*view.values(["label_error_kind", "injected_kind"])) if k]
    return float(np.mean([REPORTED_KIND[k] == r for r, k in pairs])) if pairs else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    _bench_common.set_threads(args.threads)
    if args.ref_l4:
        return main_ref_l4(args, argv)
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit
    from fiftyone_grounding.inference.model import GroundingModel

    import fiftyone as fo

    progress = not args.no_progress
    out = Path(args.out_dir)
    device = _bench_common.resolve_device(args.device)
    t0 = time.time()
    if args.checkpoint:  # a model this script trained before on --dataset: score again without training
        if not fo.dataset_exists(args.dataset):
            raise SystemExit(f"--checkpoint reuses the dataset {args.dataset!r} of an earlier run, and there is none")
        dataset, best_dir, best_val_iou = fo.load_dataset(args.dataset), Path(args.checkpoint), None
    else:
        dataset = make_synthetic_dataset(args.dataset, num_images=args.num_images, out_dir=str(out / "images"),
                                         seed=args.seed, overwrite=True, progress=progress)
        run = fit(dataset, preset=args.preset, out_dir=str(out / args.preset), epochs=args.epochs, lr=args.lr,
                  seed=args.seed, resume=False, progress=progress, cpu=device.type == "cpu")
        best_dir, best_val_iou = run.best_dir, run.best_val_iou
    train_seconds = time.time() - t0
    model = GroundingModel.from_checkpoint(best_dir, device=device)
    test = dataset.match_tags("test")
    objects = scene_objects(dataset)
    results = {f"{rate:g}": score_rate(dataset, test, model, best_dir, rate, args.seed, objects, progress)
               for rate in args.rates}
    table = format_table(results)
    print("\n" + table)
    for rate, r in results.items():
        print(f"{rate} errors: {r['errors']} of {r['samples']}; the product estimates {r['estimated_error_rate']:.1%} "
              f"and names the kind of {r['kind_accuracy']:.0%} of them as a user would fix it; "
              f"scored in {r['product_seconds']:.0f} s")
    return _bench_common.summarize("label_errors", argv, args, results, table,
                                   train_seconds=round(train_seconds, 1), best_val_iou=best_val_iou)


def main_ref_l4(args, argv) -> dict:
    """Score an imported RefCOCO-family dataset joined with Ref-L4 against Ref-L4's marks."""
    import fiftyone as fo

    from fiftyone_grounding.errors import InputError
    from fiftyone_grounding.evaluation.flagging import flagging_metrics
    from fiftyone_grounding.qa.label_errors import compute_label_errors

    if not args.checkpoint:
        raise SystemExit("--ref-l4 needs --checkpoint: the model to score with (trained on the train split)")
    if not fo.dataset_exists(args.dataset):
        raise SystemExit(f"No dataset {args.dataset!r}: import it with import_refcoco(..., ref_l4=...) first")
    view = fo.load_dataset(args.dataset).exists("ref_l4_wrong")
    if len(view) == 0:
        raise SystemExit(f"{args.dataset!r} has no Ref-L4 marks: import it with ref_l4=... (Ref-L4's review files)")
    try:
        compute_label_errors(view, model=args.checkpoint, progress=not args.no_progress)
    except InputError as e:
        raise SystemExit(str(e))
    scored = view.exists("label_error")
    kinds = ["ref_l4" if w else "" for w in scored.values("ref_l4_wrong")]
    results = {"ref-l4": {"errors": int(sum(k != "" for k in kinds)), "samples": len(kinds),
                          "product": flagging_metrics(np.asarray(scored.values("label_error")), kinds)}}
    table = format_table(results)
    print("\n" + table)
    return _bench_common.summarize("label_errors", argv, args, results, table)


def format_table(results: dict) -> str:
    rows = ["| errors | score | AUROC | AP | P@1% | P@5% | P@10% | R@10% | per kind AUROC |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rate, r in results.items():
        for name in SCORES:
            m = r.get(name)
            if m is None:
                if name in r:
                    rows.append(f"| {rate} | {name} | skipped (pip install cleanlab) | | | | | | |")
                continue
            o = m["overall"]
            kinds = ", ".join(f"{k} {v['auroc']:.3f}" for k, v in m.items() if k != "overall" and v["auroc"] is not None)
            bold = "**" if name == "product" else ""
            rows.append(f"| {rate} | {name} | {bold}{o['auroc']:.3f}{bold} | {bold}{o['ap']:.3f}{bold} | "
                        f"{o['precision@1%']:.2f} | {o['precision@5%']:.2f} | {o['precision@10%']:.2f} | "
                        f"{o['recall@10%']:.2f} | {kinds} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
