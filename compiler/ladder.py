"""device_target_ladder: from a hardware profile to a tier and the best registry entry that fits,
with the reason in words; and a probe of the real host.

    .venv/bin/python -m compiler.ladder            # this machine: profile, tier, chosen entry

Pure decision, real probe: `choose(profile, models)` reads nothing; `probe()` reads psutil, the
CPU brand string (sysctl on macOS), nvidia-smi and vulkaninfo where present. A machine with no
Metal, CUDA or Vulkan GPU gets a clear "no GPU tier" -- the product never falls back to the CPU.
"""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 10**9
MB = 10**6
# Metal's recommendedMaxWorkingSetSize as a share of unified memory (FACTS.md, "Apple Silicon").
METAL_SHARE = [(16, 0.67), (18, 0.74), (36, 0.78), (128, 0.84)]
RULES = "seed"  # conf/ladder/<name>.yaml: seed (the forge's tiers, the default) or continuum-pr1003


def load_rules(name: str = RULES) -> dict:
    """A set of tier rules from conf/ladder/, its rules checked for the shape tier_of reads."""
    import yaml

    from .errors import ForgeError
    from .paths import conf_dir

    path = conf_dir() / "ladder" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(q.stem for q in (conf_dir() / "ladder").glob("*.yaml"))
        raise ForgeError(f"unknown ladder rules {name!r}: {path} does not exist (known: {', '.join(known)})")
    rules = yaml.safe_load(path.read_text())
    # Checked here, so a malformed rule is named rather than met as a KeyError mid-decision.
    for group, floor in (("apple", ("min_mb", "min_gb")), ("nvidia", ("min_vram_gb",))):
        for i, r in enumerate((rules.get(group) or []) if isinstance(rules, dict) else [None]):
            picks = [k for k in ("tier", "max_parameters", "refuse") if isinstance(r, dict) and r.get(k)]
            if not isinstance(r, dict) or not any(f in r for f in floor) or len(picks) != 1 or "why" not in r:
                raise ForgeError(f"{path} {group}[{i}]: a rule needs a floor ({' or '.join(floor)}), exactly one "
                                 f"of tier / max_parameters / refuse, and why; found {r!r}")
    return rules


@dataclass
class Profile:
    os: str                                 # macos, linux, windows
    cpu_brand: str
    total_memory_gb: float
    available_memory_gb: float
    gpu_vendor: str | None = None           # apple, nvidia, amd, intel, None
    gpu_name: str | None = None
    vram_gb: float | None = None            # discrete cards
    free_vram_gb: float | None = None
    metal_working_set_gb: float | None = None
    vulkan_devices: list = field(default_factory=list)


@dataclass
class Decision:
    tier: str | None
    entry: str | None
    backend: str | None
    reason: str


def metal_share(total_gb: float) -> float:
    """Interpolated working-set share for a unified memory size (below 16 GiB: the 16 GiB share)."""
    pts = METAL_SHARE
    if total_gb <= pts[0][0]:
        return pts[0][1]
    for (a, fa), (b, fb) in zip(pts, pts[1:]):
        if total_gb <= b:
            return fa + (fb - fa) * (total_gb - a) / (b - a)
    return pts[-1][1]


def apple_silicon(brand: str) -> bool:
    return bool(re.search(r"\bApple M\d", brand))


@dataclass
class Pick:
    """What a set of rules makes of the hardware alone: a tier (the seed's rules) or a largest model
    size (the product's), the backend, and why -- or a refusal (backend None)."""
    tier: str | None
    backend: str | None
    why: str
    max_parameters: int | None = None


