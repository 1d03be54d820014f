"""The recipes and the executed alloys are forge-alloy documents by the format's own published schema
(CambrianTech/forge-alloy's schema/forge-alloy.schema.json, pinned by sha256: conftest.published_schema_path
says where it is found, or why these tests are skipped), as it is -- nothing widened -- and
schema/alloy.schema.json is never looser than it except in one place: our dialect takes any of
llama-quantize's types in QuantStage.quantTypes, where the published schema names 13. A variant of a
type outside those 13 is an experiment (compiler.alloy.PUBLISHED_QUANT_TYPES, checked here against
the published file): the lock and the card say so, and no committed recipe declares one."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest

from compiler import alloy as alloy_mod
from compiler.paths import SCHEMA_DIR, VENDOR_DIR
from conftest import DEMO_ALLOY, ROOT, published_schema_path

QUANTIZE_CPP = VENDOR_DIR / "tools" / "quantize" / "quantize.cpp"
RECIPES = sorted((ROOT / "alloys").glob("*.alloy.json"))


def llama_quant_types() -> set[str]:
    """llama-quantize's type names (QUANT_OPTIONS) in the pinned llama.cpp, less COPY (which
    copies tensors as they are: not a quant type)."""
    assert QUANTIZE_CPP.is_file(), f"{QUANTIZE_CPP} missing: run scripts/bootstrap.py"
    names = set(re.findall(r'\{\s*"([A-Z0-9_]+)",\s*LLAMA_FTYPE_', QUANTIZE_CPP.read_text()))
    assert {"Q4_K_M", "IQ3_M", "Q8_0"} <= names, "quantize.cpp's QUANT_OPTIONS no longer parse"
    return names - {"COPY"}


def published_schema() -> dict:
    return json.loads(published_schema_path().read_text())


def dialect_of_published() -> dict:
    """The published schema with its quantTypes taken together with llama-quantize's list: what our
    schema is compared with (ours never looser than this)."""
    schema = published_schema()
    quant_types = schema["$defs"]["QuantStage"]["properties"]["quantTypes"]["items"]
    quant_types["enum"] = sorted(set(quant_types["enum"]) | llama_quant_types())
    return schema


def our_schema() -> dict:
    return json.loads((SCHEMA_DIR / "alloy.schema.json").read_text())


def errors(schema: dict, doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for e in validator.iter_errors(doc):
        out.append(f"{e.json_path}: {e.message[:300]}")
        out += [f"  {c.json_path}: {c.message[:200]}" for c in e.context or []]
    return out


def assert_our_alloy(doc: dict) -> None:
    """Valid under our schema; date-times are RFC 3339 (jsonschema checks `format` only with an
    optional package, so it is checked here)."""
    assert not errors(our_schema(), doc), "\n".join(errors(our_schema(), doc))
    integrity = doc.get("results", {}).get("integrity")
    if integrity:
        datetime.datetime.fromisoformat(integrity["attestedAt"].replace("Z", "+00:00"))


def assert_forge_alloy(doc: dict) -> None:
    """Valid under the published schema (skipped where it cannot be had) and under ours."""
    assert_our_alloy(doc)
    assert not errors(published_schema(), doc), "\n".join(errors(published_schema(), doc))


# -- documents ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_published_forge_alloy(path):
    assert_forge_alloy(json.loads(path.read_text()))
    alloy_mod.load(path)  # and the compiler takes it


@pytest.mark.build
def test_the_demo_build_writes_published_forge_alloys(demo_workspace):
    for variant in ("demo", "demo-q8"):
        assert_forge_alloy(json.loads((demo_workspace.variant(variant) / f"{variant}.alloy.json").read_text()))


def test_the_published_quant_types_are_the_compilers_and_a_type_outside_them_fails():
    from compiler.alloy import PUBLISHED_QUANT_TYPES, outside_published_schema

    enum = published_schema()["$defs"]["QuantStage"]["properties"]["quantTypes"]["items"]["enum"]
    assert sorted(PUBLISHED_QUANT_TYPES) == sorted(enum)
    assert outside_published_schema("Q4_K_M") is None and "IQ3_M is not among" in outside_published_schema("IQ3_M")
    # An IQ3_M recipe (the air alloy before this check) is not a published forge-alloy.
    doc = json.loads(DEMO_ALLOY.read_text())
    next(s for s in doc["stages"] if s["type"] == "quant")["quantTypes"] = ["IQ3_M"]
    assert any("quantTypes" in e and "IQ3_M" in e for e in errors(published_schema(), doc))


def test_the_published_schema_refuses_what_issue_14_found():
    """The checks above have teeth: the old recipe and receipt shapes fail the published schema."""
    schema = published_schema()
    doc = json.loads(DEMO_ALLOY.read_text())
    doc["source"]["architecture"] = "Qwen3_5ForConditionalGeneration"
    assert any("architecture" in e for e in errors(schema, doc))
    doc = json.loads(DEMO_ALLOY.read_text())
    doc["results"] = {"integrity": {"code": {"runner": "r", "version": "1", "binaryHash": "h"}, "modelHash": "m"},
                      "benchmarks": [{"name": "personas", "metrics": {"isolated": [True, True]}}]}
    found = "\n".join(errors(schema, doc))
    assert "'trustLevel' is a required property" in found and "'attestedAt' is a required property" in found
    assert "metrics.isolated" in found


class FakeEntry:
    """A store entry as the receipt stage reads it: one output file, or named report files."""

    def __init__(self, folder: Path, files: dict[str, bytes]):
        self.folder = folder
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        self.names = list(files)

    def manifest(self) -> dict:
        return {"files": [{"sha256": hashlib.sha256(self.file(n).read_bytes()).hexdigest(),
                           "size": self.file(n).stat().st_size} for n in self.names]}

    def file(self, name: str) -> Path:
        return self.folder / name

    def path(self, name: str) -> Path:
        return self.folder / name

    def output(self) -> Path:
        return self.file(self.names[0])


TEMPLATE = "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor -%}"


def tiny_gguf() -> bytes:
    """A real (tiny) text GGUF carrying a chat template, as the receipt reads one."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.gguf"
        w = gguf.GGUFWriter(str(path), "qwen35")
        w.add_chat_template(TEMPLATE)
        w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


