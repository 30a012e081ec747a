/* Training batch norm on float32 channels-last tensors, by groups of clips, for batch_norm.py.
 *
 * x is (R, C): the memory of a channels_last_3d (N, C, T, H, W) tensor, R = N*T*H*W rows of C channels. The rows fall
 * into k groups of R/k consecutive rows (runs of N/k clips: sub-batch BN's groups; k = 1 is plain BN), and each group
 * is normalised with its own per-channel mean and biased variance.
 * - batch_norm_forward: out = (x - mean) * invstd * weight + bias, with per group the mean and invstd =
 *   1/sqrt(var + eps), (k, C) each, for backward; the (k, C) running statistics move towards the group's mean and
 *   unbiased variance by `momentum`, as nn.BatchNorm3d's do.
 * - batch_norm_backward: from the output gradient g, grad_x = weight * invstd * (g - mean(g) - (x - mean) * invstd^2
 *   * mean(g * (x - mean))), and per group grad_weight = sum(g * (x - mean)) * invstd and grad_bias = sum(g), (k, C).
 *
 * Each is two passes over the rows, split between the threads: per-channel sums, then an affine map per element
 * (out = (x - mean) * b + d, grad_x = g * a + (x - mean) * b + d, with a, b, d per group and channel). ATen's channels-last kernels
 * take 2-3 times as long on the same tensors (benchmarks/README.md). The sums run in float32 over blocks of BLOCK
 * rows, added into double; the forward's over x minus the group's first row, so that a large mean does not cancel
 * the variance. Each thread sums its own rows; the threads' sums are added in order, so results depend on the number
 * of threads, not on their scheduling.
 *
 * native.py builds this file at first use with the system's C compiler and batch_norm.py calls it through ctypes.
 */
#include <math.h>
#include <string.h>

#include "parallel.h"

#define BLOCK 64               /* rows summed in float32 before they are added into double */
#define MIN_ELEMENTS (1 << 16) /* per thread: smaller tensors take fewer threads */

typedef struct {
    const float *x, *g;          /* g: the output gradient, backward only */
    const float *mean;           /* per group and channel: the mean (the sums' centre in backward) */
    const float *a, *b, *d;      /* per group and channel: the affine pass's terms */
    float *out;                  /* the affine pass's output */
    double *sums;                /* this thread's (k, 2, C) sums */
    int64_t row0, row1, group_rows, C;
} job_t;

/* Per group, the sums of v = x - the group's first row, and of v^2 (forward, g == NULL); or of g, and of
 * g * (x - mean) (backward). */
static void *sum_rows(void *arg) {
    const job_t *j = arg;
    const int64_t C = j->C;
    float first[C], second[C];
    for (int64_t r = j->row0; r < j->row1;) {
        const int64_t group = r / j->group_rows, end = (group + 1) * j->group_rows;
        const int64_t last = end < j->row1 ? end : j->row1;
        const float *restrict centre = j->g ? j->mean + group * C : j->x + group * j->group_rows * C;
        double *total = j->sums + group * 2 * C;
        while (r < last) {
            const int64_t stop = r + BLOCK < last ? r + BLOCK : last;
            memset(first, 0, sizeof first), memset(second, 0, sizeof second);
            for (; r < stop; r++) {
                const float *restrict xp = j->x + r * C;
                if (j->g) {
                    const float *restrict gp = j->g + r * C;
                    for (int64_t c = 0; c < C; c++) first[c] += gp[c], second[c] += gp[c] * (xp[c] - centre[c]);
                } else {
                    for (int64_t c = 0; c < C; c++) {
                        const float v = xp[c] - centre[c];
                        first[c] += v, second[c] += v * v;
                    }
                }
            }
            for (int64_t c = 0; c < C; c++) total[c] += first[c], total[C + c] += second[c];
        }
    }
    return NULL;
}

/* out = (x - mean) * b + d, plus g * a in backward (g != NULL), with mean, a, b, d of the row's group. Centred
 * first: x * b - mean * b would cancel where the spread is small against the mean. */
static void *affine_rows(void *arg) {
    const job_t *j = arg;
    const int64_t C = j->C;
    for (int64_t r = j->row0; r < j->row1; r++) {
        const int64_t group = r / j->group_rows;
        const float *restrict m = j->mean + group * C, *restrict b = j->b + group * C, *restrict d = j->d + group * C;
        const float *restrict xp = j->x + r * C;
        float *restrict op = j->out + r * C;
        if (j->g) {
            const float *restrict a = j->a + group * C, *restrict gp = j->g + r * C;
            for (int64_t c = 0; c < C; c++) op[c] = gp[c] * a[c] + (xp[c] - m[c]) * b[c] + d[c];
        } else {
            for (int64_t c = 0; c < C; c++) op[c] = (xp[c] - m[c]) * b[c] + d[c];
        }
    }
    return NULL;
}

