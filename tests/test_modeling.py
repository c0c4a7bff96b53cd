"""Tests of the whole-image model (unsam.modeling): checkpoint compatibility, training and
inference behaviour, and the pure-PyTorch ops against naive references."""

import copy
import json
import os
from pathlib import Path

import unsam.compat  # noqa: F401

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Instances

import unsam.modeling  # noqa: F401
from unsam.config import get_unsam_cfg
from unsam.engine.train_model import build_train_model
from unsam.modeling import masks_to_boxes, ms_deform_attn_core_pytorch
from unsam.modeling.criterion import SetCriterion
from unsam.modeling.matcher import HungarianMatcher
from unsam.modeling.pixel_decoder import fused_deform_attn_available
from unsam.modeling.transformer_decoder import multi_head_attention

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"


def _reference_dir():
    env = os.environ.get("UNSAM_SHARED")
    for cand in ([Path(env) / "reference"] if env else []) + [REPO.parent / "shared" / "reference"]:
        if cand.is_dir():
            return cand
    return None


def _cfg(path=TINY, *opts):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _synthetic_sample(h=128, w=160, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        y = int(torch.randint(0, h - 40, (1,), generator=g))
        x = int(torch.randint(0, w - 40, (1,), generator=g))
        masks[i, y : y + 30 + 3 * i, x : x + 35] = True
        img[:, masks[i]] = torch.tensor([40 * i, 200, 255 - 60 * i], dtype=torch.uint8)[:, None]
    inst = Instances((h, w))
    inst.gt_classes = torch.zeros(n, dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return {"image": img, "instances": inst}


@pytest.fixture(scope="module")
def tiny_model():
    """The training model (in eval mode it is the inference model's path)."""
    torch.manual_seed(0)
    return build_train_model(_cfg())


# ------------------------------------------------------------------------------------------
# checkpoint compatibility
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,reference",
    [
        ("configs/unsam_only_sa-1b_R50.yaml", "unsam_m2f_r50_state_dict.json"),
        ("configs/unsam_only_sa-1b_swinL.yaml", "unsam_m2f_swinL_state_dict.json"),
    ],
)
def test_state_dict_matches_public_checkpoint(config, reference):
    ref_dir = _reference_dir()
    if ref_dir is None:
        pytest.skip("shared reference files not found (set UNSAM_SHARED)")
    ref = json.loads((ref_dir / reference).read_text())
    cfg = _cfg(REPO / config)
    with torch.device("meta"):  # no memory for 216M Swin-L parameters
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    got = {
        k: (list(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in model.state_dict().items()
    }
    want = {k: (v[0], v[1]) for k, v in ref["keys"].items()}
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if v != want[k]} == {}
    assert list(got) == list(want)  # same order as the public state_dict, too
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    buffers = {n for n, _ in model.named_buffers()}
    assert set(ref["buffers"]) <= buffers


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def test_tiny_training_step_losses_finite_and_backward(tiny_model):
    model = tiny_model
    model.train()
    batch = [_synthetic_sample(seed=1), _synthetic_sample(112, 144, n=2, seed=2)]
    losses = model(batch)
    cfg = _cfg()
    n_aux = cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
    expected = {"loss_ce", "loss_mask", "loss_dice"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(n_aux)}
    assert set(losses) == expected
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    model.zero_grad()
    sum(losses.values()).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    # the weighted dict: loss_mask carries MASK_WEIGHT
    crit = model.criterion
    assert crit.weight_dict["loss_mask"] == cfg.MODEL.MASK_FORMER.MASK_WEIGHT
    model.zero_grad()


def test_gt_mask_weights_reach_the_criterion(tiny_model):
    model = tiny_model
    model.train()
    batch = [_synthetic_sample(seed=5), _synthetic_sample(seed=6)]
    torch.manual_seed(7)
    with torch.no_grad():
        plain = model(batch)
    for x in batch:
        x["instances"].gt_mask_weights = torch.ones(x["instances"].gt_masks.tensor.shape)
    torch.manual_seed(7)
    with torch.no_grad():
        ones = model(batch)
    for x in batch:
        x["instances"].gt_mask_weights = torch.full(x["instances"].gt_masks.tensor.shape, 0.25)
    torch.manual_seed(7)
    with torch.no_grad():
        quarter = model(batch)
    for k in plain:
        torch.testing.assert_close(ones[k], plain[k], rtol=1e-5, atol=1e-6)
    # a uniform weight w scales the BCE term by exactly w
    torch.testing.assert_close(
        quarter["loss_mask"], 0.25 * plain["loss_mask"], rtol=1e-5, atol=1e-6
    )


def test_training_with_image_without_instances(tiny_model):
    model = tiny_model
    model.train()
    empty = _synthetic_sample(seed=3)
    empty["instances"] = empty["instances"][torch.zeros(3, dtype=torch.bool)]
    losses = model([empty, _synthetic_sample(seed=4)])
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model([empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0


# ------------------------------------------------------------------------------------------
# criterion
# ------------------------------------------------------------------------------------------
def _criterion(num_points=256):
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points)
    return SetCriterion(
        1,
        matcher,
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        eos_coef=0.1,
        losses=["labels", "masks"],
        num_points=num_points,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
    )


def _criterion_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(2, 10, 2, generator=g),
        "pred_masks": torch.randn(2, 10, 16, 20, generator=g),
    }
    outputs["aux_outputs"] = [
        {
            "pred_logits": torch.randn(2, 10, 2, generator=g),
            "pred_masks": torch.randn(2, 10, 16, 20, generator=g),
        }
    ]
    targets = []
    for n in (3, 2):
        targets.append(
            {
                "labels": torch.zeros(n, dtype=torch.int64),
                "masks": torch.rand(n, 64, 80, generator=g) > 0.6,
            }
        )
    return outputs, targets


def test_criterion_all_ones_mask_weights_equal_plain():
    crit = _criterion()
    outputs, targets = _criterion_inputs()
    torch.manual_seed(123)
    plain = crit(outputs, targets)
    weighted_targets = [dict(t, mask_weights=torch.ones(t["masks"].shape)) for t in targets]
    torch.manual_seed(123)
    weighted = crit(outputs, weighted_targets)
    assert set(plain) == set(weighted)
    for k in plain:
        torch.testing.assert_close(weighted[k], plain[k], rtol=1e-6, atol=1e-7)
    # the weights are actually used: zero weight everywhere removes the BCE term
    zero_targets = [dict(t, mask_weights=torch.zeros(t["masks"].shape)) for t in targets]
    torch.manual_seed(123)
    zeroed = crit(outputs, zero_targets)
    assert zeroed["loss_mask"].item() == 0.0
    torch.testing.assert_close(zeroed["loss_ce"], plain["loss_ce"])


def test_criterion_mask_weights_gradient_follows_weights():
    crit = _criterion(num_points=512)
    outputs, targets = _criterion_inputs(1)
    outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    half = []
    for t in targets:
        w = torch.ones(t["masks"].shape)
        w[:, :, :40] = 0.0  # left half ignored
        half.append(dict(t, mask_weights=w))
    outputs["pred_masks"].requires_grad_(True)
    torch.manual_seed(5)
    loss = crit(outputs, half)["loss_mask"]
    loss.backward()
    grad = outputs["pred_masks"].grad.abs()
    # bilinear sampling touches at most one column across the weight edge (x = 40/80 -> 10/20)
    assert grad[..., :9].sum() == 0
    assert grad[..., 11:].sum() > 0


def test_matcher_is_optimal_on_obvious_case():
    matcher = HungarianMatcher(1.0, 1.0, 1.0, num_points=400)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16] = True
    masks[1, 16:] = True
    pred = torch.full((3, 8, 8), -10.0)
    pred[2, 4:] = 10.0  # query 2 predicts target 1
    pred[0, :4] = 10.0  # query 0 predicts target 0
    logits = torch.zeros(1, 3, 2)
    ((src, tgt),) = matcher(
        {"pred_logits": logits, "pred_masks": pred[None]},
        [{"labels": torch.zeros(2, dtype=torch.int64), "masks": masks}],
    )
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 0, 1: 2}


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------
def test_inference_shapes_sorting_topk():
    torch.manual_seed(0)
    cfg = _cfg(TINY, "TEST.DETECTIONS_PER_IMAGE", 20, "MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK", 7)
    model = build_model(cfg).eval()
    img = _synthetic_sample(100, 150, seed=7)["image"]
    with torch.no_grad():
        out = model([{"image": img, "height": 200, "width": 300}, {"image": img[:, :90, :120]}])
    a, b = out[0]["instances"], out[1]["instances"]
    assert a.image_size == (200, 300) and b.image_size == (90, 120)
    for inst in (a, b):
        assert len(inst) == 20
        assert inst.pred_masks.dtype == torch.bool
        assert inst.pred_classes.tolist() == [0] * 20
        s = inst.scores
        assert torch.all(s[:-1] >= s[1:]) and torch.all((s >= 0) & (s <= 1))
        torch.testing.assert_close(
            inst.pred_boxes.tensor, BitMasks(inst.pred_masks).get_bounding_boxes().tensor
        )
    assert a.pred_masks.shape == (20, 200, 300)
    # top-k larger than the number of queries keeps every query
    model.test_topk_per_image = 10_000
    with torch.no_grad():
        out = model([{"image": img}])
    assert len(out[0]["instances"]) == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES


