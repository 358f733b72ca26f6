"""Table ownership (issue #8): where the kernel has owner + persist (Linux 6.9), the daemon owns
ramfw's table. Other processes get EPERM, `nft flush ruleset` passes it by, and the table
outlives the daemon (an orphan, which the next daemon takes back). The guard's repairs of an
unowned table are tested in test_tamper."""

import json
import re
import signal
import socket
import time

import pytest

from ramfw.config import EnforcementSettings
from ramfw.kernel import netlink as nl
from ramfw.kernel import nft, probes, ruleset
from ramfw.kernel.tamper import NFNLGRP_NFTABLES, NFT_MSG_NEWGEN
from ramfw.kernel.table import Table
from ramfw.snoop.snooper import Element
from tests.lab.sandbox import ALLOWED4, BLOCKED4, CDN4, NET4

MARK = 0x52410000


@pytest.fixture
def owned_lab(lab, write_config, write_policy):
    with lab.vm.inside():
        capability = probes._table_owner_probe()
    if not capability.ok:
        pytest.skip(f"this kernel has no table owner + persist: {capability.detail}")
    lab.serve_tcp([ALLOWED4, BLOCKED4, CDN4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}", f"--host-record=cdn-registry.test,{CDN4}")
    write_policy(["allowed-registry.test", "cdn-registry.test"])
    lab.write_config = write_config
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"],
                              registry_ports=[443])
    return lab


def status(lab) -> dict:
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)


def view(lab):
    with lab.vm.inside():
        return Table("ramfw").kernel_view()


def learned(lab) -> dict[str, str]:
    with lab.vm.inside():
        return {item.address: item.name for item in Table("ramfw").learned()}


def test_other_processes_cannot_change_the_owned_table_and_it_keeps_enforcing_and_learning(owned_lab):
    lab = owned_lab
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve("allowed-registry.test")
    table = status(lab)["table"]
    assert table["owned_by_daemon"] and table["protection"] == probes.PROTECTION_OWNED
    assert "flags owner" in lab.vm.run("nft", "list", "table", "inet", "ramfw").stdout
    lab.vm.run("nft", "add table inet other; add chain inet other c { type filter hook output priority 10; }")
    flushed = lab.vm.run("nft", "flush", "ruleset", check=False)
    assert flushed.returncode == 0, flushed.stderr
    assert lab.vm.run("nft", "list", "tables").stdout.split() == ["table", "inet", "ramfw"], "the rest is gone"
    for change in (["delete", "table", "inet", "ramfw"], ["add", "rule", "inet", "ramfw", "output", "accept"],
                   ["flush", "chain", "inet", "ramfw", "output"], ["flush", "chain", "inet", "ramfw", "dns_input"],
                   ["add", "element", "inet", "ramfw", "allow4", f"{{ {BLOCKED4} timeout 1h }}"],
                   ["delete", "element", "inet", "ramfw", "allow4", f"{{ {ALLOWED4} }}"],
                   ["delete", "table", "inet", "ramfw"]):
        result = lab.vm.run("nft", *change, check=False)
        assert result.returncode != 0 and "Operation not permitted" in result.stderr, (change, result.stderr)
    saved = ("flush ruleset\ntable inet admin {\n chain c {\n type filter hook input priority 0;\n }\n}\n"
             "table inet ramfw {\n flags owner\n}\n")  # a saved ruleset that holds ramfw's (owned) table
    reloaded = lab.vm.run("nft", "-f", "-", input=saved, check=False)
    assert reloaded.returncode != 0 and "Operation not permitted" in reloaded.stderr
    assert "admin" not in lab.vm.run("nft", "list", "tables").stdout, "the whole file failed"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED4)[0] == "refused", "host scope too"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(CDN4, mark=MARK)[0] == "refused"
    lab.resolve("cdn-registry.test")
    assert lab.connect(CDN4, mark=MARK)[0] == "connected", "an allowlisted lookup still learns"
    time.sleep(0.5)
    after = status(lab)
    assert after["repairs"] == [] and after["table"]["owned_by_daemon"], "nothing was changed: nothing to repair"
    lab.daemon.log.seek(0)
    assert "table was changed" not in lab.daemon.log.read().decode()


def test_a_killed_daemon_leaves_its_table_enforcing_and_the_next_daemon_takes_it_back(owned_lab):
    lab = owned_lab
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve("allowed-registry.test")
    daemon_port = view(lab).owner
    lab.daemon.send_signal(signal.SIGKILL)
    lab.daemon.wait(5)
    orphan = view(lab)
    assert orphan.exists and orphan.persist and orphan.owner is None
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused", "still enforcing"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    table = status(lab)["table"]
    assert not table["owned_by_daemon"] and "without an owner" in table["protection"]
    lab.daemon = lab.start_daemon(lab.config)
    adopted = view(lab)
    assert adopted.owner not in (None, daemon_port) and adopted.persist
    assert status(lab)["table"]["owned_by_daemon"]
    assert learned(lab) == {ALLOWED4: "allowed-registry.test"}, "what was learned survives"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert [i["address"] for i in status(lab)["learned"]["allowed-registry.test"]] == [ALLOWED4]
    refused = lab.vm.run("nft", "add", "element", "inet", "ramfw", "allow4", f"{{ {BLOCKED4} }}", check=False)
    assert "Operation not permitted" in refused.stderr


