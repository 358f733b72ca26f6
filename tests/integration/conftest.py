"""Fixtures the integration tests share."""

import json
import time
from pathlib import Path

import pytest

from tests.lab.sandbox import BLOCKED4, NET4


@pytest.fixture
def daemon_log(lab, write_config, write_policy, tmp_path):
    """A daemon in host scope with a JSON log; returns a reader of its block events."""
    lab.serve_tcp([BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    log_file = tmp_path / "ramfw.log"
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["host"],
                          engine_socket=str(tmp_path / "no-engine.sock"))
    text = Path(config).read_text()
    Path(config).write_text(text.replace("[daemon]\n", f'[daemon]\nlog_file = "{log_file}"\n', 1))
    daemon = lab.start_daemon(config, "--log-format", "json")
    lab.resolve("blocked-registry.test")

    def blocks(where=lambda block: True, wait: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + wait
        while True:
            events = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
            found = [e for e in events if e["event"] == "block" and where(e)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    blocks.daemon, blocks.config = daemon, config
    return blocks
