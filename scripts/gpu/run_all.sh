#!/usr/bin/env bash
# The whole GPU check on the lent machine, resumable across device calls (docs/gpu/results.md).
#
#   here:   bash scripts/gpu/pack.sh
#   device: run(command='bash scripts/gpu/run_all.sh', carry=[".gpu-carry"], timeout_s=600)
#           -- call again at once (the machine stays warm ~30 s) until it prints "ALL DONE"
#
# The first call copies the repo as it arrived (with .gpu-carry) to $W/repo and starts a supervisor
# in its own session, which outlives the call and runs from that copy only. (Every device call sends
# the working tree again and replaces the checkout: a supervisor working inside it lost its cwd, its
# vendor/llama.cpp link and scripts/gpu_forge.py mid-run -- issue 22's three failures.) It then
#   - builds CUDA and Vulkan (scripts/gpu/build.sh; each build proves itself on the GPU when done),
#   - meanwhile, on the CPU: `doit toolchain`, the demo's CPU steps through doit (the trained source,
#     conversion, imatrix, quantization, gate) and every shape's sparse reference and sparse Q4_K_M
#     (scripts/gpu_forge.py --prepare),
#   - then scripts/gpu_forge.py per backend, in the order the builds finish.
# GPU work is serialised by one lock ($W/gpu.lock): a VRAM reading sees one process only.
# Each call waits up to WAIT_S seconds, then copies what exists into $OUT and returns.
#
# Env: SHAPES (gpu_forge's --shapes; default: demo and every shapes/*.json), BACKENDS (cuda vulkan),
#      WAIT_S (560), RERUN=1 (copy the tree again and redo the forge phase on the warm machine:
#      builds, toolchain, the store and the sparse files are kept and reused; then plain calls).
set -uo pipefail
HERE=$(cd "$(dirname "$0")/../.." && pwd)
W=/tmp/forge-gpu
R=$W/repo
WAIT_S=${WAIT_S:-560}
BACKENDS=${BACKENDS:-cuda vulkan}
mkdir -p "$W"

supervise() {
  set -x
  cd "$R" || exit 1
  export FORGE_GPU_DEVICE=1 DEADLINE_S=100000 CARRY=$R/.gpu-carry WORK=$W PYTHONUNBUFFERED=1
  export PYTHONPATH=$W/site FORGE_CACHE=$W/cache HF_HUB_OFFLINE=1
  local shapes=${SHAPES:-$(python3 -c 'import sys; sys.argv=["x"]; sys.path.insert(0, "scripts"); import gpu_forge; print(",".join(gpu_forge.all_shapes()))')}
  { echo "shapes: $shapes; backends: $BACKENDS"; cat "$R/.gpu-carry/tree.txt" 2>/dev/null
    echo "digest here $(python3 scripts/gpu_forge.py --digest) (the copy this supervisor runs)"; } > "$W/plan.txt"
  rm -f "$W"/prefix-*/.ok   # a RERUN's build.sh copies the prefixes again: none counts as ready until then
  # niced: the demo's training (2 threads, pinned) and the sparse references are the longer path
  # (issue 22's run: prepare 660 s beside the builds, CUDA 457 s), the compilers take what is left
  nice -n 10 bash "$R/scripts/gpu/build.sh" $BACKENDS > "$W/build.log" 2>&1 &
  local bpid=$!
  until [ -d "$W/site/llama_cpp" ] && [ -f "$W/llama.cpp/.forge-archive-sha256" ] || ! kill -0 $bpid 2>/dev/null; do sleep 2; done
  python3 scripts/gpu_forge.py --prepare --shapes "$shapes" --work "$W/work" --out "$W/results" \
    > "$W/results/prepare.out" 2>&1 && touch "$W/prepare.ok"
  local left=" $BACKENDS " b
  while [ -n "${left// /}" ]; do
    for b in $left; do
      if [ -f "$W/prefix-$b/.ok" ]; then
        # the Vulkan loader/ICD settings build.sh found (none needed where the image has them)
        ( [ -f "$W/vk.env" ] && . "$W/vk.env"
          flock "$W/gpu.lock" python3 scripts/gpu_forge.py --backend $b --lib "$W/prefix-$b/lib" \
            --shapes "$shapes" --work "$W/work" --out "$W/results" ) > "$W/results/forge-$b.out" 2>&1
      elif ! kill -0 $bpid 2>/dev/null; then
        echo "$b: build failed, see build.log" > "$W/results/forge-$b.out"
      else
        continue
      fi
      left=${left/ $b / }
    done
    sleep 5
  done
  wait $bpid
  python3 scripts/gpu_forge.py --render "$W"/results/gpu-*.json > "$W/results/table.md" 2>&1
  touch "$W/ALL.done"
}

