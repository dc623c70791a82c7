// Fused CPU kernels of the recurrent cells (mgrit_gru.models.kernels).
//
// The equations are those of mgrit_gru/models/cells.py (docs/kernels.md):
// kinds 0 implicit GRU, 1 GRU, 2 LSTM, 3 RNN, torch's gate layout (r, z, n;
// i, f, g, o). Every entry point releases the GIL for its whole call, runs
// under NoGradGuard, uses at::addmm_out / at::mm_out for the GEMMs (torch's
// BLAS, at::get_num_threads() threads) and one fused elementwise pass per step
// (at::parallel_for over batch rows: inline with one torch thread).
//
// Row tensors ([B, X] slices of states, projections, adjoints) need a unit
// stride in their last dim; their row stride is free. float32 uses the
// branch-free exp/tanh below (auto-vectorised, compiled for x86-64-v3 and
// baseline x86-64 with a run-time choice); float64 uses libm.

// Per-operator ATen headers and torch's pybind glue only: torch/extension.h
// (the whole C++ frontend) triples the build time.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MG_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MG_CLONES
#endif
#define MG_INLINE inline __attribute__((always_inline))

enum Kind : int64_t { IMPLICIT_GRU = 0, GRU = 1, LSTM = 2, RNN = 3 };

int64_t gates_of(int64_t kind) {
  switch (kind) {
    case IMPLICIT_GRU: case GRU: return 3;
    case LSTM: return 4;
    case RNN: return 1;
  }
  TORCH_CHECK(false, "mgrit_gru kernels: unknown cell kind ", kind);
}
int64_t state_factor(int64_t kind) { return kind == LSTM ? 2 : 1; }

// ------------------------------------------------------------------ math
// float32: Cephes-style expf (round-to-nearest range reduction by the
// 1.5 * 2^23 trick, degree-6 polynomial, 2^n by exponent bits): a few ulp,
// no branches, so that GCC vectorises the loops that inline it.
MG_INLINE float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;                          // NaN passes both
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}
MG_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }
MG_INLINE float tanh_f(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float s = x * x;
  float p = -5.70498872745e-3f;                       // Cephes tanhf, |x| < 0.625
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  p = p * s * x + x;
  float t = 1.0f - 2.0f / (exp_f(2.0f * ax) + 1.0f);
  t = x < 0.0f ? -t : t;
  return ax < 0.625f ? p : t;
}

MG_INLINE float sig(float x) { return sigmoid_f(x); }
MG_INLINE float th(float x) { return tanh_f(x); }
MG_INLINE double sig(double x) { return 1.0 / (1.0 + std::exp(-x)); }
MG_INLINE double th(double x) { return std::tanh(x); }

// A [rows, cols] slice with unit column stride.
template <typename T>
struct Rows {
  T* p;
  int64_t s;
  MG_INLINE T* operator[](int64_t b) const { return p + b * s; }
};

// ------------------------------------------------------------- forward
// out = step(xw, s) (+ rhs); hw = h W_hh^T + b_hh is given.
template <typename T>
MG_INLINE void fwd_rows(int64_t kind, int64_t b0, int64_t b1, int64_t H, T dt,
                        Rows<const T> xw, Rows<const T> hw, Rows<const T> s,
                        Rows<T> out, Rows<const T> rhs) {
  const int64_t H2 = 2 * H, H3 = 3 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict x = xw[b];
    const T* __restrict w = hw[b];
    const T* h = s[b];
    T* o = out[b];
    switch (kind) {
      case IMPLICIT_GRU:
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T r = sig(x[j] + w[j]);
          const T z = sig(x[H + j] + w[H + j]);
          const T n = th(x[H2 + j] + r * w[H2 + j]);
          const T q = T(1) / (T(1) + dt * (T(1) - z));
          o[j] = n + q * (h[j] - n);
        }
        break;
      case GRU:
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T r = sig(x[j] + w[j]);
          const T z = sig(x[H + j] + w[H + j]);
          const T n = th(x[H2 + j] + r * w[H2 + j]);
          o[j] = n + z * (h[j] - n);
        }
        break;
      case LSTM:
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T i = sig(x[j] + w[j]);
          const T f = sig(x[H + j] + w[H + j]);
          const T g = th(x[H2 + j] + w[H2 + j]);
          const T og = sig(x[H3 + j] + w[H3 + j]);
          const T c = f * h[H + j] + i * g;
          o[H + j] = c;
          o[j] = og * th(c);
        }
        break;
      default:  // RNN
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) o[j] = th(x[j] + w[j]);
    }
    if (rhs.p != nullptr) {
      const T* rr = rhs[b];
      const int64_t S = state_factor(kind) * H;
#pragma omp simd
      for (int64_t j = 0; j < S; ++j) o[j] += rr[j];
    }
  }
}

// The GRU family's gates and Jacobian coefficients at one hidden unit, from
// the pre-activations x_*, w_* (hw) and h: r, z, n, d = d h_new / d h,
// C_n, C_z (cells.py _GRUFamily); shared by the backward step and the
// linearisation.
template <typename T>
MG_INLINE void gru_coef(bool implicit, T dt, const T* __restrict x, const T* __restrict w, T h,
                        int64_t j, int64_t H, T& r, T& hn, T& n, T& d, T& cn, T& cz) {
  r = sig(x[j] + w[j]);
  const T z = sig(x[H + j] + w[H + j]);
  hn = w[2 * H + j];
  n = th(x[2 * H + j] + r * hn);
  d = implicit ? T(1) / (T(1) + dt * (T(1) - z)) : z;
  cn = (T(1) - d) * (T(1) - n * n);
  cz = (implicit ? dt * d * d : T(1)) * (h - n) * z * (T(1) - z);
}

// One row of the GRU-family backward step. MODE: 0 no acc, 1 acc += g d,
// 2 acc = g d.
template <typename T, bool IMPLICIT, int MODE>
MG_INLINE void gru_bwd_row(int64_t H, T dt, const T* __restrict x, const T* __restrict w,
                           const T* __restrict h, const T* g, T* gx, T* __restrict gh, T* a) {
  const int64_t H2 = 2 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    T r, hn, n, d, cn, cz;
    gru_coef<T>(IMPLICIT, dt, x, w, h[j], j, H, r, hn, n, d, cn, cz);
    const T gj = g[j];
    const T gn = gj * cn;
    const T gr = gn * hn * r * (T(1) - r);
    const T gz = gj * cz;
    gh[j] = gr;
    gh[H + j] = gz;
    gh[H2 + j] = gn * r;
    gx[j] = gr;
    gx[H + j] = gz;
    gx[H2 + j] = gn;
    if (MODE == 1) a[j] += gj * d;
    if (MODE == 2) a[j] = gj * d;
  }
}

