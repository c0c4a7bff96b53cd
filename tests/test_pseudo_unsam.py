"""The published UnSAM pseudo-label recipe (issue 13): DINO keys and iterative merge against the
published code's outputs (``../shared/reference/parity``), the merge against a brute-force
reading of its rule, the CutLER detector's state_dict, and ``--recipe unsam`` end to end."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unsam.data.coco import shared_data_dir
from unsam.io.sa1b import read_sa1b_json, rle_to_mask
from unsam.pseudo.__main__ import main as pseudo_main
from unsam.pseudo.conquer import iterative_merge
from unsam.pseudo.features import build_features
from unsam.pseudo.labelers import build_labeler
from unsam.pseudo.recipe import UnsamSettings, nms_by_area, resize_group
from unsam.pseudo.runner import run

REPO = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    data = shared_data_dir()
    ref = data.parent / "reference" if data is not None else None
    if ref is None or not (ref / "parity").is_dir():
        pytest.skip("shared reference files not found (set UNSAM_SHARED)")
    return ref


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------- weights the tests make
@pytest.fixture(scope="session")
def dino_weights(tmp_path_factory) -> str:
    """ViT-B/8 in the official DINO checkpoint format with the parity README's weights."""
    names = json.loads((_reference_dir() / "parity" / "dino_vitb8_state_dict.json").read_text())[
        "keys"
    ]
    state = {}
    for name, shape in names.items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        elif name.endswith(".weight") and len(shape) == 1:
            state[name] = torch.ones(shape)
        elif name == "patch_embed.proj.weight":
            state[name] = torch.randn(shape, generator=g) / math.sqrt(3 * 8 * 8)
        else:
            state[name] = torch.randn(shape, generator=g) * 0.02
    path = tmp_path_factory.mktemp("dino") / "dino_vitb8_parity.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="session")
def detector_weights(tmp_path_factory) -> str:
    """The divide detector from our config with random init, saved as a detectron2 checkpoint.
    The mask head's bias is raised so its masks fill their boxes: random masks are otherwise
    specks too small to conquer."""
    from unsam.pseudo.detector import build_detector, divide_config

    torch.manual_seed(0)
    model = build_detector(divide_config())
    with torch.no_grad():
        model.roi_heads.mask_head.predictor.bias.fill_(4.0)
    path = tmp_path_factory.mktemp("detector") / "cutler_random.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, path)
    return str(path)


@pytest.fixture(scope="session")
def small_divide_config(tmp_path_factory) -> str:
    """Our detector config at a small input size with at most 3 regions, for speed."""
    path = tmp_path_factory.mktemp("cfg") / "divide_small.yaml"
    path.write_text(
        f"_BASE_: {REPO / 'configs/divide/cutler_cascade_R50_FPN.yaml'}\n"
        "MODEL:\n  RPN:\n    PRE_NMS_TOPK_TEST: 200\n    POST_NMS_TOPK_TEST: 100\n"
        "INPUT:\n  MIN_SIZE_TEST: 128\n  MAX_SIZE_TEST: 192\n"
        "TEST:\n  DETECTIONS_PER_IMAGE: 3\n"
    )
    return str(path)


# ------------------------------------------------------------------------------ DINO keys parity
@pytest.mark.parametrize("size", ["256x256", "240x320"])
def test_dino_keys_match_published(dino_weights, size):
    parity = _reference_dir() / "parity"
    image = np.load(parity / f"image_{size}.npy")
    ref = np.load(parity / f"dino_vitb8_keys_{size}.npy")
    feats = build_features("dino", dino_weights=dino_weights, dino_arch="vit_base_patch8")
    keys = feats.grid_features(image[None])[0]  # raw: no resizing, no normalisation
    assert keys.shape == ref.shape
    err = np.abs(_unit(keys) - _unit(ref)).max()
    assert err < 1e-4, f"L2-normalised keys differ by {err:.2e}"


