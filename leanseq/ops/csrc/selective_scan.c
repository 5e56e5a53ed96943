/* Mamba-1 selective scan, forward, float32, for CPUs: one pass over time per channel block.
 *
 * For each batch row b and channel d in [d0, d1) (callers split channels across threads):
 *     h[d, n] = exp(delta[t, d] * A[d, n]) * h[d, n] + delta[t, d] * u[t, d] * B[t, n]
 *     y[t, d] = sum_n h[d, n] * C[t, n]  (+ D[d] * u[t, d])  (* silu(z[t, d]))
 * The state h (batch, D, N) is updated in place. Time is the outer loop and channels the inner one, so each
 * step reads contiguous rows of u, delta, z and y while the whole (D, N) state stays in cache.
 * When `starts` is not NULL, the state before every `chunk`-th step is copied to starts[b, t / chunk] so that a
 * backward pass can recompute any chunk from its start.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

void leanseq_selective_scan_fwd(const float *u, const float *delta, const float *A, const float *B,
                                const float *C, const float *D, const float *z, float *h, float *y,
                                float *starts, int64_t batch, int64_t length, int64_t dim, int64_t nstate,
                                int64_t chunk, int64_t d0, int64_t d1) {
    int64_t nchunks = (chunk > 0) ? (length + chunk - 1) / chunk : 0;
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
}

#include <stdlib.h>

/* Backward of the scan without skip and gate (y[t, d] = sum_n h[d, n] C[t, n]), for channels [d0, d1).
 *
 * Walks the chunks from last to first. Each chunk's states are recomputed from starts[b, c] (saved by the
 * forward), then the adjoint g = dL/dh runs backwards in time: g += C_t dy_t at step t, and g *= a_t to step
 * back, so g ends as dL/dh0. Gradients: du, ddelta (batch, L, D) and dA (D, N) are written only for this
 * thread's channels; dB and dC (batch, L, N) are summed over channels, so each thread writes its own partial
 * buffers dB_part / dC_part (zeroed by the caller) that the caller adds up.
 */
int leanseq_selective_scan_bwd(const float *u, const float *delta, const float *A, const float *B,
                               const float *C, const float *starts, const float *grad_y, const float *grad_h,
                               float *du, float *ddelta, float *dA, float *dB_part, float *dC_part, float *dh0,
                               int64_t batch, int64_t length, int64_t dim, int64_t nstate, int64_t chunk,
                               int64_t d0, int64_t d1) {
    const int64_t nd = d1 - d0, nchunks = (length + chunk - 1) / chunk;
    float *H = malloc(sizeof(float) * (size_t)(chunk * nd * nstate));
    float *g = malloc(sizeof(float) * (size_t)(nd * nstate));
    if (!H || !g) { free(H); free(g); return 1; }
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
    return 0;
}
