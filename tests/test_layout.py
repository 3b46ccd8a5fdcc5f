"""Guards for the package layout (docs/architecture.md): four layers, the stdlib `platform` intact.

`maxdeeplab/` links the top-level folders into one package, so an import such as
`maxdeeplab.platform.config` can be followed from the file tree by any tool. Every folder is a
regular package except `platform/`, which must stay a namespace portion.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The layers, lowest first: a module may import its own layer and those before it, never after.
LAYERS = ["models", "platform", "dashboards", "cli"]
LINKED = [*LAYERS, "experiments"]


def test_package_links_point_at_the_top_level_folders():
    assert (ROOT / "maxdeeplab" / "__init__.py").is_file()
    for folder in LINKED:
        link = ROOT / "maxdeeplab" / folder
        assert link.is_symlink() and link.resolve() == ROOT / folder, link


def test_only_platform_is_a_namespace_portion():
    assert not (ROOT / "platform" / "__init__.py").exists(), "would shadow the stdlib `platform`"
    for layer in LAYERS:
        for directory in [ROOT / layer, *(ROOT / layer).rglob("*")]:
            if directory == ROOT / "platform" or not directory.is_dir():
                continue
            if any(directory.glob("*.py")):
                assert (directory / "__init__.py").is_file(), f"{directory} lacks __init__.py"


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    code = "import platform; print(platform.system())"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_nothing_imports_upward():
    """models <- platform <- dashboards <- cli, on every import statement (lazy ones too)."""
    for rank, layer in enumerate(LAYERS):
        above = tuple(f"maxdeeplab.{upper}" for upper in LAYERS[rank + 1 :])
        for path in (ROOT / layer).rglob("*.py"):
            bad = {name for name in _imports(path) if above and name.startswith(above)}
            assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(bad)}"


def test_imports_resolve_to_files_in_the_tree():
    """Every `maxdeeplab.x.y` imported anywhere is a module or package under maxdeeplab/."""
    for path in [p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")]:
        for name in _imports(path):
            if not name.startswith("maxdeeplab."):
                continue
            target = ROOT.joinpath(*name.split("."))
            assert target.with_suffix(".py").is_file() or target.is_dir(), (
                f"{path.relative_to(ROOT)} imports {name}, which is not in the tree"
            )


def test_installed_package_imports_its_subpackages():
    import maxdeeplab.cli.main
    import maxdeeplab.dashboards.zoo_table
    import maxdeeplab.models.config
    import maxdeeplab.platform.config  # noqa: F401
