// RMSNorm on the CPU in one pass per row, as transformers' LlamaRMSNorm computes it: the row in float32, scaled by
// 1 / sqrt(mean(x²) + eps), rounded to T, times the weight, rounded to T. In torch these are eight operators (two
// dtype conversions among them), 61 norms per SmolLM2 step.
//
// Layouts: x, out [rows, n] contiguous; weight [n].
#include <cstdint>

#include "vec.h"

namespace {

using namespace tgis;

template <typename T>
void rms_norm(T* out, const T* x, const T* weight, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* row = x + r * n;
        vf acc = {};
        int64_t i = 0;
        for (; i + L <= n; i += L) {
            const vf v = load(row + i);
            acc += v * v;
        }
        float squares = sum(acc);
        for (; i < n; ++i) squares += widen(row[i]) * widen(row[i]);
        const float scale = 1.0f / std::sqrt(squares / float(n) + eps);
        T* o = out + r * n;
        for (i = 0; i + L <= n; i += L) narrow(load(weight + i) * rounded(load(row + i) * scale, o), o + i);
        for (; i < n; ++i) {
            T h;
            narrow(widen(row[i]) * scale, &h);
            narrow(widen(weight[i]) * widen(h), o + i);
        }
    }
}

}  // namespace

extern "C" {
void rms_norm_f32(float* out, const float* x, const float* weight, int64_t rows, int64_t n, float eps) {
    rms_norm(out, x, weight, rows, n, eps);
}
void rms_norm_bf16(uint16_t* out, const uint16_t* x, const uint16_t* weight, int64_t rows, int64_t n, float eps) {
    rms_norm(out, x, weight, rows, n, eps);
}
}
