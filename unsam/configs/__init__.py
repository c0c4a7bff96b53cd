"""The configs that ship with UnSAM (detectron2 YAML with ``_BASE_`` inheritance), as package data.

* ``Base-UnSAM.yaml``, ``unsam_only_sa-1b_*.yaml`` — the training configs;
* ``tiny/`` — CPU-sized configs (tests, smoke runs, the quickstart and the browser demo's default);
* ``divide/`` — the CutLER detector of the ``unsam`` pseudo-label recipe's divide stage.

In a checkout, ``configs/`` at the repository root is a link to this folder, so
``python train_net.py --config-file configs/...`` works as before. Library code finds a config
with :func:`get_config_file` (detectron2's ``model_zoo.get_config_file`` is the model), never by
a path relative to the checkout, so a non-editable install finds it too.
"""

import importlib.resources
from pathlib import Path
from typing import List


def _root() -> Path:
    root = importlib.resources.files(__name__)
    if not isinstance(root, Path):  # e.g. a zip import: detectron2 merges files by path
        raise RuntimeError(f"{__name__} is not installed as files on disk ({root})")
    return root


def get_config_file(config_path: str) -> str:
    """The absolute path of a packaged config, by its name relative to the package, e.g.
    ``get_config_file("tiny/unsam_quickstart.yaml")``.

    ``_BASE_`` references inside it are relative to its folder, so they resolve as well.
    Raises ``FileNotFoundError`` naming the config and the ones available.
    """
    root = _root()
    path = (root / config_path).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise FileNotFoundError(
            f"config '{config_path}' does not ship with unsam (available: "
            f"{', '.join(list_config_files())})"
        )
    return str(path)


def list_config_files() -> List[str]:
    """Every packaged config, as the relative names :func:`get_config_file` takes."""
    root = _root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
