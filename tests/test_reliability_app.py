"""Trust nothing a user hands us (issue 26): the browser app's uploads, the notices every command
prints, the first run's kernel compile.

* an upload is size-limited by Gradio, and one the app refuses leaves no copy in Gradio's temp
  folder;
* what the browser is told names files by their base name, never a server path;
* ``--help`` of the commands prints no third-party ``torch.jit.script`` FutureWarning;
* the one-off compile of the CPU kernels (20-40 s) is announced instead of looking like a hang.
"""

import argparse
import html
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import unsam.compat  # noqa: F401

import numpy as np
import pytest
from PIL import Image

from unsam import app, ops
from unsam.app_backend import AppInputError, discard_upload, load_photo, open_upload, public_message

from .conftest import REPO_ROOT
from .test_app import _free_port
from .test_reliability import _one_error_line


def _garbage(path: Path, size: int = 1000) -> Path:
    """A file named like a photo that is not one (what a refused upload looks like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a photo " * (size // 12 + 1))
    return path


@pytest.fixture()
def upload_dir(tmp_path, monkeypatch) -> Path:
    """Gradio's upload folder, redirected into the test's folder (read by Gradio at call time)."""
    folder = tmp_path / "gradio"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    return folder


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- 1. upload size
def test_launch_sets_an_upload_size_limit(capsys):
    """Was: no limit, so a 150 MB upload was stored in full before anything looked at it."""
    import inspect

    import gradio as gr

    options = app.launch_options(app.get_parser().parse_args([]))
    assert options["max_file_size"] == 50 * 1024 * 1024
    assert set(options) <= set(
        inspect.signature(gr.Blocks.launch).parameters
    )  # all real launch keywords
    assert (
        app.launch_options(app.get_parser().parse_args(["--max-upload-mb", "2.5"]))["max_file_size"]
        == 2621440
    )
    for bad in ("0", "-3", "nan", "inf"):
        assert app.main(["--max-upload-mb", bad]) == 2
        err = capsys.readouterr().err
        _one_error_line(err, "--max-upload-mb")
        assert err.count("\n") == 1


def test_refused_upload_leaves_no_temp_copy(upload_dir, tmp_path):
    """Was: a refused upload stayed in Gradio's temp folder until the server stopped."""
    import gradio as gr

    upload = _garbage(upload_dir / "3f9a0c" / "holiday.jpg")
    with pytest.raises(gr.Error) as refused:
        app.read_upload({"path": str(upload), "orig_name": "holiday.jpg"}, max_side=320)
    shown = html.unescape(refused.value.message)  # the page renders it as HTML
    assert shown.startswith("cannot read 'holiday.jpg' as an image") and str(tmp_path) not in shown
    assert (
        _files(upload_dir) == [] and not upload.parent.exists()
    )  # the file and its per-upload folder
    # a refused file outside the upload folder (a sample photo) is never deleted
    sample = _garbage(tmp_path / "samples" / "broken.jpg")
    with pytest.raises(gr.Error):
        app.read_upload({"path": str(sample)}, max_side=320)
    assert sample.exists()
    # nor a link inside the upload folder, nor what the link points to
    (upload_dir / "link.jpg").symlink_to(sample)
    assert not discard_upload(upload_dir / "link.jpg", upload_dir) and sample.exists()
    # an accepted upload stays: the page still shows it
    good = upload_dir / "77aa" / "photo.png"
    good.parent.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(good)
    assert (
        open_upload(good, 320, upload_dir=upload_dir).image.shape == (40, 60, 3) and good.exists()
    )


def test_gradio_refuses_oversized_uploads_and_keeps_no_refused_copy(upload_dir):
    """The real upload route with the app's launch options: an upload over the limit gets HTTP 413
    and leaves nothing behind; one under it that the app refuses is deleted by the app."""
    import gradio as gr
    import httpx

    args = argparse.Namespace(host="127.0.0.1", port=_free_port(), max_upload_mb=1)
    with gr.Blocks(analytics_enabled=False) as demo:
        gr.Image(type="filepath")
    demo.launch(**app.launch_options(args), prevent_thread_lock=True)
    try:
        url = f"http://127.0.0.1:{args.port}/gradio_api/upload"
        big = httpx.post(url, files={"files": ("huge.jpg", b"\0" * (2 * 1024 * 1024))}, timeout=30)
        assert big.status_code == 413, big.text
        assert _files(upload_dir) == []
        small = httpx.post(url, files={"files": ("holiday.jpg", b"not a photo" * 100)}, timeout=30)
        assert small.status_code == 200, small.text
        stored = Path(small.json()[0])
        deadline = time.time() + 10
        while (
            not stored.exists() and time.time() < deadline
        ):  # Gradio moves it in a background task
            time.sleep(0.05)
        assert stored.is_relative_to(upload_dir) and stored.exists()
        with pytest.raises(gr.Error):
            app.read_upload({"path": str(stored), "orig_name": "holiday.jpg"}, max_side=320)
        assert _files(upload_dir) == []
    finally:
        demo.close()


# ----------------------------------------------------------------------------- 2. no server paths
@pytest.mark.parametrize(
    "spelling", ["{d}/f32.tif", "{d}//f32.tif", "{d}/./f32.tif", "{d}/sub/../f32.tif"]
)
def test_refusal_names_the_file_not_the_server_path(tmp_path, spelling):
    """Was: a path the reader spelt differently from ours ('//', '/./', '..') reached the page
    whole."""
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.random.rand(8, 8).astype(np.float32)).save(tmp_path / "f32.tif")
    with pytest.raises(AppInputError) as refused:
        load_photo(spelling.format(d=tmp_path), max_side=64)
    message = str(refused.value)
    assert "32-bit floating-point" in message and "f32.tif" in message
    assert str(tmp_path) not in message and "/tmp" not in message, message


