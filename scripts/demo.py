"""The main job: ramfw end to end in a sandbox of network namespaces, then cleaned up.

A "vm" namespace runs a real Docker engine (in a cgroup of its own) and the ramfw daemon; an
"internet" namespace runs a real DNS server and real registries (Debian's docker-registry,
TLS from a throw-away CA) on documentation addresses. The engine pulls from an allowed and a
blocked registry, and from one whose blobs redirect to a CDN name; ramfw status explains
each block (the block events). `ramfw check` then names the CDN host the redirecting pull
needs, and an audit run turns what the pulls touched into a policy (`ramfw report`, `ramfw
policy suggest`) that, enforced, lets the pulls through and still refuses the blocked
registry. The host's own network, ruleset and Docker are never touched.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the lab lives in tests/lab

from ramfw.kernel import bpf
from tests.lab.registry import IMAGE
from tests.lab.world import config_text, engine_world


def show(title, text=""):
    print(f"\n=== {title}")
    if text.strip():
        print(text.rstrip())


def pulls(registries, *names) -> None:
    for name in names:
        images = registries.docker("images", "-q").stdout.split()
        if images:  # no cached layers: every pull downloads its blobs
            registries.docker("rmi", "-f", *set(images), check=False)
        start = time.monotonic()
        result = registries.docker("pull", f"{name}/{IMAGE}", check=False)
        outcome = "pulled" if result.returncode == 0 else "FAILED: " + result.stderr.strip()[-160:]
        show(f"docker pull {name}/{IMAGE}  ({time.monotonic() - start:.2f} s)", outcome)


def main() -> int:
    if bpf.cgroup2_mount() is None:
        print("demo: no cgroup v2 hierarchy is mounted here, so the engine cannot be scoped", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory(prefix="ramfw-demo-") as tmp, engine_world(Path(tmp)) as lab:
        registries = lab.registries
        config = Path(tmp, "ramfw.toml")
        policy = Path(tmp, "policy.json")
        policy.write_text(json.dumps({"organizations": [{"name": "acme", "registryAccess": {
            "enabled": True, "allowDockerHub": True, "registries": [
                {"address": "allowed-registry.test", "nickname": "Approved"},
                {"address": "redirect-registry.test", "nickname": "Redirects its blobs"}]}}]}, indent=1))
        config.write_text(config_text(Path(tmp), policy, f'engine_socket = "{registries.socket}"\n'))
        show("the organization's policy (Docker Hub is allowed by default)", policy.read_text())
        show("ramfw policy lint", lab.ramfw("policy", "lint", str(policy)).stdout)
        lab.daemon = lab.start_daemon(str(config))
        show("ramfw daemon started; ramfw status", lab.ramfw("status", "--config", str(config)).stdout)
        pulls(registries, "allowed-registry.test", "blocked-registry.test", "redirect-registry.test")
        time.sleep(0.3)
        show("ramfw status (the block events)", lab.ramfw("status", "--config", str(config)).stdout)
        certs = registries.dir / "vm" / "etc-docker" / "certs.d"  # the CAs the lab's dockerd trusts
        show(f"ramfw check redirect-registry.test/{IMAGE}", lab.ramfw(
            "check", "--config", str(config), "--certs-dir", str(certs), f"redirect-registry.test/{IMAGE}").stdout)

        audit = config.read_text().replace("[enforcement]\n", '[enforcement]\nmode = "audit"\n')
        config.write_text(audit)
        lab.daemon.terminate()
        lab.daemon.wait(10)
        Path(tmp, "seen.json").unlink(missing_ok=True)  # a fresh audit: only what its pulls touch
        lab.daemon = lab.start_daemon(str(config))
        show("audit mode: the same policy, nothing refused, everything that would be is kept")
        pulls(registries, "redirect-registry.test")
        lab.daemon.terminate()  # what it saw is saved as it stops
        lab.daemon.wait(10)
        show("ramfw report", lab.ramfw("report", "--config", str(config)).stdout)
        suggested = lab.ramfw("policy", "suggest", "--config", str(config))
        show("ramfw policy suggest --diff", lab.ramfw("policy", "suggest", "--diff", "--config", str(config)).stdout)
        policy.write_text(suggested.stdout)
        config.write_text(audit.replace('mode = "audit"\n', ""))
        lab.daemon = lab.start_daemon(str(config))
        show("the suggested policy, enforced", policy.read_text())
        pulls(registries, "redirect-registry.test", "blocked-registry.test")
        show("ramfw down", lab.ramfw("down", "--config", str(config)).stdout)
    print("\nsandbox removed; the host's network, ruleset and Docker were not touched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
