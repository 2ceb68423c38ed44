"""Checkpoints on the Hugging Face Hub, with no network: loading ``org/name`` (at a revision) from a
Hugging Face cache laid out on disk as a download leaves it, the failures that must come at once
in one sentence, and publishing a training run (the folder, its model card, the upload up to the
Hub's API, whose two calls are replaced by recorders)."""

import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import LocalTokenNotFoundError

from fiftyone_grounding import hub
from fiftyone_grounding.data.images import load_rgb
from fiftyone_grounding.engine.fit import fit
from fiftyone_grounding.engine.publish import RunRecords, model_card, prepare_hub_folder, push_to_hub
from fiftyone_grounding.errors import CheckpointError, HubUploadError, InputError
from fiftyone_grounding.evaluation.fiftyone_run import evaluate_in_fiftyone
from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.models.build import build_model
from fiftyone_grounding.models.checkpoint import (hub_checkpoint, load_checkpoint, resolve_checkpoint_dir,
                                                  save_checkpoint)
from fiftyone_grounding.models.config import get_config
from fiftyone_grounding.runs import checkpoint_of
from hub_cache import cache_repo, checkpoint_files, use_cache

REPO = "fog-tests/tiny-grounder"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
              "NO_PROXY", "no_proxy")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, with the Hub off (HF_HUB_OFFLINE=1)."""
    return use_cache(monkeypatch, tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A second tiny checkpoint (untrained, other weights) for another revision."""
    torch.manual_seed(7)
    return save_checkpoint(build_model("tiny"), tmp_path_factory.mktemp("other") / "ckpt")


@pytest.fixture
def cached_repo(hub_cache, tiny_checkpoint, other_checkpoint):
    """REPO in the cache: ``main`` holds the trained tiny checkpoint, the tag ``v1`` another one."""
    main = cache_repo(hub_cache, REPO, checkpoint_files(tiny_checkpoint))
    v1 = cache_repo(hub_cache, REPO, checkpoint_files(other_checkpoint), revision="v1")
    return main, v1


def _boxes(model, samples):
    """Each sample's box from ``model.predict`` on its image and phrase."""
    return np.asarray([model.predict(load_rgb(path), phrase).detections[0].bounding_box for path, phrase in samples])


def _one_sentence(message: str) -> str:
    assert "\n" not in message and message.endswith(".") and ". " not in message, message
    return message


# -- loading ---------------------------------------------------------------------------------------


