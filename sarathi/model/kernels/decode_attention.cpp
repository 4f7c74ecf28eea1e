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

#include "avx512_math.h"

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
// one horizontal sum and one scalar exp per (key, query head) and reaches ~8 GB/s of K/V on a 2-core EPYC
// that streams ~50 GB/s. Here scores come 16 keys at a time, each key's products with a query head
// accumulated in one register and the 16 registers summed lane-wise by a transpose-add (3 instructions per
// key instead of an 8-instruction horizontal sum per key and head), the exp is a vector polynomial, and
// P.V keeps the heads of a group in registers while the tile's V rows stream by.

// 16 dims of row p as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return sarathi_kernels::bf16_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
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

// bf16 caches on CPUs with AVX512-BF16 run P.V on the dot-product unit, two keys per instruction.
template <typename T>
constexpr bool kPairedPV =
#if defined(__AVX512BF16__)
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// One tile of up to 16 keys of one KV head, for the G query heads sharing it: the scores, the online
// softmax update of each head's running maximum m and sum l, and acc = alpha acc + sum_t p_t v_t.
// krow / vrow: the tile's key and value rows of this KV head; qraw: the heads' query rows as stored (read
// by the bf16 dot products, which scale the scores), qv: the same as float32 with the scale applied.
template <typename T, int64_t D, int GN>
inline void tile(const T* qraw, const __m512* qv, const T* const* krow, const T* const* vrow, int64_t n,
                 float scale, float* m, float* l, float* acc) {
  constexpr int64_t V = D / 16;
  const __mmask16 live = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  __m512 sc[GN];
  __m512 part[16];
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 pairs multiplied and summed in float32 by the dot-product unit: K rows read as they are.
    for (int g = 0; g < GN; ++g) {
      __m512bh qb[V / 2];
      for (int64_t j = 0; j < V / 2; ++j) qb[j] = (__m512bh)_mm512_loadu_si512(qraw + g * D + j * 32);
      for (int64_t i = 0; i < 16; ++i) {
        __m512 s = _mm512_setzero_ps();
        if (i < n)
          for (int64_t j = 0; j < V / 2; ++j) s = _mm512_dpbf16_ps(s, qb[j], (__m512bh)_mm512_loadu_si512(krow[i] + j * 32));
        part[i] = s;
      }
      sc[g] = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));
    }
  } else
#endif
  {
    // The tile's keys as float32 rows: float32 caches are read in place, bf16 ones converted once here
    // for all GN heads.
    alignas(64) float kbuf[std::is_same_v<T, float> ? 1 : 16 * D];
    const float* kr[16];
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        kr[i] = krow[i];
      } else {
        for (int64_t j = 0; j < V; ++j) _mm512_store_ps(kbuf + i * D + j * 16, load16(krow[i] + j * 16));
        kr[i] = kbuf + i * D;
      }
    }
    for (int g = 0; g < GN; ++g) {
      for (int64_t i = 0; i < 16; ++i) {
        __m512 s = _mm512_setzero_ps();
        if (i < n)
          for (int64_t j = 0; j < V; ++j) s = _mm512_fmadd_ps(qv[g * V + j], _mm512_loadu_ps(kr[i] + j * 16), s);
        part[i] = s;
      }
      sc[g] = sum16(part);
    }
  }
  alignas(64) float p[GN][16];
  float alpha[GN];
  for (int g = 0; g < GN; ++g) {
    const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), live, sc[g]);
    const float mn = std::max(m[g], _mm512_reduce_max_ps(x));
    alpha[g] = std::exp(m[g] - mn);  // 0 on the first tile (m = -inf)
    m[g] = mn;
    const __m512 e = _mm512_maskz_mov_ps(live, sarathi_kernels::exp_le0(_mm512_sub_ps(x, _mm512_set1_ps(mn))));
    l[g] = l[g] * alpha[g] + _mm512_reduce_add_ps(e);
    _mm512_store_ps(p[g], e);
  }
  // Whole V rows against all GN heads at once: GN x V independent accumulators, enough to keep the
  // multiply-add units busy (one accumulator per head would chain each on the previous one's latency).
  __m512 a[GN][V];
  for (int g = 0; g < GN; ++g)
    for (int64_t j = 0; j < V; ++j) a[g][j] = _mm512_mul_ps(_mm512_loadu_ps(acc + g * D + j * 16), _mm512_set1_ps(alpha[g]));
#if defined(__AVX512BF16__)
  if constexpr (kPairedPV<T>) {
    // Two keys per dot-product instruction: their V rows interleaved 16 bits at a time (unpacklo/hi, so
    // accumulator register 2c holds dims 32c + 8r + {0..3} and 2c+1 dims 32c + 8r + {4..7}, r = 0..3:
    // see pv_dim) against the pair of their probabilities rounded to bf16.
    alignas(64) uint32_t pp[GN][8];
    for (int g = 0; g < GN; ++g)
      _mm256_store_si256(reinterpret_cast<__m256i*>(pp[g]), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(p[g])));
    for (int64_t i = 0; i < n; i += 2) {
      const T* r0 = vrow[i];
      const T* r1 = vrow[std::min<int64_t>(i + 1, n - 1)];  // an odd tile's last pair: its p is 0
      for (int64_t c = 0; c < V / 2; ++c) {
        const __m512i x0 = _mm512_loadu_si512(r0 + 32 * c), x1 = _mm512_loadu_si512(r1 + 32 * c);
        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x0, x1), hi = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
        for (int g = 0; g < GN; ++g) {
          const __m512bh pg = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[g][i / 2]));
          a[g][2 * c] = _mm512_dpbf16_ps(a[g][2 * c], pg, lo);
          a[g][2 * c + 1] = _mm512_dpbf16_ps(a[g][2 * c + 1], pg, hi);
        }
      }
    }
  } else
