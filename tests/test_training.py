"""train_net.py: torchrun/gloo multi-process training, --resume, --eval-only, errors (issue 4)."""

import json
import os
import subprocess
import sys

import torch

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny.yaml")
# small images and few points keep each iteration around a second on two cores
FAST = [
    "INPUT.IMAGE_SIZE",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "256",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.DEVICE",
    "cpu",
]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _run(args, cwd=REPO_ROOT, timeout=600):
    return subprocess.run(
        args, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout
    )


def test_torchrun_two_ranks_then_resume(tmp_path, tiny_train):
    out = tmp_path / "run"
    common = [
        "--config-file",
        TINY,
        *FAST,
        "DATASETS.TRAIN",
        '("coco_tiny_train_agnostic",)',
        "DATASETS.TEST",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "OUTPUT_DIR",
        str(out),
        "SEED",
        "1",
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO_ROOT / "train_net.py"),
    ]
    first = _run(torchrun + common + ["SOLVER.MAX_ITER", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log

    resumed = _run(torchrun + ["--resume"] + common + ["SOLVER.MAX_ITER", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 2" in log


def _train_two_iters_and_dump(out_dir: str):
    """Runs on every rank of a 2-process gloo group: train 2 iterations, dump a weight digest."""
    import unsam.compat  # noqa: F401

    from detectron2.utils import comm

    from unsam.config.loading import load_config
    from unsam.engine.trainer import Trainer, register_datasets

    cfg = load_config(
        TINY,
        FAST
        + [
            "DATASETS.TRAIN",
            '("coco_tiny_train_agnostic",)',
            "DATASETS.TEST",
            "()",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            "OUTPUT_DIR",
            out_dir,
        ],
    )
    register_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        os.path.join(out_dir, f"rank{comm.get_rank()}.pt"),
    )


def test_ranks_hold_identical_weights(tmp_path, tiny_train):
    from unsam.utils.dist import launch

    launch(_train_two_iters_and_dump, 2, args=(str(tmp_path),))
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_eval_only_writes_metrics(tmp_path, tiny_val):
    out = tmp_path / "eval"
    res = _run(
        [
            sys.executable,
            str(REPO_ROOT / "train_net.py"),
            "--config-file",
            TINY,
            "--eval-only",
            *FAST,
            "DATASETS.TEST",
            '("coco_tiny_val_agnostic",)',
            "OUTPUT_DIR",
            str(out),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (out / "metrics.json").read_text().strip().splitlines()
    metrics = json.loads(lines[-1])
    for key in ("AR@1", "AR@100", "AR@1000", "AP", "AP50"):
        value = metrics[f"coco_tiny_val_agnostic/segm/{key}"]
        assert 0.0 <= value <= 1.0
    assert "AR@100" in (out / "log.txt").read_text()


def test_bad_inputs_exit_2(tmp_path):
    missing = _run(
        [
            sys.executable,
            str(REPO_ROOT / "train_net.py"),
            "--config-file",
            TINY,
            "MODEL.WEIGHTS",
            str(tmp_path / "nope.pth"),
        ]
    )
    assert missing.returncode == 2
    assert "nope.pth" in missing.stderr and "Traceback" not in missing.stderr
    typo = _run(
        [
            sys.executable,
            str(REPO_ROOT / "train_net.py"),
            "--config-file",
            TINY,
            "SOLVER.MAX_ITERS",
            "3",
        ]
    )
    assert (
        typo.returncode == 2
        and "SOLVER.MAX_ITERS" in typo.stderr
        and "Traceback" not in typo.stderr
    )
