/* One whole recurrent decode step of a Mamba-1 or Mamba-2 language model in one call, float32 or int8 weights.
 *
 * Why: eager PyTorch issues ~20 small ops per layer per token, and its gemv on nn.Linear's (out, in) layout
 * reaches about half the memory bandwidth and does not scale to two threads. Decoding is memory-bound (every
 * weight is read once per token), so this file reads each weight row once, dots it with all batch rows, and
 * fuses the per-layer work (norm, in_proj + conv step, x_proj, dt_proj + scan + gate, out_proj + residual)
 * into a few phases separated by barriers. nn.Linear's row-major (out, in) weight already is the
 * matrix-vector layout, so float32 weights are read in place (nothing is copied or cached); int8 weights
 * come with one float32 scale per output row and are widened in registers.
 *
 * Threads: a small persistent pthread pool (workers spin briefly, then sleep on a condition variable). A step
 * runs as one job on `nthreads` threads; each phase splits its rows (or channels, heads, batch rows) evenly
 * and ends at a spin barrier that yields the CPU when it waits long (the machine may be oversubscribed).
 * OpenMP is not used: torch ships its own OpenMP runtime and mixing two runtimes in one process is fragile.
 * Calls are serialised by a mutex, so concurrent Python threads are safe (ctypes drops the GIL).
 *
 * Safety: the entry points check every buffer length they are given against the sizes the configuration
 * implies and every token id against the vocabulary, and refuse (non-zero return) before touching memory.
 */
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LS_AVX512 1
#endif

/* ---- the plan: sizes and pointers, prepared once in Python (leanseq/ops/decode.py keeps the same list) ---- */
enum {
    CFG_VERSION, CFG_FAMILY, CFG_LAYERS, CFG_HIDDEN, CFG_VOCAB, CFG_DINNER, CFG_NSTATE, CFG_RANK, CFG_HEADS,
    CFG_HEADDIM, CFG_GROUPS, CFG_KERNEL, CFG_CONVCH, CFG_INROWS, CFG_XPROWS, CFG_FLAGS, CFG_LEN
};
enum { FP_EPS, FP_DTLO, FP_DTHI, FP_LEN };
/* FLAG_EMBED_I8: the embedding is the int8 LM head (tied, quantized): a row is head_w[tok] * head_s[tok] */
enum { FLAG_LTI = 1, FLAG_DTHI = 2, FLAG_DTLO = 4, FLAG_EMBED_I8 = 8 };
/* global pointer slots, then SLOTS_PER_LAYER per layer */
enum { G_EMBED, G_NORMF, G_HEAD_W, G_HEAD_S, G_HEAD_B, G_LEN };
enum {
    L_NORM, L_IN_W, L_IN_S, L_IN_B, L_CONV_W, L_CONV_B, L_XP_W, L_XP_S, L_DT_W, L_DT_B, L_ALOG, L_D,
    L_OUT_W, L_OUT_S, L_OUT_B, L_LTI_DT, L_LTI_B, L_LTI_C, L_GNORM, L_ACACHE, L_LEN
};
/* L_ACACHE (Mamba-1): the plan's own cache of A = -exp(A_log) (refresh_A below), not a weight */
#define PLAN_VERSION 2
/* sizes[] given with each call, checked against the configuration */
enum { S_TOKENS, S_CONV_OLD, S_SSM_OLD, S_CONV_NEW, S_SSM_NEW, S_POS_OLD, S_POS_NEW, S_LOGITS, S_SCRATCH, S_PTRS,
       S_LEN };

typedef struct { const void *w; const float *scale; const float *bias; int64_t rows, cols; } mat_t;

/* ---- thread pool ---------------------------------------------------------------------------------------- */
#define MAX_THREADS 64
typedef void (*job_fn)(void *ctx, int tid, int nth);
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sleep_cond = PTHREAD_COND_INITIALIZER;
static _Atomic uint64_t generation;
static _Atomic int done_count, sleepers, bar_count, bar_sense;
static int n_workers;
static uint64_t start_gen;  /* the generation a newly created worker starts from (set before it is created) */
static job_fn job_f;
static void *job_ctx;
static int job_nth;

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void barrier(int nth, int *sense) {
    if (nth <= 1) return;
    const int s = !*sense;
    *sense = s;
    if (atomic_fetch_add(&bar_count, 1) == nth - 1) {
        atomic_store(&bar_count, 0);
        atomic_store(&bar_sense, s);
        return;
    }
    /* spin (cheap when every thread has a core), then yield so an oversubscribed machine still progresses */
    for (long i = 0; atomic_load_explicit(&bar_sense, memory_order_acquire) != s; i++) {
        if (i < 4000) cpu_relax();
        else sched_yield();
    }
}

static void *worker_main(void *arg) {
    const int tid = (int)(intptr_t)arg;
    uint64_t seen = start_gen;  /* not the current generation: the first job may already have been posted */
    for (;;) {
        long spins = 0;
        double t0 = 0.0;
        while (atomic_load(&generation) == seen) {
            /* spin ~200 us (the caller's next token usually comes sooner), then sleep */
            if ((++spins & 63) != 0) { cpu_relax(); continue; }
            if (t0 == 0.0) t0 = now_seconds();
            if (now_seconds() - t0 < 2e-4) continue;
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&sleep_cond, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = atomic_load(&generation);
        if (tid < job_nth) {
            job_f(job_ctx, tid, job_nth);
            atomic_fetch_add(&done_count, 1);
        }
    }
    return NULL;
}

static void after_fork_child(void) {
    /* the workers do not exist in a forked child: start afresh */
    n_workers = 0;
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&sleep_cond, NULL);
    atomic_store(&sleepers, 0);
}

static int run_job(job_fn f, void *ctx, int nth) {
    static int atfork_done = 0;
    if (!atfork_done) { pthread_atfork(NULL, NULL, after_fork_child); atfork_done = 1; }
    start_gen = atomic_load(&generation);
    while (n_workers < nth - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        n_workers++;
    }
    if (nth - 1 > n_workers) nth = n_workers + 1;  /* could not start more threads: use those we have */
    job_f = f; job_ctx = ctx; job_nth = nth;
    atomic_store(&done_count, 0);
    atomic_store(&bar_count, 0);
    if (nth > 1) {
        atomic_fetch_add(&generation, 1);
        if (atomic_load(&sleepers) > 0) {
            pthread_mutex_lock(&sleep_lock);
            pthread_cond_broadcast(&sleep_cond);
            pthread_mutex_unlock(&sleep_lock);
        }
    }
    f(ctx, 0, nth);
    for (long i = 0; atomic_load(&done_count) < nth - 1; i++) {
        if (i < 4000) cpu_relax();
        else sched_yield();
    }
    return nth;
}

static inline void split(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nth;
    *hi = n * (tid + 1) / nth;
}

