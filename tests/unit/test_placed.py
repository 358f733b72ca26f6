"""`ramfw policy placed`: the packaged unit's ExecCondition; no policy placed, no daemon."""

import subprocess
import sys
from pathlib import Path

from ramfw import api, config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, source):
    path = tmp_path / "ramfw.toml"
    path.write_text(f'[policy]\nsource = "{source}"\ncache = "{tmp_path}/cache.json"\n')
    return str(path)


def placed(path):
    return subprocess.run([sys.executable, "-m", "ramfw.cli", "policy", "placed", "--config", path],
                          capture_output=True, text=True, cwd=ROOT)


def test_no_file_and_no_cache_is_not_placed(tmp_path):
    path = write(tmp_path, tmp_path / "policy.json")
    assert api.placed(config.load(path)) is None
    result = placed(path)
    assert result.returncode == 1 and "no policy is placed" in result.stdout


def test_a_file_a_cached_copy_or_a_url_is_placed(tmp_path):
    path = write(tmp_path, tmp_path / "policy.json")
    (tmp_path / "cache.json").write_text("{}")  # whatever it holds: the daemon decides whether to accept it
    assert "the last policy accepted" in api.placed(config.load(path))
    (tmp_path / "policy.json").write_text("{}")
    assert placed(path).stdout == f"policy placed: {tmp_path}/policy.json\n"
    url = write(tmp_path, "https://policy.example.com/ramfw.json")
    assert api.placed(config.load(url)) == "https://policy.example.com/ramfw.json"
