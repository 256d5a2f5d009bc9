/* Window products of M-FAC at memory speed on CPU: G x and beta x + alpha G^T a; and the two
 * small factorisations the Fisher inverses are built from (factor_shift for the window's m x m
 * factor; gram_update and inverse_factors for the blocks of a block-diagonal inverse, at the end
 * of the file).
 *
 * Two storage forms, both read-only here:
 *   dense_*   rows of a window stored in bfloat16, (m, d) row-major;
 *   sparse_*  rows stored as (value, offset) pairs, the same number of entries of every row in
 *             each block of `block` coordinates: the entries of block b are positions
 *             starts[b] .. starts[b+1]-1 of every row, and offsets (int16) count from b * block.
 * Values are float32 or bfloat16 (value_kind 0 or 1); x, a and the results are float32, except
 * the dot products G x, which come back in float64 (float32 within a block, float64 across
 * blocks).
 *
 * Why blocks: x and the accumulator of G^T a are read in column blocks small enough to stay in
 * the core's cache while every row streams past, so the window is read once per product and x
 * (or the result) is not re-read per row. The window is then the only traffic, and a bfloat16
 * window moves half the bytes of a float32 one.
 *
 * Threads: OpenMP over blocks when compiled with -fopenmp (num_threads is the caller's).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Dense rows are read in column blocks of 8192 to 65536 coordinates (see dense_block): long enough
 * runs of each row for the hardware prefetchers, x's block (or the accumulator's) small enough to
 * stay in the core's L2 cache; PREFETCH is how far ahead (in values) each row is prefetched. */
#define DENSE_BLOCK_MIN 8192
#define DENSE_BLOCK_MAX 65536
#define PREFETCH 1024

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Row kernels over n columns: four rows share each load of x (dots) or of the accumulator (axpy).
 * Vectors of W floats: with AVX-512, 16 bfloat16 values widen to floats by a zero-extension and a
 * shift (two instructions per 16 values); with AVX and FMA (no AVX2 needed), 8 by interleaving them
 * with zeros (two per 8); with SSE2 alone (every x86-64), 4; otherwise a portable loop. The width is chosen
 * when the library is built for this CPU (-march=native), so each CPU gets its widest vectors. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define ROW_KERNELS_W 16
typedef __m512 vfloat;
static inline vfloat load_bf16(const uint16_t *p) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VZERO() _mm512_setzero_ps()
#define VSET1(a) _mm512_set1_ps(a)
#define VSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX__) && defined(__FMA__)
#include <immintrin.h>
#define ROW_KERNELS_W 8
typedef __m256 vfloat;
static inline vfloat load_bf16(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p), zero = _mm_setzero_si128();
    __m128 lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, v)), hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, v));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VZERO() _mm256_setzero_ps()
#define VSET1(a) _mm256_set1_ps(a)
#define VSUM(v) sum8(v)
#elif defined(__SSE2__)
/* Every x86-64 has SSE2: 4 values widen by interleaving them with zeros, and a multiply and an add
 * stand in for the fused multiply-add. Built for SSE only on the Xeon (d = 1M, m = 256), a bfloat16
 * push measured 0.55 of the float32 floor with this path (as with AVX2 or AVX-512: the push is
 * bound by memory) and 1.2-1.3 with the portable loops below. */
#include <emmintrin.h>
#define ROW_KERNELS_W 4
typedef __m128 vfloat;
static inline vfloat load_bf16(const uint16_t *p) {
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i *)p)));
}
static inline float sum4(__m128 v) {
    __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#define VLOAD(p) _mm_loadu_ps(p)
#define VSTORE(p, v) _mm_storeu_ps(p, v)
#define VFMA(a, b, c) _mm_add_ps(_mm_mul_ps(a, b), c)
#define VZERO() _mm_setzero_ps()
#define VSET1(a) _mm_set1_ps(a)
#define VSUM(v) sum4(v)
#endif

/* The vector width the library was built with (0: portable loops), for mfac.kernels.status(). */
int row_vector_width(void) {
#ifdef ROW_KERNELS_W
    return ROW_KERNELS_W;
#else
    return 0;
#endif
}

static inline void dot_rows4(const uint16_t *r0, const uint16_t *r1, const uint16_t *r2, const uint16_t *r3,
                             const float *x, int64_t n, float *sums) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t c = 0;
#ifdef ROW_KERNELS_W
    vfloat v0 = VZERO(), v1 = v0, v2 = v0, v3 = v0;
    for (; c + ROW_KERNELS_W <= n; c += ROW_KERNELS_W) {
        if ((c & 31) == 0) {  /* one 64-byte line of each row, PREFETCH values ahead */
            __builtin_prefetch(r0 + c + PREFETCH);
            __builtin_prefetch(r1 + c + PREFETCH);
            __builtin_prefetch(r2 + c + PREFETCH);
            __builtin_prefetch(r3 + c + PREFETCH);
        }
        vfloat xv = VLOAD(x + c);
        v0 = VFMA(load_bf16(r0 + c), xv, v0);
        v1 = VFMA(load_bf16(r1 + c), xv, v1);
        v2 = VFMA(load_bf16(r2 + c), xv, v2);
        v3 = VFMA(load_bf16(r3 + c), xv, v3);
    }
    s0 = VSUM(v0); s1 = VSUM(v1); s2 = VSUM(v2); s3 = VSUM(v3);
#endif
    for (; c < n; c++) {
        float xv = x[c];
        s0 += bf16_to_float(r0[c]) * xv;
        s1 += bf16_to_float(r1[c]) * xv;
        s2 += bf16_to_float(r2[c]) * xv;
        s3 += bf16_to_float(r3[c]) * xv;
    }
    sums[0] = s0; sums[1] = s1; sums[2] = s2; sums[3] = s3;
}

static inline float dot_row(const uint16_t *r, const float *x, int64_t n) {
    float s = 0;
    int64_t c = 0;
#ifdef ROW_KERNELS_W
    vfloat v = VZERO();
    for (; c + ROW_KERNELS_W <= n; c += ROW_KERNELS_W) v = VFMA(load_bf16(r + c), VLOAD(x + c), v);
    s = VSUM(v);
#endif
    for (; c < n; c++) s += bf16_to_float(r[c]) * x[c];
    return s;
}

