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
//   rnn_sequence(_backward)  h_t = act(gi_t + b_hh + W_hh h_{t-1}), act tanh or relu.
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

// c_t = f c_{t-1} + i g (c_t = c_{t-1} at a padded step) from step t's activated gates. With
// by_sigmoid (see lstm_sequence_cpu) the g gates hold sigmoid(2 x) and are first turned into
// tanh(x) = 2 sigmoid(2 x) - 1, and tanh_cells[t] gets 2 c_t (to go through a sigmoid too).
template <typename scalar_t>
void lstm_cells(at::Tensor& gates, at::Tensor& cells, at::Tensor& tanh_cells, const at::Tensor& c0,
                const bool* valid, bool by_sigmoid, int64_t t) {
  const int64_t batch = gates.size(1), hidden = cells.size(2);
  scalar_t* pg = gates.data_ptr<scalar_t>();
  scalar_t *pc = cells.data_ptr<scalar_t>(), *ptc = tanh_cells.data_ptr<scalar_t>();
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
      if (by_sigmoid) {
        scalar_t* gg = g + 2 * hidden;
        for (int64_t j = 0; j < hidden; ++j) gg[j] = scalar_t(2) * gg[j] - scalar_t(1);
      }
      for (int64_t j = 0; j < hidden; ++j) {
        c[j] = g[hidden + j] * c_prev[j] + g[j] * g[2 * hidden + j];
      }
      if (by_sigmoid) {
        scalar_t* two_c = ptc + row * hidden;
        for (int64_t j = 0; j < hidden; ++j) two_c[j] = scalar_t(2) * c[j];
      }
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
      const scalar_t* o = pg + row * 4 * hidden + 3 * hidden;
      scalar_t* tc = ptc + row * hidden;
      if (by_sigmoid) {
        for (int64_t j = 0; j < hidden; ++j) tc[j] = scalar_t(2) * tc[j] - scalar_t(1);
      }
      for (int64_t j = 0; j < hidden; ++j) h[j] = o[j] * tc[j];
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
      scalar_t* dcb = pdc + b * hidden;
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
      for (int64_t j = 0; j < hidden; ++j) {
        const scalar_t dh = dh_rec[j] + (out_grad ? out_grad[j] : scalar_t(0));
        const scalar_t i = g[j], f = g[hidden + j], gg = g[2 * hidden + j], o = g[3 * hidden + j];
        const scalar_t dcc = dcb[j] + dh * o * (scalar_t(1) - tc[j] * tc[j]);
        d[j] = dcc * gg * i * (scalar_t(1) - i);
        d[hidden + j] = dcc * c_prev[j] * f * (scalar_t(1) - f);
        d[2 * hidden + j] = dcc * i * (scalar_t(1) - gg * gg);
        d[3 * hidden + j] = dh * tc[j] * o * (scalar_t(1) - o);
        dcb[j] = dcc * f;
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

}  // namespace

TORCH_LIBRARY_IMPL(dpfast_C, CPU, m) {
  m.impl("lstm_sequence", &lstm_sequence_cpu);
  m.impl("lstm_sequence_backward", &lstm_sequence_backward_cpu);
  m.impl("rnn_sequence", &rnn_sequence_cpu);
  m.impl("rnn_sequence_backward", &rnn_sequence_backward_cpu);
}

}  // namespace dpfast
