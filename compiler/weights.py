"""Source checks that run on a checkpoint folder before anything is converted or quantized.

Two refusals, both cheaper than the conversion they save:

- check_config: the folder is a Qwen3.5 vision checkpoint the pinned llama.cpp can carry whole
  (architecture, vision tower, no deepstack layers the text side would drop).
- scan: every floating tensor holds only finite values an f16 can hold. The F16 reference
  conversion stores weights as fp16 and every k-quant stores its block scales as fp16, so a weight
  above 65504 becomes inf there; published Qwen3.5 conversions shipped tensors with 1e19..1e36
  values that nothing downstream noticed until the model talked nonsense.

The scan reads the safetensors headers by hand (as preservation.py does) and streams the data one
tensor at a time through one reusable buffer, so a 55 GB checkpoint costs a few MB of memory."""
from __future__ import annotations

import json
import re
import math
import os
import struct
import time
from pathlib import Path

import numpy as np

from .errors import ForgeError

# Architectures forge builds. The pinned converter registers both the text model
# (conversion/qwen.py Qwen3_5TextModel) and the projector (conversion/qwen3vl.py
# Qwen3VLVisionModel) under this name; list another here only once both halves exist for it.
ALLOWED_ARCHITECTURES = ("Qwen3_5ForConditionalGeneration",)

# Architectures whose deepstack layers survive conversion end to end in the pinned llama.cpp
# (compiler/toolchain.py LLAMA_CPP_COMMIT, vendored in vendor/llama.cpp). For Qwen3.5 they do not:
#   - the projector half would carry them: conversion/qwen3vl.py Qwen3VLVisionModel, registered
#     for Qwen3_5ForConditionalGeneration, maps visual.deepstack_merger_list.* to v.deepstack.*
#     (modify_tensors) and writes clip.vision.is_deepstack_layers (set_gguf_parameters); mtmd
#     loads them (tools/mtmd/clip.cpp, TN_DEEPSTACK_*), concatenates their features onto the
#     image embedding (tools/mtmd/models/qwen3vl.cpp) and so reports an embedding of
#     n_embd * (1 + n_deepstack) (clip.cpp clip_n_mmproj_embd, PROJECTOR_TYPE_QWEN3VL);
#   - the text half does not: conversion/qwen.py Qwen3_5TextModel never writes
#     n_deepstack_layers (only Qwen3VLTextModel / Qwen3VLMoeTextModel do), and
#     src/models/qwen35.cpp (load_arch_hparams, graph) neither reads the key nor injects
#     deepstack features into its layers, so its n_embd_inp stays n_embd (src/llama-hparams.cpp).
# mtmd_init then refuses the pair ("mismatch between text model (n_embd = ...) and mmproj",
# tools/mtmd/mtmd.cpp) -- or, were that check ever relaxed, the injected features would be lost.
# Qwen3-VL carries them end to end (src/models/qwen3vl.cpp), but forge does not build it.
DEEPSTACK_CARRIED: frozenset[str] = frozenset()

F16_MAX = 65504.0  # the largest finite fp16: the F16 reference and k-quant block scales
MAX_REPORTED = 20  # offending tensors named in one refusal; the rest are counted
CHUNK_BYTES = 4 << 20  # one read: big enough to amortise Python, small enough to stay in cache

# Floating dtypes as safetensors names them -> (item size, signed and unsigned integer views of
# the same bits). The check works on the bits: see _limit_bits.
FLOAT_DTYPES = {
    "BF16": (2, np.int16, np.uint16),
    "F16": (2, np.int16, np.uint16),
    "F32": (4, np.int32, np.uint32),
    "F64": (8, np.int64, np.uint64),
}
# Sizes of the other dtypes, so a header's byte ranges can be checked against its shapes.
OTHER_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                     "U16": 2, "I16": 2, "U32": 4, "I32": 4, "U64": 8, "I64": 8}


# --- config.json -------------------------------------------------------------------------------

