"""UnSAM+ merge (``python -m unsam.data.merge``): every human mask, plus exactly the pseudo masks
whose IoU with every human mask is below the threshold — checked against a direct numpy IoU on
synthetic masks — and an output the training loader reads."""

import csv
from pathlib import Path

import numpy as np
import pytest

from unsam.data.merge import main as merge_main
from unsam.data.merge import merge_annotations
from unsam.data.sa1b import load_sa1b_dicts
from unsam.data.synthetic import make_shapes_dataset
from unsam.io.sa1b import annotation_from_mask, read_sa1b_json, rle_to_mask, write_sa1b_json

from .test_reliability import _one_error_line

SIZE = 64


def _numpy_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _pseudo_masks(rng, human_masks):
    """Masks of every IoU with the human ones: copies, grown/shrunk versions (high IoU), slivers
    touching a human mask (tiny IoU), free rectangles (0), and nested pairs (parent/child)."""
    masks = []
    for h in human_masks:
        masks.append(h.copy())  # IoU 1
        ys, xs = np.nonzero(h)
        grown = np.zeros_like(h)
        grown[max(0, ys.min() - 2) : ys.max() + 3, max(0, xs.min() - 2) : xs.max() + 3] = True
        masks.append(grown)
        sliver = np.zeros_like(h)  # a thin band along the object's top edge: small positive IoU
        sliver[max(0, ys.min() - 3) : ys.min() + 1, xs.min() : xs.max() + 1] = True
        masks.append(sliver)
    for _ in range(8):
        m = np.zeros((SIZE, SIZE), bool)
        y, x = rng.integers(0, SIZE - 8, 2)
        m[y : y + rng.integers(3, 12), x : x + rng.integers(3, 12)] = True
        masks.append(m)
    return masks


@pytest.fixture
def roots(tmp_path):
    """A human root (synthetic shapes in SA-1B layout) and a pseudo root: three matched images,
    one with no pseudo file (human-only), one pseudo-only, one whose pseudo file has another
    size."""
    human = make_shapes_dataset(tmp_path / "human", 5, size=SIZE, seed=3)
    pseudo = tmp_path / "pseudo"
    rng = np.random.default_rng(0)
    names = sorted(p.stem for p in human.glob("*.json"))
    for name in names[:3]:
        record = read_sa1b_json(human / f"{name}.json")
        hmasks = [rle_to_mask(a["segmentation"]) for a in record["annotations"]]
        masks = _pseudo_masks(rng, hmasks)
        anns = [
            annotation_from_mask(m, k, predicted_iou=float(rng.random()), level=0)
            for k, m in enumerate(masks)
        ]
        anns[1]["parent_id"] = 0  # a hierarchy: child 1 of mask 0 (a copy of a human mask: dropped)
        anns[-1]["parent_id"] = len(anns) - 2  # child of a free rectangle (kept or not)
        write_sa1b_json(
            pseudo / f"{name}.json",
            {"image_id": 7, "width": SIZE, "height": SIZE, "file_name": f"/elsewhere/{name}.png"},
            anns,
        )
    # names[3]: human-only; names[4]: pseudo of another size
    write_sa1b_json(
        pseudo / f"{names[4]}.json",
        {"image_id": 8, "width": 32, "height": 32, "file_name": "x.png"},
        [annotation_from_mask(np.ones((32, 32), bool), 0)],
    )
    write_sa1b_json(
        pseudo / "only_pseudo.json",
        {"image_id": 9, "width": SIZE, "height": SIZE, "file_name": "y.png"},
        [annotation_from_mask(np.ones((SIZE, SIZE), bool), 0)],
    )
    return human, pseudo, names


