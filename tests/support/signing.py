"""minisign key pairs and signatures made by Debian's ``minisign`` (shared by tests and benchmarks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


class Signer:
    """A minisign key pair, unencrypted (-W), in ``where``."""

    def __init__(self, where: Path, name: str):
        self.pub, self.sec = where / f"{name}.pub", where / f"{name}.key"
        subprocess.run(["minisign", "-G", "-p", self.pub, "-s", self.sec, "-W"], check=True, capture_output=True)
        self.line = self.pub.read_text().splitlines()[1]  # the key as policy.trusted_keys takes it
        self.key_id = self.pub.read_text().split()[-2]  # "untrusted comment: minisign public key <ID>"

    def sign(self, path: Path, legacy: bool = False) -> Path:
        subprocess.run(["minisign", "-S", "-s", self.sec, "-m", path, *(["-l"] if legacy else [])], check=True,
                       capture_output=True, input=b"")
        return Path(str(path) + ".minisig")

    def signed(self, where: Path, text: str, name: str = "policy.json") -> tuple[bytes, bytes]:
        """(policy, signature) as bytes, the policy written to ``where/name`` and signed."""
        path = where / name
        path.write_text(text)
        return path.read_bytes(), self.sign(path).read_bytes()


def policy_text(registries=("ghcr.io",), **top) -> str:
    """A policy in Docker RAM's shape, with ``version`` / ``expires`` when given."""
    return json.dumps({**top, "organizations": [{"name": "acme", "registryAccess": {
        "registries": [{"address": r} for r in registries]}}]})
