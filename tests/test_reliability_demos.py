"""Trust nothing a user hands the demos and predictors (issue 26): two inputs of one name, a
threshold outside [0, 1], a GPU that is not there, an output file name, a 0/1 mask, a box past
the border, a mask_input of the wrong size, a 20000-pixel strip and a 0×0 image.

Bad input gets one ``error:`` line and exit status 2 before the model loads, and nothing of the
user's is overwritten; input that is merely unusual (a strip, a clipped box, a 0/1 mask) works.
"""

import logging
import math

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from PIL import Image

from unsam.config.loading import load_config
from unsam.data.prompts import PromptError, mask_from_values, validate_prompts
from unsam.utils.device import DeviceError

from .test_prompt_model import FAST, TINY_PROMPT
from .test_prompt_model import _demo_main as _point_demo_main
from .test_reliability import TINY, _one_error_line
from .test_reliability import _demo_main as _whole_main

# the whole-image demo at 64 px: seconds, not minutes, on one CPU thread
WHOLE_OPTS = [
    "--opts",
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
]
POINT_OPTS = ["--opts", *FAST]
# a GPU this machine does not have, wherever the test runs
MISSING_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def _point_main(argv):
    return _point_demo_main()(argv)


def _write_rgb(path, h=48, w=64, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        path
    )
    return path


def _whole(inputs, output, *extra, opts=WHOLE_OPTS):
    return _whole_main(
        [
            "--config-file",
            TINY,
            "--input",
            *map(str, inputs),
            "--output",
            str(output),
            *extra,
            *opts,
        ]
    )


def _point(inputs, output, *extra, opts=POINT_OPTS):
    return _point_main(
        [
            "--config-file",
            str(TINY_PROMPT),
            "--input",
            *map(str, inputs),
            "--output",
            str(output),
            *extra,
            *opts,
        ]
    )


DEMOS = {"whole": _whole, "point": _point}


# ----------------------------------------------------------------------------- 1. output names
@pytest.mark.parametrize("demo", DEMOS)
def test_two_inputs_of_one_name_refused_up_front(demo, tmp_path, capsys):
    """Was: exit 0 with one x.png, the second input's result written over the first's."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    first, second = _write_rgb(a / "x.png"), _write_rgb(b / "x.jpg", seed=1)
    out = tmp_path / "out"
    assert DEMOS[demo]([first, second], out) == 2
    _one_error_line(capsys.readouterr().err, str(first), str(second))
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("demo", DEMOS)
def test_result_never_written_over_an_input(demo, tmp_path, capsys):
    """Was: ``--input folder --output folder`` replaced each PNG input by its overlay."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = _write_rgb(folder / "p.png")
    before = photo.read_bytes()
    for output in (folder, photo):
        assert DEMOS[demo]([photo], output) == 2
        _one_error_line(capsys.readouterr().err, str(photo), "overwrite")
    assert photo.read_bytes() == before


