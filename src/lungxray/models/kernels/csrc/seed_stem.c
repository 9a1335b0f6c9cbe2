/* Fused first block of seed_cnn: 3x3 valid conv (1 input channel per group) -> 2x2/2 max-pool -> ReLU.
 *
 * Plain C (GCC vector extensions, OpenMP), loaded by lungxray/fused_stem.py with ctypes; no torch headers.
 * Shapes (all tensors contiguous, row-major, as the Python side prepares them):
 *   x     fp32 (N, K, H, W)        input, member k's image in channel k
 *   wt    fp32 (K, 9, C)           weights, tap-major (t = ky*3 + kx) so a tap's C channels are contiguous
 *   bias  fp32 (K, C)
 *   out   fp32 or bf16 (N, Ho, Wo, K*C)   pooled, biased, ReLU'd output, channels last; Ho = (H-2)/2
 *   code  uint8 (N, Ho, Wo, K*C)   argmax of the 2x2 window (dy*2 + dx, first maximum wins as in PyTorch),
 *                                  plus 4 where the ReLU clipped the output (out <= 0 or NaN: no gradient)
 * The full-resolution conv output is never stored: each pooled value is the max of 4 conv values computed on
 * the spot from the 4x4 input patch. Vectorised over 16 output channels at a time (one zmm with AVX-512).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#ifdef __AVX512F__
#define VL 16 /* one zmm */
#else
#define VL 8 /* one ymm: 16 lanes would need two per value and spill the 9 weight vectors */
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef float vf_u __attribute__((vector_size(VL * 4), aligned(4)));      /* unaligned access */
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint16_t vh_u __attribute__((vector_size(VL * 2), aligned(2)));
typedef uint8_t vb __attribute__((vector_size(VL)));
typedef uint8_t vb_u __attribute__((vector_size(VL), aligned(1)));

static inline vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* n valid lanes (1..VL) from p; missing lanes are zero */
static inline vf load_f32(const float *p, int n) {
    if (n == VL) return *(const vf_u *)p;
    vf v = {0};
    memcpy(&v, p, (size_t)n * 4);
    return v;
}

static inline vf load_bf16(const uint16_t *p, int n) {
    vh h = {0};
    if (n == VL) h = *(const vh_u *)p;
    else memcpy(&h, p, (size_t)n * 2);
    vu u = __builtin_convertvector(h, vu) << 16;
    return (vf)u;
}

static inline vb load_u8(const uint8_t *p, int n) {
    vb b = {0};
    if (n == VL) b = *(const vb_u *)p;
    else memcpy(&b, p, (size_t)n);
    return b;
}

static inline void store_f32(float *p, vf v, int n) {
    if (n == VL) *(vf_u *)p = v;
    else memcpy(p, &v, (size_t)n * 4);
}

/* fp32 -> bf16, round to nearest even, NaN kept a (quiet) NaN: what PyTorch's conversion does */
static inline void store_bf16(uint16_t *p, vf v, int n) {
    vu u = (vu)v;
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vi nan = v != v;
    r = (vu)(((vi)r & ~nan) | ((vi)((u >> 16) | 0x40u) & nan));
    vh h = __builtin_convertvector(r, vh);
    if (n == VL) *(vh_u *)p = h;
    else memcpy(p, &h, (size_t)n * 2);
}

static inline void store_u8(uint8_t *p, vi v, int n) {
    vb b = __builtin_convertvector(v, vb);
    if (n == VL) *(vb_u *)p = b;
    else memcpy(p, &b, (size_t)n);
}

/* the maximum of a 2x2 window's 4 values per lane and its position 0-3: the first maximum wins, a NaN wins
 * (PyTorch's max-pool: val > max || isnan(val)) */
static inline vf max4(const vf a[4], vi *arg) {
    vf m = a[0];
    vi at = {0};
    for (int d = 1; d < 4; d++) {
        const vi take = (a[d] > m) | (a[d] != a[d]);
        m = vsel(take, a[d], m);
        at = (at & ~take) | (((vi){0} + d) & take);
    }
    *arg = at;
    return m;
}

