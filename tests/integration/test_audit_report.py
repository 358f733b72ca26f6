"""Audit that writes the allowlist (issue #11, part 3): what audit mode let through but would
have refused is kept per host name across the daemon's restarts; `ramfw report` shows it with
each entry's use; `ramfw policy suggest` turns it into a policy that, enforced, lets exactly
that through and refuses the rest."""

import json
import time

from tests.lab.sandbox import ALLOWED4, BLOCKED4, CDN4, NET4

RECORDS = (f"--host-record=allowed-registry.test,{ALLOWED4}", f"--host-record=mirror.other.test,{BLOCKED4}",
           f"--host-record=third.other.test,{CDN4}")


def looked_up_and_connected(lab, name: str, address: str) -> str:
    lab.resolve(name)
    return lab.connect(address)[0]


def stop(lab):
    lab.daemon.terminate()
    lab.daemon.wait(10)
    lab.daemon = None


def test_an_audit_run_becomes_a_policy_that_enforces_exactly_what_was_seen(lab, write_config, write_policy, tmp_path):
    lab.serve_tcp([ALLOWED4, BLOCKED4, CDN4], [443])
    lab.start_dnsmasq(NET4, *RECORDS)
    write_policy(["allowed-registry.test"])
    dns = f'[dns]\ntrusted_resolvers = ["{NET4}"]\n'
    audit = write_config(dns, mode="audit", scope=["host"], registry_ports=[443])
    lab.daemon = lab.start_daemon(audit)
    assert looked_up_and_connected(lab, "allowed-registry.test", ALLOWED4) == "connected"
    assert [lab.connect(ALLOWED4)[0] for _ in range(2)] == ["connected"] * 2  # three connections, one lookup
    for _ in range(2):  # let through, as audit mode does, and kept
        assert looked_up_and_connected(lab, "mirror.other.test", BLOCKED4) == "connected"
    time.sleep(0.5)
    stop(lab)  # saved as it stops; a new daemon adds to what the old one saw
    lab.daemon = lab.start_daemon(audit)
    assert looked_up_and_connected(lab, "mirror.other.test", BLOCKED4) == "connected"
    time.sleep(0.5)
    stop(lab)

    report = json.loads(lab.ramfw("report", "--json", "--config", audit).stdout)
    mirror = report["refused"]["mirror.other.test"]
    assert mirror["count"] >= 3 and mirror["ports"] == [443] and mirror["verdict"] == "audited"
    assert mirror["addresses"] == [BLOCKED4] and mirror["clients"] and mirror["first"] <= mirror["last"]
    assert "allowed-registry.test" not in report["refused"] and "third.other.test" not in report["refused"]
    assert report["usage"]["allowed-registry.test"]["lookups"] >= 1
    assert report["usage"]["allowed-registry.test"]["connections"] == 3  # counted by the kernel at connect time
    text = lab.ramfw("report", "--config", audit).stdout
    assert "mirror.other.test" in text and "allowed-registry.test" in text
    assert "3 connections" in text

    suggested = lab.ramfw("policy", "suggest", "--config", audit)
    assert suggested.returncode == 0, suggested.stderr
    policy = json.loads(suggested.stdout)
    registries = policy["organizations"][0]["registryAccess"]["registries"]
    assert registries == [{"address": "allowed-registry.test"}, {"address": "mirror.other.test"}]
    diff = lab.ramfw("policy", "suggest", "--diff", "--config", audit).stdout
    assert diff.strip() == "+ mirror.other.test"

    (tmp_path / "policy.json").write_text(suggested.stdout)
    enforce = write_config(dns, mode="enforce", scope=["host"], registry_ports=[443])
    lab.daemon = lab.start_daemon(enforce)
    assert looked_up_and_connected(lab, "allowed-registry.test", ALLOWED4) == "connected"
    assert looked_up_and_connected(lab, "mirror.other.test", BLOCKED4) == "connected"
    assert looked_up_and_connected(lab, "third.other.test", CDN4) == "refused"
