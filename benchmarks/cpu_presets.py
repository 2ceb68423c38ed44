"""Inference speed of each real-size preset on the CPU: what a user without a GPU waits.

For each preset (default: every real-size one, at its own image size, with random weights:
nothing is downloaded; the text encoder's tokenizer is a BERT WordPiece over a generated
vocabulary of the real size), ``apply_grounding_model`` end to end on a FiftyOne dataset of
``--images`` generated 640x480 JPEGs with ``--phrases-per-image`` expressions each (decode,
model, writes), after one warm-up batch. Prints images/s and expressions/s and how long 10,000
images would take; ``--json`` keeps the figures.

    PYTHONPATH=. python3 benchmarks/cpu_presets.py                  # every core of this machine
    PYTHONPATH=. python3 benchmarks/cpu_presets.py --presets grounder --images 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from _bench_common import (add_grounding_samples, build_offline, device_info, set_threads, write_images,
                           write_json)

REAL_SIZE = ("seed", "grounder", "fusion", "adapter", "fusion-multi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(REAL_SIZE), help="comma-separated (default: %(default)s)")
    p.add_argument("--images", type=int, default=12, help="generated images per preset (default: %(default)s)")
    p.add_argument("--phrases-per-image", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="phrases per forward (default: the CPU default, 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_bench")
    import fiftyone as fo

    from fiftyone_grounding.inference.apply import apply_grounding_model
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.progress import format_duration

    device = torch.device(args.device)
    info = device_info(device)
    print(f"device: {info}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = write_images(tmp / "images", args.images + 1, seed=args.seed)
        rng = np.random.default_rng(args.seed)
        dataset = fo.Dataset(f"fog-bench-{uuid.uuid4().hex[:8]}")
        try:
            add_grounding_samples(dataset, images, args.phrases_per_image, rng)
            warm_ids = dataset.match({"filepath": images[0][0]}).values("id")
            warm, timed = dataset.select(warm_ids), dataset.exclude(warm_ids)
            for preset in [p for p in args.presets.split(",") if p]:
                grounder, _ = build_offline(preset, tmp)
                model = GroundingModel(grounder, device=device)
                apply_grounding_model(warm, model, label_field="warm", prompt_field="expression",
                                      batch_size=args.batch_size, progress=False)
                start = time.perf_counter()
                apply_grounding_model(timed, model, label_field=f"pred_{preset}", prompt_field="expression",
                                      batch_size=args.batch_size, progress=False)
                seconds = time.perf_counter() - start
                n_images, n_phrases = args.images, len(timed)
                rate = n_images / seconds
                results[preset] = {"image_size": model.config.image_size, "images": n_images,
                                   "expressions": n_phrases, "seconds": seconds, "images_per_s": rate,
                                   "expressions_per_s": n_phrases / seconds,
                                   "seconds_for_10000_images": 10_000 / rate}
                print(f"  {preset:<13} {model.config.image_size:>4} px  {rate:6.2f} images/s  "
                      f"{n_phrases / seconds:6.2f} expressions/s  10,000 images: {format_duration(10_000 / rate)}",
                      flush=True)
                del model, grounder
        finally:
            dataset.delete()
    payload = {"device": info, "threads": torch.get_num_threads(), "phrases_per_image": args.phrases_per_image,
               "presets": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
