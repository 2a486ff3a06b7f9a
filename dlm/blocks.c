/* Float32 matrix products on a GGUF's own quantized blocks (dlm/blocks.py builds and loads this).

   y (M, N) = x (M, K) @ W^T, every number float32, where W (N, K) is stored as blocks of 32
   weights and each weight is rebuilt exactly as the float32 dequantisation writes it:
     Q4 (GGUF Q4_0 / Q4_1): w = fl(q * d + m), q in 0..15 (Q4_0: m = -8 d);
     Q8 (GGUF Q8_0):        w = q * d, q in -128..127 (exact in float32).
   (q * d is exact in float32, d being a float16, so one rounding, or none, as in numpy.)
   Only the order of the sums differs from a dense product, and it is fixed: for each output, two
   16-lane accumulators take the inputs of each 64-input unit in order (lanes 0-15 and 32-47 into
   the first, 16-31 and 48-63 into the second), then one reduction. So a row's result does not
   depend on how many rows came with it, nor on how the outputs are split between threads.

   Layouts (dlm/blocks.py makes them from the GGUF's blocks), per output row n and unit p (64
   inputs = two blocks):
     Q4: data (N, K/64, 32 bytes): 16-bit lane j holds nibble s at bits 4s..4s+3, the weight
         (s / 2) * 32 + (s % 2) * 16 + j of the unit; scales (N, K/64, 4): d0, m0, d1, m1.
         A block's 16 possible weights are made once (a table of 16 floats) and looked up with
         one permute per 16 weights: the permute reads only the low 4 bits of each lane.
     Q8: data (N, K) int8 as stored; scales (N, K/32): d.
   A low-rank update W + up @ down (a fine-tune, kept apart: rounding it into 4-bit blocks would
   erase it), where given: t = x @ down^T (M, R) first, then each output adds t[offset[n]..+Rp] .
   up[n] (Rp a multiple of 16; fused projections keep their own rank-Rp slices of t) into its
   first accumulator before the reduction: one more fixed step in the order of the sums. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx512f,avx512bw")))
#define INLINE static inline __attribute__((always_inline))

int blocks_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

/* The 64 weights of unit p of output n, as four 16-lane vectors. */
TARGET INLINE void unit_q4(const uint8_t *data, const float *scales, int64_t np, int64_t n, int64_t p,
                           __m512 w[4]) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const float *s = scales + (n * np + p) * 4;
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(data + (n * np + p) * 32)));
    __m512 t0 = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]));
    __m512 t1 = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[2]), _mm512_set1_ps(s[3]));
    w[0] = _mm512_permutexvar_ps(v, t0);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t0);
    w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), t1);
    w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), t1);
}

TARGET INLINE void unit_q8(const uint8_t *data, const float *scales, int64_t np, int64_t n, int64_t p,
                           __m512 w[4]) {
    const int8_t *q = (const int8_t *)data + (n * np + p) * 64;
    const float *d = scales + (n * np + p) * 2;
    for (int i = 0; i < 4; i++) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * i))));
        w[i] = _mm512_mul_ps(f, _mm512_set1_ps(d[i / 2]));
    }
}

typedef struct {
    const float *t;        /* (M, R_total): x @ down^T */
    const float *up;       /* (N, Rp) */
    const int32_t *offset; /* (N,): where output n's slice of t starts */
    int64_t r_total, rp;
} low_rank;

/* Outputs n..n+T-1 of rows 0..R-1 (T and R compile-time constants after inlining). */
TARGET INLINE void tile(const float *x, const uint8_t *data, const float *scales, float *y, int64_t N,
                        int64_t K, int64_t n, const int T, const int R, const int q8, const low_rank *lr) {
    const int64_t np = K / 64;
    __m512 a[T][R][2];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) a[t][r][0] = a[t][r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        for (int t = 0; t < T; t++) {
            __m512 w[4];
            if (q8) unit_q8(data, scales, np, n + t, p, w);
            else unit_q4(data, scales, np, n + t, p, w);
            for (int r = 0; r < R; r++) {
                const float *xp = x + r * K + p * 64;
                a[t][r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w[0], a[t][r][0]);
                a[t][r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + 16), w[1], a[t][r][1]);
                a[t][r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + 32), w[2], a[t][r][0]);
                a[t][r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + 48), w[3], a[t][r][1]);
            }
        }
    }
    if (lr)
        for (int t = 0; t < T; t++)
            for (int64_t j = 0; j < lr->rp; j += 16) {
                const __m512 u = _mm512_loadu_ps(lr->up + (n + t) * lr->rp + j);
                for (int r = 0; r < R; r++)
                    a[t][r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(lr->t + r * lr->r_total + lr->offset[n + t] + j), u,
                                                 a[t][r][0]);
            }
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) y[r * N + n + t] = _mm512_reduce_add_ps(_mm512_add_ps(a[t][r][0], a[t][r][1]));
}