# ----------------------------------------------------------------------------- iterative merge
def test_iterative_merge_equals_published_masks():
    parity = _reference_dir() / "parity"
    keys = np.load(parity / "dino_vitb8_keys_256x256.npy")
    ref = np.load(parity / "iterative_merge_256x256.npz")
    levels = iterative_merge(keys, (0.6, 0.5, 0.4, 0.3, 0.2, 0.1), min_patches=4)
    assert len(levels) == 6
    for i, level in enumerate(levels):
        expected = ref[f"level{i}"]
        assert level.dtype == bool and level.shape == expected.shape, i
        assert np.array_equal(level, expected), f"level {i} differs"  # same masks, same order


def brute_force_merge(features, thresholds, min_patches):
    """A direct reading of the published rule, recomputing everything from the groups' patches
    at every step: similarities from the sums of the member features, adjacency from the masks.
    Pairs are kept in birth order (initial pairs in raster order, left then up; a new group's
    pairs in the order of its neighbour set, built with the same set operations as published)
    and the first pair of maximal similarity is merged. Integer features make every sum exact,
    so float32 similarities are bitwise the same whatever the summation order."""
    f = torch.as_tensor(features, dtype=torch.float32)
    h, w, c = f.shape
    flat = f.reshape(h * w, c)
    groups = {i: [i] for i in range(h * w)}
    nbrs = {i: set() for i in range(h * w)}
    born = []
    for i in range(h * w):
        for j in ([i - 1] if i % w else []) + ([i - w] if i >= w else []):
            nbrs[i].add(j)
            nbrs[j].add(i)
            born.append((j, i))

    def unit(g):
        return F.normalize(flat[groups[g]].sum(0) / len(groups[g]), dim=0)

    def mask(g):
        m = np.zeros(h * w, bool)
        m[groups[g]] = True
        return m.reshape(h, w)

    def adjacent(a, b):
        ma, mb = mask(a), mask(b)
        grown = ma.copy()
        grown[1:] |= ma[:-1]
        grown[:-1] |= ma[1:]
        grown[:, 1:] |= ma[:, :-1]
        grown[:, :-1] |= ma[:, 1:]
        return bool((grown & mb).any())

    levels = []
    for t in thresholds:
        while True:
            live = [p for p in born if p[0] in groups and p[1] in groups]
            for a, b in live:
                assert adjacent(a, b) and b in nbrs[a]
            if not live:
                break
            sims = [torch.dot(unit(a), unit(b)).item() for a, b in live]
            k = int(np.argmax(sims))  # first maximum: the oldest pair wins a tie
            if sims[k] < t:
                break
            a, b = live[k]
            new = max(max(groups), max(nbrs)) + 1
            groups[new] = groups.pop(a) + groups.pop(b)
            nbrs[new] = nbrs[a].union(nbrs[b]).difference({a, b})
            for x in nbrs[new]:
                nbrs[x].discard(a)
                nbrs[x].discard(b)
                born.append((x, new))
                nbrs[x].add(new)
        listed, out = [], []
        for a, b in (p for p in born if p[0] in groups and p[1] in groups):
            for g in (a, b):
                if g not in listed:
                    listed.append(g)
                    if len(groups[g]) >= min_patches:
                        out.append(mask(g))
        levels.append(np.stack(out) if out else np.zeros((0, h, w), bool))
    return levels


def _palette_grid(seed, h, w, c, values=(-1, 0, 1, 2)):
    rng = np.random.default_rng(seed)
    return rng.choice(values, size=(h, w, c)).astype(np.float32)


