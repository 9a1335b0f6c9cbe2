/* The training augmentation's resampling in one pass: gather uint8 images by index, map every output pixel
 * through its image's affine matrix, sample bilinearly with the coordinates clamped to the image (Keras's
 * fill_mode="nearest", grid_sample's padding_mode="border") and write the standardised float value.
 *
 * Why: the PyTorch path builds an (N, H, W, 2) coordinate grid (two strided broadcast adds, ~130 ms per step of
 * the reference's 320 images of 256x256 on 2 Zen 3 cores), samples it with grid_sample (~125 ms) and converts and
 * standardises the gathered images first (~45 ms); here the coordinates are computed where they are used and the
 * source stays uint8 (docs/performance.md, "the augmentation's resampling in one pass").
 *
 * C with AVX2/FMA intrinsics and OpenMP, loaded by lungxray/models/kernels/warp.py with ctypes:
 *   src  (n_src, h, w) uint8, contiguous        rows (n,) int64: the source image of each output
 *   mat  (n, 6) float64: output (row i, column j) -> input column ix = m0*j + m1*i + m2, row iy = m3*j + m4*i + m5
 *   out  (n, h, w) float32 = bilinear(src[rows[k]], iy, ix) * scale + shift
 * h and w at least 2 (the Python side checks).
 */
#include <math.h>
#include <stdint.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "warp.c needs AVX2 and FMA (elsewhere the augmentation stays grid_sample)"
#endif
#include <immintrin.h>

static inline float clampf(float v, float hi) { return fminf(fmaxf(v, 0.0f), hi); }

/* One output pixel, the reference for the vector loop's arithmetic (same clamps, same order of operations). */
static inline float sample_one(const uint8_t *img, int64_t h, int64_t w, float x, float y) {
    x = clampf(x, (float)(w - 1));
    y = clampf(y, (float)(h - 1));
    const float fx = fminf(floorf(x), (float)(w - 2)), fy = fminf(floorf(y), (float)(h - 2));
    const float wx = x - fx, wy = y - fy; /* x0 <= w - 2: the right neighbour exists (weight 1 at the edge) */
    const uint8_t *p = img + (int64_t)fy * w + (int64_t)fx;
    const float top = fmaf(wx, (float)p[1] - (float)p[0], (float)p[0]);
    const float bot = fmaf(wx, (float)p[w + 1] - (float)p[w], (float)p[w]);
    return fmaf(wy, bot - top, top);
}

static void row_scalar(const uint8_t *img, int64_t h, int64_t w, float *o, int64_t j0, float rx, float ry,
                       float ax, float ay, float scale, float shift) {
    for (int64_t j = j0; j < w; j++)
        o[j] = fmaf(sample_one(img, h, w, fmaf(ax, (float)j, rx), fmaf(ay, (float)j, ry)), scale, shift);
}

/* Eight pixels at a time. The two horizontal neighbours of a pixel come from one 32-bit gather at (y0, x0):
 * its bytes 0 and 1. Such a load reads up to two bytes past x0 + 1, which is why the caller sends the buffer's
 * last image, whose last row ends the buffer, to row_scalar instead. */
static void row_vector(const uint8_t *img, int64_t h, int64_t w, float *o, float rx, float ry, float ax,
                       float ay, float scale, float shift) {
    const __m256 vax = _mm256_set1_ps(ax), vay = _mm256_set1_ps(ay), vrx = _mm256_set1_ps(rx),
                 vry = _mm256_set1_ps(ry), zero = _mm256_setzero_ps(), xmax = _mm256_set1_ps((float)(w - 1)),
                 ymax = _mm256_set1_ps((float)(h - 1)), x0max = _mm256_set1_ps((float)(w - 2)),
                 y0max = _mm256_set1_ps((float)(h - 2)), vscale = _mm256_set1_ps(scale),
                 vshift = _mm256_set1_ps(shift), step = _mm256_set1_ps(8.0f);
    const __m256i vw = _mm256_set1_epi32((int)w), low = _mm256_set1_epi32(0xff);
    __m256 vj = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t j = 0;
    for (; j + 8 <= w; j += 8, vj = _mm256_add_ps(vj, step)) {
        /* max first: _mm256_max_ps returns its second operand for NaN, so a NaN coordinate reads pixel 0 */
        const __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_fmadd_ps(vax, vj, vrx), zero), xmax);
        const __m256 y = _mm256_min_ps(_mm256_max_ps(_mm256_fmadd_ps(vay, vj, vry), zero), ymax);
        const __m256 fx = _mm256_min_ps(_mm256_floor_ps(x), x0max), fy = _mm256_min_ps(_mm256_floor_ps(y), y0max);
        const __m256 wx = _mm256_sub_ps(x, fx), wy = _mm256_sub_ps(y, fy);
        const __m256i off = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_cvttps_epi32(fy), vw), _mm256_cvttps_epi32(fx));
        const __m256i g0 = _mm256_i32gather_epi32((const int *)img, off, 1);
        const __m256i g1 = _mm256_i32gather_epi32((const int *)img, _mm256_add_epi32(off, vw), 1);
        const __m256 p00 = _mm256_cvtepi32_ps(_mm256_and_si256(g0, low));
        const __m256 p01 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(g0, 8), low));
        const __m256 p10 = _mm256_cvtepi32_ps(_mm256_and_si256(g1, low));
        const __m256 p11 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(g1, 8), low));
        const __m256 top = _mm256_fmadd_ps(wx, _mm256_sub_ps(p01, p00), p00);
        const __m256 bot = _mm256_fmadd_ps(wx, _mm256_sub_ps(p11, p10), p10);
        const __m256 v = _mm256_fmadd_ps(wy, _mm256_sub_ps(bot, top), top);
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(v, vscale, vshift));
    }
    row_scalar(img, h, w, o, j, rx, ry, ax, ay, scale, shift);
}

int warp_affine_u8(const uint8_t *src, const int64_t *rows, const double *mat, float *out, int64_t n_src,
                   int64_t n, int64_t h, int64_t w, float scale, float shift, int nthreads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t k = 0; k < n; k++) {
        for (int64_t i = 0; i < h; i++) {
            const double *m = mat + 6 * k;
            const uint8_t *img = src + rows[k] * h * w;
            float *o = out + (k * h + i) * w;
            const float rx = (float)(m[1] * (double)i + m[2]), ry = (float)(m[4] * (double)i + m[5]);
            if (rows[k] == n_src - 1)
                row_scalar(img, h, w, o, 0, rx, ry, (float)m[0], (float)m[3], scale, shift);
            else
                row_vector(img, h, w, o, rx, ry, (float)m[0], (float)m[3], scale, shift);
        }
    }
    return 0;
}