@pytest.mark.parametrize("max_iou", [0.02, 0.5])
def test_merge_keeps_all_human_and_exactly_the_pseudo_masks_below_threshold(
    roots, tmp_path, capsys, max_iou
):
    human, pseudo, names = roots
    out = tmp_path / "merged"
    assert (
        merge_main(
            [
                "--human",
                str(human),
                "--pseudo",
                str(pseudo),
                "--output",
                str(out),
                "--max-iou",
                str(max_iou),
                "--quiet",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    total_added = 0
    for name in names[:3]:
        h = read_sa1b_json(human / f"{name}.json")
        p = read_sa1b_json(pseudo / f"{name}.json")
        m = read_sa1b_json(out / f"{name}.json")
        n_h = len(h["annotations"])
        assert m["annotations"][:n_h] == h["annotations"]  # every human mask, unchanged, first
        hmasks = [rle_to_mask(a["segmentation"]) for a in h["annotations"]]
        expected = [
            k
            for k, a in enumerate(p["annotations"])
            if all(_numpy_iou(rle_to_mask(a["segmentation"]), hm) < max_iou for hm in hmasks)
        ]
        added = m["annotations"][n_h:]
        assert [a["segmentation"] for a in added] == [
            p["annotations"][k]["segmentation"] for k in expected
        ]
        assert all(a["source"] == "pseudo" for a in added)
        ids = [a["id"] for a in m["annotations"]]
        assert len(set(ids)) == len(ids)
        # the rule is not vacuous here: some pseudo masks kept, some dropped
        assert 0 < len(expected) < len(p["annotations"])
        total_added += len(expected)
        # hierarchy follows its parent or is cut
        by_old = {p["annotations"][k]["id"]: a for k, a in zip(expected, added)}
        for k, a in zip(expected, added):
            parent = p["annotations"][k].get("parent_id", -1)
            assert a.get("parent_id", -1) == (by_old[parent]["id"] if parent in by_old else -1)
        assert Path(m["image"]["file_name"]).is_absolute()
        assert Path(m["image"]["file_name"]) == (human / f"{name}.png").absolute()
    # human-only and size mismatch: human masks only; pseudo-only: not written
    for name in names[3:]:
        assert (
            read_sa1b_json(out / f"{name}.json")["annotations"]
            == read_sa1b_json(human / f"{name}.json")["annotations"]
        )
    assert not (out / "only_pseudo.json").exists()
    rows = list(csv.DictReader(open(out / "merge_counts.csv")))
    assert [r["image"] for r in rows] == names
    assert [r["status"] for r in rows] == ["merged"] * 3 + ["human-only", "size-mismatch"]
    assert sum(int(r["pseudo_added"]) for r in rows) == total_added
    unmatched = (out / "merge_unmatched.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in unmatched) == [
        "human-only",
        "pseudo-only",
        "size-mismatch",
    ]
    assert any("only_pseudo.json" in line for line in unmatched)
    assert (
        f"{total_added} of" in summary and "1 pseudo-only" in summary and "1 human-only" in summary
    )
    # the trainer's loader reads it: every image, with human + added masks
    dicts = load_sa1b_dicts(out)
    assert len(dicts) == 5
    assert sum(len(d["annotations"]) for d in dicts) == sum(
        int(r["human_masks"]) + int(r["pseudo_added"]) for r in rows
    )


def test_merge_resumes_to_the_same_files(roots, tmp_path):
    human, pseudo, names = roots
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    argv = ["--human", str(human), "--pseudo", str(pseudo), "--max-iou", "0.3", "--quiet"]
    assert merge_main(argv + ["--output", str(full)]) == 0
    assert merge_main(argv + ["--output", str(resumed)]) == 0
    # a killed run: two outputs missing, one half-written temporary file left behind
    (resumed / f"{names[0]}.json").unlink()
    (resumed / f"{names[3]}.json").unlink()
    (resumed / f".{names[0]}.json.dead.tmp").write_text('{"image": ')
    (resumed / "merge_counts.csv").unlink()
    assert merge_main(argv + ["--output", str(resumed)]) == 0
    assert sorted(p.name for p in full.iterdir()) == sorted(p.name for p in resumed.iterdir())
    for f in full.iterdir():
        assert f.read_bytes() == (resumed / f.name).read_bytes(), f.name
    # another threshold into the same folder is refused by name
    assert (
        merge_main(
            [
                "--human",
                str(human),
                "--pseudo",
                str(pseudo),
                "--max-iou",
                "0.02",
                "--quiet",
                "--output",
                str(resumed),
            ]
        )
        == 2
    )


def test_merge_annotations_without_base_keeps_all():
    m = np.zeros((8, 8), bool)
    m[:4] = True
    extra = [annotation_from_mask(m, 0), annotation_from_mask(~m, 1)]
    merged, kept = merge_annotations([], extra, 0.02, "pseudo")
    assert kept == [0, 1] and [a["segmentation"] for a in merged] == [
        a["segmentation"] for a in extra
    ]


@pytest.mark.parametrize(
    "case, named",
    [
        ("missing_human", "--human"),
        ("empty_pseudo", "--pseudo"),
        ("max_iou_zero", "--max-iou 0.0"),
        ("max_iou_big", "--max-iou 1.5"),
        ("output_in_human", "--output"),
        ("duplicate_stem", "two label files"),
        ("word", "--max-iou"),
    ],
)
def test_merge_bad_input_is_one_error_line(roots, tmp_path, capsys, case, named):
    human, pseudo, names = roots
    out = tmp_path / "out"
    argv = {"human": str(human), "pseudo": str(pseudo), "output": str(out), "max-iou": "0.02"}
    if case == "missing_human":
        argv["human"] = str(tmp_path / "nope")
    elif case == "empty_pseudo":
        (tmp_path / "empty").mkdir()
        argv["pseudo"] = str(tmp_path / "empty")
    elif case == "max_iou_zero":
        argv["max-iou"] = "0"
    elif case == "max_iou_big":
        argv["max-iou"] = "1.5"
    elif case == "output_in_human":
        argv["output"] = str(human / "merged")
    elif case == "duplicate_stem":
        (pseudo / "shard1").mkdir()
        (pseudo / "shard1" / f"{names[0]}.json").write_text(
            (pseudo / f"{names[0]}.json").read_text()
        )
    elif case == "word":
        argv["max-iou"] = "tiny"
    code = merge_main([x for k, v in argv.items() for x in (f"--{k}", v)] + ["--quiet"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, named)
    assert not Path(argv["output"]).exists()


def test_merge_lists_a_corrupt_human_file_and_goes_on(roots, tmp_path, capsys):
    human, pseudo, names = roots
    (human / f"{names[1]}.json").write_text("{not json")
    out = tmp_path / "out"
    assert (
        merge_main(
            ["--human", str(human), "--pseudo", str(pseudo), "--output", str(out), "--quiet"]
        )
        == 0
    )
    failed = (out / "merge_failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(human / f"{names[1]}.json"))
    assert not (out / f"{names[1]}.json").exists()
    assert "1 failed" in capsys.readouterr().out
