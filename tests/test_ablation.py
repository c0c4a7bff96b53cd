"""The ViSA/ATS ablation (issue 19): the nested-scenes generator, the benchmark end to end at a toy
budget (per-run JSONs, resume, --jobs children, summary files, bad input) and the computed
"exceeds the seed spread" verdict on hand-made results."""

import importlib.util
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from unsam.data.sa1b import load_sa1b_dicts
from unsam.data.synthetic import make_nested_scenes_dataset
from unsam.io.sa1b import rle_to_mask

from .conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "ablate_visa_ats", REPO_ROOT / "benchmarks" / "ablate_visa_ats.py"
)
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)
report = ablate.report


@pytest.fixture(autouse=True)
def _keep_logger_levels():
    """main() quiets detectron2's and unsam's loggers; other tests' log captures must not see
    that."""
    names = ("detectron2", "fvcore", "unsam", "d2", "ablate_visa_ats")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


TOY = [
    "--iters",
    "4",
    "--batch",
    "2",
    "--train-images",
    "16",
    "--val-images",
    "6",
    "--image-size",
    "64",
    "--eval-period",
    "2",
    "--device",
    "cpu",
]


# ---------------------------------------------------------------------------------------------
# nested scenes
# ---------------------------------------------------------------------------------------------
def _files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_nested_scenes_are_valid_sa1b_with_three_levels(tmp_path):
    root = make_nested_scenes_dataset(tmp_path / "a", 12, size=96, seed=3)
    dicts = load_sa1b_dicts(root)
    assert len(dicts) == 12
    levels = set()
    for d in dicts:
        by_id = {a["id"]: a for a in d["annotations"]}
        masks = {a["id"]: rle_to_mask(a["segmentation"]) for a in d["annotations"]}
        for a in d["annotations"]:
            levels.add(a["level"])
            assert masks[a["id"]].any()
            if a["level"] == 0:
                assert a["parent_id"] == -1
                continue
            parent = by_id[a["parent_id"]]
            assert parent["level"] == a["level"] - 1
            assert not (masks[a["id"]] & ~masks[a["parent_id"]]).any()  # inside its parent
    assert levels == {0, 1, 2}


def test_nested_scenes_colour_edges_and_boundaries_disagree(tmp_path):
    """Textures and background patches make strong colour edges that bound no mask."""
    root = make_nested_scenes_dataset(tmp_path, 6, size=96, seed=5)
    off_boundary = []
    for d in load_sa1b_dicts(root):
        image = cv2.imread(d["file_name"], cv2.IMREAD_GRAYSCALE).astype(np.float32)
        edges = (
            np.hypot(cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1)) > 150
        )
        boundary = np.zeros(edges.shape, bool)
        for a in d["annotations"]:
            m = rle_to_mask(a["segmentation"]).astype(np.uint8)
            boundary |= cv2.morphologyEx(m, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)).astype(
                bool
            )
        off_boundary.append((edges & ~boundary).sum() / max(1, edges.sum()))
    assert np.mean(off_boundary) > 0.3


def test_nested_scenes_are_deterministic_per_seed(tmp_path):
    a = make_nested_scenes_dataset(tmp_path / "a", 4, size=64, seed=7)
    b = make_nested_scenes_dataset(tmp_path / "b", 4, size=64, seed=7)
    c = make_nested_scenes_dataset(tmp_path / "c", 4, size=64, seed=8)
    assert _files(a) == _files(b)
    assert [v for v in _files(a).values()] != [v for v in _files(c).values()]


# ---------------------------------------------------------------------------------------------
# the verdict, on hand-made results
# ---------------------------------------------------------------------------------------------
def test_exceeds_spread_rule():
    assert (
        report.exceeds_spread([0.60, 0.61, 0.62], [0.50, 0.52, 0.51]) is True
    )  # Δ 0.10 > range 0.02
    assert (
        report.exceeds_spread([0.49, 0.55, 0.53], [0.50, 0.52, 0.51]) is False
    )  # Δ 0.013 < range 0.06
    # ranges that do not overlap are not enough: Δ 0.75 < the wider range 1.0
    assert report.exceeds_spread([0.0, 1.0], [1.2, 1.3]) is False
    assert report.exceeds_spread([0.6], [0.5, 0.52]) is None  # one seed: no verdict


