#!/usr/bin/env python
"""Train or evaluate UnSAM (detectron2 style).

  # the published 4 x 1 image:
  python train_net.py --config-file configs/unsam_only_sa-1b_R50.yaml --num-gpus 4
  torchrun --nproc_per_node=4 train_net.py --config-file configs/unsam_only_sa-1b_R50.yaml
  python train_net.py --config-file F --resume  # continue from OUTPUT_DIR/last_checkpoint
  python train_net.py --config-file F --eval-only MODEL.WEIGHTS path/or/url.pth

Trailing KEY VALUE pairs override config keys. CPU runs use the gloo backend.
"""

import logging
import sys

import unsam.compat  # noqa: F401  (detectron2 compatibility layer first)

from detectron2.modeling import build_model
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

import unsam.modeling  # noqa: F401  (fills detectron2's registries)
from unsam.checkpoint import UnSAMCheckpointer, WeightsError, check_weights_path, require_parts
from unsam.config.loading import ConfigError, load_config, train_argument_parser
from unsam.engine.checkpointer import CheckpointError
from unsam.engine.trainer import Trainer, setup_config, write_eval_metrics
from unsam.io.sa1b import DatasetError
from unsam.predictor import WHOLE_IMAGE_PARTS
from unsam.utils.dist import launch

logger = logging.getLogger("unsam")

# bad input a user can fix: one "error:" line and exit status 2, no traceback
USER_ERRORS = (ConfigError, WeightsError, DatasetError, CheckpointError)


def fail(message: str) -> None:
    """Print ``error: message`` (main process) and exit this process with status 2."""
    if comm.get_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _NoTracebackForUserErrors(logging.Filter):
    """detectron2's train loop logs any exception with its traceback before re-raising it; for a
    user error (a full disk at a checkpoint save, a NaN loss) :func:`fail` says it in one line, so
    the log keeps the message without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, USER_ERRORS + (FloatingPointError,)):
            record.msg, record.args = f"{record.getMessage()} {type(error).__name__}: {error}", ()
            record.exc_info = record.exc_text = None
        return True


def main(args):
    logging.getLogger("detectron2.engine.train_loop").addFilter(_NoTracebackForUserErrors())
    try:
        return run(args)
    except USER_ERRORS as e:
        fail(str(e))


def run(args):
    cfg = setup_config(args)
    check_weights_path(cfg.MODEL.WEIGHTS)
    if args.eval_only:
        model = build_model(cfg)  # the inference model: Trainer.build_model is the training one
        checkpointer = UnSAMCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if checkpointer.last_report is None:
            logger.warning("evaluating a model with random weights: MODEL.WEIGHTS is empty")
        else:  # weights of another architecture are an error, not a random model's scores
            require_parts(checkpointer.last_report, WHOLE_IMAGE_PARTS, "whole-image evaluation")
        results = Trainer.test(cfg, model)
        write_eval_metrics(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except FloatingPointError as e:
        last = (
            trainer.checkpointer.get_checkpoint_file()
            if trainer.checkpointer.has_checkpoint()
            else None
        )
        fail(f"training stopped, {e}. Last good checkpoint: {last or 'none saved yet'}")


def cli(argv=None) -> int:
    args = train_argument_parser().parse_args(argv)
    try:  # fail fast, with one line, before any process is started
        cfg = load_config(args.config_file, args.opts)
        check_weights_path(cfg.MODEL.WEIGHTS)
    except USER_ERRORS as e:
        if comm.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=cfg.MODEL.DEVICE,
        )
    except ProcessExitedException as e:
        if e.exit_code != 2:
            raise
        return 2  # a spawned process failed through fail() and has printed why
    return 0


if __name__ == "__main__":
    sys.exit(cli())
