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
// state's gradients pass through. The per-step GEMMs and transcendental functions go through
// ATen (vectorised, its threads); the gate arithmetic is one fused loop per step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/reduce.h"
#include "cpu/vector_clones.h"

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
  at::Tensor batch_first = gates.transpose(0, 1);
  if (b_hh.has_value() && b_hh->defined()) {
    at::add_out(batch_first, gi, *b_hh);
  } else {
    batch_first.copy_(gi);
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

// c = f c_prev + i g for one example (gates i, f, g, o of width hidden each); with two_c (the
// by_sigmoid form) g is first turned from sigmoid(2 x) into tanh(x) and two_c gets 2 c.
template <typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_row_cell(scalar_t* __restrict__ g,
                                        const scalar_t* __restrict__ c_prev,
                                        scalar_t* __restrict__ c, scalar_t* __restrict__ two_c,
                                        int64_t hidden) {
  if (two_c) {
    for (int64_t j = 0; j < hidden; ++j) g[2 * hidden + j] = scalar_t(2) * g[2 * hidden + j] - scalar_t(1);
  }
  for (int64_t j = 0; j < hidden; ++j) c[j] = g[hidden + j] * c_prev[j] + g[j] * g[2 * hidden + j];
  if (two_c) {
    for (int64_t j = 0; j < hidden; ++j) two_c[j] = scalar_t(2) * c[j];
  }
}

// h = o tanh(c) for one example; by_sigmoid: tc holds sigmoid(2 c), first turned into tanh(c).
template <typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_row_hidden(const scalar_t* __restrict__ o,
                                          scalar_t* __restrict__ tc, scalar_t* __restrict__ h,
                                          bool by_sigmoid, int64_t hidden) {
  if (by_sigmoid) {
    for (int64_t j = 0; j < hidden; ++j) tc[j] = scalar_t(2) * tc[j] - scalar_t(1);
  }
  for (int64_t j = 0; j < hidden; ++j) h[j] = o[j] * tc[j];
}

// c_t = f c_{t-1} + i g (c_t = c_{t-1} at a padded step) from step t's activated gates. With
// by_sigmoid (see lstm_sequence_cpu) the g gates hold sigmoid(2 x) and are first turned into
// tanh(x) = 2 sigmoid(2 x) - 1, and tanh_cells[t] gets 2 c_t (to go through a sigmoid too).
template <typename scalar_t>
void lstm_cells(at::Tensor& gates, at::Tensor& cells, at::Tensor& tanh_cells, const at::Tensor& c0,
                const bool* valid, bool by_sigmoid, int64_t t) {
  const int64_t batch = gates.size(1), hidden = cells.size(2);
  scalar_t* pg = gates.data_ptr<scalar_t>();
  scalar_t *pc = cells.data_ptr<scalar_t>(), *ptc = by_sigmoid ? tanh_cells.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pc0 = c0.data_ptr<scalar_t>();
  at::parallel_for(0, batch, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      scalar_t* g = pg + row * 4 * hidden;
      const scalar_t* c_prev = t ? pc + (row - batch) * hidden : pc0 + b * hidden;
      scalar_t* c = pc + row * hidden;
      if (valid && !valid[row]) {
        for (int64_t j = 0; j < hidden; ++j) c[j] = c_prev[j];
        continue;
      }
      lstm_row_cell(g, c_prev, c, by_sigmoid ? ptc + row * hidden : nullptr, hidden);
    }
  });
}

