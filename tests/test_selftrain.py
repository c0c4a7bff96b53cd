"""Self-training (``python -m unsam.selftrain``): a model's predictions in the score band,
de-duplicated, become SA-1B labels the trainer loads; resumable and sharded; merged with the
previous round by the UnSAM+ rule; bad input is one error line.

The model is the tiny config with random weights (saved by the fixture): its 50 masks per image
overlap heavily (IoU ~0.9), so the de-duplication has work to do. Every expectation is computed
here, independently, from the predictor's raw output with a numpy IoU."""

import json
import shutil
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch

from unsam.data.synthetic import make_shapes_dataset
from unsam.io.sa1b import annotation_from_mask, read_sa1b_json, rle_to_mask, write_sa1b_json
from unsam.selftrain import main as selftrain_main
from unsam.utils.images import read_rgb
from unsam.utils.threads import torch_threads

from .test_reliability import _one_error_line

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "unsam_tiny.yaml"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from detectron2.modeling import build_model

    import unsam.modeling  # noqa: F401
    from unsam.config.loading import load_config

    torch.manual_seed(0)
    model = build_model(load_config(str(TINY), ["MODEL.DEVICE", "cpu"]))
    path = tmp_path_factory.mktemp("weights") / "round1.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Three synthetic photos with SA-1B JSONs (a dataset root), and a folder of the photos
    alone."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "root", 3, size=64, seed=1)
    photos = tmp_path_factory.mktemp("photos")
    for p in root.glob("*.png"):
        shutil.copy(p, photos / p.name)
    return root, photos


@pytest.fixture(scope="module")
def raw(weights, shapes):
    """The predictor's own output per photo: (masks N×H×W bool, float scores), on one thread
    as the runner labels."""
    from unsam.config.loading import load_config
    from unsam.predictor import WholeImagePredictor

    cfg = load_config(str(TINY), ["MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"])
    predictor = WholeImagePredictor.from_config(cfg)
    out = {}
    with torch_threads(1):
        for p in sorted(shapes[1].glob("*.png")):
            inst = predictor(read_rgb(p))
            out[p.stem] = (
                inst.pred_masks.numpy().astype(bool),
                [float(s) for s in inst.scores.numpy()],
            )
    return out


def _iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _expected(masks, scores, low, high, dedup):
    """The documented rule, written out: best first, low < s <= high, non-empty, greedy IoU <=
    dedup."""
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if (
            low < scores[i] <= high
            and masks[i].any()
            and all(_iou(masks[i], masks[k]) <= dedup for k in kept)
        ):
            kept.append(i)
    return kept


