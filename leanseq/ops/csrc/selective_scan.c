/* Mamba-1 selective scan, forward, float32, for CPUs: one pass over time per channel block.
 *
 * For each batch row b and channel d in [d0, d1) (callers split channels across threads):
 *     h[d, n] = exp(delta[t, d] * A[d, n]) * h[d, n] + delta[t, d] * u[t, d] * B[t, n]
 *     y[t, d] = sum_n h[d, n] * C[t, n]  (+ D[d] * u[t, d])  (* silu(z[t, d]))
 * The state h (batch, D, N) is updated in place. Time is the outer loop and channels the inner one, so each
 * step reads contiguous rows of u, delta, z and y while the whole (D, N) state stays in cache.
 * When `starts` is not NULL, the state before every `chunk`-th step is copied to starts[b, t / chunk] so that a
 * backward pass can recompute any chunk from its start.
 *
 * Both entry points check their arguments before touching memory (defence in depth behind the Python
 * wrapper): the caller passes the element count of every buffer, and a count that differs from what the
 * sizes imply, or sizes that cannot be right, make the function return an error code without writing.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum {
    LEANSEQ_OK = 0,
    LEANSEQ_NO_MEMORY = 1,
    LEANSEQ_BAD_SIZES = 2,    /* negative sizes, channels [d0, d1) outside [0, dim), bad chunk, overflow */
    LEANSEQ_BAD_BUFFER = 16,  /* + the index of the first buffer whose element count does not match */
};

/* a * b * c * d, or -1 when a factor is negative or the product does not fit */
static int64_t product4(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t r;
    if (a < 0 || b < 0 || c < 0 || d < 0) return -1;
    if (__builtin_mul_overflow(a, b, &r) || __builtin_mul_overflow(r, c, &r) || __builtin_mul_overflow(r, d, &r))
        return -1;
    return r;
}

/* Every buffer's given element count against the one the sizes need. A NULL buffer is allowed when it is
 * optional (then its count must be 0) or when it would hold no elements. */
static int check_buffers(int n, const void *const *ptrs, const int *optional, const int64_t *expected,
                         const int64_t *numel, int64_t nnumel) {
    if (nnumel != n) return LEANSEQ_BAD_SIZES;
    for (int i = 0; i < n; i++) {
        if (expected[i] < 0) return LEANSEQ_BAD_SIZES;
        const int64_t need = (ptrs[i] == NULL && optional[i]) ? 0 : expected[i];
        if (numel[i] != need || (ptrs[i] == NULL && need != 0)) return LEANSEQ_BAD_BUFFER + i;
    }
    return LEANSEQ_OK;
}

static int check_sizes(int64_t batch, int64_t length, int64_t dim, int64_t nstate, int64_t d0, int64_t d1) {
    if (batch < 0 || length < 0 || dim < 0 || nstate < 0) return LEANSEQ_BAD_SIZES;
    if (d0 < 0 || d0 > d1 || d1 > dim) return LEANSEQ_BAD_SIZES;
    return LEANSEQ_OK;
}

