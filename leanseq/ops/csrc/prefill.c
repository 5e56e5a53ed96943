/* Inference-only (no gradient) kernels for a Mamba-2 prefill over a whole sequence: the chunked SSD scan, the
 * causal depthwise conv + SiLU, and the gated grouped RMSNorm. Each one does in one pass over its rows what
 * PyTorch does in several passes over (L, channels)-sized temporaries; leanseq/ops/prefill_native.py says
 * when they are used, and tests/ops/test_prefill_native.py holds them to the PyTorch code they replace.
 *
 * SSD scan: in PyTorch the chunked scan (leanseq/ops/ssd.py, which this file must match) is a dozen passes over
 * (chunk, head, Q, Q)- and (L, heads, head_dim)-sized temporaries plus batched products of 64-wide matrices;
 * at a 512-token prefill of a 130m model the passes cost as much as the products. Here each head keeps its
 * (state, head_dim) state in a small buffer and does, chunk by chunk, exactly the chunked algorithm's
 * three products with the decays applied on the fly:
 *     y[l]  = exp(a_l) C_l S  +  sum_{s<=l} (C_l . B_s) exp(a_l - a_s) dt_s x_s  +  D x_l
 *     S    <- exp(a_end) S  +  sum_s exp(a_end - a_s) dt_s B_s x_s^T
 * where a is the cumulative dt * A from the chunk start. Every exponent is <= 0, as in ssd.py, so nothing
 * overflows. The (C_l . B_s) products are shared by the heads of a group and come in precomputed (`cb`).
 *
 * Layouts (float32): x (batch, length, heads, head_dim) and B, C (batch, length, groups, state) may have any
 * token stride (they are views into one conv output); dt (batch, length, heads) contiguous, positive;
 * cb (batch, chunks, groups, Q, Q) contiguous; state (batch, heads, head_dim, state) read and written in place
 * (it holds the initial state on entry); y (batch, length, heads, head_dim) contiguous.
 * head_dim must be a multiple of 16 (one 16-float vector per 16 columns); GCC vector extensions keep the
 * file portable (AVX-512 where -march=native has it, two AVX2 halves elsewhere).
 *
 * Threads: built with -fopenmp, the *_team entries split their work over an OpenMP team in the runtime torch
 * already loaded (prefill_native.py checks that it is shared); the plain entries do a given range on the
 * calling thread. Return codes: 0, 1 when a work buffer cannot be allocated, 2 for sizes they cannot take.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

#define RB 4  /* rows per register block */
#define VMAX 4  /* 16-float vectors per block of columns: 64 columns */

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }
static inline v16 splat(float s) { return (v16){0} + s; }

/* acc[r][0:nv] (rows r < RB, nv 16-float vectors) += sum_k coef[r * cs + k] * rows[k * rs + 0:16 nv] */
static inline __attribute__((always_inline)) void block_fma(v16 acc[RB][VMAX], int nv, int64_t nk,
                                                            const float *coef, int64_t cs, const float *rows,
                                                            int64_t rs) {
    for (int64_t k = 0; k < nk; k++) {
        v16 xv[VMAX];
        for (int v = 0; v < VMAX; v++) xv[v] = v < nv ? load16(rows + k * rs + 16 * v) : splat(0.0f);
#ifdef __AVX512F__
        /* keep the row in registers: left alone, GCC folds the load into each of the RB multiply-adds and the
         * loop becomes load-bound (RB times the loads) */
        for (int v = 0; v < VMAX; v++) if (v < nv) __asm__("" : "+v"(xv[v]));
#endif
        for (int r = 0; r < RB; r++) {
            const v16 c = splat(coef[r * cs + k]);
            for (int v = 0; v < VMAX; v++) if (v < nv) acc[r][v] += c * xv[v];
        }
    }
}

/* y rows l0..l0+RB-1 (those < q), columns pb..pb+16 nv: the entering state (ST, (N, P)) read out with the
 * chunk's C and decayed by exp(a_l), plus the intra-chunk mix W x, plus D x */
static inline __attribute__((always_inline)) void y_block(
        int nv, int64_t l0, int64_t q, int64_t pb, int64_t N, int64_t P, int64_t Q, const float *Cc,
        const float *ST, const float *eal, const float *W, const float *xc, int64_t xs, float Dh, float *y0,
        int64_t ys) {
    v16 acc[RB][VMAX];
    for (int r = 0; r < RB; r++) for (int v = 0; v < VMAX; v++) acc[r][v] = splat(0.0f);
    block_fma(acc, nv, N, Cc + l0 * N, N, ST + pb, P);
    for (int r = 0; r < RB; r++) {
        const v16 e = splat(eal[l0 + r]);
        for (int v = 0; v < VMAX; v++) if (v < nv) acc[r][v] *= e;
    }
    const int64_t ns = l0 + RB < q ? l0 + RB : q;  /* sources s < ns; W is zero above the diagonal */
    block_fma(acc, nv, ns, W + l0 * Q, Q, xc + pb, xs);
    const v16 dv = splat(Dh);
    for (int r = 0; r < RB && l0 + r < q; r++) {
        const float *xr = xc + (l0 + r) * xs + pb;
        float *yr = y0 + (l0 + r) * ys + pb;
        for (int v = 0; v < VMAX; v++) if (v < nv) store16(yr + 16 * v, acc[r][v] + dv * load16(xr + 16 * v));
    }
}