def test_inference_matches_full_resolution_postprocessing(tiny_model):
    """Chunked, low-resolution-first post-processing keeps exactly the masks a full-resolution
    (Mask2Former-style) upsample-then-threshold gives, in score order."""
    model = tiny_model.eval()
    img = _synthetic_sample(90, 120, seed=8)["image"]  # padded to 96 x 128
    inputs = [{"image": img, "height": 150, "width": 200}]
    with torch.no_grad():
        images = model.preprocess_image(inputs)
        outputs = model.decode(model.extract_features(images))
        inst = model.postprocess(outputs, inputs, images)[0]["instances"]
        logits = outputs["pred_masks"][0]
        up = F.interpolate(
            logits[None], size=images.tensor.shape[-2:], mode="bilinear", align_corners=False
        )
        up = F.interpolate(
            up[:, :, :90, :120], size=(150, 200), mode="bilinear", align_corners=False
        )[0]
    probs = outputs["pred_logits"][0].softmax(-1)[:, 0]
    k = min(model.test_topk_per_image, len(probs))
    kept = probs.topk(k).indices
    full = up[kept] > 0
    # every returned mask is one of the full-resolution masks of the kept queries
    match = (inst.pred_masks[:, None] == full[None]).flatten(2).all(-1)
    assert match.any(1).all()