/* ---- matrix-vector products ------------------------------------------------------------------------------ */
/* y[b * ldy + r] (+)= scale[r] * <W[r, :], x[b * ldx + :]> + bias[r] for rows [r0, r1) and batch rows [0, nb).
 * Rows are taken 4 at a time and each block of rows is dotted with up to 4 batch rows at once, so a weight row
 * is loaded once per 4 batch rows while x stays in cache; batch rows are tiled by 64 so x fits in L2. */
#define BTILE 64
#ifdef LS_AVX512
static inline __attribute__((always_inline)) __m512 load_w(const void *w, int int8, int64_t k, __mmask16 m) {
    if (int8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)w + k)));
    return _mm512_maskz_loadu_ps(m, (const float *)w + k);
}
/* unmasked, so the load folds into the widening instruction */
static inline __attribute__((always_inline)) __m512 load_w_full(const void *w, int int8, int64_t k) {
    if (int8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + k))));
    return _mm512_loadu_ps((const float *)w + k);
}
static inline __attribute__((always_inline)) void block4(const void *const *wr, int int8, const float *const *xb,
                                                         int nb, int64_t K, float out[4][4]) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[4];
        for (int j = 0; j < nb; j++) xv[j] = _mm512_loadu_ps(xb[j] + k);
        for (int i = 0; i < 4; i++) {
            const __m512 w = load_w_full(wr[i], int8, k);
            for (int j = 0; j < nb; j++) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
        }
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xv[4];
        for (int j = 0; j < nb; j++) xv[j] = _mm512_maskz_loadu_ps(m, xb[j] + k);
        for (int i = 0; i < 4; i++) {
            const __m512 w = load_w(wr[i], int8, k, m);
            for (int j = 0; j < nb; j++) acc[i][j] = _mm512_fmadd_ps(w, xv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nb; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}
/* Batch 1: one row at a time, with independent accumulators along k (UNR vectors per iteration). Measured on
 * this Zen 4 (1 thread, weights streamed from memory, CPU time): float32 13.5 -> 16-18 GB/s against a 17-19
 * GB/s W.sum() probe with 8 accumulators; int8 7 -> 15-19 GB/s with 2 (more make it slower). Weights are then
 * read as one purely sequential stream, which the hardware prefetcher follows best; 4-row blocks (4 streams)
 * and software prefetch both measured slower. */
static inline __attribute__((always_inline)) float dot_row(const void *w, int int8, const float *x, int64_t K) {
    enum { UF = 8, UQ = 2 };
    __m512 acc[UF];
    for (int u = 0; u < UF; u++) acc[u] = _mm512_setzero_ps();
    int64_t k = 0;
    if (int8) {
        for (; k + 16 * UQ <= K; k += 16 * UQ)
            for (int u = 0; u < UQ; u++)
                acc[u] = _mm512_fmadd_ps(load_w_full(w, 1, k + 16 * u), _mm512_loadu_ps(x + k + 16 * u), acc[u]);
    } else {
        for (; k + 16 * UF <= K; k += 16 * UF)
            for (int u = 0; u < UF; u++)
                acc[u] = _mm512_fmadd_ps(load_w_full(w, 0, k + 16 * u), _mm512_loadu_ps(x + k + 16 * u), acc[u]);
    }
    for (; k + 16 <= K; k += 16) acc[0] = _mm512_fmadd_ps(load_w_full(w, int8, k), _mm512_loadu_ps(x + k), acc[0]);
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        acc[1] = _mm512_fmadd_ps(load_w(w, int8, k, m), _mm512_maskz_loadu_ps(m, x + k), acc[1]);
    }
    for (int u = 1; u < UF; u++) acc[0] = _mm512_add_ps(acc[0], acc[u]);
    return _mm512_reduce_add_ps(acc[0]);
}
#define HAVE_DOT_ROW 1
/* Lane i of the result is the sum of v[i]'s 16 lanes: 16 horizontal sums in 45 shuffles and adds (a transpose
 * folded into the additions) instead of ~8 dependent steps each with _mm512_reduce_add_ps. */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 v[16]) {
    __m512 s[8], u[4], w[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3] */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: the lane's sums of v4i .. v4i+3 */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)  /* lanes 0, 2 plus lanes 1, 3 */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}
/* Batch 1, short rows (a tiny model's cache-resident weights): 16 rows at once, 16 independent accumulators
 * sharing each load of x, and one hsum16 for the 16 dot products. y[r0 .. r0 + 16) gets them. */
#define SMALL_K 256
static inline __attribute__((always_inline)) void rows16(const void *w, int int8, const float *scale,
                                                         const float *bias, const float *x, int64_t K, float *y,
                                                         int accumulate) {
    const size_t stride = (size_t)K * (int8 ? 1 : sizeof(float));
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        for (int i = 0; i < 16; i++)
            acc[i] = _mm512_fmadd_ps(load_w_full((const char *)w + i * stride, int8, k), xv, acc[i]);
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int i = 0; i < 16; i++)
            acc[i] = _mm512_fmadd_ps(load_w((const char *)w + i * stride, int8, k, m), xv, acc[i]);
    }
    __m512 d = hsum16(acc);
    if (int8) d = _mm512_mul_ps(d, _mm512_loadu_ps(scale));
    if (bias) d = _mm512_add_ps(d, _mm512_loadu_ps(bias));
    if (accumulate) d = _mm512_add_ps(d, _mm512_loadu_ps(y));
    _mm512_storeu_ps(y, d);
}
#define BLOCK_CASES(INT8)                                                  \
    switch (nb) {                                                          \
    case 1: block4(wr, INT8, xb, 1, K, out); break;                        \
    case 2: block4(wr, INT8, xb, 2, K, out); break;                        \
    case 3: block4(wr, INT8, xb, 3, K, out); break;                        \
    default: block4(wr, INT8, xb, 4, K, out); break;                       \
    }
#else
static void block4(const void *const *wr, int int8, const float *const *xb, int nb, int64_t K, float out[4][4]) {
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < nb; j++) {
            float acc = 0.0f;
            if (int8) {
                const int8_t *w = (const int8_t *)wr[i];
                for (int64_t k = 0; k < K; k++) acc += (float)w[k] * xb[j][k];
            } else {
                const float *w = (const float *)wr[i];
                for (int64_t k = 0; k < K; k++) acc += w[k] * xb[j][k];
            }
            out[i][j] = acc;
        }
}
#define BLOCK_CASES(INT8) block4(wr, INT8, xb, nb, K, out);
#endif

