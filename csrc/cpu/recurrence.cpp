// CPU kernels of a recurrent layer's recurrence, for the recurrent rule (rules/recurrence.py):
// all T steps of one layer and direction in one call, forward and backward, so that the rule
// gets every step's gate gradient without a dozen PyTorch ops per step. Batch-first tensors:
//
//   lstm_sequence      gates_t = gi_t + b_hh + W_hh h_{t-1}, i, f, o = sigmoid, g = tanh,
//                      c_t = f c_{t-1} + i g, h_t = o tanh(c_t); returns h (B, T, H) and what
//                      the backward needs: the activated gates (B, T, 4H), c and tanh(c)
//                      (B, T, H);
//   lstm_sequence_backward  dh_t = dout_t + W_hh^T dgates_{t+1}; returns the gate
//                      pre-activation gradients (B, T, 4H) and the initial state's gradients;
//   rnn_sequence(_backward)  h_t = act(gi_t + b_hh + W_hh h_{t-1}), act tanh or relu;
//   gru_sequence(_backward)  torch's GRU cell; the backward returns the gradients of gi and gh.
//
// valid (B, T) bool, when given, marks each example's real steps: at a padded step the state
// is carried unchanged (h_t = h_{t-1}, c_t = c_{t-1}), its gate gradients are zero and the
// state's gradients pass through. The LSTM runs its steps in one threaded region with its own
// small GEMMs and vectorised sigmoid/tanh (see below); the RNN and GRU steps call ATen for the
// GEMMs and transcendental functions, the gate arithmetic being one fused loop per step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <tuple>

#include "cpu/reduce.h"
#include "cpu/small_gemm.h"
#include "cpu/vector_clones.h"
#include "cpu/vector_math.h"

namespace dpfast {
namespace {

void check_sequence(const char* op, const at::Tensor& gi, const at::Tensor& h0,
                    const at::Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(gi.dim() == 3 && h0.dim() == 2 && w_hh.dim() == 2, op,
              ": gi (B, T, G*H), h0 (B, H) and w_hh (G*H, H) expected, got ", gi.sizes(), ", ",
              h0.sizes(), " and ", w_hh.sizes());
  const int64_t hidden = h0.size(1);
  TORCH_CHECK(gi.size(0) == h0.size(0) && gi.size(2) == gates * hidden &&
                  w_hh.size(0) == gates * hidden && w_hh.size(1) == hidden,
              op, ": shapes disagree: gi ", gi.sizes(), ", h0 ", h0.sizes(), ", w_hh ",
              w_hh.sizes());
  TORCH_CHECK(gi.device().is_cpu() && h0.device().is_cpu() && w_hh.device().is_cpu(), op,
              ": the cpp kernel takes CPU tensors");
  TORCH_CHECK(gi.scalar_type() == h0.scalar_type() && gi.scalar_type() == w_hh.scalar_type(), op,
              ": gi, the state and w_hh must share a dtype, got ", gi.scalar_type(), ", ",
              h0.scalar_type(), " and ", w_hh.scalar_type());
}

// valid (B, T) bool -> time-major contiguous (T, B), or undefined for "every step is real";
// ref is any (B, T, .) tensor of the call.
at::Tensor valid_steps(const c10::optional<at::Tensor>& valid, const at::Tensor& ref) {
  if (!valid.has_value() || !valid->defined()) return {};
  TORCH_CHECK(valid->dim() == 2 && valid->size(0) == ref.size(0) && valid->size(1) == ref.size(1),
              "valid must be (B, T) = ", ref.size(0), ", ", ref.size(1), ", got ", valid->sizes());
  return valid->to(at::kBool).t().contiguous();
}

// gi (B, T, G*H) + b_hh as a fresh time-major (T, B, G*H) buffer the recurrence writes its
// gates into: every step's rows are then contiguous (an addmm into rows T * G*H apart took
// twice as long).
at::Tensor gate_buffer(const at::Tensor& gi, const c10::optional<at::Tensor>& b_hh) {
  at::Tensor gates = at::empty({gi.size(1), gi.size(0), gi.size(2)}, gi.options());
  // Written through the contiguous (T, B, .) side: for the rule's time-major gi both operands
  // are then contiguous.
  const at::Tensor time_major_gi = gi.transpose(0, 1);
  if (b_hh.has_value() && b_hh->defined()) {
    at::add_out(gates, time_major_gi, *b_hh);
  } else {
    gates.copy_(time_major_gi);
  }
  return gates;
}

// (B, T, H) -> contiguous (T, B, H), or undefined.
at::Tensor time_major(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return {};
  return t->transpose(0, 1).contiguous();
}

// Rows b of one step run in parallel when the step has enough elements to pay for it.
int64_t row_grain(int64_t hidden) { return grain_for(8 * hidden); }

// dh = carry + d_gates W_hh (B, H): the gradient reaching h_{t-1}; no carry without padding.
void recurrent_gradient(at::Tensor& dh, const at::Tensor& carry, const at::Tensor& d_gates,
                        const at::Tensor& w_hh) {
  if (carry.defined()) {
    at::addmm_out(dh, carry, d_gates, w_hh);
  } else {
    at::mm_out(dh, d_gates, w_hh);
  }
}

// In the kernels below every (T, B, .) buffer is time-major and contiguous, `row` = t B + b.

// ----------------------------------------------------------------------------------- LSTM
// One OpenMP region per call: each thread owns a range of hidden units [u0, u1), that is their
// i, f, g and o gate columns. Forward, step t: the thread computes its columns of gi_t + b_hh +
// W_hh h_{t-1} (small_gemm.h, W_hh transposed once), then its units' gates, c_t and h_t; the
// threads meet once per step, so that h_t is whole before step t + 1 reads it. Backward, step t:
// the thread computes its units' gate gradients, meets the others, then computes its columns of
// dh_{t-1} = dgates_t W_hh; it reads back only its own columns of dh and dc, so one meeting per
// step is enough. Per step this is a few microseconds of work: BLAS packing the weight on every
// call, ATen's per-op dispatch and waking threads per op cost more than the arithmetic did.

struct UnitRange {
  int64_t begin, end;
};

// Threads sharing an LSTM recurrence: one where a step is too small to share, else up to
// ATen's thread count with at least 16 units each.
int lstm_threads(int64_t batch, int64_t hidden) {
  if (batch * 4 * hidden * hidden < (int64_t{1} << 15)) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), hidden / 16)));
}

