python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:benchmarks PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
nvidia-smi --query-gpu=name --format=csv
timeout 150 python benchmarks/bench_structured.py 2>&1 | tee $OUT/structured.log | tail -30
timeout 150 python benchmarks/bench_lora.py 2>&1 | tee $OUT/lora.log | tail -30
timeout 150 python benchmarks/bench_kv.py --part all --json $OUT/kv.json 2>&1 | tee $OUT/kv.log | tail -30
timeout 120 python benchmarks/bench_engine.py --skip hf 2>&1 | tee $OUT/engine.log | tail -30
ls $OUT
