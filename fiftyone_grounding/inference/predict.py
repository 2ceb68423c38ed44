"""Ground one phrase in one image file (the notebook's ``predict_and_crop``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..models.boxes import box_xyxy_rel_to_abs
from ..errors import ImageError, InputError
from ..data.images import load_rgb
from ..data.labels import detection_xyxy


def predict_and_crop(image_path: str, phrase: str, checkpoint: str, out_dir: str = "outputs/predict",
                     device=None, model=None) -> dict:
    """Predict the box of ``phrase`` in the image; save the crop and the image with the box drawn.

    Returns ``{"box_pixels": [x0, y0, x1, y1], "box_relative": [...], "crop_path", "annotated_path",
    "boxes": [...]}``: the most confident box first, and in ``boxes`` every box the model gives
    (``box_pixels``, ``box_relative``, ``confidence``, ``crop_path``; a multi-box model gives zero,
    one or several: with none, ``box_pixels`` and the paths are None and nothing is written).
    """
    from .model import GroundingModel

    model = model or GroundingModel.from_checkpoint(checkpoint, device=device)
    try:
        image = load_rgb(image_path)
    except ImageError as e:
        raise ImageError(f"Cannot read {image_path}: {e}") from None
    height, width = image.shape[:2]
    detections = model.predict(image, phrase)
    if detections is None:
        raise InputError("The phrase is empty: type what to find in the image")
    if not detections.detections:
        return {"box_pixels": None, "box_relative": None, "crop_path": None, "annotated_path": None, "boxes": []}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    pil = Image.fromarray(image)
    annotated = pil.copy()
    draw = ImageDraw.Draw(annotated)
    boxes = []
    for k, det in enumerate(detections.detections):
        rel = detection_xyxy(det.bounding_box)
        pix = box_xyxy_rel_to_abs(np.asarray(rel, dtype=np.float64), width, height).tolist()
        x0, y0, x1, y1 = (int(round(v)) for v in pix)
        crop_path = out / (f"{stem}_crop.png" if k == 0 else f"{stem}_crop{k + 1}.png")
        pil.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))).save(crop_path)
        draw.rectangle((x0, y0, x1, y1), outline=(255, 0, 0), width=max(1, min(width, height) // 150))
        if k == 0:
            draw.text((x0 + 2, max(0, y0 - 12)), phrase[:60], fill=(255, 0, 0))
        boxes.append({"box_pixels": pix, "box_relative": rel, "confidence": det.confidence,
                      "crop_path": str(crop_path)})
    annotated_path = out / f"{stem}_box.png"
    annotated.save(annotated_path)
    first = boxes[0]
    return {"box_pixels": first["box_pixels"], "box_relative": first["box_relative"], "crop_path": first["crop_path"],
            "annotated_path": str(annotated_path), "boxes": boxes}
