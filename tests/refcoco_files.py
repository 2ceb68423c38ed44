"""RefCOCO-family files written in their real schemas, for the importer's tests: jxu124's rows
(a ``datasets.DatasetDict`` as ``save_to_disk`` writes it), the REFER release (``instances.json``
+ a refs pickle of plain dicts, protocol 2 as Python 2 wrote it), gRefCOCO's ``grefs(unc).json``,
and JPEGs named like COCO train2014 files with each referred box drawn in."""

import json
import os
import pickle

import datasets
from PIL import Image, ImageDraw

from fiftyone_grounding.sources.checks import COCO_CATEGORIES

# The features of jxu124/refcoco (its dataset card), in its column order.
FEATURES = datasets.Features(
    {
        "sent_ids": datasets.List(datasets.Value("int64")),
        "file_name": datasets.Value("string"),
        "ann_id": datasets.Value("int64"),
        "ref_id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"),
        "split": datasets.Value("string"),
        "sentences": datasets.List(
            {
                "raw": datasets.Value("string"),
                "sent": datasets.Value("string"),
                "sent_id": datasets.Value("int64"),
                "tokens": datasets.List(datasets.Value("string")),
            }
        ),
        "category_id": datasets.Value("int64"),
        "raw_anns": datasets.Value("string"),
        "raw_image_info": datasets.Value("string"),
        "raw_sentences": datasets.Value("string"),
        "image_path": datasets.Value("string"),
        "bbox": datasets.List(datasets.Value("float64")),
        "captions": datasets.List(datasets.Value("string")),
        "global_image_id": datasets.Value("string"),
        "anns_id": datasets.Value("string"),
    }
)

IMAGES = {9: (64, 48), 25: (80, 60), 30: (50, 70), 42: (96, 64), 49: (40, 40)}  # id -> (width, height)

# (HF split, ref_id, ann_id, image_id, category_id, pixel xyxy box, sent_ids)
REFS = [
    ("train", 0, 100, 9, 1, [4.0, 6.0, 30.0, 40.0], [0, 1]),
    ("train", 1, 101, 9, 18, [32.5, 10.0, 60.0, 44.25], [2, 3, 4]),
    ("train", 2, 102, 25, 3, [0.0, 0.0, 80.0, 60.0], [5]),
    ("train", 3, 103, 25, 62, [10.2, 20.7, 33.9, 51.1], [6, 7]),
    ("validation", 4, 104, 30, 44, [5.0, 5.0, 20.0, 65.0], [8, 9]),
    ("validation", 5, 105, 30, 90, [21.0, 1.0, 49.5, 30.0], [10]),
    ("test", 6, 106, 42, 1, [1.0, 2.0, 50.0, 63.0], [11, 12]),
    ("testB", 7, 107, 49, 67, [3.0, 3.0, 37.0, 30.0], [13]),
]
UNC = {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}
UMD = {"train": "train", "validation": "val", "test": "test"}


def coco_file(image_id):
    return "COCO_train2014_%012d.jpg" % image_id


def raw_text(sent_id, category_id):
    return f"The {COCO_CATEGORIES[category_id].upper()}, No. {sent_id}!"


def make_row(split_names, hf_split, ref_id, ann_id, image_id, category_id, box, sent_ids):
    """One row as jxu124 stores it: one referred object with all of its expressions."""
    width, height = IMAGES[image_id]
    x0, y0, x1, y1 = box
    sentences = []
    for sent_id in sent_ids:
        raw = raw_text(sent_id, category_id)
        sent = raw.lower().replace(",", "").replace(".", "").replace("!", "")
        sentences.append({"raw": raw, "sent": sent, "sent_id": sent_id, "tokens": sent.split()})
    ann = {
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "area": (x1 - x0) * (y1 - y0),
        "iscrowd": 0,
        "image_id": image_id,
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "category_id": category_id,
        "id": ann_id,
    }
    info = {
        "license": 1,
        "file_name": coco_file(image_id),
        "coco_url": f"http://images.cocodataset.org/train2014/{coco_file(image_id)}",
        "height": height,
        "width": width,
        "date_captured": "2013-11-14 16:28:13",
        "id": image_id,
    }
    return {
        "sent_ids": sent_ids,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split_names[hf_split],
        "sentences": sentences,
        "category_id": category_id,
        "raw_anns": json.dumps(ann),
        "raw_image_info": json.dumps(info),
        "raw_sentences": json.dumps(sentences),
        "image_path": f"coco/train2014/{coco_file(image_id)}",
        "bbox": box,
        "captions": [s["sent"] for s in sentences],
        "global_image_id": f"coco.{image_id}",
        "anns_id": json.dumps([ann_id]),
    }


