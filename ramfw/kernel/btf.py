"""The kernel's own type information (BTF, ``/sys/kernel/btf/vmlinux``): where a struct's
members are, for programs that read kernel memory on kernels whose helpers do not give it.

Only what the client recorder needs: a struct's member offsets, found by name, through the
anonymous structs and unions a layout may nest them in (``CONFIG_RANDSTRUCT``). The format is
the kernel's (Documentation/bpf/btf.rst): a header, the types one after another, a string
section. bcc and libbpf read it too, but neither is on LinuxKit or WSL2, and what is needed
here is a loop over records of fixed sizes.
"""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F
KIND_STRUCT, KIND_UNION = 4, 5
# What follows each type's 12-byte header, by kind: a fixed size, or a size per vlen item
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0), 15: (0, 12),
          17: (4, 0), 19: (0, 12)}


class BtfError(Exception):
    pass


class Types:
    """The structs and unions of a BTF blob: ``offset("task_struct", "tgid")`` in bytes."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x}; a big-endian kernel's?)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._composites: dict[int, list[tuple[str, int, int]]] = {}  # type id -> (name, type id, bit offset)
        self._by_name: dict[str, int] = {}
        self._resolve: dict[int, int] = {}  # typedef, const, volatile, ... -> what they name
        position, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
        while position < end:
            name_off, info, size_or_type = struct.unpack_from("<III", data, position)
            kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            position += 12
            if kind in (KIND_STRUCT, KIND_UNION):
                members = []
                for index in range(vlen):
                    m_name, m_type, m_offset = struct.unpack_from("<III", data, position + 12 * index)
                    members.append((self._name(m_name), m_type, m_offset & 0xFFFFFF if kind_flag else m_offset))
                self._composites[type_id] = members
                name = self._name(name_off)
                if name and name not in self._by_name and vlen:  # the definition, not a forward one
                    self._by_name[name] = type_id
            elif kind in (8, 9, 10, 11, 18):  # typedef, volatile, const, restrict, type tag
                self._resolve[type_id] = size_or_type
            fixed, per_item = _EXTRA.get(kind, (0, 0))
            position += fixed + per_item * vlen
            type_id += 1

    def _name(self, offset: int) -> str:
        end = self._strings.find(b"\0", offset)
        return self._strings[offset:end].decode(errors="replace") if end >= 0 else ""

    def offset(self, struct_name: str, member: str) -> int:
        """A member's byte offset in a struct (searched through anonymous members)."""
        type_id = self._by_name.get(struct_name)
        if type_id is None:
            raise BtfError(f"no struct {struct_name} in the kernel's BTF")
        found = self._find(type_id, member)
        if found is None or found % 8:
            raise BtfError(f"no member {member} of struct {struct_name} in the kernel's BTF")
        return found // 8

    def _find(self, type_id: int, member: str) -> int | None:
        for name, m_type, bits in self._composites.get(type_id, []):
            if name == member:
                return bits
            if not name:  # an anonymous struct or union: its members are the parent's
                inner = m_type
                while inner in self._resolve:
                    inner = self._resolve[inner]
                found = self._find(inner, member)
                if found is not None:
                    return bits + found
        return None


def load(path: Path | None = None) -> Types:
    """The running kernel's BTF (or the one at ``path``)."""
    path = path or VMLINUX
    try:
        return Types(path.read_bytes())
    except OSError as err:
        raise BtfError(f"{path}: {err.strerror}") from None