static void gemv_rows(const mat_t *m, const float *x, int64_t ldx, int64_t B, float *y, int64_t ldy,
                      int64_t r0, int64_t r1, int accumulate) {
    const int64_t K = m->cols;
    const int int8 = m->scale != NULL;
    const size_t esz = int8 ? 1 : sizeof(float);
#ifdef HAVE_DOT_ROW
    if (B == 1) {
        int64_t r = r0;
        if (K <= SMALL_K)
            for (; r + 16 <= r1; r += 16) {
                const void *wr = (const char *)m->w + (size_t)r * (size_t)K * esz;
                const float *s = int8 ? m->scale + r : NULL, *bias = m->bias ? m->bias + r : NULL;
                if (int8) rows16(wr, 1, s, bias, x, K, y + r, accumulate);
                else rows16(wr, 0, s, bias, x, K, y + r, accumulate);
            }
        for (; r < r1; r++) {
            const void *wr = (const char *)m->w + (size_t)r * (size_t)K * esz;
            const float d = int8 ? dot_row(wr, 1, x, K) * m->scale[r] : dot_row(wr, 0, x, K);
            const float v = d + (m->bias ? m->bias[r] : 0.0f);
            y[r] = accumulate ? y[r] + v : v;
        }
        return;
    }
#endif
    for (int64_t bt = 0; bt < B; bt += BTILE) {
        const int64_t bend = (bt + BTILE < B) ? bt + BTILE : B;
        for (int64_t r = r0; r < r1; r += 4) {
            const int nr = (r1 - r < 4) ? (int)(r1 - r) : 4;
            const void *wr[4];
            for (int i = 0; i < 4; i++)  /* short tail: repeat the last row and drop its results */
                wr[i] = (const char *)m->w + (size_t)(r + (i < nr ? i : nr - 1)) * (size_t)K * esz;
            for (int64_t b = bt; b < bend; b += 4) {
                const int nb = (bend - b < 4) ? (int)(bend - b) : 4;
                const float *xb[4];
                for (int j = 0; j < 4; j++) xb[j] = x + (b + (j < nb ? j : 0)) * ldx;
                float out[4][4];
                if (int8) { BLOCK_CASES(1) } else { BLOCK_CASES(0) }
                for (int i = 0; i < nr; i++) {
                    const float s = int8 ? m->scale[r + i] : 1.0f;
                    const float bias = m->bias ? m->bias[r + i] : 0.0f;
                    for (int j = 0; j < nb; j++) {
                        float *dst = y + (b + j) * ldy + r + i;
                        const float v = out[i][j] * s + bias;
                        *dst = accumulate ? *dst + v : v;
                    }
                }
            }
        }
    }
}

/* ---- small per-element helpers ---------------------------------------------------------------------------- */
static inline float silu(float v) { return v / (1.0f + expf(-v)); }
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }  /* torch's threshold 20 */

static void silu_inplace(float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = v[i] / (1.0f + expf(-v[i]));
}

/* softplus written as max(x, 0) + log1p(exp(-|x|)): exact where torch's is, and vectorisable */
static void softplus_inplace(float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = v[i];
        v[i] = (x > 20.0f) ? x : fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
    }
}

static void rmsnorm_row(const float *x, const float *w, float *out, int64_t n, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* depthwise causal conv on the rolling window + silu, for channels [c0, c1) of every batch row */
static void conv_step(const float *xin, int64_t ldin, float *xout, int64_t ldout, const float *w, const float *bias,
                      const float *old, float *new_, int64_t B, int64_t C, int64_t K, int64_t c0, int64_t c1) {
    const int64_t W = K - 1;
    for (int64_t b = 0; b < B; b++) {
        const float *ob = old + b * C * W;
        float *nbuf = new_ + b * C * W;
        for (int64_t c = c0; c < c1; c++) {
            const float v = xin[b * ldin + c];
            const float *o = ob + c * W, *wc = w + c * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < W; k++) acc += wc[k] * o[k];
            acc += wc[W] * v;
            if (bias) acc += bias[c];
            float *nw = nbuf + c * W;
            for (int64_t k = 0; k + 1 < W; k++) nw[k] = o[k + 1];
            if (W > 0) nw[W - 1] = v;
            xout[b * ldout + c] = acc;
        }
        silu_inplace(xout + b * ldout + c0, c1 - c0);  /* a separate pass, so exp is vectorised */
    }
}

/* ---- A = -exp(A_log), cached per plan ------------------------------------------------------------------ */
/* A Mamba-1 layer's A is a function of A_log alone; recomputing it is one exp per (channel, state) each step,
 * as many as the scan's own. The plan gives each layer a cache: the bytes of A_log that A was computed from,
 * A, and a flag per channel. A channel range is recomputed when any flag is unset or A_log's bytes differ
 * from the copy (one memcmp), so every write to A_log (in place, through .data, an optimizer step) is seen by
 * the next step. Each thread refreshes only its own channels; calls are serialised by call_lock. */
/* cache layout (4-byte words): [D * N] A_log copy, [D * N] A, [D] int32 flags; zeroed by the plan */
static const float *refresh_A(float *cache, const float *Alog, int64_t D, int64_t N, int64_t lo, int64_t hi) {
    float *copy = cache, *A = copy + D * N;
    int32_t *valid = (int32_t *)(A + D * N);
    int32_t all = 1;
    for (int64_t d = lo; d < hi; d++) all &= valid[d];
    const size_t bytes = sizeof(float) * (size_t)((hi - lo) * N);
    if (!all || memcmp(copy + lo * N, Alog + lo * N, bytes) != 0) {
        memcpy(copy + lo * N, Alog + lo * N, bytes);
        for (int64_t i = lo * N; i < hi * N; i++) A[i] = -expf(copy[i]);
        for (int64_t d = lo; d < hi; d++) valid[d] = 1;
    }
    return A;
}

/* ---- one step ------------------------------------------------------------------------------------------- */
typedef struct {
    const int64_t *cfg;
    const double *fp;
    void *const *ptrs;
    const int64_t *tokens;
    int64_t B;
    const float *conv_old, *ssm_old;
    float *conv_new, *ssm_new;
    const int64_t *pos_old;
    int64_t *pos_new;
    float *logits;
    float *scratch;
    int sense0;
} step_ctx;

/* scratch layout (floats), also computed by decode.py's scratch_size(): resid, xn (B x H each), proj (B x
 * in_rows), xc (B x conv_ch), dbc (B x xp_rows), y (B x d_inner), exp(delta A) (d_inner x N, Mamba-1 only) */
static int64_t scratch_floats(const int64_t *cfg, int64_t B) {
    const int64_t H = cfg[CFG_HIDDEN];
    return B * (2 * H + cfg[CFG_INROWS] + cfg[CFG_CONVCH] + cfg[CFG_XPROWS] + cfg[CFG_DINNER])
           + (cfg[CFG_FAMILY] == 1 ? cfg[CFG_DINNER] * cfg[CFG_NSTATE] : 0);
}

static mat_t mat(void *const *p, int wi, int si, int bi, int64_t rows, int64_t cols) {
    mat_t m = {p[wi], (const float *)p[si], bi >= 0 ? (const float *)p[bi] : NULL, rows, cols};
    return m;
}