/* acc[c] += a0 r0[c] + a1 r1[c] + a2 r2[c] + a3 r3[c] */
static inline void axpy_rows4(float *acc, const uint16_t *r0, const uint16_t *r1, const uint16_t *r2,
                              const uint16_t *r3, const float *a, int64_t n) {
    int64_t c = 0;
#ifdef ROW_KERNELS_W
    const uint16_t *rows[4] = {r0, r1, r2, r3};
    vfloat weights[4];
    for (int k = 0; k < 4; k++) weights[k] = VSET1(a[k]);
    for (; c + ROW_KERNELS_W <= n; c += ROW_KERNELS_W) {
        if ((c & 31) == 0)
            for (int k = 0; k < 4; k++) __builtin_prefetch(rows[k] + c + PREFETCH);
        vfloat v = VLOAD(acc + c);
        for (int k = 0; k < 4; k++) v = VFMA(load_bf16(rows[k] + c), weights[k], v);  /* unrolled */
        VSTORE(acc + c, v);
    }
#endif
    for (; c < n; c++)
        acc[c] += a[0] * bf16_to_float(r0[c]) + a[1] * bf16_to_float(r1[c]) + a[2] * bf16_to_float(r2[c]) +
                  a[3] * bf16_to_float(r3[c]);
}

static inline void axpy_row(float *acc, const uint16_t *r, float a, int64_t n) {
    int64_t c = 0;
#ifdef ROW_KERNELS_W
    vfloat av = VSET1(a);
    for (; c + ROW_KERNELS_W <= n; c += ROW_KERNELS_W) VSTORE(acc + c, VFMA(load_bf16(r + c), av, VLOAD(acc + c)));
#endif
    for (; c < n; c++) acc[c] += a * bf16_to_float(r[c]);
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* out[i] = the sum over threads of partial[t * m + i]; frees partial. */
static void sum_partials(double *partial, int threads, int64_t m, double *out) {
    for (int64_t i = 0; i < m; i++) {
        double s = 0;
        for (int t = 0; t < threads; t++) s += partial[(size_t)t * (size_t)m + i];
        out[i] = s;
    }
    free(partial);
}

/* Each thread sums the products of its share of the column blocks into its own m partial sums;
   fn(ctx, b, mine) adds block b's products to mine (m,). Returns 0, or -1 if memory ran out. */
typedef void (*block_dots_fn)(const void *ctx, int64_t b, double *mine);

static int sum_over_blocks(int64_t blocks, int64_t m, int num_threads, block_dots_fn fn, const void *ctx,
                           double *out) {
    double *partial = calloc((size_t)(num_threads > 0 ? num_threads : 1) * (size_t)m, sizeof(double));
    if (!partial) return -1;
    int used = 1;
#pragma omp parallel num_threads(num_threads)
    {
        int t = thread_id(), threads = thread_count();
#pragma omp single
        used = threads;
        double *mine = partial + (size_t)t * (size_t)m;
        for (int64_t b = blocks * t / threads; b < blocks * (t + 1) / threads; b++) fn(ctx, b, mine);
    }
    sum_partials(partial, used, m, out);
    return 0;
}

/* The column block for d coordinates over `threads` threads: about d / (4 threads), so every
 * thread gets a near-equal share of blocks, rounded to 1024 and kept within [MIN, MAX]. */
static int64_t dense_block(int64_t d, int threads) {
    int64_t block = (d / (4 * (int64_t)(threads > 0 ? threads : 1)) + 1023) / 1024 * 1024;
    return block < DENSE_BLOCK_MIN ? DENSE_BLOCK_MIN : (block > DENSE_BLOCK_MAX ? DENSE_BLOCK_MAX : block);
}

struct dense_rows { const uint16_t *rows; int64_t m, d, block; const float *x; };

static void dense_block_dots(const void *ctx, int64_t b, double *mine) {
    const struct dense_rows *c = ctx;
    const uint16_t *rows = c->rows;
    int64_t m = c->m, d = c->d, block = c->block;
    int64_t c0 = b * block, n = (c0 + block < d ? block : d - c0);
    const float *xb = c->x + c0;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
        const uint16_t *r0 = rows + i * d + c0;
        float sums[4];
        dot_rows4(r0, r0 + d, r0 + 2 * d, r0 + 3 * d, xb, n, sums);
        for (int k = 0; k < 4; k++) mine[i + k] += sums[k];
    }
    for (; i < m; i++) mine[i] += dot_row(rows + i * d + c0, xb, n);
}

/* out (m,) float64 = rows (m, d) bf16 @ x (d,) float32. Returns 0, or -1 if memory ran out. */
int dense_dots(const uint16_t *rows, int64_t m, int64_t d, const float *x, double *out, int num_threads) {
    int64_t block = dense_block(d, num_threads);
    struct dense_rows ctx = {rows, m, d, block, x};
    return sum_over_blocks((d + block - 1) / block, m, num_threads, dense_block_dots, &ctx, out);
}

/* Each thread accumulates G^T a over its share of the column blocks in a buffer of `block` floats;
   fn(ctx, b, acc, n) adds block b's part (n columns, acc zeroed first), and out = beta x + alpha acc
   is written block by block. Returns 0, or -1 if memory ran out. */
typedef void (*block_combine_fn)(const void *ctx, int64_t b, float *acc, int64_t n);

static int combine_over_blocks(int64_t blocks, int64_t block, int64_t d, int num_threads, block_combine_fn fn,
                               const void *ctx, const float *x, float beta, float alpha, float *out) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *acc = malloc((size_t)block * sizeof(float));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!acc) continue;
            int64_t c0 = b * block, n = (c0 + block < d ? block : d - c0);
            memset(acc, 0, (size_t)n * sizeof(float));
            fn(ctx, b, acc, n);
            for (int64_t c = 0; c < n; c++) out[c0 + c] = beta * x[c0 + c] + alpha * acc[c];
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

struct dense_combine_ctx { const uint16_t *rows; int64_t m, d, block; const float *a; };

static void dense_block_combine(const void *ctx, int64_t b, float *acc, int64_t n) {
    const struct dense_combine_ctx *c = ctx;
    const uint16_t *rows = c->rows + b * c->block;
    int64_t i = 0, d = c->d;
    for (; i + 4 <= c->m; i += 4) {
        const uint16_t *r0 = rows + i * d;
        axpy_rows4(acc, r0, r0 + d, r0 + 2 * d, r0 + 3 * d, c->a + i, n);
    }
    for (; i < c->m; i++) axpy_row(acc, rows + i * d, c->a[i], n);
}

