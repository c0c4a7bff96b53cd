"""The work behind the browser demo (:mod:`unsam.app`), with no user-interface code.

* :func:`load_photo` reads an upload with the project's one image reader, refuses what it cannot
  read or what is too large with one :class:`AppInputError` line, and bounds the work per upload
  by downscaling to ``max_side``; :func:`open_upload` also deletes a refused upload's temporary
  copy. What the browser is told names files by their base name only (:func:`public_message`).
* :class:`Segments` holds one image's masks as SA-1B annotations (COCO RLE, score, and for
  pseudo labels ``level`` / ``parent_id``), so a result stays small in memory however many masks
  it has; masks are decoded only for what is drawn.
* :class:`DemoModels` owns the predictors and the pseudo-label engine, shared by every browser
  session: ``everything`` (the whole-image model, or with no ``MODEL.WEIGHTS`` the training-free
  pseudo-label engine), ``pseudo_labels``, ``encode`` + ``prompt`` (``PromptPredictor``: the
  image is encoded once per upload, clicks only decode).
* :func:`render_everything`, :func:`render_hierarchy`, :func:`pick_mask` and
  :func:`render_prompt` turn results into the pictures and captions the page shows.
"""

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from PIL import Image

from .io.sa1b import mask_to_rle, rle_to_mask, write_sa1b_json
from .pseudo.classical import ClassicalSettings
from .pseudo.labelers import build_labeler
from .utils.images import UnsupportedImageError, read_rgb
from .visualize import distinct_colors, draw_masks, draw_outline, draw_prompts, line_width

logger = logging.getLogger(__name__)

# an upload with more pixels than this is refused before it is decoded (a 12000×8000 photo is
# 96 MP: ~290 MB as RGB, and Pillow's decompression-bomb limit is 89 MP)
MAX_INPUT_PIXELS = 80_000_000
# the most masks the Everything view draws; the whole-image model returns no more than this
MAX_SHOWN_MASKS = 200
# results kept per kind (whole image, pseudo labels), most recently used first; RLEs are small
CACHE_SIZE = 8
# outline of the selected mask in the hierarchy browser
SELECTED_COLOR = (255, 255, 255)


class AppInputError(ValueError):
    """An upload the demo cannot use; the message is one line, shown on the page."""


@dataclass
class Photo:
    """An uploaded image as the demo works on it."""

    image: np.ndarray  # H×W×3 uint8 RGB, long side at most max_side
    name: str  # file stem, for downloads
    key: str  # content hash: results are cached and the prompt encoder reused by it
    note: str = ""  # e.g. "downscaled from 4000×3000 to 1024×768"

    @property
    def size_text(self) -> str:
        return f"{self.image.shape[1]}×{self.image.shape[0]}"


# the folders of an absolute path ("/srv/tmp/gradio/ab12/"), not preceded by a word, a dot, a
# colon or a slash (so "w/o", "1/2", "./x" and URLs are left alone)
_DIRECTORIES = re.compile(r"(?<![\w.:/])/(?:[^/\s'\"]*/)+")


def public_message(text: str) -> str:
    """``text`` with every absolute path cut to its base name.

    Messages reach the browser user, who knows an upload by its own file name; the server's
    folders (Gradio's temp folder, the checkout, the user running it) are none of their business."""
    return _DIRECTORIES.sub("", text)


def _base_name(name) -> str:
    """The last component of ``name``, whichever separator the client used."""
    return re.split(r"[\\/]", str(name))[-1]


def load_photo(path, max_side: int, name: Optional[str] = None) -> Photo:
    """Read ``path`` (EXIF orientation, 16-bit scaled: :mod:`unsam.utils.images`) and shrink it so
    that its long side is at most ``max_side``. Raises :class:`AppInputError`, whose message names
    the file by its base name (``name``, the upload's original name, when given)."""
    label = _base_name(name) if name else Path(path).name
    try:
        with Image.open(path) as probe:  # the header only: refuse huge images before decoding
            width, height = probe.size
    except (OSError, ValueError) as e:
        raise AppInputError(
            f"cannot read '{label}' as an image ({_reason(e, path, label)})"
        ) from None
    if width * height > MAX_INPUT_PIXELS:
        raise AppInputError(
            f"'{label}' is {width}×{height} ({width * height / 1e6:.0f} MP): this demo accepts "
            f"up to {MAX_INPUT_PIXELS / 1e6:.0f} MP; downscale it first"
        )
    try:
        image = read_rgb(path)
    except (OSError, UnsupportedImageError, ValueError) as e:
        raise AppInputError(
            f"cannot read '{label}' as an image ({_reason(e, path, label)})"
        ) from None
    note = ""
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        note = f"downscaled from {w}×{h} to {size[0]}×{size[1]} (--max-side {max_side})"
    key = hashlib.sha1(
        np.ascontiguousarray(image).tobytes() + str(image.shape).encode()
    ).hexdigest()[:16]
    return Photo(np.ascontiguousarray(image), Path(label).stem, key, note)