static void step_job(void *vctx, int tid, int nth) {
    const step_ctx *c = (const step_ctx *)vctx;
    const int64_t *cfg = c->cfg;
    const int64_t L = cfg[CFG_LAYERS], H = cfg[CFG_HIDDEN], V = cfg[CFG_VOCAB], D = cfg[CFG_DINNER];
    const int64_t N = cfg[CFG_NSTATE], R = cfg[CFG_RANK], NH = cfg[CFG_HEADS], P = cfg[CFG_HEADDIM];
    const int64_t G = cfg[CFG_GROUPS], K = cfg[CFG_KERNEL], CC = cfg[CFG_CONVCH], IR = cfg[CFG_INROWS];
    const int64_t XR = cfg[CFG_XPROWS], flags = cfg[CFG_FLAGS], fam = cfg[CFG_FAMILY], B = c->B;
    const float eps = (float)c->fp[FP_EPS], dtlo = (float)c->fp[FP_DTLO], dthi = (float)c->fp[FP_DTHI];
    float *resid = c->scratch, *xn = resid + B * H, *proj = xn + B * H, *xc = proj + B * IR, *dbc = xc + B * CC;
    float *ybuf = dbc + B * XR, *Abuf = ybuf + B * D;
    void *const *g = c->ptrs;
    int sense = c->sense0;
    int64_t lo, hi;

    for (int64_t l = 0; l < L; l++) {
        void *const *p = g + G_LEN + l * L_LEN;
        const float *conv_old = c->conv_old + l * B * CC * (K - 1);
        float *conv_new = c->conv_new + l * B * CC * (K - 1);
        const int64_t ssm_row = (fam == 1) ? D * N : NH * P * N;
        const float *ssm_old = c->ssm_old + l * B * ssm_row;
        float *ssm_new = c->ssm_new + l * B * ssm_row;

        /* 1. (first layer: embedding) RMSNorm, split by batch row */
        split(B, tid, nth, &lo, &hi);
        for (int64_t b = lo; b < hi; b++) {
            if (l == 0 && (flags & FLAG_EMBED_I8)) {
                const int8_t *row = (const int8_t *)g[G_HEAD_W] + c->tokens[b] * H;
                const float s = ((const float *)g[G_HEAD_S])[c->tokens[b]];
                for (int64_t h = 0; h < H; h++) resid[b * H + h] = (float)row[h] * s;
            } else if (l == 0) {
                memcpy(resid + b * H, (const float *)g[G_EMBED] + c->tokens[b] * H, sizeof(float) * H);
            }
            rmsnorm_row(resid + b * H, (const float *)p[L_NORM], xn + b * H, H, eps);
        }
        barrier(nth, &sense);

        /* 2. in_proj, split by output row; the rows that feed the conv get their conv step right away */
        const mat_t in = mat(p, L_IN_W, L_IN_S, L_IN_B, IR, H);
        split(IR, tid, nth, &lo, &hi);
        gemv_rows(&in, xn, H, B, proj, IR, lo, hi, 0);
        const int64_t conv_start = (fam == 1) ? 0 : D;  /* Mamba-1: [x | z]; Mamba-2: [z | xBC | dt] */
        int64_t c0 = lo > conv_start ? lo - conv_start : 0, c1 = hi - conv_start;
        if (c1 > CC) c1 = CC;
        if (c0 < c1)
            conv_step(proj + conv_start, IR, xc, CC, (const float *)p[L_CONV_W], (const float *)p[L_CONV_B],
                      conv_old, conv_new, B, CC, K, c0, c1);
        barrier(nth, &sense);

        if (fam == 1) {
            const int lti = (flags & FLAG_LTI) != 0;
            /* 3. x_proj -> (dt, B, C) per batch row (the LTI ablation has fixed ones instead) */
            if (!lti) {
                const mat_t xp = mat(p, L_XP_W, L_XP_S, -1, XR, D);
                split(XR, tid, nth, &lo, &hi);
                gemv_rows(&xp, xc, CC, B, dbc, XR, lo, hi, 0);
                barrier(nth, &sense);
            }
            /* 4. dt_proj + softplus, the selective scan and the gate, split by channel */
            const float *Alog = (const float *)p[L_ALOG], *Dp = (const float *)p[L_D];
            const float *Wdt = (const float *)p[L_DT_W], *bdt = (const float *)p[L_DT_B];
            split(D, tid, nth, &lo, &hi);
            const float *A = refresh_A((float *)p[L_ACACHE], Alog, D, N, lo, hi);
            /* whole-range passes (exp(delta A), softplus, gate) keep exp vectorised; the per-channel loop does
             * the rest. Abuf holds exp(delta A) for this thread's channels. */
            for (int64_t b = 0; b < B; b++) {
                const float *dtv = lti ? (const float *)p[L_LTI_DT] : dbc + b * XR;
                float *yb = ybuf + b * D;  /* holds delta until y replaces it */
                for (int64_t d = lo; d < hi; d++) {
                    float acc = bdt ? bdt[d] : 0.0f;
                    for (int64_t r = 0; r < R; r++) acc += Wdt[d * R + r] * dtv[r];
                    yb[d] = acc;
                }
                softplus_inplace(yb + lo, hi - lo);
                const float *Bv = lti ? (const float *)p[L_LTI_B] : dtv + R;
                const float *Cv = lti ? (const float *)p[L_LTI_C] : Bv + N;
                for (int64_t d = lo; d < hi; d++)
                    for (int64_t n = 0; n < N; n++) Abuf[d * N + n] = yb[d] * A[d * N + n];
                for (int64_t i = lo * N; i < hi * N; i++) Abuf[i] = expf(Abuf[i]);
                const float *xb = xc + b * CC, *hob = ssm_old + b * D * N;
                float *hnb = ssm_new + b * D * N;
                int64_t d = lo;
#ifdef LS_AVX512
                if (N == 16) {  /* 16 channels at a time: one hsum16 for their 16 readouts */
                    const __m512 Bq = _mm512_loadu_ps(Bv), Cq = _mm512_loadu_ps(Cv);
                    for (; d + 16 <= hi; d += 16) {
                        __m512 prod[16];
                        for (int j = 0; j < 16; j++) {
                            const int64_t o = (d + j) * 16;
                            const __m512 dx = _mm512_set1_ps(yb[d + j] * xb[d + j]);
                            const __m512 h = _mm512_fmadd_ps(_mm512_loadu_ps(Abuf + o), _mm512_loadu_ps(hob + o),
                                                             _mm512_mul_ps(dx, Bq));
                            _mm512_storeu_ps(hnb + o, h);
                            prod[j] = _mm512_mul_ps(h, Cq);
                        }
                        const __m512 xv = _mm512_loadu_ps(xb + d);
                        _mm512_storeu_ps(yb + d, _mm512_fmadd_ps(_mm512_loadu_ps(Dp + d), xv, hsum16(prod)));
                    }
                }
#endif
                for (; d < hi; d++) {
                    const float delta = yb[d], x = xb[d], dx = delta * x;
                    const float *dA = Abuf + d * N, *ho = hob + d * N;
                    float *hn = hnb + d * N;
                    float y = 0.0f;
#pragma GCC ivdep
                    for (int64_t n = 0; n < N; n++) {
                        const float h = dA[n] * ho[n] + dx * Bv[n];
                        hn[n] = h;
                        y += h * Cv[n];
                    }
                    yb[d] = y + Dp[d] * x;
                }
                float *zg = proj + b * IR + D;  /* z: silu(z) in place (z is not read again this step) */
                silu_inplace(zg + lo, hi - lo);
                for (int64_t d = lo; d < hi; d++) yb[d] *= zg[d];
            }
            barrier(nth, &sense);
        } else {
            /* 3. SSD step per head, then the gate, split by head */
            const float *Alog = (const float *)p[L_ALOG], *Dp = (const float *)p[L_D];
            const float *dtb = (const float *)p[L_DT_B];
            const int64_t hpg = NH / G;
            split(NH, tid, nth, &lo, &hi);
            for (int64_t h = lo; h < hi; h++) {
                const float A = -expf(Alog[h]);
                const int64_t grp = h / hpg;
                for (int64_t b = 0; b < B; b++) {
                    float dt = softplus(proj[b * IR + D + CC + h] + dtb[h]);
                    if ((flags & FLAG_DTLO) && dt < dtlo) dt = dtlo;
                    if ((flags & FLAG_DTHI) && dt > dthi) dt = dthi;
                    const float dA = expf(dt * A);
                    const float *xr = xc + b * CC, *Bv = xr + D + grp * N, *Cv = xr + D + G * N + grp * N;
                    for (int64_t q = 0; q < P; q++) {
                        const int64_t ch = h * P + q;
                        const float x = xr[ch], dx = dt * x;
                        const float *so = ssm_old + ((b * NH + h) * P + q) * N;
                        float *sn = ssm_new + ((b * NH + h) * P + q) * N;
                        float y = 0.0f;
#pragma GCC ivdep
                        for (int64_t n = 0; n < N; n++) {
                            const float s = dA * so[n] + dx * Bv[n];
                            sn[n] = s;
                            y += s * Cv[n];
                        }
                        y += Dp[h] * x;
                        ybuf[b * D + ch] = y * silu(proj[b * IR + ch]);
                    }
                }
            }
            barrier(nth, &sense);
            /* 4. grouped RMSNorm of the gated output, split by (batch row, group) */
            const int64_t gs = D / G;
            split(B * G, tid, nth, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) {
                float *yy = ybuf + (u / G) * D + (u % G) * gs;
                rmsnorm_row(yy, (const float *)p[L_GNORM] + (u % G) * gs, yy, gs, eps);
            }
            barrier(nth, &sense);
        }

        /* 5. out_proj added onto the residual stream, split by output row */
        const mat_t out = mat(p, L_OUT_W, L_OUT_S, L_OUT_B, H, D);
        split(H, tid, nth, &lo, &hi);
        gemv_rows(&out, ybuf, D, B, resid, H, lo, hi, 1);
        barrier(nth, &sense);
    }

    /* final norm, then the LM head split by vocabulary row */
    split(B, tid, nth, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) {
        rmsnorm_row(resid + b * H, (const float *)g[G_NORMF], xn + b * H, H, eps);
        c->pos_new[b] = c->pos_old[b] + 1;
    }
    barrier(nth, &sense);
    const mat_t head = mat(g, G_HEAD_W, G_HEAD_S, G_HEAD_B, V, H);
    split(V, tid, nth, &lo, &hi);
    gemv_rows(&head, xn, H, B, c->logits, V, lo, hi, 0);
}

