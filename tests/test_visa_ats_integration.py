"""ViSA and ATS wired into the trainer: batch pre-processing, guidance loss, difficulty feedback,
ViSA-off bit-for-bit equality with detectron2's plain path, and ATS resume."""

import shutil
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.env import seed_all_rng

from unsam.config import get_unsam_cfg
from unsam.data.mapper import UnSAMDatasetMapper
from unsam.data.visa_transforms import VisaBatchLoader, apply_visa, apply_visa_to_instances
from unsam.engine.hooks import ATSFeedbackHook, per_image_difficulty
from unsam.engine.train_model import build_train_model, guidance_loss_from_outputs
from unsam.engine.trainer import Trainer
from unsam.modeling.visa import VisaState, semantic_guidance_loss

from .conftest import registered_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"


# ---------------------------------------------------------------------------------------------
# ViSA batch pre-processing
# ---------------------------------------------------------------------------------------------
def _instances():
    """4 targets: 0 (root, level 0) ⊃ 1 (level 1) ⊃ 2 (level 2); 3 (root, level 1)."""
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[0, 4:28, 4:28] = True
    masks[1, 6:20, 6:20] = True
    masks[2, 8:12, 8:12] = True
    masks[3, 29:31, 0:10] = True
    inst = Instances((32, 32))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.zeros(4, dtype=torch.int64)
    inst.gt_levels = torch.tensor([0, 1, 2, 1])
    inst.gt_parents = torch.tensor([-1, 0, 1, -1])
    return inst


def test_apply_visa_is_identity_when_inactive():
    batch = [{"instances": _instances()}]
    off = VisaState(enabled=False)
    assert apply_visa(batch, off, 0) is batch
    done = VisaState(enabled=True, start_iter=0, end_iter=10)
    assert apply_visa(batch, done, 10) is batch  # schedule finished: plain path again
    assert not batch[0]["instances"].has("gt_mask_weights")


def test_curriculum_filters_and_reindexes_parents_without_mutating_input():
    inst = _instances()
    # 3 levels, weight 0.5 → allowed depth 1: keeps 0, 1, 3; drops 2 (level 2)
    state = VisaState(enabled=True, start_iter=0, end_iter=10, boundary_enabled=False)
    out = apply_visa_to_instances(inst, state, 5)
    assert len(out) == 3 and len(inst) == 4
    assert out.gt_levels.tolist() == [0, 1, 1]
    assert out.gt_parents.tolist() == [-1, 0, -1]
    assert not out.has("gt_mask_weights")
    # weight 1 → depth 0: only the roots of level 0, and the re-index maps nothing to a dropped row
    out0 = apply_visa_to_instances(inst, state, 0)
    assert out0.gt_levels.tolist() == [0] and out0.gt_parents.tolist() == [-1]


def test_boundary_weights_attached_with_schedule_strength():
    inst = _instances()
    state = VisaState(
        enabled=True,
        start_iter=0,
        end_iter=10,
        curriculum_enabled=False,
        boundary_width=1,
        boundary_min_weight=0.2,
    )
    out = apply_visa_to_instances(inst, state, 5)  # strength 0.5 → band weight 0.6
    assert len(out) == 4 and not inst.has("gt_mask_weights")
    w = out.gt_mask_weights
    assert w.shape == (4, 32, 32) and w.dtype == torch.float32
    assert w[0, 4, 10].item() == pytest.approx(0.6)  # on the boundary of mask 0
    assert w[0, 16, 16].item() == 1.0 and w[0, 0, 0].item() == 1.0


def test_visa_batch_loader_uses_current_iteration():
    state = VisaState(enabled=True, start_iter=0, end_iter=10, boundary_enabled=False)
    loader = VisaBatchLoader([[{"instances": _instances()}]] * 3, state)
    sizes = []
    for it, batch in zip([0, 5, 10], loader):
        sizes.append(len(batch[0]["instances"]))
        loader.iteration = it + 5  # what the hook does before the next step
    assert sizes == [1, 3, 4]


