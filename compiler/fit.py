"""Plan mode: which Qwen3.5 size and quant fits which tier, before anything is downloaded.

For each shape in shapes/ (the official checkpoints' config.json), a sparse reference GGUF is
made from the config alone (compiler.sizing), every quant's exact file size comes from
llama-quantize --dry-run, and the envelope estimator checks the tier's rules with the tier's
settings and sensory stack. Prints the fit matrix; `--json` writes it too.

    .venv/bin/python -m compiler.fit                          # 0.8b 2b 4b 9b 27b x every quant x every tier
    .venv/bin/python -m compiler.fit --shapes 2b,4b --tiers air
    .venv/bin/python -m compiler.fit --shapes 27b convert.mtp=draft   # the MTP draft in each envelope
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import config, envelope, sizing
from .ggufcheck import read_layout
from .paths import ROOT, build_dir

SHAPES = ("0.8b", "2b", "4b", "9b", "27b")
CALIBRATION_NAME = "forge-calibration-v1.txt"


def references(shape: str, work: Path) -> tuple[Path, Path, Path | None]:
    """Sparse text, projector and (for a shape with an MTP head) draft GGUFs, made once and kept
    under build/plan/."""
    from .synthetic import load_shape, mtp_layers

    folder = work / shape
    spec = load_shape(shape)
    text, mmproj = folder / "text-BF16.gguf", folder / "mmproj-F16.gguf"
    draft = folder / "mtp-BF16.gguf" if mtp_layers(spec) else None
    if text.is_file() and mmproj.is_file() and (draft is None or draft.is_file()):
        return text, mmproj, draft
    ckpt = folder / f"qwen3.5-{shape}"
    shutil.rmtree(ckpt, ignore_errors=True)
    sizing.sparse_checkpoint(spec, ckpt)
    sizing.sparse_reference(ckpt, folder / "text.partial.gguf").rename(text)
    sizing.sparse_reference(ckpt, folder / "mmproj.partial.gguf", mmproj=True).rename(mmproj)
    if draft:
        # convert.mtp=draft ships the head at the conversion type, with the token embedding and
        # output head it reads and writes through: sized by the same converter.
        sizing.sparse_reference(ckpt, folder / "mtp.partial.gguf", draft=True).rename(draft)
    shutil.rmtree(ckpt)
    return text, mmproj, draft


def quantized_layout(ref_layout: dict, dry: dict) -> dict:
    tensors = [dict(t, n_bytes=dry["tensors"].get(t["name"], {"bytes": t["n_bytes"]})["bytes"])
               for t in ref_layout["tensors"]]
    return {"meta": ref_layout["meta"], "tensors": tensors}


def evaluate(shapes, quants, tiers, work: Path, log=print, overrides=()) -> list[dict]:
    """`overrides`: conf overrides every tier is composed with (`convert.mtp=draft` counts the draft)."""
    rows = []
    for shape in shapes:
        log(f"[fit] {shape}: sparse reference GGUFs")
        text_ref, mmproj_ref, draft_ref = references(shape, work)
        draft_bytes = draft_ref.stat().st_size if draft_ref else None
        ref_layout, vision_layout = read_layout(text_ref), read_layout(mmproj_ref)
        vision = envelope.vision_shape(vision_layout)
        for q in quants:
            qcfg = config.compose("m4", q, [])["quant"]
            # Forge quantizes every type but Q8_0 with the calibration imatrix (conf/quant imatrix).
            meta = sizing.imatrix_metadata(CALIBRATION_NAME) if qcfg["imatrix"] != "none" else None
            extra = []
            if qcfg["output_type"]:
                extra += ["--output-tensor-type", qcfg["output_type"]]
            if qcfg["token_embedding_type"]:
                extra += ["--token-embedding-type", qcfg["token_embedding_type"]]
            dry = sizing.dry_run(text_ref, qcfg["llama_type"], extra=extra, added_meta=meta)
            text = envelope.text_shape(quantized_layout(ref_layout, dry))
            files = dry["file_bytes"] + mmproj_ref.stat().st_size
            row = {"shape": shape, "quant": qcfg["label"], "text_file_bytes": dry["file_bytes"],
                   "mmproj_file_bytes": mmproj_ref.stat().st_size, "mtp_draft_file_bytes": draft_bytes,
                   "tiers": {}}
            for tier in tiers:
                cfg = config.compose(tier, q, list(overrides))
                rt = envelope.runtime(cfg)
                gpu = bool(cfg["backend"]["gpu"])
                terms = envelope.estimate(text, vision, rt, gpu)
                counted = files
                if cfg["convert"]["mtp"] == "draft" and draft_bytes:
                    terms.append(envelope.draft_term(draft_bytes, gpu))
                    counted += draft_bytes
                verdict = envelope.check(terms, cfg, counted)
                worst = min(verdict["rules"], key=lambda r: r["margin"])
                row["tiers"][tier] = {"fits": verdict["passed"], "with_draft": counted > files, "total_bytes": verdict["total_bytes"],
                                      "gpu_resident_bytes": verdict["gpu_resident_bytes"],
                                      "tightest_rule": worst["rule"], "margin_bytes": worst["margin"]}
            rows.append(row)
            log(f"[fit] {shape} {qcfg['label']}: " + ", ".join(
                f"{t} {'fits' if r['fits'] else 'no'} ({r['margin_bytes'] / envelope.GiB:+.2f} GiB)"
                for t, r in row["tiers"].items()))
    return rows


def render(rows: list[dict], tiers: list[str]) -> str:
    head = "| shape | quant | text GGUF | mmproj | MTP draft | " + " | ".join(
        f"{t}: fits? (tightest margin)" for t in tiers) + " |"
    lines = [head, "|" + "---|" * (5 + len(tiers))]
    for r in rows:
        cells = []
        for t in tiers:
            c = r["tiers"][t]
            cells.append(f"{'yes' if c['fits'] else 'NO'} ({c['margin_bytes'] / envelope.GiB:+.2f} GiB)")
        lines.append(f"| {r['shape']} | {r['quant']} | {r['text_file_bytes'] / 1e9:.3f} GB | "
                     f"{r['mmproj_file_bytes'] / 1e9:.3f} GB | "
                     + (f"{r['mtp_draft_file_bytes'] / 1e9:.3f} GB" if r.get("mtp_draft_file_bytes") else "-")
                     + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fit matrix of Qwen3.5 sizes x quants x tiers, from config.json alone")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quants", default="all")
    ap.add_argument("--tiers", default=",".join(config.choices("tier")))
    ap.add_argument("--json", help="write the rows here as JSON")
    ap.add_argument("overrides", nargs="*", help="conf overrides for every tier, e.g. convert.mtp=draft "
                                                 "(the MTP draft then counts in each envelope)")
    args = ap.parse_args(argv)
    quants = config.choices("quant") if args.quants == "all" else [config.resolve_quant(q, "--quants")
                                                                   for q in args.quants.split(",")]
    tiers = args.tiers.split(",")
    rows = evaluate(args.shapes.split(","), quants, tiers, build_dir() / "plan", log=lambda m: print(m, file=sys.stderr),
                    overrides=args.overrides)
    print(render(rows, tiers))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