# ----------------------------------------------------------------------------- 2. threshold
@pytest.mark.parametrize("value", ["2", "-0.1", "nan"])
def test_confidence_threshold_outside_unit_interval_refused(value, tmp_path, capsys):
    """Was: accepted (2: every mask dropped, -0.1: none), exit 0."""
    photo = _write_rgb(tmp_path / "p.png")
    assert _whole([photo], tmp_path / "out", "--confidence-threshold", value) == 2
    _one_error_line(capsys.readouterr().err, "--confidence-threshold", value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. device
@pytest.mark.parametrize("demo", DEMOS)
def test_missing_gpu_is_one_error_line(demo, tmp_path, capsys):
    """Was: a traceback from deep inside torch (the seed's command ends in MODEL.DEVICE cuda)."""
    photo = _write_rgb(tmp_path / "p.png")
    opts = (WHOLE_OPTS if demo == "whole" else POINT_OPTS) + ["MODEL.DEVICE", MISSING_GPU]
    assert DEMOS[demo]([photo], tmp_path / "out", opts=opts) == 2
    _one_error_line(capsys.readouterr().err, "MODEL.DEVICE", MISSING_GPU)


def test_predictors_refuse_missing_gpu():
    from unsam.predictor import PromptPredictor, WholeImagePredictor

    cfg = load_config(TINY, ["MODEL.DEVICE", MISSING_GPU])
    for predictor in (WholeImagePredictor, PromptPredictor):
        with pytest.raises(DeviceError, match="MODEL.DEVICE"):
            predictor.from_config(cfg)


# ----------------------------------------------------------------------------- 4. output file name
@pytest.mark.parametrize(
    "demo,name,fmt",
    [
        ("whole", "image_out.jpg", "JPEG"),
        ("point", "image_out.jpg", "JPEG"),
        ("whole", "o.webp", "WEBP"),
        ("point", "o.bmp", "BMP"),
    ],
)
def test_output_file_name_is_written_exactly_there(demo, name, fmt, tmp_path):
    """Was: ``--output image_out.jpg`` wrote a PNG named image_out.png."""
    photo = _write_rgb(tmp_path / "p.png")
    out = tmp_path / "results" / name
    extra = ["--save-json"] if demo == "whole" else []
    assert DEMOS[demo]([photo], out, *extra) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == sorted(
        [name, f"{out.stem}.json"] if demo == "whole" else [name]
    )  # no temp file left
    with Image.open(out) as img:
        assert img.format == fmt and img.size[1] == 48


@pytest.mark.parametrize("demo", DEMOS)
def test_output_file_name_with_several_inputs_refused(demo, tmp_path, capsys):
    """Was: ``--output out.jpg`` with two inputs became a folder named out.jpg."""
    photos = [_write_rgb(tmp_path / f"p{i}.png", seed=i) for i in range(2)]
    assert DEMOS[demo](photos, tmp_path / "out.jpg") == 2
    _one_error_line(capsys.readouterr().err, "out.jpg", "2 inputs")
    assert not (tmp_path / "out.jpg").exists()


def test_existing_folder_with_image_extension_stays_a_folder(tmp_path):
    photo = _write_rgb(tmp_path / "p.png")
    (tmp_path / "shots.png").mkdir()
    assert _whole([photo], tmp_path / "shots.png") == 0
    assert [p.name for p in (tmp_path / "shots.png").iterdir()] == ["p.png"]


# ----------------------------------------------------------------------------- 5. mask files
def test_binary_masks_of_any_range_read_alike():
    drawn = np.zeros((6, 8), bool)
    drawn[1:4, 2:6] = True
    for foreground in (1, 255, 65535, 0.7):
        np.testing.assert_array_equal(mask_from_values(drawn * foreground), drawn)
    for empty in (np.zeros((6, 8)), np.full((6, 8), np.nan)):
        with pytest.raises(PromptError):
            mask_from_values(empty)


@pytest.mark.parametrize("foreground,mode", [(1, "L"), (255, "L"), (1, "I;16"), (65535, "I;16")])
def test_demo_accepts_binary_mask_png(foreground, mode, tmp_path):
    """Was: a 0/1 mask PNG refused as "empty" (only 0/255 worked)."""
    photo = _write_rgb(tmp_path / "p.png")
    mask = np.zeros((48, 64), np.uint16 if mode == "I;16" else np.uint8)
    mask[10:30, 20:50] = foreground
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == mode
    assert _point([photo], tmp_path / "o.png", "--mask-input", str(tmp_path / "m.png")) == 0
    assert (tmp_path / "o.png").exists()


def test_demo_refuses_empty_mask(tmp_path, capsys):
    photo = _write_rgb(tmp_path / "p.png")
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / "m.png")
    assert _point([photo], tmp_path / "o.png", "--mask-input", str(tmp_path / "m.png")) == 2
    _one_error_line(capsys.readouterr().err, "m.png", "empty")


# ----------------------------------------------------------------------------- 6. boxes
def test_box_partly_outside_is_clipped_and_logged(caplog):
    """Was: refused as "outside the image"; SAM clips it."""
    with caplog.at_level(logging.INFO, logger="unsam.data.prompts"):
        _, _, box = validate_prompts(None, None, [-10, 5, 130, 40.5], (50, 100))
    assert box.dtype == np.float32 and box.tolist() == [0, 5, 100, 40.5]
    assert "clipped to (0, 5, 100, 40.5)" in caplog.text
    for outside in ([100, 0, 120, 20], [-30, 0, 0, 20], [10, 50, 20, 60]):
        with pytest.raises(PromptError, match="outside"):
            validate_prompts(None, None, outside, (50, 100))


def test_demo_box_partly_outside_segments(tmp_path, capsys):
    photo = _write_rgb(tmp_path / "p.png")
    assert _point([photo], tmp_path / "o.png", "--box=-20,10,500,30") == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (48, 2 * 64, 3)
    assert _point([photo], tmp_path / "o2.png", "--box", "70,10,500,30") == 2
    _one_error_line(capsys.readouterr().err, "box", "outside")


