"""The pseudo-label recipe interface (issue 30, item 4): a new recipe is one module (settings
dataclass + labeler) and one registry line, and ``python -m unsam.pseudo --recipe NAME`` runs it
through the runner — options, settings record, resume, worker processes — like the built-in
ones; the built-in recipes' settings records stay as they were."""

import json
from dataclasses import dataclass
from pathlib import Path

import unsam.compat  # noqa: F401

import numpy as np
import pytest
from PIL import Image

from unsam.io.sa1b import annotation_from_mask, read_sa1b_json, rle_to_mask
from unsam.pseudo.__main__ import build_parser
from unsam.pseudo.__main__ import main as pseudo_main
from unsam.pseudo.config import AT_LEAST_1, FLAT_RECORD, Settings, setting
from unsam.pseudo.labelers import RECIPES, Recipe, get_recipe, register_recipe

from .test_reliability import _one_error_line


# --------------------------------------------------------------- the toy recipe: one module's worth
@dataclass
class GridSettings(Settings):
    cell: int = setting(32, "side of a grid square, in pixels", valid=AT_LEAST_1)
    level: int = setting(0, "the level every square is recorded at")


class GridLabeler:
    """Every square of a grid is a mask (module level: worker processes unpickle it)."""

    def __init__(self, cfg: GridSettings):
        self.cfg = cfg

    def __call__(self, image: np.ndarray):
        h, w = image.shape[:2]
        c = self.cfg.cell
        boxes = [
            (x, y, min(x + c, w), min(y + c, h)) for y in range(0, h, c) for x in range(0, w, c)
        ]
        return [
            annotation_from_mask(
                np.ones((y1 - y0, x1 - x0), bool),
                i,
                (x0, y0, x1, y1),
                (h, w),
                level=self.cfg.level,
                parent_id=-1,
            )
            for i, (x0, y0, x1, y1) in enumerate(boxes)
        ]


GRID = Recipe("grid", GridSettings, GridLabeler, "squares of a grid")


@pytest.fixture
def grid_recipe():
    """The one registry line, undone after the test."""
    before = dict(RECIPES)
    yield register_recipe(GRID)
    RECIPES.clear()
    RECIPES.update(before)


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 96), (50, 70), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _squares(h, w, c):
    return -(-h // c) * -(-w // c)


@pytest.mark.parametrize("workers", [1, 2])
def test_toy_recipe_runs_end_to_end(grid_recipe, photos, tmp_path, capsys, workers):
    out = tmp_path / f"out{workers}"
    argv = [
        "--recipe",
        "grid",
        "--cell",
        "24",
        "--input",
        str(photos),
        "--output",
        str(out),
        "--quiet",
        "--workers",
        str(workers),
    ]
    assert pseudo_main(argv) == 0
    assert "3 labelled" in capsys.readouterr().out
    for path, (h, w) in zip(sorted(out.glob("*.json")), [(64, 96), (50, 70), (32, 32)]):
        data = read_sa1b_json(path)  # validates the SA-1B structure
        anns = data["annotations"]
        assert (data["image"]["height"], data["image"]["width"]) == (h, w)
        assert len(anns) == _squares(h, w, 24)
        cover = sum(rle_to_mask(a["segmentation"]).astype(int) for a in anns)
        assert (cover == 1).all()  # the squares tile the image
        assert anns[0]["bbox"] == [0, 0, 24, 24] and anns[0]["point_coords"] == [[11.0, 11.0]]
    # the record is the recipe's own settings, nothing of the built-in recipes
    record = json.loads((out / "pseudo_settings.txt").read_text())
    assert record == {"recipe": "grid", "cell": 24, "level": 0}
    # a rerun resumes; other settings are refused, naming the option
    assert pseudo_main(argv) == 0
    assert "3 already done" in capsys.readouterr().out
    assert pseudo_main(argv[:2] + ["--cell", "16"] + argv[4:]) == 2
    _one_error_line(capsys.readouterr().err, "--cell 24 -> 16")


def test_toy_recipe_options_and_errors(grid_recipe, photos, tmp_path, capsys):
    help_text = build_parser().format_help()
    assert "recipe grid:" in help_text and "--cell CELL" in help_text
    assert "grid: squares of a grid" in help_text
    base = ["--recipe", "grid", "--input", str(photos), "--output", str(tmp_path / "o"), "--quiet"]
    assert pseudo_main(base + ["--cell", "0"]) == 2
    _one_error_line(capsys.readouterr().err, "--cell 0")
    assert pseudo_main(base + ["--max-masks", "5"]) == 2
    _one_error_line(capsys.readouterr().err, "--max-masks is a setting of recipe classical")
    assert pseudo_main(["--cell", "8"] + base[2:]) == 2  # the default recipe is classical
    _one_error_line(capsys.readouterr().err, "--cell is a setting of recipe grid")
    assert not (tmp_path / "o").exists()


def test_registry_refuses_taken_names_and_clashing_options(grid_recipe):
    with pytest.raises(ValueError, match="taken"):
        register_recipe(Recipe("grid", GridSettings, GridLabeler))
    with pytest.raises(ValueError, match="taken"):
        register_recipe(Recipe("grid2", GridSettings, GridLabeler))

    @dataclass
    class Clash(Settings):
        max_masks: int = setting(7, "not the classical --max-masks")

    register_recipe(Recipe("clash", Clash, GridLabeler))
    with pytest.raises(ValueError, match="--max-masks of recipe clash differs"):
        build_parser()
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        get_recipe("nope")


def test_builtin_records_unchanged():
    """The built-in recipes' records list every setting of the flat settings class they had
    before the split, at its default unless the recipe has the setting: folders labelled
    before resume, and older engines resume newer folders."""
    classical, unsam = RECIPES["classical"], RECIPES["unsam"]
    assert classical.record(classical.settings()) == FLAT_RECORD | {"recipe": "classical"}
    assert unsam.record(unsam.settings()) == FLAT_RECORD | {"recipe": "unsam"}
    changed = classical.record(classical.settings(max_masks=7, seed=3))
    assert changed == FLAT_RECORD | {"recipe": "classical", "max_masks": 7, "seed": 3}
    unsam_changed = unsam.record(unsam.settings(conquer_size=64, refine=True))
    assert unsam_changed == FLAT_RECORD | {"recipe": "unsam", "conquer_size": 64, "refine": True}
    # a classical setting in an unsam record (written by an older engine, where every option
    # was accepted) decides nothing: not a difference
    from unsam.pseudo.config import settings_differences

    old = dict(unsam_changed, max_masks=3)
    assert settings_differences(old, unsam_changed, unsam.settings) == []
    assert settings_differences(old, dict(unsam_changed, refine=False), unsam.settings) == [
        "--refine true -> false"
    ]
