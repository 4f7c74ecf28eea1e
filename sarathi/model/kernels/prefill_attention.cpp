// Causal attention of a prompt chunk over its request's keys, for CPUs with AVX-512 (bf16 with
// AVX512-BF16, float32 with AVX512F).
//
// Why: a 512-token prompt chunk spends ~30% of its time in attention, and torch's CPU flash attention
// reaches ~70-110 GFLOP/s there, far below the vector units' rate. bf16: both products (Q.K^T and P.V)
// run on _mm512_dpbf16_ps, which multiplies bf16 pairs and accumulates in fp32, over K and V repacked
// once per call into the pair-interleaved ("VNNI") layout that instruction reads. float32: FMAs over K
// repacked as 16-key column blocks, V read in place. Both: 8 query rows per tile share every K load,
// and the softmax is the online (flash) one in fp32, so no [n, kv_len] score matrix is ever written.
//
// Semantics (as SDPA with the bottom-right causal mask): query i of the chunk sits at absolute position
// kv_len - n + i and attends keys 0..that position. q: [n, H, D], k / v: [kv_len, KVH, D] (any row
// strides, last dimension contiguous), H a multiple of KVH (grouped-query attention), D 64 or 128.
// bf16: probabilities are rounded to bf16 before P.V (the products stay fp32), as bf16 kernels do.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "avx512_math.h"

#if defined(__AVX512F__)

namespace {

constexpr int64_t kKeys = 32;  // keys per block: two 16-lane score registers
constexpr int64_t kRows = 8;   // query rows per tile: each K register loaded serves all of them

// One row's online-softmax step over keys k0..k0+31 given their raw scores s0 (keys 0-15) and s1:
// the new running maximum m, the factor alpha that rescales what was accumulated before, and the
// probabilities p0, p1 (exactly 0 for keys after the row's position). False: the row sees none of them.
inline bool softmax_step(__m512 s0, __m512 s1, int64_t pos, int64_t k0, float scale, float& m, float& alpha,
                         __m512& p0, __m512& p1) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i lim = _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(pos - k0, 64)));
  const __mmask16 m0 = _mm512_cmple_epi32_mask(lane, lim);
  const __mmask16 m1 = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), lim);
  if (!m0 && !m1) return false;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 x0 = _mm512_mask_mul_ps(ninf, m0, s0, _mm512_set1_ps(scale));
  const __m512 x1 = _mm512_mask_mul_ps(ninf, m1, s1, _mm512_set1_ps(scale));
  const float mn = std::max(m, _mm512_reduce_max_ps(_mm512_max_ps(x0, x1)));
  alpha = std::exp(m - mn);  // 0 on the row's first block (m = -inf)
  m = mn;
  const __m512 mv = _mm512_set1_ps(mn);
  p0 = _mm512_maskz_mov_ps(m0, sarathi_kernels::exp_le0(_mm512_sub_ps(x0, mv)));
  p1 = _mm512_maskz_mov_ps(m1, sarathi_kernels::exp_le0(_mm512_sub_ps(x1, mv)));
  return true;
}

// A tile's query rows and their running softmax state; rows past the chunk repeat its last row (their
// results are never stored). acc holds the unnormalised output, m the running maximum, l the sum.
template <typename T, int64_t D>
struct Rows {
  const T* q[kRows];
  int64_t pos[kRows];
  float m[kRows], l[kRows], alpha[kRows];
  alignas(64) float acc[kRows][D];

  Rows(const T* qd, int64_t sq, int64_t n, int64_t kv_len, int64_t head, int64_t i0) {
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t i = std::min(i0 + r, n - 1);
      q[r] = qd + i * sq + head * D;
      pos[r] = kv_len - n + i;
      m[r] = -std::numeric_limits<float>::infinity();
      l[r] = 0.f;
      std::fill(acc[r], acc[r] + D, 0.f);
    }
  }
  int64_t last() const { return pos[kRows - 1]; }
};

