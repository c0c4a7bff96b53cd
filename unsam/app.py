"""Browser demo of UnSAM: segment everything, click to prompt, browse the pseudo-label hierarchy.

  python -m unsam.app [--config-file F] [--host 127.0.0.1] [--port 7860] [--max-side 1024]
                      [--max-upload-mb 50] [--samples DIR|GLOB]
                      [--opts MODEL.WEIGHTS W MODEL.DEVICE cpu ...]

then open http://127.0.0.1:7860. Three tabs work on the uploaded (or sample) photo. Sample
photos: ``--samples`` (a folder or a glob), else the shared COCO validation photos when
``$UNSAM_SHARED`` is set (``$UNSAM_SHARED/data/coco_tiny_val2017/images``), else none.

* **Everything** — whole-image masks as a coloured overlay, with a score threshold and a
  mask-count limit. With no ``MODEL.WEIGHTS`` the model would be random, so this tab runs the
  training-free pseudo-label engine (classical recipe) instead, and says so.
* **Prompt** — click positive / negative points, or two corners of a box: the K granularity
  masks of ``PromptPredictor`` (whatever ``UNSAM.PROMPT.MODE`` resolves to) side by side with
  their scores. The photo is encoded once per upload, so clicks only run the mask decoder.
* **Pseudo labels** — the pseudo-label engine's masks level by level (0 = coarsest); click a
  mask for its parts, *Up* for its parent; download the SA-1B JSON.

Everything runs offline, on a GPU when there is one, else the CPU (``MODEL.DEVICE``): no
``--share`` link, no analytics, no assets from the internet. An upload larger than
``--max-upload-mb`` is refused while it streams in; the work per upload is bounded by
``--max-side`` (photos are downscaled to it); an unreadable or oversized photo gets one error
message on the page, naming the file by its base name only, and its temporary copy is deleted.
A bad config, weights file or option prints one ``error:`` line and exits 2.
"""

import argparse
import glob
import html
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import unsam.compat  # noqa: F401  (compat before detectron2)

import numpy as np

from .app_backend import (
    MAX_SHOWN_MASKS,
    AppInputError,
    DemoModels,
    Photo,
    hierarchy_candidates,
    open_upload,
    pick_mask,
    public_message,
    render_everything,
    render_hierarchy,
    render_prompt,
    write_pseudo_json,
)
from .checkpoint import WeightsError
from .config.loading import ConfigError, load_config
from .configs import get_config_file
from .demo_io import IMAGE_EXTENSIONS
from .visualize import draw_prompts

logger = logging.getLogger("unsam.app")

# the quickstart's tiny promptable model, shipped inside the package (unsam/configs)
DEFAULT_CONFIG = get_config_file("tiny/unsam_quickstart.yaml")
# the sample photos offered when $UNSAM_SHARED is set and --samples is not given
SHARED_SAMPLES = ("data", "coco_tiny_val2017", "images")
MAX_SAMPLES = 6
# the largest upload accepted by default: phone and camera JPEGs are 2-15 MB, so this takes any
# photo and most large PNGs while bounding what one upload can make the server store
DEFAULT_MAX_UPLOAD_MB = 50
POSITIVE, NEGATIVE, BOX = "positive point", "negative point", "box (click two corners)"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unsam.app",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-file",
        default=str(DEFAULT_CONFIG),
        metavar="FILE",
        help="model config (default: the quickstart's tiny promptable model, "
        "tiny/unsam_quickstart.yaml of the package's configs; the public UnSAM "
        "R50 checkpoint needs configs/unsam_only_sa-1b_R50.yaml)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; "
        "0.0.0.0 for your network)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="uploads are downscaled so their long side is at most this many pixels "
        "(default 1024): it bounds the time and memory one upload costs",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        metavar="MB",
        help=f"uploads larger than this are refused before they are stored (default "
        f"{DEFAULT_MAX_UPLOAD_MB})",
    )
    parser.add_argument(
        "--samples",
        default=None,
        metavar="DIR|GLOB",
        help=f"sample photos offered on the page (the first {MAX_SAMPLES}; default: "
        "$UNSAM_SHARED/data/coco_tiny_val2017/images when UNSAM_SHARED is set, "
        "else none)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth "
        "MODEL.DEVICE cpu (last: takes everything after it)",
    )
    return parser


