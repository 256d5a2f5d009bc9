"""The files a package carries, and one distribution name everywhere an install is suggested.

``mfac`` on the package index is an unrelated project (a Model Free Adaptive Control toolbox), so
the distribution has its own name (``[project] name`` in pyproject.toml) while the import name
stays ``mfac``; every ``pip install`` line of the README and every install hint in the source must
name that distribution (or the local checkout, ``.``), with extras that exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "mfac"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
NAME = PROJECT["project"]["name"]
EXTRAS = set(PROJECT["project"]["optional-dependencies"])

# pip install [options] REQUIREMENT, the requirement optionally quoted and with [extras]
INSTALL = re.compile(r"""pip install\s+(?:-[-\w]+\s+)*(?P<quote>['"]?)(?P<name>[\w.-]*?)"""
                     r"""(?:\[(?P<extras>[\w,\s-]+)\])?(?P=quote)(?=[\s`)'";,]|$)""")
# a requirement ``mfac[...]`` that is not the distribution's own name (e.g. mfac-torch[...])
WRONG_HINT = re.compile(r"(?<![\w-])mfac\[")


def installs(text: str) -> list[tuple[int, str, str, str]]:
    """(line number, line, requirement name, extras) of every ``pip install`` in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in INSTALL.finditer(line):
            found.append((number, line, match["name"], match["extras"] or ""))
    return found


def test_the_distribution_is_not_named_like_the_unrelated_project():
    assert NAME != "mfac" and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", NAME), NAME
    assert (SOURCE / "__init__.py").exists()  # the import name stays mfac


def test_every_readme_install_line_names_the_distribution_and_real_extras():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = installs(readme)
    assert any(name == NAME for _, _, name, _ in lines), f"the README never says pip install {NAME}"
    for number, line, name, extras in lines:
        where = f"README.md:{number}: {line.strip()}"
        if name == "mfac":  # only where the README says that this is another project
            assert "unrelated" in line or "unrelated" in readme.splitlines()[number], where
        elif name.startswith("mfac") or name == ".":
            assert name in (NAME, "."), where
            wanted = {extra.strip() for extra in extras.split(",") if extra.strip()}
            assert wanted <= EXTRAS, f"{where}: no extra {sorted(wanted - EXTRAS)} in pyproject.toml"
        else:
            assert name in ("torch", "torch==2.13.0", "safetensors") or name.startswith("torch"), where


def test_no_install_hint_in_the_source_names_the_wrong_project():
    wrong, hints = [], 0
    for path in sorted(SOURCE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            if WRONG_HINT.search(line) or re.search(r"pip install\s+['\"]?mfac(?![\w-])", line):
                wrong.append(where)
            for _, _, name, extras in installs(line):
                if name.startswith("mfac"):
                    hints += 1
                    missing = {e.strip() for e in extras.split(",") if e.strip()} - EXTRAS
                    if missing:
                        wrong.append(f"{where} (no extra {sorted(missing)})")
    assert hints, "no install hint found: the pattern no longer matches the source"
    assert not wrong, f"install hints must name {NAME!r}:\n" + "\n".join(wrong)


def test_license_changelog_and_type_marker_ship():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "the mfac authors" in license_text
    assert PROJECT["project"]["license"] == {"text": "MIT"}
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## Unreleased" in changelog and "## 0.1.0" in changelog
    assert (SOURCE / "py.typed").exists()
    assert "py.typed" in PROJECT["tool"]["setuptools"]["package-data"]["mfac"]
