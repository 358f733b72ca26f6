"""As a systemd service: the unit is valid, and the daemon says when it is ready (Type=notify)."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest


def test_the_daemon_tells_systemd_it_is_ready_once_the_ruleset_is_in_force(lab, write_config, write_policy,
                                                                          monkeypatch):
    """Type=notify: docker.service, ordered after ramfw, starts only once READY=1 is sent."""
    write_policy(["allowed-registry.test"])
    name = f"ramfw-test-notify-{os.getpid()}"
    with lab.vm.inside():  # an abstract address belongs to the network namespace
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        lab.daemon = lab.start_daemon(write_config())
        message = listener.recv(4096).decode()
    finally:
        listener.close()
    assert message.startswith("READY=1\n") and "STATUS=enforcing acme" in message
    assert "ramfw" in lab.vm.run("nft", "list", "tables").stdout


def test_the_systemd_unit_is_valid(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (Path(__file__).resolve().parents[2] / "scripts" / "ramfw.service").read_text()
    copy = tmp_path / "ramfw.service"
    copy.write_text(unit.replace("/opt/ramfw/.venv/bin/ramfw", "/bin/true"))  # not installed here
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "ramfw.service" in line]
    assert result.returncode == 0 and not problems, result.stderr
