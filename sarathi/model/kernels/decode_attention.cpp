// Paged decode attention for CPU: one query token per sequence, K/V read in place from the block cache.
//
// Why: the pure-torch path gathers every sequence's K/V blocks into a dense copy each layer
// (index_select) and runs SDPA on it, so the cache is read, written and read again; this reads each
// cached key and value once, straight from its block. Parallel over (sequence, KV head); the G query
// heads sharing a KV head are handled together so each K/V row is loaded once for all of them.
// Accumulation is in float32 whatever the cache dtype (as SDPA does on CPU).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// bf16 -> fp32 is a 16-bit shift; spelled out so the loops vectorise (the c10 conversion does not).
template <>
inline float to_f<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// DC > 0: the head size as a compile-time constant (64, 128: full unrolling and vectorisation);
// DC == 0: any head size.
template <typename T, int64_t DC>
void decode_kernel(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens, T* out,
                   int64_t B, int64_t H, int64_t KVH, int64_t Din, int64_t bs, int64_t W, float scale) {
  const int64_t D = DC > 0 ? DC : Din;
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, kf(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, kh = item % KVH;
      const int64_t L = lens[b];
      scores.assign(G * L, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(q[(b * H + kh * G + g) * D + d]) * scale;
      const int64_t* table = tables + b * W;
      // scores[g, t] = q_g . k_t
      for (int64_t t = 0; t < L; ++t) {
        const T* kp = kc + ((table[t / bs] * bs + t % bs) * KVH + kh) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = to_f(kp[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          scores[g * L + t] = s;
        }
      }
      // softmax over t, per query head
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
      }
      // out[g] = sum_t p[g, t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const T* vp = vc + ((table[t / bs] * bs + t % bs) * KVH + kh) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kf[d] = to_f(vp[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * kf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(b * H + kh * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
    }
  });
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [blocks, block_size, KVH, D]; block_tables [B, W] int64 (entries past a
// sequence's length are ignored); seq_lens [B] int64 (>= 1). Returns [B, H, D] in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0, "head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "one table and length per sequence");
  const int64_t W = block_tables.size(1);
  TORCH_CHECK(B == 0 || seq_lens.max().item<int64_t>() <= W * bs, "a sequence is longer than its table");
  TORCH_CHECK(B == 0 || seq_lens.min().item<int64_t>() >= 1, "every sequence needs a key");
  TORCH_CHECK(B == 0 || (block_tables.min().item<int64_t>() >= 0 &&
                        block_tables.max().item<int64_t>() < k_cache.size(0)), "a block id is out of range");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    auto run = [&](auto kernel) {
      kernel(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
             block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H,
             KVH, D, bs, W, static_cast<float>(scale));
    };
    if (D == 64) run(decode_kernel<scalar_t, 64>);
    else if (D == 128) run(decode_kernel<scalar_t, 128>);
    else run(decode_kernel<scalar_t, 0>);
  });
  return out;
}

// prefill_attention.cpp
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale);
std::vector<std::string> prefill_attention_dtypes();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
  m.def("prefill_attention", &prefill_attention, "causal prompt-chunk attention (CPU, AVX-512)");
  m.def("prefill_attention_dtypes", &prefill_attention_dtypes, "the dtypes prefill_attention takes here");
}