// h_t = o tanh(c_t) (h_t = h_{t-1} at a padded step); with by_sigmoid, tanh_cells[t] holds
// sigmoid(2 c_t) and is first turned into tanh(c_t).
template <typename scalar_t>
void lstm_hidden(const at::Tensor& gates, at::Tensor& tanh_cells, at::Tensor& hs,
                 const at::Tensor& h0, const bool* valid, bool by_sigmoid, int64_t t) {
  const int64_t batch = gates.size(1), hidden = hs.size(2);
  const scalar_t* pg = gates.data_ptr<scalar_t>();
  scalar_t* ptc = tanh_cells.data_ptr<scalar_t>();
  scalar_t* ph = hs.data_ptr<scalar_t>();
  const scalar_t* ph0 = h0.data_ptr<scalar_t>();
  at::parallel_for(0, batch, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      scalar_t* h = ph + row * hidden;
      if (valid && !valid[row]) {
        const scalar_t* h_prev = t ? h - batch * hidden : ph0 + b * hidden;
        for (int64_t j = 0; j < hidden; ++j) h[j] = h_prev[j];
        continue;
      }
      lstm_row_hidden(pg + row * 4 * hidden + 3 * hidden, ptc + row * hidden, h, by_sigmoid,
                      hidden);
    }
  });
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
  const int64_t steps = gi.size(1), hidden = h0.size(1);
  at::Tensor gates = gate_buffer(gi, b_hh);
  at::Tensor hs = at::empty({steps, gi.size(0), hidden}, gi.options());
  at::Tensor cells = at::empty_like(hs), tanh_cells = at::empty_like(hs);
  // float32: tanh(x) = 2 sigmoid(2 x) - 1 (ATen's vectorised sigmoid is about 5x faster than
  // its tanh; absolute error ~1e-7), the g rows of W_hh and gi + b_hh doubled once. float64
  // keeps tanh.
  const bool by_sigmoid = gi.scalar_type() == at::kFloat;
  at::Tensor w = w_hh;
  if (by_sigmoid) {
    w = w_hh.clone();
    w.narrow(0, 2 * hidden, hidden).mul_(2);
    gates.narrow(2, 2 * hidden, hidden).mul_(2);
  }
  const at::Tensor w_t = w.t();
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor g = gates[t];  // (B, 4H): i, f, g, o
    g.addmm_(t ? hs[t - 1] : h0, w_t);
    at::Tensor tanh_now = tanh_cells[t];
    if (by_sigmoid) {
      g.sigmoid_();
    } else {
      g.narrow(1, 0, 2 * hidden).sigmoid_();
      g.narrow(1, 2 * hidden, hidden).tanh_();
      g.narrow(1, 3 * hidden, hidden).sigmoid_();
    }
    AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "lstm_sequence", [&] {
      lstm_cells<scalar_t>(gates, cells, tanh_cells, c0, pv, by_sigmoid, t);
      if (by_sigmoid) {
        tanh_now.sigmoid_();
      } else {
        at::tanh_out(tanh_now, cells[t]);
      }
      lstm_hidden<scalar_t>(gates, tanh_cells, hs, h0, pv, by_sigmoid, t);
    });
  }
  return {hs.transpose(0, 1), gates, cells, tanh_cells};
}

// One example's gate pre-activation gradients at one step, from dh = dh_rec (+ out_grad with
// kOut), the activated gates g (4H), tanh(c_t) and c_{t-1}; dc updated in place to the
// gradient of c_{t-1}.
template <bool kOut, typename scalar_t>
DPFAST_VECTOR_CLONES void lstm_row_backward(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ tc,
    const scalar_t* __restrict__ c_prev, const scalar_t* __restrict__ dh_rec,
    const scalar_t* __restrict__ out_grad, scalar_t* __restrict__ dc, scalar_t* __restrict__ d,
    int64_t hidden) {
  const scalar_t one(1);
  for (int64_t j = 0; j < hidden; ++j) {
    const scalar_t dh = kOut ? dh_rec[j] + out_grad[j] : dh_rec[j];
    const scalar_t i = g[j], f = g[hidden + j], gg = g[2 * hidden + j], o = g[3 * hidden + j];
    const scalar_t dcc = dc[j] + dh * o * (one - tc[j] * tc[j]);
    d[j] = dcc * gg * i * (one - i);
    d[hidden + j] = dcc * c_prev[j] * f * (one - f);
    d[2 * hidden + j] = dcc * i * (one - gg * gg);
    d[3 * hidden + j] = dh * tc[j] * o * (one - o);
    dc[j] = dcc * f;
  }
}

