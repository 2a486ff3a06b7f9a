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
   first accumulator before the reduction: one more fixed step in the order of the sums. down and
   up are float32, or bf16 (lr_bf16) where every value is one (a fine-tune saved in bf16): read
   as the same float32 numbers, at half the bytes, so the sums are the same. */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TARGET __attribute__((target("avx512f,avx512bw")))
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define INLINE static inline __attribute__((always_inline))

int blocks_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

/* 0 where this CPU has AMX (tiles, bf16) and AVX512-BF16 and the kernel lets this process use the
   tiles (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), else a negative number. */
int blocks_amx_init(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return -1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return -2;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return -3;
    return 0;
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

/* 16 float32 lanes from p[i..i+15], stored as float32 or (bf16 != 0) as bf16: exact either way. */
TARGET INLINE __m512 lanes16(const void *p, int64_t i, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

typedef struct {
    const float *t;        /* (M, R_total): x @ down^T */
    const void *up;        /* (N, Rp), float32 or (bf16) bf16 */
    const int32_t *offset; /* (N,): where output n's slice of t starts */
    int64_t r_total, rp;
    int bf16;
} low_rank;

/* Outputs n..n+T-1 of rows 0..R-1 (T and R compile-time constants after inlining). */
TARGET INLINE void tile(const float *x, const uint8_t *data, const float *scales, float *y, int64_t N,
                        int64_t K, int64_t n, const int T, const int R, const int q8, const low_rank *lr) {
    const int64_t np = K / 64;
    __m512 a[T][R][2];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) a[t][r][0] = a[t][r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        /* With one or two rows the products wait on memory: the next outputs' unit p comes in
           towards L2 meanwhile (past the array's end a prefetch is a no-op). More rows take
           longer to compute than to read: no prefetches there (they cost more than they save). */
        if (R <= 2)
            for (int t = 0; t < T; t++) {
                _mm_prefetch((const char *)(data + ((n + T + t) * np + p) * (q8 ? 64 : 32)), _MM_HINT_T1);
                if (p % 4 == 0) _mm_prefetch((const char *)(scales + ((n + T + t) * np + p) * (q8 ? 2 : 4)), _MM_HINT_T1);
            }
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
                const __m512 u = lanes16(lr->up, (n + t) * lr->rp + j, lr->bf16);
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

/* t (S, r_total) = x's rows rows[0..S-1] (rows NULL: 0..S-1) @ down (r_total, K)^T (float32, or
   bf16 where bf16 != 0), entries j0..j1-1 of each row: for each entry 16 lanes then one reduction.
   Eight rows and two entries at a time (down_tile: each input vector read once for two entries,
   each weight vector once for eight rows, sixteen sums in flight); the rows and entries left over
   one entry and up to eight rows at a time. Every sum is the same either way. */
TARGET INLINE void down_tile(const float *x, const int64_t *rows, int64_t s0, int64_t K, const void *down, int bf16,
                             int64_t r_total, float *t, int64_t j) {
    __m512 a[2][8];
    const float *xr[8];
    for (int i = 0; i < 8; i++) xr[i] = x + (rows ? rows[s0 + i] : s0 + i) * K;
    for (int q = 0; q < 2; q++)
        for (int i = 0; i < 8; i++) a[q][i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 d0 = lanes16(down, j * K + k, bf16), d1 = lanes16(down, (j + 1) * K + k, bf16);
        for (int i = 0; i < 8; i++) {
            const __m512 v = _mm512_loadu_ps(xr[i] + k);
            a[0][i] = _mm512_fmadd_ps(v, d0, a[0][i]);
            a[1][i] = _mm512_fmadd_ps(v, d1, a[1][i]);
        }
    }
    for (int q = 0; q < 2; q++)
        for (int i = 0; i < 8; i++) t[(s0 + i) * r_total + j + q] = _mm512_reduce_add_ps(a[q][i]);
}

TARGET static void rows_down(const float *x, const int64_t *rows, int64_t S, int64_t K, const void *down, int bf16,
                             int64_t r_total, float *t, int64_t j0, int64_t j1) {
    const int64_t full = S / 8 * 8, paired = j0 + (j1 - j0) / 2 * 2;
    for (int64_t j = j0; j < paired; j += 2)
        for (int64_t s0 = 0; s0 < full; s0 += 8) down_tile(x, rows, s0, K, down, bf16, r_total, t, j);
    for (int64_t j = j0; j < j1; j++) {
        __m512 a[8];
        for (int64_t s0 = j < paired ? full : 0; s0 < S; s0 += 8) {
            const int64_t n_rows = S - s0 < 8 ? S - s0 : 8;
            for (int64_t i = 0; i < n_rows; i++) a[i] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                const __m512 d = lanes16(down, j * K + k, bf16);
                for (int64_t i = 0; i < n_rows; i++)
                    a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (rows ? rows[s0 + i] : s0 + i) * K + k), d, a[i]);
            }
            for (int64_t i = 0; i < n_rows; i++) t[(s0 + i) * r_total + j] = _mm512_reduce_add_ps(a[i]);
        }
    }
}

/* This thread's share of i of k: [lo, hi) of `count` units of `unit` each. */
static void share(int64_t count, int64_t unit, int i, int k, int64_t *lo, int64_t *hi) {
    const int64_t per = (count + k - 1) / k;
    *lo = i * per < count ? i * per * unit : count * unit;
    *hi = (i + 1) * per < count ? (i + 1) * per * unit : count * unit;
}

/* rows_down, this thread's share of the entries, then a barrier: every thread of the team reads
   all of t after it. */
static void team_down(const float *x, const int64_t *rows, int64_t S, int64_t K, const void *down, int bf16,
                      int64_t r_total, float *t) {
    int64_t lo, hi;
    share(r_total, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    rows_down(x, rows, S, K, down, bf16, r_total, t, lo, hi);
#pragma omp barrier
}

/* ---- The same products in bf16 on AMX (products == 1) ------------------------------------------

   Each weight is the float32 dequantisation above rounded to bf16 (round to nearest even: the
   dense bf16 model's weight), each input rounded to bf16 likewise, the products summed in float32
   by the tiles: A = 16 outputs x 32 inputs of weights (one block of each output), B = the same 32
   inputs of up to 16 rows (pairs of inputs side by side, the tiles' layout), C (outputs x rows) +=
   A B over the blocks in order. An output's sum depends on its own weights and its own row only,
   in the same order whatever the other rows or the thread count. A low-rank update is added after
   the product, in bf16 too (bf16_update, below). N must be a multiple of 16. */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* ldtilecfg of the whole 64-byte configuration. (GCC 12's _tile_loadconfig tells the compiler it
   reads 8 bytes, which lets it drop the stores of the rest as dead: a configuration of garbage.) */
static inline void load_tile_config(const tile_config *cfg) { __asm__ volatile("ldtilecfg %0" ::"m"(*cfg)); }

AMX_TARGET static void amx_configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 7; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    load_tile_config(&cfg);
}

/* The B tiles of rows 0..M-1: for each group of 16 rows and block c of 32 inputs, 16 lines of 16
   pairs: line r, pair m = inputs 32c + 2r, 2r + 1 of row 16g + m (rows past M: zeros). */
AMX_TARGET static void amx_inputs(const float *x, int64_t M, int64_t K, uint32_t *b) {
    const int64_t chunks = K / 32, groups = (M + 15) / 16;
    memset(b, 0, sizeof(uint32_t) * groups * chunks * 256);
    for (int64_t m = 0; m < M; m++) {
        uint32_t *g = b + (m / 16) * chunks * 256 + m % 16;
        for (int64_t c = 0; c < chunks; c++) {
            const float *xc = x + m * K + c * 32;
            uint32_t pairs[16] __attribute__((aligned(64)));
            _mm512_store_si512((__m512i *)pairs,
                               (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xc + 16), _mm512_loadu_ps(xc)));
            for (int r = 0; r < 16; r++) g[c * 256 + r * 16] = pairs[r];
        }
    }
}

