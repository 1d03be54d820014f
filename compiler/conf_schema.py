"""What a composed configuration may hold: one dataclass per conf group (tier, quant, backend,
sensory) and one for the root, handed to OmegaConf as a structured config, so that a value of the
wrong type (`tier.n_seq_max=abc`), an unknown key or a missing one is refused when the graph is
planned instead of failing inside a step.

OmegaConf checks types, enums and keys. What its types cannot say (ranges, multiples, patterns,
"an int or a float") is a `Bound` in the field's metadata; `validate` checks every bound in one
walk after composition. Both kinds of error come out as one ForgeError naming the key, the value
found and what is allowed, so dodo.py refuses with exit code 2 before anything runs.

The check runs on the composed result (config.py), not through a ConfigStore entry in conf's
defaults list: that way every conf dir (FORGE_CONF_DIR) is checked without a hook of its own, and
Hydra's messages for what it already refuses (unknown groups and keys) stay as they are.

The schema never changes a committed value: GB figures that conf writes as whole numbers stay
ints (step keys hash the configuration, so 4 -> 4.0 would rerun envelopes and break the lock);
tests/test_conf_schema.py holds every committed combination to that.
"""
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any, Callable, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from .envelope import BYTES
from .errors import ForgeError


@dataclass(frozen=True)
class Bound:
    """What a value must be beyond the field's type. For a list field it applies to each item."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    multiple_of: Optional[int] = None
    # For fields typed Any: "number" (an int or a float, kept as written: OmegaConf 2.3 has no
    # Union[int, float]) or "integer" (with `words` beside it, as n_gpu_layers' "all").
    kind: Optional[str] = None
    words: tuple = ()
    pattern: Optional[str] = None
    # Names defined elsewhere (the alloy schema's llama types), looked up when checked.
    one_of: Optional[Callable[[], list]] = None
    length: Optional[int] = None  # of the list itself
    why: Optional[str] = None     # the reason for the bound, shown as the refusal's hint


def bounded(default: Any = MISSING, **bound) -> Any:
    """A dataclass field with a Bound in its metadata (MISSING: conf must give the value)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"bound": Bound(**bound)})
    return field(default=default, metadata={"bound": Bound(**bound)})


def llama_types() -> list:
    """llama.cpp's quant types as the alloy schema lists them for recipes: conf names the same
    types, so both are checked against one list (the loaded schema is cached by compiler.alloy)."""
    from .alloy import _validator

    return list(_validator("alloy.schema.json").schema["$defs"]["llamaType"]["enum"])


# Cache types are the ones the envelope can size (envelope.BYTES); any other would fail there.
CacheType = Enum("CacheType", {name: name for name in BYTES})
# The backends model_registry.json may name (schema/registry.schema.json), one conf/backend file each.
BackendName = Enum("BackendName", {name: name for name in ("cpu", "cuda", "metal", "vulkan")})
MemoryKind = Enum("MemoryKind", {name: name for name in ("unified", "discrete")})
ImatrixNeed = Enum("ImatrixNeed", {name: name for name in ("required", "recommended", "none")})
# The alloy schema's convertType and projectorType.
ConvertType = Enum("ConvertType", {name: name for name in ("bf16", "f16")})
ProjectorType = Enum("ProjectorType", {name: name for name in ("f16", "q8_0")})
# What becomes of a checkpoint's multi-token-prediction head (stages/convert.py).
MtpPolicy = Enum("MtpPolicy", {name: name for name in ("drop", "draft")})
# smoke_run.Session's modes.
GpuMode = Enum("GpuMode", {name: name for name in ("auto", "required", "off")})

GGML_TYPE = r"[a-z0-9_]+"  # as the alloy schema's outputTensorType / tensorTypes
NAME = r"[a-z0-9][a-z0-9._-]*"


