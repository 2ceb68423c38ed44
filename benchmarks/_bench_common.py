"""Shared helpers of the benchmarks: generated images, token ids, device facts, JSON output.

Nothing here downloads anything: images are drawn with PIL/numpy, token ids are random
ids inside the text encoder's vocabulary (or the tiny tokenizer's ids), and encoders are
built from their known configs with random weights (``build_model(preset, weights=False)``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` without PYTHONPATH=. also works
    sys.path.insert(0, str(REPO))

WORDS = {
    "size": ["small", "large"],
    "color": ["red", "green", "blue", "yellow", "white"],
    "shape": ["circle", "square", "triangle", "object"],
    "where": ["on the left", "on the right", "at the top", "at the bottom"],
}


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads for the run (``--threads``; None or 0: torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` (None: the GPU where there is one, else the CPU), as the package resolves it.
    A GPU named with its index (``cuda:1``) also becomes CUDA's current GPU for the benchmark's
    process, so that what torch ties to the current GPU (``pin_memory()``, DataLoader pin threads,
    the profiler, ``fit``'s Accelerate, which takes no device) is tied to it, not to GPU 0."""
    from fiftyone_grounding.devices import resolve_device as package_device

    device = package_device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def device_info(device: torch.device) -> dict:
    from fiftyone_grounding.demo import machine_info

    cpu = machine_info()
    info = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU ({cpu['cpu']}, {cpu['cpu_capability']}, {os.cpu_count()} cores visible, "
                             f"torch threads {cpu['torch_threads']})"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (that GPU, not the current one)."""
    from fiftyone_grounding.devices import synchronize

    synchronize(device)


class Timer:
    """Wall-clock timer that waits for ``device`` (``torch.cuda.synchronize(device)``) at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        return False


def random_phrase(rng: np.random.Generator) -> str:
    parts = ["the"]
    if rng.random() < 0.5:
        parts.append(str(rng.choice(WORDS["size"])))
    parts.append(str(rng.choice(WORDS["color"])))
    parts.append(str(rng.choice(WORDS["shape"])))
    if rng.random() < 0.7:
        parts.append(str(rng.choice(WORDS["where"])))
    return " ".join(parts)


def draw_image(rng: np.random.Generator, width: int = 640, height: int = 480):
    """A photo-like (textured, JPEG-unfriendly) RGB image with a few shapes; returns
    (PIL image, normalized xyxy boxes of the shapes)."""
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), dtype=np.int16)
    base = base + rng.integers(-20, 21, (height, width, 3), dtype=np.int16)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(int(rng.integers(3, 8))):
        w, h = rng.integers(width // 12, width // 3), rng.integers(height // 12, height // 3)
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
        boxes.append([box[0] / width, box[1] / height, box[2] / width, box[3] / height])
    return image, boxes


def _write_image(job) -> tuple[str, list]:
    path, seed, width, height = job
    image, boxes = draw_image(np.random.default_rng(seed), width, height)
    image.save(path, quality=90)
    return path, boxes


def write_images(folder: Path, count: int, seed: int = 0, width: int = 640, height: int = 480):
    """``count`` generated JPEGs (quality 90) in ``folder``, drawn by all cores for large counts;
    image i is drawn from the seed ``(seed, i)``. Returns [(path, boxes)]."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"img_{i:05d}.jpg"), [seed, i], width, height) for i in range(count)]
    procs = min(os.cpu_count() or 1, 16)
    if count < 200 or procs < 2:
        return [_write_image(job) for job in jobs]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(procs) as pool:
        return pool.map(_write_image, jobs, chunksize=16)


def add_grounding_samples(dataset, images, phrases_per_image: int, rng: np.random.Generator) -> int:
    """One sample per referring expression (as the project stores RefCOCO): each generated
    image ``(path, boxes)`` gets ``phrases_per_image`` random phrases with a ground-truth box.
    Returns the dataset's size. The ``Sample`` objects are freed on return: FiftyOne reloads
    every live Sample of a dataset after each bulk write, which would tax what is timed."""
    import fiftyone as fo

    from fiftyone_grounding.data.labels import make_detections

    samples = []
    for path, boxes in images:
        for j in range(phrases_per_image):
            phrase = random_phrase(rng)
            samples.append(fo.Sample(filepath=path, expression=phrase,
                                     ground_truth=make_detections(boxes[j % len(boxes)], phrase)))
    dataset.add_samples(samples, progress=False)
    return len(dataset)


def random_token_batch(rng: np.random.Generator, batch: int, vocab_size: int, max_len: int,
                       mean_len: int = 10, spread: int = 4):
    """Random ids in [1, vocab_size) with lengths uniform in mean_len +- spread (CLS/SEP
    included, clipped to [3, max_len]), padded with 0 to the longest, like the Collator."""
    lengths = np.clip(rng.integers(mean_len - spread, mean_len + spread + 1, batch), 3, max_len)
    width = int(lengths.max())
    ids = np.zeros((batch, width), dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab_size, n)
        mask[i, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def tokenizer_batch(tokenizer, rng: np.random.Generator, batch: int, max_len: int):
    tokens = tokenizer([random_phrase(rng) for _ in range(batch)], padding=True, truncation=True,
                       max_length=max_len, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def offline_text_encoder(folder: Path, name: str) -> str:
    """A local folder with the architecture config of the full-size text encoder ``name`` and a
    BERT tokenizer over a generated vocabulary of its size (the real one needs the Hub)."""
    from transformers import BertConfig, BertTokenizerFast

    from fiftyone_grounding.models.encoder_specs import KNOWN_ENCODER_CONFIGS
    from fiftyone_grounding.models.encoders import tiny_vocabulary

    values = dict(KNOWN_ENCODER_CONFIGS[name])
    values.pop("model_type")
    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(**values).save_pretrained(folder)
    vocab = tiny_vocabulary()
    vocab += [f"[unused{i}]" for i in range(values["vocab_size"] - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    import inspect

    params = inspect.signature(BertTokenizerFast.__init__).parameters
    arg = {"vocab_file" if "vocab_file" in params else "vocab": str(folder / "vocab.txt")}
    BertTokenizerFast(**arg, do_lower_case=True, model_max_length=values["max_position_embeddings"]).save_pretrained(folder)
    return str(folder)


def offline_config(preset: str, tmp: Path, **overrides):
    """The config of a preset whose text encoder is a local folder (``offline_text_encoder``)
    where it would be downloaded; returns (config, note saying what stands in)."""
    from fiftyone_grounding.models.config import get_config
    from fiftyone_grounding.models.encoder_specs import KNOWN_ENCODER_CONFIGS

    config = get_config(preset, **overrides)
    note = None
    if config.text_encoder in KNOWN_ENCODER_CONFIGS:
        folder = offline_text_encoder(tmp / "text_encoder", config.text_encoder)
        note = (f"text encoder {config.text_encoder}: its config with random weights; tokenizer: BERT "
                f"WordPiece over a generated {KNOWN_ENCODER_CONFIGS[config.text_encoder]['vocab_size']}-entry vocabulary")
        config = get_config(preset, **{**overrides, "text_encoder": folder})
    return config, note


def build_offline(preset: str, tmp: Path):
    """``build_model`` of a preset with random weights, no download; returns (model, note)."""
    from fiftyone_grounding.models.build import build_model

    config, note = offline_config(preset, tmp)
    return build_model(config=config, weights=False), note


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def summarize(script: str, argv, args, results: dict, table: str, **extra) -> dict:
    """What a quality benchmark reports: the command that ran it, its options, ``extra`` figures,
    its results and table, the library versions and the machine; written to ``--json`` when given."""
    from fiftyone_grounding.demo import library_versions, machine_info

    summary = {"command": f"python benchmarks/{script}.py " + " ".join(argv or []), "args": vars(args), **extra,
               "results": results, "table": table, "versions": library_versions(), "machine": machine_info()}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"
