"""fiftyone-grounding: visual grounding (phrase -> box) for FiftyOne.

Main entry points (imported lazily, so ``import fiftyone_grounding`` is cheap)::

    build_model(preset, **overrides)      # the nn.Module (presets: seed, grounder, tiny)
    fit(view, preset=..., out_dir=...)    # train on a FiftyOne dataset or view (options: TrainConfig)
    GroundingModel.from_checkpoint(dir)   # a FiftyOne model for dataset.apply_model(...)
    apply_grounding_model(view, model)    # the same boxes, faster, written in bulk
    search_phrase(view, "a dog", model)   # every image ranked by where the phrase is
    evaluate_grounding(view, pred, gt)    # mIoU, Acc@0.5, Acc@0.75, overall and per split
    make_synthetic_dataset(...)           # the offline synthetic referring dataset
    import_refcoco(name="refcoco", ...)   # RefCOCO(+/g), gRefCOCO, RefCOCO-M, refcocox into FiftyOne
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GrounderConfig": "config",
    "TrainConfig": "config",
    "PRESETS": "config",
    "get_config": "config",
    "GroundingError": "errors",
    "Grounder": "model",
    "build_model": "model",
    "box_loss": "losses",
    "fit": "train",
    "FitResult": "train",
    "GroundingModel": "fiftyone_model",
    "evaluate_grounding": "evaluate",
    "evaluate_in_fiftyone": "evaluate",
    "ground_phrase": "apply",
    "apply_grounding_model": "apply",
    "load_grounding_model": "zoo",
    "release_models": "zoo",
    "search_phrase": "search",
    "checkpoint_of": "runs",
    "register_local_source": "zoo",
    "grounding_metrics": "evaluate",
    "make_synthetic_dataset": "synthetic",
    "import_refcoco": "refcoco",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "convert_checkpoint": "checkpoint",
    "predict_and_crop": "predict",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