/* The A tiles of outputs n..n+15: a (K / 32 blocks, 16 outputs, 32 bf16). */
AMX_TARGET static void amx_weights(const uint8_t *data, const float *scales, int64_t K, int64_t n, int q8, uint16_t *a) {
    const int64_t np = K / 64;
    for (int64_t t = 0; t < 16; t++)
        for (int64_t p = 0; p < np; p++) {
            __m512 w[4];
            if (q8) unit_q8(data, scales, np, n + t, p, w);
            else unit_q4(data, scales, np, n + t, p, w);
            _mm512_store_si512((__m512i *)(a + (2 * p) * 512 + t * 32), (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
            _mm512_store_si512((__m512i *)(a + (2 * p + 1) * 512 + t * 32), (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
        }
}

/* A C tile (outputs n..n+15 x rows 16g..16g+15) into y. */
AMX_TARGET static void amx_store(const float *c, float *y, int64_t M, int64_t N, int64_t n, int64_t g) {
    const int64_t rows = M - 16 * g < 16 ? M - 16 * g : 16;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t t = 0; t < 16; t++) y[(16 * g + m) * N + n + t] = c[t * 16 + m];
}

/* Outputs n0..n1-1 (multiples of 16) of every row, four tiles of 16 outputs at a time (four
   independent sums in flight); each tile's A is made once (a: 4 x 16 x K bf16) and serves every
   group of rows. The order of each output's sums is the same on both paths below. */
AMX_TARGET static void amx_range(const uint32_t *b, const uint8_t *data, const float *scales, float *y, int64_t M,
                                 int64_t N, int64_t K, int64_t n0, int64_t n1, int q8, uint16_t *a) {
    const int64_t chunks = K / 32, groups = (M + 15) / 16, span = 16 * K;
    float c[4][256] __attribute__((aligned(64)));
    amx_configure();
    int64_t n = n0;
    for (; groups == 1 && n + 64 <= n1; n += 64) {
        /* One group of rows (a decoding step, a draft block): the weights of each unit of 64
           inputs go through the tiles as soon as they are made, while they are in L1. */
        const int64_t np = K / 64;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t p = 0; p < np; p++) {
            if (n + 128 <= n1) /* 64 outputs read side by side are 64 streams: fetch the next 64's ahead */
                for (int64_t t = 64; t < 128; t++) {
                    const int64_t u = (n + t) * np + p;
                    _mm_prefetch((const char *)(data + u * (q8 ? 64 : 32)), _MM_HINT_T0);
                    _mm_prefetch((const char *)(scales + u * (q8 ? 2 : 4)), _MM_HINT_T0);
                }
            for (int64_t t = 0; t < 64; t++) {
                __m512 w[4];
                if (q8) unit_q8(data, scales, np, n + t, p, w);
                else unit_q4(data, scales, np, n + t, p, w);
                uint16_t *at = a + (t / 16) * 1024 + (t % 16) * 32;
                _mm512_store_si512((__m512i *)at, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
                _mm512_store_si512((__m512i *)(at + 512), (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
            }
            for (int h = 0; h < 2; h++) {
                _tile_loadd(4, b + (2 * p + h) * 256, 64);
                _tile_loadd(5, a + h * 512, 64);
                _tile_dpbf16ps(0, 5, 4);
                _tile_loadd(6, a + 1024 + h * 512, 64);
                _tile_dpbf16ps(1, 6, 4);
                _tile_loadd(5, a + 2048 + h * 512, 64);
                _tile_dpbf16ps(2, 5, 4);
                _tile_loadd(6, a + 3072 + h * 512, 64);
                _tile_dpbf16ps(3, 6, 4);
            }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        for (int i = 0; i < 4; i++) amx_store(c[i], y, M, N, n + 16 * i, 0);
    }
    for (; n + 64 <= n1; n += 64) {
        for (int i = 0; i < 4; i++) amx_weights(data, scales, K, n + 16 * i, q8, a + i * span);
        for (int64_t g = 0; g < groups; g++) {
            const uint32_t *bg = b + g * chunks * 256;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t ch = 0; ch < chunks; ch++) {
                _tile_loadd(4, bg + ch * 256, 64);
                _tile_loadd(5, a + ch * 512, 64);
                _tile_dpbf16ps(0, 5, 4);
                _tile_loadd(6, a + span + ch * 512, 64);
                _tile_dpbf16ps(1, 6, 4);
                _tile_loadd(5, a + 2 * span + ch * 512, 64);
                _tile_dpbf16ps(2, 5, 4);
                _tile_loadd(6, a + 3 * span + ch * 512, 64);
                _tile_dpbf16ps(3, 6, 4);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            for (int i = 0; i < 4; i++) amx_store(c[i], y, M, N, n + 16 * i, g);
        }
    }
    for (; n < n1; n += 16) {
        amx_weights(data, scales, K, n, q8, a);
        for (int64_t g = 0; g < groups; g++) {
            _tile_zero(0);
            for (int64_t ch = 0; ch < chunks; ch++) {
                _tile_loadd(4, b + (g * chunks + ch) * 256, 64);
                _tile_loadd(5, a + ch * 512, 64);
                _tile_dpbf16ps(0, 5, 4);
            }
            _tile_stored(0, c[0], 64);
            amx_store(c[0], y, M, N, n, g);
        }
    }
    _tile_release();
}

/* A low-rank update kept in bf16 (its weights are read at every forward: half the bytes), added
   after the product: a fine-tune beside bf16 products, a drafter's update at its draft slots.
   down (r_total, K), up_t (N / 16, rp, 16): up by tiles of 16 outputs, transposed, where the 16
   outputs of a tile read one slice of t (offset[n], the same for the tile: dlm/blocks.py checks).
   down == NULL: no update. Each row's update is its own: the same sums in the same order. */
typedef struct {
    const uint16_t *down, *up_t;
    const int32_t *offset;
    int64_t r_total, rp;
} bf16_update;

/* y[rows[s]][n] (rows NULL: y[s][n]) += t[s][offset[n]..] . up[n] for the outputs n0..n1-1
   (multiples of 16). */
TARGET static void update_add(const int64_t *rows, int64_t S, const bf16_update *u, const float *t, float *y, int64_t N,
                              int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n += 16) {
        const uint16_t *ut = u->up_t + n * u->rp;
        for (int64_t s = 0; s < S; s++) {
            const float *tn = t + s * u->r_total + u->offset[n];
            __m512 a = _mm512_setzero_ps();
            for (int64_t j = 0; j < u->rp; j++) a = _mm512_fmadd_ps(_mm512_set1_ps(tn[j]), lanes16(ut, j * 16, 1), a);
            float *yn = y + (rows ? rows[s] : s) * N + n;
            _mm512_storeu_ps(yn, _mm512_add_ps(_mm512_loadu_ps(yn), a));
        }
    }
}

/* y (M, N) += (x (M, K) @ down^T) . up at the rows where drafted[m] (a drafter's update at its
   draft slots): all those rows at once, the work split between the threads (t: a scratch of
   M x r_total; N a multiple of 16). */
TARGET static void add_update(const float *x, const uint8_t *drafted, int64_t M, int64_t K, const bf16_update *u,
                              float *y, int64_t N, float *t, int threads) {
    if (!u->down) return;
    int64_t rows[M > 0 ? M : 1], S = 0;
    for (int64_t m = 0; m < M; m++)
        if (drafted[m]) rows[S++] = m;
    if (!S) return;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        team_down(x, rows, S, K, u->down, 1, u->r_total, t);
        int64_t lo, hi;
        share(N / 16, 16, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        update_add(rows, S, u, t, y, N, lo, hi);
    }
}

/* ---- Float32-accurate products on AMX (products == 2, `BlockWeight.split`) ----------------------

   The blocks' integers q are exact in bf16 (Q4: 0..15, Q8: -128..127), and each float32 input is
   the exact sum of three bf16 parts (x0 = bf16(x), x1 = bf16(x - x0), x2 = x - x0 - x1: 8 + 8 + 8
   significant bits), so every product of a part and an integer is exact in float32, and the tiles
   sum them in float32: a block's S = sum of x q over its 32 inputs is a float32 sum, as on the
   float32 path (in another order), and each output adds d S + m (sum of x) block after block, in
   float32 (w = q d + m; Q8: m = 0). Errors of float32's order, not bf16's. The tiles, per block:
   B = the integers of 16 outputs for its 32 inputs (line i: inputs 2i, 2i + 1 of each output side
   by side), A_p = part p of a group of up to SPLIT_ROWS rows (R lines: the rows' 32 inputs), and
   C (rows x outputs) = A_0 B + A_1 B + A_2 B, summed by the tiles in that order; tiles of R lines
   cost what their lines do (`split_configure`). A row's bits depend on its own inputs only.
   Layouts (dlm/blocks.py `BlockWeight.split` makes them), per tile of 16 outputs and block c:
     Q4: data (N / 16, K / 32, 8, 32 bytes): byte j of pair L holds lane j of line 2L in its low
         nibble, of line 2L + 1 in its high one (lane j of line i: output j / 2, input 2i + j % 2).
     Q8: data (N / 16, K / 32, 16, 32) int8: line i, lane j as above.
     scales (N / 16, K / 32, 2, 16) float16: d, then m, of the tile's 16 outputs.
   A low-rank update stays float32 (its weights float32 or bf16, as on the float32 path): t = x @
   down^T first (rows_down, shared between the threads), then each output adds t[offset..+rp] . up
   after the blocks, up_t (N / 16, rp, 16) (one offset per tile of 16). */

#define SPLIT_ROWS 16 /* rows per group, a tile's 16 lines (with 5, a verifying forward of 6 rows ran two groups) */

/* The A lines of rows 0..M-1, K bf16 each: group g (rows SPLIT_ROWS g ..., R of them) starts at
   line 3 SPLIT_ROWS g, part p of its row r at line p R + r from there (so part p's A tile is R
   lines from line p R). sx (M, K / 32): each row's sum over each block. */
AMX_TARGET static void split_inputs(const float *x, int64_t M, int64_t K, uint16_t *a, float *sx) {
    const int64_t chunks = K / 32;
    for (int64_t m = 0; m < M; m++) {
        const int64_t g = m / SPLIT_ROWS, r = m % SPLIT_ROWS;
        const int64_t R = M - g * SPLIT_ROWS < SPLIT_ROWS ? M - g * SPLIT_ROWS : SPLIT_ROWS;
        uint16_t *lines = a + 3 * SPLIT_ROWS * g * K;
        const float *xm = x + m * K;
        for (int64_t k = 0; k < K; k += 16) {
            __m512 v = _mm512_loadu_ps(xm + k);
            for (int p = 0; p < 3; p++) {
                const __m256bh h = _mm512_cvtneps_pbh(v);
                _mm256_storeu_si256((__m256i *)(lines + (p * R + r) * K + k), (__m256i)h);
                v = _mm512_sub_ps(v, _mm512_cvtpbh_ps(h));
            }
        }
        for (int64_t c = 0; c < chunks; c++)
            sx[m * chunks + c] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xm + 32 * c),
                                                                    _mm512_loadu_ps(xm + 32 * c + 16)));
    }
}

/* The B tiles of tile `tile` (16 outputs) for every block: b (K / 32, 16 lines, 32) bf16. */
AMX_TARGET static void split_weights(const uint8_t *data, int64_t K, int64_t tile, int q8, uint16_t *b) {
    const int64_t chunks = K / 32;
    if (q8) {
        const int8_t *q = (const int8_t *)data + tile * chunks * 512;
        for (int64_t i = 0; i < chunks * 16; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(q + 32 * i));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
            _mm512_store_si512((__m512i *)(b + 32 * i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
        return;
    }
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(iota, iota); /* bf16 of 0..15 at indices 0..15 */
    const __m512i nibble = _mm512_set1_epi16(15);
    const uint8_t *q = data + tile * chunks * 256;
    for (int64_t i = 0; i < chunks * 8; i++) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + 32 * i)));
        _mm512_store_si512((__m512i *)(b + 64 * i), _mm512_permutexvar_epi16(_mm512_and_si512(v, nibble), table));
        _mm512_store_si512((__m512i *)(b + 64 * i + 32), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
    }
}

typedef struct {
    const float *t;    /* this group's rows of x @ down^T (rows r_total apart), or NULL */
    const void *up_t;  /* this tile's (rp, 16), float32 or (bf16) bf16 */
    int64_t r_total, offset, rp;
    int bf16;
} tile_update;

/* Rows 0..R-1 of a group (A lines a, sums sx), the 16 outputs of tile `tile` (B tiles b) into
   y (rows N apart): two C tiles in turn, so that one block's product runs while the other's is
   scaled. c: 2 x 256 floats, aligned. */
AMX_TARGET INLINE void split_group(const uint16_t *a, const uint16_t *b, const uint16_t *scales, const float *sx,
                                   float *y, int64_t N, int64_t K, int64_t tile, const int R, const int q8,
                                   const tile_update *u, const uint8_t *next, const uint16_t *next_scales, float *c) {
    const int64_t chunks = K / 32, stride = 2 * K;
    const uint16_t *s = scales + tile * chunks * 32;
    __m512 acc[SPLIT_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    /* Block ch into C tile T: its B tile (into tile BT), then the three parts' A tiles. */
#define SPLIT_ISSUE(T, BT, ch)                                                                            \
    do {                                                                                              \
        _tile_zero(T);                                                                                \
        _tile_loadd(BT, b + (ch) * 512, 64);                                                       \
        _tile_loadd(2, a + (ch) * 32, stride);                                                        \
        _tile_dpbf16ps(T, 2, BT);                                                                  \
        _tile_loadd(3, a + R * K + (ch) * 32, stride);                                                \
        _tile_dpbf16ps(T, 3, BT);                                                                  \
        _tile_loadd(6, a + 2 * R * K + (ch) * 32, stride);                                            \
        _tile_dpbf16ps(T, 6, BT);                                                                  \
    } while (0)
#define SPLIT_SCALE(ch, cbuf)                                                                         \
    do {                                                                                              \
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + (ch) * 32)));      \
        const __m512 mm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + (ch) * 32 + 16))); \
        for (int r = 0; r < R; r++) {                                                                 \
            acc[r] = _mm512_fmadd_ps(_mm512_load_ps((cbuf) + 16 * r), d, acc[r]);                     \
            if (!q8) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(sx[r * chunks + (ch)]), mm, acc[r]);     \
        }                                                                                             \
    } while (0)
    /* Each block's C is read back one step after it is stored (a tile's store does not forward
       to the loads right behind it). */
    SPLIT_ISSUE(0, 4, 0);
    for (int64_t ch = 0; ch < chunks; ch += 2) {
        if (next) { /* the next tile's blocks of these two chunks, towards L2, while the tiles work */
            for (int i = 0; i < (q8 ? 16 : 8); i++) _mm_prefetch((const char *)next + ch * (q8 ? 512 : 256) + 64 * i, _MM_HINT_T1);
            _mm_prefetch((const char *)(next_scales + ch * 32), _MM_HINT_T1);
            _mm_prefetch((const char *)(next_scales + ch * 32 + 32), _MM_HINT_T1);
        }
        SPLIT_ISSUE(1, 5, ch + 1);
        _tile_stored(0, c, 64);
        if (ch) SPLIT_SCALE(ch - 1, c + 256);
        if (ch + 2 < chunks) SPLIT_ISSUE(0, 4, ch + 2);
        _tile_stored(1, c + 256, 64);
        SPLIT_SCALE(ch, c);
    }
    SPLIT_SCALE(chunks - 1, c + 256);
