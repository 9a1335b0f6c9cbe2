/* The patch stem of compact_cnn (an s x s convolution with stride s, one group per packed member) in fp32:
 * forward and weight gradient, reading the input batch in whatever layout it arrives (strides) and writing the
 * output channels-last.
 *
 * Why: oneDNN runs this grouped convolution with 1 input channel per group at ~23 GFLOP/s and wants its input
 * channels-last, which cost the reference's step a transposing copy of the (32, 10, 256, 256) batch; together
 * ~90 ms of a ~1.2 s step on 2 Zen 3 cores (docs/performance.md). Each output position reads its s x s patches
 * once (L = cin s^2 values per member) and multiplies them by the member's (L, co) weights; the weight gradient
 * sums patch (x) output-gradient over positions into per-thread (L, co) blocks, then adds the threads' blocks.
 *
 * C with AVX2/FMA intrinsics and OpenMP, loaded by lungxray/models/kernels/patch_stem.py with ctypes:
 *   x    (n, groups * cin, h, w) float32 at element strides (sn, sc, sh, sw)
 *   wt   (groups, L, co) float32, L = cin * s * s in (c, r, q) order: PyTorch's weight transposed per group
 *   bias (groups * co) or NULL
 *   out  (n, h / s, w / s, groups * co) float32, contiguous (channels-last)
 *   dwt  (groups, L, co) weight gradient, same layout as wt;  db (groups * co) or NULL
 * co is a multiple of 8, L at most MAX_L (the Python side checks both).
 */
#include <stdint.h>
#include <stdlib.h>

#include <omp.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "patch_stem.c needs AVX2 and FMA (elsewhere the stem stays oneDNN's convolution)"
#endif
#include <immintrin.h>

#define MAX_L 64  /* values per patch: cin * s * s */
#define POS 4     /* output positions per register tile (x 2 blocks of 8 channels: 8 accumulators) */
#define LB 4      /* patch values per register tile of the weight gradient (x 2 blocks of 8 channels) */

static inline int nthr(int n) { return n > 0 ? n : 1; }

typedef struct {
    int64_t n, groups, cin, h, w, s, co, sn, sc, sh, sw;
    int64_t off[MAX_L]; /* element offset of patch value l = (c, r, q) from the patch's first value */
} Shape;

static Shape shape_of(int64_t n, int64_t groups, int64_t cin, int64_t h, int64_t w, int64_t s, int64_t co,
                      int64_t sn, int64_t sc, int64_t sh, int64_t sw) {
    Shape d = {n, groups, cin, h, w, s, co, sn, sc, sh, sw, {0}};
    int64_t l = 0;
    for (int64_t c = 0; c < cin; c++)
        for (int64_t r = 0; r < s; r++)
            for (int64_t q = 0; q < s; q++) d.off[l++] = c * sc + r * sh + q * sw;
    return d;
}

/* The first value of member k's patch under output (i, j) of image xn. */
static inline const float *patch_at(const float *xn, const Shape *d, int64_t k, int64_t i, int64_t j) {
    return xn + k * d->cin * d->sc + i * d->s * d->sh + j * d->s * d->sw;
}

/* out_t[o0 : o0 + 8 nb] for npos positions t (patches p_t): bias plus sum over l of p_t[off[l]] * w[l][o]. */
static inline __attribute__((always_inline)) void forward_tile(const float *const *p, const int npos, const Shape *d,
                                                               const float *wk, const float *b, int64_t L,
                                                               float *const *outs, int64_t o0, const int nb) {
    __m256 acc[POS][2];
    for (int c = 0; c < nb; c++) {
        const __m256 init = b ? _mm256_loadu_ps(b + o0 + 8 * c) : _mm256_setzero_ps();
        for (int t = 0; t < POS; t++) acc[t][c] = init;
    }
    for (int64_t l = 0; l < L; l++) {
        const int64_t off = d->off[l];
        __m256 wv[2];
        for (int c = 0; c < nb; c++) wv[c] = _mm256_loadu_ps(wk + l * d->co + o0 + 8 * c);
        for (int t = 0; t < npos; t++) {
            const __m256 v = _mm256_broadcast_ss(p[t] + off);
            for (int c = 0; c < nb; c++) acc[t][c] = _mm256_fmadd_ps(v, wv[c], acc[t][c]);
        }
    }
    for (int t = 0; t < npos; t++)
        for (int c = 0; c < nb; c++) _mm256_storeu_ps(outs[t] + o0 + 8 * c, acc[t][c]);
}

/* All output channels of member k at npos positions: blocks of 16 channels, then one of 8 if co % 16 == 8. */
static inline __attribute__((always_inline)) void forward_positions(const float *const *p, const int npos,
                                                                    const Shape *d, const float *wk,
                                                                    const float *b, float *const *outs) {
    const int64_t L = d->cin * d->s * d->s;
    int64_t o0 = 0;
    for (; o0 + 16 <= d->co; o0 += 16) forward_tile(p, npos, d, wk, b, L, outs, o0, 2);
    if (o0 < d->co) forward_tile(p, npos, d, wk, b, L, outs, o0, 1);
}

