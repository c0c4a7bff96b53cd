"""The training model: :class:`UnSAMTrain`, the inference :class:`~unsam.modeling.UnSAM` plus
everything only training needs (SAM 2's ``SAM2Train(SAM2Base)`` pattern).

The inference model encodes, decodes and post-processes; this subclass adds, for a training
batch (``model.train()``):

* **task choice**: each image trains one task of :mod:`unsam.tasks` — the batched input's
  ``ats_task`` (the ATS sampler's cell) when given, else a prompt task with probability
  ``UNSAM.PROMPT.TASK_RATIO`` (type drawn by ``UNSAM.PROMPT.TYPE_WEIGHTS``), else ``whole``;
* **prompt sampling** from the GT (pseudo) masks (:mod:`unsam.data.prompts`' torch samplers, on
  the model's device);
* the **losses**: the whole-image set criterion (the inference model's ``criterion``, whose
  no-object weight the public checkpoints store) and the prompt criterion (stateless: built
  here, so the state_dict is the inference model's, key for key);
* **ViSA's semantic guidance**: its schedule (``visa``) and the iteration the trainer's
  :class:`~unsam.engine.hooks.VisaScheduleHook` sets before every step
  (:meth:`UnSAMTrain.set_visa_iteration`); ViSA's target transforms run on the batch before the
  model sees it (:mod:`unsam.data.visa_transforms`);
* what the **ATS** hook observes: the criteria's outputs carry ``batch_index`` (the batch
  element each image or prompt belongs to; see :class:`~unsam.engine.hooks.ATSFeedbackHook`);
* the **DDP keep-alive**: every loss key is always present and every parameter takes part in
  the graph, whatever tasks a rank's batch holds.

Randomness. Task choice and prompts are drawn from one ``torch.Generator`` on the model's
device (:attr:`UnSAMTrain.generator`): given by the caller, or owned — created at first use and
seeded from the process seed (``torch.initial_seed()``, which detectron2's ``default_setup``
sets to ``SEED + rank``) mixed with a fixed stream id, so it never consumes the global RNG
stream and differs per rank. This is a deliberate change of stream from the code before
issue 30, which drew the tasks from the global torch RNG and the prompts from a NumPy generator
seeded by it (after copying every image's masks to the host): with the same seed, prompt-task
batches now see other (equally distributed) prompts, and the global stream that the matcher and
the criteria's point sampling read is no longer advanced by the task choice. Whole-image
training with the prompt path off draws nothing here, so its losses are unchanged bit for bit.
The rules (which points, boxes and mask prompts are legal, and with which probabilities) are
those of the NumPy samplers; ``tests/test_train_model.py`` checks them.

Registry. :class:`UnSAMTrain` is not in detectron2's ``META_ARCH_REGISTRY``:
``MODEL.META_ARCHITECTURE`` names the architecture a checkpoint holds, which predictors and
evaluation build (``detectron2.modeling.build_model``), and a training wrapper is not one —
registered, a config could name it for inference. :func:`build_train_model` maps the
architecture to its training model (:data:`TRAIN_MODELS`); the trainer calls it.
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401  (before detectron2)

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import build_model
from detectron2.structures import ImageList, Instances
from torch import nn

from ..data.prompts import nested_targets, sample_boxes, sample_mask_prompts, sample_points
from ..modeling.criterion import PromptCriterion
from ..modeling.meta_arch import UnSAM
from ..modeling.prompt_encoder import MASK_INPUT_SIZE
from ..modeling.visa import VisaState
from ..tasks import PROMPT_TASKS, WHOLE_TASK
from ..utils.dist import mean_over_ranks

logger = logging.getLogger(__name__)

__all__ = ["UnSAMTrain", "TRAIN_MODELS", "build_train_model", "guidance_loss_from_outputs"]

# mixed into the process seed for the owned generator: its stream is not the global one
_GENERATOR_STREAM = 0x556E53414D  # "UnSAM"


class UnSAMTrain(UnSAM):
    """:class:`~unsam.modeling.UnSAM` that trains (see the module docstring).

    ``forward(batched_inputs)`` in training mode: the dicts of :class:`UnSAM` plus
    ``instances`` (``gt_classes`` int64, ``gt_masks`` BitMasks (N, H, W), optional
    ``gt_mask_weights`` float (N, H, W) passed to the criterion as ``mask_weights``, optional
    ``gt_levels`` / ``gt_parents``), optional ``ats_task`` (a task name) and ``visa_guidance``
    (ViSA's guidance features). Returns the weighted scalar losses. In eval mode it is the
    inference model.
    """

    @configurable
    def __init__(
        self,
        *,
        prompt_criterion: Optional[nn.Module] = None,
        prompt_task_ratio: float = 0.5,
        prompts_per_image: int = 16,
        box_jitter: float = 0.1,
        prompt_type_weights: Sequence[float] = (1.0, 1.0, 1.0),
        visa: Optional[VisaState] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        """``kwargs``: :class:`UnSAM`'s. Prompt training (unused when the prompt path is
        disabled): ``prompt_criterion`` (:class:`PromptCriterion`, required with the prompt
        path), ``prompt_task_ratio`` (share of images given a prompt task when the input has
        no ``ats_task``), ``prompts_per_image``, ``box_jitter``, ``prompt_type_weights`` (point,
        box, mask).

        ``visa``: ViSA's schedule (``UNSAM.VISA``; None: off). When its semantic guidance is on,
        training needs the iteration before every step: :meth:`set_visa_iteration`.
        ``generator``: the source of task and prompt randomness (on the model's device); None:
        an owned one (see the module docstring)."""
        super().__init__(**kwargs)
        if self.prompt_enabled:
            if prompt_criterion is None:
                raise ValueError("the prompt path needs a prompt_criterion to train")
            self.prompt_criterion = prompt_criterion
        else:
            self.prompt_criterion = None
        if not 0.0 <= prompt_task_ratio <= 1.0:
            raise ValueError(f"UNSAM.PROMPT.TASK_RATIO must be in [0, 1], got {prompt_task_ratio}")
        weights = [float(w) for w in prompt_type_weights]
        if len(weights) != len(PROMPT_TASKS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"UNSAM.PROMPT.TYPE_WEIGHTS must be 3 non-negative weights (point, "
                f"box, mask) with a positive sum, got {list(prompt_type_weights)}"
            )
        self.prompt_task_ratio = float(prompt_task_ratio)
        self.prompts_per_image = int(prompts_per_image)
        self.box_jitter = float(box_jitter)
        # a plain tensor, not a buffer: the state_dict stays the inference model's
        self.prompt_type_weights = torch.tensor(weights) / sum(weights)
        self.visa = visa if visa is not None else VisaState()
        self._visa_iteration: Optional[int] = None
        self._generator = generator

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        pc = cfg.UNSAM.PROMPT
        if pc.ENABLED:
            mf = cfg.MODEL.MASK_FORMER
            aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
            pw = {
                "loss_prompt_mask": mf.MASK_WEIGHT,
                "loss_prompt_dice": mf.DICE_WEIGHT,
                "loss_prompt_iou": pc.IOU_WEIGHT,
            }
            for i in range(aux):
                pw.update(
                    {
                        f"loss_prompt_mask_{i}": mf.MASK_WEIGHT,
                        f"loss_prompt_dice_{i}": mf.DICE_WEIGHT,
                    }
                )
            args.update(
                {
                    "prompt_criterion": PromptCriterion(
                        mf.TRAIN_NUM_POINTS,
                        mf.OVERSAMPLE_RATIO,
                        mf.IMPORTANCE_SAMPLE_RATIO,
                        pw,
                        num_aux=aux,
                    ),
                    "prompt_task_ratio": pc.TASK_RATIO,
                    "prompts_per_image": pc.PROMPTS_PER_IMAGE,
                    "box_jitter": pc.BOX_JITTER,
                    "prompt_type_weights": list(pc.TYPE_WEIGHTS),
                }
            )
        args["visa"] = VisaState.from_config(cfg)
        return args

    # ---------------------------------------------------------------------------------------
    # state set from outside
    # ---------------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator:
        """The generator of task choice and prompt sampling, on the model's device.

        An owned one is made at first use (and again if the model moved to another device),
        seeded from ``torch.initial_seed()`` and a fixed stream id."""
        gen = self._generator
        if gen is None or torch.device(gen.device) != torch.device(self.device):
            state = np.random.SeedSequence([torch.initial_seed(), _GENERATOR_STREAM])
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] % 2**63))
            self._generator = gen
        return gen

    @generator.setter
    def generator(self, generator: torch.Generator) -> None:
        self._generator = generator

    def set_visa_iteration(self, iteration: int) -> None:
        """The training iteration at which ViSA's guidance schedule is read in the next forward
        passes (the trainer's :class:`~unsam.engine.hooks.VisaScheduleHook` sets it before every
        step; it also seeds the guidance loss's point sampling)."""
        self._visa_iteration = int(iteration)

    # ---------------------------------------------------------------------------------------
    # training forward
    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        encoded = self.extract_features(images)
        if "instances" not in batched_inputs[0]:
            raise ValueError("training inputs need 'instances'")
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        targets = self.prepare_targets(gt, images)
        if self.prompt_enabled:
            losses = self._train_mixed(
                batched_inputs, encoded, targets, tuple(images.tensor.shape[-2:])
            )
        else:
            raw = self.criterion(self.decode(encoded), targets)
            weights = self.criterion.weight_dict
            losses = {k: v * weights[k] for k, v in raw.items() if k in weights}
        guidance = self._visa_guidance(encoded["mask_features"], batched_inputs, images)
        if guidance is not None:
            losses["loss_visa_guidance"] = guidance
        return losses

    def prepare_targets(
        self, targets: List[Instances], images: ImageList
    ) -> List[Dict[str, torch.Tensor]]:
        """Instances -> criterion targets, masks zero-padded to the padded batch size (Hp, Wp).

        Per image: ``labels`` (N,) int64, ``masks`` (N, Hp, Wp) bool, and when the instances carry
        ``gt_mask_weights``, ``mask_weights`` (N, Hp, Wp) float padded with 1 (padding is plain
        background, as in the unweighted path). ``gt_levels`` / ``gt_parents`` pass through as
        ``levels`` / ``parents``.
        """
        hp, wp = images.tensor.shape[-2:]
        out = []
        for inst in targets:
            gt_masks = inst.gt_masks
            m = gt_masks.tensor if hasattr(gt_masks, "tensor") else gt_masks
            padded = torch.zeros((m.shape[0], hp, wp), dtype=torch.bool, device=m.device)
            padded[:, : m.shape[1], : m.shape[2]] = m.bool()
            t = {"labels": inst.gt_classes.to(torch.int64), "masks": padded}
            if inst.has("gt_mask_weights"):
                w = inst.gt_mask_weights
                pw = torch.ones((w.shape[0], hp, wp), dtype=torch.float32, device=w.device)
                pw[:, : w.shape[1], : w.shape[2]] = w.float()
                t["mask_weights"] = pw
            if inst.has("gt_levels"):
                t["levels"] = inst.gt_levels
            if inst.has("gt_parents"):
                t["parents"] = inst.gt_parents
            out.append(t)
        return out

    def _visa_guidance(
        self, mask_features: torch.Tensor, batched_inputs: List[Dict], images: ImageList
    ) -> Optional[torch.Tensor]:
        """ViSA's semantic guidance loss, or None (ViSA or its guidance off: the plain path)."""
        if not self.visa.uses_guidance:
            return None
        if self._visa_iteration is None:
            raise RuntimeError(
                "UNSAM.VISA.GUIDANCE is on but the model was given no training "
                "iteration: call model.set_visa_iteration(it) before each step "
                "(the trainer's VisaScheduleHook does)"
            )
        return guidance_loss_from_outputs(
            mask_features, batched_inputs, self.visa, self._visa_iteration, images
        )

    # ---------------------------------------------------------------------------------------
    # mixed whole-image / prompt training
    # ---------------------------------------------------------------------------------------
    def choose_tasks(self, batched_inputs: List[Dict], targets: List[Dict]) -> List[str]:
        """Per image: the input's ``ats_task`` when given, else a prompt task with probability
        TASK_RATIO (type drawn by TYPE_WEIGHTS). Images without a target mask train "whole"."""
        gen, dev = self.generator, self.device
        b = len(batched_inputs)
        # drawn for every image in two calls: one small host read per batch, not one per image
        draws = torch.rand((b,), generator=gen, device=dev).tolist()
        kinds = torch.multinomial(
            self.prompt_type_weights.to(dev), b, replacement=True, generator=gen
        ).tolist()
        tasks = []
        for x, t, u, kind in zip(batched_inputs, targets, draws, kinds):
            task = x.get("ats_task")
            if task is None:
                task = PROMPT_TASKS[kind] if u < self.prompt_task_ratio else WHOLE_TASK
            elif task != WHOLE_TASK and task not in PROMPT_TASKS:
                raise ValueError(
                    f"unknown ats_task {task!r} (expected {WHOLE_TASK!r} or one of {PROMPT_TASKS})"
                )
            if task != WHOLE_TASK and t["masks"].shape[0] == 0:
                task = WHOLE_TASK  # no mask to draw a prompt from
            tasks.append(task)
        return tasks

    def sample_prompts(
        self,
        target: Dict[str, torch.Tensor],
        task: str,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
        """PROMPTS_PER_IMAGE prompts of type ``task`` drawn from one image's GT masks.

        A random mask (with replacement) gives a point inside it (targets: every mask containing
        the point, coarse → fine by level then area, at most K), a jittered box or a noisy
        low-res mask of the padded square (target: that mask). ``generator``: default
        :attr:`generator`. Returns the prompt dict for :meth:`decode_prompts` and the per-prompt
        target masks (T_i, Hp, Wp) bool.
        """
        gen = generator if generator is not None else self.generator
        masks = target["masks"]
        dev = masks.device
        n = self.prompts_per_image
        picks = torch.randint(0, masks.shape[0], (n,), generator=gen, device=dev)
        picked = masks[picks]
        if task == "point":
            points = sample_points(picked, gen)
            order = nested_targets(
                points,
                masks,
                target.get("levels"),
                max_targets=self.prompt_encoder.num_granularities,
            )
            tgts = [masks[o] for o in order]
            prompts = {
                "points": points[:, None],
                "labels": torch.ones((n, 1), dtype=torch.int64, device=dev),
            }
        elif task == "box":
            tgts = list(picked[:, None].unbind(0))
            prompts = {"boxes": sample_boxes(picked, gen, jitter=self.box_jitter)}
        elif task == "mask":
            hp, wp = masks.shape[-2:]
            side = max(hp, wp)
            square = torch.zeros((n, side, side), dtype=torch.bool, device=dev)
            square[:, :hp, :wp] = picked
            tgts = list(picked[:, None].unbind(0))
            prompts = {"mask_inputs": sample_mask_prompts(square, gen, low_res=MASK_INPUT_SIZE)}
        else:
            raise ValueError(f"not a prompt task: {task!r}")
        return prompts, tgts

    @staticmethod
    def _select(encoded: Dict[str, object], idx: List[int]) -> Dict[str, object]:
        """The decoder inputs of images ``idx`` of a batch."""
        if len(idx) == encoded["mask_features"].shape[0]:
            return encoded
        t = torch.as_tensor(idx, device=encoded["mask_features"].device)
        return {
            "mask_features": encoded["mask_features"][t],
            "multi_scale_features": [f[t] for f in encoded["multi_scale_features"]],
        }

    def _train_mixed(
        self,
        batched_inputs: List[Dict],
        encoded: Dict[str, object],
        targets: List[Dict],
        padded_hw: Tuple[int, int],
    ) -> Dict[str, torch.Tensor]:
        """Losses of a batch whose images each train one task. Every loss key is always present
        (zeros for tasks absent from the batch) and every parameter takes part in the graph, so
        metrics and DDP (find_unused_parameters=False) see the same thing on every rank."""
        tasks = self.choose_tasks(batched_inputs, targets)
        losses: Dict[str, torch.Tensor] = {}
        whole = [i for i, t in enumerate(tasks) if t == WHOLE_TASK]
        prompt_sets = {
            task: [
                (i, self.sample_prompts(targets[i], task)) for i, t in enumerate(tasks) if t == task
            ]
            for task in PROMPT_TASKS
        }
        # Loss normalisers are averaged over ranks with ONE collective that every rank runs: the
        # criteria's own all_reduce would run only on ranks whose batch has that task, and ranks
        # with different task mixes would then wait on each other forever.
        num_masks = sum(len(targets[i]["labels"]) for i in whole)
        num_prompts = sum(
            int(tg.shape[0] > 0)
            for sets in prompt_sets.values()
            for _, (_, tgts) in sets
            for tg in tgts
        )
        num_masks, num_prompts = mean_over_ranks([num_masks, num_prompts], self.device)
        if whole:
            outputs = self.decode(self._select(encoded, whole))
            outputs["batch_index"] = whole  # for the ATS hook: which batch element is which
            raw = self.criterion(
                outputs, [targets[i] for i in whole], num_masks=max(num_masks, 1.0)
            )
            losses.update(
                {
                    k: v * self.criterion.weight_dict[k]
                    for k, v in raw.items()
                    if k in self.criterion.weight_dict
                }
            )
        preds, ious, auxes, prompt_targets, batch_index = [], [], [], [], []
        for task in PROMPT_TASKS:
            sets = prompt_sets[task]
            if not sets:
                continue
            idx = [i for i, _ in sets]
            out = self.decode_prompts(
                self._select(encoded, idx), [p for _, (p, _) in sets], padded_hw
            )
            preds.append(out["pred_masks"].flatten(0, 1))
            ious.append(out["pred_iou"].flatten(0, 1))
            auxes.append([a.flatten(0, 1) for a in out.get("aux_masks", [])])
            for i, (_, tgts) in sets:
                prompt_targets += tgts
                batch_index += [i] * len(tgts)
        if preds:
            outputs = {
                "pred_masks": torch.cat(preds),
                "pred_iou": torch.cat(ious),
                "batch_index": batch_index,
            }
            if auxes[0]:
                outputs["aux_masks"] = [torch.cat(layer) for layer in zip(*auxes)]
            raw = self.prompt_criterion(outputs, prompt_targets, num_prompts=max(num_prompts, 1.0))
            wd = self.prompt_criterion.weight_dict
            losses.update({k: v * wd[k] for k, v in raw.items() if k in wd})
        # a zero that touches every parameter: unused branches still get (zero) gradients
        keepalive = sum(p.reshape(-1)[:1].sum() for p in self.parameters() if p.requires_grad) * 0.0
        for name in list(self.criterion.weight_dict) + self.prompt_criterion.loss_names():
            if name not in losses:
                losses[name] = keepalive.clone()
        first = next(iter(losses))
        losses[first] = losses[first] + keepalive
        return losses


def guidance_loss_from_outputs(
    mask_features: torch.Tensor,
    batched_inputs,
    visa_state: Optional[VisaState],
    iteration: int,
    images=None,
) -> Optional[torch.Tensor]:
    """ViSA semantic guidance loss for a training batch, or ``None`` when it does not apply.

    Args:
        mask_features: B×C×h×w pixel-decoder mask features of the *padded* batch.
        batched_inputs: the B input dicts; each needs ``visa_guidance`` (float D×h'×w' features
            of its augmented, unpadded image, see ``unsam.data.mapper``). Images without it are
            skipped.
        visa_state: the :class:`~unsam.modeling.visa.VisaState` (``None``: ViSA off).
        iteration: current training iteration (sets the schedule weight and seeds the point
            sampling, so the loss never consumes the global RNG and a resumed run samples the
            same points).
        images: the model's ``ImageList`` (padded B×3×Hp×Wp tensor + ``image_sizes``); the
            padding is cropped from ``mask_features`` so both maps cover the same field of view.
            ``None``: the batch has no padding.
    Returns:
        schedule-weighted 0-dim loss (mean over the images that carry guidance), or ``None``
        when ViSA or its guidance part is inactive at ``iteration`` or no image has guidance.
    """
    if visa_state is None or visa_state.weights(iteration).guidance <= 0:
        return None
    fh, fw = mask_features.shape[-2:]
    if images is not None:
        pad_h, pad_w = images.tensor.shape[-2:]
    losses = []
    generator = torch.Generator(device=mask_features.device)
    generator.manual_seed(1_000_003 + int(iteration))
    for i, x in enumerate(batched_inputs):
        guide = x.get("visa_guidance") if isinstance(x, dict) else None
        if guide is None:
            continue
        feat = mask_features[i : i + 1]
        if images is not None:
            h, w = (int(v) for v in images.image_sizes[i])
            # the features sit at a fixed stride of the padded tensor: keep the unpadded part
            vh = min(fh, max(1, -(-h * fh // int(pad_h))))
            vw = min(fw, max(1, -(-w * fw // int(pad_w))))
            feat = feat[..., :vh, :vw]
        guide = torch.as_tensor(guide).to(device=feat.device, dtype=feat.dtype).unsqueeze(0)
        loss = visa_state.guidance_loss(feat, guide, iteration, generator=generator)
        if loss is not None:
            losses.append(loss)
    if not losses:
        return None
    return torch.stack(losses).mean()


# MODEL.META_ARCHITECTURE -> its training model
TRAIN_MODELS = {"UnSAM": UnSAMTrain}


def build_train_model(cfg) -> nn.Module:
    """The training model of ``cfg.MODEL.META_ARCHITECTURE`` on ``cfg.MODEL.DEVICE``.

    An architecture without an entry in :data:`TRAIN_MODELS` is built by detectron2's
    ``build_model``: it trains itself, as detectron2's meta-architectures do."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name not in TRAIN_MODELS:
        return build_model(cfg)
    model = TRAIN_MODELS[name](cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    logger.info("training model: %s", type(model).__name__)
    return model