#undef SPLIT_ISSUE
#undef SPLIT_SCALE
    if (u->t)
        for (int64_t j = 0; j < u->rp; j++) {
            const __m512 w = lanes16(u->up_t, 16 * j, u->bf16);
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(u->t[r * u->r_total + u->offset + j]), w, acc[r]);
        }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * N + 16 * tile, acc[r]);
}

AMX_TARGET static void split_group_any(const uint16_t *a, const uint16_t *b, const uint16_t *scales, const float *sx,
                                       float *y, int64_t N, int64_t K, int64_t tile, int R, int q8,
                                       const tile_update *u, const uint8_t *next, const uint16_t *next_scales,
                                       float *c) {
#define SPLIT_CASE(n)                                                                                      \
    case n:                                                                                                \
        if (q8) split_group(a, b, scales, sx, y, N, K, tile, n, 1, u, next, next_scales, c);               \
        else split_group(a, b, scales, sx, y, N, K, tile, n, 0, u, next, next_scales, c);                  \
        break;
    switch (R) {
        SPLIT_CASE(1)
        SPLIT_CASE(2)
        SPLIT_CASE(3)
        SPLIT_CASE(4)
        SPLIT_CASE(5)
        SPLIT_CASE(6)
        SPLIT_CASE(7)
        SPLIT_CASE(8)
        SPLIT_CASE(9)
        SPLIT_CASE(10)
        SPLIT_CASE(11)
        SPLIT_CASE(12)
        SPLIT_CASE(13)
        SPLIT_CASE(14)
        SPLIT_CASE(15)
        SPLIT_CASE(16)
    }
#undef SPLIT_CASE
}

/* Tiles 0, 1 (C) and 2, 3, 6 (A) of `rows` lines (the tiles cost what their lines do), 4, 5 (B) of 16. */
AMX_TARGET static void split_configure(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 7; i++) cfg.rows[i] = i == 4 || i == 5 ? 16 : rows, cfg.colsb[i] = 64;
    load_tile_config(&cfg);
}

/* Tiles lo..hi-1 of 16 outputs, every group of rows (b: a scratch of 16 K bf16). */
AMX_TARGET static void split_range(const uint16_t *a, const float *sx, const uint8_t *data, const uint16_t *scales, float *y,
                                   int64_t M, int64_t N, int64_t K, int64_t lo, int64_t hi, int q8, const float *t,
                                   const void *up_t, int lr_bf16, const int32_t *offset, int64_t r_total, int64_t rp,
                                   uint16_t *b) {
    const int64_t chunks = K / 32, groups = (M + SPLIT_ROWS - 1) / SPLIT_ROWS;
    float c[512] __attribute__((aligned(64)));
    int64_t configured = 0;
    for (int64_t tile = lo; tile < hi; tile++) {
        split_weights(data, K, tile, q8, b);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t R = M - g * SPLIT_ROWS < SPLIT_ROWS ? M - g * SPLIT_ROWS : SPLIT_ROWS;
            if (R != configured) split_configure((int)(configured = R));
            const tile_update u = {t ? t + g * SPLIT_ROWS * r_total : 0,
                                    t ? (const char *)up_t + tile * rp * 16 * (lr_bf16 ? 2 : 4) : 0, r_total,
                                    t ? offset[16 * tile] : 0, rp, lr_bf16};
            const int ahead = g == 0 && tile + 1 < hi;
            split_group_any(a + 3 * SPLIT_ROWS * g * K, b, scales, sx + g * SPLIT_ROWS * chunks, y + g * SPLIT_ROWS * N,
                            N, K, tile, (int)R, q8, &u, ahead ? data + (tile + 1) * chunks * (q8 ? 512 : 256) : 0,
                            ahead ? scales + (tile + 1) * chunks * 32 : 0, c);
        }
    }
    _tile_release();
}

/* y (M, N) = x @ W^T as above, plus the float32 update (down (r_total, K), up_t, offset, in
   float32 or (lr_bf16) bf16, or down NULL; t a scratch of M x r_total). N a multiple of 16, K of 64. */
static void split_matmul(const float *x, const uint8_t *data, const uint16_t *scales, float *y, int64_t M, int64_t N,
                         int64_t K, int q8, int threads, const void *down, const void *up_t, int lr_bf16,
                         const int32_t *offset, int64_t r_total, int64_t rp, float *t, int *status) {
    const int64_t chunks = K / 32, tiles = N / 16;
    uint16_t *a = aligned_alloc(64, sizeof(uint16_t) * 3 * M * K);
    float *sx = malloc(sizeof(float) * M * chunks);
    if (!a || !sx) {
        free(a), free(sx);
        *status = -1;
        return;
    }
    split_inputs(x, M, K, a, sx);
    const int parallel = threads > 1 && tiles >= 8;
#pragma omp parallel num_threads(parallel ? threads : 1)
    {
        if (down) team_down(x, 0, M, K, down, lr_bf16, r_total, t);
        int64_t lo, hi;
        share(tiles, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        uint16_t *b = aligned_alloc(64, sizeof(uint16_t) * 16 * K);
        if (!b) {
#pragma omp atomic write
            *status = -1;
        } else if (lo < hi) {
            split_range(a, sx, data, scales, y, M, N, K, lo, hi, q8, down ? t : 0, up_t, lr_bf16, offset, r_total, rp, b);
        }
        free(b);
    }
    free(a), free(sx);
}

/* y (M, N) = x @ W^T in bf16 products (above), plus the update u (or NULL) in bf16: its t made
   first by the team (t: a scratch of M x u->r_total), then each thread adds it to its own outputs. */
static void amx_matmul(const float *x, const uint8_t *data, const float *scales, float *y, int64_t M, int64_t N,
                       int64_t K, int q8, int threads, const bf16_update *u, float *t, int *status) {
    const int64_t groups = (M + 15) / 16, tiles = N / 16;
    uint32_t *b = aligned_alloc(64, sizeof(uint32_t) * groups * (K / 32) * 256);
    if (!b) {
        *status = -1;
        return;
    }
    if (u && !u->down) u = 0;
    amx_inputs(x, M, K, b);
    const int parallel = threads > 1 && tiles >= 8;
#pragma omp parallel num_threads(parallel ? threads : 1)
    {
        if (u) team_down(x, 0, M, K, u->down, 1, u->r_total, t);
        int64_t lo, hi;
        share(tiles, 16, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        uint16_t *a = aligned_alloc(64, sizeof(uint16_t) * 4 * 16 * K);
        if (!a) {
#pragma omp atomic write
            *status = -1;
        } else if (lo < hi) {
            amx_range(b, data, scales, y, M, N, K, lo, hi, q8, a);
            if (u) update_add(0, M, u, t, y, N, lo, hi);
        }
        free(a);
    }
    free(b);
}

/* ---- Integer products on VNNI: 8-bit inputs (rounded as llama.cpp rounds its activations, products == 3,
   `BlockWeight.int8`) and 16-bit inputs (products == 4, `BlockWeight.int16`) ----------------------

   Each row's inputs are rounded to integers per block of 32, scaled by the block's largest:
     8 bits (as llama.cpp rounds its activations, Q8_0 / Q8_1): X = round(x 127 / max |x|), in
       -127..127, unit da = max |x| / 127;
     16 bits: X = round(x 32512 / max |x|), in -32512..32512, unit da = max |x| / 32512, as two
       bytes: X = 256 H + L, H = (X + 128) >> 8 in -127..127, L in -128..127.
   The weights' integers u (Q4: q in 0..15; Q8: q + 128 in 0..255, unsigned) times X are summed
   exactly in int32 by VNNI (vpdpbusd: four u8 x s8 products per 32-bit lane; 16 bits: the H and L
   sums apart, then S = 256 S_H + S_L), then each output adds, block after block in order, in float32:
     Q4: (d da) S + m sx      (w = d q + m; sx the block's float32 sum of its inputs, exact ones)
     Q8: (d da) (S - 128 sum X)   (the offset of u taken off in int32, exactly).
   The only rounding beyond float32's is the inputs': up to 1/254 of the block's largest input
   with 8 bits (logits close to float32's, not its greedy replies on every prompt), 1/65024 with
   16 bits (closer than bf16 inputs). A row's bits depend on its own inputs only, whatever the
   other rows or the thread count.
   Lanes are outputs: per tile of 16 outputs and block, eight vectors hold the integers of inputs
   4i..4i+3 of the 16 outputs (lane j, bytes 4j..4j+3: output j), each multiplied by the row's
   inputs 4i..4i+3 broadcast to every lane. Layouts (dlm/blocks.py `BlockWeight.int8` makes them),
   per tile and block:
     Q4: data (N / 16, K / 32, 4, 64 bytes): byte 4j + c of vector L holds output j's integer of
         input 4L + c in its low nibble, of input 16 + 4L + c in its high one;
     Q8: data (N / 16, K / 32, 8, 64 bytes): byte 4j + c of vector i, output j's q + 128 of input 4i + c;
     scales (N / 16, K / 32, 2, 16) float16: d, then m (Q4), of the tile's 16 outputs.
   A low-rank update in float32 as on the split path (t = x @ down^T first, up by tiles, added
   after the blocks). */

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define INT_ROWS 8 /* rows per group: each weight vector, once unpacked, serves up to 8 rows */
typedef int32_t quad __attribute__((may_alias, aligned(4))); /* four int8 inputs read as one */

int blocks_vnni_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}

typedef struct {
    const int8_t *q, *lo; /* (rows, K): X (8 bits) or H (16 bits); L (16 bits), else NULL */
    const float *d, *s;   /* (rows, K / 32): da, sx */
    const int32_t *offset; /* (rows, K / 32): -128 sum X (Q8's offset, taken off in int32) */
} int_inputs;

/* Rows 0..M-1 as int_inputs (wide: 16 bits): q, lo (wide only) (M, K); d, s, offset (M, K / 32). */
VNNI_TARGET static void int_inputs_of(const float *x, int64_t M, int64_t K, int wide, int8_t *q, int8_t *lo, float *d,
                                      float *s, int32_t *offset) {
    const int64_t chunks = K / 32;
    const float top_int = wide ? 32512.0f : 127.0f;
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t at = m * K + 32 * c, i = m * chunks + c;
            const __m512 first = _mm512_loadu_ps(x + at), second = _mm512_loadu_ps(x + at + 16);
            const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
            const __mmask16 nan = _mm512_cmp_ps_mask(first, first, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(second, second, _CMP_UNORD_Q);
            const float inverse = top_int / top; /* +inf for a block of zeros or of tiny numbers: scale 0 then */
            const __m512 scale = _mm512_set1_ps(top > 0.0f && inverse < INFINITY ? inverse : 0.0f);
            const __m512i v[2] = {_mm512_cvtps_epi32(_mm512_mul_ps(first, scale)),
                                  _mm512_cvtps_epi32(_mm512_mul_ps(second, scale))};
            d[i] = nan || !(top < INFINITY) ? NAN : top / top_int; /* not finite in: NaN out (float32: NaN or inf) */
            s[i] = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
            /* summed in uint32: a non-finite input's X (INT_MIN) wraps instead of overflowing a signed
               sum, as the compiler's reduction of int32 lanes would (its outputs are NaN either way) */
            uint32_t lanes[16], total = 0;
            _mm512_storeu_si512((void *)lanes, _mm512_add_epi32(v[0], v[1]));
            for (int j = 0; j < 16; j++) total += lanes[j];
            offset[i] = (int32_t)(0u - 128u * total);
            for (int h = 0; h < 2; h++) {
                __m512i high = v[h];
                if (wide) {
                    high = _mm512_srai_epi32(_mm512_add_epi32(v[h], _mm512_set1_epi32(128)), 8);
                    const __m512i low = _mm512_sub_epi32(v[h], _mm512_slli_epi32(high, 8));
                    _mm_storeu_si128((__m128i *)(lo + at + 16 * h), _mm512_cvtsepi32_epi8(low));
                }
                _mm_storeu_si128((__m128i *)(q + at + 16 * h), _mm512_cvtsepi32_epi8(high));
            }
        }
}

/* acc + the products of w's unsigned bytes and the four signed bytes at p, broadcast from memory
   inside the instruction (vpdpbusd's {1to16} operand: no separate broadcast). */
VNNI_TARGET INLINE __m512i dp_bcast(__m512i acc, __m512i w, const quad *p) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
    return acc;
}

