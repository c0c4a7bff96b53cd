"""The package stands alone (issue 30, items 5 and 6): the SA-1B format without detectron2,
configs shipped as package data, no path outside the package."""
import subprocess
import sys

from .conftest import REPO_ROOT


def _imported(code: str):
    """Module names (detectron2*, torch) a fresh interpreter holds after running ``code``."""
    probe = (
        f"{code}\nimport sys\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('detectron2', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
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
        "load_sa1b_dicts", "register_sa1b", "iter_roots_from_config",
    }
    for name in ("read_sa1b_json", "write_sa1b_json", "annotation_from_mask", "mask_to_rle",
                 "rle_to_mask", "SA1BFormatError", "DatasetError", "find_sa1b_files"):
        assert getattr(fmt, name).__module__ == "unsam.io.sa1b"
