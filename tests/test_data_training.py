"""Training through the dataset index (issue 27, items 2 and 5): SA-1B roots in each format train
without per-image dicts, the mapper's outputs equal the list path's, bad records are named,
counted and replaced while training continues, and ATS / the retry pool stay compact at size."""

import json
import os
import pickle
import random
import shutil
import stat
import tarfile
import tracemalloc
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
from scipy import stats

from unsam.data.index import IndexedDataset, build_index, write_tsv_shards
from unsam.data.sa1b import load_sa1b_dicts
from unsam.data.synthetic import make_shapes_dataset
from unsam.data.training import TrainingRecords
from unsam.io.sa1b import annotation_from_mask, write_sa1b_json

from .test_reliability import TINY, _one_error_line


def _tar_root(src: Path, out: Path) -> Path:
    """``src``'s image/JSON pairs as one SA-1B style tar (image member, then its JSON)."""
    out.mkdir(parents=True)
    with tarfile.open(out / "sa_000000.tar", "w") as tf:
        for js in sorted(src.glob("*.json")):
            tf.add(js.with_suffix(".png"), arcname=js.with_suffix(".png").name)
            tf.add(js, arcname=js.name)
    return out


def _tsv_root(src: Path, out: Path) -> Path:
    """``src`` converted to published-layout TSV shards (``train-K.tsv`` + ``.lineidx``)."""
    write_tsv_shards(
        [IndexedDataset(src, cache_dir=out.parent / "src_index", build=True, progress=False)],
        out,
        images_per_shard=2,
        progress=False,
    )
    return out


def _rich_record(root: Path) -> None:
    """One more image whose record has 9 nested masks and one empty mask (dropped on both paths)."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    from PIL import Image

    Image.fromarray(image).save(root / "rich.png")
    masks = []
    for k in range(9):
        m = np.zeros((64, 64), bool)
        y, x = rng.integers(0, 40, 2)
        m[y : y + 8 + 2 * k, x : x + 10 + k] = True
        masks.append(m)
    masks.insert(4, np.zeros((64, 64), bool))
    anns = [
        annotation_from_mask(m, k, level=int(k > 2), parent_id=(k % 3) if k > 2 else -1)
        for k, m in enumerate(masks)
    ]
    write_sa1b_json(
        root / "rich.json",
        {"image_id": "rich", "width": 64, "height": 64, "file_name": "rich.png"},
        anns,
    )


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The same 5 records as a JSON folder, an SA-1B tar and TSV shards."""
    base = tmp_path_factory.mktemp("fmt")
    src = make_shapes_dataset(base / "json", 4, size=64, seed=7)
    _rich_record(src)
    return {"json": src, "tar": _tar_root(src, base / "tar"), "tsv": _tsv_root(src, base / "tsv")}


def _cli(out: Path, roots_by_name: dict, *extra: str) -> int:
    """``train_net.py`` in this process on the given SA-1B roots; the exit status."""
    from train_net import cli

    entries = json.dumps([f"{name}:{root}" for name, root in roots_by_name.items()])
    try:
        return cli(
            [
                "--config-file",
                TINY,
                "UNSAM.DATA.SA1B_ROOTS",
                entries,
                "DATASETS.TRAIN",
                "(" + "".join(f"'{n}'," for n in roots_by_name) + ")",
                "DATASETS.TEST",
                "()",
                "INPUT.IMAGE_SIZE",
                "64",
                "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
                "64",
                "SOLVER.IMS_PER_BATCH",
                "2",
                "SOLVER.MAX_ITER",
                "2",
                "SOLVER.CHECKPOINT_PERIOD",
                "100",
                "DATALOADER.NUM_WORKERS",
                "0",
                "MODEL.DEVICE",
                "cpu",
                "OUTPUT_DIR",
                str(out),
                "SEED",
                "1",
                *extra,
            ]
        )
    except SystemExit as e:
        return e.code


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