def make_source(refs=REFS, split_names=UNC):
    rows = {}
    for hf_split, *ref in refs:
        rows.setdefault(hf_split, []).append(make_row(split_names, hf_split, *ref))
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {k: [r[k] for r in split_rows] for k in FEATURES}, features=FEATURES
            )
            for split, split_rows in rows.items()
        }
    )


def save(dsd, path):
    dsd.save_to_disk(str(path))
    return str(path)


def draw_images(folder, image_ids=IMAGES):
    """JPEGs named like COCO train2014 files, with each referred box drawn in."""
    os.makedirs(folder, exist_ok=True)
    for image_id in image_ids:
        image = Image.new("RGB", IMAGES[image_id], (200, 200, 200))
        draw = ImageDraw.Draw(image)
        for _, _, _, ref_image, _, box, _ in REFS:
            if ref_image == image_id:
                draw.rectangle(box, outline=(255, 0, 0))
        image.save(os.path.join(folder, coco_file(image_id)), quality=90)
    return str(folder)


REF_KEYS = ("sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences", "category_id")
CATEGORIES = [{"id": i, "name": n, "supercategory": "thing"} for i, n in ((1, "person"), (3, "car"), (18, "dog"),
                                                                          (44, "bottle"), (62, "chair"),
                                                                          (67, "dining table"), (90, "toothbrush"))]


def coco_image(image_id):
    width, height = IMAGES[image_id]
    return {"id": image_id, "file_name": coco_file(image_id), "width": width, "height": height, "license": 1}


def write_instances(folder, annotations, image_ids=IMAGES):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump({"images": [coco_image(i) for i in image_ids], "annotations": annotations,
                   "categories": CATEGORIES}, f)


def write_refer(folder, refs=REFS, split_names=UNC, refs_file="refs(unc).p"):
    """A REFER variant folder: instances.json + a refs pickle of plain dicts, from jxu124-style REFS."""
    rows = [make_row(split_names, *ref) for ref in refs]
    write_instances(folder, [json.loads(r["raw_anns"]) for r in rows])
    with open(os.path.join(folder, refs_file), "wb") as f:
        pickle.dump([{k: r[k] for k in REF_KEYS} for r in rows], f, protocol=2)
    return str(folder)


def write_grefcoco(folder):
    """gRefCOCO as released: one target, three targets, and no target (ann_id [-1])."""
    anns = [
        {"id": 500, "image_id": 9, "category_id": 1, "bbox": [4.0, 6.0, 26.0, 34.0], "area": 884.0, "iscrowd": 0},
        {"id": 501, "image_id": 42, "category_id": 1, "bbox": [1.0, 2.0, 20.0, 30.0], "area": 600.0, "iscrowd": 0},
        {"id": 502, "image_id": 42, "category_id": 1, "bbox": [30.0, 2.0, 20.0, 30.0], "area": 600.0, "iscrowd": 0},
        {"id": 503, "image_id": 42, "category_id": 18, "bbox": [60.0, 10.0, 30.0, 40.0], "area": 1200.0, "iscrowd": 0},
    ]
    write_instances(folder, anns)

    def ref(ref_id, image_id, ann_id, category_id, split, sent_ids, texts):
        sentences = [{"raw": t, "sent": t.lower(), "sent_id": s, "tokens": t.lower().split()}
                     for s, t in zip(sent_ids, texts)]
        return {"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "category_id": category_id,
                "split": split, "sent_ids": sent_ids, "sentences": sentences,
                "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg"}

    refs = [
        ref(0, 9, 500, 1, "train", [0, 1], ["Man on the left", "left person"]),
        ref(1, 42, [501, 502, 503], [1, 1, 18], "train", [2], ["all people and the dog"]),
        ref(2, 42, [-1], [-1], "val", [3, 4], ["the cat on the sofa", "a red bus"]),
        ref(3, 42, [501, 502], [1, 1], "testA", [5], ["two people"]),
    ]
    with open(os.path.join(folder, "grefs(unc).json"), "w") as f:
        json.dump(refs, f)
    return str(folder)
