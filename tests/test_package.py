"""The package stands alone (issue 30, items 5 and 6): the SA-1B format without detectron2,
configs shipped as package data, no path outside the package, dependencies declared."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "unsam"


def _imported(code: str):
    """Module names (detectron2*, torch) a fresh interpreter holds after running ``code``."""
    probe = (
        f"{code}\nimport sys\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('detectron2', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_sa1b_format_imports_no_detectron2():
    """Every labelling worker imports the format; it used to pay detectron2 (and torch)."""
    assert _imported("import unsam.io, unsam.io.sa1b") == set()


def test_pseudo_worker_path_imports_no_detectron2():
    """A spawned labelling worker imports the pseudo package (every recipe, the runner) and the
    format; detectron2 comes only when the detector divide is built."""
    held = _imported("import unsam.pseudo, unsam.pseudo.__main__, unsam.io.sa1b")
    assert not {m for m in held if m.startswith("detectron2")}


def test_placeholder_c_extension_still_installed_on_demand():
    """``import unsam`` no longer imports detectron2, but detectron2.layers still finds ``_C``."""
    code = (
        "import unsam, sys\n"
        "assert 'detectron2' not in sys.modules\n"
        "import detectron2.layers, detectron2._C as c\n"
        "print(type(c).__name__ if type(c).__module__ == 'unsam.compat' else 'compiled')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("_MissingCExtension", "compiled")


def test_moved_format_names_live_in_unsam_io():
    """The registration module keeps only what needs detectron2; no alias of a moved name."""
    import unsam.data.sa1b as registration
    import unsam.io.sa1b as fmt

    assert set(registration.__all__) == {
        "load_sa1b_dicts",
        "register_sa1b",
        "iter_roots_from_config",
    }
    for name in (
        "read_sa1b_json",
        "write_sa1b_json",
        "annotation_from_mask",
        "mask_to_rle",
        "rle_to_mask",
        "SA1BFormatError",
        "DatasetError",
        "find_sa1b_files",
    ):
        assert getattr(fmt, name).__module__ == "unsam.io.sa1b"


def test_device_default_is_the_same_on_every_machine(monkeypatch):
    """``MODEL.DEVICE`` defaults to "auto": the defaults dump identically with and without a
    GPU; loading a config resolves it to the device this machine runs on."""
    import torch

    from unsam.config import get_unsam_cfg
    from unsam.config.loading import load_config

    dumps, loaded = [], []
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        dumps.append(get_unsam_cfg().dump())
        loaded.append(load_config(None).MODEL.DEVICE)
        assert load_config(None, ["MODEL.DEVICE", "cpu"]).MODEL.DEVICE == "cpu"
    assert dumps[0] == dumps[1] and "DEVICE: auto" in dumps[0]
    assert loaded == ["cpu", "cuda"]


# ------------------------------------------------------------------ installed, not editable
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` (not editable, offline, no dependencies) of a copy of the package's
    sources into a fresh folder: what a user's site-packages would hold."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(PACKAGE, src / "unsam", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    target = tmp_path_factory.mktemp("site")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return target


def _run_installed(target: Path, cwd: Path, *args: str):
    """``python *args`` from ``cwd`` with only the installed package (and the interpreter's
    site-packages, for the dependencies) to import from; never the checkout."""
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_installed_package_ships_its_configs(installed, tmp_path):
    code = (
        "import unsam, unsam.configs as c\n"
        "print(unsam.__file__)\n"
        "for name in c.list_config_files(): print(c.get_config_file(name))\n"
        "from unsam.config.loading import load_config\n"
        "cfg = load_config(c.get_config_file('tiny/unsam_quickstart.yaml'))\n"
        "assert cfg.UNSAM.PROMPT.ENABLED  # its _BASE_ chain (tiny_prompt, tiny, Base) resolved"
    )
    out = _run_installed(installed, tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files and all(f.startswith(str(installed)) for f in files)  # not the checkout's
    names = {Path(f).relative_to(installed / "unsam" / "configs").as_posix() for f in files[1:]}
    assert {
        "divide/cutler_cascade_R50_FPN.yaml",
        "tiny/unsam_quickstart.yaml",
        "Base-UnSAM.yaml",
    } <= names
    assert (installed / "unsam" / "ops" / "csrc" / "cpu_kernels.cpp").is_file()


def test_installed_pseudo_recipe_unsam_finds_its_divide_config(installed, tmp_path):
    """``python -m unsam.pseudo --recipe unsam`` gets past its divide config (then stops on the
    missing detector weights, one error line); a wrong config would stop it first."""
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (120, 80, 40)).save(photos / "a.jpg")
    argv = [
        "-m",
        "unsam.pseudo",
        "--recipe",
        "unsam",
        "--input",
        str(photos),
        "--divide",
        "detector",
        "--divide-weights",
        str(tmp_path / "missing.pth"),
    ]
    out = _run_installed(installed, tmp_path, *argv, "--output", str(tmp_path / "out"))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --divide-weights file '{tmp_path / 'missing.pth'}' not found"]
    bad = _run_installed(
        installed,
        tmp_path,
        *argv,
        "--output",
        str(tmp_path / "out2"),
        "--divide-config",
        str(tmp_path / "nowhere.yaml"),
    )
    assert bad.returncode == 2 and "error: divide config not found" in bad.stderr


def test_installed_app_starts_with_its_default_config(installed, tmp_path):
    pytest.importorskip("gradio")
    out = _run_installed(installed, tmp_path, "-m", "unsam.app", "--help")
    assert out.returncode == 0, out.stderr
    assert "--config-file" in out.stdout
    code = (
        "import os, unsam.app as a; print(a.DEFAULT_CONFIG); "
        "assert os.path.isfile(a.DEFAULT_CONFIG)"
    )
    out = _run_installed(installed, tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(installed))


# ------------------------------------------------------------------ no path outside the package
def outside_references(source: str, rel_parts) -> list:
    """``(line, reason)`` for each place in ``source`` — a module at ``unsam/<rel_parts>`` —
    that builds a path outside the package: ``__file__`` climbed above ``unsam/``
    (``parents[k]``, ``.parent`` chains, nested ``os.path.dirname``), a relative ``..`` path, or
    a path joined with ``"shared"`` (the shared data comes from ``$UNSAM_SHARED``). Docstrings
    are prose and are not read."""
    tree = ast.parse(source)
    depth = len(rel_parts) - 1  # parents[depth] of the module is unsam/
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))

    def of_file(node) -> bool:
        return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))

    def climbs(node) -> int:
        """How many folders above the module's own ``node`` reaches (``.parent`` chains and
        nested ``dirname``: the first one is the module's folder, ``parents[0]``)."""
        up = 0
        while True:
            if isinstance(node, ast.Attribute) and node.attr == "parent":
                up, node = up + 1, node.value
            elif (
                isinstance(node, ast.Call)
                and node.args
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "dirname"
            ):
                up, node = up + 1, node.args[0]
            else:
                return up - 1

    def is_text(node, test) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and test(node.value)

    def climbing(v: str) -> bool:
        return v == ".." or v.startswith("../") or "/../" in v or v.endswith("/..")

    hits, seen = [], set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and of_file(node.value)
        ):
            k = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if not isinstance(k, int) or k > depth:
                hits.append((node.lineno, f"parents[{k}] of __file__ is outside unsam/"))
        elif isinstance(node, (ast.Attribute, ast.Call)) and id(node) not in seen and of_file(node):
            inner = node
            while isinstance(inner, (ast.Attribute, ast.Call)):  # count each chain once
                seen.add(id(inner))
                inner = (
                    inner.value
                    if isinstance(inner, ast.Attribute)
                    else (inner.args[0] if inner.args else inner.func)
                )
            if climbs(node) > depth:
                hits.append((node.lineno, f"__file__ climbed {climbs(node) + 1} folders up"))
        if is_text(node, climbing) and id(node) not in docstrings:
            hits.append((node.lineno, f"relative path {node.value!r}"))
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.right]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in (
            "join",
            "joinpath",
        ):
            parts = node.args[1:] if getattr(node.func, "attr", None) == "join" else node.args
        for part in parts:
            if is_text(part, lambda v: v.split("/")[0] == "shared"):
                hits.append((node.lineno, f"path joined with {part.value!r}"))
    return sorted(set(hits))


