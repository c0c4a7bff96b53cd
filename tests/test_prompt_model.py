"""Prompt path (issue 7): prompt encoder + K granularity queries through the shared decoder,
PromptPredictor with SamPredictor conventions, the point demo, and real learning on shapes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from PIL import Image

import unsam.modeling  # noqa: F401
from unsam.config import get_unsam_cfg
from unsam.engine.train_model import build_train_model
from unsam.modeling.criterion import PromptCriterion
from unsam.modeling.prompt_encoder import block_diagonal_allowed

from .conftest import coco_from_sa1b

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"
TINY_PROMPT = REPO / "configs" / "tiny" / "unsam_tiny_prompt.yaml"
DEMO = REPO / "prompt_segmentation" / "demo_point_image.py"
FAST = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.IMAGE_SIZE",
    "128",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "256",
    "UNSAM.PROMPT.PROMPTS_PER_IMAGE",
    "4",
]


def _cfg(path=TINY_PROMPT, *opts):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list([*FAST, *opts])
    return cfg


def _sample(h=128, w=128, seed=0, nested=True):
    """An image with 3 flat rectangles; with ``nested`` the first gets a child part (level 1)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks, levels, parents = [], [], []
    for i in range(3):
        m = torch.zeros(h, w, dtype=torch.bool)
        y, x = 8 + 40 * i, 10 + 30 * i
        m[y : y + 32, x : x + 36] = True
        img[:, m] = torch.tensor([60 * i, 200, 250 - 70 * i], dtype=torch.uint8)[:, None]
        masks.append(m)
        levels.append(0)
        parents.append(-1)
    if nested:
        part = masks[0].clone()
        part[:, 28:] = False
        masks.append(part)
        levels.append(1)
        parents.append(0)
    inst = Instances((h, w))
    inst.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
    inst.gt_masks = BitMasks(torch.stack(masks))
    inst.gt_levels = torch.tensor(levels)
    inst.gt_parents = torch.tensor(parents)
    return {"image": img, "instances": inst}


@pytest.fixture(scope="module")
def prompt_model():
    torch.manual_seed(0)
    return build_train_model(_cfg())


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------
def test_disabled_prompt_path_adds_nothing():
    torch.manual_seed(0)
    plain = build_model(_cfg(TINY)).state_dict()
    with_prompt = build_model(_cfg(TINY_PROMPT)).state_dict()
    extra = set(with_prompt) - set(plain)
    assert set(plain) <= set(with_prompt)
    assert extra and all(k.startswith(("prompt_encoder.", "iou_head.")) for k in extra), sorted(
        extra
    )[:5]
    # SAM's PromptEncoder is the dependency's class, not a copy
    from segment_anything.modeling import PromptEncoder

    model = build_model(_cfg(TINY_PROMPT))
    assert isinstance(model.prompt_encoder.sam, PromptEncoder)


@pytest.mark.parametrize("task", ["whole", "point", "box", "mask"])
def test_training_forward_every_task_gives_all_losses_and_grads(prompt_model, task):
    model = prompt_model.train()
    batch = [_sample(seed=1), _sample(seed=2)]
    for x in batch:
        x["ats_task"] = task
    losses = model(batch)
    expected = set(model.criterion.weight_dict) | set(model.prompt_criterion.loss_names())
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    active = losses["loss_ce"] if task == "whole" else losses["loss_prompt_dice"]
    idle = losses["loss_prompt_dice"] if task == "whole" else losses["loss_ce"]
    assert active.item() > 0 and idle.item() == 0
    model.zero_grad()
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]  # DDP with find_unused_parameters=False needs every parameter
    touched = model.prompt_encoder.granularity_feat.weight.grad.abs().sum().item()
    assert (touched > 0) == (task != "whole")


