python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src:benchmarks PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
nvidia-smi --query-gpu=name --format=csv
timeout 240 python benchmarks/bench_quant.py --part kernels --sweep 2>&1 | tee $OUT/quant_kernels.log | tail -50
timeout 200 python benchmarks/bench_quant.py --part decode --new-tokens 128 2>&1 | tee $OUT/quant_decode.log | tail -30
timeout 120 python benchmarks/bench_w8a8.py 2>&1 | tee $OUT/w8a8.log | tail -30
ls $OUT
