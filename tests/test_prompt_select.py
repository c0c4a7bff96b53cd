"""Prompts that work with a whole-image checkpoint (issue 12): UNSAM.PROMPT.MODE auto / learned /
select, training-free query selection, weights checks in predictors and demos, and the prompt
tasks trained under ATS."""

import logging
import subprocess
import sys
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from PIL import Image

import unsam.modeling  # noqa: F401
from unsam.checkpoint import WeightsError
from unsam.config import get_unsam_cfg
from unsam.engine.hooks import per_prompt_difficulty
from unsam.engine.trainer import Trainer, ats_task_names
from unsam.predictor import PromptPredictor, WholeImagePredictor
from unsam.query_selection import QuerySelector

from .conftest import registered_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"
TINY_PROMPT = REPO / "configs" / "tiny" / "unsam_tiny_prompt.yaml"
QUICKSTART = REPO / "configs" / "tiny" / "unsam_quickstart.yaml"
DEMO = REPO / "prompt_segmentation" / "demo_point_image.py"
FAST = ["MODEL.DEVICE", "cpu", "INPUT.IMAGE_SIZE", "128"]


def _cfg(path=TINY, *opts):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list([*FAST, *opts])
    return cfg


@pytest.fixture(scope="module")
def public_format_ckpt(tmp_path_factory):
    """A whole-image checkpoint as the public UnSAM ones are: detectron2's {"model": state_dict},
    whole-image names only (no prompt_encoder.* / iou_head.*), random values."""
    torch.manual_seed(0)
    model = build_model(_cfg(TINY))
    path = tmp_path_factory.mktemp("ckpt") / "whole_only.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return path


@pytest.fixture(scope="module")
def two_shapes():
    """96×128 image: a red square (rows 10–50, cols 10–50) and a blue disk around (95, 60)."""
    img = np.full((96, 128, 3), 120, np.uint8)
    img[10:50, 10:50] = (220, 30, 30)
    yy, xx = np.mgrid[:96, :128]
    img[(yy - 60) ** 2 + (xx - 95) ** 2 < 20**2] = (30, 30, 220)
    return img


def _select_predictor(ckpt, *opts):
    cfg = _cfg(TINY, "MODEL.WEIGHTS", str(ckpt), *opts)
    cfg.freeze()
    return PromptPredictor.from_config(cfg)


# ------------------------------------------------------------------------------------------
# mode resolution and weights checks
# ------------------------------------------------------------------------------------------
def test_auto_mode_picks_select_for_a_whole_image_checkpoint_and_says_so_once(
    public_format_ckpt, caplog
):
    with caplog.at_level(logging.INFO, logger="unsam.predictor"):
        pred = _select_predictor(public_format_ckpt)
    assert pred.mode == "select" and not pred.model.prompt_enabled
    lines = [r.getMessage() for r in caplog.records if "prompt mode" in r.getMessage()]
    assert len(lines) == 1 and "'select'" in lines[0] and "no prompt-encoder weights" in lines[0], (
        lines
    )
    # the whole-image tensors all loaded: no warning about missing ones
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "lacks" in r.getMessage()
    ]


