"""Issue 26, the pseudo-label engine (``python -m unsam.pseudo``): what a user hands it — other
shards' folders, other settings, symbolic links, a signal, out-of-range numbers, a full disk —
is named and refused or survived, never a traceback, never silently mixed or lost."""

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
from PIL import Image

from unsam.io.sa1b import read_sa1b_json
from unsam.pseudo import runner
from unsam.pseudo.__main__ import main as pseudo_main
from unsam.pseudo.labelers import RECIPES

from .conftest import REPO_ROOT
from .test_reliability import SMALL_PSEUDO, _one_error_line

SETTINGS = "pseudo_settings.txt"  # the documented name


def _images(folder: Path, n: int, size: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"img_{i}.png"
        )
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return _images(tmp_path / "images", 2)


def _main(argv) -> int:
    """The CLI's exit status, whether it returns it or argparse exits with it."""
    try:
        return pseudo_main(argv)
    except SystemExit as e:
        return e.code


def _failure_lines(out: Path):
    return sorted(line for f in out.glob("failed*.txt") for line in f.read_text().splitlines())


# ------------------------------------------------------------------ 1. failures across shards/runs
def test_shard_keeps_the_other_shards_failures(images, tmp_path):
    """Was: shard 1 (no failures) deleted the failed.txt written by shard 0 into the same folder."""
    (images / "img_2.jpg").write_bytes(b"not an image")  # index 2: shard 0 of 2
    out = tmp_path / "out"
    for i in range(2):
        assert (
            pseudo_main(
                ["--input", str(images), "--output", str(out), "--shard", f"{i}/2"] + SMALL_PSEUDO
            )
            == 0
        )
    lines = _failure_lines(out)
    assert len(lines) == 1 and lines[0].startswith(str(images / "img_2.jpg") + "\t")
    assert (out / "failed.shard-0-of-2.txt").exists() and not (out / "failed.txt").exists()
    # shard 0 again, still broken: one line, not two; repaired: the line (and the file) goes
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--shard", "0/2"] + SMALL_PSEUDO)
        == 0
    )
    assert len(_failure_lines(out)) == 1
    Image.new("RGB", (64, 64), "red").save(images / "img_2.jpg", format="PNG")
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--shard", "0/2"] + SMALL_PSEUDO)
        == 0
    )
    assert _failure_lines(out) == [] and (out / "img_2.json").exists()


def test_rerun_of_a_slice_keeps_failures_outside_it(images, tmp_path, capsys):
    """Was: a rerun of --end-id 2 that labelled anything deleted the failure of image 2."""
    (images / "img_2.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO) == 0
    (out / "img_0.json").unlink()  # to be labelled again by the slice
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--end-id", "2"] + SMALL_PSEUDO)
        == 0
    )
    lines = (out / "failed.txt").read_text().splitlines()
    assert len(lines) == 1 and "img_2.jpg" in lines[0]
    assert "1 labelled, 1 already done, 0 failed" in capsys.readouterr().out


# ------------------------------------------------------------------ 2. settings recorded per folder
def test_rerun_with_other_settings_is_refused(images, tmp_path, capsys):
    """Was: the rerun skipped the finished images and labelled the rest with the new settings."""
    out = tmp_path / "out"
    assert (
        pseudo_main(
            ["--input", str(images), "--output", str(out), "--max-masks", "10", "--end-id", "1"]
            + SMALL_PSEUDO
        )
        == 0
    )
    recorded = json.loads((out / SETTINGS).read_text())
    assert recorded["max_masks"] == 10 and "device" not in recorded
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--seed", "3"] + SMALL_PSEUDO)
        == 2
    )
    _one_error_line(
        capsys.readouterr().err, str(out), "--max-masks 10 -> 500", "--seed 0 -> 3", "--output"
    )
    assert {
        p.name: p.read_bytes() for p in out.iterdir()
    } == before  # nothing labelled or rewritten
    # the same settings resume (other run options may differ)
    assert (
        pseudo_main(
            [
                "--input",
                str(images),
                "--output",
                str(out),
                "--max-masks",
                "10",
                "--workers",
                "1",
                "--device",
                "cpu",
            ]
            + SMALL_PSEUDO
        )
        == 0
    )
    assert "1 labelled, 1 already done" in capsys.readouterr().out


def test_folder_from_before_the_record_warns_once_and_records(images, tmp_path, caplog):
    out = tmp_path / "out"
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--end-id", "1"] + SMALL_PSEUDO)
        == 0
    )
    (out / SETTINGS).unlink()  # as written before settings were recorded
    caplog.clear()
    assert (
        pseudo_main(
            ["--input", str(images), "--output", str(out), "--max-masks", "20"] + SMALL_PSEUDO
        )
        == 0
    )
    warnings = [r.getMessage() for r in caplog.records if SETTINGS in r.getMessage()]
    assert len(warnings) == 1 and str(out) in warnings[0]
    assert json.loads((out / SETTINGS).read_text())["max_masks"] == 20
    assert (
        pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO) == 2
    )  # now recorded


