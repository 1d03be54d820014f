#!/usr/bin/env bash
# The whole GPU check (issue 9) on the lent machine, resumable across device calls.
#
#   here:   bash scripts/gpu/pack.sh
#   device: run(command='bash scripts/gpu/run_all.sh', carry=[".gpu-carry"], timeout_s=600)
#           -- call again at once (the machine stays warm ~30 s) until it prints "ALL DONE"
#
# The first call starts a supervisor in its own session, which outlives the call: it builds CUDA and
# Vulkan (scripts/gpu/build.sh) and, meanwhile, the project's CPU tools (`doit toolchain`) and the 9B
# layout's sparse reference; then scripts/gpu_forge.py per backend. Each call waits up to WAIT_S
# seconds, then copies what exists into $OUT (results JSON, logs) and returns.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=/tmp/forge-gpu
WAIT_S=${WAIT_S:-560}
mkdir -p "$W/results"

supervise() {
  set -x
  export FORGE_GPU_DEVICE=1 DEADLINE_S=100000
  bash "$ROOT/scripts/gpu/build.sh" cuda vulkan > "$W/build.log" 2>&1 &
  local bpid=$!
  until [ -d "$W/site/llama_cpp" ] || ! kill -0 $bpid 2>/dev/null; do sleep 2; done
  export PYTHONPATH=$W/site FORGE_CACHE=$W/cache FORGE_BUILD_DIR=$W/work/build HF_HUB_OFFLINE=1
  until [ -f "$W/llama.cpp/.forge-archive-sha256" ]; do sleep 2; done
  mkdir -p "$ROOT/vendor" && ln -sfn "$W/llama.cpp" "$ROOT/vendor/llama.cpp"
  cd "$ROOT"
  python3 -m doit -f dodo.py -d "$ROOT" toolchain && touch "$W/toolchain.ok"
  python3 - <<'PY' && touch "$W/refs.ok"
from pathlib import Path
from compiler import sizing
from compiler.fit import references
text, mmproj = references("9b", Path("/tmp/forge-gpu/work/plan"))
sizing.dry_run(text, "Q4_K_M")
print("9b references ready:", text, mmproj)
PY
  wait $bpid
  for b in cuda vulkan; do
    if [ -f "$W/prefix-$b/.ok" ]; then
      python3 scripts/gpu_forge.py --backend $b --lib "$W/prefix-$b/lib" --work "$W/work" --out "$W/results" \
        > "$W/results/forge-$b.out" 2>&1
    else
      echo "$b: build failed, see build.log" > "$W/results/forge-$b.out"
    fi
  done
  touch "$W/ALL.done"
}

if [ "${1:-}" = --supervise ]; then supervise; exit 0; fi

if [ ! -f "$W/supervisor.started" ]; then
  touch "$W/supervisor.started"
  setsid nohup bash "$0" --supervise > "$W/supervisor.log" 2>&1 < /dev/null &
fi
T0=$(date +%s)
while [ ! -f "$W/ALL.done" ] && [ $(( $(date +%s) - T0 )) -lt "$WAIT_S" ]; do sleep 5; done
echo "== after $(( $(date +%s) - T0 )) s: $(ls "$W" | tr '\n' ' ')"
tail -5 "$W/build.log" 2>/dev/null; cat "$W/summary.txt" 2>/dev/null
tail -15 "$W/supervisor.log"
for f in "$W"/results/*; do [ -f "$f" ] && echo "== $f" && tail -c 3000 "$f"; done
if [ -n "${OUT:-}" ]; then
  cp "$W"/results/*.json "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu-logs.tgz" -C "$W" supervisor.log build.log summary.txt results logs 2>/dev/null
fi
[ -f "$W/ALL.done" ] && echo "ALL DONE" || echo "still running: call again"
