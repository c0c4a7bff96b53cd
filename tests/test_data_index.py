"""The lazy dataset index (unsam.data.index): three source formats read back exactly what
load_sa1b_dicts reads, incremental and resumable builds, bad records named and counted, cheap
pickling, annotation sampling, the TSV converter and the CLI's errors."""

import base64
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from unsam.data.index import IndexedDataset, build_index, write_tsv_shards
from unsam.data.index import build as index_build
from unsam.data.index.__main__ import main as index_main
from unsam.data.index.formats import scan_record
from unsam.data.sa1b import load_sa1b_dicts
from unsam.data.synthetic import make_shapes_dataset
from unsam.io.sa1b import SA1BFormatError

from .test_reliability import _one_error_line

FIELDS = ("image_id", "height", "width", "annotations")


def _shapes(folder, n=3, seed=0) -> Path:
    return make_shapes_dataset(folder, n, size=48, seed=seed)


def _by_stem(dicts):
    return {Path(d["file_name"]).stem: d for d in dicts}


def _same(record, reference, file_name=True):
    for key in FIELDS:
        assert record[key] == reference[key], key
    if file_name:
        assert os.path.normpath(record["file_name"]) == os.path.normpath(reference["file_name"])


def _tar(root: Path, tar_path: Path, stems=None) -> Path:
    """SA-1B's layout: sa_N.jpg-style image member, then its JSON, pair after pair."""
    stems = stems or sorted(p.stem for p in root.glob("*.json"))
    with tarfile.open(tar_path, "w") as tf:
        for stem in stems:
            tf.add(root / f"{stem}.png", arcname=f"{stem}.png")
            tf.add(root / f"{stem}.json", arcname=f"{stem}.json")
    return tar_path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A flat root of 4 images plus a shard sub-folder of 2, and its reference dicts."""
    root = _shapes(tmp_path_factory.mktemp("idx") / "root", 4)
    _shapes(root / "shard_1", 2, seed=1)
    return root, _by_stem(load_sa1b_dicts(root))


# ------------------------------------------------------------------------------ formats
def test_json_folders_read_back_like_load_sa1b_dicts(shapes, tmp_path):
    src, reference = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root)
    # one record points at an image elsewhere (absolute path), one at ../images/ inside the root
    (root / "images").mkdir()
    moved = root / "shapes_000_00001.png"
    shutil.move(moved, root / "images" / moved.name)
    doc = json.loads((root / "shapes_000_00001.json").read_text())
    doc["image"]["file_name"] = f"images/{moved.name}"
    (root / "shapes_000_00001.json").write_text(json.dumps(doc))
    outside = tmp_path / "elsewhere.png"
    shutil.move(root / "shard_1" / "shapes_001_00000.png", outside)
    doc = json.loads((root / "shard_1" / "shapes_001_00000.json").read_text())
    doc["image"]["file_name"] = str(outside)
    (root / "shard_1" / "shapes_001_00000.json").write_text(json.dumps(doc))

    reference = _by_stem(load_sa1b_dicts(root))
    summary = build_index(root, workers=2, progress=False)
    assert (summary.images, summary.skipped, summary.sources["json"]) == (6, 0, 2)
    ds = IndexedDataset(root)
    assert len(ds) == 6
    for i in range(len(ds)):
        record = ds.record(i)
        _same(record, reference[Path(record["file_name"]).stem])
    stored = [ds._string(ds._images, ds._images_off, r) for r in range(len(ds))]
    assert f"images/{moved.name}" in stored and str(outside) in stored  # relative inside the root


def test_tar_reads_members_in_place(shapes, tmp_path):
    src, reference = shapes
    root = tmp_path / "tars"
    root.mkdir()
    _tar(src, root / "sa_000000.tar")
    (root / "part2").mkdir()
    _tar(src / "shard_1", root / "part2" / "sa_000001.tar")
    summary = build_index(root, progress=False)
    assert (summary.images, summary.skipped, summary.sources["tar"]) == (6, 0, 2)
    ds = IndexedDataset(root)
    for i in range(len(ds)):
        record = ds.record(i)
        ref = reference[Path(ds.location(i).split("'")[1]).stem]
        _same(record, ref, file_name=False)
        assert record["image_bytes"] == Path(ref["file_name"]).read_bytes() == ds.image_bytes(i)
        assert "file_name" not in record
    assert sorted(p.name for p in root.rglob("*") if ".unsam_index" not in p.parts) == [
        "part2",
        "sa_000000.tar",
        "sa_000001.tar",
    ]  # nothing extracted


def test_tsv_round_trip_and_published_layout(shapes, tmp_path):
    src, reference = shapes
    ds = IndexedDataset(src, cache_dir=tmp_path / "cache", build=True, progress=False)
    out = tmp_path / "tsv"
    summary = write_tsv_shards([ds], out, images_per_shard=4, progress=False)
    assert (summary.images, summary.shards_written, len(summary.skipped)) == (6, 2, 0)
    assert sorted(p.name for p in out.iterdir()) == [
        "train-0.lineidx",
        "train-0.tsv",
        "train-1.lineidx",
        "train-1.tsv",
    ]
    line = (out / "train-0.tsv").read_bytes().split(b"\n")[0].split(b"\t")
    assert (
        len(line) == 3
        and json.loads(line[1])["image"]["id"] == json.loads(line[1])["image"]["image_id"]
    )
    build_index(out, progress=False)
    back = IndexedDataset(out)
    assert len(back) == len(ds)
    for i in range(len(ds)):
        a, b = ds.record(i), back.record(i)
        for key in FIELDS:
            assert a[key] == b[key], key
        assert b["image_bytes"] == ds.image_bytes(i) == Path(a["file_name"]).read_bytes()
    # rerun: complete shards are kept
    assert write_tsv_shards([ds], out, images_per_shard=4, progress=False).shards_kept == 2

    # a shard written as the published code writes it (image.id, no image_id), one without lineidx
    pub = tmp_path / "published"
    pub.mkdir()
    for shard, stems in enumerate((["shapes_000_00000", "shapes_000_00001"], ["shapes_000_00002"])):
        lines = []
        for stem in stems:
            d = json.loads((src / f"{stem}.json").read_text())
            info = {
                "id": d["image"]["image_id"],
                "height": d["image"]["height"],
                "width": d["image"]["width"],
            }
            img = base64.b64encode((src / f"{stem}.png").read_bytes()).decode()
            lines.append(
                f"{stem}\t{json.dumps({'image': info, 'annotations': d['annotations']})}\t{img}\n"
            )
        (pub / f"sa1b-{shard}.tsv").write_text("".join(lines))
        if shard == 0:
            offsets = np.cumsum([0] + [len(s) for s in lines[:-1]])
            (pub / f"sa1b-{shard}.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    assert build_index(pub, progress=False).images == 3
    published = IndexedDataset(pub)
    for i, stem in enumerate(["shapes_000_00000", "shapes_000_00001", "shapes_000_00002"]):
        record = published.record(i)
        _same(record, reference[stem], file_name=False)
        assert published.image_bytes(i) == (src / f"{stem}.png").read_bytes()


def test_fast_header_equals_full_parse(shapes, tmp_path):
    src, _ = shapes
    texts = [p.read_bytes() for p in sorted(src.rglob("*.json"))]
    doc = json.loads(texts[0])
    doc["image"]["file_name"] = "we{ird}.png"  # braces in a string: fast path must give up
    variants = [
        json.dumps(doc).encode(),
        json.dumps(json.loads(texts[1]), indent=2).encode(),  # pretty-printed: still fast
        json.dumps({"annotations": doc["annotations"], "image": doc["image"]}).encode(),
    ]  # image last
    fast = []
    for raw in texts + variants:
        full = json.loads(raw)
        image, height, width, masks, was_fast = scan_record(raw)
        assert (height, width, masks) == (
            full["image"]["height"],
            full["image"]["width"],
            len(full["annotations"]),
        )
        assert image == full["image"]
        fast.append(was_fast)
    assert fast == [True] * len(texts) + [False, True, False]


def test_parallel_build_equals_serial(shapes, tmp_path):
    src, _ = shapes
    a = build_index(src, cache_dir=tmp_path / "a", workers=1, progress=False, chunk_files=2)
    b = build_index(src, cache_dir=tmp_path / "b", workers=2, progress=False, chunk_files=2)
    assert a.images == b.images == 6
    ra = IndexedDataset(src, cache_dir=tmp_path / "a")
    rb = IndexedDataset(src, cache_dir=tmp_path / "b")
    assert ra._rows.tobytes() == rb._rows.tobytes()
    assert [ra.location(i) for i in range(6)] == [rb.location(i) for i in range(6)]


# ------------------------------------------------------------------------------ incremental, resume
def _chunk_mtimes(index_dir: Path):
    return {p.name: p.stat().st_mtime_ns for p in (index_dir / "chunks").glob("*.npz")}


def test_incremental_add_touch_remove(shapes, tmp_path):
    src, _ = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root)
    first = build_index(root, progress=False)
    assert (first.images, first.chunks_indexed) == (6, 2)
    again = build_index(root, progress=False)
    assert again.up_to_date and again.images == 6
    _shapes(root / "shard_2", 2, seed=2)  # a new shard folder
    before = _chunk_mtimes(root / ".unsam_index")
    added = build_index(root, progress=False)
    assert (added.images, added.chunks_indexed, added.chunks_kept, added.indexed) == (8, 1, 2, 2)
    assert all(_chunk_mtimes(root / ".unsam_index")[n] == t for n, t in before.items())
    ds = IndexedDataset(root)
    assert len(ds) == 8
    # a changed file: rewritten with one annotation fewer (size and mtime change) → re-indexed
    path = root / "shapes_000_00002.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = doc["annotations"][:1]
    path.write_text(json.dumps(doc))
    changed = build_index(root, progress=False)
    assert (changed.chunks_indexed, changed.indexed) == (1, 4)
    fresh = IndexedDataset(root)
    i = [fresh.location(k) for k in range(len(fresh))].index(str(path))
    assert fresh.column("masks")[i] == 1 and len(fresh.record(i)["annotations"]) == 1
    # touched (same bytes, new mtime): re-indexed too
    st = (root / "shapes_000_00003.json").stat()
    os.utime(root / "shapes_000_00003.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = build_index(root, progress=False)
    assert (touched.images, touched.chunks_indexed, touched.chunks_kept) == (8, 1, 2)
    # a removed shard is dropped (and its chunk file deleted)
    shutil.rmtree(root / "shard_1")
    removed = build_index(root, progress=False)
    assert removed.images == 6 and removed.chunks_indexed == 0
    assert len(_chunk_mtimes(root / ".unsam_index")) == 2
    assert len(IndexedDataset(root)) == 6
    # the old dataset object still reads its generation (kept for open readers)
    assert ds.record(0)["height"] == 48


def test_interrupted_build_resumes_with_finished_chunks(shapes, tmp_path, monkeypatch):
    src, _ = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root)
    for k in range(3):
        _shapes(root / f"shard_{k + 2}", 1, seed=10 + k)
    calls = []
    real = index_build.index_json_files

    def dies_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(index_build, "index_json_files", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(root, workers=1, progress=False)
    monkeypatch.undo()
    index_dir = root / ".unsam_index"
    finished = _chunk_mtimes(index_dir)
    assert len(finished) == 2 and not (index_dir / "CURRENT").exists()
    resumed = build_index(root, workers=1, progress=False)
    assert (resumed.images, resumed.chunks_kept, resumed.chunks_indexed) == (9, 2, 3)
    after = _chunk_mtimes(index_dir)
    assert all(after[n] == t for n, t in finished.items())
    # the merged arrays lost, the chunks kept: nothing is indexed again
    shutil.rmtree(index_dir / json.loads((index_dir / "CURRENT").read_text())["generation"])
    (index_dir / "CURRENT").unlink()
    merged_only = build_index(root, workers=1, progress=False)
    assert (merged_only.images, merged_only.chunks_indexed) == (9, 0)
    assert _chunk_mtimes(index_dir) == after
    assert len(IndexedDataset(root)) == 9


# ------------------------------------------------------------------------------ bad input
def test_bad_records_are_named_counted_and_the_rest_indexed(shapes, tmp_path, caplog):
    src, _ = shapes
    root = tmp_path / "bad"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("shard_*"))  # 4 JSON images
    (root / "shapes_000_00000.json").write_text('{"image": {"image_id": 1, "wid')  # a killed write
    (root / "shapes_000_00001.png").unlink()  # missing image
    # a tar cut inside its third pair, and a complete one
    _tar(src, root / "sa_cut.tar")
    data = (root / "sa_cut.tar").read_bytes()
    cut = data.index(b"shapes_000_00002.json") + 1200
    (root / "sa_cut.tar").write_bytes(data[:cut])
    # a TSV whose lineidx has a wrong offset and a line that is not a number
    ds = IndexedDataset(src, cache_dir=tmp_path / "cache", build=True, progress=False)
    write_tsv_shards([ds], tmp_path / "tsv", images_per_shard=3, progress=False)
    shutil.copy(tmp_path / "tsv" / "train-0.tsv", root / "t.tsv")
    offsets = (tmp_path / "tsv" / "train-0.lineidx").read_text().split()
    (root / "t.lineidx").write_text(f"{offsets[0]}\n{int(offsets[1]) + 7}\nbogus\n{offsets[2]}\n")

    with caplog.at_level("WARNING"):
        summary = build_index(root, progress=False)
    text = caplog.text
    # 2 JSON images + 2 tar pairs + 2 TSV lines; 2 JSON + 1 tar cut + 2 lineidx entries skipped
    assert (summary.images, summary.skipped) == (6, 5)
    assert "shapes_000_00000.json: unreadable JSON" in text
    assert "shapes_000_00001.json: image 'shapes_000_00001.png' not found" in text
    assert "sa_cut.tar: member 'shapes_000_00002.json' truncated" in text
    assert "t.tsv: lineidx line 2" in text and "not the start of a line" in text
    assert "t.lineidx: line 3: b'bogus' is not a byte offset" in text
    dataset = IndexedDataset(root)
    assert len(dataset) == 6 and all(dataset.record(i)["annotations"] for i in range(6))
    skipped = (Path(dataset.index_dir) / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 5
    # the missing image comes back: its chunk is indexed again without --rebuild
    shutil.copy(src / "shapes_000_00001.png", root)
    assert build_index(root, progress=False).images == 7


def test_tar_cut_between_members_is_reported(shapes, tmp_path):
    src, _ = shapes
    root = tmp_path / "cut"
    root.mkdir()
    whole = _tar(src, tmp_path / "whole.tar", ["shapes_000_00000", "shapes_000_00001"])
    with tarfile.open(whole) as tf:
        second_png = tf.getmember("shapes_000_00001.png")
    (root / "sa.tar").write_bytes(
        whole.read_bytes()[: second_png.offset]
    )  # cut at a header boundary
    summary = build_index(root, progress=False)
    assert (summary.images, summary.skipped) == (1, 1)
    assert "no tar header or end-of-archive marker" in summary.first_skipped[0]


def test_record_validated_when_read(shapes, tmp_path):
    """A record corrupt inside its masks passes the cheap index and fails, named, when read;
    so does a file changed after indexing."""
    src, _ = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("shard_*"))
    path = root / "shapes_000_00003.json"
    doc = json.loads(path.read_text())
    doc["annotations"][0]["segmentation"]["counts"] = "0"
    path.write_text(json.dumps(doc))
    build_index(root, progress=False)
    ds = IndexedDataset(root)
    i = [ds.location(k) for k in range(len(ds))].index(str(path))
    with pytest.raises(SA1BFormatError, match=r"shapes_000_00003\.json: annotation 0: corrupt RLE"):
        ds.record(i)
    assert len(ds.record(i, validate=False)["annotations"]) == len(
        doc["annotations"]
    )  # caller checks RLEs
    doc["image"]["height"] = 40
    doc["annotations"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(SA1BFormatError, match="changed since indexing"):
        ds.record(i)


# ------------------------------------------------------------------------------ dataset
def test_pickles_small_and_reopens_lazily(shapes, tmp_path):
    src, _ = shapes
    small = IndexedDataset(src, cache_dir=tmp_path / "c", build=True, progress=False)
    big_root = tmp_path / "big"
    for k in range(4):
        _shapes(big_root / f"s{k}", 5, seed=k)
    big = IndexedDataset(big_root, build=True, progress=False)
    payloads = [pickle.dumps(d) for d in (small, big)]
    assert all(len(p) < 1024 for p in payloads)
    assert abs(len(payloads[0]) - len(payloads[1])) < 100  # independent of the number of images
    copy = pickle.loads(payloads[1])
    assert copy._rows is None  # nothing opened until used
    assert len(copy) == 20 and copy.record(7)["annotations"] == big.record(7)["annotations"]
    assert isinstance(copy._rows, np.memmap) or copy._rows.base is not None


def test_max_instances_samples_before_building(shapes, tmp_path):
    src, _ = shapes
    ds = IndexedDataset(src, cache_dir=tmp_path / "c", build=True, progress=False)
    i = int(np.argmax(ds.column("masks")))
    full = [a["id"] for a in ds.record(i)["annotations"]]
    assert len(full) >= 4
    picks = []
    for seed in range(6):
        ids = [a["id"] for a in ds.record(i, max_instances=2, rng=seed)["annotations"]]
        assert len(ids) == len(set(ids)) == 2 and set(ids) <= set(full)
        assert ids == [
            a["id"]
            for a in ds.record(i, max_instances=2, rng=np.random.default_rng(seed))["annotations"]
        ]
        picks.append(tuple(ids))
    assert len(set(picks)) > 1
    assert [a["id"] for a in ds.record(i, max_instances=100, rng=0)["annotations"]] == full


def test_skip_empty(shapes, tmp_path):
    src, _ = shapes
    root = tmp_path / "root"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("shard_*"))
    path = root / "shapes_000_00000.json"
    doc = json.loads(path.read_text())
    doc["annotations"] = []
    path.write_text(json.dumps(doc))
    build_index(root, progress=False)
    assert len(IndexedDataset(root)) == 4
    nonempty = IndexedDataset(root, skip_empty=True)
    assert len(nonempty) == 3 and all(nonempty[i]["annotations"] for i in range(3))


# ------------------------------------------------------------------------------ CLI
def test_cli_builds_and_reports(shapes, tmp_path, capsys):
    src, _ = shapes
    assert (
        index_main(
            [
                str(src),
                "--cache-dir",
                str(tmp_path / "c"),
                "--quiet",
                "--to-tsv",
                str(tmp_path / "t"),
                "--images-per-shard",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0].startswith(f"{src}: 6 images in 2 sources (json 2), 0 skipped")
        and "images/s" in out[0]
    )
    assert out[1].startswith(f"{tmp_path / 't'}: 6 images in 2 new shards")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert index_main([str(tmp_path / "missing"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "missing", "not a folder")
    (tmp_path / "empty").mkdir()
    assert index_main([str(tmp_path / "empty"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "empty", "no usable image")
    (tmp_path / "file").write_text("x")
    assert (
        index_main([str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "file"), "--quiet"]) == 2
    )
    _one_error_line(capsys.readouterr().err, "file")
    _shapes(tmp_path / "data", 1)
    assert (
        index_main([str(tmp_path / "data"), "--to-tsv", str(tmp_path / "data" / "tsv"), "--quiet"])
        == 2
    )
    _one_error_line(capsys.readouterr().err, "inside dataset root")
    with pytest.raises(SystemExit) as e:
        index_main([str(tmp_path), "--workers", "0"])
    assert e.value.code == 2