// Thread `thread` of `threads`' units: chunks of a multiple of 16 units (whole vector tiles).
UnitRange units_of(int thread, int threads, int64_t hidden) {
  const int64_t chunk = ((hidden + threads - 1) / threads + 15) / 16 * 16;
  const int64_t begin = std::min<int64_t>(hidden, thread * chunk);
  return {begin, std::min<int64_t>(hidden, begin + chunk)};
}

// f(units, meet) on each of `threads` threads, meet() a barrier of all of them.
template <typename F>
void on_unit_ranges(int threads, int64_t hidden, const F& f) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      f(units_of(omp_get_thread_num(), omp_get_num_threads(), hidden), [] {
#pragma omp barrier
      });
    }
    return;
  }
#endif
  f(UnitRange{0, hidden}, [] {});
}

// Units [begin, end) of one example's forward step: g (4H) holds the gate pre-activations on
// entry and the activated gates i, f, g, o on exit; c, tc = tanh(c) and h from c_prev. Every
// pointer restrict, so that the loop vectorises.
template <typename scalar_t>
inline __attribute__((always_inline)) void lstm_units_forward(
    scalar_t* __restrict__ g, const scalar_t* __restrict__ c_prev, scalar_t* __restrict__ c,
    scalar_t* __restrict__ tc, scalar_t* __restrict__ h, int64_t hidden, int64_t begin,
    int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const scalar_t i = sigmoid_of(g[j]), f = sigmoid_of(g[hidden + j]);
    const scalar_t gg = tanh_of(g[2 * hidden + j]), o = sigmoid_of(g[3 * hidden + j]);
    g[j] = i, g[hidden + j] = f, g[2 * hidden + j] = gg, g[3 * hidden + j] = o;
    const scalar_t cj = f * c_prev[j] + i * gg, tj = tanh_of(cj);
    c[j] = cj, tc[j] = tj, h[j] = o * tj;
  }
}

