#!/usr/bin/env bash
# The main job in one command: installs what is missing, builds, then serves a 16 KB file with
# python3 -m http.server natively and offloaded to tcpsd under wrk load (bench/web_demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh
bash bench/web_demo.sh build
