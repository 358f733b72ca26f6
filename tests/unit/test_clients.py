"""Naming a blocked packet's client (issue #11, part 1), the pure parts: the text a block says,
what a process can make it say, a container only where the engine says so, pid reuse, stale
records, programs run since the connect, the engine's answers."""

import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from ramfw.cli import _report_text
from ramfw.daemon import clients
from ramfw.daemon.blocks import client_text, listed, process_name
from ramfw.kernel import clients as kernel_clients
from ramfw.kernel.clients import Connect
from ramfw.snoop.packet import TCP, Flow

DOCKERD = {"recorded": True, "pid": 812, "comm": "dockerd", "uid": 0, "exe": "/usr/sbin/dockerd",
           "cgroup": "/system.slice/docker.service"}
ID = "1f2e3d4c5b6a" + "0" * 52


def in_container(name="", image="", cgroup=f"/system.slice/docker-{ID}.scope"):
    return {"recorded": True, "pid": 91, "comm": "nc", "uid": 0, "exe": "", "cgroup": cgroup,
            "container": {"id": ID, "name": name, "image": image}}


def test_the_text_names_the_process_its_executable_and_cgroup():
    assert client_text(DOCKERD) == "dockerd (pid 812, uid 0, /usr/sbin/dockerd, cgroup /system.slice/docker.service)"
    assert process_name(DOCKERD) == "dockerd" and process_name({"recorded": False, "why": "x"}) == ""


