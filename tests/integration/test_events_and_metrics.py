"""Metrics in Prometheus' format (issue #11, 4): a node_exporter textfile written atomically and
an HTTP endpoint, both read back with prometheus_client's own parser, from a real daemon that
held, learned and refused."""

import http.client
import json
import time
from pathlib import Path

import pytest

from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4

MARK = 0x52410000
prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="python3-prometheus-client is missing")


def parse(text: str) -> dict:
    """{(name, labels as a sorted tuple): value} for every sample."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in prometheus_parser.text_string_to_metric_families(text) for s in family.samples}


def test_the_daemon_writes_and_serves_its_metrics(lab, write_config, write_policy, tmp_path):
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    textfile = tmp_path / "textfile" / "ramfw.prom"
    textfile.parent.mkdir()
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n'
                          f'[metrics]\ntextfile = "{textfile}"\nlisten = "127.0.0.1:9541"\ninterval = 1\n')
    lab.start_daemon(config)
    lab.resolve("allowed-registry.test")
    lab.resolve("blocked-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    deadline = time.monotonic() + 10
    while True:
        samples = parse(textfile.read_text()) if textfile.exists() else {}
        if samples.get(("ramfw_rejects_total", (("verdict", "blocked"),)), 0) >= 1 and samples.get(
                ("ramfw_named_blocks_total", (("reason", "not_allowlisted"),)), 0) >= 1:  # the daemon read it too
            break
        assert time.monotonic() < deadline, f"no block counted in {textfile}: {samples}"
        time.sleep(0.2)
    assert not list(textfile.parent.glob("*.prom.*")), "only the renamed file is left"
    assert samples[("ramfw_enforcing", ())] == 1
    assert samples[("ramfw_dns_replies_total", (("outcome", "held"),))] >= 1
    assert samples[("ramfw_dns_hold_seconds_count", ())] >= 1
    assert samples[("ramfw_dns_hold_seconds_bucket", (("le", "+Inf"),))] == samples[
        ("ramfw_dns_hold_seconds_count", ())]
    assert samples[("ramfw_learned_addresses", (("set", "allow4"),))] == 1
    assert samples[("ramfw_policy_info", (("organization", "acme"), ("signer", ""), ("source", json.loads(
        lab.ramfw("status", "--json", "--config", config).stdout)["policy"]["source"]), ("version", "")))] == 1
    assert ("ramfw_queue_drops_total", (("why", "queue_full"),)) in samples
    assert samples[("ramfw_named_blocks_total", (("reason", "not_allowlisted"),))] >= 1
    assert samples[("ramfw_named_blocks_total", (("reason", "no_name_seen"),))] == 0
    connection = http.client.HTTPConnection("127.0.0.1", 9541, timeout=5)
    with lab.vm.inside():  # the socket is made by connect(): in the vm's namespace
        connection.connect()
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    served = parse(response.read().decode())
    connection.close()
    assert served[("ramfw_enforcing", ())] == 1 and ("ramfw_tamper_repairs_total", ()) in served


def test_a_taken_metrics_port_never_keeps_the_daemon_from_enforcing(lab, write_config, write_policy):
    """Metrics are not enforcement: a port another process holds is an ERROR in the log, and
    the daemon enforces all the same."""
    import socket

    lab.serve_tcp([ALLOWED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    write_policy(["allowed-registry.test"])
    with lab.vm.inside():
        squatter = socket.socket()
    squatter.bind(("127.0.0.1", 9541))
    squatter.listen()
    try:
        config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[metrics]\nlisten = "127.0.0.1:9541"\n')
        lab.start_daemon(config)
        lab.resolve("allowed-registry.test")
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    finally:
        squatter.close()


def test_a_blocked_connection_is_a_json_block_event_naming_the_host(lab, write_config, write_policy, tmp_path):
    lab.serve_tcp([BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    log_file = tmp_path / "ramfw.log"
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    text = Path(config).read_text()
    Path(config).write_text(text.replace("[daemon]\n", f'[daemon]\nlog_file = "{log_file}"\n', 1))
    lab.start_daemon(config, "--log-format", "json")
    lab.resolve("blocked-registry.test")
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    deadline = time.monotonic() + 5
    while True:
        events = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
        blocks = [e for e in events if e["event"] == "block"]
        if blocks:
            break
        assert time.monotonic() < deadline, f"no block event in {events}"
        time.sleep(0.1)
    assert blocks[0]["host"] == "blocked-registry.test" and blocks[0]["address"] == BLOCKED4
    assert blocks[0]["port"] == 443 and blocks[0]["verdict"] == "blocked"
    assert blocks[0]["message"].startswith("registry access to blocked-registry.test is not allowed")
    assert any(e["event"] == "started" and e["organization"] == "acme" for e in events)