def _reason(error: Exception, path, label: str) -> str:
    """A reader error in one line, naming the upload as the user knows it (not its server path,
    in whatever spelling the reader used: as given, normalised or resolved)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    spellings = {str(path), str(Path(path)), str(Path(path).absolute()), str(Path(path).resolve())}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, label)
    return public_message(text)


def open_upload(path, max_side: int, name: Optional[str] = None, upload_dir=None) -> Photo:
    """:func:`load_photo`, and when it refuses the file, delete the file if it is a temporary copy
    inside ``upload_dir`` (Gradio's upload folder): Gradio keeps every upload until the server
    stops, and a refused one is of no use to anybody. Raises :class:`AppInputError`."""
    try:
        return load_photo(path, max_side, name=name)
    except AppInputError:
        if upload_dir is not None:
            discard_upload(path, upload_dir)
        raise


def discard_upload(path, upload_dir) -> bool:
    """Delete ``path`` and its folder when that is left empty, if ``path`` is a file inside
    ``upload_dir``; anything else (a sample photo, a link, the folder itself) is never touched.
    Returns whether it was deleted."""
    root = Path(upload_dir).resolve()
    target = Path(path)
    if target.is_symlink() or not target.is_file():
        return False
    target = target.resolve()
    if not target.is_relative_to(root):
        return False
    try:
        target.unlink()
    except OSError as e:
        logger.warning("could not delete the refused upload %s: %s", target, e)
        return False
    if target.parent != root:
        try:
            target.parent.rmdir()  # Gradio's per-upload folder, when nothing else is in it
        except OSError:
            pass
    logger.info("deleted the refused upload %s", target)
    return True


class Segments:
    """One image's masks, best first: SA-1B annotations (``segmentation`` RLE, ``predicted_iou``
    as the score; pseudo labels also ``id``, ``level``, ``parent_id``).

    ``source``: "model" or "pseudo labels"; ``seconds``: how long they took; ``shape``: (H, W).
    """

    def __init__(self, anns: List[Dict], source: str, seconds: float, shape: Tuple[int, int]):
        self.anns = sorted(anns, key=lambda a: -float(a["predicted_iou"]))
        self.source, self.seconds, self.shape = source, seconds, tuple(shape)
        self.by_id = {int(a["id"]): a for a in self.anns}
        self.children: Dict[int, List[int]] = {}  # parent id -> ids of its parts (-1: the roots)
        for a in self.anns:
            self.children.setdefault(int(a.get("parent_id", -1)), []).append(int(a["id"]))

    @property
    def scores(self) -> np.ndarray:
        return np.array([float(a["predicted_iou"]) for a in self.anns], np.float32)

    @property
    def max_level(self) -> int:
        return max((int(a.get("level", 0)) for a in self.anns), default=0)

    def ids_at_level(self, level: int) -> List[int]:
        return [int(a["id"]) for a in self.anns if int(a.get("level", 0)) == level]

    def masks(self, ids: Sequence[int]) -> np.ndarray:
        """N×H×W bool masks of the annotations ``ids``."""
        out = np.zeros((len(ids), *self.shape), bool)
        for k, i in enumerate(ids):
            out[k] = rle_to_mask(self.by_id[int(i)]["segmentation"])
        return out


class _LRU(OrderedDict):
    """A small most-recently-used cache of results by photo key."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_recent(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


