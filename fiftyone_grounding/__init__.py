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
    join_ref_l4(dataset, source=FOLDER)   # Ref-L4's human review of val/test: ref_l4_wrong per sample
    compute_label_errors(view, model=...) # P(the annotation is wrong) per sample, its kind, the model's box
"""

import sys
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.util import spec_from_loader

__version__ = "0.1.0"

_EXPORTS = {
    "GrounderConfig": "models.config",
    "TrainConfig": "engine.config",
    "PRESETS": "models.config",
    "get_config": "models.config",
    "GroundingError": "errors",
    "Grounder": "models.decoder",
    "build_model": "models.build",
    "box_loss": "models.losses",
    "fit": "engine.fit",
    "FitResult": "engine.fit",
    "GroundingModel": "inference.model",
    "evaluate_grounding": "evaluation.scoring",
    "evaluate_in_fiftyone": "evaluation.fiftyone_run",
    "ground_phrase": "inference.apply",
    "apply_grounding_model": "inference.apply",
    "load_grounding_model": "app.zoo",
    "release_models": "app.zoo",
    "search_phrase": "inference.search",
    "checkpoint_of": "runs",
    "register_local_source": "app.zoo",
    "grounding_metrics": "evaluation.metrics",
    "make_synthetic_dataset": "data.synthetic",
    "import_refcoco": "sources.importer",
    "join_ref_l4": "sources.ref_l4",
    "compute_label_errors": "qa.label_errors",
    "score_label_errors": "qa.label_errors",
    "calibrate_label_errors": "qa.label_errors",
    "push_to_hub": "engine.publish",
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


# Module paths of the released layout (0.1.0) that datasets still hold: FiftyOne stores the class
# paths of an evaluation's config and results ("fiftyone_grounding.evaluate.GroundingResults") and
# imports them when the run is loaded (load_evaluation_results, the Model Evaluation panel).
_LEGACY_MODULES = {"fiftyone_grounding.evaluate": "fiftyone_grounding.evaluation.fiftyone_run"}


class _LegacyModules(MetaPathFinder, Loader):
    """Imports an old module path of ``_LEGACY_MODULES`` as the module that holds its names now
    (the same module object, so its classes are the same classes). Asked last, so only for a
    name nothing else provides."""

    def find_spec(self, fullname, path=None, target=None):
        return spec_from_loader(fullname, self) if fullname in _LEGACY_MODULES else None

    def create_module(self, spec):
        return None  # a placeholder module, which exec_module replaces

    def exec_module(self, module):
        # the import system returns what sys.modules holds under the name once the loader is done
        sys.modules[module.__name__] = import_module(_LEGACY_MODULES[module.__name__])


sys.meta_path.append(_LegacyModules())