def default_samples() -> Optional[str]:
    """The sample folder when ``--samples`` is not given: the shared COCO validation photos
    under ``$UNSAM_SHARED`` when that is set and holds them, else None (no samples)."""
    shared = os.environ.get("UNSAM_SHARED")
    if not shared:
        return None
    folder = Path(shared).joinpath(*SHARED_SAMPLES)
    if not folder.is_dir():
        logger.warning("no sample photos: %s is not a folder (UNSAM_SHARED)", folder)
        return None
    return str(folder)


def find_samples(spec: Optional[str]) -> List[str]:
    """Up to :data:`MAX_SAMPLES` image paths from a folder or glob (None:
    :func:`default_samples`)."""
    if spec is None:
        spec = default_samples()
        if spec is None:
            return []
    pattern = os.path.join(spec, "*") if os.path.isdir(spec) else spec
    return sorted(p for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_EXTENSIONS)[
        :MAX_SAMPLES
    ]


def shown_path(path: str) -> str:
    """How the page names a server file: relative to the working folder when inside it (e.g.
    ``configs/tiny/unsam_tiny.yaml`` in a checkout), else by its base name (the browser user has
    no business knowing the server's folders)."""
    absolute = Path(os.path.abspath(path))
    cwd = Path.cwd()
    return str(absolute.relative_to(cwd)) if absolute.is_relative_to(cwd) else absolute.name


def status_text(models: DemoModels, config_file: str) -> str:
    weights = models.cfg.MODEL.WEIGHTS
    if weights:
        model = f"weights `{shown_path(weights)}`; prompts: **{models.prompt_mode}** mode"
    else:
        model = (
            "**no MODEL.WEIGHTS**: the model is random, so *Everything* shows the training-free "
            f"pseudo labels and *Prompt* answers are not meaningful ({models.prompt_mode} mode)"
        )
    return f"Config `{shown_path(config_file)}`, {model}, device {models.cfg.MODEL.DEVICE}."


def read_upload(payload: dict, max_side: int) -> Photo:
    """The photo of an upload or sample payload (Gradio's FileData), or a ``gr.Error`` the page
    shows: one line naming the file by its base name. A refused upload's temporary copy in
    Gradio's upload folder is deleted (Gradio would keep it until the server stops)."""
    import gradio as gr
    from gradio.utils import get_upload_folder

    try:
        return open_upload(
            payload["path"], max_side, name=payload.get("orig_name"), upload_dir=get_upload_folder()
        )
    except AppInputError as e:
        raise gr.Error(html.escape(public_message(str(e))), print_exception=False) from None


def _prompt_arrays(pstate):
    """A prompt state → (points N×2 | None, labels N | None, box 4 | None) for the predictor."""
    points = np.array(pstate["points"], np.float32).reshape(-1, 2) if pstate["points"] else None
    labels = np.array(pstate["labels"], np.int64) if pstate["points"] else None
    box = np.array(pstate["box"], np.float32) if pstate["box"] else None
    return points, labels, box


def _no_prompts():
    """Per-session prompt state: clicked points and labels, a box's pending first corner, the
    box."""
    return {"points": [], "labels": [], "corner": None, "box": None}


def _tree_root(level: int = 0):
    """Per-session hierarchy-browser state: the level shown, or the selected mask whose parts
    are shown."""
    return {"level": int(level), "selected": None}


def _need_photo(photo: Optional[Photo]) -> Photo:
    import gradio as gr

    if photo is None:
        raise gr.Error("Upload a photo (or pick a sample) first.")
    return photo


