#!/usr/bin/env bash
# Serve a model over kiln's OpenAI-compatible API: ./run_server.sh --model quantized/4bit --port 8080
# Every argument goes to `kiln serve`; the repository's .venv is used when it has kiln.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -x "$here/.venv/bin/kiln" ]]; then
    exec "$here/.venv/bin/kiln" serve "$@"
elif command -v kiln >/dev/null 2>&1; then
    exec kiln serve "$@"
else
    exec python -m kiln.cli serve "$@"
fi
