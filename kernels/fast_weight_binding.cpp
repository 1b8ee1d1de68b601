// Torch glue for the fast-weight kernels: checks tensors, allocates outputs, passes pointers and sizes.
//
// Includes no CUDA header: the launchers in fast_weight_*.cu take a plain `void*` stream, which the Python
// side passes as an integer (torch.cuda.current_stream().cuda_stream) under the inputs' device guard. So
// this file also compiles against a CPU-only torch (tests/ops/test_cuda.py checks that).
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "binding_common.h"
#include "fast_weight.h"

namespace {

using lmtool_binding::check_cuda;
using lmtool_binding::dtype_code;
using lmtool_binding::poison;
using lmtool_fw::Strides;

// [B, H, L, D] with unit stride along D (a copy otherwise): strides of B, H and L in elements.
at::Tensor rows_contiguous(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

Strides strides_of(const at::Tensor& x) {
  Strides s;
  s.b = x.stride(0);
  s.h = x.stride(1);
  s.t = x.stride(2);
  return s;
}

at::Tensor float_state(const std::optional<at::Tensor>& s, const char* name, const at::Tensor& like) {
  TORCH_CHECK(s.has_value() && s->defined(), "lmtool fast-weight kernels: missing ", name);
  check_cuda(*s, name, like);
  return s->to(at::kFloat).contiguous();
}

// The optional per-token log-decay g [B, H, L] as float32 (its strides go to the kernels); undefined when absent.
at::Tensor log_decay(const std::optional<at::Tensor>& g, const at::Tensor& like, int64_t B, int64_t H, int64_t L) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  check_cuda(*g, "g", like);
  TORCH_CHECK(g->dim() == 3 && g->size(0) == B && g->size(1) == H && g->size(2) == L, "g must be [B, H, L]");
  return g->to(at::kFloat);
}

void check_status(int status) {
  TORCH_CHECK(status == 0, "lmtool fast-weight kernel failed: ", lmtool_fw::error_string(status));
}

// The fields ForwardArgs and BackwardArgs share: dtype, rule, sizes (B, H, L, Dk from q), scale, q and k.
template <class Args>
void set_problem(Args& a, const at::Tensor& q, const at::Tensor& k, bool delta, int64_t Dv, double scale) {
  a.dtype = dtype_code(q);
  a.delta = delta;
  a.B = static_cast<int>(q.size(0));
  a.H = static_cast<int>(q.size(1));
  a.L = static_cast<int>(q.size(2));
  a.Dk = static_cast<int>(q.size(3));
  a.Dv = static_cast<int>(Dv);
  a.scale = static_cast<float>(scale);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.sq = strides_of(q);
  a.sk = strides_of(k);
}

// Returns [out, final_state, resid, ckpt]; resid and ckpt are empty unless `save` (resid: delta rule only).
// `g` (optional) is the per-token log-decay; None runs the kernels without decay.
std::vector<at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const std::optional<at::Tensor>& beta_in, const std::optional<at::Tensor>& g_in,
                                const std::optional<at::Tensor>& initial_state, double scale, int64_t ckpt_every,
                                bool save, bool debug_poison, int64_t stream, int64_t warps, bool vectorize) {
  const bool delta = beta_in.has_value() && beta_in->defined();
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.dim() == 4, "bad q/k/v shapes");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "q, k and v must have one dtype");
  TORCH_CHECK(ckpt_every >= 1, "ckpt_every must be positive");
  check_cuda(q_in, "q", q_in);
  check_cuda(k_in, "k", q_in);
  check_cuda(v_in, "v", q_in);
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Dk = q.size(3), Dv = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must be [B, H, L, Dv]");
  TORCH_CHECK(Dk <= lmtool_fw::kMaxDk, "the CUDA kernels support Dk <= ", lmtool_fw::kMaxDk, ", got ", Dk);
  TORCH_CHECK(L <= std::numeric_limits<int>::max() && B * H <= std::numeric_limits<int>::max(), "too large");

  lmtool_fw::ForwardArgs a;
  set_problem(a, q, k, delta, Dv, scale);
  a.v = v.data_ptr();
  a.sv = strides_of(v);
  at::Tensor beta;
  if (delta) {
    check_cuda(*beta_in, "beta", q);
    TORCH_CHECK(beta_in->dim() == 3 && beta_in->size(0) == B && beta_in->size(1) == H && beta_in->size(2) == L,
                "beta must be [B, H, L]");
    beta = beta_in->to(at::kFloat);
    a.beta = beta.data_ptr<float>();
    a.sbeta.b = beta.stride(0);
    a.sbeta.h = beta.stride(1);
    a.sbeta.t = beta.stride(2);
  }
  const at::Tensor g = log_decay(g_in, q, B, H, L);
  if (g.defined()) {
    a.g = g.data_ptr<float>();
    a.sg = strides_of(g);
  }
  at::Tensor s0;
  if (initial_state.has_value() && initial_state->defined()) {
    s0 = float_state(initial_state, "initial_state", q);
    TORCH_CHECK(s0.sizes() == at::IntArrayRef({B, H, Dk, Dv}), "initial_state must be [B, H, Dk, Dv]");
    a.initial_state = s0.data_ptr<float>();
  }
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, H, L, Dv}, q.options());
  at::Tensor final_state = at::empty({B, H, Dk, Dv}, f32);
  const int n_ckpt = lmtool_fw::num_checkpoints(a.L, static_cast<int>(ckpt_every));
  at::Tensor resid = at::empty({0}, f32), ckpt = at::empty({0}, f32);
  if (save && delta) resid = at::empty({B, H, L, Dv}, f32);
  if (save && n_ckpt > 0) ckpt = at::empty({B, H, n_ckpt, Dv, Dk}, f32);
  poison({out, final_state, resid, ckpt}, debug_poison);
  a.out = out.data_ptr();
  a.final_state = final_state.data_ptr<float>();
  a.resid = resid.numel() > 0 ? resid.data_ptr<float>() : nullptr;
  a.ckpt = ckpt.numel() > 0 ? ckpt.data_ptr<float>() : nullptr;
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.layout.warps = static_cast<int>(warps);
  a.layout.vectorize = vectorize;
  check_status(lmtool_fw::forward(a, reinterpret_cast<void*>(stream)));
  return {out, final_state, resid, ckpt};
}