int patch_stem_forward(const float *x, const float *wt, const float *bias, float *out, int64_t n,
                       int64_t groups, int64_t cin, int64_t h, int64_t w, int64_t s, int64_t co, int64_t sn,
                       int64_t sc, int64_t sh, int64_t sw, int nthreads) {
    const Shape d = shape_of(n, groups, cin, h, w, s, co, sn, sc, sh, sw);
    const int64_t ho = h / s, wo = w / s, L = cin * s * s, ct = groups * co;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthr(nthreads))
    for (int64_t b = 0; b < n; b++)
        for (int64_t i = 0; i < ho; i++) {
            const float *p[POS];
            float *outs[POS];
            float *orow = out + (b * ho + i) * wo * ct;
            for (int64_t k = 0; k < groups; k++) {
                const float *wk = wt + k * L * co, *bk = bias ? bias + k * co : NULL;
                int64_t j0 = 0;
                for (; j0 < wo; j0 += POS) {
                    const int npos = (int)(wo - j0 < POS ? wo - j0 : POS);
                    for (int t = 0; t < npos; t++) {
                        p[t] = patch_at(x + b * sn, &d, k, i, j0 + t);
                        outs[t] = orow + (j0 + t) * ct + k * co;
                    }
                    if (npos == POS)
                        forward_positions(p, POS, &d, wk, bk, outs);
                    else
                        forward_positions(p, npos, &d, wk, bk, outs);
                }
            }
        }
    return 0;
}

/* dw[l0 + u][o0 : o0 + 8 nb] += sum over the row's wo positions j of patch_j[off[l0 + u]] * g_j[o0 : o0 + 8 nb],
 * u < nl: the sums stay in registers over the whole row. */
static inline __attribute__((always_inline)) void wgrad_tile(const float *p0, int64_t pstep, const float *g,
                                                             int64_t gstep, int64_t wo, const Shape *d, int64_t l0,
                                                             const int nl, int64_t o0, const int nb, float *dwk) {
    __m256 acc[LB][2];
    for (int u = 0; u < LB; u++)
        for (int c = 0; c < 2; c++) acc[u][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < wo; j++) {
        const float *pj = p0 + j * pstep, *gj = g + j * gstep + o0;
        __m256 gv[2];
        for (int c = 0; c < nb; c++) gv[c] = _mm256_loadu_ps(gj + 8 * c);
        for (int u = 0; u < nl; u++) {
            const __m256 v = _mm256_broadcast_ss(pj + d->off[l0 + u]);
            for (int c = 0; c < nb; c++) acc[u][c] = _mm256_fmadd_ps(v, gv[c], acc[u][c]);
        }
    }
    for (int u = 0; u < nl; u++)
        for (int c = 0; c < nb; c++) {
            float *dst = dwk + (l0 + u) * d->co + o0 + 8 * c;
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[u][c]));
        }
}

/* Member k's weight (and bias) gradient from one output row i of image xn. */
static void wgrad_row(const float *xn, const Shape *d, const float *grow, int64_t i, int64_t k, float *dwk,
                      float *dbk) {
    const int64_t wo = d->w / d->s, L = d->cin * d->s * d->s, co = d->co, ct = d->groups * co;
    const float *p0 = patch_at(xn, d, k, i, 0), *g = grow + k * co;
    const int64_t pstep = d->s * d->sw;
    for (int64_t o0 = 0; o0 < co; o0 += 16) {
        const int nb = co - o0 >= 16 ? 2 : 1;
        int64_t l0 = 0;
        for (; l0 + LB <= L; l0 += LB) wgrad_tile(p0, pstep, g, ct, wo, d, l0, LB, o0, nb, dwk);
        if (l0 < L) wgrad_tile(p0, pstep, g, ct, wo, d, l0, (int)(L - l0), o0, nb, dwk);
    }
    if (dbk)
        for (int64_t j = 0; j < wo; j++)
            for (int64_t o = 0; o < co; o++) dbk[o] += g[j * ct + o];
}

int patch_stem_backward_weight(const float *x, const float *g, float *dwt, float *db, int64_t n, int64_t groups,
                               int64_t cin, int64_t h, int64_t w, int64_t s, int64_t co, int64_t sn, int64_t sc,
                               int64_t sh, int64_t sw, int nthreads) {
    const Shape d = shape_of(n, groups, cin, h, w, s, co, sn, sc, sh, sw);
    const int64_t ho = h / s, wo = w / s, L = cin * s * s, per = groups * (L + 1) * co; /* dw and db per thread */
    const int nt = nthr(nthreads);
    float *acc = calloc((size_t)(nt * per), sizeof(float));
    if (!acc) return -1;
#pragma omp parallel num_threads(nt)
    {
        float *mine = acc + (int64_t)omp_get_thread_num() * per;
#pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < n; b++)
            for (int64_t i = 0; i < ho; i++) {
                const float *grow = g + (b * ho + i) * wo * groups * co;
                for (int64_t k = 0; k < groups; k++)
                    wgrad_row(x + b * sn, &d, grow, i, k, mine + k * L * co,
                              db ? mine + groups * L * co + k * co : NULL);
            }
    }
    const int64_t ndw = groups * L * co;
    for (int64_t e = 0; e < ndw; e++) {
        float v = 0.0f;
        for (int t = 0; t < nt; t++) v += acc[t * per + e];
        dwt[e] = v;
    }
    if (db)
        for (int64_t e = 0; e < groups * co; e++) {
            float v = 0.0f;
            for (int t = 0; t < nt; t++) v += acc[t * per + ndw + e];
            db[e] = v;
        }
    free(acc);
    return 0;
}
