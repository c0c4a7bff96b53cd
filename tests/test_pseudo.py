"""Tests of the divide-and-conquer pseudo-label engine (issue 5)."""

import json
from pathlib import Path

import unsam.compat  # noqa: F401

import cv2
import numpy as np
import pytest
import torch

from unsam.io.sa1b import read_sa1b_json, rle_to_mask
from unsam.pseudo import runner
from unsam.pseudo.__main__ import main as pseudo_main
from unsam.pseudo.classical import ClassicalLabeler, ClassicalSettings
from unsam.pseudo.conquer import merge_hierarchy, merge_selective
from unsam.pseudo.divide import maskcut, ncut_vector
from unsam.pseudo.features import ClassicalFeatures, DinoFeatures, FeatureError

SMALL = dict(resolution=240, crop_resolution=160, n_superpixels=900)
SMALL_ARGS = ["--resolution", "128", "--crop-resolution", "96", "--quiet"]


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def synthetic_image(seed=0, h=240, w=320):
    """Textured background + red disk + blue rectangle + a green/yellow two-colour square.

    Returns (RGB uint8 image, {name: bool mask})."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5)
    stripes = np.sin(np.arange(w)[None, :] / 3.0 + np.arange(h)[:, None] / 5.0)
    bg = (120 + 25 * noise / noise.std() + 20 * stripes).clip(0, 255)
    img = np.stack([bg, bg * 0.95, bg * 0.9], -1)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = {
        "disk": (yy - 70) ** 2 + (xx - 80) ** 2 < 45**2,
        "rect": (yy > 140) & (yy < 215) & (xx > 30) & (xx < 150),
        "square": (yy > 50) & (yy < 190) & (xx > 190) & (xx < 290),
    }
    masks["square_top"] = masks["square"] & (yy < 120)
    masks["square_bottom"] = masks["square"] & (yy >= 120)
    colours = {
        "disk": (210, 40, 40),
        "rect": (40, 60, 200),
        "square_top": (40, 170, 60),
        "square_bottom": (230, 210, 40),
    }
    for name, col in colours.items():
        m = masks[name]
        img[m] = np.array(col, np.float32) + 6 * rng.normal(0, 1, (m.sum(), 3))
    return img.clip(0, 255).astype(np.uint8), masks


# ------------------------------------------------------------------------------ divide
def test_ncut_separates_two_clusters():
    rng = np.random.default_rng(0)
    h, w, c = 12, 16, 32
    a, b = rng.normal(size=c), rng.normal(size=c)
    feats = np.where((np.arange(w) < 5)[None, :, None], a, b) + 0.3 * rng.normal(size=(h, w, c))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    vec = ncut_vector(feats.reshape(-1, c), tau=0.15).reshape(h, w)
    left = vec[:, :5] > vec.mean()
    right = vec[:, 5:] > vec.mean()
    assert (left.all() and not right.any()) or (right.all() and not left.any())
    masks = maskcut(feats, n_masks=1)
    truth = np.zeros((h, w), bool)
    truth[:, :5] = True
    # the foreground is the smaller, corner-free side or its complement; either way a clean split
    assert max(_iou(masks[0], truth), _iou(masks[0], ~truth)) == 1.0


def test_conquer_hierarchy_nested():
    rng = np.random.default_rng(1)
    h, w, c = 10, 12, 16
    base = [rng.normal(size=c) for _ in range(3)]
    lab = np.zeros((h, w), int)
    lab[:, 4:8] = 1
    lab[:, 8:] = 2
    feats = np.stack([base[k] for k in lab.ravel()]).reshape(h, w, c) + 0.05 * rng.normal(
        size=(h, w, c)
    )
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    segs = merge_hierarchy(feats)
    for k in range(3):
        assert any(_iou(s.mask, lab == k) == 1.0 for s in segs)
    for s in segs:
        if s.parent >= 0:
            assert s.mask.sum() < segs[s.parent].mask.sum()
            assert not (s.mask & ~segs[s.parent].mask).any()


def test_merge_selective_complete_nested_hierarchy():
    """A chain of 6 + 4 + 6 nodes in three colours: the selective-search merge finds each colour
    run as one group, ends in the whole chain and every parent strictly contains its child."""
    rng = np.random.default_rng(2)
    runs = [0] * 6 + [1] * 4 + [2] * 6
    base = rng.normal(size=(3, 8))
    feats = base[runs] + 0.05 * rng.normal(size=(len(runs), 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    n = len(runs)
    pairs = np.stack([np.arange(n - 1), np.arange(1, n)], 1)
    boxes = np.stack([np.arange(n), np.zeros(n), np.arange(n) + 1, np.ones(n)], 1)
    segs = merge_selective(feats, np.ones(n), pairs, boxes, min_weight=2.0)
    assert len(segs) == n - 1  # every merge is reported (all have weight >= 2)
    assert segs[0].mask.all() and segs[0].parent == -1
    lab = np.array(runs)
    for k in range(3):
        assert any((s.mask == (lab == k)).all() for s in segs), k
    for s in segs[1:]:
        p = segs[s.parent].mask
        assert s.parent >= 0 and s.mask.sum() < p.sum() and not (s.mask & ~p).any()


def test_snapper_boundary_and_box_match_direct_computation():
    from unsam.pseudo.refine import SuperpixelGraph

    img, _ = synthetic_image()
    graph = SuperpixelGraph(img, 900)
    rng = np.random.default_rng(0)
    nodes = rng.random((20, graph.k)) < 0.2
    nodes[0] = True  # the whole image: no border inside the image
    got = graph.boundary_strength(nodes)
    assert got[0] == 0.0
    for m, g in zip(nodes[1:], got[1:]):
        cut = m[graph.pairs[:, 0]] != m[graph.pairs[:, 1]]
        mean = graph.border_edge[cut].sum() / graph.border_len[cut].sum()
        assert g == pytest.approx(1.0 - np.exp(-mean / 2.0), rel=1e-4)
    for m, a in zip(nodes, graph.box_area(nodes)):
        _, (x0, y0, x1, y1) = graph.nodes_to_mask(m)
        assert a == (x1 - x0) * (y1 - y0)


def test_reassign_border_repairs_a_damaged_border():
    """A disk mask that lost some border superpixels and gained some background ones is snapped
    back by the colour models."""
    from unsam.pseudo.refine import SuperpixelGraph

    img, masks = synthetic_image()
    graph = SuperpixelGraph(img, 900)
    disk = graph.soft_to_nodes(masks["disk"].astype(np.float32), (0, 0, img.shape[1], img.shape[0]))
    damaged = _damaged_disk(graph, disk)
    colour = graph.colour_sums(0.5)[0]
    fixed = graph.reassign_border(np.stack([damaged, disk]), colour)
    err = lambda m: graph.sizes[m != disk].sum()  # noqa: E731
    assert err(fixed[0]) < 0.25 * err(damaged)
    assert err(fixed[1]) <= 0.02 * graph.sizes[disk].sum()  # a correct mask stays (nearly) as is


def _damaged_disk(graph, disk):
    """The disk's superpixel set with every third inner border superpixel removed and every
    third outer one added."""
    touching = np.zeros(graph.k, bool)
    for a, b in graph.pairs:
        if disk[a] != disk[b]:
            touching[a] = touching[b] = True
    inner, outer = np.flatnonzero(touching & disk), np.flatnonzero(touching & ~disk)
    damaged = disk.copy()
    damaged[inner[::3]] = False
    damaged[outer[::3]] = True
    return damaged


def test_polish_moves_a_damaged_border_back_onto_the_edges():
    from unsam.pseudo.refine import SuperpixelGraph

    img, masks = synthetic_image()
    graph = SuperpixelGraph(img, 900)
    disk = graph.soft_to_nodes(masks["disk"].astype(np.float32), (0, 0, img.shape[1], img.shape[0]))
    damaged = _damaged_disk(graph, disk)
    colour = graph.colour_sums(0.5)[0]
    err = lambda m: graph.sizes[m != disk].sum()  # noqa: E731
    scales = (0.5, 1.0, 3.0)
    for scale, fixed in zip(scales, graph.polish(np.stack([damaged, disk]), colour, 0.1, scales)):
        assert err(fixed[0]) < 0.25 * err(damaged), scale
        assert err(fixed[1]) <= 0.02 * graph.sizes[disk].sum(), scale  # a correct mask stays
    # one scale at a time gives the same masks
    assert np.array_equal(
        graph.polish(damaged[None], colour, 0.1, (1.0,))[0][0],
        graph.polish(damaged[None], colour, 0.1, scales)[1][0],
    )
    # the edge term alone (no colour term) also closes the gaps: cutting weak edges costs
    assert err(graph.polish(damaged[None], colour, 0.0, (1.0,))[0][0]) < 0.5 * err(damaged)


def test_polish_stage_replaces_masks_by_better_scored_variants():
    """After the polish no chosen mask scores below its original, no two are equal, and every
    replaced row is reachable through ``replaced_by``."""
    from unsam.pseudo import candidates as CA
    from unsam.pseudo.refine import SuperpixelGraph

    img, masks = synthetic_image()
    graph = SuperpixelGraph(img, 900)
    disk = graph.soft_to_nodes(masks["disk"].astype(np.float32), (0, 0, img.shape[1], img.shape[0]))
    rect = graph.soft_to_nodes(masks["rect"].astype(np.float32), (0, 0, img.shape[1], img.shape[0]))
    whole = (0, 0, img.shape[1], img.shape[0])
    cands = [
        CA.Candidate(m, whole, 0.5)
        for m in (_damaged_disk(graph, disk), _damaged_disk(graph, rect), rect)
    ]
    table, _ = CA.distinct_masks(cands, graph.sizes, 0.9 * graph.sizes.sum(), 0.9)
    CA.score_masks(table, graph)
    sel = CA.deduplicate(table, graph.sizes, 0.95, 10)
    before = {row: table.score[row] for row in sel.chosen}
    CA.polish(
        table, sel, graph, graph.colour_sums(0.5)[0], 0.1, (0.5, 1.0, 3.0), 0.9 * graph.sizes.sum()
    )
    keys = [table.key(table.nodes[row]) for row in sel.chosen]
    assert len(set(keys)) == len(keys) == len(before)
    for old, score in before.items():
        new = sel.replaced_by.get(old, old)
        assert new in sel.chosen and table.score[new] >= score
        assert sel.support[new] == sel.support[old]
    new_disk = table.nodes[sel.replaced_by[0]]  # row 0: the damaged disk
    assert graph.sizes[new_disk != disk].sum() < graph.sizes[cands[0].nodes != disk].sum()


def test_straddling_separates_objects_from_background_fragments():
    """An object's mask follows coarse superpixel borders (low straddling); a fragment of the
    textured background cuts through them; the score term demotes it by at most 1/sqrt(floor)."""
    from unsam.pseudo import candidates as CA
    from unsam.pseudo.refine import SuperpixelGraph

    img, masks = synthetic_image()
    h, w = img.shape[:2]
    graph = SuperpixelGraph(img, 900, coarse_segments=150)
    yy, xx = np.mgrid[0:h, 0:w]
    fragment = (yy > 200) & (yy < 230) & (xx > 170) & (xx < 200)  # background only
    nodes = np.stack(
        [
            graph.soft_to_nodes(m.astype(np.float32), (0, 0, w, h))
            for m in (masks["disk"], masks["rect"], fragment)
        ]
    )
    disk, rect, frag = graph.straddling(nodes)
    assert max(disk, rect) < 0.15 < 0.5 < frag
    with_term = CA.selection_score(nodes, np.zeros(3), graph)[1]
    without = CA.selection_score(nodes, np.zeros(3), SuperpixelGraph(img, 900))[1]
    ratio = with_term / without
    assert np.all(ratio <= 1.0) and np.all(ratio >= np.sqrt(CA.STRADDLE_FLOOR) - 1e-9)
    assert ratio[2] < ratio[0] and ratio[2] < ratio[1]
    with pytest.raises(ValueError, match="coarse_segments"):
        SuperpixelGraph(img, 900).straddling(nodes)


# ------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def synthetic_result():
    img, masks = synthetic_image()
    anns = ClassicalLabeler(ClassicalSettings(**SMALL))(img)
    return img, masks, anns


def test_engine_recovers_shapes_and_parts(synthetic_result):
    img, masks, anns = synthetic_result
    assert anns, "no masks"
    pred = [rle_to_mask(a["segmentation"]) for a in anns]
    for name in ("disk", "rect", "square"):
        best = max(_iou(p, masks[name]) for p in pred)
        assert best >= 0.8, f"{name}: best IoU {best:.2f}"
    part = max(max(_iou(p, masks["square_top"]), _iou(p, masks["square_bottom"])) for p in pred)
    assert part >= 0.8, f"two-colour square: best part IoU {part:.2f}"


def test_engine_annotation_format(synthetic_result):
    img, _, anns = synthetic_result
    h, w = img.shape[:2]
    ids = {a["id"] for a in anns}
    assert ids == set(range(len(anns)))
    assert len(anns) <= ClassicalSettings().max_masks
    by_id = {a["id"]: a for a in anns}
    for a in anns:
        m = rle_to_mask(a["segmentation"])
        assert m.shape == (h, w) and m.sum() == a["area"] > 0
        assert a["area"] <= 0.9 * h * w
        x, y, bw, bh = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, bw, bh) == (
            xs.min(),
            ys.min(),
            xs.max() - xs.min() + 1,
            ys.max() - ys.min() + 1,
        )
        px, py = a["point_coords"][0]
        assert m[int(round(py)), int(round(px))]
        assert 0.0 <= a["predicted_iou"] <= 1.0 and 0.0 <= a["stability_score"] <= 1.0
        if a["parent_id"] >= 0:
            p = by_id[a["parent_id"]]
            assert p["area"] > a["area"] and a["level"] == p["level"] + 1
            pm = rle_to_mask(p["segmentation"])
            assert (m & pm).sum() >= 0.9 * m.sum()
        else:
            assert a["level"] == 0
    scores = [a["predicted_iou"] for a in anns]
    assert scores == sorted(scores, reverse=True)


def test_engine_deterministic():
    img, _ = synthetic_image(seed=3, h=120, w=160)
    cfg = ClassicalSettings(**SMALL)
    a1 = ClassicalLabeler(cfg)(img)
    a2 = ClassicalLabeler(cfg)(img)
    assert json.dumps(a1) == json.dumps(a2)


# ------------------------------------------------------------------------------ runner
@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(4):
        img, _ = synthetic_image(seed=10 + i, h=96, w=128)
        cv2.imwrite(str(d / f"img_{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return d


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).glob("*.json"))}


def test_shards_equal_full_run(image_dir, tmp_path):
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    assert pseudo_main(["--input", str(image_dir), "--output", str(full)] + SMALL_ARGS) == 0
    for i in range(2):
        assert (
            pseudo_main(
                ["--input", str(image_dir), "--output", str(sharded), "--shard", f"{i}/2"]
                + SMALL_ARGS
            )
            == 0
        )
    a, b = _files(full), _files(sharded)
    assert len(a) == 4 and a == b
    data = read_sa1b_json(full / "img_2.json")
    assert data["image"]["image_id"] == 2
    assert Path(data["image"]["file_name"]) == (image_dir / "img_2.png").resolve()


def test_resume_after_kill_equals_uninterrupted(image_dir, tmp_path):
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert pseudo_main(["--input", str(image_dir), "--output", str(ref)] + SMALL_ARGS) == 0
    # "killed" after two images: two finished files plus a half-written temp file
    assert (
        pseudo_main(
            ["--input", str(image_dir), "--output", str(resumed), "--end-id", "2"] + SMALL_ARGS
        )
        == 0
    )
    (resumed / ".img_2.json.abc.tmp").write_text('{"image": {"image_id"')
    before = (resumed / "img_0.json").stat().st_mtime_ns
    s = runner.run(
        str(image_dir),
        str(resumed),
        ClassicalSettings(resolution=128, crop_resolution=96),
        progress=False,
    )
    assert (s.skipped, s.done, s.failed) == (2, 2, 0)
    assert (resumed / "img_0.json").stat().st_mtime_ns == before  # not recomputed
    assert _files(ref) == _files(resumed)


def test_run_leaves_the_callers_threads_and_rng_alone(image_dir, tmp_path):
    """One worker labels in this process on one torch thread, then restores the caller's
    setting; numpy's global random state is not touched."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def labeler(image):
            seen.append(torch.get_num_threads())
            return []

        np.random.seed(123)
        rng = np.random.get_state()[1].copy()
        s = runner.run(
            str(image_dir),
            str(tmp_path / "o"),
            ClassicalSettings(),
            progress=False,
            labeler=labeler,
        )
        assert s.done == 4 and seen == [runner.LABELER_THREADS] * 4
        assert torch.get_num_threads() == 2
        assert np.array_equal(np.random.get_state()[1], rng)
    finally:
        torch.set_num_threads(threads)


