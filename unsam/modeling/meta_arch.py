"""``UnSAM`` meta-architecture: backbone -> pixel decoder -> masked-attention query decoder.

State-dict layout (``backbone.*``, ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``,
``criterion.empty_weight``) is that of the public UnSAM Mask2Former checkpoints.

Inference is class-agnostic instance segmentation with bounded memory: mask logits stay at
stride 4, the top-k queries are chosen there, and only the kept masks are upsampled to the
output size, ``MODEL.MASK_FORMER.TEST.UPSAMPLE_CHUNK`` at a time.

Prompt path (``UNSAM.PROMPT.ENABLED``): ``prompt_encoder.*`` (points / boxes / masks → query
groups, :mod:`.prompt_encoder`) and ``iou_head.*`` are added; their K granularity queries per
prompt run through the same masked-attention decoder (:meth:`UnSAM.decode_prompts`). With the
prompt path disabled, nothing of it is built and the state_dict is the public one.

This is the inference model (SAM 2's ``SAM2Base``): training — task choice, prompt sampling,
ViSA's guidance, the losses, what the ATS hook observes — lives in the training subclass
:class:`unsam.engine.train_model.UnSAMTrain`, which the trainer builds. The set criterion is
built here all the same: its no-object weight (``criterion.empty_weight``) is part of the public
checkpoints' state_dict.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, build_sem_seg_head
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .criterion import SetCriterion
from .mask_postprocess import (
    binarize_upsampled,
    foreground_scores,
    permute_rows_,
    topk_queries,
    valid_extent,
)
from .matcher import HungarianMatcher
from .prompt_encoder import UnSAMPromptEncoder
from .transformer_decoder import MLP

logger = logging.getLogger(__name__)

__all__ = ["UnSAM"]


@META_ARCH_REGISTRY.register()
class UnSAM(nn.Module):
    """Mask2Former-style whole-image segmenter.

    ``forward(batched_inputs)`` (inference): list of dicts with ``image`` (uint8 (3, H, W),
    format ``INPUT.FORMAT``) and optional ``height``/``width`` (output size) ->
    ``[{"instances": Instances}]``. Training is :class:`unsam.engine.train_model.UnSAMTrain`'s.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        test_topk_per_image: int,
        upsample_chunk: int = 64,
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        prompt_encoder: Optional[nn.Module] = None,
        iou_head: Optional[nn.Module] = None,
    ):
        """``criterion``: the whole-image :class:`SetCriterion` (used by the training model).
        Prompt path (both None when it is disabled): ``prompt_encoder``
        (:class:`UnSAMPromptEncoder`), ``iou_head`` (hidden → 1 MLP)."""
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
        if (prompt_encoder is None) != (iou_head is None):
            raise ValueError("the prompt path needs both prompt_encoder and iou_head")
        self.prompt_encoder = prompt_encoder
        self.iou_head = iou_head

    @classmethod
    def from_config(cls, cfg):
        mf = cfg.MODEL.MASK_FORMER
        if mf.TEST.SEMANTIC_ON or mf.TEST.PANOPTIC_ON or not mf.TEST.INSTANCE_ON:
            raise ValueError(
                "UnSAM supports instance inference only: set MODEL.MASK_FORMER.TEST.INSTANCE_ON "
                "True and SEMANTIC_ON / PANOPTIC_ON False"
            )
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        weight_dict = {
            "loss_ce": mf.CLASS_WEIGHT,
            "loss_mask": mf.MASK_WEIGHT,
            "loss_dice": mf.DICE_WEIGHT,
        }
        if mf.DEEP_SUPERVISION:
            base = dict(weight_dict)
            for i in range(mf.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        criterion = SetCriterion(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
            use_drop_losses=cfg.SOLVER.USE_DROP_LOSSES,
            droploss_iou_thresh=cfg.SOLVER.DROPLOSS_IOU_THRESH,
        )
        prompt_args = {}
        pc = cfg.UNSAM.PROMPT
        if pc.ENABLED:
            hidden = mf.HIDDEN_DIM
            prompt_args = {
                "prompt_encoder": UnSAMPromptEncoder(
                    hidden,
                    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
                    pc.NUM_GRANULARITIES,
                    cfg.INPUT.IMAGE_SIZE,
                    mask_in_chans=pc.MASK_IN_CHANS,
                ),
                "iou_head": MLP(hidden, hidden, 1, 3),
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
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ---------------------------------------------------------------------------------------
    # building blocks (also used by predictors that encode once and decode many times)
    # ---------------------------------------------------------------------------------------
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalize and pad the images of ``batched_inputs`` -> ImageList (B, 3, Hp, Wp) float."""
        images = [
            (x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
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

    def decode_prompts(
        self,
        encoded: Dict[str, object],
        prompts: List[Dict[str, Optional[torch.Tensor]]],
        padded_hw: Tuple[int, int],
        *,
        return_aux: Optional[bool] = None,
        final_masks: bool = True,
    ) -> Dict[str, object]:
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
            raise ValueError(
                "every image of a decode_prompts call needs the same number and kind of prompts"
            )
        q, gsize = sizes.pop()
        k = groups[0]["num_granularities"]
        p = q // gsize
        feat = torch.stack([g["feat"] for g in groups])
        pos = torch.stack([g["pos"] for g in groups])
        allowed = groups[0]["allowed"][None].expand(b, -1, -1)
        out = self.decode(
            encoded,
            extra_queries=(feat, pos),
            use_learned_queries=False,
            self_attn_allowed=allowed,
            return_aux=return_aux,
            final_masks=final_masks,
        )
        gidx = (
            torch.arange(p, device=feat.device)[:, None] * gsize
            + torch.arange(k, device=feat.device)[None]
        ).flatten()  # the K granularity queries
        h, w = mask_features.shape[-2:]
        iou = self.iou_head(out["pred_embeddings"][:, gidx]).sigmoid().view(b, p, k)
        if "pred_masks" in out:
            masks = out["pred_masks"][:, gidx]
        else:
            masks = torch.einsum("bqc,bchw->bqhw", out["pred_mask_embeds"][:, gidx], mask_features)
        result = {"pred_masks": masks.reshape(b, p, k, h, w), "pred_iou": iou}
        if "aux_outputs" in out:
            result["aux_masks"] = [
                a["pred_masks"][:, gidx].reshape(b, p, k, h, w) for a in out["aux_outputs"]
            ]
        return result

    # ---------------------------------------------------------------------------------------
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.training:
            raise RuntimeError(
                "UnSAM is the inference model; train unsam.engine.train_model.UnSAMTrain "
                "(build_train_model(cfg), what the trainer builds)"
            )
        images = self.preprocess_image(batched_inputs)
        encoded = self.extract_features(images)
        # final-layer masks are computed later, only for the kept queries
        outputs = self.decode(encoded, final_masks=False)
        mask_features = encoded["mask_features"]
        del encoded  # backbone / multi-scale features are not needed past this point
        return self.postprocess(outputs, batched_inputs, images, mask_features)

    # ---------------------------------------------------------------------------------------
    # inference
    # ---------------------------------------------------------------------------------------
    def postprocess(
        self,
        outputs: Dict[str, object],
        batched_inputs: List[Dict],
        images: ImageList,
        mask_features: Optional[torch.Tensor] = None,
    ) -> List[Dict[str, Instances]]:
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
            results.append(
                {
                    "instances": self.instance_inference(
                        mask_cls[i], mask_source, image_size, padded_size, (int(height), int(width))
                    )
                }
            )
        return results

    @staticmethod
    def _mask_logits(mask_source, idx: torch.Tensor, vh: int, vw: int) -> torch.Tensor:
        """Stride-4 mask logits (len(idx), vh, vw) of queries ``idx`` (valid area only)."""
        if isinstance(mask_source, tuple):
            embeds, feats = mask_source
            return torch.einsum("qc,chw->qhw", embeds[idx].float(), feats[:, :vh, :vw].float())
        return mask_source[idx, :vh, :vw].float()

    @torch.no_grad()
    def instance_inference(
        self,
        mask_cls: torch.Tensor,
        mask_source,
        image_size: Tuple[int, int],
        padded_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ) -> Instances:
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
        cls_scores, query_idx, labels = topk_queries(mask_cls, self.test_topk_per_image)
        k = len(query_idx)
        sh, sw = (
            mask_source[1].shape[-2:] if isinstance(mask_source, tuple) else mask_source.shape[-2:]
        )
        # valid (unpadded) part of the stride-4 logits
        vh, vw = valid_extent((sh, sw), image_size, padded_size)
        h_out, w_out = output_size
        mask_scores = torch.empty(k, device=mask_cls.device)
        pred_masks = torch.empty((k, h_out, w_out), dtype=torch.bool, device=mask_cls.device)
        boxes = torch.empty((k, 4), dtype=torch.float32, device=mask_cls.device)
        chunk = self.upsample_chunk
        for s in range(0, k, chunk):
            m = self._mask_logits(mask_source, query_idx[s : s + chunk], sh, sw)
            mask_scores[s : s + chunk] = foreground_scores(m[:, :vh, :vw])[0]
            boxes[s : s + chunk] = binarize_upsampled(
                m, padded_size, tuple(image_size), (h_out, w_out), out=pred_masks[s : s + chunk]
            )
            del m
        final, order = (cls_scores * mask_scores).sort(descending=True)
        permute_rows_(pred_masks, order)
        boxes, labels = boxes[order], labels[order]
        result = Instances((h_out, w_out))
        result.pred_masks = pred_masks
        result.pred_boxes = Boxes(boxes)
        result.scores = final
        result.pred_classes = labels
        return result
