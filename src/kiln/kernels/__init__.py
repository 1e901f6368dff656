"""Triton kernels for the inference engine, each beside its plain-torch reference.

Every kernel module holds `<name>_ref` (plain torch, runs anywhere), `<name>_triton` (the
kernel; on CPU only under TRITON_INTERPRET=1) and `<name>`, which picks Triton for CUDA
tensors and the reference otherwise. KV cache layout, per layer:
[num_blocks, block_size, num_kv_heads, head_dim]; slot = block_id * block_size + offset.
The attention kernels take it as a PagedKV, with HeadLayout and QKNormRope beside it for the
ones that start from the qkv projection (kiln.kernels.common).
"""

from kiln.kernels.common import HeadLayout, PagedKV, QKNormRope
from kiln.kernels.mixed_attention import mixed_attention
from kiln.kernels.paged_decode_attention import paged_decode_attention
from kiln.kernels.rmsnorm import rmsnorm
from kiln.kernels.rope import rope
from kiln.kernels.silu_and_mul import silu_and_mul
from kiln.kernels.store_kvcache import store_kvcache
from kiln.kernels.varlen_prefill_attention import varlen_prefill_attention

__all__ = [
    "HeadLayout",
    "PagedKV",
    "QKNormRope",
    "mixed_attention",
    "paged_decode_attention",
    "rmsnorm",
    "rope",
    "silu_and_mul",
    "store_kvcache",
    "varlen_prefill_attention",
]
