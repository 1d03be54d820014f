"""receipt: the executed alloy -- the recipe plus forge-alloy `results` (integrity: trustLevel, code,
modelHash, alloyHash, attestedAt, datasets, fileHashes; benchmarks) -- written per variant and
checked against schema/alloy.schema.json, which is never looser than the published forge-alloy
schema. The files it lists carry the names published repos use (`<name>-<QUANT>.gguf`,
`mmproj-<name>-<TYPE>.gguf`)."""
from __future__ import annotations

import datetime
import hashlib
import json

from .. import __version__
from ..alloy import canonical_json, validate
from ..errors import ForgeError
from ..ggufcheck import read_layout
from ..toolchain import ARCHIVE_SHA256, LLAMA_CPP_COMMIT, build_manifest


def model_hash(file_hashes: list[dict]) -> str:
    """forge-alloy's modelHash: sha256 of the canonical JSON of [{filename, sha256}] sorted by
    filename; sizes stay in fileHashes but are not hashed."""
    pairs = sorted(({"filename": f["filename"], "sha256": f["sha256"]} for f in file_hashes),
                   key=lambda f: f["filename"])
    return "sha256:" + hashlib.sha256(canonical_json(pairs)).hexdigest()


def file_hashes(variant, inputs) -> list[dict]:
    out = []
    for role, name in (("text", variant.text_filename), ("mmproj", variant.mmproj_filename),
                       ("draft", variant.draft_filename)):
        if role in inputs:
            f = inputs[role].manifest()["files"][0]
            out.append({"filename": name, "sha256": f["sha256"], "size": f["size"]})
    return out


def datasets(variant) -> list[dict]:
    """The texts the variant's bytes and figures depend on, by hash."""
    out = []
    imatrix = variant.steps.get("imatrix")
    if imatrix:
        out.append({"name": imatrix.params["corpus_name"], "role": "imatrix-calibration",
                    "hash": "sha256:" + imatrix.params["corpus_sha256"]})
    g = variant.steps["gate"].params
    out.append({"name": g["file"].split("/")[-1], "role": "quality-gate-heldout", "hash": "sha256:" + g["sha256"]})
    return out


def benchmark(gate_entry) -> dict:
    """The quality gate's figures as a forge-alloy results.benchmarks entry."""
    report = json.loads(gate_entry.file("gate.json").read_text())
    return {"name": "kl-divergence-vs-reference", "dataset": report["heldout"].split("/")[-1],
            "datasetHash": "sha256:" + report["heldoutSha256"], "ctx": report["ctx"], "chunks": report["chunks"],
            "metrics": report["figures"],
            "thresholds": {r["figure"]: {r["direction"]: r["threshold"]} for r in report["checks"]},
            "passed": report["passed"]}


def smoke_benchmarks(entry) -> list[dict]:
    """The smoke report's figures as benchmarks entries, and the vision preservation hashes."""
    if entry is None:
        return []
    r = json.loads(entry.file("smoke.json").read_text())
    pers = r["personas"]
    # forge-alloy metrics are figures: the per-sequence checks become counts and a 0/1 verdict,
    # and the per-sequence lists go to `detail`.
    personas = {"n_seq_max": pers["n_seq_max"],
                "isolated_passed": sum(pers["isolated"]), "isolated_total": len(pers["isolated"]),
                "equal_alone_passed": sum(pers["equal_alone"]), "equal_alone_total": len(pers["equal_alone"]),
                "passed": int(pers["passed"])}
    # A timing the run could not take (no tokens timed) is left out of the figures and named.
    timings = {"name": "timings", "backend": r["backend"],
               "metrics": {k: v for k, v in r["timings"].items() if v is not None}}
    if len(timings["metrics"]) < len(r["timings"]):
        timings["notMeasured"] = sorted(k for k, v in r["timings"].items() if v is None)
    # A check that was only reported (random weights see nothing) carries its figure and
    # "gated": false, never a verdict: "passed" stands only where a limit was applied.
    v = r["vision"]
    vision = {"name": "vision-suite", "metrics": {"score": v["score"], "items": len(v["items"])}, "gated": v["gated"]}
    if v["gated"]:
        vision["metrics"]["min_score"] = v["min_score"]
        vision["passed"] = v["score"] >= v["min_score"]
    agreement = None
    if v.get("reference"):
        ref = v["reference"]
        agreement = {"name": "projector-agreement", "metrics": {"agreement": ref["agreement"], "items": len(ref["answers"]),
                                                                "reference_score": ref["score"]},
                     "detail": {"reference": ref["projector"], "differ": ref["differ"]}, "gated": ref["gated"]}
        if ref["gated"]:
            agreement["metrics"]["min_agreement"] = ref["min_agreement"]
            agreement["passed"] = ref["agreement"] >= ref["min_agreement"]
    return [
        vision, *([agreement] if agreement else []),
        {"name": "personas", "metrics": personas,
         "detail": {"isolated": pers["isolated"], "equal_alone": pers["equal_alone"]},
         "gated": pers["alone_gated"], "passed": pers["passed"]},
        timings,
        {"name": "vision-preservation", "metrics": {
            "towerSha256": r["preservation"]["tower"]["sha256"], "towerTensors": r["preservation"]["tower"]["tensors"],
            "projectorSha256": r["preservation"]["projector"]["sha256"],
            "projectorTensors": r["preservation"]["projector"]["tensors"]},
         # Checked before any quantize: the mmproj step refuses a projector missing a tower tensor.
         "gated": True, "passed": True},
    ]


