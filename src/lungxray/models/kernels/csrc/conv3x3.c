/* 3x3 stride-1 convolutions in fp32, channels last, grouped: forward and weight gradient (the input gradient is
 * the forward of the padded output gradient with the flipped, transposed kernel, so the same code serves it).
 *
 * Why: on CPUs without AVX-512 oneDNN's fp32 weight gradient runs at 25-50% of the FMA peak for seed_cnn's
 * layers, and its grouped convolutions (packed ensemble members, 16-128 channels per group) at 10-20%
 * (docs/performance.md, "AVX2"). These loops keep a tile of outputs in registers (6 positions x 16 channels
 * forward, 3 taps x 2 x 16 weights for the gradient) and stream the inputs through FMAs.
 *
 * C with AVX2/FMA intrinsics (8 floats per ymm register) and OpenMP, loaded by
 * lungxray/models/kernels/conv3x3.py with ctypes. All tensors contiguous, row-major:
 *   x    (N, Hp, Wp, G*Ci)   input, already zero-padded (valid convolution on it)
 *   w    (G, 9, Ci, Co)      weights, tap-major (t = ky*3 + kx), a tap's output channels contiguous
 *   out  (N, Hp-2, Wp-2, G*Co)
 *   g    (N, Hp-2, Wp-2, G*Co)  gradient of out (weight gradient)
 *   dw   (G, 9, Ci, Co), db (G*Co): overwritten; db may be NULL
 * Co must be a multiple of 16 and, for the weight gradient, Ci a multiple of 2 (the Python side checks).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__AVX2__) || !defined(__FMA__)
#error "conv3x3.c needs AVX2 and FMA (elsewhere the convolutions stay oneDNN's)"
#endif
#include <immintrin.h>

typedef __m256 v8;
#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps((p), (v))
#define BC(p) _mm256_broadcast_ss(p)
#define FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define ADD(a, b) _mm256_add_ps((a), (b))
#define ZERO _mm256_setzero_ps()
#define RPOS 6 /* forward: output positions per register tile (12 accumulators + 2 weights + 1 broadcast) */

static inline int nthr(int n) { return n > 0 ? n : 1; }

