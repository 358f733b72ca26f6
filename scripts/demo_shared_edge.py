"""The shared-edge demo (issue #13): one TLS edge address serving two registries, as a CDN edge
serves two tenants, both names resolving to it; the policy allows one. A real Docker engine
pulls through the allowed name, then through the other at the same, already learned, address:
refused by name; then, with the check turned off, the same pull goes through (the hole the check
closes). Everything lives in network namespaces the demo builds and removes; run as root:

    .venv/bin/python scripts/demo_shared_edge.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives in tests/lab

from ramfw.kernel import bpf
from scripts.demo import pulls, show
from tests.lab.registry import EDGE4, EDGE_ALLOWED, EDGE_OTHER
from tests.lab.world import config_text, engine_world


def main() -> int:
    if bpf.cgroup2_mount() is None:
        print("demo: no cgroup v2 hierarchy is mounted here, so the engine cannot be scoped", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="ramfw-edge-demo-") as tmp, engine_world(Path(tmp), shared_edge=True) as lab:
        registries = lab.registries
        config = Path(tmp, "ramfw.toml")

        def write_config(check: bool) -> None:
            config.write_text(config_text(Path(tmp), Path(tmp, "policy.json"), f"tls_check = {str(check).lower()}\n"))

        lab.config = config  # ramfw down when the world is removed
        Path(tmp, "policy.json").write_text(json.dumps({"organizations": [{"name": "acme", "registryAccess": {
            "enabled": True, "allowDockerHub": False, "registries": [{"address": EDGE_ALLOWED}]}}]}))
        show(f"one TLS edge, {EDGE4}, serves {EDGE_ALLOWED} and {EDGE_OTHER} (a certificate each, chosen by "
             f"the server name); DNS gives both names that address; the policy allows {EDGE_ALLOWED} only")
        write_config(check=True)
        daemon = lab.start_daemon(str(config))
        pulls(registries, EDGE_ALLOWED, EDGE_OTHER)
        show("ramfw status", lab.ramfw("status", "--config", str(config)).stdout)
        daemon.terminate()
        daemon.wait(10)
        write_config(check=False)
        daemon = lab.start_daemon(str(config))
        show("the same, with enforcement.tls_check = false: the address alone is checked")
        pulls(registries, EDGE_ALLOWED, EDGE_OTHER)
    print("\nsandbox removed; the host's network, ruleset and Docker were not touched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