GATE_REPORT = {"heldout": "calibration/forge-heldout-v1.txt", "heldoutSha256": "1" * 64, "ctx": 128, "chunks": 3,
               "figures": {"mean_kld": 0.0024, "p99_kld": 0.0041, "ppl_ratio": 1.0004, "top1_agreement": 0.94},
               "checks": [{"figure": "mean_kld", "direction": "max", "threshold": 0.08, "passed": True}],
               "passed": True}
SMOKE_REPORT = {"backend": "cpu",
                "vision": {"score": 0.0, "items": [{"answer": "red"}] * 10, "gated": False},
                "personas": {"n_seq_max": 4, "isolated": [True, True, True, True],
                             "equal_alone": [True, False, True, True], "alone_gated": False, "passed": True},
                "timings": {"load_s": 0.95, "image_encode_ms": 69.1, "prompt_tokens_per_s": 2949.0,
                            "generation_tokens_per_s": None, "batched_generation_tokens_per_s": 48.2,
                            "ttft_ms": 34.6},
                "preservation": {"tower": {"sha256": "a" * 64, "tensors": 33},
                                 "projector": {"sha256": "b" * 64, "tensors": 34}}}


@pytest.fixture
def demo_plan(tmp_path, monkeypatch):
    alloys = tmp_path / "alloys"
    alloys.mkdir()
    shutil.copy(DEMO_ALLOY, alloys / DEMO_ALLOY.name)
    monkeypatch.setenv("FORGE_ALLOYS_DIR", str(alloys))
    monkeypatch.setenv("FORGE_BUILD_DIR", str(tmp_path / "build"))
    from compiler.graph import compile_graph

    return compile_graph({})


