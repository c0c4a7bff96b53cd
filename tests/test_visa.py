"""ViSA: schedule, granularity curriculum, boundary band weights, semantic guidance loss."""

import math

import unsam.compat  # noqa: F401

import pytest
import torch

from unsam.config import get_unsam_cfg
from unsam.data.visa_transforms import (
    allowed_depth,
    boundary_band_weights,
    boundary_weights,
    curriculum_keep,
    parent_indices,
    select_targets_by_level,
)
from unsam.modeling.visa import VisaState, semantic_guidance_loss, visa_weight


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "it,linear,cosine",
    [
        (0, 1.0, 1.0),
        (99, 1.0, 1.0),
        (100, 1.0, 1.0),
        (125, 0.75, (1 + math.cos(math.pi / 4)) / 2),
        (150, 0.5, 0.5),
        (175, 0.25, (1 - math.cos(math.pi / 4)) / 2),
        (199, 0.01, None),
        (200, 0.0, 0.0),
        (10_000, 0.0, 0.0),
    ],
)
def test_schedule_values(it, linear, cosine):
    assert visa_weight(it, 100, 200, "linear") == pytest.approx(linear)
    if cosine is not None:
        assert visa_weight(it, 100, 200, "cosine") == pytest.approx(cosine)


def test_schedule_step_and_bad_decay():
    assert visa_weight(4, 5, 5, "linear") == 1.0 and visa_weight(5, 5, 5, "cosine") == 0.0
    with pytest.raises(ValueError, match="linear"):
        visa_weight(0, 0, 10, "exp")


# ---------------------------------------------------------------------------------------------
def test_allowed_depth_grows_as_weight_decays():
    assert allowed_depth(1.0, 3) == 0
    assert allowed_depth(0.0, 3) == 3
    assert allowed_depth(0.5, 3) == 2
    assert allowed_depth(1.0, 3, min_depth=1) == 1
    depths = [allowed_depth(w / 20, 4) for w in range(20, -1, -1)]
    assert depths == sorted(depths) and set(depths) == {0, 1, 2, 3, 4}


# hierarchy:  0 ─┬─ 2 ── 4        1 ── 5
#                └─ 3
IDS = [10, 11, 12, 13, 14, 15]
PARENT_IDS = [-1, -1, 10, 10, 12, 11]
LEVELS = torch.tensor([0, 0, 1, 1, 2, 1])


def test_parent_indices_maps_ids_and_missing_parents():
    assert parent_indices(IDS, PARENT_IDS).tolist() == [-1, -1, 0, 0, 2, 1]
    assert parent_indices([5, 6], [99, 5]).tolist() == [-1, 0]  # parent cropped away → root


def test_curriculum_keeps_parents_before_parts():
    parents = parent_indices(IDS, PARENT_IDS)
    assert select_targets_by_level(LEVELS, parents, 1.0).tolist() == [1, 1, 0, 0, 0, 0]
    assert select_targets_by_level(LEVELS, parents, 0.5).tolist() == [1, 1, 1, 1, 0, 1]
    assert select_targets_by_level(LEVELS, parents, 0.0).all()
    for w in torch.linspace(0, 1, 11).tolist():
        keep = select_targets_by_level(LEVELS, parents, w, max_level=2)
        for child, parent in enumerate(parents.tolist()):
            if parent >= 0 and keep[child]:
                assert keep[parent], (w, child)
    # a part whose level is (wrongly) coarse still waits for its parent
    odd_levels = torch.tensor([0, 0, 2, 1, 0, 1])
    keep = select_targets_by_level(odd_levels, parents, 0.5, max_level=2)
    assert not keep[2] and not keep[4] and keep[3]


def test_curriculum_never_empties_an_image():
    keep = select_targets_by_level(torch.tensor([2, 3, 2]), None, 1.0, max_level=3)
    assert keep.tolist() == [True, False, True]
    assert select_targets_by_level(torch.zeros(0, dtype=torch.long), None, 1.0).numel() == 0