// The GRU family's linearisation (cells.py _GRUFamily: lin = (d, Chw =
// [C_r, C_z, C_n r], C_n)) of rows b0..b1, for the adjoint's vjp_lin.
template <typename T>
MG_INLINE void gru_lin_rows(bool implicit, int64_t b0, int64_t b1, int64_t H, T dt,
                            Rows<const T> xw, Rows<const T> hw, Rows<const T> s, Rows<T> d_,
                            Rows<T> chw_, Rows<T> cn_) {
  const int64_t H2 = 2 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict x = xw[b];
    const T* __restrict w = hw[b];
    const T* __restrict h = s[b];
    T* __restrict dd = d_[b];
    T* __restrict c = chw_[b];
    T* __restrict cn_row = cn_[b];
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      T r, hn, n, d, cn, cz;
      gru_coef<T>(implicit, dt, x, w, h[j], j, H, r, hn, n, d, cn, cz);
      dd[j] = d;
      cn_row[j] = cn;
      c[j] = cn * hn * r * (T(1) - r);
      c[H + j] = cz;
      c[H2 + j] = cn * r;
    }
  }
}

// One row of the LSTM backward step (g = [g_h | g_c]); MODE as above, on
// the cell-state half of acc.
template <typename T, int MODE>
MG_INLINE void lstm_bwd_row(int64_t H, const T* __restrict x, const T* __restrict w,
                            const T* __restrict h, const T* g, T* __restrict gh, T* a) {
  const int64_t H2 = 2 * H, H3 = 3 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = sig(x[j] + w[j]);
    const T f = sig(x[H + j] + w[H + j]);
    const T gg = th(x[H2 + j] + w[H2 + j]);
    const T og = sig(x[H3 + j] + w[H3 + j]);
    const T c = h[H + j];
    const T tc = th(f * c + i * gg);
    const T g_h = g[j];
    const T dc = g[H + j] + g_h * og * (T(1) - tc * tc);
    gh[j] = dc * gg * i * (T(1) - i);
    gh[H + j] = dc * c * f * (T(1) - f);
    gh[H2 + j] = dc * i * (T(1) - gg * gg);
    gh[H3 + j] = g_h * tc * og * (T(1) - og);
    if (MODE == 1) a[H + j] += dc * f;
    if (MODE == 2) a[H + j] = dc * f;
  }
}

// The same from the LSTM's lin = (K, C3, C_o, f).
template <typename T, int MODE>
MG_INLINE void lstm_lin_row(int64_t H, const T* __restrict k, const T* __restrict c3,
                            const T* __restrict co, const T* __restrict f, const T* g,
                            T* __restrict gh, T* a) {
  const int64_t H2 = 2 * H, H3 = 3 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T g_h = g[j];
    const T dc = g[H + j] + g_h * k[j];
    gh[j] = c3[j] * dc;
    gh[H + j] = c3[H + j] * dc;
    gh[H2 + j] = c3[H2 + j] * dc;
    gh[H3 + j] = co[j] * g_h;
    if (MODE == 1) a[H + j] += dc * f[j];
    if (MODE == 2) a[H + j] = dc * f[j];
  }
}

// ------------------------------------------------------------ backward
// From g = dL/ds_new (rows of lam[t]): g_hw, g_xw (the gradients of the
// projections; may be the same rows for LSTM/RNN, where they are equal) and
// the elementwise part of dL/ds_prev into acc (added when accumulate, else
// assigned; the caller adds g_hw W_hh to its hidden part).
template <typename T>
MG_INLINE void bwd_rows(int64_t kind, int64_t b0, int64_t b1, int64_t H, T dt,
                        Rows<const T> xw, Rows<const T> hw, Rows<const T> s,
                        Rows<const T> gs, Rows<T> gxw, Rows<T> ghw, Rows<T> acc,
                        bool accumulate) {
  const int64_t H2 = 2 * H, H3 = 3 * H;
  const bool same = gxw.p == ghw.p;
  for (int64_t b = b0; b < b1; ++b) {
    const T* __restrict x = xw[b];
    const T* __restrict w = hw[b];
    const T* __restrict h = s[b];
    const T* g = gs[b];
    T* __restrict gh = ghw[b];
    T* gx = gxw[b];
    T* a = acc.p == nullptr ? nullptr : acc[b];
    switch (kind) {
      case IMPLICIT_GRU:
        if (a == nullptr) {
          gru_bwd_row<T, true, 0>(H, dt, x, w, h, g, gx, gh, a);
        } else if (accumulate) {
          gru_bwd_row<T, true, 1>(H, dt, x, w, h, g, gx, gh, a);
        } else {
          gru_bwd_row<T, true, 2>(H, dt, x, w, h, g, gx, gh, a);
        }
        break;
      case GRU:
        if (a == nullptr) {
          gru_bwd_row<T, false, 0>(H, dt, x, w, h, g, gx, gh, a);
        } else if (accumulate) {
          gru_bwd_row<T, false, 1>(H, dt, x, w, h, g, gx, gh, a);
        } else {
          gru_bwd_row<T, false, 2>(H, dt, x, w, h, g, gx, gh, a);
        }
        break;
      case LSTM:
        if (a == nullptr) {
          lstm_bwd_row<T, 0>(H, x, w, h, g, gh, a);
        } else if (accumulate) {
          lstm_bwd_row<T, 1>(H, x, w, h, g, gh, a);
        } else {
          lstm_bwd_row<T, 2>(H, x, w, h, g, gh, a);
        }
        if (!same) {
#pragma omp simd
          for (int64_t j = 0; j < 4 * H; ++j) gx[j] = gh[j];
        }
        break;
      default:  // RNN
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T hnew = th(x[j] + w[j]);
          gh[j] = g[j] * (T(1) - hnew * hnew);
        }
        if (!same) {
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) gx[j] = gh[j];
        }
    }
  }
}

// ------------------------------------------------------------ from lin
// The same backward step from the cells' linearisation (cells.py ``lin``):
//   GRUs: (d [B,H], Chw [B,3,H], C_n [B,H]); LSTM: (K, C3 [B,3,H], C_o, f);
//   RNN: (1 - h_new^2,). Writes g_hw (= g_pre) and the elementwise part of acc.
template <typename T>
MG_INLINE void lin_rows(int64_t kind, int64_t b0, int64_t b1, int64_t H,
                        Rows<const T> l0, Rows<const T> l1, Rows<const T> l2,
                        Rows<const T> l3, Rows<const T> gs, Rows<T> ghw, Rows<T> acc,
                        bool accumulate) {
  const int64_t H2 = 2 * H, H3 = 3 * H;
  for (int64_t b = b0; b < b1; ++b) {
    const T* g = gs[b];
    T* __restrict gh = ghw[b];
    T* a = acc.p == nullptr ? nullptr : acc[b];
    const T* __restrict p0 = l0[b];
    switch (kind) {
      case IMPLICIT_GRU:
      case GRU: {
        const T* __restrict c = l1[b];
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T gj = g[j];
          gh[j] = c[j] * gj;
          gh[H + j] = c[H + j] * gj;
          gh[H2 + j] = c[H2 + j] * gj;
        }
        if (a != nullptr) {
          if (accumulate) {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) a[j] += g[j] * p0[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < H; ++j) a[j] = g[j] * p0[j];
          }
        }
        break;
      }
      case LSTM: {
        if (a == nullptr) {
          lstm_lin_row<T, 0>(H, p0, l1[b], l2[b], l3[b], g, gh, a);
        } else if (accumulate) {
          lstm_lin_row<T, 1>(H, p0, l1[b], l2[b], l3[b], g, gh, a);
        } else {
          lstm_lin_row<T, 2>(H, p0, l1[b], l2[b], l3[b], g, gh, a);
        }
        break;
      }
      default:
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) gh[j] = g[j] * p0[j];
    }
  }
}