/* R output positions x 16 output channels of one row, one group: acc = bias + sum over taps and input channels */
static inline __attribute__((always_inline)) void fwd_tile(const float *xr, const float *wg, const float *b,
                                                           float *o, int64_t Wp, int64_t CT, int64_t Ci,
                                                           int64_t Co, int64_t GT, const int R) {
    v8 a0[RPOS], a1[RPOS];
    const v8 b0 = b ? LD(b) : ZERO, b1 = b ? LD(b + 8) : ZERO;
    for (int r = 0; r < R; r++) { a0[r] = b0; a1[r] = b1; }
    for (int dy = 0; dy < 3; dy++) {
        for (int dx = 0; dx < 3; dx++) {
            const float *xp = xr + (dy * Wp + dx) * CT;
            const float *wp = wg + (dy * 3 + dx) * Ci * Co;
            for (int64_t c = 0; c < Ci; c++, xp++, wp += Co) {
                const v8 w0 = LD(wp), w1 = LD(wp + 8);
                for (int r = 0; r < R; r++) {
                    const v8 xv = BC(xp + r * CT);
                    a0[r] = FMA(xv, w0, a0[r]);
                    a1[r] = FMA(xv, w1, a1[r]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++) { ST(o + r * GT, a0[r]); ST(o + r * GT + 8, a1[r]); }
}

void conv3x3_forward(const float *x, const float *w, const float *bias, float *out, int64_t N, int64_t Hp,
                     int64_t Wp, int64_t G, int64_t Ci, int64_t Co, int nthreads) {
    const int64_t Ho = Hp - 2, Wo = Wp - 2, CT = G * Ci, GT = G * Co;
#pragma omp parallel for schedule(static) num_threads(nthr(nthreads))
    for (int64_t task = 0; task < N * Ho; task++) {  /* one output row per task: a contiguous block */
        const int64_t y = task % Ho, n = task / Ho;
        const float *xrow = x + ((n * Hp + y) * Wp) * CT;
        float *orow = out + ((n * Ho + y) * Wo) * GT;
        for (int64_t gi = 0; gi < G; gi++) {
            for (int64_t c0 = 0; c0 < Co; c0 += 16) {
                const float *wg = w + gi * 9 * Ci * Co + c0;
                const float *b = bias ? bias + gi * Co + c0 : NULL;
                int64_t j = 0;
                for (; j + RPOS <= Wo; j += RPOS)
                    fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, RPOS);
                switch (Wo - j) {  /* the row's last positions: a narrower tile, unrolled at compile time */
                    case 5: fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, 5); break;
                    case 4: fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, 4); break;
                    case 3: fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, 3); break;
                    case 2: fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, 2); break;
                    case 1: fwd_tile(xrow + j * CT + gi * Ci, wg, b, orow + j * GT + gi * Co + c0, Wp, CT, Ci, Co, GT, 1); break;
                    default: break;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ weight gradient */
/* dw[dy*3 + dx][c..c+1][c0..c0+15] += sum over n positions of `rows` rows (input row stride xs, gradient row stride
 * gs), for the three taps dx = 0, 1, 2 of row dy:
 * 12 accumulators, and each load of g serves 3 taps x 2 input channels (6 broadcasts + 2 loads per 12 FMAs) */
static inline __attribute__((always_inline)) void wgrad_tile(const float *x0, const float *g0p, float *dst,
                                                             int64_t rows, int64_t n, int64_t xs, int64_t gs,
                                                             int64_t CT, int64_t GT, int64_t Ci, int64_t Co) {
    /* named accumulators: GCC keeps a loop-indexed array of vectors on the stack */
    v8 a00 = ZERO, a01 = ZERO, a10 = ZERO, a11 = ZERO, a20 = ZERO, a21 = ZERO;  /* tap 0, 1, 2; channel c */
    v8 b00 = ZERO, b01 = ZERO, b10 = ZERO, b11 = ZERO, b20 = ZERO, b21 = ZERO;  /* ... channel c + 1 */
    for (int64_t r = 0; r < rows; r++) {
      const float *xc = x0 + r * xs, *gp = g0p + r * gs;
      for (int64_t j = 0; j < n; j++, xc += CT, gp += GT) {
        const v8 g0 = LD(gp), g1 = LD(gp + 8);
        v8 xv = BC(xc);
        a00 = FMA(xv, g0, a00); a01 = FMA(xv, g1, a01);
        xv = BC(xc + 1);
        b00 = FMA(xv, g0, b00); b01 = FMA(xv, g1, b01);
        xv = BC(xc + CT);
        a10 = FMA(xv, g0, a10); a11 = FMA(xv, g1, a11);
        xv = BC(xc + CT + 1);
        b10 = FMA(xv, g0, b10); b11 = FMA(xv, g1, b11);
        xv = BC(xc + 2 * CT);
        a20 = FMA(xv, g0, a20); a21 = FMA(xv, g1, a21);
        xv = BC(xc + 2 * CT + 1);
        b20 = FMA(xv, g0, b20); b21 = FMA(xv, g1, b21);
      }
    }
    const v8 sums[12] = {a00, a01, b00, b01, a10, a11, b10, b11, a20, a21, b20, b21};
    for (int t = 0; t < 3; t++) {
        for (int c = 0; c < 2; c++) {
            float *d = dst + (t * Ci + c) * Co;
            ST(d, ADD(LD(d), sums[4 * t + 2 * c]));
            ST(d + 8, ADD(LD(d + 8), sums[4 * t + 2 * c + 1]));
        }
    }
}

/* One task per block of output rows of one image: one row where rows are long, enough rows for ~64 positions where
 * they are short (each tile then sums 64 positions before it touches dw, which for 128 channels is past L2).
 * A group's rows are cut into segments short enough that their x and g stay in L1 (~24 KB) while every tile of
 * every tap passes over them. Each thread sums into its own dw and db, added up at the end. */
void conv3x3_backward_weight(const float *x, const float *g, float *dw, float *db, int64_t N, int64_t Hp,
                             int64_t Wp, int64_t G, int64_t Ci, int64_t Co, int nthreads) {
    const int64_t Ho = Hp - 2, Wo = Wp - 2, CT = G * Ci, GT = G * Co, per = G * 9 * Ci * Co;
    int64_t rb = (64 + Wo - 1) / Wo;
    rb = rb > Ho ? Ho : rb;
    const int64_t blocks = (Ho + rb - 1) / rb;
    int64_t seg = 6144 / ((rb + 2) * Ci + rb * Co) - 2;
    seg = seg < 8 ? 8 : seg;
    const int64_t nseg = (Wo + seg - 1) / seg;
    seg = (Wo + nseg - 1) / nseg;  /* equal segments */
    nthreads = nthr(nthreads);
    float *acc = calloc((size_t)(nthreads * (per + GT)), sizeof(float));
    if (!acc) return;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *mine = acc + (int64_t)omp_get_thread_num() * (per + GT);
#else
        float *mine = acc;
#endif
        float *mine_b = mine + per;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * blocks; task++) {
            const int64_t n = task / blocks, y0 = (task % blocks) * rb, rows = Ho - y0 < rb ? Ho - y0 : rb;
            const float *xrow = x + ((n * Hp + y0) * Wp) * CT, *grow = g + ((n * Ho + y0) * Wo) * GT;
            for (int64_t gi = 0; gi < G; gi++) {
                for (int64_t j0 = 0; j0 < Wo; j0 += seg) {
                    const int64_t len = Wo - j0 < seg ? Wo - j0 : seg;
                    const float *xs = xrow + j0 * CT + gi * Ci, *gs = grow + j0 * GT + gi * Co;
                    for (int dy = 0; dy < 3; dy++)
                        for (int64_t c0 = 0; c0 < Co; c0 += 16)
                            for (int64_t c = 0; c < Ci; c += 2)
                                wgrad_tile(xs + dy * Wp * CT + c, gs + c0, mine + ((gi * 9 + dy * 3) * Ci + c) * Co + c0,
                                           rows, len, Wp * CT, Wo * GT, CT, GT, Ci, Co);
                }
            }
            if (db)
                for (int64_t p = 0; p < rows * Wo; p++)
                    for (int64_t c0 = 0; c0 < GT; c0 += 8) ST(mine_b + c0, ADD(LD(mine_b + c0), LD(grow + p * GT + c0)));
        }
    }
    for (int64_t q = 0; q < per + GT; q++) {
        float tot = 0.0f;
        for (int th = 0; th < nthreads; th++) tot += acc[th * (per + GT) + q];
        if (q < per) dw[q] = tot;
        else if (db) db[q - per] = tot;
    }
    free(acc);
}

/* ------------------------------------------------------------------------------ Winograd F(2x2, 3x3) forward
 * Same convolution as conv3x3_forward, computed on 2x2 output tiles from 4x4 input tiles: V = B^T d B per tile and
 * input channel, M = V . U per transformed position (16 small GEMMs over the input channels, U = G w G^T
 * precomputed by the caller as (G, 16, Ci, Co)), Y = A^T M A. 16 multiplies per tile instead of 36: 2.25x fewer
 * FMAs; the transforms are additions only. Rounding differs from the direct sum by a few ulps (the transforms
 * scale by 1/2 and add), well inside float noise for these layers (tests/test_conv3x3.py).
 * Needs Ci a multiple of 8 and Co of 16. An odd output height or width reads one zero row / column past the input. */

/* d[i][j]: input rows 2ty+i, columns 2tx+j of group gi, channels c..c+7; zero outside the image */
static inline v8 load_d(const float *x, int64_t r, int64_t col, int64_t Hp, int64_t Wp, int64_t CT) {
    if (r >= Hp || col >= Wp) return ZERO;
    return LD(x + (r * Wp + col) * CT);
}

/* V[k][t][c] for the tiles of tile row ty, stored at tile index t0 + t of the T tiles a task holds */
static void winograd_input(const float *xn, float *V, int64_t ty, int64_t tw, int64_t T, int64_t t0, int64_t Hp,
                           int64_t Wp, int64_t CT, int64_t Ci) {
    for (int64_t t = 0; t < tw; t++) {
        const int64_t r0 = 2 * ty, col0 = 2 * t;
        for (int64_t c = 0; c < Ci; c += 8) {
            v8 d[4][4], b[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) d[i][j] = load_d(xn + c, r0 + i, col0 + j, Hp, Wp, CT);
            for (int j = 0; j < 4; j++) {  /* B^T d: along rows */
                b[0][j] = _mm256_sub_ps(d[0][j], d[2][j]);
                b[1][j] = ADD(d[1][j], d[2][j]);
                b[2][j] = _mm256_sub_ps(d[2][j], d[1][j]);
                b[3][j] = _mm256_sub_ps(d[1][j], d[3][j]);
            }
            for (int i = 0; i < 4; i++) {  /* (B^T d) B: along columns */
                float *v = V + ((int64_t)(i * 4) * T + t0 + t) * Ci + c;
                ST(v, _mm256_sub_ps(b[i][0], b[i][2]));
                ST(v + T * Ci, ADD(b[i][1], b[i][2]));
                ST(v + 2 * T * Ci, _mm256_sub_ps(b[i][2], b[i][1]));
                ST(v + 3 * T * Ci, _mm256_sub_ps(b[i][1], b[i][3]));
            }
        }
    }
}

/* M[k][t][0..15] = sum_c V[k][t][c] U[k][c][c0..c0+15] for R tiles t0..t0+R-1 */
static inline __attribute__((always_inline)) void winograd_gemm_tile(const float *v, const float *u, float *m,
                                                                     int64_t Ci, int64_t Co, const int R) {
    v8 a0[RPOS], a1[RPOS];
    for (int r = 0; r < R; r++) { a0[r] = ZERO; a1[r] = ZERO; }
    for (int64_t c = 0; c < Ci; c++, v++, u += Co) {
        const v8 w0 = LD(u), w1 = LD(u + 8);
        for (int r = 0; r < R; r++) {
            const v8 xv = BC(v + r * Ci);
            a0[r] = FMA(xv, w0, a0[r]);
            a1[r] = FMA(xv, w1, a1[r]);
        }
    }
    for (int r = 0; r < R; r++) { ST(m + r * 16, a0[r]); ST(m + r * 16 + 8, a1[r]); }
}

/* for the first `tw` of the T tiles */
static void winograd_gemm(const float *V, const float *U, float *M, int64_t tw, int64_t T, int64_t Ci, int64_t Co,
                          int64_t c0) {
    for (int k = 0; k < 16; k++) {
        const float *v = V + (int64_t)k * T * Ci, *u = U + (int64_t)k * Ci * Co + c0;
        float *m = M + (int64_t)k * T * 16;
        int64_t t = 0;
        for (; t + RPOS <= tw; t += RPOS) winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, RPOS);
        switch (tw - t) {
            case 5: winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, 5); break;
            case 4: winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, 4); break;
            case 3: winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, 3); break;
            case 2: winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, 2); break;
            case 1: winograd_gemm_tile(v + t * Ci, u, m + t * 16, Ci, Co, 1); break;
            default: break;
        }
    }
}