def test_a_container_is_named_only_where_the_engine_says_its_process_runs():
    client = in_container()
    clients._fill(client, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert client_text(client) == "nc (pid 91, uid 0) in container builder (moby/buildkit, 1f2e3d4c5b6a)"
    assert process_name(client) == "nc in builder"
    framed = in_container(cgroup=f"/user.slice/user-1000.slice/user@1000.service/docker-{ID}.scope")
    clients._fill(framed, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert framed["container"]["name"] == "" and "which the engine does not say runs there" in client_text(framed)
    assert process_name(framed) == "nc"
    nested = in_container(cgroup=f"/system.slice/docker-{ID}.scope/init")
    clients._fill(nested, {"name": "builder", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert nested["container"]["name"] == "builder"
    sibling = in_container(cgroup=f"/system.slice/docker-{ID}.scope-x")
    clients._fill(sibling, {"name": "builder", "image": "i", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert sibling["container"]["name"] == ""


def test_container_ids_are_read_from_both_cgroup_drivers_paths():
    for path in (f"/system.slice/docker-{ID}.scope", f"/docker/{ID}", f"/kubepods/pod1/cri-containerd-{ID}.scope"):
        assert clients._CONTAINER.search(path).group(1) == ID, path
    assert clients._CONTAINER.search("/system.slice/docker.service") is None


def test_a_process_cannot_write_log_lines_of_its_own_through_its_name():
    assert clients.printable("x\nWARNING ramfw: allowed") == "x?WARNING ramfw: allowed"
    assert clients.printable("/tmp/a\rb\x1b[2J") == "/tmp/a?b?[2J"


def test_the_executable_is_read_only_while_the_pid_is_the_process_that_connected():
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    me = Connect(os.getpid(), threading.get_native_id(), 0, 0, 0, now, own_comm())
    assert clients.executable(me) == (os.readlink("/proc/self/exe"), "")
    assert clients.executable(replace(me, boot_ns=0)) == ("", ""), "a process started after the connect is another"
    assert clients.executable(replace(me, pid=2 ** 22 + 1)) == ("", "")


def test_a_cgroup_is_found_by_its_id_and_the_walk_is_bounded(tmp_path, monkeypatch):
    """Where the kernel does not open a cgroup by its handle, a walk finds it (bounded)."""
    def refused(mount, cgroup_id):
        raise OSError(errno.EPERM, "no CAP_DAC_READ_SEARCH")
    monkeypatch.setattr(clients, "cgroup_by_handle", refused)
    (tmp_path / "system.slice" / "docker.service").mkdir(parents=True)
    wanted = (tmp_path / "system.slice" / "docker.service").stat().st_ino
    assert clients.find_cgroup(str(tmp_path), wanted) == "/system.slice/docker.service"
    assert clients.find_cgroup(str(tmp_path), 1) == "/"
    monkeypatch.setattr(clients, "MAX_CGROUPS", 1)
    assert clients.find_cgroup(str(tmp_path), wanted) == ""


def test_a_cgroup_not_found_is_looked_for_again_later(monkeypatch):
    """A miss was kept for good: a cgroup the bounded walk did not reach stayed unnamed."""
    found, clock = {}, [1000.0]
    monkeypatch.setattr(clients, "find_cgroup", lambda mount, cgroup_id: found.get(cgroup_id, ""))
    monkeypatch.setattr(clients.time, "monotonic", lambda: clock[0])
    paths = clients.CgroupPaths("/sys/fs/cgroup")
    assert paths.path(77) == ""
    found[77] = "/user.slice/late"
    assert paths.path(77) == "", "looked for at most once per MISS_SECONDS"
    clock[0] += clients.MISS_SECONDS
    assert paths.path(77) == "/user.slice/late"
    found.clear()
    assert paths.path(77) == "/user.slice/late", "a path found is kept (ids are not reused)"


def own_comm() -> str:
    return open(f"/proc/self/task/{threading.get_native_id()}/comm").read().rstrip("\n")


class Recorder:
    def __init__(self, connect):
        self.connect = connect

    def lookup(self, *flow):
        return self.connect


SYN = Flow(TCP, "192.0.2.1", 40000, "203.0.113.20", 443)


def naming(monkeypatch, connect) -> clients.Clients:
    """A ``Clients`` whose recorder gives ``connect`` for any packet."""
    monkeypatch.setattr(clients.bpf, "cgroup2_mount", lambda: None)
    named = clients.Clients(None, "/nonexistent/engine.sock")
    named.recorder, named.problem = Recorder(connect), ""
    return named


def test_a_record_older_than_the_bound_is_not_believed(monkeypatch):
    """A record is kept until evicted: a forged SYN copying an old connection's addresses and
    ports, or a port reused, was pinned on whoever connected then."""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    me = Connect(os.getpid(), threading.get_native_id(), 0, 0, 0, now, own_comm())
    assert naming(monkeypatch, me).describe(SYN)["pid"] == os.getpid()
    old = replace(me, boot_ns=now - clients.RECORD_SECONDS * 1_000_000_000 - 1)
    assert naming(monkeypatch, old).describe(SYN) == {"recorded": False, "why": clients.UNRECORDED}
    assert naming(monkeypatch, None).describe(SYN) == {"recorded": False, "why": clients.UNRECORDED}
    for cause in ("before this daemon started", "raw socket's or forged", "recorded longer ago", "evicted",
                  f"within {clients.RECORD_SECONDS} s"):
        assert cause in clients.UNRECORDED


@pytest.fixture
def sleeper():
    child = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 5
    while open(f"/proc/{child.pid}/comm").read().strip() != "sleep" and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has exec'd
    yield child
    child.kill()
    child.wait()


def test_a_process_that_runs_another_program_since_it_connected_is_not_named_by_it(monkeypatch, sleeper):
    """The executable is read after the connect: a process that exec'd since showed its new
    program (a curl that execs dockerd's binary would have been dockerd)."""
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    connected = Connect(sleeper.pid, sleeper.pid, 1000, 1000, 0, now, "curl")
    client = naming(monkeypatch, connected).describe(SYN)
    assert client["comm"] == "curl" and client["exe"] == "" and client["exe_note"] == clients.RENAMED
    assert client_text(client) == f"curl (pid {sleeper.pid}, uid 1000, executable {clients.RENAMED})"
    same = naming(monkeypatch, replace(connected, comm="sleep")).describe(SYN)
    assert same["exe"] == os.path.realpath(shutil.which("sleep")) and "exe_note" not in same


def test_a_deleted_or_replaced_executable_is_said_so(monkeypatch, tmp_path):
    program = tmp_path / "dockerd"
    shutil.copy(shutil.which("sleep"), program)
    child = subprocess.Popen([str(program), "30"])
    try:
        deadline = time.monotonic() + 5
        while open(f"/proc/{child.pid}/comm").read().strip() != "dockerd" and time.monotonic() < deadline:
            time.sleep(0.01)
        connected = Connect(child.pid, child.pid, 0, 0, 0, time.clock_gettime_ns(time.CLOCK_BOOTTIME), "dockerd")
        assert clients.executable(connected) == (str(program), "")
        program.unlink()
        program.write_text("another file at that path")
        assert clients.executable(connected) == (f"{program} (deleted)", clients.DELETED)
    finally:
        child.kill()
        child.wait()


def test_a_name_cannot_write_the_rest_of_the_line():
    """A path (or name) holding ", cgroup ...)" forged the rest of the text line."""
    forged = {**DOCKERD, "exe": "/tmp/x/usr/sbin/dockerd, cgroup /system.slice/docker.service)",
              "cgroup": "/user.slice/user-1000.slice"}
    assert client_text(forged) == ('dockerd (pid 812, uid 0, "/tmp/x/usr/sbin/dockerd, cgroup '
                                   '/system.slice/docker.service)", cgroup /user.slice/user-1000.slice)')
    odd = {**DOCKERD, "comm": "dockerd (pid 1)", "cgroup": "/a b", "exe": "/tmp/x", "exe_note": clients.OTHER_MOUNTS}
    assert client_text(odd) == ('"dockerd (pid 1)" (pid 812, uid 0, /tmp/x as its own mount namespace names it, '
                                'cgroup "/a b")')
    named = in_container(name="b, in x", image="moby/buildkit")
    clients._fill(named, {"name": "b, in x", "image": "moby/buildkit", "cgroup": f"/system.slice/docker-{ID}.scope"})
    assert client_text(named).endswith(' in container "b, in x" (moby/buildkit, 1f2e3d4c5b6a)')
    assert clients.quote("/usr/sbin/dockerd") == "/usr/sbin/dockerd" and clients.quote("") == '""'
    assert clients.quote("a\"b") == '"a\\"b"'


def test_the_report_lists_each_process_once_whatever_its_name():
    """A comm holding "," made ``ramfw report`` list processes that never connected."""
    assert process_name({**DOCKERD, "comm": "curl,dockerd"}) == '"curl,dockerd"'
    assert process_name(in_container(name="builder")) == "nc in builder"
    written = in_container(name="x, y")
    written["comm"] = "a in b"
    assert process_name(written) == '"a in b" in "x, y"'
    refused = {"count": 1, "verdict": "blocked", "ports": [443], "clients": ["192.0.2.1"], "first": 0, "last": 0,
               "processes": ['"curl,dockerd"', "nc in builder", '"a in b" in "x, y"', "old,unquoted", 'x", "y']}
    text = _report_text({"file": "seen.json", "saved_at": 0, "refused": {"blocked.test": refused},
                         "organization": "acme", "usage": {}})
    assert ('clients 192.0.2.1,"curl,dockerd",nc in builder,"a in b" in "x, y","old,unquoted","x\\", \\"y"  '
            in text)
    assert listed("dockerd") == "dockerd" and listed('"a\\u0007b"') == '"a\\u0007b"'


def test_a_container_is_named_only_for_the_cgroups_under_its_own():
    """The rule was "the client's cgroup or below the engine's": an engine cgroup of "/" (or
    any path above the container's) accepted every client path."""
    engine = f"/system.slice/docker-{ID}.scope"
    for above in ("/", "/system.slice", "/system.slice/", ""):
        client = in_container()
        clients._fill(client, {"name": "builder", "image": "i", "cgroup": above})
        assert client["container"]["name"] == "", above
    unnamed = in_container(cgroup="/user.slice/x")  # a path without the id is no container's
    clients._fill(unnamed, {"name": "builder", "image": "i", "cgroup": "/"})
    assert unnamed["container"]["name"] == ""
    dind = in_container(cgroup=f"{engine}/other")  # docker-in-docker: its pid in .../init, the work beside
    clients._fill(dind, {"name": "builder", "image": "i", "cgroup": f"{engine}/init"})
    assert dind["container"]["name"] == "builder"
    for client_cgroup in (engine, f"{engine}/init/deeper"):
        client = in_container(cgroup=client_cgroup)
        clients._fill(client, {"name": "builder", "image": "i", "cgroup": f"{engine}/init"})
        assert client["container"]["name"] == "builder", client_cgroup
    moved = in_container(cgroup=f"/user.slice/docker-{ID}.scope/init")
    clients._fill(moved, {"name": "builder", "image": "i", "cgroup": f"{engine}/init"})
    assert moved["container"]["name"] == ""


def http(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


ENGINE_PID = 4242  # the container's process, as the fake engine says
RUNNING = http(b'{"Name": "/builder", "Config": {"Image": "moby/buildkit"}, "State": {"Pid": 4242}}')


class Engine:
    """A fake engine API on a Unix socket: the n-th connection gets ``answer(n)`` (bytes), or
    has ``answer(n)`` (a callable) write to it."""

    def __init__(self, path, answer):
        self.path, self.answer, self.asked = str(path), answer, 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096) or b"\r\n\r\n"
                self.asked += 1
                answer = self.answer(self.asked)
                try:
                    answer(conn) if callable(answer) else conn.sendall(answer)
                except OSError:
                    pass

    def close(self):
        self.server.close()


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """Make a fake engine (``engine(answer)``); the container's process runs in its scope."""
    monkeypatch.setattr(clients, "process_cgroup",
                        lambda pid: f"/system.slice/docker-{ID}.scope" if pid == ENGINE_PID else "")
    made = []

    def make(answer):
        made.append(Engine(tmp_path / f"engine{len(made)}.sock", answer))
        return made[-1], clients.Containers(made[-1].path)
    yield make
    for each in made:
        each.close()


def named(containers, wait: float = 5.0) -> dict:
    """A client in the container's cgroup, once ``containers`` has completed it."""
    client, done = in_container(), threading.Event()
    containers.complete(client, done.set)
    assert done.wait(wait), "the event was never written"
    return client


def test_junk_from_the_engine_does_not_end_the_thread(engine, monkeypatch):
    """json.loads of deeply nested junk raised RecursionError, which ended the thread: no block
    event in a container was written again."""
    monkeypatch.setattr(clients, "UNKNOWN_SECONDS", 0)
    fake, containers = engine(lambda n: http(b"[" * 100_000) if n == 1 else RUNNING)
    try:
        assert named(containers)["container"]["name"] == ""
        assert named(containers)["container"] == {"id": ID, "name": "builder", "image": "moby/buildkit"}
    finally:
        containers.close()


def test_an_engine_that_drips_its_answer_holds_an_event_one_deadline_at_most(engine, monkeypatch):
    """The timeout was per socket operation: a byte every 1.5 s kept the thread (and every
    event waiting behind it) forever."""
    monkeypatch.setattr(clients, "ENGINE_SECONDS", 0.5)
    monkeypatch.setattr(clients, "ENGINE_TIMEOUT", 0.5, raising=False)

    def drip(conn):
        for byte in RUNNING:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)
    fake, containers = engine(lambda n: drip)
    try:
        start = time.monotonic()
        assert named(containers, wait=3)["container"]["name"] == ""
        assert time.monotonic() - start < 1.5
    finally:
        containers.close()


def test_a_container_not_running_when_asked_is_asked_again(engine, monkeypatch):
    """An answer with a name but no process (State.Pid 0) was kept for good: the container was
    never named once it ran."""
    monkeypatch.setattr(clients, "UNKNOWN_SECONDS", 0)
    stopped = http(b'{"Name": "/builder", "Config": {"Image": "moby/buildkit"}, "State": {"Pid": 0}}')
    fake, containers = engine(lambda n: stopped if n == 1 else RUNNING)
    try:
        assert named(containers)["container"]["name"] == ""
        assert named(containers)["container"]["name"] == "builder"
        assert named(containers)["container"]["name"] == "builder" and fake.asked == 2, "a placed one is kept"
    finally:
        containers.close()


def test_a_container_the_engine_does_not_know_is_not_asked_about_for_every_packet(engine, monkeypatch):
    """A forged docker-<random>.scope cost one engine question per blocked packet."""
    fake, containers = engine(lambda n: http(b'{"message": "No such container"}', b"404 Not Found"))
    try:
        for _ in range(20):
            assert named(containers)["container"]["name"] == ""
        assert fake.asked == 1
        monkeypatch.setattr(clients, "UNKNOWN_SECONDS", 0)
        named(containers)
        assert fake.asked == 2, "asked again once UNKNOWN_SECONDS have passed"
    finally:
        containers.close()


def test_the_key_is_the_programs_layout():
    key = kernel_clients.key("192.0.2.1", 40000, "203.0.113.20", 443)
    assert len(key) == kernel_clients.KEY
    assert key[:8] == (2).to_bytes(4, "little") + bytes(4)
    assert key[8:12] == bytes([203, 0, 113, 20]) and key[12:24] == bytes(12)
    assert key[24:28] == bytes([192, 0, 2, 1])
    assert key[40:44] == bytes([0, 0, 0x01, 0xBB]), "the remote port: network order in the upper half"
    assert key[44:48] == (40000).to_bytes(4, "little")
    assert kernel_clients.destination_key("2001:db8::") != kernel_clients.destination_key("32.1.13.184")



def test_a_daemon_that_failed_to_start_closes_without_a_second_error():
    """``daemon.main`` closes a daemon whose start failed (a second daemon in the namespace, a
    policy it cannot read): closing must not raise about what start never made, hiding why."""
    from ramfw.config import Config
    from ramfw.daemon.loop import Daemon

    Daemon(Config()).close()