def test_every_recipe_setting_has_an_option():
    """The CLI is generated from the recipes' settings classes: every field of every recipe
    has an option, no option given gives the defaults, each option reaches its field, and an
    option of another recipe is refused."""
    import dataclasses

    from unsam.pseudo.__main__ import build_parser
    from unsam.pseudo.config import SettingError, given_settings
    from unsam.pseudo.labelers import RECIPES, get_recipe, make_settings, settings_classes

    base = ["--input", "x", "--output", "y"]
    parser = build_parser()
    assert given_settings(parser.parse_args(base), settings_classes()) == {}
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    for recipe in RECIPES.values():
        assert {f.name for f in dataclasses.fields(recipe.settings)} <= set(flags), recipe.name
    args = base + [
        "--variants",
        "0.3,0.2",
        "--colour-bandwidths",
        "--no-pair-unions",
        "--thresholds",
        "0.7",
        "0.2",
        "--superpixels",
        "300",
        "--max-area-frac",
        "0.5",
        "--dino-weights",
        "w.pth",
        "--selective",
        "colour",
        "features",
    ]
    cfg = make_settings(
        get_recipe("classical"), given_settings(parser.parse_args(args), settings_classes())
    )
    assert type(cfg) is ClassicalSettings
    assert (cfg.variants, cfg.colour_bandwidths, cfg.pair_unions) == (((0.3, 0.2),), (), False)
    assert (cfg.thresholds, cfg.n_superpixels, cfg.max_area_frac) == ((0.7, 0.2), 300, 0.5)
    assert (cfg.dino_weights, cfg.selective, cfg.all_merges) == (
        "w.pth",
        ("colour", "features"),
        True,
    )
    unsam = make_settings(
        get_recipe("unsam"),
        given_settings(
            parser.parse_args(base + ["--refine", "--superpixels", "300"]), settings_classes()
        ),
    )
    assert (unsam.refine, unsam.n_superpixels, unsam.divide) == (True, 300, "maskcut")
    with pytest.raises(SettingError, match="--refine is a setting of recipe unsam"):
        make_settings(
            get_recipe("classical"),
            given_settings(parser.parse_args(base + ["--refine"]), settings_classes()),
        )
    with pytest.raises(SettingError, match="--max-masks is a setting of recipe classical"):
        make_settings(
            get_recipe("unsam"),
            given_settings(parser.parse_args(base + ["--max-masks", "3"]), settings_classes()),
        )