// ------------------------------------------------------ input projection
// out[r] = b + x[r] W^T for rows r0..r1 with a small input size D: w_t is
// W^T ([D, G], contiguous). Register-blocked over 64 outputs (8 AVX2
// vectors of accumulators), all D products per block, W^T stays in L1.
// BLAS runs such a K = D GEMM several times slower (docs/kernels.md).
template <typename T>
MG_INLINE void proj_rows(int64_t r0, int64_t r1, int64_t D, int64_t G, Rows<const T> x,
                         const T* __restrict w_t, const T* __restrict bias, Rows<T> out) {
  constexpr int64_t BLK = 64;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x[r];
    T* __restrict o = out[r];
    int64_t j0 = 0;
    for (; j0 + BLK <= G; j0 += BLK) {
      T acc[BLK];
      if (bias != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < BLK; ++j) acc[j] = bias[j0 + j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < BLK; ++j) acc[j] = T(0);
      }
      for (int64_t k = 0; k < D; ++k) {
        const T xk = xr[k];
        const T* __restrict w = w_t + k * G + j0;
#pragma omp simd
        for (int64_t j = 0; j < BLK; ++j) acc[j] += xk * w[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < BLK; ++j) o[j0 + j] = acc[j];
    }
    if (j0 < G) {
      if (bias != nullptr) {
#pragma omp simd
        for (int64_t j = j0; j < G; ++j) o[j] = bias[j];
      } else {
#pragma omp simd
        for (int64_t j = j0; j < G; ++j) o[j] = T(0);
      }
      for (int64_t k = 0; k < D; ++k) {
        const T xk = xr[k];
        const T* __restrict w = w_t + k * G;
#pragma omp simd
        for (int64_t j = j0; j < G; ++j) o[j] += xk * w[j];
      }
    }
  }
}

// Instantiations: float32 compiled twice (x86-64-v3 and baseline, chosen at
// load time by the ifunc resolver); float64 once (its libm calls do not
// vectorise), except the projection, which is plain FMA loops.
#define MG_FWD_ARGS(T) int64_t kind, int64_t b0, int64_t b1, int64_t H, T dt, Rows<const T> xw, \
  Rows<const T> hw, Rows<const T> s, Rows<T> out, Rows<const T> rhs
#define MG_BWD_ARGS(T) int64_t kind, int64_t b0, int64_t b1, int64_t H, T dt, Rows<const T> xw, \
  Rows<const T> hw, Rows<const T> s, Rows<const T> gs, Rows<T> gxw, Rows<T> ghw, Rows<T> acc, \
  bool accumulate
#define MG_LIN_ARGS(T) int64_t kind, int64_t b0, int64_t b1, int64_t H, Rows<const T> l0, \
  Rows<const T> l1, Rows<const T> l2, Rows<const T> l3, Rows<const T> gs, Rows<T> ghw, \
  Rows<T> acc, bool accumulate

MG_CLONES void fwd_kernel(MG_FWD_ARGS(float)) {
  fwd_rows<float>(kind, b0, b1, H, dt, xw, hw, s, out, rhs);
}
void fwd_kernel(MG_FWD_ARGS(double)) {
  fwd_rows<double>(kind, b0, b1, H, dt, xw, hw, s, out, rhs);
}
MG_CLONES void bwd_kernel(MG_BWD_ARGS(float)) {
  bwd_rows<float>(kind, b0, b1, H, dt, xw, hw, s, gs, gxw, ghw, acc, accumulate);
}
void bwd_kernel(MG_BWD_ARGS(double)) {
  bwd_rows<double>(kind, b0, b1, H, dt, xw, hw, s, gs, gxw, ghw, acc, accumulate);
}
MG_CLONES void lin_kernel(MG_LIN_ARGS(float)) {
  lin_rows<float>(kind, b0, b1, H, l0, l1, l2, l3, gs, ghw, acc, accumulate);
}
void lin_kernel(MG_LIN_ARGS(double)) {
  lin_rows<double>(kind, b0, b1, H, l0, l1, l2, l3, gs, ghw, acc, accumulate);
}
#define MG_GLIN_ARGS(T) bool implicit, int64_t b0, int64_t b1, int64_t H, T dt, \
  Rows<const T> xw, Rows<const T> hw, Rows<const T> s, Rows<T> d, Rows<T> chw, Rows<T> cn
MG_CLONES void glin_kernel(MG_GLIN_ARGS(float)) {
  gru_lin_rows<float>(implicit, b0, b1, H, dt, xw, hw, s, d, chw, cn);
}
void glin_kernel(MG_GLIN_ARGS(double)) {
  gru_lin_rows<double>(implicit, b0, b1, H, dt, xw, hw, s, d, chw, cn);
}
#define MG_PROJ_ARGS(T) int64_t r0, int64_t r1, int64_t D, int64_t G, Rows<const T> x, \
  const T* w_t, const T* bias, Rows<T> out
MG_CLONES void proj_kernel(MG_PROJ_ARGS(float)) {
  proj_rows<float>(r0, r1, D, G, x, w_t, bias, out);
}
MG_CLONES void proj_kernel(MG_PROJ_ARGS(double)) {
  proj_rows<double>(r0, r1, D, G, x, w_t, bias, out);
}

// ------------------------------------------------------------- checks
void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t cols,
                const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == cols, "mgrit_gru kernels: ",
              name, " must be [", B, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type(), "mgrit_gru kernels: ",
              name, " must be a CPU ", like.scalar_type(), " tensor");
  TORCH_CHECK(t.stride(1) == 1 || cols == 1, "mgrit_gru kernels: ", name,
              " needs a unit stride in its last dim");
  TORCH_CHECK(t.stride(0) >= cols || B == 1, "mgrit_gru kernels: ", name,
              " rows must not overlap");
}

template <typename T>
Rows<T> rows(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.dim() == 2 ? t.stride(0) : 0};
}
template <typename T>
Rows<const T> crow(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0)};
}
template <typename T>
Rows<const T> crow(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? crow<T>(*t) : Rows<const T>{nullptr, 0};
}

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

struct Shape {
  int64_t kind, G, H, S;
};

Shape shape_of(int64_t kind, const at::Tensor& w_hh) {
  const int64_t G = gates_of(kind);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == G * w_hh.size(1),
              "mgrit_gru kernels: w_hh must be [", G, " H, H], got ", w_hh.sizes());
  TORCH_CHECK(w_hh.device().is_cpu(), "mgrit_gru kernels: CPU tensors only");
  TORCH_CHECK(w_hh.scalar_type() == at::kFloat || w_hh.scalar_type() == at::kDouble,
              "mgrit_gru kernels: float32 or float64 only, got ", w_hh.scalar_type());
  const int64_t H = w_hh.size(1);
  return {kind, G, H, state_factor(kind) * H};
}