def _everything_tab(models: DemoModels, photo_state) -> dict:
    """The Everything tab's components and events; returns those a new photo resets."""
    import gradio as gr

    with gr.Row():
        run_all = gr.Button("Segment everything", variant="primary", elem_id="run-everything")
        threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Score threshold")
        max_masks = gr.Slider(
            1, MAX_SHOWN_MASKS, value=40, step=1, label="At most this many masks, best first"
        )
    image = gr.Image(
        label="Masks", format="png", interactive=False, height=440, elem_id="everything-image"
    )
    caption = gr.Markdown(elem_id="everything-caption")
    segments_state = gr.State(None)  # Segments

    def run_everything(photo, threshold_value, max_count, progress=gr.Progress()):
        photo = _need_photo(photo)
        progress(
            0.1, desc="segmenting" if models.has_weights else "running the pseudo-label engine"
        )
        segments = models.everything(photo)
        return (*render_everything(photo, segments, threshold_value, int(max_count)), segments)

    def redraw_everything(photo, segments, threshold_value, max_count):
        if photo is None or segments is None:
            return gr.update(), gr.update()
        return render_everything(photo, segments, threshold_value, int(max_count))

    run_all.click(
        run_everything,
        inputs=[photo_state, threshold, max_masks],
        outputs=[image, caption, segments_state],
    )
    for slider in (threshold, max_masks):
        slider.release(
            redraw_everything,
            inputs=[photo_state, segments_state, threshold, max_masks],
            outputs=[image, caption],
            show_progress="hidden",
        )
    return {"image": image, "caption": caption, "segments": segments_state}


def _prompt_tab(models: DemoModels, photo_state) -> dict:
    """The Prompt tab's components and events; returns those a new photo resets."""
    import gradio as gr

    with gr.Row():
        kind = gr.Radio([POSITIVE, NEGATIVE, BOX], value=POSITIVE, label="A click adds", scale=3)
        clear = gr.Button("Clear prompts", scale=1)
    with gr.Row():
        image = gr.Image(
            label="Click on the photo",
            format="png",
            interactive=False,
            height=440,
            elem_id="prompt-image",
        )
        gallery = gr.Gallery(
            label="The K granularities",
            columns=2,
            height=440,
            format="jpeg",
            elem_id="prompt-gallery",
        )
    caption = gr.Markdown(elem_id="prompt-caption")
    prompts = gr.State(_no_prompts())

    def on_prompt_click(photo, state, click_kind, evt: gr.SelectData):
        photo = _need_photo(photo)
        x, y = (float(v) for v in evt.index)
        state = dict(state)
        if click_kind == BOX and state["corner"] is None:
            state["corner"] = (x, y)
            points, labels, box = _prompt_arrays(state)
            marks = np.array([state["corner"]], np.float32)
            marks = marks if points is None else np.concatenate([points, marks])
            marks_labels = np.ones(len(marks), np.int64) if labels is None else np.append(labels, 1)
            return (
                draw_prompts(photo.image, marks, marks_labels, box),
                gr.update(),
                "First corner set: click the opposite corner.",
                state,
            )
        if click_kind == BOX:
            (x0, y0), state["corner"] = state["corner"], None
            h, w = photo.image.shape[:2]
            state["box"] = [min(x0, x), min(y0, y), min(w, max(x0, x) + 1), min(h, max(y0, y) + 1)]
        else:
            state["points"] = state["points"] + [[x, y]]
            state["labels"] = state["labels"] + [1 if click_kind == POSITIVE else 0]
        points, labels, box = _prompt_arrays(state)
        masks, scores, seconds = models.prompt(photo, points, labels, box)
        main_image, panels = render_prompt(photo, masks, scores, points, labels, box)
        text = (
            f"{len(masks)} masks in **{seconds:.2f} s** ({models.prompt_mode} mode) for "
            f"{0 if points is None else len(points)} point(s)"
            + (" and a box" if box is not None else "")
            + "."
        )
        return main_image, panels, text, state

    def clear_prompts(photo):
        return (None if photo is None else photo.image), [], "Prompts cleared.", _no_prompts()

    image.select(
        on_prompt_click,
        inputs=[photo_state, prompts, kind],
        outputs=[image, gallery, caption, prompts],
        show_progress="minimal",
    )
    clear.click(clear_prompts, inputs=photo_state, outputs=[image, gallery, caption, prompts])
    return {"image": image, "gallery": gallery, "caption": caption, "prompts": prompts}


