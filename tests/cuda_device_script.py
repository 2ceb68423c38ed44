"""Run by tests/test_cuda.py in a process of its own: everything the package does on one GPU,
``DEVICE`` (e.g. ``cuda:1``), then what the other GPUs hold, as JSON in ``OUT``.

A fresh process, so that nothing the test process did on GPU 0 counts. It predicts (pinned copies,
the result copied back behind an event), takes a training step (bf16 where ``DEVICE`` has it),
builds the image-feature cache (a DataLoader with workers and pinned memory), and with a dataset
name also runs ``fit`` (Accelerate's device set by ``ACCELERATE_TORCH_DEVICE``, as the caller does).
Usage: cuda_device_script.py CHECKPOINT DEVICE WORK_DIR OUT [DATASET]; from a test: :func:`run`.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fiftyone_grounding.data.cache import open_feature_cache
from fiftyone_grounding.devices import peak_memory_gib, reset_peak_memory, synchronize
from fiftyone_grounding.engine.loop import to_device, train_step
from fiftyone_grounding.engine.optim import configure_optimizer
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.models.precision import AUTOCAST_DTYPES, default_mixed_precision

def run(checkpoint, device: str, work: Path, synthetic_dataset, **env) -> dict:
    """This script on ``device`` in a fresh process, over a persistent copy of ``synthetic_dataset``
    (deleted after); its report. ``env``: more environment variables."""
    name = f"fog-device-{uuid.uuid4().hex[:8]}"
    dataset = synthetic_dataset.clone(name)
    dataset.persistent = True  # the script loads it by name
    try:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env)
        proc = subprocess.run([sys.executable, __file__, str(checkpoint), device, str(work), str(work / "report.json"),
                               name], env=env, capture_output=True, text=True, timeout=600)
    finally:
        dataset.delete()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((work / "report.json").read_text())


PHRASES = ["the red circle", "the small blue square on the left", "the large triangle", "the top one"]


def main(checkpoint: str, device_name: str, work: str, out: str, dataset: str = "") -> None:
    device = torch.device(device_name)
    work_dir = Path(work)
    report = {"device": str(device)}
    model = GroundingModel.from_checkpoint(checkpoint, device=device)  # mixed_precision "auto": asks DEVICE
    report["autocast"] = str(model.autocast_dtype)
    reset_peak_memory(device)

    # predict: pinned pixels in, boxes back through pinned memory behind an event
    size = model.config.image_size
    pixels = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = model.predict_boxes(pixels, PHRASES, torch.tensor([0, 1, 2, 2])).result()
    report["boxes_finite"] = bool(torch.isfinite(boxes[0] if isinstance(boxes, tuple) else boxes).all())

    # one training step of fit's own step function, on DEVICE
    net = model.model.train()
    mp = default_mixed_precision(device)
    vocab = int(net.text_encoder.config.vocab_size)
    ids = torch.randint(1, vocab, (4, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_index": torch.tensor([0, 0, 1, 1]),
             "pixel_values": torch.randn(2, 3, size, size),
             "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0],
                                    [0.4, 0.4, 0.7, 0.8]]),
             "sample_ids": ["a", "b", "c", "d"], "phrases": PHRASES}
    optimizer = configure_optimizer(net, 1e-4, 1e-4)
    loss, _ = train_step(net, to_device(batch, device), optimizer, net.config.loss_weights, 1.0,
                         autocast_dtype=AUTOCAST_DTYPES[mp])
    report["loss_finite"] = bool(torch.isfinite(loss).item())
    report["parameters_on"] = sorted({str(p.device) for p in net.parameters()})

    # the image-feature cache: a DataLoader with workers and pinned batches
    if net.cacheable:
        paths = []
        for i in range(4):
            path = work_dir / f"image{i}.png"
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
        cache = open_feature_cache(work_dir / "features", net)
        report["cached"] = cache.build(paths, net.encode_images, net.config, device, batch_size=2, num_workers=2,
                                       autocast_dtype=AUTOCAST_DTYPES[mp], progress=False)

    if dataset:  # fit, on the device Accelerate was given
        import fiftyone as fo

        from fiftyone_grounding.engine.fit import fit

        result = fit(fo.load_dataset(dataset), preset="tiny", out_dir=str(work_dir / "run"), epochs=1, batch_size=8,
                     progress=False, resume=False, train_split="train", val_split="val")
        report["fit_parameters_on"] = sorted({str(p.device) for p in result.model.parameters()})
        report["fit_val_iou"] = result.best_val_iou

    synchronize(device)
    report["peak_gib"] = peak_memory_gib(device)
    # Every other GPU: no CUDA context (asked first: reading memory statistics creates none), no memory.
    others = [i for i in range(torch.cuda.device_count()) if i != device.index]
    report["contexts_elsewhere"] = [i for i in others if torch._C._cuda_hasPrimaryContext(i)]
    report["allocated_elsewhere"] = {i: torch.cuda.memory_allocated(i) for i in others}
    report["peak_elsewhere"] = {i: torch.cuda.max_memory_allocated(i) for i in others}
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