def test_unreadable_settings_record_is_one_error(images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / SETTINGS).write_text("{not json")
    assert pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO) == 2
    _one_error_line(capsys.readouterr().err, SETTINGS)
    assert (out / SETTINGS).read_text() == "{not json"  # the file is left as it was


def test_recorded_weight_paths_do_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    from unsam.pseudo.classical import ClassicalSettings

    record = RECIPES["classical"].record
    monkeypatch.chdir(tmp_path)
    relative = record(ClassicalSettings(dino_weights="w/dino.pth"))
    assert relative == record(ClassicalSettings(dino_weights=str(tmp_path / "w" / "dino.pth")))
    url = "https://x/dino.pth"
    assert record(ClassicalSettings(dino_weights=url))["dino_weights"] == url


# ------------------------------------------------------------------ 3. symbolic links
def test_symlinked_image_is_labelled_under_its_own_name(tmp_path):
    """Was: labelled as <target stem>.json with the target's path in file_name."""
    store = _images(tmp_path / "store", 1)
    given = tmp_path / "given"
    given.mkdir()
    (given / "photo.png").symlink_to(store / "img_0.png")
    (given / "gone.png").symlink_to(
        store / "deleted.png"
    )  # dangling: a named failure, not left out
    out = tmp_path / "out"
    assert pseudo_main(["--input", str(given), "--output", str(out)] + SMALL_PSEUDO) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["photo.json"]
    assert read_sa1b_json(out / "photo.json")["image"]["file_name"] == str(given / "photo.png")
    assert (out / "failed.txt").read_text().startswith(str(given / "gone.png") + "\t")


def test_two_names_for_one_output_still_refused(tmp_path, capsys):
    """A link ``a.jpg`` to ``a.png`` is a second image named ``a``: refused by name, as before
    for two files (was: the link was merged into its target without a word)."""
    given = _images(tmp_path / "given", 1)
    (given / "img_0.jpg").symlink_to(given / "img_0.png")
    assert (
        pseudo_main(["--input", str(given), "--output", str(tmp_path / "out")] + SMALL_PSEUDO) == 2
    )
    _one_error_line(capsys.readouterr().err, "img_0.json", "img_0.jpg", "img_0.png")


# ------------------------------------------------------------------ 4. SIGTERM / SIGINT
def test_sigterm_stops_the_workers_before_the_parent_exits(tmp_path):
    """Was: the parent died at once, its workers labelled on and wrote files seconds later."""
    images = _images(tmp_path / "images", 48)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "unsam.pseudo",
        "--input",
        str(images),
        "--output",
        str(out),
        "--workers",
        "2",
    ] + SMALL_PSEUDO
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 180
            while not list(out.glob("img_*.json")):
                assert proc.poll() is None and time.time() < deadline, Path(err.name).read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr = Path(err.name).read_text()
    assert "Traceback" not in stderr, stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and "again to resume" in stopped[0], stderr
    files = sorted(p.name for p in out.iterdir())
    time.sleep(3)
    assert sorted(p.name for p in out.iterdir()) == files  # no worker wrote after the parent exited
    labels = [n for n in files if n.endswith(".json")]
    assert 0 < len(labels) < 48 and not [n for n in files if n.endswith(".tmp")], files
    for name in labels:
        read_sa1b_json(out / name)  # every finished-looking file is whole


def test_sigint_stops_an_in_process_run_and_keeps_its_failures(
    images, tmp_path, capsys, monkeypatch
):
    """Ctrl-C: one ``stopped`` line and status 130, failures so far listed, handlers given back."""
    (images / "a_broken.bmp").write_bytes(b"broken")  # sorted first: fails before the stop
    calls = []

    def labeler_then_ctrl_c(image):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
        return []

    classical = RECIPES["classical"]
    monkeypatch.setitem(
        RECIPES,
        "classical",
        dataclasses.replace(classical, labeler=lambda cfg: labeler_then_ctrl_c),
    )
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    try:
        rc = pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the run as a KeyboardInterrupt")
    assert rc == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped by SIGINT after labelling 0 images" in err
    assert len(calls) == 1 and not list(out.glob("*.json")) and not list(out.glob(".*.tmp"))
    assert "a_broken.bmp" in (out / "failed.txt").read_text()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ------------------------------------------------------------------ 5. numbers out of range
