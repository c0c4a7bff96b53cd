"""Shared pytest fixtures: locate the shared sample data, keep CPU tests deterministic."""
import os
from pathlib import Path

import pytest
import torch

import unsam  # noqa: F401  (installs the detectron2 compatibility layer first)
from unsam.data.coco import shared_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$UNSAM_SHARED/data`` or ``../shared/data``; tests needing it skip when it is absent."""
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
def _seed_torch():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
