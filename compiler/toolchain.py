"""The one llama.cpp: the source vendored inside the pinned llama-cpp-python archive from PyPI.

The archive is fetched with pip (the only registry client that reaches PyPI here), checked against
the sha256 pinned below, and unpacked into vendor/llama.cpp/. From that one source come the
converter and gguf-py, the CLI tools built with cmake (build_tools), and the Python binding (built
by scripts/bootstrap.py with the same ggml flags). The fingerprint of all this enters every
downstream content key.

Standard library only: scripts/bootstrap.py imports this before any dependency is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import ForgeError
from .paths import VENDOR_DIR, cache_dir

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
ARCHIVE_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
ARCHIVE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
# The llama.cpp commit this release vendors, as its CHANGELOG states (the archive carries no .git).
LLAMA_CPP_COMMIT = "ggml-org/llama.cpp@0c1e57098"

# ggml CPU flags for the tools and the binding alike. Fixed instead of -march=native so that the
# bytes a build gives do not depend on which x86-64 machine ran it (k-quant scale search is
# sensitive to FMA contraction: FACTS.md, "Determinism").
GGML_FLAGS_X86_64 = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                     "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
GGML_FLAGS_OTHER = ["-DGGML_NATIVE=OFF"]
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-mtmd-cli")
TOOLS_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"]


def ggml_flags() -> list[str]:
    return GGML_FLAGS_X86_64 if platform.machine() in ("x86_64", "AMD64") else GGML_FLAGS_OTHER


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def archive_path() -> Path:
    return cache_dir() / "archives" / ARCHIVE_NAME


def fetch_archive(log=print) -> Path:
    """The pinned source archive, downloaded once into the cache and checked by sha256."""
    dest = archive_path()
    if dest.is_file():
        if sha256_file(dest) == ARCHIVE_SHA256:
            return dest
        log(f"{dest}: sha256 does not match the pin; fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"fetching {PACKAGE}=={VERSION} source archive from PyPI (76 MB)...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"{PACKAGE}=={VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / ARCHIVE_NAME
        if not got.is_file():
            raise ForgeError(f"could not download {PACKAGE}=={VERSION}",
                             where="pip download", found=(proc.stderr or proc.stdout).strip()[-800:])
        digest = sha256_file(got)
        if digest != ARCHIVE_SHA256:
            raise ForgeError(f"{ARCHIVE_NAME} does not match its pinned sha256", where="pip download",
                             found=digest, allowed=ARCHIVE_SHA256)
        os.replace(got, dest)
    return dest


def vendor_marker() -> Path:
    return VENDOR_DIR / ".forge-archive-sha256"


def unpack_vendor(archive: Path, log=print) -> Path:
    """Unpack the archive's vendor/llama.cpp into vendor/llama.cpp/ unless already there."""
    marker = vendor_marker()
    if marker.is_file() and marker.read_text().strip() == ARCHIVE_SHA256:
        return VENDOR_DIR
    log(f"unpacking vendor/llama.cpp from {archive.name}")
    tmp = VENDOR_DIR.parent / ".llama.cpp.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(VENDOR_PREFIX) and len(m.name) > len(VENDOR_PREFIX):
                m.name = m.name[len(VENDOR_PREFIX):]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    (tmp / ".forge-archive-sha256").write_text(ARCHIVE_SHA256 + "\n")
    shutil.rmtree(VENDOR_DIR, ignore_errors=True)
    os.replace(tmp, VENDOR_DIR)
    return VENDOR_DIR


def compiler_id() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=20).stdout
        return out.splitlines()[0].strip() if out else cc
    except (OSError, subprocess.TimeoutExpired):
        return f"{cc} (not found)"


def _pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint_parts() -> dict:
    """What the bytes of every artifact may depend on besides the recipe.

    The C/C++ side: the pinned source, the cmake flags, the compiler and the CPU architecture. The
    Python side (the converter): torch, transformers, safetensors and numpy versions."""
    return {
        "source": f"{PACKAGE}=={VERSION} sha256:{ARCHIVE_SHA256}",
        "flags": TOOLS_FLAGS + ggml_flags(),
        "compiler": compiler_id(),
        "machine": platform.machine(),
        "python": {n: _pkg_version(n) for n in ("torch", "transformers", "safetensors", "numpy")},
    }


def fingerprint(parts: dict | None = None) -> str:
    parts = parts or fingerprint_parts()
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def tools_dir(fp: str) -> Path:
    return cache_dir() / "tools" / fp[:16]


def tools_manifest(fp: str) -> Path:
    return tools_dir(fp) / "manifest.json"


def tools_ready(fp: str) -> bool:
    manifest = tools_manifest(fp)
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text())
    bindir = tools_dir(fp) / "bin"
    return all((bindir / t).is_file() and (bindir / t).stat().st_size == data["tools"][t]["size"] for t in TOOLS)


def tool(fp: str, name: str) -> Path:
    path = tools_dir(fp) / "bin" / name
    if not path.is_file():
        raise ForgeError(f"{name} is not built", where=str(path), hint="run `doit toolchain` (or plain `doit`)")
    return path


def build_tools(fp: str, parts: dict, log=print, jobs: int | None = None) -> Path:
    """cmake-build the CLI tools from vendor/llama.cpp into the cache, atomically."""
    if tools_ready(fp):
        return tools_dir(fp)
    if vendor_marker().read_text().strip() != ARCHIVE_SHA256 if vendor_marker().is_file() else True:
        raise ForgeError("vendor/llama.cpp is missing or not from the pinned archive", where=str(VENDOR_DIR),
                         hint="run `python3 scripts/bootstrap.py`")
    final = tools_dir(fp)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=final.parent))
    jobs = jobs or os.cpu_count() or 2
    configure = ["cmake", "-S", str(VENDOR_DIR), "-B", str(work / "cmake"), "-G", "Ninja"] + TOOLS_FLAGS + ggml_flags()
    if shutil.which("ninja") is None:
        configure.remove("-G")
        configure.remove("Ninja")
    build = ["cmake", "--build", str(work / "cmake"), "-j", str(jobs), "--target", *TOOLS]
    for cmd in (configure, build):
        log("$ " + " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log(line.rstrip())
        if proc.wait() != 0:
            raise ForgeError(f"building llama.cpp tools failed (exit {proc.returncode})", where=" ".join(cmd[:3]),
                             hint=f"the full log is above; the partial build is in {work}")
    bindir = work / "bin"
    bindir.mkdir()
    tools = {}
    for t in TOOLS:
        src = work / "cmake" / "bin" / t
        shutil.copy2(src, bindir / t)
        tools[t] = {"sha256": sha256_file(bindir / t), "size": (bindir / t).stat().st_size}
    shutil.rmtree(work / "cmake")
    (work / "manifest.json").write_text(json.dumps({"fingerprint": fp, "parts": parts, "tools": tools},
                                                   indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    return final


def converter() -> Path:
    return VENDOR_DIR / "convert_hf_to_gguf.py"