# ------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt", ["json", "tar", "tsv"])
def test_each_format_trains_through_the_index(roots, tmp_path, fmt):
    root = tmp_path / fmt
    shutil.copytree(roots[fmt], root, ignore=shutil.ignore_patterns(".unsam_index"))
    out = tmp_path / "out"
    assert _cli(out, {f"fmt_{fmt}": root}) == 0
    assert (out / "model_final.pth").is_file()
    losses = [m["total_loss"] for m in _metrics(out) if "total_loss" in m]
    assert losses and all(np.isfinite(losses))
    log = (out / "log.txt").read_text()
    assert (
        f"SA-1B root {root} (index {root / '.unsam_index'}): 5 images, "
        "0 records not indexed, 1 empty masks" in log
    )
    # what the loader read: the index's records (encoded image bytes for tar / TSV), no list
    from unsam.config.loading import load_config
    from unsam.engine.trainer import load_train_dicts, register_datasets

    cfg = load_config(
        TINY,
        [
            "UNSAM.DATA.SA1B_ROOTS",
            json.dumps([f"fmt_{fmt}:{root}"]),
            "DATASETS.TRAIN",
            f"('fmt_{fmt}',)",
            "OUTPUT_DIR",
            str(out),
        ],
    )
    register_datasets(cfg)
    records = load_train_dicts(cfg)
    assert isinstance(records, TrainingRecords) and isinstance(records.parts[0], IndexedDataset)
    assert ("image_bytes" in records[0]) == (fmt != "json")