def test_an_unowned_table_of_an_earlier_ramfw_is_made_owned_with_what_it_learned(owned_lab):
    lab = owned_lab
    unowned = lab.write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"],
                               registry_ports=[443], table_owner=False)
    lab.daemon = lab.start_daemon(unowned)
    lab.resolve("allowed-registry.test")
    assert view(lab).flags == 0 and status(lab)["table"]["protection"].startswith(probes.PROTECTION_GUARDED)
    lab.daemon.send_signal(signal.SIGTERM)
    assert lab.daemon.wait(5) == 0
    lab.config = lab.write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["engine", "host"],
                                  registry_ports=[443])
    with lab.vm.inside():
        watch = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
    with watch:
        watch.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        watch.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        lab.daemon = lab.start_daemon(lab.config)
        transactions = _transactions(watch)
    gone = next(t for t in transactions if (nl.NFT_MSG_DELTABLE, "ramfw") in t)
    assert (nl.NFT_MSG_NEWTABLE, "ramfw") in gone and (nl.NFT_MSG_NEWSETELEM, "ramfw") in gone, \
        "deleted, made again and given its learned elements in one transaction"
    lab.daemon.log.seek(0)
    assert "was unowned" in lab.daemon.log.read().decode()
    assert status(lab)["table"]["owned_by_daemon"]
    assert learned(lab) == {ALLOWED4: "allowed-registry.test"}
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"


def _transactions(sock) -> list[list[tuple[int, str]]]:
    """The nf_tables transactions announced so far: (message, table) of each change."""
    found, current = [], []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return found
        for kind, start, end in nl.messages(data):
            if kind & 0xFF == NFT_MSG_NEWGEN:
                found.append(current)
                current = []
            elif kind >> 8 == nl.NFNL_SUBSYS_NFTABLES:
                items = nl.parse_attrs(data, start + nl.NFGEN.size, end)
                current.append((kind & 0xFF, items.get(1, b"").rstrip(b"\0").decode()))


def test_up_leaves_an_orphan_a_daemon_takes_back_and_down_removes_it_owned_or_orphaned(owned_lab):
    lab = owned_lab
    assert lab.ramfw("up", "--config", lab.config).returncode == 0
    orphan = view(lab)
    assert orphan.persist and orphan.owner is None
    assert lab.connect(BLOCKED4)[0] == "refused"
    lab.daemon = lab.start_daemon(lab.config)
    assert status(lab)["table"]["owned_by_daemon"]
    result = lab.ramfw("down", "--config", lab.config)
    assert result.returncode == 0, result.stderr
    assert lab.daemon.wait(5) == 0
    assert lab.vm.run("nft", "list", "ruleset").stdout == ""
    assert lab.connect(BLOCKED4)[0] == "connected"
    assert lab.ramfw("up", "--config", lab.config).returncode == 0
    result = lab.ramfw("down", "--config", lab.config)
    assert result.returncode == 0, result.stderr
    assert lab.vm.run("nft", "list", "ruleset").stdout == ""
    assert lab.ramfw("down", "--config", lab.config).returncode == 0, "safe to repeat"


def _listing(lab) -> str:
    """The table as `nft list` shows it, without what ownership adds and the element timers."""
    text = lab.vm.run("nft", "list", "table", "inet", "ramfw").stdout
    text = re.sub(r" # progname \S+", "", text).replace("\tflags owner\n\n", "")
    return re.sub(r" expires \S+", "", text)


@pytest.mark.parametrize("mode, hold, scope", [
    ("enforce", ruleset.Hold.XT_NFQUEUE, ("engine",)),
    ("audit", ruleset.Hold.XT_NFQUEUE, ("engine", "host", "containers")),
    ("enforce", ruleset.Hold.PASSIVE, ("engine", "host", "containers")),
])
def test_the_owned_table_is_what_libnftables_makes_of_the_document(owned_lab, mode, hold, scope):
    lab = owned_lab
    settings = EnforcementSettings(mode=mode, scope=scope, proxies=("192.0.2.8:3128", "[2001:db8::8]:3128"))
    document = ruleset.build_ruleset(settings, [NET4, "2001:db8::53"], 1000, hold)
    rules = nft.dns_chain_rules(hold, 7005, None, 7006)
    element = Element(ALLOWED4, 600, "allowed-registry.test")
    with lab.vm.inside():
        plain = Table("ramfw")
        plain.apply(document, rules)
        plain.set_container_bridges(["docker0"])
        plain.add_elements([element])
        expected = _listing(lab)
        plain.remove()
        owned = Table("ramfw", owned=True)
        owned.apply(document, rules)
        owned.set_container_bridges(["docker0"])
        owned.add_elements([element])
        assert owned.kernel_view().owner == owned.portid
        assert _listing(lab) == expected
        owned.apply(document, rules)
        assert _listing(lab) == expected, "applied again in place: the same, what was learned kept"
        owned.apply(document, rules, rebuild=True)
        owned.set_container_bridges(["docker0"])  # a rebuild empties them, as unowned (the daemon sets them again)
        assert _listing(lab) == expected, "rebuilt: the same, what was learned carried over"
        assert owned.kernel_view().owner == owned.portid and owned.verify() == []
        assert lab.vm.run("nft", "list", "tables").stdout.split() == ["table", "inet", "ramfw"], "no staging left"
        owned.remove()
        owned.close()
    assert lab.vm.run("nft", "list", "ruleset").stdout == ""