/* state rows n0..n0+RB-1, columns pb..pb+16 nv: ST = exp(a_end) ST + BT xw */
static inline __attribute__((always_inline)) void state_block(
        int nv, int64_t n0, int64_t q, int64_t pb, int64_t P, int64_t Q, float eend, const float *BT,
        const float *xw, float *ST) {
    v16 acc[RB][VMAX];
    const v16 e = splat(eend);
    for (int r = 0; r < RB; r++)
        for (int v = 0; v < VMAX; v++) acc[r][v] = v < nv ? e * load16(ST + (n0 + r) * P + pb + 16 * v) : splat(0.0f);
    block_fma(acc, nv, q, BT + n0 * Q, Q, xw + pb, P);
    for (int r = 0; r < RB; r++)
        for (int v = 0; v < VMAX; v++) if (v < nv) store16(ST + (n0 + r) * P + pb + 16 * v, acc[r][v]);
}

int leanseq_ssd_prefill(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                        const float *D, const float *cb, float *state, float *y,
                        int64_t batch, int64_t length, int64_t heads, int64_t head_dim, int64_t groups,
                        int64_t nstate, int64_t chunk, int64_t x_tok_stride, int64_t bc_tok_stride,
                        int64_t h0, int64_t h1) {
    if (batch < 1 || length < 1 || heads < 1 || groups < 1 || heads % groups || nstate < 1 || chunk < 1
        || head_dim < 16 || head_dim % 16 || h0 < 0 || h1 > heads || h0 >= h1
        || x_tok_stride < heads * head_dim || bc_tok_stride < groups * nstate)
        return 2;
    const int64_t P = head_dim, N = nstate, Q = chunk, hpg = heads / groups, nh = h1 - h0;
    const int64_t nchunks = (length + Q - 1) / Q;
    const int64_t np4 = (N + RB - 1) / RB * RB, nq4 = (Q + RB - 1) / RB * RB;
    /* per head of the block: its state transposed, (N, P), rows padded to a multiple of RB (kept across the
     * chunks, so the chunk loop can sit outside the head loop and the chunk's B and C are laid out once per
     * group). Per chunk: W the intra-chunk weights (Q, Q), xw x scaled to the chunk end (Q, P), the
     * cumulative log decays and their exps, B transposed (N, Q) and C (Q, N), both zero-padded. */
    const size_t bytes = sizeof(float) * (size_t)(nh * np4 * P + nq4 * Q + Q * P + 2 * nq4 + np4 * Q + nq4 * N);
    float *STs = aligned_alloc(64, (bytes + 63) / 64 * 64);  /* aligned_alloc wants a multiple of 64 */
    if (!STs) return 1;
    float *W = STs + nh * np4 * P, *xw = W + nq4 * Q, *acum = xw + Q * P, *eal = acum + nq4;
    float *BT = eal + nq4, *Cc = BT + np4 * Q;
    for (int64_t b = 0; b < batch; b++) {
        memset(STs, 0, sizeof(float) * (size_t)(nh * np4 * P));
        for (int64_t h = h0; h < h1; h++) {
            const float *S = state + (b * heads + h) * P * N;  /* (P, N) */
            float *ST = STs + (h - h0) * np4 * P;
            for (int64_t p = 0; p < P; p++)
                for (int64_t n = 0; n < N; n++) ST[n * P + p] = S[p * N + n];
        }
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t t0 = c * Q, q = (length - t0 < Q) ? length - t0 : Q;
            int64_t laid_out = -1;  /* the group whose B and C are in BT and Cc */
            for (int64_t h = h0; h < h1; h++) {
                const int64_t g = h / hpg;
                const float Ah = A[h], Dh = D ? D[h] : 0.0f;
                float *ST = STs + (h - h0) * np4 * P;
                const float *xc = x + (b * length + t0) * x_tok_stride + h * P;
                const float *dtc = dt + (b * length + t0) * heads + h;
                const float *cbc = cb + ((b * nchunks + c) * groups + g) * Q * Q;
                if (g != laid_out) {
                    const float *Bc = Bm + (b * length + t0) * bc_tok_stride + g * N;
                    const float *Ccp = Cm + (b * length + t0) * bc_tok_stride + g * N;
                    /* rows past q are zero, so a block of RB rows may run past the chunk's end */
                    for (int64_t l = 0; l < nq4; l++)
                        for (int64_t n = 0; n < N; n++) Cc[l * N + n] = l < q ? Ccp[l * bc_tok_stride + n] : 0.0f;
                    for (int64_t n = 0; n < np4; n++)
                        for (int64_t s = 0; s < Q; s++) BT[n * Q + s] = (n < N && s < q) ? Bc[s * bc_tok_stride + n] : 0.0f;
                    laid_out = g;
                }
                float run = 0.0f;
                for (int64_t s = 0; s < q; s++) { run += dtc[s * heads] * Ah; acum[s] = run; }
                for (int64_t s = q; s < nq4; s++) acum[s] = run;
                for (int64_t s = 0; s < nq4; s++) eal[s] = expf(acum[s]);
                /* W[l][s] = cb[l][s] exp(a_l - a_s) dt_s for s <= l, else 0 (rows past q are zero) */
                for (int64_t l = 0; l < nq4; l++) {
                    float *wr = W + l * Q;
                    const int64_t upto = l < q ? l + 1 : 0;
                    const float al = acum[l];
                    for (int64_t s = 0; s < upto; s++) wr[s] = expf(al - acum[s]);
                    for (int64_t s = 0; s < upto; s++) wr[s] *= cbc[l * Q + s] * dtc[s * heads];
                    for (int64_t s = upto; s < Q; s++) wr[s] = 0.0f;
                }
                /* y rows, RB at a time (nv = VMAX, the usual head_dim 64, gets its own constant-folded copy) */
                float *y0 = y + ((b * length + t0) * heads + h) * P;
                for (int64_t l0 = 0; l0 < q; l0 += RB)
                    for (int64_t pb = 0; pb < P; pb += 16 * VMAX) {
                        const int nv = (int)((P - pb) / 16 < VMAX ? (P - pb) / 16 : VMAX);
                        if (nv == VMAX) y_block(VMAX, l0, q, pb, N, P, Q, Cc, ST, eal, W, xc, x_tok_stride, Dh, y0, heads * P);
                        else y_block(nv, l0, q, pb, N, P, Q, Cc, ST, eal, W, xc, x_tok_stride, Dh, y0, heads * P);
                    }
                /* state update: ST[n] = exp(a_end) ST[n] + sum_s B_s[n] (exp(a_end - a_s) dt_s x_s) */
                const float aend = acum[q - 1], eend = eal[q - 1];
                for (int64_t s = 0; s < q; s++) {
                    const v16 wv = splat(expf(aend - acum[s]) * dtc[s * heads]);
                    for (int64_t p = 0; p < P; p += 16) store16(xw + s * P + p, wv * load16(xc + s * x_tok_stride + p));
                }
                for (int64_t n0 = 0; n0 < N; n0 += RB)
                    for (int64_t pb = 0; pb < P; pb += 16 * VMAX) {
                        const int nv = (int)((P - pb) / 16 < VMAX ? (P - pb) / 16 : VMAX);
                        if (nv == VMAX) state_block(VMAX, n0, q, pb, P, Q, eend, BT, xw, ST);
                        else state_block(nv, n0, q, pb, P, Q, eend, BT, xw, ST);
                    }
            }
        }
        for (int64_t h = h0; h < h1; h++) {
            float *S = state + (b * heads + h) * P * N;
            const float *ST = STs + (h - h0) * np4 * P;
            for (int64_t p = 0; p < P; p++)
                for (int64_t n = 0; n < N; n++) S[p * N + n] = ST[n * P + p];
        }
    }
    free(STs);
    return 0;
}

