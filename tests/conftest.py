"""Shared pytest fixtures: locate the shared sample data, keep CPU tests deterministic."""

import contextlib
import logging
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The one place the tests find the shared sample data beside the checkout: the library reads only
# $UNSAM_SHARED (subprocesses the tests start inherit it).
os.environ.setdefault("UNSAM_SHARED", str(REPO_ROOT.parent / "shared"))

import unsam.compat  # noqa: E402,F401  (installs the detectron2 compatibility layer first)

from unsam.data.coco import shared_data_dir  # noqa: E402


@contextlib.contextmanager
def registered_shapes(folder, name: str, num_images: int = 6, size: int = 96, seed: int = 3):
    """Synthetic shapes written to ``folder`` and registered as dataset ``name`` while the block
    runs; yields the dataset root."""
    from detectron2.data import DatasetCatalog

    from unsam.data.sa1b import register_sa1b
    from unsam.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(folder, num_images, size=size, seed=seed)
    register_sa1b(name, root)
    try:
        yield root
    finally:
        DatasetCatalog.remove(name)


def coco_from_sa1b(root) -> dict:
    """The SA-1B folder ``root`` (e.g. generated shapes) as COCO instances (one category), for
    the evaluators' ground truth."""
    from unsam.data.sa1b import load_sa1b_dicts

    images, anns = [], []
    for i, d in enumerate(load_sa1b_dicts(root)):
        images.append(
            {
                "id": i + 1,
                "file_name": os.path.basename(d["file_name"]),
                "height": d["height"],
                "width": d["width"],
            }
        )
        for a in d["annotations"]:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": a["segmentation"],
                    "area": a["area"],
                    "bbox": a["bbox"],
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$UNSAM_SHARED/data`` (default ``../shared/data``); tests needing it skip when it is
    absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared sample data not found (set UNSAM_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_val(shared_data) -> Path:
    return shared_data / "coco_tiny_val2017"


@pytest.fixture(scope="session")
def tiny_train(shared_data) -> Path:
    return shared_data / "coco_tiny_train2017"


@pytest.fixture(autouse=True)
def _drop_log_handlers_of_the_test():
    """Command lines run in process (train_net's ``cli``, the demos, ``logging.basicConfig``) bind
    log handlers to this test's captured streams; left in place, a later test's logging writes to
    a closed capture ("--- Logging error ---" and a traceback on stderr, which the one-error-line
    checks see). Every handler a test added is removed after it, and detectron2's memoised
    ``setup_logger`` forgets its calls so a later run sets its handlers up again."""
    from detectron2.utils.logger import setup_logger

    def handlers():
        loggers = [logging.getLogger()] + [
            v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
        ]
        return {lg: lg.handlers[:] for lg in loggers}

    saved = handlers()
    yield
    for lg, now in handlers().items():
        lg.handlers[:] = [h for h in now if h in saved.get(lg, ())]
    setup_logger.cache_clear()


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
