"""Checking a GGUF file's structure without loading its weights.

gguf-py's GGUFReader builds a numpy view per array element, which takes about half a minute for a
Qwen3.5 tokenizer (248k tokens plus as many merges). A structural check needs much less: walk the
header, metadata and tensor table with struct, then check that every tensor's data lies inside the
file. Type sizes come from gguf-py's own tables.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import ForgeError

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> struct format for the scalar ones (gguf spec, GGUFValueType).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated(self.pos)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> bytes:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise _Truncated(self.pos)
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(s)

    def skip_value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype]) * count
                if self.pos + size > len(self.buf):
                    raise _Truncated(self.pos)
                self.pos += size
            elif etype == _STRING:
                # The tokenizer's 248k tokens and as many merges: every planning and lock step walks
                # them, so the loop is kept to one unpack per string; a length that runs past the end
                # shows as struct.error (the next length cannot be read) or in the check below.
                pos, buf, length = self.pos, self.buf, _U64.unpack_from
                try:
                    for _ in range(count):
                        pos += 8 + length(buf, pos)[0]
                except struct.error:
                    raise _Truncated(self.pos) from None
                if pos > len(buf):
                    raise _Truncated(self.pos)
                self.pos = pos
            else:
                for _ in range(count):
                    self.skip_value(etype)
            return None
        raise ValueError(f"unknown metadata value type {vtype}")


def read_layout(path: Path, arrays: bool = False, numbers: tuple[str, ...] = ()) -> dict:
    """Metadata scalars/strings and the tensor table of a GGUF file; raises on damage. With
    `arrays`, array values appear too, as ("array", element count, sha256 of their raw bytes):
    enough to tell two tokenizers apart without decoding 248k strings. The arrays of numbers whose
    keys end with one of `numbers` (".rope.dimension_sections") appear as lists of their values."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = Path(path).stat().st_size
        if size < 24:
            raise _Truncated(0)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf)
            magic = bytes(buf[:4])
            if magic != GGUF_MAGIC:
                raise ValueError(f"bad magic {magic!r}")
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            meta = {}
            for _ in range(n_kv):
                key = cur.string().decode("utf-8", "replace")
                vtype = cur.take("I")
                start = cur.pos
                value = cur.skip_value(vtype)
                if numbers and key.endswith(numbers) and vtype == _ARRAY:
                    etype, count = struct.unpack_from("<IQ", buf, start)
                    if etype in _SCALARS:
                        meta[key] = list(struct.unpack_from(f"<{count}{_SCALARS[etype]}", buf, start + 12))
                elif arrays and vtype == _ARRAY:
                    import hashlib

                    count = struct.unpack_from("<Q", buf, start + 4)[0]
                    meta[key] = ("array", count, hashlib.sha256(buf[start:cur.pos]).hexdigest())
                elif value is not None:
                    meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            tensors = []
            for _ in range(n_tensors):
                name = cur.string().decode("utf-8", "replace")
                n_dims = cur.take("I")
                dims = [cur.take("Q") for _ in range(n_dims)]
                ttype, offset = cur.take("I"), cur.take("Q")
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                count = 1
                for d in dims:
                    count *= d
                tensors.append({"name": name, "type": GGMLQuantizationType(ttype).name, "dims": dims,
                                "offset": offset, "n_bytes": count // block * type_size})
            align = int(meta.get("general.alignment", 32))
            header_end = cur.pos
            data_start = (header_end + align - 1) // align * align
    return {"meta": meta, "tensors": tensors, "header_end": header_end, "data_start": data_start, "size": size}


def check(path: Path, what: str = "GGUF") -> dict:
    """Refuse a truncated or corrupted GGUF with a message naming the file and the fault.

    Returns a small summary: architecture, tensor count, file type and size."""
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{what} not found", where=str(path))
    size = path.stat().st_size
    try:
        layout = read_layout(path)
    except _Truncated as e:
        raise ForgeError(f"{what} is truncated: its header ends at byte {e.args[0]}", where=str(path),
                         found=f"{size} bytes") from None
    except (ValueError, KeyError, UnicodeDecodeError, struct.error) as e:
        raise ForgeError(f"{what} is corrupted: {e}", where=str(path), found=f"{size} bytes",
                         allowed="a GGUF v2/v3 file") from None
    end, last = 0, None
    for t in layout["tensors"]:
        stop = layout["data_start"] + t["offset"] + t["n_bytes"]
        if stop > end:
            end, last = stop, t["name"]
    if end > size:
        raise ForgeError(f"{what} is truncated: tensor {last} ends at byte {end}",
                         where=str(path), found=f"{size} bytes", allowed=f"at least {end} bytes")
    meta = layout["meta"]
    return {"architecture": meta.get("general.architecture"), "file_type": meta.get("general.file_type"),
            "tensors": len(layout["tensors"]), "size": size}