def _record(variant, seed, ar100, l1=0.3, curve=(0.1, 0.2)):
    metrics = lambda v: {"AR@10": v / 2, "AR@100": v, "AR@1000": v}  # noqa: E731
    final = {"nested_val": {"all": metrics(ar100), "L1": metrics(l1)}}
    evals = [
        {"iter": 2, "metrics": {"nested_val": {"all": metrics(curve[0])}}},
        {"iter": 4, "metrics": final},
    ]
    args = ablate.parse_args(TOY)
    ablate.check_args(args)
    return {
        "variant": variant,
        "label": ablate.VARIANTS[variant][0],
        "seed": seed,
        "budget": ablate.budget_of(args),
        "data": "hand-made",
        "seconds": 10.0 + seed,
        "evals": evals,
        "final": final,
        "schedule": {
            "base_lr": 0.0005,
            "steps": [3],
            "visa_end_iter": 2,
            "ats_start_iter": 1,
            "detections_per_image": 50,
            "num_queries": 50,
        },
    }


def test_summarize_and_markdown_on_hand_made_results():
    records = (
        [_record("plain", s, v) for s, v in zip((0, 1, 2), (0.50, 0.52, 0.51))]
        + [_record("visa", s, v) for s, v in zip((0, 1, 2), (0.60, 0.61, 0.62))]
        + [
            _record("ats", s, v, curve=(c, 0))
            for s, v, c in zip((0, 1, 2), (0.49, 0.55, 0.53), (0.0, 0.3, 0.6))
        ]
    )
    machine = {"cpu": "Some CPU", "torch": "2.x", "threads": 1, "device": "cpu"}
    for record in records[3:]:
        record["machine"] = machine
    summary = report.summarize(records, list(ablate.VARIANTS))
    assert summary["variants"] == ["plain", "visa", "ats"]
    assert summary["machines"] == [{"machine": None, "runs": 3}, {"machine": machine, "runs": 6}]
    st = summary["stats"]["visa"]["nested_val/all/AR@100"]
    assert st["mean"] == pytest.approx(0.61) and (st["min"], st["max"]) == (0.60, 0.62)
    visa = summary["comparisons"]["visa"]
    assert visa["nested_val/all/AR@100"]["exceeds"] is True
    assert visa["nested_val/all/AR@100"]["diff"] == pytest.approx(0.10)
    assert visa["nested_val/all/AR@100"]["spread"] == pytest.approx(0.02)
    assert visa["nested_val/L1/AR@100"]["exceeds"] is False  # identical values: Δ 0 = spread 0
    assert summary["comparisons"]["ats"]["nested_val/all/AR@100"]["exceeds"] is False
    curve = summary["curves"]["ats"]["nested_val"]
    assert curve["iters"] == [2, 4]
    assert curve["mean"][0] == pytest.approx(0.3) and (curve["min"][0], curve["max"][0]) == (
        0.0,
        0.6,
    )

    md = report.render_markdown(summary, [], "fig.png")
    # AR@1000 repeats AR@100 (50 detections per image): in the tables, not compared twice
    assert "nested_val/all/AR@1000" not in visa and report.redundant_ar(50) == {"AR@1000"}
    assert (
        "- +ViSA vs plain: exceeds the seed spread on nested_val all AR@10 (+5.0 > 1.0); "
        "nested_val all AR@100 (+10.0 > 2.0); within it on the other 2 metric(s)." in md
    )
    assert "- +ATS vs plain: within the seed spread on all 4 metrics." in md
    assert "**Result**: 2 of 8 differences exceed the seed spread." in md
    assert (
        "- **Machine**: 3 run(s) not noted (trained before the records noted it); "
        "6 run(s) on Some CPU (cpu), torch 2.x, 1 thread(s)." in md
    )
    assert "| variant | seeds | AR@10 | AR@100 (= AR@50) | AR@1000 (= AR@50) |" in md
    assert "| +ViSA | 3 | 30.5 (30.0–31.0) | 61.0 (60.0–62.0) | 61.0 (60.0–62.0) |" in md
    assert "AR@100 and AR@1000 both equal AR@50" in md


def test_docs_flag_moves_markdown_figure_and_run_records(tmp_path):
    args = ablate.parse_args(["--out", str(tmp_path), "--docs"])
    md, png, js = ablate.summary_paths(args)
    records = REPO_ROOT / "docs" / "ablation_runs"
    assert (md, png, js) == (
        REPO_ROOT / "docs" / "ablation.md",
        REPO_ROOT / "docs" / "ablation_ar.png",
        records / "ablation.json",
    )
    assert ablate.records_dir(args) == records
    assert ablate.records_dir(ablate.parse_args(["--out", str(tmp_path)])) == tmp_path
    pseudo = ablate.parse_args(["--out", str(tmp_path), "--docs", "--data", "pseudo"])
    assert ablate.summary_paths(pseudo)[:2] == (
        REPO_ROOT / "docs" / "ablation_pseudo.md",
        REPO_ROOT / "docs" / "ablation_pseudo_ar.png",
    )
    assert ablate.records_dir(pseudo) == REPO_ROOT / "docs" / "ablation_runs_pseudo"