static inline vf vsqrt(vf x) {
#ifdef __AVX512F__
    return (vf)_mm512_sqrt_ps((__m512)x);
#else
    vf r;
    for (int l = 0; l < VL; l++) r[l] = __builtin_sqrtf(x[l]);
    return r;
#endif
}

static inline int clamp_threads(int nthreads) { return nthreads > 0 ? nthreads : 1; }

/* ------------------------------------------------------------------------------------------------ forward */
int seed_stem_forward(const float *x, const float *wt, const float *bias, void *out, uint8_t *code,
                      int64_t N, int64_t K, int64_t C, int64_t H, int64_t W, int out_bf16, int nthreads) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, KC = K * C;
    const int64_t rows = N * Ho;  /* one task per output row (all members): it writes a contiguous block */
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads))
    for (int64_t task = 0; task < rows; task++) {
      const int64_t i = task % Ho, n = task / Ho;
      for (int64_t k = 0; k < K; k++) {
        const float *xr = x + ((n * K + k) * H + 2 * i) * W;  /* the 4 input rows 2i..2i+3 */
        const int64_t obase = ((n * Ho + i) * Wo) * KC + k * C;
        for (int64_t c0 = 0; c0 < C; c0 += VL) {
            const int nl = (int)(C - c0 < VL ? C - c0 : VL);
            /* named, not an array: GCC keeps loop-indexed arrays of vectors on the stack */
#define W_(t) const vf w##t = load_f32(wt + (k * 9 + t) * C + c0, nl);
            W_(0) W_(1) W_(2) W_(3) W_(4) W_(5) W_(6) W_(7) W_(8)
#undef W_
            const vf b = load_f32(bias + k * C + c0, nl);
            for (int64_t j = 0; j < Wo; j++) {
                const float *p0 = xr + 2 * j, *p1 = p0 + W, *p2 = p1 + W, *p3 = p2 + W;
                const float *pr[4] = {p0, p1, p2, p3};
                vf m = {0};
                vi arg = {0};
                for (int d = 0; d < 4; d++) {  /* the window's 4 conv values, folded into the max as they come */
                    const int dy = d >> 1, dx = d & 1;
                    vf s = w0 * pr[dy][dx];
                    s += w1 * pr[dy][dx + 1];
                    s += w2 * pr[dy][dx + 2];
                    s += w3 * pr[dy + 1][dx];
                    s += w4 * pr[dy + 1][dx + 1];
                    s += w5 * pr[dy + 1][dx + 2];
                    s += w6 * pr[dy + 2][dx];
                    s += w7 * pr[dy + 2][dx + 1];
                    s += w8 * pr[dy + 2][dx + 2];
                    if (d == 0) {
                        m = s;
                    } else {  /* max4's rule: a later value wins if greater or NaN */
                        const vi take = (s > m) | (s != s);
                        m = vsel(take, s, m);
                        arg = (arg & ~take) | (((vi){0} + d) & take);
                    }
                }
                m += b;
                const vi pos = m > 0;  /* ReLU passes (and its gradient flows) where out > 0 */
                m = vsel(pos, m, (vf){0});
                arg |= ((vi){0} + 4) & ~pos;
                const int64_t o = obase + j * KC + c0;
                if (out_bf16) store_bf16((uint16_t *)out + o, m, nl);
                else store_f32((float *)out + o, m, nl);
                store_u8(code + o, arg, nl);
            }
        }
      }
    }
    return 0;
}

/* ----------------------------------------------------------------------------------------------- backward */
/* g (N, Ho, Wo, K*C) fp32 or bf16, gradient of the block's output. dw (K, C, 9) and db (K, C) are overwritten. */
int seed_stem_backward_weight(const float *x, const void *g, const uint8_t *code, float *dw, float *db,
                              int64_t N, int64_t K, int64_t C, int64_t H, int64_t W, int g_bf16, int nthreads) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, KC = K * C;
    const int64_t rows = N * Ho, per = K * C * 10;  /* per thread: 9 taps + bias, (K, C, 10) doubles */
    nthreads = clamp_threads(nthreads);
    double *acc = calloc((size_t)(nthreads * per), sizeof(double));
    if (!acc) return -1;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        double *mine = acc + (int64_t)omp_get_thread_num() * per;
