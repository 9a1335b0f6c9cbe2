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
 *   x    (N, Hp, Wp, G*Ci)   input, already zero-padded (valid convolution on it); the Winograd functions
 *                            take it unpadded, (N, H, W, G*Ci) with `pad`, and read zeros outside it
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

int conv3x3_forward(const float *x, const float *w, const float *bias, float *out, int64_t N, int64_t Hp,
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
    return 0;
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
int conv3x3_backward_weight(const float *x, const float *g, float *dw, float *db, int64_t N, int64_t Hp,
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
    if (!acc) return -1;
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
    return 0;
}

/* ------------------------------------------------------------------ Winograd F(m x m, 3x3), m = 2 or 4
 * The same convolution as conv3x3_forward, on m x m output tiles from (m+2) x (m+2) input tiles (a = m + 2):
 * V = B^T d B per tile and input channel, M = V . U per transformed position (a^2 small GEMMs over the input
 * channels, U = G w G^T precomputed by the caller as (G, a^2, Co/16, Ci, 16)), Y = A^T M A. Multiplies per
 * output: 9 direct, 4 with F(2x2, 3x3), 2.25 with F(4x4, 3x3) (Lavin & Gray 2016, points 0, +-1, +-2); the
 * transforms are additions and small constant multiplies. Rounding differs from the direct sum by a few ulps for m = 2 and a few more for
 * m = 4 (its transforms scale by up to 8), well inside float noise for these layers (tests/test_conv3x3.py).
 * Needs Ci a multiple of 8 and Co of 16. Tiles past the output's last row or column read zeros. */

/* B^T along one line of a tile: a inputs -> a outputs */
static inline __attribute__((always_inline)) void bt_line(const v8 *d, v8 *o, const int m) {
    if (m == 2) {
        o[0] = _mm256_sub_ps(d[0], d[2]);
        o[1] = ADD(d[1], d[2]);
        o[2] = _mm256_sub_ps(d[2], d[1]);
        o[3] = _mm256_sub_ps(d[1], d[3]);
        return;
    }
    const v8 four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f), two = _mm256_set1_ps(2.0f);
    const v8 p = _mm256_sub_ps(d[4], d[2]), q = _mm256_sub_ps(d[1], d[3]);
    const v8 s12 = ADD(d[1], d[2]), s34 = ADD(d[3], d[4]), d12 = _mm256_sub_ps(d[1], d[2]);
    const v8 d43 = _mm256_sub_ps(d[4], d[3]);
    o[0] = _mm256_fnmadd_ps(five, d[2], FMA(four, d[0], d[4]));
    o[1] = _mm256_fnmadd_ps(four, s12, s34);
    o[2] = FMA(four, d12, d43);
    o[3] = _mm256_fnmadd_ps(two, q, p);
    o[4] = FMA(two, q, p);
    o[5] = _mm256_fnmadd_ps(five, d[3], FMA(four, d[1], d[5]));
}

/* A^T along one line: a inputs -> m outputs */
static inline __attribute__((always_inline)) void at_line(const v8 *s, v8 *y, const int m) {
    if (m == 2) {
        y[0] = ADD(ADD(s[0], s[1]), s[2]);
        y[1] = _mm256_sub_ps(_mm256_sub_ps(s[1], s[2]), s[3]);
        return;
    }
    const v8 a12 = ADD(s[1], s[2]), d12 = _mm256_sub_ps(s[1], s[2]);
    const v8 a34 = ADD(s[3], s[4]), d34 = _mm256_sub_ps(s[3], s[4]);
    y[0] = ADD(ADD(s[0], a12), a34);
    y[1] = FMA(_mm256_set1_ps(2.0f), d34, d12);
    y[2] = FMA(_mm256_set1_ps(4.0f), a34, a12);
    y[3] = ADD(FMA(_mm256_set1_ps(8.0f), d34, d12), s[5]);
}