# ----------------------------------------------------------------------------- 7./8. predictors
@pytest.fixture(scope="module", params=["learned", "select"])
def prompt_predictor(request):
    from unsam.predictor import PromptPredictor

    torch.manual_seed(0)
    cfg = load_config(str(TINY_PROMPT), [*FAST, "UNSAM.PROMPT.MODE", request.param])
    return PromptPredictor.from_config(cfg)


@pytest.fixture(scope="module")
def whole_predictor():
    from unsam.predictor import WholeImagePredictor

    torch.manual_seed(0)
    return WholeImagePredictor.from_config(load_config(TINY, ["MODEL.DEVICE", "cpu"]))


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64), (256, 256), (2, 256, 256), (1, 256, 128)])
def test_mask_input_of_wrong_size_refused(prompt_predictor, shape):
    """Was: any size silently resized (SamPredictor raises for anything but 1×256×256)."""
    prompt_predictor.set_image(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError) as err:
        prompt_predictor.predict(mask_input=np.zeros(shape, np.float32))
    assert "1×256×256" in str(err.value) and str(tuple(shape)) in str(err.value)
    with pytest.raises(ValueError, match="B×1×256×256"):
        prompt_predictor.predict_batch(mask_input=np.zeros((1, *shape), np.float32))
    masks, _, low = prompt_predictor.predict(mask_input=np.zeros((1, 256, 256), np.float32))
    assert masks.shape[1:] == (40, 60) and low.shape[1:] == (256, 256)


# (H, W): a 20000-pixel strip whose resize had a 0 px side in both predictors (tiny configs)
STRIPS = [(20000, 10), (10, 20000)]


@pytest.mark.parametrize("hw", STRIPS)
def test_whole_image_predictor_on_a_strip(whole_predictor, hw):
    """Was: ``ValueError: height and width must be > 0`` in the resize."""
    image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    instances = whole_predictor(image)
    assert instances.image_size == hw and tuple(instances.pred_masks.shape[1:]) == hw
    assert len(instances) == 50 and torch.isfinite(instances.scores).all()


@pytest.mark.parametrize("hw", STRIPS)
def test_prompt_predictor_on_a_strip(prompt_predictor, hw):
    """Was: ``ValueError: height and width must be > 0`` in set_image."""
    image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    prompt_predictor.set_image(image)
    long_side = prompt_predictor.image_size
    assert sorted(prompt_predictor.input_size) == [1, long_side]
    h, w = hw
    # the far corner of the strip maps inside the 1 px wide input, as the image does
    corner = prompt_predictor.transform.apply_coords(np.array([[w, h]], np.float64), hw)[0]
    assert math.isclose(corner[0], prompt_predictor.input_size[1])
    assert math.isclose(corner[1], prompt_predictor.input_size[0])
    masks, iou, low = prompt_predictor.predict(
        point_coords=np.array([[w - 1, h - 1]]),
        point_labels=np.array([1]),
        box=np.array([0, 0, w, h]),
        multimask_output=False,
    )
    assert masks.shape == (1, *hw) and masks.dtype == bool and low.shape == (1, 256, 256)
    assert np.isfinite(iou).all()


@pytest.mark.parametrize("hw", [(0, 0), (5, 0), (0, 5)])
def test_predictors_refuse_image_without_pixels(whole_predictor, prompt_predictor, hw):
    """Was: ZeroDivisionError (0×0) or the resize's ValueError."""
    image = np.zeros((*hw, 3), np.uint8)
    named = rf"{hw[1]}x{hw[0]}.*\({hw[0]}, {hw[1]}, 3\)"
    with pytest.raises(ValueError, match=named):
        whole_predictor(image)
    with pytest.raises(ValueError, match=named):
        prompt_predictor.set_image(image)


@pytest.mark.parametrize(
    "demo,hw", [("whole", (20000, 10)), ("point", (20000, 20)), ("point", (10, 20000))]
)
def test_demos_on_a_strip(demo, hw, tmp_path):
    """Was: the point demo crashed on a 20000×20 image (and the whole-image one on 20000×10)."""
    photo = _write_rgb(tmp_path / "strip.png", *hw)
    assert DEMOS[demo]([photo], tmp_path / "o.png") == 0
    panels = 1 if demo == "whole" else 2
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (hw[0], panels * hw[1], 3)