/* Runs worker over the rows on `threads` threads; with `totals`, adds the threads' (k, 2, C) sums into it in thread
 * order. 0, or -1 out of memory. */
static int pass(void *(*worker)(void *), job_t job, int64_t R, int k, int threads, double *totals) {
    threads = thread_count(threads, R, MIN_ELEMENTS / job.C);
    const int64_t size = (int64_t)k * 2 * job.C;
    job_t *jobs = calloc((size_t)threads, sizeof(job_t));
    double *sums = totals ? calloc((size_t)(threads * size), sizeof(double)) : NULL;
    int status = jobs && (sums || !totals) ? 0 : -1;
    for (int i = 0; status == 0 && i < threads; i++) {
        jobs[i] = job;
        jobs[i].sums = sums ? sums + i * size : NULL;
        share(R, i, threads, &jobs[i].row0, &jobs[i].row1);
    }
    if (status == 0) status = run(worker, jobs, sizeof(job_t), threads);
    if (status == 0 && totals) {
        memset(totals, 0, (size_t)size * sizeof(double));
        for (int i = 0; i < threads; i++)
            for (int64_t e = 0; e < size; e++) totals[e] += sums[i * size + e];
    }
    free(jobs), free(sums);
    return status;
}

int batch_norm_forward(const float *x, const float *weight, const float *bias, float *out, float *mean, float *invstd,
                       float *running_mean, float *running_var, int64_t R, int64_t C, int k, double momentum,
                       double eps, int threads) {
    const int64_t n = R / k;
    double *totals = malloc((size_t)(k * 2 * C) * sizeof(double));
    float *scale = malloc((size_t)(k * 2 * C) * sizeof(float)), *shift = scale ? scale + k * C : NULL;
    int status = totals && scale ? pass(sum_rows, (job_t){.x = x, .group_rows = n, .C = C}, R, k, threads, totals)
                                 : -1;
    for (int64_t group = 0; status == 0 && group < k; group++)
        for (int64_t c = 0; c < C; c++) {
            const int64_t i = group * C + c;
            const double s = totals[group * 2 * C + c] / n, q = totals[group * 2 * C + C + c] / n;
            const double v = q > s * s ? q - s * s : 0, m = x[group * n * C + c] + s, is = 1 / sqrt(v + eps);
            mean[i] = (float)m, invstd[i] = (float)is;
            running_mean[i] += (float)(momentum * (m - running_mean[i]));
            running_var[i] += (float)(momentum * (v * n / (n - 1) - running_var[i]));
            scale[i] = (float)(weight[c] * is), shift[i] = bias[c];
        }
    if (status == 0)
        status = pass(affine_rows, (job_t){.x = x, .mean = mean, .b = scale, .d = shift, .out = out, .group_rows = n,
                                           .C = C}, R, k, threads, NULL);
    free(totals), free(scale);
    return status;
}

int batch_norm_backward(const float *g, const float *x, const float *weight, const float *mean, const float *invstd,
                        float *grad_x, float *grad_weight, float *grad_bias, int64_t R, int64_t C, int k, int threads) {
    const int64_t n = R / k;
    double *totals = malloc((size_t)(k * 2 * C) * sizeof(double));
    float *a = malloc((size_t)(k * 3 * C) * sizeof(float)), *b = a ? a + k * C : NULL, *d = a ? b + k * C : NULL;
    int status = totals && a ? pass(sum_rows, (job_t){.x = x, .g = g, .mean = mean, .group_rows = n, .C = C}, R, k,
                                    threads, totals) : -1;
    for (int64_t group = 0; status == 0 && group < k; group++)
        for (int64_t c = 0; c < C; c++) {
            const int64_t i = group * C + c;
            const double sum_g = totals[group * 2 * C + c], sum_gx = totals[group * 2 * C + C + c], is = invstd[i];
            const double scale = weight[c] * is, slope = -scale * is * is * sum_gx / n;
            a[i] = (float)scale, b[i] = (float)slope, d[i] = (float)(-scale * sum_g / n);
            grad_weight[i] = (float)(sum_gx * is), grad_bias[i] = (float)sum_g;
        }
    if (status == 0)
        status = pass(affine_rows, (job_t){.x = x, .g = g, .mean = mean, .a = a, .b = b, .d = d, .out = grad_x,
                                           .group_rows = n, .C = C}, R, k, threads, NULL);
    free(totals), free(a);
    return status;
}