/* out (d,) = beta * x + alpha * rows^T a, rows (m, d) bf16, a (m,) float32. out may alias x. */
int dense_combine(const uint16_t *rows, int64_t m, int64_t d, const float *a, const float *x, float beta,
                  float alpha, float *out, int num_threads) {
    int64_t block = dense_block(d, num_threads);
    struct dense_combine_ctx ctx = {rows, m, d, block, a};
    return combine_over_blocks((d + block - 1) / block, block, d, num_threads, dense_block_combine, &ctx, x, beta,
                               alpha, out);
}

struct sparse_rows {
    const void *values; int value_kind; const int16_t *offsets; int64_t m, capacity; const int64_t *starts;
    int64_t block; const float *x;
};

static void sparse_block_dots(const void *ctx, int64_t b, double *mine) {
    const struct sparse_rows *c = ctx;
    const float *xb = c->x + b * c->block;
    int64_t kept = c->starts[b + 1] - c->starts[b];
    for (int64_t i = 0; i < c->m; i++) {
        int64_t first = c->capacity * c->starts[b] + i * kept;
        const int16_t *off = c->offsets + first;
        /* four independent sums: the gathers overlap instead of waiting on one addition chain */
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int64_t e = 0;
#ifdef __AVX512F__
        /* 16 entries at a time: one gather of x by the row's offsets, one fused multiply-add */
        __m512 sum16 = _mm512_setzero_ps();
        for (; e + 16 <= kept; e += 16) {
            __m512i index = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(off + e)));
            __m512 value = c->value_kind ? load_bf16((const uint16_t *)c->values + first + e)
                                         : _mm512_loadu_ps((const float *)c->values + first + e);
            sum16 = _mm512_fmadd_ps(value, _mm512_i32gather_ps(index, xb, 4), sum16);
        }
        s0 = _mm512_reduce_add_ps(sum16);
#endif
        if (c->value_kind) {
            const uint16_t *v = (const uint16_t *)c->values + first;
            for (; e + 4 <= kept; e += 4) {
                s0 += bf16_to_float(v[e]) * xb[(uint16_t)off[e]];
                s1 += bf16_to_float(v[e + 1]) * xb[(uint16_t)off[e + 1]];
                s2 += bf16_to_float(v[e + 2]) * xb[(uint16_t)off[e + 2]];
                s3 += bf16_to_float(v[e + 3]) * xb[(uint16_t)off[e + 3]];
            }
            for (; e < kept; e++) s0 += bf16_to_float(v[e]) * xb[(uint16_t)off[e]];
        } else {
            const float *v = (const float *)c->values + first;
            for (; e + 4 <= kept; e += 4) {
                s0 += v[e] * xb[(uint16_t)off[e]];
                s1 += v[e + 1] * xb[(uint16_t)off[e + 1]];
                s2 += v[e + 2] * xb[(uint16_t)off[e + 2]];
                s3 += v[e + 3] * xb[(uint16_t)off[e + 3]];
            }
            for (; e < kept; e++) s0 += v[e] * xb[(uint16_t)off[e]];
        }
        mine[i] += (s0 + s1) + (s2 + s3);
    }
}

/* out (m,) float64 = G x for the sparse rows described above. */
int sparse_dots(const void *values, int value_kind, const int16_t *offsets, int64_t m, int64_t capacity,
                const int64_t *starts, int64_t blocks, int64_t block, const float *x, double *out, int num_threads) {
    struct sparse_rows ctx = {values, value_kind, offsets, m, capacity, starts, block, x};
    return sum_over_blocks(blocks, m, num_threads, sparse_block_dots, &ctx, out);
}

struct sparse_combine_ctx { const void *values; int value_kind; const int16_t *offsets; int64_t m, capacity;
                           const int64_t *starts; const float *a; };

static void sparse_block_combine(const void *ctx, int64_t b, float *acc, int64_t n) {
    const struct sparse_combine_ctx *c = ctx;
    int64_t kept = c->starts[b + 1] - c->starts[b], i = 0;
    (void)n;
    /* Two rows at a time, their entries interleaved: two independent streams of scattered additions
     * in flight, 1.2x the speed of one row at a time (an AVX-512 gather-add-scatter measured no
     * faster: benchmarks/compressed_products.py). A coordinate held by both rows may then receive
     * the second row's term first: the same sum, rounded in another order. */
    for (; i + 2 <= c->m; i += 2) {
        int64_t first = c->capacity * c->starts[b] + i * kept;
        const int16_t *off = c->offsets + first, *off1 = off + kept;
        float a0 = c->a[i], a1 = c->a[i + 1];
        if (c->value_kind) {
            const uint16_t *v = (const uint16_t *)c->values + first, *v1 = v + kept;
            for (int64_t e = 0; e < kept; e++) {
                acc[(uint16_t)off[e]] += a0 * bf16_to_float(v[e]);
                acc[(uint16_t)off1[e]] += a1 * bf16_to_float(v1[e]);
            }
        } else {
            const float *v = (const float *)c->values + first, *v1 = v + kept;
            for (int64_t e = 0; e < kept; e++) {
                acc[(uint16_t)off[e]] += a0 * v[e];
                acc[(uint16_t)off1[e]] += a1 * v1[e];
            }
        }
    }
    for (; i < c->m; i++) {
        int64_t first = c->capacity * c->starts[b] + i * kept;
        const int16_t *off = c->offsets + first;
        float ai = c->a[i];
        if (c->value_kind) {
            const uint16_t *v = (const uint16_t *)c->values + first;
            for (int64_t e = 0; e < kept; e++) acc[(uint16_t)off[e]] += ai * bf16_to_float(v[e]);
        } else {
            const float *v = (const float *)c->values + first;
            for (int64_t e = 0; e < kept; e++) acc[(uint16_t)off[e]] += ai * v[e];
        }
    }
}

/* out (d,) = beta * x + alpha * G^T a for the sparse rows described above; out may alias x. */
int sparse_combine(const void *values, int value_kind, const int16_t *offsets, int64_t m, int64_t capacity,
                   const int64_t *starts, int64_t blocks, int64_t block, int64_t d, const float *a, const float *x,
                   float beta, float alpha, float *out, int num_threads) {
    struct sparse_combine_ctx ctx = {values, value_kind, offsets, m, capacity, starts, a};
    return combine_over_blocks(blocks, block, d, num_threads, sparse_block_combine, &ctx, x, beta, alpha, out);
}