/* Returns 0 on success; 1..: a size check failed (nothing was written). */
int leanseq_ssm_decode_step(const int64_t *cfg, int64_t cfg_len, const double *fp, int64_t fp_len, void *const *ptrs,
                            const int64_t *sizes, int64_t sizes_len, const int64_t *tokens, int64_t B,
                            const float *conv_old, const float *ssm_old, float *conv_new, float *ssm_new,
                            const int64_t *pos_old, int64_t *pos_new, float *logits, float *scratch, int64_t nthreads) {
    if (cfg_len != CFG_LEN || fp_len != FP_LEN || sizes_len != S_LEN || cfg[CFG_VERSION] != PLAN_VERSION) return 1;
    const int64_t fam = cfg[CFG_FAMILY], L = cfg[CFG_LAYERS], H = cfg[CFG_HIDDEN], V = cfg[CFG_VOCAB];
    const int64_t D = cfg[CFG_DINNER], N = cfg[CFG_NSTATE], NH = cfg[CFG_HEADS], P = cfg[CFG_HEADDIM];
    const int64_t G = cfg[CFG_GROUPS], K = cfg[CFG_KERNEL], CC = cfg[CFG_CONVCH];
    if (fam != 1 && fam != 2) return 2;
    for (int i = CFG_LAYERS; i < CFG_FLAGS; i++)
        if (cfg[i] < 1 && i != CFG_RANK && i != CFG_XPROWS) return 3;
    if (fam == 1 && (CC != D || cfg[CFG_INROWS] != 2 * D ||
                     (!(cfg[CFG_FLAGS] & FLAG_LTI) && cfg[CFG_XPROWS] != cfg[CFG_RANK] + 2 * N)))
        return 4;
    if (fam == 2 && (NH * P != D || NH % G || D % G || CC != D + 2 * G * N || cfg[CFG_INROWS] != D + CC + NH))
        return 4;
    if (B < 1 || sizes[S_TOKENS] != B || sizes[S_POS_OLD] != B || sizes[S_POS_NEW] != B) return 5;
    const int64_t conv = L * B * CC * (K - 1), ssm = L * B * (fam == 1 ? D * N : NH * P * N);
    if (sizes[S_CONV_OLD] != conv || sizes[S_CONV_NEW] != conv) return 6;
    if (sizes[S_SSM_OLD] != ssm || sizes[S_SSM_NEW] != ssm) return 7;
    if (sizes[S_LOGITS] != B * V) return 8;
    if (sizes[S_SCRATCH] < scratch_floats(cfg, B)) return 9;
    if (sizes[S_PTRS] != G_LEN + L * L_LEN) return 10;
    if (fam == 1)
        for (int64_t l = 0; l < L; l++)
            if (ptrs[G_LEN + l * L_LEN + L_ACACHE] == NULL) return 10;
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= V) return 11;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    (void)H;
    pthread_mutex_lock(&call_lock);
    step_ctx ctx = {cfg, fp, ptrs, tokens, B, conv_old, ssm_old, conv_new, ssm_new, pos_old, pos_new, logits,
                    scratch, atomic_load(&bar_sense)};
    run_job(step_job, &ctx, (int)nthreads);
    pthread_mutex_unlock(&call_lock);
    return 0;
}

/* The same step with its arguments packed into one int64 array (one ctypes argument instead of eighteen: the
 * conversions cost more than a tiny model's whole step). Slots, in leanseq_ssm_decode_step's order: */