// Asks the caches for a thread's columns of the next step's (B, G H) rows (gates or their
// gradients) while this step computes: each row's G segments of u's columns. The rows are a
// 2-8 KiB stride apart, which the hardware prefetchers do not follow; without this, loading
// the register tiles' first values from memory took a fifth of the char-LSTM's step.
template <typename scalar_t>
inline void prefetch_step(const scalar_t* rows, int64_t batch, int64_t gates, int64_t hidden,
                          UnitRange u) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  const int64_t width = gates * hidden;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t q = 0; q < gates; ++q)
      for (int64_t j = u.begin; j < u.end; j += kLine)
        __builtin_prefetch(rows + b * width + q * hidden + j, 1, 3);
}

// Forward step for units u of every example: gates (B, 4H) hold gi_t + b_hh on entry and the
// activated gates on exit; c, tc = tanh(c), h (B, H) of step t from c_prev, h_prev. A padded
// example (valid[b] false) carries its state: c = c_prev, h = h_prev.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_step_forward(const scalar_t* h_prev, const scalar_t* c_prev,
                                            const scalar_t* w_t, scalar_t* gates, scalar_t* c,
                                            scalar_t* tc, scalar_t* h, const bool* valid,
                                            int64_t batch, int64_t hidden, UnitRange u) {
  const int64_t width = 4 * hidden;
  for (int64_t q = 0; q < 4; ++q) {
    gemm_accumulate(h_prev, hidden, w_t, width, gates, width, batch, hidden, q * hidden + u.begin,
                    q * hidden + u.end);
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s = b * hidden;
    if (valid && !valid[b]) {
      for (int64_t j = u.begin; j < u.end; ++j) c[s + j] = c_prev[s + j], h[s + j] = h_prev[s + j];
      continue;
    }
    lstm_units_forward(gates + b * width, c_prev + s, c + s, tc + s, h + s, hidden, u.begin,
                       u.end);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_sequence_cpu(
    const at::Tensor& gi, const at::Tensor& h0_in, const at::Tensor& c0_in,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& valid_in) {
  check_sequence("lstm_sequence", gi, h0_in, w_hh, 4);
  TORCH_CHECK(c0_in.sizes() == h0_in.sizes(), "lstm_sequence: c0 must be shaped as h0");
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const at::Tensor valid = valid_steps(valid_in, gi);
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const int64_t steps = gi.size(1), batch = gi.size(0), hidden = h0.size(1);
  at::Tensor gates = gate_buffer(gi, b_hh);
  at::Tensor hs = at::empty({steps, batch, hidden}, gi.options());
  at::Tensor cells = at::empty_like(hs), tanh_cells = at::empty_like(hs);
  const at::Tensor w_t = w_hh.t().contiguous();  // (H, 4H)
  const int threads = lstm_threads(batch, hidden);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "lstm_sequence", [&] {
    scalar_t *pg = gates.data_ptr<scalar_t>(), *ph = hs.data_ptr<scalar_t>();
    scalar_t *pc = cells.data_ptr<scalar_t>(), *ptc = tanh_cells.data_ptr<scalar_t>();
    const scalar_t *ph0 = h0.data_ptr<scalar_t>(), *pc0 = c0.data_ptr<scalar_t>();
    const scalar_t* pw = w_t.data_ptr<scalar_t>();
    const int64_t state = batch * hidden;
    on_unit_ranges(threads, hidden, [&](UnitRange u, auto meet) {
      for (int64_t t = 0; t < steps; ++t) {
        if (t) meet();
        if (t + 1 < steps) prefetch_step(pg + (t + 1) * 4 * state, batch, 4, hidden, u);
        lstm_step_forward<scalar_t>(t ? ph + (t - 1) * state : ph0, t ? pc + (t - 1) * state : pc0,
                                    pw, pg + t * 4 * state, pc + t * state, ptc + t * state,
                                    ph + t * state, pv ? pv + t * batch : nullptr, batch, hidden,
                                    u);
      }
    });
  });
  return {hs.transpose(0, 1), gates, cells, tanh_cells};
}

// Units [begin, end) of one example's backward step: d (4H) from dh = dh_rec (+ out_grad with
// kOut), the activated gates g, tc = tanh(c_t) and c_prev; dc updated in place to the gradient
// of c_{t-1}.
template <bool kOut, typename scalar_t>
inline __attribute__((always_inline)) void lstm_units_backward(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ tc,
    const scalar_t* __restrict__ c_prev, const scalar_t* __restrict__ dh_rec,
    const scalar_t* __restrict__ out_grad, scalar_t* __restrict__ dc, scalar_t* __restrict__ d,
    int64_t hidden, int64_t begin, int64_t end) {
  const scalar_t one(1);
  for (int64_t j = begin; j < end; ++j) {
    const scalar_t dh = kOut ? dh_rec[j] + out_grad[j] : dh_rec[j];
    const scalar_t i = g[j], f = g[hidden + j], gg = g[2 * hidden + j], o = g[3 * hidden + j];
    const scalar_t t = tc[j], dcc = dc[j] + dh * o * (one - t * t);
    d[j] = dcc * gg * i * (one - i);
    d[hidden + j] = dcc * c_prev[j] * f * (one - f);
    d[2 * hidden + j] = dcc * i * (one - gg * gg);
    d[3 * hidden + j] = dh * t * o * (one - o);
    dc[j] = dcc * f;
  }
}

// Backward step, gate gradients of units u: d (B, 4H) and dc (B, H) as lstm_units_backward. A
// padded example gets d = 0 and passes its state's gradients through: carry = dh (the part of
// dh_{t-1} not from W_hh), dc unchanged; carry = 0 for the others.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_step_gate_grads(const scalar_t* g, const scalar_t* tc,
                                               const scalar_t* c_prev, const scalar_t* dh_rec,
                                               const scalar_t* out_grad, scalar_t* dc, scalar_t* d,
                                               scalar_t* carry, const bool* valid, int64_t batch,
                                               int64_t hidden, UnitRange u) {
  const int64_t width = 4 * hidden;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t s = b * hidden;
    scalar_t* db = d + b * width;
    if (valid && !valid[b]) {
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t j = u.begin; j < u.end; ++j) db[q * hidden + j] = scalar_t(0);
      for (int64_t j = u.begin; j < u.end; ++j)
        carry[s + j] = dh_rec[s + j] + (out_grad ? out_grad[s + j] : scalar_t(0));
      continue;
    }
    if (carry) {
      for (int64_t j = u.begin; j < u.end; ++j) carry[s + j] = scalar_t(0);
    }
    if (out_grad) {
      lstm_units_backward<true>(g + b * width, tc + s, c_prev + s, dh_rec + s, out_grad + s,
                                dc + s, db, hidden, u.begin, u.end);
    } else {
      lstm_units_backward<false, scalar_t>(g + b * width, tc + s, c_prev + s, dh_rec + s, nullptr,
                                           dc + s, db, hidden, u.begin, u.end);
    }
  }
}