/* A along one line (the output gradient's transform): m inputs -> a outputs */
static inline __attribute__((always_inline)) void a_line(const v8 *g, v8 *o, const int m) {
    if (m == 2) {
        o[0] = g[0];
        o[1] = ADD(g[0], g[1]);
        o[2] = _mm256_sub_ps(g[0], g[1]);
        o[3] = _mm256_sub_ps(ZERO, g[1]);
        return;
    }
    const v8 e = ADD(g[0], g[2]), f = ADD(g[1], g[3]);
    const v8 e4 = FMA(_mm256_set1_ps(4.0f), g[2], g[0]), f8 = FMA(_mm256_set1_ps(8.0f), g[3], ADD(g[1], g[1]));
    o[0] = g[0];
    o[1] = ADD(e, f);
    o[2] = _mm256_sub_ps(e, f);
    o[3] = ADD(e4, f8);
    o[4] = _mm256_sub_ps(e4, f8);
    o[5] = g[3];
}

/* one input value of a tile: row r, column col of an unpadded H x W image, 8 channels; zero outside it (the
 * convolution's zero padding, and the far side of the last tiles) */
static inline v8 load_d(const float *x, int64_t r, int64_t col, int64_t H, int64_t W, int64_t CT) {
    if (r < 0 || col < 0 || r >= H || col >= W) return ZERO;
    return LD(x + (r * W + col) * CT);
}

/* V[k] = (B^T d B)[k] of the tile whose top left input is (r0, col0) (negative in the padding), 8 channels, k
 * planes `stride` apart */
static inline __attribute__((always_inline)) void input_tile(const float *xn, float *v, int64_t stride, int64_t r0,
                                                             int64_t col0, int64_t H, int64_t W, int64_t CT,
                                                             const int m) {
    const int a = m + 2;
    v8 rows[6][6];
    for (int i = 0; i < a; i++) {
        v8 d[6];
        for (int j = 0; j < a; j++) d[j] = load_d(xn, r0 + i, col0 + j, H, W, CT);
        bt_line(d, rows[i], m);
    }
    for (int j = 0; j < a; j++) {
        v8 col[6], o[6];
        for (int i = 0; i < a; i++) col[i] = rows[i][j];
        bt_line(col, o, m);
        for (int i = 0; i < a; i++) ST(v + (i * a + j) * stride, o[i]);
    }
}

/* Y = A^T M A (+ bias) of one tile, 8 channels (M planes `stride` apart), written where inside the output */
static inline __attribute__((always_inline)) void output_tile(const float *mk, int64_t stride, v8 bias, float *on,
                                                              int64_t y0, int64_t x0, int64_t Ho, int64_t Wo,
                                                              int64_t GT, const int m) {
    const int a = m + 2;
    v8 s[6][4];
    for (int i = 0; i < a; i++) {
        v8 row[6];
        for (int j = 0; j < a; j++) row[j] = LD(mk + (i * a + j) * stride);
        at_line(row, s[i], m);
    }
    for (int j = 0; j < m; j++) {
        if (x0 + j >= Wo) break;
        v8 col[6], y[4];
        for (int i = 0; i < a; i++) col[i] = s[i][j];
        at_line(col, y, m);
        for (int i = 0; i < m && y0 + i < Ho; i++) ST(on + ((y0 + i) * Wo + x0 + j) * GT, ADD(y[i], bias));
    }
}

/* Gt[k] = (A g A^T)[k] of the output-gradient tile at (y0, x0), 8 channels; g outside the output is zero */
static inline __attribute__((always_inline)) void grad_tile(const float *gn, float *gt, int64_t stride, int64_t y0,
                                                            int64_t x0, int64_t Ho, int64_t Wo, int64_t GT,
                                                            const int m) {
    const int a = m + 2;
    v8 r[4][6];
    for (int i = 0; i < m; i++) {
        v8 g[4];
        for (int j = 0; j < m; j++)
            g[j] = (y0 + i < Ho && x0 + j < Wo) ? LD(gn + ((y0 + i) * Wo + x0 + j) * GT) : ZERO;
        a_line(g, r[i], m);
    }
    for (int j = 0; j < a; j++) {
        v8 col[4], o[6];
        for (int i = 0; i < m; i++) col[i] = r[i][j];
        a_line(col, o, m);
        for (int i = 0; i < a; i++) ST(gt + (i * a + j) * stride, o[i]);
    }
}