# ---------------------------------------------------------------------------------------------
# guidance loss
# ---------------------------------------------------------------------------------------------
def test_guidance_loss_from_outputs_crops_padding_and_skips_when_off():
    torch.manual_seed(0)
    guide = torch.randn(2, 8, 16, 16)
    # image 0 is 64×64, image 1 is 64×32 in a 64×64 padded batch; features at stride 4
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 32)])
    feats = torch.randn(2, 8, 16, 16)
    feats[0] = guide[0]
    feats[1, :, :, :8] = torch.nn.functional.interpolate(
        guide[1:2], size=(16, 8), mode="bilinear", align_corners=False
    )[0]
    feats[1, :, :, 8:] = 100.0  # padding region: must not be sampled
    batch = [{"visa_guidance": guide[0]}, {"visa_guidance": guide[1]}]
    state = VisaState(enabled=True, start_iter=0, end_iter=10, guidance_num_points=64)
    loss = guidance_loss_from_outputs(feats, batch, state, 0, images)
    # image 0 identical → 0; image 1 matches up to bilinear resampling → small, not the padding
    uncropped = semantic_guidance_loss(feats[1:2], guide[1:2], 64)
    assert 0 <= loss.item() < 0.25 * uncropped.item()
    assert guidance_loss_from_outputs(feats, batch, VisaState(enabled=False), 0, images) is None
    assert guidance_loss_from_outputs(feats, batch, state, 10, images) is None
    assert guidance_loss_from_outputs(feats, [{}, {}], state, 0, images) is None
    # deterministic per iteration, without touching the global RNG
    rng = torch.get_rng_state()
    again = guidance_loss_from_outputs(feats, batch, state, 0, images)
    assert torch.equal(rng, torch.get_rng_state()) and again.item() == loss.item()


def _cfg(tmp, *opts):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(TINY))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "SEED",
            0,
            "OUTPUT_DIR",
            str(tmp),
            "DATASETS.TRAIN",
            ("itest_shapes",),
            "DATASETS.TEST",
            (),
            "INPUT.IMAGE_SIZE",
            96,
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.MAX_ITER",
            3,
            "SOLVER.CHECKPOINT_PERIOD",
            1000,
            "SOLVER.WARMUP_ITERS",
            0,
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
            256,
            "DATALOADER.NUM_WORKERS",
            0,
            *opts,
        ]
    )
    return cfg


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    with registered_shapes(tmp_path_factory.mktemp("shapes"), "itest_shapes") as root:
        yield root


def test_mapper_guidance_features_only_when_enabled(shapes, tmp_path):
    record = DatasetCatalog.get("itest_shapes")[0]
    plain = UnSAMDatasetMapper(_cfg(tmp_path), is_train=True)(dict(record))
    assert "visa_guidance" not in plain
    cfg = _cfg(tmp_path, "UNSAM.VISA.ENABLED", True)
    out = UnSAMDatasetMapper(cfg, is_train=True)(dict(record, ats_index=4, ats_task_id=0))
    g = out["visa_guidance"]
    assert g.dtype == torch.float16 and g.dim() == 3 and g.shape[1:] == (12, 12)  # 96 px / 8
    assert torch.allclose(g.float().norm(dim=0), torch.ones(12, 12), atol=1e-2)
    assert out["ats_index"] == 4 and out["ats_task_id"] == 0
    assert not UnSAMDatasetMapper(cfg, is_train=False)(dict(record)).get("visa_guidance")


# ---------------------------------------------------------------------------------------------
# ATS difficulty
# ---------------------------------------------------------------------------------------------
def test_per_image_difficulty_ranks_good_below_bad():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 8:40, 8:40] = True
    masks[1, 40:60, 30:60] = True
    targets = [{"masks": masks}, {"masks": masks}, {"masks": masks[:0]}]
    logits = torch.full((3, 5, 16, 16), -8.0)
    small = torch.nn.functional.interpolate(masks[None].float(), size=(16, 16), mode="area")[0]
    logits[0, 3] = torch.where(small[0] >= 0.5, 8.0, -8.0)  # image 0: perfect, on other queries
    logits[0, 1] = torch.where(small[1] >= 0.5, 8.0, -8.0)
    logits[1, 0, :8, 8:] = 8.0  # image 1: wrong places
    out = {"pred_masks": logits}
    loss = per_image_difficulty(out, targets, "loss")
    iou = per_image_difficulty(out, targets, "iou")
    assert loss[2] is None and iou[2] is None
    assert loss[0] < 0.1 < loss[1]
    assert iou[0] == pytest.approx(0.0, abs=1e-6) and iou[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="DIFFICULTY"):
        per_image_difficulty(out, targets, "entropy")


