#!/usr/bin/env bash
# The ingress benchmark drives load with wrk (Debian's package `wrk`).
set -euo pipefail
command -v wrk >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq wrk >/dev/null
else
    echo "wrk is needed for 'make bench': install it (apt-get install wrk, brew install wrk)." >&2
    exit 1
fi
