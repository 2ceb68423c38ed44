"""The offline main job: synthetic data -> FiftyOne -> train ``tiny`` on the CPU -> apply -> evaluate.

``task="grec"`` runs the generalized version: phrases of no, one or several objects, the
multi-box ``tiny-fusion-multi`` against the one-box ``tiny`` on the same data, scored with
gRefCOCO's official metrics. Both run one pipeline (:func:`run_demo`); what a task does
differently is its :class:`DemoTask` in ``DEMO_TASKS``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError

DEMO_DATASET = "grounding-synthetic-demo"
# each task's defaults where an argument is None (grec's models cost more per step: fewer images)
DEMO_DEFAULTS = {
    "rec": dict(out_dir="outputs/demo", dataset_name=DEMO_DATASET, num_images=14000, epochs=10),
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


@dataclass(frozen=True)
class DemoModel:
    """A model that a demo trains on the synthetic set and applies to its test split."""

    key: str  # names it in metrics.json
    preset: str
    what: str  # how the training step names it
    run_dir: str  # its training folder under out_dir
    label_field: str  # the test split's field its boxes go to
    applying: str  # the label of its apply's progress


@dataclass(frozen=True)
class DemoTask:
    """What one demo does differently; :func:`run_demo` runs the steps every demo shares
    (generate, train each model, apply each, score, report). Titles are format strings."""

    generating: str  # step 1: {name}, {num_images}
    synthetic: dict  # make_synthetic_dataset's options for this task
    describe: Callable  # dataset -> the line under step 1
    models: tuple  # DemoModel, ...
    applying: str  # {count}: the test split's expressions
    scoring: str
    # (dataset, test view, models, each model's key -> the confidence its boxes were written from)
    # -> the figures of metrics.json; prints them
    score: Callable


def _describe_splits(dataset) -> str:
    return f"{len(dataset)} expressions: " + ", ".join(
        f"{k} {v}" for k, v in sorted(dataset.count_values("split").items()))


def _describe_kinds(dataset) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(dataset.count_values("phrase_kind").items()))


def _score_rec(dataset, test, models, written_from) -> dict:
    """mIoU and accuracies of the one model, against the constant-box baseline."""
    from fiftyone import ViewField as F

    from .evaluation.metrics import METRICS
    from .evaluation.scoring import constant_box_miou, evaluate_grounding
    from .evaluation.tables import format_table

    metrics = evaluate_grounding(test, models[0].label_field, "ground_truth", print_table=False)
    baseline = constant_box_miou(dataset.match(F("split") == "train"), test)
    print(format_table(metrics))
    print(f"constant-box baseline mIoU (mean training box): {baseline:.4f}")
    return {"test": {k: metrics["overall"][k] for k in [key for key, _, _ in METRICS] + ["count"]},
            "constant_box_miou": baseline}


def _score_grec(dataset, test, models, written_from) -> dict:
    """gRefCOCO's official scores of each model, per phrase kind; the no-target phrases boxed."""
    from .evaluation.scoring import evaluate_grec

    scores = {m.key: evaluate_grec(test, m.label_field, split_field="phrase_kind", applied_thresh=written_from[m.key])
              for m in models}
    table = format_grec_demo(scores)
    print(table)
    nothing = scores["multi"]["splits"].get("none", {})
    boxed = 1 - nothing["n_acc"] if nothing.get("n_acc") is not None else None
    if boxed is not None:
        print(f"no-target phrases that got a box at confidence >= 0.7: {boxed:.1%} of {nothing['count']} "
              f"(multi-box); {1 - scores['one_box']['splits']['none']['n_acc']:.1%} (one-box)")
    return {"test": {key: {"overall": s["overall"], "by_kind": s["splits"], "sweep": s["sweep"]}
                     for key, s in scores.items()},
            "no_target_with_a_box": boxed,
            "table": table}