/* Rows r0..r0+n-1 (n at most 4, a compile-time constant after inlining) of chunk c against one
   tile's unpacked weights w: their integer sums, then into their accumulators acc[0..n-1]. The
   rows' chains run side by side: each product's sums are exact integers, so the order they are
   made in changes no bit, and chains in flight together keep the multiply pipes busy where one
   row's two chains (of eight products with 16-bit inputs, four with 8-bit) would wait on each
   other. With the inputs broadcast inside the products (`dp_bcast`; the compiler had made each
   broadcast an instruction of its own), the default model's forwards of 3 to 8 positions took
   2-7 % less, 1 and 2 positions the same (a throwaway A/B of the two libraries alternating in one
   process, session 49; docs/models.md, "Rows side by side in the products"). */
VNNI_TARGET INLINE void int_rows(const int_inputs *in, const __m512i w[8], const __m512 d, const __m512 mn, __m512 *acc,
                                 int64_t K, int64_t chunks, int64_t c, const int r0, const int n, const int q8,
                                 const int wide) {
    __m512i sh[4], sl[4];
    for (int j = 0; j < n; j++) {
        sh[j] = _mm512_setzero_si512();
        sl[j] = q8 ? _mm512_set1_epi32(in->offset[(r0 + j) * chunks + c]) : _mm512_setzero_si512();
    }
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < n; j++) {
            const quad *hi = (const quad *)(in->q + (r0 + j) * K + 32 * c);
            if (wide) { /* S_H and S_L: S = 256 S_H + S_L (the offset in S_L) */
                const quad *lo = (const quad *)(in->lo + (r0 + j) * K + 32 * c);
                sh[j] = dp_bcast(sh[j], w[i], hi + i);
                sl[j] = dp_bcast(sl[j], w[i], lo + i);
            } else if (i % 2 == 0) { /* two chains of four products (the offset in the second) */
                sh[j] = dp_bcast(sh[j], w[i], hi + i);
            } else {
                sl[j] = dp_bcast(sl[j], w[i], hi + i);
            }
        }
    for (int j = 0; j < n; j++) {
        const int64_t at = (r0 + j) * chunks + c;
        const __m512i sum = wide ? _mm512_add_epi32(_mm512_slli_epi32(sh[j], 8), sl[j]) : _mm512_add_epi32(sh[j], sl[j]);
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_set1_ps(in->d[at])), acc[j]);
        if (!q8) acc[j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(in->s[at]), acc[j]);
    }
}

/* Rows 0..R-1 of a group (`in` from its first row), tiles `tile`..+T-1 (16 outputs each) into y
   (rows N apart); lr: the update (t from the group's first row), or NULL. Where `ahead`, each
   block's load is preceded by a prefetch of the same block of the tile T further on, towards L2:
   the products of up to 8 rows wait on memory for their weights (a decoding step's come from DRAM,
   every projection after the next), and the hardware's prefetchers ramp up on each of a call's
   short streams only after it has started. Measured on a 2-core AMD EPYC (Zen 4, VNNI, 16-bit
   inputs; session 35), the default model's forwards after 160 cached positions, fastest of 10
   interleaved rounds: 1 row 4.71 -> 4.24 ms, 4 rows 7.36 -> 6.94, 8 rows 13.20 -> 12.27, 8
   positions of one row 10.97 -> 10.09; the 150-token prefill unchanged (docs/benchmarks.md,
   "Session 35"). Prefetching the first tiles of a call as well gained nothing more; into L1, less. */
VNNI_TARGET INLINE void int_tile(const int_inputs *in, const uint8_t *data, const uint16_t *scales, float *y,
                                 int64_t N, int64_t K, int64_t tile, const int T, const int R, const int q8,
                                 const int wide, const low_rank *lr, const int ahead) {
    const int64_t chunks = K / 32, bytes = q8 ? 512 : 256;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[T][R];
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c++)
        for (int t = 0; t < T; t++) {
            const uint8_t *wd = data + ((tile + t) * chunks + c) * bytes;
            const uint16_t *sc = scales + ((tile + t) * chunks + c) * 32;
            if (ahead) { /* past the weight's end a prefetch is a no-op */
                for (int i = 0; i < bytes / 64; i++) _mm_prefetch((const char *)(wd + T * chunks * bytes + 64 * i), _MM_HINT_T1);
                _mm_prefetch((const char *)(sc + T * chunks * 32), _MM_HINT_T1);
            }
            __m512i w[8];
            if (q8)
                for (int i = 0; i < 8; i++) w[i] = _mm512_loadu_si512((const void *)(wd + 64 * i));
            else
                for (int i = 0; i < 4; i++) {
                    const __m512i v = _mm512_loadu_si512((const void *)(wd + 64 * i));
                    w[i] = _mm512_and_si512(v, nibble);
                    w[i + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                }
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
            const __m512 mn = q8 ? _mm512_setzero_ps() : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16)));
            /* Up to four rows at a time, their chains side by side (`int_rows`). */
            if (R <= 4) {
                int_rows(in, w, d, mn, &acc[t][0], K, chunks, c, 0, R, q8, wide);
            } else {
                int_rows(in, w, d, mn, &acc[t][0], K, chunks, c, 0, 4, q8, wide);
                int_rows(in, w, d, mn, &acc[t][4], K, chunks, c, 4, R - 4, q8, wide);
            }
        }
    for (int t = 0; t < T; t++) {
        if (lr) /* up by tiles: this tile's (rp, 16) */
            for (int64_t j = 0; j < lr->rp; j++) {
                const __m512 w = lanes16(lr->up, ((tile + t) * lr->rp + j) * 16, lr->bf16);
                const float *tj = lr->t + lr->offset[16 * (tile + t)] + j;
                for (int r = 0; r < R; r++) acc[t][r] = _mm512_fmadd_ps(_mm512_set1_ps(tj[r * lr->r_total]), w, acc[t][r]);
            }
        for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * N + 16 * (tile + t), acc[t][r]);
    }
}

/* A group of R rows, tiles lo..hi-1: T tiles at a time where there are few rows (independent sums
   in flight), the rest one by one. One row takes 4 tiles at a time; two rows or more one tile:
   two rows two tiles at a time made a 2-position step of the 135M model cost 1.5x a 1-position
   one, one tile at a time the same as one position (an AMD EPYC with VNNI, 16-bit and 8-bit
   inputs alike; 3 and 4 rows two tiles at a time were slower still; session 32). The order of
   every output's sums is the same either way. */
#define INT_TILES(T, R)                                                                    \
    do {                                                                                   \
        if (q8 && wide) int_tile(in, data, scales, y, N, K, tile, T, R, 1, 1, lr, ahead);  \
        else if (q8) int_tile(in, data, scales, y, N, K, tile, T, R, 1, 0, lr, ahead);     \
        else if (wide) int_tile(in, data, scales, y, N, K, tile, T, R, 0, 1, lr, ahead);   \
        else int_tile(in, data, scales, y, N, K, tile, T, R, 0, 0, lr, ahead);             \
    } while (0)
