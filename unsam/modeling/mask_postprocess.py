"""The whole-image post-processing shared by the model, the prompt selector and the SAM-style
generator: choosing the top (query, class) pairs, scoring a mask by its mean foreground
probability, resizing stride-4 logits to the output, binarizing kept masks at output size (with
their boxes), and reordering them in place.

``binarize_upsampled`` is detectron2's ``sem_seg_postprocess`` resize (bilinear to the padded
input size, crop to the image, bilinear to the output size) followed by ``> 0``. On CPU with the
compiled kernels (:mod:`unsam.ops`) the last resize and the threshold are one pass writing bool
straight into ``out`` and finding the boxes on the way: the same floats as ``F.interpolate``
(the kernel reproduces its fused multiply-adds). Elsewhere it is ``F.interpolate`` + ``gt`` +
:func:`masks_to_boxes`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import cpu_kernels

__all__ = [
    "binarize_upsampled",
    "foreground_scores",
    "masks_to_boxes",
    "permute_rows_",
    "topk_queries",
    "upsample_logits",
    "valid_extent",
]


def topk_queries(mask_cls: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask2Former's class-agnostic selection: the ``k`` (query, class) pairs of highest class
    probability. ``mask_cls``: (Q, K+1) logits (last = no object). Returns their probabilities
    (k,), query indices (k,) and class indices (k,), unsorted; ``k`` is capped at Q·K."""
    num_classes = mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls.float(), dim=-1)[:, :num_classes]  # (Q, K)
    labels = torch.arange(num_classes, device=mask_cls.device).repeat(mask_cls.shape[0])
    cls_scores, top = scores.flatten().topk(min(k, scores.numel()), sorted=False)
    return cls_scores, top // num_classes, labels[top]


def valid_extent(
    grid_hw: Tuple[int, int], image_size: Tuple[int, int], padded_size: Tuple[int, int]
) -> Tuple[int, int]:
    """(vh, vw): the part of an (h, w) stride-4 grid over the padded input (Hp, Wp) that covers
    the unpadded image (H, W) — rounded up, at most the grid."""
    sh, sw = grid_hw
    return (
        min(sh, -(-image_size[0] * sh // padded_size[0])),
        min(sw, -(-image_size[1] * sw // padded_size[1])),
    )


def foreground_scores(valid_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(n, vh, vw) mask logits over the image -> the mean sigmoid over each mask's foreground
    (logit > 0), the mask-quality factor of the whole-image score, (n,); and the foreground
    pixel counts (n,)."""
    fg = (valid_logits > 0).flatten(1)
    area = fg.sum(1)
    return (valid_logits.sigmoid().flatten(1) * fg).sum(1) / (area + 1e-6), area


def upsample_logits(
    logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Stride-4 logits (n, h, w) of the padded input -> float logits (n, H_out, W_out):
    detectron2's ``sem_seg_postprocess`` resize (bilinear to ``padded_size``, crop to
    ``image_size``, bilinear to ``output_size`` when given and different)."""
    up = F.interpolate(logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)
    up = up[0, :, : image_size[0], : image_size[1]]
    if output_size is not None and tuple(output_size) != tuple(image_size):
        up = F.interpolate(up[None], size=tuple(output_size), mode="bilinear", align_corners=False)
        up = up[0]
    return up


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
    boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3] = (
        x1.float(),
        y1.float(),
        x2.float(),
        y2.float(),
    )
    boxes[~nonempty] = 0
    return boxes


def binarize_upsampled(
    logits: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    out: torch.Tensor,
) -> torch.Tensor:
    """Stride-4 logits (n, h, w) of the padded input -> bool masks ``out`` (n, H_out, W_out).

    Resize to ``padded_size`` (Hp, Wp), crop to ``image_size`` (H, W), resize to ``output_size``
    when it differs, threshold at 0, into ``out`` (contiguous). Returns the masks' boxes (n, 4).
    """
    ops = cpu_kernels() if logits.device.type == "cpu" and out.is_contiguous() else None
    same_size = tuple(output_size) == tuple(image_size)
    if ops is not None and same_size:
        return ops.resize_threshold(logits.float(), padded_size[0], padded_size[1], out)
    if ops is not None:  # the kernel does the last resize
        up = upsample_logits(logits, padded_size, image_size)
        return ops.resize_threshold(up.contiguous(), output_size[0], output_size[1], out)
    torch.gt(upsample_logits(logits, padded_size, image_size, output_size), 0, out=out)
    return masks_to_boxes(out)


def permute_rows_(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``rows[:] = rows[order]`` in place, one row of scratch memory (follows the cycles).

    For the (k, H, W) mask stack, where ``rows[order]`` would briefly double its memory.
    """
    order_list = order.tolist()
    done = [False] * len(order_list)
    scratch = torch.empty_like(rows[0])
    for start in range(len(order_list)):
        if done[start] or order_list[start] == start:
            done[start] = True
            continue
        scratch.copy_(rows[start])
        i = start
        while True:
            done[i] = True
            src = order_list[i]
            if src == start:
                rows[i].copy_(scratch)
                break
            rows[i].copy_(rows[src])
            i = src
    return rows