#endif
  {
    for (int64_t i = 0; i < n; ++i) {
      __m512 v[V];
      for (int64_t j = 0; j < V; ++j) v[j] = load16(vrow[i] + j * 16);
      for (int g = 0; g < GN; ++g) {
        const __m512 pg = _mm512_set1_ps(p[g][i]);
        for (int64_t j = 0; j < V; ++j) a[g][j] = _mm512_fmadd_ps(pg, v[j], a[g][j]);
      }
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int64_t j = 0; j < V; ++j) _mm512_storeu_ps(acc + g * D + j * 16, a[g][j]);
}

// The output dim of accumulator slot idx (register idx / 16, lane idx % 16) after the paired P.V.
inline int64_t pv_dim(int64_t idx) {
  const int64_t j = idx / 16, k = idx % 16;
  return 32 * (j / 2) + 8 * (k / 4) + 4 * (j % 2) + k % 4;
}

// Parallel over sequences when there are enough of them (each thread then streams whole K/V blocks, all
// heads of a token being adjacent), else over (sequence, KV head) so a short batch still uses every core.
// Each sequence's keys are read 16 at a time with an online softmax, so K and V are read once, in one pass.
template <typename T, int64_t D>
void decode_kernel_avx512(const T* q, const T* kc, const T* vc, const int64_t* tables, const int64_t* lens,
                          T* out, int64_t B, int64_t H, int64_t KVH, int64_t bs, int64_t W, float scale) {
  constexpr int64_t V = D / 16;
  constexpr int kGroup = static_cast<int>(256 / D);  // 4 heads at D = 64, 2 at D = 128
  constexpr int64_t kAhead = 64;  // keys prefetched ahead
  const int64_t G = H / KVH;
  const bool per_seq = B >= 2 * at::get_num_threads();
  const int64_t items = per_seq ? B : B * KVH;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m(H), l(H), acc(H * D);
    std::vector<__m512> qv(H * V);
    const T* krow[16];
    const T* vrow[16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = per_seq ? item : item / KVH;
      const int64_t kh0 = per_seq ? 0 : item % KVH, kh1 = per_seq ? KVH : kh0 + 1;
      const int64_t L = lens[b];
      const int64_t* table = tables + b * W;
      for (int64_t h = kh0 * G; h < kh1 * G; ++h) {
        m[h] = -std::numeric_limits<float>::infinity();
        l[h] = 0.f;
        std::fill(acc.begin() + h * D, acc.begin() + (h + 1) * D, 0.f);
        for (int64_t j = 0; j < V; ++j)
          qv[h * V + j] = _mm512_mul_ps(load16(q + (b * H + h) * D + j * 16), _mm512_set1_ps(scale));
      }
      int64_t blk = 0, slot = 0;  // where key t0 + i lives: block table[blk], slot within it (no divisions)
      int64_t base[16];
      for (int64_t t0 = 0; t0 < L; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, L - t0);
        for (int64_t i = 0; i < n; ++i) {
          base[i] = (table[blk] * bs + slot) * KVH * D;
          if (++slot == bs) slot = 0, ++blk;
        }
        // Ask for the next kAhead keys' K/V rows (into L2) at every tile. Without it each tile waits on
        // DRAM: 11 GB/s measured on a 2-core EPYC with the cache out of L3; with it 22 GB/s (a plain
        // copy: ~50). Each row is asked for four times: fetching each row once (at the same or twice the
        // distance, with or without a second prefetch into L1) measured 15-35% slower.
        for (int64_t t = t0 + 16, b2 = blk, s2 = slot; t < std::min<int64_t>(L, t0 + 16 + kAhead); ++t) {
          const int64_t row = ((table[b2] * bs + s2) * KVH + kh0) * D;
          for (int64_t off = 0; off < (kh1 - kh0) * D * static_cast<int64_t>(sizeof(T)); off += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kc + row) + off, _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(vc + row) + off, _MM_HINT_T1);
          }
          if (++s2 == bs) s2 = 0, ++b2;
        }
        for (int64_t kh = kh0; kh < kh1; ++kh) {
          for (int64_t i = 0; i < n; ++i) {
            krow[i] = kc + base[i] + kh * D;
            vrow[i] = vc + base[i] + kh * D;
          }
          // heads in groups of at most kGroup: their accumulators and a V row fill the 32 vector registers
          for (int64_t g0 = 0; g0 < G; g0 += kGroup) {
            const int64_t h = kh * G + g0;
            const __m512* qh = qv.data() + h * V;
            const T* qr = q + (b * H + h) * D;
            float *mh = m.data() + h, *lh = l.data() + h, *ah = acc.data() + h * D;
            switch (std::min<int64_t>(kGroup, G - g0)) {
              case 1: tile<T, D, 1>(qr, qh, krow, vrow, n, scale, mh, lh, ah); break;
              case 2: tile<T, D, 2>(qr, qh, krow, vrow, n, scale, mh, lh, ah); break;
              case 3: tile<T, D, std::min<int>(3, kGroup)>(qr, qh, krow, vrow, n, scale, mh, lh, ah); break;
              default: tile<T, D, kGroup>(qr, qh, krow, vrow, n, scale, mh, lh, ah); break;
            }
          }
        }
      }
      for (int64_t h = kh0 * G; h < kh1 * G; ++h)
        for (int64_t i = 0; i < D; ++i)
          out[(b * H + h) * D + (kPairedPV<T> ? pv_dim(i) : i)] = static_cast<T>(acc[h * D + i] / l[h]);
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