def test_unreadable_image_listed_in_failed(image_dir, tmp_path, capsys):
    (image_dir / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    assert pseudo_main(["--input", str(image_dir / "*"), "--output", str(out)] + SMALL_ARGS) == 0
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and "broken.jpg" in failed[0]
    assert len(_files(out)) == 4
    assert "1 failed" in capsys.readouterr().out


def test_shard_and_input_errors(tmp_path):
    with pytest.raises(SystemExit):
        pseudo_main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--shard", "2/2"])
    assert (
        pseudo_main(["--input", str(tmp_path / "missing_dir"), "--output", str(tmp_path / "o")])
        == 2
    )


def test_evaluate_cli(image_dir, tmp_path):
    from unsam.io.sa1b import mask_to_rle
    from unsam.pseudo.evaluate import main as eval_main

    out = tmp_path / "pl"
    assert pseudo_main(["--input", str(image_dir), "--output", str(out)] + SMALL_ARGS) == 0
    images, anns = [], []
    for i in range(4):
        _, masks = synthetic_image(seed=10 + i, h=96, w=128)
        images.append({"id": 100 + i, "file_name": f"img_{i}.png", "height": 96, "width": 128})
        for name in ("disk", "rect", "square"):
            m = masks[name]
            if not m.any():
                continue  # the shapes are laid out for 240x320; some miss this small image
            ys, xs = np.nonzero(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": mask_to_rle(m),
                    "area": int(m.sum()),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(np.ptp(xs) + 1),
                        int(np.ptp(ys) + 1),
                    ],
                }
            )
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        )
    )
    m_path = tmp_path / "m.json"
    assert eval_main(["--gt", str(gt), "--pred", str(out), "--out", str(m_path)]) == 0
    metrics = json.loads(m_path.read_text())
    for key in ("AR@1", "AR@10", "AR@100", "AR@1000", "AP", "AP50"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["AR@100"] > 0.5  # the shapes are easy at this size
    assert eval_main(["--gt", str(gt), "--pred", str(tmp_path / "nothing")]) == 2


# ------------------------------------------------------------------------------ DINO
def _write_dino_checkpoint(path, arch="vit_small_patch8_224", corrupt=None):
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    torch.manual_seed(0)
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.zeros(8, 384)  # DINO head: must be ignored
    if corrupt:
        state[f"module.backbone.{corrupt}"] = torch.zeros(3, 3)
    torch.save({"teacher": state, "student": state, "epoch": 1}, path)


def test_dino_checkpoint_loads_and_gives_keys(tmp_path):
    ckpt = tmp_path / "dino_vits8.pth"
    _write_dino_checkpoint(ckpt)
    feats = DinoFeatures(str(ckpt), arch="vit_small_patch8_224", resolution=64)
    img, _ = synthetic_image(h=48, w=64)
    f = feats(img)
    assert f.shape == (6, 8, 384)
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-4)
    # the keys come from the checkpoint: compare with a manual qkv projection of block 11
    import timm

    ref = timm.create_model(
        "vit_small_patch8_224", pretrained=False, num_classes=0, dynamic_img_size=True
    )
    ref.load_state_dict(
        {
            k[len("module.backbone.") :]: v
            for k, v in torch.load(ckpt, weights_only=True)["teacher"].items()
            if "backbone" in k
        }
    )
    assert torch.equal(feats.model.blocks[-1].attn.qkv.weight, ref.blocks[-1].attn.qkv.weight)