def test_point_prompts_target_nested_masks(prompt_model):
    model = prompt_model
    x = _sample(seed=3)
    tgt = model.prepare_targets([x["instances"]], model.preprocess_image([x]))[0]
    prompts, targets = model.sample_prompts(tgt, "point", torch.Generator().manual_seed(0))
    assert prompts["points"].shape == (4, 1, 2) and prompts["labels"].shape == (4, 1)
    masks = tgt["masks"]
    for (px, py), t in zip(prompts["points"][:, 0].long().tolist(), targets):
        inside = masks[:, py, px].nonzero()[:, 0]
        assert len(t) == len(inside) >= 1
        assert all(bool(m[py, px]) for m in t)
        if len(t) == 2:  # coarse (level 0) first, then the part
            assert t[0].sum() > t[1].sum()
    box_prompts, box_targets = model.sample_prompts(tgt, "box", torch.Generator().manual_seed(0))
    assert box_prompts["boxes"].shape == (4, 4) and all(len(t) == 1 for t in box_targets)
    mask_prompts, _ = model.sample_prompts(tgt, "mask", torch.Generator().manual_seed(0))
    assert mask_prompts["mask_inputs"].shape == (4, 1, 256, 256)


def test_prompt_groups_do_not_interact(prompt_model):
    """Decoding prompts together or one by one gives the same masks (block-diagonal attention)."""
    model = prompt_model.eval()
    x = _sample(seed=4)
    with torch.no_grad():
        images = model.preprocess_image([x])
        enc = model.extract_features(images)
        hw = tuple(images.tensor.shape[-2:])
        pts = torch.tensor([[[20.0, 20.0]], [[70.0, 60.0]], [[100.0, 100.0]]])
        lbl = torch.ones(3, 1, dtype=torch.int64)
        together = model.decode_prompts(
            enc, [{"points": pts, "labels": lbl}], hw, final_masks=False
        )
        alone = model.decode_prompts(
            enc, [{"points": pts[1:2], "labels": lbl[1:2]}], hw, final_masks=False
        )
    k = model.prompt_encoder.num_granularities
    assert together["pred_masks"].shape == (1, 3, k, 32, 32) and together["pred_iou"].shape == (
        1,
        3,
        k,
    )
    torch.testing.assert_close(
        together["pred_masks"][0, 1], alone["pred_masks"][0, 0], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        together["pred_iou"][0, 1], alone["pred_iou"][0, 0], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(together["pred_masks"][0, 0], together["pred_masks"][0, 1])
    allowed = block_diagonal_allowed(2, 3)
    assert allowed.sum() == 18 and not allowed[0, 3]


def test_prompt_criterion_matching_and_iou_targets():
    crit = PromptCriterion(256, 3.0, 0.75, {"loss_prompt_mask": 1.0}, num_aux=0)
    h = w = 32
    t0 = torch.zeros(h, w, dtype=torch.bool)
    t0[4:20, 4:20] = True
    t1 = torch.zeros(h, w, dtype=torch.bool)
    t1[4:12, 4:12] = True
    # output 2 predicts t1, output 0 predicts t0, output 1 predicts nothing
    pred = torch.full((1, 3, h, w), -10.0)
    pred[0, 0][t0] = 10.0
    pred[0, 2][t1] = 10.0
    targets = [torch.stack([t0, t1])]
    ((r, c),) = crit.match(pred, targets)
    assert dict(zip(r.tolist(), c.tolist())) == {0: 0, 2: 1}
    iou = crit.iou_targets(pred, targets, [(r, c)])
    torch.testing.assert_close(iou[0], torch.tensor([1.0, 0.0, 1.0]))
    losses = crit({"pred_masks": pred, "pred_iou": iou}, targets)
    assert losses["loss_prompt_iou"].item() == pytest.approx(0.0, abs=1e-6)
    # boundary points are bilinearly blended, so a perfect mask is not exactly 0
    assert losses["loss_prompt_dice"].item() < 0.15
    wrong = crit({"pred_masks": -pred, "pred_iou": iou}, targets)
    assert wrong["loss_prompt_dice"].item() > 5 * losses["loss_prompt_dice"].item()
    assert wrong["loss_prompt_iou"].item() > 0.2


# ------------------------------------------------------------------------------------------
# predictor: SamPredictor conventions
# ------------------------------------------------------------------------------------------
def _tiny_sam_predictor():
    """A SamPredictor around a small random-weight Sam built from segment_anything's classes."""
    from functools import partial

    from segment_anything import SamPredictor
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024,
            patch_size=16,
            in_chans=3,
            embed_dim=32,
            depth=1,
            num_heads=2,
            out_chans=dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=False,
            window_size=0,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    return SamPredictor(sam)


@pytest.fixture(scope="module")
def prompt_predictor():
    from unsam.predictor import PromptPredictor

    torch.manual_seed(0)
    cfg = _cfg()
    cfg.freeze()
    return PromptPredictor.from_config(cfg)


def test_predictor_matches_sam_predictor_conventions(prompt_predictor):
    sam = _tiny_sam_predictor()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)  # non-square: exercises the frames
    sam.set_image(image)
    prompt_predictor.set_image(image)
    k = prompt_predictor.cfg.UNSAM.PROMPT.NUM_GRANULARITIES
    cases = [
        dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1])),
        dict(point_coords=np.array([[40.0, 30.0], [120.0, 70.0]]), point_labels=np.array([1, 0])),
        dict(box=np.array([10.0, 5.0, 100.0, 80.0])),
        dict(
            point_coords=np.array([[40.0, 30.0]]),
            point_labels=np.array([1]),
            box=np.array([10, 5, 100, 80]),
        ),
    ]
    for case in cases:
        for multimask in (True, False):
            for return_logits in (False, True):
                sm, si, sl = sam.predict(
                    **case, multimask_output=multimask, return_logits=return_logits
                )
                um, ui, ul = prompt_predictor.predict(
                    **case, multimask_output=multimask, return_logits=return_logits
                )
                for s, u in ((sm, um), (si, ui), (sl, ul)):
                    assert isinstance(u, np.ndarray) and u.dtype == s.dtype, (
                        case,
                        s.dtype,
                        u.dtype,
                    )
                    assert u.ndim == s.ndim and u.shape[1:] == s.shape[1:], (case, s.shape, u.shape)
                c = k if multimask else 1
                assert um.shape[0] == ui.shape[0] == ul.shape[0] == c
                assert sm.shape[0] == (3 if multimask else 1)
        # the low-res logits of one call are a valid mask_input of the next (SAM's refinement loop)
        _, ui, ul = prompt_predictor.predict(**case, multimask_output=True)
        sm, si, sl = sam.predict(**case, mask_input=sl[:1], multimask_output=False)
        um, ui2, ul2 = prompt_predictor.predict(**case, mask_input=ul[:1], multimask_output=False)
        assert um.shape == sm.shape and um.dtype == sm.dtype and ul2.shape == sl.shape
    assert ((ui >= 0) & (ui <= 1)).all()


