"""Every config key UnSAM adds to detectron2's defaults, with the public UnSAM R50 values.

Usage::

    from detectron2.config import get_cfg
    cfg = get_cfg(); add_unsam_config(cfg); cfg.merge_from_file(path)

or simply :func:`get_unsam_cfg`. Key names follow Mask2Former (``MODEL.MASK_FORMER.*``,
``MODEL.SEM_SEG_HEAD.*``, ``MODEL.SWIN.*``, LSJ ``INPUT.*``) so public configs merge unchanged;
everything UnSAM-specific lives under ``UNSAM.*``.
"""

import unsam.compat  # noqa: F401

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def _add_mask_former_config(cfg: CN) -> None:
    mf = cfg.MODEL.MASK_FORMER = CN()
    # losses
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.DICE_WEIGHT = 5.0
    mf.MASK_WEIGHT = 5.0
    # transformer decoder
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    mf.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 10
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 2000
    mf.ENFORCE_INPUT_PROJ = False
    mf.SIZE_DIVISIBILITY = 32
    # point-sampled losses (PointRend-style importance sampling)
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75
    # inference
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = False
    mf.TEST.INSTANCE_ON = True
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.8
    mf.TEST.OVERLAP_THRESHOLD = 0.8
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # masks are upsampled to image size this many at a time (bounds inference memory)
    mf.TEST.UPSAMPLE_CHUNK = 64


def _add_sem_seg_head_config(cfg: CN) -> None:
    head = cfg.MODEL.SEM_SEG_HEAD
    head.NAME = "MaskFormerHead"
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.NUM_CLASSES = 1
    head.NORM = "GN"
    head.CONVS_DIM = 256
    head.MASK_DIM = 256
    head.COMMON_STRIDE = 4
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.TRANSFORMER_ENC_LAYERS = 6
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    head.TRANSFORMER_DIM_FEEDFORWARD = 1024  # FFN width of the deformable encoder layers
    # "auto": fused CUDA op when importable and on GPU; on CPU without gradients the compiled CPU
    # kernel (unsam.ops) when built; else pure PyTorch. "pytorch" forces pure PyTorch.
    head.DEFORMABLE_ATTENTION_IMPL = "auto"


def _add_swin_config(cfg: CN) -> None:
    swin = cfg.MODEL.SWIN = CN()
    swin.PRETRAIN_IMG_SIZE = 224
    swin.PATCH_SIZE = 4
    swin.EMBED_DIM = 96
    swin.DEPTHS = [2, 2, 6, 2]
    swin.NUM_HEADS = [3, 6, 12, 24]
    swin.WINDOW_SIZE = 7
    swin.MLP_RATIO = 4.0
    swin.QKV_BIAS = True
    swin.QK_SCALE = None
    swin.DROP_RATE = 0.0
    swin.ATTN_DROP_RATE = 0.0
    swin.DROP_PATH_RATE = 0.3
    swin.APE = False
    swin.PATCH_NORM = True
    swin.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    swin.USE_CHECKPOINT = False


def _add_input_config(cfg: CN) -> None:
    inp = cfg.INPUT
    inp.FORMAT = "RGB"
    # training augmentation: "unsam_lsj" (large-scale jitter, below) or "unsam_crop" (the published
    # UnSAM recipe: random flip + a fixed IMAGE_SIZE crop/pad, no rescaling; "sam_instance_tsv",
    # the published mapper's name, is read as "unsam_crop")
    inp.DATASET_MAPPER_NAME = "unsam_lsj"
    inp.COLOR_AUG_SSD = False
    inp.SIZE_DIVISIBILITY = -1
    inp.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # large-scale jitter (LSJ): random scale then a fixed IMAGE_SIZE crop/pad
    inp.IMAGE_SIZE = 1024
    inp.MIN_SCALE = 0.1
    inp.MAX_SCALE = 2.0
    inp.MIN_SIZE_TEST = 1024
    inp.MAX_SIZE_TEST = 2048
    # at most this many instances per training image, chosen by MAX_INSTANCES_SAMPLING: "largest"
    # (by area, kept in file order) or "random" (the published rule: a uniformly random subset,
    # drawn with NumPy's global generator before the augmentation, in drawn order)
    inp.MAX_INSTANCES_PER_IMAGE = 500
    inp.MAX_INSTANCES_SAMPLING = "largest"


def _add_solver_config(cfg: CN) -> None:
    solver = cfg.SOLVER
    solver.OPTIMIZER = "ADAMW"
    solver.BACKBONE_MULTIPLIER = 0.1
    solver.WEIGHT_DECAY_EMBED = 0.0
    solver.POLY_LR_POWER = 0.9
    solver.POLY_LR_CONSTANT_ENDING = 0.0
    solver.CLIP_GRADIENTS.ENABLED = True
    solver.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    solver.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    solver.CLIP_GRADIENTS.NORM_TYPE = 2.0
    solver.AMP.ENABLED = True
    # drop-loss (published UnSAM/CutLER): a matched prediction whose soft IoU with its target on the
    # sampled points is <= DROPLOSS_IOU_THRESH adds nothing to the mask and dice losses
    solver.USE_DROP_LOSSES = False
    solver.DROPLOSS_IOU_THRESH = 0.01


