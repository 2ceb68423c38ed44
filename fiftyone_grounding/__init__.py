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
    "GrounderConfig": "models.config",
    "TrainConfig": "engine.config",
    "PRESETS": "models.config",
    "get_config": "models.config",
    "GroundingError": "errors",
    "Grounder": "models.build",
    "build_model": "models.build",
    "box_loss": "models.losses",
    "fit": "engine.train",
    "FitResult": "engine.train",
    "GroundingModel": "inference.model",
    "evaluate_grounding": "evaluation.evaluate",
    "evaluate_in_fiftyone": "evaluation.evaluate",
    "ground_phrase": "inference.apply",
    "apply_grounding_model": "inference.apply",
    "load_grounding_model": "app.zoo",
    "release_models": "app.zoo",
    "search_phrase": "inference.search",
    "checkpoint_of": "runs",
    "register_local_source": "app.zoo",
    "grounding_metrics": "evaluation.evaluate",
    "make_synthetic_dataset": "data.synthetic",
    "import_refcoco": "sources.importer",
    "load_checkpoint": "models.checkpoint",
    "save_checkpoint": "models.checkpoint",
    "convert_checkpoint": "models.checkpoint",
    "predict_and_crop": "inference.predict",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