enum { A_CFG, A_CFG_LEN, A_FP, A_FP_LEN, A_PTRS, A_SIZES, A_SIZES_LEN, A_TOKENS, A_B, A_CONV_OLD, A_SSM_OLD,
       A_CONV_NEW, A_SSM_NEW, A_POS_OLD, A_POS_NEW, A_LOGITS, A_SCRATCH, A_THREADS, A_LEN };
int leanseq_ssm_decode_packed(const int64_t *a, int64_t len) {
    if (len != A_LEN) return 1;
#define P_(T, i) ((T)(intptr_t)a[i])
    return leanseq_ssm_decode_step(P_(const int64_t *, A_CFG), a[A_CFG_LEN], P_(const double *, A_FP), a[A_FP_LEN],
                                   P_(void *const *, A_PTRS), P_(const int64_t *, A_SIZES), a[A_SIZES_LEN],
                                   P_(const int64_t *, A_TOKENS), a[A_B], P_(const float *, A_CONV_OLD),
                                   P_(const float *, A_SSM_OLD), P_(float *, A_CONV_NEW), P_(float *, A_SSM_NEW),
                                   P_(const int64_t *, A_POS_OLD), P_(int64_t *, A_POS_NEW), P_(float *, A_LOGITS),
                                   P_(float *, A_SCRATCH), a[A_THREADS]);
#undef P_
}

/* Bandwidth/gemv probe for benchmarks: y = W x for one (rows, cols) matrix, float32 or int8 (scale != NULL). */
typedef struct { mat_t m; const float *x; float *y; int64_t B; int sense0; } gemv_ctx;
static void gemv_job(void *vctx, int tid, int nth) {
    const gemv_ctx *c = (const gemv_ctx *)vctx;
    int64_t lo, hi;
    split(c->m.rows, tid, nth, &lo, &hi);
    gemv_rows(&c->m, c->x, c->m.cols, c->B, c->y, c->m.rows, lo, hi, 0);
}
int leanseq_gemv(const void *w, const float *scale, const float *x, float *y, int64_t rows, int64_t cols, int64_t B,
                 int64_t nthreads) {
    if (rows < 1 || cols < 1 || B < 1) return 1;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    pthread_mutex_lock(&call_lock);
    gemv_ctx ctx = {{w, scale, NULL, rows, cols}, x, y, B, 0};
    run_job(gemv_job, &ctx, (int)nthreads);
    pthread_mutex_unlock(&call_lock);
    return 0;
}

/* ==== the transformer baseline (leanseq/models/transformer.py): one whole KV-cache decode step ============
 *
 * Same engine as the recurrent step above (pool, barriers, gemv on nn.Linear's layout, float32 or int8 rows),
 * so Mamba vs transformer comparisons measure the architectures, not two code bases. Per layer:
 *   RMSNorm -> q|k|v rows (split by output row) -> RoPE and the cache write at each row's own position (by
 *   batch row) -> attention of one query per head over the row's valid prefix (split by (row, kv head, slot
 *   chunk): the query heads of a group share each key/value row read; chunks keep both threads busy when a
 *   batch has fewer kv heads than threads, and are merged with the usual max/sum rescaling) -> o_proj onto
 *   the residual -> RMSNorm -> gate|up rows + SiLU product (split by intermediate row) -> down_proj onto the
 *   residual; then the final norm and the LM head. The caller (decode_transformer.py) has already reserved
 *   capacity and made the buffers writable, exactly as the eager step does; this code writes each row's new
 *   key/value at slot pos[b] and reads slots [0, pos[b]] of that row.
 */
enum { TC_VERSION, TC_LAYERS, TC_HIDDEN, TC_VOCAB, TC_HEADS, TC_KVHEADS, TC_HEADDIM, TC_INTER, TC_ROPE, TC_MAXPOS,
       TC_LEN };
enum { TF_EPS, TF_LEN };
enum { TG_EMBED, TG_POSEMB, TG_INVFREQ, TG_NORMF, TG_HEAD_W, TG_HEAD_S, TG_HEAD_B, TG_LEN };
enum { TL_NORM1, TL_Q_W, TL_Q_S, TL_Q_B, TL_K_W, TL_K_S, TL_K_B, TL_V_W, TL_V_S, TL_V_B, TL_O_W, TL_O_S, TL_O_B,
       TL_NORM2, TL_G_W, TL_G_S, TL_U_W, TL_U_S, TL_D_W, TL_D_S, TL_LEN };
enum { TS_TOKENS, TS_KCACHE, TS_VCACHE, TS_POS, TS_LOGITS, TS_SCRATCH, TS_PTRS, TS_LEN };
#define TF_PLAN_VERSION 1
#define TF_MAXG 64     /* query heads per kv head: bounds the per-thread score tile on the stack */
#define TF_TILE 64     /* cache slots per online-softmax tile */
#define TF_MAXCHUNK 16 /* slot chunks per (row, kv head) */

/* Chunks per (row, kv head): enough units for ~4 per thread, at most TF_MAXCHUNK (decode_transformer.py
 * sizes the scratch with the same formula). */
static int64_t tf_chunk_bound(int64_t B, int64_t KV, int64_t nth) {
    const int64_t units = B * KV, want = (4 * nth + units - 1) / units;
    return want < 1 ? 1 : (want > TF_MAXCHUNK ? TF_MAXCHUNK : want);
}

/* scratch (floats): resid, xn (B x H), qkv (B x (NH + 2 KV) hd), att (B x NH hd), gu (B x 2 I),
 * rope cos|sin (B x hd), partials (B x NH x chunk_bound x (hd + 2)) */
static int64_t tf_scratch_floats(const int64_t *cfg, int64_t B, int64_t nth) {
    const int64_t H = cfg[TC_HIDDEN], NH = cfg[TC_HEADS], KV = cfg[TC_KVHEADS], hd = cfg[TC_HEADDIM];
    return B * (2 * H + (NH + 2 * KV) * hd + NH * hd + 2 * cfg[TC_INTER] + hd)
           + B * NH * tf_chunk_bound(B, KV, nth) * (hd + 2);
}

typedef struct {
    const int64_t *cfg;
    float eps;
    void *const *ptrs;
    const int64_t *tokens, *pos;
    int64_t B, cap, nc;
    float *kc, *vc, *logits, *scratch;
    int sense0;
} tf_ctx;

/* q|k|v (or gate|up) as one row range over consecutive matrices whose outputs sit side by side in y */
static void gemv_concat(const mat_t *ms, int nm, const float *x, int64_t ldx, int64_t B, float *y, int64_t ldy,
                        int64_t lo, int64_t hi) {
    int64_t off = 0;
    for (int i = 0; i < nm; i++) {
        const int64_t r0 = (lo > off ? lo : off) - off, r1 = (hi < off + ms[i].rows ? hi : off + ms[i].rows) - off;
        if (r0 < r1) gemv_rows(&ms[i], x, ldx, B, y + off, ldy, r0, r1, 0);
        off += ms[i].rows;
    }
}

