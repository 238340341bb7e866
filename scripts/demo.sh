#!/usr/bin/env bash
# The main job in one command: installs what is missing, builds, then serves a 16 KB file with
# an unmodified Apache 2.4 (mpm_event) natively and offloaded to tcpsd under wrk load, and
# prints requests/s and CPU per request for both (bench/web_demo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
bash scripts/build.sh
bash bench/web_demo.sh build