# ---------------------------------------------------------------------------------------------
def test_band_weights_on_square_width_1():
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 3:13, 3:13] = True
    w = boundary_band_weights(masks, width=1, min_weight=0.2, strength=0.5)
    assert w.shape == (1, 16, 16) and w.dtype == torch.float32
    band = w[0] < 1
    assert int(band.sum()) == 12 * 12 - 8 * 8  # inner ring (36) + outer ring (44)
    assert torch.allclose(w[0][band], torch.tensor(0.6))  # lerp(1, 0.2, 0.5)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:14, 2:14] = True
    expected[4:12, 4:12] = False
    assert torch.equal(band, expected)
    assert w[0, 2, 2] < 1 and w[0, 1, 1] == 1 and w[0, 4, 4] == 1 and w[0, 3, 3] < 1


def test_band_weights_width_strength_border_and_empty():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 3:13, 3:13] = True
    masks[1, :, :8] = True  # touches the image border on three sides
    w = boundary_band_weights(masks, width=2, min_weight=0.0, strength=1.0)
    assert int((w[0] < 1).sum()) == 14 * 14 - 6 * 6
    assert torch.equal(torch.nonzero(w[1] < 1)[:, 1].unique(), torch.tensor([6, 7, 8, 9]))
    assert (w[1][w[1] < 1] == 0).all()
    assert (w[2] == 1).all()  # empty mask: no boundary
    assert (boundary_band_weights(masks, 0, 0.2, 1.0) == 1).all()
    assert (boundary_band_weights(masks, 3, 0.2, 0.0) == 1).all()


