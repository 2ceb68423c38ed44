"""Evaluation at RefCOCO scale: the grounding evaluation end to end, the Model Evaluation panel included.

A FiftyOne dataset of N samples (default 10,752, the size of RefCOCO testA + testB), each with a
distinct expression, one true box (the importers' label scheme: label "referent", the phrase as
the box's ``expression``) and one predicted box shifted from it with a confidence. Timed, one
after the other, on the CPU:

  evaluate_grounding     the metrics (mIoU, Acc@0.5/0.75, the confidence's AUROC, ECE, accuracy
                         at coverage) overall and per split, and the sample IoU field written
  evaluate_in_fiftyone   the FiftyOne evaluation run: TP/FP/FN fields and box attributes in bulk,
                         the results with mAP, the custom metrics, the panel's scenarios
  panel                  what the App's Model Evaluation panel computes to show the run: loading
                         the results, metrics, per-class report, confusion matrix, mAP, and one
                         scenario subset (the panel's own code, plugins.panels.model_evaluation)
  delete                 ``dataset.delete_evaluation``
  fiftyone_loop          (with --fiftyone-loop) the same method through FiftyOne's own per-sample
                         ``evaluate_detections`` loop, for comparison

Peak memory is the process's peak resident set size (``VmHWM``), dataset creation included.

    PYTHONPATH=. python3 benchmarks/evaluate_throughput.py                 # 10,752 samples
    PYTHONPATH=. python3 benchmarks/evaluate_throughput.py --samples 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import numpy as np



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_752, help="expressions, one image each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the boxes and the shifts (default: %(default)s)")
    p.add_argument("--fiftyone-loop", action="store_true",
                   help="also time the method through FiftyOne's own per-sample evaluate_detections loop")
    p.add_argument("--device", default="cpu", help="accepted for symmetry with the other benchmarks; CPU only")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """The process's peak resident memory: VmHWM of this program's own memory (ru_maxrss would
    also count the process that started it, whose peak survives the exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_dataset(n: int, seed: int):
    """n samples: a distinct phrase, a true box, a shifted prediction whose confidence follows
    its IoU with noise (so AUROC and the mAP mean something)."""
    import fiftyone as fo

    from fiftyone_grounding.data.labels import declare_expression_attribute, make_detections

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, 0.6, (n, 2))
    wh = rng.uniform(0.1, 0.4, (n, 2))
    truth = np.concatenate([xy, xy + wh], 1)
    shift = rng.normal(0.0, 0.03, (n, 4)) * rng.choice([1.0, 4.0], (n, 1), p=[0.75, 0.25])  # some far off
    pred = np.clip(truth + shift, 0.0, 1.0)
    pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 0.01)
    quality = np.clip(1.0 - np.abs(shift).sum(1) * 3 + rng.normal(0, 0.1, n), 0.0, 1.0)
    splits = np.where(np.arange(n) % 2 == 0, "testA", "testB")
    categories = rng.choice(["person", "car", "dog", "chair"], n)
    dataset = fo.Dataset(f"fog-eval-bench-{uuid.uuid4().hex[:8]}")
    samples = []
    for i in range(n):
        phrase = f"expression number {i}"
        samples.append(fo.Sample(filepath=f"/nonexistent/image_{i:06d}.jpg", expression=phrase,
                                 split=str(splits[i]), category=str(categories[i]),
                                 ground_truth=make_detections(truth[i], phrase),
                                 predictions=make_detections(pred[i], phrase, confidence=float(quality[i]))))
    dataset.add_samples(samples, progress=False)
    for field in ("ground_truth", "predictions"):
        declare_expression_attribute(dataset, field)
    return dataset


