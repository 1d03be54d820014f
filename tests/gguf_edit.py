"""Damaging a copy of a GGUF the way a bad build or a bad disk would, in place, without gguf-py's
GGUFReader: it builds a numpy view per tokenizer string (about half a minute per text GGUF here),
where the edits below need one offset from compiler.ggufcheck's table walk."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

from compiler.ggufcheck import read_layout


def flip_tensor_bytes(src: Path, dst: Path, tensor: str, start: int = 64, n: int = 8) -> None:
    """dst: a copy of src with bytes [start, start+n) of `tensor`'s data XORed with 0x5A."""
    layout = read_layout(src)
    (t,) = [t for t in layout["tensors"] if t["name"] == tensor]
    assert start + n <= t["n_bytes"], (tensor, t["n_bytes"])
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(layout["data_start"] + t["offset"] + start)
        old = f.read(n)
        f.seek(-n, 1)
        f.write(bytes(b ^ 0x5A for b in old))


def zero_tensor(path: Path, tensor: str) -> None:
    """Every byte of `tensor`'s data set to zero, in place (0 is 0.0 in F32, F16 and BF16)."""
    layout = read_layout(path)
    (t,) = [t for t in layout["tensors"] if t["name"] == tensor]
    with open(path, "r+b") as f:
        f.seek(layout["data_start"] + t["offset"])
        f.write(bytes(t["n_bytes"]))


def set_uint32_array(path: Path, key: str, values: list[int]) -> None:
    """Overwrite the values of the uint32/int32 metadata array `key` in place (same length)."""
    header = _header(path)
    at = _value_at(header, key)
    vtype, etype, count = struct.unpack_from("<IIQ", header, at)
    assert vtype == 9 and etype in (4, 5) and count == len(values), (key, vtype, etype, count)
    with open(path, "r+b") as f:
        f.seek(at + 16)
        f.write(struct.pack(f"<{count}{'I' if etype == 4 else 'i'}", *values))


def _header(path: Path) -> bytes:
    """The GGUF's header and metadata, up to the tensor data's alignment padding."""
    with open(path, "rb") as f:
        return f.read(read_layout(path)["header_end"])


def _value_at(header: bytes, key: str) -> int:
    """Where `key`'s value (its type field) starts in a GGUF header."""
    name = key.encode()
    return header.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


def change_first_string(path: Path, key: str) -> str:
    """Change one character of the first string of the string-array metadata `key` (the tokenizer's
    first token, say) in place, keeping its length; returns the new string."""
    header = _header(path)
    at = _value_at(header, key)
    vtype, etype, count = struct.unpack_from("<IIQ", header, at)
    assert vtype == 9 and etype == 8 and count > 0, (key, vtype, etype, count)
    (n,) = struct.unpack_from("<Q", header, at + 16)
    old = header[at + 24:at + 24 + n]
    new = bytes([old[0] ^ 0x01]) + old[1:]  # ASCII stays ASCII
    with open(path, "r+b") as f:
        f.seek(at + 24)
        f.write(new)
    return new.decode("utf-8", "replace")
