// CPU inference kernels for UnSAM (float32, contiguous inputs, no autograd).
//
// ms_deform_attn_forward: multi-scale deformable attention with the arithmetic of the
//   pure-PyTorch path (grid_sample bilinear, zeros outside, x attention weight, summed over
//   points then levels), in one pass with no (N*M, D, Lq, P) intermediate.
// resize_threshold: bilinear resize (align_corners=False, as torch's upsample_bilinear2d),
//   crop to the top-left (out_h, out_w), and "> 0" straight into a bool tensor, so the float
//   full-resolution masks are never materialized.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check_cpu_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat, name, " must be float32");
}

}  // namespace

// value (N, S, M, D); spatial_shapes (L, 2) int64 (H, W); level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2) normalized (x, y); attention_weights (N, Lq, M, L, P).
// Returns (N, Lq, M*D).
torch::Tensor ms_deform_attn_forward(const torch::Tensor& value_in, const torch::Tensor& spatial_shapes_in,
                                     const torch::Tensor& level_start_index_in,
                                     const torch::Tensor& sampling_locations_in,
                                     const torch::Tensor& attention_weights_in) {
  check_cpu_float(value_in, "value");
  check_cpu_float(sampling_locations_in, "sampling_locations");
  check_cpu_float(attention_weights_in, "attention_weights");
  TORCH_CHECK(value_in.dim() == 4, "value must be (N, S, M, D)");
  TORCH_CHECK(sampling_locations_in.dim() == 6, "sampling_locations must be (N, Lq, M, L, P, 2)");
  const auto value = value_in.contiguous();
  const auto locations = sampling_locations_in.contiguous();
  const auto weights = attention_weights_in.contiguous();
  const auto shapes = spatial_shapes_in.to(torch::kLong).contiguous();
  const auto starts = level_start_index_in.to(torch::kLong).contiguous();

  const int64_t n = value.size(0), s = value.size(1), m = value.size(2), d = value.size(3);
  const int64_t lq = locations.size(1), nl = locations.size(3), np = locations.size(4);
  TORCH_CHECK(locations.size(0) == n && locations.size(2) == m && locations.size(5) == 2,
              "sampling_locations shape does not match value");
  TORCH_CHECK(weights.numel() == n * lq * m * nl * np, "attention_weights shape does not match");
  TORCH_CHECK(shapes.size(0) == nl && starts.size(0) == nl, "spatial_shapes / level_start_index: one row per level");

  auto out = torch::zeros({n, lq, m * d}, value.options());
  const float* v_ptr = value.data_ptr<float>();
  const float* loc_ptr = locations.data_ptr<float>();
  const float* w_ptr = weights.data_ptr<float>();
  const int64_t* sh_ptr = shapes.data_ptr<int64_t>();
  const int64_t* st_ptr = starts.data_ptr<int64_t>();
  float* o_ptr = out.data_ptr<float>();
  // corners outside the map read this row of zeros (as the CUDA kernel's 0 initialisation), so
  // the inner loop has no branch and the same sum order
  const std::vector<float> zero_row(d, 0.f);
  const float* zero_ptr = zero_row.data();

  at::parallel_for(0, n * lq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> samples(static_cast<size_t>(np * d));
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / lq;
      const float* v_batch = v_ptr + b * s * m * d;
      float* o = o_ptr + bq * m * d;
      for (int64_t head = 0; head < m; ++head) {
        float* oh = o + head * d;
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t h = sh_ptr[2 * l], w = sh_ptr[2 * l + 1];
          const float* v_level = v_batch + st_ptr[l] * m * d + head * d;
          const int64_t row = m * d;  // stride between neighbouring pixels
          const int64_t base = ((bq * m + head) * nl + l) * np;
          const float half_w = static_cast<float>(w) / 2, half_h = static_cast<float>(h) / 2;
          for (int64_t p = 0; p < np; ++p) {
            // grid_sample(align_corners=False) on grid = 2 * location - 1, with the fused
            // multiply-adds of torch's vectorized CPU kernel (bit-identical samples)
            const float gx = 2.f * loc_ptr[2 * (base + p)] - 1.f;
            const float gy = 2.f * loc_ptr[2 * (base + p) + 1] - 1.f;
            const float x = std::fma(gx + 1.f, half_w, -0.5f);
            const float y = std::fma(gy + 1.f, half_h, -0.5f);
            const float x_w = std::floor(x), y_n = std::floor(y);
            const float fw = x - x_w, fe = 1.f - fw, fn = y - y_n, fs = 1.f - fn;
            const float nw = fs * fe, ne = fs * fw, sw = fn * fe, se = fn * fw;
            const int64_t ix = static_cast<int64_t>(x_w), iy = static_cast<int64_t>(y_n);
            const bool x0_in = ix >= 0 && ix < w, x1_in = ix + 1 >= 0 && ix + 1 < w;
            const bool y0_in = iy >= 0 && iy < h, y1_in = iy + 1 >= 0 && iy + 1 < h;
            const float* v_nw = (y0_in && x0_in) ? v_level + (iy * w + ix) * row : zero_ptr;
            const float* v_ne = (y0_in && x1_in) ? v_level + (iy * w + ix + 1) * row : zero_ptr;
            const float* v_sw = (y1_in && x0_in) ? v_level + ((iy + 1) * w + ix) * row : zero_ptr;
            const float* v_se = (y1_in && x1_in) ? v_level + ((iy + 1) * w + ix + 1) * row : zero_ptr;
            const float attn = w_ptr[base + p];
            float* sp = samples.data() + p * d;
            for (int64_t c = 0; c < d; ++c) {
              sp[c] = std::fma(v_se[c], se, std::fma(v_sw[c], sw, std::fma(v_ne[c], ne, v_nw[c] * nw))) * attn;
            }
          }
          // sum over points, then over levels, in the pure-PyTorch path's order
          for (int64_t c = 0; c < d; ++c) {
            float acc = samples[c];
            for (int64_t p = 1; p < np; ++p) acc += samples[p * d + c];
            oh[c] = l == 0 ? acc : oh[c] + acc;
          }
        }
      }
    }
  });
  return out;
}

