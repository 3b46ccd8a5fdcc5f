"""Guards for the package layout (DESIGN §1): the stdlib `platform` must never be shadowed."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {
    "models": "maxdeeplab.models",
    "platform": "maxdeeplab.platform",
    "dashboards": "maxdeeplab.dashboards",
}


def _declared() -> tuple[set[str], dict[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def test_mapped_folders_have_no_init_py():
    for folder in MAPPED:
        offenders = sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("__init__.py"))
        assert offenders == [], f"{offenders} would shadow the stdlib or break the namespace layout"


def test_every_code_folder_is_declared():
    packages, package_dir = _declared()
    for folder, package in MAPPED.items():
        assert package_dir[package] == folder
        for directory in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if directory.is_dir() and any(directory.glob("*.py")):
                rel = directory.relative_to(ROOT / folder).parts
                name = ".".join([package, *rel])
                assert name in packages, f"{directory} holds .py files but {name} is not declared"


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


def test_models_never_import_platform_or_dashboards():
    for path in (ROOT / "models").rglob("*.py"):
        bad = {
            name
            for name in _imports(path)
            if name.startswith(("maxdeeplab.platform", "maxdeeplab.dashboards"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_installed_package_imports_its_subpackages():
    import maxdeeplab.models.config
    import maxdeeplab.platform.config  # noqa: F401