@pytest.mark.parametrize(
    "argv, named",
    [
        (["--max-masks", "0"], "--max-masks 0"),
        (["--max-masks", "-5"], "--max-masks -5"),
        (["--start-id", "5", "--end-id", "2"], "--end-id 2"),
        (["--start-id", "-3"], "--start-id -3"),
        (["--workers", "-2"], "--workers -2"),
        (["--workers", "0"], "--workers 0"),
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**40)], "--seed"),
        (["--shard", "2/2"], "--shard 2/2"),
        (["--shard=-1/2"], "--shard -1/2"),
        (["--resolution", "0"], "--resolution 0"),
        (["--crop-resolution", "-64"], "--crop-resolution -64"),
        (["--tau", "nan"], "--tau nan"),
        (["--thresholds", "0.5", "7"], "--thresholds"),
        (["--max-area-frac", "0"], "--max-area-frac 0"),
        (["--variants", "0,0.5"], "BANDWIDTH"),
        (["--superpixels", "0"], "--superpixels 0"),
        (["--polish-rounds", "-1"], "--polish-rounds -1"),
    ],
)
def test_out_of_range_number_is_one_error_line(images, tmp_path, capsys, monkeypatch, argv, named):
    """Was (most): accepted, e.g. --max-masks 0 wrote empty labels, --start-id 5 --end-id 2 exit
    0."""
    monkeypatch.setattr(runner, "_label_all", lambda *a, **k: pytest.fail("labelling started"))
    out = tmp_path / "out"
    assert _main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO + argv) == 2
    _one_error_line(capsys.readouterr().err, named)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--recipe", "unsam", "--conquer-size", "0"], "--conquer-size 0"),
        (["--recipe", "unsam", "--divide-score", "2"], "--divide-score 2"),
        # a setting of another recipe would be silently ignored: refused, naming its recipe
        (["--conquer-size", "64"], "--conquer-size is a setting of recipe unsam"),
        (["--recipe", "unsam", "--max-masks", "5"], "--max-masks is a setting of recipe classical"),
    ],
)
def test_recipe_setting_problem_is_one_error_line(
    images, tmp_path, capsys, monkeypatch, argv, named
):
    monkeypatch.setattr(runner, "_label_all", lambda *a, **k: pytest.fail("labelling started"))
    out = tmp_path / "out"
    assert _main(["--input", str(images), "--output", str(out), "--quiet"] + argv) == 2
    _one_error_line(capsys.readouterr().err, named)
    assert not out.exists()


def test_usage_error_is_one_line(images, tmp_path, capsys):
    """argparse's own errors (a word for a number) follow the one-line rule too."""
    assert _main(["--input", str(images), "--output", str(tmp_path / "o"), "--workers", "two"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "--workers", "two")
    assert err.count("\n") == 1 and "usage" not in err


# ------------------------------------------------------------------ 6. full disk
def _disk_full(only=None):
    """``atomic_write`` on a full disk (for the file ``only``, or every file): the first byte,
    then ENOSPC."""
    real = runner.atomic_write

    @contextlib.contextmanager
    def writer(path, mode="w"):
        with real(path, mode) as f:
            if only is None or Path(path) == Path(only):
                f.write(b"{" if "b" in mode else "{")
                f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            yield f

    return writer


def test_full_disk_stops_the_run_with_one_line(images, tmp_path, capsys, monkeypatch):
    """Was: every image listed as failed, then a traceback from writing failed.txt."""
    from unsam.io import sa1b

    labelled = []
    real_label = runner._label
    monkeypatch.setattr(
        runner, "_label", lambda task, lab: labelled.append(task.path) or real_label(task, lab)
    )
    monkeypatch.setattr(sa1b, "atomic_write", _disk_full())  # every label write
    out = tmp_path / "out"
    assert pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO) == 2
    _one_error_line(
        capsys.readouterr().err, str(out / "img_0.json"), "No space left on device", "ENOSPC"
    )
    assert len(labelled) == 1  # stopped at the first write, not tried on every image
    assert sorted(p.name for p in out.iterdir()) == [SETTINGS]  # no part, no failed.txt


def test_full_disk_when_listing_failures_is_one_line(images, tmp_path, capsys, monkeypatch):
    (images / "img_2.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "atomic_write", _disk_full(out / "failed.txt"))
    assert pseudo_main(["--input", str(images), "--output", str(out)] + SMALL_PSEUDO) == 2
    _one_error_line(capsys.readouterr().err, str(out / "failed.txt"), "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["img_0.json", "img_1.json", SETTINGS]


def test_failed_write_in_a_worker_stops_the_run(tmp_path):
    """The same with ``--workers 2``: the error comes from a worker process (here a real one: a
    file-size limit makes every label write fail with EFBIG), the pool is terminated."""
    import resource

    def file_size_limit():  # in the child, before exec: inherited by its workers
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # the settings record fits

    images = _images(tmp_path / "images", 4)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unsam.pseudo",
            "--input",
            str(images),
            "--output",
            str(out),
            "--workers",
            "2",
        ]
        + SMALL_PSEUDO,
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=file_size_limit,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    _one_error_line(proc.stderr, str(out / "img_"), "File too large")
    assert sorted(p.name for p in out.iterdir()) == [SETTINGS]
