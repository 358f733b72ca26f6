"""A real Docker engine and the lab's registries, for the end-to-end tests and the demos: made,
then removed with whatever ramfw left (``ramfw down`` when a configuration was written to
``lab.config``, the bpffs mount under ``tmp``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

from ramfw.kernel import bpf

from .registry import RegistryLab, tools_missing
from .sandbox import NET4, Lab, skip_reason


def missing() -> str | None:
    """Why the engine's world cannot be made here, or None."""
    reason = skip_reason() or tools_missing()
    if reason is None and bpf.cgroup2_mount() is None:
        reason = "no cgroup v2 hierarchy is mounted"
    return reason


def write_policy(path: Path, registries) -> None:
    """acme's policy allowing ``registries`` (and Docker Hub, by default)."""
    path.write_text(json.dumps({"organizations": [{"name": "acme", "registryAccess": {
        "registries": [{"address": r} for r in registries]}}]}))


def config_text(tmp: Path, policy: Path, enforcement: str = "") -> str:
    """ramfw's configuration for a world under ``tmp``: its policy, its own bpffs and run dir."""
    return (f'[policy]\nsource = "{policy}"\ncache = "{tmp}/cache.json"\n'
            f'[enforcement]\nbpffs = "{tmp}/bpffs"\n{enforcement}'
            f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp}/run"\n')


@contextlib.contextmanager
def engine_world(tmp: Path, **registry_options):
    """The lab with ``lab.registries`` (containerd and dockerd started, in two cgroups: ramfw
    finds both itself)."""
    lab = Lab()
    registries = None
    try:
        registries = RegistryLab(lab, tmp / "registries", **registry_options)
        registries.start_engine()
        lab.registries = registries
        yield lab
    finally:
        try:
            if getattr(lab, "config", None):
                lab.ramfw("down", "--config", str(lab.config))
        finally:
            if registries is not None:
                registries.close()
            lab.close()
            subprocess.run(["umount", str(tmp / "bpffs")], capture_output=True)
