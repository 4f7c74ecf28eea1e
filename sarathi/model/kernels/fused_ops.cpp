// Fused elementwise ops of a bf16 or float32 decoder layer, for CPUs with AVX-512.
//
// Why: in torch each of these is 3-7 ops (RMSNorm: float, pow, mean, add, rsqrt, mul, to, mul; SiLU-gate:
// slice, silu, mul; RoPE: slices, floats, 4 muls, 2 adds, cat, to), each a pass over the activations plus
// a dispatch, ~15% of a bf16 step of SmolLM2-135M on 2 cores. Here each is one pass, parallel over tokens.
// Results equal the torch ops they replace (sarathi/model/llama.py) up to rounding: every value is computed
// in float32 with the same operations, bf16 ones rounded where torch stores a bf16 tensor (to nearest
// even), so only summation order (the RMS) and the exp polynomial (SiLU, relative error ~1e-7) differ.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "avx512_math.h"

#if defined(__AVX512F__)

namespace {

using bf16 = uint16_t;

using sarathi_kernels::bf16_to_f32;
using sarathi_kernels::exp_le0;

inline __m512 load(const bf16* p, __mmask16 k) { return bf16_to_f32(_mm256_maskz_loadu_epi16(k, p)); }

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
  return bf16_to_f32(to_bf16(x));
}

inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// Loads, stores and the rounding torch applies when it stores a tensor, per dtype.
struct F32 {
  using T = float;
  static constexpr auto kType = torch::kFloat32;
  static __m512 ld(const T* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  static void st(T* p, __m512 x, __mmask16 k) { _mm512_mask_storeu_ps(p, k, x); }
  static __m512 rnd(__m512 x) { return x; }
  static const T* ptr(const torch::Tensor& t) { return t.data_ptr<float>(); }
  static T* mut(torch::Tensor& t) { return t.data_ptr<float>(); }
};
struct B16 {
  using T = bf16;
  static constexpr auto kType = torch::kBFloat16;
  static __m512 ld(const T* p, __mmask16 k) { return load(p, k); }
  static void st(T* p, __m512 x, __mmask16 k) { store(p, x, k); }
  static __m512 rnd(__m512 x) { return round_bf16(x); }
  static const T* ptr(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<at::BFloat16>()); }
  static T* mut(torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr<at::BFloat16>()); }
};

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK((x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32) && x.dim() == 2 &&
              x.stride(1) == 1, name, " must be a bf16 or float32 [rows, n] tensor with contiguous rows");
}

void check_weight(const torch::Tensor& w, const torch::Tensor& x) {
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.is_contiguous() && w.numel() == x.size(1),
              "the weight must be a contiguous vector of x's width and dtype");
}

// out = w * round(s * rsqrt(mean(s^2) + eps)) for one row s (float32).
template <typename IO>
void norm_row(const float* s, const typename IO::T* w, float eps, int64_t N, typename IO::T* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < N; j += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail(N - j), s + j);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(N) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 k = tail(N - j);
    const __m512 y = IO::rnd(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), rv));
    IO::st(out + j, _mm512_mul_ps(IO::ld(w + j, k), y), k);
  }
}

// x + d (when d is given, rounded as torch stores it) into sum, and its RMSNorm into out.
template <typename IO>
void add_norm(const torch::Tensor& x, const torch::Tensor* d, const torch::Tensor& w, float eps,
              torch::Tensor* sum, torch::Tensor& out) {
  using T = typename IO::T;
  const int64_t T_ = x.size(0), N = x.size(1);
  const T *xd = IO::ptr(x), *dd = d ? IO::ptr(*d) : nullptr, *wd = IO::ptr(w);
  T* sd = sum ? IO::mut(*sum) : nullptr;
  T* od = IO::mut(out);
  const int64_t sx = x.stride(0), sdd = d ? d->stride(0) : 0;
  at::parallel_for(0, T_, 16, [&](int64_t b, int64_t e) {
    std::vector<float> s(N);
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < N; j += 16) {
        const __mmask16 k = tail(N - j);
        __m512 v = IO::ld(xd + i * sx + j, k);
        if (dd) {
          v = IO::rnd(_mm512_add_ps(v, IO::ld(dd + i * sdd + j, k)));
          IO::st(sd + i * N + j, v, k);
        }
        _mm512_mask_storeu_ps(s.data() + j, k, v);
      }
      norm_row<IO>(s.data(), wd, eps, N, od + i * N);
    }
  });
}

