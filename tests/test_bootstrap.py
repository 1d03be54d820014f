"""The set-up from nothing: what scripts/bootstrap.py may use before its venv exists, the exact
dependency set, the one compile of llama.cpp shared by the tools and the binding, and its cache key."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from compiler import toolchain

ROOT = Path(__file__).resolve().parent.parent
# The interpreter the venv was made from: what a fresh machine's `python3` is, minus anything installed.
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)

PROBE = r"""
import json, sys
from pathlib import Path
events = []
def hook(event, args):
    if event == "subprocess.Popen":
        events.append(["run", str(args[0]), [str(a) for a in args[1]]])
sys.addaudithook(hook)
sys.path.insert(0, sys.argv[1] + "/scripts")
import bootstrap
bootstrap.missing_prerequisites()
bootstrap.make_venv(Path(sys.argv[2]))
import sysconfig
stdlib = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
loaded = {name: getattr(getattr(m, "__spec__", None), "origin", None) for name, m in list(sys.modules.items())}
outside = sorted(n for n, origin in loaded.items() if origin and origin not in ("built-in", "frozen")
                 and not origin.startswith(tuple(stdlib)) and not origin.startswith(sys.argv[1] + "/"))
print(json.dumps({"events": events, "outside": outside, "loaded": len(loaded), "me": sys.executable}))
"""


def test_bootstrap_uses_only_the_standard_library_until_its_venv_exists(tmp_path):
    # -I -S: no site-packages, no PYTHON* variables, no user site: only the standard library can be
    # imported, exactly as on a machine where nothing was installed by hand.
    proc = subprocess.run([BASE_PYTHON, "-I", "-S", "-c", PROBE, str(ROOT), str(tmp_path / "venv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    # Every module loaded is the standard library's or the project's own (compiler/, scripts/).
    assert report["loaded"] > 50 and report["outside"] == [], \
        f"bootstrap imports modules outside the standard library before its venv: {report['outside']}"
    venv_python = str(tmp_path / "venv" / "bin")
    for _, exe, argv in (e for e in report["events"] if e[0] == "run"):
        # The only Python it may start is the new venv's own (ensurepip); never the interpreter that
        # runs it (the bug where `pip download` needed a hand-installed scikit-build-core).
        assert Path(exe).resolve() != Path(report["me"]).resolve(), argv
        if "python" in Path(exe).name:
            assert exe.startswith(venv_python), argv
        assert "pip" not in argv[:3] or exe.startswith(venv_python), argv
    assert (tmp_path / "venv" / "bin" / "python").exists()
    cfg = (tmp_path / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def _uses_of_running_python(path: Path) -> list[str]:
    """Functions of a module that name the interpreter running it (sys.executable / _base_executable)."""
    import ast

    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.Module)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr in ("executable", "_base_executable") \
                        and isinstance(node.value, ast.Name) and node.value.id == "sys":
                    found.append(getattr(fn, "name", "<module>"))
    return sorted(set(found) - {"<module>"}) if found else []


def test_bootstrap_never_runs_the_interpreter_that_runs_it():
    # After the venv exists every pip and every Python the set-up starts is the venv's: the system
    # interpreter may lack anything (scikit-build-core for `pip download` was the bug).
    assert _uses_of_running_python(ROOT / "scripts" / "bootstrap.py") == []
    # In toolchain.py only the doit-time rebuild (running inside the venv) looks at its own interpreter.
    assert _uses_of_running_python(ROOT / "compiler" / "toolchain.py") == ["rebuild_for_binding"]


def test_missing_prerequisite_is_named_with_its_package(tmp_path):
    # A PATH with a C and C++ compiler but no cmake.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("cc", "c++"):
        os.symlink(shutil.which(name), bindir / name)
    proc = subprocess.run([BASE_PYTHON, "-I", "-S", str(ROOT / "scripts" / "bootstrap.py"), "--check"],
                          capture_output=True, text=True, env={"PATH": str(bindir), "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "missing: cmake is missing (Debian: cmake, Homebrew: cmake)" in proc.stderr
    assert "C compiler" not in proc.stderr
    ok = subprocess.run([BASE_PYTHON, "-I", "-S", str(ROOT / "scripts" / "bootstrap.py"), "--check"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "prerequisites: ok" in ok.stdout, ok.stderr


def _pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.txt: {line!r} is not pinned to an exact version"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_installed_package_is_pinned_exactly():
    pins = _pins()
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
    from_archive = {"pip", "gguf", "llama-cpp-python"}
    unpinned = sorted(set(installed) - set(pins) - from_archive)
    assert unpinned == [], f"installed but not in requirements.txt: {unpinned}"
    wrong = {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n, "").split("+")[0] != v}
    assert wrong == {}, f"requirements.txt vs installed: {wrong}"
    # The binding and gguf-py are the pinned archive's.
    assert installed["llama-cpp-python"] == toolchain.VERSION


def test_binding_and_tools_run_the_same_llama_cpp_build():
    import llama_cpp

    build = toolchain.build_dir() / "bin"
    manifest = json.loads(toolchain.build_manifest().read_text())
    assert manifest["key"] == toolchain.build_key()
    loaded = Path(llama_cpp.llama_cpp._lib._name).resolve()
    package_lib = Path(llama_cpp.__file__).parent / "lib"
    record = json.loads((package_lib / toolchain.BINDING_RECORD).read_text())
    assert record["key"] == manifest["key"]
    # The library the binding loaded is, byte for byte, the one in the build the tools come from.
    assert loaded.parent == package_lib.resolve()
    assert toolchain.sha256_file(loaded) == manifest["files"][loaded.name]["sha256"]
    for name, f in record["libs"].items():
        assert toolchain.sha256_file(package_lib / name) == f["sha256"] == manifest["files"][name]["sha256"]
    # And the tools link against those libraries, from their own folder (no static copy of ggml).
    if shutil.which("ldd"):
        ldd = subprocess.run(["ldd", str(toolchain.tool("llama-quantize"))], capture_output=True, text=True).stdout
        linked = {line.split()[0]: line.split()[2] for line in ldd.splitlines() if "=>" in line and "lib" in line}
        soname = next(n for n in linked if n.startswith("libllama.so"))
        assert Path(linked[soname]).resolve().parent == build.resolve()
        assert toolchain.sha256_file(Path(linked[soname]).resolve()) == manifest["files"][Path(linked[soname]).resolve().name]["sha256"]


def test_build_key_follows_compiler_and_flags(tmp_path, monkeypatch):
    base = toolchain.build_key()
    # Another compiler (here: a wrapper reporting another version) gives another key.
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc (Other) 99.1.0'\n")
    fake.chmod(0o755)
    code = "from compiler import toolchain; print(toolchain.build_key())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, CC=str(fake))).stdout.strip()
    same = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert same == base and other != base and len(other) == 16
    # Other flags give another key; a Python package does not enter it (a torch upgrade recompiles nothing).
    monkeypatch.setattr(toolchain, "BUILD_FLAGS", toolchain.BUILD_FLAGS + ["-DGGML_LTO=ON"])
    assert toolchain.build_key() != base
    assert "python" not in toolchain.build_parts() and "python" in toolchain.fingerprint_parts()


def test_compile_progress_is_readable():
    lines = []
    progress = toolchain._Progress(lines.append, "llama.cpp")
    for i in range(1, 201):
        progress.feed(f"[{i}/200] Building CXX object src/CMakeFiles/llama.dir/llama-{i}.cpp.o")
    progress.feed("some compiler warning")
    assert 18 <= len(lines) <= 22  # one line per 5%, not one per object
    assert lines[-1].startswith("llama.cpp 200/200 (100%)")
    assert "left" in lines[5] and "llama-" in lines[5]


def _archive(path: Path, entries: dict) -> Path:
    """A tar.gz laid out as the pinned archive is: name -> bytes, or ("link", target) for a symlink."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(toolchain.VENDOR_PREFIX + name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_the_archive_unpacks_where_python_has_no_extraction_filter(tmp_path, monkeypatch):
    # Python 3.11.0-3.11.3 have no `filter` argument (a TypeError there): the unpack checks the
    # members itself and passes no filter. Reproduced by taking the filter away from this tarfile.
    import tarfile

    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.setattr(toolchain, "VENDOR_DIR", tmp_path / "vendor" / "llama.cpp")
    good = _archive(tmp_path / "good.tar.gz", {"convert_hf_to_gguf.py": b"print('hi')\n", "gguf-py/gguf/x.py": b""})
    out = toolchain.unpack_vendor(good, log=lambda m: None)
    assert (out / "convert_hf_to_gguf.py").read_bytes() == b"print('hi')\n" and (out / "gguf-py/gguf/x.py").is_file()
    # A link (or a path out of the folder) is refused by name, and nothing is unpacked.
    bad = _archive(tmp_path / "bad.tar.gz", {"ok.py": b"", "escape": ("link", "/etc/passwd")})
    shutil.rmtree(tmp_path / "vendor")
    with pytest.raises(toolchain.ForgeError, match="not a plain file") as e:
        toolchain.unpack_vendor(bad, log=lambda m: None)
    assert "escape" in str(e.value) and not any((tmp_path / "vendor").iterdir())