/* Rows 0..R-1, outputs n0..n1-1: T outputs at a time (several accumulator chains in flight
   where there are few rows), the rest one by one. */
#define ROWS(R, T)                                                                                       \
    TARGET static void rows##R(const float *x, const uint8_t *data, const float *scales, float *y,     \
                               int64_t N, int64_t K, int64_t n0, int64_t n1, int q8, const low_rank *lr) { \
        int64_t n = n0;                                                                                  \
        if (q8) {                                                                                        \
            for (; n + T <= n1; n += T) tile(x, data, scales, y, N, K, n, T, R, 1, lr);                  \
            for (; n < n1; n++) tile(x, data, scales, y, N, K, n, 1, R, 1, lr);                          \
        } else {                                                                                         \
            for (; n + T <= n1; n += T) tile(x, data, scales, y, N, K, n, T, R, 0, lr);                  \
            for (; n < n1; n++) tile(x, data, scales, y, N, K, n, 1, R, 0, lr);                          \
        }                                                                                                \
    }
ROWS(1, 4)
ROWS(2, 2)
ROWS(3, 2)
ROWS(4, 1)
ROWS(5, 1)
ROWS(6, 1)
ROWS(7, 1)
ROWS(8, 1)

typedef void (*rows_fn)(const float *, const uint8_t *, const float *, float *, int64_t, int64_t, int64_t,
                        int64_t, int, const low_rank *);
static const rows_fn ROWS_FN[9] = {0, rows1, rows2, rows3, rows4, rows5, rows6, rows7, rows8};

static void range(const float *x, const uint8_t *data, const float *scales, float *y, int64_t M, int64_t N,
                  int64_t K, int64_t n0, int64_t n1, int q8, const low_rank *lr) {
    for (int64_t r0 = 0; r0 < M; r0 += 8) {
        const int64_t R = M - r0 < 8 ? M - r0 : 8;
        low_rank rows = {0};
        if (lr) {
            rows = *lr;
            rows.t = lr->t + r0 * lr->r_total;
        }
        ROWS_FN[R](x + r0 * K, data, scales, y + r0 * N, N, K, n0, n1, q8, lr ? &rows : 0);
    }
}

/* t (M, R) = x (M, K) @ down (R, K)^T, 16 lanes then one reduction per entry. */
TARGET static void down_product(const float *x, const float *down, float *t, int64_t M, int64_t K, int64_t R) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < R; j++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), _mm512_loadu_ps(down + j * K + k), a);
            t[m * R + j] = _mm512_reduce_add_ps(a);
        }
}

/* kind 0: Q4, 1: Q8. K must be a multiple of 64; x, y contiguous. threads: how many OpenMP
   threads share the outputs (the caller passes torch's intra-op count: this library runs in
   torch's own OpenMP runtime, so they are the same pool). The low-rank update, where down is not
   NULL: down (r_total, K), up (N, rp), offset (N,), t a scratch of (M, r_total) floats. */
void blocks_matmul(const float *x, const uint8_t *data, const float *scales, float *y, int64_t M,
                   int64_t N, int64_t K, int kind, int threads, const float *down, const float *up,
                   const int32_t *offset, int64_t r_total, int64_t rp, float *t) {
    low_rank update = {t, up, offset, r_total, rp};
    const low_rank *lr = down ? &update : 0;
    if (lr) down_product(x, down, t, M, K, r_total);
    if (threads > 1 && N >= 64 && M * N * K >= (int64_t)1 << 17) {
#pragma omp parallel num_threads(threads)
        {
            const int i = omp_get_thread_num(), k = omp_get_num_threads();
            const int64_t per = ((N + k - 1) / k + 3) / 4 * 4;
            const int64_t a = i * per, b = a + per < N ? a + per : N;
            if (a < b) range(x, data, scales, y, M, N, K, a, b, kind, lr);
        }
    } else {
        range(x, data, scales, y, M, N, K, 0, N, kind, lr);
    }
}
