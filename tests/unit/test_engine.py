"""Finding the engine's cgroups, on a fake /proc and a fake cgroup2 mount.

The fake /proc has, per process: comm, cgroup, an ``exe`` link to a file and ``ns/net`` and
``ns/mnt`` links; the fake mount has each cgroup's ``cgroup.procs``. Trusted executables are
given by (device, inode), as ``trusted_executables`` finds them on a real system.
"""

import os

import pytest

from ramfw.kernel import engine

HYBRID = "12:pids:/system.slice/docker.service\n1:name=systemd:/system.slice/docker.service\n0::/system.slice/docker.service\n"
OUR_NET = "net:[4026531840]"


class World:
    def __init__(self, tmp_path):
        self.proc = tmp_path / "proc"
        self.mount = tmp_path / "cgroup"
        self.bin = tmp_path / "usr-bin"
        self.impostors = tmp_path / "container-rootfs"
        for d in (self.proc, self.mount, self.bin, self.impostors):
            d.mkdir()
        for name in ("dockerd", "containerd", "buildkitd"):
            (self.bin / name).write_text("#!engine\n")
            (self.impostors / name).write_text("#!impostor\n")
        self.process("self", "python3", "/system.slice/ramfw.service")

    @property
    def trusted(self):
        return {(st.st_dev, st.st_ino): str(path) for path in self.bin.iterdir() for st in [os.stat(path)]}

    def process(self, pid, comm, cgroup, exe=None, net=OUR_NET, listed=True, mnt="mnt:[1]", uid=0):
        entry = self.proc / str(pid)
        (entry / "ns").mkdir(parents=True)
        (entry / "comm").write_bytes((comm if isinstance(comm, bytes) else comm.encode()) + b"\n")
        (entry / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        comm = comm if isinstance(comm, str) else "x"
        (entry / "cgroup").write_text(cgroup if cgroup.startswith(("0::", "12:")) else f"0::{cgroup}\n")
        os.symlink(exe or self.bin / comm, entry / "exe")
        os.symlink(net, entry / "ns" / "net")
        os.symlink(mnt, entry / "ns" / "mnt")
        relative = engine.v2_path((entry / "cgroup").read_text())
        directory = self.mount / relative.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        procs = directory / "cgroup.procs"
        if listed and pid != "self":
            procs.write_text((procs.read_text() if procs.exists() else "") + f"{pid}\n")
        elif not procs.exists():
            procs.write_text("")

    def discover(self, names=("dockerd", "containerd", "buildkitd")):
        return engine.discover(str(self.mount), names, proc=self.proc, trusted=self.trusted)


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_v2_path_reads_the_unified_line_of_hybrid_layouts():
    assert engine.v2_path(HYBRID) == "/system.slice/docker.service"
    assert engine.v2_path("0::/\n") == "/"
    assert engine.v2_path("4:memory:/x\n") is None


def test_stock_systemd_install_marks_dockerd_and_containerd_each_in_its_own_service(world):
    """Issue #9, 1: dockerd (docker.service) and containerd (containerd.service) are two cgroups.
    The old locate() picked the one with the most members: containerd.service, with its shims."""
    world.process(10, "dockerd", "/system.slice/docker.service")
    world.process(20, "containerd", "/system.slice/containerd.service")
    world.process(21, "containerd", "/system.slice/containerd.service")  # as a shim's parent would count
    world.process(30, "bash", "/user.slice/user-1000.slice")
    found = world.discover()
    assert set(found.cgroups) == {str(world.mount / "system.slice/docker.service"),
                                  str(world.mount / "system.slice/containerd.service")}
    assert not found.problems and not found.ignored


def test_a_process_that_calls_itself_dockerd_is_never_marked(world):
    """Issue #9, 2: recognized by the file it runs (device and inode), never by its name: a
    container's own /usr/bin/dockerd is another file, even where its path reads the same. It is
    not marked (nor moved into ramfw's cgroup); as root in this namespace it may be an engine
    installed elsewhere, so engine scope is not trusted until the configuration says."""
    world.process(10, "dockerd", "/system.slice/docker.service")
    world.process(40, "dockerd", "/system.slice/docker-abc.scope", exe=world.impostors / "dockerd")
    world.process(41, "dockerd", "/system.slice/docker-abc.scope", exe=world.impostors / "dockerd", uid=1000)
    found = world.discover()
    assert list(found.cgroups) == [str(world.mount / "system.slice/docker.service")]
    assert len(found.problems) == 1 and "pid 40" in found.problems[0] and "engine_executables" in found.problems[0]
    assert found.ignored == ["pid 41 (dockerd) runs as uid 1000, not root: not the engine"]


def test_an_unprivileged_process_cannot_make_itself_the_engine(world):
    """Anyone may run /usr/bin/containerd; only root's counts (an unprivileged one cannot get a
    cgroup of its choosing marked, nor the root cgroup reported)."""
    world.process(50, "containerd", "/system.slice/cron.service", uid=65534)
    found = world.discover()
    assert found.cgroups == {} and found.problems == [] and "uid 65534" in found.ignored[0]


def test_a_name_that_is_not_utf8_is_read_not_raised(world):
    """A process may name itself any bytes (prctl needs no privilege): discovery goes on."""
    world.process(60, b"\xff\xfe", "/x.scope")
    world.process(10, "dockerd", "/system.slice/docker.service")
    assert list(world.discover().cgroups) == [str(world.mount / "system.slice/docker.service")]


def test_an_upgraded_engine_still_running_its_replaced_file_is_trusted_only_in_our_mount_namespace(world):
    gone = str(world.bin / "dockerd") + " (deleted)"
    world.process(10, "dockerd", "/system.slice/docker.service", exe=gone)
    world.process(11, "dockerd", "/x.scope", exe=gone, mnt="mnt:[99]")
    found = world.discover()
    assert list(found.cgroups) == [str(world.mount / "system.slice/docker.service")]
    assert "pid 11" in found.problems[0]


def test_engines_of_other_network_namespaces_are_not_ours(world):
    """Docker-in-Docker, or a host engine while ramfw runs in a VM's namespace: the table never
    sees their traffic, so their cgroups are left alone."""
    world.process(10, "dockerd", "/system.slice/docker.service", net="net:[7]")
    assert world.discover().cgroups == {}


def test_a_cgroup_namespace_that_hides_the_host_paths_is_a_problem_not_a_guess(world):
    """Issue #9, 9: seen from a cgroup namespace, /proc shows paths relative to it, and the
    mounted hierarchy's directory of that name does not hold the engine."""
    world.process(10, "dockerd", "/system.slice/docker.service", listed=False)
    found = world.discover()
    assert found.cgroups == {} and "cgroup namespace" in found.problems[0]


def test_the_root_cgroup_is_found_as_such(world):
    world.process(20, "dockerd", "/")
    (world.mount / "cgroup.procs").write_text("20\n")
    found = world.discover()
    assert list(found.cgroups) == [str(world.mount)]


def test_no_engine_yet(world):
    assert world.discover().cgroups == {}


def test_a_dedicated_cgroup_is_made_when_allowed(world):
    world.process(20, "dockerd", "/")
    path = engine.dedicate(str(world.mount), [engine.EngineProcess(20, "/usr/bin/dockerd", str(world.mount))])
    assert path == str(world.mount / "ramfw-engine")
    assert (world.mount / "ramfw-engine" / "cgroup.procs").read_text() == "20"


def test_trusted_executables_are_root_owned_and_writable_by_root_only(tmp_path):
    good, writable = tmp_path / "good", tmp_path / "writable"
    for path in (good, writable):
        path.write_text("x")
        path.chmod(0o755)
    writable.chmod(0o777)
    found = engine.trusted_executables((), (str(good), str(writable), str(tmp_path / "missing")))
    if os.geteuid() == 0:
        assert list(found.values()) == [str(good)]
        os.chown(good, 65534, 65534)
    assert engine.trusted_executables((), (str(good),)) == {}
