"""The training model (``unsam.engine.train_model.UnSAMTrain``) around the inference ``UnSAM``:
import boundaries, unchanged state_dict, inference path unchanged, task choice and prompt
sampling from the model's own generator (no global RNG, no masks copied to the host)."""

import ast
import json
import os
from collections import Counter
from pathlib import Path

import unsam.compat  # noqa: F401

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Instances

import unsam.modeling  # noqa: F401
from unsam.config import get_unsam_cfg
from unsam.engine.train_model import UnSAMTrain, build_train_model
from unsam.engine.trainer import Trainer
from unsam.modeling import UnSAM
from unsam.tasks import PROMPT_TASKS, WHOLE_TASK

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"
TINY_PROMPT = REPO / "configs" / "tiny" / "unsam_tiny_prompt.yaml"
R50 = REPO / "configs" / "unsam_only_sa-1b_R50.yaml"


def _cfg(path=TINY, *opts):
    cfg = get_unsam_cfg()
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _sample(h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 5:30, 10:50], masks[1, 30:60, 40:90], masks[2, 8:20, 15:30] = True, True, True
    inst = Instances((h, w))
    inst.gt_classes, inst.gt_masks = torch.zeros(3, dtype=torch.int64), BitMasks(masks)
    inst.gt_levels = torch.tensor([0, 0, 1])
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    return {"image": image, "instances": inst}


@pytest.fixture(scope="module")
def prompt_model():
    torch.manual_seed(0)
    return build_train_model(_cfg(TINY_PROMPT))


