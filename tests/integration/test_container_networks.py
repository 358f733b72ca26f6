"""Container networks on this VM are not egress: the engine reaches its own containers (docker-proxy
for ``docker run -p``, a registry container on ``localhost:5000``), and what a container sends
out is still filtered in ``containers`` scope, which closes the local pull-through-proxy bypass."""

import json
import time

import pytest

from tests.lab.sandbox import BLOCKED4, CONTAINER4, NET4, TcpServers

MARK = 0x52410000


@pytest.fixture
def bridged(lab, write_config, write_policy):
    """A container on a bridge of the vm (as docker0), serving 443 and 5000; a blocked registry
    outside; the daemon in engine scope."""
    lab.bridge = f"rfbr{len(lab.namespaces)}"
    lab.container = lab.add_container(bridge=lab.bridge)
    lab.servers.append(TcpServers(lab.container, [CONTAINER4], [443, 5000]))
    lab.serve_tcp([BLOCKED4], [443])
    write_policy(["allowed-registry.test"])
    lab.start_config = lambda **enforcement: write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', **enforcement)
    return lab


def bridges(lab, config):
    listing = json.loads(lab.vm.run("nft", "-j", "list", "set", "inet", "ramfw", "container_bridges").stdout)
    return next(item["set"] for item in listing["nftables"] if "set" in item).get("elem", [])


def test_the_engine_reaches_containers_on_its_bridges_and_nothing_else(bridged):
    """Issue #9, 5: docker-proxy (a child of dockerd: marked) connecting to a container's
    published port was rejected by the registry chain; so was a registry container."""
    lab = bridged
    config = lab.start_config(scope=["engine", "host"])
    lab.daemon = lab.start_daemon(config)
    assert bridges(lab, config) == [lab.bridge]
    for port in (443, 5000):
        assert lab.connect(CONTAINER4, port, mark=MARK)[0] == "connected"
        assert lab.connect(CONTAINER4, port)[0] == "connected"
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"


def test_a_bridge_with_a_port_that_may_leave_the_vm_is_not_a_container_bridge(bridged):
    """Only bridges whose ports are all veths or taps; the set follows link changes at once."""
    lab = bridged
    config = lab.start_config()
    lab.daemon = lab.start_daemon(config)
    lab.vm.run("ip", "link", "add", "rfifb0", "type", "ifb")
    lab.vm.run("ip", "link", "set", "rfifb0", "master", lab.bridge)
    deadline = time.monotonic() + 2
    while bridges(lab, config):
        assert time.monotonic() < deadline, "the daemon did not follow the link change"
        time.sleep(0.05)
    assert lab.connect(CONTAINER4, mark=MARK)[0] == "refused"
    lab.vm.run("ip", "link", "del", "rfifb0")
    deadline = time.monotonic() + 2
    while bridges(lab, config) != [lab.bridge]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_containers_scope_closes_the_local_pull_through_proxy_bypass(bridged):
    """A pull-through cache running as a container: the engine reaches it (a local container),
    and it fetches from the blocked registry. In engine scope alone that fetch is not the
    engine's and passes (Docker RAM's admitted bypass); containers scope filters it."""
    lab = bridged
    for scope, outcome in ((["engine"], "connected"), (["engine", "containers"], "refused")):
        config = lab.start_config(scope=scope)
        lab.daemon = lab.start_daemon(config)
        assert lab.connect(CONTAINER4, 5000, mark=MARK)[0] == "connected", "the engine reaches the cache"
        assert lab.connect(BLOCKED4, 443, source=lab.container)[0] == outcome, scope
        lab.daemon.terminate()
        lab.daemon.wait(10)