/* numel: the element counts of u, delta, A, B, C, D, z, h, y, starts (0 for an absent D, z or starts). */
int leanseq_selective_scan_fwd(const float *u, const float *delta, const float *A, const float *B,
                               const float *C, const float *D, const float *z, float *h, float *y,
                               float *starts, const int64_t *numel, int64_t nnumel, int64_t batch,
                               int64_t length, int64_t dim, int64_t nstate, int64_t chunk, int64_t d0,
                               int64_t d1) {
    int status = check_sizes(batch, length, dim, nstate, d0, d1);
    if (status != LEANSEQ_OK) return status;
    if (chunk < 0 || (starts != NULL && chunk < 1)) return LEANSEQ_BAD_SIZES;
    const int64_t nchunks = (chunk > 0) ? length / chunk + (length % chunk != 0) : 0;
    const int64_t seq = product4(batch, length, dim, 1), tokens = product4(batch, length, nstate, 1);
    const int64_t state = product4(batch, dim, nstate, 1), saved = product4(batch, nchunks, dim, nstate);
    const int64_t expected[10] = {seq, seq, product4(dim, nstate, 1, 1), tokens, tokens, dim, seq, state, seq,
                                  saved};
    const void *const ptrs[10] = {u, delta, A, B, C, D, z, h, y, starts};
    static const int optional[10] = {0, 0, 0, 0, 0, 1, 1, 0, 0, 1};
    status = check_buffers(10, ptrs, optional, expected, numel, nnumel);
    if (status != LEANSEQ_OK) return status;
    for (int64_t b = 0; b < batch; b++) {
        float *hb = h + b * dim * nstate;
        for (int64_t t = 0; t < length; t++) {
            if (starts != NULL && t % chunk == 0) {
                float *dst = starts + ((b * nchunks + t / chunk) * dim + d0) * nstate;
                memcpy(dst, hb + d0 * nstate, (size_t)((d1 - d0) * nstate) * sizeof(float));
            }
            const int64_t row = (b * length + t);
            const float *ut = u + row * dim, *dtt = delta + row * dim;
            const float *Bt = B + row * nstate, *Ct = C + row * nstate;
            const float *zt = z ? z + row * dim : NULL;
            float *yt = y + row * dim;
            for (int64_t d = d0; d < d1; d++) {
                const float dl = dtt[d], x = dl * ut[d];
                const float *Ad = A + d * nstate;
                float *hd = hb + d * nstate;
                float acc = 0.0f;
#pragma GCC ivdep
                for (int64_t n = 0; n < nstate; n++) {
                    const float hn = expf(dl * Ad[n]) * hd[n] + x * Bt[n];
                    hd[n] = hn;
                    acc += hn * Ct[n];
                }
                if (D) acc += D[d] * ut[d];
                if (zt) {
                    const float zv = zt[d];
                    acc *= zv / (1.0f + expf(-zv));
                }
                yt[d] = acc;
            }
        }
    }
    return LEANSEQ_OK;
}

#include <stdlib.h>

/* Backward of the scan without skip and gate (y[t, d] = sum_n h[d, n] C[t, n]), for channels [d0, d1).
 *
 * Walks the chunks from last to first. Each chunk's states are recomputed from starts[b, c] (saved by the
 * forward), then the adjoint g = dL/dh runs backwards in time: g += C_t dy_t at step t, and g *= a_t to step
 * back, so g ends as dL/dh0. Gradients: du, ddelta (batch, L, D) and dA (D, N) are written only for this
 * thread's channels; dB and dC (batch, L, N) are summed over channels, so each thread writes its own partial
 * buffers dB_part / dC_part (zeroed by the caller) that the caller adds up.
 * numel: the element counts of the 14 buffers in argument order (0 for an absent grad_h).
 */