/* M[t][0..15] = sum_c V[t][c] U[c][c0..c0+15] for R tiles (one transformed position) */
static inline __attribute__((always_inline)) void winograd_gemm_tile(const float *v, const float *u, float *m,
                                                                     int64_t Ci, int64_t Co, const int R) {
    v8 a0[RPOS], a1[RPOS];
    for (int r = 0; r < R; r++) { a0[r] = ZERO; a1[r] = ZERO; }
    for (int64_t c = 0; c < Ci; c++, v++, u += 16) {
        const v8 w0 = LD(u), w1 = LD(u + 8);
        for (int r = 0; r < R; r++) {
            const v8 xv = BC(v + r * Ci);
            a0[r] = FMA(xv, w0, a0[r]);
            a1[r] = FMA(xv, w1, a1[r]);
        }
    }
    for (int r = 0; r < R; r++) { ST(m + r * 16, a0[r]); ST(m + r * 16 + 8, a1[r]); }
}

/* all K positions, for the first `tw` of the T tiles, output channels c0..c0+15 */
static void winograd_gemm(const float *V, const float *U, float *M, int64_t tw, int64_t T, int64_t Ci, int64_t Co,
                          int64_t c0, int K) {
    for (int k = 0; k < K; k++) {
        const float *v = V + (int64_t)k * T * Ci, *u = U + (int64_t)k * Ci * Co + c0 * Ci; /* block c0 / 16 */
        float *mk = M + (int64_t)k * T * 16;
        int64_t t = 0;
        for (; t + RPOS <= tw; t += RPOS) winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, RPOS);
        switch (tw - t) {
            case 5: winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, 5); break;
            case 4: winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, 4); break;
            case 3: winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, 3); break;
            case 2: winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, 2); break;
            case 1: winograd_gemm_tile(v + t * Ci, u, mk + t * 16, Ci, Co, 1); break;
            default: break;
        }
    }
}

/* The tiles of a layer, as rows of tiles over the whole batch (image n = q / th, tile row q % th); the input is
 * H x W, zero-padded by `pad` (0, 1 or 2) on every side where the tiles read it */
typedef struct { int64_t H, W, pad, Ho, Wo, th, tw, rows; } tiling;

static tiling tiles_of(int64_t N, int64_t H, int64_t W, int64_t pad, int m) {
    tiling t = {H, W, pad, H + 2 * pad - 2, W + 2 * pad - 2, 0, 0, 0};
    t.th = (t.Ho + m - 1) / m;
    t.tw = (t.Wo + m - 1) / m;
    t.rows = N * t.th;
    return t;
}

/* Tile rows per forward task: enough tiles to reuse U across them, few enough that V (K x tiles x Ci) stays near
 * 384 KB, inside L2 with the U columns in use */
static int64_t rows_per_task(const tiling *tl, int K, int64_t Ci) {
    int64_t tiles = 98304 / (K * Ci);
    int64_t rb = tiles / tl->tw;
    rb = rb < 1 ? 1 : rb;
    return rb > tl->rows ? tl->rows : rb;
}

/* One forward task: tile rows q0.. (`rows` of them) of group gi, through V (K x T x Ci) and M (K x T x 16) */
static inline __attribute__((always_inline)) void forward_task(const float *x, const float *ug, const float *bias,
                                                               float *out, float *V, float *M, const tiling *tl,
                                                               int64_t q0, int64_t rows, int64_t T, int64_t gi,
                                                               int64_t G, int64_t Ci, int64_t Co, const int m) {
    const int K = (m + 2) * (m + 2);
    const int64_t CT = G * Ci, GT = G * Co;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t n = (q0 + r) / tl->th, ty = (q0 + r) % tl->th;
        const float *xn = x + n * tl->H * tl->W * CT + gi * Ci;
        for (int64_t t = 0; t < tl->tw; t++)
            for (int64_t c = 0; c < Ci; c += 8)
                input_tile(xn + c, V + (r * tl->tw + t) * Ci + c, T * Ci, ty * m - tl->pad, t * m - tl->pad, tl->H,
                           tl->W, CT, m);
    }
    for (int64_t c0 = 0; c0 < Co; c0 += 16) {
        winograd_gemm(V, ug, M, rows * tl->tw, T, Ci, Co, c0, K);
        for (int h = 0; h < 2; h++) {
            const v8 b = bias ? LD(bias + gi * Co + c0 + 8 * h) : ZERO;
            for (int64_t r = 0; r < rows; r++) {
                const int64_t n = (q0 + r) / tl->th, ty = (q0 + r) % tl->th;
                float *on = out + n * tl->Ho * tl->Wo * GT + gi * Co + c0 + 8 * h;
                for (int64_t t = 0; t < tl->tw; t++)
                    output_tile(M + (r * tl->tw + t) * 16 + 8 * h, T * 16, b, on, ty * m, t * m, tl->Ho, tl->Wo, GT,
                                m);
            }
        }
    }
}