// ---- float32 ------------------------------------------------------------------------------------
// Kp: [KVH][blocks of 16 keys][D][16 keys], zero past kv_len.
void pack_f32(const float* k, int64_t sk, int64_t kv_len, int64_t KVH, int64_t D, int64_t padded, float* Kp) {
  at::parallel_for(0, KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h)
      for (int64_t t = 0; t < padded; ++t) {
        float* kb = Kp + h * padded * D + (t / 16) * 16 * D + t % 16;
        for (int64_t d = 0; d < D; ++d) kb[d * 16] = t < kv_len ? k[t * sk + h * D + d] : 0.f;
      }
  });
}

template <int64_t D>
void tile_f32(const float* q, int64_t sq, int64_t n, int64_t kv_len, int64_t head, int64_t G, int64_t i0,
              const float* Kp, const float* v, int64_t sv, int64_t padded, float scale, float* out, int64_t so) {
  constexpr int64_t C = D / 16, RP = 16 / C;
  const int64_t kvh = head / G;
  const float* kh = Kp + kvh * padded * D;
  Rows<float, D> t(q, sq, n, kv_len, head, i0);
  auto& [qr, pos, m, l, alpha, acc] = t;
  alignas(64) float pf[kRows][kKeys];
  const int64_t last = t.last();
  for (int64_t k0 = 0; k0 <= last; k0 += kKeys) {
    __m512 s[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
    const float* b0 = kh + (k0 / 16) * 16 * D;
    const float* b1 = b0 + 16 * D;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 kv0 = _mm512_loadu_ps(b0 + d * 16), kv1 = _mm512_loadu_ps(b1 + d * 16);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512 qb = _mm512_set1_ps(qr[r][d]);
        s[r][0] = _mm512_fmadd_ps(qb, kv0, s[r][0]);
        s[r][1] = _mm512_fmadd_ps(qb, kv1, s[r][1]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      __m512 p0, p1;
      if (!softmax_step(s[r][0], s[r][1], pos[r], k0, scale, m[r], alpha[r], p0, p1)) {
        alpha[r] = 1.f;
        std::fill(pf[r], pf[r] + kKeys, 0.f);
        continue;
      }
      _mm512_store_ps(pf[r], p0);
      _mm512_store_ps(pf[r] + 16, p1);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
    }
    const int64_t keys = std::min(kKeys, kv_len - k0);  // V is read in place: never past its end
    for (int64_t r0 = 0; r0 < kRows; r0 += RP) {
      __m512 o[RP][C];
      for (int64_t r = 0; r < RP; ++r)
        for (int64_t c = 0; c < C; ++c)
          o[r][c] = _mm512_mul_ps(_mm512_load_ps(acc[r0 + r] + 16 * c), _mm512_set1_ps(alpha[r0 + r]));
      for (int64_t j = 0; j < keys; ++j) {
        const float* vr = v + (k0 + j) * sv + kvh * D;
        for (int64_t c = 0; c < C; ++c) {
          const __m512 vv = _mm512_loadu_ps(vr + 16 * c);
          for (int64_t r = 0; r < RP; ++r) o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(pf[r0 + r][j]), vv, o[r][c]);
        }
      }
      for (int64_t r = 0; r < RP; ++r)
        for (int64_t c = 0; c < C; ++c) _mm512_store_ps(acc[r0 + r] + 16 * c, o[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows && i0 + r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    float* dst = out + (i0 + r) * so + head * D;
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), inv));
  }
}

// ---- bfloat16 -----------------------------------------------------------------------------------
#if defined(__AVX512BF16__)
inline __m512bh bcast_pair(const uint16_t* pair) {
  uint32_t w;
  std::memcpy(&w, pair, sizeof(w));
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
}

// Kp: [KVH][blocks of 16 keys][D/2 pairs][16 keys][2]; Vp: [KVH][key pairs][D][2]. Keys past kv_len are
// zero (their scores are masked; their probabilities are exactly zero).
void pack(const uint16_t* k, const uint16_t* v, int64_t sk, int64_t sv, int64_t kv_len, int64_t KVH,
          int64_t D, int64_t padded, uint16_t* Kp, uint16_t* Vp) {
  at::parallel_for(0, KVH, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      uint16_t* kh = Kp + h * padded * D;
      uint16_t* vh = Vp + h * padded * D;
      for (int64_t t = 0; t < padded; ++t) {
        const uint16_t* kr = t < kv_len ? k + t * sk + h * D : nullptr;
        const uint16_t* vr = t < kv_len ? v + t * sv + h * D : nullptr;
        uint16_t* kb = kh + (t / 16) * 16 * D + (t % 16) * 2;  // block, then lane
        for (int64_t p = 0; p < D / 2; ++p) {
          kb[p * 32] = kr ? kr[2 * p] : 0;
          kb[p * 32 + 1] = kr ? kr[2 * p + 1] : 0;
        }
        uint16_t* vb = vh + (t / 2) * 2 * D + (t % 2);
        for (int64_t d = 0; d < D; ++d) vb[2 * d] = vr ? vr[d] : 0;
      }
    }
  });
}