// One step back: the gate pre-activation gradients of step t, dc (B, H) updated to the
// gradient of c_{t-1}; carry[b] = dh[b] at a padded step (its state passed through), else 0.
template <typename scalar_t>
void lstm_step_backward(const at::Tensor& d_hs, const at::Tensor& dh_next, at::Tensor& dc,
                        const at::Tensor& gates, const at::Tensor& cells,
                        const at::Tensor& tanh_cells, const at::Tensor& c0, const bool* valid,
                        at::Tensor& dgates, at::Tensor& carry, int64_t t) {
  const int64_t batch = gates.size(1), hidden = cells.size(2);
  const scalar_t* pdo = d_hs.defined() ? d_hs.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pdh = dh_next.data_ptr<scalar_t>();
  scalar_t* pdc = dc.data_ptr<scalar_t>();
  const scalar_t *pg = gates.data_ptr<scalar_t>(), *pc = cells.data_ptr<scalar_t>();
  const scalar_t *ptc = tanh_cells.data_ptr<scalar_t>(), *pc0 = c0.data_ptr<scalar_t>();
  scalar_t* pd = dgates.data_ptr<scalar_t>();
  scalar_t* pcarry = carry.defined() ? carry.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, batch, row_grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = t * batch + b;
      const scalar_t* out_grad = pdo ? pdo + row * hidden : nullptr;
      const scalar_t* dh_rec = pdh + b * hidden;
      scalar_t* d = pd + row * 4 * hidden;
      if (valid && !valid[row]) {
        for (int64_t j = 0; j < 4 * hidden; ++j) d[j] = scalar_t(0);
        for (int64_t j = 0; j < hidden; ++j) {
          pcarry[b * hidden + j] = dh_rec[j] + (out_grad ? out_grad[j] : scalar_t(0));
        }
        continue;
      }
      if (pcarry) {
        for (int64_t j = 0; j < hidden; ++j) pcarry[b * hidden + j] = scalar_t(0);
      }
      const scalar_t* g = pg + row * 4 * hidden;
      const scalar_t* tc = ptc + row * hidden;
      const scalar_t* c_prev = t ? pc + (row - batch) * hidden : pc0 + b * hidden;
      if (out_grad) {
        lstm_row_backward<true>(g, tc, c_prev, dh_rec, out_grad, pdc + b * hidden, d, hidden);
      } else {
        lstm_row_backward<false>(g, tc, c_prev, dh_rec, out_grad, pdc + b * hidden, d, hidden);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_sequence_backward_cpu(
    const c10::optional<at::Tensor>& d_hs_in, const c10::optional<at::Tensor>& dc_n,
    const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& tanh_cells,
    const at::Tensor& c0_in, const at::Tensor& w_hh, const c10::optional<at::Tensor>& valid_in) {
  const int64_t steps = gates.size(0), batch = gates.size(1), hidden = cells.size(2);
  const at::Tensor valid = valid_steps(valid_in, gates.transpose(0, 1)), c0 = c0_in.contiguous();
  const bool* pv = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  const at::Tensor d_hs = time_major(d_hs_in);
  at::Tensor dc = (dc_n.has_value() && dc_n->defined()) ? dc_n->contiguous().clone()
                                                        : at::zeros({batch, hidden}, cells.options());
  at::Tensor dh = at::zeros({batch, hidden}, cells.options());
  at::Tensor dgates = at::empty_like(gates);
  at::Tensor carry = pv ? at::empty({batch, hidden}, cells.options()) : at::Tensor();
  for (int64_t t = steps - 1; t >= 0; --t) {
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_sequence_backward", [&] {
      lstm_step_backward<scalar_t>(d_hs, dh, dc, gates, cells, tanh_cells, c0, pv, dgates,
                                   carry, t);
    });
    recurrent_gradient(dh, carry, dgates[t], w_hh);
  }
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
