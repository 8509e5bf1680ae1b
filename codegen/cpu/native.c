/* Native decode kernels of the MoHD reader and writer on CPU (few tokens, T <= 16).

   Built at first use by native.py (cc -O3 -march=native -fopenmp, cached on disk) and called through
   ctypes: one call does a whole op (all weights of a read_multi, or a write with its gates, bias and
   residual), so the per-run torch calls, the zeroed buffers and the host-side plan of the torch path
   disappear. Weights are read only for the groups some token uses; a token's inactive groups are
   skipped (never multiplied), so their values never reach its output.

   Arithmetic: products accumulate in fp32 (bf16 weights and inputs are widened exactly); the epilogue
   is then, in fp32, reader y = acc * alpha + b, writer o = (acc + b) * gate, rounded once to the
   output dtype, and (writer) o + residual rounded again, which is exactly what a separate torch add
   of the rounded write would compute. The file is compiled with -ffp-contract=off so that epilogue
   is not fused into FMAs; the dot products use FMA explicitly where the CPU has it.

   Layouts: reader weight [O, D] column-major (strides (1, ld)), so a group's weights are rows of
   W^T; writer weight [D, I] row-major (strides (ld, 1)). Shape legend: T tokens, D = N * G,
   O reader outputs, I writer inputs, N groups, G group size. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __FMA__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { F32 = 0, BF16 = 1 };

/* Below this many weight bytes a call runs on one thread: a parallel region costs a few microseconds,
   and far more when another process holds a core (its barrier waits for the descheduled thread). */
#define MIN_PARALLEL_BYTES (256.0 * 1024)
#define MAX_WEIGHTS 16
#define PARTS 4           /* partial sums per reader call: work for up to 4 threads per weight */