def tier_of(p: Profile, rules: dict | None = None) -> Pick:
    rules = rules or load_rules()
    if p.gpu_vendor == "apple" or apple_silicon(p.cpu_brand):
        for r in rules.get("apple") or []:
            if p.total_memory_gb * 1000 >= r.get("min_mb", r.get("min_gb", 0) * 1000):
                why = f"Apple Silicon with {p.total_memory_gb:g} GB unified memory ({r['why']})"
                if r.get("refuse"):
                    return Pick(None, None, f"{why}: rules {rules['name']}")
                return Pick(r.get("tier"), "metal", why, r.get("max_parameters"))
    if p.os == "macos":
        return Pick(None, None, (f"an Intel Mac ({p.cpu_brand}): no Apple GPU for Metal and no CUDA; "
                                 "the product needs Apple Silicon or an NVIDIA GPU"))
    if p.gpu_vendor == "nvidia" and p.vram_gb:
        name = p.gpu_name or "GPU"
        why = f"{'' if name.startswith('NVIDIA') else 'NVIDIA '}{name} with {p.vram_gb:g} GB VRAM"
        for r in rules.get("nvidia") or []:
            if p.vram_gb >= r["min_vram_gb"]:
                return Pick(r.get("tier"), "cuda", why + (f" ({r['why']})" if r.get("why") else ""),
                            r.get("max_parameters"))
        return Pick(None, "cuda", why + " (below the corvette tier's 24 GB; smaller entries may fit)")
    if p.vulkan_devices and p.vram_gb:
        return Pick(None, "vulkan", f"a Vulkan GPU ({p.vulkan_devices[0]}) with {p.vram_gb:g} GB")
    return Pick(None, None, "no Metal, CUDA or Vulkan GPU on this machine; the product never falls back to the CPU")


def parameters_of(entry: dict) -> int | None:
    params = entry.get("parameters")
    return None if not params else params["text"] + (params.get("projector") or 0)


def fits(entry: dict, p: Profile, backend: str) -> tuple[bool, str]:
    env = entry["envelope"]
    hints = entry["device_hints"]
    if backend not in entry["backends"]:
        return False, f"built for {', '.join(entry['backends'])}, not {backend}"
    if backend == "metal":
        ws = p.metal_working_set_gb or p.total_memory_gb * metal_share(p.total_memory_gb)
        if hints.get("min_unified_memory_gb") and hints["min_unified_memory_gb"] > p.total_memory_gb + 0.5:
            return False, f"needs {hints['min_unified_memory_gb']} GB unified memory, the machine has {p.total_memory_gb:g}"
        if env["gpu_resident_bytes"] / GB > ws:
            return False, f"{env['gpu_resident_bytes'] / GB:.1f} GB on the GPU exceeds the {ws:.1f} GB working set"
        if env["total_bytes"] / GB > p.available_memory_gb:
            return False, (f"needs {env['total_bytes'] / GB:.1f} GB now, only {p.available_memory_gb:g} GB "
                           "is available at the moment")
        return True, "fits"
    vram = p.free_vram_gb if p.free_vram_gb is not None else p.vram_gb
    if not vram:
        return False, "no VRAM figure"
    if env["gpu_resident_bytes"] / GB > vram:
        return False, f"{env['gpu_resident_bytes'] / GB:.1f} GB on the GPU exceeds {vram:g} GB of free VRAM"
    host = env["total_bytes"] - env["gpu_resident_bytes"]
    if host / GB > p.available_memory_gb:
        return False, f"needs {host / GB:.1f} GB of host memory, {p.available_memory_gb:g} GB available"
    return True, "fits"


def choose(p: Profile, models: dict, rules: dict | None = None) -> Decision:
    pick = tier_of(p, rules)
    tier, backend, why = pick.tier, pick.backend, pick.why
    if backend is None:
        return Decision(None, None, None, why)
    candidates = dict(models)
    if pick.max_parameters:
        # The product's rules name a model size: entries larger than it are not candidates.
        too_big = [a for a, e in models.items() if (parameters_of(e) or 0) > pick.max_parameters]
        candidates = {a: e for a, e in models.items() if a not in too_big}
        why += f"; at most {pick.max_parameters / 1e9:.2f}B parameters"
        if not candidates:
            return Decision(None, None, backend, f"{why}; no registry entry that small (larger: {', '.join(too_big)})")
    # Largest model first: the best entry is the biggest that fits; the machine's own tier first.
    ranked = sorted(candidates.items(), key=lambda kv: (tier not in kv[1]["device_hints"]["tiers"],
                                                        -kv[1]["envelope"]["weights_bytes"]))
    rejected = []
    for alias, entry in ranked:
        ok, because = fits(entry, p, backend)
        if ok:
            extra = ""
            if rejected:
                extra = "; larger entries passed over: " + "; ".join(f"{a}: {r}" for a, r in rejected[:3])
            return Decision(tier or entry["tier"], alias, backend, f"{why}; {alias} ({entry['quant']}) fits{extra}")
        rejected.append((alias, because))
    return Decision(tier, None, backend, f"{why}; no registry entry fits: " +
                    "; ".join(f"{a}: {r}" for a, r in rejected[:4]))