#define INT_GROUP(R, T)                                                                                    \
    VNNI_TARGET static void int_group##R(const int_inputs *in, const uint8_t *data, const uint16_t *scales, \
                                         float *y, int64_t N, int64_t K, int64_t lo, int64_t hi, int q8,    \
                                         int wide, const low_rank *lr, int ahead) {                         \
        int64_t tile = lo;                                                                                 \
        for (; tile + T <= hi; tile += T) INT_TILES(T, R);                                                 \
        for (; tile < hi; tile++) INT_TILES(1, R);                                                         \
    }
INT_GROUP(1, 4)
INT_GROUP(2, 1)
INT_GROUP(3, 1)
INT_GROUP(4, 1)
INT_GROUP(5, 1)
INT_GROUP(6, 1)
INT_GROUP(7, 1)
INT_GROUP(8, 1)
#undef INT_GROUP
#undef INT_TILES

typedef void (*int_group_fn)(const int_inputs *, const uint8_t *, const uint16_t *, float *, int64_t, int64_t,
                             int64_t, int64_t, int, int, const low_rank *, int);
static const int_group_fn INT_GROUP_FN[INT_ROWS + 1] = {0, int_group1, int_group2, int_group3, int_group4,
                                                         int_group5, int_group6, int_group7, int_group8};

/* Tiles lo..hi-1 of every row: with one group, all of them in one pass; with several, one tile
   at a time for every group (its weights stay in L1 from one group to the next), the first group
   prefetching the next tile's blocks (`int_tile`). */
static void int_range(const int_inputs *in, const uint8_t *data, const uint16_t *scales, float *y, int64_t M,
                      int64_t N, int64_t K, int64_t lo, int64_t hi, int q8, int wide, const float *t, const void *up_t,
                      int lr_bf16, const int32_t *offset, int64_t r_total, int64_t rp) {
    const int64_t chunks = K / 32, step = M <= INT_ROWS ? hi - lo : 1;
    for (int64_t a = lo; a < hi; a += step) {
        const int64_t b = a + step < hi ? a + step : hi;
        for (int64_t r0 = 0; r0 < M; r0 += INT_ROWS) {
            const int64_t R = M - r0 < INT_ROWS ? M - r0 : INT_ROWS;
            const int_inputs rows = {in->q + r0 * K, wide ? in->lo + r0 * K : 0, in->d + r0 * chunks,
                                     in->s + r0 * chunks, in->offset + r0 * chunks};
            const low_rank update = {t ? t + r0 * r_total : 0, up_t, offset, r_total, rp, lr_bf16};
            INT_GROUP_FN[R](&rows, data, scales, y + r0 * N, N, K, a, b, q8, wide, t ? &update : 0, r0 == 0);
        }
    }
}

/* y (M, N) = x @ W^T in integer products (above; wide: 16-bit inputs), plus the float32 update
   (down (r_total, K), up_t, offset, in float32 or (lr_bf16) bf16, or down NULL; t a scratch of
   M x r_total). N a multiple of 16, K of 64. */
static void int_matmul(const float *x, const uint8_t *data, const uint16_t *scales, float *y, int64_t M, int64_t N,
                       int64_t K, int q8, int wide, int threads, const void *down, const void *up_t, int lr_bf16,
                       const int32_t *offset, int64_t r_total, int64_t rp, float *t, int *status) {
    const int64_t chunks = K / 32, tiles = N / 16;
    int8_t *bytes = aligned_alloc(64, (wide ? 2 : 1) * M * K);
    float *sums = malloc(sizeof(float) * 3 * M * chunks);
    if (!bytes || !sums) {
        free(bytes), free(sums);
        *status = -1;
        return;
    }
    int32_t *offsets = (int32_t *)(sums + 2 * M * chunks);
    const int_inputs in = {bytes, wide ? bytes + M * K : 0, sums, sums + M * chunks, offsets};
    const int parallel = threads > 1 && tiles >= 8 && M * N * K >= (int64_t)1 << 17;
    /* Several rows' inputs are rounded by the team, each thread its share of the rows (a row's
       bytes are its own either way); one row's before it starts. */
    const int team_inputs = parallel && M >= 2;
    if (!team_inputs) int_inputs_of(x, M, K, wide, bytes, wide ? bytes + M * K : 0, sums, sums + M * chunks, offsets);
#pragma omp parallel num_threads(parallel ? threads : 1)
    {
        if (team_inputs) {
            int64_t r0, r1;
            share(M, 1, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
            if (r0 < r1)
                int_inputs_of(x + r0 * K, r1 - r0, K, wide, bytes + r0 * K, wide ? bytes + M * K + r0 * K : 0,
                              sums + r0 * chunks, sums + M * chunks + r0 * chunks, offsets + r0 * chunks);
#pragma omp barrier
        }
        if (down) team_down(x, 0, M, K, down, lr_bf16, r_total, t);
        int64_t lo, hi;
        share(tiles, 1, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (lo < hi)
            int_range(&in, data, scales, y, M, N, K, lo, hi, q8, wide, down ? t : 0, up_t, lr_bf16, offset, r_total, rp);
    }
    free(bytes), free(sums);
}

/* kind 0: Q4, 1: Q8. K must be a multiple of 64; x, y contiguous. threads: how many OpenMP
   threads share the outputs (the caller passes torch's intra-op count: this library runs in
   torch's own OpenMP runtime, so they are the same pool). The low-rank update, where down is not
   NULL: down (r_total, K), up (N, rp), offset (N,), down and up float32 or (lr_bf16) bf16, t a
   scratch of (M, r_total) floats. products 0: float32 (above); 1: in bf16 on AMX (blocks_amx_init
   first), its update (upd, or NULL) in bf16 after them (t then a scratch of M x upd->r_total);
   2: float32-accurate on AMX, data and scales (float16) in their own layout and up by tiles
   (split_matmul); 3, 4: integer products on VNNI, 8-bit (llama.cpp-style) or 16-bit inputs
   (int_matmul: its own layout, up by tiles; blocks_vnni_supported first). Returns 0, or -1 where
   memory ran out. */
int blocks_matmul(const float *x, const uint8_t *data, const void *scales, float *y, int64_t M,
                  int64_t N, int64_t K, int kind, int threads, const void *down, const void *up,
                  const int32_t *offset, int64_t r_total, int64_t rp, int lr_bf16, float *t, int products,
                  const bf16_update *upd) {
    if (products == 3 || products == 4) {
        int status = 0;
        int_matmul(x, data, scales, y, M, N, K, kind, products == 4, threads, down, up, lr_bf16, offset, r_total, rp, t,
                   &status);
        return status;
    }
    if (products == 2) {
        int status = 0;
        split_matmul(x, data, scales, y, M, N, K, kind, threads, down, up, lr_bf16, offset, r_total, rp, t, &status);
        return status;
    }
    if (products) {
        int status = 0;
        amx_matmul(x, data, scales, y, M, N, K, kind, threads, upd, t, &status);
        return status;
    }
    low_rank update = {t, up, offset, r_total, rp, lr_bf16};
    const low_rank *lr = down ? &update : 0;
    if (threads > 1 && N >= 64 && M * N * K >= (int64_t)1 << 17) {
#pragma omp parallel num_threads(threads)
        {
            if (lr) team_down(x, 0, M, K, down, lr_bf16, r_total, t);
            const int i = omp_get_thread_num(), k = omp_get_num_threads();
            const int64_t per = ((N + k - 1) / k + 3) / 4 * 4;
            const int64_t a = i * per, b = a + per < N ? a + per : N;
            if (a < b) range(x, data, scales, y, M, N, K, a, b, kind, lr);
        }
    } else {
        if (lr) rows_down(x, 0, M, K, down, lr_bf16, r_total, t, 0, r_total);
        range(x, data, scales, y, M, N, K, 0, N, kind, lr);
    }
    return 0;
}

/* ---- A whole decoder forward on block weights (dlm/blocks.py `BlockLayers`) ----------------

   Llama-style layers (RMSNorm, fused q/k/v with optional bias, rotate-half RoPE, grouped-query
   attention over a KV cache, SiLU-gated MLP), every row in float32, each row computed from its
   own inputs and its own cache row only: a row's bits do not depend on the other rows of the call
   (the products above guarantee it for the projections; norms, RoPE, attention and the MLP's
   gate are per row), nor on the thread count. The torch ops of dlm/model.py compute the same
   formulas; only the order of some sums differs. */

typedef struct {
    const uint8_t *data;
    const void *scales; /* float32; split and integer products (products 2-4): float16 */
    int64_t n, k, kind;
    const void *down, *up; /* float32, or bf16 where lr_bf16 */
    const int32_t *offset;
    int64_t r_total, rp, lr_bf16;
    const float *bias; /* (n,) or NULL */
    int64_t products;  /* 0: float32; 1: bf16 on AMX, the update in upd; 2: float32-accurate on AMX; 3, 4: integer (blocks_matmul) */
    bf16_update upd;
} block_weight;

typedef struct {
    bf16_update qkv, o, gate_up, down;
} draft_layer;

typedef struct {
    const float *ln_in, *ln_post; /* RMSNorm weights (D,) */
    block_weight qkv, o, gate_up, down;
} block_layer;

static int project(const float *x, const block_weight *w, float *y, int64_t M, int threads, float *t) {
    const int status = blocks_matmul(x, w->data, w->scales, y, M, w->n, w->k, (int)w->kind, threads, w->down, w->up,
                                     w->offset, w->r_total, w->rp, (int)w->lr_bf16, t, (int)w->products, &w->upd);
    if (w->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < w->n; j++) y[m * w->n + j] += w->bias[j];
    return status;
}

/* h = w * (x * 1/sqrt(mean(x^2) + eps)), D a multiple of 16. */
TARGET static void rms_norm(const float *x, const float *w, float *h, int64_t D, float eps) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        a = _mm512_fmadd_ps(v, v, a);
    }
    const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(a) / (float)D + eps);
    for (int64_t i = 0; i < D; i++) h[i] = w[i] * (x[i] * inv);
}

/* Rotate-half RoPE of one head in place: x * cos + roll(x, Dh / 2) * sin (sin's first half negated). */
static void rope(float *x, const float *cos, const float *sin, int64_t Dh) {
    float r[256];
    const int64_t half = Dh / 2;
    for (int64_t i = 0; i < Dh; i++) r[i] = x[i < half ? i + half : i - half];
    for (int64_t i = 0; i < Dh; i++) x[i] = x[i] * cos[i] + r[i] * sin[i];
}

/* e^x in 16 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, then
   scaled by 2^n), within about 2 ulp of expf; inputs below -87.3 give 0, above 88.7 +inf. */
TARGET INLINE __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.72283f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_scalef_ps(p, n));
}