def test_predictor_batch_equals_single_and_checks_inputs(prompt_predictor):
    image = np.random.default_rng(1).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    prompt_predictor.set_image(image)
    pts = np.array([[[10.0, 20.0]], [[50.0, 60.0]], [[80.0, 100.0]]], np.float32)
    lbl = np.ones((3, 1), np.int64)
    masks, iou, low = prompt_predictor.predict_batch(torch.from_numpy(pts), torch.from_numpy(lbl))
    k = prompt_predictor.cfg.UNSAM.PROMPT.NUM_GRANULARITIES
    assert masks.shape == (3, k, 128, 96) and masks.dtype == torch.bool
    assert iou.shape == (3, k) and low.shape == (3, k, 256, 256)
    single = prompt_predictor.predict(pts[1], lbl[1], return_logits=True)[0]
    batch_logits = prompt_predictor.predict_batch(pts, lbl, return_logits=True)[0][1].numpy()
    np.testing.assert_allclose(single, batch_logits, atol=1e-3)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 60.0], [20.0, 30.0, 90.0, 120.0]])
    assert prompt_predictor.predict_batch(boxes=boxes, multimask_output=False)[0].shape == (
        2,
        1,
        128,
        96,
    )
    with pytest.raises(ValueError):
        prompt_predictor.predict(point_coords=np.array([[1.0, 2.0]]))  # labels missing
    with pytest.raises(ValueError):
        prompt_predictor.predict()
    from unsam.predictor import PromptPredictor

    fresh = PromptPredictor.__new__(PromptPredictor)
    fresh.reset_image()
    with pytest.raises(RuntimeError):
        fresh.predict_batch(boxes=boxes)


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    img = np.full((96, 128, 3), 90, np.uint8)
    img[20:60, 30:90] = (220, 40, 40)
    Image.fromarray(img).save(d / "img.png")
    m = np.zeros((96, 128), np.uint8)
    m[20:60, 30:90] = 255
    Image.fromarray(m).save(d / "mask.png")
    return d


