/* Native many-token kernels of the grouped CPU path (training and prefill, fp32), forward and backward.

   The grouped path (grouped.py) runs the groups every token uses as torch matmuls over all tokens and
   hands the partial groups, with the tokens that use each, to these kernels. They compute only the
   active (token, group) pairs, read each token's rows in place through its index (no gathered copy,
   no index_add), and keep a tile of outputs in registers while a group's weight block streams through
   the cache. Three shapes cover the six products of a reader and a writer, forward and backward:

     acc   Y[t, :]          += X[t, group] . B[group rows, :]   reader y (B = W^T), writer grad_u (B = W)
     dot   Out[t, group]     = A[t, :] . W[group rows, :]^T     writer z (W row-major), reader grad_x
                                                                 (W = the reader's column-major storage)
     wgrad Out[group rows, :] = sum over the group's tokens of P[t, group]^T Q[t, :]
                                                                 reader grad_W^T (P = alpha x, Q = grad_y),
                                                                 writer grad_W (P = grad_z, Q = u)

   The groups to run come as CSR lists: gid[s] is the s-th group, its tokens (ascending) are
   tok[off[s] .. off[s + 1]). Every row pointer is base + index * leading dimension; rows are
   contiguous (unit stride). Threads split the output so that no two write the same element (acc:
   column chunks; dot: groups; wgrad: (group, column chunk) pairs): results do not depend on the thread
   count. Products accumulate in fp32 with FMA where the CPU has it (results equal torch's up to the
   order of the fp32 sums).

   Tiles: MRA tokens (acc), MR tokens by MR weight rows (dot) or MR weight rows (wgrad), by two vectors of
   columns (acc, wgrad); a tile short of its rows repeats its first row and stores only its own rows. Shape legend: T tokens, G group size. */

#include <stdint.h>
#ifdef __FMA__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VSET1(x) _mm512_set1_ps(x)
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VSET1(x) _mm256_set1_ps(x)
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float vsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VSUM(v) vsum8(v)
#else
#define VW 1
typedef float vf;
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VSET1(x) (x)
#define VZERO() 0.0f
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VSUM(v) (v)
#endif

#define MR 4                 /* tokens (dot) or weight rows (wgrad, dot) per tile */
#if VW == 16
#define MRA 8                /* tokens per acc tile: 16 accumulators of the 32 AVX-512 registers (8 rows
                                per wgrad tile measured slower than 4: 6.5 vs 6.0 ms) */
#else
#define MRA 4
#endif
#define NV 2                 /* vectors of columns per tile */
#define NC (NV * VW)         /* columns per tile */
#define CHUNK 128            /* columns a thread owns at a time (acc, wgrad): a group's block stays in L1 */
#define BLOCK 64             /* tokens whose output rows stay in cache while every group passes (acc, wgrad) */
#define MAX_SEL 4096         /* groups per call (a cursor each on the stack) */

/* Keeps a loaded vector in a register: without it the compiler folds the load into every FMA that uses
   it, one load per token of the tile instead of one. */
#if defined(__GNUC__) && VW > 1
#define KEEP(v) __asm__("" : "+v"(v))
#else
#define KEEP(v) (void)0
#endif

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static int nthreads_for(int threads, double flops) {
    /* a parallel region costs microseconds: small calls run on one thread */
    return flops < 2e5 ? 1 : (threads < 1 ? 1 : threads);
}

/* ---- acc: Y[t, c0:c1] += X[t, g*G:(g+1)*G] . B[g*G:(g+1)*G, c0:c1] for the tokens of g ------------- */