def test_receipt_stage_writes_a_published_forge_alloy(demo_plan, tmp_path, monkeypatch):
    """The receipt stage's own run() on the planned demo variant, its inputs stood in for by small
    files: the executed alloy it writes validates, with honest integrity fields and figures only
    in metrics. (test_build checks the one the real pipeline writes.)"""
    from compiler.stages import receipt

    tools = tmp_path / "tools-manifest.json"
    tools.write_text(json.dumps({"tools": {"llama-quantize": {"sha256": "c" * 64}}}))
    monkeypatch.setattr(receipt, "build_manifest", lambda *a, **k: tools)
    variant = demo_plan.variants[0]
    inputs = {"text": FakeEntry(tmp_path / "text", {"model.gguf": tiny_gguf()}),
              "mmproj": FakeEntry(tmp_path / "mmproj", {"mmproj.gguf": b"projector"}),
              "gate": FakeEntry(tmp_path / "gate", {"gate.json": json.dumps(GATE_REPORT).encode()}),
              "smoke": FakeEntry(tmp_path / "smoke", {"smoke.json": json.dumps(SMOKE_REPORT).encode()})}
    out = FakeEntry(tmp_path / "out", {})
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    receipt.run(variant.steps["receipt"], out, inputs, lambda *a: None, {"variant": variant,
                                                                         "toolchain": demo_plan.toolchain})
    doc = json.loads(out.file("demo.alloy.json").read_text())
    assert_forge_alloy(doc)
    integrity = doc["results"]["integrity"]
    assert integrity["trustLevel"] == "self-attested" and "signature" not in integrity
    attested = datetime.datetime.fromisoformat(integrity["attestedAt"].replace("Z", "+00:00"))
    assert before <= attested <= datetime.datetime.now(datetime.timezone.utc)
    assert integrity["alloyHash"] == variant.alloy.alloy_hash
    assert [f["filename"] for f in integrity["fileHashes"]] == [variant.text_filename, variant.mmproj_filename]
    assert doc["source"]["architecture"] == "qwen3_5"
    # The template the text GGUF carries is kept beside the receipt, for the lock and the registry.
    assert out.file("chat_template.jinja").read_text() == TEMPLATE
    bench = {b["name"]: b for b in doc["results"]["benchmarks"]}
    assert bench["personas"]["metrics"] == {"n_seq_max": 4, "isolated_passed": 4, "isolated_total": 4,
                                            "equal_alone_passed": 3, "equal_alone_total": 4, "passed": 1}
    assert bench["personas"]["detail"]["equal_alone"] == [True, False, True, True]
    assert "generation_tokens_per_s" not in bench["timings"]["metrics"]
    assert bench["timings"]["notMeasured"] == ["generation_tokens_per_s"]
    for b in doc["results"]["benchmarks"]:
        assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in b["metrics"].values())


def test_receipt_stage_refuses_to_write_an_invalid_executed_alloy(demo_plan, tmp_path, monkeypatch):
    from compiler.errors import ForgeError
    from compiler.stages import receipt

    tools = tmp_path / "tools-manifest.json"
    tools.write_text(json.dumps({"tools": {"llama-quantize": {"sha256": "c" * 64}}}))
    monkeypatch.setattr(receipt, "build_manifest", lambda *a, **k: tools)
    bad = copy.deepcopy(GATE_REPORT)
    bad["figures"]["mean_kld"] = [0.1, 0.2]  # a list is not a figure
    variant = demo_plan.variants[0]
    inputs = {"text": FakeEntry(tmp_path / "text", {"model.gguf": tiny_gguf()}),
              "gate": FakeEntry(tmp_path / "gate", {"gate.json": json.dumps(bad).encode()})}
    out = FakeEntry(tmp_path / "out", {})
    with pytest.raises(ForgeError, match="mean_kld"):
        receipt.run(variant.steps["receipt"], out, inputs, lambda *a: None,
                    {"variant": variant, "toolchain": demo_plan.toolchain})
    assert not out.file("demo.alloy.json").exists()


def edited_demo(tmp_path, mutate) -> Path:
    data = json.loads(DEMO_ALLOY.read_text())
    mutate(data)
    path = tmp_path / DEMO_ALLOY.name
    path.write_text(json.dumps(data))
    return path