@dataclass
class Memory:
    kind: MemoryKind = MISSING
    reference_gb: Any = bounded(gt=0, kind="number")
    range_gb: List[Any] = bounded(gt=0, length=2, kind="number")
    gpu_working_set_fraction: float = bounded(gt=0, le=1, why="a share of the reference machine's memory")
    os_reserve_gb: Any = bounded(0, ge=0, kind="number")  # envelope.check reads it with .get(..., 0)


@dataclass
class Budget:
    """The tier's rules; a tier states those that apply to it (None: the rule is not checked)."""
    model_max_gb: Any = bounded(None, gt=0, kind="number")
    sensory_max_gb: Any = bounded(None, gt=0, kind="number")
    # Zero is a real rule (the model and the stack must fit the reference machine at all).
    slack_min_gb: Any = bounded(None, ge=0, kind="number")
    total_max_gb: Any = bounded(None, gt=0, kind="number")
    vram_max_gb: Any = bounded(None, gt=0, kind="number")


@dataclass
class Tier:
    name: str = bounded(pattern=NAME)
    description: str = MISSING
    memory: Memory = MISSING
    budget: Budget = field(default_factory=Budget)
    n_ctx: int = bounded(ge=256, multiple_of=256,
                         why="each persona's context; llama.cpp rounds each sequence's share of the KV cache up "
                             "to a multiple of 256, so another value would make the envelope's KV figure wrong")
    n_seq_max: int = bounded(ge=1, le=256, why="personas decoded together in one context; llama.cpp allows at "
                                               "most 256 sequences (LLAMA_MAX_SEQ)")
    n_batch: int = bounded(ge=1)
    kv_unified: bool = MISSING
    cache_type_k: CacheType = MISSING
    cache_type_v: CacheType = MISSING
    max_image_px: int = bounded(ge=32, why="the smallest image the projector turns into a token is one merged "
                                           "patch (16 px patches, merged 2 x 2)")
    context_checkpoints: int = bounded(ge=0)
    backend_default: BackendName = MISSING
    quant_default: str = MISSING


@dataclass
class QuantGate:
    # Factors on the source's own static Q8_0 measured on the same tokens (stages/gate.py).
    max_mean_kld_x_q8: float = bounded(gt=0, why="a multiple of the Q8_0's mean KLD")
    max_p999_kld_x_q8: float = bounded(gt=0, why="a multiple of the Q8_0's 99.9th-percentile KLD")
    max_top_miss_x_q8: float = bounded(gt=0, why="a multiple of the Q8_0's share of tokens whose top token differs")
    max_ppl_ratio: float = bounded(ge=1, why="a quant is not expected to beat its own reference")


@dataclass
class Quant:
    name: str = bounded(pattern=r"[a-z0-9_]+")
    llama_type: str = bounded(one_of=llama_types, why="the type llama-quantize is given (schema/alloy.schema.json)")
    imatrix: ImatrixNeed = MISSING
    imatrix_why: str = MISSING
    llama_refuses_without_imatrix: bool = MISSING
    nominal_bpw: float = bounded(gt=0, le=32, why="bits per weight; F32 is 32")
    projector: ProjectorType = MISSING
    output_type: Optional[str] = bounded(None, pattern=GGML_TYPE)
    token_embedding_type: Optional[str] = bounded(None, pattern=GGML_TYPE)
    tensor_types: List[str] = bounded([], pattern=r"[^=\s]+=" + GGML_TYPE,
                                      why="llama-quantize --tensor-type rules, regex=type")
    gate: QuantGate = MISSING
    label: str = bounded(pattern=r"[A-Z0-9_]+", why="the quant label in the published file names")


@dataclass
class Backend:
    name: BackendName = MISSING
    gpu: bool = MISSING
    n_gpu_layers: Any = bounded(kind="integer", words=("all",), ge=0)
    device_kind: str = MISSING
    runtime_overhead_mib: Any = bounded(kind="number", ge=0,
                                        why="device memory the backend takes beyond llama.cpp's buffers (MiB)")