// hw = h W_hh^T + b_hh (h: the hidden part of the state rows).
void hidden_projection(const at::Tensor& s, const at::Tensor& w_t,
                       const c10::optional<at::Tensor>& b_hh, at::Tensor& hw, int64_t H) {
  const at::Tensor h = s.size(1) == H ? s : s.narrow(1, 0, H);
  if (b_hh.has_value()) {
    at::addmm_out(hw, *b_hh, h, w_t);
  } else {
    at::mm_out(hw, h, w_t);
  }
}

// acc[:, :H] += g_hw W_hh (or = when !accumulate).
void add_state_gemm(at::Tensor& acc, const at::Tensor& g_hw, const at::Tensor& w_hh, int64_t H,
                    bool accumulate) {
  at::Tensor a = acc.size(1) == H ? acc : acc.narrow(1, 0, H);
  if (accumulate) {
    a.addmm_(g_hw, w_hh);
  } else {
    at::mm_out(a, g_hw, w_hh);
  }
}

template <typename T>
void run_fwd(const Shape& sh, double dt, const at::Tensor& xw, const at::Tensor& hw,
             const at::Tensor& s, at::Tensor& out, const c10::optional<at::Tensor>& rhs) {
  const int64_t B = xw.size(0);
  const auto x_ = crow<T>(xw), hw_ = crow<T>(hw), s_ = crow<T>(s), r_ = crow<T>(rhs);
  const auto o_ = rows<T>(out);
  at::parallel_for(0, B, grain(sh.G * sh.H), [&](int64_t b0, int64_t b1) {
    fwd_kernel(sh.kind, b0, b1, sh.H, static_cast<T>(dt), x_, hw_, s_, o_, r_);
  });
}

// One step: hw_out = h W^T + b, out = step + rhs.
void step_impl(const Shape& sh, const at::Tensor& xw_t, const at::Tensor& s,
               const at::Tensor& w_t, const c10::optional<at::Tensor>& b_hh, double dt,
               at::Tensor& out, at::Tensor& hw_out, const c10::optional<at::Tensor>& rhs) {
  hidden_projection(s, w_t, b_hh, hw_out, sh.H);
  if (xw_t.scalar_type() == at::kFloat) {
    run_fwd<float>(sh, dt, xw_t, hw_out, s, out, rhs);
  } else {
    run_fwd<double>(sh, dt, xw_t, hw_out, s, out, rhs);
  }
}

template <typename T>
void run_bwd(const Shape& sh, double dt, const at::Tensor& xw, const at::Tensor& hw,
             const at::Tensor& s, const at::Tensor& g, at::Tensor& gxw, at::Tensor& ghw,
             at::Tensor* acc, bool accumulate) {
  const int64_t B = xw.size(0);
  const auto x_ = crow<T>(xw), hw_ = crow<T>(hw), s_ = crow<T>(s), g_ = crow<T>(g);
  const auto gx_ = rows<T>(gxw), gh_ = rows<T>(ghw);
  const Rows<T> a_ = acc == nullptr ? Rows<T>{nullptr, 0} : rows<T>(*acc);
  at::parallel_for(0, B, grain(sh.G * sh.H), [&](int64_t b0, int64_t b1) {
    bwd_kernel(sh.kind, b0, b1, sh.H, static_cast<T>(dt), x_, hw_, s_, g_, gx_, gh_, a_,
               accumulate);
  });
}

void bwd_impl(const Shape& sh, double dt, const at::Tensor& xw, const at::Tensor& hw,
              const at::Tensor& s, const at::Tensor& g, at::Tensor& gxw, at::Tensor& ghw,
              at::Tensor* acc, bool accumulate, const at::Tensor& w_hh) {
  if (xw.scalar_type() == at::kFloat) {
    run_bwd<float>(sh, dt, xw, hw, s, g, gxw, ghw, acc, accumulate);
  } else {
    run_bwd<double>(sh, dt, xw, hw, s, g, gxw, ghw, acc, accumulate);
  }
  if (acc != nullptr) add_state_gemm(*acc, ghw, w_hh, sh.H, accumulate || sh.G == 3);
}

void check_same_dtype(std::initializer_list<const at::Tensor*> ts, const at::Tensor& w_hh) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->scalar_type() == w_hh.scalar_type() && t->device().is_cpu(),
                "mgrit_gru kernels: all tensors must be CPU tensors of w_hh's dtype ",
                w_hh.scalar_type(), ", got a ", t->scalar_type(), " tensor on ", t->device());
  }
}

void check_dt(double dt) {
  TORCH_CHECK(dt > 0 && std::isfinite(dt), "mgrit_gru kernels: dt must be positive, got ", dt);
}

void check_bias(const c10::optional<at::Tensor>& b_hh, const Shape& sh, const at::Tensor& like) {
  if (!b_hh.has_value()) return;
  TORCH_CHECK(b_hh->dim() == 1 && b_hh->size(0) == sh.G * sh.H && b_hh->device().is_cpu() &&
                  b_hh->scalar_type() == like.scalar_type(),
              "mgrit_gru kernels: b_hh must be a CPU ", like.scalar_type(), " tensor [",
              sh.G * sh.H, "]");
}

// ------------------------------------------------------------ entries
// states [T+1, B, S] (row 0 given), hw [T, B, G H] written.
void forward_sweep(int64_t kind, const at::Tensor& xw, const at::Tensor& w_hh,
                   const c10::optional<at::Tensor>& b_hh, double dt, at::Tensor& states,
                   at::Tensor& hw) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  TORCH_CHECK(xw.dim() == 3 && states.dim() == 3 && hw.dim() == 3,
              "mgrit_gru kernels: forward_sweep needs xw [T,B,GH], states [T+1,B,S], hw [T,B,GH]");
  const int64_t T = xw.size(0), B = xw.size(1);
  TORCH_CHECK(states.size(0) == T + 1 && hw.size(0) == T,
              "mgrit_gru kernels: forward_sweep: states needs T+1 rows and hw T rows (T = ",
              T, "), got ", states.size(0), " and ", hw.size(0));
  check_same_dtype({&xw, &states, &hw}, w_hh);
  check_bias(b_hh, sh, xw);
  const at::Tensor w_t = w_hh.t();
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor x_t = xw.select(0, t), s_t = states.select(0, t);
    at::Tensor o_t = states.select(0, t + 1), hw_t = hw.select(0, t);
    if (t == 0) {
      check_rows(x_t, "xw[t]", B, sh.G * sh.H, xw);
      check_rows(s_t, "states[t]", B, sh.S, xw);
      check_rows(hw_t, "hw[t]", B, sh.G * sh.H, xw);
    }
    step_impl(sh, x_t, s_t, w_t, b_hh, dt, o_t, hw_t, c10::nullopt);
  }
}