def draft_benchmark(entry) -> list[dict]:
    """The MTP draft's decode beside the text model (stages/draft_run.py): gated on loading and
    drafting; its acceptance a figure; equality with the plain decode gated where the source sees."""
    if entry is None:
        return []
    r = json.loads(entry.file("draft.json").read_text())
    s = r["stats"]
    metrics = {"drafted": s["n_drafted"], "accepted": s["n_accept"], "decoded": s["n_predict"],
               "draftMax": s["n_draft_max"], "sameAsPlainDecode": int(r["same_as_plain"])}
    if r["acceptance"] is not None:
        metrics["acceptance"] = round(r["acceptance"], 4)
    return [{"name": "mtp-draft-decode", "backend": r["backend"], "metrics": metrics,
             "detail": {"prompt": r["prompt"], "sameAsPlainGated": r["same_as_plain_gated"],
                        "tool": "llama-speculative-simple --spec-type draft-mtp"},
             "gated": True, "passed": True}]


def run(step, out, inputs, log, ctx):
    variant = ctx["variant"]
    files = file_hashes(variant, inputs)
    tools = json.loads(build_manifest().read_text())["tools"]
    executed = json.loads(json.dumps(variant.alloy.data))
    attested_at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    executed["results"] = {
        "integrity": {
            # The forge vouches for its own hashes and signs nothing: forge-alloy's lowest level.
            # "verified" needs a third-party audit and "enclave" a TEE; neither is true here.
            "trustLevel": "self-attested",
            "code": {
                "runner": "forge-compiler",
                "version": __version__,
                "binaryHash": "sha256:" + tools["llama-quantize"]["sha256"],
                "sourceHash": "sha256:" + ARCHIVE_SHA256,
                "commit": LLAMA_CPP_COMMIT,
            },
            "modelHash": model_hash(files),
            "alloyHash": variant.alloy.alloy_hash,
            "datasets": datasets(variant),
            "attestedAt": attested_at,
            "fileHashes": files,
        },
        "benchmarks": [benchmark(inputs["gate"])] + smoke_benchmarks(inputs.get("smoke")) + draft_benchmark(
            inputs.get("draft_run")),
        "forge": {
            "variant": variant.id,
            "tier": variant.config["tier"]["name"],
            "quant": variant.llama_type,
            "backend": variant.config["backend"]["name"],
            "overrides": variant.overrides,
            "toolchain": ctx["toolchain"],
            "keys": {role: s.key for role, s in variant.steps.items() if role not in ("receipt", "envelope")},
        },
    }
    # The template the checkpoint's tokenizer carries, as the converter wrote it into the text GGUF:
    # the registry ships this one (named by its hash), never a stand-in.
    template = read_layout(inputs["text"].output())["meta"].get("tokenizer.chat_template")
    if not template:
        raise ForgeError("the text GGUF carries no tokenizer.chat_template", where=str(inputs["text"].output()),
                         hint="the checkpoint needs its chat template (tokenizer_config.json or chat_template.jinja); "
                              "the product prompts each model with the template it was trained with")
    out.path("chat_template.jinja").write_text(template)
    path = out.path(f"{variant.alloy.name}.alloy.json")
    # A receipt the product's pipeline would refuse is not written.
    validate(executed, "alloy.schema.json", f"{step.task}: executed alloy")
    path.write_text(json.dumps(executed, indent=2) + "\n")
    log(f"modelHash {executed['results']['integrity']['modelHash']}")
