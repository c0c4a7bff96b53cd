"""Binarizing kept masks at output size, and reordering them in place.

``binarize_upsampled`` is detectron2's ``sem_seg_postprocess`` resize (bilinear to the padded
input size, crop to the image, bilinear to the output size) followed by ``> 0``. On CPU with the
compiled kernels (:mod:`unsam.ops`) the last resize and the threshold are one pass writing bool
straight into ``out``: the same floats as ``F.interpolate`` (exact at the usual stride-4 → padded
size step; rarely a 1-ulp difference at other ratios). Elsewhere it is ``F.interpolate`` + ``gt``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..ops import cpu_kernels

__all__ = ["binarize_upsampled", "permute_rows_"]


def binarize_upsampled(logits: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int],
                       output_size: Tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """Stride-4 logits (n, h, w) of the padded input -> bool masks ``out`` (n, H_out, W_out).

    Resize to ``padded_size`` (Hp, Wp), crop to ``image_size`` (H, W), resize to ``output_size``
    when it differs, threshold at 0. ``out`` must be contiguous; it is returned.
    """
    ops = cpu_kernels() if logits.device.type == "cpu" and out.is_contiguous() else None
    same_size = tuple(output_size) == tuple(image_size)
    if ops is not None and same_size:
        ops.resize_threshold(logits.float(), padded_size[0], padded_size[1], out)
        return out
    up = F.interpolate(logits[None].float(), size=padded_size, mode="bilinear", align_corners=False)
    up = up[0, :, :image_size[0], :image_size[1]]
    if same_size:
        torch.gt(up, 0, out=out)
    elif ops is not None:
        ops.resize_threshold(up.contiguous(), output_size[0], output_size[1], out)
    else:
        up = F.interpolate(up[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]
        torch.gt(up, 0, out=out)
    return out


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
