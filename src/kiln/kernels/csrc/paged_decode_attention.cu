// Paged decode attention in CUDA C++: one new query a sequence against its cached K/V, over
// kiln's paged pool (kiln.kernels.common): k_cache, v_cache [num_blocks, block_size, Hkv, D],
// token t of sequence b in block block_tables[b][t / block_size] at offset t % block_size.
// The query of sequence b sits at position context_lens[b] - 1; a sliding window keeps the keys
// with (context_lens[b] - 1) - pos < window. Same contract as paged_decode_attention_ref.
//
// One thread block takes (sequence, kv head, up to MAX_G of its query heads, split): the query
// heads that share a kv head read each K/V row once. The context is cut into splits of
// tokens_per_split keys (flash-decoding); each split keeps its scores in shared memory
//   1. scores: a group of TG lanes takes one key row (16-byte loads, lanes across D), dots it
//      with every query head in registers and reduces through warp shuffles;
//   2. softmax: one warp a query head (max, exp, sum) over the split's scores;
//   3. P @ V: threads across D (and across keys for D < 128), partial sums merged in shared
//      memory.
// With one split the block writes the output; with several it writes its normalized partial
// output and log-sum-exp, and a second kernel merges the splits.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <cstdint>

namespace {

constexpr int NUM_THREADS = 128;
constexpr int NUM_WARPS = NUM_THREADS / 32;
constexpr int MAX_G = 8;  // query heads a block takes; larger groups span several blocks

struct Params {
  const void* q;        // [B, Hq, D]
  const void* k_cache;  // [num_blocks, block_size, Hkv, D]
  const void* v_cache;
  const int* block_tables;  // [B, max_blocks]
  const int* context_lens;  // [B]
  void* out;                // [B, Hq, D]
  float* part_out;          // [B, Hq, num_splits, D] (num_splits > 1)
  float* part_lse;          // [B, Hq, num_splits]
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h;
  int64_t cache_stride_block, cache_stride_tok, cache_stride_head;
  int64_t bt_stride;
  float scale;
  int window;  // 0: none
  int block_size, num_heads, num_kv_heads, group, g_chunks;
  int tokens_per_split, num_splits;
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// n contiguous elements (n a multiple of 16 bytes' worth) of src as floats, 16 bytes a load.
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* src, float (&dst)[N]) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(N % VEC == 0, "a lane's slice is whole 16-byte vectors");
#pragma unroll
  for (int i = 0; i < N; i += VEC) {
    uint4 raw = *reinterpret_cast<const uint4*>(src + i);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[i + j] = to_float(e[j]);
  }
}

__device__ __forceinline__ int64_t row_offset(const Params& p, const int* table, int t) {
  const int block = table[t / p.block_size];
  return static_cast<int64_t>(block) * p.cache_stride_block +
         static_cast<int64_t>(t % p.block_size) * p.cache_stride_tok;
}