#else
        double *mine = acc;
#endif
#pragma omp for schedule(static)
        for (int64_t task = 0; task < rows; task++) {
          const int64_t i = task % Ho, n = task / Ho;
          for (int64_t k = 0; k < K; k++) {
            const float *xr = x + ((n * K + k) * H + 2 * i) * W;
            const int64_t gbase = ((n * Ho + i) * Wo) * KC + k * C;
            for (int64_t c0 = 0; c0 < C; c0 += VL) {
                const int nl = (int)(C - c0 < VL ? C - c0 : VL);
                vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0}, s8 = {0};
                vf sb = {0};  /* this row's sums (named: see the forward), added to the thread's doubles at the end */
                for (int64_t j = 0; j < Wo; j++) {
                    const int64_t o = gbase + j * KC + c0;
                    const vf gv = g_bf16 ? load_bf16((const uint16_t *)g + o, nl) : load_f32((const float *)g + o, nl);
                    const vi cv = __builtin_convertvector(load_u8(code + o, nl), vi);
                    const float *p0 = xr + 2 * j, *p1 = p0 + W, *p2 = p1 + W, *p3 = p2 + W;
                    const float *pr[4] = {p0, p1, p2, p3};
                    sb += vsel(cv < 4, gv, (vf){0});
                    for (int d = 0; d < 4; d++) {
                        const int dy = d >> 1, dx = d & 1;
                        const vf gd = vsel(cv == d, gv, (vf){0});  /* code d: passed the ReLU, argmax d */
                        s0 += gd * pr[dy][dx];
                        s1 += gd * pr[dy][dx + 1];
                        s2 += gd * pr[dy][dx + 2];
                        s3 += gd * pr[dy + 1][dx];
                        s4 += gd * pr[dy + 1][dx + 1];
                        s5 += gd * pr[dy + 1][dx + 2];
                        s6 += gd * pr[dy + 2][dx];
                        s7 += gd * pr[dy + 2][dx + 1];
                        s8 += gd * pr[dy + 2][dx + 2];
                    }
                }
                const vf s[9] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
                for (int l = 0; l < nl; l++) {
                    double *dst = mine + (k * C + c0 + l) * 10;
                    for (int t = 0; t < 9; t++) dst[t] += s[t][l];
                    dst[9] += sb[l];
                }
            }
          }
        }
    }
    for (int64_t q = 0; q < K * C; q++) {
        for (int t = 0; t < 10; t++) {
            double tot = 0.0;
            for (int th = 0; th < nthreads; th++) tot += acc[th * per + q * 10 + t];
            if (t < 9) dw[q * 9 + t] = (float)tot;
            else db[q] = (float)tot;
        }
    }
    free(acc);
    return 0;
}

/* dx (N, K, H, W) fp32, overwritten: the gradient scattered back through the argmax and the 3x3 taps.
 * w is the (K, C, 9) weight (channel-major here). One task per image and member: rows of neighbouring pooled
 * positions overlap in the input, so a task owns a whole plane. */
