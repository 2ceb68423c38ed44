"""Inference over several processes (``inference/distributed.py``): the command line's
``--distributed`` under a real ``torchrun`` with 2 CPU processes against the test database, and
the pieces it rests on: the image-grouped shards and the paged read of a view."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fiftyone_grounding.errors import InputError
from fiftyone_grounding.fiftyone_api import stream_by_filepath
from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.inference.distributed import Shard, launched_shard, rank_device
from fiftyone_grounding.inference.model import GroundingModel

REPO = Path(__file__).resolve().parents[1]


def test_shards_keep_an_image_on_one_rank_and_cover_the_view_once(synthetic_dataset):
    paths = synthetic_dataset.values("filepath")
    for world in (1, 2, 3):
        owners = [[r for r in range(world) if Shard(r, world).owns(p)] for p in paths]
        assert all(len(o) == 1 for o in owners)  # each sample (so each image) on exactly one rank
        if world > 1:
            assert len({o[0] for o in owners}) == world  # every rank has work on 40 images


def test_the_launchers_environment_names_the_rank_and_its_device(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match="torchrun --nproc_per_node 2"):
        launched_shard()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    shard = launched_shard()
    assert (shard.rank, shard.world_size, shard.local_rank) == (3, 4, 1)
    assert str(rank_device("cpu", shard)) == "cpu"
    assert str(rank_device("cuda:0", shard)) == "cuda:0"  # an index given is kept
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="RANK=4 is not below WORLD_SIZE=4"):
        launched_shard()


def test_a_view_is_read_in_pages_of_whole_images_in_filepath_order(synthetic_dataset):
    view = synthetic_dataset.match_tags("train")
    expected = sorted(zip(*view.values(["id", "filepath", "expression"])), key=lambda r: (r[1], r[0]))
    for page in (1, 3, 1000):  # a page ends inside an image: that image is read whole
        rows = list(stream_by_filepath(view, ("expression",), page=page))
        assert sorted(rows, key=lambda r: (r[1], r[0])) == expected
        assert [r[1] for r in rows] == sorted(r[1] for r in rows)
        assert len({r[0] for r in rows}) == len(rows)


def _torchrun(args: list, env: dict) -> subprocess.Popen:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return subprocess.Popen(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(29541 + os.getpid() % 50),
         "-m", "fiftyone_grounding.cli", *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _rank_pids(proc.pid)  # in sessions of their own: killpg of torchrun's misses them
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}")
    return out


def _rank_pids(launcher: int) -> dict:
    """{RANK: pid} of the worker processes a torchrun process started (from /proc: the children of
    each of its threads)."""
    ranks = {}
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for pid in map(int, children):
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            ranks[int(environ.get("RANK", -1))] = pid
    return ranks


def _written(ds, field: str) -> set:
    """The samples with a value in ``field``, which another process may have declared meanwhile."""
    ds.reload()
    return set(ds.exists(field).values("id")) if ds.has_field(field) else set()


def _boxes(view, field: str) -> dict:
    ids, boxes = view.values(["id", f"{field}.detections.bounding_box"])
    return {sid: np.asarray(b) for sid, b in zip(ids, boxes) if b is not None}


@pytest.mark.slow
def test_two_ranks_under_torchrun_write_the_boxes_of_one_process_and_a_rerun_finishes_a_killed_rank(
        synthetic_dataset, dataset_name, tiny_checkpoint, tmp_path):
    """2 CPU processes under ``torchrun`` against the test database. One rank is killed while it
    waits on an image (a named pipe that nothing writes: it blocks on it, deterministically, after
    writing its earlier images); torchrun stops the other. The rerun with --skip-existing runs only
    the samples left, and in the end every sample has the box one process gives it, written by
    exactly one rank."""
    ds = synthetic_dataset.clone(dataset_name)
    one = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    apply_grounding_model(ds, one, label_field="one", batch_size=4, progress=False)
    reference = _boxes(ds, "one")
    assert len(reference) == len(ds) == 80

    # the last image (in path order) of one rank becomes a pipe, so that rank has written the rest first
    paths = sorted(set(ds.values("filepath")))
    stuck_path = paths[-1]
    pipe = tmp_path / ("zz-" + Path(stuck_path).name)  # this test's folder sorts after the dataset's
    stuck_rank = 0 if Shard(0, 2).owns(str(pipe)) else 1  # the rank of the path the sample will have
    os.mkfifo(pipe)
    stuck = ds.match({"filepath": stuck_path})
    stuck_ids = stuck.values("id")
    stuck.set_field("filepath", str(pipe)).save()
    owned = {r: {sid for sid, p in zip(*ds.values(["id", "filepath"])) if Shard(r, 2).owns(p)} for r in (0, 1)}
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    assert str(pipe) > paths[-1] and len(owned[stuck_rank]) > 8  # the pipe last: the rank writes batches first

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["apply", "--dataset", dataset_name, "--checkpoint", tiny_checkpoint, "--label-field", "dist",
            "--device", "cpu", "--batch-size", "4", "--write-every", "4", "--distributed"]
    proc = _torchrun(args, env)
    other = owned[1 - stuck_rank]
    deadline = time.monotonic() + 180
    while not (other <= _written(ds, "dist") and len(_written(ds, "dist") - other) >= 4):
        # until the other rank is done and the stuck one has written a batch
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc, 1)
        time.sleep(0.5)
    os.kill(_rank_pids(proc.pid)[stuck_rank], signal.SIGKILL)
    out = _finish(proc)
    assert proc.returncode != 0, out  # torchrun reports the dead rank and stops the other

    written = set(ds.exists("dist").values("id"))
    assert other <= written and 0 < len(written - other) < len(owned[stuck_rank])
    before = {sid: label for sid, label in zip(*ds.select(list(written)).values(["id", "dist"]))}

    pipe.unlink()
    shutil.copy(stuck_path, pipe)  # the image is back: the rerun can read it
    out = _finish(_torchrun(args + ["--skip-existing"], env))
    left = len(ds) - len(written)
    counts = [0, 0]
    counts[stuck_rank] = left
    assert f"wrote 'dist' on {left} of 80 samples; ranks: {counts[0]} + {counts[1]} samples" in out, out

    assert ds.exists("dist").count() == 80  # none missed
    after = dict(zip(*ds.select(list(written)).values(["id", "dist"])))
    assert all(after[sid].detections[0].id == before[sid].detections[0].id for sid in written)  # not written again
    got = _boxes(ds, "dist")
    for sid, box in reference.items():  # the boxes of one process (the stuck image's too)
        np.testing.assert_allclose(got[sid], box, atol=1e-5, err_msg=f"{sid} stuck={sid in stuck_ids}")
