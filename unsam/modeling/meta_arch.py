"""``UnSAM`` meta-architecture: backbone -> pixel decoder -> masked-attention query decoder.

State-dict layout (``backbone.*``, ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``,
``criterion.empty_weight``) is that of the public UnSAM Mask2Former checkpoints.

Inference is class-agnostic instance segmentation with bounded memory: mask logits stay at
stride 4, the top-k queries are chosen there, and only the kept masks are upsampled to the
output size, ``MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK`` at a time.

Prompt path (``UNSAM.PROMPT.ENABLED``): ``prompt_encoder.*`` (points / boxes / masks → query
groups, :mod:`.prompt_encoder`) and ``iou_head.*`` are added; their K granularity queries per
prompt run through the same masked-attention decoder (:meth:`UnSAM.decode_prompts`). Training
mixes whole-image and prompt tasks per image (``UNSAM.PROMPT.TASK_RATIO`` or the batched input's
``ats_task``); prompts are sampled from the GT (pseudo) masks inside :meth:`UnSAM.forward`. With
the prompt path disabled, nothing of it is built and the state_dict is the public one.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import Boxes, ImageList, Instances

from ..data.prompts import PROMPT_TASKS, WHOLE_TASK
from .criterion import PromptCriterion, SetCriterion
from .mask_postprocess import binarize_upsampled, permute_rows_
from .matcher import HungarianMatcher
from .prompt_encoder import MASK_INPUT_SIZE, UnSAMPromptEncoder
from .visa import VisaState, guidance_loss_from_outputs
from .transformer_decoder import MLP

logger = logging.getLogger(__name__)

__all__ = ["UnSAM"]


def _mean_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """``values`` averaged over the processes of the default group (themselves without one)."""
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


@META_ARCH_REGISTRY.register()
class UnSAM(nn.Module):
    """Mask2Former-style whole-image segmenter.

    ``forward(batched_inputs)``: list of dicts with ``image`` (uint8 (3, H, W), format
    ``INPUT.FORMAT``), optional ``height``/``width`` (output size) and, in training,
    ``instances`` (``gt_classes`` int64, ``gt_masks`` BitMasks (N, H, W), optional
    ``gt_mask_weights`` float (N, H, W) passed to the criterion as ``mask_weights``).
    Training returns weighted scalar losses; inference returns ``[{"instances": Instances}]``.
    """

    @configurable
    def __init__(self, *, backbone: Backbone, sem_seg_head: nn.Module, criterion: nn.Module, num_queries: int,
                 size_divisibility: int, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 test_topk_per_image: int, upsample_chunk: int = 64, object_mask_threshold: float = 0.8,
                 overlap_threshold: float = 0.8, prompt_encoder: Optional[nn.Module] = None,
                 iou_head: Optional[nn.Module] = None, prompt_criterion: Optional[nn.Module] = None,
                 prompt_task_ratio: float = 0.5, prompts_per_image: int = 16, box_jitter: float = 0.1,
                 prompt_type_weights: Sequence[float] = (1.0, 1.0, 1.0), visa: Optional[VisaState] = None):
        """Prompt arguments (all None/unused when the prompt path is disabled): ``prompt_encoder``
        (:class:`UnSAMPromptEncoder`), ``iou_head`` (hidden → 1 MLP), ``prompt_criterion``
        (:class:`PromptCriterion`), ``prompt_task_ratio`` (share of training images given a
        prompt task when the input has no ``ats_task``), ``prompts_per_image``, ``box_jitter``,
        ``prompt_type_weights`` (point, box, mask).

        ``visa``: ViSA's schedule (``UNSAM.VISA``; None: off). When its semantic guidance is on,
        training needs the iteration before every step: :meth:`set_visa_iteration`."""
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        if size_divisibility < 0:
            size_divisibility = self.backbone.size_divisibility
        self.size_divisibility = size_divisibility
        # not persistent: the public checkpoints do not store them
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.test_topk_per_image = test_topk_per_image
        self.upsample_chunk = max(1, int(upsample_chunk))
        # prompt path: registered only when enabled, so the whole-image state_dict is unchanged
        if prompt_encoder is not None:
            if iou_head is None or prompt_criterion is None:
                raise ValueError("the prompt path needs prompt_encoder, iou_head and prompt_criterion")
            self.prompt_encoder = prompt_encoder
            self.iou_head = iou_head
            self.prompt_criterion = prompt_criterion
        else:
            self.prompt_encoder = self.iou_head = self.prompt_criterion = None
        if not 0.0 <= prompt_task_ratio <= 1.0:
            raise ValueError(f"UNSAM.PROMPT.TASK_RATIO must be in [0, 1], got {prompt_task_ratio}")
        weights = [float(w) for w in prompt_type_weights]
        if len(weights) != len(PROMPT_TASKS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"UNSAM.PROMPT.TYPE_WEIGHTS must be 3 non-negative weights (point, box, mask) "
                             f"with a positive sum, got {list(prompt_type_weights)}")
        self.prompt_task_ratio = float(prompt_task_ratio)
        self.prompts_per_image = int(prompts_per_image)
        self.box_jitter = float(box_jitter)
        self.prompt_type_weights = torch.tensor(weights) / sum(weights)
        self.visa = visa if visa is not None else VisaState()
        self._visa_iteration: Optional[int] = None

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        if mf.TEST.SEMANTIC_ON or mf.TEST.PANOPTIC_ON or not mf.TEST.INSTANCE_ON:
            raise ValueError("UnSAM supports instance inference only: set MODEL.MASK_FORMER.TEST.INSTANCE_ON True "
                             "and SEMANTIC_ON / PANOPTIC_ON False")
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT, cost_dice=mf.DICE_WEIGHT,
                                   num_points=mf.TRAIN_NUM_POINTS)
        weight_dict = {"loss_ce": mf.CLASS_WEIGHT, "loss_mask": mf.MASK_WEIGHT, "loss_dice": mf.DICE_WEIGHT}
        if mf.DEEP_SUPERVISION:
            base = dict(weight_dict)
            for i in range(mf.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        criterion = SetCriterion(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher=matcher, weight_dict=weight_dict,
                                 eos_coef=mf.NO_OBJECT_WEIGHT, losses=["labels", "masks"],
                                 num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
                                 importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
                                 use_drop_losses=cfg.SOLVER.USE_DROP_LOSSES,
                                 droploss_iou_thresh=cfg.SOLVER.DROPLOSS_IOU_THRESH)
        prompt_args = {}
        pc = cfg.UNSAM.PROMPT
        if pc.ENABLED:
            hidden = mf.HIDDEN_DIM
            k = pc.NUM_GRANULARITIES
            aux = mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0
            pw = {"loss_prompt_mask": mf.MASK_WEIGHT, "loss_prompt_dice": mf.DICE_WEIGHT,
                  "loss_prompt_iou": pc.IOU_WEIGHT}
            for i in range(aux):
                pw.update({f"loss_prompt_mask_{i}": mf.MASK_WEIGHT, f"loss_prompt_dice_{i}": mf.DICE_WEIGHT})
            prompt_args = {
                "prompt_encoder": UnSAMPromptEncoder(hidden, cfg.MODEL.SEM_SEG_HEAD.MASK_DIM, k, cfg.INPUT.IMAGE_SIZE,
                                                     mask_in_chans=pc.MASK_IN_CHANS),
                "iou_head": MLP(hidden, hidden, 1, 3),
                "prompt_criterion": PromptCriterion(mf.TRAIN_NUM_POINTS, mf.OVERSAMPLE_RATIO,
                                                    mf.IMPORTANCE_SAMPLE_RATIO, pw, num_aux=aux),
                "prompt_task_ratio": pc.TASK_RATIO,
                "prompts_per_image": pc.PROMPTS_PER_IMAGE,
                "box_jitter": pc.BOX_JITTER,
                "prompt_type_weights": list(pc.TYPE_WEIGHTS),
            }
        return {
            **prompt_args,
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "upsample_chunk": mf.TEST.get("UPSAMPLE_CHUNK", 64),
            "visa": VisaState.from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def set_visa_iteration(self, iteration: int) -> None:
        """The training iteration at which ViSA's guidance schedule is read in the next forward
        passes (the trainer's :class:`~unsam.engine.hooks.VisaScheduleHook` sets it before every
        step; it also seeds the guidance loss's point sampling)."""
        self._visa_iteration = int(iteration)

    def _visa_guidance(self, mask_features: torch.Tensor, batched_inputs: List[Dict],
                       images: ImageList) -> Optional[torch.Tensor]:
        """ViSA's semantic guidance loss, or None (ViSA or its guidance off: the plain path)."""
        if not self.visa.uses_guidance:
            return None
        if self._visa_iteration is None:
            raise RuntimeError("UNSAM.VISA.GUIDANCE is on but the model was given no training iteration: "
                               "call model.set_visa_iteration(it) before each step (the trainer's "
                               "VisaScheduleHook does)")
        return guidance_loss_from_outputs(mask_features, batched_inputs, self.visa, self._visa_iteration, images)

    # ---------------------------------------------------------------------------------------
    # building blocks (also used by predictors that encode once and decode many times)
    # ---------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the images of ``batched_inputs`` -> ImageList (B, 3, Hp, Wp) float."""
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def extract_features(self, images) -> Dict[str, object]:
        """Backbone + pixel decoder, run once per image batch.

        Args:
            images: ImageList, or a normalized padded tensor (B, 3, Hp, Wp).
        Returns:
            {"backbone": {"res2".."res5"}, "mask_features": (B, mask_dim, Hp/4, Wp/4),
             "multi_scale_features": 3 maps (B, conv_dim, ·, ·) coarse to fine,
             "encoder_features": (B, conv_dim, Hp/32, Wp/32)}.
        """
        tensor = images.tensor if isinstance(images, ImageList) else images
        feats = self.backbone(tensor)
        encoded = self.sem_seg_head.encode(feats)
        encoded["backbone"] = feats
        return encoded

    def decode(self, encoded: Dict[str, object], **decoder_kwargs) -> Dict[str, object]:
        """Query decoder on :meth:`extract_features` output. kwargs (``extra_queries``,
        ``use_learned_queries``, ``self_attn_allowed``, ``return_aux``) go to
        :class:`~unsam.modeling.transformer_decoder.MultiScaleMaskedTransformerDecoder`."""
        return self.sem_seg_head.decode(encoded, **decoder_kwargs)

    @property
    def prompt_enabled(self) -> bool:
        return self.prompt_encoder is not None

    def decode_prompts(self, encoded: Dict[str, object], prompts: List[Dict[str, Optional[torch.Tensor]]],
                       padded_hw: Tuple[int, int], *, return_aux: Optional[bool] = None,
                       final_masks: bool = True) -> Dict[str, object]:
        """Decode P prompts per image through the masked-attention decoder.

        Args:
            encoded: :meth:`extract_features` output for B images.
            prompts: B dicts with the same keys and shapes for every image: ``points`` (P, N, 2)
                (x, y) pixels of the padded input, ``labels`` (P, N) (1 / 0 / -1 ignored),
                ``boxes`` (P, 4) XYXY pixels, ``mask_inputs`` (P, 1, 256, 256) logits (SAM's
                low-res frame of the padded square); absent keys / None = not given.
            padded_hw: (Hp, Wp) of the padded input.
            final_masks: False computes the K masks from the mask embeddings (skips the mask
                logits of the prompt tokens, which are never returned).
        Returns:
            ``pred_masks`` (B, P, K, Hp/4, Wp/4) logits, ``pred_iou`` (B, P, K) in [0, 1] and, with
            ``return_aux``, ``aux_masks``: one (B, P, K, h, w) per earlier decoder layer.
        """
        if not self.prompt_enabled:
            raise RuntimeError("the prompt path is disabled: set UNSAM.PROMPT.ENABLED True")
        mask_features = encoded["mask_features"]
        b = mask_features.shape[0]
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompt sets for {b} images")
        groups = [self.prompt_encoder(mask_features[i], padded_hw, **prompts[i]) for i in range(b)]
        sizes = {(g["feat"].shape[0], g["group_size"]) for g in groups}
        if len(sizes) != 1:
            raise ValueError("every image of a decode_prompts call needs the same number and kind of prompts")
        q, gsize = sizes.pop()
        k = groups[0]["num_granularities"]
        p = q // gsize
        feat = torch.stack([g["feat"] for g in groups])
        pos = torch.stack([g["pos"] for g in groups])
        allowed = groups[0]["allowed"][None].expand(b, -1, -1)
        out = self.decode(encoded, extra_queries=(feat, pos), use_learned_queries=False, self_attn_allowed=allowed,
                          return_aux=return_aux, final_masks=final_masks)
        gidx = (torch.arange(p, device=feat.device)[:, None] * gsize
                + torch.arange(k, device=feat.device)[None]).flatten()  # the K granularity queries
        h, w = mask_features.shape[-2:]
        iou = self.iou_head(out["pred_embeddings"][:, gidx]).sigmoid().view(b, p, k)
        if "pred_masks" in out:
            masks = out["pred_masks"][:, gidx]
        else:
            masks = torch.einsum("bqc,bchw->bqhw", out["pred_mask_embeds"][:, gidx], mask_features)
        result = {"pred_masks": masks.reshape(b, p, k, h, w), "pred_iou": iou}
        if "aux_outputs" in out:
            result["aux_masks"] = [a["pred_masks"][:, gidx].reshape(b, p, k, h, w) for a in out["aux_outputs"]]
        return result

    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        encoded = self.extract_features(images)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("training inputs need 'instances'")
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            targets = self.prepare_targets(gt, images)
            if self.prompt_enabled:
                losses = self._train_mixed(batched_inputs, encoded, targets, tuple(images.tensor.shape[-2:]))
            else:
                raw = self.criterion(self.decode(encoded), targets)
                weights = self.criterion.weight_dict
                losses = {k: v * weights[k] for k, v in raw.items() if k in weights}
            guidance = self._visa_guidance(encoded["mask_features"], batched_inputs, images)
            if guidance is not None:
                losses["loss_visa_guidance"] = guidance
            return losses
        # final-layer masks are computed later, only for the kept queries
        outputs = self.decode(encoded, final_masks=False)
        mask_features = encoded["mask_features"]
        del encoded  # backbone / multi-scale features are not needed past this point
        return self.postprocess(outputs, batched_inputs, images, mask_features)

    # ---------------------------------------------------------------------------------------
    # mixed whole-image / prompt training
    # ---------------------------------------------------------------------------------------
    def _choose_tasks(self, batched_inputs: List[Dict], targets: List[Dict]) -> List[str]:
        """Per image: the input's ``ats_task`` when given, else a prompt task with probability
        TASK_RATIO (type drawn by TYPE_WEIGHTS). Images without a target mask train "whole"."""
        tasks = []
        for x, t in zip(batched_inputs, targets):
            task = x.get("ats_task")
            if task is None:
                if float(torch.rand(())) < self.prompt_task_ratio:
                    task = PROMPT_TASKS[int(torch.multinomial(self.prompt_type_weights, 1))]
                else:
                    task = WHOLE_TASK
            elif task != WHOLE_TASK and task not in PROMPT_TASKS:
                raise ValueError(f"unknown ats_task {task!r} (expected 'whole', 'point', 'box' or 'mask')")
            if task != WHOLE_TASK and t["masks"].shape[0] == 0:
                task = WHOLE_TASK  # no mask to draw a prompt from
            tasks.append(task)
        return tasks

    def sample_prompts(self, target: Dict[str, torch.Tensor], task: str, rng: np.random.Generator
                       ) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor]]:
        """PROMPTS_PER_IMAGE prompts of type ``task`` drawn from one image's GT masks.

        A random mask (with replacement) gives a point inside it (targets: every mask containing
        the point, coarse → fine by level then area, at most K), a jittered box or a noisy low-res
        mask (target: that mask). Returns the prompt dict for :meth:`decode_prompts` and the
        per-prompt target masks (T_i, Hp, Wp) bool.
        """
        from ..data.prompts import nested_targets, sample_box, sample_mask_prompt, sample_point

        masks = target["masks"]
        masks_np = masks.cpu().numpy()
        levels = target.get("levels")
        levels_np = levels.cpu().numpy() if levels is not None else np.zeros(len(masks_np), np.int64)
        k = self.prompt_encoder.num_granularities
        n = self.prompts_per_image
        picks = rng.integers(0, len(masks_np), n)
        hp, wp = masks_np.shape[-2:]
        side = max(hp, wp)
        dev = masks.device
        tgts: List[torch.Tensor] = []
        if task == "point":
            pts = np.zeros((n, 1, 2), np.float32)
            for j, i in enumerate(picks):
                pt = sample_point(masks_np[i], rng)
                pts[j, 0] = pt
                # only masks containing the pixel can be nested targets: test those alone
                cand = np.nonzero(masks_np[:, int(pt[1]), int(pt[0])])[0]
                order = nested_targets(pt, masks_np[cand], levels_np[cand])
                tgts.append(masks[torch.as_tensor(cand[order][:k], device=dev)])
            prompts = {"points": torch.from_numpy(pts).to(dev),
                       "labels": torch.ones((n, 1), dtype=torch.int64, device=dev)}
        elif task == "box":
            boxes = np.stack([sample_box(masks_np[i], rng, jitter=self.box_jitter) for i in picks])
            tgts = [masks[int(i)][None] for i in picks]
            prompts = {"boxes": torch.from_numpy(boxes).to(dev)}
        elif task == "mask":
            sq = np.zeros((side, side), bool)
            inputs = []
            for i in picks:
                sq[:hp, :wp] = masks_np[i]
                inputs.append(sample_mask_prompt(sq, rng, low_res=MASK_INPUT_SIZE))
            tgts = [masks[int(i)][None] for i in picks]
            prompts = {"mask_inputs": torch.from_numpy(np.stack(inputs)).to(dev)}
        else:
            raise ValueError(f"not a prompt task: {task!r}")
        return prompts, tgts

    @staticmethod
    def _select(encoded: Dict[str, object], idx: List[int]) -> Dict[str, object]:
        """The decoder inputs of images ``idx`` of a batch."""
        if len(idx) == encoded["mask_features"].shape[0]:
            return encoded
        t = torch.as_tensor(idx, device=encoded["mask_features"].device)
        return {"mask_features": encoded["mask_features"][t],
                "multi_scale_features": [f[t] for f in encoded["multi_scale_features"]]}

    def _train_mixed(self, batched_inputs: List[Dict], encoded: Dict[str, object], targets: List[Dict],
                     padded_hw: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Losses of a batch whose images each train one task. Every loss key is always present
        (zeros for tasks absent from the batch) and every parameter takes part in the graph, so
        metrics and DDP (find_unused_parameters=False) see the same thing on every rank."""
        tasks = self._choose_tasks(batched_inputs, targets)
        losses: Dict[str, torch.Tensor] = {}
        whole = [i for i, t in enumerate(tasks) if t == WHOLE_TASK]
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, ())))
        prompt_sets = {task: [(i, self.sample_prompts(targets[i], task, rng)) for i, t in enumerate(tasks) if t == task]
                       for task in PROMPT_TASKS}
        # Loss normalisers are averaged over ranks with ONE collective that every rank runs: the
        # criteria's own all_reduce would run only on ranks whose batch has that task, and ranks
        # with different task mixes would then wait on each other forever.
        num_masks = sum(len(targets[i]["labels"]) for i in whole)
        num_prompts = sum(int(tg.shape[0] > 0) for sets in prompt_sets.values() for _, (_, tgts) in sets for tg in tgts)
        num_masks, num_prompts = _mean_over_ranks([num_masks, num_prompts], self.device)
        if whole:
            outputs = self.decode(self._select(encoded, whole))
            outputs["batch_index"] = whole
            raw = self.criterion(outputs, [targets[i] for i in whole], num_masks=max(num_masks, 1.0))
            losses.update({k: v * self.criterion.weight_dict[k] for k, v in raw.items()
                           if k in self.criterion.weight_dict})
        preds, ious, auxes, prompt_targets, batch_index = [], [], [], [], []
        for task in PROMPT_TASKS:
            sets = prompt_sets[task]
            if not sets:
                continue
            idx = [i for i, _ in sets]
            out = self.decode_prompts(self._select(encoded, idx), [p for _, (p, _) in sets], padded_hw)
            preds.append(out["pred_masks"].flatten(0, 1))
            ious.append(out["pred_iou"].flatten(0, 1))
            auxes.append([a.flatten(0, 1) for a in out.get("aux_masks", [])])
            for i, (_, tgts) in sets:
                prompt_targets += tgts
                batch_index += [i] * len(tgts)
        if preds:
            outputs = {"pred_masks": torch.cat(preds), "pred_iou": torch.cat(ious), "batch_index": batch_index}
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

    def prepare_targets(self, targets: List[Instances], images: ImageList) -> List[Dict[str, torch.Tensor]]:
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
            padded[:, :m.shape[1], :m.shape[2]] = m.bool()
            t = {"labels": inst.gt_classes.to(torch.int64), "masks": padded}
            if inst.has("gt_mask_weights"):
                w = inst.gt_mask_weights
                pw = torch.ones((w.shape[0], hp, wp), dtype=torch.float32, device=w.device)
                pw[:, :w.shape[1], :w.shape[2]] = w.float()
                t["mask_weights"] = pw
            if inst.has("gt_levels"):
                t["levels"] = inst.gt_levels
            if inst.has("gt_parents"):
                t["parents"] = inst.gt_parents
            out.append(t)
        return out

    # ---------------------------------------------------------------------------------------
    # inference
    # ---------------------------------------------------------------------------------------
    def postprocess(self, outputs: Dict[str, object], batched_inputs: List[Dict], images: ImageList,
                    mask_features: Optional[torch.Tensor] = None) -> List[Dict[str, Instances]]:
        """Decoder outputs -> ``[{"instances": Instances}]``.

        Mask logits come from ``outputs["pred_masks"]`` (B, Q, h, w) when present, else from
        ``outputs["pred_mask_embeds"]`` (B, Q, C) and ``mask_features`` (B, C, h, w), computed only
        for the kept queries.
        """
        mask_cls = outputs["pred_logits"]
        full = outputs.get("pred_masks")
        if full is None and mask_features is None:
            raise ValueError("postprocess needs outputs['pred_masks'] or mask_features")
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for i, (inp, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            if full is not None:
                mask_source = full[i]
            else:
                mask_source = (outputs["pred_mask_embeds"][i], mask_features[i])
            results.append({"instances": self.instance_inference(mask_cls[i], mask_source, image_size, padded_size,
                                                                 (int(height), int(width)))})
        return results

    @staticmethod
    def _mask_logits(mask_source, idx: torch.Tensor, vh: int, vw: int) -> torch.Tensor:
        """Stride-4 mask logits (len(idx), vh, vw) of queries ``idx`` (valid area only)."""
        if isinstance(mask_source, tuple):
            embeds, feats = mask_source
            return torch.einsum("qc,chw->qhw", embeds[idx].float(), feats[:, :vh, :vw].float())
        return mask_source[idx, :vh, :vw].float()

    @torch.no_grad()
    def instance_inference(self, mask_cls: torch.Tensor, mask_source, image_size: Tuple[int, int],
                           padded_size: Tuple[int, int], output_size: Tuple[int, int]) -> Instances:
        """Top-k class-agnostic instances of one image.

        Args:
            mask_cls: (Q, K+1) logits.
            mask_source: (Q, h, w) mask logits at stride 4 of the padded image, or a pair
                (mask embeddings (Q, C), mask features (C, h, w)) to compute them from.
            image_size: (H, W) of the unpadded network input; padded_size: (Hp, Wp);
            output_size: (H_out, W_out) of the returned masks.
        Returns:
            Instances with ``pred_masks`` (k, H_out, W_out) bool, ``scores`` (k,), ``pred_boxes``,
            ``pred_classes`` (k,) int64, sorted by score (descending).

        As Mask2Former: the k = DETECTIONS_PER_IMAGE (query, class) pairs with the highest class
        probability are kept and their score multiplied by the mean sigmoid over the mask's
        foreground. Unlike Mask2Former that mean is taken at stride 4 (over the unpadded area), so
        each kept mask's logits are computed once, ``upsample_chunk`` at a time, scored and
        binarized at output size in the same pass; the rows are then put in score order in place.
        No (Q, H, W) or (k, H, W) float tensor is ever materialized.
        """
        num_classes = mask_cls.shape[-1] - 1
        scores = F.softmax(mask_cls.float(), dim=-1)[:, :num_classes]  # (Q, K)
        labels = torch.arange(num_classes, device=mask_cls.device).repeat(mask_cls.shape[0])
        k = min(self.test_topk_per_image, scores.numel())
        cls_scores, top = scores.flatten().topk(k, sorted=False)
        labels = labels[top]
        query_idx = top // num_classes
        sh, sw = mask_source[1].shape[-2:] if isinstance(mask_source, tuple) else mask_source.shape[-2:]
        # valid (unpadded) part of the stride-4 logits
        vh = min(sh, -(-image_size[0] * sh // padded_size[0]))
        vw = min(sw, -(-image_size[1] * sw // padded_size[1]))
        h_out, w_out = output_size
        mask_scores = torch.empty(k, device=mask_cls.device)
        pred_masks = torch.empty((k, h_out, w_out), dtype=torch.bool, device=mask_cls.device)
        boxes = torch.empty((k, 4), dtype=torch.float32, device=mask_cls.device)
        chunk = self.upsample_chunk
        for s in range(0, k, chunk):
            m = self._mask_logits(mask_source, query_idx[s:s + chunk], sh, sw)
            valid = m[:, :vh, :vw]
            fg = (valid > 0).flatten(1)
            mask_scores[s:s + chunk] = (valid.sigmoid().flatten(1) * fg).sum(1) / (fg.sum(1) + 1e-6)
            boxes[s:s + chunk] = binarize_upsampled(m, padded_size, tuple(image_size), (h_out, w_out),
                                                    out=pred_masks[s:s + chunk])
            del m, valid
        final, order = (cls_scores * mask_scores).sort(descending=True)
        permute_rows_(pred_masks, order)
        boxes, labels = boxes[order], labels[order]
        result = Instances((h_out, w_out))
        result.pred_masks = pred_masks
        result.pred_boxes = Boxes(boxes)
        result.scores = final
        result.pred_classes = labels
        return result
