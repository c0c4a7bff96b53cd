"""Data order survives ``--resume`` (issue 27, item 4): a run stopped at iteration k and resumed
sees, on every rank, exactly the samples an uninterrupted run sees."""

import itertools
import json
import os
import shutil

import pytest
from detectron2.data.samplers import TrainingSampler

from unsam.data.samplers import ResumableTrainingSampler
from unsam.data.synthetic import make_shapes_dataset

from .test_training import FAST, TINY


@pytest.mark.parametrize("size,batch", [(7, 4), (10, 2), (3, 8)])
def test_stream_is_detectron2s_and_starts_at_any_iteration(size, batch):
    reference = list(itertools.islice(iter(TrainingSampler(size, seed=5)), 60))
    sampler = ResumableTrainingSampler(size, batch, seed=5)
    assert list(itertools.islice(iter(sampler), 60)) == reference
    for k in range(1, 60 // batch):
        sampler.set_iteration(k)
        start = k * batch
        assert list(itertools.islice(iter(sampler), 60 - start)) == reference[start:], k


def test_checkpoint_restores_the_seed_of_the_same_stream_only():
    saved = ResumableTrainingSampler(20, 4, seed=11).state_dict()
    same = ResumableTrainingSampler(20, 4, seed=99)
    same.load_state_dict(saved)
    assert same.state_dict()["seed"] == 11
    other = ResumableTrainingSampler(21, 4, seed=99)  # another dataset: another stream
    other.load_state_dict(saved)
    assert other.state_dict()["seed"] == 99


class _Recording:
    """Wraps a training loader and writes the image ids of every batch it yields to ``path``."""

    def __init__(self, loader, path):
        self.loader, self.path = loader, path

    def __iter__(self):
        for batch in self.loader:
            with open(self.path, "a") as f:
                f.write(json.dumps([d["image_id"] for d in batch]) + "\n")
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def _train_and_record(
    root: str,
    out_dir: str,
    max_iter: int,
    resume: bool,
    tag: str,
    numpy_seed: int,
    checkpoint_period: int = 100,
):
    """On every rank of a 2-process gloo group: train to ``max_iter``, record the batches drawn.

    The sampler's seed is detectron2's shared random seed (drawn from NumPy on rank 0): seeding
    NumPy alike gives two runs the same stream, a different seed a different one.
    """
    import unsam.compat  # noqa: F401

    import numpy as np
    from detectron2.utils import comm

    from unsam.config.loading import load_config
    from unsam.engine.trainer import Trainer, register_datasets

    class RecordingTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            path = os.path.join(out_dir, f"{tag}_rank{comm.get_rank()}.jsonl")
            return _Recording(super().build_train_loader(cfg), path)

    cfg = load_config(
        TINY,
        FAST
        + [
            "UNSAM.DATA.SA1B_ROOTS",
            json.dumps([f"order:{root}"]),
            "DATASETS.TRAIN",
            '("order",)',
            "DATASETS.TEST",
            "()",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "SOLVER.MAX_ITER",
            str(max_iter),
            "SOLVER.CHECKPOINT_PERIOD",
            str(checkpoint_period),
            "INPUT.IMAGE_SIZE",
            "64",
            "SEED",
            "-1",
            "OUTPUT_DIR",
            out_dir,
        ],
    )
    register_datasets(cfg)
    np.random.seed(numpy_seed)
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()


def _batches(path):
    # the loader prefetches nothing past what the trainer asks for with NUM_WORKERS 0
    return [json.loads(line) for line in open(path)]


def test_two_ranks_resume_the_uninterrupted_stream(tmp_path):
    from unsam.utils.dist import launch

    root = make_shapes_dataset(tmp_path / "data", 7, size=64)  # 7 images: an epoch ends mid-batch
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    # the uninterrupted run; its checkpoint after iteration 2 stands for a run stopped there
    launch(_train_and_record, 2, args=(str(root), str(whole), 4, False, "run", 1, 2))
    shutil.copy(whole / "model_0000001.pth", parts / "model_0000001.pth")
    (parts / "last_checkpoint").write_text("model_0000001.pth")
    # another draw of the sampler's seed: the resumed run must take it from the checkpoint
    launch(_train_and_record, 2, args=(str(root), str(parts), 4, True, "resumed", 2))
    for rank in (0, 1):
        uninterrupted = _batches(whole / f"run_rank{rank}.jsonl")
        resumed = _batches(parts / f"resumed_rank{rank}.jsonl")
        assert len(uninterrupted) == 4 and len(resumed) == 2
        assert resumed == uninterrupted[2:], rank
    # the ranks drew disjoint halves of each global batch
    r0, r1 = _batches(whole / "run_rank0.jsonl"), _batches(whole / "run_rank1.jsonl")
    assert all(a != b for a, b in zip(r0, r1))