// Returns [dq, dk, dv, dbeta, d_initial_state, dg]: dq, dk, dbeta, dg float32 (summed over column tiles), dv in
// the inputs' dtype, dbeta empty for the sum rule, dg empty without g. `x` is the residual r (delta rule) or v
// (sum rule). `initial_state` is the forward's (None: zeros); the backward recomputes S from it after a NaN or
// inf, and with g for every checkpoint segment (into a scratch of min(C, L) states per sequence).
std::vector<at::Tensor> backward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& x_in,
                                 const std::optional<at::Tensor>& beta_in, const std::optional<at::Tensor>& g_in,
                                 const at::Tensor& dout_in,
                                 const std::optional<at::Tensor>& initial_state,
                                 const at::Tensor& final_state_in, const std::optional<at::Tensor>& d_final_state,
                                 const at::Tensor& ckpt, double scale, int64_t ckpt_every, bool debug_poison,
                                 int64_t stream, int64_t warps, int64_t flush, bool vectorize) {
  const bool delta = beta_in.has_value() && beta_in->defined();
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), dout = rows_contiguous(dout_in);
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(x_in, delta ? "resid" : "v", q);
  check_cuda(dout, "dout", q);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == dout.scalar_type(),
              "q, k and the output gradient must have one dtype");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Dk = q.size(3), Dv = dout.size(3);
  TORCH_CHECK(Dk <= lmtool_fw::kMaxDk, "the CUDA kernels support Dk <= ", lmtool_fw::kMaxDk, ", got ", Dk);
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(2) == L && x_in.size(3) == Dv, "bad resid/v shape");
  const at::Tensor final_state = float_state(final_state_in, "final_state", q);

  lmtool_fw::BackwardArgs a;
  set_problem(a, q, k, delta, Dv, scale);
  a.dout = dout.data_ptr();
  a.sdout = strides_of(dout);
  a.final_state = final_state.data_ptr<float>();
  at::Tensor x, beta;
  if (delta) {
    x = x_in.to(at::kFloat).contiguous();
    a.resid = x.data_ptr<float>();
    check_cuda(*beta_in, "beta", q);
    beta = beta_in->to(at::kFloat);
    a.beta = beta.data_ptr<float>();
    a.sbeta.b = beta.stride(0);
    a.sbeta.h = beta.stride(1);
    a.sbeta.t = beta.stride(2);
  } else {
    TORCH_CHECK(x_in.scalar_type() == q.scalar_type(), "v must have q's dtype");
    x = rows_contiguous(x_in);
    a.v = x.data_ptr();
    a.sv = strides_of(x);
  }
  const at::Tensor g = log_decay(g_in, q, B, H, L);
  if (g.defined()) {
    a.g = g.data_ptr<float>();
    a.sg = strides_of(g);
  }
  at::Tensor s0;
  if (initial_state.has_value() && initial_state->defined()) {
    s0 = float_state(initial_state, "initial_state", q);
    TORCH_CHECK(s0.sizes() == at::IntArrayRef({B, H, Dk, Dv}), "initial_state must be [B, H, Dk, Dv]");
    a.initial_state = s0.data_ptr<float>();
  }
  at::Tensor dsL;
  if (d_final_state.has_value() && d_final_state->defined()) {
    dsL = float_state(d_final_state, "d_final_state", q);
    a.d_final_state = dsL.data_ptr<float>();
  }
  const int n_ckpt = lmtool_fw::num_checkpoints(a.L, static_cast<int>(ckpt_every));
  at::Tensor ck;
  if (n_ckpt > 0) {
    check_cuda(ckpt, "ckpt", q);
    TORCH_CHECK(ckpt.numel() == B * H * n_ckpt * Dv * Dk, "the checkpoints do not match the sizes");
    ck = ckpt.to(at::kFloat).contiguous();
    a.ckpt = ck.data_ptr<float>();
  }
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.layout.warps = static_cast<int>(warps);
  a.layout.flush = static_cast<int>(flush);
  a.layout.vectorize = vectorize;

  const bool decay = g.defined();
  const int64_t tiles = lmtool_fw::backward_tiles(a);
  const auto f32 = q.options().dtype(at::kFloat);
  // The column tiles add their sums in place, in tile order (tile_done keeps the order): no buffer per tile.
  at::Tensor dq = at::empty({B, H, L, Dk}, f32), dk = at::empty({B, H, L, Dk}, f32);
  at::Tensor dbeta = delta ? at::empty({B, H, L}, f32) : at::empty({0}, f32);
  at::Tensor dg = decay ? at::empty({B, H, L}, f32) : at::empty({0}, f32);
  at::Tensor tile_done = at::zeros({tiles > 1 ? B * H * tiles : 0}, q.options().dtype(at::kInt));
  const int64_t per_sequence = decay ? lmtool_fw::backward_scratch_per_sequence(a) : 0;
  at::Tensor scratch = at::empty({B * H * per_sequence}, f32);  // freed when the backward returns
  at::Tensor dv = at::empty({B, H, L, Dv}, q.options());
  at::Tensor ds0 = at::empty({B, H, Dk, Dv}, f32);
  poison({dq, dk, dbeta, dg, scratch, dv, ds0}, debug_poison);
  a.dq = dq.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dbeta = delta ? dbeta.data_ptr<float>() : nullptr;
  a.dg = decay ? dg.data_ptr<float>() : nullptr;
  a.tile_done = tiles > 1 ? tile_done.data_ptr<int>() : nullptr;
  a.scratch = decay ? scratch.data_ptr<float>() : nullptr;
  a.dv = dv.data_ptr();
  a.d_initial_state = ds0.data_ptr<float>();
  check_status(lmtool_fw::backward(a, reinterpret_cast<void*>(stream)));
  return {dq, dk, dv, dbeta, ds0, dg};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmtool fast-weight (sum and delta rule) CUDA kernels";
  // warps, flush, vectorize: block layout overrides (0 / true: the launchers' choice), for tests of several layouts
  m.def("forward", &forward, "scan forward", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("beta"), py::arg("g"),
        py::arg("initial_state"), py::arg("scale"), py::arg("ckpt_every"), py::arg("save"), py::arg("poison"),
        py::arg("stream"), py::arg("warps") = 0, py::arg("vectorize") = true);
  m.def("backward", &backward, "reverse-scan backward", py::arg("q"), py::arg("k"), py::arg("x"), py::arg("beta"),
        py::arg("g"), py::arg("dout"), py::arg("initial_state"), py::arg("final_state"), py::arg("d_final_state"),
        py::arg("ckpt"), py::arg("scale"), py::arg("ckpt_every"), py::arg("poison"), py::arg("stream"),
        py::arg("warps") = 0, py::arg("flush") = 0, py::arg("vectorize") = true);
  m.def(
      "backward_tiles",
      [](int64_t Dk, int64_t Dv, bool decay) {
        lmtool_fw::BackwardArgs a;
        a.Dk = static_cast<int>(Dk);
        a.Dv = static_cast<int>(Dv);
        a.g = decay ? reinterpret_cast<const float*>(&a) : nullptr;  // any non-null pointer: the layout with g
        return lmtool_fw::backward_tiles(a);
      },
      "column tiles (blocks per sequence) of the backward", py::arg("Dk"), py::arg("Dv"), py::arg("decay") = false);
  m.attr("max_dk") = lmtool_fw::kMaxDk;
}