@pytest.mark.parametrize(
    "features",
    [
        np.ones((3, 4, 5), np.float32),  # every similarity ties: pure birth order
        np.repeat(np.repeat(_palette_grid(1, 2, 2, 3), 3, 0), 3, 1),  # 4 uniform blocks
        _palette_grid(2, 5, 6, 3),  # many ties among small integer features
        _palette_grid(3, 6, 5, 4, values=(0, 1, 3)),
        _palette_grid(4, 7, 7, 2),
    ],
    ids=["all-equal", "blocks", "palette-a", "palette-b", "palette-c"],
)
@pytest.mark.parametrize(
    "thresholds,min_patches", [((0.6, 0.5, 0.4, 0.3, 0.2, 0.1), 4), ((0.9, 0.0, -1.0), 2)]
)
def test_iterative_merge_equals_brute_force(features, thresholds, min_patches):
    got = iterative_merge(features, thresholds, min_patches)
    want = brute_force_merge(features, thresholds, min_patches)
    assert len(got) == len(want) == len(thresholds)
    for g, e in zip(got, want):
        assert g.shape == e.shape and np.array_equal(g, e)


def test_iterative_merge_rules_by_hand():
    a, b, c = [1, 0, 0], [1, 1, 0], [0, 1, 0]
    # tie between (0,1) and (1,2): the older pair (0,1) merges; the result no longer matches c
    levels = iterative_merge(np.array([[a, b, c]], np.float32), (0.7,), min_patches=2)
    assert levels[0].tolist() == [[[True, True, False]]]
    # patch 3 ties with its left (2) and upper (1) neighbours: its left pair is older
    grid = np.array([[[0, 0, 1], a], [c, b]], np.float32)
    assert iterative_merge(grid, (0.7,), min_patches=2)[0].tolist() == [
        [[False, False], [True, True]]
    ]
    # two uniform halves: kept at 0.6 once they hold >= min_patches patches; everything merged
    # (no neighbour left) lists nothing; an empty level stays in place as a (0, h, w) array
    halves = np.array([[[1, 0]] * 4 + [[0, 1]] * 4], np.float32)
    levels = iterative_merge(halves, (0.6, 0.1, -1.0), min_patches=4)
    assert [lv.shape[0] for lv in levels] == [2, 2, 0]
    assert sorted(m.sum() for m in levels[0]) == [4, 4]
    assert levels[2].shape == (0, 1, 8)
    thirds = np.array([[[1, 0]] * 3 + [[0, 1]] * 3], np.float32)
    assert iterative_merge(thirds, (0.6,), min_patches=4)[0].shape == (0, 1, 6)
    assert iterative_merge(thirds, (0.6,), min_patches=3)[0].shape == (2, 1, 6)
    # a merged group's similarity is the cosine of the summed raw features (not of the means
    # of unit vectors): a long vector outweighs a short one
    raw = np.array([[[10, 0], [0, 1], [1, 1]]], np.float32)  # cos((10,1), (1,1)) = 0.77
    assert iterative_merge(raw, (0.0, 0.75), min_patches=1)[0].shape[0] == 0  # all merged
    assert iterative_merge(raw, (0.76,), min_patches=1)[0].shape[0] == 3


# ------------------------------------------------------------------------- conquer post-steps
def test_resize_group_and_nms_as_published():
    g = np.zeros((4, 4), bool)
    g[1:3, 1:3] = True
    up = resize_group(g, (16, 8))  # (W, H)
    assert up.shape == (8, 16) and up[4, 8] and not up[0, 0]
    assert resize_group(np.ones((4, 4), bool), (5, 3)).all()
    masks = [(np.arange(60) >= 10 * k) & (np.arange(60) < 10 * k + 10) for k in range(5)]
    # area order is stable: [A, X1..X4, copy of A]; the copy is 5 places away: not compared
    assert nms_by_area(masks + [masks[0].copy()]) == [0, 1, 2, 3, 4, 5]
    # within the next four it is dropped; a bigger mask comes first
    big = np.arange(60) < 30
    assert nms_by_area([masks[0], masks[1], masks[0].copy(), big]) == [3, 0, 1]