template <int64_t D>
void tile_bf16(const uint16_t* q, int64_t sq, int64_t n, int64_t kv_len, int64_t head, int64_t G, int64_t i0,
          const uint16_t* Kp, const uint16_t* Vp, int64_t padded, float scale, uint16_t* out, int64_t so) {
  constexpr int64_t P = D / 2;    // bf16 pairs per row
  constexpr int64_t C = D / 16;   // fp32 output registers per row
  constexpr int64_t RP = 16 / C;  // rows per P.V pass: 16 output accumulators in flight
  const int64_t kvh = head / G;
  const uint16_t* kh = Kp + kvh * padded * D;
  const uint16_t* vh = Vp + kvh * padded * D;
  Rows<uint16_t, D> t(q, sq, n, kv_len, head, i0);
  auto& [qr, pos, m, l, alpha, acc] = t;
  alignas(64) uint16_t pb[kRows][kKeys];
  const int64_t last = t.last();
  for (int64_t k0 = 0; k0 <= last; k0 += kKeys) {
    // scores of every row against keys k0..k0+31
    __m512 s[kRows][2];
    for (int64_t r = 0; r < kRows; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
    const uint16_t* b0 = kh + (k0 / 16) * 16 * D;
    const uint16_t* b1 = b0 + 16 * D;
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh kv0 = (__m512bh)_mm512_loadu_si512(b0 + p * 32);
      const __m512bh kv1 = (__m512bh)_mm512_loadu_si512(b1 + p * 32);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512bh qb = bcast_pair(qr[r] + 2 * p);
        s[r][0] = _mm512_dpbf16_ps(s[r][0], qb, kv0);
        s[r][1] = _mm512_dpbf16_ps(s[r][1], qb, kv1);
      }
    }
    // online softmax; the sum uses the probabilities as rounded for P.V, so the weights sum to 1
    for (int64_t r = 0; r < kRows; ++r) {
      __m512 p0, p1;
      if (!softmax_step(s[r][0], s[r][1], pos[r], k0, scale, m[r], alpha[r], p0, p1)) {
        alpha[r] = 1.f;
        std::memset(pb[r], 0, sizeof(pb[r]));
        continue;
      }
      const __m512bh pbh = _mm512_cvtne2ps_pbh(p1, p0);  // lanes 0-15: keys 0-15, 16-31: keys 16-31
      _mm512_storeu_si512(pb[r], (__m512i)pbh);
      const __m512i wide0 =
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)pb[r])), 16);
      const __m512i wide1 =
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(pb[r] + 16))), 16);
      l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_castsi512_ps(wide0),
                                                                  _mm512_castsi512_ps(wide1)));
    }
    // acc = acc * alpha + P . V, RP rows at a time so each V register loaded serves all of them
    const uint16_t* vb = vh + k0 * D;  // key pair k0/2 onwards: [pair][D][2]
    for (int64_t r0 = 0; r0 < kRows; r0 += RP) {
      __m512 o[RP][C];
      for (int64_t r = 0; r < RP; ++r)
        for (int64_t c = 0; c < C; ++c)
          o[r][c] = _mm512_mul_ps(_mm512_load_ps(acc[r0 + r] + 16 * c), _mm512_set1_ps(alpha[r0 + r]));
      for (int64_t j = 0; j < kKeys / 2; ++j) {
        __m512bh pj[RP];
        for (int64_t r = 0; r < RP; ++r) pj[r] = bcast_pair(pb[r0 + r] + 2 * j);
        for (int64_t c = 0; c < C; ++c) {
          const __m512bh vv = (__m512bh)_mm512_loadu_si512(vb + j * 2 * D + c * 32);
          for (int64_t r = 0; r < RP; ++r) o[r][c] = _mm512_dpbf16_ps(o[r][c], pj[r], vv);
        }
      }
      for (int64_t r = 0; r < RP; ++r)
        for (int64_t c = 0; c < C; ++c) _mm512_store_ps(acc[r0 + r] + 16 * c, o[r][c]);
    }
  }
  for (int64_t r = 0; r < kRows && i0 + r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    uint16_t* dst = out + (i0 + r) * so + head * D;
    for (int64_t c = 0; c < C; ++c) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), inv));
      _mm256_storeu_si256((__m256i*)(dst + 16 * c), (__m256i)h);
    }
  }
}