def test_mixed_sets_concatenate_in_order(roots, tmp_path, tiny_train):
    """Indexed roots of two formats and a COCO-format list, one training set."""
    from unsam.config.loading import load_config
    from unsam.engine.trainer import load_train_dicts, register_datasets

    tar, tsv = tmp_path / "tar", tmp_path / "tsv"
    shutil.copytree(roots["tar"], tar, ignore=shutil.ignore_patterns(".unsam_index"))
    shutil.copytree(roots["tsv"], tsv, ignore=shutil.ignore_patterns(".unsam_index"))
    cfg = load_config(
        TINY,
        [
            "UNSAM.DATA.SA1B_ROOTS",
            json.dumps([f"mix_tar:{tar}", f"mix_tsv:{tsv}"]),
            "DATASETS.TRAIN",
            "('mix_tar', 'coco_tiny_train_agnostic', 'mix_tsv')",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
    )
    register_datasets(cfg)
    records = load_train_dicts(cfg)
    assert records.names == ["mix_tar", "coco_tiny_train_agnostic", "mix_tsv"]
    n_coco = len(records.parts[1])
    assert len(records) == 5 + n_coco + 5
    assert records[0]["record_name"].startswith(str(tar / "sa_000000.tar"))
    assert "file_name" in records[5] and "record_name" not in records[5]  # the COCO list's own dict
    assert records[5 + n_coco]["record_name"].startswith(str(tsv))


# ------------------------------------------------------------------------------ identical outputs
@pytest.mark.parametrize(
    "mapper_name,sampling", [("unsam_lsj", "largest"), ("unsam_crop", "random")]
)
def test_mapper_outputs_identical_to_the_list_path(roots, mapper_name, sampling):
    """The same record through load_sa1b_dicts and through the index (each format), with the
    same NumPy / torch seeds: identical image tensors, masks, boxes, levels and parents."""
    from unsam.config import get_unsam_cfg
    from unsam.data.mapper import UnSAMDatasetMapper

    cfg = get_unsam_cfg()
    cfg.merge_from_file(TINY)
    cfg.merge_from_list(
        [
            "INPUT.DATASET_MAPPER_NAME",
            mapper_name,
            "INPUT.MAX_INSTANCES_SAMPLING",
            sampling,
            "INPUT.MAX_INSTANCES_PER_IMAGE",
            4,
            "INPUT.IMAGE_SIZE",
            48,
        ]
    )
    mapper = UnSAMDatasetMapper(cfg, is_train=True)
    old = {d["image_id"]: d for d in load_sa1b_dicts(roots["json"])}
    assert len(old["rich"]["annotations"]) == 9  # the empty mask is dropped
    compared = 0
    for fmt, root in roots.items():
        records = TrainingRecords(
            [
                (
                    fmt,
                    IndexedDataset(
                        root, cache_dir=root.parent / f"{fmt}_index", build=True, progress=False
                    ),
                )
            ]
        )
        for i in range(len(records)):
            new = records[i]
            ref = old[new["image_id"]]
            assert new["annotations"] == ref["annotations"]
            for seed in range(3):
                np.random.seed(seed), torch.manual_seed(seed)
                a = mapper(dict(ref))
                np.random.seed(seed), torch.manual_seed(seed)
                b = mapper(dict(new))
                assert torch.equal(a["image"], b["image"])
                ia, ib = a["instances"], b["instances"]
                assert torch.equal(ia.gt_masks.tensor, ib.gt_masks.tensor)
                for field in ("gt_boxes", "gt_classes", "gt_levels", "gt_parents"):
                    x, y = ia.get(field), ib.get(field)
                    assert torch.equal(getattr(x, "tensor", x), getattr(y, "tensor", y)), field
                assert {k: a[k] for k in ("height", "width", "image_id")} == {
                    k: b[k] for k in ("height", "width", "image_id")
                }
                assert "image_bytes" not in b
                compared += 1
    assert compared == 3 * 5 * 3


# ------------------------------------------------------------------------------ bad records
def _same_size_garbage(path: Path) -> None:
    """Overwrite a file with garbage of its own size and mtime: the index cannot notice."""
    st = path.stat()
    path.write_bytes(b"\xff" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_records_are_named_counted_replaced_and_training_continues(tmp_path, workers):
    """Corrupt JSON, a missing image, a tar cut short after indexing (read-only root with its
    index): each is named in the log, counted in data/replaced_samples (from a loader worker too),
    and training completes."""
    json_root = make_shapes_dataset(tmp_path / "j", 6, size=64, seed=2)
    tar_src = make_shapes_dataset(tmp_path / "t_src", 4, size=64, seed=3)
    tar_root = _tar_root(tar_src, tmp_path / "t")
    build_index(json_root, progress=False)
    build_index(tar_root, progress=False)
    corrupt = json_root / "shapes_002_00001.json"
    _same_size_garbage(corrupt)
    missing = json_root / "shapes_002_00004.png"
    missing.unlink()
    tar = tar_root / "sa_000000.tar"
    with tarfile.open(tar) as tf:
        last = [m for m in tf.getmembers() if m.name.endswith(".json")][-1]
    with open(tar, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)
    os.chmod(
        tar_root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
    )  # read-only: index kept
    out = tmp_path / "out"
    try:
        # 10 images, 5 iterations of 2: the sampler's first epoch draws every image
        assert (
            _cli(
                out,
                {"bad_json": json_root, "bad_tar": tar_root},
                "SOLVER.MAX_ITER",
                "5",
                "DATALOADER.NUM_WORKERS",
                str(workers),
            )
            == 0
        )
    finally:
        os.chmod(tar_root, stat.S_IRWXU)
    assert (out / "model_final.pth").is_file()
    log = (out / "log.txt").read_text()
    named = [line for line in log.splitlines() if "skipping training image" in line]
    assert any(f"{corrupt}: unreadable JSON" in line for line in named), named
    assert any(f"image '{missing}' not found" in line for line in named), named
    assert any(f"{tar}: member '{last.name}'" in line and "truncated" in line for line in named), (
        named
    )
    assert all("another image is drawn instead" in line for line in named)
    replaced = max(m.get("data/replaced_samples", 0) for m in _metrics(out))
    # a worker may have named samples it mapped ahead of the last iteration, not yet reported
    assert replaced >= 3 and (replaced == len(named) if workers == 0 else replaced <= len(named))
    assert "using its index as built" in log  # the read-only root was not re-indexed


def test_corrupt_mask_runs_are_caught_where_decoded(tmp_path):
    """Run lengths are checked when a mask is decoded: a record whose RLE covers the wrong
    number of pixels is replaced, named, not decoded into foreign memory."""
    from detectron2.data import transforms as T

    from unsam.data.mapper import UnSAMDatasetMapper

    root = make_shapes_dataset(tmp_path / "r", 1, size=32, seed=1)
    path = next(root.glob("*.json"))
    doc = json.loads(path.read_text())
    doc["annotations"][0]["segmentation"]["counts"] = (
        "0" + doc["annotations"][0]["segmentation"]["counts"]
    )
    path.write_text(json.dumps(doc))
    records = TrainingRecords([("r", IndexedDataset(root, build=True, progress=False))])
    record = records[0]  # the cheap checks pass: the string parses
    mapper = UnSAMDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=0.0)], image_format="RGB", max_instances=10
    )
    assert mapper(record) is None and mapper.num_skipped == 1
    with pytest.raises(Exception, match="corrupt RLE"):  # the full check names the problem
        IndexedDataset(root).record(0)


