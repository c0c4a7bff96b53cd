"""Predictors take a model (issue 30, item 3): ``WholeImagePredictor(model, cfg)`` /
``PromptPredictor(model, cfg)`` and ``from_config``; the browser demo holds one network and
reads its checkpoint once; ``UnsamAutomaticMaskGenerator.generate`` returns the records of
``SamAutomaticMaskGenerator.generate``, checked with segment_anything's own helpers and the
consumer SAM's notebook uses."""

import json

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from pycocotools import mask as mask_utils
from segment_anything.utils import amg

import unsam.checkpoint
import unsam.modeling  # noqa: F401
from unsam.automatic_mask_generator import UnsamAutomaticMaskGenerator
from unsam.config.loading import load_config
from unsam.predictor import (
    PromptPredictor,
    WholeImagePredictor,
    build_inference_model,
    build_prompt_model,
)

from .conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny.yaml")
TINY_PROMPT = str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny_prompt.yaml")
FAST = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.IMAGE_SIZE",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
]
KEYS = {
    "segmentation",
    "area",
    "bbox",
    "predicted_iou",
    "stability_score",
    "point_coords",
    "crop_box",
}


def _save_random(path, config, seed):
    torch.manual_seed(seed)
    model = build_model(load_config(config, ["MODEL.DEVICE", "cpu"]))
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random checkpoints: whole-image only (as the public ones), and with the prompt path."""
    folder = tmp_path_factory.mktemp("weights")
    return {
        "whole": _save_random(folder / "whole.pth", TINY, 1),
        "prompt": _save_random(folder / "prompt.pth", TINY_PROMPT, 2),
    }


@pytest.fixture(scope="module")
def image():
    img = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    img[20:70, 30:90] = (210, 40, 40)
    return img


def _same_instances(a, b):
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


# ----------------------------------------------------------------------------- predictors
def test_predictors_take_a_model_and_share_it(weights, image):
    """A prompt model serves both predictors: whole-image outputs equal a whole-only model's."""
    cfg = load_config(TINY_PROMPT, [*FAST, "MODEL.WEIGHTS", weights["prompt"]])
    model, prompt_cfg = build_prompt_model(cfg)
    assert model.prompt_enabled and prompt_cfg.UNSAM.PROMPT.MODE == "learned"
    prompter = PromptPredictor(model, prompt_cfg)
    whole = WholeImagePredictor(model, cfg)
    assert prompter.model is whole.model is model and prompter.mode == "learned"
    _same_instances(whole(image), WholeImagePredictor.from_config(cfg)(image))
    whole_only = load_config(TINY, [*FAST, "MODEL.WEIGHTS", weights["prompt"]])
    _same_instances(whole(image), WholeImagePredictor.from_config(whole_only)(image))
    prompter.set_image(image)
    point = dict(point_coords=np.array([[60, 45]]), point_labels=np.array([1]))
    reference = PromptPredictor.from_config(cfg)
    reference.set_image(image)
    for got, want in zip(prompter.predict(**point), reference.predict(**point)):
        np.testing.assert_array_equal(got, want)


def test_prompt_mode_of_a_model_handed_in(weights):
    cfg = load_config(TINY, [*FAST, "MODEL.WEIGHTS", weights["whole"]])
    whole_model = build_inference_model(cfg)
    assert not whole_model.prompt_enabled
    assert PromptPredictor(whole_model, load_config(TINY, FAST)).mode == "select"  # auto
    with pytest.raises(ValueError, match="prompt path"):
        PromptPredictor(whole_model, load_config(TINY, [*FAST, "UNSAM.PROMPT.MODE", "learned"]))
    # from_config resolves auto by the checkpoint: a whole-image checkpoint → select
    predictor = PromptPredictor.from_config(
        load_config(TINY_PROMPT, [*FAST, "MODEL.WEIGHTS", weights["whole"]])
    )
    assert predictor.mode == "select" and not predictor.model.prompt_enabled


# ----------------------------------------------------------------------------- browser demo
@pytest.mark.parametrize("kind", ["whole", "prompt"])
def test_demo_reads_the_checkpoint_once_into_one_model(kind, weights, image, monkeypatch):
    """Was: two networks, the checkpoint read twice (app_backend.py, one per predictor)."""
    from unsam.app_backend import DemoModels

    reads = []
    original = unsam.checkpoint.read_checkpoint_file
    monkeypatch.setattr(
        unsam.checkpoint,
        "read_checkpoint_file",
        lambda *a, **k: reads.append(a) or original(*a, **k),
    )
    cfg = load_config(TINY_PROMPT, [*FAST, "MODEL.WEIGHTS", weights[kind]])
    models = DemoModels(cfg, max_side=128)
    assert len(reads) == 1
    assert models.whole.model is models.prompter.model is models.model
    assert models.prompt_mode == ("learned" if kind == "prompt" else "select")
    monkeypatch.setattr(unsam.checkpoint, "read_checkpoint_file", original)
    # the shared model's whole-image outputs are a whole-image predictor's of the demo's config
    _same_instances(models.whole(image), WholeImagePredictor.from_config(models.cfg)(image))


def test_demo_leaves_the_process_random_state_alone():
    """Was: ``torch.manual_seed(0)`` on the process when there are no weights."""
    from unsam.app_backend import DemoModels

    cfg = load_config(TINY_PROMPT, FAST)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = DemoModels(cfg, max_side=128)
    assert torch.equal(torch.get_rng_state(), state)
    second = DemoModels(cfg, max_side=128)
    assert first.whole is None  # no weights: Everything shows the pseudo labels
    # still the same random model at every start (reproducible pages)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- generate()
@pytest.fixture(scope="module")
def whole_model(weights):
    cfg = load_config(TINY, [*FAST, "MODEL.WEIGHTS", weights["whole"]])
    return build_inference_model(cfg), cfg