class DemoModels:
    """The predictors and the pseudo-label engine of one demo server (thread-safe).

    Built eagerly, so bad weights or configs fail before the server starts. ``cfg``: a frozen
    UnSAM config; the whole-image model's test-time resize is capped at ``max_side`` (uploads
    are never larger, and upsampling them would only cost time) and its detections at
    :data:`MAX_SHOWN_MASKS` (full-size masks are what costs memory). ``engine_cfg``: the
    pseudo-label engine's (classical recipe by default).

    One network serves both tabs: ``MODEL.WEIGHTS`` is read once, the prompt mode resolved by it
    (:func:`unsam.predictor.build_prompt_model`), and ``whole`` and ``prompter`` share the one
    model (whole-image outputs do not depend on the prompt path), in every prompt mode. With no
    weights the model is random, drawn from a fixed seed on a forked generator, so every start
    shows the same page and the process's own random state is left alone.
    """

    def __init__(self, cfg, max_side: int = 1024, engine_cfg: Optional[ClassicalSettings] = None):
        from .predictor import PromptPredictor, WholeImagePredictor, build_prompt_model

        cfg = cfg.clone()
        cfg.defrost()
        cfg.INPUT.MAX_SIZE_TEST = min(cfg.INPUT.MAX_SIZE_TEST, max_side)
        cfg.TEST.DETECTIONS_PER_IMAGE = min(cfg.TEST.DETECTIONS_PER_IMAGE, MAX_SHOWN_MASKS)
        cfg.freeze()
        self.cfg = cfg
        self.has_weights = bool(cfg.MODEL.WEIGHTS)
        self.engine_cfg = engine_cfg or ClassicalSettings()
        self.labeler = build_labeler(self.engine_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # only a random model draws from it (no MODEL.WEIGHTS)
            self.model, prompt_cfg = build_prompt_model(cfg)
        # with no weights the whole-image model would be random: "everything" uses the engine
        self.whole = WholeImagePredictor(self.model, cfg) if self.has_weights else None
        self.prompter = PromptPredictor(self.model, prompt_cfg)
        self._whole_lock = threading.Lock()
        self._engine_lock = threading.Lock()
        self._prompt_lock = threading.Lock()
        self._encoded_key: Optional[str] = None
        self._everything = _LRU(CACHE_SIZE)
        self._pseudo = _LRU(CACHE_SIZE)

    @property
    def prompt_mode(self) -> str:
        return self.prompter.mode

    def everything(self, photo: Photo) -> Segments:
        """Whole-image masks of ``photo``: the model's, or the pseudo labels without weights."""
        if self.whole is None:
            return self.pseudo_labels(photo)
        return self._cached(
            self._whole_lock, self._everything, photo, "model", self._model_annotations
        )

    def pseudo_labels(self, photo: Photo) -> Segments:
        """The pseudo-label engine's hierarchy on ``photo`` (cached per photo)."""
        return self._cached(self._engine_lock, self._pseudo, photo, "pseudo labels", self.labeler)

    def _model_annotations(self, image: np.ndarray) -> List[Dict]:
        instances = self.whole(image)
        return [
            {
                "id": i,
                "segmentation": mask_to_rle(m),
                "area": int(m.sum()),
                "predicted_iou": float(s),
            }
            for i, (m, s) in enumerate(zip(instances.pred_masks.numpy(), instances.scores.tolist()))
        ]

    @staticmethod
    def _cached(
        lock: threading.Lock,
        cache: "_LRU",
        photo: Photo,
        source: str,
        compute: Callable[[np.ndarray], List[Dict]],
    ) -> Segments:
        """``compute(photo.image)``'s annotations as :class:`Segments`, once per photo (``cache``);
        ``lock`` serialises the model or engine it runs."""
        with lock:
            cached = cache.get_recent(photo.key)
            if cached is None:
                start = time.perf_counter()
                anns = compute(photo.image)
                cached = Segments(anns, source, time.perf_counter() - start, photo.image.shape[:2])
                cache.put(photo.key, cached)
                logger.info(
                    "%s: %d masks (%s) in %.2f s", photo.name, len(anns), source, cached.seconds
                )
            return cached

    def encode(self, photo: Photo) -> float:
        """Run the prompt encoder on ``photo`` unless it is the encoded one; returns seconds."""
        with self._prompt_lock:
            return self._encode(photo)

    def _encode(self, photo: Photo) -> float:
        if self._encoded_key == photo.key:
            return 0.0
        start = time.perf_counter()
        self.prompter.set_image(photo.image)
        self._encoded_key = photo.key
        seconds = time.perf_counter() - start
        logger.info("%s: image encoded for prompts in %.2f s", photo.name, seconds)
        return seconds

    def prompt(
        self,
        photo: Photo,
        points: Optional[np.ndarray],
        labels: Optional[np.ndarray],
        box: Optional[np.ndarray],
    ) -> Tuple[np.ndarray, np.ndarray, float]:
        """K granularity masks (C×H×W bool), their scores and the decode seconds for the prompt.

        Sessions share the predictor: a photo other than the encoded one is encoded first."""
        with self._prompt_lock:
            self._encode(photo)
            start = time.perf_counter()
            masks, scores, _ = self.prompter.predict(
                point_coords=points, point_labels=labels, box=box, multimask_output=True
            )
            seconds = time.perf_counter() - start
        logger.info("%s: prompt answered with %d masks in %.3f s", photo.name, len(masks), seconds)
        return masks, scores, seconds


# ----------------------------------------------------------------------------------- drawing
def render_everything(
    photo: Photo, segments: Segments, threshold: float, max_masks: int
) -> Tuple[np.ndarray, str]:
    """The best ``max_masks`` masks scoring at least ``threshold``, each drawn once, and a
    caption."""
    scores = segments.scores
    keep = [int(segments.anns[i]["id"]) for i in np.flatnonzero(scores >= threshold)[:max_masks]]
    image = draw_masks(photo.image, segments.masks(keep))
    what = (
        "model masks"
        if segments.source == "model"
        else "pseudo labels (training-free engine, classical recipe)"
    )
    caption = (
        f"**{len(keep)}** of {len(segments.anns)} {what} shown (score ≥ {threshold:.2f}, best "
        f"{max_masks} at most), {segments.seconds:.1f} s"
    )
    return image, caption


def pick_mask(segments: Segments, candidates: Sequence[int], x: float, y: float) -> Optional[int]:
    """The smallest of the annotations ``candidates`` that contains pixel (x, y), or None."""
    h, w = segments.shape
    col, row = int(np.clip(x, 0, w - 1)), int(np.clip(y, 0, h - 1))
    best, best_area = None, None
    for i in candidates:
        ann = segments.by_id[int(i)]
        if rle_to_mask(ann["segmentation"])[row, col]:
            area = int(ann.get("area", 0))
            if best is None or area < best_area:
                best, best_area = int(i), area
    return best


def hierarchy_candidates(segments: Segments, level: int, selected: Optional[int]) -> List[int]:
    """What a click can pick: the parts of ``selected``, or every mask of ``level``."""
    if selected is None:
        return segments.ids_at_level(level)
    return segments.children.get(int(selected), [])


def render_hierarchy(
    photo: Photo, segments: Segments, level: int, selected: Optional[int]
) -> Tuple[np.ndarray, str]:
    """The hierarchy browser's picture and caption.

    No selection: every mask of ``level`` (0 = coarsest). A selected mask: its parts coloured
    and its own outline in white (itself filled when it has no parts)."""
    if selected is None:
        ids = segments.ids_at_level(level)
        caption = (
            f"Level **{level}** of 0–{segments.max_level} (0 = coarsest): **{len(ids)}** masks. "
            "Click a mask to see its parts."
        )
        return draw_masks(photo.image, segments.masks(ids)), caption
    ann = segments.by_id[int(selected)]
    parts = segments.children.get(int(selected), [])
    shown = parts or [int(selected)]
    image = draw_masks(photo.image, segments.masks(shown))
    draw_outline(image, segments.masks([selected])[0], SELECTED_COLOR, 2 * line_width(image.shape))
    parent = int(ann.get("parent_id", -1))
    caption = (
        f"Mask **#{selected}** (level {int(ann.get('level', 0))}, {int(ann.get('area', 0))} px, "
        f"score {float(ann['predicted_iou']):.3f}): "
        + (f"**{len(parts)}** parts — click one to go down" if parts else "no parts")
        + (
            f"; **Up** goes to its parent #{parent}."
            if parent >= 0
            else "; **Up** goes back to its level."
        )
    )
    return image, caption


def render_prompt(
    photo: Photo,
    masks: np.ndarray,
    scores: np.ndarray,
    points: Optional[np.ndarray],
    labels: Optional[np.ndarray],
    box: Optional[np.ndarray],
) -> Tuple[np.ndarray, List[Tuple[np.ndarray, str]]]:
    """The best mask on the photo with the prompts, and one (panel, caption) per granularity."""
    colors = distinct_colors(max(1, len(masks)))
    best = int(np.argmax(scores)) if len(scores) else None
    main = (
        photo.image
        if best is None
        else draw_masks(photo.image, masks[best][None], colors=colors[best][None])
    )
    main = draw_prompts(main, points, labels, box)
    panels = [
        (
            draw_prompts(draw_masks(photo.image, m[None], colors=c[None]), points, labels, box),
            f"g{i}: {s:.2f}{' (best)' if i == best else ''}",
        )
        for i, (m, s, c) in enumerate(zip(masks, scores, colors))
    ]
    return main, panels


def write_pseudo_json(folder, photo: Photo, segments: Segments) -> Path:
    """The pseudo labels of ``photo`` as ``<folder>/<name>.json`` (SA-1B, written atomically)."""
    h, w = photo.image.shape[:2]
    path = Path(folder) / photo.key / f"{photo.name}.json"
    write_sa1b_json(
        path,
        {"image_id": 0, "width": int(w), "height": int(h), "file_name": f"{photo.name}.jpg"},
        segments.anns,
    )
    return path
