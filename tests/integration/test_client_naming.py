"""What a client can make a block event say about it (issue #11, part 1, the security review):
a record of an old connect() is not pinned on a later packet, a process that runs another
program since it connected is not named by that program, a path its own mount namespace gives
its executable is said to be one, the uid is always in the text, and cgroups are named by
their handle, not by a walk a user with many cgroups can exhaust."""

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from ramfw.daemon import clients
from ramfw.kernel import bpf
from tests.integration.test_forged_replies import forged_syn, send_raw
from tests.lab.sandbox import BLOCKED4, VM4

CURL_ARGS = ("-s", "-o", "/dev/null", "--retry", "3", "--retry-connrefused", "--retry-delay", "1",
             "--resolve", f"blocked-registry.test:443:{BLOCKED4}", "https://blocked-registry.test/v2/")


def ended(process) -> None:
    process.kill()
    process.wait()


def blocks_of(daemon_log, client) -> list[dict]:
    """The block events that name ``client``'s pid (it is ended once they are read)."""
    try:
        blocks = daemon_log(lambda b: b["client"].get("pid") == client.pid)
    finally:
        ended(client)
    assert blocks, daemon_log()
    return blocks


def test_a_record_of_an_old_connect_is_not_pinned_on_a_later_packet(lab, daemon_log):
    """The recorder keeps a connection's record until newer ones evict it: a forged SYN that
    copies its addresses and ports (or a port reused) seconds later was named as its client."""
    port = 41000 + os.getpid() % 1000
    with lab.vm.inside():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((VM4, port))
        sock.settimeout(3)
        with pytest.raises(ConnectionRefusedError):
            sock.connect((BLOCKED4, 443))
    assert daemon_log(lambda b: b["client"].get("pid") == os.getpid()), "the real connect is named"
    time.sleep(clients.RECORD_SECONDS + 0.5)
    with pytest.raises(PermissionError):  # refused in the output hook
        send_raw(lab.vm, forged_syn(VM4, BLOCKED4, port), BLOCKED4)
    later = daemon_log(lambda b: not b["client"].get("recorded"))
    assert later, daemon_log()
    assert later[0]["client"] == {"recorded": False, "why": clients.UNRECORDED}
    assert later[0]["port"] == 443 and " by " not in later[0]["message"]


def test_a_client_that_runs_another_program_since_it_connected_is_not_named_by_it(lab, daemon_log):
    """/proc/<pid>/exe is read after the connect: a process that exec'd since showed its new
    program. The daemon is stopped meanwhile, so that it reads /proc after the exec."""
    script = ("import os, socket\nsock = socket.socket()\ntry:\n"
              f"    sock.connect(({BLOCKED4!r}, 443))\nexcept OSError:\n    pass\n"
              f"os.execv({shutil.which('sleep')!r}, ['sleep', '10'])\n")
    os.kill(daemon_log.daemon.pid, signal.SIGSTOP)
    try:
        client = lab.vm.popen(sys.executable, "-c", script)
        deadline = time.monotonic() + 3
        while Path(f"/proc/{client.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(daemon_log.daemon.pid, signal.SIGCONT)
    blocks = blocks_of(daemon_log, client)
    named = blocks[0]["client"]
    assert named["comm"] != "sleep", "the name it connected with, from the kernel's record"
    assert named["exe"] == "" and named["exe_note"] == clients.RENAMED
    assert f"(pid {client.pid}, uid 0, executable {clients.RENAMED}, cgroup " in blocks[0]["message"]


def test_an_executable_path_its_own_mount_namespace_gives_is_said_to_be_one(lab, daemon_log, tmp_path):
    """A user can ``unshare -rm`` and bind-mount any program over a path such as
    /usr/sbin/dockerd: /proc/<pid>/exe then gives that path, which is another file here."""
    decoy = tmp_path / "dockerd"
    decoy.write_text("what ramfw's own mount namespace has at that path\n")
    client = lab.vm.popen("unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount --bind {shutil.which('curl')} {decoy} && exec {decoy} " + " ".join(CURL_ARGS))
    blocks = blocks_of(daemon_log, client)
    named = blocks[0]["client"]
    assert named["comm"] == "dockerd" and named["exe"] == str(decoy)
    assert named["exe_note"] == clients.OTHER_MOUNTS
    assert f"by dockerd (pid {client.pid}, uid 0, {decoy} as its own mount namespace names it, cgroup " in \
        blocks[0]["message"]


def test_the_text_gives_the_uid_of_the_client(lab, daemon_log):
    client = lab.vm.popen("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", *CURL_ARGS)
    try:
        blocks = daemon_log(lambda b: b["client"].get("pid") == client.pid)
    finally:
        ended(client)
    assert blocks, daemon_log()
    assert blocks[0]["client"]["uid"] == 65534 and blocks[0]["client"]["comm"] == "curl"
    assert f"by curl (pid {client.pid}, uid 65534, " in blocks[0]["message"]


def test_a_cgroup_is_named_by_its_handle_without_walking_the_tree(lab, monkeypatch):
    """The walk (bounded at MAX_CGROUPS directories) left a cgroup unnamed, for good, where a
    user's delegated subtree held more; the kernel opens a cgroup by its id in one call."""
    parent = lab.cgroup("naming")
    if parent is None:
        pytest.skip("no cgroup v2 hierarchy")
    inner = parent / "inner"
    inner.mkdir()
    mount = bpf.cgroup2_mount()
    monkeypatch.setattr(clients, "MAX_CGROUPS", 0)  # as if exhausted
    try:
        assert clients.find_cgroup(mount, parent.stat().st_ino) == f"/{parent.name}"
        assert clients.find_cgroup(mount, inner.stat().st_ino) == f"/{parent.name}/inner"
        assert clients.CgroupPaths(mount).path(inner.stat().st_ino) == f"/{parent.name}/inner"
        gone = inner.stat().st_ino
    finally:
        inner.rmdir()
    monkeypatch.setattr(clients, "walk_cgroups", lambda *args: pytest.fail("a removed cgroup is not walked for"))
    assert clients.find_cgroup(mount, gone) == ""
