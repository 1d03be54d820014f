#!/usr/bin/env python3
"""Set up a checkout from nothing: .venv/, pinned Python dependencies, the pinned llama.cpp source
(sha256-checked, unpacked into vendor/llama.cpp/), gguf-py from that source, and the
llama-cpp-python binding built from the same archive with the same ggml flags as the CLI tools.

Idempotent and cached: a second run checks and returns in seconds. The binding's wheel is kept in
~/.cache/forge/wheels/ under a key of (archive sha256, ggml flags, compiler, Python), so a fresh
clone on the same machine installs it without compiling. (The CLI tools are built by `doit` itself,
as the `toolchain` task, cached the same way.)

    python3 scripts/bootstrap.py
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
sys.path.insert(0, str(ROOT))

from compiler import toolchain  # noqa: E402  (standard library only)
from compiler.errors import ForgeError  # noqa: E402
from compiler.paths import cache_dir  # noqa: E402


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def vpy() -> str:
    return str(VENV / "bin" / "python")


def pip(*args: str) -> None:
    cmd = [vpy(), "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[bootstrap] failed: {' '.join(cmd)}")


def stamp(name: str) -> Path:
    return VENV / f".forge-{name}"


def requirements() -> None:
    req = ROOT / "requirements.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    if stamp("requirements").is_file() and stamp("requirements").read_text() == digest:
        return
    say("installing pinned Python dependencies (torch CPU, transformers, hydra, doit, ...)")
    pip("install", "-q", "-r", str(req))
    stamp("requirements").write_text(digest)


def gguf_py() -> None:
    if stamp("gguf").is_file() and stamp("gguf").read_text() == toolchain.ARCHIVE_SHA256:
        return
    say("installing gguf-py from vendor/llama.cpp")
    pip("install", "-q", "--no-deps", str(toolchain.VENDOR_DIR / "gguf-py"))
    stamp("gguf").write_text(toolchain.ARCHIVE_SHA256)


def binding(archive: Path) -> None:
    cmake_args = toolchain.ggml_flags() + ["-DLLAMA_CURL=OFF"]
    key_parts = {"archive": toolchain.ARCHIVE_SHA256, "cmake": cmake_args, "compiler": toolchain.compiler_id(),
                 "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    if stamp("binding").is_file() and stamp("binding").read_text() == key:
        return
    wheels = cache_dir() / "wheels" / key
    found = sorted(wheels.glob("llama_cpp_python-*.whl")) if wheels.is_dir() else []
    if not found:
        say("building the llama-cpp-python binding from the pinned archive (about 5-10 minutes on 2 cores)")
        tmp = wheels.with_name(key + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        t0 = time.monotonic()
        proc = subprocess.run([vpy(), "-m", "pip", "wheel", "--no-deps", "-w", str(tmp), str(archive)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit("[bootstrap] building the llama-cpp-python wheel failed")
        (tmp / "key.json").write_text(json.dumps(key_parts, indent=2, sort_keys=True))
        os.replace(tmp, wheels)
        say(f"binding built in {time.monotonic() - t0:.0f} s, cached in {wheels}")
        found = sorted(wheels.glob("llama_cpp_python-*.whl"))
    say("installing the llama-cpp-python binding")
    pip("install", "-q", "--no-deps", "--force-reinstall", str(found[0]))
    stamp("binding").write_text(key)


def main() -> int:
    t0 = time.monotonic()
    if not (VENV / "bin" / "python").exists():
        say(f"creating {VENV}")
        venv.create(VENV, with_pip=True)
    requirements()
    try:
        archive = toolchain.fetch_archive(log=say)
        toolchain.unpack_vendor(archive, log=say)
    except ForgeError as e:
        print(f"[bootstrap] {e}", file=sys.stderr)
        return 1
    gguf_py()
    binding(archive)
    say(f"ready in {time.monotonic() - t0:.0f} s: {VENV}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
