"""The offline main job: synthetic data -> FiftyOne -> train ``tiny`` on the CPU -> apply -> evaluate.

``task="grec"`` runs the generalized version: phrases of no, one or several objects, the
multi-box ``tiny-fusion-multi`` against the one-box ``tiny`` on the same data, scored with
gRefCOCO's official metrics.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

from .errors import InputError

DEMO_DATASET = "grounding-synthetic-demo"
TASKS = ("rec", "grec")
# each task's defaults where an argument is None (grec's models cost more per step: fewer images)
DEMO_DEFAULTS = {
    "rec": dict(out_dir="outputs/demo", dataset_name=DEMO_DATASET, num_images=16000, epochs=15),
    "grec": dict(out_dir="outputs/demo-grec", dataset_name="grounding-synthetic-grec", num_images=6000, epochs=12),
}
GREC_FRACTIONS = dict(several_fraction=0.3, none_fraction=0.2)  # of the phrases, where the scene allows


# torchvision resizes the images (images.py), scipy matches the multi-box queries (matching.py)
VERSIONED = ("torch", "torchvision", "transformers", "numpy", "scipy", "pillow", "fiftyone")


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


def _settings(task: str, out_dir, dataset_name, num_images, epochs) -> tuple:
    """The arguments, each None replaced by the task's default."""
    given = dict(out_dir=out_dir, dataset_name=dataset_name, num_images=num_images, epochs=epochs)
    return tuple(DEMO_DEFAULTS[task][k] if v is None else v for k, v in given.items())


