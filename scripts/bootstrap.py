#!/usr/bin/env python3
"""Set up a checkout from nothing but Python 3.11+ (with venv and pip), a C/C++ compiler and cmake.

    python3 scripts/bootstrap.py            # set up (idempotent: a second run checks and returns)
    python3 scripts/bootstrap.py --check    # only say whether the prerequisites are here

Steps, each skipped when already done:
  1. prerequisites: checked up front, one line per missing thing naming the package that gives it;
  2. `.venv/` (no system site-packages), then the exact dependency set of requirements.txt;
  3. the pinned llama-cpp-python source archive (sha256-checked), its llama.cpp in vendor/llama.cpp/;
  4. gguf-py from that source;
  5. ONE compile of llama.cpp (toolchain.build_llama_cpp): the CLI tools and the shared libraries,
     cached in FORGE_CACHE (default ~/.cache/forge) by a key of source, flags, compiler, architecture;
  6. the llama-cpp-python binding from the same archive, built without its own copy of llama.cpp
     (LLAMA_BUILD=OFF: Python code only), with the compiled libraries put in its lib/ folder.

Until the venv exists this process uses the standard library only and starts no Python but the
venv's own (tests/test_bootstrap.py checks both): whatever was installed by hand on the machine
cannot make the set-up pass.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import toolchain  # noqa: E402  (standard library only)
from compiler.errors import ForgeError  # noqa: E402
from compiler.paths import cache_dir  # noqa: E402

MIN_PYTHON = (3, 11)
MIN_CMAKE = (3, 21)  # llama-cpp-python's CMakeLists asks for 3.21; llama.cpp itself for 3.14


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


class Venv:
    def __init__(self, path: Path):
        self.path = path
        self.bin = path / "bin"
        self.python = str(self.bin / "python")

    def env(self) -> dict:
        # The venv's bin/ first: cmake and scikit-build-core find its ninja there.
        return dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")

    def pip(self, *args: str, env: dict | None = None) -> None:
        cmd = [self.python, "-m", "pip", "--disable-pip-version-check", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env())
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"[bootstrap] failed: {' '.join(cmd)}")

    def stamp(self, name: str) -> Path:
        return self.path / f".forge-{name}"

    def done(self, name: str, value: str) -> bool:
        return self.stamp(name).is_file() and self.stamp(name).read_text() == value

    def mark(self, name: str, value: str) -> None:
        self.stamp(name).write_text(value)


# --- 1. prerequisites (standard library only) ---------------------------------------------------

def _version(cmd: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def missing_prerequisites() -> list[str]:
    """One line per thing the set-up needs and this machine lacks, with the package that gives it."""
    problems = []
    if sys.version_info[:2] < MIN_PYTHON:
        problems.append(f"Python {'.'.join(map(str, MIN_PYTHON))}+ is needed, this is {sys.version.split()[0]} "
                        f"(Debian: python3.11, Homebrew: python@3.11)")
    try:
        import ensurepip  # noqa: F401  (Debian splits it out of the interpreter)
    except ImportError:
        problems.append("Python's venv/ensurepip is missing (Debian: python3-venv; Homebrew's python has it)")
    for var, default, what in (("CC", "cc", "C compiler"), ("CXX", "c++", "C++ compiler")):
        exe = os.environ.get(var, default)
        if shutil.which(exe) is None or _version([exe, "--version"]) is None:
            problems.append(f"no {what} (`{exe}`; set {var} to choose one) "
                            f"(Debian: build-essential, macOS: xcode-select --install)")
    cmake = _version(["cmake", "--version"]) if shutil.which("cmake") else None
    if cmake is None:
        problems.append("cmake is missing (Debian: cmake, Homebrew: cmake)")
    elif cmake < MIN_CMAKE:
        problems.append(f"cmake {'.'.join(map(str, MIN_CMAKE))}+ is needed, found {'.'.join(map(str, cmake))} "
                        f"(Debian bookworm's cmake, Homebrew: cmake)")
    return problems


# --- 2. the venv and the pinned dependencies ----------------------------------------------------

def make_venv(path: Path) -> Venv:
    env = Venv(path)
    if not Path(env.python).exists():
        say(f"creating {path} (no system site-packages)")
        venv.create(path, with_pip=True, system_site_packages=False)
    return env


def requirements(env: Venv) -> None:
    req = ROOT / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    if env.done("requirements", digest):
        return
    say("installing the pinned Python dependencies (requirements.txt: torch CPU, transformers, hydra, doit, ...)")
    t0 = time.monotonic()
    env.pip("install", "-q", "-r", str(req))
    say(f"dependencies installed in {time.monotonic() - t0:.0f} s")
    env.mark("requirements", digest)


# --- 4. gguf-py ---------------------------------------------------------------------------------

def gguf_py(env: Venv) -> None:
    if env.done("gguf", toolchain.ARCHIVE_SHA256):
        return
    say("installing gguf-py from vendor/llama.cpp")
    env.pip("install", "-q", "--no-deps", "--no-build-isolation", str(toolchain.VENDOR_DIR / "gguf-py"))
    env.mark("gguf", toolchain.ARCHIVE_SHA256)


# --- 6. the binding, on the compiled libraries --------------------------------------------------

def package_lib_dir(env: Venv) -> Path:
    """site-packages/llama_cpp/lib of the venv (found without importing llama_cpp)."""
    out = subprocess.run([env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out) / "llama_cpp" / "lib"


def binding(env: Venv, archive: Path) -> None:
    key = toolchain.build_key()
    lib = package_lib_dir(env)
    if env.done("binding", key) and toolchain.binding_matches(lib, key):
        return
    # The binding's Python code does not depend on the compiled libraries: one wheel per archive.
    wheels = cache_dir() / "wheels" / f"{toolchain.ARCHIVE_SHA256[:16]}-python-only"
    with toolchain.cache_lock(f"wheels/{wheels.name}"):  # one clone packages it; another waits
        found = sorted(wheels.glob("llama_cpp_python-*.whl")) if wheels.is_dir() else []
        if not found:
            say("packaging the llama-cpp-python binding without its own llama.cpp (LLAMA_BUILD=OFF)")
            tmp = wheels.with_name(wheels.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            env.pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(archive),
                    env=dict(env.env(), CMAKE_ARGS="-DLLAMA_BUILD=OFF"))
            shutil.rmtree(wheels, ignore_errors=True)
            os.replace(tmp, wheels)
            found = sorted(wheels.glob("llama_cpp_python-*.whl"))
    say("installing the llama-cpp-python binding on the compiled libraries")
    env.pip("install", "-q", "--no-deps", "--force-reinstall", str(found[0]))
    record = toolchain.install_binding_libs(lib, key)
    # Prove it loads, and from where: the binding's libllama is the build's.
    probe = ("import llama_cpp, llama_cpp.mtmd_cpp, pathlib; "
             "print(pathlib.Path(llama_cpp.llama_cpp._lib._name).resolve())")
    proc = subprocess.run([env.python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit("[bootstrap] the installed binding does not load its libraries")
    env.mark("binding", key)
    say(f"binding loads {proc.stdout.strip()} (llama.cpp build {record['key']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the prerequisites")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    problems = missing_prerequisites()
    for p in problems:
        print(f"[bootstrap] missing: {p}", file=sys.stderr)
    if problems or args.check:
        if not problems:
            say("prerequisites: ok")
        return 1 if problems else 0
    env = make_venv(ROOT / ".venv")
    requirements(env)
    try:
        archive = toolchain.fetch_archive(env.python, log=say)
        toolchain.unpack_vendor(archive, log=say)
        gguf_py(env)
        ninja = shutil.which("ninja", path=str(env.bin))
        toolchain.build_llama_cpp(log=say, ninja=ninja)
    except ForgeError as e:
        print(f"[bootstrap] {e}", file=sys.stderr)
        return 1
    binding(env, archive)
    manifest = json.loads(toolchain.build_manifest().read_text())
    say(f"ready in {time.monotonic() - t0:.0f} s: {env.path} (llama.cpp build {manifest['key']}: "
        f"{', '.join(toolchain.TOOLS)} and the binding's libraries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
