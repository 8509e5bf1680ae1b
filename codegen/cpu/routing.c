/* Routing of many tokens for a router with probabilities (routing.py): each token's top-k routed
   groups, its gates and the active-group mask in one pass, and the gates' backward.

   Forward, per token t (probabilities p = probs[t, :], N_r columns, routed column j is group rid[j]):
     chosen   the k columns of largest p, in descending order; ties go to the lower column and NaN
              ranks above every number (torch.sort(descending=True, stable=True), the reference's order)
     S        the sum of the chosen p, added in that order
     gates    gates[t, rid[j]] = k * p[j] / S for a chosen j, 1 for a shared group, 0 elsewhere
     mask     1 for the shared and the chosen groups
   and counts[j] = the number of tokens that chose column j (the balance loss's f_j = counts[j] / T).
   Backward: g_j = k p_j / S gives dL/dp_i = (k / S) (dL/dg_i - sum_j dL/dg_j g_j / k) over the chosen
   i and j, 0 for the others. Serial: ~k N_r compares per token (T 2048, N_r 12: tens of microseconds).
   Shape legend: T tokens, N groups, N_s shared, N_r routed, k top-k. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROUTED 1024   /* routing.py checks it */

static inline int above(float a, float b) { return a > b || (isnan(a) && !isnan(b)); }

/* Returns 0, or 1 when N_r or k is out of range. mask: [T, N] bytes; gates: [T, N]; counts: [N_r]; sums: [T]. */
int mohd_route_gates(int64_t T, int64_t nr, int64_t ns, int64_t k, const float *probs, const int64_t *sid,
                     const int64_t *rid, uint8_t *mask, float *gates, float *counts, float *sums) {
    if (nr < 1 || nr > MAX_ROUTED || k < 1 || k > nr) return 1;
    const int64_t n = nr + ns;
    int64_t count[MAX_ROUTED];
    memset(count, 0, sizeof(count));
    for (int64_t t = 0; t < T; t++) {
        const float *p = probs + t * nr;
        uint8_t *m = mask + t * n;
        float *g = gates + t * n;
        uint8_t taken[MAX_ROUTED];
        int64_t pick[MAX_ROUTED];
        memset(m, 0, (size_t)n);
        memset(taken, 0, (size_t)nr);
        for (int64_t i = 0; i < n; i++) g[i] = 0.0f;
        for (int64_t i = 0; i < ns; i++) {
            m[sid[i]] = 1;
            g[sid[i]] = 1.0f;
        }
        float s = 0.0f;
        for (int64_t r = 0; r < k; r++) {
            int64_t best = -1;
            for (int64_t j = 0; j < nr; j++)
                if (!taken[j] && (best < 0 || above(p[j], p[best]))) best = j;
            taken[best] = 1;
            pick[r] = best;
            s += p[best];
        }
        const float kf = (float)k;
        for (int64_t r = 0; r < k; r++) {
            const int64_t j = pick[r];
            m[rid[j]] = 1;
            g[rid[j]] = kf * p[j] / s;
            count[j]++;
        }
        sums[t] = s;
    }
    for (int64_t j = 0; j < nr; j++) counts[j] = (float)count[j];
    return 0;
}

/* grad_probs[t, j] from grad_gates [T, N] (contiguous), the forward's mask, gates and sums. */
int mohd_route_gates_bw(int64_t T, int64_t nr, int64_t ns, int64_t k, const uint8_t *mask, const float *gates,
                        const float *sums, const float *grad_gates, const int64_t *rid, float *grad_probs) {
    if (nr < 1 || nr > MAX_ROUTED || k < 1 || k > nr) return 1;
    const int64_t n = nr + ns;
    const float kf = (float)k;
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *m = mask + t * n;
        const float *g = gates + t * n, *dg = grad_gates + t * n;
        float *dp = grad_probs + t * nr;
        float acc = 0.0f;
        for (int64_t j = 0; j < nr; j++)
            if (m[rid[j]]) acc += dg[rid[j]] * g[rid[j]];
        const float scale = kf / sums[t], mean = acc / kf;
        for (int64_t j = 0; j < nr; j++) dp[j] = m[rid[j]] ? scale * (dg[rid[j]] - mean) : 0.0f;
    }
    return 0;
}
