"""Tamper (issue #8, 4): `nft flush ruleset` (the first line of Debian's /etc/nftables.conf)
ended enforcement and nothing repaired it. Now a change another process makes to ramfw's table
is seen as it is committed, put back within a second, and the process is named.

These tests change the table from another process, so they run the daemon with an unowned table
(``table_owner = false``: what kernels before 6.9 get). Where the table is owned, those changes
are refused instead (test_ownership)."""

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
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"], registry_ports=[443],
                              table_owner=False)
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    return lab


def status(lab):
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)


def repaired(lab, count: int) -> dict:
    deadline = time.monotonic() + 5  # put back within a second; each poll here starts a CLI process
    while len((result := status(lab))["repairs"]) < count:
        assert time.monotonic() < deadline, "not put back"
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


@pytest.mark.parametrize("set_name, element", [("container_bridges", "rfv"), ("resolvers4", BLOCKED4)])
def test_an_element_put_in_any_of_ramfws_sets_is_taken_out(guarded, set_name, element):
    """A review found: only the allowed sets were put back; an uplink named a container bridge
    (every in-scope connection accepted) or a blocked address named a resolver stayed."""
    lab = guarded
    if element == "rfv":
        element = lab.vm.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    lab.vm.run("nft", "add", "element", "inet", "ramfw", set_name, f'{{ "{element}" }}' if set_name.startswith("c")
               else f"{{ {element} }}")
    repaired(lab, 1)
    listing = lab.vm.run("nft", "list", "set", "inet", "ramfw", set_name).stdout
    assert element not in listing
    assert lab.connect(BLOCKED4)[0] == "refused"


def test_a_change_hidden_in_a_flood_of_notifications_is_put_back(guarded, tmp_path):
    """A review found: one transaction that overflows the notification socket (a table of
    200,000 elements) and adds a blocked address to allow4 went unseen."""
    lab = guarded
    elements = ", ".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(200_000))
    script = tmp_path / "flood.nft"
    script.write_text(f"table inet flood {{\n set s {{\n type ipv4_addr\n elements = {{ {elements} }}\n }}\n}}\n"
                      f"add element inet ramfw allow4 {{ {BLOCKED4} timeout 1h }}\n")
    lab.vm.run("nft", "-f", str(script))
    deadline = time.monotonic() + 8
    while lab.connect(BLOCKED4, mark=MARK)[0] != "refused":
        assert time.monotonic() < deadline, "the address stayed in the allowed set"
        time.sleep(0.2)
    assert status(lab)["repairs"]


def test_a_daemon_in_a_pid_namespace_of_its_own_does_not_take_its_own_changes_for_tampering(lab, write_config,
                                                                                           write_policy):
    """A review found: NEWGEN names the initial pid namespace's pid; a daemon in its own (each
    WSL2 distribution has one) repaired its own changes in an endless loop."""
    write_policy(["allowed-registry.test"])
    lab.config = write_config(table_owner=False)
    lab.daemon = lab.start_daemon(lab.config, prefix=("unshare", "-p", "-f", "-m", "--mount-proc"))
    lab.vm.run("nft", "add", "element", "inet", "ramfw", "allow4", f"{{ {ALLOWED4} timeout 1h }}")  # a foreign change
    repaired(lab, 1)
    time.sleep(2)
    assert len(status(lab)["repairs"]) == 1


def test_a_table_remade_by_someone_else_is_rebuilt(guarded, tmp_path):
    """A review found: re-adding the table's sets and chains cannot undo a set redefined (an
    interval set holding 0.0.0.0/0) or a chain added: every repair failed and the table stayed."""
    lab = guarded
    script = tmp_path / "remade.nft"
    script.write_text("delete table inet ramfw\n"
                      "table inet ramfw {\n set allow4 {\n type ipv4_addr\n flags interval\n"
                      " elements = { 0.0.0.0/0 }\n }\n chain extra {\n type filter hook output priority -300\n }\n}\n")
    lab.vm.run("nft", "-f", str(script))
    deadline = time.monotonic() + 5
    while lab.connect(BLOCKED4, mark=MARK)[0] != "refused":
        assert time.monotonic() < deadline, "the remade table stayed"
        time.sleep(0.2)
    listing = lab.vm.run("nft", "list", "table", "inet", "ramfw").stdout
    assert "0.0.0.0/0" not in listing and "chain extra" not in listing
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected", "what was learned is back"
