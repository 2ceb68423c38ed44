"""The offline main job: synthetic data -> FiftyOne -> train ``tiny`` on the CPU -> apply -> evaluate."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

DEMO_DATASET = "grounding-synthetic-demo"


VERSIONED = ("torch", "transformers", "numpy", "pillow", "opencv-python-headless", "albumentations", "fiftyone")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries the demo's figures depend on (absent: ``None``)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cpu_name() -> str:
    """The machine's CPU model (from /proc/cpuinfo where there is one)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def machine_info() -> dict:
    """The CPU the demo trained on: its model, torch's kernel level for it (e.g. AVX2,
    AVX512) and torch's thread count. CPU kernels of another level (or another thread
    count) sum in another order, so the same seed trains to slightly other weights."""
    import torch

    return {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def run_demo(
    out_dir: str = "outputs/demo",
    dataset_name: str = DEMO_DATASET,
    num_images: int = 16000,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 7e-4,
    seed: int = 0,
    json_path: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run the whole offline pipeline and return the test metrics.

    The dataset is persistent (images under ``out_dir/images``), so it can be opened in
    the App afterwards: ``fo.launch_app(fo.load_dataset(dataset_name))``.
    """
    from fiftyone import ViewField as F

    from .evaluate import METRICS, constant_box_miou, evaluate_grounding, format_table
    from .synthetic import make_synthetic_dataset
    from .train import fit
    from .fiftyone_model import GroundingModel

    t0 = time.time()
    out = Path(out_dir)
    print(f"[1/4] Generating the synthetic referring dataset {dataset_name!r} ({num_images} images)")
    dataset = make_synthetic_dataset(dataset_name, num_images=num_images, out_dir=str(out / "images"),
                                     seed=seed, overwrite=overwrite, progress=progress)
    train_view = dataset.match(F("split") == "train")
    test_view = dataset.match(F("split") == "test")
    print(f"      {len(dataset)} expressions: " +
          ", ".join(f"{k} {v}" for k, v in sorted(dataset.count_values("split").items())))

    print(f"[2/4] Training the 'tiny' preset for {epochs} epochs")
    # flips are safe here: every synthetic shape is mirror-symmetric and its phrase swaps left/right
    result = fit(dataset, preset="tiny", out_dir=str(out / "run"), epochs=epochs, batch_size=batch_size,
                 lr=lr, seed=seed, augment="flip", resume=not overwrite, progress=progress, cpu=True)

    print(f"[3/4] Applying the best checkpoint to the test split ({len(test_view)} expressions)")
    model = GroundingModel.from_checkpoint(result.best_dir, device="cpu")
    test_view.apply_model(model, label_field="predictions", prompt_field="expression", batch_size=64,
                          num_workers=0, progress=progress)

    print("[4/4] Evaluating")
    metrics = evaluate_grounding(test_view, "predictions", "ground_truth", print_table=False)
    baseline = constant_box_miou(train_view, test_view)
    print(format_table(metrics))
    print(f"constant-box baseline mIoU (mean training box): {baseline:.4f}")
    summary = {
        "test": {k: metrics["overall"][k] for k in [key for key, _, _ in METRICS] + ["count"]},
        "constant_box_miou": baseline,
        "dataset": dataset_name,
        "checkpoint": str(result.best_dir),
        "seconds": round(time.time() - t0, 1),
        # the figures are exact for one set of these and one kind of CPU (the same code gave
        # other figures on other days); compare them before comparing the metrics
        "versions": library_versions(),
        "machine": machine_info(),
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2))
        print(f"Wrote {json_path}")
    print(f"Done in {summary['seconds']:.0f} s. Look at the predictions in the App:\n"
          f"  python -c \"import fiftyone as fo; fo.launch_app(fo.load_dataset('{dataset_name}')).wait()\"")
    return summary