/* act = silu(g) * u = g / (1 + e^-g) * u, n a multiple of 16. */
TARGET static void silu_mul(const float *g, const float *u, float *act, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(g + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_storeu_ps(act + i, _mm512_mul_ps(_mm512_div_ps(v, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
}

/* 16 cached values from element `at` of a KV cache of float32, or (half) of float16. */
TARGET INLINE __m512 kv_load(const void *base, int64_t at, const int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at)))
                : _mm512_loadu_ps((const float *)base + at);
}

/* scores[0..K-1] (-inf: a masked key) -> their softmax weights before the division, e^(s - top),
   16 at a time (masked keys: 0), in place; returns their sum. top: the largest score, finite. */
TARGET static float softmax_weights(float *scores, int64_t K, float top) {
    const __m512 t = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j += 16) {
        const __mmask16 in = K - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - j)) - 1);
        const __m512 sj = _mm512_maskz_loadu_ps(in, scores + j);
        const __mmask16 live = _mm512_mask_cmp_ps_mask(in, sj, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sj, t)));
        sum = _mm512_add_ps(sum, p);
        _mm512_mask_storeu_ps(scores + j, in, p);
    }
    return _mm512_reduce_add_ps(sum);
}

/* The cached K and V of key j + ATTEND_AHEAD on their way while key j's score is computed (K into
   L1, V into L2 for the weighted sum's pass that follows): a long context's keys and values come
   from memory, strided (a KV head's Dh values of each position's Hkv x Dh), and with the hardware's
   prefetch alone the two passes read them at some 10 GB/s a thread. Measured by a throwaway C
   harness on a 2-core AMD EPYC (Zen 4; session 44), one thread, SmolLM2-135M's attention at 1000
   cached positions in float16 (30 layers x 3 KV heads of 3 query heads), fastest of 20: 2.3-2.6 ->
   1.7-1.8 ms (in a slower spell of the VM 2.9-3.4 -> 2.0-2.2); 8, 16 and 32 keys ahead for K and 8
   to 64 for V all gained, 32 and 32 the most. A whole forward after 1000 positions (with the query
   heads' sharing in `blocks_forward`): one row 6.7 -> 6.2 ms, eight rows 21.9 -> 20.5, after 100
   positions 2-3 % less (a throwaway script alternating the two kernels in one process). A
   prefetch changes no result; a masked key's (a shorter row's tail in a batch) is not fetched. */
#define ATTEND_AHEAD 32
TARGET INLINE void attend_prefetch(const void *keys, const void *values, const uint8_t *mask, int64_t j, int64_t K,
                                   int64_t stride, int64_t Dh, int half) {
    if (j + ATTEND_AHEAD >= K || !mask[j + ATTEND_AHEAD]) return;
    const int64_t bytes = half ? 2 : 4, at = (j + ATTEND_AHEAD) * stride * bytes;
    for (int64_t b = 0; b < Dh * bytes; b += 64) {
        _mm_prefetch((const char *)keys + at + b, _MM_HINT_T0);
        _mm_prefetch((const char *)values + at + b, _MM_HINT_T1);
    }
    /* the last line too, where the head's values do not start on a line (Dh * bytes not a multiple of 64) */
    _mm_prefetch((const char *)keys + at + Dh * bytes - 1, _MM_HINT_T0);
    _mm_prefetch((const char *)values + at + Dh * bytes - 1, _MM_HINT_T1);
}

/* One query head over its row's cached keys 0..K-1 where mask allows: softmax(q k / sqrt(Dh)) v.
   keys, values: float32, or float16 where half (each value widened to float32 as it is read). */
TARGET static void attend(const float *q, const void *keys, const void *values, const uint8_t *mask, int64_t K,
                          int64_t stride, int64_t Dh, float *scores, float *out, int half) {
    const float scale = 1.0f / sqrtf((float)Dh);
    float top = -INFINITY;
    for (int64_t j = 0; j < K; j++) {
        attend_prefetch(keys, values, mask, j, K, stride, Dh, half);
        if (mask[j]) { /* 16 lanes of sums over the head's dimensions, then across the lanes */
            __m512 d = _mm512_setzero_ps();
            for (int64_t i = 0; i < Dh; i += 16)
                d = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), kv_load(keys, j * stride + i, half), d);
            scores[j] = _mm512_reduce_add_ps(d) * scale;
        } else {
            scores[j] = -INFINITY;
        }
        if (scores[j] > top) top = scores[j];
    }
    __m512 acc[16];
    const int64_t nv = Dh / 16;
    for (int64_t i = 0; i < nv; i++) acc[i] = _mm512_setzero_ps();
    float total = 0.0f;
    if (top > -INFINITY) { /* the weights (`softmax_weights`), then the weighted values */
        total = softmax_weights(scores, K, top);
        for (int64_t j = 0; j < K; j++) {
            if (!mask[j]) continue;
            const __m512 pv = _mm512_set1_ps(scores[j]);
            for (int64_t i = 0; i < nv; i++) acc[i] = _mm512_fmadd_ps(pv, kv_load(values, j * stride + 16 * i, half), acc[i]);
        }
    }
    const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
    for (int64_t i = 0; i < nv; i++) _mm512_storeu_ps(out + 16 * i, _mm512_mul_ps(acc[i], inv));
}

/* The G query heads that share one KV head (grouped-query attention), over their row's cached keys
   0..K-1 where mask allows: for each head what `attend` gives, bit for bit (the same sums in the
   same order), with each key's K and V read once for all G heads instead of once per head: the
   cache is read from memory at every forward (30 layers x 768 bytes of K and V a position in
   SmolLM2-135M), so reading it a third as often is what longer contexts cost less by. G, NV
   (= Dh / 16) and half (the cache in float16: `attend`) compile-time constants after inlining;
   q, out: the G heads Dh apart; scores: G x (K + 1). */
TARGET INLINE void attend_heads(const float *q, const int G, const int NV, const void *keys, const void *values,
                                const uint8_t *mask, int64_t K, int64_t stride, float *scores, float *out,
                                const int half) {
    const int64_t Dh = 16 * NV;
    const float scale = 1.0f / sqrtf((float)Dh);
    float top[G];
    __m512 qv[G][NV];
    for (int i = 0; i < G; i++) {
        top[i] = -INFINITY;
        for (int v = 0; v < NV; v++) qv[i][v] = _mm512_loadu_ps(q + i * Dh + 16 * v);
    }
    for (int64_t j = 0; j < K; j++) {
        attend_prefetch(keys, values, mask, j, K, stride, Dh, half);
        if (!mask[j]) {
            for (int i = 0; i < G; i++) scores[i * (K + 1) + j] = -INFINITY;
            continue;
        }
        __m512 k[NV];
        for (int v = 0; v < NV; v++) k[v] = kv_load(keys, j * stride + 16 * v, half);
        for (int i = 0; i < G; i++) { /* `attend`'s sums, in its order */
            __m512 d = _mm512_setzero_ps();
            for (int v = 0; v < NV; v++) d = _mm512_fmadd_ps(qv[i][v], k[v], d);
            const float sc = _mm512_reduce_add_ps(d) * scale;
            scores[i * (K + 1) + j] = sc;
            if (sc > top[i]) top[i] = sc;
        }
    }
    float total[G];
    for (int i = 0; i < G; i++) total[i] = top[i] > -INFINITY ? softmax_weights(scores + i * (K + 1), K, top[i]) : 0.0f;
    __m512 acc[G][NV];
    for (int i = 0; i < G; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j++) {
        if (!mask[j]) continue;
        __m512 val[NV];
        for (int v = 0; v < NV; v++) val[v] = kv_load(values, j * stride + 16 * v, half);
        for (int i = 0; i < G; i++) {
            if (!(top[i] > -INFINITY)) continue;
            const __m512 pv = _mm512_set1_ps(scores[i * (K + 1) + j]);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(pv, val[v], acc[i][v]);
        }
    }
    for (int i = 0; i < G; i++) {
        const __m512 inv = _mm512_set1_ps(total[i] > 0.0f ? 1.0f / total[i] : 0.0f);
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(out + i * Dh + 16 * v, _mm512_mul_ps(acc[i][v], inv));
    }
}

/* One KV head's G query heads (`attend_heads`) where G and Dh are among the shapes it is built for
   (up to 4 heads of 64 or 128 dimensions: SmolLM2's 3 of 64, ...); else each head alone (`attend`). */
TARGET static void attend_group(const float *q, int64_t G, const void *keys, const void *values, const uint8_t *mask,
                                int64_t K, int64_t stride, int64_t Dh, float *scores, float *out, int half) {
#define ATTEND_CASE(g, nv)                                                                   \
    if (G == g && Dh == 16 * nv) {                                                          \
        if (half) attend_heads(q, g, nv, keys, values, mask, K, stride, scores, out, 1);     \
        else attend_heads(q, g, nv, keys, values, mask, K, stride, scores, out, 0);          \
        return;                                                                              \
    }
    ATTEND_CASE(1, 4) ATTEND_CASE(2, 4) ATTEND_CASE(3, 4) ATTEND_CASE(4, 4)
    ATTEND_CASE(1, 8) ATTEND_CASE(2, 8) ATTEND_CASE(3, 8) ATTEND_CASE(4, 8)
#undef ATTEND_CASE
    for (int64_t i = 0; i < G; i++) attend(q + i * Dh, keys, values, mask, K, stride, Dh, scores, out + i * Dh, half);
}