// dh[:, u] = carry[:, u] (or 0) + d W_hh[:, u]: units u of the gradient reaching h_{t-1}.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_step_state_grad(const scalar_t* d, const scalar_t* w,
                                               const scalar_t* carry, scalar_t* dh, int64_t batch,
                                               int64_t hidden, UnitRange u) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = u.begin; j < u.end; ++j)
      dh[b * hidden + j] = carry ? carry[b * hidden + j] : scalar_t(0);
  gemm_accumulate(d, 4 * hidden, w, hidden, dh, hidden, batch, 4 * hidden, u.begin, u.end);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_sequence_backward_cpu(
    const c10::optional<at::Tensor>& d_hs_in, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& tanh_cells,
    const at::Tensor& c0_in, const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& valid_in) {
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = cells.size(2);
  const at::Tensor valid = valid_steps(valid_in, gates.transpose(0, 1)), c0 = c0_in.contiguous();
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const at::Tensor d_hs = time_major(d_hs_in), w_hh = w_hh_in.contiguous();
  at::Tensor dc = (dc_n.has_value() && dc_n->defined()) ? dc_n->contiguous().clone()
                                                        : at::zeros({batch, hidden}, cells.options());
  at::Tensor dh = at::zeros({batch, hidden}, cells.options());
  at::Tensor dgates = at::empty_like(gates);
  at::Tensor carry = pv ? at::empty({batch, hidden}, cells.options()) : at::Tensor();
  const int threads = lstm_threads(batch, hidden);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_sequence_backward", [&] {
    const scalar_t *pg = gates.data_ptr<scalar_t>(), *pc = cells.data_ptr<scalar_t>();
    const scalar_t *ptc = tanh_cells.data_ptr<scalar_t>(), *pc0 = c0.data_ptr<scalar_t>();
    const scalar_t* pdo = d_hs.defined() ? d_hs.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pw = w_hh.data_ptr<scalar_t>();
    scalar_t *pdh = dh.data_ptr<scalar_t>(), *pdc = dc.data_ptr<scalar_t>();
    scalar_t* pd = dgates.data_ptr<scalar_t>();
    scalar_t* pcarry = carry.defined() ? carry.data_ptr<scalar_t>() : nullptr;
    const int64_t state = batch * hidden;
    on_unit_ranges(threads, hidden, [&](UnitRange u, auto meet) {
      for (int64_t t = steps - 1; t >= 0; --t) {
        lstm_step_gate_grads<scalar_t>(pg + t * 4 * state, ptc + t * state,
                                       t ? pc + (t - 1) * state : pc0, pdh,
                                       pdo ? pdo + t * state : nullptr, pdc, pd + t * 4 * state,
                                       pcarry, pv ? pv + t * batch : nullptr, batch, hidden, u);
        meet();
        lstm_step_state_grad<scalar_t>(pd + t * 4 * state, pw, pcarry, pdh, batch, hidden, u);
      }
    });
  });
  return {dgates.transpose(0, 1), dh, dc};
}

