#!/usr/bin/env bash
# The main job, from a fresh clone: creates/refreshes .venv, then runs the embedded tiny CPU demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec bash "$ROOT/scripts/demo_job.sh" "$@"
