"""What the daemon saw (bounded, saved atomically, read back) and the policy suggested from it."""

import json
import logging

from ramfw import policy as policy_mod
from ramfw.daemon import seen as seen_mod
from ramfw.daemon.seen import Seen, usage
from ramfw.snoop.snooper import Element
from ramfw.policy import hosting
from ramfw.policy.suggest import suggest


def policy(*registries, version=0):
    data = {"organizations": [{"name": "acme", "registryAccess": {"enabled": True, "allowDockerHub": False,
                                                                   "registries": [{"address": r} for r in registries]}}]}
    if version:
        data["version"] = version
    return policy_mod.from_data(data)


def test_refusals_are_bounded_and_the_least_recently_seen_go_first(monkeypatch):
    monkeypatch.setattr(seen_mod, "MAX_HOSTS", 3)
    seen = Seen()
    for i, host in enumerate(["a.test", "b.test", "c.test", "a.test", "d.test"]):
        seen.refusal(host, "203.0.113.9", 443, "192.0.2.1", "blocked", float(i))
    assert list(seen.refused) == ["c.test", "a.test", "d.test"]
    assert seen.refused["a.test"]["count"] == 2 and seen.refused["a.test"]["first"] == 0.0


def test_ports_clients_and_addresses_are_kept_a_few_each():
    seen = Seen()
    for port in range(20):
        seen.refusal("", "203.0.113.9", 1000 + port, "192.0.2.1", "audited", 1.0)
    entry = seen.refused["address 203.0.113.9"]
    assert entry["ports"] == list(range(1012, 1020)) and entry["clients"] == ["192.0.2.1"]


def test_saved_atomically_and_read_back_by_the_next_daemon(tmp_path):
    path = str(tmp_path / "state" / "seen.json")
    seen = Seen(path)
    seen.refusal("mirror.test", "203.0.113.9", 443, "192.0.2.1", "audited", 5.0)
    seen.learned([Element("203.0.113.10", 300, "allowed.test"), Element("203.0.113.11", 300, "allowed.test")], 6.0)
    seen.save(force=True)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["seen.json"]
    again = Seen.load(path)
    assert again.refused == seen.refused and again.looked_up == {"allowed.test": {"count": 1, "first": 6.0, "last": 6.0}}


def test_an_unreadable_state_file_is_said_and_started_afresh(tmp_path, caplog):
    (tmp_path / "seen.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ramfw"):
        seen = Seen.load(str(tmp_path / "seen.json"))
    assert seen.refused == {} and "unreadable" in caplog.text


def test_usage_per_entry_counts_lookups_and_names_the_unused():
    looked_up = {"a.allowed.test": {"count": 3, "first": 1.0, "last": 9.0},
                 "b.allowed.test": {"count": 2, "first": 1.0, "last": 4.0}}
    use = usage(looked_up, policy("allowed.test", "ghcr.io"))
    assert use == {"allowed.test": {"lookups": 5, "connections": 0, "last": 9.0},
                   "ghcr.io": {"lookups": 0, "connections": 0, "last": None}}
    hub = policy_mod.from_data({"organizations": [{"name": "acme", "registryAccess": {
        "enabled": True, "registries": [{"address": "ghcr.io"}]}}]})  # allowDockerHub by default
    use = usage({"registry-1.docker.io": {"count": 2, "first": 1.0, "last": 3.0}}, hub)
    assert use == {"ghcr.io": {"lookups": 0, "connections": 0, "last": None},
                   seen_mod.DOCKER_HUB: {"lookups": 2, "connections": 0, "last": 3.0}}


def test_connections_are_counted_per_entry_and_survive_a_restart(tmp_path):
    seen = Seen(str(tmp_path / "seen.json"))
    seen.learned([Element("203.0.113.10", 60, "a.allowed.test")], 1.0)
    seen.connected({"a.allowed.test": 3, "b.allowed.test": 2}, 5.0)  # b: learned before a restart
    seen.connected({"a.allowed.test": 1}, 7.0)
    seen.save(force=True)
    again = Seen.load(str(tmp_path / "seen.json"))
    assert again.looked_up["a.allowed.test"]["count"] == 1  # one lookup, not four
    assert again.looked_up["a.allowed.test"]["connections"] == 4
    assert again.looked_up["b.allowed.test"]["count"] == 0
    use = usage(again.looked_up, policy("allowed.test", "ghcr.io"))
    assert use["allowed.test"] == {"lookups": 1, "connections": 6, "last": 7.0}


def test_suggest_adds_exact_hosts_only_and_says_what_it_cannot_add():
    refused = {"mirror.other.test": {"count": 3}, "address 203.0.113.50": {"count": 1},
               "x.allowed.test": {"count": 1}}
    data, added, notes = suggest(policy("allowed.test", version=7), refused)
    assert added == ["mirror.other.test"]
    assert [r["address"] for r in data["organizations"][0]["registryAccess"]["registries"]] == [
        "allowed.test", "mirror.other.test"]
    assert data["version"] == 8 and policy_mod.from_data(data).matcher.match("mirror.other.test")
    assert any("203.0.113.50" in note and "cannot be allowlisted" in note for note in notes)
    assert not any("*" in entry for entry in added)


def test_suggest_names_redirect_domains_by_their_registry_and_warns_of_shared_hosting():
    data, added, notes = suggest(policy("ghcr.io"), {"pkg-containers.githubusercontent.com": {"count": 4}})
    assert added == ["pkg-containers.githubusercontent.com"]
    assert any("GitHub Container Registry's redirect domain for ghcr.io" in note for note in notes)
    _, added, notes = suggest(policy("ghcr.io"), {"d111111abcdef8.cloudfront.net": {"count": 1}})
    assert added == ["d111111abcdef8.cloudfront.net"]
    if hosting.available():
        assert any("one tenant of cloudfront.net" in note and "never *.cloudfront.net" in note for note in notes)


def test_a_suggested_policy_is_valid_json_for_the_policy_parser():
    data, _, _ = suggest(policy("ghcr.io"), {"quay.io": {"count": 1}})
    assert policy_mod.from_data(json.loads(json.dumps(data))).organization == "acme"