def _argv(weights, inp, out, *extra):
    return [
        "--config-file",
        str(TINY),
        "--weights",
        str(weights),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


def test_band_and_dedup_hold_and_the_trainer_loads_the_labels(weights, shapes, raw, tmp_path):
    root, photos = shapes
    all_scores = sorted(s for _, sc in raw.values() for s in sc)
    # band edges on actual scores: the one equal to low is out, the one equal to high is in
    low, high = all_scores[len(all_scores) // 4], all_scores[3 * len(all_scores) // 4]
    out = tmp_path / "round2"
    assert (
        selftrain_main(
            _argv(weights, photos, out, "--score-low", repr(low), "--score-high", repr(high))
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.json")) == sorted(f"{s}.json" for s in raw)
    dropped_as_duplicate = 0
    for stem, (masks, scores) in raw.items():
        labels = read_sa1b_json(out / f"{stem}.json")
        keep = _expected(masks, scores, low, high, 0.9)
        got = labels["annotations"]
        assert [a["predicted_iou"] for a in got] == [scores[i] for i in keep]
        for a, i in zip(got, keep):
            assert np.array_equal(rle_to_mask(a["segmentation"]), masks[i])
            assert a["source"] == "model" and a["level"] == 0
        assert all(low < a["predicted_iou"] <= high for a in got)
        got_masks = [rle_to_mask(a["segmentation"]) for a in got]
        assert all(_iou(x, y) <= 0.9 for j, x in enumerate(got_masks) for y in got_masks[:j])
        in_band = [i for i, s in enumerate(scores) if low < s <= high]
        dropped_as_duplicate += len(in_band) - len(keep)
        assert labels["image"]["file_name"] == str(photos / f"{stem}.png")
    assert dropped_as_duplicate > 0  # the de-duplication was exercised, not vacuous
    assert low in {s for _, sc in raw.values() for s in sc} and high in {
        s for _, sc in raw.values() for s in sc
    }
    settings = json.loads((out / "selftrain_settings.txt").read_text())
    assert (
        settings["score_low"] == low
        and settings["dedup_iou"] == 0.9
        and len(settings["weights_sha256"]) == 64
    )

    # the next round: the trainer's own loader reads the folder named in UNSAM.DATA.SA1B_ROOTS
    from detectron2.data import DatasetCatalog

    from unsam.config.loading import load_config
    from unsam.engine.trainer import load_train_dicts, register_datasets

    cfg = load_config(
        str(TINY),
        [
            "UNSAM.DATA.SA1B_ROOTS",
            json.dumps([f"selftrain_round2:{out}"]),
            "DATASETS.TRAIN",
            '("selftrain_round2",)',
            "DATASETS.TEST",
            "()",
        ],
    )
    register_datasets(cfg)
    try:
        dicts = load_train_dicts(cfg)
    finally:
        DatasetCatalog.remove("selftrain_round2")
    assert len(dicts) == 3
    by_file = {Path(d["file_name"]).stem: d for d in dicts}
    for stem, (masks, scores) in raw.items():
        keep = _expected(masks, scores, low, high, 0.9)
        assert [a["predicted_iou"] for a in by_file[stem]["annotations"]] == [
            scores[i] for i in keep
        ]


def test_resume_and_shards_give_the_same_files(weights, shapes, tmp_path):
    root, photos = shapes
    full, resumed, sharded = tmp_path / "full", tmp_path / "resumed", tmp_path / "sharded"
    assert selftrain_main(_argv(weights, photos, full, "--dedup-iou", "0.8")) == 0
    # a run stopped after one image (--end-id 1), with a half-written file of the next left behind
    assert (
        selftrain_main(_argv(weights, photos, resumed, "--dedup-iou", "0.8", "--end-id", "1")) == 0
    )
    second = sorted(photos.glob("*.png"))[1].stem
    (resumed / f".{second}.json.dead.tmp").write_text('{"image": {')
    assert selftrain_main(_argv(weights, photos, resumed, "--dedup-iou", "0.8")) == 0
    for i in (0, 1):
        assert (
            selftrain_main(
                _argv(weights, photos, sharded, "--dedup-iou", "0.8", "--shard", f"{i}/2")
            )
            == 0
        )
    for folder in (resumed, sharded):
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in full.iterdir())
        for f in full.iterdir():
            assert f.read_bytes() == (folder / f.name).read_bytes(), (folder, f.name)
    # other settings into a finished folder: refused by name, nothing rewritten
    before = {f.name: f.read_bytes() for f in full.iterdir()}
    assert selftrain_main(_argv(weights, photos, full, "--dedup-iou", "0.7")) == 2
    assert {f.name: f.read_bytes() for f in full.iterdir()} == before


def test_dataset_root_input_and_merge_with_previous_round(weights, shapes, raw, tmp_path):
    """--input a dataset root (its JSONs point at the photos) and --previous an earlier round
    (the model's 5 best masks per photo): every old label kept first, a new one added exactly
    when its IoU with every old one is below the threshold."""
    root, photos = shapes
    previous, out = tmp_path / "round1", tmp_path / "round2"
    assert selftrain_main(_argv(weights, photos, previous, "--max-masks", "5")) == 0
    # the threshold splits the new masks: the median of their IoU with the closest old one
    closest = [
        max(
            _iou(masks[i], rle_to_mask(a["segmentation"]))
            for a in read_sa1b_json(previous / f"{stem}.json")["annotations"]
        )
        for stem, (masks, scores) in raw.items()
        for i in _expected(masks, scores, 0.0, 1.0, 0.9)
    ]
    threshold = float(np.median([c for c in closest if c < 1]))
    assert (
        selftrain_main(
            _argv(
                weights,
                root,
                out,
                "--previous",
                str(previous),
                "--max-iou-with-previous",
                repr(threshold),
            )
        )
        == 0
    )
    n_added = n_predicted = 0
    for stem, (masks, scores) in raw.items():
        assert (
            read_sa1b_json(out / f"{stem}.json")["image"]["image_id"]
            == read_sa1b_json(root / f"{stem}.json")["image"]["image_id"]
        )
        old = read_sa1b_json(previous / f"{stem}.json")
        new = read_sa1b_json(out / f"{stem}.json")
        assert new["image"]["file_name"] == str((root / f"{stem}.png").absolute())
        n_old = len(old["annotations"])
        assert new["annotations"][:n_old] == old["annotations"]
        old_masks = [rle_to_mask(a["segmentation"]) for a in old["annotations"]]
        predicted = [i for i in _expected(masks, scores, 0.0, 1.0, 0.9)]
        added = [i for i in predicted if all(_iou(masks[i], m) < threshold for m in old_masks)]
        n_added, n_predicted = n_added + len(added), n_predicted + len(predicted)
        got = new["annotations"][n_old:]
        assert [a["predicted_iou"] for a in got] == [scores[i] for i in added]
        assert all(
            np.array_equal(rle_to_mask(a["segmentation"]), masks[i]) for a, i in zip(got, added)
        )
        ids = [a["id"] for a in new["annotations"]]
        assert len(set(ids)) == len(ids)
    assert (
        0 < n_added < n_predicted - 15
    )  # some new masks added, some dropped besides the 15 old ones


def test_unreadable_image_of_a_dataset_root_is_listed(weights, shapes, tmp_path):
    root, _ = shapes
    data = tmp_path / "data"
    shutil.copytree(root, data)
    first = sorted(data.glob("*.json"))[0]
    first.with_suffix(".png").unlink()  # its image is gone
    out = tmp_path / "out"
    assert selftrain_main(_argv(weights, data, out, "--max-masks", "2")) == 0
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(first)) and "not found" in failed[0]
    assert (
        sorted(p.name for p in out.glob("*.json"))
        == sorted(p.name for p in data.glob("*.json"))[1:]
    )
    assert all(len(read_sa1b_json(p)["annotations"]) <= 2 for p in out.glob("*.json"))


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--score-low", "0.6", "--score-high", "0.4"], "--score-low 0.6"),
        (["--score-low", "0.5", "--score-high", "0.5"], "--score-low 0.5"),
        (["--score-high", "1.5"], "--score-high 1.5"),
        (["--score-low", "-0.1"], "--score-low -0.1"),
        (["--score-low", "nan"], "--score-low nan"),
        (["--dedup-iou", "0"], "--dedup-iou 0"),
        (["--max-masks", "0"], "--max-masks 0"),
        (["--max-iou-with-previous", "0.3"], "needs --previous"),
        (["--previous", "/no/such/round"], "--previous"),
        (["--shard", "2/2"], "--shard 2/2"),
        (["--workers", "0"], "--workers 0"),
        (["--device", "tpu"], "--device"),
        (["--score-low", "low"], "--score-low"),
    ],
)
def test_bad_options_are_one_error_line(weights, shapes, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert selftrain_main(_argv(weights, shapes[1], out, *extra)) == 2
    _one_error_line(capsys.readouterr().err, named)
    assert not out.exists()


def test_bad_files_are_one_error_line(weights, shapes, tmp_path, capsys):
    root, photos = shapes
    out = tmp_path / "out"
    cases = [
        (["--weights", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--config-file", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (["--input", str(tmp_path / "no_photos")], "no_photos"),
        (["--opts", "MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
    ]
    for extra, named in cases:
        argv = _argv(weights, photos, out)
        for k in range(0, len(extra) - 1, 2):
            if extra[k] in argv:
                argv[argv.index(extra[k]) + 1] = extra[k + 1]
            else:
                argv += extra[k:]
                break
        assert selftrain_main(argv) == 2, extra
        _one_error_line(capsys.readouterr().err, named)
        assert not out.exists()
    # an output that is the input dataset root (its labels would be replaced) or the previous round
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert selftrain_main(_argv(weights, root, root)) == 2
    _one_error_line(capsys.readouterr().err, "--output", "--input")
    assert selftrain_main(_argv(weights, photos, root / "round2", "--previous", str(root))) == 2
    _one_error_line(capsys.readouterr().err, "--output", "--previous")
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    # weights of another model: one line from the checkpoint reader
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 3, 3)}}, foreign)
    assert selftrain_main(_argv(foreign, photos, out)) == 2
    _one_error_line(capsys.readouterr().err, "foreign.pth")
    assert not out.exists()


def test_labels_of_a_pseudo_folder_are_not_mixed(weights, shapes, tmp_path, capsys):
    out = tmp_path / "pseudo"
    out.mkdir()
    (out / "pseudo_settings.txt").write_text("{}")
    write_sa1b_json(
        out / "a.json",
        {"image_id": 0, "width": 4, "height": 4, "file_name": "a.png"},
        [annotation_from_mask(np.ones((4, 4), bool), 0)],
    )
    assert selftrain_main(_argv(weights, shapes[1], out)) == 2
    _one_error_line(capsys.readouterr().err, "unsam.pseudo")


@pytest.mark.slow
def test_make_selftrain_cut_down(tmp_path, tiny_train, tiny_val):
    """``scripts/selftrain.py`` end to end on 3 photos per set, 2 iterations per round (~3.5 min):
    every figure of the report present, and a rerun trains nothing again."""
    import math
    import os
    import subprocess
    import sys

    out = tmp_path / "st"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "selftrain.py"),
        "--output",
        str(out),
        "--iters",
        "2",
        "--max-images",
        "3",
        "--workers",
        "1",
        "--shared",
        str(tiny_train.parent),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:] + (out / "selftrain.log").read_text()[-3000:]
    report = (out / "REPORT.md").read_text()
    rows = [
        line
        for line in report.splitlines()
        if line.startswith("| ") and "labels / model" not in line
    ]
    assert len(rows) == 7  # val: labels, round 1, round 2; train: the same + the round-1 labels
    for row in rows:
        values = [float(c) for c in [c.strip() for c in row.strip("|").split("|")][1:]]
        assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values)
    assert report.count("Round 2 − round 1:") == 2
    labels = sorted((out / "round1_labels").glob("*.json"))
    assert len(labels) == 3 and all(read_sa1b_json(p)["annotations"] for p in labels)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert again.returncode == 0
    assert "[train round" not in again.stderr and "[evaluate round" not in again.stderr