# ---------------------------------------------------------------------------------------------
# trainer: ViSA off is the plain path; ATS feedback and resume
# ---------------------------------------------------------------------------------------------
class _PlainTrainer(Trainer):
    """The trainer as it was before ViSA/ATS: detectron2's loader, hooks and resume."""

    @classmethod
    def build_train_loader(cls, cfg):
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(cfg, mapper=UnSAMDatasetMapper(cfg, is_train=True))

    def build_hooks(self):
        return DefaultTrainer.build_hooks(self)

    def resume_or_load(self, resume=True):
        return DefaultTrainer.resume_or_load(self, resume=resume)


class _Recorder(HookBase):
    """Per-iteration total loss (exact float) and, with ATS, the batch's image indices."""

    def __init__(self):
        self.losses, self.batches = [], []
        self._handle = None

    def before_train(self):
        def grab(module, args):
            if module.training:
                self.batches.append([int(x.get("ats_index", -1)) for x in args[0]])

        self._handle = self.trainer.model.register_forward_pre_hook(grab)

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())

    def after_train(self):
        self._handle.remove()


class _Stop(HookBase):
    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt("simulated interruption")


def _train(cfg, trainer_cls=Trainer, resume=False, stop_at=None, drop_ats_state=False):
    seed_all_rng(0)
    trainer = trainer_cls(cfg)
    if drop_ats_state:
        trainer.checkpointer.checkpointables.pop("ats_sampler")
    rec = _Recorder()
    hooks = [rec] + ([_Stop(stop_at)] if stop_at is not None else [])
    trainer.register_hooks(hooks)
    trainer.resume_or_load(resume=resume)
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer, rec


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_visa_off_is_bit_for_bit_the_plain_path(shapes, tmp_path):
    plain, rp = _train(_cfg(tmp_path / "p"), _PlainTrainer)
    off, ro = _train(_cfg(tmp_path / "o"))
    # ViSA enabled but its schedule is over from iteration 0: wrapper and hook run, weights are 0
    over, rv = _train(_cfg(tmp_path / "v", "UNSAM.VISA.ENABLED", True, "UNSAM.VISA.END_ITER", 0))
    assert len(rp.losses) == 3 and all(np.isfinite(rp.losses))
    assert rp.losses == ro.losses == rv.losses
    ref = _state(plain)
    for t in (off, over):
        st = _state(t)
        assert all(torch.equal(ref[k], st[k]) for k in ref)
    # and an active ViSA does change training (the comparison above can fail)
    on, ron = _train(
        _cfg(tmp_path / "a", "UNSAM.VISA.ENABLED", True, "UNSAM.VISA.GUIDANCE.ENABLED", False)
    )
    assert ron.losses != rp.losses


def test_ats_feedback_and_resume_reproduce_the_sample_sequence(shapes, tmp_path):
    opts = (
        "UNSAM.ATS.ENABLED",
        True,
        "UNSAM.ATS.START_ITER",
        1,
        "UNSAM.ATS.BLOCK_SIZE",
        2,
        "UNSAM.ATS.ALPHA",
        30.0,
        "UNSAM.ATS.BETA",
        0.0,
        "SOLVER.MAX_ITER",
        4,
        "SOLVER.CHECKPOINT_PERIOD",
        2,
    )
    full, rf = _train(_cfg(tmp_path / "full", *opts))
    sampler = full.ats_sampler
    assert sampler is not None and sampler.iteration == 4 and sampler.adaptive
    assert int(sampler.table.seen.sum()) > 0 and sampler.table.version > 0
    assert all(i >= 0 for b in rf.batches for i in b) and len(rf.batches) == 4

    part, r1 = _train(_cfg(tmp_path / "cut", *opts), stop_at=1)  # checkpoint at iteration 1
    assert part.iter == 1 and (tmp_path / "cut" / "model_0000001.pth").is_file()
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    resumed, r2 = _train(_cfg(tmp_path / "cut", *opts), resume=True)
    assert resumed.start_iter == 2
    assert r1.batches + r2.batches == rf.batches
    ck = torch.load(tmp_path / "cut" / "model_0000001.pth", weights_only=False)
    assert ck["ats_sampler"]["iteration"] == 2 and ck["ats_sampler"]["table"]["version"] == 2
    # the table was restored and kept learning (its values differ from the uninterrupted run's:
    # the global RNG of the criterion's point sampling is not part of a checkpoint)
    assert resumed.ats_sampler.table.version == 4 == sampler.table.version
    # without the sampler state the resumed stream differs (the comparison above can fail)
    lost, r3 = _train(_cfg(tmp_path / "cut2", *opts), resume=True, drop_ats_state=True)
    assert lost.start_iter == 2 and r3.batches != r2.batches


