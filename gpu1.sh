python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:benchmarks PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
nvidia-smi --query-gpu=name --format=csv
timeout 300 python -m pytest -q -m gpu --timeout 120 -rf -p no:cacheprovider tests/engine/test_gpu.py tests/kernels tests/engine/test_quantized_engine.py tests/engine/test_kv_cache_dtype.py tests/engine/test_kv_eviction.py tests/engine/test_spec_decode.py tests/engine/test_structured.py tests/model/test_w8a8.py tests/engine/test_lora.py 2>&1 | tee $OUT/tests.log | tail -60
timeout 270 python benchmarks/bench_serve_vs_offline.py --random-qwen3 /tmp/q3 --num-prompts 1000 --repeat 3 --rates 250 275 --clients 4 --variant 'api2=--api-server-count 2' --variant 'api1=' --out /tmp/sv 2>&1 | tee $OUT/serve.log | tail -40
cp /tmp/sv/*.md /tmp/sv/*.png $OUT/ 2>/dev/null; ls $OUT