def test_budget_paths_inside_the_repository_are_relative(tmp_path):
    args = ablate.parse_args(["--out", str(tmp_path)])
    ablate.check_args(args)
    assert ablate.budget_of(args)["config_file"] == "configs/tiny/unsam_tiny.yaml"
    args.config_file = str(tmp_path / "mine.yaml")
    assert ablate.budget_of(args)["config_file"] == str(tmp_path / "mine.yaml")


def test_pending_runs_go_seed_by_seed(tmp_path):
    args = ablate.parse_args(
        ["--out", str(tmp_path), "--variants", "plain", "visa", "--seeds", "0", "1"]
    )
    ablate.check_args(args)
    assert ablate.pending_runs(args) == [("plain", 0), ("visa", 0), ("plain", 1), ("visa", 1)]


# ---------------------------------------------------------------------------------------------
# end to end at a toy budget
# ---------------------------------------------------------------------------------------------
def test_benchmark_end_to_end_and_resume(tmp_path, caplog):
    out = tmp_path / "out"
    argv = TOY + ["--variants", "plain", "visa", "--seeds", "0", "1", "--out", str(out)]
    assert ablate.main(argv) == 0
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert runs == ["plain_seed0.json", "plain_seed1.json", "visa_seed0.json", "visa_seed1.json"]
    record = json.loads((out / "runs" / "visa_seed1.json").read_text())
    assert [e["iter"] for e in record["evals"]] == [2, 4]
    assert set(record["final"]["nested_val"]) >= {"all", "L0", "L1"}
    assert not list((out / "work").rglob("*.pth"))  # checkpoints are removed once recorded
    assert (
        record["machine"]["threads"] == 1
        and record["machine"]["torch"]
        and record["machine"]["cpu"]
    )
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["variants"] == ["plain", "visa"] and summary["seeds"] == [0, 1]
    assert "visa" in summary["comparisons"]
    md = (out / "ablation.md").read_text()
    assert "+ViSA vs plain:" in md and "![held-out AR@100" in md and "Wall time" in md
    assert (out / "ablation_ar.png").read_bytes()[:4] == b"\x89PNG"

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    with caplog.at_level("INFO", logger="ablate_visa_ats"):
        assert ablate.main(argv) == 0
    assert caplog.text.count("finished earlier") == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    invocations = json.loads((out / "invocations.json").read_text())
    assert [i["runs_trained"] for i in invocations] == [4, 0]

    (out / "ablation.md").unlink()
    assert ablate.main(["--out", str(out), "--summarize-only"]) == 0
    assert (out / "ablation.md").read_text() == md


def _losses(out: Path, run: str) -> list:
    rows = [
        json.loads(line) for line in (out / "work" / run / "metrics.json").read_text().splitlines()
    ]
    return [row["total_loss"] for row in rows if "total_loss" in row]