@dataclass
class SensoryProcess:
    name: str = MISSING
    role: str = MISSING
    memory_mb: int = bounded(gt=0)
    gpu: bool = True  # envelope.sensory_bytes counts a process without it as on the GPU
    source: str = MISSING


@dataclass
class Sensory:
    name: str = bounded(pattern=NAME)
    processes: List[SensoryProcess] = MISSING


@dataclass
class Convert:
    outtype: ConvertType = MISSING
    mtp: MtpPolicy = MISSING


@dataclass
class Source:
    require_commit: bool = MISSING


@dataclass
class Weights:
    max_abs: float = bounded(gt=0, le=65504, why="the largest finite f16: the F16 reference and every k-quant's "
                             "block scales are stored as fp16")


@dataclass
class Imatrix:
    ctx: int = bounded(ge=16, why="tokens per chunk of the calibration text; fewer leave each token almost no context")
    chunks: int = bounded(ge=1)
    process_output: bool = MISSING


@dataclass
class Gate:
    heldout: str = bounded(pattern=r"[A-Za-z0-9._/-]+\.txt", why="a project-owned text file, relative to the root")
    heldout_sha256: str = bounded(pattern=r"[0-9a-f]{64}")
    ctx: int = bounded(ge=16, why="tokens per chunk; the KL mode scores only the second half of each chunk")
    chunks: int = bounded(ge=1)
    max_base_ppl: float = bounded(ge=1, why="a perplexity: 1 is a model certain of every token")


@dataclass
class Smoke:
    max_tokens: int = bounded(ge=1)
    image_px: int = bounded(ge=32, why="the smallest image the projector turns into a token (one merged patch)")
    vision_items: int = bounded(ge=1, why="the smoke stage fails a variant whose vision suite did not run")
    vision_items_cpu: int = bounded(ge=1, why="the smoke stage fails a variant whose vision suite did not run")
    persona_image_px: int = bounded(ge=32, why="the smallest image the projector turns into a token (one merged patch)")
    min_vision_score: float = bounded(ge=0, le=1, why="a pass rate")
    fixture_items_per_family: int = bounded(ge=1, why="the smoke stage fails a variant whose vision suite did not run")
    fixture_min_vision_score: float = bounded(ge=0, le=1, why="a pass rate")
    min_projector_agreement: float = bounded(ge=0, le=1, why="a share of the suite's answers")
    gate_alone: bool = MISSING
    gpu: GpuMode = GpuMode.auto  # plan.py reads it with .get("gpu", "auto")


@dataclass
class Draft:
    prompt: str = bounded(pattern=r".*\S.*", why="the draft is decoded through from a prompt")
    n_predict: int = bounded(ge=4, why="tokens enough for the draft to propose some")
    draft_max: int = bounded(ge=1, why="tokens the draft proposes per step; 0 would draft nothing")


@dataclass
class Registry:
    include_synthetic: bool = MISSING


@dataclass
class Publish:
    allow_synthetic: bool = MISSING


@dataclass
class ForgeConfig:
    tier: Tier = MISSING
    quant: Quant = MISSING
    backend: Backend = MISSING
    sensory: Sensory = MISSING
    convert: Convert = MISSING
    draft: Draft = MISSING
    source: Source = MISSING
    weights: Weights = MISSING
    imatrix: Imatrix = MISSING
    gate: Gate = MISSING
    smoke: Smoke = MISSING
    registry: Registry = MISSING
    publish: Publish = MISSING


# Rules between keys: (the key named in the refusal, a test on the checked config, what is allowed).
CROSS_RULES = [
    ("quant.imatrix",
     lambda c: c["quant"]["imatrix"] == "required" or not c["quant"]["llama_refuses_without_imatrix"],
     "'required' when quant.llama_refuses_without_imatrix is true (else planning would let through a "
     "quant that llama-quantize then refuses)"),
]


