"""DINO ViT attention keys as dense features (:class:`DinoFeatures`), official checkpoints."""

import logging
import math
import os
from typing import Dict, Optional, Sequence

import cv2
import numpy as np
import torch

from .base import DenseFeatures, FeatureError, grid_size

logger = logging.getLogger(__name__)

DINO_ARCHS = {
    # short name -> timm architecture
    "vit_small_patch8": "vit_small_patch8_224",
    "vit_base_patch8": "vit_base_patch8_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "dino_vits8": "vit_small_patch8_224",
    "dino_vitb8": "vit_base_patch8_224",
    "dino_vitb16": "vit_base_patch16_224",
}
DEFAULT_DINO_ARCH = "vit_base_patch8_224"


def _strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_dino_state_dict(path_or_url: str, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Read an official DINO checkpoint (file or URL) → backbone state dict (on ``map_location``).

    Accepts a bare state dict, or one wrapped in ``"teacher"`` (preferred), ``"student"``,
    ``"model"`` or ``"state_dict"``, with ``module.`` / ``backbone.`` prefixes; the DINO head
    (``head.*``) is dropped. Raises :class:`FeatureError` naming the file when it is missing or
    not a checkpoint.
    """
    from ..checkpoint import WeightsError, read_pickled_weights

    local = _downloaded(path_or_url) if "://" in str(path_or_url) else str(path_or_url)
    if not os.path.isfile(local):
        raise FeatureError(f"DINO weights not found: {path_or_url}")
    try:  # the project's one weights reader: a file that would run code is refused
        ckpt = read_pickled_weights(local, what="--dino-weights")
    except WeightsError as e:
        raise FeatureError(str(e)) from None
    if not isinstance(ckpt, dict):
        raise FeatureError(f"{path_or_url}: expected a state dict, got {type(ckpt).__name__}")
    for key in ("teacher", "student", "model", "state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    state = _strip_prefixes({k: v.to(map_location) for k, v in ckpt.items() if torch.is_tensor(v)})
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _downloaded(url: str) -> str:
    """``url`` downloaded once into torch hub's checkpoint cache (where
    ``torch.hub.load_state_dict_from_url`` keeps it); the local path. Downloaded here and read by
    :func:`~unsam.checkpoint.read_pickled_weights`, since torch hub's loader unpickles in full."""
    from urllib.parse import urlparse

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as e:  # noqa: BLE001 — network errors, bad URLs, HTTP errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise FeatureError(
                f"cannot download DINO weights from {url}: {type(e).__name__}: {first}"
            ) from None
    return cached