def test_masks_to_boxes():
    m = torch.zeros(3, 10, 12, dtype=torch.bool)
    m[0, 2:5, 3:7] = True
    m[1, 9, 11] = True
    boxes = masks_to_boxes(m)
    assert boxes.tolist() == [[3, 2, 7, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    torch.testing.assert_close(boxes, BitMasks(m).get_bounding_boxes().tensor)


def test_extract_features_decode_matches_forward_and_extra_queries(tiny_model):
    model = tiny_model.eval()
    img = _synthetic_sample(64, 96, seed=9)["image"]
    with torch.no_grad():
        images = model.preprocess_image([{"image": img}])
        enc = model.extract_features(images)
        out = model.decode(enc)
        q = model.sem_seg_head.predictor.num_queries
        assert out["pred_logits"].shape == (1, q, 2)
        assert out["pred_masks"].shape[-2:] == enc["mask_features"].shape[-2:]
        assert len(enc["multi_scale_features"]) == 3
        c = enc["mask_features"].shape[1]
        extra = (torch.randn(1, 5, c), torch.randn(1, 5, c))
        out2 = model.decode(enc, extra_queries=extra)
        assert out2["pred_logits"].shape == (1, q + 5, 2)
        only = model.decode(enc, extra_queries=extra, use_learned_queries=False)
        assert only["pred_masks"].shape[:2] == (1, 5)
        # learned queries unaffected by extra ones when self-attention keeps them apart
        n = q + 5
        allowed = torch.zeros(1, n, n, dtype=torch.bool)
        allowed[:, :q, :q] = True
        allowed[:, q:, q:] = True
        out3 = model.decode(enc, extra_queries=extra, self_attn_allowed=allowed)
        torch.testing.assert_close(
            out3["pred_masks"][:, :q], out["pred_masks"], rtol=1e-4, atol=1e-4
        )
        full = model([{"image": img}])[0]["instances"]
        ref = model.postprocess(out, [{"image": img}], images)[0]["instances"]
        torch.testing.assert_close(full.scores, ref.scores)
        assert (full.pred_masks != ref.pred_masks).float().mean() < 1e-3


def test_lowres_attention_masks_equal_full_resolution(tiny_model):
    """Inference computes intermediate attention masks from resized mask features; this equals
    resizing the full mask logits (bilinear resizing is linear)."""
    model = tiny_model.eval()
    img = _synthetic_sample(128, 128, seed=10)["image"]
    with torch.no_grad():
        enc = model.extract_features(model.preprocess_image([{"image": img}]))
        fast = model.decode(enc, return_aux=False)
        slow = model.decode(enc, return_aux=True)
    torch.testing.assert_close(fast["pred_masks"], slow["pred_masks"], rtol=1e-4, atol=1e-4)
    assert len(slow["aux_outputs"]) == model.sem_seg_head.predictor.num_layers


# ------------------------------------------------------------------------------------------
# checkpoint round trip
# ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path, tiny_model):
    model = tiny_model.eval()
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(99)
    fresh = build_model(_cfg()).eval()
    img = _synthetic_sample(80, 100, seed=11)["image"]
    with torch.no_grad():
        before = fresh([{"image": img}])[0]["instances"]
        ref = model([{"image": img}])[0]["instances"]
    assert not torch.equal(before.scores, ref.scores)
    missing, unexpected = fresh.load_state_dict(
        torch.load(path, map_location="cpu")["model"], strict=True
    )
    assert not missing and not unexpected
    with torch.no_grad():
        after = fresh([{"image": img}])[0]["instances"]
    assert torch.equal(after.scores, ref.scores)
    assert torch.equal(after.pred_masks, ref.pred_masks)


# ------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------
def _naive_ms_deform_attn(value, shapes, locations, weights):
    """Per-sample bilinear interpolation with explicit loops (zeros outside, pixel centres at
    (i + 0.5) / size)."""
    n, _, m, d = value.shape
    _, lq, _, nl, p, _ = locations.shape
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    v = value[b, starts[lvl] : starts[lvl] + h * w, head].view(h, w, d)
                    for k in range(p):
                        x = locations[b, q, head, lvl, k, 0].item() * w - 0.5
                        y = locations[b, q, head, lvl, k, 1].item() * h - 0.5
                        x0, y0 = (
                            int(torch.floor(torch.tensor(x))),
                            int(torch.floor(torch.tensor(y))),
                        )
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * v[yy, xx]
                        out[b, q, head] += weights[b, q, head, lvl, k] * acc
    return out.view(n, lq, m * d)


def test_pure_pytorch_deform_attn_matches_naive():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 4), (2, 2)]
    n, m, d, lq, p = 2, 2, 3, 4, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    # include locations outside [0, 1] to exercise the zero padding
    locations = (
        torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    )
    weights = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    got = ms_deform_attn_core_pytorch(value, torch.tensor(shapes), locations, weights)
    want = _naive_ms_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(
    not (fused_deform_attn_available() and torch.cuda.is_available()),
    reason="compiled MultiScaleDeformableAttention op or CUDA not available",
)
def test_fused_deform_attn_matches_pytorch():  # pragma: no cover - needs the CUDA extension
    from unsam.modeling.pixel_decoder import MSDeformAttn

    torch.manual_seed(0)
    attn = MSDeformAttn(64, 3, 4, 4, impl="fused").cuda()
    ref = copy.deepcopy(attn)
    ref.impl = "pytorch"
    shapes = torch.tensor([[16, 20], [8, 10], [4, 5]], device="cuda")
    s = int(shapes.prod(1).sum())
    start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    src = torch.randn(2, s, 64, device="cuda")
    refpts = torch.rand(2, s, 3, 2, device="cuda")
    torch.testing.assert_close(
        attn(src, refpts, src, shapes, start),
        ref(src, refpts, src, shapes, start),
        rtol=1e-4,
        atol=1e-4,
    )


