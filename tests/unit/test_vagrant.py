import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (scripts/setup installs it)")
def test_vagrantfile_validates(tmp_path):
    # No hypervisor here, so provider settings are left out of validation; the rest is checked.
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR, capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
                                 "VAGRANT_HOME": str(tmp_path / "home")})
    assert result.returncode == 0 and "validated successfully" in result.stdout, result.stdout + result.stderr
