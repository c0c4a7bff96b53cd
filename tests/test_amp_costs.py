"""Mixed precision and backends: matching costs are computed in float32 even inside an autocast
region (float16 BCE sums over thousands of points overflow), and the process-group backend follows
MODEL.DEVICE, not the hardware."""

import unsam.compat  # noqa: F401

import torch

from unsam.engine.hooks import per_image_difficulty, per_prompt_difficulty
from unsam.modeling import criterion as criterion_module
from unsam.modeling import matcher as matcher_module
from unsam.utils.dist import default_backend


def _spy(monkeypatch, module, name, seen):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_matching_costs_leave_autocast(monkeypatch):
    seen = []
    _spy(monkeypatch, matcher_module, "batch_sigmoid_ce_cost", seen)
    _spy(monkeypatch, matcher_module, "batch_dice_cost", seen)  # batch_mask_cost reads both globals
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, :10], masks[1, 10:20], masks[2, 20:] = True, True, True
    outputs = {"pred_logits": torch.randn(1, 5, 2), "pred_masks": torch.randn(1, 5, 8, 8)}
    prompt = criterion_module.PromptCriterion(64, 3.0, 0.75, {"loss_prompt_mask": 1.0})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        idx = matcher_module.HungarianMatcher(1.0, 1.0, 1.0, num_points=64)(
            outputs, [{"labels": torch.zeros(3, dtype=torch.int64), "masks": masks}]
        )
        prompt.match(torch.randn(2, 3, 8, 8), [masks[:2], masks[2:]])
        ranks = per_image_difficulty(outputs, [{"masks": masks}]) + per_prompt_difficulty(
            {"pred_masks": torch.randn(1, 3, 8, 8)}, [masks[:1]]
        )
    assert len(idx[0][0]) == 3 and all(v is not None for v in ranks)
    assert seen and not any(seen), seen  # every cost computed outside autocast


def test_backend_follows_the_model_device():
    assert default_backend("cpu") == "gloo"
    assert default_backend("cuda") == default_backend("cuda:1") == "nccl"
    assert default_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