/* Y = A^T M A (+ bias) for tile row ty (tiles t0.. of the T in M), output channels c0..c0+15, written where inside
 * the output */
static void winograd_output(const float *M, const float *b, float *on, int64_t ty, int64_t tw, int64_t T, int64_t t0,
                            int64_t Ho, int64_t Wo, int64_t GT) {
    const v8 bias0 = b ? LD(b) : ZERO, bias1 = b ? LD(b + 8) : ZERO;
    for (int64_t t = 0; t < tw; t++) {
        for (int h = 0; h < 2; h++) {
            const v8 bias = h ? bias1 : bias0;
            v8 m[4][4], s[2][4];
            for (int k = 0; k < 16; k++) m[k / 4][k % 4] = LD(M + ((int64_t)k * T + t0 + t) * 16 + 8 * h);
            for (int j = 0; j < 4; j++) {  /* A^T M: along rows */
                s[0][j] = ADD(ADD(m[0][j], m[1][j]), m[2][j]);
                s[1][j] = _mm256_sub_ps(_mm256_sub_ps(m[1][j], m[2][j]), m[3][j]);
            }
            for (int i = 0; i < 2; i++) {
                const int64_t y = 2 * ty + i;
                if (y >= Ho) break;
                const v8 y0 = ADD(ADD(ADD(s[i][0], s[i][1]), s[i][2]), bias);
                const v8 y1 = ADD(_mm256_sub_ps(_mm256_sub_ps(s[i][1], s[i][2]), s[i][3]), bias);
                float *o = on + (y * Wo + 2 * t) * GT + 8 * h;
                ST(o, y0);
                if (2 * t + 1 < Wo) ST(o + GT, y1);
            }
        }
    }
}