// Reverse sweep over T steps. lam [T, B, S]: lam[t] holds the source terms
// dL/ds_{t+1} on entry and the full adjoint on exit; s_prev [T, B, S] the
// states the steps started from; g_xw, g_hw [T, B, G H] written; lam_prev
// ([B, S], optional) receives (adds) dL/ds_0 restricted to these steps.
void backward_sweep(int64_t kind, const at::Tensor& xw, const at::Tensor& hw,
                    const at::Tensor& s_prev, const at::Tensor& w_hh, double dt,
                    at::Tensor& lam, at::Tensor& g_xw, at::Tensor& g_hw,
                    c10::optional<at::Tensor> lam_prev) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  TORCH_CHECK(xw.dim() == 3 && hw.dim() == 3 && s_prev.dim() == 3 && lam.dim() == 3 &&
                  g_xw.dim() == 3 && g_hw.dim() == 3,
              "mgrit_gru kernels: backward_sweep needs 3-D xw, hw, s_prev, lam, g_xw, g_hw");
  const int64_t T = xw.size(0), B = xw.size(1);
  TORCH_CHECK(hw.size(0) == T && s_prev.size(0) == T && lam.size(0) == T && g_xw.size(0) == T &&
                  g_hw.size(0) == T,
              "mgrit_gru kernels: backward_sweep: all tensors need T = ", T, " rows");
  check_same_dtype({&xw, &hw, &s_prev, &lam, &g_xw, &g_hw}, w_hh);
  if (lam_prev.has_value()) check_rows(*lam_prev, "lam_prev", B, sh.S, xw);
  for (int64_t t = T - 1; t >= 0; --t) {
    const at::Tensor x_t = xw.select(0, t), hw_t = hw.select(0, t), s_t = s_prev.select(0, t),
                     g_t = lam.select(0, t);
    at::Tensor gx_t = g_xw.select(0, t), gh_t = g_hw.select(0, t);
    if (t == T - 1) {
      check_rows(x_t, "xw[t]", B, sh.G * sh.H, xw);
      check_rows(hw_t, "hw[t]", B, sh.G * sh.H, xw);
      check_rows(s_t, "s_prev[t]", B, sh.S, xw);
      check_rows(g_t, "lam[t]", B, sh.S, xw);
      check_rows(gx_t, "g_xw[t]", B, sh.G * sh.H, xw);
      check_rows(gh_t, "g_hw[t]", B, sh.G * sh.H, xw);
    }
    at::Tensor acc;
    if (t > 0) {
      acc = lam.select(0, t - 1);
    } else if (lam_prev.has_value()) {
      acc = *lam_prev;
    }
    bwd_impl(sh, dt, x_t, hw_t, s_t, g_t, gx_t, gh_t, acc.defined() ? &acc : nullptr, true, w_hh);
  }
}

// The projection gradients of T steps from given adjoints, no recursion:
// g [T, B, S] = dL/ds_{t+1} of each step (e.g. an MGRIT adjoint); writes
// g_xw, g_hw [T, B, G H] (may be one buffer for LSTM/RNN). Elementwise only:
// the parameter gradients are the caller's GEMMs.
void proj_grads(int64_t kind, const at::Tensor& xw, const at::Tensor& hw,
                const at::Tensor& s_prev, const at::Tensor& w_hh, double dt,
                const at::Tensor& g, at::Tensor g_xw, at::Tensor g_hw) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  TORCH_CHECK(xw.dim() == 3 && hw.dim() == 3 && s_prev.dim() == 3 && g.dim() == 3 &&
                  g_xw.dim() == 3 && g_hw.dim() == 3,
              "mgrit_gru kernels: proj_grads needs 3-D xw, hw, s_prev, g, g_xw, g_hw");
  const int64_t T = xw.size(0), B = xw.size(1), GH = sh.G * sh.H;
  check_same_dtype({&xw, &hw, &s_prev, &g, &g_xw, &g_hw}, w_hh);
  TORCH_CHECK(sh.G != 3 || !g_xw.is_same(g_hw),
              "mgrit_gru kernels: the GRUs' g_xw and g_hw differ and need two buffers");
  // [T, B, C] with rows of stride C: one [T B, C] matrix each (no copies)
  auto flat = [&](const at::Tensor& t, const char* name, int64_t cols) {
    TORCH_CHECK(t.size(0) == T && t.size(1) == B && t.size(2) == cols && t.stride(2) == 1 &&
                    (T * B <= 1 || (t.stride(1) == cols && (T == 1 || t.stride(0) == B * cols))),
                "mgrit_gru kernels: proj_grads: ", name, " must be a contiguous [", T, ", ", B,
                ", ", cols, "] block, got ", t.sizes(), " with strides ", t.strides());
    return t.view({T * B, cols});
  };
  const at::Tensor x2 = flat(xw, "xw", GH), hw2 = flat(hw, "hw", GH),
                   s2 = flat(s_prev, "s_prev", sh.S), g2 = flat(g, "g", sh.S);
  at::Tensor gx2 = flat(g_xw, "g_xw", GH), gh2 = flat(g_hw, "g_hw", GH);
  if (T * B == 0) return;
  if (xw.scalar_type() == at::kFloat) {
    run_bwd<float>(sh, dt, x2, hw2, s2, g2, gx2, gh2, nullptr, false);
  } else {
    run_bwd<double>(sh, dt, x2, hw2, s2, g2, gx2, gh2, nullptr, false);
  }
}

// The GRU family's linearisation of N rows (xw, hw [N, 3H], s [N, H]) into
// d, c_n [N, H] and chw [N, 3H] (the cells' [N, 3, H] blocks as rows).
void linearize_gru(int64_t kind, const at::Tensor& xw, const at::Tensor& hw, const at::Tensor& s,
                   const at::Tensor& w_hh, double dt, at::Tensor d, at::Tensor chw,
                   at::Tensor cn) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(kind == IMPLICIT_GRU || kind == GRU,
              "mgrit_gru kernels: linearize_gru is for the two GRU cells");
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  const int64_t N = xw.size(0), H = sh.H;
  check_rows(xw, "xw", N, 3 * H, w_hh);
  check_rows(hw, "hw", N, 3 * H, w_hh);
  check_rows(s, "s", N, H, w_hh);
  check_rows(d, "d", N, H, w_hh);
  check_rows(chw, "chw", N, 3 * H, w_hh);
  check_rows(cn, "cn", N, H, w_hh);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto x_ = crow<T>(xw), hw_ = crow<T>(hw), s_ = crow<T>(s);
    const auto d_ = rows<T>(d), c_ = rows<T>(chw), n_ = rows<T>(cn);
    at::parallel_for(0, N, grain(3 * H), [&](int64_t b0, int64_t b1) {
      glin_kernel(kind == IMPLICIT_GRU, b0, b1, H, static_cast<T>(dt), x_, hw_, s_, d_, c_, n_);
    });
  };
  if (xw.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
}

