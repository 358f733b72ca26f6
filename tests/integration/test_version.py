"""The release is in the status: the daemon's own, and this command's when no daemon answers;
and status --json keeps the contract docs/status.md writes down (schema 1)."""

import json
import os
import re
from pathlib import Path

import ramfw
from ramfw import api
from tests.lab.sandbox import NET4, RAMFW, ROOT

DOC = Path(__file__).resolve().parents[2] / "docs" / "status.md"
TYPES = {"integer": int, "string": str, "boolean": bool, "object": dict, "array": list, "array of strings": list}


def documented() -> dict:
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", DOC.read_text(), re.M)
    return {key: (TYPES[kind.strip()], when.strip()) for key, kind, when in rows}


def keeps_the_contract(document: dict, answered_by: str) -> None:
    """Only documented keys, each of its documented type; every key due from this source present."""
    keys = documented()
    assert set(document) <= set(keys), f"undocumented keys: {set(document) - set(keys)}"
    for key, (kind, when) in keys.items():
        if when == "always" or (answered_by == "daemon" and "daemon" in when.split(", ")[0].split()):
            assert key in document, f"{key} is missing ({when})"
        if key in document:
            assert isinstance(document[key], kind), (key, document[key])
    assert document["schema"] == api.STATUS_SCHEMA == 1


def test_status_carries_the_daemons_version(lab, write_config, write_policy):
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    lab.daemon = lab.start_daemon(config)
    document = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert document["version"] == document["daemon"]["version"] == ramfw.__version__
    text = lab.ramfw("status", "--config", config).stdout
    assert f"daemon:     running, pid {lab.daemon.pid}, ramfw {ramfw.__version__}" in text
    lab.daemon.kill()
    lab.daemon.wait()
    document = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert document["daemon"] == {"running": False} and document["version"] == ramfw.__version__
    assert f"not running, ramfw {ramfw.__version__}" in lab.ramfw("status", "--config", config).stdout


def test_status_json_keeps_its_documented_schema_for_root_others_and_without_a_daemon(lab, write_config,
                                                                                    write_policy):
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    lab.daemon = lab.start_daemon(config)
    keeps_the_contract(json.loads(lab.ramfw("status", "--json", "--config", config).stdout), "daemon")
    # another user cannot read the lab's configuration: it finds the daemon at its abstract address
    other = lab.vm.run("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *RAMFW, "status",
                       "--json", check=False, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    document = json.loads(other.stdout)
    keeps_the_contract(document, "daemon")
    assert document["learned"] == {}
    lab.daemon.kill()
    lab.daemon.wait()
    keeps_the_contract(json.loads(lab.ramfw("status", "--json", "--config", config).stdout), "kernel")