def test_a_hub_repository_gives_the_boxes_of_its_local_folder_at_each_revision(
        cached_repo, synthetic_dataset, tiny_checkpoint, other_checkpoint):
    main, v1 = cached_repo
    samples = list(zip(*synthetic_dataset.limit(6).values(["filepath", "expression"])))
    local, other = (_boxes(GroundingModel.from_checkpoint(p, device="cpu"), samples)
                    for p in (tiny_checkpoint, other_checkpoint))
    assert not np.allclose(local, other, atol=1e-3)  # the two revisions are told apart by their boxes

    model = GroundingModel.from_checkpoint(REPO, device="cpu")
    assert resolve_checkpoint_dir(REPO) == main and model.source == REPO
    np.testing.assert_array_equal(_boxes(model, samples), local)
    for name, revision in ((REPO, "v1"), (f"{REPO}@v1", None), (REPO, v1.name)):  # a tag, @tag, a commit
        model = GroundingModel.from_checkpoint(name, device="cpu", revision=revision)
        assert model.source in (f"{REPO}@v1", f"{REPO}@{v1.name}")
        np.testing.assert_array_equal(_boxes(model, samples), other)
    assert resolve_checkpoint_dir(REPO, revision="v1") == v1

    state = load_checkpoint(REPO, revision="v1").trainable_state_dict()
    reference = load_checkpoint(other_checkpoint).trainable_state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_a_local_folder_always_wins_and_a_revision_needs_a_repository(cached_repo, other_checkpoint, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fog-tests").mkdir()
    Path("fog-tests/tiny-grounder").symlink_to(other_checkpoint)  # a folder that reads like the repository
    assert hub_checkpoint(REPO) is None and resolve_checkpoint_dir(REPO) == Path(REPO)
    with pytest.raises(InputError, match="applies to a Hugging Face Hub repository"):
        resolve_checkpoint_dir(REPO, revision="v1")
    with pytest.raises(InputError, match="names revision 'v1' and revision= names 'v2': give one"):
        resolve_checkpoint_dir("fog-tests/elsewhere@v1", revision="v2")
    for not_a_repo in ("just-a-name", "a/b/c", "/abs/path", "~/x", "org/na..me", "org/name@",
                       Path("fog-tests/elsewhere")):  # a Path is local: code-built folders never ask the Hub
        assert hub_checkpoint(not_a_repo) is None, not_a_repo
    with pytest.raises(CheckpointError, match="No checkpoint at fog-tests/elsewhere"):
        resolve_checkpoint_dir(Path("fog-tests/elsewhere"))


def test_the_cli_applies_a_hub_checkpoint(cached_repo, synthetic_dataset, dataset_name, other_checkpoint, cli):
    dataset = synthetic_dataset.limit(10).clone(dataset_name)
    code, out, err = cli("apply", "--dataset", dataset_name, "--checkpoint", f"{REPO}@v1", "--label-field", "hub",
                         "--device", "cpu")
    assert code == 0, err
    assert "wrote 'hub' on 10 of 10 samples" in out
    apply_grounding_model(dataset, GroundingModel.from_checkpoint(other_checkpoint, device="cpu"),
                          label_field="local")
    hub_boxes, local_boxes = dataset.values(["hub.detections.bounding_box", "local.detections.bounding_box"])
    np.testing.assert_allclose(np.asarray(hub_boxes), np.asarray(local_boxes), atol=1e-6)
    assert checkpoint_of(dataset, "hub") == f"{REPO}@v1"  # recorded by its name, not its place in the cache


def test_a_repository_not_in_the_cache_fails_at_once_in_one_sentence(hub_cache, cli, synthetic_dataset,
                                                                      dataset_name):
    started = time.monotonic()
    for name, revision in (("fog-tests/absent", None), (REPO, "v9")):
        with pytest.raises(CheckpointError) as caught:
            GroundingModel.from_checkpoint(name, revision=revision, device="cpu")
        message = _one_sentence(str(caught.value))
        assert message.startswith(f"{name}{f' (revision {revision!r})' if revision else ''} is not in the local "
                                  "Hugging Face cache and the Hub cannot be used (HF_HUB_OFFLINE is set): unset "
                                  "HF_HUB_OFFLINE to download it")
        assert f"`hf download {name}{f' --revision {revision}' if revision else ''}`" in message
        assert str(hub_cache) in message
    synthetic_dataset.limit(2).clone(dataset_name)
    code, out, err = cli("apply", "--dataset", dataset_name, "--checkpoint", "fog-tests/absent")
    assert code == 2 and err.startswith("error: fog-tests/absent is not in the local Hugging Face cache")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert time.monotonic() - started < 10


def test_an_unreachable_hub_is_not_waited_for(hub_cache, monkeypatch):
    """Not declared offline, but the endpoint refuses connections: the probe answers first, so the
    cache alone is read and the error names the endpoint, at once (no minute of retries)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the socket is: nothing listens there
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "_probes", {})
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint_dir("fog-tests/absent")
    message = _one_sentence(str(caught.value))
    assert f"the Hub cannot be used (cannot connect to 127.0.0.1:{port}: " in message and "): connect to " in message
    assert time.monotonic() - started < 10


class _RunsCode:
    """Unpickling this runs code: it writes a file (so a test sees whether anything unpickled it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled")


def test_a_repository_with_pickle_weights_only_is_refused_unopened(hub_cache, tiny_checkpoint, tmp_path):
    marker = tmp_path / "unpickled.txt"
    config = (tiny_checkpoint / "config.json").read_bytes()
    cache_repo(hub_cache, "fog-tests/pickled", {"config.json": config,
                                                "pytorch_model.bin": pickle.dumps(_RunsCode(marker))})
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint("fog-tests/pickled")
    message = _one_sentence(str(caught.value))
    assert "holds its weights as a pickle only (pytorch_model.bin)" in message
    assert "`fiftyone-grounding convert pytorch_model.bin OUT_DIR --preset NAME`" in message
    assert not marker.exists()  # nothing unpickled it

    cache_repo(hub_cache, "fog-tests/config-only", {"config.json": config})
    with pytest.raises(CheckpointError, match=r"is not a fiftyone-grounding checkpoint: it has no model\.safetensors"):
        load_checkpoint("fog-tests/config-only")


# -- publishing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_run(synthetic_dataset, tmp_path_factory):
    """A tiny run (1 epoch) on its own copy of the synthetic dataset, applied to its test split and
    evaluated there, so that the run's dataset records an evaluation of its checkpoint."""
    import fiftyone as fo

    name = f"fog-hub-{tmp_path_factory.getbasetemp().name[-8:]}"
    dataset = synthetic_dataset.clone(name)
    out = tmp_path_factory.mktemp("hub_run") / "run"
    result = fit(dataset, preset="tiny", out_dir=str(out), epochs=2, batch_size=16, progress=False, cpu=True)
    test = dataset.match_tags("test")
    apply_grounding_model(test, GroundingModel.from_checkpoint(out, device="cpu"), label_field="pred")
    evaluation = evaluate_in_fiftyone(test, "pred", "ground_truth", eval_key="hubcard")
    yield result, evaluation, dataset
    fo.delete_dataset(name)


EXPECTED_FILES = {"config.json", "model.safetensors", "calibration.json", "README.md"}


def test_the_hub_folder_holds_the_checkpoint_and_a_card_from_the_run(published_run, tmp_path):
    result, evaluation, dataset = published_run
    out = prepare_hub_folder(result.out_dir, tmp_path / "hub", "fog-tests/tiny-demo")
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES  # no optimizer state, no info.json, no pickle
    for name in EXPECTED_FILES - {"README.md"}:
        assert (out / name).read_bytes() == (result.best_dir / name).read_bytes(), name
    loaded, trained = (load_checkpoint(p).trainable_state_dict() for p in (out, result.best_dir))
    assert all(torch.equal(loaded[k], trained[k]) for k in trained) and loaded.keys() == trained.keys()

    card = ModelCard((out / "README.md").read_text())
    assert card.data.library_name == "fiftyone-grounding" and card.data.license == "apache-2.0"
    assert "preset-tiny" in card.data.tags and not card.data.base_model  # the tiny encoders are on no Hub
    text = card.text
    assert "`tiny:dinov3`" in text and "`tiny:bert`" in text and "random weights" in text
    assert 'GroundingModel.from_checkpoint("fog-tests/tiny-demo"' in text
    assert "--checkpoint fog-tests/tiny-demo`" in text
    # the per-epoch table: one row per epoch, the best one marked, the numbers of metrics.json
    best_epoch = max(result.history, key=lambda row: row["val_iou"])["epoch"]
    assert f"| **{best_epoch}** (best/) |" in text
    for row in result.history:
        assert f"{row['val_iou']:.4f}" in text and f"{row['train_loss']:.4f}" in text
    # the evaluation recorded on the run's dataset, and where the data came from
    assert "`hubcard` | `pred` | " in text and f"{evaluation['overall']['miou']:.4f}" in text
    counts = dataset.count_values("split")
    assert f"- FiftyOne dataset `{dataset.name}`: the synthetic shapes dataset (40 images, seed 1)" in text
    assert f"trained on `split` == `train` ({counts['train']} expressions)" in text
    assert f"chosen on `split` == `val` ({counts['val']} expressions)" in text
    assert f"fiftyone-grounding train --dataset {dataset.name} --recipe recipe.json" in text
    assert '"preset": "tiny"' in text and '"epochs": 2' in text and '"out_dir"' not in text

    with pytest.raises(InputError, match="holds other files than a Hub folder's"):
        prepare_hub_folder(result.out_dir, result.out_dir, "fog-tests/tiny-demo")
    with pytest.raises(InputError, match="is not a Hugging Face Hub model id"):
        prepare_hub_folder(result.out_dir, tmp_path / "x", "no-namespace")


def test_the_card_names_the_real_encoders_and_their_licences():
    """The seed preset's card (its config as written; nothing is loaded): both encoders by Hub
    id and licence, DINOv3's licence as the model's, the gated note."""
    records = RunRecords(checkpoint=Path("best"), config=get_config("seed"), trainable=25_948_420)
    card = ModelCard(model_card(records, "fog-tests/seed-refcoco"))
    assert card.data.base_model == ["facebook/dinov3-vitb16-pretrain-lvd1689m", "BAAI/bge-small-en-v1.5"]
    assert (card.data.license, card.data.license_name) == ("other", "dinov3-license")
    assert card.data.license_link == "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
    text = card.text
    assert "| image | [facebook/dinov3-vitb16-pretrain-lvd1689m](https://huggingface.co/facebook/dinov3-vitb16-" \
           "pretrain-lvd1689m) | [DINOv3 License](https://ai.meta.com/" in text
    assert "| text | [BAAI/bge-small-en-v1.5](https://huggingface.co/BAAI/bge-small-en-v1.5) | [MIT](" in text
    assert "`seed`: the original notebook's model" in text and "25,948,420" in text and "DINOv3 is gated" in text


class Recorder:
    """Stands in for the Hub's API calls of an upload (the network boundary): records each call
    and, for ``upload_folder``, the folder's files as they were when it was called."""

    def __init__(self, monkeypatch, fail_with=None):
        self.calls, self.files, self.fail_with = [], {}, fail_with
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(("create_repo", repo_id, kwargs, api.token))
            if recorder.fail_with is not None:
                raise recorder.fail_with

        def create_branch(api, repo_id, **kwargs):
            recorder.calls.append(("create_branch", repo_id, kwargs, api.token))

        def upload_folder(api, **kwargs):
            recorder.calls.append(("upload_folder", kwargs["repo_id"], kwargs, api.token))
            recorder.files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}

        for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                           ("upload_folder", upload_folder)):
            monkeypatch.setattr(HfApi, name, fake)


