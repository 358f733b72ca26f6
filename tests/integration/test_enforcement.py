"""Real nftables and real TCP in throw-away namespaces: what `ramfw up` enforces."""

import json
import re
import time

from tests.lab.sandbox import ALLOWED4, ALLOWED6, BLOCKED4, BLOCKED6

MARK = 0x52410000


def learn(lab, elements):
    """Program the allowed sets inside the vm, as the daemon does for a DNS reply."""
    from ramfw.kernel.table import Table
    from ramfw.snoop.snooper import Element

    with lab.vm.inside():
        Table("ramfw").add_elements([Element(*e) for e in elements])


def up(lab, config, policy=None):
    args = ["up", "--config", config] + (["--policy", policy] if policy else [])
    result = lab.ramfw(*args)
    assert result.returncode == 0, result.stderr
    return result


def ruleset_text(lab):
    """The whole ruleset, with the ever-changing element expiry left out."""
    return re.sub(r" expires \S+", "", lab.vm.run("nft", "list", "ruleset").stdout)


def test_marked_traffic_reaches_allowed_addresses_only(lab, write_config, write_policy):
    lab.serve_tcp([ALLOWED4, BLOCKED4, ALLOWED6, BLOCKED6], [443])
    up(lab, write_config(), write_policy(["allowed-registry.test"]))
    learn(lab, [(ALLOWED4, 60, "allowed-registry.test"), (ALLOWED6, 60, "allowed-registry.test")])
    for allowed, blocked in ((ALLOWED4, BLOCKED4), (ALLOWED6, BLOCKED6)):
        assert lab.connect(allowed, mark=MARK)[0] == "connected"
        outcome, seconds = lab.connect(blocked, mark=MARK)
        assert outcome == "refused", "a blocked connection is refused at once, not timed out"
        assert seconds < 0.5
        assert lab.connect(blocked)[0] == "connected", "unmarked traffic is untouched in engine scope"
    status = json.loads(lab.ramfw("status", "--json", "--config", write_config()).stdout)
    assert status["enforcing"] and status["mode"] == "enforce"
    assert status["counters"]["blocked"] == 2
    assert {i["address"] for i in status["learned"]["allowed-registry.test"]} == {ALLOWED4, ALLOWED6}


def test_enforcement_outlives_the_process_that_applied_it(lab, write_config):
    lab.serve_tcp([BLOCKED4], [443])
    up(lab, write_config())  # the CLI process has exited when this returns
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"


def test_an_element_expires_after_its_timeout(lab, write_config):
    lab.serve_tcp([ALLOWED4], [443])
    up(lab, write_config())
    learn(lab, [(ALLOWED4, 1, "allowed-registry.test")])
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    deadline = time.monotonic() + 5
    while lab.connect(ALLOWED4, mark=MARK)[0] == "connected":
        assert time.monotonic() < deadline, "the element did not expire"
        time.sleep(0.2)
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused"


def test_audit_mode_blocks_nothing_and_counts(lab, write_config):
    lab.serve_tcp([BLOCKED4], [443])
    config = write_config(mode="audit")
    up(lab, config)
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "connected"
    status = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert status["mode"] == "audit"
    assert status["counters"]["audited"] == 1
    assert status["counters"]["blocked"] == 0


def test_host_scope_filters_registry_ports_of_every_process(lab, write_config):
    lab.serve_tcp([BLOCKED4], [443, 8080])
    up(lab, write_config(scope=["host"], registry_ports=[443]))
    assert lab.connect(BLOCKED4, 443)[0] == "refused"
    assert lab.connect(BLOCKED4, 8080)[0] == "connected"


def test_host_scope_covers_every_transport_with_ports_not_only_tcp_and_udp(lab, write_config):
    """Issue #8, 3: UDP-Lite (IP protocol 136) to a never-learned address passed in host scope."""
    import socket

    up(lab, write_config(scope=["host"], registry_ports=[443]))
    udplite = 136
    with lab.net.inside():
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, udplite)
    peer.bind((BLOCKED4, 443))
    peer.settimeout(1)
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, udplite)
    try:
        try:
            client.sendto(b"over UDP-Lite", (BLOCKED4, 443))
        except PermissionError:
            pass  # refused on the way out
        try:
            got = peer.recv(64)
        except (TimeoutError, OSError):
            got = None
        assert got is None
    finally:
        peer.close()
        client.close()