template <typename T, int D>
__global__ void __launch_bounds__(NUM_THREADS) paged_decode_kernel(Params p) {
  // lanes per key row in phase 1: 16 bytes each, at most a warp
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TG = (D / VEC) < 32 ? (D / VEC) : 32;
  constexpr int ELEMS = D / TG;  // a lane's slice of the row
  constexpr int ROWS_PER_WARP = 32 / TG;
  // phase 3: threads across D (DPT dims each), TL of them across keys
  constexpr int D_THREADS = D < NUM_THREADS ? D : NUM_THREADS;
  constexpr int DPT = D / D_THREADS;
  constexpr int TL = NUM_THREADS / D_THREADS;

  extern __shared__ float scores[];  // [ng, tokens_per_split]
  __shared__ float red[TL > 1 ? TL * MAX_G * D : 1];
  __shared__ float row_max[MAX_G], row_sum[MAX_G];

  const int b = blockIdx.x;
  const int kv_head = blockIdx.y / p.g_chunks;
  const int chunk = blockIdx.y % p.g_chunks;
  const int split = blockIdx.z;
  const int h0 = kv_head * p.group + chunk * MAX_G;  // first query head of this block
  const int ng = min(MAX_G, p.group - chunk * MAX_G);
  const int length = p.context_lens[b];
  const int start = p.window > 0 ? max(0, length - p.window) : 0;
  const int lo = start + split * p.tokens_per_split;
  const int n = max(0, min(lo + p.tokens_per_split, length) - lo);  // keys of this split
  const int* table = p.block_tables + b * p.bt_stride;
  const T* k_base = static_cast<const T*>(p.k_cache) + kv_head * p.cache_stride_head;
  const T* v_base = static_cast<const T*>(p.v_cache) + kv_head * p.cache_stride_head;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  if (n > 0) {
    // 1. scores: lanes g_lane of row r_in_warp; q pre-scaled, in registers
    const int g_lane = lane % TG, r_in_warp = lane / TG;
    float q[MAX_G][ELEMS];
    const T* q_ptr = static_cast<const T*>(p.q) + b * p.q_stride_b + g_lane * ELEMS;
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g < ng) {
        load_row<T, ELEMS>(q_ptr + (h0 + g) * p.q_stride_h, q[g]);
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) q[g][e] *= p.scale;
      }
    }
    for (int base = warp * ROWS_PER_WARP; base < n; base += NUM_WARPS * ROWS_PER_WARP) {
      const int i = base + r_in_warp;  // uniform trip count per warp: every lane shuffles
      float k[ELEMS];
      if (i < n) {
        load_row<T, ELEMS>(k_base + row_offset(p, table, lo + i) + g_lane * ELEMS, k);
      } else {
#pragma unroll
        for (int e = 0; e < ELEMS; ++e) k[e] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) {
        if (g < ng) {
          float dot = 0.f;
#pragma unroll
          for (int e = 0; e < ELEMS; ++e) dot += q[g][e] * k[e];
#pragma unroll
          for (int off = TG / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffff, dot, off);
          if (g_lane == 0 && i < n) scores[g * p.tokens_per_split + i] = dot;
        }
      }
    }
    __syncthreads();

    // 2. softmax over the split, one warp a query head
    for (int g = warp; g < ng; g += NUM_WARPS) {
      float* s = scores + g * p.tokens_per_split;
      float m = -FLT_MAX;
      for (int i = lane; i < n; i += 32) m = fmaxf(m, s[i]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
      float l = 0.f;
      for (int i = lane; i < n; i += 32) {
        const float e = expf(s[i] - m);
        s[i] = e;
        l += e;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffff, l, off);
      if (lane == 0) {
        row_max[g] = m;
        row_sum[g] = l;
      }
    }
    __syncthreads();
  }

  // 3. acc[g][d] = sum_i P[g][i] V[i][d]
  const int d0 = (tid % D_THREADS) * DPT, key_lane = tid / D_THREADS;
  float acc[MAX_G][DPT];
#pragma unroll
  for (int g = 0; g < MAX_G; ++g)
#pragma unroll
    for (int j = 0; j < DPT; ++j) acc[g][j] = 0.f;
  for (int i = key_lane; i < n; i += TL) {
    const T* v = v_base + row_offset(p, table, lo + i) + d0;
    float vf[DPT];
#pragma unroll
    for (int j = 0; j < DPT; ++j) vf[j] = to_float(v[j]);
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g < ng) {
        const float w = scores[g * p.tokens_per_split + i];
#pragma unroll
        for (int j = 0; j < DPT; ++j) acc[g][j] += w * vf[j];
      }
    }
  }
  if constexpr (TL > 1) {  // merge the key lanes' partial sums
#pragma unroll
    for (int g = 0; g < MAX_G; ++g)
      if (g < ng) red[(key_lane * MAX_G + g) * D + d0] = acc[g][0];
    __syncthreads();
    if (key_lane != 0) return;
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g < ng) {
        for (int r = 1; r < TL; ++r) acc[g][0] += red[(r * MAX_G + g) * D + d0];
      }
    }
  }

  for (int g = 0; g < ng; ++g) {
    const int h = h0 + g;
    const float l = n > 0 ? row_sum[g] : 0.f;
    const float inv = l > 0.f ? 1.f / l : 0.f;  // an empty split (or context) gives zeros
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + d0;
#pragma unroll
      for (int j = 0; j < DPT; ++j) o[j] = static_cast<T>(acc[g][j] * inv);
    } else {
      const int64_t part = (static_cast<int64_t>(b) * p.num_heads + h) * p.num_splits + split;
#pragma unroll
      for (int j = 0; j < DPT; ++j) p.part_out[part * D + d0 + j] = acc[g][j] * inv;
      if (d0 == 0) p.part_lse[part] = l > 0.f ? row_max[g] + logf(l) : -INFINITY;
    }
  }
}