def test_the_modality_stage_adds_vision_and_names_the_checkpoints_own_encoder(tmp_path):
    assert alloy_mod.load(DEMO_ALLOY).vision
    text_only = edited_demo(tmp_path, lambda d: d.update(stages=[s for s in d["stages"] if s["type"] != "modality"]))
    assert not alloy_mod.load(text_only).vision
    from compiler.errors import ForgeError

    foreign = edited_demo(tmp_path, lambda d: d["stages"][0].update(encoderModel="openai/clip-vit-large-patch14"))
    with pytest.raises(ForgeError, match=r"\$\.stages\[0\]\.encoderModel"):
        alloy_mod.load(foreign)
    elsewhere = edited_demo(tmp_path, lambda d: d["stages"][2].update(org="someone-else"))
    with pytest.raises(ForgeError, match="not under its org"):
        alloy_mod.load(elsewhere)


# -- ours is never looser than the published schema -------------------------------------------------

# Keywords the comparison below understands; a published schema using another one fails the test
# instead of being silently ignored.
KNOWN = {"$schema", "$id", "$defs", "$ref", "title", "description", "default", "discriminator", "type",
         "properties", "required", "items", "enum", "const", "pattern", "format", "minimum", "maximum",
         "minItems", "additionalProperties", "oneOf"}
TYPE_OF = {str: "string", bool: "boolean", int: "integer", float: "number"}


def deref(node: dict, root: dict) -> dict:
    while "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target = root
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def values(node: dict) -> set | None:
    if "const" in node:
        return {node["const"]}
    return set(node["enum"]) if "enum" in node else None


def types(node: dict) -> set | None:
    if "type" in node:
        return set(node["type"]) if isinstance(node["type"], list) else {node["type"]}
    branches = node.get("oneOf") or node.get("anyOf")
    if branches and all(set(b) == {"type"} for b in branches):
        return set().union(*(types(b) for b in branches))
    vals = values(node)
    return {TYPE_OF[type(v)] for v in vals} if vals is not None else None


def stage_branches(ours: dict, root: dict) -> dict:
    """type -> the schema ours applies to a stage of that type (its allOf if/then branches)."""
    out = {}
    for rule in ours.get("allOf", []):
        out[rule["if"]["properties"]["type"]["const"]] = deref(rule["then"], root)
    return out