def test_ats_feedback_hook_falls_back_to_batch_loss():
    from unsam.data.ats import AdaptiveTaskSampler, DifficultyTable

    table = DifficultyTable(4, 1, ema=0.5)
    sampler = AdaptiveTaskSampler(table, 1, seed=0, items_per_iteration=2)
    hook = ATSFeedbackHook(sampler, sync_period=2, difficulty="iou")

    class _Model(torch.nn.Module):
        def forward(self, batch):
            return {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(0.5)}

    class _Storage:
        def put_scalar(self, *a, **k):
            pass

    class _T:
        model, iter, start_iter, max_iter, storage = _Model(), 0, 0, 10, _Storage()

    hook.trainer = _T()
    hook.before_train()
    _T.model.train()
    _T.model([{"ats_index": 1, "ats_task_id": 0}, {"ats_index": 3, "ats_task_id": 0}])
    hook.after_step()
    assert table.version == 0 and sampler.iteration == 1  # sync every 2 steps
    _T.iter = 1
    _T.model([{"ats_index": 1, "ats_task_id": 0}, {"ats_index": 2, "ats_task_id": 0}])
    hook.after_step()
    assert table.version == 1 and sampler.iteration == 2
    assert table.values[:, 0].tolist() == [0.0, 2.0, 2.0, 2.0]
    hook.after_train()


def test_guidance_loss_on_real_mask_features_backpropagates(shapes, tmp_path):
    """What the training model's guidance step does: the loss reaches the pixel decoder."""
    cfg = _cfg(tmp_path, "UNSAM.VISA.ENABLED", True)
    model = build_train_model(cfg)
    model.train()
    mapper = UnSAMDatasetMapper(cfg, is_train=True)
    batch = [mapper(dict(r)) for r in DatasetCatalog.get("itest_shapes")[:2]]
    images = model.preprocess_image(batch)
    encoded = model.extract_features(images)
    loss = guidance_loss_from_outputs(
        encoded["mask_features"], batch, VisaState.from_config(cfg), 0, images
    )
    assert loss is not None and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [
        p.grad for n, p in model.named_parameters() if "pixel_decoder" in n and p.grad is not None
    ]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_model_owns_visa_and_needs_the_iteration(shapes, tmp_path):
    """The training model builds its ViSA schedule from the config; with guidance on, a training
    forward without the iteration (no VisaScheduleHook) is an error, not a silently missing loss.
    The inference model knows nothing of ViSA."""
    from detectron2.modeling import build_model

    import unsam.modeling  # noqa: F401

    cfg = _cfg(tmp_path, "UNSAM.VISA.ENABLED", True)
    assert not hasattr(build_model(cfg), "visa")
    model = build_train_model(cfg)
    model.train()
    assert model.visa.uses_guidance and model.visa.end_iter == cfg.UNSAM.VISA.END_ITER
    batch = [
        UnSAMDatasetMapper(cfg, is_train=True)(dict(r))
        for r in DatasetCatalog.get("itest_shapes")[:2]
    ]
    with pytest.raises(RuntimeError, match="set_visa_iteration"):
        model(batch)
    model.set_visa_iteration(0)
    assert model(batch)["loss_visa_guidance"] > 0
    model.set_visa_iteration(cfg.UNSAM.VISA.END_ITER)  # schedule over: the plain losses
    assert "loss_visa_guidance" not in model(batch)
    plain = build_train_model(_cfg(tmp_path))  # ViSA off: no iteration needed
    plain.train()
    assert not plain.visa.uses_guidance and "loss_visa_guidance" not in plain(batch)