def test_auto_mode_picks_learned_when_the_checkpoint_has_the_prompt_path(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "prompt.pth"
    torch.save({"model": build_model(_cfg(TINY_PROMPT)).state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="unsam.predictor"):
        pred = _select_predictor(path)  # config has the prompt path OFF: the weights decide
    assert pred.mode == "learned" and pred.model.prompt_enabled
    assert any("'learned'" in r.getMessage() for r in caplog.records)


def test_explicit_learned_mode_on_a_whole_image_checkpoint_warns_about_the_random_head(
    public_format_ckpt, caplog
):
    with caplog.at_level(logging.WARNING):
        pred = _select_predictor(public_format_ckpt, "UNSAM.PROMPT.MODE", "learned")
    assert pred.mode == "learned"
    warn = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(warn) == 1 and "prompt_encoder." in warn[0], warn


def test_predictors_refuse_a_checkpoint_without_whole_image_tensors(tmp_path):
    torch.manual_seed(0)
    backbone_only = {
        k: v for k, v in build_model(_cfg(TINY)).state_dict().items() if k.startswith("backbone.")
    }
    path = tmp_path / "backbone.pth"
    torch.save({"model": backbone_only}, path)
    cfg = _cfg(TINY, "MODEL.WEIGHTS", str(path))
    for cls in (PromptPredictor, WholeImagePredictor):
        with pytest.raises(WeightsError, match="sem_seg_head"):
            cls.from_config(cfg)


def test_unknown_prompt_mode_is_a_config_error(public_format_ckpt):
    from unsam.config.loading import ConfigError

    with pytest.raises(ConfigError, match="UNSAM.PROMPT.MODE"):
        _select_predictor(public_format_ckpt, "UNSAM.PROMPT.MODE", "guess")


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------
def test_select_points_contain_clicks_exclude_negatives_and_differ_between_shapes(
    public_format_ckpt, two_shapes
):
    pred = _select_predictor(public_format_ckpt)
    pred.set_image(two_shapes)
    k = pred.cfg.UNSAM.PROMPT.NUM_GRANULARITIES
    square = np.array([[30.0, 30.0]])
    m_sq, s_sq, low_sq = pred.predict(square, np.array([1]))
    # the second click: on the disk, outside the square click's first mask (a random model's
    # masks are broad blobs; where the disk is covered, any pixel outside that mask)
    yy, xx = np.mgrid[:96, :128]
    outside = ~m_sq[0] & (
        ((yy - 60) ** 2 + (xx - 95) ** 2 < 20**2)
        if (~m_sq[0] & ((yy - 60) ** 2 + (xx - 95) ** 2 < 20**2)).any()
        else True
    )
    dy, dx = np.argwhere(outside)[0]
    m_dk, s_dk, _ = pred.predict(np.array([[float(dx), float(dy)]]), np.array([1]))
    for masks, (x, y) in ((m_sq, (30, 30)), (m_dk, (dx, dy))):
        assert 1 <= len(masks) <= k and masks.dtype == bool
        assert masks[:, y, x].all()  # every returned mask holds the click
        areas = masks.reshape(len(masks), -1).sum(1)
        assert (np.diff(areas) >= 0).all()  # granularities from small to large
    assert s_sq.dtype == np.float32 and ((s_sq > 0) & (s_sq <= 1)).all()
    assert low_sq.shape == (len(m_sq), 256, 256) and low_sq.dtype == np.float32
    assert {m.tobytes() for m in m_sq} != {m.tobytes() for m in m_dk}  # two clicks, two answers
    # a negative click inside a returned mask removes that mask from the answer
    inside = np.argwhere(m_sq[-1] & ~m_sq[0])
    if len(inside) == 0:
        inside = np.argwhere(m_sq[-1])
    y, x = inside[len(inside) // 2]
    neg = np.array([[30.0, 30.0], [float(x), float(y)]])
    m_neg, s_neg, _ = pred.predict(neg, np.array([1, 0]))
    assert (s_neg > 0).all() and m_neg[:, 30, 30].all() and not m_neg[:, y, x].any()
    assert not any(np.array_equal(m, m_sq[-1]) for m in m_neg)
    # the single best output is the best-scored one
    single, s1, _ = pred.predict(square, np.array([1]), multimask_output=False)
    assert single.shape == (1, 96, 128) and np.isclose(s1[0], s_sq.max())


def test_select_box_and_mask_prompts_and_batch_padding(public_format_ckpt, two_shapes):
    pred = _select_predictor(public_format_ckpt)
    pred.set_image(two_shapes)
    k = pred.cfg.UNSAM.PROMPT.NUM_GRANULARITIES
    masks, scores, low = pred.predict(
        point_coords=np.array([[30.0, 30.0]]), point_labels=np.array([1])
    )
    # feeding a chosen mask back as mask_input selects that same mask first
    again, s_again, _ = pred.predict(mask_input=low[:1], multimask_output=False)
    iou = (again[0] & masks[0]).sum() / max(1, (again[0] | masks[0]).sum())
    assert iou > 0.9 and 0 < s_again[0] <= 1
    # box prompts: same shapes as the learned path, batched and padded to K
    boxes = torch.tensor([[0.0, 0.0, 128.0, 96.0], [100.0, 80.0, 110.0, 90.0]])
    bm, bs, bl = pred.predict_batch(boxes=boxes)
    assert bm.shape == (2, k, 96, 128) and bs.shape == (2, k) and bl.shape == (2, k, 256, 256)
    # the whole-image box accepts every mask: its best output is the whole-image box's best IoU
    assert bs[0, 0] > 0
    # no broad random-model mask lies mostly inside the small box: the nearest miss (score 0),
    # padding
    assert bs[1, 0] == 0 and bm[1, 0].any()
    pad = bs[:, 1:] == 0
    assert pad[1].all() and not bm[:, 1:][pad].any()  # padding outputs: empty masks of score 0


def test_query_selector_point_margin_matches_the_upsampled_masks():
    """The point constraint is read off the stride-4 logits by the same bilinear sampling that
    upsamples masks: a query's sampled logit equals its upsampled logit at that location."""
    torch.manual_seed(0)
    q, c, s = 7, 5, 16
    feats = torch.randn(c, s, s)
    sel = QuerySelector(torch.randn(q, 2), torch.randn(q, c), feats, (s, s), chunk=3)
    up = torch.nn.functional.interpolate(
        sel.logits(torch.arange(q))[None], size=(4 * s, 4 * s), mode="bilinear", align_corners=False
    )[0]
    for x, y in ((10, 20), (0, 0), (63, 5)):
        margin = sel._point_margin(torch.tensor([[x + 0.5, y + 0.5]]), torch.tensor([1]))
        torch.testing.assert_close(margin, up[:, y, x], atol=1e-4, rtol=1e-4)
    # a negative point flips the sign; an ignored (-1) point does not count
    both = sel._point_margin(torch.tensor([[10.5, 20.5], [0.5, 0.5]]), torch.tensor([1, 0]))
    torch.testing.assert_close(
        both, torch.minimum(up[:, 20, 10], -up[:, 0, 0]), atol=1e-4, rtol=1e-4
    )
    # scores are class probability × mean mask probability, in [0, 1]
    assert ((sel.scores >= 0) & (sel.scores <= 1)).all()


def test_query_selector_box_overlap_is_exact_for_cell_aligned_masks():
    sel = QuerySelector.__new__(QuerySelector)
    sel.features = torch.zeros(1, 8, 8)  # stride-4 grid of a 32×32 input; coarse grid = 8×8
    sel.coarse_hw = (8, 8)
    occ = torch.zeros(2, 8, 8)
    occ[0, 2:4, 2:6] = 1  # pixels 8..16 × 8..24, wholly inside the box below
    occ[1, 0:8, 0:8] = 1  # the whole image
    sel.coarse = occ.half()
    inside, iou = sel._box_overlap(torch.tensor([8.0, 8.0, 24.0, 16.0]))
    torch.testing.assert_close(inside, torch.tensor([1.0, 128 / 1024]))
    torch.testing.assert_close(iou, torch.tensor([1.0, 128 / 1024]))


# ------------------------------------------------------------------------------------------
# demos and evaluation CLI with a public-format checkpoint
# ------------------------------------------------------------------------------------------
def test_point_demo_runs_select_mode_with_a_whole_image_checkpoint(
    public_format_ckpt, two_shapes, tmp_path
):
    Image.fromarray(two_shapes).save(tmp_path / "img.png")
    res = subprocess.run(
        [
            sys.executable,
            str(DEMO),
            "--config-file",
            str(TINY),
            "--input",
            str(tmp_path / "img.png"),
            "--output",
            str(tmp_path / "out.png"),
            "--points",
            "30,30",
            "--opts",
            *FAST,
            "MODEL.WEIGHTS",
            str(public_format_ckpt),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prompt mode 'select'" in res.stderr
    assert Image.open(tmp_path / "out.png").size[1] == 96


def test_demos_refuse_weights_of_another_architecture(two_shapes, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    Image.fromarray(two_shapes).save(tmp_path / "img.png")
    demos = [DEMO, REPO / "whole_image_segmentation" / "demo_whole_image.py"]
    for demo in demos:
        res = subprocess.run(
            [
                sys.executable,
                str(demo),
                "--config-file",
                str(TINY),
                "--input",
                str(tmp_path / "img.png"),
                "--output",
                str(tmp_path / "o.png"),
                "--opts",
                *FAST,
                "MODEL.WEIGHTS",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(err) == 1 and "Traceback" not in res.stderr, (
            demo,
            res.stderr[-2000:],
        )
        assert "resnet18.pth" in err[0]
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------
# prompt tasks under ATS
# ------------------------------------------------------------------------------------------
def test_ats_task_names_follow_the_prompt_path(caplog):
    on = _cfg(TINY_PROMPT)
    assert ats_task_names(on) == ["whole", "point", "box", "mask"]
    off = _cfg(TINY)
    with caplog.at_level(logging.WARNING):
        assert ats_task_names(off) == ["whole"]
    assert any("need the prompt path" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="nothing to train"):
        ats_task_names(_cfg(TINY, "UNSAM.ATS.TASKS", ["point"]))


def test_per_prompt_difficulty_is_low_when_one_output_fits():
    tgt = torch.zeros(1, 32, 32, dtype=torch.bool)
    tgt[0, 8:24, 8:24] = True
    good = torch.full((1, 3, 8, 8), -10.0)
    good[0, 1, 2:6, 2:6] = 10.0  # the second granularity is the target (stride 4)
    bad = torch.full((1, 3, 8, 8), -10.0)
    for kind in ("iou", "loss"):
        g, b, none = per_prompt_difficulty(
            {"pred_masks": torch.cat([good, bad, bad])}, [tgt, tgt, tgt[:0]], kind
        )[:1] + per_prompt_difficulty({"pred_masks": torch.cat([bad, bad])}, [tgt, tgt[:0]], kind)
        assert g < 0.05 and b > 0.5 and none is None, (kind, g, b)


class _LossRecorder(HookBase):
    def __init__(self):
        self.prompt_losses = []

    def after_step(self):
        latest = self.trainer.storage.latest()
        self.prompt_losses.append(
            sum(v for k, (v, _) in latest.items() if k.startswith("loss_prompt_"))
        )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    with registered_shapes(tmp_path_factory.mktemp("shapes"), "select_test_shapes") as root:
        yield root


def test_quickstart_config_trains_the_prompt_head_under_ats(shapes, tmp_path):
    """configs/tiny/unsam_quickstart.yaml turns on prompts and ATS: the prompt losses are non-zero
    and the prompt parameters move; ATS records difficulties of prompt cells."""
    cfg = _cfg(
        QUICKSTART,
        "INPUT.IMAGE_SIZE",
        96,
        "SOLVER.IMS_PER_BATCH",
        2,
        "SOLVER.MAX_ITER",
        4,
        "DATASETS.TRAIN",
        ("select_test_shapes",),
        "DATASETS.TEST",
        (),
        "OUTPUT_DIR",
        str(tmp_path),
        "SOLVER.CHECKPOINT_PERIOD",
        1000,
        "SOLVER.WARMUP_ITERS",
        0,
        "UNSAM.ATS.START_ITER",
        2,
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
        256,
        "UNSAM.PROMPT.PROMPTS_PER_IMAGE",
        2,
        "UNSAM.VISA.GUIDANCE.ENABLED",
        False,
        "SEED",
        0,
    )
    seed_all_rng(0)
    trainer = Trainer(cfg)
    rec = _LossRecorder()
    trainer.register_hooks([rec])
    before = {
        k: v.clone()
        for k, v in trainer.model.state_dict().items()
        if k.startswith("prompt_encoder.")
    }
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(rec.prompt_losses) == 4 and max(rec.prompt_losses) > 0, rec.prompt_losses
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    sampler = trainer.ats_sampler
    names = [sampler.decode(t)[0] for t in range(len(sampler.task_space))]
    assert names == ["whole", "point", "box", "mask"]
    seen_tasks = {names[t] for t in torch.nonzero(sampler.table.seen)[:, 1].tolist()}
    assert seen_tasks - {"whole"}, "no prompt cell got a difficulty"


def test_point_demo_skips_bad_images_of_a_folder(public_format_ckpt, two_shapes, tmp_path, caplog):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_point_image", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(two_shapes).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not an image")
    Image.fromarray(two_shapes[:20, :20]).save(folder / "c.png")  # the click (30, 30) misses it
    with caplog.at_level(logging.WARNING):
        rc = demo.main(
            [
                "--config-file",
                str(TINY),
                "--input",
                str(folder),
                "--output",
                str(tmp_path / "out"),
                "--points",
                "30,30",
                "--opts",
                *FAST,
                "MODEL.WEIGHTS",
                str(public_format_ckpt),
            ]
        )
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    assert any("2 of 3 inputs skipped" in r.getMessage() for r in caplog.records)
