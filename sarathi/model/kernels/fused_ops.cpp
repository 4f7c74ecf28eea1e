// Fused elementwise ops of a bf16 decoder layer, for CPUs with AVX-512.
//
// Why: in torch each of these is 3-7 ops (RMSNorm: float, pow, mean, add, rsqrt, mul, to, mul; SiLU-gate:
// slice, silu, mul; RoPE: slices, floats, 4 muls, 2 adds, cat, to), each a pass over the activations plus
// a dispatch, ~15% of a bf16 step of SmolLM2-135M on 2 cores. Here each is one pass, parallel over tokens.
// Results equal the torch ops they replace (sarathi/model/llama.py) to bf16 rounding: every value is
// computed in float32 with the same operations and rounded to bf16 where torch rounds (round to nearest
// even), so only summation order (the RMS) and the exp polynomial (SiLU, relative error ~1e-7) differ.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace {

using bf16 = uint16_t;

inline __m512 load(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load(const bf16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bf16, round to nearest even (NaN stays NaN), without AVX512-BF16.
inline __m256i to_bf16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
inline void store(bf16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(x)); }
inline void store(bf16* p, __m512 x, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, to_bf16(x)); }
inline __m512 round_bf16(__m512 x) {  // x rounded to bf16 and back: where torch stores a bf16 tensor
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}

inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

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

const bf16* ptr(const torch::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }
bf16* mut(torch::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.stride(1) == 1,
              name, " must be a bf16 [rows, n] tensor with contiguous rows");
}

// out = w * bf16(s * rsqrt(mean(s^2) + eps)) for one row s (float32 in sbuf).
void norm_row(const float* s, const bf16* w, float eps, int64_t N, bf16* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < N; j += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(N - j), s + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(N) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 k = tail(N - j);
    const __m512 y = round_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), rv));
    store(out + j, _mm512_mul_ps(load(w + j, k), y), k);
  }
}

}  // namespace

// RMSNorm of each row of x (bf16, computed in float32 as HF does): w * bf16(x * rsqrt(mean(x^2) + eps)).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.numel() == N, "bad weight");
  auto out = torch::empty({T, N}, x.options());
  const bf16 *xd = ptr(x), *wd = ptr(w);
  bf16* od = mut(out);
  const int64_t sx = x.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    std::vector<float> s(N);
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < N; j += 16) _mm512_mask_storeu_ps(s.data() + j, tail(N - j), load(xd + i * sx + j, tail(N - j)));
      norm_row(s.data(), wd, static_cast<float>(eps), N, od + i * N);
    }
  });
  return out;
}

// The residual add and the next RMSNorm in one pass: s = bf16(x + d); returns (s, rms_norm(s, w, eps)).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor w,
                                                      double eps) {
  check_rows(x, "x");
  check_rows(d, "d");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(d.size(0) == T && d.size(1) == N, "x and d differ in shape");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.numel() == N, "bad weight");
  auto sum = torch::empty({T, N}, x.options());
  auto out = torch::empty({T, N}, x.options());
  const bf16 *xd = ptr(x), *dd = ptr(d), *wd = ptr(w);
  bf16 *sd = mut(sum), *od = mut(out);
  const int64_t sx = x.stride(0), sdd = d.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    std::vector<float> s(N);
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 k = tail(N - j);
        const __m512 v = round_bf16(_mm512_add_ps(load(xd + i * sx + j, k), load(dd + i * sdd + j, k)));
        _mm512_mask_storeu_ps(s.data() + j, k, v);
        store(sd + i * N + j, v, k);
      }
      norm_row(s.data(), wd, static_cast<float>(eps), N, od + i * N);
    }
  });
  return {sum, out};
}

// gu [T, 2I] = [gate | up] -> bf16(bf16(silu(gate)) * up), [T, I].
torch::Tensor silu_mul(torch::Tensor gu) {
  check_rows(gu, "gate_up");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  TORCH_CHECK(gu.size(1) == 2 * I, "gate_up needs an even width");
  auto out = torch::empty({T, I}, gu.options());
  const bf16* g = ptr(gu);
  bf16* od = mut(out);
  const int64_t sg = gu.stride(0);
  at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < I; j += 16) {
        const __mmask16 k = tail(I - j);
        const __m512 x = load(g + i * sg + j, k), u = load(g + i * sg + I + j, k);
        // silu(x) = x / (1 + e^-x), with e^-x from e^-|x| so the exponent is never positive.
        const __m512 ax = _mm512_abs_ps(x);
        const __m512 en = exp_le0(_mm512_sub_ps(_mm512_setzero_ps(), ax));  // e^-|x|
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        // e^-x = e^-|x| for x >= 0, 1 / e^-|x| for x < 0
        const __m512 emx = _mm512_mask_div_ps(en, neg, _mm512_set1_ps(1.f), en);
        const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), emx)));
        store(od + i * I + j, _mm512_mul_ps(s, u), k);
      }
  });
  return out;
}

// Rotate-half RoPE, in place, on heads [0, nrot) of x [T, heads, D] (bf16, each row's heads dense):
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in float32, rounded once. cos, sin: [T, D/2] float32.
void rope_(torch::Tensor x, int64_t nrot, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be bf16 [T, heads, D] with dense rows");
  const int64_t T = x.size(0), D = x.size(2), half = D / 2;
  TORCH_CHECK(nrot <= x.size(1) && D % 2 == 0, "bad head count");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.numel() == T * half && sin.numel() == T * half && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be float32 [T, D/2]");
  bf16* xd = mut(x);
  const float *cd = cos.data_ptr<float>(), *snd = sin.data_ptr<float>();
  const int64_t sx = x.stride(0);
  at::parallel_for(0, T, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t h = 0; h < nrot; ++h) {
        bf16* r = xd + i * sx + h * D;
        for (int64_t j = 0; j < half; j += 16) {
          const __mmask16 k = tail(half - j);
          const __m512 x1 = load(r + j, k), x2 = load(r + half + j, k);
          const __m512 c = _mm512_maskz_loadu_ps(k, cd + i * half + j), s = _mm512_maskz_loadu_ps(k, snd + i * half + j);
          // separate multiplies and a subtraction (no FMA): torch's rounding, step by step
          store(r + j, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)), k);
          store(r + half + j, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)), k);
        }
      }
  });
}

bool fused_ops_available() { return true; }

#else  // no AVX-512 on the build machine: the model keeps torch's ops

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor, double) { TORCH_CHECK(false, "needs AVX-512"); return x; }
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor, double) {
  TORCH_CHECK(false, "needs AVX-512");
  return {x, d};
}
torch::Tensor silu_mul(torch::Tensor x) { TORCH_CHECK(false, "needs AVX-512"); return x; }
void rope_(torch::Tensor, int64_t, torch::Tensor, torch::Tensor) { TORCH_CHECK(false, "needs AVX-512"); }
bool fused_ops_available() { return false; }

#endif