// ------------------------------------------------------------------------------------ RNN

template <typename scalar_t>
void carry_padded_state(at::Tensor& hs, const at::Tensor& h0, const bool* valid, int64_t t) {
  const int64_t batch = hs.size(1), hidden = hs.size(2);
  scalar_t* ph = hs.data_ptr<scalar_t>();
  const scalar_t* ph0 = h0.data_ptr<scalar_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = t * batch + b;
    if (valid[row]) continue;
    scalar_t* h = ph + row * hidden;
    const scalar_t* h_prev = t ? h - batch * hidden : ph0 + b * hidden;
    for (int64_t j = 0; j < hidden; ++j) h[j] = h_prev[j];
  }
}

at::Tensor rnn_sequence_cpu(const at::Tensor& gi, const at::Tensor& h0_in, const at::Tensor& w_hh,
                            const c10::optional<at::Tensor>& b_hh, bool relu,
                            const c10::optional<at::Tensor>& valid_in) {
  check_sequence("rnn_sequence", gi, h0_in, w_hh, 1);
  const at::Tensor h0 = h0_in.contiguous(), valid = valid_steps(valid_in, gi);
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  at::Tensor hs = gate_buffer(gi, b_hh);  // the pre-activations, turned into h step by step
  const at::Tensor w_t = w_hh.t();
  for (int64_t t = 0; t < gi.size(1); ++t) {
    at::Tensor h = hs[t];
    h.addmm_(t ? hs[t - 1] : h0, w_t);
    relu ? h.relu_() : h.tanh_();
    if (pv) {
      AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "rnn_sequence", [&] {
        carry_padded_state<scalar_t>(hs, h0, pv, t);
      });
    }
  }
  return hs.transpose(0, 1);
}

