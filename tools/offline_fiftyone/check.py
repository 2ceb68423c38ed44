"""Smoke test of the offline FiftyOne bundle (run after `source .fobundle/setup.sh`)."""

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

import fiftyone as fo

tmp = tempfile.mkdtemp(prefix="fobundle-check-")
paths = []
for i in range(3):
    p = os.path.join(tmp, "img%d.png" % i)
    Image.fromarray(np.full((24, 32, 3), 60 * i, dtype=np.uint8)).save(p)
    paths.append(p)

ds = fo.Dataset()
try:
    ds.add_samples([fo.Sample(filepath=p) for p in paths])
    dets = [
        fo.Detections(
            detections=[
                fo.Detection(label="obj%d" % i, bounding_box=[0.1, 0.1, 0.5, 0.5], confidence=0.5 + 0.1 * i)
            ]
        )
        for i in range(3)
    ]
    ds.set_values("gt", dets)
    labels = ds.values("gt.detections.label")
    assert labels == [["obj0"], ["obj1"], ["obj2"]], labels
    assert len(ds) == 3
finally:
    ds.delete()
    shutil.rmtree(tmp, ignore_errors=True)

print("FIFTYONE BUNDLE OK", fo.__version__)