if [ "${1:-}" = --supervise ]; then supervise; exit 0; fi

# -- a call: start the supervisor once (or again with RERUN=1), then wait and report ---------------
running() { [ -f "$W/supervisor.pid" ] && kill -0 "$(cat "$W/supervisor.pid")" 2>/dev/null; }
# RERUN=1 restarts unless the supervisor running now is the one a RERUN=1 call started (so the same
# command may be repeated while it runs); once it is done, continue with plain calls.
if [ "${RERUN:-0}" = 1 ] && [ -f "$W/supervisor.pid" ] && ! { running && [ -f "$W/rerun.$(cat "$W/supervisor.pid")" ]; }; then
  running && kill -- -"$(cat "$W/supervisor.pid")"   # the supervisor's own process group (setsid)
  sleep 1; rm -f "$W/ALL.done" "$W/prepare.ok" "$W/supervisor.pid"
  [ -d "$W/results" ] && mv "$W/results" "$W/results.$(date +%s)"
fi
if ! running && [ ! -f "$W/ALL.done" ]; then
  rm -rf "$R"; mkdir -p "$R" "$W/results"
  # the repo as this call received it (tracked and untracked files, .gpu-carry); not vendor/ build/
  ( cd "$HERE" && tar --exclude=./vendor --exclude=./build --exclude=./.venv --exclude=./.git -cf - . ) | tar -xf - -C "$R"
  mkdir -p "$R/vendor" && ln -sfn "$W/llama.cpp" "$R/vendor/llama.cpp"
  setsid nohup bash "$R/scripts/gpu/run_all.sh" --supervise > "$W/supervisor.log" 2>&1 < /dev/null &
  echo $! > "$W/supervisor.pid"
  [ "${RERUN:-0}" = 1 ] && touch "$W/rerun.$!"   # a second RERUN=1 call only waits
  echo "== supervisor started (pid $!), repo copied to $R"
fi
T0=$(date +%s)
while [ ! -f "$W/ALL.done" ] && running && [ $(( $(date +%s) - T0 )) -lt "$WAIT_S" ]; do sleep 5; done
echo "== after $(( $(date +%s) - T0 )) s: $(ls "$W" | tr '\n' ' ')"
cat "$W/plan.txt" "$W/summary.txt" 2>/dev/null
tail -8 "$W/supervisor.log"
for f in "$W"/results/*.out; do [ -f "$f" ] && echo "== $f" && tail -c 2500 "$f"; done
cat "$W/results/table.md" 2>/dev/null
if [ -n "${OUT:-}" ]; then
  cp "$W"/results/gpu-*.json "$W"/results/prepare.json "$W"/results/table.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu-logs.tgz" -C "$W" supervisor.log build.log summary.txt plan.txt results logs \
    work/prepare-toolchain.log work/prepare-source.log work/build/logs 2>/dev/null
fi
if [ -f "$W/ALL.done" ]; then echo "ALL DONE"
elif running; then echo "still running: call again"
else echo "supervisor gone without finishing: see supervisor.log (RERUN=1 to start again)"; fi
