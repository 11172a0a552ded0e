// CPU twin of the fused augmentation kernel (parallelized with at::parallel_for, which runs on
// ATen's OpenMP pool) and the pybind11 bindings. See augment.h for the contract.
#include "augment.h"

#include <ATen/Parallel.h>

#include <vector>

namespace mam2 {

void check_inputs(const at::Tensor& src, const at::Tensor& params, const at::Tensor& scale,
                  const at::Tensor& bias, const at::Tensor& out) {
  TORCH_CHECK(src.scalar_type() == at::kByte && src.dim() == 5 && src.size(4) == 3,
              "augment: src must be uint8 [N,T,H,W,3]");
  TORCH_CHECK(src.is_contiguous(), "augment: src must be contiguous");
  TORCH_CHECK(params.scalar_type() == at::kInt && params.dim() == 2 && params.size(1) == 7,
              "augment: params must be int32 [M,7]");
  TORCH_CHECK(out.dim() == 5 && out.size(2) == 3 && out.size(1) == src.size(1),
              "augment: out must be [B,T,3,H,W] with the frames' T");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "augment: out must be float32 or bfloat16");
  TORCH_CHECK(out.is_contiguous(), "augment: out must be contiguous");
  TORCH_CHECK(scale.numel() == 3 && bias.numel() == 3 && scale.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "augment: scale/bias must be float32 [3]");
  for (const auto* t : {&params, &scale, &bias, &out})
    TORCH_CHECK(t->device() == src.device(), "augment: all tensors must be on ", src.device());
}

template <typename out_t>
static void run_cpu(const at::Tensor& src, const at::Tensor& params, const float* scale,
                    const float* bias, at::Tensor& out) {
  const int64_t T = src.size(1), H = src.size(2), W = src.size(3);
  const int64_t OH = out.size(3), OW = out.size(4), M = params.size(0);
  const uint8_t* in = src.data_ptr<uint8_t>();
  const int32_t* p = params.data_ptr<int32_t>();
  out_t* dst_base = out.data_ptr<out_t>();

  // one work item = one output row (m, t, oy)
  at::parallel_for(0, M * T * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<Tap> xt;
    int64_t cached_m = -1;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / (T * OH), t = (i / OH) % T, oy = i % OH;
      const int32_t* q = p + m * 7;
      const int64_t s = q[0], d = q[1], x0 = q[2], y0 = q[3], cw = q[4], ch = q[5];
      const bool flip = q[6] != 0;
      if (m != cached_m) {  // column taps of this clip (flip folded in)
        xt.resize(OW);
        for (int64_t ox = 0; ox < OW; ++ox) xt[ox] = make_tap(flip ? OW - 1 - ox : ox, cw, OW);
        cached_m = m;
      }
      const Tap yt = make_tap(static_cast<int>(oy), ch, OH);
      const uint8_t* frame = in + ((s * T + t) * H) * W * 3;
      const uint8_t* r0 = frame + ((y0 + yt.lo) * W + x0) * 3;
      const uint8_t* r1 = frame + ((y0 + yt.hi) * W + x0) * 3;
      out_t* o = dst_base + ((d * T + t) * 3) * OH * OW + oy * OW;
      for (int64_t ox = 0; ox < OW; ++ox) {
        const Tap& x = xt[ox];
        for (int c = 0; c < 3; ++c) {
          const float v00 = r0[x.lo * 3 + c], v01 = r0[x.hi * 3 + c];
          const float v10 = r1[x.lo * 3 + c], v11 = r1[x.hi * 3 + c];
          const float v = yt.w_lo * (x.w_lo * v00 + x.w_hi * v01) +
                          yt.w_hi * (x.w_lo * v10 + x.w_hi * v11);
          o[c * OH * OW + ox] = static_cast<out_t>(v * scale[c] + bias[c]);
        }
      }
    }
  });
}

void crop_resize_normalize_cpu(const at::Tensor& src, const at::Tensor& params,
                               const at::Tensor& scale, const at::Tensor& bias, at::Tensor& out) {
  const float* sc = scale.data_ptr<float>();
  const float* bi = bias.data_ptr<float>();
  if (out.scalar_type() == at::kFloat)
    run_cpu<float>(src, params, sc, bi, out);
  else
    run_cpu<at::BFloat16>(src, params, sc, bi, out);
}

static void crop_resize_normalize(const at::Tensor& src, const at::Tensor& params,
                                  const at::Tensor& scale, const at::Tensor& bias, at::Tensor out) {
  check_inputs(src, params, scale, bias, out);
  if (params.size(0) == 0) return;
  if (src.is_cuda()) {
#ifdef WITH_CUDA
    crop_resize_normalize_cuda(src, params, scale, bias, out);
#else
    TORCH_CHECK(false, "augment: extension built without CUDA");
#endif
  } else {
    crop_resize_normalize_cpu(src, params, scale, bias, out);
  }
}

static bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mam2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mam2_fast fused video augmentation (crop + flip + bilinear resize + normalize)";
  m.def("crop_resize_normalize", &mam2::crop_resize_normalize, "Fill out[B,T,3,S,S] from uint8 frames",
        py::arg("src"), py::arg("params"), py::arg("scale"), py::arg("bias"), py::arg("out"));
  m.def("has_cuda", &mam2::has_cuda, "Whether the CUDA kernel was compiled in");
}