int leanseq_selective_scan_bwd(const float *u, const float *delta, const float *A, const float *B,
                               const float *C, const float *starts, const float *grad_y, const float *grad_h,
                               float *du, float *ddelta, float *dA, float *dB_part, float *dC_part, float *dh0,
                               const int64_t *numel, int64_t nnumel, int64_t batch, int64_t length, int64_t dim,
                               int64_t nstate, int64_t chunk, int64_t d0, int64_t d1) {
    int status = check_sizes(batch, length, dim, nstate, d0, d1);
    if (status != LEANSEQ_OK) return status;
    if (chunk < 1) return LEANSEQ_BAD_SIZES;
    const int64_t nd = d1 - d0, nchunks = length / chunk + (length % chunk != 0);
    const int64_t seq = product4(batch, length, dim, 1), tokens = product4(batch, length, nstate, 1);
    const int64_t state = product4(batch, dim, nstate, 1), params = product4(dim, nstate, 1, 1);
    const int64_t expected[14] = {seq, seq, params, tokens, tokens, product4(batch, nchunks, dim, nstate), seq,
                                  state, seq, seq, params, tokens, tokens, state};
    const void *const ptrs[14] = {u, delta, A, B, C, starts, grad_y, grad_h, du, ddelta, dA, dB_part, dC_part,
                                  dh0};
    static const int optional[14] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    status = check_buffers(14, ptrs, optional, expected, numel, nnumel);
    if (status != LEANSEQ_OK) return status;
    /* the recomputed states of one chunk: never more steps than the sequence has */
    const int64_t steps = chunk < length ? chunk : length;
    const int64_t work = product4(steps > 0 ? steps : 1, nd, nstate, (int64_t)sizeof(float));
    if (work < 0 || (uint64_t)work >= SIZE_MAX) return LEANSEQ_NO_MEMORY;
    /* + 1: never ask for 0 bytes, for which malloc may return NULL */
    float *H = malloc((size_t)work + 1);
    float *g = malloc(sizeof(float) * (size_t)(nd * nstate) + 1);
    if (!H || !g) { free(H); free(g); return LEANSEQ_NO_MEMORY; }
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t i = 0; i < nd * nstate; i++)
            g[i] = grad_h ? grad_h[(b * dim + d0) * nstate + i] : 0.0f;
        for (int64_t c = nchunks - 1; c >= 0; c--) {
            const int64_t t0 = c * chunk, t1 = (t0 + chunk < length) ? t0 + chunk : length;
            const float *h0 = starts + ((b * nchunks + c) * dim + d0) * nstate;
            for (int64_t t = t0; t < t1; t++) {  /* recompute this chunk's states */
                const int64_t row = b * length + t;
                const float *prev = (t == t0) ? h0 : H + (t - t0 - 1) * nd * nstate;
                float *cur = H + (t - t0) * nd * nstate;
                for (int64_t d = d0; d < d1; d++) {
                    const float dl = delta[row * dim + d], x = dl * u[row * dim + d];
                    const float *Ad = A + d * nstate, *Bt = B + row * nstate;
                    const int64_t o = (d - d0) * nstate;
                    for (int64_t n = 0; n < nstate; n++)
                        cur[o + n] = expf(dl * Ad[n]) * prev[o + n] + x * Bt[n];
                }
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {  /* adjoint, backwards in time */
                const int64_t row = b * length + t;
                const float *cur = H + (t - t0) * nd * nstate;
                const float *prev = (t == t0) ? h0 : H + (t - t0 - 1) * nd * nstate;
                const float *Bt = B + row * nstate, *Ct = C + row * nstate;
                float *dBt = dB_part + row * nstate, *dCt = dC_part + row * nstate;
                for (int64_t d = d0; d < d1; d++) {
                    const float dl = delta[row * dim + d], uu = u[row * dim + d], gy = grad_y[row * dim + d];
                    const float *Ad = A + d * nstate;
                    float *dAd = dA + d * nstate, *gd = g + (d - d0) * nstate;
                    const int64_t o = (d - d0) * nstate;
                    float ddl = 0.0f, dx = 0.0f;
                    for (int64_t n = 0; n < nstate; n++) {
                        const float a = expf(dl * Ad[n]);
                        const float gn = gd[n] + Ct[n] * gy;   /* dL/dh_t */
                        dCt[n] += cur[o + n] * gy;
                        const float ga = gn * prev[o + n] * a;  /* dL/d(dl * A) */
                        dAd[n] += ga * dl;
                        ddl += ga * Ad[n];
                        dx += gn * Bt[n];                      /* dL/d(dl * u) */
                        dBt[n] += gn * dl * uu;
                        gd[n] = gn * a;                        /* dL/dh_{t-1} */
                    }
                    ddelta[row * dim + d] = ddl + dx * uu;
                    du[row * dim + d] = dx * dl;
                }
            }
        }
        for (int64_t i = 0; i < nd * nstate; i++) dh0[(b * dim + d0) * nstate + i] = g[i];
    }
    free(H);
    free(g);
    return LEANSEQ_OK;
}
