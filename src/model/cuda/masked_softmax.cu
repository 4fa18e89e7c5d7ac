// softmax(scores + mask) over the last dimension, accumulated in f32, in one
// kernel: what attention's four unfused ops (to f32, the mask added, softmax,
// back) did in four passes over the scores. One block of 256 threads a row:
// a pass for the row's maximum and its sum of exponentials (rescaled as the
// maximum grows), then a pass that writes the probabilities. A row that sees
// no key (every entry -inf) gets zeros rather than NaN.
//
// Scores are [rows, cols]; row r is query r % seq of batch r / batch_rows.
// The f32 mask, if any, is [mask_batches, seq, cols]: mask_batches is 1 (one
// mask for the whole batch) or the batch size.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#define THREADS 256

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half *p, float x) { *p = __float2half(x); }

// Merges the running (max, sum) pair (m, s) with (m2, s2).
__device__ __forceinline__ void merge(float &m, float &s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    float top = fmaxf(m, m2);
    s = s * __expf(m - top) + s2 * __expf(m2 - top);
    m = top;
}

template <typename T>
__device__ void masked_softmax(const T *x, const float *mask, T *y, int cols, int seq,
                               int batch_rows, int mask_batches) {
    const int row = blockIdx.x;
    const T *in = x + (size_t)row * cols;
    T *out = y + (size_t)row * cols;
    const float *m_row = nullptr;
    if (mask != nullptr) {
        const int batch = mask_batches == 1 ? 0 : row / batch_rows;
        m_row = mask + ((size_t)batch * seq + row % seq) * cols;
    }
    float m = -INFINITY, s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += THREADS) {
        float v = to_float(in[c]) + (m_row ? m_row[c] : 0.0f);
        merge(m, s, v, 1.0f);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, offset);
        float s2 = __shfl_xor_sync(0xffffffff, s, offset);
        merge(m, s, m2, s2);
    }
    __shared__ float maxes[THREADS / 32], sums[THREADS / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { maxes[warp] = m; sums[warp] = s; }
    __syncthreads();
    m = -INFINITY; s = 0.0f;
    for (int w = 0; w < THREADS / 32; w++) merge(m, s, maxes[w], sums[w]);
    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int c = threadIdx.x; c < cols; c += THREADS) {
        float v = to_float(in[c]) + (m_row ? m_row[c] : 0.0f);
        store(out + c, v == -INFINITY ? 0.0f : __expf(v - m) * inv);
    }
}

#define MASKED_SOFTMAX(NAME, T)                                                          \
    extern "C" __global__ void NAME(const T *x, const float *mask, T *y, int cols,       \
                                    int seq, int batch_rows, int mask_batches) {         \
        masked_softmax<T>(x, mask, y, cols, seq, batch_rows, mask_batches);              \
    }

MASKED_SOFTMAX(masked_softmax_f32, float)
MASKED_SOFTMAX(masked_softmax_bf16, __nv_bfloat16)
MASKED_SOFTMAX(masked_softmax_f16, __half)