def test_public_message_keeps_base_names_only():
    assert (
        public_message("cannot open '/srv/x//gradio/ab12/cat.png': no")
        == "cannot open 'cat.png': no"
    )
    assert public_message("Is a directory: /a/b/") == "Is a directory: "
    kept = "w/o 1/2 ./x.png http://127.0.0.1:7860/x and 640×480 / 2"
    assert public_message(kept) == kept


def test_page_names_config_and_weights_without_server_folders(tmp_path):
    """Was: the page's status line showed the weights' and an outside config's absolute paths."""
    cfg = SimpleNamespace(
        MODEL=SimpleNamespace(WEIGHTS=str(tmp_path / "runs" / "model_final.pth"), DEVICE="cpu")
    )
    models = SimpleNamespace(cfg=cfg, prompt_mode="select")
    text = app.status_text(models, str(tmp_path / "my.yaml"))
    assert "`model_final.pth`" in text and "`my.yaml`" in text and str(tmp_path) not in text
    text = app.status_text(models, str(REPO_ROOT / "configs" / "tiny" / "unsam_tiny.yaml"))
    assert "`configs/tiny/unsam_tiny.yaml`" in text  # a file of the checkout: its project path


def test_sample_photos_are_an_option_not_a_path_beside_the_checkout(tmp_path, monkeypatch):
    """Was: the app looked for ../shared/data beside the checkout (outside the package)."""
    for i in range(8):
        Image.new("RGB", (8, 8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    monkeypatch.delenv("UNSAM_SHARED", raising=False)
    assert app.find_samples(None) == []  # no option, no $UNSAM_SHARED: no samples
    chosen = app.find_samples(str(tmp_path))
    assert len(chosen) == app.MAX_SAMPLES and all(p.endswith(".png") for p in chosen)
    assert app.find_samples(str(tmp_path / "p1.*")) == [str(tmp_path / "p1.png")]
    shared = tmp_path / "shared"
    photos = shared.joinpath(*app.SHARED_SAMPLES)
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(photos / "a.jpg")
    monkeypatch.setenv("UNSAM_SHARED", str(shared))
    assert app.find_samples(None) == [str(photos / "a.jpg")]
    monkeypatch.setenv("UNSAM_SHARED", str(tmp_path / "missing"))
    assert app.find_samples(None) == []


def test_default_config_ships_with_the_package():
    package = Path(app.__file__).resolve().parent
    assert Path(app.DEFAULT_CONFIG).resolve().is_relative_to(package)
    assert Path(app.DEFAULT_CONFIG).is_file()


# ----------------------------------------------------------------------------- 3. import warnings
@pytest.mark.parametrize(
    "command",
    [["-m", "unsam.pseudo", "--help"], ["train_net.py", "--help"], ["-m", "unsam.app", "--help"]],
    ids=["pseudo", "train_net", "app"],
)
def test_help_prints_no_future_warning(command):
    """Was: two ``torch.jit.script`` FutureWarnings (fvcore, detectron2 at import) on every
    command."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, *command],
        cwd=REPO_ROOT,
        env=dict(env, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "usage:" in done.stdout
    assert "Warning" not in done.stderr, done.stderr


def _double(x: int) -> int:
    return 2 * x


def test_only_the_jit_script_notice_is_silenced():
    """The filter is narrow: torch.jit.script's deprecation notice goes, other FutureWarnings
    stay."""
    import warnings

    from unsam.compat import silence_jit_script_notice

    import torch

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every warning shows (pytest's own filters aside) ...
        silence_jit_script_notice()  # ... but the one the project hides
        assert torch.jit.script(_double)(3) == 6
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


# ----------------------------------------------------------------------------- 4. compile notice
@pytest.fixture()
def fake_compiler(monkeypatch, tmp_path):
    """``torch.utils.cpp_extension.load`` replaced (no compile); the build cache in ``tmp_path``."""
    import torch.utils.cpp_extension as cpp

    calls = []
    monkeypatch.setattr(
        cpp, "load", lambda **kwargs: calls.append(kwargs) or SimpleNamespace(name="kernels")
    )
    monkeypatch.setattr(ops, "build_dir", lambda: tmp_path / "unsam_cpu_kernels")
    monkeypatch.setattr(ops, "_module", ops._UNSET)
    monkeypatch.setenv("UNSAM_CPU_KERNELS", "1")
    return calls


def _notices(caplog) -> list:
    return [r for r in caplog.records if r.name == "unsam.ops" and "compiling" in r.getMessage()]


def test_first_build_says_it_compiles_once(fake_compiler, tmp_path, caplog):
    """Was: 18 s of silence on the first run (0.13 s once cached)."""
    caplog.set_level(logging.DEBUG, logger="unsam.ops")
    assert ops.cpu_kernels().name == "kernels" and ops.cpu_kernels().name == "kernels"
    notices = _notices(caplog)
    assert len(fake_compiler) == 1 and len(notices) == 1  # once per process, however many callers
    assert notices[0].levelno == logging.WARNING  # shown at every CLI's default level
    text = notices[0].getMessage()
    assert "once" in text and "20-40 s" in text and str(tmp_path / "unsam_cpu_kernels") in text


def test_cached_build_loads_silently(fake_compiler, tmp_path, caplog):
    cache = tmp_path / "unsam_cpu_kernels"
    cache.mkdir()
    library = cache / "unsam_cpu_kernels.so"
    library.write_bytes(b"")
    caplog.set_level(logging.DEBUG, logger="unsam.ops")
    ops.build()
    assert _notices(caplog) == []
    os.utime(library, (0, 0))  # older than the source: torch rebuilds it, so we say so
    ops.build()
    assert len(_notices(caplog)) == 1