def _pseudo_tab(models: DemoModels, photo_state, download_dir: str) -> dict:
    """The Pseudo labels tab's components and events; returns those a new photo resets."""
    import gradio as gr

    with gr.Row():
        run_tree = gr.Button("Run the pseudo-label engine", variant="primary", elem_id="run-pseudo")
        level = gr.Slider(0, 1, value=0, step=1, label="Level (0 = coarsest)")
        up = gr.Button("Up (parent)")
    image = gr.Image(
        label="Click a mask for its parts",
        format="png",
        interactive=False,
        height=440,
        elem_id="pseudo-image",
    )
    caption = gr.Markdown(elem_id="pseudo-caption")
    download = gr.File(label="SA-1B JSON", interactive=False, elem_id="pseudo-download")
    segments_state = gr.State(None)  # Segments
    tree = gr.State(_tree_root())

    def run_pseudo(photo, progress=gr.Progress()):
        photo = _need_photo(photo)
        progress(0.1, desc="running the pseudo-label engine")
        segments = models.pseudo_labels(photo)
        shown, text = render_hierarchy(photo, segments, 0, None)
        return (
            shown,
            text,
            segments,
            _tree_root(),
            gr.update(value=0, maximum=max(1, segments.max_level)),
            str(write_pseudo_json(download_dir, photo, segments)),
        )

    def show_level(photo, segments, level_value):
        state = _tree_root(level_value)
        if photo is None or segments is None:
            return gr.update(), gr.update(), state
        return (*render_hierarchy(photo, segments, state["level"], None), state)

    def on_tree_click(photo, segments, state, evt: gr.SelectData):
        if photo is None or segments is None:
            raise gr.Error("Run the pseudo-label engine first.")
        x, y = (float(v) for v in evt.index)
        picked = pick_mask(
            segments, hierarchy_candidates(segments, state["level"], state["selected"]), x, y
        )
        if picked is None:
            shown, text = render_hierarchy(photo, segments, state["level"], state["selected"])
            return shown, text + " *(No mask to pick there.)*", state
        state = {"level": int(segments.by_id[picked].get("level", 0)), "selected": picked}
        return (*render_hierarchy(photo, segments, state["level"], picked), state)

    def tree_up(photo, segments, state):
        if photo is None or segments is None or state["selected"] is None:
            return gr.update(), gr.update(), state
        parent = int(segments.by_id[state["selected"]].get("parent_id", -1))
        if parent < 0:
            state = _tree_root(state["level"])
        else:
            state = {"level": int(segments.by_id[parent].get("level", 0)), "selected": parent}
        return (*render_hierarchy(photo, segments, state["level"], state["selected"]), state)

    run_tree.click(
        run_pseudo,
        inputs=photo_state,
        outputs=[image, caption, segments_state, tree, level, download],
    )
    level.release(
        show_level, inputs=[photo_state, segments_state, level], outputs=[image, caption, tree]
    )
    image.select(
        on_tree_click,
        inputs=[photo_state, segments_state, tree],
        outputs=[image, caption, tree],
        show_progress="minimal",
    )
    up.click(tree_up, inputs=[photo_state, segments_state, tree], outputs=[image, caption, tree])
    return {
        "image": image,
        "caption": caption,
        "segments": segments_state,
        "tree": tree,
        "level": level,
        "download": download,
    }


