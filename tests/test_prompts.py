"""Prompt derivation (evaluation clicks, training samplers) and user prompt parsing/validation."""

import cv2
import numpy as np
import pytest
import torch

from unsam.data.prompts import (
    LOGIT_CLIP,
    PromptError,
    farthest_interior_point,
    mask_prompts_from,
    mask_to_box,
    mask_to_mask_input,
    nested_targets,
    next_click,
    parse_box,
    parse_labels,
    parse_points,
    sample_boxes,
    sample_mask_prompts,
    sample_points,
    validate_prompts,
)


def rect(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------- farthest point


def test_farthest_point_odd_square_is_centre():
    assert farthest_interior_point(rect(40, 50, 10, 5, 21, 16)) == (15, 10)


def test_farthest_point_wide_rectangle_is_central_not_first_of_ridge():
    # 21×11: every pixel of the middle row from x=8 to x=18 is 6 px from the border
    assert farthest_interior_point(rect(30, 40, 3, 5, 24, 16)) == (13, 10)


def test_farthest_point_image_border_counts_as_boundary():
    # a band touching the left image border: the click must not sit on the border column
    x, y = farthest_interior_point(rect(31, 40, 0, 0, 9, 31))
    assert (x, y) == (4, 15)


def test_farthest_point_l_shape_is_in_thick_part_and_inside():
    m = rect(60, 60, 5, 5, 15, 55) | rect(60, 60, 5, 30, 55, 55)  # thin arm + thick foot
    x, y = farthest_interior_point(m)
    assert m[y, x] and 30 <= y < 55 and x >= 15


def test_farthest_point_deterministic_and_accepts_torch():
    m = np.random.default_rng(0).random((32, 32)) > 0.3
    p = farthest_interior_point(m)
    assert p == farthest_interior_point(torch.from_numpy(m)) and m[p[1], p[0]]


def test_farthest_point_empty_raises():
    with pytest.raises(ValueError):
        farthest_interior_point(np.zeros((5, 5), bool))


# ---------------------------------------------------------------------------- next click


def test_next_click_false_negative_is_positive():
    gt = rect(30, 40, 3, 5, 24, 16)
    pred = rect(30, 40, 13, 5, 24, 16)  # left part (cols 3..12) missing
    (x, y), label = next_click(pred, gt)
    assert label == 1 and 3 <= x < 13 and gt[y, x] and not pred[y, x]


def test_next_click_false_positive_is_negative():
    gt = rect(40, 40, 5, 5, 15, 15)
    pred = gt | rect(40, 40, 20, 20, 35, 35)
    (x, y), label = next_click(pred, gt)
    assert label == 0 and (x, y) == (27, 27)


def test_next_click_largest_region_wins():
    gt = rect(50, 50, 0, 0, 30, 30)
    pred = gt.copy()
    pred[0:3, 0:3] = False  # small false negative (9 px)
    pred |= rect(50, 50, 35, 35, 45, 45)  # large false positive (100 px)
    assert next_click(pred, gt)[1] == 0
    pred2 = gt.copy()
    pred2[10:25, 10:25] = False  # now the false negative is larger
    pred2 |= rect(50, 50, 35, 35, 40, 40)
    (x, y), label = next_click(pred2, gt)
    assert label == 1 and (x, y) == (17, 17)


def test_next_click_none_when_perfect():
    gt = rect(10, 10, 2, 2, 5, 5)
    assert next_click(gt, gt) is None


# ---------------------------------------------------------------------------- samplers
# The training samplers are torch, batched, on the masks' device, drawing from a torch.Generator.
# Their rules are SAM's (and those of the NumPy samplers they replace): checked here one by one.


def _t(*masks):
    return torch.from_numpy(np.stack(masks))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sample_points_uniform_inside():
    m = rect(20, 30, 4, 6, 14, 10)  # 40 px
    pts = sample_points(_t(*[m] * 800), _gen(0)).numpy()
    assert pts.dtype == np.float32 and pts.shape == (800, 2)
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert np.array_equal(pts, np.stack([xs, ys], 1))  # integer pixel coordinates
    assert m[ys, xs].all()
    counts = np.bincount(ys * 30 + xs, minlength=600)[m.reshape(-1)]
    assert (counts > 0).all() and counts.max() < 60  # 20 expected per pixel
    assert np.array_equal(sample_points(_t(*[m] * 800), _gen(0)).numpy(), pts)  # seeded


def test_sample_points_one_per_mask():
    a, b = rect(20, 30, 0, 0, 3, 3), rect(20, 30, 25, 15, 30, 20)
    pts = sample_points(_t(a, b, a), _gen(1)).long().numpy()
    assert a[pts[0, 1], pts[0, 0]] and b[pts[1, 1], pts[1, 0]] and a[pts[2, 1], pts[2, 0]]


def test_sample_boxes_zero_jitter_is_tight_and_noise_stays_in_image():
    m = rect(50, 60, 5, 10, 25, 40)
    assert np.array_equal(mask_to_box(m), [5, 10, 25, 40])
    assert np.array_equal(sample_boxes(_t(m, m), _gen(), jitter=0.0).numpy(), [[5, 10, 25, 40]] * 2)
    boxes = sample_boxes(_t(*[m] * 500), _gen(1), jitter=0.1).numpy()
    assert boxes.dtype == np.float32
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 50).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
    assert not np.allclose(boxes[0], boxes[1])
    # noise is centred and scaled with the box: std 0.1 × 20 = 2 px in x, 0.1 × 30 = 3 px in y
    assert np.allclose(boxes.mean(0), [5, 10, 25, 40], atol=0.6)
    std = boxes.std(0)
    assert 1.5 < std[2] < 2.5 and 2.4 < std[3] < 3.6