/* One task per block of tile rows of one image: enough rows for ~48 tiles, so that U (16 x Ci x Co per group,
 * up to 1 MB) is reused across that many tiles once it is loaded */
void conv3x3_winograd_forward(const float *x, const float *u, const float *bias, float *out, int64_t N, int64_t Hp,
                              int64_t Wp, int64_t G, int64_t Ci, int64_t Co, int nthreads) {
    const int64_t Ho = Hp - 2, Wo = Wp - 2, CT = G * Ci, GT = G * Co;
    const int64_t th = (Ho + 1) / 2, tw = (Wo + 1) / 2;
    int64_t rb = (48 + tw - 1) / tw;
    rb = rb > th ? th : rb;
    const int64_t blocks = (th + rb - 1) / rb, T = rb * tw;
    nthreads = nthr(nthreads);
    float *work = malloc((size_t)(nthreads * 16 * T * (Ci + 16)) * sizeof(float));
    if (!work) return;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *V = work + (int64_t)omp_get_thread_num() * 16 * T * (Ci + 16);
#else
        float *V = work;
#endif
        float *M = V + 16 * T * Ci;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * blocks; task++) {
            const int64_t n = task / blocks, ty0 = (task % blocks) * rb;
            const int64_t rows = th - ty0 < rb ? th - ty0 : rb, tiles = rows * tw;
            for (int64_t gi = 0; gi < G; gi++) {
                for (int64_t r = 0; r < rows; r++)
                    winograd_input(x + n * Hp * Wp * CT + gi * Ci, V, ty0 + r, tw, T, r * tw, Hp, Wp, CT, Ci);
                const float *ug = u + gi * 16 * Ci * Co;
                for (int64_t c0 = 0; c0 < Co; c0 += 16) {
                    winograd_gemm(V, ug, M, tiles, T, Ci, Co, c0);
                    for (int64_t r = 0; r < rows; r++)
                        winograd_output(M, bias ? bias + gi * Co + c0 : NULL, out + n * Ho * Wo * GT + gi * Co + c0,
                                        ty0 + r, tw, T, r * tw, Ho, Wo, GT);
                }
            }
        }
    }
    free(work);
}