// One fused step for the MGRIT forward stepper.
at::Tensor step(int64_t kind, const at::Tensor& xw_t, const at::Tensor& s, const at::Tensor& w_hh,
                const c10::optional<at::Tensor>& b_hh, double dt, at::Tensor out,
                c10::optional<at::Tensor> hw_out, const c10::optional<at::Tensor>& rhs) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  const int64_t B = xw_t.size(0);
  check_rows(xw_t, "xw_t", B, sh.G * sh.H, w_hh);
  check_rows(s, "s", B, sh.S, w_hh);
  check_rows(out, "out", B, sh.S, w_hh);
  check_bias(b_hh, sh, w_hh);
  at::Tensor hw = hw_out.has_value() ? *hw_out : at::empty({B, sh.G * sh.H}, xw_t.options());
  check_rows(hw, "hw_out", B, sh.G * sh.H, w_hh);
  if (rhs.has_value()) check_rows(*rhs, "rhs", B, sh.S, w_hh);
  step_impl(sh, xw_t, s, w_hh.t(), b_hh, dt, out, hw, rhs);
  return out;
}

// One adjoint step recomputing the gates: out = rhs + (d step / d s)^T g.
at::Tensor vjp_step(int64_t kind, const at::Tensor& xw_t, const at::Tensor& s,
                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, double dt,
                    const at::Tensor& g, at::Tensor out, c10::optional<at::Tensor> hw,
                    const c10::optional<at::Tensor>& rhs, c10::optional<at::Tensor> g_xw_out,
                    c10::optional<at::Tensor> g_hw_out) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  const int64_t B = xw_t.size(0), GH = sh.G * sh.H;
  check_rows(xw_t, "xw_t", B, GH, w_hh);
  check_rows(s, "s", B, sh.S, w_hh);
  check_rows(g, "g", B, sh.S, w_hh);
  check_rows(out, "out", B, sh.S, w_hh);
  check_bias(b_hh, sh, w_hh);
  at::Tensor hw_ = hw.has_value() ? *hw : at::empty({B, GH}, xw_t.options());
  if (!hw.has_value()) hidden_projection(s, w_hh.t(), b_hh, hw_, sh.H);
  check_rows(hw_, "hw", B, GH, w_hh);
  // g_xw and g_hw: equal for LSTM/RNN (one buffer serves both), not for the GRUs
  at::Tensor gh = g_hw_out.has_value() ? *g_hw_out : at::empty({B, GH}, xw_t.options());
  at::Tensor gx = g_xw_out.has_value() ? *g_xw_out
                  : (sh.G == 3 ? at::empty({B, GH}, xw_t.options()) : gh);
  check_rows(gh, "g_hw_out", B, GH, w_hh);
  check_rows(gx, "g_xw_out", B, GH, w_hh);
  TORCH_CHECK(sh.G != 3 || !gx.is_same(gh),
              "mgrit_gru kernels: the GRUs' g_xw and g_hw differ and need two buffers");
  bool accumulate = false;
  if (rhs.has_value()) {
    check_rows(*rhs, "rhs", B, sh.S, w_hh);
    if (!rhs->is_same(out)) out.copy_(*rhs);
    accumulate = true;
  }
  bwd_impl(sh, dt, xw_t, hw_, s, g, gx, gh, &out, accumulate, w_hh);
  return out;
}

// One adjoint step from a cell's lin (see lin_rows): out = rhs + J^T g.
at::Tensor vjp_lin(int64_t kind, std::vector<at::Tensor> lin, const at::Tensor& g,
                   const at::Tensor& w_hh, at::Tensor out, const c10::optional<at::Tensor>& rhs,
                   c10::optional<at::Tensor> g_hw_out) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  const int64_t B = g.size(0), H = sh.H;
  check_rows(g, "g", B, sh.S, w_hh);
  check_rows(out, "out", B, sh.S, w_hh);
  const size_t want = kind == LSTM ? 4 : (kind == RNN ? 1 : 3);
  TORCH_CHECK(lin.size() == want, "mgrit_gru kernels: lin of this cell has ", want,
              " tensors, got ", lin.size());
  // the [B, 3, H] coefficient blocks are read as [B, 3H] rows
  for (auto& part : lin) {
    if (part.dim() == 3) {
      TORCH_CHECK(part.stride(2) == 1 && part.stride(1) == H,
                  "mgrit_gru kernels: lin's [B, 3, H] parts need contiguous [3, H] blocks");
      part = part.view({B, -1});
    }
  }
  check_rows(lin[0], "lin[0]", B, H, w_hh);
  if (kind == IMPLICIT_GRU || kind == GRU) {
    check_rows(lin[1], "lin[1]", B, 3 * H, w_hh);
  } else if (kind == LSTM) {
    check_rows(lin[1], "lin[1]", B, 3 * H, w_hh);
    check_rows(lin[2], "lin[2]", B, H, w_hh);
    check_rows(lin[3], "lin[3]", B, H, w_hh);
  }
  at::Tensor gh = g_hw_out.has_value() ? *g_hw_out : at::empty({B, sh.G * H}, g.options());
  check_rows(gh, "g_hw_out", B, sh.G * H, w_hh);
  bool accumulate = false;
  if (rhs.has_value()) {
    check_rows(*rhs, "rhs", B, sh.S, w_hh);
    if (!rhs->is_same(out)) out.copy_(*rhs);
    accumulate = true;
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto none = Rows<const T>{nullptr, 0};
    const auto l0 = crow<T>(lin[0]);
    const auto l1 = lin.size() > 1 ? crow<T>(lin[1]) : none;
    const auto l2 = lin.size() > 2 ? crow<T>(lin[2]) : none;
    const auto l3 = lin.size() > 3 ? crow<T>(lin[3]) : none;
    const auto g_ = crow<T>(g);
    const auto gh_ = rows<T>(gh), a_ = rows<T>(out);
    at::parallel_for(0, B, grain(sh.G * H), [&](int64_t b0, int64_t b1) {
      lin_kernel(kind, b0, b1, H, l0, l1, l2, l3, g_, gh_, a_, accumulate);
    });
  };
  if (g.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
  add_state_gemm(out, gh, w_hh, H, accumulate || sh.G == 3);
  return out;
}

// out [N, G] = x [N, D] W_ih^T + b_ih: the own loop for D <= 64, BLAS beyond.
at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih,
                            const c10::optional<at::Tensor>& b_ih, at::Tensor out) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && x.size(1) == w_ih.size(1),
              "mgrit_gru kernels: input_projection needs x [N, D] and w_ih [G, D], got ",
              x.sizes(), " and ", w_ih.sizes());
  TORCH_CHECK(w_ih.scalar_type() == at::kFloat || w_ih.scalar_type() == at::kDouble,
              "mgrit_gru kernels: float32 or float64 only, got ", w_ih.scalar_type());
  const int64_t N = x.size(0), D = x.size(1), G = w_ih.size(0);
  check_same_dtype({&x, &out, &w_ih}, w_ih);
  check_rows(x, "x", N, D, w_ih);
  check_rows(out, "out", N, G, w_ih);
  if (b_ih.has_value()) {
    TORCH_CHECK(b_ih->dim() == 1 && b_ih->size(0) == G, "mgrit_gru kernels: b_ih must be [", G,
                "]");
    check_same_dtype({&*b_ih}, w_ih);
  }
  if (D > 64 || N == 0) {
    if (b_ih.has_value()) {
      at::addmm_out(out, *b_ih, x, w_ih.t());
    } else {
      at::mm_out(out, x, w_ih.t());
    }
    return out;
  }
  const at::Tensor w_t = w_ih.t().contiguous();
  const at::Tensor bias = b_ih.has_value() ? b_ih->contiguous() : at::Tensor();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto x_ = crow<T>(x);
    const auto o_ = rows<T>(out);
    const T* wp = w_t.data_ptr<T>();
    const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
    at::parallel_for(0, N, grain(G), [&](int64_t r0, int64_t r1) {
      proj_kernel(r0, r1, D, G, x_, wp, bp, o_);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }
  return out;
}