template <typename scalar_t>
void rnn_step_backward(const at::Tensor& d_hs, const at::Tensor& dh_next, const at::Tensor& hs,
                       const bool* valid, bool relu, at::Tensor& dpre, at::Tensor& carry,
                       int64_t t) {
  const int64_t batch = hs.size(1), hidden = hs.size(2);
  const scalar_t* pdo = d_hs.defined() ? d_hs.data_ptr<scalar_t>() : nullptr;
  const scalar_t *pdh = dh_next.data_ptr<scalar_t>(), *ph = hs.data_ptr<scalar_t>();
  scalar_t* pd = dpre.data_ptr<scalar_t>();
  scalar_t* pcarry = carry.defined() ? carry.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, batch, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      const bool real = !valid || valid[row];
      const scalar_t* h = ph + row * hidden;
      scalar_t* d = pd + row * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const scalar_t dh = pdh[b * hidden + j] + (pdo ? pdo[row * hidden + j] : scalar_t(0));
        const scalar_t slope = relu ? scalar_t(h[j] > scalar_t(0)) : scalar_t(1) - h[j] * h[j];
        d[j] = real ? dh * slope : scalar_t(0);
        if (pcarry) pcarry[b * hidden + j] = real ? scalar_t(0) : dh;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rnn_sequence_backward_cpu(
    const c10::optional<at::Tensor>& d_hs_in, const at::Tensor& hs_in, const at::Tensor& w_hh,
    bool relu, const c10::optional<at::Tensor>& valid_in) {
  const at::Tensor hs = hs_in.transpose(0, 1);  // the forward's (T, B, H) buffer
  TORCH_CHECK(hs.is_contiguous(), "rnn_sequence_backward: hs must be rnn_sequence's output");
  const int64_t batch = hs.size(1), hidden = hs.size(2);
  const at::Tensor valid = valid_steps(valid_in, hs_in);
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const at::Tensor d_hs = time_major(d_hs_in);
  at::Tensor dh = at::zeros({batch, hidden}, hs.options());
  at::Tensor dpre = at::empty_like(hs);
  at::Tensor carry = pv ? at::empty({batch, hidden}, hs.options()) : at::Tensor();
  for (int64_t t = hs.size(0) - 1; t >= 0; --t) {
    AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "rnn_sequence_backward", [&] {
      rnn_step_backward<scalar_t>(d_hs, dh, hs, pv, relu, dpre, carry, t);
    });
    recurrent_gradient(dh, carry, dpre[t], w_hh);
  }
  return {dpre.transpose(0, 1), dh};
}

// ------------------------------------------------------------------------------------ GRU
// r, z = sigmoid(gi_r + gh_r), sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n),
// h_t = (1 - z) n + z h_{t-1}, gh = W_hh h_{t-1} + b_hh. The gradients of gi and gh differ in
// the n block (dgh_n = r dgi_n), so the backward returns both.

// Step t's r and z pre-activations (B, 2H) into gates[t] (gi batch-first (B, T, 3H)).
template <typename scalar_t>
void gru_reset_update(const at::Tensor& gi, const at::Tensor& gh, at::Tensor& gates, int64_t t) {
  const int64_t batch = gates.size(1), width = gates.size(2), steps = gi.size(1);
  const scalar_t *pgi = gi.data_ptr<scalar_t>(), *pgh = gh.data_ptr<scalar_t>();
  scalar_t* pg = gates.data_ptr<scalar_t>();
  at::parallel_for(0, batch, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* x = pgi + (b * steps + t) * width;
      const scalar_t* h = pgh + (t * batch + b) * width;
      scalar_t* g = pg + (t * batch + b) * width;
      for (int64_t j = 0; j < 2 * width / 3; ++j) g[j] = x[j] + h[j];
    }
  });
}

// Step t's candidate pre-activation gi_n + r gh_n (doubled with by_sigmoid) into gates[t].
template <typename scalar_t>
void gru_candidate(const at::Tensor& gi, const at::Tensor& gh, at::Tensor& gates, bool by_sigmoid,
                   int64_t t) {
  const int64_t batch = gates.size(1), width = gates.size(2), steps = gi.size(1);
  const int64_t hidden = width / 3;
  const scalar_t *pgi = gi.data_ptr<scalar_t>(), *pgh = gh.data_ptr<scalar_t>();
  scalar_t* pg = gates.data_ptr<scalar_t>();
  const scalar_t two = by_sigmoid ? scalar_t(2) : scalar_t(1);
  at::parallel_for(0, batch, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* x = pgi + (b * steps + t) * width + 2 * hidden;
      const scalar_t* h = pgh + (t * batch + b) * width + 2 * hidden;
      scalar_t* g = pg + (t * batch + b) * width;
      for (int64_t j = 0; j < hidden; ++j) g[2 * hidden + j] = two * (x[j] + g[j] * h[j]);
    }
  });
}