def panel_data(dataset, eval_key: str) -> dict:
    """What the Model Evaluation panel computes for a run (its own methods), and one scenario."""
    from plugins.panels.model_evaluation import EvaluationPanel

    panel = EvaluationPanel()
    info = dataset.get_evaluation_info(eval_key)
    results = dataset.load_evaluation_results(eval_key)
    metrics = results.metrics()
    per_class = panel.get_per_class_metrics(info, results)
    metrics["tp"], metrics["fp"], metrics["fn"] = panel.get_tp_fp_fn(info, results)
    metrics["mAP"] = panel.get_map(results)
    matrix = panel.get_confusion_matrix(results)
    subset = panel.get_subset_def_data(info, results, dict(type="field", field="split", value="testA"), False)
    return {"metrics": metrics, "classes": list(per_class), "matrix_shape": list(np.asarray(matrix["matrix"]).shape),
            "custom_metrics": {v["label"]: v["value"] for v in (results.custom_metrics or {}).values()},
            "testA_mAP": subset["metrics"]["mAP"]}


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # without PYTHONPATH=. too
    from fiftyone_grounding.demo import cpu_name
    from fiftyone_grounding.evaluation.fiftyone_run import GroundingEvaluationConfig, evaluate_in_fiftyone
    from fiftyone_grounding.evaluation.scoring import evaluate_grounding

    import fiftyone  # noqa: F401  (imported before the baseline is read)

    baseline = peak_rss_mib()
    info = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
            "torch_imported": "torch" in sys.modules}
    print(f"machine: {info['cpu']}, {os.cpu_count()} cores, {info['date']}; resident memory after the imports "
          f"(FiftyOne, no torch): {baseline:,.0f} MiB")
    t0 = time.perf_counter()
    dataset = make_dataset(args.samples, args.seed)
    print(f"dataset: {len(dataset):,} samples, distinct expressions, one box each "
          f"({time.perf_counter() - t0:.1f} s to write, not timed below)")
    seconds, out = {}, {}
    try:
        t = time.perf_counter()
        grounding = evaluate_grounding(dataset, "predictions", "ground_truth", print_table=False)
        seconds["evaluate_grounding"] = time.perf_counter() - t

        t = time.perf_counter()
        run = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="bench")
        seconds["evaluate_in_fiftyone"] = time.perf_counter() - t

        t = time.perf_counter()
        out["panel"] = panel_data(dataset, "bench")
        seconds["panel"] = time.perf_counter() - t
        seconds["end_to_end"] = seconds["evaluate_in_fiftyone"] + seconds["panel"]

        t = time.perf_counter()
        dataset.delete_evaluation("bench")
        seconds["delete"] = time.perf_counter() - t

        if args.fiftyone_loop:
            t = time.perf_counter()
            loop = dataset.evaluate_detections("predictions", "ground_truth", eval_key="loop",
                                               method=GroundingEvaluationConfig, progress=False)
            seconds["fiftyone_loop"] = time.perf_counter() - t
            out["fiftyone_loop_mAP"] = loop.mAP()
    finally:
        dataset.delete()

    overall = grounding["overall"]
    print(f"metrics: mIoU {overall['miou']:.4f}, Acc@0.5 {overall['acc50']:.4f}, AUROC {overall['auroc']:.4f}, "
          f"ECE {overall['ece']:.4f}; run mAP {run['mAP']:.4f}, TP/FP/FN {run['tp']}/{run['fp']}/{run['fn']}")
    print(f"panel: classes {out['panel']['classes']}, confusion matrix {out['panel']['matrix_shape']}, "
          f"mAP {out['panel']['metrics']['mAP']:.4f} (testA scenario {out['panel']['testA_mAP']:.4f})")
    for name, value in seconds.items():
        print(f"  {name:<22} {value:8.2f} s")
    peak = peak_rss_mib()
    print(f"peak memory (resident, whole process, dataset creation included): {peak:,.0f} MiB "
          f"({peak - baseline:,.0f} MiB over the imports)")
    payload = {"benchmark": "evaluate_throughput", **info, "samples": args.samples, "seconds": seconds,
               "peak_rss_mib": peak, "baseline_rss_mib": baseline, "metrics": overall, "mAP": run["mAP"],
               "tp_fp_fn": [run["tp"], run["fp"], run["fn"]], **out}
    if args.json:  # (not _bench_common.write_json: that module imports torch, which this benchmark leaves out)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