// ---------------------------------------------------------- train step
// Pooling weights w[t, b] of the hidden state after step t (point t + 1):
// last: 1 at t = len_b - 1; mean: 1 / len_b for t < len_b (pooling.py).
template <typename T>
void pool_weights(int64_t pooling, const int64_t* len, int64_t T_, int64_t B, T* w) {
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t b = 0; b < B; ++b) {
      if (pooling == 0) {
        w[t * B + b] = t == len[b] - 1 ? T(1) : T(0);
      } else {
        w[t * B + b] = t < len[b] ? T(1) / static_cast<T>(len[b]) : T(0);
      }
    }
  }
}

// Cross-entropy (mean over the batch) of logits [B, C] (rows contiguous) and
// labels y: returns the loss and overwrites the logits with
// d(weight * loss)/d logits = weight (softmax - onehot) / B. The shifted
// logits z - max, each row's loss and their sum are rounded to T, as torch's
// log_softmax/nll_loss do: a float32 model whose logits overflow the shift
// or whose losses overflow the sum gets an infinite loss here too (the
// divergence checks then see it), not the finite one float64 would give.
template <typename T>
double cross_entropy(T* logits, const int64_t* y, int64_t B, int64_t C, double weight) {
  T loss = T(0);
  const double scale = weight / static_cast<double>(B);
  for (int64_t b = 0; b < B; ++b) {
    T* z = logits + b * C;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < C; ++c) m = std::max(m, z[c]);
    if (!std::isfinite(m)) m = T(0);      // all -inf or a NaN/inf row: let it propagate
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      z[c] = static_cast<T>(z[c] - m);
      s += std::exp(static_cast<double>(z[c]));
    }
    const T log_s = static_cast<T>(std::log(s));
    loss += static_cast<T>(log_s - z[y[b]]);
    for (int64_t c = 0; c < C; ++c) {
      const double p = std::exp(static_cast<double>(z[c]) - static_cast<double>(log_s));
      z[c] = static_cast<T>(scale * (p - (c == y[b] ? 1.0 : 0.0)));
    }
  }
  return static_cast<double>(loss / static_cast<T>(B));
}

