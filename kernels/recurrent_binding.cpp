// Torch glue for the recurrent scans (delta_rnn_scan.cu, rec_delta_scan.cu, srwm_scan.cu): checks, contiguous float32 copies
// where needed, allocation of outputs and saved tensors, and the launch. Includes no CUDA header (the stream comes
// as an integer), so it also builds against a CPU-only torch for the tests' emulation.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "binding_common.h"
#include "recurrent_scan.h"

namespace {

using lmtool_binding::check_cuda;
using lmtool_binding::dtype_code;
using lmtool_binding::poison;
using Opt = std::optional<at::Tensor>;

bool given(const Opt& x) { return x.has_value() && x->defined(); }

// A float32 contiguous copy (or the tensor itself) of an input on q's device with the expected sizes.
at::Tensor f32(const at::Tensor& x, const char* name, const at::Tensor& like, at::IntArrayRef sizes) {
  check_cuda(x, name, like);
  TORCH_CHECK(x.sizes() == sizes, "lmtool recurrent kernels: ", name, " must have sizes ", sizes, ", got ", x.sizes());
  return x.to(at::kFloat).contiguous();
}

// `x` in the kernels' input dtype (like `like`), contiguous.
at::Tensor same_dtype(const at::Tensor& x, const char* name, const at::Tensor& like, at::IntArrayRef sizes) {
  check_cuda(x, name, like);
  TORCH_CHECK(x.sizes() == sizes, "lmtool recurrent kernels: ", name, " must have sizes ", sizes, ", got ", x.sizes());
  return x.to(like.scalar_type()).contiguous();
}

const float* ptr_or_null(const at::Tensor& x) { return x.defined() && x.numel() > 0 ? x.data_ptr<float>() : nullptr; }

void check_status(int status) {
  TORCH_CHECK(status == 0, "lmtool recurrent kernel failed: ", lmtool_fw::recurrent_error_string(status));
}

void check_sizes(int64_t B, int64_t H, int64_t L, int64_t D) {
  TORCH_CHECK(D >= 1 && D <= lmtool_fw::kRecMaxD, "the recurrent CUDA kernels support 1 <= d_head <= ",
              lmtool_fw::kRecMaxD, ", got ", D);
  TORCH_CHECK(L >= 1 && L <= std::numeric_limits<int>::max() && B * H <= std::numeric_limits<int>::max(),
              "lmtool recurrent kernels: bad sequence length or batch size");
}

// Delta RNN (c0 absent) or Delta LSTM (c0 given). Returns [y, R, y_last, c_last, resid, pre, cells, ckpt]; the saved
// tensors (resid, pre, cells, ckpt) are empty unless `save`, c_last, pre and cells also for the RNN.
std::vector<at::Tensor> rnn_forward(const at::Tensor& z_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                    const at::Tensor& beta_in, const at::Tensor& R0_in, const at::Tensor& y0_in,
                                    const Opt& c0_in, int64_t ckpt_every, bool save, bool debug_poison,
                                    int64_t stream) {
  const bool lstm = given(c0_in);
  const int64_t gates = lstm ? 3 : 1;
  TORCH_CHECK(z_in.dim() == 4 && y0_in.dim() == 3 && ckpt_every >= 1, "lmtool recurrent kernels: bad z, y0 or C");
  const int64_t B = z_in.size(0), G = z_in.size(1), L = z_in.size(2), D = z_in.size(3), H = y0_in.size(1);
  TORCH_CHECK(G == gates * H, "lmtool recurrent kernels: z must have gates x H sequences per batch element");
  check_sizes(B, H, L, D);
  check_cuda(z_in, "z", z_in);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor k = same_dtype(k_in, "k", z, z.sizes()), v = same_dtype(v_in, "v", z, z.sizes());
  const at::Tensor beta = f32(beta_in, "beta", z, {B, G, L}), R0 = f32(R0_in, "R0", z, {B, G, D, D});
  const at::Tensor y0 = f32(y0_in, "y0", z, {B, H, D});
  const at::Tensor c0 = lstm ? f32(*c0_in, "c0", z, {B, H, D}) : at::Tensor();
  const auto opt = z.options().dtype(at::kFloat);
  const int64_t n_ckpt = lmtool_fw::num_checkpoints(static_cast<int>(L), static_cast<int>(ckpt_every));
  at::Tensor y = at::empty({B, H, L, D}, opt), R = at::empty({B, G, D, D}, opt), y_last = at::empty({B, H, D}, opt);
  at::Tensor c_last = at::empty({lstm ? B : 0, H, D}, opt);
  at::Tensor resid = at::empty({save ? B : 0, G, L, D}, opt), pre = at::empty({save && lstm ? B : 0, G, L, D}, opt);
  at::Tensor cells = at::empty({save && lstm ? B : 0, H, L, D}, opt);
  at::Tensor ckpt = at::empty({save ? B * H * n_ckpt * gates * D * D : 0}, opt);
  poison({y, R, y_last, c_last, resid, pre, cells, ckpt}, debug_poison);

  lmtool_fw::DeltaRNNArgs a;
  a.dtype = dtype_code(z);
  a.gates = static_cast<int>(gates);
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.z = z.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr(), a.beta = beta.data_ptr<float>();
  a.R0 = R0.data_ptr<float>(), a.y0 = y0.data_ptr<float>(), a.c0 = lstm ? c0.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>(), a.R = R.data_ptr<float>(), a.y_last = y_last.data_ptr<float>();
  a.c_last = lstm ? c_last.data_ptr<float>() : nullptr;
  a.resid = save ? resid.data_ptr<float>() : nullptr;
  a.pre = save && lstm ? pre.data_ptr<float>() : nullptr;
  a.cells = save && lstm ? cells.data_ptr<float>() : nullptr;
  a.ckpt = save && n_ckpt > 0 ? ckpt.data_ptr<float>() : nullptr;
  check_status(lmtool_fw::delta_rnn_forward(a, reinterpret_cast<void*>(stream)));
  return {y, R, y_last, c_last, resid, pre, cells, ckpt};
}

// Returns [dz, dk, dv, dbeta, dR0, dy0, dc0] (float32; dc0 empty for the RNN). The final-state gradients may be None.
std::vector<at::Tensor> rnn_backward(const at::Tensor& k_in, const at::Tensor& beta_in, const at::Tensor& resid,
                                     const Opt& pre, const Opt& cells, const at::Tensor& y, const at::Tensor& y0_in,
                                     const Opt& c0_in, const at::Tensor& R, const at::Tensor& ckpt,
                                     const at::Tensor& dy_in, const Opt& dR_in, const Opt& dy_last_in,
                                     const Opt& dc_last_in, int64_t ckpt_every, bool debug_poison, int64_t stream) {
  const bool lstm = given(c0_in);
  const int64_t gates = lstm ? 3 : 1;
  const int64_t B = k_in.size(0), G = k_in.size(1), L = k_in.size(2), D = k_in.size(3), H = G / gates;
  check_sizes(B, H, L, D);
  check_cuda(k_in, "k", k_in);
  const at::Tensor k = k_in.contiguous();
  const at::Tensor beta = f32(beta_in, "beta", k, {B, G, L}), y0 = f32(y0_in, "y0", k, {B, H, D});
  const at::Tensor dy = f32(dy_in, "dy", k, {B, H, L, D});
  const at::Tensor dR = given(dR_in) ? f32(*dR_in, "dR", k, {B, G, D, D}) : at::Tensor();
  const at::Tensor dy_last = given(dy_last_in) ? f32(*dy_last_in, "dy_last", k, {B, H, D}) : at::Tensor();
  const at::Tensor dc_last = given(dc_last_in) ? f32(*dc_last_in, "dc_last", k, {B, H, D}) : at::Tensor();
  const at::Tensor c0 = lstm ? f32(*c0_in, "c0", k, {B, H, D}) : at::Tensor();
  const auto opt = k.options().dtype(at::kFloat);
  at::Tensor dz = at::empty({B, G, L, D}, opt), dk = at::empty({B, G, L, D}, opt), dv = at::empty({B, G, L, D}, opt);
  at::Tensor dbeta = at::empty({B, G, L}, opt), dR0 = at::empty({B, G, D, D}, opt), dy0 = at::empty({B, H, D}, opt);
  at::Tensor dc0 = at::empty({lstm ? B : 0, H, D}, opt);
  poison({dz, dk, dv, dbeta, dR0, dy0, dc0}, debug_poison);

  lmtool_fw::DeltaRNNArgs a;
  a.dtype = dtype_code(k);
  a.gates = static_cast<int>(gates);
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.k = k.data_ptr(), a.beta = beta.data_ptr<float>(), a.y0 = y0.data_ptr<float>();
  a.c0 = lstm ? c0.data_ptr<float>() : nullptr;
  a.resid = resid.data_ptr<float>(), a.y = y.data_ptr<float>(), a.R = R.data_ptr<float>();
  a.pre = lstm ? pre->data_ptr<float>() : nullptr;
  a.cells = lstm ? cells->data_ptr<float>() : nullptr;
  a.ckpt = const_cast<float*>(ptr_or_null(ckpt));
  a.dy = dy.data_ptr<float>(), a.dR = ptr_or_null(dR), a.dy_last = ptr_or_null(dy_last);
  a.dc_last = ptr_or_null(dc_last);
  a.dz = dz.data_ptr<float>(), a.dk = dk.data_ptr<float>(), a.dv = dv.data_ptr<float>();
  a.dbeta = dbeta.data_ptr<float>(), a.dR0 = dR0.data_ptr<float>(), a.dy0 = dy0.data_ptr<float>();
  a.dc0 = lstm ? dc0.data_ptr<float>() : nullptr;
  check_status(lmtool_fw::delta_rnn_backward(a, reinterpret_cast<void*>(stream)));
  return {dz, dk, dv, dbeta, dR0, dy0, dc0};
}

// Recurrent Delta Net. Returns [y, W, y_last, pre, resid, ckpt]; pre, resid and ckpt are empty unless `save`.
std::vector<at::Tensor> rec_forward(const at::Tensor& proj_in, const at::Tensor& rec_in, const at::Tensor& W0_in,
                                    const at::Tensor& y0_in, int64_t ckpt_every, bool save, bool debug_poison,
                                    int64_t stream) {
  TORCH_CHECK(proj_in.dim() == 4 && ckpt_every >= 1, "lmtool recurrent kernels: proj must be [B, H, L, 3 D + 1]");
  const int64_t B = proj_in.size(0), H = proj_in.size(1), L = proj_in.size(2), P = proj_in.size(3), D = (P - 1) / 3;
  TORCH_CHECK(P == 3 * D + 1, "lmtool recurrent kernels: proj's last size must be 3 D + 1, got ", P);
  check_sizes(B, H, L, D);
  check_cuda(proj_in, "proj", proj_in);
  const at::Tensor proj = proj_in.contiguous();
  const at::Tensor rec = f32(rec_in, "rec", proj, {H, D, P}), W0 = f32(W0_in, "W0", proj, {B, H, D, D});
  const at::Tensor y0 = f32(y0_in, "y0", proj, {B, H, D});
  const auto opt = proj.options().dtype(at::kFloat);
  const int64_t n_ckpt = lmtool_fw::num_checkpoints(static_cast<int>(L), static_cast<int>(ckpt_every));
  at::Tensor y = at::empty({B, H, L, D}, opt), W = at::empty({B, H, D, D}, opt), y_last = at::empty({B, H, D}, opt);
  at::Tensor pre = at::empty({save ? B : 0, H, L, P}, opt), resid = at::empty({save ? B : 0, H, L, D}, opt);
  at::Tensor ckpt = at::empty({save ? B * H * n_ckpt * D * D : 0}, opt);
  poison({y, W, y_last, pre, resid, ckpt}, debug_poison);

  lmtool_fw::RecDeltaArgs a;
  a.dtype = dtype_code(proj);
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.proj = proj.data_ptr(), a.rec = rec.data_ptr<float>(), a.W0 = W0.data_ptr<float>(), a.y0 = y0.data_ptr<float>();
  a.y = y.data_ptr<float>(), a.W = W.data_ptr<float>(), a.y_last = y_last.data_ptr<float>();
  a.pre = save ? pre.data_ptr<float>() : nullptr;
  a.resid = save ? resid.data_ptr<float>() : nullptr;
  a.ckpt = save && n_ckpt > 0 ? ckpt.data_ptr<float>() : nullptr;
  check_status(lmtool_fw::rec_delta_forward(a, reinterpret_cast<void*>(stream)));
  return {y, W, y_last, pre, resid, ckpt};
}

// Returns [dproj, drec, dW0, dy0] (float32); drec [H, D, P] is the sum over the batch of the per-sequence shares.
std::vector<at::Tensor> rec_backward(const at::Tensor& rec_in, const at::Tensor& pre, const at::Tensor& resid,
                                     const at::Tensor& y, const at::Tensor& y0_in, const at::Tensor& W,
                                     const at::Tensor& ckpt, const at::Tensor& dy_in, const Opt& dW_in,
                                     const Opt& dy_last_in, int64_t ckpt_every, bool debug_poison, int64_t stream) {
  const int64_t B = pre.size(0), H = pre.size(1), L = pre.size(2), P = pre.size(3), D = (P - 1) / 3;
  check_sizes(B, H, L, D);
  check_cuda(pre, "pre", pre);
  const at::Tensor rec = f32(rec_in, "rec", pre, {H, D, P}), y0 = f32(y0_in, "y0", pre, {B, H, D});
  const at::Tensor dy = f32(dy_in, "dy", pre, {B, H, L, D});
  const at::Tensor dW = given(dW_in) ? f32(*dW_in, "dW", pre, {B, H, D, D}) : at::Tensor();
  const at::Tensor dy_last = given(dy_last_in) ? f32(*dy_last_in, "dy_last", pre, {B, H, D}) : at::Tensor();
  const auto opt = pre.options().dtype(at::kFloat);
  at::Tensor dproj = at::empty({B, H, L, P}, opt), drec = at::empty({B, H, D, P}, opt);
  at::Tensor dW0 = at::empty({B, H, D, D}, opt), dy0 = at::empty({B, H, D}, opt);
  poison({dproj, drec, dW0, dy0}, debug_poison);

  lmtool_fw::RecDeltaArgs a;
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.rec = rec.data_ptr<float>(), a.y0 = y0.data_ptr<float>(), a.y = y.data_ptr<float>(), a.W = W.data_ptr<float>();
  a.pre = pre.data_ptr<float>(), a.resid = resid.data_ptr<float>(), a.ckpt = const_cast<float*>(ptr_or_null(ckpt));
  a.dy = dy.data_ptr<float>(), a.dW = ptr_or_null(dW), a.dy_last = ptr_or_null(dy_last);
  a.dproj = dproj.data_ptr<float>(), a.drec = drec.data_ptr<float>(), a.dW0 = dW0.data_ptr<float>();
  a.dy0 = dy0.data_ptr<float>();
  check_status(lmtool_fw::rec_delta_backward(a, reinterpret_cast<void*>(stream)));
  return {dproj, drec.sum(0), dW0, dy0};
}

// Self-referential weight matrix. Returns [y, W, pre, vd, ckpt]; pre, vd and ckpt are empty unless `save`.
std::vector<at::Tensor> srwm_forward(const at::Tensor& x_in, const at::Tensor& W0_in, int64_t ckpt_every, bool save,
                                     bool debug_poison, int64_t stream) {
  TORCH_CHECK(x_in.dim() == 4 && ckpt_every >= 1, "lmtool recurrent kernels: x must be [B, H, L, D]");
  const int64_t B = x_in.size(0), H = x_in.size(1), L = x_in.size(2), D = x_in.size(3), P = 3 * D + 4;
  check_sizes(B, H, L, D);
  check_cuda(x_in, "x", x_in);
  const at::Tensor x = x_in.contiguous(), W0 = f32(W0_in, "W0", x, {B, H, D, P});
  const auto opt = x.options().dtype(at::kFloat);
  const int64_t n_ckpt = lmtool_fw::num_checkpoints(static_cast<int>(L), static_cast<int>(ckpt_every));
  at::Tensor y = at::empty({B, H, L, D}, opt), W = at::empty({B, H, D, P}, opt);
  at::Tensor pre = at::empty({save ? B : 0, H, L, P}, opt), vd = at::empty({save ? B : 0, H, L, P}, opt);
  at::Tensor ckpt = at::empty({save ? B * H * n_ckpt * D * P : 0}, opt);
  poison({y, W, pre, vd, ckpt}, debug_poison);

  lmtool_fw::SRWMArgs a;
  a.dtype = dtype_code(x);
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.x = x.data_ptr(), a.W0 = W0.data_ptr<float>(), a.y = y.data_ptr<float>(), a.W = W.data_ptr<float>();
  a.pre = save ? pre.data_ptr<float>() : nullptr;
  a.vd = save ? vd.data_ptr<float>() : nullptr;
  a.ckpt = save && n_ckpt > 0 ? ckpt.data_ptr<float>() : nullptr;
  check_status(lmtool_fw::srwm_forward(a, reinterpret_cast<void*>(stream)));
  return {y, W, pre, vd, ckpt};
}

// Returns [dx, dW0] (float32).
std::vector<at::Tensor> srwm_backward(const at::Tensor& x_in, const at::Tensor& pre, const at::Tensor& vd,
                                      const at::Tensor& W, const at::Tensor& ckpt, const at::Tensor& dy_in,
                                      const Opt& dW_in, int64_t ckpt_every, bool debug_poison, int64_t stream) {
  const int64_t B = x_in.size(0), H = x_in.size(1), L = x_in.size(2), D = x_in.size(3), P = 3 * D + 4;
  check_sizes(B, H, L, D);
  check_cuda(x_in, "x", x_in);
  const at::Tensor x = x_in.contiguous(), dy = f32(dy_in, "dy", x, {B, H, L, D});
  const at::Tensor dW = given(dW_in) ? f32(*dW_in, "dW", x, {B, H, D, P}) : at::Tensor();
  const auto opt = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({B, H, L, D}, opt), dW0 = at::empty({B, H, D, P}, opt);
  poison({dx, dW0}, debug_poison);

  lmtool_fw::SRWMArgs a;
  a.dtype = dtype_code(x);
  a.B = static_cast<int>(B), a.H = static_cast<int>(H), a.L = static_cast<int>(L), a.D = static_cast<int>(D);
  a.ckpt_every = static_cast<int>(ckpt_every);
  a.x = x.data_ptr(), a.pre = pre.data_ptr<float>(), a.vd = vd.data_ptr<float>(), a.W = W.data_ptr<float>();
  a.ckpt = const_cast<float*>(ptr_or_null(ckpt));
  a.dy = dy.data_ptr<float>(), a.dW = ptr_or_null(dW), a.dx = dx.data_ptr<float>(), a.dW0 = dW0.data_ptr<float>();
  check_status(lmtool_fw::srwm_backward(a, reinterpret_cast<void*>(stream)));
  return {dx, dW0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmtool CUDA kernels of the recurrent fast weight programmers (Delta RNN and LSTM, Recurrent Delta Net, SRWM)";
  m.def("rnn_forward", &rnn_forward, "Delta RNN / LSTM scan", py::arg("z"), py::arg("k"), py::arg("v"),
        py::arg("beta"), py::arg("R0"), py::arg("y0"), py::arg("c0"), py::arg("ckpt_every"), py::arg("save"),
        py::arg("poison"), py::arg("stream"));
  m.def("rnn_backward", &rnn_backward, "Delta RNN / LSTM reverse scan", py::arg("k"), py::arg("beta"),
        py::arg("resid"), py::arg("pre"), py::arg("cells"), py::arg("y"), py::arg("y0"), py::arg("c0"), py::arg("R"),
        py::arg("ckpt"), py::arg("dy"), py::arg("dR"), py::arg("dy_last"), py::arg("dc_last"), py::arg("ckpt_every"),
        py::arg("poison"), py::arg("stream"));
  m.def("rec_forward", &rec_forward, "Recurrent Delta Net scan", py::arg("proj"), py::arg("rec"), py::arg("W0"),
        py::arg("y0"), py::arg("ckpt_every"), py::arg("save"), py::arg("poison"), py::arg("stream"));
  m.def("rec_backward", &rec_backward, "Recurrent Delta Net reverse scan", py::arg("rec"), py::arg("pre"),
        py::arg("resid"), py::arg("y"), py::arg("y0"), py::arg("W"), py::arg("ckpt"), py::arg("dy"), py::arg("dW"),
        py::arg("dy_last"), py::arg("ckpt_every"), py::arg("poison"), py::arg("stream"));
  m.def("srwm_forward", &srwm_forward, "self-referential weight matrix scan", py::arg("x"), py::arg("W0"),
        py::arg("ckpt_every"), py::arg("save"), py::arg("poison"), py::arg("stream"));
  m.def("srwm_backward", &srwm_backward, "self-referential weight matrix reverse scan", py::arg("x"), py::arg("pre"),
        py::arg("vd"), py::arg("W"), py::arg("ckpt"), py::arg("dy"), py::arg("dW"), py::arg("ckpt_every"),
        py::arg("poison"), py::arg("stream"));
  m.attr("max_d") = lmtool_fw::kRecMaxD;
}