def dino_pos_embed(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Position embeddings for a (gh, gw) patch grid, interpolated as the official DINO code does.

    ``pos_embed``: (1, 1 + n², C), class token first, trained on an n×n grid (n = 28 for
    224-px ViT/8). Returns (1, 1 + gh·gw, C). Unchanged when the grid is n×n; otherwise the patch
    part goes through bicubic interpolation (align_corners=False) driven by the *scale factors*
    ((gh + 0.1) / n, (gw + 0.1) / n) rather than by the output size. The 0.1 keeps
    floor(n · scale) on the wanted size despite float error; because the kernel maps output to
    input coordinates with the given scale, this samples slightly different points than a
    size-driven resize (timm's own resampling), which made our keys differ from the official
    model's by ~1e-3 at 256 px.
    """
    n_tokens = pos_embed.shape[1] - 1
    if gh * gw == n_tokens and gh == gw:
        return pos_embed
    n = math.sqrt(n_tokens)
    side = int(n)
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic", align_corners=False
    )
    if tuple(grid.shape[-2:]) != (gh, gw):
        raise FeatureError(
            f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(gh, gw)}"
        )
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat([pos_embed[:, :1], grid], 1)


class DinoFeatures(DenseFeatures):
    """Last-block attention keys of a DINO ViT → ``(h, w, C)`` with C = embed dim.

    ``arch``: a timm ViT name (``vit_small_patch8_224`` …) or a short alias from ``DINO_ARCHS``.
    ``weights``: checkpoint path/URL (required: random weights give meaningless masks).
    """

    name = "dino"
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(
        self,
        weights: Optional[str],
        arch: str = DEFAULT_DINO_ARCH,
        resolution: int = 480,
        device: str = "cpu",
        allow_random: bool = False,
    ):
        super().__init__(resolution)
        import timm

        arch = DINO_ARCHS.get(arch, arch)
        if arch not in DINO_ARCHS.values():
            raise FeatureError(
                f"unsupported DINO architecture '{arch}'; "
                f"choose one of {sorted(set(DINO_ARCHS.values()))}"
            )
        self.arch = arch
        self.device = torch.device(device)
        if not weights and not allow_random:
            raise FeatureError(
                "the dino backend needs --dino-weights PATH_OR_URL "
                "(an official DINO checkpoint); use --features classical offline"
            )
        # read the checkpoint first: a missing/unreadable file fails before the model is built
        state = load_dino_state_dict(weights) if weights else None
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        if state is not None:
            self._load(state, weights)
        self.model.eval().to(self.device)

    def _load(self, state: Dict[str, torch.Tensor], weights: str) -> None:
        own = self.model.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise FeatureError(
                f"{weights}: not a {self.arch} checkpoint; missing keys "
                f"{missing[:5]}{' …' if len(missing) > 5 else ''}"
            )
        bad = []
        for k, v in own.items():
            if k == "pos_embed":
                # position embeddings are interpolated at run time; only the width must match
                if state[k].shape[-1] != v.shape[-1]:
                    bad.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}")
            elif state[k].shape != v.shape:
                bad.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}")
        if bad:
            raise FeatureError(f"{weights}: shape mismatch for {self.arch}: " + "; ".join(bad[:4]))
        if state["pos_embed"].shape != own["pos_embed"].shape:
            state["pos_embed"] = self._resize_pos_embed(state["pos_embed"], own["pos_embed"].shape)
        self.model.load_state_dict({k: state[k] for k in own}, strict=True)
        logger.info("loaded DINO %s weights from %s", self.arch, weights)

    @staticmethod
    def _resize_pos_embed(pos: torch.Tensor, shape) -> torch.Tensor:
        """(1, 1+n², C) → (1, 1+m², C) by bicubic interpolation of the patch part."""
        cls, grid = pos[:, :1], pos[:, 1:]
        n = int(round(grid.shape[1] ** 0.5))
        m = int(round((shape[1] - 1) ** 0.5))
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, size=(m, m), mode="bicubic", align_corners=False
        )
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, m * m, -1)], 1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block attention keys of normalised images.

        ``x``: (B, 3, H, W) float, ImageNet-normalised, H and W multiples of the patch size p.
        Returns (B, H/p, W/p, C) raw keys (all heads concatenated, class token dropped).
        Only the network up to the last block's ``qkv`` projection is run.
        """
        m = self.model
        t = m.patch_embed(x.to(self.device))  # (B, gh, gw, C): timm's dynamic-size layout
        b, gh, gw, c = t.shape
        t = torch.cat([m.cls_token.expand(b, -1, -1), t.reshape(b, gh * gw, c)], 1)
        t = t + dino_pos_embed(m.pos_embed, gh, gw)
        t = m.norm_pre(m.patch_drop(t))
        for blk in m.blocks[:-1]:
            t = blk(t)
        last = m.blocks[-1]
        qkv = last.attn.qkv(last.norm1(t))  # (B, 1 + gh*gw, 3C), laid out as (3, heads, C/heads)
        return qkv[:, 1:, c : 2 * c].reshape(b, gh, gw, c)

    def _normalise(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 RGB → (B, 3, H, W) float32, ImageNet mean/std."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = (x - torch.tensor(self.MEAN)) / torch.tensor(self.STD)
        return x.permute(0, 3, 1, 2)

    def grid_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``images``: (B, H, W, 3) uint8 RGB, H and W multiples of the patch size, used as they
        are (no resizing) → float32 (B, H/p, W/p, C) raw keys, not normalised."""
        images = np.asarray(images)
        p = self.patch_size
        if images.ndim != 4 or images.shape[1] % p or images.shape[2] % p:
            raise FeatureError(
                f"images must be (B, H, W, 3) with H, W multiples of {p}; got {images.shape}"
            )
        return self.keys(self._normalise(images)).float().cpu().numpy()

    def __call__(self, image: np.ndarray, resolution: Optional[int] = None) -> np.ndarray:
        """``image``: H×W×3 uint8 RGB, resized (bicubic) so that its long side is about
        ``resolution`` → float32 ``(h, w, C)`` L2-normalised attention keys."""
        res = int(resolution or self.resolution)
        p = self.patch_size
        gh, gw = grid_size(image.shape[0], image.shape[1], res, p)
        img = cv2.resize(image, (gw * p, gh * p), interpolation=cv2.INTER_CUBIC)
        keys = self.keys(self._normalise(img[None]))[0]
        return torch.nn.functional.normalize(keys.float(), dim=-1).cpu().numpy()
