#!/usr/bin/env bash
# The speculative-decoding benchmark's models, then the benchmark, in stages:
#   pretrain  the target (~0.3B) and a draft model (~23M) on the bundled corpus less The
#             Winter's Tale (bench_spec.py's held-out prompts)
#   heads     Medusa, EAGLE and early-exit drafts for the target (`kiln train-draft`, on the
#             target's own greedy continuations of corpus prompts)
#   bench     bench_spec.py over every method, with the batch sweep
# One H100: a few minutes each. Usage:
#   [STAGES="pretrain heads bench"] benchmarks/train_spec_models.sh [KILN]
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${1:-"python -m kiln.cli"}
STAGES=${STAGES:-"pretrain heads bench"}
TARGET=runs/spec_target/model

for stage in $STAGES; do
    case $stage in
    pretrain)
        mkdir -p runs/spec_corpus
        cp src/kiln/data/shakespeare/*.txt runs/spec_corpus/
        rm runs/spec_corpus/winters_tale_gut.txt
        $KILN pretrain --config benchmarks/spec_models/target.toml --corpus runs/spec_corpus
        $KILN pretrain --config benchmarks/spec_models/draft.toml --corpus runs/spec_corpus
        ;;
    heads)
        for method in medusa eagle early_exit; do
            $KILN train-draft --model $TARGET --method $method --out runs/spec_heads/$method \
                --corpus runs/spec_corpus --self-distill --num-prompts 1024 \
                --max-steps 2000 --batch-size 16 # early_exit: after layer 6 of 24 (the default)
        done
        ;;
    bench)
        python benchmarks/bench_spec.py --model $TARGET --draft runs/spec_draft/model \
            --medusa runs/spec_heads/medusa --eagle runs/spec_heads/eagle \
            --early-exit runs/spec_heads/early_exit --device cuda --dtype bfloat16 \
            --sweep 1 2 4 8 16 32 --json runs/spec_bench.json
        ;;
    *)
        echo "unknown stage '$stage' (pretrain, heads, bench)" >&2
        exit 2
        ;;
    esac
done
