"""Compiled CPU kernels (unsam.ops): same outputs as the pure-PyTorch paths they replace.

The kernels are built by ``make setup``; when they cannot be built the test is skipped, unless
``UNSAM_REQUIRE_CPU_KERNELS=1`` (CI), where a missing build is a failure.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

import unsam.modeling  # noqa: F401
from unsam.config import get_unsam_cfg
from unsam.modeling.mask_postprocess import binarize_upsampled, masks_to_boxes, permute_rows_
from unsam.modeling.pixel_decoder import ms_deform_attn_core_pytorch
from unsam.ops import cpu_kernels

from .conftest import REPO_ROOT

KERNELS = cpu_kernels()
if KERNELS is None and os.environ.get("UNSAM_REQUIRE_CPU_KERNELS") == "1":
    raise RuntimeError(
        "UNSAM_REQUIRE_CPU_KERNELS=1 but the CPU kernels could not be built (see the warning above)"
    )
needs_kernels = pytest.mark.skipif(
    KERNELS is None, reason="CPU kernels not built (no C++ compiler / ninja)"
)


def _deform_inputs(seed=0, shapes=((20, 27), (10, 14), (5, 7)), n=2, heads=4, dim=8, points=3):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, heads, dim, generator=g)
    # some locations fall outside [0, 1] to exercise the zero padding
    loc = torch.rand(n, 50, heads, len(shapes), points, 2, generator=g) * 1.4 - 0.2
    weights = torch.rand(n, 50, heads, len(shapes), points, generator=g)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return value, spatial, start, loc, weights


@needs_kernels
@pytest.mark.parametrize("seed", [0, 1])
def test_deform_attn_kernel_matches_pytorch(seed):
    value, spatial, start, loc, weights = _deform_inputs(seed)
    ref = ms_deform_attn_core_pytorch(value, spatial, loc, weights)
    out = KERNELS.ms_deform_attn_forward(value, spatial, start, loc, weights)
    assert out.shape == ref.shape
    # the kernel mirrors grid_sample's fused multiply-adds: equal to rounding, usually bit for bit
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernels", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize(
    "padded,image,output", [((64, 96), (64, 90), (64, 90)), ((64, 96), (60, 90), (101, 149))]
)
def test_binarize_upsampled_matches_interpolate(padded, image, output, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setenv("UNSAM_CPU_KERNELS", "0")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, padded[0] // 4, padded[1] // 4, generator=g) * 3
    logits[2] = -1.0  # an empty mask: box all zeros
    logits[3] = -1.0
    logits[3, 5:7, 9:12] = 2.0  # a small one
    up = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[
        :, :, : image[0], : image[1]
    ]
    if output != image:
        up = F.interpolate(up, size=output, mode="bilinear", align_corners=False)
    ref = up[0] > 0
    out = torch.empty((7, *output), dtype=torch.bool)
    boxes = binarize_upsampled(logits, padded, image, output, out=out)
    # the kernel reproduces F.interpolate's fused multiply-adds: the same pixels
    assert torch.equal(out, ref)
    assert torch.equal(boxes, masks_to_boxes(ref))
    assert boxes[2].tolist() == [0, 0, 0, 0] and boxes[3, 2] > boxes[3, 0]


def test_permute_rows_in_place():
    rows = torch.arange(7 * 3).view(7, 3)
    order = torch.tensor([3, 0, 6, 1, 2, 5, 4])
    expected = rows[order].clone()
    assert permute_rows_(rows, order) is rows
    assert torch.equal(rows, expected)


@needs_kernels
def test_whole_image_outputs_unchanged_by_kernels(monkeypatch):
    """R50 public config, random weights: kernels on vs the pure-PyTorch paths."""
    torch.manual_seed(0)
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(REPO_ROOT / "configs" / "unsam_only_sa-1b_R50.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
            200,
            "TEST.DETECTIONS_PER_IMAGE",
            100,
        ]
    )
    model = build_model(cfg).eval()
    image = torch.randint(
        0, 256, (3, 150, 210), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    inputs = [{"image": image, "height": 150, "width": 210}]

    def run():
        with torch.inference_mode():
            images = model.preprocess_image(inputs)
            encoded = model.extract_features(images)
            outputs = model.decode(encoded, final_masks=False)
            inst = model.postprocess(outputs, inputs, images, encoded["mask_features"])[0][
                "instances"
            ]
        return outputs["pred_logits"], inst

    logits_k, inst_k = run()
    monkeypatch.setenv("UNSAM_CPU_KERNELS", "0")
    logits_p, inst_p = run()
    assert (logits_k - logits_p).abs().max().item() <= 1e-4
    identical = (inst_k.pred_masks == inst_p.pred_masks).flatten(1).all(1).float().mean().item()
    assert identical >= 0.98
    torch.testing.assert_close(inst_k.scores, inst_p.scores, rtol=0, atol=1e-4)