def build_demo(
    models: DemoModels, config_file: str, max_side: int, samples: List[str], download_dir: str
):
    """The Gradio Blocks of the demo (not launched): the photo column and the three tabs."""
    import gradio as gr

    with gr.Blocks(title="UnSAM demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "## UnSAM — segment anything without supervision\n" + status_text(models, config_file)
        )
        photo_state = gr.State(None)  # the session's Photo
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                upload = gr.Image(
                    label="Photo",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=220,
                    elem_id="upload",
                )
                if samples:
                    gr.Examples(
                        samples, inputs=upload, label="Sample photos", examples_per_page=MAX_SAMPLES
                    )
                info = gr.Markdown(
                    f"Upload a photo (it is downscaled to {max_side} px on its long side).",
                    elem_id="photo-info",
                )
            with gr.Column(scale=3):
                with gr.Tab("Everything"):
                    every = _everything_tab(models, photo_state)
                with gr.Tab("Prompt"):
                    prompt = _prompt_tab(models, photo_state)
                with gr.Tab("Pseudo labels"):
                    pseudo = _pseudo_tab(models, photo_state, download_dir)

        def on_image(payload, progress=gr.Progress()):
            """A new upload or sample. Gets the raw payload: the project's reader opens the file."""
            photo = None
            if payload:
                photo = read_upload(payload, max_side)
                progress(0.2, desc="encoding the photo for prompts")
                seconds = models.encode(photo)
            shown = None if photo is None else photo.image
            return {
                photo_state: photo,
                info: ""
                if photo is None
                else (
                    f"Photo `{photo.name}`, {photo.size_text}"
                    + (f", {photo.note}" if photo.note else "")
                ),
                every["image"]: shown,
                every["caption"]: "Press **Segment everything**." if photo else "",
                every["segments"]: None,
                prompt["image"]: shown,
                prompt["gallery"]: [],
                prompt["prompts"]: _no_prompts(),
                prompt["caption"]: f"Photo encoded in {seconds:.2f} s: click on it to prompt."
                if photo
                else "",
                pseudo["image"]: shown,
                pseudo["caption"]: "Press **Run the pseudo-label engine**." if photo else "",
                pseudo["segments"]: None,
                pseudo["tree"]: _tree_root(),
                pseudo["level"]: gr.update(value=0, maximum=1),
                pseudo["download"]: None,
            }

        upload.change(
            on_image,
            inputs=upload,
            preprocess=False,
            outputs=[photo_state, info, *every.values(), *prompt.values(), *pseudo.values()],
        )
    return demo


def launch_options(args: argparse.Namespace) -> dict:
    """``Blocks.launch`` keywords: local only, no share link, and ``max_file_size`` so Gradio
    refuses an oversized upload (HTTP 413) while it streams in, before it lands in its temp
    folder."""
    return {
        "server_name": args.host,
        "server_port": args.port,
        "share": False,
        "show_error": True,
        "inbrowser": False,
        "ssr_mode": False,
        "quiet": True,
        "max_file_size": int(args.max_upload_mb * 1024 * 1024),
    }


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    # nothing leaves this machine: no usage analytics, no version check
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if args.max_side < 32:
        print(f"error: --max-side must be at least 32, got {args.max_side}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        print(
            "error: --max-upload-mb must be a positive number of megabytes, "
            f"got {args.max_upload_mb:g}",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_config(args.config_file, args.opts)
        models = DemoModels(cfg, max_side=args.max_side)
    except (ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = find_samples(args.samples)
    download_dir = tempfile.mkdtemp(prefix="unsam-app-")
    demo = build_demo(models, args.config_file, args.max_side, samples, download_dir)
    logger.info(
        "serving on http://%s:%d (uploads up to %g MB; Ctrl+C stops)",
        args.host,
        args.port,
        args.max_upload_mb,
    )
    try:
        demo.queue().launch(**launch_options(args))
    except OSError as e:  # port taken, address not available
        print(f"error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
