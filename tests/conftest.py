"""Shared pytest set-up: real FiftyOne (its embedded MongoDB) in a test database."""

import functools
import http.server
import os
import threading
import uuid

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_NAME", "fiftyone_grounding_tests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist's workers (`make test` runs two) share the cores: each gives torch its share, and so do
# the processes its tests start. Two workers that each use every core for torch's threads spent 1.4x
# the CPU time of the same tests one after another. Set before torch is imported (it reads this once).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """With pytest-xdist, the controller starts FiftyOne's database before its workers start (it
    stays up while the controller runs): workers that each found none running started two mongod
    on one folder, the second failed (status 100) and that worker's tests lost the database."""
    if session.config.pluginmanager.hasplugin("dsession"):  # the controller of a distributed run
        import fiftyone.core.odm.database as fod

        fod.get_db_conn()


@pytest.fixture
def dataset_name():
    """A unique dataset name; the dataset is deleted after the test."""
    import fiftyone as fo

    name = f"fog-test-{uuid.uuid4().hex[:10]}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


@pytest.fixture(scope="session", autouse=True)
def grounding_home(tmp_path_factory):
    """Generated tiny encoders (real classes, random weights) live in a per-session folder."""
    home = tmp_path_factory.mktemp("fog_home")
    os.environ["FIFTYONE_GROUNDING_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic referring dataset (40 images, 80 expressions), shared read-only."""
    import fiftyone as fo

    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    name = f"fog-session-{uuid.uuid4().hex[:8]}"
    ds = make_synthetic_dataset(name, num_images=40, out_dir=str(tmp_path_factory.mktemp("syn")),
                                seed=1, persistent=False, progress=False)
    yield ds
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_dataset, tmp_path_factory):
    """A 'tiny' model trained for one epoch on ``synthetic_dataset``: its ``best`` folder."""
    from fiftyone_grounding.engine.fit import fit

    out = tmp_path_factory.mktemp("tiny_run")
    result = fit(synthetic_dataset, preset="tiny", out_dir=str(out), epochs=1, batch_size=16,
                 progress=False, cpu=True)
    return result.best_dir


@pytest.fixture(scope="session")
def grounding_plugin_dir(tmp_path_factory):
    """A FiftyOne plugins folder with this plugin installed as users install it
    (``install.install_plugin``), and FiftyOne pointed at it.

    Set in ``fo.config`` for this process and in the environment for App servers it starts.
    """
    import fiftyone as fo

    from fiftyone_grounding.app.install import install_plugin

    plugins = tmp_path_factory.mktemp("plugins")
    previous = os.environ.get("FIFTYONE_PLUGINS_DIR"), fo.config.plugins_dir
    os.environ["FIFTYONE_PLUGINS_DIR"] = fo.config.plugins_dir = str(plugins)
    install_plugin()
    yield plugins
    if previous[0] is None:
        os.environ.pop("FIFTYONE_PLUGINS_DIR", None)
    else:
        os.environ["FIFTYONE_PLUGINS_DIR"] = previous[0]
    fo.config.plugins_dir = previous[1]


@pytest.fixture
def cli(capsys):
    """Run the command line in this process: ``cli(*argv) -> (exit status, stdout, stderr)``."""
    from fiftyone_grounding.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A folder served over HTTP on loopback; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class ForwardCounter:
    """Counts the forward passes of a network through a hook registered on it (``calls``)."""

    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def count_forwards():
    """``count_forwards(grounding_model)``: a ``ForwardCounter`` of the model's network (one
    batched forward pass per call of its ``predict_boxes``) from now to the end of the test."""
    counters = []

    def count(model) -> ForwardCounter:
        counters.append(ForwardCounter(model.model))
        return counters[-1]

    yield count
    for counter in counters:
        counter.remove()