typedef float v8f __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {          /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float ld1(const void *p, int dt, int64_t i) {
    return dt == F32 ? ((const float *)p)[i] : bf2f(((const uint16_t *)p)[i]);
}

static inline float round_to(int dt, float v) { return dt == F32 ? v : bf2f(f2bf(v)); }

static inline void st1(void *p, int dt, int64_t i, float v) {
    if (dt == F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f2bf(v);
}

static inline float fma1(float a, float b, float c) {
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

static inline v8f ld8(const void *p, int dt, int64_t i) {
    v8f f;
    if (dt == F32) {
        memcpy(&f, (const float *)p + i, 32);
    } else {
        v8h h;
        memcpy(&h, (const uint16_t *)p + i, 16);
        v8u u = __builtin_convertvector(h, v8u) << 16;
        memcpy(&f, &u, 32);
    }
    return f;
}

static inline v8f fma8(v8f a, v8f b, v8f c) {
#ifdef __FMA__
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* ---------------------------------------------------------------- reader */

/* acc[t, 0:n] += sum over the rows k of group g of x[t, k] * W^T[k, c0:c0+n], for one token. */
static void axpy_group(float *acc, int64_t n, const float *xg, const void *w, int dt, int64_t ld, int64_t k0,
                       int G) {
    int k = 0;
    if (dt == F32) {
        const float *w0 = (const float *)w;
        for (; k + 4 <= G; k += 4) {
            const float *p0 = w0 + (k0 + k) * ld, *p1 = p0 + ld, *p2 = p1 + ld, *p3 = p2 + ld;
            float x0 = xg[k], x1 = xg[k + 1], x2 = xg[k + 2], x3 = xg[k + 3];
            for (int64_t c = 0; c < n; c++)
                acc[c] += fma1(x3, p3[c], fma1(x2, p2[c], fma1(x1, p1[c], x0 * p0[c])));
        }
        for (; k < G; k++) {
            const float *p0 = w0 + (k0 + k) * ld;
            float x0 = xg[k];
            for (int64_t c = 0; c < n; c++) acc[c] = fma1(x0, p0[c], acc[c]);
        }
    } else {
        const uint16_t *w0 = (const uint16_t *)w;
        for (; k + 4 <= G; k += 4) {
            const uint16_t *p0 = w0 + (k0 + k) * ld, *p1 = p0 + ld, *p2 = p1 + ld, *p3 = p2 + ld;
            float x0 = xg[k], x1 = xg[k + 1], x2 = xg[k + 2], x3 = xg[k + 3];
            for (int64_t c = 0; c < n; c++)
                acc[c] += fma1(x3, bf2f(p3[c]), fma1(x2, bf2f(p2[c]),
                          fma1(x1, bf2f(p1[c]), x0 * bf2f(p0[c]))));
        }
        for (; k < G; k++) {
            const uint16_t *p0 = w0 + (k0 + k) * ld;
            float x0 = xg[k];
            for (int64_t c = 0; c < n; c++) acc[c] = fma1(x0, bf2f(p0[c]), acc[c]);
        }
    }
}

/* out[idx : idx + n] (n <= 8) = (sum over the parts of acc) * alpha + bias[c0 : c0 + n], rounded once to dt;
   acc [parts] spaced part_ld apart. Vector and scalar tails compute the same (fp32, this order). */
static void finish8(void *out, int dt, int64_t idx, int64_t n, const float *acc, int64_t part_ld, int nparts,
                    float alpha, int has_alpha, const void *bias, int64_t c0) {
    if (n == 8) {
        v8f v;
        memcpy(&v, acc, 32);
        for (int h = 1; h < nparts; h++) {
            v8f a;
            memcpy(&a, acc + h * part_ld, 32);
            v = v + a;
        }
        if (has_alpha) v = v * alpha;
        if (bias) v = v + ld8(bias, dt, c0);
        if (dt == F32) { memcpy((float *)out + idx, &v, 32); return; }
        v8u u;
        memcpy(&u, &v, 32);
        const v8u nan = (u & 0x7fffffffu) > 0x7f800000u;                       /* all ones where NaN */
        v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                         /* round to nearest even */
        r = (r & ~nan) | (0x7fc0u & nan);
        v8h h = __builtin_convertvector(r, v8h);
        memcpy((uint16_t *)out + idx, &h, 16);
        return;
    }
    for (int64_t c = 0; c < n; c++) {
        float v = acc[c];
        for (int h = 1; h < nparts; h++) v = v + acc[h * part_ld + c];
        if (has_alpha) v = v * alpha;
        if (bias) v = v + ld1(bias, dt, c0 + c);
        st1(out, dt, idx + c, v);
    }
}

/* One call of mohdify::read / read_multi: outs[i] [T, O_i] = (sum over each token's active groups of
   x W_i^T) * alpha + b_i, for every weight i. The used groups are cut into PARTS consecutive parts;
   a work item is (weight, part): in the column-major layout a run of whole contiguous [G, O_i]
   blocks. Items are split over the threads by bytes; each part sums into its own fp32 accumulators,
   which the epilogue adds up in part order. The arithmetic depends on neither the thread count nor
   the other weights of the call (read_multi equals separate reads bit for bit). Returns 0, -1 when memory runs out, -2 for more
   than MAX_WEIGHTS weights. */
int mohd_read(int T, int D, int N, const uint8_t *mask, const void *x, int dt, int nw, const int64_t *meta,
              const void *alpha, int adt, int nthreads) {
    /* meta: per weight i, 5 values: weight address, ld (stride of its dim 1), O_i, bias address or 0,
       output address (one array, so the caller builds one ctypes object per call) */
    const void *ws[MAX_WEIGHTS], *bs[MAX_WEIGHTS];
    void *outs[MAX_WEIGHTS];
    int64_t lds[MAX_WEIGHTS], outs_n[MAX_WEIGHTS], off[MAX_WEIGHTS + 1], chunks[MAX_WEIGHTS + 1];
    if (nw > MAX_WEIGHTS) return -2;
    off[0] = 0;
    chunks[0] = 0;
    for (int i = 0; i < nw; i++) {
        ws[i] = (const void *)(intptr_t)meta[5 * i]; lds[i] = meta[5 * i + 1]; outs_n[i] = meta[5 * i + 2];
        bs[i] = (const void *)(intptr_t)meta[5 * i + 3]; outs[i] = (void *)(intptr_t)meta[5 * i + 4];
        off[i + 1] = off[i] + outs_n[i];
        chunks[i + 1] = chunks[i] + (outs_n[i] + 7) / 8;
    }
    const int G = D / N;
    const int64_t total = off[nw];                                              /* columns of all weights */
    float *xf = (float *)malloc(sizeof(float) * (size_t)T * D);                 /* [T, D] fp32 */
    int *groups = (int *)malloc(sizeof(int) * (size_t)N);                       /* used groups */
    if (!xf || !groups) { free(xf); free(groups); return -1; }
    for (int64_t j = 0; j < (int64_t)T * D; j++) xf[j] = ld1(x, dt, j);
    int nused = 0;
    for (int g = 0; g < N; g++) {
        int any = 0;
        for (int t = 0; t < T; t++) any |= mask[(int64_t)t * N + g];
        if (any) groups[nused++] = g;
    }
    const double bytes = (double)total * nused * G * (dt == F32 ? 4 : 2);
    if (bytes < MIN_PARALLEL_BYTES || nused * nw < 2) nthreads = 1;
    const int nparts = nused < PARTS ? (nused > 0 ? nused : 1) : PARTS;
    const int per_part = (nused + nparts - 1) / nparts;                          /* used groups per part */
    float *accs = (float *)malloc(sizeof(float) * (size_t)nparts * T * total);   /* [parts, T, total] */
    if (!accs) { free(xf); free(groups); return -1; }
    const int64_t nitems = (int64_t)nw * nparts;                               /* item j: weight j / nparts */
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num(); nth = omp_get_num_threads();
#endif
        /* items whose first byte lies in this thread's share of all bytes */
        double lo = bytes * tid / nth, hi = bytes * (tid + 1) / nth, at = 0;
        for (int64_t j = 0; j < nitems; j++) {
            const int i = (int)(j / nparts), p = (int)(j % nparts);
            const int g0 = p * per_part, g1 = g0 + per_part < nused ? g0 + per_part : nused;
            const int mine = at >= lo && (at < hi || tid == nth - 1);   /* empty trailing items: the last thread */
            at += (double)outs_n[i] * G * (g1 - g0) * (dt == F32 ? 4 : 2);
            if (!mine) continue;
            float *acc = accs + (int64_t)p * T * total;
            for (int t = 0; t < T; t++)                  /* this item's accumulators, zeroed by the thread using them */
                memset(acc + (int64_t)t * total + off[i], 0, sizeof(float) * (size_t)outs_n[i]);
            for (int q = g0; q < g1; q++) {
                const int g = groups[q];
                for (int t = 0; t < T; t++)
                    if (mask[(int64_t)t * N + g])
                        axpy_group(acc + (int64_t)t * total + off[i], outs_n[i],
                                   xf + (int64_t)t * D + (int64_t)g * G, ws[i], dt, lds[i], (int64_t)g * G, G);
            }
        }
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < chunks[nw]; j++) {                                /* 8 columns of one weight */
            int i = 0;
            while (j >= chunks[i + 1]) i++;
            const int64_t c0 = (j - chunks[i]) * 8, n = outs_n[i] - c0 < 8 ? outs_n[i] - c0 : 8;
            for (int t = 0; t < T; t++)
                finish8(outs[i], dt, (int64_t)t * outs_n[i] + c0, n, accs + (int64_t)t * total + off[i] + c0,
                        (int64_t)T * total, nparts, alpha ? ld1(alpha, adt, t) : 1.0f, alpha != 0, bs[i], c0);
        }
    }
    free(xf); free(groups); free(accs);
    return 0;
}

/* ---------------------------------------------------------------- writer */

/* dots[t] = W[row, :] . u[t, :] for the tokens t in toks (up to 4), fp32 accumulation. */
static void dot_rows(float *dots, const void *wrow, int dt, const float *uf, int64_t I, const int *toks, int nt) {
    v8f a[4][2] = {{{0}}};
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        v8f w0 = ld8(wrow, dt, i), w1 = ld8(wrow, dt, i + 8);
        for (int j = 0; j < nt; j++) {
            const float *ut = uf + (int64_t)toks[j] * I + i;
            v8f u0, u1;
            memcpy(&u0, ut, 32);
            memcpy(&u1, ut + 8, 32);
            a[j][0] = fma8(w0, u0, a[j][0]);
            a[j][1] = fma8(w1, u1, a[j][1]);
        }
    }
    for (int j = 0; j < nt; j++) {
        float s = hsum8(a[j][0] + a[j][1]);
        const float *ut = uf + (int64_t)toks[j] * I;
        for (int64_t k = i; k < I; k++) s = fma1(ld1(wrow, dt, k), ut[k], s);
        dots[j] = s;
    }
}

/* One call of mohdify::write / write_add: out [T, D] = ((W u_t + b) * gate_t per group) (+ residual),
   reading only the rows of groups some token gates on. Returns 0, or -1 when memory runs out. */
int mohd_write(int T, int64_t I, int64_t Dout, int N, const void *u, int dt, const void *w, int64_t ld,
               const void *b, const void *gates, int gdt, const void *res, void *out, int nthreads) {
    const int64_t G = Dout / N;
    float *uf = (float *)malloc(sizeof(float) * (size_t)T * I);                 /* [T, I] fp32 */
    float *gf = (float *)malloc(sizeof(float) * (size_t)T * N);                 /* [T, N] fp32 */
    if (!uf || !gf) { free(uf); free(gf); return -1; }
    for (int64_t j = 0; j < (int64_t)T * I; j++) uf[j] = ld1(u, dt, j);
    for (int64_t j = 0; j < (int64_t)T * N; j++) gf[j] = ld1(gates, gdt, j);
    const int64_t rows_per = 16;
    int64_t nused = 0;
    for (int g = 0; g < N; g++)
        for (int t = 0; t < T; t++)
            if (gf[(int64_t)t * N + g] != 0.0f) { nused++; break; }
    if ((double)nused * G * I * (dt == F32 ? 4 : 2) < MIN_PARALLEL_BYTES) nthreads = 1;
    const int64_t nblocks = (Dout + rows_per - 1) / rows_per;
    #pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (nthreads > 1)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        int toks[4];
        float dots[4];
        const int64_t d1 = (blk + 1) * rows_per < Dout ? (blk + 1) * rows_per : Dout;
        for (int64_t d = blk * rows_per; d < d1; d++) {
            const int g = (int)(d / G);
            const void *wrow = (const char *)w + d * ld * (dt == F32 ? 4 : 2);
            const float bias = b ? ld1(b, dt, d) : 0.0f;
            int t = 0;
            while (t < T) {
                int nt = 0, first = t;
                for (; t < T && nt < 4; t++)
                    if (gf[(int64_t)t * N + g] != 0.0f) toks[nt++] = t;
                if (nt) dot_rows(dots, wrow, dt, uf, I, toks, nt);
                int j = 0;
                for (int s = first; s < t; s++) {
                    float v = 0.0f;
                    if (j < nt && toks[j] == s) {
                        float z = dots[j++];
                        if (b) z = z + bias;
                        v = z * gf[(int64_t)s * N + g];
                    }
                    v = round_to(dt, v);
                    if (res) v = v + ld1(res, dt, s * Dout + d);
                    st1(out, dt, s * Dout + d, v);
                }
            }
        }
    }
    free(uf); free(gf);
    return 0;
}