def test_unindexable_root_is_one_error_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(tmp_path / "out", {"nothing": empty}) == 2
    _one_error_line(capsys.readouterr().err, str(empty), "no usable image")


# ------------------------------------------------------------------------------ compact datasets
def test_training_dataset_pickles_small_whatever_its_size(tmp_path):
    from detectron2.data.common import MapDataset

    from unsam.data.mapper import UnSAMDatasetMapper, build_lsj_augmentation

    sizes = []
    for n in (3, 40):
        root = make_shapes_dataset(tmp_path / f"s{n}", n, size=32, seed=n)
        records = TrainingRecords([("s", IndexedDataset(root, build=True, progress=False))])
        mapper = UnSAMDatasetMapper(
            is_train=True,
            augmentations=build_lsj_augmentation(32, 0.5, 1.5),
            image_format="RGB",
            max_instances=10,
        )
        wrapped = MapDataset(records, mapper)  # what detectron2 copies into each loader worker
        sizes.append((len(pickle.dumps(records)), len(pickle.dumps(wrapped))))
        copy = pickle.loads(pickle.dumps(records))
        assert copy[n - 1]["annotations"] == records[n - 1]["annotations"]
    assert sizes[0][0] < 1500 and abs(sizes[0][0] - sizes[1][0]) < 64
    assert abs(sizes[0][1] - sizes[1][1]) < 64  # the retry pool holds no range of indices


def test_retry_pool_is_range_like_and_draws_as_the_sorted_set():
    import collections.abc

    from unsam.compat import _FallbackCandidates

    class SortedSet(set):  # the previous pool: a set that random.sample read in sorted order
        def __getitem__(self, k):
            return sorted(self)[k]

    collections.abc.Sequence.register(SortedSet)
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randrange(60, 200)  # more than 21 left: random.sample indexes the pool
        ref, pool = SortedSet(range(n)), _FallbackCandidates(n)
        for _ in range(30):
            i = rng.randrange(n)
            if rng.random() < 0.7:
                ref.discard(i), pool.discard(i)
            else:
                ref.add(i), pool.add(i)
            assert len(pool) == len(ref) and list(pool) == sorted(ref)
            assert random.Random(trial).sample(ref, 1) == random.Random(trial).sample(pool, 1)
    big = _FallbackCandidates(10**9)
    big.discard(5)
    assert len(pickle.dumps(big)) < 200 and big[5] == 6 and len(big) == 10**9 - 1


