"""Reading forge-alloy recipes: parse, check the name, validate against schema/, and turn the JSON
into the few facts the planner needs. Every refusal names the file and the JSON path."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import ForgeError
from .paths import SCHEMA_DIR

# Stage types this compiler turns into build steps (schema/alloy.schema.json allows these only).
# forge-alloy knows more (eval, prune, train...); an alloy that asks for one of those is refused
# rather than silently half-built.
SUPPORTED_STAGES = ("modality", "quant", "publish")
ALLOY_SUFFIX = ".alloy.json"
# The quant types the published forge-alloy schema names (QuantStage.quantTypes of
# CambrianTech/forge-alloy's schema/forge-alloy.schema.json, as pinned in tests/conftest.py, which
# checks this list against it). Our dialect takes any llama-quantize type, but a variant of a type
# outside this list is not a forge-alloy the product's pipeline accepts: an experiment, said so in
# the lock and the card, never a committed recipe (tests/test_alloy_schema.py).
PUBLISHED_QUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
                         "Q6_K", "Q8_0", "F16", "F32")


def outside_published_schema(llama_type: str) -> str | None:
    """Why a variant of this quant type is an experiment by the published schema, or None."""
    if llama_type.upper() in PUBLISHED_QUANT_TYPES:
        return None
    return (f"{llama_type.upper()} is not among the published forge-alloy schema's quantTypes: an experiment, "
            "not a committed recipe")


@dataclass(frozen=True)
class Alloy:
    name: str
    path: Path
    data: dict
    alloy_hash: str  # sha256 of the recipe's canonical JSON, as forge-alloy's results.integrity.alloyHash

    @property
    def tier(self) -> str:
        return self.data.get("tier", "m4")

    @property
    def source(self) -> dict:
        return self.data["source"]

    def stage(self, kind: str) -> dict:
        for s in self.data["stages"]:
            if s["type"] == kind:
                return s
        return {}

    @property
    def quant_types(self) -> list[str]:
        return list(self.stage("quant").get("quantTypes", []))

    @property
    def convert_type(self) -> str | None:
        return self.stage("quant").get("convertType")

    @property
    def projector_type(self) -> str | None:
        return self.stage("quant").get("projectorType")

    @property
    def vision(self) -> bool:
        """forge-alloy's modality stage adds a modality: with none the variant is text only."""
        return self.stage("modality").get("modality") == "vision"

    @property
    def allow_patterns(self) -> list[str] | None:
        return self.source.get("allowPatterns")


def canonical_json(obj) -> bytes:
    """forge-alloy's canonical form: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@lru_cache(maxsize=None)
def _validator(schema_name: str):
    import jsonschema

    schema = json.loads((SCHEMA_DIR / schema_name).read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(instance, schema_name: str, where: str) -> None:
    """Validate against schema/<schema_name>; the error names the JSON path and what is allowed."""
    import jsonschema

    validator = _validator(schema_name)
    errors = list(validator.iter_errors(instance))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    # Descend to the most specific error inside if/then branches.
    while err.context:
        err = jsonschema.exceptions.best_match(err.context)
    allowed = None
    if err.validator == "enum":
        allowed = list(err.validator_value)
    elif err.validator == "const":
        allowed = [err.validator_value]
    elif err.validator == "pattern":
        allowed = f"strings matching {err.validator_value}"
    elif err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
    found = json.dumps(err.instance)[:200] if err.validator not in ("required", "additionalProperties") else None
    raise ForgeError(
        f"schema violation at {err.json_path}: {err.message}",
        where=where, found=found, allowed=allowed,
    )


@lru_cache(maxsize=None)
def _schema_digest(schema_name: str) -> str:
    return hashlib.sha256((SCHEMA_DIR / schema_name).read_bytes()).hexdigest()


def _validated_path() -> Path:
    from .paths import state_dir

    return state_dir() / "alloys-validated.json"


@lru_cache(maxsize=1)
def _validated() -> set:
    try:
        return set(json.loads(_validated_path().read_text()))
    except (OSError, ValueError):
        return set()


def _remember_valid(key: str) -> None:
    from .paths import keep_state

    seen = _validated()
    seen.add(key)
    keep_state(_validated_path().name, sorted(seen)[-4096:])


def check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise ForgeError(
            "alloy name must be a plain file-name stem (it names build folders and published files)",
            where=f"{where} $.name", found=json.dumps(name),
            allowed="letters, digits, '.', '_', '-'; no path separators, no '..'",
        )


def load(path: Path) -> Alloy:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ForgeError("alloy file not found", where=where)
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ForgeError(f"alloy is not UTF-8 text (byte {e.start})", where=where) from None
    except json.JSONDecodeError as e:
        raise ForgeError(f"malformed JSON: {e.msg}", where=f"{where}:{e.lineno}:{e.colno}") from None
    if not isinstance(data, dict):
        raise ForgeError("an alloy is a JSON object", where=f"{where} $", found=type(data).__name__)
    if "name" in data:
        check_name(data["name"], where)
    # Schema validation is the costly part of loading (jsonschema, ~5 ms an alloy): bytes that
    # passed it under the same schema are not validated again (a no-op run with 50 alloys).
    valid_key = hashlib.sha256(raw + b"\0" + _schema_digest("alloy.schema.json").encode()).hexdigest()
    if valid_key not in _validated():
        validate(data, "alloy.schema.json", where)
        _remember_valid(valid_key)
    expected = path.name[: -len(ALLOY_SUFFIX)] if path.name.endswith(ALLOY_SUFFIX) else None
    if expected != data["name"]:
        raise ForgeError(
            "alloy file name and $.name disagree", where=f"{where} $.name",
            found=data["name"], allowed=f"{data['name']}{ALLOY_SUFFIX} as the file name",
        )
    for i, stage in enumerate(data["stages"]):
        if stage["type"] not in SUPPORTED_STAGES:
            raise ForgeError(
                f"stage type {stage['type']!r} is not one this compiler runs",
                where=f"{where} $.stages[{i}].type", found=stage["type"], allowed=list(SUPPORTED_STAGES),
            )
    if sum(1 for s in data["stages"] if s["type"] == "quant") != 1:
        raise ForgeError("an alloy needs exactly one quant stage", where=f"{where} $.stages")
    for i, stage in enumerate(data["stages"]):
        # The compiler converts the vision tower the checkpoint carries; a foreign encoder would
        # need a projector trained for it, which nothing here does.
        if stage["type"] == "modality" and stage["encoderModel"] != data["source"]["baseModel"]:
            raise ForgeError(
                "the vision encoder must be the source checkpoint's own tower",
                where=f"{where} $.stages[{i}].encoderModel", found=stage["encoderModel"],
                allowed=[data["source"]["baseModel"]],
            )
        if stage["type"] == "publish" and "repo" in stage and stage["repo"].split("/")[0] != stage["org"]:
            raise ForgeError(
                "the publish stage's repo is not under its org", where=f"{where} $.stages[{i}].repo",
                found=stage["repo"], allowed=f"{stage['org']}/<name>",
            )
    recipe = {k: v for k, v in data.items() if k != "results"}
    digest = "sha256:" + hashlib.sha256(canonical_json(recipe)).hexdigest()
    return Alloy(name=data["name"], path=path, data=recipe, alloy_hash=digest)


def load_dir(directory: Path) -> list[Alloy]:
    """Every *.alloy.json in the folder, sorted by name; refuses duplicate names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ForgeError("alloys folder not found", where=str(directory))
    alloys = [load(p) for p in sorted(directory.glob(f"*{ALLOY_SUFFIX}"))]
    return alloys
