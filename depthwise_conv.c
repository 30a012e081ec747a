/* Backward of a depthwise 3D convolution on float32 channels-last tensors, for depthwise_conv.py.
 *
 * x is the input (N, T, H, W, C), g the output gradient (N, To, Ho, Wo, C), both dense: the memory of channels_last_3d
 * tensors. Output position (to, ho, wo) reads input position (to*st + a - pt, ho*sh + b - ph, wo*sw + d - pw) with
 * kernel tap (a, b, d); taps that fall in the padding read zeros.
 * - depthwise_weight_grad: grad_w[c, a, b, d] = sum over n, to, ho, wo of x[n, that position, c] * g[n, to, ho, wo, c],
 *   written in the weight's layout (C, K), K = kt*kh*kw.
 * - depthwise_input_grad: grad_x[n, t, h, w, c] = sum over the taps of g[n, to, ho, wo, c] * weight[c, a, b, d], over
 *   the output positions that read (t, h, w); the weight comes transposed, (K, C). Any stride.
 *
 * Both walk rows of the tensors, (n, t, h), split evenly between the threads, and pair one x row with one g row per
 * tap; the innermost loop runs over the channels, contiguous in both tensors, so it vectorises, and a pair of rows
 * stays in cache for all the taps it serves. The weight gradient sums a row's products per tap in registers, 16 or 8
 * channels at a time, and adds them to a (K, C) buffer per thread once per row; the buffers are added in
 * thread order at the end: results depend on the number of threads, not on their scheduling. The input gradient gives
 * each thread its own rows of grad_x. PyTorch's product and sum per tap over the whole tensors read and write the
 * activations about 4 x 27 times; these read each about once.
 *
 * native.py builds this file at first use with the system's C compiler and depthwise_conv.py calls it through ctypes.
 */
#include <string.h>

#include "parallel.h"

typedef struct {
    const float *x, *g, *w; /* x and g, or g and the (K, C) weight */
    float *out;             /* the weight gradient's (K, C) sums of this thread, or grad_x */
    int64_t row0, row1;     /* this thread's rows: of g for the weight gradient, of grad_x for the input gradient */
    int64_t T, H, W, C, To, Ho, Wo;
    int kt, kh, kw, st, sh, sw, pt, ph, pw;
} job_t;

/* First output column wo whose input column wo*s + d - p is >= 0, and one past the last that is < W. */
static void columns(const job_t *j, int d, int64_t *lo, int64_t *hi) {
    *lo = 0, *hi = j->Wo;
    while (*lo < *hi && *lo * j->sw + d - j->pw < 0) ++*lo;
    while (*hi > *lo && (*hi - 1) * j->sw + d - j->pw >= j->W) --*hi;
}

/* sum[i] += x[wo * xstep + i] * g[wo * gstep + i] over wo < count, for skip <= i < width (width at most 16): the
 * products are summed in registers over the row and added to the memory sums once. Inlined with a constant width, the
 * loop over i is a vector or two. */
static inline void sum_products(float *restrict sum, const float *restrict x, const float *restrict g, int64_t count,
                                int64_t xstep, int64_t gstep, int width, int skip) {
    float acc[16] = {0};
    for (int64_t wo = 0; wo < count; wo++)
        for (int i = 0; i < width; i++) acc[i] += x[wo * xstep + i] * g[wo * gstep + i];
    for (int i = skip; i < width; i++) sum[i] += acc[i];
}

static void *weight_grad_rows(void *arg) {
    const job_t *j = arg;
    const int64_t C = j->C;
    for (int64_t r = j->row0; r < j->row1; r++) { /* r = (n, to, ho) */
        const int64_t ho = r % j->Ho, to = (r / j->Ho) % j->To, n = r / (j->Ho * j->To);
        const float *grow = j->g + r * j->Wo * C;
        for (int a = 0; a < j->kt; a++) {
            const int64_t t = to * j->st + a - j->pt;
            if (t < 0 || t >= j->T) continue;
            for (int b = 0; b < j->kh; b++) {
                const int64_t h = ho * j->sh + b - j->ph;
                if (h < 0 || h >= j->H) continue;
                const float *xrow = j->x + ((n * j->T + t) * j->H + h) * j->W * C;
                for (int d = 0; d < j->kw; d++) {
                    float *sum = j->out + ((int64_t)(a * j->kh + b) * j->kw + d) * C;
                    int64_t lo, hi;
                    columns(j, d, &lo, &hi);
                    const float *xp = xrow + (lo * j->sw + d - j->pw) * C, *gp = grow + lo * C;
                    const int64_t count = hi - lo, xstep = j->sw * C;
                    int64_t c = 0;
                    for (; c + 16 <= C; c += 16) sum_products(sum + c, xp + c, gp + c, count, xstep, C, 16, 0);
                    if (c + 8 <= C) sum_products(sum + c, xp + c, gp + c, count, xstep, C, 8, 0), c += 8;
                    if (c < C && C >= 8) { /* the last 8 channels, of which those before c are summed already */
                        const int64_t last = C - 8;
                        sum_products(sum + last, xp + last, gp + last, count, xstep, C, 8, (int)(c - last));
                    } else {
                        for (; c < C; c++) sum_products(sum + c, xp + c, gp + c, count, xstep, C, 1, 0);
                    }
                }
            }
        }
    }
    return NULL;
}