/* NAME(u, v, len): the sum of u[j] * v[j] for j < len, u of type T, v double, summed in double in 8
 * independent partial sums (one running sum is a chain of dependent additions that compilers keep
 * scalar) */
#define DEFINE_DOT(NAME, T)                                                                             \
static inline double NAME(const T *restrict u, const double *restrict v, int64_t len) {                 \
    double part[8] = {0}, total = 0.0;                                                                  \
    int64_t j = 0;                                                                                      \
    for (; j + 8 <= len; j += 8)                                                                        \
        for (int t = 0; t < 8; t++) part[t] += (double)u[j + t] * v[j + t];                             \
    for (; j < len; j++) total += (double)u[j] * v[j];                                                  \
    for (int t = 0; t < 8; t++) total += part[t];                                                       \
    return total;                                                                                       \
}
DEFINE_DOT(dot_f32, float)
DEFINE_DOT(dot_f64, double)

/* The Cholesky factor of a full sliding window after its oldest gradient leaves and a new one
 * arrives, in O(m^2) instead of the O(m^3 / 3) of a refactorisation, in one pass over the factor.
 *
 * upper (m, m) row-major holds U with K = U^T U, rows and columns in age order (0 = the oldest).
 * K' drops row and column 0 of K and appends the new gradient's column (`column`, m - 1 numbers
 * in age order) and diagonal entry `diag` at the end.
 *   Dropping: K[1:, 1:] = U11^T U11 + u u^T with u = U[0, 1:], a rank-one *update* (never a
 *   downdate), done as Givens rotations of the rows of [U11; u^T]: orthogonal, so no cancellation.
 *   Appending: solve U11'^T y = column, then U'[m-1, m-1] = sqrt(diag - |y|^2), the last step of
 *   an ordinary Cholesky factorisation.
 * Row k of U11' is final once rotated, and it is all that step k of the forward substitution (and
 * of the probe) reads, so each row of U is read once and its rotated row written once: the
 * rotation, the substitution and the probe's dot product are one loop over the row.
 * With z (m numbers, age order) given, probe (m) receives U'^T (U' z), for the caller to compare
 * with K' z. out (m, m) receives U' and must not alias upper; its zeros below the diagonal are
 * written too unless lower_zero says they are there already (the storage of an earlier factor,
 * reused). With gram given, a second thread computes gram_times = gram @ gram_probe meanwhile.
 * work holds 3 m doubles of scratch. Returns 0, or 1 when diag - |y|^2 <= 0 (round-off made K'
 * look indefinite: the caller refactorises). */

/* Row k of U11': rotate row k of U11 (src) against x with (c, s), and in the same pass take step
 * k of the forward substitution (y[j] -= yk * row[j]) and, with_probe, (U' z)_k's dot product,
 * returned (the caller adds the last column's part). Columns j > k; row[k] is set by the caller. */
static inline double factor_shift_row(const double *restrict src, double *restrict row, double *restrict x,
                                      double *restrict y, const double *restrict z, int64_t k, int64_t n,
                                      double c, double s, double yk, int rotate, int with_probe) {
    double dot = 0.0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = k + 1; j < n; j++) {
        double rj = src[j], xj = x[j], v = rotate ? c * rj + s * xj : rj;
        row[j] = v;
        if (rotate) x[j] = c * xj - s * rj;
        y[j] -= yk * v;
        if (with_probe) dot += v * z[j];
    }
    return dot;
}

static int factor_shift_update(const double *upper, int64_t m, const double *column, double diag,
                               const double *z, double *restrict out, int lower_zero, double *restrict work,
                               double *restrict probe) {
    int64_t n = m - 1;
    double *restrict x = work, *restrict y = work + m, *restrict w = work + 2 * m;
    memcpy(x, upper + 1, (size_t)n * sizeof(double));
    memcpy(y, column, (size_t)n * sizeof(double));
    if (z) memset(probe, 0, (size_t)m * sizeof(double));
    for (int64_t k = 0; k < n; k++) {
        const double *src = upper + (k + 1) * m + 1;  /* row k of U11 */
        double *restrict row = out + k * m;
        if (!lower_zero) memset(row, 0, (size_t)k * sizeof(double));
        double a = src[k], b = x[k], c = 1.0, s = 0.0, r = a;
        if (b != 0.0) {
            r = hypot(a, b);
            c = a / r;
            s = b / r;
        }
        row[k] = r;
        double yk = y[k] / r;  /* step k of the substitution with U11'^T */
        y[k] = yk;
        int rotate = b != 0.0;
        if (z) {  /* (U' z)_k, then its part of U'^T (U' z) */
            double wk = r * z[k] + yk * z[n] + (rotate ? factor_shift_row(src, row, x, y, z, k, n, c, s, yk, 1, 1)
                                                       : factor_shift_row(src, row, x, y, z, k, n, c, s, yk, 0, 1));
            w[k] = wk;
#pragma omp simd
            for (int64_t i = k; i < n; i++) probe[i] += wk * row[i];
        } else if (rotate) {
            factor_shift_row(src, row, x, y, z, k, n, c, s, yk, 1, 0);
        } else {
            factor_shift_row(src, row, x, y, z, k, n, c, s, yk, 0, 0);
        }
    }
    double squares = dot_f64(y, y, n), last = z ? dot_f64(y, w, n) : 0.0;
    for (int64_t j = 0; j < n; j++) out[j * m + n] = y[j];
    if (!lower_zero) memset(out + n * m, 0, (size_t)n * sizeof(double));
    double pivot = diag - squares;
    if (!(pivot > 0.0)) return 1;
    double corner = sqrt(pivot);
    out[n * m + n] = corner;
    if (z) probe[n] = last + corner * (corner * z[n]);
    return 0;
}

/* The window's check of the new factor needs its Gram matrix times the probe: a read of m^2
 * numbers that, on a second core, costs no time. */
int factor_shift(const double *upper, int64_t m, const double *column, double diag, const double *z,
                 double *restrict out, int lower_zero, double *restrict work, double *restrict probe,
                 const double *gram, const double *gram_probe, double *restrict gram_times) {
    if (!gram) return factor_shift_update(upper, m, column, diag, z, out, lower_zero, work, probe);
    int status = 0;
#pragma omp parallel sections num_threads(2)
    {
#pragma omp section
        status = factor_shift_update(upper, m, column, diag, z, out, lower_zero, work, probe);
#pragma omp section
        for (int64_t i = 0; i < m; i++) gram_times[i] = dot_f64(gram + i * m, gram_probe, m);
    }
    return status;
}


