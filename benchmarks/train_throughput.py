"""Training throughput: the seed's step against the project's training path, on one device.

Modes, all on the same model (same weights) and the same device, each timed after its own
warm-up steps with ``torch.cuda.synchronize(device)`` around the timed loop:

  seed          the seed's step: fp32, both encoders every step, one image per phrase
                (the image tensor repeated for each of its phrases)
  grouped_fp32  phrases grouped by image (``--phrases-per-image``, RefCOCO has ~7), each image
                encoded once per step, fp32 (CUDA only: isolates grouping from bf16)
  grouped       the project's pixel path: grouped + bf16 autocast on CUDA (fp32 on the CPU,
                as ``fit`` does there)
  cached        decoder (+ text encoder) only, on frozen image features read every step
                from a real ``FeatureCache`` built on disk from generated JPEGs (bf16 on CUDA)
  cached_text   the project's default path: decoder only, on cached image features and
                cached text features (a real ``TextFeatureCache`` on disk)

Every step is the one ``fit`` runs (``train.train_step``: forward, ``box_loss``, backward, grad
clipping, AdamW), the loss read on the host every 25 steps. Host batches are prepared before
timing (pinned on CUDA), as DataLoader workers would; the timed loop copies them to the device. JPEG decoding is therefore not
timed for the pixel modes; the cached mode's memory-mapped reads are. Full-size encoder
configs with random weights, no download. Token ids are random ids within the text
encoder's vocabulary with lengths ~10 (``--tokens tiny`` uses the tiny tokenizer instead).

    PYTHONPATH=. python3 benchmarks/train_throughput.py --preset seed --device cuda \\
        --batch-size 64 --steps 30 --json out/train.json
    PYTHONPATH=. python3 benchmarks/train_throughput.py          # CPU: tiny preset, a few steps
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from _bench_common import (Timer, device_info, fmt_rate, random_token_batch, resolve_device, set_threads,
                           tokenizer_batch, write_images, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="any preset, e.g. seed, grounder, fusion, adapter, tiny, tiny-fusion (default: seed on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="phrases (expressions) per step")
    p.add_argument("--phrases-per-image", type=int, default=7, help="RefCOCO: ~7 expressions per image")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (default: 30 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode (default: 5 CUDA, 2 CPU)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's (seed: 224)")
    p.add_argument("--tokens", choices=("random", "tiny"), default="random",
                   help="random ids in the text vocabulary (default) or the tiny tokenizer's ids")
    p.add_argument("--text-len", type=int, default=10, help="mean phrase length in tokens (random ids)")
    p.add_argument("--distinct-batches", type=int, default=8, help="distinct host batches cycled through")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the cache build")
    p.add_argument("--modes", default="seed,grouped_fp32,grouped,cached,cached_text")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved timed runs per mode, median reported (default: 1 CUDA, 3 CPU)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared CPU")
    p.add_argument("--profile", default=None, metavar="MODE",
                   help="after timing, profile one more run of MODE (torch.profiler tables)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_step_fn(model, optimizer, autocast_dtype, loss_weights, grad_clip=1.0):
    """``fit``'s own step (``train.train_step``) on a benchmark batch: returns its loss tensor."""
    from fiftyone_grounding.engine.loop import train_step

    def step(inputs: dict, boxes: torch.Tensor) -> torch.Tensor:
        loss, _ = train_step(model, {**inputs, "boxes": boxes}, optimizer, loss_weights, grad_clip,
                             autocast_dtype=autocast_dtype)
        return loss  # read on the host every SYNC_EVERY steps, as fit() does

    return step