static void acc_tile(const int64_t *t, int n, const float *X, int64_t ldx, const float *Bg, int64_t ldb,
                     float *Y, int64_t ldy, int64_t c0, int64_t c1, int64_t G) {
    const float *x[MRA];
    float *y[MRA];
    for (int r = 0; r < MRA; r++) {
        int64_t tr = t[r < n ? r : 0];
        x[r] = X + tr * ldx;
        y[r] = Y + tr * ldy;
    }
    int64_t c = c0;
    for (; c + NC <= c1; c += NC) {
        vf acc[MRA][NV];
        for (int r = 0; r < MRA; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = VLOAD(y[r] + c + v * VW);
        for (int64_t i = 0; i < G; i++) {
            const float *b = Bg + i * ldb + c;
            vf b0 = VLOAD(b), b1 = VLOAD(b + VW);
            KEEP(b0);
            KEEP(b1);
            for (int r = 0; r < MRA; r++) {
                vf xr = VSET1(x[r][i]);
                acc[r][0] = VFMA(xr, b0, acc[r][0]);
                acc[r][1] = VFMA(xr, b1, acc[r][1]);
            }
        }
        for (int r = 0; r < n; r++)
            for (int v = 0; v < NV; v++) VSTORE(y[r] + c + v * VW, acc[r][v]);
    }
    for (; c < c1; c++)
        for (int r = 0; r < n; r++) {
            float s = y[r][c];
            for (int64_t i = 0; i < G; i++) s += x[r][i] * Bg[i * ldb + c];
            y[r][c] = s;
        }
}

/* The tokens of group s inside [lo, hi): tok[*cur .. end), advancing the cursor (lists ascend). */
static inline int64_t take_block(const int64_t *tok, int64_t *cur, int64_t stop, int64_t hi) {
    int64_t j = *cur;
    while (j < stop && tok[j] < hi) j++;
    int64_t start = *cur;
    *cur = j;
    return start;
}

int mohd_gs_acc(int64_t nsel, const int64_t *gid, const int64_t *off, const int64_t *tok,
                const float *X, int64_t ldx, const float *B, int64_t ldb, float *Y, int64_t ldy,
                int64_t ncols, int64_t G, int threads) {
    if (nsel > MAX_SEL) return 2;
    int64_t chunks = (ncols + CHUNK - 1) / CHUNK, ntok = 0;
    for (int64_t j = 0; j < off[nsel]; j++) ntok = tok[j] + 1 > ntok ? tok[j] + 1 : ntok;
    int nt = nthreads_for(threads, 2.0 * (double)off[nsel] * (double)G * (double)ncols);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t c0 = ch * CHUNK, c1 = min64(ncols, c0 + CHUNK);
        int64_t cur[MAX_SEL];
        for (int64_t s = 0; s < nsel; s++) cur[s] = off[s];
        for (int64_t lo = 0; lo < ntok; lo += BLOCK)
            for (int64_t s = 0; s < nsel; s++) {
                int64_t start = take_block(tok, &cur[s], off[s + 1], lo + BLOCK);
                const float *Bg = B + gid[s] * G * ldb;
                const float *Xg = X + gid[s] * G;
                for (int64_t j = start; j < cur[s]; j += MRA)
                    acc_tile(tok + j, (int)min64(MRA, cur[s] - j), Xg, ldx, Bg, ldb, Y, ldy, c0, c1, G);
            }
    }
    return 0;
}

/* ---- dot: Out[t, g*G + i] = A[t, :K] . W[g*G + i, :K] (+ bias[g*G + i]) for the tokens of g ------- */

static void dot_tile(const int64_t *t, int n, const float *A, int64_t lda, const float *Wg, int64_t ldw,
                     int nrows, const float *bg, float *Outg, int64_t ldo, int64_t K) {
    const float *a[MR], *w[MR];
    for (int r = 0; r < MR; r++) {
        a[r] = A + t[r < n ? r : 0] * lda;
        w[r] = Wg + (r < nrows ? r : 0) * ldw;
    }
    vf acc[MR][MR];
    for (int r = 0; r < MR; r++)
        for (int q = 0; q < MR; q++) acc[r][q] = VZERO();
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf wv[MR];
        for (int q = 0; q < MR; q++) wv[q] = VLOAD(w[q] + k);
        for (int r = 0; r < MR; r++) {
            vf av = VLOAD(a[r] + k);
            for (int q = 0; q < MR; q++) acc[r][q] = VFMA(av, wv[q], acc[r][q]);
        }
    }
    for (int r = 0; r < n; r++)
        for (int q = 0; q < nrows; q++) {
            float s = VSUM(acc[r][q]);
            for (int64_t kk = k; kk < K; kk++) s += a[r][kk] * w[q][kk];
            Outg[t[r] * ldo + q] = bg ? s + bg[q] : s;
        }
}

int mohd_gs_dot(int64_t nsel, const int64_t *gid, const int64_t *off, const int64_t *tok,
                const float *A, int64_t lda, const float *W, int64_t ldw, const float *bias,
                float *Out, int64_t ldo, int64_t K, int64_t G, int threads) {
    int nt = nthreads_for(threads, 2.0 * (double)off[nsel] * (double)G * (double)K);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t s = 0; s < nsel; s++) {
        int64_t g = gid[s];
        for (int64_t i = 0; i < G; i += MR) {
            int nrows = (int)min64(MR, G - i);
            const float *Wg = W + (g * G + i) * ldw;
            const float *bg = bias ? bias + g * G + i : 0;
            for (int64_t j = off[s]; j < off[s + 1]; j += MR)
                dot_tile(tok + j, (int)min64(MR, off[s + 1] - j), A, lda, Wg, ldw, nrows, bg,
                         Out + g * G + i, ldo, K);
        }
    }
    return 0;
}

/* ---- wgrad: Out[g*G + i, c] = sum over the tokens t of g of P[t, g*G + i] * Q[t, c] (overwrites) --- */