/* compress_blocks: one gradient into a compressed window's row, in one pass over d.
 *
 * With acc = residual + g (d floats), each block b of `block` coordinates keeps its
 * k_b = starts[b + 1] - starts[b] entries of largest magnitude (ties: lowest coordinate first),
 * rounded to the storage type (value_kind 0: float32; 1: bfloat16, to nearest even, as torch
 * rounds): values and int16 offsets (from the block's start, in increasing order) at entries
 * starts[b] .. starts[b + 1] - 1; stored (d) receives the kept values as stored (zeros elsewhere) and
 * new_residual (d) acc minus stored. Selection: a quickselect of the k_b-th largest |acc| in a
 * per-thread copy of the block, then one ordered pass. Nothing is read twice from memory.
 * Returns 0; 2 if g holds NaN or Inf; 3 if g is finite but acc is not (the outputs are then
 * incomplete: discard them); 1 if a thread could not allocate its block buffer. */
static inline uint16_t round_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The k-th largest of n non-negative floats given as their bit patterns (which then order as
 * integers), 1 <= k <= n, by three rounds of radix selection (11, 10 and 10 bits): a histogram of
 * the remaining candidates' next digit, the digit whose bucket holds the k-th largest, and the
 * candidates in that bucket carried to the next round. Branch-free counting; n + O(candidates)
 * work. Also returns (*ties) how many elements equal to it the k largest take. hist holds 2048
 * counts; cand holds n keys. */
static uint32_t kth_largest_key(const uint32_t *keys, int64_t n, int64_t k, uint32_t *hist, uint32_t *cand,
                                int64_t *ties) {
    static const int shift[3] = {20, 10, 0}, width[3] = {11, 10, 10};
    const uint32_t *in = keys;
    int64_t count = n, need = k;
    uint32_t prefix = 0;
    for (int round = 0; round < 3; round++) {
        int buckets = 1 << width[round];
        uint32_t digit_mask = (uint32_t)buckets - 1u;
        memset(hist, 0, (size_t)buckets * sizeof(uint32_t));
        for (int64_t i = 0; i < count; i++) hist[(in[i] >> shift[round]) & digit_mask]++;
        int64_t above = 0;
        int chosen = buckets - 1;
        for (; chosen > 0; chosen--) {
            if (above + hist[chosen] >= need) break;
            above += hist[chosen];
        }
        need -= above;
        prefix |= (uint32_t)chosen << shift[round];
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++) {
            cand[kept] = in[i];
            kept += ((in[i] >> shift[round]) & digit_mask) == (uint32_t)chosen;
        }
        in = cand;
        count = kept;
    }
    *ties = need;
    return prefix;
}

int compress_blocks(const float *residual, const float *g, int64_t d, int64_t block, const int64_t *starts,
                    int64_t blocks, int value_kind, void *values, int16_t *offsets, float *new_residual,
                    float *stored, int num_threads) {
    int failed = 0, bad_gradient = 0, bad_sum = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : bad_gradient, bad_sum)
    {
        uint32_t *keys = malloc((size_t)(2 * block + 2048) * sizeof(uint32_t));
        if (!keys) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!keys) continue;
            int64_t base = b * block, size = d - base < block ? d - base : block;
            int64_t first = starts[b], k = starts[b + 1] - starts[b];
            const float *r = residual + base, *gb = g + base;
            float *acc = new_residual + base, *out = stored + base;
            float gcheck = 0.0f, acheck = 0.0f;
#pragma omp simd reduction(+ : gcheck, acheck)
            for (int64_t i = 0; i < size; i++) {
                float a = r[i] + gb[i];
                acc[i] = a;
                uint32_t bits;
                float m = fabsf(a);
                memcpy(&bits, &m, sizeof bits);
                keys[i] = bits;
                gcheck += gb[i] * 0.0f;
                acheck += a * 0.0f;
            }
            if (gcheck != 0.0f) { bad_gradient = 1; continue; }
            if (acheck != 0.0f) { bad_sum = 1; continue; }
            if (k > size) k = size;
            int64_t ties;
            uint32_t threshold = kth_largest_key(keys, size, k, keys + 2 * block, keys + block, &ties);
            int64_t e = first;
            for (int64_t i = 0; i < size; i++) {
                uint32_t key = keys[i];
                int keep = key > threshold || (key == threshold && ties > 0);
                if (!keep) {
                    out[i] = 0.0f;
                    continue;
                }
                ties -= key == threshold;
                float a = acc[i], kept;
                if (value_kind == 1) {
                    uint16_t h = round_to_bf16(a);
                    ((uint16_t *)values)[e] = h;
                    kept = bf16_to_float(h);
                } else {
                    ((float *)values)[e] = a;
                    kept = a;
                }
                offsets[e] = (int16_t)i;
                out[i] = kept;
                acc[i] = a - kept;
                e++;
            }
        }
        free(keys);
    }
    if (failed) return 1;
    return bad_gradient ? 2 : (bad_sum ? 3 : 0);
}


