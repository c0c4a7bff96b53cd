"""``UnSAM`` meta-architecture: backbone -> pixel decoder -> masked-attention query decoder.

State-dict layout (``backbone.*``, ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``,
``criterion.empty_weight``) is that of the public UnSAM Mask2Former checkpoints.

Inference is class-agnostic instance segmentation with bounded memory: mask logits stay at
stride 4, the top-k queries are chosen there, and only the kept masks are upsampled to the
output size, ``MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK`` at a time.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import Boxes, ImageList, Instances

from .criterion import SetCriterion
from .matcher import HungarianMatcher

logger = logging.getLogger(__name__)

__all__ = ["UnSAM", "masks_to_boxes"]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float XYXY boxes (x1, y1 inclusive, x2, y2 exclusive, like
    detectron2's ``BitMasks.get_bounding_boxes``); empty masks give all zeros."""
    n, h, w = masks.shape
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    # uint8 max-reductions are several times faster than bool any() on CPU
    m8 = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows = m8.amax(dim=2)  # (N, H)
    cols = m8.amax(dim=1)  # (N, W)
    nonempty = rows.amax(dim=1) > 0
    # argmax returns the first maximal index: first True from the front / from the back
    y1 = rows.argmax(dim=1)
    y2 = h - rows.flip(1).argmax(dim=1)
    x1 = cols.argmax(dim=1)
    x2 = w - cols.flip(1).argmax(dim=1)
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = x1.float(), y1.float(), x2.float(), y2.float()
    boxes[~nonempty] = 0
    return boxes


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
                 overlap_threshold: float = 0.8):
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
                                 importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO)
        return {
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
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

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

    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]):
        images = self.preprocess_image(batched_inputs)
        encoded = self.extract_features(images)
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("training inputs need 'instances'")
            outputs = self.decode(encoded)
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            targets = self.prepare_targets(gt, images)
            losses = self.criterion(outputs, targets)
            weights = self.criterion.weight_dict
            return {k: v * weights[k] for k, v in losses.items() if k in weights}
        # final-layer masks are computed later, only for the kept queries
        outputs = self.decode(encoded, final_masks=False)
        mask_features = encoded["mask_features"]
        del encoded  # backbone / multi-scale features are not needed past this point
        return self.postprocess(outputs, batched_inputs, images, mask_features)

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
        foreground. Unlike Mask2Former that mean is taken at stride 4 (over the unpadded area),
        so masks are upsampled once, already in score order, ``upsample_chunk`` at a time, and
        no (Q, H, W) tensor is ever materialized.
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
        mask_scores = torch.empty(k, device=mask_cls.device)
        chunk = self.upsample_chunk
        for s in range(0, k, chunk):
            m = self._mask_logits(mask_source, query_idx[s:s + chunk], vh, vw)
            fg = (m > 0).flatten(1)
            mask_scores[s:s + chunk] = (m.sigmoid().flatten(1) * fg).sum(1) / (fg.sum(1) + 1e-6)
        final = cls_scores * mask_scores
        final, order = final.sort(descending=True)
        labels = labels[order]
        query_idx = query_idx[order]

        h_out, w_out = output_size
        pred_masks = torch.empty((k, h_out, w_out), dtype=torch.bool, device=mask_cls.device)
        boxes = torch.empty((k, 4), dtype=torch.float32, device=mask_cls.device)
        for s in range(0, k, chunk):
            m = self._mask_logits(mask_source, query_idx[s:s + chunk], sh, sw)[None]
            # same two-step resize as detectron2's sem_seg_postprocess: padded input size, crop, output size
            up = F.interpolate(m, size=padded_size, mode="bilinear", align_corners=False)
            up = up[:, :, :image_size[0], :image_size[1]]
            if (h_out, w_out) != tuple(image_size):
                up = F.interpolate(up, size=(h_out, w_out), mode="bilinear", align_corners=False)
            binary = pred_masks[s:s + chunk]
            torch.gt(up[0], 0, out=binary)  # written in place: no temporary bool chunk
            boxes[s:s + chunk] = masks_to_boxes(binary)
            del up, m
        result = Instances((h_out, w_out))
        result.pred_masks = pred_masks
        result.pred_boxes = Boxes(boxes)
        result.scores = final
        result.pred_classes = labels
        return result
