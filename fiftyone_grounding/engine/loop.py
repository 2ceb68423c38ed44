"""The step/epoch loop: :func:`train_step` (one optimizer step), :func:`train_one_epoch` (the
steps of an epoch, in step across processes) and :func:`evaluate_loss` (loss and IoU over a
loader, no gradients), with the batch helpers they share."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..data.absent import add_absent_pairs
from ..errors import TrainingError
from ..models.boxes import box_iou
from ..models.config import GrounderConfig
from ..models.losses import grounding_loss, judge_boxes
from ..models.precision import autocast
from .metrics import grec_right, iou_with_first_box, matched_queries
from .optim import clip_groups

SYNC_EVERY = 25  # steps between reads of the loss on the host (each read waits for the GPU)


def learns_absence(config: GrounderConfig) -> bool:
    """Whether training shows phrases with images that lack their referent (``negative_share``):
    one-box models with a quality head (its target there is 0) and a presence head, whose
    confidence then says whether the object is there at all. (Multi-box models learn it from
    phrases of nothing, through their existence score.)"""
    return config.num_queries == 0 and config.quality_head and config.presence_head


def to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):  # targets: a tensor per phrase
            return [t.to(device, non_blocking=True) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def loss_target(batch: dict):
    """What ``grounding_loss`` compares with: every phrase's boxes where the batch has them
    (multi-box training), else the one box of each."""
    return batch["targets"] if "targets" in batch else batch["boxes"]


def forward_batch(model, batch: dict):
    """The model's ``GroundingOutput`` for a collated training batch (pixels or cached features)."""
    return model(pixel_values=batch.get("pixel_values"), image_features=batch.get("image_features"),
                 input_ids=batch.get("input_ids"), text_features=batch.get("text_features"),
                 attention_mask=batch["attention_mask"],
                 image_index=batch["image_index"], judge_boxes=batch.get("judge_boxes"))


