#!/usr/bin/env bash
# Train the speculative-decoding benchmark's target (~0.3B) and draft (~23M) on the bundled
# corpus less The Winter's Tale (bench_spec.py's held-out prompts), then run the benchmark.
# One H100: a few minutes each. Usage: benchmarks/train_spec_models.sh [KILN]
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-"python -m kiln.cli"}
mkdir -p runs/spec_corpus
cp src/kiln/data/shakespeare/*.txt runs/spec_corpus/
rm runs/spec_corpus/winters_tale_gut.txt
$KILN pretrain --config benchmarks/spec_models/target.toml --corpus runs/spec_corpus
$KILN pretrain --config benchmarks/spec_models/draft.toml --corpus runs/spec_corpus
python benchmarks/bench_spec.py --model runs/spec_target/model --draft runs/spec_draft/model \
    --device cuda --dtype bfloat16 --sweep 1 2 4 8 16 32
