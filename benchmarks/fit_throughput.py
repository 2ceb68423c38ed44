"""Training throughput end to end: ``fiftyone_grounding.fit`` on a generated FiftyOne dataset.

What ``train_throughput.py`` leaves out is timed here: the real ``fit`` reads the samples from
FiftyOne, builds the frozen-feature caches (images: two views; phrases: each and its swapped
form), then trains through its DataLoader (``GroundingDataset`` reading the memory-mapped
cache, ``GroupBatchSampler``, the collator with the text cache, ``--workers`` processes,
pinned memory), with AdamW, the scheduler, the per-epoch metrics and checkpoints.

Reported: the one-off cache build, each epoch's wall time (``fit``'s own ``seconds`` column:
every step of the epoch, data loading included; no validation split, so nothing else) and
expressions/s per epoch. The first epoch pays one-off costs (CUDA kernels, page cache), so
the figure to read is the median of the later epochs. Full-size configs with random weights
(``--preset seed`` on CUDA) and generated 640x480 JPEGs; nothing is downloaded.

    PYTHONPATH=. python3 benchmarks/fit_throughput.py                       # CPU: tiny, 60 images
    PYTHONPATH=. python3 benchmarks/fit_throughput.py --preset seed --device cuda --images 4000 \\
        --batch-size 256 --epochs 3 --workers 8 --json out/fit.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from _bench_common import (add_grounding_samples, device_info, fmt_rate, offline_config, resolve_device, set_threads,
                           write_images, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="seed | grounder | tiny (default: seed on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--images", type=int, default=None, help="generated images (default: 4000 CUDA, 60 CPU)")
    p.add_argument("--phrases-per-image", type=int, default=7, help="samples per image (RefCOCO: about 7)")
    p.add_argument("--batch-size", type=int, default=None, help="expressions per step (default: 256 CUDA, 64 CPU)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 8 CUDA, 0 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("seed" if cuda else "tiny")
    n_images = args.images or (4000 if cuda else 60)
    batch_size = args.batch_size or (256 if cuda else 64)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    import fiftyone as fo

    from fiftyone_grounding.devices import default_num_workers
    from fiftyone_grounding.engine.fit import fit

    workers = args.workers if args.workers is not None else default_num_workers(device)

    info = device_info(device)
    print(f"device: {info['device_name']} ({device}), {info['date']}, torch {info['torch']}, FiftyOne {fo.__version__}")
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="fog-fit-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        images = write_images(tmp / "images", n_images, seed=args.seed)
        dataset = fo.Dataset(f"fog-fit-bench-{uuid.uuid4().hex[:8]}")
        try:
            n = add_grounding_samples(dataset, images, args.phrases_per_image, rng)
            print(f"data: {n_images} generated JPEGs (640x480) x {args.phrases_per_image} = {n} expressions "
                  f"({time.perf_counter() - t0:.1f} s to write)")

            config, note = offline_config(preset, tmp)
            if note:
                print(note)
            print(f"fit: preset {preset!r}, batch {batch_size}, {args.epochs} epochs, {workers} workers, "
                  f"random weights, feature + text caches on, augment flip")
            t0 = time.perf_counter()
            result = fit(dataset, model_config=config, preset=preset, weights=False, out_dir=str(tmp / "run"),
                         epochs=args.epochs, batch_size=batch_size, train_split=None, val_split=None,
                         num_workers=workers,
                         cpu=not cuda, seed=args.seed, cache_dir=str(tmp / "cache"), progress=False, resume=False)
            total = time.perf_counter() - t0
        finally:
            dataset.delete()

    epochs = [{"epoch": r["epoch"], "seconds": r["seconds"], "expressions_per_s": n / r["seconds"],
               "train_loss": r["train_loss"]} for r in result.history]
    train_seconds = sum(r["seconds"] for r in result.history)
    setup = total - train_seconds  # caches, model build, checkpoints
    later = [e["expressions_per_s"] for e in epochs[1:]] or [epochs[0]["expressions_per_s"]]
    steady = float(np.median(later))
    for e in epochs:
        print(f"  epoch {e['epoch']}: {e['seconds']:.2f} s, {fmt_rate(e['expressions_per_s'])} expressions/s")
    print(f"fit end to end: {fmt_rate(steady)} expressions/s (median of epochs 2+), "
          f"{total:.1f} s in all, of which {setup:.1f} s outside the epochs (cache build, model, checkpoints)")
    refcoco = 120_624 * 10 / steady
    print(f"at this rate 10 epochs of RefCOCO train (120,624 expressions) take {refcoco / 60:.1f} min "
          f"plus the one-off cache build")
    payload = {"benchmark": "fit_throughput", **info, "preset": preset, "images": n_images,
               "phrases_per_image": args.phrases_per_image, "expressions": n, "batch_size": batch_size,
               "workers": workers, "epochs": epochs, "expressions_per_s_steady": steady,
               "total_seconds": total, "seconds_outside_epochs": setup, "text_encoder_note": note}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
