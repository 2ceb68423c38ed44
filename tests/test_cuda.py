"""What only a CUDA GPU can run: batches in flight (``predict_boxes`` before ``.result()``) and
``apply_grounding_model`` with one batch in flight, checked against the CPU; and, with two GPUs,
a model on ``cuda:1`` that predicts, trains, caches features and fits there, leaving GPU 0 untouched.

Skipped without a GPU (CI has none); ``benchmarks/run_gpu.sh`` runs this file after the apply benchmark.
"""

import numpy as np
import pytest
import torch

from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.inference.model import GroundingModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PHRASES = ["the red circle", "the small blue square on the left", "the large triangle", "the top one"]


def _batches(size: int, count: int = 4):
    rng = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8, generator=rng), PHRASES,
             torch.tensor([0, 1, 2, 2])) for _ in range(count)]


def test_batches_in_flight_give_the_boxes_of_the_cpu(tiny_checkpoint):
    cpu = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    gpu = GroundingModel.from_checkpoint(tiny_checkpoint, device="cuda", mixed_precision="no")
    batches = _batches(cpu.config.image_size)
    pending = [gpu.predict_boxes(*batch) for batch in batches]  # all queued before any is read
    for batch, boxes in zip(batches, pending):
        torch.testing.assert_close(boxes.result(), cpu.predict_boxes(*batch).result(), atol=1e-4, rtol=0)
    # pixels and indices already on the GPU are used as they are (not pinned)
    pixels, phrases, index = batches[0]
    torch.testing.assert_close(gpu.predict_boxes(pixels.cuda(), phrases, index.cuda()).result(),
                               cpu.predict_boxes(pixels, phrases, index).result(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_apply_on_the_gpu_writes_the_boxes_of_the_cpu(synthetic_dataset, tiny_checkpoint, dataset_name,
                                                      worker_type):
    view = synthetic_dataset.limit(40).clone(dataset_name)
    cpu = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    gpu = GroundingModel.from_checkpoint(tiny_checkpoint, device="cuda", mixed_precision="no")
    apply_grounding_model(view, cpu, label_field="cuda_ref", batch_size=8, num_workers=0)
    run = apply_grounding_model(view, gpu, label_field=f"cuda_{worker_type}", batch_size=8, num_workers=2,
                                worker_type=worker_type, write_every=12)  # overlap: on, by default on CUDA
    assert run == {"processed": 40, "skipped": []}
    ref, got = view.values(["cuda_ref.detections.bounding_box", f"cuda_{worker_type}.detections.bounding_box"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4)


# -- any GPU, not only GPU 0 (issue 27) ------------------------------------------------------------
# Everything runs on cuda:1 in a fresh process (tests/cuda_device_script.py), so that nothing this
# process put on GPU 0 counts; then GPU 0 must hold no memory and no CUDA context of it.

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.fixture(scope="module")
def on_gpu_1(synthetic_dataset, tiny_checkpoint, tmp_path_factory):
    """What the script reports after predicting, training a step, caching features and fitting on cuda:1."""
    from cuda_device_script import run

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    return run(tiny_checkpoint, "cuda:1", tmp_path_factory.mktemp("gpu1"), synthetic_dataset,
               ACCELERATE_TORCH_DEVICE="cuda:1")


@two_gpus
def test_a_model_on_gpu_1_predicts_trains_and_reports_its_memory_there(on_gpu_1):
    assert on_gpu_1["boxes_finite"] and on_gpu_1["loss_finite"]
    assert on_gpu_1["parameters_on"] == ["cuda:1"] and on_gpu_1["fit_parameters_on"] == ["cuda:1"]
    assert on_gpu_1["cached"] == 4 and on_gpu_1["fit_val_iou"] is not None
    assert on_gpu_1["peak_gib"] > 0  # the memory statistic of cuda:1, not of the current GPU
    # bf16 as cuda:1 has it (its own capability, not GPU 0's)
    expected = "torch.bfloat16" if torch.cuda.get_device_capability(1) >= (8, 0) else "None"
    assert on_gpu_1["autocast"] == expected


@two_gpus
def test_a_model_on_gpu_1_leaves_gpu_0_untouched(on_gpu_1):
    """No tensor (allocated now or at any time) and no CUDA context on GPU 0: nothing of predict,
    the training step, the cache's pinned loader or fit (under ACCELERATE_TORCH_DEVICE) went there."""
    assert on_gpu_1["allocated_elsewhere"]["0"] == 0 and on_gpu_1["peak_elsewhere"]["0"] == 0
    assert 0 not in on_gpu_1["contexts_elsewhere"], on_gpu_1
