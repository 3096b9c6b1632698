"""A small typed reader of kernel BTF (/sys/kernel/btf/vmlinux): struct member offsets and
tracepoint prototypes of the *running* kernel, so the BPF program can read kernel structs with
offsets passed in as -D cflags instead of trusting the build headers' layouts (ours are 6.1's).

Only what memwatch needs: find a struct by name, resolve a member path ("css.cgroup") to a byte
offset (anonymous unions/structs followed), and describe the arguments of a raw tracepoint
(`btf_trace_<name>` typedef -> pointer -> func proto). Format: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Btf", "BtfError", "BtfMember", "BtfType", "load_btf", "VMLINUX_BTF"]

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic version flags hdr_len type_off type_len str_off len
_TYPE = struct.Struct("<III")  # name_off info size_or_type

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

# Bytes following struct btf_type: a fixed size, or per vlen entry.
_FIXED_TAIL = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_VLEN = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BtfError(Exception):
    """BTF is missing, malformed, or lacks a type/member memwatch needs."""


@dataclass(frozen=True, slots=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True, slots=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int  # size for INT/STRUCT/UNION/ENUM, referenced type id for PTR/TYPEDEF/...
    members: tuple[BtfMember, ...] = ()  # STRUCT/UNION members, FUNC_PROTO params (offset 0)


class Btf:
    """Parsed BTF: types by id (1-based) and an index of named structs/typedefs."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF blob shorter than its header")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = (
            _HEADER.unpack_from(data)
        )
        if magic != _MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        types_at = hdr_len + type_off
        strings_at = hdr_len + str_off
        if types_at + type_len > len(data) or strings_at + str_len > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        strings = data[strings_at : strings_at + str_len]

        def name_at(off: int) -> str:
            end = strings.find(b"\0", off)
            return strings[off:end].decode("ascii", "replace")

        self.types: list[BtfType] = [BtfType(0, "void", 0)]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = types_at, types_at + type_len
        while pos < end:
            name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
            pos += _TYPE.size
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kind_flag = info >> 31
            members: tuple[BtfMember, ...] = ()
            if kind in (STRUCT, UNION):
                entries = []
                for i in range(vlen):
                    m_name, m_type, m_off = _TYPE.unpack_from(data, pos + 12 * i)
                    bit_offset = m_off & 0xFFFFFF if kind_flag else m_off
                    entries.append(BtfMember(name_at(m_name), m_type, bit_offset))
                members = tuple(entries)
            elif kind == FUNC_PROTO:
                members = tuple(
                    BtfMember(name_at(p_name), p_type, 0)
                    for p_name, p_type in struct.iter_unpack("<II", data[pos : pos + 8 * vlen])
                )
            if kind in _PER_VLEN:
                pos += _PER_VLEN[kind] * vlen
            elif kind in _FIXED_TAIL:
                pos += _FIXED_TAIL[kind]
            elif kind not in (PTR, FWD, FUNC, FLOAT) and kind not in _MODIFIERS:
                raise BtfError(f"unknown BTF kind {kind} at type {len(self.types)}")
            name = name_at(name_off)
            if name:
                self._by_name.setdefault((kind, name), len(self.types))
            self.types.append(BtfType(kind, name, size_or_type, members))

    def find(self, kind: int, name: str) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BtfError(f"no BTF type {name!r} (kind {kind})") from None

    def resolve(self, type_id: int) -> int:
        """Skip typedefs and qualifiers."""
        while self.types[type_id].kind in _MODIFIERS:
            type_id = self.types[type_id].size_or_type
        return type_id

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a.b.c") inside `struct struct_name`."""
        type_id = self.find(STRUCT, struct_name)
        offset_bits = 0
        for name in path.split("."):
            found = self._find_member(type_id, name)
            if found is None:
                raise BtfError(f"struct {struct_name}: no member {path!r} (at {name!r})")
            bits, type_id = found
            offset_bits += bits
        if offset_bits % 8:
            raise BtfError(f"struct {struct_name}.{path} is a bitfield")
        return offset_bits // 8

    def _find_member(self, type_id: int, name: str) -> tuple[int, int] | None:
        t = self.types[self.resolve(type_id)]
        if t.kind not in (STRUCT, UNION):
            return None
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m.type_id
        for m in t.members:  # anonymous struct/union members
            if not m.name:
                inner = self._find_member(m.type_id, name)
                if inner is not None:
                    return m.bit_offset + inner[0], inner[1]
        return None

    def type_name(self, type_id: int) -> str:
        """A C-ish spelling of a type: 'struct mem_cgroup *', 'int', 'long unsigned int'."""
        t = self.types[type_id]
        if t.kind == PTR:
            return self.type_name(t.size_or_type) + " *"
        if t.kind in (CONST, VOLATILE, RESTRICT, TYPE_TAG):
            return self.type_name(t.size_or_type)
        if t.kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            prefix = {STRUCT: "struct ", UNION: "union "}.get(t.kind, "enum ")
            return prefix + t.name
        return t.name or "void"

    def raw_tracepoint_args(self, name: str) -> Sequence[str]:
        """The argument types of raw tracepoint `name`, without the leading `void *__data`."""
        typedef = self.types[self.find(TYPEDEF, f"btf_trace_{name}")]
        ptr = self.types[typedef.size_or_type]
        if ptr.kind != PTR or self.types[ptr.size_or_type].kind != FUNC_PROTO:
            raise BtfError(f"btf_trace_{name} is not a function pointer")
        params = self.types[ptr.size_or_type].members
        return [self.type_name(p.type_id) for p in params[1:]]

    def type_size(self, type_id: int) -> int:
        t = self.types[self.resolve(type_id)]
        if t.kind == PTR:
            return 8
        if t.kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return t.size_or_type
        raise BtfError(f"type {type_id} has no size")

    def member_size(self, struct_name: str, path: str) -> int:
        type_id = self.find(STRUCT, struct_name)
        for name in path.split("."):
            found = self._find_member(type_id, name)
            if found is None:
                raise BtfError(f"struct {struct_name}: no member {path!r}")
            type_id = found[1]
        return self.type_size(type_id)


def load_btf(path: Path = VMLINUX_BTF) -> Btf:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BtfError(f"{path}: {e.strerror}") from e
    return Btf(data)