DEMO_TASKS = {
    "rec": DemoTask(
        generating="Generating the synthetic referring dataset {name!r} ({num_images} images)",
        synthetic={},
        describe=_describe_splits,
        models=(DemoModel("tiny", "tiny", "the 'tiny' preset", "run", "predictions", "applying the model"),),
        applying="Applying the best checkpoint to the test split ({count} expressions)",
        scoring="Evaluating",
        score=_score_rec),
    # tiny-fusion-multi and the one-box tiny trained alike (the one-box model skips the phrases it cannot learn)
    "grec": DemoTask(
        generating="Generating the synthetic dataset {name!r} ({num_images} images; phrases of no, one or several "
                   "objects)",
        synthetic=GREC_FRACTIONS,
        describe=_describe_kinds,
        models=(DemoModel("multi", "tiny-fusion-multi", "the multi-box 'tiny-fusion-multi'", "tiny-fusion-multi",
                          "pred_multi", "applying multi"),
                DemoModel("one_box", "tiny", "the one-box 'tiny' (it skips the phrases of no or several objects)",
                          "tiny", "pred_one_box", "applying one_box")),
        applying="Applying both to the test split ({count} expressions)",
        scoring="Scoring as gRefCOCO's official scorer (boxes at confidence >= 0.7, GIoU >= 0.5, F1 = 1)",
        score=_score_grec),
}
TASKS = tuple(DEMO_TASKS)


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
    trained none. Arguments left None take the task's ``DEMO_DEFAULTS``.

    ``task="grec"``: generalized grounding, offline: a synthetic dataset whose phrases refer to no
    object, one or several ("all the red shapes", "the two squares"; "the green triangle" where
    there is none), ``tiny-fusion-multi`` and the one-box ``tiny`` trained alike on it (the
    one-box model skips the phrases it cannot learn), both applied to the test split and scored
    as gRefCOCO's official scorer does (``scoring.evaluate_grec``). The multi-box model writes
    only its boxes >= 0.7, so its threshold sweep has no rows below 0.7 (None).
    """
    if task not in TASKS:
        raise InputError(f"task must be one of {TASKS}, not {task!r}")
    spec = DEMO_TASKS[task]
    out_dir, name, num_images, epochs = _settings(task, out_dir, dataset_name, num_images, epochs)
    from fiftyone import ViewField as F

    from .data.synthetic import make_synthetic_dataset
    from .engine.fit import fit
    from .inference.model import GroundingModel
    from .progress import fiftyone_progress

    t0 = time.time()
    out = Path(out_dir)
    steps = len(spec.models) + 3
    print(f"[1/{steps}] " + spec.generating.format(name=name, num_images=num_images))
    dataset = make_synthetic_dataset(name, num_images=num_images, out_dir=str(out / "images"), seed=seed,
                                     overwrite=overwrite, progress=progress, **spec.synthetic)
    test = dataset.match(F("split") == "test")
    print("      " + spec.describe(dataset))

    runs = {}
    for step, model in enumerate(spec.models, start=2):
        print(f"[{step}/{steps}] Training {model.what} for {epochs} epochs")
        # flips are safe here: every synthetic shape is mirror-symmetric and its phrase swaps left/right
        runs[model.key] = fit(dataset, preset=model.preset, out_dir=str(out / model.run_dir), epochs=epochs,
                              batch_size=batch_size, lr=lr, seed=seed, augment="flip", resume=not overwrite,
                              progress=progress, cpu=True)

    print(f"[{steps - 1}/{steps}] " + spec.applying.format(count=len(test)))
    written_from = {}  # the confidence each field's boxes were written from: the thresholds its sweep answers
    for model in spec.models:
        grounding = GroundingModel.from_checkpoint(runs[model.key].best_dir, device="cpu")
        with fiftyone_progress(progress, model.applying) as shown:  # lines, not a bar, in a log
            test.apply_model(grounding, label_field=model.label_field, prompt_field="expression", batch_size=64,
                             num_workers=0, progress=shown)
        written_from[model.key] = grounding.applied_score_thresh or 0.0  # FiftyOne's apply_model keeps no record

    print(f"[{steps}/{steps}] {spec.scoring}")
    figures = spec.score(dataset, test, spec.models, written_from)
    checkpoints = {key: str(run.best_dir) for key, run in runs.items()}
    one_model = len(spec.models) == 1  # its checkpoint is recorded for the App's forms to offer
    summary = {
        **figures,
        "dataset": name,
        **({"checkpoint": checkpoints[spec.models[0].key]} if one_model else {"checkpoints": checkpoints}),
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
    if one_model:
        from .app.zoo import record_demo_checkpoint

        record_demo_checkpoint(runs[spec.models[0].key].best_dir)  # the App's forms offer it by this absolute path
    print(f"Done in {summary['seconds']:.0f} s.")
    _to_the_app(name)
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


def format_grec_demo(scores: dict) -> str:
    """The generalized demo's table: per model, Pr@F1=1 / N-acc / T-acc, and Pr@F1=1 per kind."""
    names = {"multi": "tiny-fusion-multi", "one_box": "tiny (one box)"}
    kinds = sorted({k for s in scores.values() for k in s["splits"]})
    head = f"{'model':<18} | {'Pr@F1=1':>7} | {'N-acc':>6} | {'T-acc':>6} | " + " | ".join(
        f"{k + ' Pr@F1':>{max(10, len(k) + 6)}}" for k in kinds)
    lines = [head, "-" * len(head)]
    from .evaluation.tables import format_metric as fmt

    for key, s in scores.items():
        o = s["overall"]
        lines.append(f"{names.get(key, key):<18} | {fmt(o['pr_f1'], 7)} | {fmt(o['n_acc'], 6)} | {fmt(o['t_acc'], 6)} | "
                     + " | ".join(fmt(s["splits"].get(k, {}).get("pr_f1"), max(10, len(k) + 6)) for k in kinds))
    return "\n".join(lines)