static void wgrad_tile(const int64_t *t, int64_t n, const float *Pg, int64_t ldp, const float *Q, int64_t ldq,
                       int nrows, float *Outg, int64_t ldo, int64_t c0, int64_t c1) {
    int64_t c = c0;
    for (; c + NC <= c1; c += NC) {
        vf acc[MR][NV];
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = VLOAD(Outg + (r < nrows ? r : 0) * ldo + c + v * VW);
        for (int64_t j = 0; j < n; j++) {
            const float *q = Q + t[j] * ldq + c;
            const float *p = Pg + t[j] * ldp;
            vf q0 = VLOAD(q), q1 = VLOAD(q + VW);
            KEEP(q0);
            KEEP(q1);
            for (int r = 0; r < MR; r++) {
                vf pr = VSET1(p[r < nrows ? r : 0]);
                acc[r][0] = VFMA(pr, q0, acc[r][0]);
                acc[r][1] = VFMA(pr, q1, acc[r][1]);
            }
        }
        for (int r = 0; r < nrows; r++)
            for (int v = 0; v < NV; v++) VSTORE(Outg + r * ldo + c + v * VW, acc[r][v]);
    }
    for (; c < c1; c++)
        for (int r = 0; r < nrows; r++) {
            float s = Outg[r * ldo + c];
            for (int64_t j = 0; j < n; j++) s += Pg[t[j] * ldp + r] * Q[t[j] * ldq + c];
            Outg[r * ldo + c] = s;
        }
}

int mohd_gs_wgrad(int64_t nsel, const int64_t *gid, const int64_t *off, const int64_t *tok,
                  const float *P, int64_t ldp, const float *Q, int64_t ldq, float *Out, int64_t ldo,
                  int64_t ncols, int64_t G, int threads) {
    int64_t chunks = (ncols + CHUNK - 1) / CHUNK;
    int nt = nthreads_for(threads, 2.0 * (double)off[nsel] * (double)G * (double)ncols);
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t s = 0; s < nsel; s++)
        for (int64_t ch = 0; ch < chunks; ch++) {
            int64_t g = gid[s], c0 = ch * CHUNK, c1 = min64(ncols, c0 + CHUNK);
            for (int64_t i = 0; i < G; i++)
                for (int64_t c = c0; c < c1; c++) Out[(g * G + i) * ldo + c] = 0.0f;
            /* token blocks: a block's Q rows stay in cache while every row tile of the group passes */
            for (int64_t j = off[s]; j < off[s + 1]; j += 4 * BLOCK) {
                int64_t n = min64(4 * BLOCK, off[s + 1] - j);
                for (int64_t i = 0; i < G; i += MR)
                    wgrad_tile(tok + j, n, P + g * G + i, ldp, Q, ldq, (int)min64(MR, G - i),
                               Out + (g * G + i) * ldo, ldo, c0, c1);
            }
        }
    return 0;
}

/* ---- plan: the groups' token counts and the partial groups' CSR lists from a [T, N] bool mask --------
   counts[g] = tokens using g; the groups with 0 < counts < T go to gid / off / tok (tokens ascending).
   Returns the number of partial groups. tok needs room for every active pair of the partial groups.
   Counted in locals (a uint8_t pointer may alias anything: counting through counts[] stalls). */

int64_t mohd_gs_plan(int64_t T, int64_t N, const uint8_t *restrict mask, int64_t ldm, int64_t *restrict counts,
                     int64_t *restrict gid, int64_t *restrict off, int64_t *restrict tok) {
    int64_t nsel = 0, n = N > 0 ? N : 1, count[n], slot[n];
    for (int64_t g = 0; g < N; g++) count[g] = 0;
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *m = mask + t * ldm;
        for (int64_t g = 0; g < N; g++) count[g] += m[g] != 0;
    }
    off[0] = 0;
    uint64_t partial = 0;                        /* N <= 64: the partial groups as bits */
    for (int64_t g = 0; g < N; g++) {
        counts[g] = count[g];
        slot[g] = -1;
        if (count[g] > 0 && count[g] < T) {
            slot[g] = off[nsel];
            gid[nsel] = g;
            off[nsel + 1] = off[nsel] + count[g];
            nsel++;
            if (g < 64) partial |= (uint64_t)1 << g;
        }
    }
    if (N <= 64) {                               /* visit each token's partial active groups only */
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *m = mask + t * ldm;
            uint64_t bits = 0;
            for (int64_t g = 0; g < N; g++) bits |= (uint64_t)(m[g] != 0) << g;
            for (bits &= partial; bits; bits &= bits - 1) {
                int g = __builtin_ctzll(bits);
                tok[slot[g]++] = t;
            }
        }
    } else {
        for (int64_t t = 0; t < T; t++)
            for (int64_t g = 0; g < N; g++)
                if (slot[g] >= 0 && mask[t * ldm + g]) tok[slot[g]++] = t;
    }
    return nsel;
}