def test_down_leaves_the_ruleset_exactly_as_before_and_repeats(lab, write_config):
    lab.vm.run("nft", "add table inet other; add chain inet other c { type filter hook output priority 10; }; "
               "add rule inet other c tcp dport 9 counter")
    before = ruleset_text(lab)
    config = write_config()
    up(lab, config)
    learn(lab, [(ALLOWED4, 60, "x.test")])
    assert ruleset_text(lab) != before
    for _ in range(2):
        result = lab.ramfw("down", "--config", config)
        assert result.returncode == 0, result.stderr
        assert ruleset_text(lab) == before
    assert lab.ramfw("status", "--config", config).returncode == 1


def test_a_bad_policy_leaves_the_previous_one_enforced(lab, write_config, write_policy, tmp_path):
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    config = write_config()
    up(lab, config, write_policy(["allowed-registry.test"]))
    learn(lab, [(ALLOWED4, 60, "allowed-registry.test")])
    before = ruleset_text(lab)
    record = (tmp_path / "run" / "state.json").read_text()
    bad = write_policy(["allowed-registry.test", "198.51.100.7"], name="bad.json")
    result = lab.ramfw("up", "--config", config, "--policy", bad)
    assert result.returncode == 2
    assert "registries[1] '198.51.100.7'" in result.stderr and "not IP addresses" in result.stderr
    assert "Traceback" not in result.stderr
    assert ruleset_text(lab) == before
    assert (tmp_path / "run" / "state.json").read_text() == record
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"


def test_reapplying_keeps_learned_addresses(lab, write_config):
    config = write_config()
    up(lab, config)
    learn(lab, [(ALLOWED4, 60, "x.test")])
    up(lab, write_config(mode="audit"))
    status = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert status["mode"] == "audit" and status["learned"]["x.test"][0]["address"] == ALLOWED4


def test_disabled_policy_restricts_nothing_and_says_so(lab, write_config, write_policy):
    lab.serve_tcp([BLOCKED4], [443])
    config = write_config()
    up(lab, config)
    up(lab, config, write_policy([], enabled=False))
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "connected"
    result = lab.ramfw("status", "--config", config)
    assert "not restricted" in result.stdout and "enabled false" in result.stdout


def test_doctor_reports_this_kernel(lab, write_config):
    result = lab.ramfw("doctor", "--config", write_config())  # its run_dir: the probe cache is written there
    assert result.returncode == 0, result.stderr
    assert "nf_tables" in result.stdout and "DNS replies are held by" in result.stdout
    assert "ramfw can enforce here" in result.stdout
    assert "engine scope: available; its eBPF program is loaded" in result.stdout
    assert "ramfw-sbx" not in lab.vm.run("nft", "list", "tables").stdout


def test_policy_lint_points_at_missing_redirect_domains(lab, write_policy):
    result = lab.ramfw("policy", "lint", write_policy(["ghcr.io"]))
    assert result.returncode == 0
    assert "pulls from ghcr.io will fail: also allow pkg-containers.githubusercontent.com" in result.stdout
    bad = lab.ramfw("policy", "lint", write_policy(["https://ghcr.io"]))
    assert bad.returncode == 2 and "not URLs" in bad.stderr


def test_a_name_seen_again_re_arms_its_addresses_in_the_kernel(lab, write_config, write_policy):
    """Found by the soak benchmark (issue #10): the kernel (6.10+) updates an existing element
    only where asked, so re-adding one with the same timeout kept its first expiry, while the
    daemon believed it re-armed: an address of a name looked up again and again expired under
    its clients. The probe said the kernel re-arms (it checked with another timeout)."""
    from ramfw.kernel import probes
    from ramfw.kernel.table import Table
    from ramfw.snoop.snooper import Element

    refreshes = probes.run().kernel_refreshes_timeout
    up(lab, write_config(), write_policy(["allowed-registry.test"]))
    with lab.vm.inside():
        table = Table("ramfw")
        table.add_elements([Element(ALLOWED4, 4, "allowed-registry.test")], refreshes)
        time.sleep(2.2)
        table.add_elements([Element(ALLOWED4, 4, "allowed-registry.test")], refreshes)  # the name seen again
        left = [e.expires for e in table.learned() if e.address == ALLOWED4]
    assert left and left[0] >= 3, f"re-armed to 4 s, found {left} (kernel_refreshes_timeout={refreshes})"