def test_benchmark_jobs_run_children_that_repeat_an_in_process_run(tmp_path):
    out, alone = tmp_path / "out", tmp_path / "alone"
    toy = TOY + ["--iters", "2", "--eval-period", "2", "--variants", "ats"]
    assert ablate.main(toy + ["--seeds", "0", "1", "--jobs", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == [
        "ats_seed0.json",
        "ats_seed1.json",
    ]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["ats_seed0.log", "ats_seed1.log"]
    # the same run in this process, at the same --threads: the same sums, bit for bit
    assert ablate.main(toy + ["--seeds", "1", "--out", str(alone)]) == 0
    assert _losses(alone, "ats_seed1")
    assert _losses(alone, "ats_seed1") == _losses(out, "ats_seed1") != _losses(out, "ats_seed0")


def test_terminated_ablation_logs_its_invocation(tmp_path):
    out = tmp_path / "out"
    argv = TOY + [
        "--iters",
        "100000",
        "--eval-period",
        "100000",
        "--variants",
        "plain",
        "--seeds",
        "0",
        "--out",
        str(out),
    ]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "benchmarks" / "ablate_visa_ats.py"), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        deadline = time.time() + 120
        while (
            "training 100000 iterations" not in (tmp_path / "log").read_text()
            and time.time() < deadline
        ):
            assert proc.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    (entry,) = json.loads((out / "invocations.json").read_text())
    assert entry["stopped"] == f"stopped (exit {128 + signal.SIGTERM})"
    assert (entry["runs_trained"], entry["runs_not_finished"]) == (0, 1)
    lines = report._md_commands([dict(entry, runs_trained=1)])[0]  # as when it had finished a run
    assert lines[-1].endswith(f"(stopped (exit {128 + signal.SIGTERM}))")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "plain", "bogus"], "unknown variant 'bogus'"),
        (["--data", "pseudo"], "--data pseudo needs --pseudo"),
        (["--pseudo", "/nonexistent/pseudo"], "--pseudo folder '/nonexistent/pseudo' not found"),
        (["--opts", "SOLVER.NOT_A_KEY", "1"], "SOLVER.NOT_A_KEY"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    assert ablate.main(TOY + ["--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_main_gives_the_callers_sigterm_handler_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert ablate.main(["--out", str(tmp_path), "--iters", "0"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_pseudo_without_shared_data_is_an_error(tmp_path, capsys, monkeypatch):
    make_nested_scenes_dataset(tmp_path / "pseudo", 2, size=64, seed=0)
    monkeypatch.setattr(ablate, "shared_data_dir", lambda: None)
    assert (
        ablate.main(TOY + ["--out", str(tmp_path / "out"), "--pseudo", str(tmp_path / "pseudo")])
        == 2
    )
    assert "error: shared data missing" in capsys.readouterr().err


def test_pseudo_data_trains_on_labels_and_redoes_runs_when_they_change(
    tmp_path, shared_data, caplog
):
    labels, out = tmp_path / "pseudo", tmp_path / "out"
    make_nested_scenes_dataset(labels, 4, size=64, seed=0)
    argv = TOY + [
        "--iters",
        "2",
        "--eval-period",
        "2",
        "--variants",
        "plain",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--pseudo",
        str(labels),
    ]
    assert ablate.main(argv) == 0
    record = json.loads((out / "runs" / "plain_seed0.json").read_text())
    assert set(record["final"]) == set(
        ablate.SHARED_SETS
    )  # held out: both shared sets' human masks
    assert record["budget"]["pseudo_sha256"] == ablate.pseudo_digest(str(labels))

    args = ablate.parse_args(argv)
    ablate.check_args(args)
    assert ablate.pending_runs(args) == []
    ablate.pseudo_digest.cache_clear()
    make_nested_scenes_dataset(labels, 4, size=64, seed=1)  # the labels written again, differently
    with caplog.at_level("INFO", logger="ablate_visa_ats"):
        assert ablate.pending_runs(args) == [("plain", 0)]
    assert "plain seed 0: finished earlier with another budget, redone" in caplog.text


def test_pseudo_digest_ignores_where_the_photos_lay(tmp_path):
    for folder, photos in (("a", "/data/photos"), ("b", "/elsewhere/photos")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.json").write_text(
            json.dumps(
                {
                    "image": {"file_name": f"{photos}/x.jpg", "width": 4, "height": 4},
                    "annotations": [],
                }
            )
        )
    assert ablate.pseudo_digest(str(tmp_path / "a")) == ablate.pseudo_digest(str(tmp_path / "b"))
    (tmp_path / "b" / "x.json").write_text(
        json.dumps(
            {
                "image": {"file_name": "/elsewhere/photos/y.jpg", "width": 4, "height": 4},
                "annotations": [],
            }
        )
    )
    ablate.pseudo_digest.cache_clear()
    assert ablate.pseudo_digest(str(tmp_path / "a")) != ablate.pseudo_digest(str(tmp_path / "b"))


def test_prompt_path_adds_one_click_miou_per_level(tmp_path):
    out = tmp_path / "out"
    assert (
        ablate.main(
            TOY
            + [
                "--iters",
                "2",
                "--eval-period",
                "2",
                "--variants",
                "ats",
                "--seeds",
                "0",
                "--prompt",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "runs" / "ats_seed0.json").read_text())
    assert record["budget"]["config_file"] == "configs/tiny/unsam_tiny_prompt.yaml"
    for subset in ("all", "L0", "L1"):
        metrics = record["final"]["nested_val"][subset]
        assert 0.0 <= metrics["mIoU_max"] <= metrics["mIoU_oracle"] <= 1.0
    assert "1-click mIoU (oracle)" in (out / "ablation.md").read_text()