namespace {

// torch's upsample_bilinear2d source index and weights (align_corners=False, no explicit scale):
// src = max(scale * (dst + 0.5) - 0.5, 0), scale = in / out in float.
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

Taps linear_taps(int64_t in_size, int64_t out_size, int64_t count) {
  Taps t;
  t.i0.resize(count); t.i1.resize(count); t.w0.resize(count); t.w1.resize(count);
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t o = 0; o < count; ++o) {
    const float real = std::max(scale * (o + 0.5f) - 0.5f, 0.f);
    const int64_t idx = std::min(static_cast<int64_t>(std::floor(real)), in_size - 1);
    const float lambda = std::min(std::max(real - idx, 0.f), 1.f);
    t.i0[o] = idx;
    t.i1[o] = idx + (idx < in_size - 1 ? 1 : 0);
    t.w1[o] = lambda;
    t.w0[o] = 1.f - lambda;
  }
  return t;
}

}  // namespace

// logits (Q, h, w) float32 -> out (Q, out_h, out_w) bool: bilinear resize of each map to
// (size_h, size_w), cropped to its top-left (out_h, out_w), thresholded at > 0. ``out`` is
// written in place (it may be a contiguous slice of a larger tensor). Returns the masks' boxes
// (Q, 4) float XYXY, x1/y1 inclusive, x2/y2 exclusive, zeros for an empty mask (as
// detectron2's BitMasks.get_bounding_boxes), found in the same pass.
torch::Tensor resize_threshold(const torch::Tensor& logits_in, int64_t size_h, int64_t size_w, torch::Tensor out) {
  check_cpu_float(logits_in, "logits");
  TORCH_CHECK(logits_in.dim() == 3, "logits must be (Q, h, w)");
  TORCH_CHECK(out.scalar_type() == torch::kBool && out.is_contiguous() && out.dim() == 3, "out must be a contiguous bool (Q, H, W)");
  const auto logits = logits_in.contiguous();
  const int64_t q = logits.size(0), h = logits.size(1), w = logits.size(2);
  const int64_t out_h = out.size(1), out_w = out.size(2);
  TORCH_CHECK(out.size(0) == q && out_h <= size_h && out_w <= size_w, "out must be (Q, <= size_h, <= size_w)");
  const Taps ty = linear_taps(h, size_h, out_h), tx = linear_taps(w, size_w, out_w);
  const float* src = logits.data_ptr<float>();
  bool* dst = out.data_ptr<bool>();
  auto boxes = torch::zeros({q, 4}, logits.options());
  float* box_ptr = boxes.data_ptr<float>();
  // Separable, as torch: each needed source row is interpolated along x once into ``rows``
  // (h x out_w, reused by the ~size_h/h output rows between two source rows), then every output
  // row mixes two of them. Same products and sums as the fused formula, so the same floats.
  at::parallel_for(0, q, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(static_cast<size_t>(h * out_w));
    std::vector<unsigned char> col_any(static_cast<size_t>(out_w));
    for (int64_t k = begin; k < end; ++k) {
      std::fill(col_any.begin(), col_any.end(), 0);
      int64_t y_first = -1, y_last = -1;
      const float* map = src + k * h * w;
      const int64_t last_row = ty.i1[out_h - 1];
      for (int64_t r = 0; r <= last_row; ++r) {
        const float* in = map + r * w;
        float* hr = rows.data() + r * out_w;
        for (int64_t x = 0; x < out_w; ++x) hr[x] = in[tx.i0[x]] * tx.w0[x] + in[tx.i1[x]] * tx.w1[x];
      }
      for (int64_t y = 0; y < out_h; ++y) {
        const float* h0 = rows.data() + ty.i0[y] * out_w;
        const float* h1 = rows.data() + ty.i1[y] * out_w;
        const float wy0 = ty.w0[y], wy1 = ty.w1[y];
        bool* o = dst + (k * out_h + y) * out_w;
        unsigned char row_any = 0;
        for (int64_t x = 0; x < out_w; ++x) {
          const unsigned char on = (h0[x] * wy0 + h1[x] * wy1) > 0.f;
          o[x] = on;
          col_any[x] |= on;
          row_any |= on;
        }
        if (row_any) {
          if (y_first < 0) y_first = y;
          y_last = y;
        }
      }
      if (y_first >= 0) {
        const int64_t x_first = std::find(col_any.begin(), col_any.end(), 1) - col_any.begin();
        const int64_t x_last = out_w - 1 - (std::find(col_any.rbegin(), col_any.rend(), 1) - col_any.rbegin());
        float* box = box_ptr + 4 * k;
        box[0] = x_first; box[1] = y_first; box[2] = x_last + 1; box[3] = y_last + 1;
      }
    }
  });
  return boxes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward, "multi-scale deformable attention (CPU, inference)");
  m.def("resize_threshold", &resize_threshold, "bilinear resize + crop + > 0 into bool, returns the boxes (CPU)");
}
