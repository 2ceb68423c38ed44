"""Ground one phrase in one image file (the notebook's ``predict_and_crop``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .boxes import box_xyxy_rel_to_abs
from .errors import ImageError, InputError
from .images import load_rgb


def predict_and_crop(image_path: str, phrase: str, checkpoint: str, out_dir: str = "outputs/predict",
                     device=None, model=None) -> dict:
    """Predict the box of ``phrase`` in the image; save the crop and the image with the box drawn.

    Returns ``{"box_pixels": [x0, y0, x1, y1], "box_relative": [...], "crop_path", "annotated_path"}``.
    """
    import torch

    from .fiftyone_model import GroundingModel

    model = model or GroundingModel.from_checkpoint(checkpoint, device=device)
    try:
        image = load_rgb(image_path)
    except ImageError as e:
        raise ImageError(f"Cannot read {image_path}: {e}") from None
    height, width = image.shape[:2]
    detections = model.predict(image, phrase)
    if detections is None:
        raise InputError("The phrase is empty: type what to find in the image")
    det = detections.detections[0]
    x, y, w, h = det.bounding_box
    rel = [x, y, x + w, y + h]
    pix = box_xyxy_rel_to_abs(torch.tensor(rel), width, height).tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    pil = Image.fromarray(image)
    x0, y0, x1, y1 = (int(round(v)) for v in pix)
    crop = pil.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    crop_path = out / f"{stem}_crop.png"
    crop.save(crop_path)
    annotated = pil.copy()
    draw = ImageDraw.Draw(annotated)
    draw.rectangle((x0, y0, x1, y1), outline=(255, 0, 0), width=max(1, min(width, height) // 150))
    draw.text((x0 + 2, max(0, y0 - 12)), phrase[:60], fill=(255, 0, 0))
    annotated_path = out / f"{stem}_box.png"
    annotated.save(annotated_path)
    return {"box_pixels": pix, "box_relative": rel, "crop_path": str(crop_path),
            "annotated_path": str(annotated_path)}
