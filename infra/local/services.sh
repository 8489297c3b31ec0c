#!/usr/bin/env bash
# Start a local S3 server (moto) and an MLflow tracking server on 127.0.0.1; print the `export` lines to use
# them; stop both on Ctrl-C or SIGTERM. Arguments go to `python -m pipeline.services up` (see README.md here).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m pipeline.services up "$@"