# ------------------------------------------------------------------------------ the detector
def test_detector_state_dict_matches_reference():
    from unsam.pseudo.detector import build_detector, divide_config

    ref = json.loads((_reference_dir() / "cutler_cascade_r50_fpn_state_dict.json").read_text())
    model = build_detector(divide_config())
    own = [
        (k, list(v.shape))
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    ]
    assert own == [(k, v[0]) for k, v in ref["keys"].items()]  # names, shapes and order
    type_names = {type(model).__name__, type(model.roi_heads).__name__}
    assert type_names == {"GeneralizedRCNN", "CascadeROIHeads"}


# ------------------------------------------------------------------------------- end to end
def _photos(shared_data, tmp_path, n=4) -> Path:
    src = sorted((shared_data / "coco_tiny_val2017" / "images").glob("*.jpg"))[:n]
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in src:
        shutil.copy(f, folder / f.name)
    return folder


def _check_outputs(folder: Path, photos: Path):
    files = sorted(folder.glob("*.json"))
    assert [f.stem for f in files] == sorted(p.stem for p in photos.glob("*.jpg"))
    n_conquered = 0
    for f in files:
        data = read_sa1b_json(f)  # validates the SA-1B structure
        anns = data["annotations"]
        by_id = {a["id"]: a for a in anns}
        assert sorted(by_id) == list(range(len(anns)))
        for a in anns:
            m = rle_to_mask(a["segmentation"])
            assert m.sum() == a["area"] > 0
            if a["level"] == 0:
                assert a["parent_id"] == -1
                continue
            n_conquered += 1
            parent = by_id[a["parent_id"]]
            assert a["level"] == 1 and parent["level"] == 0
            x, y, w, h = parent["bbox"]
            outside = m.copy()
            outside[y : y + h, x : x + w] = False
            assert not outside.any(), "conquered mask leaves its divided mask's box"
            assert (m & rle_to_mask(parent["segmentation"])).sum() > 0.9 * m.sum()
            assert a["merge_threshold"] in (0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    return n_conquered


def test_recipe_unsam_end_to_end(
    shared_data, tmp_path, dino_weights, detector_weights, small_divide_config
):
    """4 shared photos, random ViT-B/8 + random detector: valid SA-1B output with a consistent
    hierarchy; byte-identical after the CLI (another process) is killed and the run resumed:
    the images it finished are a re-run in a new process, the rest are labelled on resume."""
    photos = _photos(shared_data, tmp_path)
    args = [
        "--recipe",
        "unsam",
        "--input",
        str(photos),
        "--divide-config",
        small_divide_config,
        "--divide-weights",
        detector_weights,
        "--dino-weights",
        dino_weights,
        "--conquer-size",
        "64",
        "--quiet",
    ]
    cfg = UnsamSettings(
        features="dino",
        dino_weights=dino_weights,
        divide="detector",
        divide_config=small_divide_config,
        divide_weights=detector_weights,
        conquer_size=64,
    )
    labeler = build_labeler(cfg)
    first = tmp_path / "first"
    summary = run(str(photos), str(first), cfg, progress=False, labeler=labeler)
    assert summary.done == 4 and summary.failed == 0
    assert _check_outputs(first, photos) > 0

    # kill the CLI after its first image, then resume in the same folder
    resumed = tmp_path / "resumed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unsam.pseudo", *args, "--output", str(resumed)],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(resumed.glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(resumed.glob("*.json")))
    assert 1 <= done_before <= 4
    summary = run(str(photos), str(resumed), cfg, progress=False, labeler=labeler)
    assert summary.skipped == done_before and summary.done == 4 - done_before
    for f in first.glob("*.json"):
        assert f.read_bytes() == (resumed / f.name).read_bytes(), f.name


def test_recipe_unsam_offline_maskcut_divide(shared_data, tmp_path, caplog):
    """No weights at all: MaskCut divide + classical features, with warnings that this is not
    the published recipe; the same output structure."""
    photos = _photos(shared_data, tmp_path, n=1)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert (
            pseudo_main(
                [
                    "--recipe",
                    "unsam",
                    "--input",
                    str(photos),
                    "--output",
                    str(out),
                    "--conquer-size",
                    "96",
                    "--quiet",
                ]
            )
            == 0
        )
    text = caplog.text
    assert "not the published CutLER detector" in text and "not the published DINO keys" in text
    assert _check_outputs(out, photos) > 0