/* inverse_factors: many small factorisations at matrix-product speed.
 *
 * For each of `count` symmetric (n, n) blocks, `stride` numbers apart, whose row i starts at
 * entry starts[i] of the block and holds its first starts[i + 1] - starts[i] columns (at least i + 1
 * and at least min(n, i rounded up to a multiple of PANEL); only those up to the diagonal are
 * read: full rows, or a lower triangle stored packed with padded rows), X = L^-1 where
 * block = L L^T, L lower, and its residual |X A X^T z - z| (double) for the unit probe z (n
 * doubles): about eps * cond(A) for a Cholesky-based inverse, a measure of how much precision the
 * block's conditioning left. The block is overwritten with X (lower triangular, zeros above) only
 * where residual[b] <= limit (the stored entries right of the diagonal written as zeros);
 * otherwise it is left exactly as it was, for the caller to redo in a
 * higher precision. info[b] is 0, or i + 1 when the i-th pivot was not positive (round-off made
 * the block look indefinite; residual[b] is then infinite). Returns 0, or 1 if a thread could not
 * allocate its workspace.
 *
 * LAPACK does this one block at a time (potrf + trtri), at 5-10 GFLOP/s on blocks of 128: its
 * per-call overhead and unblocked inner loops dominate at that size. Here each block is worked on
 * in a thread's own padded copy, rows in panels of PANEL: rows i0..i1 of L by forward substitution
 * (a row-oriented Cholesky, backward stable like potrf), then rows i0..i1 of X from
 * X[P, :] = -(L[P, <i0] X[<i0, :] + triangle) / diagonal. Both are dominated by the same product,
 * acc[p] += r[p][q] * m[q][c0 : c0 + VL] over the panel's rows, held in PANEL vector registers of
 * 64 bytes (GCC/Clang vector extensions: AVX-512 where the build targets it, narrower otherwise).
 * The sequential parts stay in registers too: the solve of a panel's rows with each VL x VL
 * diagonal block of L (a broadcast and a multiply-add per row and column), and the triangle of X
 * inside the panel.
 * Flops: n^3 / 3 (Cholesky) + n^3 / 3 (inverse) + 3 n^2 (residual); memory per thread:
 * (2 n + PANEL + 1) ld + n VL numbers and 2 n doubles, ld = n rounded up to a multiple of VL.
 * Threads: OpenMP over blocks. */
#define PANEL 8  /* divides 64 / sizeof(T), so a panel never straddles two column chunks */

