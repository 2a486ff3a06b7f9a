"""The package layout: import direction and packaging completeness."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages of this project it must never import
FORBIDDEN = {
    "dlm": {"voice_agent", "audio"},
    "audio": {"voice_agent", "dlm"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_forbidden_import_is_detected(tmp_path: Path) -> None:
    # The checker itself must see all three spellings.
    f = tmp_path / "m.py"
    f.write_text("import voice_agent.x\nfrom audio import codecs\nimportlib.import_module('dlm.engine')\n")
    assert _imports(f) >= {"voice_agent", "audio", "dlm"}


def test_every_python_package_is_listed_in_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("voice_agent", "dlm", "audio"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    found |= {"voice_agent.web", "voice_agent.configs"}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but missing: {sorted(listed - found)}"


def test_data_folders_are_found_through_importlib_resources() -> None:
    from importlib import resources

    assert resources.files("voice_agent.configs").joinpath("default.toml").is_file()
    assert resources.files("voice_agent.configs").joinpath("models.toml").is_file()
    assert resources.files("voice_agent.web").is_dir()
