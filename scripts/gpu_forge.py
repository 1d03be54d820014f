#!/usr/bin/env python3
"""On a GPU machine: run the project's own stages with a GPU build of the pinned llama.cpp, check
full offload, and measure VRAM against the envelope's estimate for the corvette tier.

Not a test (CI has no GPU). scripts/gpu/run_all.sh runs it on the lent machine after
scripts/gpu/build.sh has built the libraries (docs/gpu/results.md, "How to re-run"):

    python3 scripts/gpu_forge.py --prepare [--shapes ...]          # CPU work, before the GPU builds are done
    python3 scripts/gpu_forge.py --backend cuda --lib /tmp/forge-gpu/prefix-cuda/lib --out $OUT
    python3 scripts/gpu_forge.py --render gpu-cuda.json gpu-vulkan.json    # the markdown table
    python3 scripts/gpu_forge.py --digest                           # the fingerprint of the code it runs

Shapes (--shapes; default: demo and every shapes/*.json):
  demo  -- the demo alloy through `doit` at tier corvette with backend=<backend> and
           smoke.gpu=required: the trained source, convert, imatrix, quantize, gate, envelope, smoke
           (the smoke fails the variant if any layer, the output or the projector is not on the GPU);
  <shape> -- a real Qwen3.5 layout (shapes/<shape>.json) as a sparse Q4_K_M GGUF (every tensor's
           type and size from llama-quantize --dry-run, zeros for data: llama.cpp allocates exactly
           what it would for real weights) plus the real-layout projector: smoke_run and measure on
           the GPU. Zero weights make the smoke's outputs trivial; placement, buffers and speed are real.
For each: VRAM as the driver reports it (used before and after loading), llama.cpp's per-device
buffer report, and the envelope's GPU-resident estimate, with the error in %.

--prepare does the CPU-only part once for every backend: `doit toolchain` and the demo's training
side by side, every shape's sparse reference and sparse Q4_K_M, then the demo's CPU steps (through
gate, and the projectors). Each backend's run then starts at the GPU steps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 2**20


def sh(cmd, env, log, timeout=1800):
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    log.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}\n-- rc {proc.returncode} in "
              f"{time.monotonic() - t0:.1f} s\n")
    log.flush()
    return proc


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON report in the output")


def gpu_resident(terms: list[dict]) -> int:
    return sum(t["bytes"] for t in terms if t["where"] == "gpu")


def measured_gpu(m: dict) -> int:
    """llama.cpp's GPU buffers (every non-host device) plus the projector's weights and compute."""
    from compiler.placement import is_host

    text = sum(mib for dev, kinds in m["buffers_by_device_mib"].items() if not is_host(dev)
               for kind, mib in kinds.items() if kind != "output")
    proj = (m["projector"].get("weights_mib") or 0) + (m["projector"].get("compute_mib") or 0)
    return int((text + proj) * MiB)


def measure(text, mmproj, rt, env, log) -> dict:
    proc = sh([sys.executable, "-m", "compiler.measure", str(text), str(mmproj), str(rt["n_ctx"]),
               str(rt["n_seq_max"]), str(rt["n_batch"]), str(rt["max_image_px"]), "gpu"], env, log)
    return last_json(proc.stdout)


def smoke(text, mmproj, rt, env, log, work: Path) -> dict:
    params = work / "smoke-params.json"
    params.write_text(json.dumps({"n_ctx": rt["n_ctx"], "n_seq_max": rt["n_seq_max"], "n_batch": rt["n_batch"],
                                  "kv_unified": True, "gpu": GPU_MODE, "max_tokens": 8, "image_px": 448,
                                  "vision_items": 4}))
    proc = sh([sys.executable, "-m", "compiler.smoke_run", str(text), str(mmproj), str(params)], env, log)
    return last_json(proc.stdout)


def row(shape, backend, place, est_terms, m, smoke_report, extra=None) -> dict:
    from compiler import placement

    # llama.cpp's buffer report lists no backend runtime (context, workspaces): compare it with the
    # estimate's buffer terms, and the device's real memory growth with the whole estimate.
    est = gpu_resident(est_terms)
    runtime = sum(t["bytes"] for t in est_terms if t["id"] == "backend_runtime")
    meas = measured_gpu(m)
    growth = m["vram_used_mib"]["growth"]
    t = smoke_report.get("timings", {})
    return {"shape": shape, "backend": backend,
            "layers_offloaded": place["layers_offloaded"], "projector_device": place["projector_device"],
            "offload_problems": placement.problems(place),
            "estimate_gpu_mib": round(est / MiB, 1), "backend_runtime_mib": round(runtime / MiB, 1),
            "llama_gpu_buffers_mib": round(meas / MiB, 1),
            "error_vs_buffers_pct": round(100 * (est - runtime - meas) / meas, 2) if meas else None,
            "vram_growth_mib": growth,
            "error_vs_vram_pct": round(100 * (est / MiB - growth) / growth, 2) if growth else None,
            "prompt_tok_s": t.get("prompt_tokens_per_s"), "gen_tok_s": t.get("generation_tokens_per_s"),
            "batched_gen_tok_s": t.get("batched_generation_tokens_per_s"),
            "image_encode_ms": t.get("image_encode_ms"),
            "isolated": smoke_report.get("personas", {}).get("isolated"), **(extra or {})}


GPU_MODE = "required"


def run_demo(backend, env, work, log) -> dict:
    """The demo alloy through doit, every stage, at tier corvette on this backend."""
    t0 = time.monotonic()
    proc = sh(doit_cmd(*demo_args(backend)), env, log)
    stages = dict(re.findall(r"^  (\S+?):\S+: done in ([\d.]+) s", proc.stdout, re.M))
    if proc.returncode != 0:
        return {"shape": "demo (tiny)", "backend": backend, "error": (proc.stdout + proc.stderr)[-1500:],
                "stages_s": stages}
    newest = lambda paths: max(paths, key=lambda p: p.stat().st_mtime)  # this run's, where several are kept
    vdir = Path(env["FORGE_BUILD_DIR"]) / "variants"
    folder = newest([p for p in vdir.iterdir() if p.name.startswith("demo@") and f"backend-{backend}" in p.name])
    text = next(folder.glob("demo-*.gguf"))
    mmproj = next(folder.glob("mmproj-*.gguf"))
    store = Path(env["FORGE_BUILD_DIR"]) / "store"
    smoke_json = newest([p for p in store.glob("smoke/*/smoke.json")
                         if json.loads((p.parent / "manifest.json").read_text())["params"]["run"]["backend"] == backend])
    env_json = newest([p for p in store.glob("envelope/*/envelope.json") if json.loads(p.read_text())["backend"] == backend])
    report = json.loads(smoke_json.read_text())
    est = json.loads(env_json.read_text())
    rt = est["runtime"]
    m = measure(text, mmproj, rt, env, log)
    place = report["placement"]
    return row("demo (tiny)" + "".join(f" {o}" for o in DEMO_OVERRIDES), backend, place, est["terms"], m, report,
               {"stages_s": stages, "doit_s": round(time.monotonic() - t0, 1), "smoke_passed": report["passed"],
                "measured": m})


def run_sparse(shape, backend, env, work, log) -> dict:
    """A real layout as a sparse Q4_K_M GGUF: smoke_run and measure on the GPU, the estimate beside."""
    from compiler import config, envelope, sizing
    from compiler.fit import quantized_layout, references
    from compiler.ggufcheck import read_layout
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_envelope import sparse_quantized

    t0 = time.monotonic()
    text_ref, mmproj_ref, _ = references(shape, work / "plan")  # shared by both backends
    dry = sizing.dry_run(text_ref, "Q4_K_M")
    qpath = work / "plan" / shape / "text-Q4_K_M.sparse.gguf"
    if not qpath.is_file():
        sparse_quantized(text_ref, dry, qpath)
    prep_s = round(time.monotonic() - t0, 1)
    cfg = config.compose("corvette", "q4_k_m", [f"backend={backend}"])
    rt = envelope.runtime(cfg)
    text = envelope.text_shape(quantized_layout(read_layout(text_ref), dry))
    vision = envelope.vision_shape(read_layout(mmproj_ref))
    terms = envelope.estimate(text, vision, rt, gpu=True)
    report = smoke(qpath, mmproj_ref, rt, env, log, work)
    m = measure(qpath, mmproj_ref, rt, env, log)
    return row(f"{shape} (sparse Q4_K_M)", backend, report["placement"], terms, m, report,
               {"prep_s": prep_s, "file_mib": round(qpath.stat().st_size / MiB, 1), "measured": m,
                "smoke_error": report.get("personas", {}).get("error")})


DEMO_OVERRIDES: list[str] = []  # --demo-override: more doit overrides for the demo (a diagnosis, never the record)


def demo_args(backend: str) -> list[str]:
    return ["alloy=demo", "tier=corvette", f"backend={backend}", f"smoke.gpu={GPU_MODE}", *DEMO_OVERRIDES]


# The demo's steps that need no GPU build (keys shared by every backend: only envelope, smoke and
# receipt are keyed by it). image-fit and envelope load llama.cpp through the binding: left to the run.
DEMO_CPU_TASKS = ["gate", "mmproj"]


def doit_cmd(*args) -> list:
    return [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT), *args]


def prepare(shapes: list[str], env: dict, work: Path, log) -> dict:
    """The CPU-only work, before any GPU build is needed. Returns return codes and any errors;
    `log` is a file (commands and their output) whose lines starting with [prepare] go to stdout."""
    from compiler import sizing
    from compiler.fit import references
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_envelope import sparse_quantized

    t0, out = time.monotonic(), {"errors": {}}
    spawn = lambda cmd, name: subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(work / f"{name}.log", "w"),
                                               stderr=subprocess.STDOUT)
    toolchain = spawn(doit_cmd("toolchain"), "prepare-toolchain")
    demo = demo_args("cuda")  # the CPU steps' keys do not depend on the backend
    training = spawn(doit_cmd(*demo, "source"), "prepare-source") if "demo" in shapes else None
    sparse = [s for s in shapes if s != "demo"]
    for shape in sparse:  # the converter is Python: no compiled tool needed yet
        try:
            references(shape, work / "plan")
            log(f"[prepare] {shape}: sparse references at {time.monotonic() - t0:.0f} s")
        except Exception as e:  # noqa: BLE001  (the run reports it again for its shape)
            out["errors"][shape] = f"{type(e).__name__}: {e}"
    out["toolchain_rc"] = toolchain.wait()
    log(f"[prepare] doit toolchain rc={out['toolchain_rc']} at {time.monotonic() - t0:.0f} s")
    for shape in sparse:
        if shape in out["errors"]:
            continue
        try:
            text_ref, _, _ = references(shape, work / "plan")
            qpath = work / "plan" / shape / "text-Q4_K_M.sparse.gguf"
            if not qpath.is_file():
                sparse_quantized(text_ref, sizing.dry_run(text_ref, "Q4_K_M"), qpath)
            log(f"[prepare] {shape}: sparse Q4_K_M at {time.monotonic() - t0:.0f} s")
        except Exception as e:  # noqa: BLE001
            out["errors"][shape] = f"{type(e).__name__}: {e}"
    if training is not None:
        out["source_rc"] = training.wait()
        log(f"[prepare] demo source (training) rc={out['source_rc']} at {time.monotonic() - t0:.0f} s")
        proc = sh(doit_cmd(*demo, *DEMO_CPU_TASKS), env, log)
        out["demo_cpu_rc"] = proc.returncode
        log(f"[prepare] demo CPU steps rc={proc.returncode} at {time.monotonic() - t0:.0f} s")
        if proc.returncode:
            out["errors"]["demo"] = (proc.stdout + proc.stderr)[-1500:]
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# What the run's results depend on, besides llama.cpp's source (its archive sha256 is in the build
# summary): the same digest here and in a result's JSON means the same code ran.
DIGEST_PATHS = ("compiler", "conf", "shapes", "alloys", "dodo.py", "scripts/gpu", "scripts/gpu_forge.py",
                "scripts/bench_envelope.py")


def tree_digest(root: Path = ROOT) -> str:
    """sha256 of those paths' files, names and bytes: no dotfiles (the lock's file locks, which a run
    creates beside the lock: git ignores them and they do not travel), no bytecode."""
    h = hashlib.sha256()
    for top in DIGEST_PATHS:
        base = root / top
        files = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def all_shapes() -> list[str]:
    sizes = sorted((p.stem for p in (ROOT / "shapes").glob("*.json")), key=lambda s: float(s.rstrip("b")))
    return ["demo", *sizes]


def render(results: list[dict]) -> str:
    """One markdown table from the JSON of one or more backends."""
    lines = [f"GPU: {results[0]['card']} ({results[0]['host']})", "",
             "| backend | model | layers on GPU | projector on | estimate (GPU) MiB | llama.cpp GPU buffers MiB | error | "
             "VRAM growth MiB | error | prompt tok/s | gen tok/s (1 seq / batched) | image encode ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['shape']} | failed: {r['error'][-120:]!r} |||||||||")
                continue
            lo = r["layers_offloaded"]
            pct = lambda v: "-" if v is None else f"{v:+.2f}%"
            lines.append(
                f"| {r['backend']} | {r['shape']} | {f'{lo[0]}/{lo[1]}' if lo else '-'} | {r['projector_device']} | "
                f"{r['estimate_gpu_mib']} | {r['llama_gpu_buffers_mib']} | {pct(r['error_vs_buffers_pct'])} | "
                f"{r['vram_growth_mib'] if r['vram_growth_mib'] is not None else '-'} | {pct(r['error_vs_vram_pct'])} | "
                f"{r['prompt_tok_s']} | {r['gen_tok_s']} / {r['batched_gen_tok_s']} | {r['image_encode_ms']} |")
    return "\n".join(lines) + "\n"


class Echo:
    """A log file that is also called with progress lines, which go to stdout as well."""

    def __init__(self, f):
        self.f = f

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.write(line + "\n")

    def write(self, text: str) -> None:
        self.f.write(text)
        self.f.flush()

    def flush(self) -> None:
        self.f.flush()


def machine() -> dict:
    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    import torch  # the image's (the demo trains with it)

    return {"card": cmd("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
            or "no NVIDIA GPU (nvidia-smi not found)",
            "host": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "torch": torch.__version__, "tree_digest": tree_digest(),
            "tree": (Path(os.environ.get("CARRY", ROOT / ".gpu-carry")) / "tree.txt").read_text().strip()
            if (Path(os.environ.get("CARRY", ROOT / ".gpu-carry")) / "tree.txt").is_file() else None}


def main() -> int:
    if sys.argv[1:2] == ["--render"]:
        print(render([json.loads(Path(p).read_text()) for p in sys.argv[2:]]), end="")
        return 0
    if sys.argv[1:2] == ["--digest"]:
        print(tree_digest())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--prepare", action="store_true", help="the CPU-only work (toolchain, demo CPU steps, sparse files)")
    ap.add_argument("--backend", choices=["cuda", "vulkan"])
    ap.add_argument("--lib", help="folder with libllama.so, libmtmd.so and the ggml libraries")
    ap.add_argument("--shapes", default=",".join(all_shapes()), help="demo and/or shapes/*.json names")
    ap.add_argument("--gpu-mode", default="required", help="smoke.gpu: required on the GPU machine; auto to try the "
                    "script on a CPU-only machine")
    ap.add_argument("--demo-override", action="append", default=[], help="another doit override for the demo "
                    "(a diagnosis: e.g. smoke.gate_alone=false; the row's name says so)")
    ap.add_argument("--work", default="/tmp/forge-gpu/work")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "build" / "gpu")))
    args = ap.parse_args()
    if not args.prepare and not (args.backend and args.lib):
        ap.error("--backend and --lib (or --prepare)")
    # One build dir for both backends: the demo's source, conversion and quantization are made once;
    # envelope and smoke are keyed by the backend and run for each.
    global GPU_MODE
    GPU_MODE = args.gpu_mode
    DEMO_OVERRIDES.extend(args.demo_override)
    work = Path(args.work)
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    env = {**os.environ, "FORGE_BUILD_DIR": str(work / "build"), "FORGE_REGISTRY": str(work / "registry.json"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.prepare:
        os.environ.update({k: env[k] for k in ("FORGE_BUILD_DIR", "FORGE_REGISTRY")})
        with open(out / "prepare.log", "w") as log:
            report = prepare(shapes, env, work, Echo(log))
        (out / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report))
        return 0 if not report["errors"] and not report.get("toolchain_rc") else 1
    env.update({"LLAMA_CPP_LIB_PATH": args.lib, "MTMD_CPP_LIB": args.lib})
    os.environ.update({k: env[k] for k in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB", "FORGE_BUILD_DIR", "FORGE_REGISTRY")})
    rows = []
    t_all = time.monotonic()
    about = machine()  # before the run: the digest of the code as it starts
    with open(out / f"gpu-{args.backend}.log", "w") as log:
        for shape in shapes:
            print(f"[gpu] {args.backend} {shape} ...", flush=True)
            t0 = time.monotonic()
            try:
                r = run_demo(args.backend, env, work, log) if shape == "demo" else run_sparse(shape, args.backend, env, work, log)
            except Exception as e:  # keep what the other shapes give
                r = {"shape": shape, "backend": args.backend, "error": f"{type(e).__name__}: {e}"}
            r["seconds"] = round(time.monotonic() - t0, 1)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "measured"}), flush=True)
    result = {**about, "backend": args.backend, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "seconds": round(time.monotonic() - t_all, 1), "rows": rows}
    (out / f"gpu-{args.backend}{'-diag' if DEMO_OVERRIDES else ''}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all("error" not in r and not r.get("offload_problems") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