def _cli_error(capsys, argv):
    assert pseudo_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_recipe_unsam_bad_input(tmp_path, capsys, dino_weights):
    base = [
        "--recipe",
        "unsam",
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--features",
        "classical",
        "--quiet",
    ]
    msg = _cli_error(capsys, base + ["--divide-weights", str(tmp_path / "missing.pth")])
    assert "missing.pth" in msg
    msg = _cli_error(capsys, base + ["--divide", "detector"])
    assert "--divide-weights" in msg
    # a checkpoint of another network: its shapes do not match the detector's
    msg = _cli_error(capsys, base + ["--divide-weights", dino_weights])
    assert "not a checkpoint of this divide detector" in msg
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("MODEL:\n  NO_SUCH_KEY: 1\n")
    msg = _cli_error(
        capsys, base + ["--divide-weights", dino_weights, "--divide-config", str(wrong)]
    )
    assert "wrong.yaml" in msg
    msg = _cli_error(capsys, base + ["--conquer-size", "100"])
    assert "--conquer-size" in msg
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty" in _cli_error(capsys, base + ["--divide-weights", str(empty)])


class _TrainerState:
    """A Python object in a checkpoint, as detectron2's trainer state can be."""


def test_divide_weights_with_trainer_state_load_only_when_trusted(tmp_path, caplog, monkeypatch):
    """A Python object in a checkpoint could run code (issue 26): refused unless the user lists
    the file in UNSAM_TRUSTED_WEIGHTS, then read with a warning."""
    from unsam.pseudo.detector import DivideError, read_detector_state_dict

    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"module.w": torch.ones(2)}, "trainer": _TrainerState()}, path)
    monkeypatch.delenv("UNSAM_TRUSTED_WEIGHTS", raising=False)
    with pytest.raises(DivideError, match="_TrainerState.*UNSAM_TRUSTED_WEIGHTS"):
        read_detector_state_dict(str(path))
    monkeypatch.setenv("UNSAM_TRUSTED_WEIGHTS", str(path))
    with caplog.at_level("WARNING"):
        state = read_detector_state_dict(str(path))
    assert list(state) == ["w"] and "UNSAM_TRUSTED_WEIGHTS" in caplog.text


def test_recipe_unsam_refine_snaps_to_superpixels(shared_data):
    """``refine``: a mask becomes the union of the superpixels it mostly covers (the engine's
    unsupervised refinement in place of the published CascadePSP); one that covers no
    superpixel's majority stays as it was."""
    import cv2

    from unsam.pseudo.recipe import UnsamLabeler
    from unsam.pseudo.refine import SuperpixelGraph
    from unsam.pseudo.runner import read_image

    path = sorted((shared_data / "coco_tiny_val2017" / "images").glob("*.jpg"))[0]
    image = cv2.resize(read_image(path), (320, 240), interpolation=cv2.INTER_AREA)
    cfg = UnsamSettings(divide="maskcut", conquer_size=96, n_superpixels=300)
    raw = UnsamLabeler(cfg)(image)
    refined = UnsamLabeler(UnsamSettings(**{**cfg.__dict__, "refine": True}))(image)
    assert len(raw) == len(refined) and any(a["level"] == 1 for a in refined)
    labels = SuperpixelGraph(image, 300).labels
    snapped = 0
    for a, b in zip(raw, refined):
        assert (a["level"], a["parent_id"]) == (b["level"], b["parent_id"])
        m = rle_to_mask(b["segmentation"])
        if np.isin(labels, np.unique(labels[m])).sum() == m.sum():
            snapped += 1
        else:
            assert np.array_equal(m, rle_to_mask(a["segmentation"]))
    assert snapped > len(refined) // 2