def run_demo(
    out_dir: Optional[str] = None,
    dataset_name: Optional[str] = None,
    num_images: Optional[int] = None,
    epochs: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 7e-4,
    seed: int = 0,
    json_path: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    task: str = "rec",
) -> dict:
    """Run the whole offline pipeline and return the test metrics.

    The dataset is persistent (images under ``out_dir/images``), so it can be opened in
    the App afterwards: ``fo.launch_app(fo.load_dataset(dataset_name))``; the App plugin is
    installed into FiftyOne's plugins folder (:func:`install.install_plugin`) and the best
    checkpoint recorded by absolute path, the App's forms' default model where the dataset
    trained none. Arguments left None take the task's ``DEMO_DEFAULTS``; ``task="grec"``:
    :func:`run_grec_demo`.
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, not {task!r}")
    if task == "grec":
        return run_grec_demo(out_dir=out_dir, dataset_name=dataset_name, num_images=num_images, epochs=epochs,
                             batch_size=batch_size, lr=lr, seed=seed, json_path=json_path, overwrite=overwrite,
                             progress=progress)
    out_dir, dataset_name, num_images, epochs = _settings("rec", out_dir, dataset_name, num_images, epochs)
    from fiftyone import ViewField as F

    from .evaluation.evaluate import METRICS, constant_box_miou, evaluate_grounding, format_table
    from .progress import fiftyone_progress
    from .data.synthetic import make_synthetic_dataset
    from .engine.train import fit
    from .inference.model import GroundingModel

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
    with fiftyone_progress(progress, "applying the model") as shown:  # lines, not a bar, in a log
        test_view.apply_model(model, label_field="predictions", prompt_field="expression", batch_size=64,
                              num_workers=0, progress=shown)

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
    from .app.zoo import record_demo_checkpoint

    record_demo_checkpoint(result.best_dir)  # the App's forms offer it by this absolute path
    print(f"Done in {summary['seconds']:.0f} s.")
    _to_the_app(dataset_name)
    return summary


def _to_the_app(dataset_name: str) -> None:
    """Install the App plugin (idempotent) and say how to look at the predictions there."""
    from .errors import GroundingError
    from .app.install import install_plugin

    try:
        print(install_plugin().message())
    except GroundingError as e:  # the figures are made: a plugin folder we cannot write loses nothing
        print(f"The App plugin is not installed: {e}")
    print("Look at the predictions in the App (then press ` and type 'grounding' for the plugin's operators):\n"
          f"  {sys.executable} -c \"import fiftyone as fo; fo.launch_app(fo.load_dataset('{dataset_name}')).wait()\"")


def run_grec_demo(
    out_dir: Optional[str] = None,
    dataset_name: Optional[str] = None,
    num_images: Optional[int] = None,
    epochs: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 7e-4,
    seed: int = 0,
    json_path: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generalized grounding, offline: a synthetic dataset whose phrases refer to no object, one
    or several ("all the red shapes", "the two squares"; "the green triangle" where there is
    none), ``tiny-fusion-multi`` and the one-box ``tiny`` trained alike on it (the one-box model
    skips the phrases it cannot learn), both applied to the test split and scored as gRefCOCO's
    official scorer does (``evaluate.evaluate_grec``). The multi-box model writes only its boxes
    >= 0.7, so its threshold sweep has no rows below 0.7 (None). Arguments left None take
    ``DEMO_DEFAULTS["grec"]``."""
    from fiftyone import ViewField as F

    from .evaluation.evaluate import evaluate_grec
    from .inference.model import GroundingModel
    from .progress import fiftyone_progress
    from .data.synthetic import make_synthetic_dataset
    from .engine.train import fit

    out_dir, name, num_images, epochs = _settings("grec", out_dir, dataset_name, num_images, epochs)
    t0 = time.time()
    out = Path(out_dir)
    print(f"[1/5] Generating the synthetic dataset {name!r} ({num_images} images; phrases of no, one "
          "or several objects)")
    dataset = make_synthetic_dataset(name, num_images=num_images, out_dir=str(out / "images"), seed=seed,
                                     overwrite=overwrite, progress=progress, **GREC_FRACTIONS)
    test = dataset.match(F("split") == "test")
    print("      " + ", ".join(f"{k} {v}" for k, v in sorted(dataset.count_values("phrase_kind").items())))
    runs = {}
    for step, (key, preset, what) in enumerate((
            ("multi", "tiny-fusion-multi", "the multi-box 'tiny-fusion-multi'"),
            ("one_box", "tiny", "the one-box 'tiny' (it skips the phrases of no or several objects)")), start=2):
        print(f"[{step}/5] Training {what} for {epochs} epochs")
        runs[key] = fit(dataset, preset=preset, out_dir=str(out / preset), epochs=epochs,
                        batch_size=batch_size, lr=lr, seed=seed, augment="flip", resume=not overwrite,
                        progress=progress, cpu=True)
    print(f"[4/5] Applying both to the test split ({len(test)} expressions)")
    written_from = {}  # the confidence each field's boxes were written from: the thresholds its sweep answers
    for key, run in runs.items():
        model = GroundingModel.from_checkpoint(run.best_dir, device="cpu")
        with fiftyone_progress(progress, f"applying {key}") as shown:
            test.apply_model(model, label_field=f"pred_{key}", prompt_field="expression", batch_size=64,
                             num_workers=0, progress=shown)
        written_from[key] = model.applied_score_thresh or 0.0  # FiftyOne's apply_model keeps no record of it
    print("[5/5] Scoring as gRefCOCO's official scorer (boxes at confidence >= 0.7, GIoU >= 0.5, F1 = 1)")
    scores = {key: evaluate_grec(test, f"pred_{key}", split_field="phrase_kind", applied_thresh=written_from[key])
              for key in runs}
    table = format_grec_demo(scores)
    print(table)
    nothing = scores["multi"]["splits"].get("none", {})
    boxed = 1 - nothing["n_acc"] if nothing.get("n_acc") is not None else None
    if boxed is not None:
        print(f"no-target phrases that got a box at confidence >= 0.7: {boxed:.1%} of {nothing['count']} "
              f"(multi-box); {1 - scores['one_box']['splits']['none']['n_acc']:.1%} (one-box)")
    summary = {
        "test": {key: {"overall": s["overall"], "by_kind": s["splits"], "sweep": s["sweep"]} for key, s in scores.items()},
        "no_target_with_a_box": boxed,
        "table": table,
        "dataset": name,
        "checkpoints": {key: str(run.best_dir) for key, run in runs.items()},
        "seconds": round(time.time() - t0, 1),
        "versions": library_versions(),
        "machine": machine_info(),
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2))
        print(f"Wrote {json_path}")
    print(f"Done in {summary['seconds']:.0f} s.")
    _to_the_app(name)
    return summary


def format_grec_demo(scores: dict) -> str:
    """The generalized demo's table: per model, Pr@F1=1 / N-acc / T-acc, and Pr@F1=1 per kind."""
    names = {"multi": "tiny-fusion-multi", "one_box": "tiny (one box)"}
    kinds = sorted({k for s in scores.values() for k in s["splits"]})
    head = f"{'model':<18} | {'Pr@F1=1':>7} | {'N-acc':>6} | {'T-acc':>6} | " + " | ".join(
        f"{k + ' Pr@F1':>{max(10, len(k) + 6)}}" for k in kinds)
    lines = [head, "-" * len(head)]

    def fmt(v, width):
        return f"{v:>{width}.4f}" if v is not None else f"{'-':>{width}}"

    for key, s in scores.items():
        o = s["overall"]
        lines.append(f"{names.get(key, key):<18} | {fmt(o['pr_f1'], 7)} | {fmt(o['n_acc'], 6)} | {fmt(o['t_acc'], 6)} | "
                     + " | ".join(fmt(s["splits"].get(k, {}).get("pr_f1"), max(10, len(k) + 6)) for k in kinds))
    return "\n".join(lines)
