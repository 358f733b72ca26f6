"""Tamper (issue #8, 4): `nft flush ruleset` (the first line of Debian's /etc/nftables.conf)
ended enforcement and nothing repaired it. Now a change another process makes to ramfw's table
is seen as it is committed, put back within a second, and the process is named."""

import json
import time

import pytest

from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4

MARK = 0x52410000


@pytest.fixture
def guarded(lab, write_config, write_policy):
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"], registry_ports=[443])
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    return lab


def status(lab):
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)


def repaired(lab, count: int) -> dict:
    deadline = time.monotonic() + 1.5
    while len((result := status(lab))["repairs"]) < count:
        assert time.monotonic() < deadline, "not put back within a second"
        time.sleep(0.05)
    return result


@pytest.mark.parametrize("change", [
    ["flush", "ruleset"],
    ["delete", "table", "inet", "ramfw"],
    ["flush", "chain", "inet", "ramfw", "output"],
    ["flush", "chain", "inet", "ramfw", "dns_input"],
    ["delete", "set", "inet", "ramfw", "resolvers4"],  # refused while a rule uses it: nothing to repair
])
def test_a_change_by_another_process_is_put_back_at_once_and_named(guarded, change):
    lab = guarded
    result = lab.vm.run("nft", *change, check=False)
    if result.returncode != 0:
        assert "Device or resource busy" in result.stderr
        return
    last = repaired(lab, 1)["repairs"][-1]
    assert last["by"].endswith("(nft)")
    lab.daemon.log.seek(0)
    assert f"WARNING: ramfw's table was changed by {last['by']}" in lab.daemon.log.read().decode()
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED4)[0] == "refused", "host scope is back too"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected", "what was learned is back"
    lab.vm.run("nft", "delete", "element", "inet", "ramfw", "allow4", f"{{ {ALLOWED4} }}")
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected", "and the DNS hold learns again"
    assert any(f"last by {last['by']}" in note for note in status(lab)["notes"])


def test_an_address_put_in_the_allowed_sets_by_hand_is_taken_out(guarded):
    lab = guarded
    lab.vm.run("nft", "add", "element", "inet", "ramfw", "allow4", f"{{ {BLOCKED4} timeout 1h }}")
    repaired(lab, 1)
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_an_address_taken_out_by_hand_only_blocks_more_and_is_learned_again(guarded):
    lab = guarded
    lab.vm.run("nft", "delete", "element", "inet", "ramfw", "allow4", f"{{ {ALLOWED4} }}")
    time.sleep(0.5)
    assert status(lab)["repairs"] == []
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused"
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
