"""End to end (issue #13): a real Docker engine pulling through one TLS edge address that serves
two registries, each with its own certificate, chosen by the ClientHello's server name (a CDN
edge with two tenants). DNS gives both names that one address; the policy allows one of them."""

import json
import time
from pathlib import Path

import pytest

from tests.lab.registry import EDGE4, EDGE_ALLOWED, EDGE_OTHER, IMAGE
from tests.lab.world import config_text, engine_world, missing, write_policy


def write_config(lab, tmp, **enforcement):
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in enforcement.items())
    Path(lab.config).write_text(config_text(tmp, lab.policy, extra))


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("edge")
    with engine_world(tmp, shared_edge=True) as lab:
        lab.policy, lab.config, lab.tmp = tmp / "policy.json", str(tmp / "ramfw.toml"), tmp
        write_policy(lab.policy, [EDGE_ALLOWED])
        write_config(lab, tmp)
        lab.daemon = lab.start_daemon(lab.config)
        yield lab


def status(lab):
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)


def pull(lab, reference):
    lab.registries.docker("rmi", "-f", reference, check=False)
    start = time.monotonic()
    result = lab.registries.docker("pull", reference, check=False)
    return result, time.monotonic() - start


def test_a_pull_through_the_allowed_name_works(edge):
    result, _ = pull(edge, f"{EDGE_ALLOWED}/{IMAGE}")
    assert result.returncode == 0, result.stderr
    learned = status(edge)["learned"]
    assert [i["address"] for i in learned[EDGE_ALLOWED]] == [EDGE4]


def test_a_pull_through_the_other_name_at_the_learned_address_is_refused_at_once_by_name(edge):
    assert pull(edge, f"{EDGE_ALLOWED}/{IMAGE}")[0].returncode == 0  # the address is learned, open
    result, seconds = pull(edge, f"{EDGE_OTHER}/{IMAGE}")
    assert result.returncode != 0 and "connection reset by peer" in result.stderr, result.stderr
    assert seconds < 5  # the engine retries a reset a few times; never a timeout
    blocks = [b for b in status(edge)["recent_blocks"] if b["host"] == EDGE_OTHER]
    assert blocks and blocks[-1]["address"] == EDGE4 and blocks[-1]["port"] == 443
    assert blocks[-1]["message"] == f"registry access to {EDGE_OTHER} is not allowed (its TLS server name, at {EDGE4})"
    text = edge.ramfw("status", "--config", edge.config).stdout
    assert f"blocked:    registry access to {EDGE_OTHER} is not allowed" in text
    assert f"ask your administrators to add {EDGE_OTHER}" in text


def test_without_the_check_the_same_pull_goes_through_the_shared_address(edge):
    """The hole the check closes, shown with the check turned off (enforcement.tls_check)."""
    edge.daemon.terminate()
    edge.daemon.wait(10)
    try:
        write_config(edge, edge.tmp, tls_check=False)
        edge.daemon = edge.start_daemon(edge.config)
        assert pull(edge, f"{EDGE_ALLOWED}/{IMAGE}")[0].returncode == 0
        result, _ = pull(edge, f"{EDGE_OTHER}/{IMAGE}")
        assert result.returncode == 0, "an address learned for one name is open to every name it serves"
    finally:
        edge.daemon.terminate()
        edge.daemon.wait(10)
        write_config(edge, edge.tmp)
        edge.daemon = edge.start_daemon(edge.config)
    assert pull(edge, f"{EDGE_OTHER}/{IMAGE}")[0].returncode != 0


def test_the_engines_first_flights_are_all_that_reach_the_daemon(edge):
    before = status(edge)["tls"]["counters"]
    assert pull(edge, f"{EDGE_ALLOWED}/{IMAGE}")[0].returncode == 0
    after = status(edge)["tls"]["counters"]
    flows = after["allowed"] - before.get("allowed", 0)
    segments = after["segments"] - before.get("segments", 0)
    assert flows >= 1 and segments <= 3 * flows, (flows, segments)  # Go's ClientHello: one or two segments


def test_a_proxied_pull_is_allowed_or_refused_by_its_connect_host(edge):
    """dockerd with HTTPS_PROXY: its CONNECT request names the registry; the proxy resolves it."""
    from tests.lab.edge import PROXY4, ConnectProxy, add_addresses

    add_addresses(edge, (PROXY4,))
    proxy = ConnectProxy(edge.net, lambda host: EDGE4)
    edge.servers.append(proxy)
    edge.daemon.terminate()
    edge.daemon.wait(10)
    registries = edge.registries
    try:
        write_config(edge, edge.tmp, proxies=[f"{PROXY4}:3128"])
        edge.daemon = edge.start_daemon(edge.config)
        registries.proxy = f"http://{PROXY4}:3128"
        registries.restart_dockerd()
        result, _ = pull(edge, f"{EDGE_ALLOWED}/{IMAGE}")
        assert result.returncode == 0, result.stderr
        assert f"{EDGE_ALLOWED}:443" in proxy.asked, "through the proxy"
        result, _ = pull(edge, f"{EDGE_OTHER}/{IMAGE}")
        assert result.returncode != 0
        assert f"{EDGE_OTHER}:443" not in proxy.asked, "refused before the proxy read it"
        blocks = [b["message"] for b in status(edge)["recent_blocks"]]
        assert f"registry access to {EDGE_OTHER} is not allowed (CONNECT through the proxy {PROXY4})" in blocks
    finally:
        registries.proxy = ""
        registries.restart_dockerd()
        edge.daemon.terminate()
        edge.daemon.wait(10)
        write_config(edge, edge.tmp)
        edge.daemon = edge.start_daemon(edge.config)