/* n values (a multiple of 16) into a KV cache of float32, or (half) of float16 rounded to nearest even. */
TARGET static void store_kv(void *to, const float *from, int64_t n, int half) {
    if (!half) {
        memcpy(to, from, sizeof(float) * n);
        return;
    }
    for (int64_t i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)to + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* x (M, D) in place through every layer. Row m: cache row cache_row[m], written at write_pos[m],
   attends to its cache positions 0..K-1 where mask (M, K) is nonzero; cos, sin (M, Dh) its RoPE.
   The cache: k_cache, v_cache (L, rows, S1, Hkv, Dh) contiguous, float32, or float16 where kv_half
   (each K and V rounded to the nearest float16 as it is written, widened as it is read: half the
   bytes that a long context's attention reads at every forward). Where drafts is not NULL
   (one draft_layer per layer), the rows with drafted[m] != 0 are draft slots: every projection
   adds the drafter's update there (the other rows' bits stay what they are without it). Where
   final_norm (D,) is not NULL, every row leaves through that RMSNorm (the model's final norm, as
   its layers' norms are computed). Dimensions are multiples of 16 (dlm/blocks.py checks), Dh at
   most 256. Returns 0, -1 where memory ran out, or -2 (nothing done) where a row's cache row or
   write position lies outside the cache, or K > S1. */
#define ROWS_PARALLEL 16 /* blocks_forward: rows from which the work between products is shared */
int blocks_forward(float *x, int64_t M, int64_t D, int64_t n_layers, const block_layer *layers, int64_t H,
                   int64_t Hkv, int64_t Dh, int64_t F, float eps, const float *cos, const float *sin,
                   void *k_cache, void *v_cache, int64_t cache_rows, int64_t S1, const int64_t *cache_row,
                   const int64_t *write_pos, const uint8_t *mask, int64_t K, int threads, const draft_layer *drafts,
                   const uint8_t *drafted, const float *final_norm, int kv_half) {
    const int64_t QKV = (H + 2 * Hkv) * Dh, kv = Hkv * Dh, layer_stride = cache_rows * S1 * kv;
    const int64_t bytes = kv_half ? 2 : 4; /* a cached value's */
    /* Every row's cache row and write position inside the cache, and its keys too: checked here,
       before anything is written (a loop over a few integers, where the caller's torch reductions
       cost microseconds each). */
    if (K > S1) return -2;
    for (int64_t m = 0; m < M; m++)
        if (cache_row[m] < 0 || cache_row[m] >= cache_rows || write_pos[m] < 0 || write_pos[m] >= S1) return -2;
    int64_t r_max = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        const block_weight *ws[4] = {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down};
        for (int i = 0; i < 4; i++) {
            if (ws[i]->down && ws[i]->r_total > r_max) r_max = ws[i]->r_total;
            if (ws[i]->upd.down && ws[i]->upd.r_total > r_max) r_max = ws[i]->upd.r_total;
        }
        if (drafts) {
            const bf16_update *us[4] = {&drafts[l].qkv, &drafts[l].o, &drafts[l].gate_up, &drafts[l].down};
            for (int i = 0; i < 4; i++)
                if (us[i]->down && us[i]->r_total > r_max) r_max = us[i]->r_total;
        }
    }
    if (!drafts) drafted = 0;
    const int64_t widest = QKV > 2 * F ? QKV : 2 * F;
    float *h = malloc(sizeof(float) * M * D), *wide = malloc(sizeof(float) * M * widest);
    float *att = malloc(sizeof(float) * M * H * Dh), *act = malloc(sizeof(float) * M * F);
    float *out = malloc(sizeof(float) * M * D), *t = malloc(sizeof(float) * (M * r_max + 1));
    float *scores = malloc(sizeof(float) * (K + 1) * (H / Hkv) * (threads > 0 ? threads : 1));
    int status = 0;
    if (!h || !wide || !att || !act || !out || !t || !scores) {
        status = -1;
        goto done;
    }
    /* Where many rows pass (a prefill's), the work row by row between the products is shared by
       the threads too (each row's bits are its own either way): the 150-token prefill 123.3 ->
       120.9 ms, 16 positions unchanged (session 36). A decoding step's few rows stay on one
       thread, as before (a parallel region costs microseconds; not measured to gain there). */
    const int rows_parallel = threads > 1 && M >= ROWS_PARALLEL;
    for (int64_t l = 0; l < n_layers; l++) {
        const block_layer *ly = &layers[l];
        char *kc = (char *)k_cache + l * layer_stride * bytes, *vc = (char *)v_cache + l * layer_stride * bytes;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t m = 0; m < M; m++) rms_norm(x + m * D, ly->ln_in, h + m * D, D, eps);
        if (project(h, &ly->qkv, wide, M, threads, t)) goto oom;
        if (drafted) add_update(h, drafted, M, D, &drafts[l].qkv, wide, QKV, t, threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t m = 0; m < M; m++) {
            float *row = wide + m * QKV;
            for (int64_t g = 0; g < H + Hkv; g++) rope(row + g * Dh, cos + m * Dh, sin + m * Dh, Dh);
            const int64_t at = (cache_row[m] * S1 + write_pos[m]) * kv * bytes;
            store_kv(kc + at, row + H * Dh, kv, kv_half);
            store_kv(vc + at, row + (H + Hkv) * Dh, kv, kv_half);
        }
        const int64_t group = H / Hkv, pairs = M * Hkv;
        const int parallel = threads > 1 && pairs * group * K * Dh >= (int64_t)1 << 15;
        if (parallel && pairs % threads && pairs < 2 * threads) {
            /* (Row, KV head) pairs that do not share out evenly, fewer than two a thread (one row's
               3 on 2 threads: 2 and 1): the query heads shared out instead, each thread its run of
               them, a KV head split between two threads read by both (each head's bits are its own
               either way: `attend_heads`). SmolLM2-135M, one row: the busier thread computes 5
               heads instead of 6 and still reads two KV heads' K and V (session 44). */
#pragma omp parallel num_threads(threads)
            {
                const int tid = omp_get_thread_num();
                int64_t lo, hi;
                share(M * H, 1, tid, omp_get_num_threads(), &lo, &hi);
                for (int64_t head = lo; head < hi;) { /* of the rows' M x H: row m, its head e, of KV head g */
                    const int64_t m = head / H, e = head % H, g = e / group;
                    const int64_t end = hi < m * H + (g + 1) * group ? hi : m * H + (g + 1) * group;
                    const int64_t at = (cache_row[m] * S1 * kv + g * Dh) * bytes;
                    attend_group(wide + m * QKV + e * Dh, end - head, kc + at, vc + at, mask + m * K, K, kv, Dh,
                                 scores + (int64_t)tid * (K + 1) * group, att + (m * H + e) * Dh, kv_half);
                    head = end;
                }
            }
        } else {
            /* Pairs dealt out in turn, not in halves: a prefill's rows attend to 1..M keys, so the
               first half of them is a quarter of the work (the 150-token prefill 128.3 -> 124.5 ms,
               fastest of four process pairs on a 2-core AMD EPYC; session 36). */
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (parallel)
            for (int64_t i = 0; i < pairs; i++) { /* row m, KV head g: its query heads g * group.. */
                const int64_t m = i / Hkv, g = i % Hkv;
                const int64_t at = (cache_row[m] * S1 * kv + g * Dh) * bytes;
                attend_group(wide + m * QKV + g * group * Dh, group, kc + at, vc + at, mask + m * K, K, kv, Dh,
                             scores + (int64_t)omp_get_thread_num() * (K + 1) * group, att + (m * H + g * group) * Dh,
                             kv_half);
            }
        }
        if (project(att, &ly->o, out, M, threads, t)) goto oom;
        if (drafted) add_update(att, drafted, M, H * Dh, &drafts[l].o, out, D, t, threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t i = m * D; i < (m + 1) * D; i++) x[i] += out[i];
            rms_norm(x + m * D, ly->ln_post, h + m * D, D, eps);
        }
        if (project(h, &ly->gate_up, wide, M, threads, t)) goto oom;
        if (drafted) add_update(h, drafted, M, D, &drafts[l].gate_up, wide, 2 * F, t, threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t m = 0; m < M; m++) silu_mul(wide + m * 2 * F, wide + m * 2 * F + F, act + m * F, F);
        if (project(act, &ly->down, out, M, threads, t)) goto oom;
        if (drafted) add_update(act, drafted, M, F, &drafts[l].down, out, D, t, threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t i = 0; i < M * D; i++) x[i] += out[i];
    }
    if (final_norm) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows_parallel)
        for (int64_t m = 0; m < M; m++) rms_norm(x + m * D, final_norm, x + m * D, D, eps);
    }
    goto done;
oom:
    status = -1;
done:
    free(h), free(wide), free(att), free(act), free(out), free(t), free(scores);
    return status;
}

TARGET void blocks_argmax(const float *x, int64_t M, int64_t N, int64_t *idx, float *top);

/* blocks_draft_pass for a causal head: see there. */
static int draft_chain(const float *in, int64_t B, int64_t W, int64_t n, int64_t D, const block_weight *fuse,
                       const float *slots, int64_t n_layers, const block_layer *layers, int64_t H, int64_t Hkv,
                       int64_t Dh, int64_t F, float eps, const float *cos, const float *sin, const uint8_t *mask,
                       const float *final_norm, const block_weight *head, float *out, const uint16_t *embed,
                       int64_t n_vocab, float bar, int threads) {
    const int64_t T = W + n, M0 = B * (W + 1), cached = n_layers * B * T * Hkv * Dh, V = head->n;
    float *ctx = malloc(sizeof(float) * B * W * D), *x = malloc(sizeof(float) * M0 * D);
    float *s = malloc(sizeof(float) * B * D), *t = malloc(sizeof(float)); /* no low-rank updates here */
    float *k_cache = malloc(sizeof(float) * cached), *v_cache = malloc(sizeof(float) * cached);
    float *c = malloc(sizeof(float) * M0 * Dh), *sn = malloc(sizeof(float) * M0 * Dh);
    float *logits = malloc(sizeof(float) * B * V);
    uint8_t *m = malloc((size_t)(M0 * T));
    int64_t *rows = malloc(sizeof(int64_t) * M0), *at = malloc(sizeof(int64_t) * M0), *pick = malloc(sizeof(int64_t) * B);
    float *top = malloc(sizeof(float) * B), *sure = malloc(sizeof(float) * B);
    int status = 0;
    if (!ctx || !x || !s || !t || !k_cache || !v_cache || !c || !sn || !logits || !m || !rows || !at || !pick || !top ||
        !sure ||
        project(in, fuse, ctx, B * W, threads, t)) {
        status = -1;
        goto done;
    }
    for (int64_t j = 0; j < n; j++) {
        /* place j's rows (with place 0, each pass's context rows before it): inputs, cache row and
           position, mask and RoPE rows, all copied from the pass's position-ordered tables */
        const int64_t first = j ? W + j : 0, per = j ? 1 : W + 1, M = B * per;
        for (int64_t b = 0; b < B; b++) {
            for (int64_t p = 0; p < per; p++) {
                const int64_t r = b * per + p, pos = first + p;
                rows[r] = b, at[r] = pos;
                memcpy(m + r * T, mask + (b * T + pos) * T, (size_t)(pos + 1));
                memset(m + r * T + pos + 1, 0, (size_t)(T - pos - 1)); /* never a place not drafted yet */
                memcpy(c + r * Dh, cos + (b * T + pos) * Dh, sizeof(float) * Dh);
                memcpy(sn + r * Dh, sin + (b * T + pos) * Dh, sizeof(float) * Dh);
            }
            float *slot = x + (b * per + per - 1) * D;
            if (!j) memcpy(x + b * per * D, ctx + b * W * D, sizeof(float) * W * D);
            memcpy(slot, slots + j * D, sizeof(float) * D);
            if (j) {
                const uint16_t *e = embed + pick[b] * D;
                for (int64_t i = 0; i < D; i++) {
                    const uint32_t bits = (uint32_t)e[i] << 16;
                    float v;
                    memcpy(&v, &bits, sizeof v);
                    slot[i] += v;
                }
            }
        }
        status = blocks_forward(x, M, D, n_layers, layers, H, Hkv, Dh, F, eps, c, sn, k_cache, v_cache, B, T, rows, at,
                                m, T, threads, 0, 0, final_norm, 0);
        if (status) goto done;
        for (int64_t b = 0; b < B; b++) memcpy(s + b * D, x + (b * per + per - 1) * D, sizeof(float) * D);
        if (project(s, head, logits, B, threads, t)) {
            status = -1;
            goto done;
        }
        for (int64_t b = 0; b < B; b++) memcpy(out + (b * n + j) * V, logits + b * V, sizeof(float) * V);
        if (j + 1 == n) break;
        int more = bar <= 0.0f;
        for (int64_t b = 0; b < B; b++) {
            blocks_argmax(logits + b * V, 1, n_vocab, pick + b, top + b);
            sure[b] = (j ? sure[b] : 1.0f) * top[b];
            more |= sure[b] >= bar;
        }
        if (!more) break; /* every row's chain is less sure than bar: out's later places stay as they were */
    }
done:
    free(ctx), free(x), free(s), free(t), free(k_cache), free(v_cache), free(c), free(sn), free(logits), free(m);
    free(rows), free(at), free(pick), free(top), free(sure);
    return status;
}

