"""The App plugin reaches FiftyOne's plugins folder: ``fiftyone-grounding install-plugin`` (which
the demo runs) and ``fiftyone plugins download`` of the repository, as the README says."""

import shutil
import tarfile
from pathlib import Path

import pytest

import fiftyone as fo
import fiftyone.plugins as fop
from fiftyone.plugins.context import build_plugin_contexts

from fiftyone_grounding.app.install import PLUGIN_DIR, plugin_name

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "@fiftyone-grounding/grounding"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """An empty FiftyOne plugins folder, and App settings of this test's own."""
    folder = tmp_path / "plugins"
    monkeypatch.setattr(fo.config, "plugins_dir", str(folder))
    monkeypatch.setenv("FIFTYONE_APP_CONFIG_PATH", str(tmp_path / "app_config.json"))
    return folder


def _registered(name: str = NAME) -> list:
    contexts = [c for c in build_plugin_contexts(enabled="all") if c.name == name]
    assert len(contexts) == 1 and not contexts[0].errors, [c.errors for c in contexts]
    return sorted(op.name for op in contexts[0].instances)


def test_install_plugin_links_the_package_where_fiftyone_would_download_it_and_again_changes_nothing(plugins, cli):
    assert plugin_name() == NAME
    status, out, _ = cli("install-plugin")
    link = plugins / "@fiftyone-grounding" / "grounding"
    assert status == 0 and link.is_symlink() and link.resolve() == PLUGIN_DIR
    assert f"Installed the App plugin {NAME}: {link} -> {PLUGIN_DIR}" in out
    assert [p.name for p in fop.list_plugins()] == [NAME]  # enabled, as the App lists it
    assert {"apply_grounding_model", "search_phrase", "grounding_panel"} <= set(_registered())

    status, out, _ = cli("install-plugin")  # idempotent
    assert status == 0 and f"The App plugin {NAME} is installed: {link}" in out
    assert link.resolve() == PLUGIN_DIR and len(fop.list_plugins(enabled="all", shadowed="all")) == 1


def test_install_plugin_mends_a_stale_link_enables_a_disabled_plugin_and_keeps_a_copy_unless_forced(plugins, cli,
                                                                                                    tmp_path):
    link = plugins / "@fiftyone-grounding" / "grounding"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "an-old-clone", target_is_directory=True)  # gone since
    status, out, _ = cli("install-plugin")
    assert status == 0 and link.resolve() == PLUGIN_DIR and f"(it linked to {tmp_path / 'an-old-clone'})" in out

    fop.disable_plugin(NAME)
    assert NAME not in [p.name for p in fop.list_plugins()]
    status, out, _ = cli("install-plugin")
    assert status == 0 and "now enabled" in out and NAME in [p.name for p in fop.list_plugins()]

    link.unlink()
    shutil.copytree(PLUGIN_DIR, link)  # a copy, as `fiftyone plugins download` leaves one
    status, _, err = cli("install-plugin")
    assert status == 2 and "--force" in err and not link.is_symlink()
    status, out, _ = cli("install-plugin", "--force")
    assert status == 0 and link.resolve() == PLUGIN_DIR


def test_another_copy_of_the_plugin_is_named(plugins, cli, tmp_path):
    other = plugins / "by-hand"
    shutil.copytree(PLUGIN_DIR, other)
    status, out, _ = cli("install-plugin")
    assert status == 0 and f"Another copy of the plugin is at {other}" in out


def test_fiftyone_plugins_download_of_the_repository_finds_the_plugin(plugins, http_root):
    """The README's `fiftyone plugins download <repository>`: FiftyOne walks the repository for a
    fiftyone.yml; the only one is the package's plugin folder, copied to where install-plugin links."""
    root, base = http_root
    with tarfile.open(root / "fiftyone-grounding-main.tar.gz", "w:gz") as tar:  # GitHub's archive layout
        for name in ("manifest.json", "__init__.py", "pyproject.toml", "fiftyone_grounding", "tests", "docs"):
            tar.add(REPO_ROOT / name, arcname=f"fiftyone-grounding-main/{name}",
                    filter=lambda info: None if "__pycache__" in info.name else info)
    downloaded = fop.download_plugin(f"{base}/fiftyone-grounding-main.tar.gz")
    assert downloaded == {NAME: str(plugins / "@fiftyone-grounding" / "grounding")}
    assert {"apply_grounding_model", "grounding_panel"} <= set(_registered())