def profile_mode(mode: str, timed_run, device: torch.device, rows: int = 18) -> None:
    """One more timed run of ``mode`` under ``torch.profiler``: the top operators by host
    time and by device time, to see whether a step waits on Python/launches or on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        timed_run(mode)
    table = prof.key_averages()
    print(f"\nprofile of {mode!r} (all its warm-up and timed steps):")
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    if device.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=48))


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("seed" if cuda else "tiny")
    steps = args.steps or (30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    modes = list(dict.fromkeys(m for m in args.modes.split(",") if m))
    repeats = args.repeats or (1 if cuda else 3)
    if not cuda and "grouped_fp32" in modes:
        modes.remove("grouped_fp32")  # identical to "grouped" off CUDA (no autocast there)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    from fiftyone_grounding.data.cache import open_feature_cache
    from fiftyone_grounding.devices import default_num_workers, peak_memory_gib, reset_peak_memory
    from fiftyone_grounding.data.images import load_rgb
    from fiftyone_grounding.models.build import build_model

    workers = args.workers if args.workers is not None else default_num_workers(device)
    from fiftyone_grounding.models.precision import default_mixed_precision
    from fiftyone_grounding.engine.loop import SYNC_EVERY
    from fiftyone_grounding.engine.optim import configure_optimizer

    model = build_model(preset, weights=False, image_size=args.image_size)
    config = model.config
    if not model.cacheable and any(m.startswith("cached") for m in modes):
        print(f"note: the {config.architecture} architecture reads the phrase inside the image encoder: "
              "no cached modes")
        modes = [m for m in modes if not m.startswith("cached")]
    model.to(device).train()
    bf16 = torch.bfloat16 if default_mixed_precision(device) == "bf16" else None
    vocab = int(model.text_encoder.config.vocab_size)

    B, ppi = args.batch_size, args.phrases_per_image
    images_per_step = math.ceil(B / ppi)
    image_index = torch.arange(B) // ppi  # phrase -> image of its step
    n_batches = max(1, min(args.distinct_batches, warmup + steps))
    n_images = images_per_step * n_batches

    info = device_info(device)
    print(f"device: {info['device_name']} ({device}), {info['date']}, torch {info['torch']}")
    print(f"preset {preset!r}: {config.image_encoder} + {config.text_encoder}, {config.image_size} px, "
          f"{config.architecture} (d_model {getattr(config.arch, 'd_model', 'of the image encoder')}), "
          f"{model.num_parameters():,} params "
          f"({model.num_parameters(trainable_only=True):,} trainable), random weights")
    print(f"batch {B} expressions = {images_per_step} images x <= {ppi} phrases; {warmup} warm-up + "
          f"{steps} timed steps per mode; mixed precision of the project path: {'bf16' if bf16 else 'none (fp32)'}")

    with tempfile.TemporaryDirectory(prefix="fog-train-bench-") as tmp:
        tmp = Path(tmp)
        with Timer(torch.device("cpu")) as t_gen:
            images = write_images(tmp / "images", n_images, seed=args.seed)
        paths = [p for p, _ in images]
        print(f"generated {n_images} JPEGs (640x480) in {t_gen.seconds:.1f} s")

        # Pixels as training feeds them: decoded, resized, normalized (3, S, S) float32.
        mean = torch.tensor(config.image_mean).view(3, 1, 1)
        std = torch.tensor(config.image_std).view(3, 1, 1)

        def pixels_of(path: str) -> torch.Tensor:
            from PIL import Image

            im = Image.fromarray(load_rgb(path)).resize((config.image_size,) * 2, Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
            return (x - mean) / std

        pool = torch.stack([pixels_of(p) for p in paths])  # (N, 3, S, S)

        tokenizer = None
        token_note = (f"random token ids in [1, {vocab}) (the text encoder's vocabulary), "
                      f"lengths {args.text_len}+-4 incl. CLS/SEP")
        if args.tokens == "tiny":
            from fiftyone_grounding.models.encoders import load_tokenizer

            tokenizer = load_tokenizer("tiny:bert")
            token_note = "ids of the tiny tokenizer ('tiny:bert') on generated phrases"

        batches = []
        for k in range(n_batches):
            idx = list(range(k * images_per_step, (k + 1) * images_per_step))
            if tokenizer is not None:
                ids, mask = tokenizer_batch(tokenizer, rng, B, config.max_text_len)
            else:
                ids, mask = random_token_batch(rng, B, vocab, config.max_text_len, args.text_len)
            boxes = torch.tensor([images[idx[int(i)]][1][j % len(images[idx[int(i)]][1])]
                                  for j, i in enumerate(image_index)], dtype=torch.float32)
            grouped = pool[idx]
            repeated = grouped[image_index]  # the seed: one image tensor per phrase
            if cuda:
                grouped, repeated = grouped.pin_memory(), repeated.pin_memory()
            batches.append(dict(k=k, idx=idx, ids=ids, mask=mask, boxes=boxes, grouped=grouped, repeated=repeated,
                                views=rng.integers(0, 2, len(idx)).tolist()))

        # The real feature cache, built on disk from the JPEGs (both views per image).
        cache, cache_info = None, None
        if model.cacheable:
            cache = open_feature_cache(tmp / "features", model)
            with Timer(device) as t_cache:
                added = cache.build(paths, model.encode_images, config, device, batch_size=64, num_workers=workers,
                                    autocast_dtype=bf16, progress=False)
            assert added == n_images, (added, n_images)
            per_image = cache.nbytes_per_image()
            print(f"feature cache: {added} images x 2 views encoded in {t_cache.seconds:.2f} s "
                  f"({added / t_cache.seconds:.1f} images/s incl. JPEG decode, {workers} workers), "
                  f"{per_image / 1024:.1f} KiB per image on disk, {cache.dir}")
            cache_info = {"images": n_images, "seconds": t_cache.seconds, "images_per_s": n_images / t_cache.seconds,
                          "bytes_per_image": per_image, "workers": workers}

        # The real text cache: every phrase of every batch encoded once (keys name the phrases).
        text_cache = None
        if "cached_text" in modes:
            from fiftyone_grounding.data.cache import TextFeatureCache

            text_cache = TextFeatureCache(tmp / "features", "benchmark")
            with Timer(device) as t_text:
                for b in batches:
                    keys = [f"b{b['k']}-p{j:05d}" for j in range(B)]
                    row = {key: j for j, key in enumerate(keys)}

                    def tokenize(chunk, b=b, row=row):
                        rows = [row[c] for c in chunk]
                        return {"input_ids": b["ids"][rows], "attention_mask": b["mask"][rows]}

                    text_cache.build(keys, model, tokenize, device, batch_size=B, autocast_dtype=bf16,
                                     progress=False)
            print(f"text cache: {n_batches * B} phrases encoded in {t_text.seconds:.2f} s")

        def text_inputs(b: dict) -> dict:
            feats = [text_cache.get(f"b{b['k']}-p{j:05d}") for j in range(B)]
            padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (B, L, D)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(f), dtype=torch.long) for f in feats],
                                                   batch_first=True)
            if cuda:
                padded, mask = padded.pin_memory(), mask.pin_memory()
            return dict(text_features=padded.to(device, non_blocking=True),
                        attention_mask=mask.to(device, non_blocking=True))

        def inputs_for(mode: str, b: dict) -> dict:
            nb = dict(non_blocking=True)
            common = dict(input_ids=b["ids"].to(device, **nb), attention_mask=b["mask"].to(device, **nb))
            if mode == "seed":
                return dict(pixel_values=b["repeated"].to(device, **nb), image_index=None, **common)
            index = image_index.to(device, **nb)
            if mode in ("cached", "cached_text"):
                feats = torch.stack([cache.get(paths[i], v) for i, v in zip(b["idx"], b["views"])])
                if cuda:
                    feats = feats.pin_memory()
                text = text_inputs(b) if mode == "cached_text" else common
                return dict(image_features=feats.to(device, **nb), image_index=index, **text)
            return dict(pixel_values=b["grouped"].to(device, **nb), image_index=index, **common)

        def timed_run(mode: str) -> float:
            dtype = None if mode in ("seed", "grouped_fp32") else bf16
            optimizer = configure_optimizer(model, 1e-4, 1e-4)
            step = train_step_fn(model, optimizer, dtype, config.loss_weights)
            losses, pending = [], []

            def run_step(s: int) -> None:
                b = batches[s % n_batches]
                pending.append(step(inputs_for(mode, b), b["boxes"].to(device)))
                if len(pending) >= SYNC_EVERY:
                    losses.extend(torch.stack(pending).tolist())
                    pending.clear()

            for s in range(warmup):
                run_step(s)
            with Timer(device) as t:
                for s in range(warmup, warmup + steps):
                    run_step(s)
                losses.extend(torch.stack(pending).tolist() if pending else [])
            if not all(math.isfinite(x) for x in losses):
                raise RuntimeError(f"{mode}: non-finite loss {losses}")
            return t.seconds

        times: dict[str, list] = {m: [] for m in modes}
        peak: dict[str, float] = {}
        for rep in range(repeats):  # interleaved, so that a busy spell hits every mode alike
            for mode in modes:
                if cuda:
                    torch.cuda.empty_cache()
                    reset_peak_memory(device)
                times[mode].append(timed_run(mode))
                if cuda:
                    peak[mode] = peak_memory_gib(device)

        if args.profile:
            profile_mode(args.profile, timed_run, device)

        results = {}
        for mode in modes:
            sec = float(np.median(times[mode]))
            results[mode] = {
                "expressions_per_s": B * steps / sec,
                "ms_per_step": 1000 * sec / steps,
                "seconds_all": times[mode],
                "images_encoded_per_step": 0 if mode.startswith("cached") else (B if mode == "seed" else images_per_step),
                "autocast": "fp32" if mode in ("seed", "grouped_fp32") or bf16 is None else "bf16",
                "peak_gpu_mem_gib": peak.get(mode),
            }
            mem = f", peak GPU memory {peak[mode]:.1f} GiB" if cuda else ""
            print(f"  {mode:<13} {fmt_rate(B * steps / sec):>10} expressions/s  {1000 * sec / steps:8.1f} ms/step  "
                  f"({results[mode]['autocast']}{mem}; median of {len(times[mode])})")

    base = results.get("seed", {}).get("expressions_per_s")
    ratios = {m: r["expressions_per_s"] / base for m, r in results.items()} if base else {}
    if ratios:
        print("speed-up over the seed step: " + ", ".join(f"{m} x{v:.2f}" for m, v in ratios.items() if m != "seed"))
    print(f"tokens: {token_note}")
    payload = {
        "benchmark": "train_throughput",
        **info,
        "preset": preset,
        "image_encoder": config.image_encoder,
        "text_encoder": config.text_encoder,
        "image_size": config.image_size,
        "weights": "random (tiny configs)" if preset.startswith("tiny") else "random (full-size configs, no download)",
        "batch_size": B,
        "phrases_per_image": ppi,
        "images_per_step": images_per_step,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "repeats": repeats,
        "tokens": token_note,
        "cache": cache_info,
        "results": results,
        "ratio_vs_seed": ratios,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