def dotted(config: dict, key: str):
    """config["a"]["b"] for key "a.b"; None where any part is missing."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_promised(folder: Path, promised: dict, base_model: str = "the alloy") -> None:
    """Refuse a config.json that is not the checkpoint the alloy names: each promised value
    (plan.promised_config: dotted key -> value) as config.json holds it."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    wrong = []
    for key, want in promised.items():
        value = dotted(config, key)
        if value != want:
            wrong.append((key, value, want))
    if wrong:
        key, value, want = wrong[0]
        raise ForgeError(f"config.json is not the checkpoint {base_model} names: {len(wrong)} value(s) differ "
                         f"({', '.join(k for k, _, _ in wrong)})", where=f"{path} $.{key}",
                         found=json.dumps(value), allowed=json.dumps(want),
                         hint="check the alloy's source (baseModel, revision, localPath) and architecture")


def check_config(folder: Path) -> dict:
    """Refuse a config.json forge cannot convert whole; return what the later stages need to know."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ForgeError("the checkpoint has no config.json", where=str(Path(folder)))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForgeError(f"config.json is not valid JSON: {e}", where=str(path)) from None
    if not isinstance(config, dict):
        raise ForgeError("config.json is not a JSON object", where=f"{path} $", found=type(config).__name__)

    archs = config.get("architectures")
    known = [a for a in archs if a in ALLOWED_ARCHITECTURES] if isinstance(archs, list) else []
    if not known:
        raise ForgeError("config.json names no architecture forge can convert with its vision tower",
                         where=f"{path} $.architectures", found=json.dumps(archs), allowed=ALLOWED_ARCHITECTURES)
    arch = known[0]

    vision = config.get("vision_config")
    if not isinstance(vision, dict) or not vision:
        raise ForgeError("config.json has no vision_config: without it the converter writes no projector",
                         where=f"{path} $.vision_config", found=json.dumps(vision),
                         allowed="an object describing the visual tower (depth, hidden_size, ...)",
                         hint="a text-only Qwen3.5 checkpoint cannot make a native-vision build")

    deepstack = vision.get("deepstack_visual_indexes")
    if deepstack is not None and not isinstance(deepstack, list):
        raise ForgeError("vision_config.deepstack_visual_indexes is not a list",
                         where=f"{path} $.vision_config.deepstack_visual_indexes", found=json.dumps(deepstack))
    if deepstack and arch not in DEEPSTACK_CARRIED:
        raise ForgeError(
            f"{arch} with deepstack layers: the pinned llama.cpp converts their mergers into the "
            "projector but its qwen35 text model has no input for them, so the projector's image "
            "embedding would not fit the text model (mtmd refuses the pair)",
            where=f"{path} $.vision_config.deepstack_visual_indexes", found=json.dumps(deepstack),
            allowed="[] or absent",
            hint="see DEEPSTACK_CARRIED in compiler/weights.py for the converter and mtmd code this rests on")

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    summary = {"architecture": arch, "vision_depth": vision.get("depth"),
               "text_layers": text.get("num_hidden_layers")}
    if text.get("mtp_num_hidden_layers"):
        summary["mtp_layers"] = text["mtp_num_hidden_layers"]
    return summary


# --- tokenizer and chat template ----------------------------------------------------------------

def check_tokenizer(folder: Path) -> dict:
    """The tokenizer the converter writes into the text GGUF, and the chat template it takes, found
    as gguf-py's SpecialVocab finds them: the template from tokenizer_config.json's chat_template,
    else chat_template.jinja, else chat_template.json -- and only where tokenizer_config.json exists.
    Refused before any conversion: without a template the product could not prompt the model the
    way it was trained, and that used to be found at the receipt, after every expensive step."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        raise ForgeError("the checkpoint has no tokenizer the converter can read", where=str(folder),
                         found=sorted(p.name for p in folder.iterdir() if "token" in p.name or "vocab" in p.name),
                         allowed="tokenizer.json, or vocab.json and merges.txt",
                         hint="add them to the alloy's source.allowPatterns")
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        raise ForgeError("the checkpoint has no tokenizer_config.json: the converter then writes no chat template",
                         where=str(folder), hint="add tokenizer_config.json to the alloy's source.allowPatterns")
    try:
        tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ForgeError(f"tokenizer_config.json is not valid JSON: {e}", where=str(config_path)) from None
    template, origin = tok_config.get("chat_template") if isinstance(tok_config, dict) else None, config_path.name
    if template is None and (folder / "chat_template.jinja").is_file():
        template, origin = (folder / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    elif template is None and (folder / "chat_template.json").is_file():
        try:
            template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ForgeError(f"chat_template.json is unreadable: {e}", where=str(folder / "chat_template.json")) from None
        origin = "chat_template.json"
    if isinstance(template, list):  # named templates: the converter keeps them all, "default" is the chat's
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template.strip():
        raise ForgeError("the checkpoint has no chat template", where=str(folder),
                         found=f"none in {config_path.name}, chat_template.jinja or chat_template.json",
                         hint="the product prompts each model with the template it was trained with; add the "
                              "repo's chat_template.jinja (or .json) to the alloy's source.allowPatterns")
    return {"template": template, "from": origin}


# --- safetensors headers -----------------------------------------------------------------------

def _read_header(path: Path) -> tuple[int, dict]:
    """(byte where the data starts, header without __metadata__), refusing what would read out of
    bounds: a truncated download must not pass as a clean checkpoint."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ForgeError("safetensors file is truncated: no header length", where=str(path), found=f"{size} bytes")
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            raise ForgeError(f"safetensors file is truncated: its header ends at byte {8 + n}",
                             where=str(path), found=f"{size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ForgeError(f"safetensors header is not valid JSON: {e}", where=str(path)) from None
    header.pop("__metadata__", None)
    base = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ForgeError(f"tensor {name} has a malformed header entry", where=str(path),
                             found=json.dumps(info)[:200], allowed="{dtype, shape, data_offsets: [start, end]}") from None
        itemsize = FLOAT_DTYPES[dtype][0] if dtype in FLOAT_DTYPES else OTHER_DTYPE_SIZES.get(dtype)
        if itemsize is not None and end - start != math.prod(shape) * itemsize:
            raise ForgeError(f"tensor {name} has {end - start} bytes for shape {shape} of {dtype}",
                             where=str(path), found=f"data_offsets [{start}, {end}]",
                             allowed=f"{math.prod(shape) * itemsize} bytes")
        if base + end > size:
            raise ForgeError(f"safetensors file is truncated: tensor {name} ends at byte {base + end}",
                             where=str(path), found=f"{size} bytes", allowed=f"at least {base + end} bytes")
    return base, header


def _shards(folder: Path) -> list[Path]:
    """Every *.safetensors file, after checking that the index (when there is one) names no shard
    that is missing: a shard that never downloaded would otherwise just go unscanned."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ForgeError("the checkpoint has no *.safetensors files", where=str(folder))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ForgeError(f"the shard index is unreadable: {e!r}", where=str(index)) from None
        missing = sorted(n for n in named if not (folder / n).is_file())
        if missing:
            raise ForgeError("the shard index names files that are not in the checkpoint",
                             where=f"{index} $.weight_map", found=", ".join(missing))
    return files


def check_blocks(folder: Path) -> dict:
    """Every block the config promises holds the same tensors, in the vision tower and the text
    model (safetensors headers only). A tensor missing from one block would otherwise convert into a
    projector or model that silently lacks it: the converter maps what it finds."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    names = set()
    for f in _shards(folder):
        names |= set(_read_header(f)[1])
    groups = {  # (prefix before the block index, blocks the config promises, where the count is)
        "vision": (re.compile(r"^((?:model\.)?visual\.blocks\.)(\d+)\.(.+)$"),
                   config.get("vision_config", {}).get("depth"), "$.vision_config.depth"),
        "text": (re.compile(r"^((?:model\.)?(?:language_model\.)?layers\.)(\d+)\.(.+)$"),
                 config.get("text_config", config).get("num_hidden_layers"), "$.text_config.num_hidden_layers"),
    }
    summary = {}
    for group, (pattern, promised, key) in groups.items():
        blocks: dict[int, set] = {}
        prefix = ""
        for n in names:
            if m := pattern.match(n):
                prefix = m.group(1)
                blocks.setdefault(int(m.group(2)), set()).add(m.group(3))
        if promised is None:
            continue
        missing = [f"{group} block {i} (no tensors at all)" for i in range(int(promised)) if i not in blocks]
        # Blocks of one kind share a layout; Qwen3.5's text model has two kinds (linear and full
        # attention, config.json's layer_types), its vision tower one.
        kinds = config.get("text_config", config).get("layer_types") if group == "text" else None
        by_kind: dict = {}
        for i, have in blocks.items():
            kind = kinds[i] if kinds and i < len(kinds) else "block"
            by_kind.setdefault(kind, {})[i] = have
        for kind, members in by_kind.items():
            full = set().union(*members.values())
            for i, have in sorted(members.items()):
                missing += [f"{prefix}{i}.{t}" for t in sorted(full - have)]
        if missing:
            raise ForgeError(f"the checkpoint's {group} blocks are incomplete: {missing[0]}", where=str(folder),
                             found=", ".join(missing[:MAX_REPORTED]),
                             allowed=f"the {promised} blocks config.json {key} promises, each with every tensor of its kind")
        summary[group] = {"blocks": len(blocks), "tensors_per_block": max((len(b) for b in blocks.values()), default=0)}
    return summary


# --- the value scan ----------------------------------------------------------------------------

def _limit_bits(dtype: str, max_abs: float) -> int:
    """The bit pattern, sign cleared, of the largest value of `dtype` that is <= max_abs.

    IEEE magnitudes order like their bit patterns read as unsigned integers, with +inf and then
    every NaN above all finite values, so `magnitude bits > limit bits` is one integer compare
    that catches NaN, +/-inf and a finite |x| > max_abs alike."""
    ftype = {"BF16": np.float32, "F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    top = np.finfo(ftype).max
    # compare as Python floats: numpy would cast max_abs to the narrow type (and overflow)
    f = top if max_abs >= float(top) else ftype(max_abs)  # past the range all finite values pass
    if float(f) > max_abs:  # the cast rounded to nearest, and up
        f = np.nextafter(f, ftype(0))
    if dtype == "BF16":
        # bf16 is the top half of an f32; dropping the low half rounds toward zero, so the
        # result is the largest bf16 <= f
        return int(f.view(np.uint32)) >> 16
    return int(f.view(FLOAT_DTYPES[dtype][2]))


def _to_float(dtype: str, magnitude_bits: int, negative: bool = False) -> float:
    bits = magnitude_bits
    itemsize, _, unsigned = FLOAT_DTYPES[dtype]
    if negative:
        bits |= 1 << (itemsize * 8 - 1)
    if dtype == "BF16":
        return float(np.uint32(bits << 16).view(np.float32))
    ftype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    return float(unsigned(bits).view(ftype))


class _Offender:
    """What a refusal says about one tensor: its first bad element and how many there are."""

    def __init__(self, name, file, dtype, shape, index, value):
        self.name, self.file, self.dtype, self.shape = name, file, dtype, shape
        self.index, self.value, self.count = index, value, 0

    def as_dict(self) -> dict:
        return {"name": self.name, "file": str(self.file), "dtype": self.dtype, "index": self.index,
                "value": self.value, "count": self.count}

    def line(self) -> str:
        where = list(np.unravel_index(self.index, self.shape)) if self.shape else []
        more = f", {self.count} such values" if self.count > 1 else ""
        return f"{self.name}: {self.value!r} at {[int(i) for i in where]} in {self.file.name}{more}"


def _scan_tensor(fh, buf: np.ndarray, start: int, nbytes: int, dtype: str, limit: int):
    """Max magnitude bits of one tensor, and (first bad flat index, its value, bad count) or None.

    Two read-only reductions per chunk instead of an elementwise `& 0x7FFF...` pass: read as
    signed integers, the negative floats are negative and the signed max is the largest positive
    magnitude; read as unsigned, the negative floats sit above the sign bit and the unsigned max
    minus the sign bit is the largest negative magnitude. Both run at memory speed and need no
    second buffer."""
    itemsize, signed, unsigned = FLOAT_DTYPES[dtype]
    sign = 1 << (itemsize * 8 - 1)
    fh.seek(start)
    seen, first, count, done = 0, None, 0, 0
    while done < nbytes:
        n = min(len(buf), nbytes - done)
        view = memoryview(buf)[:n]
        got = fh.readinto(view)
        if got != n:  # the header was checked against the size; a file shrinking under us is not
            raise ForgeError("safetensors file changed while being scanned", where=fh.name,
                             found=f"short read at byte {start + done}")
        top_pos = int(buf[:n].view(signed).max())
        top_neg = int(buf[:n].view(unsigned).max()) - sign
        mag = max(top_pos, top_neg)
        if mag > seen:
            seen = mag
        if mag > limit:  # rare path: find where, so the refusal can point at an element
            bits = buf[:n].view(unsigned) & unsigned(sign - 1)
            bad = bits > limit
            count += int(np.count_nonzero(bad))
            if first is None:
                i = int(np.argmax(bad))
                negative = bool(buf[:n].view(unsigned)[i] & unsigned(sign))
                first = (done // itemsize + i, _to_float(dtype, int(bits[i]), negative))
        done += n
    return seen, (None if first is None else (*first, count))


def scan(folder: Path, max_abs: float = F16_MAX, log=print) -> dict:
    """Refuse a checkpoint whose floating tensors hold NaN, +/-inf or a finite |x| > max_abs.

    Reads every *.safetensors file of the folder, one tensor at a time in file order, through one
    CHUNK_BYTES buffer (the page cache holds the file, not this process). Names up to MAX_REPORTED
    offending tensors in one refusal. Returns {files, tensors, bytes, seconds, max_abs_seen:
    {dtype: float}, skipped: {dtype: tensors}} for the receipt."""
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise ValueError(f"max_abs must be a positive finite number, not {max_abs!r}")
    folder = Path(folder)
    files = _shards(folder)
    limits: dict[str, int] = {}
    seen: dict[str, int] = {}
    skipped: dict[str, int] = {}
    offenders: list[_Offender] = []
    n_bad = tensors = total = 0
    buf = np.empty(CHUNK_BYTES, dtype=np.uint8)
    t0 = time.perf_counter()
    for path in files:
        t_file, bytes_file = time.perf_counter(), 0
        base, header = _read_header(path)
        with open(path, "rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                dtype = info["dtype"]
                if dtype not in FLOAT_DTYPES:
                    skipped[dtype] = skipped.get(dtype, 0) + 1
                    continue
                if dtype not in limits:
                    limits[dtype] = _limit_bits(dtype, max_abs)
                start, end = info["data_offsets"]
                mag, bad = _scan_tensor(fh, buf, base + start, end - start, dtype, limits[dtype])
                seen[dtype] = max(seen.get(dtype, 0), mag)
                tensors += 1
                bytes_file += end - start
                if bad is not None:
                    n_bad += 1
                    if len(offenders) < MAX_REPORTED:
                        o = _Offender(name, path, dtype, info["shape"], bad[0], bad[1])
                        o.count = bad[2]
                        offenders.append(o)
        total += bytes_file
        dt = time.perf_counter() - t_file
        if log:
            log(f"scanned {path.name}: {bytes_file / 1e9:.2f} GB in {dt:.1f} s "
                f"({bytes_file / 1e9 / dt if dt else 0:.2f} GB/s)")
    seconds = time.perf_counter() - t0
    if offenders:
        first = offenders[0]
        others = f" (and {n_bad - 1} more tensor{'s' if n_bad > 2 else ''})" if n_bad > 1 else ""
        err = ForgeError(
            f"tensor {first.name} holds {first.value!r}{others}: the F16 reference and the k-quants' "
            "fp16 block scales cannot hold it",
            where=str(first.file),
            found="\n           ".join(o.line() for o in offenders)
                  + (f"\n           ... {n_bad - len(offenders)} more" if n_bad > len(offenders) else ""),
            allowed=f"finite values with |x| <= {max_abs:g}" + (" (the largest f16)" if max_abs == F16_MAX else ""),
            hint="the checkpoint is damaged (a bad merge or conversion upstream); fetch the original weights")
        err.offenders = [o.as_dict() for o in offenders]
        raise err
    return {"files": len(files), "tensors": tensors, "bytes": total, "seconds": seconds,
            "max_abs_seen": {d: _to_float(d, b) for d, b in seen.items()}, "skipped": skipped}