def train_step(model, batch: dict, optimizer, loss_weights: dict, grad_clip: float = 0.0, *, scheduler=None,
               accelerator=None, autocast_dtype: Optional[torch.dtype] = None,
               loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the model's device: forward (under autocast
    with ``autocast_dtype``), ``grounding_loss``, backward, gradient clipping (``clip_groups``),
    optimizer and scheduler step. Under Accelerate (``accelerator``) backward and clipping go through it.
    ``loss_scale`` 0: a step that must happen but must not learn (a process whose own batch was
    empty, see :func:`train_one_epoch`). Returns the loss and the predicted boxes (clipped to
    the image; the batch's own phrases, not the rows of ``absent`` pairs), detached, still on the
    device (reading them waits for it)."""
    with autocast(batch["attention_mask"].device, autocast_dtype):
        out = forward_batch(model, batch)
    loss = grounding_loss(out, loss_target(batch), loss_weights, absent=batch.get("absent"))["loss"]
    if loss_scale != 1.0:
        loss = loss * loss_scale
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    if grad_clip:
        if accelerator is not None:
            accelerator.unscale_gradients()  # (fp16 only; a no-op otherwise)
        for group in clip_groups(model):
            torch.nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    own = len(batch["sample_ids"]) if "absent" in batch else out.boxes.shape[0]
    return loss.detach(), out.clipped().boxes[:own].detach()


def one_phrase_batch(batch: dict) -> dict:
    """The first phrase of a collated batch and its image, copied: a stand-in batch, small and
    valid, that keeps nothing else of the batch alive."""
    image = int(batch["image_index"][0])
    out = {"image_index": torch.zeros(1, dtype=torch.long), "phrases": batch["phrases"][:1],
           "sample_ids": batch["sample_ids"][:1]}
    for key in ("input_ids", "text_features", "attention_mask", "boxes"):
        if key in batch:
            out[key] = batch[key][:1].clone()
    for key in ("pixel_values", "image_features"):
        if key in batch:
            out[key] = batch[key][image:image + 1].clone()
    if "targets" in batch:
        out["targets"] = [batch["targets"][0].clone()]
    return out


def stand_in_batch(loader) -> dict:
    """A one-phrase batch of the first readable item of the loader's dataset (for a process
    whose own batch is empty before it has seen a full one)."""
    for index in range(len(loader.dataset)):
        batch = loader.collate_fn([loader.dataset[index]])
        if "boxes" in batch:
            return one_phrase_batch(batch)
    raise TrainingError("No image of the training split can be read; check the image files")


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, config: GrounderConfig, grad_clip: float,
                    epoch: int, epochs: int, autocast_dtype: Optional[torch.dtype], show_progress: bool,
                    progress_callback, negative_share: float = 0.0, seed: int = 0) -> dict:
    """One epoch of :func:`train_step`. The loss and IoU stay on the device and are read every
    ``SYNC_EVERY`` steps (and at the end), so the host queues the next steps while the GPU
    works. A non-finite loss is then reported with its exact step and batch, by every process
    at once (they stop together).

    Every process takes the same number of optimizer and scheduler steps, whatever its data: a
    process whose batch held only unreadable images steps on a stand-in batch (one phrase of its
    last full batch) with the loss scaled to 0, so that it joins the gradient all-reduce (DDP's
    averaging then gives it the other processes' step); alone, it only moves the schedule on.
    ``negative_share`` > 0: that share of each batch's phrases is also shown with another image
    of the batch that lacks its referent (:func:`data.absent.add_absent_pairs`)."""
    import numpy as np

    from ..progress import bar as progress_bar

    model.train()
    device = accelerator.device
    several = accelerator.num_processes > 1
    sums = torch.zeros(6, device=device, dtype=torch.float64)  # loss * n, iou sum, n, n with a box, crops, crop area
    pending: list[tuple[int, torch.Tensor, list]] = []  # (step, loss, sample ids) not yet checked
    skipped: list = []
    stand_in: Optional[dict] = None  # one phrase of the last full batch

    def check() -> None:
        losses = torch.stack([loss for _, loss, _ in pending]).tolist() if pending else []
        bad = next(((step, ids, value) for (step, _, ids), value in zip(pending, losses)
                    if not math.isfinite(value)), None)
        pending.clear()
        if several:  # all stop, or none: a process that stopped alone would leave the others waiting
            flag = accelerator.reduce(torch.tensor([float(bad is not None)], device=device), "sum")
            if flag.item() and bad is None:
                raise TrainingError(f"Non-finite loss in another process at epoch {epoch + 1}; the last good "
                                    "checkpoint is kept; lower the learning rate or check the data.")
        if bad is not None:
            step, ids, value = bad
            raise TrainingError(
                f"Non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; batch samples: "
                f"{ids[:8]}. The last good checkpoint is kept; lower the learning rate "
                "or check these samples.")

    bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, leave=False)
    for step, batch in enumerate(bar):
        skipped.extend(batch["skipped"])
        if "boxes" in batch:
            if several:
                stand_in = one_phrase_batch(batch)
            if negative_share > 0:
                batch = add_absent_pairs(batch, negative_share, np.random.default_rng([seed, epoch, step]))
            if config.loss_weights.get("judge"):  # other boxes for the quality head to judge (the "judge" term)
                batch["judge_boxes"] = judge_boxes(batch["boxes"], batch["image_index"],
                                                   np.random.default_rng([seed, epoch, step, 1]))
            crop_areas = batch.get("crop_areas") or []
            batch = to_device(batch, device)
            loss, pred = train_step(model, batch, optimizer, config.loss_weights, grad_clip, scheduler=scheduler,
                                    accelerator=accelerator, autocast_dtype=autocast_dtype)
            with torch.no_grad():
                n = pred.shape[0]
                iou_sum, with_box = iou_with_first_box(pred, batch["boxes"][:n])
                sums[0] += loss.double() * n  # Python numbers go in as kernel arguments:
                sums[1] += iou_sum.double()  # no host-to-device copy, no wait
                sums[2] += n
                sums[3] += with_box.double()
                sums[4] += len(crop_areas)
                sums[5] += float(sum(crop_areas))
            pending.append((step, loss, batch["sample_ids"]))
        elif several:  # every image of this process's batch was unreadable: a step that learns nothing
            stand_in = stand_in or stand_in_batch(loader)
            train_step(model, to_device(stand_in, device), optimizer, config.loss_weights, grad_clip,
                       scheduler=scheduler, accelerator=accelerator, autocast_dtype=autocast_dtype, loss_scale=0.0)
        else:
            scheduler.step()  # alone: nothing to learn, the schedule keeps its length
        if (step + 1) % SYNC_EVERY == 0:  # at the same steps in every process (check may talk to the others)
            check()
            if show_progress:
                loss_sum, iou_sum, count, with_box = sums[:4].tolist()
                bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", iou=f"{iou_sum / max(with_box, 1):.3f}",
                                refresh=False)
        if progress_callback is not None and step % 10 == 0:
            progress_callback((epoch + (step + 1) / max(1, len(loader))) / epochs,
                              f"epoch {epoch + 1}/{epochs}, step {step + 1}/{len(loader)}")
    check()
    loss_sum, iou_sum, count, with_box, crops, crop_area = accelerator.reduce(sums, "sum").tolist()
    stats = {"train_loss": loss_sum / max(count, 1), "train_iou": iou_sum / max(with_box, 1), "skipped": skipped}
    if crops:
        stats["crop_area"] = crop_area / crops  # the mean share of an image a training crop keeps
    return stats


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, config: GrounderConfig, autocast_dtype: Optional[torch.dtype] = None,
                  keep_quality: bool = False) -> dict:
    """Mean loss and IoU over a loader (all processes together), and the samples it skipped.
    Multi-box models also get ``pr_f1``: the share of phrases that gRefCOCO's scorer counts right
    (``grec.score_expression`` at the model's ``score_thresh``, the uncalibrated confidence),
    phrases of nothing included. With ``keep_quality``, also this process's ``(quality logits,
    IoUs, images)`` of every box, for the confidence's calibration."""
    # The bare module: no DDP collectives, so processes may hold different numbers of batches.
    module = accelerator.unwrap_model(model)
    module.eval()
    loss_sum = iou_sum = count = with_box = right = 0.0
    skipped: list = []
    logits, ious, images = [], [], []
    for batch in loader:
        skipped.extend(batch["skipped"])
        if "boxes" not in batch:
            continue
        batch = to_device(batch, accelerator.device)
        with autocast(accelerator.device, autocast_dtype):
            raw = forward_batch(module, batch)
        out = raw.clipped()  # as post-processing writes them: what the metrics judge
        pred = out.boxes
        n = pred.shape[0]
        loss_sum += grounding_loss(raw, loss_target(batch), config.loss_weights)["loss"].item() * n
        batch_iou, batch_with_box = iou_with_first_box(pred, batch["boxes"])
        iou_sum += batch_iou.item()
        with_box += batch_with_box.item()
        count += n
        if out.scores is not None:
            right += grec_right(out, loss_target(batch), config.score_thresh)
        image_of = [batch["images"][i] for i in batch["image_index"].tolist()] if keep_quality else []
        if keep_quality and out.scores is not None:  # every query's box: right (1) where it finds a true box
            logits.extend(out.box_confidence_logits().flatten().tolist())
            ious.extend(matched_queries(out.query_boxes, loss_target(batch)).flatten().tolist())
            images.extend(image for image in image_of for _ in range(out.scores.shape[1]))
        elif keep_quality and out.quality is not None:
            logits.extend(out.confidence_logits().tolist())
            ious.extend(box_iou(pred.float(), batch["boxes"].float()).tolist())
            images.extend(image_of)
    totals = accelerator.reduce(torch.tensor([loss_sum, iou_sum, count, with_box, right], device=accelerator.device),
                                "sum")
    loss_sum, iou_sum, count, with_box, right = totals.tolist()
    result = {"skipped": skipped, "quality": (logits, ious, images)} if keep_quality else {"skipped": skipped}
    if count:
        result.update(loss=loss_sum / count, iou=iou_sum / max(with_box, 1))
        if config.num_queries > 0:
            result["pr_f1"] = right / count
    return result
