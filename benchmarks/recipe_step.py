"""One training step of each RefCOCO / gRefCOCO recipe, at its batch size: time and peak GPU memory.

For each recipe of ``training/`` named (default: the four real-size ones), the preset is built at
full size with random weights (no download) and ``train.train_step`` (forward under bf16
autocast as ``fit`` runs it on a GPU, the loss, backward, clipping, AdamW) runs on a batch of the
recipe's size: ``batch_size`` phrases, about 7 per image as RefCOCO (``--phrases-per-image``),
from pixels where the recipe trains without the feature cache (the crops of ``scale`` need pixels;
the adapter cannot cache), else from frozen features of the right shape. Multi-box recipes get
1-3 true boxes per phrase and some phrases of nothing, as gRefCOCO. Reported per recipe: the median
step time of ``--steps`` steps after ``--warmup``, expressions per second, and
``torch.cuda.max_memory_allocated`` (the peak of the whole step, optimizer state included), and
on any device an estimate: the weights, gradients and AdamW state plus the bytes of every tensor
the step saves for its backward pass (counted with autograd's saved-tensor hooks; on the CPU less
the attention weights, which a GPU's fused attention does not keep), scaled to the recipe's batch.

    PYTHONPATH=. python3 benchmarks/recipe_step.py --device cuda --json out/recipes.json
    PYTHONPATH=. python3 benchmarks/recipe_step.py --device cpu --batch-size 8 --steps 1 --warmup 0   # a dry run

These are the figures a recipe's ``batch_size`` has to fit into (GPU memory); the README's
memory column says "estimate" until this has run on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _bench_common import REPO, build_offline, device_info, random_token_batch, resolve_device, sync, write_json

RECIPES = ("refcoco_grounder", "refcoco_fusion", "refcoco_adapter", "grefcoco_fusion_multi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe files of training/ (no .json)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="phrases per step (default: each recipe's)")
    p.add_argument("--phrases-per-image", type=int, default=7, help="RefCOCO: about 7 expressions per image")
    p.add_argument("--steps", type=int, default=10, help="timed steps per recipe")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per recipe")
    p.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"),
                   help="autocast dtype (default: the recipe's, as fit resolves it on the device; bf16 on the CPU "
                        "counts the activations a GPU run keeps)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_batch(model, batch_size: int, per_image: int, pixels: bool, rng: np.random.Generator, device) -> dict:
    """A training batch as the Collator makes it: pixels or cached features, token ids, boxes."""
    cfg = model.config
    images = max(1, -(-batch_size // per_image))
    image_index = torch.from_numpy(np.minimum(np.arange(batch_size) // per_image, images - 1))
    vocab = model.text_encoder.config.vocab_size
    ids, mask = random_token_batch(rng, batch_size, vocab, cfg.max_text_len)
    xy = rng.uniform(0.05, 0.6, (batch_size, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(0.1, 0.35, (batch_size, 2))], 1), dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "image_index": image_index, "boxes": boxes,
             "sample_ids": [str(i) for i in range(batch_size)], "phrases": [""] * batch_size}
    if pixels:
        batch["pixel_values"] = torch.randn(images, 3, cfg.image_size, cfg.image_size)
    else:
        tokens, width = model.image_feature_shape()
        batch["image_features"] = torch.randn(images, tokens, width, dtype=torch.float16)
    if cfg.num_queries:  # gRefCOCO: phrases of one to three objects, some of none
        counts = rng.choice([0, 1, 1, 1, 2, 3], batch_size)
        batch["targets"] = [boxes[i:i + 1].repeat(int(n), 1) * (1 - 0.1 * torch.arange(int(n))[:, None])
                            for i, n in enumerate(counts)]
    return {k: v.to(device) if torch.is_tensor(v) else [t.to(device) for t in v] if k == "targets" else v
            for k, v in batch.items()}


@contextlib.contextmanager
def saved_for_backward():
    """Counts the bytes of the tensors autograd saves for the backward pass while the block runs
    (each storage once). On the CPU the attention saves its weights (the math kernel); CUDA's fused
    kernels save only their statistics, so on a GPU this overcounts attention."""
    seen: dict = {}
    square: set = set()  # storages of attention weights: (..., L, L) with L > 64
    counter = {"bytes": 0, "attention_bytes": 0}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
            if t.dim() >= 3 and t.shape[-1] == t.shape[-2] > 64:
                square.add(storage.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield counter
    counter["bytes"] = sum(seen.values())
    counter["attention_bytes"] = sum(seen[k] for k in square)


def measure(recipe: str, args, device, tmp: Path) -> dict:
    from fiftyone_grounding.devices import peak_memory_gib, reset_peak_memory
    from fiftyone_grounding.engine.config import TrainConfig
    from fiftyone_grounding.models.precision import AUTOCAST_DTYPES, default_mixed_precision
    from fiftyone_grounding.engine.loop import train_step
    from fiftyone_grounding.engine.optim import configure_optimizer

    cfg = TrainConfig.from_json(REPO / "training" / f"{recipe}.json")
    batch_size = args.batch_size or cfg.batch_size
    model, note = build_offline(cfg.preset, tmp)
    model.to(device).train()
    cached = cfg.cache_features and model.cacheable and cfg.augment in ("none", "flip")
    rng = np.random.default_rng(args.seed)
    batch = make_batch(model, batch_size, args.phrases_per_image, not cached, rng, device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
    mp = args.mixed_precision or (default_mixed_precision(device) if cfg.mixed_precision == "auto"
                                  else cfg.mixed_precision)
    dtype = AUTOCAST_DTYPES[mp]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    with saved_for_backward() as saved:  # a first step, its activations counted
        train_step(model, batch, optimizer, model.config.loss_weights, cfg.grad_clip, autocast_dtype=dtype)[0].item()
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss, _ = train_step(model, batch, optimizer, model.config.loss_weights, cfg.grad_clip, autocast_dtype=dtype)
        loss.item()  # waits for the step
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times) if times else float("nan")
    peak = peak_memory_gib(device)  # None off CUDA
    # the estimate: every weight, the trainable ones' gradients and AdamW's two moments (float32),
    # and the activations the step saved for its backward pass
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # attention weights count where the step ran the math kernel (the CPU); a GPU's fused kernel
    # keeps only their log-sum-exp, so the GPU estimate leaves them out
    activations = saved["bytes"] - (saved["attention_bytes"] if device.type == "cpu" else 0)
    estimate = (weights + 3 * trainable + activations) / 2**30
    # at the recipe's batch size: the activations grow with the phrases (and their images)
    at_recipe = (weights + 3 * trainable + activations * cfg.batch_size / batch_size) / 2**30
    result = {"recipe": recipe, "preset": cfg.preset, "batch_size": batch_size, "images": int(batch["image_index"].max()) + 1,
              "path": "cached features" if cached else "pixels", "mixed_precision": mp, "image_size": model.config.image_size,
              "step_seconds": seconds, "expressions_per_s": batch_size / seconds, "peak_memory_gib": peak,
              "saved_activations_gib": saved["bytes"] / 2**30, "attention_weights_gib": saved["attention_bytes"] / 2**30,
              "estimated_memory_gib": estimate,
              "recipe_batch_size": cfg.batch_size, "estimated_memory_at_recipe_batch_gib": at_recipe,
              "trainable": model.num_parameters(trainable_only=True), "note": note}
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    info = device_info(device)
    print(f"device: {info['device_name']} ({device}), {info['date']}, torch {info['torch']}")
    results = []
    with tempfile.TemporaryDirectory(prefix="fog-recipe-") as tmp:
        for recipe in args.recipes:
            r = measure(recipe, args, device, Path(tmp))
            results.append(r)
            peak = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
            print(f"{recipe:<24} {r['preset']:<13} batch {r['batch_size']:>4} ({r['images']} images, {r['path']}, "
                  f"{r['mixed_precision']}): {r['step_seconds'] * 1000:8.1f} ms/step, "
                  f"{r['expressions_per_s']:8.1f} expr/s, peak {peak}; estimate {r['estimated_memory_gib']:.1f} GiB "
                  f"(activations {r['saved_activations_gib']:.2f} GiB, of which attention weights "
                  f"{r['attention_weights_gib']:.2f}; at the recipe's batch "
                  f"{r['recipe_batch_size']}: {r['estimated_memory_at_recipe_batch_gib']:.1f} GiB)")
    payload = {"benchmark": "recipe_step", **info, "args": vars(args), "results": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
