"""Inference throughput end to end: ``apply_grounding_model`` and ``dataset.apply_model`` vs a per-sample loop.

On a generated FiftyOne dataset (``--images`` JPEGs of 640x480, ``--phrases-per-image``
samples each: one sample per referring expression, as the project stores RefCOCO), on one
device, both end to end (JPEG decode + model + writes to FiftyOne's database):

  loop          for each sample: load its image, ``model.predict(image, phrase)``,
                ``sample.save()``, one at a time
  apply_<B>     ``fiftyone_grounding.apply_grounding_model(dataset, model, batch_size=B,
                num_workers=W, worker_type=T)``, the project's path (CLI, operators): one
                query reads ids, paths and phrases, samples are grouped by image (one decode
                and one encode per image), W threads (or DataLoader processes) decode, labels
                are written in bulk by id
  fo_apply_<B>  FiftyOne's own ``dataset.apply_model(model, prompt_field="expression",
                batch_size=B, num_workers=W)`` with the same model (FiftyOne iterates the
                samples and saves them in batches)

Each is warmed up once on a few samples first (not timed). Full-size configs with random
weights on CUDA (``--preset seed``), the tiny preset on the CPU. The full-size text
encoder's tokenizer cannot be downloaded: a BERT tokenizer over a generated vocabulary of
the same size (30522) stands in for it (``--preset seed``/``grounder`` only).

Where FiftyOne is not installed (or with ``--model-only``) it measures the model alone
instead: one expression at a time against batches of ``--batch-sizes`` expressions (grouped
by image, and ungrouped), bf16 autocast on CUDA, on preprocessed pixels.

    PYTHONPATH=. python3 benchmarks/apply_throughput.py --threads 1        # CPU, tiny
    PYTHONPATH=. python3 benchmarks/apply_throughput.py --preset seed --device cuda \\
        --batch-sizes 256 --json out/apply.json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from _bench_common import (Timer, add_grounding_samples, build_offline, device_info, fmt_rate, random_token_batch,
                           resolve_device, set_threads, write_images, write_json)


BOX_TOLERANCE = 0.05  # normalized coordinates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="seed | grounder | tiny (default: seed on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--images", type=int, default=None, help="generated images (default: 300 CUDA, 40 CPU)")
    p.add_argument("--phrases-per-image", type=int, default=7)
    p.add_argument("--batch-sizes", default="64,256", help="apply_model batch sizes, comma-separated")
    p.add_argument("--workers", type=int, default=None,
                   help="workers that decode images (default: 8 on CUDA, 0 on CPU)")
    p.add_argument("--worker-type", choices=["thread", "process"], default="thread",
                   help="apply_grounding_model's workers: threads (default) or DataLoader processes; "
                        "FiftyOne's apply_model always uses processes")
    p.add_argument("--loop-samples", type=int, default=None,
                   help="samples the per-sample loop runs on (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each (median reported)")
    p.add_argument("--model-only", action="store_true", help="skip FiftyOne: time the model alone")
    p.add_argument("--no-fo-apply", action="store_true", help="do not time FiftyOne's own dataset.apply_model")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run apply_grounding_model once more under cProfile and print the top entries")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared CPU)")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- FiftyOne end to end ----------------------------------------------------------------------


def run_fiftyone(args, device, preset, tmp: Path) -> dict:
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    import fiftyone as fo

    from fiftyone_grounding.inference.apply import apply_grounding_model
    from fiftyone_grounding.devices import default_num_workers
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.data.images import load_rgb

    n_images = args.images or (300 if device.type == "cuda" else 40)
    ppi = args.phrases_per_image
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    workers = args.workers if args.workers is not None else default_num_workers(device)
    rng = np.random.default_rng(args.seed)

    with Timer(torch.device("cpu")) as t_gen:
        images = write_images(tmp / "images", n_images, seed=args.seed)
    name = f"fog-bench-{uuid.uuid4().hex[:8]}"
    dataset = fo.Dataset(name)
    try:
        n = add_grounding_samples(dataset, images, ppi, rng)
        print(f"dataset {name!r}: {n_images} generated JPEGs (640x480, {t_gen.seconds:.1f} s) x {ppi} "
              f"expressions = {n} samples, FiftyOne {fo.__version__}")

        grounder, note = build_offline(preset, tmp)
        model = GroundingModel(grounder, device=device)
        forwards = []  # one entry per batched forward pass of the network, from a hook on it
        grounder.register_forward_pre_hook(lambda module, args: forwards.append(1))
        cfg = model.config
        print(f"model: preset {preset!r}, {cfg.image_encoder} + text encoder ({note or cfg.text_encoder}), "
              f"{cfg.image_size} px, {grounder.num_parameters():,} params, random weights; "
              f"autocast {'bf16' if model.autocast_dtype is not None else 'none (fp32)'}")

        def loop(view, field):
            for sample in view.iter_samples(progress=False):
                image = load_rgb(sample.filepath)
                sample[field] = model.predict(image, sample["expression"])
                sample.save()

        def apply(view, field, bs):
            """Runs it; returns (seconds since the call, fraction done) after each batch."""
            marks, start = [], time.perf_counter()
            apply_grounding_model(view, model, label_field=field, prompt_field="expression", batch_size=bs,
                                  num_workers=workers, worker_type=args.worker_type, progress=False,
                                  progress_callback=lambda f, _: marks.append((time.perf_counter() - start, f)))
            return marks

        def fo_apply(view, field, bs):
            view.apply_model(model, label_field=field, prompt_field="expression", batch_size=bs,
                             num_workers=workers, progress=False)

        # Warm-ups (not timed): first calls pay one-off costs (field creation, lazy imports).
        loop(dataset.limit(3), "warm_loop")
        apply(dataset.limit(max(batch_sizes)), "warm_apply", max(batch_sizes))
        if not args.no_fo_apply:
            fo_apply(dataset.limit(max(batch_sizes)), "warm_fo_apply", max(batch_sizes))

        results = {}
        loop_view = dataset.limit(args.loop_samples) if args.loop_samples else dataset
        n_loop = len(loop_view)
        times: dict[str, list] = {"loop": []}
        calls: dict[str, int] = {}
        phases: dict[str, list] = {}  # apply_<B>: [(seconds to the first batch, expr/s after it), ...]
        for rep in range(args.repeats):  # interleaved, so that a busy spell hits every mode alike
            with Timer(device) as t:
                loop(loop_view, "pred_loop")
            times["loop"].append(t.seconds)
            for bs in batch_sizes:
                for kind, run in (("apply", apply), ("fo_apply", fo_apply)):
                    if kind == "fo_apply" and args.no_fo_apply:
                        continue
                    before = len(forwards)
                    with Timer(device) as t:
                        marks = run(dataset, f"pred_{kind}_{bs}", bs)
                    times.setdefault(f"{kind}_{bs}", []).append(t.seconds)
                    calls[f"{kind}_{bs}"] = len(forwards) - before
                    if marks and len(marks) > 1:  # start-up (query, workers, first batch) vs the rest
                        (t0, f0), (t1, f1) = marks[0], marks[-1]
                        phases.setdefault(f"{kind}_{bs}", []).append((t0, n * (f1 - f0) / max(t1 - t0, 1e-9)))
        for key, secs in times.items():
            count = n_loop if key == "loop" else n
            med = float(np.median(secs))
            results[key] = {"expressions": count, "seconds_median": med, "seconds_all": secs,
                            "expressions_per_s": count / med}
            extra = ""
            if key != "loop":
                bs = int(key.rsplit("_", 1)[1])
                kind = args.worker_type if key.startswith("apply") else "process"
                results[key].update(batch_size=bs, workers=workers, worker_type=kind, forward_calls=calls[key])
                extra = f", {calls[key]} batched forwards, {workers} {kind} workers"
                if key in phases:
                    first = float(np.median([p[0] for p in phases[key]]))
                    after = float(np.median([p[1] for p in phases[key]]))
                    results[key].update(seconds_to_first_batch=first, expressions_per_s_after_first_batch=after)
                    extra += f"; first batch done after {first:.2f} s, then {fmt_rate(after)} expr/s"
            print(f"  {key:<10} {fmt_rate(count / med):>9} expressions/s  ({count} samples, median "
                  f"{med:.2f} s of {len(secs)}{extra})")

        if args.profile:
            # One more run of the project's path under cProfile: where the main process spends
            # the call (waiting for DataLoader workers, the model incl. the GPU, labels, writes).
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            bs = max(batch_sizes)
            with Timer(device) as t:
                profiler.runcall(apply, dataset, "pred_profiled", bs)
            print(f"\nprofile of apply_{bs} ({t.seconds:.2f} s under cProfile), by cumulative time:")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(28)

        # Same predictions either way (sanity check, not timed).
        agree = {}
        loop_ids = set(loop_view.values("id"))
        for key in times:
            if key == "loop":
                continue
            a, b, ids = dataset.values(["pred_loop.detections.bounding_box",
                                        f"pred_{key}.detections.bounding_box", "id"])
            diffs = [np.abs(np.subtract(x[0], y[0])).max() for x, y, i in zip(a, b, ids) if i in loop_ids]
            agree[key] = float(max(diffs))
            written = dataset.count(f"pred_{key}.detections")
            if written != n:
                raise RuntimeError(f"{key} wrote {written} of {n} predictions")
        print("  max |box difference| vs the loop: " + ", ".join(f"{k} {v:.2e}" for k, v in agree.items()))
        # bf16 batches of other shapes differ by ~1e-3; a box read before the GPU wrote it, far more
        wrong = {k: v for k, v in agree.items() if v > BOX_TOLERANCE}
        if wrong:
            print(f"  MISMATCH: boxes differ from the per-sample loop by more than {BOX_TOLERANCE}: {wrong}")
    finally:
        dataset.delete()

    base = results["loop"]["expressions_per_s"]
    ratios = {k: v["expressions_per_s"] / base for k, v in results.items() if k != "loop"}
    print("speed-up over the per-sample loop: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    return {"mode": "fiftyone", "fiftyone": fo.__version__, "preset": preset, "images": n_images, "repeats": args.repeats,
            "phrases_per_image": ppi, "samples": n, "workers": workers, "text_encoder_note": note,
            "results": results, "ratio_vs_loop": ratios, "max_box_difference": agree,
            "boxes_match": not wrong}


# -- the model alone -------------------------------------------------------------------------


def run_model_only(args, device, preset, tmp: Path, reason: str) -> dict:
    from fiftyone_grounding.models.build import build_model
    from fiftyone_grounding.models.precision import autocast, bf16_supported

    cuda = device.type == "cuda"
    model = build_model(preset, weights=False).to(device).eval()
    cfg = model.config
    dtype = torch.bfloat16 if bf16_supported(device) else None
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    ppi = args.phrases_per_image
    vocab = int(model.text_encoder.config.vocab_size)
    rng = np.random.default_rng(args.seed)
    singles = args.loop_samples or (256 if cuda else 32)
    reps, warm = (10, 3) if cuda else (2, 1)
    print(f"model only ({reason}): preset {preset!r}, {cfg.image_encoder} + {cfg.text_encoder}, {cfg.image_size} px, "
          f"{model.num_parameters():,} params, random weights, random token ids (~10 per phrase), "
          f"autocast {'bf16' if dtype else 'none (fp32)'}")

    def run(pixels, ids, mask, index):
        with torch.inference_mode(), autocast(device, dtype):
            return model(pixels.to(device, non_blocking=True), ids.to(device), mask.to(device),
                         None if index is None else index.to(device))

    results = {}
    pool = torch.randn(64, 3, cfg.image_size, cfg.image_size)
    if cuda:
        pool = pool.pin_memory()
    # One expression at a time (what a per-sample loop runs).
    ids, mask = random_token_batch(rng, singles + warm, vocab, cfg.max_text_len)
    for i in range(warm):
        run(pool[i:i + 1], ids[i:i + 1], mask[i:i + 1], None)
    with Timer(device) as t:
        for i in range(warm, warm + singles):
            j = i % len(pool)
            run(pool[j:j + 1], ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())], None)
    results["single"] = {"expressions_per_s": singles / t.seconds, "ms_per_expression": 1000 * t.seconds / singles}
    print(f"  {'single':<20} {fmt_rate(singles / t.seconds):>9} expressions/s")
    for bs in batch_sizes:
        n_img = math.ceil(bs / ppi)
        for grouped in (True, False):
            ids, mask = random_token_batch(rng, bs, vocab, cfg.max_text_len)
            if grouped:
                pixels, index = torch.cat([pool] * math.ceil(n_img / len(pool)))[:n_img], torch.arange(bs) // ppi
            else:
                pixels, index = torch.cat([pool] * math.ceil(bs / len(pool)))[:bs], None
            if cuda:
                pixels = pixels.pin_memory()
            for _ in range(warm):
                run(pixels, ids, mask, index)
            with Timer(device) as t:
                for _ in range(reps):
                    run(pixels, ids, mask, index)
            key = f"batch_{bs}_{'grouped' if grouped else 'ungrouped'}"
            results[key] = {"expressions_per_s": bs * reps / t.seconds, "images_per_batch": n_img if grouped else bs}
            print(f"  {key:<20} {fmt_rate(bs * reps / t.seconds):>9} expressions/s")
    base = results["single"]["expressions_per_s"]
    ratios = {k: v["expressions_per_s"] / base for k, v in results.items() if k != "single"}
    print("speed-up over one expression at a time: " + ", ".join(f"{k} x{v:.1f}" for k, v in ratios.items()))
    return {"mode": "model_only", "reason": reason, "preset": preset, "phrases_per_image": ppi,
            "autocast": "bf16" if dtype else "fp32", "results": results, "ratio_vs_single": ratios}


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    preset = args.preset or ("seed" if device.type == "cuda" else "tiny")
    torch.manual_seed(args.seed)
    info = device_info(device)
    print(f"device: {info['device_name']} ({device}), {info['date']}, torch {info['torch']}")
    reason = "--model-only" if args.model_only else None
    if reason is None:
        try:
            os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
            os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
            os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")  # MongoDB 6.0 notice
            import fiftyone as fo

            fo.list_datasets()  # starts (or connects to) its database
        except Exception as e:  # not installed, or its database cannot start
            reason = f"FiftyOne is not available here ({type(e).__name__}: {e}); apply_model part skipped"
            print(f"SKIPPED the apply_model benchmark: {reason}")
    with tempfile.TemporaryDirectory(prefix="fog-apply-bench-") as tmp:
        if reason is None:
            out = run_fiftyone(args, device, preset, Path(tmp))
        else:
            out = run_model_only(args, device, preset, Path(tmp), reason)
    payload = {"benchmark": "apply_throughput", **info, **out}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main().get("boxes_match", True) else 1)  # figures and JSON first, then the verdict
