"""The main job: ramfw end to end in a sandbox of network namespaces, then cleaned up.

A "vm" namespace runs the ramfw daemon; an "internet" namespace runs a real DNS server
(dnsmasq) and two registries' addresses on documentation addresses. The engine's traffic is
stood in for by sockets carrying ramfw's mark (the engine-scope eBPF sets it on the real
engine). The host's own network and ruleset are never touched.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from ramfw.sandbox import ALLOWED4, BLOCKED4, NET4, Lab

MARK = 0x52410000


def show(title, text):
    print(f"\n=== {title}")
    print(text.rstrip())


def main() -> int:
    lab = Lab()
    try:
        with tempfile.TemporaryDirectory(prefix="ramfw-demo-") as tmp:
            policy = Path(tmp, "policy.json")
            policy.write_text(json.dumps({"organizations": [{"name": "acme", "registryAccess": {
                "enabled": True, "allowDockerHub": True,
                "registries": [{"address": "allowed-registry.test", "nickname": "Approved"}]}}]}, indent=1))
            config = Path(tmp, "ramfw.toml")
            config.write_text(f'[policy]\nsource = "{policy}"\ncache = "{tmp}/cache.json"\n'
                              f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp}/run"\n')
            lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
            lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                              f"--host-record=blocked-registry.test,{BLOCKED4}")
            show("policy (Docker Hub allowed by default, plus one registry)", policy.read_text())
            show("ramfw policy lint", lab.ramfw("policy", "lint", str(policy)).stdout)
            lab.start_daemon(str(config))
            show("ramfw daemon started; ramfw status", lab.ramfw("status", "--config", str(config)).stdout)
            lab.resolve("warm-up.test")
            print("\n=== the engine resolves and connects (its sockets carry ramfw's mark)")
            for name in ("allowed-registry.test", "blocked-registry.test"):
                reply = lab.resolve(name)
                address = reply.answer[0][0].address
                outcome, seconds = lab.connect(address, mark=MARK)
                print(f"{name:24} -> {address:14} port 443: {outcome} in {seconds * 1000:.1f} ms")
            outcome, _ = lab.connect(BLOCKED4)
            print(f"{'(a process outside the engine)':24} -> {BLOCKED4:14} port 443: {outcome} (engine scope)")
            time.sleep(0.2)
            show("ramfw status", lab.ramfw("status", "--config", str(config)).stdout)
            result = lab.ramfw("down", "--config", str(config))
            show("ramfw down", result.stdout + lab.vm.run("nft", "list", "ruleset").stdout
                 + "(the vm's ruleset is empty again)")
    finally:
        lab.close()
    print("\nsandbox removed; the host's network was not touched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
