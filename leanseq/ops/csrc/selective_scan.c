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
