"""The package's import graph keeps its layers apart (issue 30).

Every ``import`` statement under ``unsam/`` — module level and inside functions alike, relative
imports resolved — is an edge. The inference model (``unsam.modeling``) must not reach training
data or training machinery, general utilities must not depend on the config layer, and the SA-1B
file format (``unsam.io``) must stay free of detectron2 so that labelling workers do not pay for it.
"""

import ast
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "unsam"

# (importer prefix, imported prefix): no module under the first may import one under the second
FORBIDDEN = [
    ("unsam.modeling", "unsam.data"),
    ("unsam.modeling", "unsam.engine"),
    ("unsam.modeling", "unsam.evaluation"),
    ("unsam.modeling", "unsam.pseudo"),
    ("unsam.utils", "unsam.config"),
    ("unsam.utils", "unsam.data"),
    ("unsam.utils", "unsam.engine"),
    ("unsam.utils", "unsam.modeling"),
    ("unsam.io", "detectron2"),
    ("unsam.io", "unsam.data"),
    ("unsam.tasks", "unsam"),  # the task names are a leaf
]


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, is_package: bool) -> Iterator[str]:
    """Absolute names of every module ``source`` (module ``name``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # ``from pkg import sub`` may name a submodule: count it as an edge to pkg.sub too
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(edges: Set[Tuple[str, str]]) -> List[str]:
    return sorted(
        f"{a} -> {b}"
        for a, b in edges
        for src, dst in FORBIDDEN
        if _under(a, src) and _under(b, dst) and not _under(b, src)
    )


def package_edges() -> Set[Tuple[str, str]]:
    edges = set()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        name = module_name(path)
        for target in imports_of(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py"
        ):
            edges.add((name, target))
    return edges


def test_the_edge_finder_sees_relative_function_level_and_from_imports():
    src = (
        "import os\n"
        "from ..data.prompts import sample_point\n"
        "def f():\n"
        "    from unsam.engine import hooks\n"
        "    import detectron2.structures\n"
    )
    got = set(imports_of(src, "unsam.modeling.meta_arch", is_package=False))
    assert {
        "unsam.data.prompts",
        "unsam.engine",
        "unsam.engine.hooks",
        "detectron2.structures",
    } <= got
    edges = {("unsam.modeling.meta_arch", t) for t in got}
    assert violations(edges) == [
        "unsam.modeling.meta_arch -> unsam.data.prompts",
        "unsam.modeling.meta_arch -> unsam.data.prompts.sample_point",
        "unsam.modeling.meta_arch -> unsam.engine",
        "unsam.modeling.meta_arch -> unsam.engine.hooks",
    ]
    assert violations({("unsam.tasks", "unsam.compat"), ("unsam.io.sa1b", "detectron2.data")}) == [
        "unsam.io.sa1b -> detectron2.data",
        "unsam.tasks -> unsam.compat",
    ]
    assert violations({("unsam.io.sa1b", "unsam.io"), ("unsam.data.sa1b", "unsam.io.sa1b")}) == []
    # a package's own relative import resolves against the package itself
    assert "unsam.utils.files" in set(
        imports_of("from .files import x\n", "unsam.utils", is_package=True)
    )


def test_the_package_has_no_forbidden_import_edge():
    edges = package_edges()
    assert len(edges) > 200  # the walk really covered the package
    bad = violations(edges)
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("prefix", ["unsam.modeling", "unsam.utils", "unsam.io"])
def test_each_layer_checked_exists(prefix):
    assert any(_under(module_name(p), prefix) for p in PACKAGE_ROOT.rglob("*.py"))
