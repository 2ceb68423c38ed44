"""Calibrating the confidence of a run's ``best/`` checkpoint on the validation split, after
training: its boxes' quality logits against whether they were right, fitted and saved there."""

from __future__ import annotations

from pathlib import Path

from ..models.checkpoint import WEIGHTS_NAME, load_trainable_weights
from ..models.config import GrounderConfig
from .loop import evaluate_loss


def calibrate_best(model, val_loader, accelerator, config: GrounderConfig, autocast_dtype, best_dir: Path) -> None:
    """Fit the confidence's calibration of ``best/`` on the validation split and save it there
    (models whose boxes carry a confidence). The model in memory keeps the weights training left it with."""
    from accelerate.utils import gather_object

    from ..models.calibration import fit_calibration

    module = accelerator.unwrap_model(model)
    if not module.has_confidence:
        return
    kept = {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}
    load_trainable_weights(module, best_dir / WEIGHTS_NAME)
    try:
        logits, ious, images = evaluate_loss(model, val_loader, accelerator, config, autocast_dtype,
                                             keep_quality=True)["quality"]
    finally:
        module.load_state_dict(kept, strict=False)
    if accelerator.num_processes > 1:
        logits, ious, images = (sum(gather_object([values]), []) for values in (logits, ious, images))
    if accelerator.is_main_process and logits:
        calibration = fit_calibration(logits, ious, groups=images)
        calibration.save(best_dir)
        module.calibration = calibration
        what = "validation boxes (every query's)" if config.num_queries else "validation expressions"
        print(f"Confidence: {calibration.method} calibration on {calibration.fitted_on} {what} "
              f"(expected calibration error there {calibration.val_ece:.4f})")
    accelerator.wait_for_everyone()