/* x (hd) rotated in place: pairs (i, i + hd/2) by the row's angles, as transformer.apply_rope */
static inline void rope_inplace(float *x, const float *cs, const float *sn, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i] + a * sn[i];
    }
}

/* Attention of the G query heads q[0..G) (hd each, G*hd contiguous) over slots [s0, s1) of one (row, kv head):
 * out + g * ostride = (m, l, acc[hd]) with m the running max score, l the sum of exp(score - m), acc the weighted values. */
static void attend_chunk(const float *q, int64_t G, int64_t hd, const float *K, const float *V, int64_t s0,
                         int64_t s1, float scale, float *out, int64_t ostride) {
    float sc[TF_MAXG][TF_TILE];
    for (int64_t g = 0; g < G; g++) {
        float *o = out + g * ostride;
        o[0] = -FLT_MAX;  /* not -INFINITY: -ffast-math assumes finite values; l == 0 marks "no slot yet" */
        o[1] = 0.0f;
        memset(o + 2, 0, sizeof(float) * (size_t)hd);
    }
    for (int64_t t0 = s0; t0 < s1; t0 += TF_TILE) {
        const int64_t n = (s1 - t0 < TF_TILE) ? s1 - t0 : TF_TILE;
        for (int64_t s = 0; s < n; s++) {
            const float *kr = K + (t0 + s) * hd;
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + g * hd;
                float acc = 0.0f;
#pragma GCC ivdep
                for (int64_t d = 0; d < hd; d++) acc += qg[d] * kr[d];
                sc[g][s] = acc * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *o = out + g * ostride;
            float mx = o[0];
            for (int64_t s = 0; s < n; s++) mx = sc[g][s] > mx ? sc[g][s] : mx;
            const float corr = (o[1] == 0.0f) ? 0.0f : expf(o[0] - mx);
            float l = o[1] * corr;
            for (int64_t s = 0; s < n; s++) {
                sc[g][s] = expf(sc[g][s] - mx);
                l += sc[g][s];
            }
            o[0] = mx;
            o[1] = l;
            if (corr != 1.0f)
                for (int64_t d = 0; d < hd; d++) o[2 + d] *= corr;
        }
        for (int64_t s = 0; s < n; s++) {
            const float *vr = V + (t0 + s) * hd;
            for (int64_t g = 0; g < G; g++) {
                float *acc = out + g * ostride + 2;
                const float p = sc[g][s];
#pragma GCC ivdep
                for (int64_t d = 0; d < hd; d++) acc[d] += p * vr[d];
            }
        }
    }
}

static void tf_step_job(void *vctx, int tid, int nth) {
    const tf_ctx *c = (const tf_ctx *)vctx;
    const int64_t *cfg = c->cfg;
    const int64_t L = cfg[TC_LAYERS], H = cfg[TC_HIDDEN], V = cfg[TC_VOCAB], NH = cfg[TC_HEADS];
    const int64_t KV = cfg[TC_KVHEADS], hd = cfg[TC_HEADDIM], I = cfg[TC_INTER], rope = cfg[TC_ROPE];
    const int64_t B = c->B, cap = c->cap, NC = c->nc, G = NH / KV, half = hd / 2, QKV = (NH + 2 * KV) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float *resid = c->scratch, *xn = resid + B * H, *qkv = xn + B * H, *att = qkv + B * QKV;
    float *gu = att + B * NH * hd, *trig = gu + B * 2 * I, *part = trig + B * hd;
    void *const *g = c->ptrs;
    int sense = c->sense0;
    int64_t lo, hi;

    for (int64_t l = 0; l < L; l++) {
        void *const *p = g + TG_LEN + l * TL_LEN;
        float *kc = c->kc + l * B * KV * cap * hd, *vc = c->vc + l * B * KV * cap * hd;

        /* 1. (first layer: token + position embedding, RoPE angles) RMSNorm, by batch row */
        split(B, tid, nth, &lo, &hi);
        for (int64_t b = lo; b < hi; b++) {
            if (l == 0) {
                memcpy(resid + b * H, (const float *)g[TG_EMBED] + c->tokens[b] * H, sizeof(float) * H);
                if (rope) {  /* angle = float32(pos) * inv_freq in float32, as TransformerLM._rope */
                    const float *inv = (const float *)g[TG_INVFREQ];
                    for (int64_t i = 0; i < half; i++) {
                        const float a = (float)c->pos[b] * inv[i];
                        trig[b * hd + i] = cosf(a);
                        trig[b * hd + half + i] = sinf(a);
                    }
                } else {
                    const float *pe = (const float *)g[TG_POSEMB] + c->pos[b] * H;
                    for (int64_t i = 0; i < H; i++) resid[b * H + i] += pe[i];
                }
            }
            rmsnorm_row(resid + b * H, (const float *)p[TL_NORM1], xn + b * H, H, c->eps);
        }
        barrier(nth, &sense);

        /* 2. q | k | v, split by output row */
        const mat_t qkvm[3] = {mat(p, TL_Q_W, TL_Q_S, TL_Q_B, NH * hd, H), mat(p, TL_K_W, TL_K_S, TL_K_B, KV * hd, H),
                               mat(p, TL_V_W, TL_V_S, TL_V_B, KV * hd, H)};
        split(QKV, tid, nth, &lo, &hi);
        gemv_concat(qkvm, 3, xn, H, B, qkv, QKV, lo, hi);
        barrier(nth, &sense);

        /* 3. RoPE on q and k, then the new key/value into slot pos[b] of the row's cache, by batch row */
        split(B, tid, nth, &lo, &hi);
        for (int64_t b = lo; b < hi; b++) {
            float *qb = qkv + b * QKV, *kb = qb + NH * hd, *vb = kb + KV * hd;
            if (rope)
                for (int64_t h = 0; h < NH + KV; h++) rope_inplace(qb + h * hd, trig + b * hd, trig + b * hd + half, half);
            for (int64_t j = 0; j < KV; j++) {
                const int64_t at = ((b * KV + j) * cap + c->pos[b]) * hd;
                memcpy(kc + at, kb + j * hd, sizeof(float) * hd);
                memcpy(vc + at, vb + j * hd, sizeof(float) * hd);
            }
        }
        barrier(nth, &sense);

        /* 4. attention over slots [0, pos[b]], by (row, kv head, chunk); with one chunk, normalise right away */
        split(B * KV * NC, tid, nth, &lo, &hi);
        for (int64_t u = lo; u < hi; u++) {
            const int64_t b = u / (KV * NC), j = (u / NC) % KV, ch = u % NC, len = c->pos[b] + 1;
            const int64_t base = (b * KV + j) * cap * hd;
            /* head h's chunk ch sits at part[((b * NH + h) * NC + ch) * (hd + 2)] */
            float *o = part + ((b * NH + j * G) * NC + ch) * (hd + 2);
            attend_chunk(qkv + b * QKV + j * G * hd, G, hd, kc + base, vc + base, len * ch / NC,
                         len * (ch + 1) / NC, scale, o, NC * (hd + 2));
            if (NC == 1)
                for (int64_t gi = 0; gi < G; gi++) {
                    const float *og = o + gi * (hd + 2), inv = 1.0f / og[1];
                    float *y = att + b * NH * hd + (j * G + gi) * hd;
                    for (int64_t d = 0; d < hd; d++) y[d] = og[2 + d] * inv;
                }
        }
        barrier(nth, &sense);
        if (NC > 1) {  /* 5. merge the chunks of each (row, head) */
            split(B * NH, tid, nth, &lo, &hi);
            for (int64_t u = lo; u < hi; u++) {
                const float *pc = part + u * NC * (hd + 2);
                float mx = -FLT_MAX, den = 0.0f;
                for (int64_t ch = 0; ch < NC; ch++)
                    if (pc[ch * (hd + 2) + 1] > 0.0f && pc[ch * (hd + 2)] > mx) mx = pc[ch * (hd + 2)];
                float *y = att + u * hd;
                for (int64_t d = 0; d < hd; d++) y[d] = 0.0f;
                for (int64_t ch = 0; ch < NC; ch++) {
                    const float *o = pc + ch * (hd + 2);
                    if (o[1] == 0.0f) continue;  /* an empty chunk (a short row) */
                    const float w = expf(o[0] - mx);
                    den += o[1] * w;
                    for (int64_t d = 0; d < hd; d++) y[d] += o[2 + d] * w;
                }
                const float inv = 1.0f / den;
                for (int64_t d = 0; d < hd; d++) y[d] *= inv;
            }
            barrier(nth, &sense);
        }

        /* 6. o_proj onto the residual stream, by output row */
        const mat_t om = mat(p, TL_O_W, TL_O_S, TL_O_B, H, NH * hd);
        split(H, tid, nth, &lo, &hi);
        gemv_rows(&om, att, NH * hd, B, resid, H, lo, hi, 1);
        barrier(nth, &sense);

        /* 7. RMSNorm, by batch row */
        split(B, tid, nth, &lo, &hi);
        for (int64_t b = lo; b < hi; b++) rmsnorm_row(resid + b * H, (const float *)p[TL_NORM2], xn + b * H, H, c->eps);
        barrier(nth, &sense);

        /* 8. gate and up for the same intermediate rows, then silu(gate) * up in place of gate */
        const mat_t gm = mat(p, TL_G_W, TL_G_S, -1, I, H), um = mat(p, TL_U_W, TL_U_S, -1, I, H);
        split(I, tid, nth, &lo, &hi);
        if (lo < hi) {
            gemv_rows(&gm, xn, H, B, gu, 2 * I, lo, hi, 0);
            gemv_rows(&um, xn, H, B, gu + I, 2 * I, lo, hi, 0);
            for (int64_t b = 0; b < B; b++) {
                float *gr = gu + b * 2 * I;
                silu_inplace(gr + lo, hi - lo);
                for (int64_t i = lo; i < hi; i++) gr[i] *= gr[I + i];
            }
        }
        barrier(nth, &sense);

        /* 9. down_proj onto the residual stream, by output row */
        const mat_t dm = mat(p, TL_D_W, TL_D_S, -1, H, I);
        split(H, tid, nth, &lo, &hi);
        gemv_rows(&dm, gu, 2 * I, B, resid, H, lo, hi, 1);
        barrier(nth, &sense);
    }

    split(B, tid, nth, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) rmsnorm_row(resid + b * H, (const float *)g[TG_NORMF], xn + b * H, H, c->eps);
    barrier(nth, &sense);
    const mat_t head = mat(g, TG_HEAD_W, TG_HEAD_S, TG_HEAD_B, V, H);
    split(V, tid, nth, &lo, &hi);
    gemv_rows(&head, xn, H, B, c->logits, V, lo, hi, 0);
}