#ifdef _OPENMP
#include <omp.h>
/* heads split over an OpenMP team (torch's runtime, whose workers are still spinning from torch's previous
 * parallel op and so start at once) */
int leanseq_ssd_prefill_team(const float *x, const float *dt, const float *A, const float *Bm, const float *Cm,
                             const float *D, const float *cb, float *state, float *y,
                             int64_t batch, int64_t length, int64_t heads, int64_t head_dim, int64_t groups,
                             int64_t nstate, int64_t chunk, int64_t x_tok_stride, int64_t bc_tok_stride,
                             int64_t nthreads) {
    int code = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > heads) nthreads = heads;
#pragma omp parallel num_threads((int)nthreads) reduction(| : code)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t h0 = heads * t / nt, h1 = heads * (t + 1) / nt;
        if (h1 > h0)
            code |= leanseq_ssd_prefill(x, dt, A, Bm, Cm, D, cb, state, y, batch, length, heads, head_dim, groups,
                                        nstate, chunk, x_tok_stride, bc_tok_stride, h0, h1);
    }
    return code;
}
#endif

/* ---- causal depthwise conv + SiLU ------------------------------------------------------------------------
 * y[b, t, c] = silu(bias[c] + sum_k wt[k, c] x[b, t - (K-1) + k, c]), where positions before 0 come from
 * the conv state (batch, channels, K-1), oldest first (or are zero when state is NULL). x may have any token
 * stride (a view into the input projection); wt is the weight transposed, (K, channels); y is contiguous.
 * Rows [r0, r1) of the batch * length rows. */
