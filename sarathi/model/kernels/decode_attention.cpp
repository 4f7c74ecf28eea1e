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
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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


#if defined(__AVX512F__)
// The AVX-512 kernel for head sizes 64 and 128 (float32 or bf16 caches). Why: the generic loop above does
// one horizontal sum and one scalar exp per (key, query head) and reaches ~8 GB/s of K/V, a fifth of the
// memory bandwidth of a 2-core EPYC; this one is memory-bound. Scores: 16 keys at a time, each key's
// products with a query head accumulated in one register, the 16 registers summed lane-wise by a
// transpose-add (3 instructions per key instead of a 8-instruction horizontal sum per key and head).
// Softmax: vector exp over all scores of a head. P.V: 16 output lanes at a time, the G heads sharing a
// KV head kept in registers while V streams by once per 16-lane slice.

// 16 dims of row p as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// r[i] = sum of v[i]'s 16 lanes, for i = 0..15.
inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3 (a = v[2i], b = v[2i+1])
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sum of v[4i], v[4i+1], v[4i+2], v[4i+3]
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Sum the four 128-bit lanes of each x[i] into lane i of the result.
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44), _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44), _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

// e^x for x <= 0 (as in prefill_attention.cpp).
inline __m512 exp_le0(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// acc[g] (16 output lanes at dim offset d0) = sum_t p[g][t] v_t[d0..d0+15] for GN heads of a group.
template <typename T, int GN>
inline void pv_slice(const float* p, int64_t ld, int64_t L, const T* const* vrows, int64_t d0, float* out,
                     int64_t D) {
  __m512 acc[GN];
  for (int g = 0; g < GN; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const __m512 v = load16(vrows[t] + d0);
    for (int g = 0; g < GN; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * ld + t]), v, acc[g]);
  }
  for (int g = 0; g < GN; ++g) _mm512_storeu_ps(out + g * D + d0, acc[g]);
}

template <typename T, int64_t D>
void decode_kernel_avx512(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t KVH, int64_t bs, int64_t W, float scale) {
  constexpr int64_t V = D / 16;  // registers per row
  const int64_t G = H / KVH;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D), inv(G);
    std::vector<const T*> krow, vrow;
    std::vector<__m512> qv(G * V);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, kh = item % KVH;
      const int64_t L = lens[b], Lp = (L + 15) / 16 * 16;
      const int64_t* table = tables + b * W;
      scores.resize(G * Lp);
      krow.resize(L);
      vrow.resize(L);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t off = ((table[t / bs] * bs + t % bs) * KVH + kh) * D;
        krow[t] = kc + off;
        vrow[t] = vc + off;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t j = 0; j < V; ++j)
          qv[g * V + j] = _mm512_mul_ps(load16(q + (b * H + kh * G + g) * D + j * 16), _mm512_set1_ps(scale));
      // scores[g][t] = (scale q_g) . k_t, 16 keys at a time (keys past L contribute zero rows).
      __m512 part[16];
      float kbuf[16 * D];
      for (int64_t t0 = 0; t0 < Lp; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, L - t0);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < V; ++j) _mm512_storeu_ps(kbuf + i * D + j * 16, load16(krow[t0 + i] + j * 16));
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t i = 0; i < 16; ++i) {
            __m512 s = _mm512_setzero_ps();
            if (i < n)
              for (int64_t j = 0; j < V; ++j) s = _mm512_fmadd_ps(qv[g * V + j], _mm512_loadu_ps(kbuf + i * D + j * 16), s);
            part[i] = s;
          }
          _mm512_storeu_ps(scores.data() + g * Lp + t0, sum16(part));
        }
      }
      // softmax numerators (unnormalised) per head; padding keys get exactly 0.
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * Lp;
        __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t t0 = 0; t0 < Lp; t0 += 16) {
          const __mmask16 k = t0 + 16 <= L ? 0xFFFF : static_cast<__mmask16>((1u << (L - t0)) - 1);
          mv = _mm512_mask_max_ps(mv, k, mv, _mm512_loadu_ps(sg + t0));
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < Lp; t0 += 16) {
          const __mmask16 k = t0 + 16 <= L ? 0xFFFF : static_cast<__mmask16>((1u << (L - t0)) - 1);
          const __m512 e = _mm512_maskz_mov_ps(k, exp_le0(_mm512_sub_ps(_mm512_loadu_ps(sg + t0), m)));
          _mm512_storeu_ps(sg + t0, e);
          sum = _mm512_add_ps(sum, e);
        }
        inv[g] = 1.f / _mm512_reduce_add_ps(sum);
      }
      // out[g] = sum_t p[g][t] v_t / sum_t p[g][t]; heads in groups of at most 4 (registers).
      for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t gn = std::min<int64_t>(4, G - g0);
        const float* p = scores.data() + g0 * Lp;
        float* a = acc.data() + g0 * D;
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          switch (gn) {
            case 1: pv_slice<T, 1>(p, Lp, L, vrow.data(), d0, a, D); break;
            case 2: pv_slice<T, 2>(p, Lp, L, vrow.data(), d0, a, D); break;
            case 3: pv_slice<T, 3>(p, Lp, L, vrow.data(), d0, a, D); break;
            default: pv_slice<T, 4>(p, Lp, L, vrow.data(), d0, a, D); break;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          out[(b * H + kh * G + g) * D + d] = static_cast<T>(acc[g * D + d] * inv[g]);
    }
  });
}
#endif

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
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      auto fast = [&](auto kernel) {
        kernel(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
               block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H,
               KVH, bs, W, static_cast<float>(scale));
      };
      if (D == 64) return fast(decode_kernel_avx512<scalar_t, 64>);
      if (D == 128) return fast(decode_kernel_avx512<scalar_t, 128>);
    }
#endif
    if (D == 64) run(decode_kernel<scalar_t, 64>);
    else if (D == 128) run(decode_kernel<scalar_t, 128>);
    else run(decode_kernel<scalar_t, 0>);
  });
  return out;
}

// prefill_attention.cpp
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale);
std::vector<std::string> prefill_attention_dtypes();
// fused_ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor gu);
void rope_(torch::Tensor x, int64_t nrot, torch::Tensor cos, torch::Tensor sin);
bool fused_ops_available();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)");
  m.def("prefill_attention", &prefill_attention, "causal prompt-chunk attention (CPU, AVX-512)");
  m.def("prefill_attention_dtypes", &prefill_attention_dtypes, "the dtypes prefill_attention takes here");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16 rows");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm of bf16 rows");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of bf16 rows");
  m.def("rope_", &rope_, "rotate-half RoPE in place on bf16 heads");
  m.def("fused_ops_available", &fused_ops_available, "whether the fused bf16 ops were built (AVX-512)");
}