// One training minibatch of a SequenceClassifier on the serial propagator:
// input projection, forward sweep, pooling, linear head, cross-entropy (mean
// over the batch), and the gradients of weight * loss: head, pooling sources,
// reverse sweep in chunks of `chunk` steps (0: max(16, 2048 / B)) with the
// parameter-gradient GEMMs of kernels.sweep_backward. x [B, T, D]; lengths
// (int64 [B]) or None (all T); y int64 [B]; pooling 0 last, 1 mean. Only the
// steps up to max(lengths) run. Returns (loss, [g_w_ih, g_w_hh, (g_b_ih,
// g_b_hh,) g_head_w, (g_head_b)]), or (nan, []) when the lengths or labels
// are out of range (the caller then takes the torch path, which reports it).
std::tuple<double, std::vector<at::Tensor>> train_step(
    int64_t kind, const at::Tensor& x, const c10::optional<at::Tensor>& lengths,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, const at::Tensor& head_w,
    const c10::optional<at::Tensor>& head_b, const at::Tensor& y, int64_t pooling, double dt,
    int64_t chunk, double weight) {
  at::NoGradGuard no_grad;
  const Shape sh = shape_of(kind, w_hh);
  check_dt(dt);
  const auto fail = std::make_tuple(std::numeric_limits<double>::quiet_NaN(),
                                    std::vector<at::Tensor>{});
  TORCH_CHECK(x.dim() == 3 && x.size(2) == w_ih.size(1) && w_ih.size(0) == sh.G * sh.H,
              "mgrit_gru kernels: train_step needs x [B, T, D] and w_ih [G H, D]");
  TORCH_CHECK(pooling == 0 || pooling == 1, "mgrit_gru kernels: pooling 0 (last) or 1 (mean)");
  const int64_t B = x.size(0), Tpad = x.size(1), D = x.size(2), H = sh.H, GH = sh.G * H,
                S = sh.S, C = head_w.size(0);
  TORCH_CHECK(head_w.dim() == 2 && head_w.size(1) == H, "mgrit_gru kernels: head weight [C, H]");
  check_same_dtype({&x, &w_ih, &head_w}, w_hh);
  check_bias(b_hh, sh, w_hh);
  if (b_ih.has_value()) check_bias(b_ih, sh, w_hh);
  if (head_b.has_value()) {
    TORCH_CHECK(head_b->dim() == 1 && head_b->size(0) == C, "mgrit_gru kernels: head bias [C]");
    check_same_dtype({&*head_b}, w_hh);
  }
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B && y.scalar_type() == at::kLong && y.device().is_cpu(),
              "mgrit_gru kernels: train_step needs int64 CPU labels [B]");
  if (B == 0 || Tpad == 0 || C == 0) return fail;
  const at::Tensor yc = y.contiguous();
  const int64_t* yp = yc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (yp[b] < 0 || yp[b] >= C) return fail;
  }
  at::Tensor len = lengths.has_value()
                       ? lengths->to(at::kLong).contiguous()
                       : at::full({B}, Tpad, at::TensorOptions().dtype(at::kLong));
  TORCH_CHECK(len.dim() == 1 && len.size(0) == B && len.device().is_cpu(),
              "mgrit_gru kernels: train_step needs CPU lengths [B]");
  const int64_t* lp = len.data_ptr<int64_t>();
  int64_t T = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (lp[b] < 1 || lp[b] > Tpad) return fail;
    T = std::max(T, lp[b]);
  }
  const auto opt = x.options();

  // forward: time-major inputs, projection, sweep
  const at::Tensor x_tm = x.narrow(1, 0, T).transpose(0, 1).contiguous();   // [T, B, D]
  at::Tensor xw = at::empty({T, B, GH}, opt), hw = at::empty({T, B, GH}, opt);
  at::Tensor states = at::empty({T + 1, B, S}, opt);
  states.select(0, 0).zero_();
  input_projection(x_tm.view({T * B, D}), w_ih, b_ih, xw.view({T * B, GH}));
  forward_sweep(kind, xw, w_hh, b_hh, dt, states, hw);

  // pooling, head, loss and their gradients
  at::Tensor pw = at::empty({T, B}, opt), feat = at::empty({B, H}, opt),
             logits = at::empty({B, C}, opt);
  double loss = 0.0;
  at::Tensor lam = at::empty({T, B, S}, opt);
  at::Tensor g_head_w = at::empty({C, H}, opt), g_feat = at::empty({B, H}, opt);
  c10::optional<at::Tensor> g_head_b;
  auto run = [&](auto tag) {
    using F = decltype(tag);
    F* w = pw.data_ptr<F>();
    pool_weights<F>(pooling, lp, T, B, w);
    const F* st = states.data_ptr<F>();
    F* f = feat.data_ptr<F>();
    for (int64_t b = 0; b < B; ++b) {
      F* fb = f + b * H;
      for (int64_t j = 0; j < H; ++j) fb[j] = F(0);
      const int64_t lo = pooling == 0 ? lp[b] - 1 : 0;
      for (int64_t t = lo; t < lp[b]; ++t) {
        const F wt = w[t * B + b];
        const F* h = st + ((t + 1) * B + b) * S;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) fb[j] += wt * h[j];
      }
    }
    if (head_b.has_value()) {
      at::addmm_out(logits, *head_b, feat, head_w.t());
    } else {
      at::mm_out(logits, feat, head_w.t());
    }
    loss = cross_entropy<F>(logits.data_ptr<F>(), yp, B, C, weight);   // logits := g_logits
    at::mm_out(g_head_w, logits.t(), feat);
    if (head_b.has_value()) g_head_b = logits.sum(0);
    at::mm_out(g_feat, logits, head_w);
    // sources lam[t, b, :H] = w[t, b] g_feat[b] (zero cell-state half)
    const F* gf = g_feat.data_ptr<F>();
    F* l = lam.data_ptr<F>();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        F* lr = l + (t * B + b) * S;
        const F wt = w[t * B + b];
        const F* g = gf + b * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) lr[j] = wt * g[j];
        for (int64_t j = H; j < S; ++j) lr[j] = F(0);
      }
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(double{});
  }

  // reverse sweep in chunks from the end, parameter gradients (sweep_backward)
  int64_t ch = chunk > 0 ? chunk : std::max<int64_t>(16, 2048 / B);
  ch = std::max<int64_t>(1, std::min(ch, T));
  at::Tensor buf = at::empty({2, ch, B, GH}, opt);
  at::Tensor gw_ih_t = at::zeros({D, GH}, opt), gw_hh_t = at::zeros({H, GH}, opt);
  const bool bias = b_ih.has_value();
  at::Tensor gb_ih, gb_hh, ones;
  if (bias) {
    gb_ih = at::zeros({GH}, opt);
    gb_hh = at::zeros({GH}, opt);
    ones = at::ones({ch * B}, opt);
  }
  for (int64_t stop = T; stop > 0; stop -= ch) {
    const int64_t start = std::max<int64_t>(stop - ch, 0), n = stop - start;
    at::Tensor g_xw = buf.select(0, 0).narrow(0, 0, n), g_hw = buf.select(0, 1).narrow(0, 0, n);
    at::Tensor lam_c = lam.narrow(0, start, n);
    c10::optional<at::Tensor> lam_prev;
    if (start > 0) lam_prev = lam.select(0, start - 1);
    const at::Tensor s_c = states.narrow(0, start, n);
    backward_sweep(kind, xw.narrow(0, start, n), hw.narrow(0, start, n), s_c, w_hh, dt, lam_c,
                   g_xw, g_hw, lam_prev);
    const at::Tensor gx2 = g_xw.reshape({n * B, GH}), gh2 = g_hw.reshape({n * B, GH});
    gw_ih_t.addmm_(x_tm.narrow(0, start, n).reshape({n * B, D}).t(), gx2);
    gw_hh_t.addmm_(s_c.narrow(2, 0, H).reshape({n * B, H}).t(), gh2);
    if (bias) {
      const at::Tensor o = ones.narrow(0, 0, n * B);
      gb_ih.addmv_(gx2.t(), o);
      gb_hh.addmv_(gh2.t(), o);
    }
  }
  std::vector<at::Tensor> grads{gw_ih_t.t().contiguous(), gw_hh_t.t().contiguous()};
  if (bias) {
    grads.push_back(gb_ih);
    grads.push_back(gb_hh);
  }
  grads.push_back(g_head_w);
  if (g_head_b.has_value()) grads.push_back(*g_head_b);
  return std::make_tuple(loss, grads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mgrit_gru fused cell kernels (see mgrit_gru/models/kernels.py)";
  using gil = py::call_guard<py::gil_scoped_release>;
  m.def("forward_sweep", &forward_sweep, gil(), py::arg("kind"), py::arg("xw"), py::arg("w_hh"),
        py::arg("b_hh"), py::arg("dt"), py::arg("states"), py::arg("hw"));
  m.def("backward_sweep", &backward_sweep, gil(), py::arg("kind"), py::arg("xw"), py::arg("hw"),
        py::arg("s_prev"), py::arg("w_hh"), py::arg("dt"), py::arg("lam"), py::arg("g_xw"),
        py::arg("g_hw"), py::arg("lam_prev"));
  m.def("step", &step, gil(), py::arg("kind"), py::arg("xw_t"), py::arg("s"), py::arg("w_hh"),
        py::arg("b_hh"), py::arg("dt"), py::arg("out"), py::arg("hw_out"), py::arg("rhs"));
  m.def("vjp_step", &vjp_step, gil(), py::arg("kind"), py::arg("xw_t"), py::arg("s"),
        py::arg("w_hh"), py::arg("b_hh"), py::arg("dt"), py::arg("g"), py::arg("out"),
        py::arg("hw"), py::arg("rhs"), py::arg("g_xw_out"), py::arg("g_hw_out"));
  m.def("linearize_gru", &linearize_gru, gil(), py::arg("kind"), py::arg("xw"), py::arg("hw"),
        py::arg("s"), py::arg("w_hh"), py::arg("dt"), py::arg("d"), py::arg("chw"),
        py::arg("cn"));
  m.def("proj_grads", &proj_grads, gil(), py::arg("kind"), py::arg("xw"), py::arg("hw"),
        py::arg("s_prev"), py::arg("w_hh"), py::arg("dt"), py::arg("g"), py::arg("g_xw"),
        py::arg("g_hw"));
  m.def("vjp_lin", &vjp_lin, gil(), py::arg("kind"), py::arg("lin"), py::arg("g"),
        py::arg("w_hh"), py::arg("out"), py::arg("rhs"), py::arg("g_hw_out"));
  m.def("input_projection", &input_projection, gil(), py::arg("x"), py::arg("w_ih"),
        py::arg("b_ih"), py::arg("out"));
  m.def("train_step", &train_step, gil(), py::arg("kind"), py::arg("x"), py::arg("lengths"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("head_w"),
        py::arg("head_b"), py::arg("y"), py::arg("pooling"), py::arg("dt"), py::arg("chunk"),
        py::arg("weight"));
  m.def("simd_probe", [](at::Tensor x) {   // exp/tanh/sigmoid of the float32 kernels, for tests
    at::Tensor y = at::empty({3, x.numel()}, x.options());
    const float* p = x.data_ptr<float>();
    float* q = y.data_ptr<float>();
    const int64_t n = x.numel();
    for (int64_t i = 0; i < n; ++i) {
      q[i] = exp_f(p[i]);
      q[n + i] = tanh_f(p[i]);
      q[2 * n + i] = sigmoid_f(p[i]);
    }
    return y;
  });
}