# ---------------------------------------------------------------------------------------------
def _regions(b=2, d=6, h=16, w=16, seed=0):
    """Guidance features made of a few constant regions (like semantic regions) plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, h, w, dtype=torch.long)
    labels[:, : h // 2, w // 2 :] = 1
    labels[:, h // 2 :, : w // 3] = 2
    protos = torch.randn(b, 3, d, generator=g)
    feats = torch.gather(protos, 1, labels.view(b, -1, 1).expand(-1, -1, d))
    feats = feats.view(b, h, w, d).permute(0, 3, 1, 2)
    return feats + 0.05 * torch.randn(feats.shape, generator=g)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_guidance_loss_zero_for_identical_features(loss):
    feats = _regions()
    gen = torch.Generator().manual_seed(1)
    val = semantic_guidance_loss(feats.clone(), feats, 128, gen, loss=loss)
    assert val.dim() == 0 and abs(val.item()) < 1e-6
    other = semantic_guidance_loss(
        torch.randn(2, 6, 16, 16), feats, 128, torch.Generator().manual_seed(1), loss=loss
    )
    assert other.item() > 1e-3


def test_guidance_loss_resolution_independent_and_valid_region():
    feats = _regions(h=32, w=32)
    coarse = torch.nn.functional.avg_pool2d(feats, 2)
    # same content at another resolution (and channel count) still compares as near-equal
    guide = torch.cat([coarse, coarse], dim=1)
    val = semantic_guidance_loss(coarse.clone(), guide, 64, torch.Generator().manual_seed(0))
    assert val.item() < 1e-5
    # only valid pixels are sampled: garbage outside the valid area does not count
    broken = feats.clone()
    broken[..., 16:] = torch.randn(broken[..., 16:].shape)
    valid = torch.zeros(2, 32, 32, dtype=torch.bool)
    valid[..., :15] = True
    assert (
        semantic_guidance_loss(
            broken, feats, 64, torch.Generator().manual_seed(0), valid=valid
        ).item()
        < 1e-4
    )
    assert semantic_guidance_loss(broken, feats, 64, torch.Generator().manual_seed(0)).item() > 1e-2


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_guidance_loss_decreases_under_adam(loss):
    guide = _regions(d=12)
    torch.manual_seed(0)
    mask_features = torch.nn.Parameter(torch.randn(2, 16, 16, 16))
    opt = torch.optim.Adam([mask_features], lr=0.05)

    def evaluate():
        with torch.no_grad():
            return semantic_guidance_loss(
                mask_features, guide, 256, torch.Generator().manual_seed(123), loss=loss
            ).item()

    before = evaluate()
    for step in range(15):
        opt.zero_grad()
        val = semantic_guidance_loss(
            mask_features, guide, 128, torch.Generator().manual_seed(step), loss=loss
        )
        val.backward()
        opt.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)
    assert guide.grad is None


# ---------------------------------------------------------------------------------------------
def _cfg(**visa):
    cfg = get_unsam_cfg()
    cfg.UNSAM.VISA.ENABLED = True
    cfg.UNSAM.VISA.START_ITER = 10
    cfg.UNSAM.VISA.END_ITER = 30
    cfg.UNSAM.VISA.GUIDANCE.WEIGHT = 2.0
    for k, v in visa.items():
        node, key = k.split("__") if "__" in k else (None, k)
        (getattr(cfg.UNSAM.VISA, node) if node else cfg.UNSAM.VISA)[key] = v
    return cfg


def test_visa_state_disabled_is_a_no_op():
    cfg = get_unsam_cfg()
    assert cfg.UNSAM.VISA.ENABLED is False
    state = VisaState.from_config(cfg)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    for it in (0, 10, 10_000):
        w = state.weights(it)
        assert (w.curriculum, w.boundary, w.guidance) == (0.0, 0.0, 0.0) and not w.active
        assert curriculum_keep(state, LEVELS, None, it).all()
        assert boundary_weights(state, masks, it) is None
        assert state.guidance_loss(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), it) is None


def test_visa_state_weights_follow_schedule():
    state = VisaState.from_config(_cfg())
    w = state.weights(20)
    assert (w.curriculum, w.boundary, w.guidance) == pytest.approx((0.5, 0.5, 1.0))
    assert state.weights(0).guidance == pytest.approx(2.0)
    assert not state.weights(30).active
    parents = parent_indices(IDS, PARENT_IDS)
    assert curriculum_keep(state, LEVELS, parents, 0).tolist() == [1, 1, 0, 0, 0, 0]
    assert curriculum_keep(state, LEVELS, parents, 30).all()
    masks = torch.zeros(1, 12, 12, dtype=torch.bool)
    masks[0, 3:9, 3:9] = True
    mw = boundary_weights(state, masks, 0)
    assert mw.min().item() == pytest.approx(0.2)  # MIN_WEIGHT at full strength
    assert boundary_weights(state, masks, 30) is None
    feats = _regions()
    mf = torch.randn(2, 8, 16, 16)
    g = state.guidance_loss(mf, feats, 25, torch.Generator().manual_seed(0))
    raw = semantic_guidance_loss(mf, feats, 256, torch.Generator().manual_seed(0))
    assert raw.item() > 0 and g.item() == pytest.approx(0.5 * raw.item())  # 2.0 × schedule 0.25


def test_visa_state_switches_parts_off_individually():
    state = VisaState.from_config(
        _cfg(BOUNDARY__ENABLED=False, CURRICULUM__ENABLED=False, DECAY="cosine")
    )
    w = state.weights(15)
    assert w.boundary == 0 and w.curriculum == 0
    assert w.guidance == pytest.approx(2.0 * (1 + math.cos(math.pi / 4)) / 2)
    assert boundary_weights(state, torch.ones(1, 4, 4, dtype=torch.bool), 0) is None
    with pytest.raises(ValueError):
        VisaState.from_config(_cfg(GUIDANCE__LOSS="l1"))


def test_boundary_band_cpu_morphology_equals_max_pool_band():
    """The CPU (OpenCV) band and the max-pool band used on GPUs mark the same pixels, borders
    included."""
    from unsam.data.visa_transforms import _band_cpu, _square_max

    gen = torch.Generator().manual_seed(0)
    masks = torch.rand((6, 40, 50), generator=gen) > 0.6
    masks[0] = False
    masks[1, :, :20] = True  # touches three image borders
    for width in (1, 3):
        m = masks.to(torch.float32).unsqueeze(1)
        pooled = (_square_max(m, width) != -_square_max(-m, width)).squeeze(1)
        assert torch.equal(torch.from_numpy(_band_cpu(masks.numpy(), width)), pooled)