int seed_stem_backward_input(const float *w, const void *g, const uint8_t *code, float *dx_out, int64_t N,
                             int64_t K, int64_t C, int64_t H, int64_t W, int g_bf16, int nthreads) {
    const int64_t Ho = (H - 2) / 2, Wo = (W - 2) / 2, KC = K * C;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads))
    for (int64_t plane = 0; plane < N * K; plane++) {
        const int64_t k = plane % K, n = plane / K;
        float *d = dx_out + plane * H * W;
        memset(d, 0, (size_t)(H * W) * sizeof(float));
        for (int64_t i = 0; i < Ho; i++) {
            for (int64_t j = 0; j < Wo; j++) {
                const int64_t o = ((n * Ho + i) * Wo + j) * KC + k * C;
                float patch[4][4] = {{0}};
                for (int64_t c = 0; c < C; c++) {
                    const int cd = code[o + c];
                    if (cd >= 4) continue;
                    float gv;
                    if (g_bf16) {
                        uint32_t u = (uint32_t)((const uint16_t *)g)[o + c] << 16;
                        memcpy(&gv, &u, 4);
                    } else {
                        gv = ((const float *)g)[o + c];
                    }
                    const int dy = cd >> 1, dxo = cd & 1;
                    const float *wc = w + (k * C + c) * 9;
                    for (int ky = 0; ky < 3; ky++)
                        for (int kx = 0; kx < 3; kx++) patch[dy + ky][dxo + kx] += gv * wc[ky * 3 + kx];
                }
                for (int py = 0; py < 4; py++)
                    for (int px = 0; px < 4; px++) d[(2 * i + py) * W + 2 * j + px] += patch[py][px];
            }
        }
    }
    return 0;
}

/* ===================================================================== blocks 2-3: 2x2/2 max-pool -> ReLU
 * The conv output of blocks 2 and 3 (oneDNN's, channels last) goes through one kernel instead of max_pool2d
 * (int64 indices, a zero-filled full-resolution gradient) and two ReLU passes.
 *   x     fp32 or bf16 (N, H, W, C)      the conv output, channels last
 *   out   same dtype (N, Ho, Wo, C)      relu(max_pool2d(x, 2)), or max_pool2d(x, 2) with relu = 0 (a pool before
 *                                        BatchNorm); Ho = H/2, Wo = W/2 (floor: an odd last row or
 *                                        column is never selected)
 *   code  uint8 (N, Ho, Wo, C)           argmax dy*2 + dx as PyTorch picks it (a later value wins if greater or
 *                                        NaN), +4 where the ReLU clipped (out <= 0). A NaN maximum stays NaN
 *                                        and passes its gradient, as relu/threshold_backward do.
 * bf16 values are compared as the fp32 numbers they are and written back unchanged (the selected input or 0),
 * so both dtypes are exact. Backward writes the whole input gradient in one pass: g at the argmax where
 * code < 4, zero elsewhere (odd last row/column included). */
static inline vf load_any(const void *p, int64_t o, int n, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + o, n) : load_f32((const float *)p + o, n);
}

/* exact: v holds bf16 values (the low 16 bits are zero) */
static inline void store_bf16_exact(uint16_t *p, vf v, int n) {
    vh h = __builtin_convertvector((vu)v >> 16, vh);
    if (n == VL) *(vh_u *)p = h;
    else memcpy(p, &h, (size_t)n * 2);
}

int seed_pool_relu_forward(const void *x, void *out, uint8_t *code, int64_t N, int64_t H, int64_t W, int64_t C,
                           int relu, int bf16, int nthreads) {
    const int64_t Ho = H / 2, Wo = W / 2;
#pragma omp parallel for schedule(static) num_threads(clamp_threads(nthreads))
    for (int64_t task = 0; task < N * Ho; task++) {
        const int64_t i = task % Ho, n = task / Ho;
        const int64_t r0 = ((n * H + 2 * i) * W) * C, r1 = r0 + W * C;  /* input rows 2i, 2i+1 */
        const int64_t obase = ((n * Ho + i) * Wo) * C;
        for (int64_t j = 0; j < Wo; j++) {
            for (int64_t c0 = 0; c0 < C; c0 += VL) {
                const int nl = (int)(C - c0 < VL ? C - c0 : VL);
                const int64_t q = 2 * j * C + c0;
                const vf a[4] = {load_any(x, r0 + q, nl, bf16), load_any(x, r0 + q + C, nl, bf16),
                                 load_any(x, r1 + q, nl, bf16), load_any(x, r1 + q + C, nl, bf16)};
                vi arg;
                vf m = max4(a, &arg);
                const vi clip = (m <= 0) & (relu ? -1 : 0);  /* false for NaN: relu(NaN) = NaN, its gradient flows */
                m = vsel(clip, (vf){0}, m);
                arg |= ((vi){0} + 4) & clip;
                const int64_t o = obase + j * C + c0;
                if (bf16) store_bf16_exact((uint16_t *)out + o, m, nl);
                else store_f32((float *)out + o, m, nl);
                store_u8(code + o, arg, nl);
            }
        }
    }
    return 0;
}

