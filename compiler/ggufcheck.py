"""Checking a GGUF file's structure without loading its weights (gguf-py's GGUFReader maps the
file and parses only the header, metadata and tensor table)."""
from __future__ import annotations

from pathlib import Path

from .errors import ForgeError

GGUF_MAGIC = b"GGUF"


def check(path: Path, what: str = "GGUF") -> dict:
    """Refuse a truncated or corrupted GGUF with a message naming the file and the fault.

    Returns a small summary: architecture, tensor count, file type and size."""
    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{what} not found", where=str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ForgeError(f"{what} is not a GGUF file (bad magic)", where=str(path),
                         found=repr(magic), allowed=repr(GGUF_MAGIC))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on damage
        raise ForgeError(f"{what} is corrupted or truncated: cannot read its header ({type(e).__name__}: {e})",
                         where=str(path), found=f"{size} bytes") from None
    end = 0
    last = None
    for t in reader.tensors:
        stop = int(t.data_offset) + int(t.n_bytes)
        if stop > end:
            end, last = stop, t.name
    if end > size:
        raise ForgeError(f"{what} is truncated: tensor {last} ends at byte {end}",
                         where=str(path), found=f"{size} bytes", allowed=f"at least {end} bytes")

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:
            return None

    return {"architecture": field("general.architecture"), "file_type": field("general.file_type"),
            "tensors": len(reader.tensors), "size": size}
