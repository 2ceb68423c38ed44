"""Without the Hugging Face Hub, a Hub id fails at once with one sentence, and what the local
cache holds still loads: ``hub.hub_offline`` answers before ``from_pretrained`` /
``load_dataset`` would retry for a minute.

No network is used: the endpoint (``HF_ENDPOINT``) is a local port, listening or closed. A
listening socket that nobody accepts from counts the connections made to it: the kernel
completes each one into its backlog, and the test drains it afterwards.
"""

import shutil
import socket

import pytest
import torch
from huggingface_hub import constants

from fiftyone_grounding import hub
from fiftyone_grounding.models.encoder_specs import TINY_TEXT_ENCODER
from fiftyone_grounding.models.encoders import load_encoder, load_tokenizer, tiny_encoder_dir
from fiftyone_grounding.errors import DownloadError, EncoderUnavailableError

HUB_ID = "BAAI/bge-small-en-v1.5"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
              "NO_PROXY", "no_proxy")


class Listener:
    """A local TCP port that listens and never accepts until :meth:`connections` counts."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._count = 0

    def connections(self) -> int:
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return self._count
            conn.close()
            self._count += 1


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.sock.close()


@pytest.fixture
def closed_port():
    """A local port with nothing listening on it (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def no_proxy_and_fresh_probes(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "_probes", {})  # no answer kept from another test's port


@pytest.fixture
def hub_allowed(monkeypatch):
    """As in a process started without HF_HUB_OFFLINE (conftest sets it before the import, so
    huggingface_hub's constant holds it too); datasets keeps conftest's HF_DATASETS_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hf_hub_offline_fails_at_once_without_connecting(monkeypatch, listener):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", listener.url)
    assert hub.hub_offline() == "HF_HUB_OFFLINE is set"
    for load in (load_tokenizer, load_encoder):
        with pytest.raises(EncoderUnavailableError) as caught:
            load(HUB_ID)
        message = str(caught.value)
        assert "cannot be reached (HF_HUB_OFFLINE is set)" in message
        assert f"`hf download {HUB_ID} --local-dir DIR`" in message and "\n" not in message
    with pytest.raises(EncoderUnavailableError, match=r"HF_HUB_OFFLINE is set.*gated.*hf auth login` when online"):
        load_encoder("facebook/dinov3-vitb16-pretrain-lvd1689m")
    assert listener.connections() == 0


def test_an_unreachable_endpoint_is_named_and_probed_once(monkeypatch, hub_allowed, listener, closed_port):
    # the probe itself: a closed port gives its reason, a listening one None, each answer kept
    assert "Connection refused" in hub.cannot_connect("127.0.0.1", closed_port)
    assert hub.cannot_connect("127.0.0.1", listener.port) is None
    assert listener.connections() == 1
    monkeypatch.setenv("HF_ENDPOINT", listener.url)
    assert hub.hub_offline() is None and hub.hub_offline() is None
    assert listener.connections() == 2  # one more: the second answer was the kept one

    # a proxy is probed instead of the endpoint, unless NO_PROXY exempts the endpoint
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.2:{closed_port}")
    monkeypatch.setenv("HTTPS_PROXY", listener.url)
    assert hub.probe_address() == ("127.0.0.1", listener.port, True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.2")
    assert hub.probe_address() == ("127.0.0.2", closed_port, False)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("NO_PROXY")

    # the encoders: nothing in the cache, so the one sentence names the endpoint that failed
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    expected = f"the Hugging Face Hub cannot be reached (cannot connect to 127.0.0.1:{closed_port}: "
    for load in (load_tokenizer, load_encoder, lambda name: load_encoder(name, weights=False)):
        with pytest.raises(EncoderUnavailableError, match=r"--local-dir DIR`\) and pass the local folder") as caught:
            load("some-org/not-cached-anywhere")
        assert expected in str(caught.value)


def test_refcoco_from_an_unreachable_hub_says_to_save_it_elsewhere(monkeypatch, hub_allowed, closed_port):
    from fiftyone_grounding.sources.importer import import_refcoco

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(DownloadError) as caught:
        import_refcoco("refcocog")
    message = str(caught.value)
    assert message.startswith(f"The Hugging Face Hub cannot be reached (cannot connect to 127.0.0.1:{closed_port}: ")
    assert "'jxu124/refcocog' (revision 'main')" in message and "save_to_disk(PATH)`" in message
    assert "pass source=PATH" in message and "\n" not in message


def test_an_encoder_in_the_hugging_face_cache_loads_by_its_hub_id(tmp_path, closed_port, hub_allowed, monkeypatch,
                                                                  capfd):
    """A tiny text encoder and its tokenizer laid out as ``hf download`` leaves them in the cache,
    loaded by id while the Hub is unreachable and not declared offline: without the probe, every
    file would be retried first. (huggingface_hub reads HF_HUB_CACHE at import; transformers
    reads the module's value at each load, which is what is set here.)"""
    source = tiny_encoder_dir(TINY_TEXT_ENCODER)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fog-tests--tiny-bert"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)

    model = load_encoder("fog-tests/tiny-bert")
    reference = load_encoder(TINY_TEXT_ENCODER)
    assert [(k, torch.equal(v, reference.state_dict()[k])) for k, v in model.state_dict().items()] == \
        [(k, True) for k in reference.state_dict()]
    assert load_tokenizer("fog-tests/tiny-bert").tokenize("the red circle") == ["the", "red", "circle"]
    assert "Retry" not in "".join(capfd.readouterr())
