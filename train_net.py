#!/usr/bin/env python
"""Train or evaluate UnSAM (detectron2 style).

  python train_net.py --config-file configs/unsam_only_sa-1b_R50.yaml --num-gpus 8
  torchrun --nproc_per_node=8 train_net.py --config-file configs/unsam_only_sa-1b_R50.yaml
  python train_net.py --config-file F --resume                 # continue from OUTPUT_DIR/last_checkpoint
  python train_net.py --config-file F --eval-only MODEL.WEIGHTS path/or/url.pth

Trailing KEY VALUE pairs override config keys. CPU runs use the gloo backend.
"""
import logging
import sys

import unsam  # noqa: F401  (detectron2 compatibility layer first)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from unsam.checkpoint import WeightsNotFoundError, check_weights_path
from unsam.engine.trainer import Trainer, setup_config, write_eval_metrics
from unsam.utils.arguments import ConfigError, load_config, train_argument_parser
from unsam.utils.dist import launch

logger = logging.getLogger("unsam")


def main(args):
    cfg = setup_config(args)
    check_weights_path(cfg.MODEL.WEIGHTS)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        write_eval_metrics(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except FloatingPointError as e:
        last = trainer.checkpointer.get_checkpoint_file() if trainer.checkpointer.has_checkpoint() else None
        raise SystemExit(f"error: training stopped, {e}. Last good checkpoint: {last or 'none saved yet'}")


def cli(argv=None) -> int:
    args = train_argument_parser().parse_args(argv)
    try:  # fail fast, with one line, before any process is started
        cfg = load_config(args.config_file, args.opts)
        check_weights_path(cfg.MODEL.WEIGHTS)
    except (ConfigError, WeightsNotFoundError) as e:
        if comm.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