static void *input_grad_rows(void *arg) {
    const job_t *j = arg;
    const int64_t C = j->C;
    for (int64_t r = j->row0; r < j->row1; r++) { /* r = (n, t, h) */
        const int64_t h = r % j->H, t = (r / j->H) % j->T, n = r / (j->H * j->T);
        float *xrow = j->out + r * j->W * C;
        memset(xrow, 0, (size_t)(j->W * C) * sizeof(float));
        for (int a = 0; a < j->kt; a++) {
            const int64_t ts = t + j->pt - a; /* = to * st */
            if (ts < 0 || ts % j->st || ts / j->st >= j->To) continue;
            for (int b = 0; b < j->kh; b++) {
                const int64_t hs = h + j->ph - b;
                if (hs < 0 || hs % j->sh || hs / j->sh >= j->Ho) continue;
                const float *grow = j->g + ((n * j->To + ts / j->st) * j->Ho + hs / j->sh) * j->Wo * C;
                for (int d = 0; d < j->kw; d++) {
                    const float *restrict wp = j->w + ((int64_t)(a * j->kh + b) * j->kw + d) * C;
                    int64_t lo, hi;
                    columns(j, d, &lo, &hi);
                    for (int64_t wo = lo; wo < hi; wo++) {
                        float *restrict xp = xrow + (wo * j->sw + d - j->pw) * C;
                        const float *restrict gp = grow + wo * C;
                        for (int64_t c = 0; c < C; c++) xp[c] += gp[c] * wp[c];
                    }
                }
            }
        }
    }
    return NULL;
}

static job_t *make_jobs(int threads, int64_t rows, job_t job) {
    job_t *jobs = calloc((size_t)threads, sizeof(job_t));
    for (int i = 0; jobs && i < threads; i++) {
        jobs[i] = job;
        share(rows, i, threads, &jobs[i].row0, &jobs[i].row1);
    }
    return jobs;
}

int depthwise_weight_grad(const float *x, const float *g, float *grad_w, int64_t N, int64_t C, int64_t T, int64_t H,
                          int64_t W, int64_t To, int64_t Ho, int64_t Wo, int kt, int kh, int kw, int st, int sh,
                          int sw, int pt, int ph, int pw, int threads) {
    const int64_t K = (int64_t)kt * kh * kw, rows = N * To * Ho;
    threads = thread_count(threads, rows, 1);
    float *sums = calloc((size_t)(threads * K * C), sizeof(float));
    job_t *jobs = make_jobs(threads, rows, (job_t){x, g, NULL, NULL, 0, 0, T, H, W, C, To, Ho, Wo,
                                                   kt, kh, kw, st, sh, sw, pt, ph, pw});
    int status = sums && jobs ? 0 : -1;
    for (int i = 0; status == 0 && i < threads; i++) jobs[i].out = sums + i * K * C;
    if (status == 0) status = run(weight_grad_rows, jobs, sizeof(job_t), threads);
    for (int64_t c = 0; status == 0 && c < C; c++)
        for (int64_t k = 0; k < K; k++) {
            float total = 0;
            for (int i = 0; i < threads; i++) total += sums[(i * K + k) * C + c];
            grad_w[c * K + k] = total;
        }
    free(sums), free(jobs);
    return status;
}

int depthwise_input_grad(const float *g, const float *weight_kc, float *grad_x, int64_t N, int64_t C, int64_t T,
                         int64_t H, int64_t W, int64_t To, int64_t Ho, int64_t Wo, int kt, int kh, int kw, int st,
                         int sh, int sw, int pt, int ph, int pw, int threads) {
    const int64_t rows = N * T * H;
    threads = thread_count(threads, rows, 1);
    job_t *jobs = make_jobs(threads, rows, (job_t){NULL, g, weight_kc, grad_x, 0, 0, T, H, W, C, To, Ho, Wo,
                                                   kt, kh, kw, st, sh, sw, pt, ph, pw});
    int status = jobs ? run(input_grad_rows, jobs, sizeof(job_t), threads) : -1;
    free(jobs);
    return status;
}