def test_dino_wrong_shape_and_missing_file(tmp_path):
    bad = tmp_path / "bad.pth"
    _write_dino_checkpoint(bad, corrupt="blocks.0.attn.qkv.weight")
    with pytest.raises(FeatureError, match="blocks.0.attn.qkv.weight"):
        DinoFeatures(str(bad), arch="vit_small_patch8_224")
    with pytest.raises(FeatureError, match="not found"):
        DinoFeatures(str(tmp_path / "nope.pth"))
    with pytest.raises(FeatureError, match="needs --dino-weights"):
        DinoFeatures(None)


def test_dino_backend_cli_error(tmp_path, capsys):
    rc = pseudo_main(
        [
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--features",
            "dino",
            "--dino-weights",
            str(tmp_path / "missing.pth"),
        ]
    )
    assert rc == 2 and "not found" in capsys.readouterr().err


def _stripes(period=4):
    """160×160 grey stripes (70 / 190): vertical on the left half, horizontal on the right —
    every 8-px patch has the same mean colour, only the texture's orientation differs."""
    s = np.where((np.arange(160) // (period // 2)) % 2 == 0, 70, 190).astype(np.uint8)
    img = np.empty((160, 160, 3), np.uint8)
    img[:, :80] = s[None, :80, None]
    img[:, 80:] = s[:, None, None]
    return img


def test_classical_features_shape_colour_and_texture():
    """Shape and norm; a patch is closer to a patch of its own colour (texture) a little
    further away than to a nearer patch of another colour (texture). Position favours the
    nearer patch, so each comparison fails with the cue it checks switched off."""
    img, _ = synthetic_image()
    f = ClassicalFeatures(resolution=160)(img)
    assert f.shape[:2] == (15, 20) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-4)

    def colour_separates(f):  # disk patch vs a disk patch 3 cells right / background 2 cells left
        a, same, other = f[4, 3], f[4, 6], f[4, 1]
        return a @ same > 0.9 and a @ other < 0.5

    def texture_separates(f):  # vertical stripes vs 5 cells left / horizontal stripes 4 cells right
        a, same, other = f[10, 7], f[10, 2], f[10, 11]
        return a @ same > a @ other + 0.1

    assert colour_separates(f)
    assert not colour_separates(
        ClassicalFeatures(160, color_weight=0, context_weight=0, texture_weight=0)(img)
    )
    stripes = _stripes()
    assert texture_separates(ClassicalFeatures(resolution=160)(stripes))
    assert not texture_separates(ClassicalFeatures(resolution=160, texture_weight=0)(stripes))


def test_colour_sums_compare_colour_distributions():
    """Full-resolution colour embedding pooled on superpixels: same-colour superpixels are
    near-identical, superpixels of different colours are not."""
    from unsam.pseudo.refine import SuperpixelGraph

    img, masks = synthetic_image()
    graph = SuperpixelGraph(img, 900)
    sums, weight = graph.colour_sums(0.5)
    assert sums.shape == (graph.k, 64) and weight.shape == (graph.k,)
    np.testing.assert_allclose(weight, graph.sizes)
    unit = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    # coherence |mean| <= 1, with equality only for a single-colour-bin superpixel
    assert (np.linalg.norm(sums, axis=1) <= weight * (1 + 1e-6)).all()

    def inside(m):
        return np.flatnonzero(
            np.bincount(graph.labels.ravel(), weights=m.ravel(), minlength=graph.k)
            > 0.95 * graph.sizes
        )

    disk, rect = inside(masks["disk"]), inside(masks["rect"])
    assert len(disk) >= 2 and len(rect) >= 2
    assert unit[disk[0]] @ unit[disk[1]] > 0.9
    assert unit[disk[0]] @ unit[rect[0]] < 0.5


def test_engine_colour_hierarchy_adds_small_objects():
    """A small (~150 px) object that the feature grid is too coarse for is recovered once the
    full-resolution colour hierarchy is on."""
    img, _ = synthetic_image(seed=3)
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    small = (yy - 20) ** 2 + (xx - 300) ** 2 < 7**2  # top-right corner, on the background
    img[small] = (250, 0, 250)
    best = {}
    for bws in ((), (0.5,)):
        # the other whole-image colour steps off, so only the colour hierarchy differs
        anns = ClassicalLabeler(
            ClassicalSettings(**SMALL, colour_bandwidths=bws, selective=(), refine_top=0)
        )(img)
        best[bws] = max(_iou(rle_to_mask(a["segmentation"]), small) for a in anns)
    assert best[(0.5,)] >= 0.6, best
    assert best[(0.5,)] > best[()], best


@pytest.mark.slow
def test_dino_vits_weights_into_vitb_is_an_error(tmp_path):
    small = tmp_path / "vits8.pth"
    _write_dino_checkpoint(small)
    with pytest.raises(FeatureError, match="shape mismatch"):
        DinoFeatures(str(small), arch="vit_base_patch8_224")


@pytest.mark.slow
def test_real_photos_beat_nothing(shared_data, tmp_path):
    """Smoke run on 3 real photos: masks exist and are well-formed."""
    images = shared_data / "coco_tiny_val2017" / "images"
    out = tmp_path / "coco"
    assert (
        pseudo_main(["--input", str(images), "--output", str(out), "--end-id", "3", "--quiet"]) == 0
    )
    for f in out.glob("*.json"):
        assert len(read_sa1b_json(f)["annotations"]) >= 50


def test_dino_backend_end_to_end(tmp_path):
    """The engine runs with the DINO backend (random-weight checkpoint: format, not quality)."""
    ckpt = tmp_path / "vits8.pth"
    _write_dino_checkpoint(ckpt)
    d = tmp_path / "imgs"
    d.mkdir()
    img, _ = synthetic_image(h=96, w=128)
    cv2.imwrite(str(d / "a.png"), img[..., ::-1])
    out = tmp_path / "out"
    rc = pseudo_main(
        [
            "--input",
            str(d),
            "--output",
            str(out),
            "--features",
            "dino",
            "--dino-arch",
            "vit_small_patch8_224",
            "--dino-weights",
            str(ckpt),
            "--resolution",
            "96",
            "--crop-resolution",
            "64",
            "--quiet",
        ]
    )
    assert rc == 0
    anns = read_sa1b_json(out / "a.json")["annotations"]
    assert anns and all(rle_to_mask(a["segmentation"]).shape == (96, 128) for a in anns)