/* u (G, (m+2)^2, Co/16, Ci, 16) from the caller's G w G^T, each block of 16 output channels contiguous (the GEMM
 * streams it; ~10% faster than rows of Co, measured); m is 2 or 4 (anything else writes nothing). One task per block
 * of tile rows of one group, group-major, so that a thread's consecutive tasks share U. */
int conv3x3_winograd_forward(const float *x, const float *u, const float *bias, float *out, int64_t N, int64_t H,
                             int64_t W, int64_t G, int64_t Ci, int64_t Co, int64_t pad, int m, int nthreads) {
    if (m != 2 && m != 4) return -2; /* no such tile */
    const int K = (m + 2) * (m + 2);
    const tiling tl = tiles_of(N, H, W, pad, m);
    const int64_t rb = rows_per_task(&tl, K, Ci), T = rb * tl.tw, blocks = (tl.rows + rb - 1) / rb;
    nthreads = nthr(nthreads);
    float *work = malloc((size_t)(nthreads * K * T * (Ci + 16)) * sizeof(float));
    if (!work) return -1;
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
        float *V = work + (int64_t)omp_get_thread_num() * K * T * (Ci + 16);
#else
        float *V = work;
#endif
        float *M = V + K * T * Ci;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < G * blocks; task++) {
            const int64_t gi = task / blocks, q0 = (task % blocks) * rb;
            const int64_t rows = tl.rows - q0 < rb ? tl.rows - q0 : rb;
            const float *ug = u + gi * K * Ci * Co;
            if (m == 2) forward_task(x, ug, bias, out, V, M, &tl, q0, rows, T, gi, G, Ci, Co, 2);
            else forward_task(x, ug, bias, out, V, M, &tl, q0, rows, T, gi, G, Ci, Co, 4);
        }
    }
    free(work);
    return 0;
}

/* ------------------------------------------------------------------------- Winograd weight gradient
 * Forward is Y = A^T [(G w G^T) . (B^T d B)] A per tile, so with the output gradient g of a tile,
 * dL/dU = sum over tiles of (B^T d B) . (A g A^T), and dL/dw = G^T (dL/dU) G (done by the caller on the small
 * (G, K, Ci, Co) result). In two phases per group: the transforms of every tile of the batch into k-major scratch
 * (V as (K, tiles, Ci); Gt as (K, Co/16, tiles, 16), so that a GEMM reads its 16 output channels contiguously: 10-20%
 * faster than rows of Co on the 16-32 px layers), then per (k, 16 output channels) one GEMM with the tiles as the
 * reduction, written straight to du (no per-thread copies of du to add up: for 128 channels and m = 4 those were
 * 24 MB a thread). */

/* du[c..c+R-1][0..15] += sum over the tiles of v[t][c..c+R-1] gt[t][0..15] (one transformed position): R up to 6
 * input channels x 16 output channels in 12 accumulators, 2 loads + R broadcasts per 2R FMAs */
