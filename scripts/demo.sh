#!/usr/bin/env bash
# Demo: compress the fixture MoE with moe-convert, serve it with `vllm serve --quantization moe_lowrank` on the
# CPU, ask it one chat question, stop the server. `make demo` runs it in .venv; METHOD and RATIO pick the method.
#
# Settings (environment): METHOD (svd) RATIO (0.3) SRC (fixtures/qwen3-moe-pydocs) OUT (demo-out/<name>-METHOD)
#   PORT (a free one) SERVE_TIMEOUT (240 s) PYTHON (python3) QUESTION VLLM_CPU_KVCACHE_SPACE (1 GiB)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
METHOD="${METHOD:-svd}"
RATIO="${RATIO:-0.3}"
SRC="${SRC:-fixtures/qwen3-moe-pydocs}"
OUT="${OUT:-demo-out/$(basename "$SRC")-$METHOD}"
PYTHON="${PYTHON:-python3}"
SERVE_TIMEOUT="${SERVE_TIMEOUT:-240}"
QUESTION="${QUESTION:-What does the built-in function len() return?}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

die() { echo "demo.sh: $*" >&2; exit 1; }
say() { printf '\n==> %s\n' "$*"; }
for tool in moe-convert vllm "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH: run 'make demo' (or 'make venv' and '. .venv/bin/activate')"
done
[ -d "$SRC" ] || die "source model '$SRC' not found"

say "Converting $SRC with $METHOD at ratio $RATIO -> $OUT"
mkdir -p "$(dirname "$OUT")"
moe-convert --method "$METHOD" --ratio "$RATIO" "$SRC" "$OUT" --calib-data "$SRC/calib.txt" --overwrite
"$PYTHON" scripts/show_report.py "$OUT"

PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG="$OUT.serve.log"
SERVER_PID=""

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 -- "-$SERVER_PID" 2>/dev/null; then
    echo "==> Stopping the server (process group $SERVER_PID)"
    kill -INT -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 60); do
      kill -0 -- "-$SERVER_PID" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

say "Starting vllm serve on 127.0.0.1:$PORT (log: $LOG)"
set -m  # job control: the server gets its own process group, so stop_server ends it and all its workers
vllm serve "$OUT" --quantization moe_lowrank --dtype float32 --max-model-len 512 --enforce-eager \
  --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!
set +m

if ! "$PYTHON" deploy/healthcheck.py --base-url "http://127.0.0.1:$PORT" --wait "$SERVE_TIMEOUT" --pid "$SERVER_PID"; then
  echo "---- last 40 lines of $LOG ----" >&2
  tail -n 40 "$LOG" >&2 || true
  die "the server did not become ready (see the log above)"
fi

say "Asking one question"
"$PYTHON" scripts/chat_query.py --base-url "http://127.0.0.1:$PORT" --question "$QUESTION"
say "Done; stopping the server"