#define DEFINE_INVERSE_FACTORS(NAME, T, SQRT, DOT)                                                     \
typedef T NAME##_vec __attribute__((vector_size(64)));                                                  \
/* the same, for loads and stores at any address of T (one vector move, as memcpy is not always) */     \
typedef T NAME##_mem __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));                   \
enum { NAME##_VL = 64 / sizeof(T) };                                                                    \
/* acc[p] = sum over q in [q0, q1) of r[p][q] * m[q][c0 : c0 + VL], for the panel's np rows */          \
static inline void NAME##_panel_product(NAME##_vec *restrict acc, const T *restrict r, int64_t ld,      \
                                        int64_t np, const T *restrict m, int64_t q0, int64_t q1,        \
                                        int64_t c0) {                                                   \
    const T *rows[PANEL];                                                                               \
    for (int p = 0; p < PANEL; p++) {                                                                   \
        rows[p] = r + (p < np ? p : 0) * ld;  /* a short last panel repeats row 0, unused */            \
        acc[p] = (NAME##_vec){0};                                                                       \
    }                                                                                                   \
    for (int64_t q = q0; q < q1; q++) {                                                                 \
        NAME##_vec mq;                                                                                  \
        memcpy(&mq, m + q * ld + c0, sizeof mq);                                                        \
        for (int p = 0; p < PANEL; p++) acc[p] += rows[p][q] * mq;                                      \
    }                                                                                                   \
}                                                                                                       \
/* rows[p] -= rows[p][j] * below[j] for j < count, in order: the rows' solve with one chunk's           \
 * diagonal block of L, below[j] holding column c0 + j of L over the chunk's rows, divided by its       \
 * pivot (zero on and above the diagonal). The rows' chunks stay in registers, so step j costs a        \
 * broadcast and a multiply-add per row. */                                                             \
static inline void NAME##_chunk_solve(NAME##_vec *restrict rows, const NAME##_vec *restrict below,      \
                                      int count) {                                                      \
    if (count == NAME##_VL) {                                                                           \
        _Pragma("GCC unroll 16")                                                                        \
        for (int j = 0; j < NAME##_VL; j++)                                                             \
            for (int p = 0; p < PANEL; p++) rows[p] -= rows[p][j] * below[j];                           \
    } else {                                                                                            \
        for (int j = 0; j < count; j++)                                                                 \
            for (int p = 0; p < PANEL; p++) rows[p] -= rows[p][j] * below[j];                           \
    }                                                                                                   \
}                                                                                                       \
/* One block. lt (n x ld): L^T, zero on and below its diagonal (pivots live in inv_d as 1 / L_ii);      \
 * below (n vectors): for each column q, L's entries under the diagonal in q's chunk of VL rows,        \
 * divided by L_qq; x (n x ld): X; r (PANEL x ld): the panel's rows, first of the block, then of L;     \
 * ahead: the next block (or NULL), prefetched a panel's rows at a time so that its first reads do      \
 * not wait on memory (each 4 KB page of it would otherwise start cold). */                             \
static int NAME##_one(const T *restrict a, const int64_t *starts, int64_t n, int64_t ld, T *restrict lt,\
                      NAME##_vec *restrict below, T *restrict x, T *restrict r,                         \
                      T *restrict inv_d, const T *ahead) {                                              \
    enum { VL = NAME##_VL };                                                                            \
    typedef NAME##_vec vec;                                                                             \
    memset(lt, 0, (size_t)(n * ld) * sizeof(T));                                                        \
    for (int64_t i0 = 0; i0 < n; i0 += PANEL) {                                                         \
        int64_t np = n - i0 < PANEL ? n - i0 : PANEL, i1 = i0 + np;                                     \
        if (ahead)  /* the next block's rows of this panel, into cache while this one computes */       \
            for (int64_t i = starts[i0]; i < starts[i1]; i += 64 / (int64_t)sizeof(T))                  \
                __builtin_prefetch(ahead + i, 0, 2);                                                    \
        for (int64_t p = 0; p < np; p++) {                                                              \
            memcpy(r + p * ld, a + starts[i0 + p], (size_t)i1 * sizeof(T));                             \
            memset(r + p * ld + i1, 0, (size_t)(ld - i1) * sizeof(T));                                  \
        }                                                                                               \
        /* Rows i0..i1 of L, VL columns at a time: the columns before the chunk enter as one            \
         * product; the chunk's columns of earlier panels by a solve in registers; the panel's own      \
         * columns one by one (entries right of a row's diagonal are scratch, multiplied only by        \
         * the zeros of lt). */                                                                         \
        for (int64_t c0 = 0; c0 < i1; c0 += VL) {                                                       \
            vec acc[PANEL], rows[PANEL], scale, own;                                                    \
            NAME##_panel_product(acc, r, ld, np, lt, 0, c0, c0);                                        \
            int64_t c1 = c0 + VL < i1 ? c0 + VL : i1;                                                   \
            int solved = i0 > c0 ? (int)((c1 < i0 ? c1 : i0) - c0) : 0;                                 \
            for (int j = 0; j < VL; j++) {                                                              \
                scale[j] = j < solved ? inv_d[c0 + j] : 1;                                              \
                own[j] = j < solved ? 0 : 1;                                                            \
            }                                                                                           \
            for (int p = 0; p < PANEL; p++) {                                                           \
                rows[p] = *(const NAME##_mem *)(r + (p < np ? p : 0) * ld + c0);                        \
                rows[p] -= acc[p];                                                                      \
            }                                                                                           \
            NAME##_chunk_solve(rows, below + c0, solved);                                               \
            for (int64_t p = 0; p < np; p++) {                                                          \
                rows[p] *= scale;                                                                       \
                *(NAME##_mem *)(r + p * ld + c0) = rows[p];                                             \
                for (int j = 0; j < solved; j++) lt[(c0 + j) * ld + i0 + p] = rows[p][j];               \
            }                                                                                           \
            if (c1 <= i0) continue;                                                                     \
            if (solved) {  /* the solved columns' share of the panel's own columns */                   \
                NAME##_panel_product(acc, r, ld, np, lt, c0, c0 + solved, c0);                          \
                for (int64_t p = 0; p < np; p++) {                                                      \
                    rows[p] -= acc[p] * own;                                                            \
                    *(NAME##_mem *)(r + p * ld + c0) = rows[p];                                         \
                }                                                                                       \
            }                                                                                           \
            for (int64_t q = i0; q < c1; q++) {                                                         \
                T pivot = r[(q - i0) * ld + q];                                                         \
                if (!(pivot > 0)) return (int)(q + 1);                                                  \
                T scale_q = inv_d[q] = 1 / SQRT(pivot);                                                 \
                T *restrict ltq = lt + q * ld;                                                          \
                for (int64_t p = q - i0 + 1; p < np; p++) {                                             \
                    T *restrict rp = r + p * ld;                                                        \
                    T l = rp[q] * scale_q;                                                              \
                    rp[q] = l;                                                                          \
                    ltq[i0 + p] = l;                                                                    \
                    for (int64_t k = q + 1; k < c1; k++) rp[k] -= l * ltq[k];                           \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int64_t q = i0 / VL * VL; q < i1; q++) {  /* this panel's rows complete these columns */   \
            vec column;                                                                                 \
            memcpy(&column, lt + q * ld + i0 / VL * VL, sizeof column);                                 \
            below[q] = column * inv_d[q];                                                               \
        }                                                                                               \
        /* Rows i0..i1 of X, VL columns at a time in registers: the product with the rows of X          \
         * above the panel, then the panel's own triangle (rows in order), each row times minus its     \
         * pivot; X's diagonal entry is the pivot, its entries right of it come out exactly zero. */    \
        for (int64_t c0 = 0; c0 < i1; c0 += VL) {                                                       \
            vec acc[PANEL];                                                                             \
            NAME##_panel_product(acc, r, ld, np, x, c0, i0, c0);                                        \
            _Pragma("GCC unroll 8")                                                                     \
            for (int p = 0; p < PANEL; p++) {                                                           \
                if (p >= np) break;                                                                     \
                const T *restrict lp = r + p * ld + i0;                                                 \
                _Pragma("GCC unroll 8")                                                                 \
                for (int q = 0; q < p; q++) acc[p] += lp[q] * acc[q];                                   \
                T inv = inv_d[i0 + p];                                                                  \
                acc[p] *= -inv;                                                                         \
                int64_t lane = i0 + p - c0;                                                             \
                if (lane >= 0 && lane < VL) acc[p][lane] = inv;                                         \
                *(NAME##_mem *)(x + (i0 + p) * ld + c0) = acc[p];                                       \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    return 0;                                                                                           \
}                                                                                                       \
/* |X A X^T z - z| for the unit probe z, in double: A from a's lower triangle (still the input), X      \
 * from x; y and w hold n doubles each. */                                                              \
static double NAME##_residual(const T *restrict a, const int64_t *starts, int64_t n, int64_t ld,        \
                              const T *restrict x,                                                      \
                              const double *restrict z, double *restrict y, double *restrict w) {       \
    memset(y, 0, (size_t)n * sizeof(double));                                                           \
    memset(w, 0, (size_t)n * sizeof(double));                                                           \
    for (int64_t i = 0; i < n; i++)  /* y = X^T z */                                                    \
        for (int64_t j = 0; j <= i; j++) y[j] += (double)x[i * ld + j] * z[i];                          \
    for (int64_t i = 0; i < n; i++) {  /* w = A y, a row of the lower triangle at a time */             \
        const T *restrict ai = a + starts[i];                                                           \
        double yi = y[i];                                                                               \
        w[i] += DOT(ai, y, i + 1);                                                                      \
        for (int64_t j = 0; j < i; j++) w[j] += (double)ai[j] * yi;                                     \
    }                                                                                                   \
    double squares = 0.0;                                                                               \
    for (int64_t i = 0; i < n; i++) {                                                                   \
        double v = DOT(x + i * ld, w, i + 1) - z[i];                                                    \
        squares += v * v;                                                                               \
    }                                                                                                   \
    return sqrt(squares);                                                                               \
}                                                                                                       \
int NAME(T *a, int64_t count, int64_t n, int64_t stride, const int64_t *starts, const double *probe,    \
         double limit, int32_t *info, double *residual, int num_threads) {                              \
    int failed = 0;                                                                                     \
    int64_t ld = (n + NAME##_VL - 1) / NAME##_VL * NAME##_VL;                                           \
    /* per thread: lt, x (n x ld each), below (n x VL), r (PANEL x ld), inv_d (ld); y, w (n doubles) */ \
    int64_t numbers = (2 * n + PANEL + 1) * ld + n * NAME##_VL;                                         \
    size_t bytes = (size_t)numbers * sizeof(T) + (size_t)(2 * n) * sizeof(double);                      \
    bytes = (bytes + 63) / 64 * 64;                                                                     \
    _Pragma("omp parallel num_threads(num_threads)")                                                    \
    {                                                                                                   \
        T *work = aligned_alloc(64, bytes), *x = NULL, *r = NULL, *inv_d = NULL;                        \
        NAME##_vec *below = NULL;                                                                       \
        double *y = NULL;                                                                               \
        if (work) {                                                                                     \
            below = (NAME##_vec *)(work + n * ld);                                                      \
            x = work + n * ld + n * NAME##_VL;                                                          \
            r = x + n * ld;                                                                             \
            inv_d = r + PANEL * ld;                                                                     \
            y = (double *)(work + numbers);                                                             \
        } else {                                                                                        \
            _Pragma("omp atomic write")                                                                 \
            failed = 1;                                                                                 \
        }                                                                                               \
        _Pragma("omp for schedule(dynamic, 16)")                                                        \
        for (int64_t b = 0; b < count; b++) {                                                           \
            if (!work) continue;                                                                        \
            T *block = a + b * stride;                                                                  \
            const T *ahead = b + 1 < count ? block + stride : NULL;                                     \
            info[b] = NAME##_one(block, starts, n, ld, work, below, x, r, inv_d, ahead);                \
            residual[b] = info[b] ? INFINITY                                                            \
                                  : NAME##_residual(block, starts, n, ld, x, probe, y, y + n);          \
            if (info[b] || !(residual[b] <= limit)) continue;  /* the block is left as it was */        \
            for (int64_t i = 0; i < n; i++) {                                                           \
                T *row = block + starts[i];                                                             \
                memcpy(row, x + i * ld, (size_t)(i + 1) * sizeof(T));                                   \
                memset(row + i + 1, 0, (size_t)(starts[i + 1] - starts[i] - i - 1) * sizeof(T));        \
            }                                                                                           \
        }                                                                                               \
        free(work);                                                                                     \
    }                                                                                                   \
    return failed;                                                                                      \
}

DEFINE_INVERSE_FACTORS(inverse_factors_f32, float, sqrtf, dot_f32)
DEFINE_INVERSE_FACTORS(inverse_factors_f64, double, sqrt, dot_f64)


/* gram_update: the streamed statistics of a block-diagonal inverse, at matrix-product speed.
 *
 * For each of `count` blocks b: stats[b] += P_b^T P_b, where P_b is the (n, size) slice
 * rows[:, b * size : (b + 1) * size] of n rows `stride` numbers apart, and block b's row i starts
 * at stats + b * block_stride + starts[i]: full rows (starts[i] = i * size), or packed rows of the
 * lower triangle, each holding at least its first W-rounded i + 1 columns (W = 2 vectors). Only the
 * lower triangle is updated (tiles on and below the diagonal, which also cover a few entries just
 * above it, with their true values); everything that reads the statistics reads that triangle.
 * Each thread takes whole blocks: a block's (size, size) sums stay in its cache while the rows'
 * slices pass (in groups of GRAM_GROUP rows, the next block's prefetched), and tiles of
 * GRAM_ROWS x 2 vectors are updated in registers. Compared with a batched product per tile of
 * blocks this reads and writes the sums once per call, and only their lower half; and it checks
 * the rows for NaN and Inf on the way, so they are read once.
 * size must be a multiple of two vectors (32 floats / 16 doubles). Returns 0; 3 if some entry of
 * the rows was NaN or Inf (the sums then hold non-finite values: discard them); 2 for a size it
 * does not take (nothing done: the caller uses torch).
 * Flops: about n * size^2 * (1 + 2 * 64 / (sizeof(T) * size)) per block. */
#define GRAM_ROWS 8
#define GRAM_GROUP 256

#define DEFINE_GRAM_UPDATE(NAME, T)                                                                     \
typedef T NAME##_vec __attribute__((vector_size(64)));                                                  \
int NAME(T *stats, int64_t count, int64_t size, int64_t block_stride, const int64_t *starts,            \
         const T *rows, int64_t n, int64_t stride, int num_threads) {                                   \
    enum { VL = 64 / sizeof(T), W = 128 / sizeof(T) };                                                  \
    typedef NAME##_vec vec;                                                                             \
    if (size % W) return 2;                                                                             \
    int nonfinite = 0;                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) reduction(|:nonfinite)")        \
    for (int64_t b = 0; b < count; b++) {                                                               \
        T *c = stats + b * block_stride;                                                                \
        vec seen = {0};  /* stays zero unless a row entry is NaN or Inf (x * 0 is then NaN) */          \
        for (int64_t r0 = 0; r0 < n; r0 += GRAM_GROUP) {                                                \
            int64_t rn = n - r0 < GRAM_GROUP ? n - r0 : GRAM_GROUP;                                     \
            const T *p = rows + r0 * stride + b * size;                                                 \
            if (b + 1 < count)                                                                          \
                for (int64_t r = 0; r < rn; r++)                                                        \
                    for (int64_t i = 0; i < size; i += VL)                                              \
                        __builtin_prefetch(p + size + r * stride + i);                                  \
            for (int64_t i0 = 0; i0 < size; i0 += GRAM_ROWS) {  /* row bands: the sums read in order */ \
                for (int64_t j0 = 0; j0 <= i0; j0 += W) {                                               \
                    vec acc[GRAM_ROWS][2];                                                              \
                    for (int i = 0; i < GRAM_ROWS; i++) {                                               \
                        memcpy(&acc[i][0], c + starts[i0 + i] + j0, sizeof(vec));                       \
                        memcpy(&acc[i][1], c + starts[i0 + i] + j0 + VL, sizeof(vec));                  \
                    }                                                                                   \
                    for (int64_t r = 0; r < rn; r++) {                                                  \
                        vec p0, p1;                                                                     \
                        memcpy(&p0, p + r * stride + j0, sizeof p0);                                    \
                        memcpy(&p1, p + r * stride + j0 + VL, sizeof p1);                               \
                        if (i0 == j0) seen += p0 * 0 + p1 * 0;                                          \
                        for (int i = 0; i < GRAM_ROWS; i++) {                                           \
                            T w = p[r * stride + i0 + i];                                               \
                            acc[i][0] += w * p0;                                                        \
                            acc[i][1] += w * p1;                                                        \
                        }                                                                               \
                    }                                                                                   \
                    for (int i = 0; i < GRAM_ROWS; i++) {                                               \
                        memcpy(c + starts[i0 + i] + j0, &acc[i][0], sizeof(vec));                       \
                        memcpy(c + starts[i0 + i] + j0 + VL, &acc[i][1], sizeof(vec));                  \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int v = 0; v < VL; v++) nonfinite |= seen[v] != 0;                                         \
    }                                                                                                   \
    return nonfinite ? 3 : 0;                                                                           \
}

DEFINE_GRAM_UPDATE(gram_update_f32, float)
DEFINE_GRAM_UPDATE(gram_update_f64, double)