# ---------------------------------------------------------------------------------------------
# boundaries
# ---------------------------------------------------------------------------------------------
def _unsam_imports(path: Path):
    """Absolute names of the ``unsam`` modules a file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module or ""


def test_modeling_imports_nothing_from_data_or_engine():
    files = sorted((REPO / "unsam" / "modeling").rglob("*.py"))
    assert len(files) > 5
    bad = [
        (f.name, m)
        for f in files
        for m in _unsam_imports(f)
        if m.startswith(("unsam.data", "unsam.engine"))
    ]
    assert bad == []


def test_task_names_live_in_a_leaf_module():
    leaf = REPO / "unsam" / "tasks.py"
    assert [m for m in _unsam_imports(leaf) if m.startswith("unsam")] == []
    assert WHOLE_TASK == "whole" and PROMPT_TASKS == ("point", "box", "mask")


def test_training_class_is_not_an_architecture():
    """Predictors and evaluation build MODEL.META_ARCHITECTURE: that stays the inference class;
    the trainer builds the training one."""
    assert META_ARCH_REGISTRY.get("UnSAM") is UnSAM and "UnSAMTrain" not in META_ARCH_REGISTRY
    assert type(build_model(_cfg())) is UnSAM
    assert type(Trainer.build_model(_cfg())) is UnSAMTrain


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY_PROMPT, R50])
def test_training_model_state_dict_is_the_inference_models(config):
    with torch.device("meta"):
        train = UnSAMTrain(_cfg(config)).state_dict()
        infer = UnSAM(_cfg(config)).state_dict()
    assert list(train) == list(infer)  # same keys, same order
    assert {k: (v.shape, v.dtype) for k, v in train.items()} == {
        k: (v.shape, v.dtype) for k, v in infer.items()
    }


def test_public_checkpoint_keys_load_into_the_training_model():
    ref_dir = next(
        (
            p
            for p in [
                Path(os.environ.get("UNSAM_SHARED", "/nonexistent")) / "reference",
                REPO.parent / "shared" / "reference",
            ]
            if p.is_dir()
        ),
        None,
    )
    if ref_dir is None:
        pytest.skip("shared reference files not found (set UNSAM_SHARED)")
    ref = json.loads((ref_dir / "unsam_m2f_r50_state_dict.json").read_text())
    with torch.device("meta"):
        got = UnSAMTrain(_cfg(R50)).state_dict()
    assert list(got) == list(ref["keys"])


def test_checkpoint_round_trip_between_training_and_inference_models(tmp_path):
    torch.manual_seed(3)
    train = build_train_model(_cfg(TINY_PROMPT))
    torch.save({"model": train.state_dict()}, tmp_path / "m.pth")
    torch.manual_seed(4)
    infer = build_model(_cfg(TINY_PROMPT))
    state = torch.load(tmp_path / "m.pth")["model"]
    assert not infer.load_state_dict(state, strict=True).missing_keys
    assert all(torch.equal(v, infer.state_dict()[k]) for k, v in state.items())
    back = build_train_model(_cfg(TINY_PROMPT))
    back.load_state_dict(infer.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------
# inference path
# ---------------------------------------------------------------------------------------------
def test_eval_mode_is_the_inference_model_bit_for_bit(prompt_model):
    infer = build_model(_cfg(TINY_PROMPT)).eval()
    infer.load_state_dict(prompt_model.state_dict())
    x = _sample(seed=5)
    batch = [{"image": x["image"], "height": 100, "width": 150}]
    with torch.no_grad():
        a = prompt_model.eval()(batch)[0]["instances"]
        b = infer(batch)[0]["instances"]
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_inference_model_refuses_to_train():
    model = build_model(_cfg()).train()
    with pytest.raises(RuntimeError, match="UnSAMTrain"):
        model([_sample()])


# ---------------------------------------------------------------------------------------------
# randomness: the model's generator, never the global RNG
# ---------------------------------------------------------------------------------------------
def test_task_choice_follows_ratio_and_weights(prompt_model):
    model = prompt_model
    model.generator = torch.Generator().manual_seed(0)
    weights = model.prompt_type_weights.tolist()
    ratio = model.prompt_task_ratio
    target = {"masks": torch.ones(1, 4, 4, dtype=torch.bool)}
    rng = torch.get_rng_state()
    counts = Counter(model.choose_tasks([{}] * 4000, [target] * 4000))
    assert torch.equal(rng, torch.get_rng_state())  # the global stream is untouched
    assert set(counts) <= {WHOLE_TASK, *PROMPT_TASKS}
    assert abs(counts[WHOLE_TASK] / 4000 - (1 - ratio)) < 0.03
    for task, w in zip(PROMPT_TASKS, weights):
        assert abs(counts[task] / 4000 - ratio * w) < 0.03, (task, counts)
    # the sampler's cell wins; an image without a mask trains "whole"
    empty = {"masks": torch.zeros(0, 4, 4, dtype=torch.bool)}
    assert model.choose_tasks([{"ats_task": "box"}, {"ats_task": "mask"}], [target, empty]) == [
        "box",
        WHOLE_TASK,
    ]
    with pytest.raises(ValueError, match="ats_task"):
        model.choose_tasks([{"ats_task": "scribble"}], [target])


@pytest.mark.parametrize("task", PROMPT_TASKS)
def test_prompts_come_from_the_generator_without_host_copies(prompt_model, task, monkeypatch):
    model = prompt_model
    x = _sample(seed=2)
    target = model.prepare_targets([x["instances"]], model.preprocess_image([x]))[0]

    def refuse(*args, **kwargs):
        raise AssertionError("prompt sampling copied a tensor to NumPy / the host")

    rng = torch.get_rng_state()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "numpy", refuse)
        m.setattr(torch.Tensor, "cpu", refuse)
        a, ta = model.sample_prompts(target, task, torch.Generator().manual_seed(1))
    b, tb = model.sample_prompts(target, task, torch.Generator().manual_seed(1))
    c, _ = model.sample_prompts(target, task, torch.Generator().manual_seed(2))
    assert torch.equal(rng, torch.get_rng_state())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(ta) == len(tb) == model.prompts_per_image
    assert all(torch.equal(u, v) for u, v in zip(ta, tb))
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    masks = target["masks"]
    if task == "point":
        for (px, py), t in zip(a["points"][:, 0].long().tolist(), ta):
            k = model.prompt_encoder.num_granularities
            assert len(t) == min(int(masks[:, py, px].sum()), k) >= 1
            assert all(bool(m[py, px]) for m in t)
    else:
        assert all(t.shape == (1, *masks.shape[-2:]) for t in ta)


def test_owned_generator_follows_the_process_seed(prompt_model):
    model = prompt_model
    model.generator = None
    torch.manual_seed(11)
    first = model.generator.initial_seed()
    model.generator = None
    torch.manual_seed(11)
    assert model.generator.initial_seed() == first != 11  # a stream of its own
    model.generator = None
    torch.manual_seed(12)
    assert model.generator.initial_seed() != first


def test_training_step_leaves_global_rng_to_the_criteria(prompt_model):
    """Besides the criteria (matcher / point sampling), a mixed prompt step draws nothing from
    the global stream: two steps from the same global state and generator seed are identical."""
    model = prompt_model.train()
    batch = [_sample(seed=1), _sample(seed=2)]
    out = []
    for _ in range(2):
        model.generator = torch.Generator().manual_seed(5)
        torch.manual_seed(0)
        with torch.no_grad():
            out.append({k: v.item() for k, v in model(batch).items()})
    assert out[0] == out[1]
    names = set(model.criterion.weight_dict) | set(model.prompt_criterion.loss_names())
    assert set(out[0]) == names