# ---- describing what is allowed ---------------------------------------------------------------


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def describe(tp, bound: Optional[Bound]) -> str:
    """What a field allows, in words: 'an integer from 1 to 256', 'one of f16, q8_0'."""
    b = bound or Bound()
    origin = typing.get_origin(tp)
    if origin is list:
        item = describe(typing.get_args(tp)[0], dataclasses.replace(b, length=None))
        return f"a list of {b.length} ({item})" if b.length else f"a list, each {item}"
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return describe(inner, b) + ", or null"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(tp.__members__)
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp)
    if b.kind:
        what = {"number": "a number", "integer": "an integer"}[b.kind]
    if b.one_of:
        return "one of " + ", ".join(b.one_of())
    if b.pattern:
        what = f"a string matching {b.pattern}"
    lo = f">= {_num(b.ge)}" if b.ge is not None else f"> {_num(b.gt)}" if b.gt is not None else None
    if lo and b.le is not None:
        what += f" from {_num(b.ge)} to {_num(b.le)}" if b.ge is not None else f" {lo} and <= {_num(b.le)}"
    elif lo or b.le is not None:
        what += " " + (lo or f"<= {_num(b.le)}")
    if b.multiple_of:
        what += f", a multiple of {b.multiple_of}"
    if b.words:
        what += ", or " + ", ".join(repr(w) for w in b.words)
    return what or "any value"


@lru_cache(maxsize=None)
def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("bound")) for f in dataclasses.fields(cls)}


def field_at(key: str):
    """(type, Bound) of a dotted key such as `tier.memory.range_gb[1]`; None where the schema has
    no such key. A list index names the list's item."""
    tp, bound = ForgeConfig, None
    for part in re.findall(r"[^.\[\]]+", key):
        origin = typing.get_origin(tp)
        if origin is list and part.isdigit():
            tp = typing.get_args(tp)[0]
            bound = dataclasses.replace(bound, length=None) if bound else None
            continue
        if not (dataclasses.is_dataclass(tp) and part in _fields(tp)):
            return None
        tp, bound = _fields(tp)[part]
    return tp, bound


# ---- checking ---------------------------------------------------------------------------------


def _within(value, b: Bound) -> bool:
    if b.words and value in b.words:
        return True
    if b.kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if b.kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return False
    if b.pattern is not None:
        return isinstance(value, str) and re.fullmatch(b.pattern, value) is not None
    if b.one_of is not None:
        return value in b.one_of()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            return False
        if b.ge is not None and not value >= b.ge or b.gt is not None and not value > b.gt:
            return False
        if b.le is not None and not value <= b.le:
            return False
        if b.multiple_of and value % b.multiple_of:
            return False
    return True


def _bound_errors(cls, data: dict, prefix: str):
    """(key, value) of every value outside its bound, walking the dataclasses alongside the data."""
    for name, (tp, bound) in _fields(cls).items():
        key, value = f"{prefix}{name}", data.get(name)
        origin = typing.get_origin(tp)
        item = typing.get_args(tp)[0] if origin is list else None
        if dataclasses.is_dataclass(tp):
            yield from _bound_errors(tp, value, key + ".")
        elif item is not None and dataclasses.is_dataclass(item):
            for i, element in enumerate(value):
                yield from _bound_errors(item, element, f"{key}[{i}].")
        elif bound is None or value is None:
            continue  # OmegaConf has checked its type; None only where the schema allows it
        elif item is not None:
            if bound.length is not None and len(value) != bound.length:
                yield key, value
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value) if not _within(v, bound))
        elif not _within(value, bound):
            yield key, value


@lru_cache(maxsize=None)
def _schema(cls):
    return OmegaConf.structured(cls)


class Invalid(Exception):
    """A key that fails the schema, before it is known where its value came from."""

    def __init__(self, key: str, value=None, problem: str = "value"):  # problem: value, missing, unknown
        super().__init__(key)
        self.key, self.value, self.problem = key, value, problem


