"""The kernel's BTF, read for struct member offsets (the client recorder on older kernels)."""

import struct

import pytest

from ramfw.kernel import btf


def blob(types: list[bytes], strings: bytes) -> bytes:
    body = b"".join(types)
    return struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(body), len(body), len(strings)) + body + strings


def kind(k: int, vlen: int, flag: int = 0) -> int:
    return (flag << 31) | (k << 24) | vlen


STRINGS = b"\0int\0task_struct\0pid\0tgid\0comm\0inner\0"
NAME = {name: STRINGS.index(b"\0" + name.encode() + b"\0") + 1 for name in ("int", "task_struct", "pid", "tgid", "comm", "inner")}


def sample() -> bytes:
    return blob([
        struct.pack("<IIII", NAME["int"], kind(1, 0), 4, 32),                      # 1: int
        struct.pack("<III", NAME["inner"], kind(8, 0), 4),                         # 2: typedef inner -> 4
        struct.pack("<III", NAME["task_struct"], kind(4, 0), 0),                   # 3: a forward declaration
        struct.pack("<III", 0, kind(4, 2), 8)                                      # 4: anonymous struct
        + struct.pack("<III", NAME["pid"], 1, 0) + struct.pack("<III", NAME["tgid"], 1, 32),
        struct.pack("<III", NAME["task_struct"], kind(4, 2, flag=1), 1800)         # 5: the definition
        + struct.pack("<III", NAME["comm"], 1, 1752 * 8) + struct.pack("<III", 0, 2, 1264 * 8),
    ], STRINGS)


def test_members_are_found_through_anonymous_members_and_typedefs():
    types = btf.Types(sample())
    assert types.offset("task_struct", "comm") == 1752
    assert types.offset("task_struct", "pid") == 1264 and types.offset("task_struct", "tgid") == 1268


def test_what_is_missing_is_said():
    types = btf.Types(sample())
    with pytest.raises(btf.BtfError, match="no member cred of struct task_struct"):
        types.offset("task_struct", "cred")
    with pytest.raises(btf.BtfError, match="no struct cred"):
        types.offset("cred", "uid")
    with pytest.raises(btf.BtfError, match="not BTF"):
        btf.Types(b"\0" * 64)
    with pytest.raises(btf.BtfError, match="No such file"):
        btf.load(btf.Path("/nonexistent/vmlinux"))


@pytest.mark.skipif(not btf.VMLINUX.exists(), reason="this kernel has no /sys/kernel/btf/vmlinux")
def test_the_running_kernels_task_fields_are_found():
    from ramfw.kernel.clients import TaskOffsets

    offsets = TaskOffsets.from_btf(btf.load())
    assert offsets.tgid == offsets.pid + 4, "pid_t pid; pid_t tgid; next to each other since 2.6"