#endif  // __AVX512BF16__

}  // namespace

std::vector<std::string> prefill_attention_dtypes() {
#if defined(__AVX512BF16__)
  return {"float32", "bfloat16"};
#else
  return {"float32"};
#endif
}

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "bad shapes");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "q, k and v must share a dtype");
#if defined(__AVX512BF16__)
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16, "q, k and v must be float32 or bfloat16");
#else
  TORCH_CHECK(dt == torch::kFloat32, "q, k and v must be float32 (this CPU has no AVX512-BF16)");
#endif
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "the last dimension must be dense");
  TORCH_CHECK(q.stride(1) == q.size(2) && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "heads must be adjacent in a row");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), kv_len = k.size(0), KVH = k.size(1);
  TORCH_CHECK(k.size(2) == D && KVH > 0 && H % KVH == 0, "head sizes do not match");
  TORCH_CHECK(D == 64 || D == 128, "head size must be 64 or 128");
  TORCH_CHECK(n >= 1 && n <= kv_len, "the chunk must be within its keys");
  auto out = torch::empty({n, H, D}, q.options());
  const int64_t padded = (kv_len + kKeys - 1) / kKeys * kKeys;
  const int64_t tiles = (n + kRows - 1) / kRows, G = H / KVH;
  const float sc = static_cast<float>(scale);
  // Tiles late in the chunk see more keys. parallel_for hands each thread a contiguous range of items,
  // so the tiles are ordered first, last, second, second to last, ...: every range is balanced.
  auto for_tiles = [&](auto&& run) {
    at::parallel_for(0, tiles * H, 1, [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int64_t j = item / H, head = item % H;
        run(head, (j % 2 == 0 ? j / 2 : tiles - 1 - j / 2) * kRows);
      }
    });
  };
  if (dt == torch::kFloat32) {
    std::vector<float> Kp(KVH * padded * D);
    pack_f32(k.data_ptr<float>(), k.stride(0), kv_len, KVH, D, padded, Kp.data());
    const float *qd = q.data_ptr<float>(), *vd = v.data_ptr<float>();
    float* od = out.data_ptr<float>();
    for_tiles([&](int64_t head, int64_t i0) {
      if (D == 64)
        tile_f32<64>(qd, q.stride(0), n, kv_len, head, G, i0, Kp.data(), vd, v.stride(0), padded, sc, od, H * D);
      else
        tile_f32<128>(qd, q.stride(0), n, kv_len, head, G, i0, Kp.data(), vd, v.stride(0), padded, sc, od, H * D);
    });
    return out;
  }
#if defined(__AVX512BF16__)
  std::vector<uint16_t> Kp(KVH * padded * D), Vp(KVH * padded * D);
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  pack(kd, vd, k.stride(0), v.stride(0), kv_len, KVH, D, padded, Kp.data(), Vp.data());
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for_tiles([&](int64_t head, int64_t i0) {
    if (D == 64)
      tile_bf16<64>(qd, q.stride(0), n, kv_len, head, G, i0, Kp.data(), Vp.data(), padded, sc, od, H * D);
    else
      tile_bf16<128>(qd, q.stride(0), n, kv_len, head, G, i0, Kp.data(), Vp.data(), padded, sc, od, H * D);
  });
#endif
  return out;
}

#else  // no AVX-512 on the build machine: callers keep torch's attention

std::vector<std::string> prefill_attention_dtypes() { return {}; }

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor, torch::Tensor, double) {
  TORCH_CHECK(false, "prefill_attention needs AVX-512");
  return q;
}

#endif