def _demo_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_point_image", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize(
    "prompt,panels",
    [
        (["--points", "50,40;5,5", "--labels", "1,0"], 2),
        (["--box", "30,20,90,60", "--multimask"], 1 + 6),
        (["--mask-input", "MASK"], 2),
    ],
)
def test_demo_writes_overlay(demo_image, tmp_path, prompt, panels):
    main = _demo_main()
    prompt = [str(demo_image / "mask.png") if p == "MASK" else p for p in prompt]
    out = tmp_path / "out.png"
    rc = main(
        [
            "--config-file",
            str(TINY_PROMPT),
            "--input",
            str(demo_image / "img.png"),
            "--output",
            str(out),
            *prompt,
            "--opts",
            *FAST,
        ]
    )
    assert rc == 0
    overlay = np.asarray(Image.open(out))
    assert overlay.shape == (96, 128 * panels, 3)
    src = np.asarray(Image.open(demo_image / "img.png"))
    assert not np.array_equal(overlay[:, :128], src)  # prompts / mask drawn


@pytest.mark.parametrize(
    "prompt,message",
    [
        (["--points", "500,5"], "outside"),
        (["--points", "5,5", "--labels", "1,0"], "labels"),
        (["--box", "30,20,10"], "box"),
        (["--box", "90,20,30,60"], "box"),
        (["--points", "a,b"], "point"),
    ],
)
def test_demo_bad_prompts_exit_2(demo_image, tmp_path, capsys, prompt, message):
    main = _demo_main()
    rc = main(
        [
            "--config-file",
            str(TINY_PROMPT),
            "--input",
            str(demo_image / "img.png"),
            "--output",
            str(tmp_path / "o.png"),
            *prompt,
            "--opts",
            *FAST,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_demo_cli_exit_code(demo_image, tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            str(DEMO),
            "--config-file",
            str(TINY_PROMPT),
            "--input",
            str(demo_image / "img.png"),
            "--output",
            str(tmp_path / "o.png"),
            "--points",
            "1,1000",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "outside" in res.stderr


# ------------------------------------------------------------------------------------------
# real learning
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompt_training_learns_one_click_segmentation(tmp_path):
    """Short CPU run on synthetic shapes → 1-click oracle mIoU ≥ 0.7 on held-out images."""
    from unsam.config.loading import load_config
    from unsam.data.sa1b import register_sa1b
    from unsam.data.synthetic import make_shapes_dataset
    from unsam.engine.trainer import Trainer
    from unsam.evaluation.prompt import evaluate_prompts
    from unsam.predictor import PromptPredictor

    iters = int(os.environ.get("UNSAM_PROMPT_LEARN_ITERS", "800"))
    train_root = make_shapes_dataset(
        tmp_path / "train", 1500, size=128, seed=11
    )  # many: no memorising
    val_root = make_shapes_dataset(tmp_path / "val", 20, size=128, seed=12)
    register_sa1b("shapes_prompt_train", train_root)
    out = tmp_path / "run"
    opts = [
        *FAST,
        "UNSAM.PROMPT.PROMPTS_PER_IMAGE",
        "16",
        "UNSAM.PROMPT.TASK_RATIO",
        "0.9",
        "UNSAM.PROMPT.TYPE_WEIGHTS",
        "[3.0, 1.0, 1.0]",
        "INPUT.MIN_SCALE",
        "0.8",
        "INPUT.MAX_SCALE",
        "1.25",
        "DATASETS.TRAIN",
        '("shapes_prompt_train",)',
        "DATASETS.TEST",
        "()",
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.BASE_LR",
        "0.001",
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({int(iters * 0.8)},)",
        "SOLVER.WARMUP_ITERS",
        "20",
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "OUTPUT_DIR",
        str(out),
        "SEED",
        "3",
    ]
    cfg = load_config(str(TINY_PROMPT), opts)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.perf_counter() - start
    eval_cfg = load_config(str(TINY_PROMPT), opts + ["MODEL.WEIGHTS", str(out / "model_final.pth")])
    predictor = PromptPredictor.from_config(eval_cfg)
    metrics = evaluate_prompts(predictor, coco_from_sa1b(val_root), val_root, box=True)
    print(f"\nprompt learning: {iters} iters in {train_s:.0f}s; {metrics}")
    assert metrics["num_instances"] > 40
    assert metrics["mIoU_oracle"] >= 0.7, metrics
    assert metrics["mIoU_max"] > 0.5, metrics