def _add_data_config(cfg: CN) -> None:
    data = cfg.UNSAM.DATA = CN()
    # SA-1B style roots registered at start-up: list of "name:path" strings.
    data.SA1B_ROOTS = []
    # COCO-format sets registered class-agnostically: list of [name, json_file, image_root].
    data.COCO_SETS = []
    # drop images whose pseudo-label file has no annotation (else: all-no-object targets)
    data.SKIP_EMPTY = False


def _add_visa_config(cfg: CN) -> None:
    visa = cfg.UNSAM.VISA = CN()
    visa.ENABLED = False
    visa.START_ITER = 0
    visa.END_ITER = 1000
    visa.DECAY = "linear"  # "linear" | "cosine": weight goes 1 -> 0 between START and END
    # MAX_LEVEL: deepest pseudo-label level (0 = coarsest); -1: deepest level present per image
    visa.CURRICULUM = CN({"ENABLED": True, "MIN_DEPTH": 0, "MAX_LEVEL": -1})
    visa.BOUNDARY = CN({"ENABLED": True, "WIDTH": 3, "MIN_WEIGHT": 0.2})
    visa.GUIDANCE = CN({"ENABLED": True, "WEIGHT": 1.0, "NUM_POINTS": 256, "FEATURES": "classical"})
    # affinity comparison: "kl" (row-softmax KL, shift-invariant) or "mse"; KL softmax temperature
    visa.GUIDANCE.LOSS = "kl"
    visa.GUIDANCE.TEMPERATURE = 0.1


def _add_ats_config(cfg: CN) -> None:
    ats = cfg.UNSAM.ATS = CN()
    ats.ENABLED = False
    ats.START_ITER = 1000
    ats.ALPHA = 1.0
    ats.BETA = 0.3  # share of the uniform distribution mixed into the adaptive one
    ats.EPS = 0.05
    ats.EMA = 0.9
    ats.TASKS = ["whole", "point", "box", "mask"]
    # granularity levels per prompt task (point/box/mask × level); 1 = no level dimension
    ats.NUM_LEVELS = 1
    ats.BLOCK_SIZE = 256  # draws per rank per block; probabilities are refreshed per block
    ats.SYNC_PERIOD = 1  # all-gather the difficulty updates every N iterations
    ats.DIFFICULTY = "loss"  # per-sample signal reported by the feedback hook: "loss" | "iou"


def _add_prompt_config(cfg: CN) -> None:
    prompt = cfg.UNSAM.PROMPT = CN()
    prompt.ENABLED = False
    # how PromptPredictor answers prompts: "learned" (the prompt encoder + IoU head), "select"
    # (training-free: rank the whole-image queries), "auto" (learned when MODEL.WEIGHTS holds the
    # prompt path's tensors, else select — the public whole-image checkpoints have none)
    prompt.MODE = "auto"
    prompt.NUM_GRANULARITIES = 6
    prompt.TASK_RATIO = 0.5  # share of training images used for prompt tasks
    prompt.PROMPTS_PER_IMAGE = 16
    prompt.IOU_WEIGHT = 1.0
    prompt.BOX_JITTER = 0.1
    # relative frequency of the prompt types among prompt tasks: point, box, mask
    prompt.TYPE_WEIGHTS = [1.0, 1.0, 1.0]
    prompt.MASK_IN_CHANS = 16  # hidden channels of segment_anything's mask-downscaling convs


def add_unsam_config(cfg: CN) -> None:
    """Register every key UnSAM adds, in place, with the public UnSAM R50 defaults."""
    cfg.UNSAM = CN()
    _add_mask_former_config(cfg)
    _add_sem_seg_head_config(cfg)
    _add_swin_config(cfg)
    _add_input_config(cfg)
    _add_solver_config(cfg)
    _add_data_config(cfg)
    _add_visa_config(cfg)
    _add_ats_config(cfg)
    _add_prompt_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "UnSAM"
    # detectron2 defaults to "cuda"; "auto" runs on a CPU-only machine without an override and
    # keeps the defaults the same on every machine: load_config resolves it (cuda if visible)
    cfg.MODEL.DEVICE = "auto"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    # Mask2Former's ResNet options (public configs carry them): "basic" stem, no multi-grid
    cfg.MODEL.RESNETS.STEM_TYPE = "basic"
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000


def get_unsam_cfg() -> CN:
    """detectron2's defaults plus :func:`add_unsam_config`."""
    cfg = get_cfg()
    add_unsam_config(cfg)
    return cfg