/* Pure data movement, so one body per element width: E the element (uint16_t: bf16, uint32_t: fp32), L lanes
 * per 64-byte vector. */
#define POOL_RELU_BACKWARD(NAME, E, L)                                                                          \
static void NAME(const E *g, const uint8_t *code, E *dx, int64_t N, int64_t H, int64_t W, int64_t C,          \
                 int nthreads) {                                                                                \
    typedef E ve __attribute__((vector_size(64)));                                                               \
    typedef E ve_u __attribute__((vector_size(64), aligned(sizeof(E))));                                       \
    typedef uint8_t vc __attribute__((vector_size(L)));                                                          \
    typedef uint8_t vc_u __attribute__((vector_size(L), aligned(1)));                                            \
    const int64_t Ho = H / 2, Wo = W / 2;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(clamp_threads(nthreads))")                           \
    for (int64_t task = 0; task < N * Ho; task++) {                                                             \
        const int64_t i = task % Ho, n = task / Ho;                                                             \
        E *d0 = dx + ((n * H + 2 * i) * W) * C, *d1 = d0 + W * C;                                               \
        const int64_t gbase = ((n * Ho + i) * Wo) * C;                                                          \
        for (int64_t j = 0; j < Wo; j++) {                                                                      \
            for (int64_t c0 = 0; c0 < C; c0 += L) {                                                             \
                const int nl = (int)(C - c0 < L ? C - c0 : L);                                                  \
                const int64_t o = gbase + j * C + c0, q = 2 * j * C + c0;                                       \
                ve gv = {0};                                                                                    \
                vc cv = {0};                                                                                    \
                if (nl == L) {                                                                                  \
                    gv = *(const ve_u *)(g + o);                                                                \
                    cv = *(const vc_u *)(code + o);                                                             \
                } else {                                                                                        \
                    memcpy(&gv, g + o, (size_t)nl * sizeof(E));                                                 \
                    memcpy(&cv, code + o, (size_t)nl);                                                          \
                }                                                                                               \
                E *dst[4] = {d0 + q, d0 + q + C, d1 + q, d1 + q + C};                                           \
                for (int d = 0; d < 4; d++) {                                                                   \
                    const ve v = gv & (ve)__builtin_convertvector(cv == (uint8_t)d, ve);                        \
                    if (nl == L) *(ve_u *)dst[d] = v;                                                           \
                    else memcpy(dst[d], &v, (size_t)nl * sizeof(E));                                            \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        if (W & 1) { /* the last column is never selected */                                                    \
            memset(d0 + (W - 1) * C, 0, (size_t)C * sizeof(E));                                                 \
            memset(d1 + (W - 1) * C, 0, (size_t)C * sizeof(E));                                                 \
        }                                                                                                       \
        if ((H & 1) && i == Ho - 1) memset(d1 + W * C, 0, (size_t)(W * C) * sizeof(E)); /* nor the last row */ \
    }                                                                                                           \
}

POOL_RELU_BACKWARD(pool_relu_backward_u16, uint16_t, 32)
POOL_RELU_BACKWARD(pool_relu_backward_u32, uint32_t, 16)

/* g (N, Ho, Wo, C) and dx (N, H, W, C), both fp32 or both bf16; dx is overwritten entirely. */
int seed_pool_relu_backward(const void *g, const uint8_t *code, void *dx, int64_t N, int64_t H, int64_t W,
                            int64_t C, int bf16, int nthreads) {
    if (bf16) pool_relu_backward_u16((const uint16_t *)g, code, (uint16_t *)dx, N, H, W, C, nthreads);
    else pool_relu_backward_u32((const uint32_t *)g, code, (uint32_t *)dx, N, H, W, C, nthreads);
    return 0;
}