# The device profiles the ladder's tests know (tests/test_ladder_device.py), named as the table says them.
def _mac(brand, gb, avail):
    return Profile("macos", brand, gb, avail, "apple" if "Apple" in brand else None)


def _nv(name, vram, free=None):
    return Profile("linux", "AMD Ryzen 9 7950X", 64, 50, "nvidia", name, vram, free if free is not None else vram - 0.5)


PROFILES = {
    "MacBook Air M1 8 GB": _mac("Apple M1", 8, 5.5),
    "M2 Air 16 GB": _mac("Apple M2", 16, 10),
    "M3 Pro 18 GB": _mac("Apple M3 Pro", 18, 12),
    "M2 Pro 24 GB": _mac("Apple M2 Pro", 24, 16),
    "M4 Max 36 GB": _mac("Apple M4 Max", 36, 28),
    "M5 Max 48 GB": _mac("Apple M5 Max", 48, 40),
    "M4 Max 36 GB with little free memory now": _mac("Apple M4 Max", 36, 4),
    "Intel Mac 32 GB": Profile("macos", "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", 32, 20),
    "RTX 3060 12 GB (8 free)": _nv("NVIDIA GeForce RTX 3060", 12, free=8),
    "RTX 3090 24 GB": _nv("NVIDIA GeForce RTX 3090", 24),
    "RTX 4090 24 GB": _nv("NVIDIA GeForce RTX 4090", 24),
    "RTX 5090 32 GB": _nv("NVIDIA GeForce RTX 5090", 32),
    "Linux box without a GPU": Profile("linux", "AMD EPYC", 24, 20),
}


def fit_matrix_entries(root=None) -> dict:
    """Registry-shaped entries for the committed tier alloys from the fit matrix (docs/fit-matrix.json:
    file sizes from llama-quantize --dry-run and the envelope at each tier's settings), conf/ (the
    sensory stack and OS reserve) and the official checkpoints' parameter counts (shapes/): the
    entries the real checkpoints' forges would list, before any of them is built here."""
    from .alloy import load_dir
    from .config import compose, resolve_quant
    from .envelope import sensory_bytes
    from .paths import ROOT, alloys_dir
    from .registry import device_hints

    root = root or ROOT
    rows = {(r["shape"], r["quant"]): r for r in json.loads((root / "docs" / "fit-matrix.json").read_text())}
    out = {}
    for alloy in load_dir(alloys_dir()):
        m = re.search(r"Qwen3\.5-([0-9.]+B)$", alloy.source["baseModel"])
        if not m:
            continue  # the demo: no fit-matrix shape
        shape, quant = m.group(1).lower(), alloy.quant_types[0]
        row, cfg = rows[(shape, quant)], compose(alloy.tier, resolve_quant(quant, where=alloy.name), [])
        env = row["tiers"][alloy.tier]
        out[alloy.name] = {
            "tier": alloy.tier, "quant": quant, "backends": sorted({cfg["tier"]["backend_default"], "vulkan"}),
            "parameters": {"text": official_parameters(shape), "projector": 0},
            "envelope": {"weights_bytes": row["text_file_bytes"], "gpu_resident_bytes": env["gpu_resident_bytes"],
                         "total_bytes": env["total_bytes"]},
            "device_hints": device_hints(cfg, env["total_bytes"], sensory_bytes(cfg), env["gpu_resident_bytes"])}
    return out