def _show_anns(anns):
    """The consumer of SAM's notebook (automatic_mask_generator_example.ipynb), without the
    plotting: largest first, each ``segmentation`` an H×W bool array indexing an RGBA image."""
    sorted_anns = sorted(anns, key=(lambda x: x["area"]), reverse=True)
    seg = sorted_anns[0]["segmentation"]
    img = np.ones((seg.shape[0], seg.shape[1], 4))
    img[:, :, 3] = 0
    for ann in sorted_anns:
        m = ann["segmentation"]
        img[m] = np.concatenate([np.random.random(3), [0.35]])
    return img


def _metadata_row(ann):
    """A row of SAM's ``scripts/amg.py`` metadata.csv, built from a record as it does."""
    return ",".join(
        str(x)
        for x in [
            ann["area"],
            *ann["bbox"],
            *ann["point_coords"][0],
            ann["predicted_iou"],
            ann["stability_score"],
            *ann["crop_box"],
        ]
    )


def test_generate_records_are_sams(whole_model, image):
    model, cfg = whole_model
    records = UnsamAutomaticMaskGenerator(model, cfg).generate(image)
    instances = WholeImagePredictor(model, cfg)(image)
    assert len(records) == len(instances) > 0 and all(set(r) == KEYS for r in records)
    # the predictor's masks and scores, in its order
    masks = np.stack([r["segmentation"] for r in records])
    np.testing.assert_array_equal(masks, instances.pred_masks.numpy())
    np.testing.assert_array_equal(
        np.array([r["predicted_iou"] for r in records], np.float32), instances.scores.numpy()
    )
    h, w = image.shape[:2]
    for r, mask in zip(records, masks):
        assert mask.dtype == bool and mask.shape == (h, w)
        assert isinstance(r["area"], int) and r["area"] == int(mask.sum())
        want = amg.box_xyxy_to_xywh(amg.batched_mask_to_box(torch.as_tensor(mask)[None])[0])
        assert r["bbox"] == want.tolist()
        assert 0.0 <= r["stability_score"] <= 1.0
        ((x, y),) = r["point_coords"]
        assert float(x).is_integer() and float(y).is_integer()
        if r["area"]:
            assert mask[int(y), int(x)]  # a point inside the mask
        assert r["crop_box"] == [0, 0, w, h]
    overlay = _show_anns(records)
    assert overlay.shape == (h, w, 4) and overlay[..., 3].max() == pytest.approx(0.35)
    assert len([_metadata_row(r) for r in records]) == len(records)


def test_generate_output_modes_round_trip(whole_model, image):
    model, cfg = whole_model
    binary = UnsamAutomaticMaskGenerator(model, cfg).generate(image)
    plain = UnsamAutomaticMaskGenerator(model, cfg, output_mode="uncompressed_rle").generate(image)
    coco = UnsamAutomaticMaskGenerator(model, cfg, output_mode="coco_rle").generate(image)
    json.dumps(plain), json.dumps(coco)  # what SAM's amg script writes for the RLE modes
    for b, p, c in zip(binary, plain, coco):
        mask = b["segmentation"]
        np.testing.assert_array_equal(amg.rle_to_mask(p["segmentation"]), mask)
        assert amg.area_from_rle(p["segmentation"]) == b["area"] == p["area"] == c["area"]
        assert amg.coco_encode_rle(p["segmentation"]) == c["segmentation"]
        np.testing.assert_array_equal(mask_utils.decode(c["segmentation"]).astype(bool), mask)
        assert int(mask_utils.area(c["segmentation"])) == b["area"]
        assert {k: v for k, v in b.items() if k != "segmentation"} == {
            k: v for k, v in c.items() if k != "segmentation"
        }
    with pytest.raises(ValueError, match="output_mode"):
        UnsamAutomaticMaskGenerator(model, cfg, output_mode="polygon")


def test_generate_stability_score_is_sams(whole_model, image, monkeypatch):
    """The score is segment_anything's calculate_stability_score on the image-size logits."""
    model, cfg = whole_model
    seen = []
    original = amg.calculate_stability_score
    import unsam.automatic_mask_generator as gen

    def spy(logits, threshold, offset):
        seen.append((logits.shape, threshold, offset))
        return original(logits, threshold, offset)

    monkeypatch.setattr(gen, "calculate_stability_score", spy)
    records = UnsamAutomaticMaskGenerator(model, cfg, stability_score_offset=0.05).generate(image)
    assert seen and all(s[0][1:] == image.shape[:2] and s[1:] == (0.0, 0.05) for s in seen)
    assert sum(s[0][0] for s in seen) == len(records)


def test_generate_filters(whole_model, image):
    model, cfg = whole_model
    every = UnsamAutomaticMaskGenerator(model, cfg, stability_score_offset=0.05).generate(image)
    scores = sorted(r["predicted_iou"] for r in every)
    cut = scores[len(scores) // 2]
    kept = UnsamAutomaticMaskGenerator(model, cfg, pred_iou_thresh=cut).generate(image)
    assert [r["predicted_iou"] for r in kept] == [
        s for s in (r["predicted_iou"] for r in every) if s > cut
    ]
    stab = sorted(r["stability_score"] for r in every)[len(every) // 2]
    stable = UnsamAutomaticMaskGenerator(
        model, cfg, stability_score_offset=0.05, stability_score_thresh=stab
    ).generate(image)
    assert stable and all(r["stability_score"] >= stab for r in stable)
    nms = UnsamAutomaticMaskGenerator(model, cfg, box_nms_thresh=0.5).generate(image)
    assert 0 < len(nms) <= len(every)
    order = [r["predicted_iou"] for r in nms]
    assert order == sorted(order, reverse=True)
