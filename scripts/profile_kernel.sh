#!/usr/bin/env bash
# One kiln Triton kernel under Nsight Compute, at Qwen3-0.6B's shapes:
#   scripts/profile_kernel.sh paged_decode_attention [--batch 32 --ctx 1024]
# Writes runs/ncu/KERNEL.ncu-rep (open in ncu-ui, or `ncu --import FILE --page details`) and
# prints ncu's summary of the last launch. Kernels: see benchmarks/kernel_launch.py --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: scripts/profile_kernel.sh KERNEL [kernel_launch.py flags]" >&2
    exit 2
fi
kernel="$1"
shift
python="${PYTHON:-$(command -v python3 || command -v python)}"
[[ -x "$root/.venv/bin/python" ]] && python="${PYTHON:-$root/.venv/bin/python}"
ncu="${NCU:-$(command -v ncu || true)}"
if [[ -z "$ncu" ]]; then
    echo "profile_kernel.sh: error: Nsight Compute (ncu) not found: install the CUDA toolkit's nsight-compute or set NCU=/path/to/ncu" >&2
    exit 2
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "profile_kernel.sh: error: no CUDA device visible to $python" >&2
    exit 2
fi
# fail early, in one line, on a kernel name the launcher does not know
"$python" "$root/benchmarks/kernel_launch.py" --help | grep -qw -- "$kernel" \
    || { echo "profile_kernel.sh: error: unknown kernel '$kernel' (see benchmarks/kernel_launch.py --help)" >&2; exit 2; }
out="$root/runs/ncu"
mkdir -p "$out"
# every kernel of the last (warm) launch: the launcher wraps it in the NVTX range "profile"
"$ncu" --set full --target-processes all --nvtx --nvtx-include "profile/" \
    --export "$out/$kernel" --force-overwrite \
    "$python" "$root/benchmarks/kernel_launch.py" "$kernel" --launches 3 "$@"
echo "report: $out/$kernel.ncu-rep"
