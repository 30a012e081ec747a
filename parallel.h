/* Threads for the C kernels (depthwise_conv.c, batch_norm.c): one job per thread, each over a range of rows. */
#ifndef PARALLEL_H
#define PARALLEL_H

#include <stdint.h>
#include <stdlib.h>

/* At least one thread; no more than `threads`, and none with fewer than `min_rows` rows (at least one). */
static int thread_count(int threads, int64_t rows, int64_t min_rows) {
    const int64_t most = rows / (min_rows > 1 ? min_rows : 1);
    return threads < 1 || most < 1 ? 1 : threads > most ? (int)most : threads;
}

/* Rows [rows * i / threads, rows * (i + 1) / threads): thread i's share. */
static void share(int64_t rows, int i, int threads, int64_t *row0, int64_t *row1) {
    *row0 = rows * i / threads, *row1 = rows * (i + 1) / threads;
}

/* Runs worker on each of `count` jobs of `size` bytes, one thread each. The threads are OpenMP's: built with
 * -fopenmp next to PyTorch, whose libgomp the library then shares, these are the threads ATen's own kernels run on.
 * (Threads of their own would compete on every core with OpenMP's, which spin for a while after each of ATen's
 * parallel regions.) Without OpenMP the jobs run one after the other, with the same results. Returns 0. */
static int run(void *(*worker)(void *), void *jobs, size_t size, int count) {
    char *job = jobs;
#pragma omp parallel for num_threads(count) schedule(static, 1)
    for (int i = 0; i < count; i++) worker(job + i * size);
    return 0;
}

#endif
