#!/usr/bin/env bash
# The container's entrypoint: serve the model mounted at $KILN_MODEL on $KILN_HOST:$KILN_PORT.
# Extra arguments go to `kiln serve`. A missing or empty mount is a one-line error (exit 2).
set -euo pipefail
model="${KILN_MODEL:-/model}"
if [[ ! -d "$model" ]]; then
    echo "kiln-entrypoint: error: no model directory at $model (mount one: -v /path/to/model:$model:ro)" >&2
    exit 2
fi
if [[ ! -f "$model/config.json" ]]; then
    echo "kiln-entrypoint: error: $model has no config.json (mount a Hugging Face model directory)" >&2
    exit 2
fi
exec kiln serve --model "$model" --host "${KILN_HOST:-0.0.0.0}" --port "${KILN_PORT:-8000}" \
    --served-model-name "${KILN_MODEL_NAME:-$(basename "$model")}" "$@"
