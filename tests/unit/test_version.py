"""One version, named in ramfw/__init__.py: the CLI, the package metadata and the changelog agree."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import ramfw

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_named_once_and_the_build_reads_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ramfw.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ramfw.__version__)
    assert metadata.version("ramfw") == ramfw.__version__, "reinstall: scripts/setup"


def test_ramfw_version_prints_the_release():
    result = subprocess.run([sys.executable, "-m", "ramfw.cli", "--version"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == f"ramfw {ramfw.__version__}"


def test_the_changelog_begins_with_this_release():
    releases = re.findall(r"^## (\d+\.\d+\.\d+)\b", (ROOT / "docs" / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == ramfw.__version__
    assert len(set(releases)) == len(releases)