@pytest.fixture
def reachable_hub(monkeypatch):
    """The Hub allowed, its endpoint a local port that accepts connections (the probe's TCP
    connect succeeds; no request is ever sent to it)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub, "_probes", {})
    yield
    server.close()


def test_push_to_hub_uploads_exactly_the_prepared_folder(published_run, reachable_hub, monkeypatch, tmp_path):
    result = published_run[0]
    recorder = Recorder(monkeypatch)
    url = push_to_hub(result.out_dir, "fog-tests/tiny-demo", private=True, token="hf_test", revision="exp-1")
    assert url.endswith("/fog-tests/tiny-demo/tree/exp-1")
    (_, repo, create, token), (_, _, branch, _), (_, _, upload, _) = recorder.calls
    assert [c[0] for c in recorder.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert repo == "fog-tests/tiny-demo" and create == {"private": True, "exist_ok": True} and token == "hf_test"
    assert branch == {"branch": "exp-1", "exist_ok": True}
    assert upload["revision"] == "exp-1" and "tiny" in upload["commit_message"]
    assert set(upload["delete_patterns"]) == EXPECTED_FILES  # an earlier checkpoint's calibration goes
    expected = prepare_hub_folder(result.out_dir, tmp_path / "expected", "fog-tests/tiny-demo")
    assert recorder.files == {p.name: p.read_bytes() for p in expected.iterdir()}

    recorder = Recorder(monkeypatch, fail_with=LocalTokenNotFoundError("Token is required"))
    with pytest.raises(HubUploadError) as caught:
        push_to_hub(result.out_dir, "fog-tests/tiny-demo")
    assert "needs a token with write access: log in with `hf auth login`" in _one_sentence(str(caught.value))


def test_push_offline_says_so_in_one_line_and_uploads_nothing(published_run, monkeypatch, cli):
    result = published_run[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recorder = Recorder(monkeypatch)
    with pytest.raises(HubUploadError) as caught:
        push_to_hub(result.out_dir, "fog-tests/tiny-demo")
    assert _one_sentence(str(caught.value)).startswith(
        "Cannot push to the Hugging Face Hub (HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE and run it again")
    code, out, err = cli("push-to-hub", result.out_dir, "fog-tests/tiny-demo")
    assert code == 2 and err.startswith("error: Cannot push to the Hugging Face Hub") and err.count("\n") == 1
    assert recorder.calls == []


def test_the_cli_dry_run_writes_the_folder_and_uploads_nothing(published_run, monkeypatch, cli, tmp_path):
    result = published_run[0]
    recorder = Recorder(monkeypatch)
    code, out, err = cli("push-to-hub", result.best_dir, "fog-tests/tiny-demo", "--dry-run", tmp_path / "dry")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "dry").iterdir()} == EXPECTED_FILES and "nothing was uploaded" in out
    assert "## Evaluation" in (tmp_path / "dry" / "README.md").read_text()  # best/ finds its run's records
    assert recorder.calls == []
    code, out, err = cli("push-to-hub", tmp_path / "missing", "fog-tests/tiny-demo", "--dry-run", tmp_path / "d2")
    assert code == 2 and err.startswith("error: No folder ") and err.count("\n") == 1