def test_sample_boxes_noise_capped_and_never_collapsed():
    m = rect(400, 400, 0, 0, 400, 400)
    boxes = sample_boxes(_t(*[m] * 200), _gen(2), jitter=0.5, max_noise=2.0).numpy()
    assert (boxes[:, 2] > 390).all()  # std would be 200 px uncapped
    thin = rect(40, 40, 10, 10, 11, 30)  # 1 px wide: x noise can swap the sides
    boxes = sample_boxes(_t(*[thin] * 300), _gen(3), jitter=3.0).numpy()
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
    kept = boxes[:, 2] - boxes[:, 0] == 1
    assert kept.any() and (boxes[kept][:, [0, 2]] == [10, 11]).all()  # tight extent kept


def test_mask_to_mask_input_geometry():
    m = rect(100, 200, 50, 20, 150, 60)  # wide image: longest side 200 → scale 1.28
    x = mask_to_mask_input(m)
    assert x.shape == (1, 256, 256) and x.dtype == np.float32
    fg = x[0] > 0
    ys, xs = np.nonzero(fg)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (64, 192, 26, 77)
    assert not fg[128:].any()  # padding below the 128-row image


def test_sample_mask_prompts_is_noisy_version():
    m = rect(100, 200, 50, 20, 150, 60)
    ref = mask_to_mask_input(m)[0] > 0
    prompts = sample_mask_prompts(_t(*[m] * 12), _gen(0))[:, 0].numpy()
    assert prompts.shape == (12, 256, 256) and prompts.dtype == np.float32
    assert np.abs(prompts).max() <= LOGIT_CLIP + 1e-4
    ious = [np.logical_and(p > 0, ref).sum() / np.logical_or(p > 0, ref).sum() for p in prompts]
    assert min(ious) > 0.75
    assert len({(p > 0).sum() for p in prompts}) > 2  # different erosions/dilations
    assert (prompts[:, 128:] < 0).all()  # padding stays background
    soft = prompts[0][26:77, 64:192]
    assert (np.abs(soft) < LOGIT_CLIP - 0.1).any()  # blurred edge: not a hard 0/1 mask
    again = sample_mask_prompts(_t(*[m] * 12), _gen(0))[:, 0].numpy()
    assert np.array_equal(again, prompts)