/* ----------------------------------------------------------------------- Winograd F(2x2, 3x3) weight gradient
 * Forward is Y = A^T [(G w G^T) . (B^T d B)] A per tile, so with the output gradient g of a tile,
 * dL/dU = sum over tiles of (B^T d B) . (A g A^T), and dL/dw = G^T (dL/dU) G (done by the caller on the small
 * (G, 16, Ci, Co) result). The sum over tiles is 16 GEMMs with the tiles as the reduction: 2.25x fewer FMAs than
 * the direct weight gradient. Needs Ci a multiple of 8 and Co of 16. */

/* Gt[k][t][c0..] = (A g A^T)[k] for tile row ty's tiles (stored from t0 of T), all output channels; g outside
 * the output (an odd last row or column) is zero */
static void winograd_grad_out(const float *gn, float *Gt, int64_t ty, int64_t tw, int64_t T, int64_t t0, int64_t Ho,
                              int64_t Wo, int64_t GT, int64_t Co) {
    for (int64_t t = 0; t < tw; t++) {
        const int64_t y = 2 * ty, x0 = 2 * t;
        for (int64_t c = 0; c < Co; c += 8) {
            v8 g[2][2];
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++)
                    g[i][j] = (y + i < Ho && x0 + j < Wo) ? LD(gn + ((y + i) * Wo + x0 + j) * GT + c) : ZERO;
            v8 h[4][2];  /* A g: rows g0, g0 + g1, g0 - g1, -g1 */
            for (int j = 0; j < 2; j++) {
                h[0][j] = g[0][j];
                h[1][j] = ADD(g[0][j], g[1][j]);
                h[2][j] = _mm256_sub_ps(g[0][j], g[1][j]);
                h[3][j] = _mm256_sub_ps(ZERO, g[1][j]);
            }
            for (int i = 0; i < 4; i++) {  /* (A g) A^T: columns a, a + b, a - b, -b */
                float *o = Gt + ((int64_t)(i * 4) * T + t0 + t) * Co + c;
                ST(o, h[i][0]);
                ST(o + T * Co, ADD(h[i][0], h[i][1]));
                ST(o + 2 * T * Co, _mm256_sub_ps(h[i][0], h[i][1]));
                ST(o + 3 * T * Co, _mm256_sub_ps(ZERO, h[i][1]));
            }
        }
    }
}