def narrower(pub: dict, ours: dict, pub_root: dict, our_root: dict, path: str) -> list[str]:
    """Where `ours` accepts something `pub` refuses, by `pub`'s own keywords: a list of reasons."""
    pub, ours = deref(pub, pub_root), deref(ours, our_root)
    bad = [f"{path}: published keyword {k!r} not compared" for k in set(pub) - KNOWN]
    if "oneOf" in pub and all("const" in deref(b, pub_root).get("properties", {}).get("type", {})
                              for b in pub["oneOf"]):
        # forge-alloy's AlloyStage: exactly one stage schema per type.
        by_type = {deref(b, pub_root)["properties"]["type"]["const"]: deref(b, pub_root) for b in pub["oneOf"]}
        our_types = values(ours.get("properties", {}).get("type", {}))
        if our_types is None or not our_types <= set(by_type):
            return bad + [f"{path}.type: ours allows {our_types or 'any type'}, published only {sorted(by_type)}"]
        branches = stage_branches(ours, our_root)
        for t in sorted(our_types):
            if t not in branches:
                bad.append(f"{path}[type={t}]: ours has no schema for this stage type")
                continue
            merged = {**ours, **branches[t], "required": sorted(set(ours.get("required", []))
                                                                 | set(branches[t].get("required", [])))}
            merged.pop("allOf", None)
            bad += narrower(by_type[t], merged, pub_root, our_root, f"{path}[type={t}]")
        return bad
    pt, ot = types(pub), types(ours)
    if pt is not None:
        allowed = pt | ({"integer"} if "number" in pt else set())
        if ot is None or not ot <= allowed:
            bad.append(f"{path}: ours allows types {ot or 'any'}, published {sorted(pt)}")
    pv, ov = values(pub), values(ours)
    if pv is not None and (ov is None or not ov <= pv):
        bad.append(f"{path}: ours allows {sorted(ov) if ov else 'any value'}, published only {sorted(pv)}")
    missing = set(pub.get("required", [])) - set(ours.get("required", []))
    if missing:
        bad.append(f"{path}: published requires {sorted(missing)}, ours does not")
    if "pattern" in pub and ours.get("pattern") != pub["pattern"] and not (
            ov and all(re.search(pub["pattern"], v) for v in ov)):
        bad.append(f"{path}: published pattern {pub['pattern']!r}, ours {ours.get('pattern')!r}")
    if "format" in pub and ours.get("format") != pub["format"]:
        bad.append(f"{path}: published format {pub['format']!r}, ours {ours.get('format')!r}")
    for key, tighter in (("minimum", max), ("minItems", max), ("maximum", min)):
        if key in pub and (key not in ours or tighter(ours[key], pub[key]) != ours[key]):
            bad.append(f"{path}: published {key} {pub[key]}, ours {ours.get(key)}")
    our_props, pub_props = ours.get("properties", {}), pub.get("properties", {})
    closed = ours.get("additionalProperties") is False
    for name, sub in pub_props.items():
        if name in our_props:
            bad += narrower(sub, our_props[name], pub_root, our_root, f"{path}.{name}")
        elif not closed:
            bad.append(f"{path}.{name}: published constrains it; ours neither defines nor forbids it")
    pub_extra = pub.get("additionalProperties", True)
    for name in set(our_props) - set(pub_props):
        if pub_extra is False:
            bad.append(f"{path}.{name}: published allows no additional properties")
        elif isinstance(pub_extra, dict):
            bad += narrower(pub_extra, our_props[name], pub_root, our_root, f"{path}.{name}")
    if isinstance(pub_extra, dict) and not closed:
        if not isinstance(ours.get("additionalProperties"), dict):
            bad.append(f"{path}: published restricts additional properties; ours does not")
        else:
            bad += narrower(pub_extra, ours["additionalProperties"], pub_root, our_root, f"{path}.*")
    if "items" in pub:
        if "items" not in ours:
            bad.append(f"{path}: published restricts items; ours does not")
        else:
            bad += narrower(pub["items"], ours["items"], pub_root, our_root, f"{path}[]")
    return bad


def test_our_schema_is_never_looser_than_the_published_one():
    pub, ours = dialect_of_published(), our_schema()
    assert narrower(pub, ours, pub, ours, "$") == []


def test_the_comparison_catches_a_looser_schema():
    pub = dialect_of_published()
    for mutate, expect in [
        (lambda s: s["$defs"]["integrity"]["required"].remove("trustLevel"), "published requires ['trustLevel']"),
        (lambda s: s["$defs"]["integrity"]["properties"]["trustLevel"]["enum"].append("unsigned"), "trustLevel"),
        (lambda s: s["properties"]["source"]["properties"]["architecture"]["enum"].append("Qwen3_5X"), "architecture"),
        (lambda s: s["$defs"]["benchmark"]["properties"]["metrics"].update(additionalProperties=True), "metrics"),
        (lambda s: s["$defs"]["stage"]["properties"]["type"]["enum"].append("source-config"), "type"),
        (lambda s: s["$defs"]["publishStage"]["required"].remove("org"), "published requires ['org']"),
        (lambda s: s["$defs"]["results"].pop("additionalProperties"), "completedAt"),
        (lambda s: s["$defs"]["integrity"]["properties"]["attestedAt"].pop("format"), "attestedAt"),
        # the forge's named variants (Q4_K_L...) are not forge-alloy quant types
        (lambda s: s["$defs"]["quantStage"]["properties"]["quantTypes"].update(items={"$ref": "#/$defs/quantLabel"}),
         "quantTypes[]"),
    ]:
        ours = our_schema()
        mutate(ours)
        found = "\n".join(narrower(pub, ours, pub, ours, "$"))
        assert expect in found, (expect, found)
