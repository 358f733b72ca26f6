"""An engine behind a proxy (issue #9, 6): an explicit proxy is reachable on its port and status
says what that means; a transparent redirect to a local proxy is judged by where the engine
was going, so it opens no way around ramfw."""

import json

from tests.lab.sandbox import ALLOWED4, BLOCKED4, CDN4, NET4, TcpServers

MARK = 0x52410000
REDIRECT = """
table ip labnat {
    chain out {
        type nat hook output priority -100;
        meta mark & 0xffff0000 == 0x52410000 tcp dport 443 redirect to :3129
    }
}
"""


def test_an_explicit_proxy_is_reachable_on_its_port_only_and_status_says_what_it_means(lab, write_config,
                                                                                       write_policy):
    lab.serve_tcp([CDN4], [443, 3128])
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', proxies=[f"{CDN4}:3128"])
    lab.daemon = lab.start_daemon(config)
    assert lab.connect(CDN4, 3128, mark=MARK)[0] == "connected"
    assert lab.connect(CDN4, 443, mark=MARK)[0] == "refused"
    notes = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)["notes"]
    assert any(f"proxy {CDN4}:3128" in note and "depends on the proxy" in note for note in notes)


def test_a_transparent_redirect_to_a_local_proxy_is_judged_by_the_original_destination(lab, write_config,
                                                                                       write_policy):
    """The issue feared the loopback rule would accept a redirected connection, letting the local
    proxy (not the engine) reach the blocked registry. It does not (in the output hook ``oif`` is
    the device of the route before NAT), but the registry chain then judged 127.0.0.1: every
    redirected connection was refused, allowed or not. Now: by where the engine was going."""
    lab.servers.append(TcpServers(lab.vm, ["127.0.0.1"], [3129]))  # the "transparent proxy"
    write_policy(["allowed-registry.test"])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    lab.daemon = lab.start_daemon(write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n'))
    lab.vm.run("nft", "-f", "-", input=REDIRECT)
    lab.resolve("allowed-registry.test")  # learned (the table is the daemon's: nobody else may write it)
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected", "to the proxy, for an allowed destination"
    assert lab.connect("127.0.0.1", 3129, mark=MARK)[0] == "connected", "loopback itself stays open"