/* du[c..c+3][c0..c0+15] += sum over the tiles of v[t][c..c+3] gt[t][c0..c0+15] (one transformed position k) */
static inline void winograd_wgrad_tile(const float *v, const float *gt, float *du, int64_t tiles, int64_t Ci,
                                       int64_t Co) {
    v8 a0 = ZERO, a1 = ZERO, b0 = ZERO, b1 = ZERO, c0 = ZERO, c1 = ZERO, d0 = ZERO, d1 = ZERO;
    for (int64_t t = 0; t < tiles; t++, v += Ci, gt += Co) {
        const v8 g0 = LD(gt), g1 = LD(gt + 8);
        v8 xv = BC(v);
        a0 = FMA(xv, g0, a0); a1 = FMA(xv, g1, a1);
        xv = BC(v + 1);
        b0 = FMA(xv, g0, b0); b1 = FMA(xv, g1, b1);
        xv = BC(v + 2);
        c0 = FMA(xv, g0, c0); c1 = FMA(xv, g1, c1);
        xv = BC(v + 3);
        d0 = FMA(xv, g0, d0); d1 = FMA(xv, g1, d1);
    }
    const v8 sums[8] = {a0, a1, b0, b1, c0, c1, d0, d1};
    for (int c = 0; c < 4; c++) {
        ST(du + c * Co, ADD(LD(du + c * Co), sums[2 * c]));
        ST(du + c * Co + 8, ADD(LD(du + c * Co + 8), sums[2 * c + 1]));
    }
}

/* du (G, 16, Ci, Co) overwritten: dL/dU, to be turned into dL/dw = G^T du G by the caller */
void conv3x3_winograd_backward_weight(const float *x, const float *g, float *du, int64_t N, int64_t Hp, int64_t Wp,
                                      int64_t G, int64_t Ci, int64_t Co, int nthreads) {
    const int64_t Ho = Hp - 2, Wo = Wp - 2, CT = G * Ci, GT = G * Co, per = G * 16 * Ci * Co;
    const int64_t th = (Ho + 1) / 2, tw = (Wo + 1) / 2;
    int64_t rb = (48 + tw - 1) / tw;
    rb = rb > th ? th : rb;
    const int64_t blocks = (th + rb - 1) / rb, T = rb * tw;
    nthreads = nthr(nthreads);
    float *acc = calloc((size_t)(nthreads * (per + 16 * T * (Ci + Co))), sizeof(float));
    if (!acc) return;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *mine = acc + (int64_t)omp_get_thread_num() * (per + 16 * T * (Ci + Co));
#else
        float *mine = acc;
#endif
        float *V = mine + per, *Gt = V + 16 * T * Ci;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * blocks; task++) {
            const int64_t n = task / blocks, ty0 = (task % blocks) * rb;
            const int64_t rows = th - ty0 < rb ? th - ty0 : rb, tiles = rows * tw;
            for (int64_t gi = 0; gi < G; gi++) {
                for (int64_t r = 0; r < rows; r++) {
                    winograd_input(x + n * Hp * Wp * CT + gi * Ci, V, ty0 + r, tw, T, r * tw, Hp, Wp, CT, Ci);
                    winograd_grad_out(g + n * Ho * Wo * GT + gi * Co, Gt, ty0 + r, tw, T, r * tw, Ho, Wo, GT, Co);
                }
                for (int k = 0; k < 16; k++)
                    for (int64_t c0 = 0; c0 < Co; c0 += 16)
                        for (int64_t c = 0; c < Ci; c += 4)
                            winograd_wgrad_tile(V + (int64_t)k * T * Ci + c, Gt + (int64_t)k * T * Co + c0,
                                                mine + ((gi * 16 + k) * Ci + c) * Co + c0, tiles, Ci, Co);
            }
        }
    }
    for (int64_t q = 0; q < per; q++) {
        float tot = 0.0f;
        for (int th_ = 0; th_ < nthreads; th_++) tot += acc[th_ * (per + 16 * T * (Ci + Co)) + q];
        du[q] = tot;
    }
    free(acc);
}