def test_multi_head_attention_matches_torch_module():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4).eval()
    q, k = torch.randn(7, 2, 32), torch.randn(11, 2, 32)
    allowed = torch.rand(2, 7, 11) > 0.4
    allowed[:, :, 0] = True
    want, _ = mha(q, k, k, attn_mask=(~allowed).repeat_interleave(4, 0))
    got = multi_head_attention(mha, q, k, k, allowed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        multi_head_attention(mha, q, k, k), mha(q, k, k)[0], rtol=1e-5, atol=1e-5
    )


def test_swin_backbone_outputs():
    cfg = _cfg(
        REPO / "configs" / "unsam_only_sa-1b_swinL.yaml",
        "MODEL.SWIN.EMBED_DIM",
        32,
        "MODEL.SWIN.DEPTHS",
        [2, 2, 2, 2],
        "MODEL.SWIN.NUM_HEADS",
        [1, 2, 4, 8],
        "MODEL.SWIN.WINDOW_SIZE",
        7,
    )
    from detectron2.modeling import build_backbone

    bb = build_backbone(cfg).eval()
    x = torch.randn(1, 3, 100, 132)  # not a multiple of the window: exercises padding
    with torch.no_grad():
        out = bb(x)
    shapes = bb.output_shape()
    for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        assert out[name].shape[1] == shapes[name].channels == 32 * stride // 4
        assert shapes[name].stride == stride
        assert out[name].shape[-2:] == (-(-100 // stride), -(-132 // stride))
        assert torch.isfinite(out[name]).all()
    # batch elements are independent (window partition / shift masks must not mix them)
    with torch.no_grad():
        both = bb(torch.cat([x, torch.randn_like(x)]))
    torch.testing.assert_close(both["res5"][:1], out["res5"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [0, 3])
def test_swin_block_matches_timm(shift):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    from unsam.modeling.backbone.swin import BasicLayer

    layer = BasicLayer(32, 2, 2, 7, 4.0, True, None, 0.0, 0.0, [0.0, 0.0], downsample=False).eval()
    block = layer.blocks[1 if shift else 0]
    ref = timm_swin.SwinTransformerBlock(
        32, (14, 14), num_heads=2, window_size=7, shift_size=shift
    ).eval()
    result = ref.load_state_dict(block.state_dict(), strict=False)
    assert not result.missing_keys  # same parameter names as timm's block
    x = torch.randn(2, 14 * 14, 32)
    with torch.no_grad():
        got = block(x, 14, 14, layer._shift_mask(14, 14, x.device))
        want = ref(x.view(2, 14, 14, 32)).view(2, 196, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# slow: learning signal and the inference memory bound
# ------------------------------------------------------------------------------------------
def _ellipses_sample(seed, h=128, w=128):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g) * 60 + 50
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = []
    for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
        cy, cx = torch.randint(20, h - 20, (2,), generator=g).tolist()
        ry, rx = torch.randint(8, 25, (2,), generator=g).tolist()
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        for prev in masks:
            prev &= ~m
        masks.append(m)
        img[:, m] = torch.rand(3, 1, generator=g) * 255
    masks = torch.stack([m for m in masks if m.any()])
    inst = Instances((h, w))
    inst.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return {"image": img.clamp(0, 255).to(torch.uint8), "instances": inst}


@pytest.mark.slow
def test_tiny_model_loss_goes_down():
    torch.manual_seed(0)
    model = build_train_model(_cfg()).train()
    data = [_ellipses_sample(i) for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.05)
    history = []
    for it in range(80):
        losses = model([data[(2 * it) % 8], data[(2 * it + 1) % 8]])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.6 * first, (first, last)


@pytest.mark.slow
def test_benchmark_peak_rss_under_4gb_at_1024(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "whole_image.py"),
            "--short-side",
            "1024",
            "--json",
            str(out),
        ],
        check=True,
        timeout=1800,
    )
    res = json.loads(out.read_text())
    assert res["detections"] == 1000 and res["queries"] == 2000
    assert res["peak_rss_gb"] < 4.0, res