@pytest.mark.parametrize(
    "source,where,expected",
    [
        ("X = Path(__file__).resolve().parents[2] / 'configs'", ("pseudo", "detector.py"), 1),
        ("X = Path(__file__).resolve().parents[1] / 'configs'", ("pseudo", "detector.py"), 0),
        ("X = Path(__file__).parents[1] / 'configs'", ("app.py",), 1),
        ("X = Path(__file__).resolve().parent.parent.parent / 'configs'", ("data", "coco.py"), 1),
        ("X = Path(__file__).resolve().parent.parent / 'configs'", ("data", "coco.py"), 0),
        ("X = Path(__file__).resolve().parent / 'csrc' / 'k.cpp'", ("ops", "__init__.py"), 0),
        ("X = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))", ("app.py",), 1),
        ("X = os.path.join(os.path.dirname(__file__), '..', 'configs')", ("app.py",), 1),
        ("X = Path(root) / '../shared/data'", ("data", "coco.py"), 1),
        ("X = Path(env) / 'shared' / 'data'", ("data", "coco.py"), 1),
        ("X = os.path.join(home, 'shared', 'data')", ("data", "coco.py"), 1),
        ('"""Reads ../shared/data beside the checkout."""\nX = 1', ("data", "coco.py"), 0),
        ("X = {'shared': 1}['shared']", ("app.py",), 0),
    ],
)
def test_outside_reference_finder(source, where, expected):
    assert len(outside_references(source, where)) == expected


def test_no_module_refers_to_a_path_outside_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).parts
        found += [
            f"unsam/{'/'.join(rel)}:{line}: {why}"
            for line, why in outside_references(path.read_text(), rel)
        ]
    assert found == []


# ------------------------------------------------------------------ declared dependencies
# import name -> distribution, where they differ
_DISTRIBUTION = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "yaml": "pyyaml",
    "segment_anything": "segment-anything",
}
# imported but not declared: detectron2 has no wheel (scripts/setup.sh builds it); the fused
# deformable-attention op is an optional extension tried at import
_UNDECLARED = {"detectron2", "MultiScaleDeformableAttention"}


def _name(requirement: str) -> str:
    for sep in "<>=!~;[ ":
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def test_pyproject_declares_what_the_package_imports():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    imported = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "unsam":
                    imported.setdefault(top, set()).add(path.relative_to(REPO_ROOT).as_posix())
    missing = {}
    for top, where in imported.items():
        dist = _DISTRIBUTION.get(top, top).lower()
        if top not in _UNDECLARED and dist not in required | extras["app"]:
            missing[dist] = sorted(where)
    assert missing == {}
    assert extras["app"] == {"gradio"} and imported["gradio"] == {"unsam/app.py"}
    # requirements.txt (what scripts/setup.sh installs) holds the package's and the app's
    listed = {
        _name(line)
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert required | extras["app"] <= listed
    dev = {
        _name(line)
        for line in (REPO_ROOT / "requirements-dev.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert extras["test"] <= listed | dev
