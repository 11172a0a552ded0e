// Fused video augmentation: per output clip, crop box + optional horizontal flip +
// bilinear resize (F.interpolate, align_corners=False semantics on the crop) + mean/std.
//
//   src    uint8   [N, T, H, W, 3]   decoded frames, channels last, contiguous
//   params int32   [M, 7]            (src, dst, x0, y0, w, h, flip) per output clip
//   scale  float32 [3]               1 / (255 * std)
//   bias   float32 [3]               -mean / std
//   out    float32 | bfloat16 [B, T, 3, S_h, S_w], contiguous; rows dst[m] are written
#pragma once

#include <torch/extension.h>

namespace mam2 {

// Source coordinate of output pixel `o` for a bilinear resize from `in` to `out` samples,
// exactly as ATen's area_pixel_compute_source_index (align_corners=false, linear modes).
struct Tap {
  int lo, hi;
  float w_lo, w_hi;
};

#ifdef __CUDACC__
__host__ __device__
#endif
inline Tap make_tap(int o, int in, int out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  float s = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  s = s < 0.f ? 0.f : s;
  Tap t;
  t.lo = static_cast<int>(s);
  t.hi = t.lo + (t.lo < in - 1 ? 1 : 0);
  t.w_hi = s - static_cast<float>(t.lo);
  t.w_lo = 1.f - t.w_hi;
  return t;
}

void check_inputs(const at::Tensor& src, const at::Tensor& params, const at::Tensor& scale,
                  const at::Tensor& bias, const at::Tensor& out);

void crop_resize_normalize_cpu(const at::Tensor& src, const at::Tensor& params,
                               const at::Tensor& scale, const at::Tensor& bias, at::Tensor& out);

#ifdef WITH_CUDA
void crop_resize_normalize_cuda(const at::Tensor& src, const at::Tensor& params,
                                const at::Tensor& scale, const at::Tensor& bias, at::Tensor& out);
#endif

}  // namespace mam2