int leanseq_conv_silu(const float *x, int64_t x_tok_stride, const float *state, const float *wt, const float *bias,
                      float *y, int64_t batch, int64_t length, int64_t channels, int64_t kernel, int64_t r0,
                      int64_t r1) {
    if (batch < 1 || length < 1 || channels < 1 || kernel < 1 || x_tok_stride < channels || r0 < 0
        || r1 > batch * length || r0 > r1)
        return 2;
    const int64_t K = kernel, Cn = channels;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / length, t = r % length;
        float *yr = y + r * Cn;
        if (bias) memcpy(yr, bias, sizeof(float) * (size_t)Cn);
        else memset(yr, 0, sizeof(float) * (size_t)Cn);
        for (int64_t k = 0; k < K; k++) {
            const int64_t src = t - (K - 1) + k;
            const float *w = wt + k * Cn;
            if (src >= 0) {
                const float *xr = x + (b * length + src) * x_tok_stride;
                for (int64_t c = 0; c < Cn; c++) yr[c] += w[c] * xr[c];
            } else if (state) {  /* state[b, c, K-1+src] */
                const float *st = state + b * Cn * (K - 1) + (K - 1 + src);
                for (int64_t c = 0; c < Cn; c++) yr[c] += w[c] * st[c * (K - 1)];
            }
        }
        for (int64_t c = 0; c < Cn; c++) yr[c] = yr[c] / (1.0f + expf(-yr[c]));
    }
    return 0;
}

/* ---- gated grouped RMSNorm -------------------------------------------------------------------------------
 * out[r, :] = weight * g / sqrt(mean over each group of g^2 + eps), g = y[r, :] * silu(z[r, :]), for rows
 * [r0, r1); y and out contiguous (rows, dim); z rows z_row_stride apart (a view into the input projection). */
int leanseq_gated_rmsnorm(const float *y, const float *z, int64_t z_row_stride, const float *weight, float *out,
                          int64_t rows, int64_t dim, int64_t group, float eps, int64_t r0, int64_t r1) {
    if (rows < 1 || dim < 1 || group < 1 || dim % group || z_row_stride < dim || r0 < 0 || r1 > rows || r0 > r1)
        return 2;
    for (int64_t r = r0; r < r1; r++) {
        const float *yr = y + r * dim, *zr = z + r * z_row_stride;
        float *o = out + r * dim;
        for (int64_t c = 0; c < dim; c++) o[c] = yr[c] * (zr[c] / (1.0f + expf(-zr[c])));
        for (int64_t g0 = 0; g0 < dim; g0 += group) {
            float ss = 0.0f;
            for (int64_t c = g0; c < g0 + group; c++) ss += o[c] * o[c];
            const float scale = 1.0f / sqrtf(ss / (float)group + eps);
            for (int64_t c = g0; c < g0 + group; c++) o[c] = weight[c] * (o[c] * scale);
        }
    }
    return 0;
}

#ifdef _OPENMP
/* rows split over the OpenMP team, as for the scan */
int leanseq_conv_silu_team(const float *x, int64_t x_tok_stride, const float *state, const float *wt,
                           const float *bias, float *y, int64_t batch, int64_t length, int64_t channels,
                           int64_t kernel, int64_t nthreads) {
    int code = 0;
    const int64_t rows = batch * length;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > rows) nthreads = rows > 0 ? rows : 1;
#pragma omp parallel num_threads((int)nthreads) reduction(| : code)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        code |= leanseq_conv_silu(x, x_tok_stride, state, wt, bias, y, batch, length, channels, kernel,
                                  rows * t / nt, rows * (t + 1) / nt);
    }
    return code;
}

int leanseq_gated_rmsnorm_team(const float *y, const float *z, int64_t z_row_stride, const float *weight, float *out,
                               int64_t rows, int64_t dim, int64_t group, float eps, int64_t nthreads) {
    int code = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > rows) nthreads = rows > 0 ? rows : 1;
#pragma omp parallel num_threads((int)nthreads) reduction(| : code)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        code |= leanseq_gated_rmsnorm(y, z, z_row_stride, weight, out, rows, dim, group, eps,
                                      rows * t / nt, rows * (t + 1) / nt);
    }
    return code;
}
#endif
