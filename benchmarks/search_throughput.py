"""Phrase search throughput: ``search_phrase`` over a dataset, cold and from the feature cache.

On a generated FiftyOne dataset (``--images`` JPEGs of 640x480, one sample each), one phrase
is searched end to end (read the view, decode or read features, the model, bulk writes, the
sort by confidence):

  cold    ``search_phrase(view, phrase, model, use_cache=False)``: every image decoded,
          resized and encoded by the frozen image encoder
  cached  the same after ``FeatureCache.build`` (what training leaves behind): the frozen
          features are read from the cache, only the fusion and the head run

Each is warmed up once on a few images (not timed); the median of ``--repeats`` is reported,
in images per second. The tiny preset on the CPU by default; ``--preset grounder --device
cuda`` times the full-size architecture with random weights (no download: a generated
tokenizer stands in for BGE's).

    PYTHONPATH=. python3 benchmarks/search_throughput.py --threads 1          # CPU, tiny
    PYTHONPATH=. python3 benchmarks/search_throughput.py --preset grounder --device cuda --images 2000

What it means for 100,000 images on a GPU with the real encoders is written in the README
(docs/speed.md): the cold search is bounded by JPEG decoding and the image encoder, the
cached one by the fusion alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from _bench_common import (build_offline, device_info, fmt_rate, resolve_device, set_threads, sync, write_images,
                           write_json)

PHRASE = "the small red circle on the left"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | grounder | fusion (random weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    p.add_argument("--images", type=int, default=200, help="generated images, one sample each")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared CPU)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    import fiftyone as fo

    from fiftyone_grounding.data.cache import open_feature_cache
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.inference.search import search_phrase

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = write_images(tmp / "images", args.images, seed=args.seed)
        dataset = fo.Dataset(f"fog-bench-search-{uuid.uuid4().hex[:8]}")
        try:
            dataset.add_samples([fo.Sample(filepath=path) for path, _ in images], progress=False)
            grounder, note = build_offline(args.preset, tmp)
            model = GroundingModel(grounder, device=device)
            print(f"{args.images} generated JPEGs (640x480); preset {args.preset!r} ({grounder.config.image_size} px, "
                  f"{grounder.num_parameters():,} params, random weights{'; ' + note if note else ''}) on {device}")

            cache_root = tmp / "features"
            cache = open_feature_cache(cache_root, grounder)
            t0 = time.perf_counter()
            cache.build([path for path, _ in images], grounder.encode_images, grounder.config, device,
                        batch_size=args.batch_size, autocast_dtype=model.autocast_dtype, progress=False)
            build_s = time.perf_counter() - t0

            def run(use_cache: bool, view) -> float:
                t = time.perf_counter()
                ranked = search_phrase(view, PHRASE, model, label_field="found", batch_size=args.batch_size,
                                       use_cache=use_cache, cache_dir=cache_root, progress=False)
                ranked.first()  # the sorted view is read, as the App does
                sync(device)
                return time.perf_counter() - t

            results = {}
            for name, use_cache in (("cold", False), ("cached", True)):
                run(use_cache, dataset.limit(min(8, args.images)))  # warm-up
                seconds = statistics.median(run(use_cache, dataset) for _ in range(args.repeats))
                results[name] = {"seconds_median": round(seconds, 3), "images_per_s": args.images / seconds}
            boxes = dataset.count("found.detections")
        finally:
            dataset.delete()
    results["cached"]["speedup_vs_cold"] = results["cold"]["seconds_median"] / results["cached"]["seconds_median"]

    print(f"{'search':<8} | {'seconds':>8} | {'images/s':>9}")
    for name, r in results.items():
        print(f"{name:<8} | {r['seconds_median']:>8.2f} | {fmt_rate(r['images_per_s']):>9}")
    print(f"cached features: {results['cached']['speedup_vs_cold']:.1f}x the cold search "
          f"(the cache took {build_s:.1f} s to build, once); {boxes} of {args.images} images got a box")
    hours = {name: 100_000 / r["images_per_s"] / 3600 for name, r in results.items()}
    print(f"at these rates 100,000 images take {hours['cold']:.2f} h cold, {hours['cached']:.2f} h cached")
    payload = {"preset": args.preset, "images": args.images, "batch_size": args.batch_size,
               "device": device_info(device), "results": results, "cache_build_seconds": build_s,
               "boxes": boxes, "hours_for_100k": hours}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