def official_parameters(shape: str) -> int:
    """The official checkpoint's parameter count (text and vision, no MTP head) from its config in
    shapes/, counted by transformers on the meta device (no weights)."""
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from .paths import ROOT

    config = {k: v for k, v in json.loads((ROOT / "shapes" / f"{shape}.json").read_text()).items()
              if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(Qwen3_5Config(**config))
    return sum(p.numel() for p in model.parameters())


def table(models: dict) -> str:
    """docs/ladder-rules.md: for every known profile, what the seed's tiers and the product's rules
    pick among `models`."""
    seed, product = load_rules("seed"), load_rules("continuum-pr1003")
    lines = ["# Tier rules: the forge's seed tiers against the product's rules (PR #1003)", "",
             "Generated by `.venv/bin/python -m compiler.ladder --table docs/ladder-rules.md` (checked by",
             "tests/test_ladder_device.py). Rules: `conf/ladder/seed.yaml` (the default) and",
             "`conf/ladder/continuum-pr1003.yaml` (select with `--rules continuum-pr1003`). Entries: the committed",
             "tier alloys as their forges would list them (`compiler.ladder.fit_matrix_entries`: sizes and",
             "envelopes from docs/fit-matrix.json, parameter counts from shapes/):", ""]
    for alias, e in sorted(models.items()):
        lines.append(f"- `{alias}`: {e['quant']}, tier {e['tier']}, {parameters_of(e) / 1e9:.2f}B parameters, "
                     f"{e['envelope']['total_bytes'] / GB:.2f} GB runtime")
    lines += ["", "| profile | seed tiers pick | product's rules pick |", "| --- | --- | --- |"]
    agree = 0
    for name, p in PROFILES.items():
        ours, theirs = choose(p, models, seed), choose(p, models, product)
        agree += ours.entry == theirs.entry
        cells = [(f"**{d.entry}** ({d.tier}, {d.backend})" if d.entry else "nothing") + f": {d.reason}"
                 for d in (ours, theirs)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines += ["", f"The two agree on {agree} of {len(PROFILES)} profiles.", ""]
    return "\n".join(lines)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def probe() -> Profile:
    """This machine, as the ladder sees it."""
    import psutil

    system = {"Darwin": "macos", "Linux": "linux", "Windows": "windows"}.get(platform.system(), platform.system())
    vm = psutil.virtual_memory()
    brand = platform.processor() or platform.machine()
    if system == "macos":
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or brand
    elif system == "linux":
        try:
            m = re.search(r"^model name\s*:\s*(.+)$", open("/proc/cpuinfo").read(), re.M)
            brand = m.group(1).strip() if m else brand
        except OSError:
            pass
    p = Profile(os=system, cpu_brand=brand, total_memory_gb=round(vm.total / GB, 1),
                available_memory_gb=round(vm.available / GB, 1))
    if system == "macos" and apple_silicon(brand):
        p.gpu_vendor, p.gpu_name = "apple", brand
        wired = _run(["sysctl", "-n", "iogpu.wired_limit_mb"]).strip()
        if wired.isdigit() and int(wired) > 0:
            p.metal_working_set_gb = int(wired) * MB / GB
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"])
        if out.strip():
            name, total, free = [x.strip() for x in out.splitlines()[0].split(",")]
            p.gpu_vendor, p.gpu_name = "nvidia", name
            p.vram_gb, p.free_vram_gb = round(int(total) * 2**20 / GB, 1), round(int(free) * 2**20 / GB, 1)
    if shutil.which("vulkaninfo"):
        p.vulkan_devices = re.findall(r"deviceName\s*=\s*(.+)", _run(["vulkaninfo", "--summary"]))
    return p


def main(argv=None) -> int:
    import argparse

    from .errors import ForgeError
    from .registry import registry_path

    ap = argparse.ArgumentParser(description="This machine: its profile, its tier and the registry entry chosen")
    ap.add_argument("--rules", default=RULES, help="conf/ladder/<name>.yaml: seed (default) or continuum-pr1003")
    ap.add_argument("--table", metavar="PATH", help="write the profiles-by-rules table (docs/ladder-rules.md) and exit")
    args = ap.parse_args(argv)
    if args.table:
        Path(args.table).write_text(table(fit_matrix_entries()))
        print(f"{args.table}: written")
        return 0
    try:
        rules = load_rules(args.rules)
        models = json.loads(registry_path().read_text())["models"]
    except (ForgeError, OSError, ValueError) as e:
        print(f"ladder: {e}")
        return 2
    p = probe()
    d = choose(p, models, rules)
    print(json.dumps({"profile": asdict(p), "registry": str(registry_path()), "rules": rules["name"],
                      "decision": asdict(d)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
