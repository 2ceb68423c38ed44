"""Install this package's FiftyOne plugin into FiftyOne's plugins folder, so the App lists it.

The plugin is the folder ``fiftyone_grounding/plugin`` of the installed package. FiftyOne finds
plugins under ``fo.config.plugins_dir`` (``$FIFTYONE_PLUGINS_DIR``, by default
``~/fiftyone/__plugins__``); :func:`install_plugin` puts a link to that folder where ``fiftyone
plugins download`` would put a copy, ``<plugins_dir>/@fiftyone-grounding/grounding``, so the
plugin is always the installed package's own version (a ``pip install -U`` updates both).
``fiftyone-grounding install-plugin`` and ``fiftyone-grounding demo`` call it; running it again
changes nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugin"


def plugin_name() -> str:
    """The plugin's name, as its ``fiftyone.yml`` states it (``@fiftyone-grounding/grounding``),
    read by FiftyOne's own parser."""
    from fiftyone.plugins.definitions import PluginDefinition

    return PluginDefinition.from_disk(str(PLUGIN_DIR / "fiftyone.yml")).name


@dataclass
class PluginInstall:
    """What :func:`install_plugin` did to the plugin ``name``: ``action`` is ``"linked"``,
    ``"already installed"``, ``"relinked"`` (the link pointed at ``previous``) or ``"replaced"``
    (a copy was there); ``others``: other folders of the plugins folder that hold a plugin of
    the same name (FiftyOne loads only one of them)."""

    name: str
    path: Path
    target: Path
    action: str
    previous: Optional[Path] = None
    others: list = field(default_factory=list)
    enabled: bool = False  # True: the App's config had the plugin disabled, and it was enabled

    def message(self) -> str:
        where = f"{self.path} -> {self.target}"
        lines = {"linked": f"Installed the App plugin {self.name}: {where}",
                 "already installed": f"The App plugin {self.name} is installed: {where}",
                 "relinked": f"Installed the App plugin {self.name}: {where} (it linked to {self.previous})",
                 "replaced": f"Installed the App plugin {self.name}: {where} (in place of a copy)"}[self.action]
        if self.enabled:
            lines += "; it was disabled in the App's settings and is now enabled"
        for other in self.others:
            lines += (f"\nAnother copy of the plugin is at {other}: FiftyOne loads only one of them, "
                      "so delete that folder (or link) to be sure the App runs this one.")
        return lines


def plugins_dir() -> Path:
    """FiftyOne's plugins folder (``fo.config.plugins_dir``)."""
    import fiftyone as fo

    return Path(fo.config.plugins_dir).expanduser()


def install_plugin(force: bool = False) -> PluginInstall:
    """Link the installed package's plugin folder into FiftyOne's plugins folder as
    ``@fiftyone-grounding/grounding``; idempotent. A folder already there that is not a link
    (a copy from ``fiftyone plugins download``) is replaced only with ``force``. A plugin the
    App's settings disabled is enabled."""
    import fiftyone.plugins as fop

    name = plugin_name()
    root = plugins_dir()
    path = root.joinpath(*name.split("/"))
    target = PLUGIN_DIR
    previous = None
    if path.is_symlink():
        previous = Path(os.readlink(path))
        if path.resolve() == target:
            action = "already installed"
        else:
            path.unlink()
            action = "relinked"
    elif path.exists():
        if not force:
            raise InputError(f"{path} already holds a copy of a plugin (from `fiftyone plugins download`?): "
                             "delete it, or run `fiftyone-grounding install-plugin --force` to replace it with "
                             "a link to the installed package")
        shutil.rmtree(path)
        action = "replaced"
    else:
        action = "linked"
    if action != "already installed":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target, target_is_directory=True)
        except OSError as e:
            raise InputError(f"Cannot link the plugin into {path} ({e}): check that {root} is writable, or set "
                             "FIFTYONE_PLUGINS_DIR to a folder that is") from None

    enabled = name in {p.name for p in fop.list_plugins(enabled=False, builtin=False, shadowed="all")}
    if enabled:
        fop.enable_plugin(name)
    others = [Path(p.directory) for p in fop.list_plugins(enabled="all", builtin=False, shadowed="all")
              if p.name == name and Path(p.directory) != path and Path(p.directory).resolve() != target]
    return PluginInstall(name=name, path=path, target=target, action=action, previous=previous, others=others,
                         enabled=enabled)
