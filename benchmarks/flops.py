"""Training FLOPs per expression of the real-size presets, counted, and the H200 step time they imply.

Each preset is built with its real encoder configs and random weights (no download). One
training step's forward and backward (``train.forward_batch`` + ``grounding_loss``, no optimizer)
of one image with ``--phrases-per-image`` phrases (RefCOCO: ~7) runs under
``torch.utils.flop_counter.FlopCounterMode``; FLOPs are linear in the images and phrases, so
this gives the cost per expression. Cacheable presets are counted twice: with the image
features read from the cache (the encoder's cost paid once, before training) and encoded on the
fly (scale/colour augmentation, or over the cache's disk budget).

The time is on paper: ``FLOPs of a --batch-size step / (--peak-tflops x --utilization)``, by
default an H200's dense bf16 peak (989 TFLOP/s) at 35% utilization; the real figure comes from
``benchmarks/train_throughput.py`` on the GPU.

    python benchmarks/flops.py                                  # grounder, fusion, adapter, fusion-multi
    python benchmarks/flops.py --presets fusion --phrases-per-image 7 --json flops.json
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.flop_counter as flop_counter

from _bench_common import write_json

aten = torch.ops.aten
REFCOCO_TRAIN_EXPRESSIONS = 120_624  # RefCOCO (UNC) train


def _register_cpu_attention() -> None:
    """FlopCounterMode knows CUDA's fused attention kernels, not the CPU one SDPA dispatches to
    here: count it with torch's own SDPA formulas."""
    ops = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if ops[0] in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(ops[0], get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @flop_counter.register_flop_formula(ops[1], get_raw=True)
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["grounder", "fusion", "adapter", "fusion-multi"],
                   help="presets to count")
    p.add_argument("--phrases-per-image", type=int, default=7, help="phrases of the one image counted")
    p.add_argument("--text-len", type=int, default=12, help="tokens per phrase, CLS and SEP included")
    p.add_argument("--batch-size", type=int, default=64, help="expressions per step, for the step time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H200: 989)")
    p.add_argument("--utilization", type=float, default=0.35, help="share of the peak a step sustains")
    p.add_argument("--json", default=None, help="write the figures here")
    return p.parse_args(argv)


def count(model, phrases: int, text_len: int, cached: bool) -> tuple[float, dict[str, float]]:
    """FLOPs of one image's training step (forward + backward), and their split by top-level module."""
    from fiftyone_grounding.models.losses import grounding_loss
    from fiftyone_grounding.engine.loop import forward_batch

    cfg = model.config
    vocab = int(model.text_encoder.config.vocab_size)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    batch = dict(input_ids=torch.randint(1, vocab, (phrases, text_len)),
                 attention_mask=torch.ones(phrases, text_len, dtype=torch.long),
                 image_index=torch.zeros(phrases, dtype=torch.long),
                 boxes=torch.tensor([[0.2, 0.3, 0.6, 0.8]]).repeat(phrases, 1))
    if cached:
        batch["image_features"] = model.encode_images(pixels)  # outside the count: paid once, before training
    else:
        batch["pixel_values"] = pixels
    model.zero_grad(set_to_none=True)
    with flop_counter.FlopCounterMode(display=False) as counter:
        out = forward_batch(model, batch)
        grounding_loss(out, batch["boxes"], cfg.loss_weights)["loss"].backward()
    # Modules as they were called (the adapter calls the image encoder's blocks, not the encoder):
    # the outermost of each top-level part, so nothing is counted twice.
    name = type(model).__name__
    counts = {m: float(sum(ops.values())) for m, ops in counter.get_flop_counts().items() if m.startswith(name + ".")}
    parts: dict[str, float] = {}
    for module, flops in counts.items():
        if not any(module.startswith(other + ".") for other in counts):
            part = module.split(".")[1]
            parts[part] = parts.get(part, 0.0) + flops
    total = float(counter.get_total_flops())
    parts["fusion and heads"] = total - sum(parts.get(k, 0.0) for k in ("image_encoder", "text_encoder"))
    return total, {k: v for k, v in parts.items() if k in ("image_encoder", "text_encoder", "fusion and heads")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    _register_cpu_attention()
    from fiftyone_grounding.models.build import build_model

    sustained = args.peak_tflops * args.utilization * 1e12
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_model(preset, weights=False).train()
        cfg = model.config
        for cached in ((True, False) if model.cacheable else (False,)):
            total, parts = count(model, args.phrases_per_image, args.text_len, cached)
            per_expression = total / args.phrases_per_image
            step_s = per_expression * args.batch_size / sustained
            rows.append({
                "preset": preset, "image_size": cfg.image_size, "image_features": "cached" if cached else "encoded",
                "trainable": model.num_parameters(trainable_only=True),
                "gflops_per_expression": per_expression / 1e9,
                "gflops_by_part_per_expression": {k: v / args.phrases_per_image / 1e9 for k, v in parts.items()},
                "expected_step_ms": 1000 * step_s,
                "expected_refcoco_epoch_s": step_s * REFCOCO_TRAIN_EXPRESSIONS / args.batch_size,
            })
            r = rows[-1]
            split = ", ".join(f"{k} {v:.3g}" for k, v in r["gflops_by_part_per_expression"].items())
            print(f"{preset:<9} {cfg.image_size} px, image features {r['image_features']:<7}: "
                  f"{r['gflops_per_expression']:7.3g} GFLOPs per expression ({split}); "
                  f"expected {r['expected_step_ms']:6.3g} ms per step of {args.batch_size}, "
                  f"{r['expected_refcoco_epoch_s']:5.0f} s per RefCOCO epoch")
    print(f"(forward + backward of a training step, {args.phrases_per_image} phrases of {args.text_len} tokens per "
          f"image; times at {args.utilization:.0%} of {args.peak_tflops:g} TFLOP/s, compute only: a step this small "
          "that waits on kernel launches or data loading takes longer)")
    payload = {"benchmark": "flops", "phrases_per_image": args.phrases_per_image, "text_len": args.text_len,
               "batch_size": args.batch_size, "peak_tflops": args.peak_tflops, "utilization": args.utilization,
               "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