def test_sample_mask_prompts_ignore_autocast():
    """The training step runs under AMP: the prompt rule stays float32."""
    m = _t(*[rect(300, 300, 40, 30, 250, 200)] * 3)
    plain = sample_mask_prompts(m, _gen(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(sample_mask_prompts(m, _gen(4)), plain)


def test_sample_mask_prompts_thin_mask_not_erased():
    m = rect(1000, 1000, 100, 100, 900, 106)  # 1.5 px tall at low res
    assert (sample_mask_prompts(_t(*[m] * 10), _gen(5)).flatten(1) > 0).any(1).all()


def _mask_prompt_opencv(mask, op, radius, sigma, low_res=256):
    """The mask-prompt rule written with OpenCV (what the NumPy sampler did for these draws)."""
    h, w = mask.shape
    scale = low_res / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    soft = np.zeros((low_res, low_res), np.float32)
    soft[:nh, :nw] = cv2.resize(mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    binary = soft > 0.5
    if not binary.any() and soft.max() > 0:
        binary = soft >= 0.5 * soft.max()
    binary = binary.astype(np.uint8)
    if op:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        morphed = (cv2.erode if op == 1 else cv2.dilate)(binary, kernel)
        if morphed.any() or not binary.any():
            binary = morphed
    blurred = cv2.GaussianBlur(binary.astype(np.float32), (0, 0), sigma)
    p = np.clip(blurred, 1e-3, 1 - 1e-3)
    magnitude = np.maximum(np.abs(np.log(p / (1 - p))), 0.1)
    logits = np.where(binary.astype(bool), magnitude, -magnitude).astype(np.float32)
    logits[nh:, :] = -LOGIT_CLIP
    logits[:, nw:] = -LOGIT_CLIP
    return logits


@pytest.mark.parametrize("h,w", [(1024, 1024), (128, 128), (200, 200), (600, 600), (64, 96)])
def test_mask_prompts_follow_the_opencv_rule(h, w):
    """Same draws (operation, radius, blur) → the prompt OpenCV's area resize, elliptic
    morphology and Gaussian blur give: same sign everywhere, logits equal to float rounding."""
    rng = np.random.default_rng(h + w)
    masks = []
    for _ in range(5):
        y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        masks.append(rect(h, w, x0, y0, x0 + rng.integers(1, w // 2), y0 + rng.integers(1, h // 2)))
    masks.append(rect(h, w, 0, h // 3, w, h // 3 + 1))  # thinner than a low-res pixel
    n = len(masks)
    op, radius, sigma = rng.integers(0, 3, n), 1 + rng.integers(0, 3, n), 0.5 + 1.5 * rng.random(n)
    got = mask_prompts_from(
        _t(*masks), torch.from_numpy(op), torch.from_numpy(radius), torch.from_numpy(sigma)
    )[:, 0].numpy()
    want = np.stack([_mask_prompt_opencv(masks[i], op[i], radius[i], sigma[i]) for i in range(n)])
    assert np.array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, atol=5e-4)


def test_mask_prompt_draws_cover_every_operation():
    gen = _gen(7)
    m = _t(*[rect(64, 64, 10, 10, 50, 50)] * 150)
    seen = {int((p > 0).sum()) for p in sample_mask_prompts(m, gen)[:, 0]}
    assert len(seen) >= 7  # keep + 3 erosions + 3 dilations


def test_nested_targets_coarse_to_fine():
    big, mid, small = (
        rect(40, 40, 0, 0, 40, 40),
        rect(40, 40, 5, 5, 30, 30),
        rect(40, 40, 10, 10, 20, 20),
    )
    other = rect(40, 40, 32, 32, 38, 38)
    masks = _t(small, other, big, mid)
    pts = torch.tensor([[12.0, 15.0], [35.0, 35.0], [50.0, 5.0]])
    assert [t.tolist() for t in nested_targets(pts, masks)] == [[2, 3, 0], [2, 1], []]  # by area
    got = nested_targets(torch.tensor([[12.7, 15.2]]), masks, levels=torch.tensor([0, 0, 2, 1]))
    assert got[0].tolist() == [0, 3, 2]
    assert nested_targets(pts[:1], masks, max_targets=2)[0].tolist() == [2, 3]
    with pytest.raises(ValueError):
        nested_targets(pts, masks, levels=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------- user input


def test_parse_prompts():
    pts = parse_points("10,20; 30.5 ,40")
    assert pts.dtype == np.float32 and pts.tolist() == [[10, 20], [30.5, 40]]
    assert parse_labels("1,0").tolist() == [1, 0]
    assert parse_box("1,2,30,40").tolist() == [1, 2, 30, 40]
    for bad, fn in [
        ("10", parse_points),
        ("a,b", parse_points),
        ("", parse_points),
        ("1,x", parse_labels),
        ("1.5", parse_labels),
        ("1,2,3", parse_box),
        ("1,2,3,nan", parse_box),
    ]:
        with pytest.raises(PromptError) as err:
            fn(bad)
        assert "\n" not in str(err.value)


def test_validate_prompts_accepts_and_normalises():
    pts, labels, box = validate_prompts(
        np.array([[0, 0], [99.5, 49]]), None, [0, 0, 100, 50], (50, 100)
    )
    assert labels.tolist() == [1, 1] and box.dtype == np.float32 and pts.shape == (2, 2)
    assert validate_prompts(None, None, None, (5, 5)) == (None, None, None)


@pytest.mark.parametrize(
    "points,labels,box,needle",
    [
        ([[100, 10]], [1], None, "outside"),
        ([[10, -1]], [1], None, "outside"),
        ([[1, 1], [2, 2]], [1], None, "2 points but 1 labels"),
        ([[1, 1]], [2], None, "labels must be 0"),
        (None, [1], None, "without points"),
        (None, None, [10, 10, 10, 20], "x1 > x0"),
        (None, None, [10, 20, 30, 5], "y1 > y0"),
        (None, None, [100, 0, 120, 20], "outside"),  # entirely outside; partly outside is clipped
        (None, None, [-20, 0, 0, 20], "outside"),
    ],
)
def test_validate_prompts_rejects(points, labels, box, needle):
    with pytest.raises(PromptError) as err:
        validate_prompts(points, labels, box, (50, 100))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_mask_to_mask_input_keeps_thin_objects():
    m = rect(1000, 1000, 100, 100, 900, 102)  # 0.5 px tall at 256 px
    x = mask_to_mask_input(m)[0]
    assert (x > 0).any() and (x > 0).sum() < 300