// out[b, h] = the splits' partial outputs weighted by exp(lse - max lse), renormalized.
template <typename T, int D>
__global__ void merge_splits_kernel(Params p) {
  const int b = blockIdx.x, h = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(b) * p.num_heads + h) * p.num_splits;
  float top = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) top = fmaxf(top, p.part_lse[first + s]);
  T* o = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f, total = 0.f;
    if (top != -INFINITY) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = expf(p.part_lse[first + s] - top);  // empty splits: 0
        acc += w * p.part_out[(first + s) * D + d];
        total += w;
      }
    }
    o[d] = static_cast<T>(total > 0.f ? acc / total : 0.f);
  }
}

template <typename T, int D>
void launch(Params p, int batch, cudaStream_t stream) {
  const dim3 grid(batch, p.num_kv_heads * p.g_chunks, p.num_splits);
  const size_t smem = sizeof(float) * min(p.group, MAX_G) * p.tokens_per_split;
  if (smem > 48 * 1024) {
    TORCH_CHECK(cudaFuncSetAttribute(paged_decode_kernel<T, D>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)) == cudaSuccess,
                "tokens_per_split too large for shared memory");
  }
  paged_decode_kernel<T, D><<<grid, NUM_THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.num_splits > 1) {
    merge_splits_kernel<T, D><<<dim3(batch, p.num_heads), D < 128 ? D : 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_head_dim(const Params& p, int batch, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 16: launch<T, 16>(p, batch, stream); break;
    case 32: launch<T, 32>(p, batch, stream); break;
    case 64: launch<T, 64>(p, batch, stream); break;
    case 128: launch<T, 128>(p, batch, stream); break;
    case 256: launch<T, 256>(p, batch, stream); break;
    default: TORCH_CHECK(false, "head_dim must be 16, 32, 64, 128 or 256, got ", head_dim);
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     int64_t sliding_window, int64_t tokens_per_split) {
  TORCH_CHECK(q.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, Hq, D], k_cache [N, bs, Hkv, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "k_cache and v_cache must share shape and strides");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a float dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 &&
                  context_lens.scalar_type() == torch::kInt32,
              "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.stride(1) == 1 && context_lens.is_contiguous(), "contiguous metadata");
  const int batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head layout");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1, "head_dim must be contiguous");
  const int vec = 16 / q.element_size();
  for (auto stride : {q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                      k_cache.stride(2)}) {
    TORCH_CHECK(stride % vec == 0, "strides must keep rows 16-byte aligned");
  }
  for (auto ptr : {q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "16-byte aligned tensors expected");
  }
  TORCH_CHECK(tokens_per_split > 0, "tokens_per_split must be positive");

  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto out = torch::empty_like(q, torch::MemoryFormat::Contiguous);
  if (batch == 0) return out;
  const int max_len = block_tables.size(1) * k_cache.size(1);
  const int num_splits = max(1, static_cast<int>((max_len + tokens_per_split - 1) / tokens_per_split));
  const int group = num_heads / num_kv_heads;
  torch::Tensor part_out, part_lse;
  if (num_splits > 1) {
    auto f32 = q.options().dtype(torch::kFloat32);
    part_out = torch::empty({batch, num_heads, num_splits, head_dim}, f32);
    part_lse = torch::empty({batch, num_heads, num_splits}, f32);
  }

  Params p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_tables = block_tables.data_ptr<int>();
  p.context_lens = context_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.part_out = num_splits > 1 ? part_out.data_ptr<float>() : nullptr;
  p.part_lse = num_splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.cache_stride_block = k_cache.stride(0);
  p.cache_stride_tok = k_cache.stride(1);
  p.cache_stride_head = k_cache.stride(2);
  p.bt_stride = block_tables.stride(0);
  p.scale = static_cast<float>(scale);
  p.window = static_cast<int>(sliding_window);
  p.block_size = k_cache.size(1);
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.group = group;
  p.g_chunks = (group + MAX_G - 1) / MAX_G;
  p.tokens_per_split = static_cast<int>(tokens_per_split);
  p.num_splits = num_splits;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (q.scalar_type()) {
    case torch::kFloat32: launch_head_dim<float>(p, batch, head_dim, stream); break;
    case torch::kFloat16: launch_head_dim<at::Half>(p, batch, head_dim, stream); break;
    case torch::kBFloat16: launch_head_dim<at::BFloat16>(p, batch, head_dim, stream); break;
    default: TORCH_CHECK(false, "float32, float16 or bfloat16 expected, got ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over kiln's KV pool (q [B, Hq, D] -> [B, Hq, D])");
}