# ------------------------------------------------------------------------------ ATS at size
def test_ats_state_and_draws_at_a_million_images():
    from unsam.data.ats import AdaptiveTaskSampler, DifficultyTable

    table = DifficultyTable(1_000_000, 3, ema=0.5)
    rng = np.random.default_rng(0)
    cells = rng.choice(3_000_000, 200_000, replace=False)
    table.update(cells // 3, cells % 3, rng.random(len(cells)) * 3)
    table.sync()
    sampler = AdaptiveTaskSampler(
        table,
        3,
        start_iter=0,
        alpha=2.0,
        beta=0.3,
        eps=0.05,
        block_size=256,
        seed=1,
        items_per_iteration=4,
    )
    sampler._generate_block()  # builds the sum tree once
    assert (
        table.state_bytes() / table.num_cells < 8
    )  # issue target: <= 100 bytes per image and task
    tracemalloc.start()
    for _ in range(3):
        block = sampler._generate_block()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # per block: nothing the size of the table (3 M cells)
    assert block.shape == (256,) and int(block.max()) < 3_000_000
    # incremental updates keep the tree equal to one rebuilt from the table
    for _ in range(5):
        c = rng.integers(0, 3_000_000, 16)
        table.update(c // 3, c % 3, rng.random(16))
        table.sync()
    tree = {k: table._tree[k].copy() for k in ("w", "u", "d")}
    table._build_tree(2.0, 0.05)
    assert np.array_equal(tree["u"], table._tree["u"])
    assert np.allclose(tree["w"], table._tree["w"], rtol=1e-12) and np.allclose(
        tree["d"], table._tree["d"]
    )


def test_ats_draws_follow_the_target_with_unseen_cells():
    """Unseen cells weigh as the mean seen difficulty; the draws match probabilities()."""
    from unsam.data.ats import DifficultyTable

    table = DifficultyTable(90, 3, ema=0.0)
    rng = np.random.default_rng(3)
    cells = rng.choice(270, 120, replace=False)
    table.update(cells // 3, cells % 3, rng.random(120) ** 3 * 4)
    table.sync()
    target = table.probabilities(1.5, 0.2, 0.05).numpy()
    draws = table.draw(rng.random(200_000), 1.5, 0.2, 0.05)
    counts = np.bincount(draws, minlength=270)
    assert stats.chisquare(counts, target * len(draws)).pvalue > 1e-3
    assert stats.chisquare(counts).pvalue < 1e-12  # not uniform: the check can fail


def test_empty_masks_counted_at_indexing_as_the_loader_drops_them():
    """The index counts masks without a pixel from the JSON text (no parse): the same count as the
    RLE areas give, escaped backslashes and uncompressed counts included."""
    from unsam.data.index.formats import count_empty_masks
    from unsam.io.sa1b import mask_to_rle, rle_area

    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = int(rng.integers(1, 300)), int(rng.choice([1, 7, 640, 2250]))
        anns = []
        for _ in range(int(rng.integers(0, 6))):
            mask = np.zeros((h, w), bool)
            if rng.random() < 0.5:
                y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
                mask[y : y + 3, x : x + 2] = True
            anns.append({"segmentation": mask_to_rle(mask)})
        if rng.random() < 0.2:  # COCO's uncompressed form
            anns.append(
                {
                    "segmentation": {
                        "size": [h, w],
                        "counts": [h * w] if rng.random() < 0.5 else [1, h * w - 1],
                    }
                }
            )
        raw = json.dumps({"image": {"height": h, "width": w}, "annotations": anns}).encode()
        expected = sum(rle_area(a["segmentation"]) == 0 for a in anns)
        assert count_empty_masks(raw) == expected, (
            h,
            w,
            [a["segmentation"]["counts"] for a in anns],
        )


def test_concurrent_builds_of_one_root_all_succeed(tmp_path):
    """Jobs started together on one root (the ablation's parallel runs, two trainings) build its
    index one at a time: none deletes the other's files; all open the same index."""
    import subprocess
    import sys
    import time

    root = tmp_path / "root"
    for j in range(8):  # 8 chunks: builds long enough to overlap
        make_shapes_dataset(root / f"s{j}", 40, size=16, seed=j)
    go = tmp_path / "go"
    code = (
        "import os, sys, time; from unsam.data.index import IndexedDataset; "
        f"open({str(tmp_path)!r} + '/ready.' + sys.argv[1], 'w').close(); "
        f"[time.sleep(0.01) for _ in iter(lambda: os.path.exists({str(go)!r}), True)]; "
        f"d = IndexedDataset({str(root)!r}, build=True, progress=False); print(len(d))"
    )
    for trial in range(2):
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, f"{trial}{k}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            for k in range(3)
        ]
        while len(list(tmp_path.glob(f"ready.{trial}*"))) < 3:  # all imported: start them together
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
        go.unlink()
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        assert {out.strip() for out, _ in outs} == {"320"}
        shutil.rmtree(root / ".unsam_index")