// h_t = (1 - z) n + z h_{t-1} (h_{t-1} at a padded step); with by_sigmoid n is first turned
// from sigmoid(2 x) into tanh(x).
template <typename scalar_t>
void gru_hidden(at::Tensor& gates, at::Tensor& hs, const at::Tensor& h0, const bool* valid,
                bool by_sigmoid, int64_t t) {
  const int64_t batch = gates.size(1), hidden = hs.size(2);
  scalar_t *pg = gates.data_ptr<scalar_t>(), *ph = hs.data_ptr<scalar_t>();
  const scalar_t* ph0 = h0.data_ptr<scalar_t>();
  at::parallel_for(0, batch, row_grain(3 * hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      scalar_t* h = ph + row * hidden;
      const scalar_t* h_prev = t ? h - batch * hidden : ph0 + b * hidden;
      if (valid && !valid[row]) {
        for (int64_t j = 0; j < hidden; ++j) h[j] = h_prev[j];
        continue;
      }
      scalar_t* g = pg + row * 3 * hidden;
      if (by_sigmoid) {
        for (int64_t j = 0; j < hidden; ++j) g[2 * hidden + j] = scalar_t(2) * g[2 * hidden + j] - scalar_t(1);
      }
      for (int64_t j = 0; j < hidden; ++j) {
        const scalar_t z = g[hidden + j];
        h[j] = (scalar_t(1) - z) * g[2 * hidden + j] + z * h_prev[j];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_sequence_cpu(
    const at::Tensor& gi_in, const at::Tensor& h0_in, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& valid_in) {
  check_sequence("gru_sequence", gi_in, h0_in, w_hh, 3);
  const at::Tensor gi = gi_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor valid = valid_steps(valid_in, gi);
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const int64_t batch = gi.size(0), steps = gi.size(1), hidden = h0.size(1);
  at::Tensor gh = at::empty({steps, batch, 3 * hidden}, gi.options());
  at::Tensor gates = at::empty_like(gh);
  at::Tensor hs = at::empty({steps, batch, hidden}, gi.options());
  const bool by_sigmoid = gi.scalar_type() == at::kFloat;  // as in lstm_sequence_cpu
  const bool biased = b_hh.has_value() && b_hh->defined();
  const at::Tensor w_t = w_hh.t();
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor gh_t = gh[t], g = gates[t];
    const at::Tensor h_prev = t ? hs[t - 1] : h0;
    if (biased) {
      at::addmm_out(gh_t, *b_hh, h_prev, w_t);
    } else {
      at::mm_out(gh_t, h_prev, w_t);
    }
    AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "gru_sequence", [&] {
      gru_reset_update<scalar_t>(gi, gh, gates, t);
      g.narrow(1, 0, 2 * hidden).sigmoid_();
      gru_candidate<scalar_t>(gi, gh, gates, by_sigmoid, t);
      at::Tensor n = g.narrow(1, 2 * hidden, hidden);
      by_sigmoid ? n.sigmoid_() : n.tanh_();
      gru_hidden<scalar_t>(gates, hs, h0, pv, by_sigmoid, t);
    });
  }
  return {hs.transpose(0, 1), gates, gh};
}

// One step back: dgi[t], dgh[t] and carry = the gradient reaching h_{t-1} directly (z dh, or
// all of dh at a padded step).
template <typename scalar_t>
void gru_step_backward(const at::Tensor& d_hs, const at::Tensor& dh_next, const at::Tensor& hs,
                       const at::Tensor& h0, const at::Tensor& gates, const at::Tensor& gh,
                       const bool* valid, at::Tensor& dgi, at::Tensor& dgh, at::Tensor& carry,
                       int64_t t) {
  const int64_t batch = gates.size(1), hidden = hs.size(2);
  const scalar_t* pdo = d_hs.defined() ? d_hs.data_ptr<scalar_t>() : nullptr;
  const scalar_t *pdh = dh_next.data_ptr<scalar_t>(), *ph = hs.data_ptr<scalar_t>();
  const scalar_t *ph0 = h0.data_ptr<scalar_t>(), *pg = gates.data_ptr<scalar_t>();
  const scalar_t* pgh = gh.data_ptr<scalar_t>();
  scalar_t *pdi = dgi.data_ptr<scalar_t>(), *pdg = dgh.data_ptr<scalar_t>();
  scalar_t* pcarry = carry.data_ptr<scalar_t>();
  at::parallel_for(0, batch, row_grain(3 * hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      scalar_t *di = pdi + row * 3 * hidden, *dg = pdg + row * 3 * hidden;
      scalar_t* c = pcarry + b * hidden;
      const scalar_t* out_grad = pdo ? pdo + row * hidden : nullptr;
      const scalar_t* dh_rec = pdh + b * hidden;
      if (valid && !valid[row]) {
        for (int64_t j = 0; j < 3 * hidden; ++j) di[j] = dg[j] = scalar_t(0);
        for (int64_t j = 0; j < hidden; ++j) c[j] = dh_rec[j] + (out_grad ? out_grad[j] : scalar_t(0));
        continue;
      }
      const scalar_t* g = pg + row * 3 * hidden;
      const scalar_t* hn = pgh + row * 3 * hidden + 2 * hidden;
      const scalar_t* h_prev = t ? ph + (row - batch) * hidden : ph0 + b * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const scalar_t dh = dh_rec[j] + (out_grad ? out_grad[j] : scalar_t(0));
        const scalar_t r = g[j], z = g[hidden + j], n = g[2 * hidden + j];
        const scalar_t dn = dh * (scalar_t(1) - z) * (scalar_t(1) - n * n);
        const scalar_t dz = dh * (h_prev[j] - n) * z * (scalar_t(1) - z);
        const scalar_t dr = dn * hn[j] * r * (scalar_t(1) - r);
        di[j] = dg[j] = dr;
        di[hidden + j] = dg[hidden + j] = dz;
        di[2 * hidden + j] = dn;
        dg[2 * hidden + j] = dn * r;
        c[j] = dh * z;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_sequence_backward_cpu(
    const c10::optional<at::Tensor>& d_hs_in, const at::Tensor& hs_in, const at::Tensor& gates,
    const at::Tensor& gh, const at::Tensor& h0_in, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& valid_in) {
  const at::Tensor hs = hs_in.transpose(0, 1);  // the forward's (T, B, H) buffer
  TORCH_CHECK(hs.is_contiguous(), "gru_sequence_backward: hs must be gru_sequence's output");
  const int64_t batch = hs.size(1), hidden = hs.size(2);
  const at::Tensor valid = valid_steps(valid_in, hs_in), h0 = h0_in.contiguous();
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const at::Tensor d_hs = time_major(d_hs_in);
  at::Tensor dh = at::zeros({batch, hidden}, hs.options());
  at::Tensor dgi = at::empty_like(gates), dgh = at::empty_like(gates);
  at::Tensor carry = at::empty({batch, hidden}, hs.options());
  for (int64_t t = hs.size(0) - 1; t >= 0; --t) {
    AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "gru_sequence_backward", [&] {
      gru_step_backward<scalar_t>(d_hs, dh, hs, h0, gates, gh, pv, dgi, dgh, carry, t);
    });
    recurrent_gradient(dh, carry, dgh[t], w_hh);
  }
  return {dgi.transpose(0, 1), dgh.transpose(0, 1), dh};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("lstm_sequence", &lstm_sequence_cpu);
  m.impl("lstm_sequence_backward", &lstm_sequence_backward_cpu);
  m.impl("rnn_sequence", &rnn_sequence_cpu);
  m.impl("rnn_sequence_backward", &rnn_sequence_backward_cpu);
  m.impl("gru_sequence", &gru_sequence_cpu);
  m.impl("gru_sequence_backward", &gru_sequence_backward_cpu);
}

}  // namespace dpfast