static inline __attribute__((always_inline)) void winograd_wgrad_tile(const float *v, const float *gt, float *du,
                                                                      int64_t tiles, int64_t Ci, int64_t Co,
                                                                      const int R) {
    v8 a0[RPOS], a1[RPOS];
    for (int r = 0; r < R; r++) { a0[r] = ZERO; a1[r] = ZERO; }
    for (int64_t t = 0; t < tiles; t++, v += Ci, gt += 16) {
        const v8 g0 = LD(gt), g1 = LD(gt + 8);
        for (int r = 0; r < R; r++) {
            const v8 xv = BC(v + r);
            a0[r] = FMA(xv, g0, a0[r]);
            a1[r] = FMA(xv, g1, a1[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        ST(du + r * Co, ADD(LD(du + r * Co), a0[r]));
        ST(du + r * Co + 8, ADD(LD(du + r * Co + 8), a1[r]));
    }
}

/* all Ci input channels of one (k, 16 output channels) block, over `tiles` tiles: blocks of 6, then the even rest */
static void winograd_wgrad_block(const float *v, const float *gt, float *du, int64_t tiles, int64_t Ci, int64_t Co) {
    int64_t c = 0;
    for (; c + RPOS <= Ci; c += RPOS) winograd_wgrad_tile(v + c, gt, du + c * Co, tiles, Ci, Co, RPOS);
    switch (Ci - c) {
        case 4: winograd_wgrad_tile(v + c, gt, du + c * Co, tiles, Ci, Co, 4); break;
        case 2: winograd_wgrad_tile(v + c, gt, du + c * Co, tiles, Ci, Co, 2); break;
        default: break;  /* Ci is a multiple of 8: the rest is 0, 2 or 4 */
    }
}

#define WGRAD_CHUNK 256 /* tiles summed per pass over a (k, 16 channels) block: its V and Gt columns stay in L1/L2 */

/* the transforms of tile row q of group gi: V and Gt at tile index q * tw.., k planes `total` tiles apart */
static inline __attribute__((always_inline)) void wgrad_transform_row(const float *x, const float *g, float *V,
                                                                      float *Gt, const tiling *tl, int64_t q,
                                                                      int64_t total, int64_t gi, int64_t G, int64_t Ci,
                                                                      int64_t Co, const int m) {
    const int64_t CT = G * Ci, GT = G * Co, n = q / tl->th, ty = q % tl->th;
    const float *xn = x + n * tl->H * tl->W * CT + gi * Ci, *gn = g + n * tl->Ho * tl->Wo * GT + gi * Co;
    for (int64_t t = 0; t < tl->tw; t++) {
        const int64_t at = q * tl->tw + t;
        for (int64_t c = 0; c < Ci; c += 8)
            input_tile(xn + c, V + at * Ci + c, total * Ci, ty * m - tl->pad, t * m - tl->pad, tl->H, tl->W, CT, m);
        for (int64_t c = 0; c < Co; c += 8)
            grad_tile(gn + c, Gt + ((c / 16) * total + at) * 16 + c % 16, total * Co, ty * m, t * m, tl->Ho, tl->Wo,
                      GT, m);
    }
}

/* du (G, (m+2)^2, Ci, Co) overwritten: dL/dU, to be turned into dL/dw = G^T du G by the caller; m is 2 or 4 */
int conv3x3_winograd_backward_weight(const float *x, const float *g, float *du, int64_t N, int64_t H, int64_t W,
                                     int64_t G, int64_t Ci, int64_t Co, int64_t pad, int m, int nthreads) {
    if (m != 2 && m != 4) return -2; /* no such tile */
    const int K = (m + 2) * (m + 2);
    const tiling tl = tiles_of(N, H, W, pad, m);
    const int64_t total = tl.rows * tl.tw, blocks = Co / 16;
    float *V = malloc((size_t)(K * total * (Ci + Co)) * sizeof(float));
    if (!V) return -1;
    float *Gt = V + K * total * Ci;
    nthreads = nthr(nthreads);
    memset(du, 0, (size_t)(G * K * Ci * Co) * sizeof(float));
    for (int64_t gi = 0; gi < G; gi++) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t q = 0; q < tl.rows; q++) {
            if (m == 2) wgrad_transform_row(x, g, V, Gt, &tl, q, total, gi, G, Ci, Co, 2);
            else wgrad_transform_row(x, g, V, Gt, &tl, q, total, gi, G, Ci, Co, 4);
        }
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t task = 0; task < K * blocks; task++) {
            const int64_t k = task / blocks, c0 = (task % blocks) * 16;
            float *d = du + (gi * K + k) * Ci * Co + c0;
            for (int64_t t0 = 0; t0 < total; t0 += WGRAD_CHUNK) {
                const int64_t n = total - t0 < WGRAD_CHUNK ? total - t0 : WGRAD_CHUNK;
                const float *v = V + (k * total + t0) * Ci, *gt = Gt + k * total * Co + (c0 / 16 * total + t0) * 16;
                winograd_wgrad_block(v, gt, d, n, Ci, Co);
            }
        }
    }
    free(V);
    return 0;
}
