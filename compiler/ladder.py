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

GB = 10**9
MB = 10**6
# Continuum's probe: Apple chip family from the CPU brand string, total RAM thresholds (FACTS.md).
M4_TIER_MB, AIR_TIER_MB = 24_000, 14_000
# Metal's recommendedMaxWorkingSetSize as a share of unified memory (FACTS.md, "Apple Silicon").
METAL_SHARE = [(16, 0.67), (18, 0.74), (36, 0.78), (128, 0.84)]


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


def tier_of(p: Profile) -> tuple[str | None, str | None, str]:
    """(tier, backend, why) from the hardware alone."""
    if p.gpu_vendor == "apple" or apple_silicon(p.cpu_brand):
        mb = p.total_memory_gb * 1000
        if mb >= M4_TIER_MB:
            return "m4", "metal", f"Apple Silicon with {p.total_memory_gb:g} GB unified memory (>= 24,000 MB)"
        if mb >= AIR_TIER_MB:
            return "m4", "metal", (f"Apple Silicon with {p.total_memory_gb:g} GB unified memory: the m4 tier's "
                                   f"smaller end (14,000-24,000 MB)")
        return "air", "metal", f"Apple Silicon with {p.total_memory_gb:g} GB unified memory (< 14,000 MB)"
    if p.os == "macos":
        return None, None, (f"an Intel Mac ({p.cpu_brand}): no Apple GPU for Metal and no CUDA; "
                            "the product needs Apple Silicon or an NVIDIA GPU")
    if p.gpu_vendor == "nvidia" and p.vram_gb:
        tier = "corvette" if p.vram_gb >= 23.5 else None
        why = f"NVIDIA {p.gpu_name or 'GPU'} with {p.vram_gb:g} GB VRAM"
        return tier, "cuda", why + ("" if tier else " (below the corvette tier's 24 GB; smaller entries may fit)")
    if p.vulkan_devices and p.vram_gb:
        return None, "vulkan", f"a Vulkan GPU ({p.vulkan_devices[0]}) with {p.vram_gb:g} GB"
    return None, None, "no Metal, CUDA or Vulkan GPU on this machine; the product never falls back to the CPU"


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


def choose(p: Profile, models: dict) -> Decision:
    tier, backend, why = tier_of(p)
    if backend is None:
        return Decision(None, None, None, why)
    # Largest model first: the best entry is the biggest that fits; the machine's own tier first.
    ranked = sorted(models.items(), key=lambda kv: (tier not in kv[1]["device_hints"]["tiers"],
                                                    -kv[1]["envelope"]["weights_bytes"]))
    rejected = []
    for alias, entry in ranked:
        ok, because = fits(entry, p, backend)
        if ok:
            extra = ""
            if rejected:
                extra = "; larger entries passed over: " + "; ".join(f"{a}: {r}" for a, r in rejected[:3])
            if tier is None:
                tier = entry["tier"]
            return Decision(tier, alias, backend, f"{why}; {alias} ({entry['quant']}) fits{extra}")
        rejected.append((alias, because))
    return Decision(tier, None, backend, f"{why}; no registry entry fits: " +
                    "; ".join(f"{a}: {r}" for a, r in rejected[:4]))


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


def main() -> int:
    from .registry import read_existing, registry_path

    p = probe()
    models = read_existing()
    d = choose(p, models)
    print(json.dumps({"profile": asdict(p), "registry": str(registry_path()), "decision": asdict(d)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