/* Returns 0 on success; 1..: a check failed and nothing was written (decode_transformer.py names the codes). */
int leanseq_tf_decode_step(const int64_t *cfg, int64_t cfg_len, const double *fp, int64_t fp_len, void *const *ptrs,
                           const int64_t *sizes, int64_t sizes_len, const int64_t *tokens, int64_t B, float *kcache,
                           float *vcache, int64_t cap, const int64_t *pos, float *logits, float *scratch,
                           int64_t nthreads) {
    if (cfg_len != TC_LEN || fp_len != TF_LEN || sizes_len != TS_LEN || cfg[TC_VERSION] != TF_PLAN_VERSION) return 1;
    for (int i = TC_LAYERS; i < TC_LEN; i++)
        if (cfg[i] < (i == TC_ROPE ? 0 : 1)) return 3;
    const int64_t L = cfg[TC_LAYERS], V = cfg[TC_VOCAB], NH = cfg[TC_HEADS], KV = cfg[TC_KVHEADS];
    const int64_t hd = cfg[TC_HEADDIM];
    if (NH % KV || NH / KV > TF_MAXG || (cfg[TC_ROPE] && hd % 2)) return 4;
    if (B < 1 || cap < 1 || sizes[TS_TOKENS] != B || sizes[TS_POS] != B) return 5;
    if (sizes[TS_KCACHE] != L * B * KV * cap * hd || sizes[TS_VCACHE] != sizes[TS_KCACHE]) return 6;
    for (int64_t b = 0; b < B; b++)  /* the new entry goes to slot pos[b]: it must exist (and have an embedding) */
        if (pos[b] < 0 || pos[b] >= cap || (!cfg[TC_ROPE] && pos[b] >= cfg[TC_MAXPOS])) return 7;
    if (sizes[TS_LOGITS] != B * V) return 8;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (sizes[TS_SCRATCH] < tf_scratch_floats(cfg, B, nthreads)) return 9;
    if (sizes[TS_PTRS] != TG_LEN + L * TL_LEN) return 10;
    for (int64_t b = 0; b < B; b++)
        if (tokens[b] < 0 || tokens[b] >= V) return 11;
    int64_t maxlen = 0;
    for (int64_t b = 0; b < B; b++) maxlen = pos[b] + 1 > maxlen ? pos[b] + 1 : maxlen;
    /* chunks only pay when a chunk still holds a few tiles of slots */
    int64_t nc = tf_chunk_bound(B, KV, nthreads), by_len = (maxlen + 4 * TF_TILE - 1) / (4 * TF_TILE);
    if (nc > by_len) nc = by_len;
    if (nc < 1) nc = 1;
    pthread_mutex_lock(&call_lock);
    tf_ctx ctx = {cfg, (float)fp[TF_EPS], ptrs, tokens, pos, B, cap, nc, kcache, vcache, logits, scratch,
                  atomic_load(&bar_sense)};
    run_job(tf_step_job, &ctx, (int)nthreads);
    pthread_mutex_unlock(&call_lock);
    return 0;
}