def _locate(data, key: str, value, path: str) -> Optional[str]:
    """The full key of `key` inside a list of mappings, which OmegaConf's errors leave out (it
    checks list items as detached copies): the first item holding that key (with that value)."""
    if isinstance(data, dict):
        for k, v in data.items():
            found = _locate(v, key, value, f"{path}.{k}")
            if found:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, dict) and key in v and (value is None or v[key] == value):
                return f"{path}[{i}].{key}"
            found = _locate(v, key, value, f"{path}[{i}]")
            if found:
                return found
    return None


@lru_cache(maxsize=None)
def _checked_section(name: str, text: str) -> dict:
    """One top-level section (tier, quant, ...) checked against its dataclass, keyed by its JSON
    text: OmegaConf's merge is the costly part of validation (tens of ms), and most sections recur
    unchanged across a run's compositions (one backend, one sensory stack for many variants)."""
    cls = _fields(ForgeConfig)[name][0]
    data = json.loads(text)
    if not isinstance(data, dict):
        raise Invalid(name, data)
    try:
        checked = OmegaConf.to_container(OmegaConf.merge(_schema(cls), data), enum_to_str=True,
                                         throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = f"{name}.{e.full_key}" if e.full_key else name
        problem = "unknown" if isinstance(e, ConfigKeyError) else "missing" if isinstance(
            e, MissingMandatoryValue) else "value"
        value = getattr(e, "value", None) if problem == "value" else None
        if field_at(key) is None:
            # An item of a list of mappings (sensory processes), or a key the schema lacks.
            key = _locate(data, str(e.key), value, name) or key
        raise Invalid(key, value, problem) from None
    for key, value in _bound_errors(cls, checked, name + "."):
        raise Invalid(key, value)
    if name == "tier":
        # A tier states only the budget rules that apply to it, and envelope.check applies those
        # present: the rules it leaves unset are dropped here rather than handed on as null.
        checked["budget"] = {k: v for k, v in checked["budget"].items() if v is not None}
    return checked


def refusal(err: Invalid, where: Callable[[str], str]) -> ForgeError:
    key = err.key
    spot = field_at(key)
    if err.problem == "unknown" or spot is None:
        parent = field_at(key.rsplit(".", 1)[0]) if "." in key else (ForgeConfig, None)
        known = None
        if parent and dataclasses.is_dataclass(parent[0]):
            known = [f.name for f in dataclasses.fields(parent[0])]
        return ForgeError(f"{key} is not a configuration key", where=where(key), found=key, allowed=known)
    tp, bound = spot
    hint = bound.why if bound else None
    if err.problem == "missing":
        return ForgeError(f"{key} is missing", where=where(key), allowed=describe(tp, bound), hint=hint)
    return ForgeError(f"invalid value for {key}", where=where(key), found=_show(err.value),
                      allowed=describe(tp, bound), hint=hint)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def validate(data: dict, where: Callable[[str], str]) -> dict:
    """The composed configuration (plain data) checked against the schema, as plain data again.

    `where(key)` says where a key's value came from (the override or the conf file), for the
    refusal. Values keep what they were written as, except that OmegaConf converts what its types
    allow (a quoted '4' for an integer becomes 4); enums come back as their names. The result
    shares its sections with other compositions' (cached): copy it before changing it."""
    try:
        for key in data:
            if key not in _fields(ForgeConfig):
                raise Invalid(key, problem="unknown")
        checked = {}
        for name in _fields(ForgeConfig):
            if name not in data:
                raise Invalid(name, problem="missing")
            checked[name] = _checked_section(name, json.dumps(data[name]))
    except Invalid as e:
        raise refusal(e, where) from None
    for key, holds, allowed in CROSS_RULES:
        if not holds(checked):
            section, name = key.split(".", 1)
            raise ForgeError(f"invalid value for {key}", where=where(key), found=_show(checked[section][name]),
                             allowed=allowed)
    return checked
