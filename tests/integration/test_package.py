"""The Debian package, installed into a throw-away Debian 12 root filesystem, never the host.

scripts/build-deb builds ramfw_<version>_all.deb; scripts/build-rootfs makes (once a day,
cached) a rootfs from Debian's packages holding apt and the package's dependencies, so apt
installs the .deb with no download (the rootfs keeps no package lists): its Depends must be met by Debian's packages. Every step
runs chrooted into a copy of that rootfs, in a network namespace made here (its nftables
table is that namespace's) and private mount and PID namespaces (their mounts and processes
end with the step).
"""

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import ramfw
from tests.lab.sandbox import Netns, skip_reason

ROOT = Path(__file__).resolve().parents[2]
POLICY = ('{"organizations": [{"name": "acme", "registryAccess": {"enabled": true, '
          '"registries": [{"address": "ghcr.io"}, {"address": "pkg-containers.githubusercontent.com"}]}}]}')


def needs():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("chroot") is None or shutil.which("apt-get") is None:
        pytest.skip("chroot and apt-get are needed to build and install the package")


@pytest.fixture(scope="session")
def deb(tmp_path_factory):
    needs()
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(ROOT / "scripts" / "build-deb"), str(out)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return Path(built.stdout.strip().splitlines()[-1])


def depends(deb: Path) -> list[str]:
    """The package names its Depends and Recommends name (first of alternatives, no versions)."""
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Recommends"], capture_output=True,
                            text=True, check=True).stdout
    names = []
    for line in fields.splitlines():
        for item in line.split(":", 1)[1].split(","):
            name = re.split(r"[\s(|]", item.strip())[0].removesuffix(":any")
            names.append(name)
    return sorted(set(names) - {"${misc:Depends}"})


@pytest.fixture
def chroot(deb, tmp_path):
    """run(*argv) inside a fresh copy of the rootfs, in one network namespace for the test."""
    made = subprocess.run([str(ROOT / "scripts" / "build-rootfs"), "apt", *depends(deb)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(made.stdout.strip().splitlines()[-1]) as tar:
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xf", tar.name], check=True)
    shutil.copy(deb, root / "tmp" / deb.name)
    ns = Netns("pkg")
    mounts = (f'mount -t proc proc "{root}/proc" && mount -t sysfs sysfs "{root}/sys" && '
              f'mount -t devpts -o newinstance,ptmxmode=0666 devpts "{root}/dev/pts" && exec chroot "{root}" "$@"')

    def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["nsenter", f"--net={ns.path}", "unshare", "--mount", "--pid", "--fork",
                                 "--kill-child", "sh", "-c", mounts, "sh", *argv],
                                capture_output=True, text=True, timeout=300,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                     "DEBIAN_FRONTEND": "noninteractive"})
        assert not check or result.returncode == 0, f"{argv}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
        return result

    run.root = root
    run.deb = f"/tmp/{deb.name}"
    try:
        yield run
    finally:
        ns.delete()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def test_the_package_is_named_for_the_release(deb):
    assert deb.name == f"ramfw_{ramfw.__version__}_all.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version", "Architecture"], capture_output=True,
                            text=True, check=True).stdout
    assert fields == f"Version: {ramfw.__version__}\nArchitecture: all\n"


def test_installed_it_changes_nothing_until_a_policy_is_placed_and_purge_removes_enforcement(chroot):
    run, root = chroot, chroot.root
    # The rootfs has no package lists: apt can only take the dependencies already installed there,
    # Debian's packages that build-rootfs put in.
    run("apt-get", "install", "-y", run.deb)
    assert run("ramfw", "--version").stdout == f"ramfw {ramfw.__version__}\n"
    assert run("head", "-1", "/usr/bin/ramfw").stdout == "#!/usr/bin/python3\n"  # Debian's Python
    unit = (root / "lib/systemd/system/ramfw.service").read_text()
    assert "ExecStart=/usr/bin/ramfw daemon" in unit and "ExecCondition=/usr/bin/ramfw policy placed" in unit
    assert (root / "etc/systemd/system/multi-user.target.wants/ramfw.service").is_symlink()
    assert (root / "usr/lib/ramfw/wsl-boot").stat().st_mode & 0o111
    assert (root / "usr/share/ramfw/bpf/mark.bpf.c").exists()

    # Installed as it is: the unit would be skipped (not failed), and the default configuration loads.
    placed = run("ramfw", "policy", "placed", check=False)
    assert placed.returncode == 1 and "no policy is placed" in placed.stdout
    assert "ramfw" not in run("nft", "list", "tables").stdout

    (root / "etc/ramfw/policy.json").write_text(POLICY)
    lint = run("ramfw", "policy", "lint", "/etc/ramfw/policy.json")
    assert "valid: organization acme, 2 registries" in lint.stdout
    assert run("ramfw", "policy", "placed").stdout == "policy placed: /etc/ramfw/policy.json\n"
    run("ramfw", "up")
    assert "table inet ramfw" in run("nft", "list", "tables").stdout

    # remove: the code goes, the configuration and enforcement stay (fail closed)
    conf = root / "etc/ramfw/ramfw.toml"
    conf.write_text(conf.read_text() + '\n[enforcement]\nmode = "enforce"\n')  # an admin's change
    run("apt-get", "remove", "-y", "ramfw")
    assert not (root / "usr/bin/ramfw").exists()
    assert not (root / "usr/lib/python3/dist-packages/ramfw").exists()
    assert conf.read_text().endswith('mode = "enforce"\n')
    assert "table inet ramfw" in run("nft", "list", "tables").stdout
    assert run("dpkg-query", "-W", "-f", "${db:Status-Status}", "ramfw").stdout == "config-files"

    # purge: the configuration, the state and the table go
    run("apt-get", "purge", "-y", "ramfw")
    assert not conf.exists() and not (root / "var/lib/ramfw").exists()
    assert "ramfw" not in run("nft", "list", "tables").stdout
    assert not (root / "etc/systemd/system/multi-user.target.wants/ramfw.service").exists()
    assert run("dpkg-query", "-W", "ramfw", check=False).returncode != 0 or \
        run("dpkg-query", "-W", "-f", "${db:Status-Status}", "ramfw").stdout == "not-installed"