template <typename IO>
void silu_mul_rows(const torch::Tensor& gu, torch::Tensor& out) {
  using T = typename IO::T;
  const int64_t T_ = gu.size(0), I = gu.size(1) / 2;
  const T* g = IO::ptr(gu);
  T* od = IO::mut(out);
  const int64_t sg = gu.stride(0);
  at::parallel_for(0, T_, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < I; j += 16) {
        const __mmask16 k = tail(I - j);
        const __m512 x = IO::ld(g + i * sg + j, k), u = IO::ld(g + i * sg + I + j, k);
        // silu(x) = x / (1 + e^-x), with e^-x from e^-|x| so the exponent is never positive.
        const __m512 en = exp_le0(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));  // e^-|x|
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        // e^-x = e^-|x| for x >= 0, 1 / e^-|x| for x < 0
        const __m512 emx = _mm512_mask_div_ps(en, neg, _mm512_set1_ps(1.f), en);
        const __m512 s = IO::rnd(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), emx)));
        IO::st(od + i * I + j, _mm512_mul_ps(s, u), k);
      }
  });
}

template <typename IO>
void rope_rows(torch::Tensor& x, int64_t nrot, const float* cd, const float* snd) {
  using T = typename IO::T;
  const int64_t T_ = x.size(0), D = x.size(2), half = D / 2;
  T* xd = IO::mut(x);
  const int64_t sx = x.stride(0);
  at::parallel_for(0, T_, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t h = 0; h < nrot; ++h) {
        T* r = xd + i * sx + h * D;
        for (int64_t j = 0; j < half; j += 16) {
          const __mmask16 k = tail(half - j);
          const __m512 x1 = IO::ld(r + j, k), x2 = IO::ld(r + half + j, k);
          const __m512 c = _mm512_maskz_loadu_ps(k, cd + i * half + j), s = _mm512_maskz_loadu_ps(k, snd + i * half + j);
          // separate multiplies and a subtraction (no FMA): torch's rounding, step by step
          IO::st(r + j, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)), k);
          IO::st(r + half + j, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)), k);
        }
      }
  });
}

}  // namespace

// RMSNorm of each row of x (computed in float32 as HF does): w * round(x * rsqrt(mean(x^2) + eps)).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  check_weight(w, x);
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == torch::kFloat32) add_norm<F32>(x, nullptr, w, static_cast<float>(eps), nullptr, out);
  else add_norm<B16>(x, nullptr, w, static_cast<float>(eps), nullptr, out);
  return out;
}

// The residual add and the next RMSNorm in one pass: s = x + d; returns (s, rms_norm(s, w, eps)).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor w,
                                                      double eps) {
  check_rows(x, "x");
  check_rows(d, "d");
  TORCH_CHECK(d.sizes() == x.sizes() && d.scalar_type() == x.scalar_type(), "x and d differ in shape or dtype");
  check_weight(w, x);
  auto sum = torch::empty({x.size(0), x.size(1)}, x.options());
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == torch::kFloat32) add_norm<F32>(x, &d, w, static_cast<float>(eps), &sum, out);
  else add_norm<B16>(x, &d, w, static_cast<float>(eps), &sum, out);
  return {sum, out};
}

// gu [T, 2I] = [gate | up] -> round(round(silu(gate)) * up), [T, I].
torch::Tensor silu_mul(torch::Tensor gu) {
  check_rows(gu, "gate_up");
  TORCH_CHECK(gu.size(1) % 2 == 0, "gate_up needs an even width");
  auto out = torch::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  if (gu.scalar_type() == torch::kFloat32) silu_mul_rows<F32>(gu, out);
  else silu_mul_rows<B16>(gu, out);
  return out;
}

// Rotate-half RoPE, in place, on heads [0, nrot) of x [T, heads, D] (each row's heads dense):
// (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in float32, rounded once. cos, sin: [T, D/2] float32.
void rope_(torch::Tensor x, int64_t nrot, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK((x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32) && x.dim() == 3 &&
              x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be bf16 or float32 [T, heads, D], dense rows");
  const int64_t T = x.size(0), D = x.size(2), half = D / 2;
  TORCH_CHECK(nrot <= x.size(1) && D % 2 == 0, "bad head count");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.numel() == T * half && sin.numel() == T * half && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be float32 [T, D/2]");
  if (x.scalar_type() == torch::kFloat32) rope_rows<F32>(x, nrot, cos.data_ptr<float>(), sin.data_ptr<float>());
  else rope_rows<B16>(x, nrot, cos.data_ptr<float>(), sin.data_ptr<float>());
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