/* A draft head's pass (dlm/draft_head.py) in one call: B passes of W context rows and n slot rows,
   T = W + n positions each. The context rows' inputs (B * W, K_in) go through `fuse` (-> D); each
   pass's rows are its W context rows, then the first n rows of `slots` (n, D); all of them through
   the layers (`blocks_forward`: pass b in cache row b of a scratch cache of T positions, position t
   at t, row m attending where mask (B * T, T) says, leaving through final_norm); the slot rows'
   outputs through `head` into out (B * n, head->n). The same products, in the same order, as those
   three steps called one by one (tests/dlm/test_drafter.py compares the bits). Where embed (V, D)
   bf16 is not NULL (a causal head, DraftHeadConfig.causal), the slots go one place at a time
   instead: place 0 with the context rows, then each place j > 0 alone, its input slot j plus the
   embed row of place j - 1's draft (its first largest score among out's first n_vocab, as
   blocks_argmax picks), attending to the cached positions before it where mask says; after the
   first place where every pass's chain confidence (the product of its drafts' softmax
   probabilities over those n_vocab) is below bar > 0, out's later places are left as they were.
   Returns 0, or -1 where memory ran out. */
int blocks_draft_pass(const float *in, int64_t B, int64_t W, int64_t n, int64_t D, const block_weight *fuse,
                      const float *slots, int64_t n_layers, const block_layer *layers, int64_t H, int64_t Hkv,
                      int64_t Dh, int64_t F, float eps, const float *cos, const float *sin, const uint8_t *mask,
                      const float *final_norm, const block_weight *head, float *out, const uint16_t *embed,
                      int64_t n_vocab, float bar, int threads) {
    if (embed) return draft_chain(in, B, W, n, D, fuse, slots, n_layers, layers, H, Hkv, Dh, F, eps, cos, sin, mask,
                                  final_norm, head, out, embed, n_vocab, bar, threads);
    const int64_t T = W + n, M = B * T, cached = n_layers * M * Hkv * Dh;
    float *ctx = malloc(sizeof(float) * B * W * D), *x = malloc(sizeof(float) * M * D);
    float *s = malloc(sizeof(float) * B * n * D), *t = malloc(sizeof(float)); /* no low-rank updates here */
    float *k_cache = malloc(sizeof(float) * cached), *v_cache = malloc(sizeof(float) * cached);
    int64_t *rows = malloc(sizeof(int64_t) * M), *at = malloc(sizeof(int64_t) * M);
    int status = 0;
    if (!ctx || !x || !s || !t || !k_cache || !v_cache || !rows || !at) {
        status = -1;
        goto done;
    }
    if (project(in, fuse, ctx, B * W, threads, t)) {
        status = -1;
        goto done;
    }
    for (int64_t b = 0; b < B; b++) {
        memcpy(x + b * T * D, ctx + b * W * D, sizeof(float) * W * D);
        memcpy(x + (b * T + W) * D, slots, sizeof(float) * n * D);
    }
    for (int64_t m = 0; m < M; m++) rows[m] = m / T, at[m] = m % T;
    status = blocks_forward(x, M, D, n_layers, layers, H, Hkv, Dh, F, eps, cos, sin, k_cache, v_cache, B, T, rows, at,
                            mask, T, threads, 0, 0, final_norm, 0);
    if (status) goto done;
    for (int64_t b = 0; b < B; b++) memcpy(s + b * n * D, x + (b * T + W) * D, sizeof(float) * n * D);
    if (project(s, head, out, B * n, threads, t)) status = -1;
done:
    free(ctx), free(x), free(s), free(t), free(k_cache), free(v_cache), free(rows), free(at);
    return status;
}

/* Per row of x (M, N) float32: the index of its largest value into idx (M,), the first where several
   are, a NaN counting as largest (the first NaN's), as torch.argmax picks; and where top is not NULL,
   that value's softmax probability 1 / sum_j e^(x_j - max) into top (M,) (NaN where the max is not
   finite, as torch.softmax gives). Single-threaded, 16 lanes at a time: a decoding step's logits
   (a few rows of a vocabulary) take microseconds, where torch's argmax reduction takes about a
   microsecond per thousand values (docs/benchmarks.md, "Session 31"). */
TARGET void blocks_argmax(const float *x, int64_t M, int64_t N, int64_t *idx, float *top) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * N;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i at = lanes; /* per lane: the first index of its largest value so far */
        __mmask16 nan = 0;
        for (int64_t j = 0; j < N; j += 16) {
            const __mmask16 in = N - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - j)) - 1);
            const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + j);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 more = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, more, v);
            at = _mm512_mask_mov_epi32(at, more, _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)j)));
        }
        int64_t pick = 0;
        float hi = -INFINITY;
        if (nan) {
            while (row[pick] == row[pick]) pick++;
            hi = NAN;
        } else {
            hi = _mm512_reduce_max_ps(best);
            const __mmask16 tied = _mm512_cmp_ps_mask(best, _mm512_set1_ps(hi), _CMP_EQ_OQ);
            pick = _mm512_mask_reduce_min_epi32(tied, at);
        }
        idx[m] = pick;
        if (!top) continue;
        if (!isfinite(hi)) {
            top[m] = NAN;
            continue;
        }
        __m512 sum = _mm512_setzero_ps();
        const __m512 h = _mm512_set1_ps(hi);
        for (int64_t j = 0; j < N; j += 16) {
            const __mmask16 in = N - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - j)) - 1);
            const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, row + j);
            sum = _mm512_add_ps(sum, exp16(_mm512_sub_ps(v, h)));
        }
        top[m] = 1.0f / _mm512_reduce_add_ps(sum);
    }
}

/* ---- This CPU's peak rate of the products' instruction (`bench llm`'s floors) ----------------

   Each of `threads` threads runs `rounds` rounds of PEAK_CHAINS independent instructions on
   registers only (no memory; each chain depends on its own last round only, so the chains keep
   the pipes full): FMAs, as the float32 products run (16 multiply-adds each), or vpdpbusd, as
   the integer products do (64 multiply-adds each with 8-bit inputs; 16-bit inputs take two per
   64, so 32 each). An empty asm after every round makes the compiler keep every instruction of
   every round. Returns the multiply-adds done by the team OpenMP gave (at most `threads`), counted
   at the products' precision; -1 where this does not measure the products (the AMX tiles' own),
   this CPU cannot run them, or the count would not fit in 64 bits. No real product reaches this
   rate: it is the ceiling a kernel's products work under. */
#define PEAK_CHAINS 12
/* Twelve named accumulators, not an array: an array lives on the stack across the asm. */
#define PEAK_EACH(m, arg) m(0, arg) m(1, arg) m(2, arg) m(3, arg) m(4, arg) m(5, arg) m(6, arg) m(7, arg) m(8, arg) \
    m(9, arg) m(10, arg) m(11, arg)
#define PEAK_KEEP                                                                                        \
    __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), \
                     "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11))
#define PEAK_INIT(i, vec) vec a##i = x;
#define PEAK_STEP(i, op) a##i = op(a##i, w, x);
#define PEAK_SUM(i, add) s = add(s, a##i);
/* One instruction's loop as a function of its own, compiled for that instruction's target (so
   vpdpbusd is never in a function a CPU without VNNI runs): vec its registers, set1 / add /
   reduce their intrinsics, op(acc, w, x) the instruction timed, w0 and x0 its operands' lanes. */
#define PEAK_FUNCTION(name, target, vec, set1, op, add, reduce, sink_t, w0, x0)                    \
    target static int64_t name(int64_t rounds) {                                                    \
        vec w = set1(w0), x = set1(x0);                                                             \
        __asm__ volatile("" : "+v"(w), "+v"(x)); /* values the compiler cannot know */             \
        PEAK_EACH(PEAK_INIT, vec)                                                                   \
        for (int64_t r = 0; r < rounds; r++) {                                                      \
            PEAK_EACH(PEAK_STEP, op)                                                                \
            PEAK_KEEP;                                                                              \
        }                                                                                           \
        vec s = x;                                                                                  \
        PEAK_EACH(PEAK_SUM, add)                                                                    \
        volatile sink_t sink = reduce(s);                                                           \
        (void)sink;                                                                                 \
        return rounds * PEAK_CHAINS;                                                                \
    }

TARGET INLINE __m512 peak_fma_step(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
PEAK_FUNCTION(peak_fma, TARGET, __m512, _mm512_set1_ps, peak_fma_step, _mm512_add_ps, _mm512_reduce_add_ps, float,
              1.0f, 0.5f)
PEAK_FUNCTION(peak_dpbusd, VNNI_TARGET, __m512i, _mm512_set1_epi32, _mm512_dpbusd_epi32, _mm512_add_epi32,
              _mm512_reduce_add_epi32, int, 0x01020304, 0x05060708)
#undef PEAK_FUNCTION
#undef PEAK_SUM
#undef PEAK_STEP
#undef PEAK_INIT
#undef PEAK_KEEP
#undef PEAK_EACH

int64_t blocks_peak(int products, int64_t rounds, int threads) {
    const int64_t per = products == 0 ? 16 : products == 3 ? 64 : products == 4 ? 32 : 0; /* per instruction */
    if (!per || rounds < 1 || threads < 1 || rounds > INT64_MAX / (PEAK_CHAINS * per * threads) ||
        ((products == 3 || products == 4) && !blocks_vnni_supported()))
        return -1;
    int64_t done = 0;
#pragma omp parallel num_threads(threads) reduction(+ : done)
    done += products == 0 ? peak_fma(rounds) : peak_dpbusd(rounds);
    return done * per;
}
