import os
from pathlib import Path

import pytest

from tests.lab import sandbox as lab_mod


@pytest.fixture
def lab():
    reason = lab_mod.skip_reason()
    if reason:
        pytest.skip(reason)
    the_lab = lab_mod.Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def write_config(tmp_path):
    def write(extra: str = "", **enforcement) -> str:
        # Never let a test's daemon find (and mark) an engine running on the host itself.
        enforcement.setdefault("engine_processes", ["ramfw-test-no-engine"])
        lines = [f"{k} = {str(v).lower()}" if isinstance(v, bool) else
                 f"{k} = {v!r}" if not isinstance(v, (list, tuple)) else f"{k} = {list(v)!r}"
                 for k, v in enforcement.items()]
        path = tmp_path / "ramfw.toml"
        path.write_text(
            "[enforcement]\n" + "\n".join(lines).replace("'", '"') + "\n"
            f"[daemon]\nrun_dir = \"{tmp_path}/run\"\n"
            f"[policy]\nsource = \"{tmp_path}/policy.json\"\ncache = \"{tmp_path}/cache.json\"\n" + extra
        )
        return str(path)
    return write


@pytest.fixture
def write_policy(tmp_path):
    import json

    def write(registries, name="policy.json", **access) -> str:
        path = tmp_path / name
        entries = [{"address": r} if isinstance(r, str) else r for r in registries]
        path.write_text(json.dumps({"organizations": [
            {"name": "acme", "registryAccess": {"enabled": True, "registries": entries, **access}}]}))
        return str(path)
    return write


def _merge(trees: list[Path], into: Path) -> None:
    """``into``: the union of ``trees`` in symbolic links, one for each file or directory only
    one tree has (a file both have: the later tree's, as ``cp -rsf`` would). A hundred links
    rather than cp -rsf's sixteen thousand, which can take seconds."""
    into.mkdir(parents=True)
    children: dict[str, list[Path]] = {}
    for tree in trees:
        for child in sorted(tree.iterdir()):
            children.setdefault(child.name, []).append(child)
    for name, paths in children.items():
        if len(paths) > 1 and all(path.is_dir() for path in paths):
            _merge(paths, into / name)
        else:
            (into / name).symlink_to(paths[-1])


@pytest.fixture(scope="session")
def bcc_headers(tmp_path_factory):
    """Kernel headers bcc can compile against: this kernel's, or Debian's linux-headers merged
    into one tree (the programs use only the stable uapi, so another version's headers do).
    Session-wide: the tree is made once, and BCC_KERNEL_SOURCE stays set until the end."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("python3-bpfcc is not installed")
    release = os.uname().release
    if Path(f"/lib/modules/{release}/build").exists():
        yield
        return
    arch = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    common = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    if not arch or not common:
        pytest.skip(f"no kernel headers for bcc: none for {release}, and no linux-headers-amd64 to use")
    merged = tmp_path_factory.mktemp("bcc") / "kernel-headers"
    _merge([common[-1], arch[-1]], merged)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BCC_KERNEL_SOURCE", str(merged))
        yield
