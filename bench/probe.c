/*
 * slab-probe: measures the two machine limits the benchmarks compare
 * against. Read bandwidth: every thread sums its share of a buffer far
 * larger than the last-level cache with 8 independent vector
 * accumulators; the best of several passes counts. Peak float32 FMA rate:
 * every thread runs 12 independent chains of 16-lane fused multiply-adds.
 * Prints "read_gbps X" and "fma_gflops Y" on standard output.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_BYTES (512ull << 20)
#define FMA_ITERATIONS 20000000ull

struct share {
	const float *data;
	size_t count;
	pthread_barrier_t *barrier;
	double result;
};


static double now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}


__attribute__((target("avx512f"))) static void *read_share(void *arg)
{
	struct share *s = arg;
	__m512 acc[8];

#pragma GCC unroll 8
	for (int i = 0; i < 8; i++)
		acc[i] = _mm512_setzero_ps();
	pthread_barrier_wait(s->barrier);
	/* Unrolled, so that the accumulators stay in registers. */
	for (size_t i = 0; i + 128 <= s->count; i += 128)
#pragma GCC unroll 8
		for (int j = 0; j < 8; j++)
			acc[j] = _mm512_add_ps(acc[j],
					       _mm512_load_ps(s->data + i + 16 * j));
	for (int j = 1; j < 8; j++)
		acc[0] = _mm512_add_ps(acc[0], acc[j]);
	s->result = _mm512_reduce_add_ps(acc[0]);
	return NULL;
}


__attribute__((target("avx512f,fma"))) static void *fma_share(void *arg)
{
	struct share *s = arg;
	__m512 acc[12];
	__m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);

#pragma GCC unroll 12
	for (int i = 0; i < 12; i++)
		acc[i] = _mm512_set1_ps((float)i);
	pthread_barrier_wait(s->barrier);
	for (unsigned long long n = 0; n < FMA_ITERATIONS; n++)
#pragma GCC unroll 12
		for (int j = 0; j < 12; j++)
			acc[j] = _mm512_fmadd_ps(acc[j], a, b);
	for (int j = 1; j < 12; j++)
		acc[0] = _mm512_add_ps(acc[0], acc[j]);
	s->result = _mm512_reduce_add_ps(acc[0]);
	return NULL;
}


/* Runs fn on every thread over its share; returns the wall time. */
static double run_threads(int threads, void *(*fn)(void *), const float *data,
			  size_t count)
{
	pthread_t ids[threads];
	struct share shares[threads];
	pthread_barrier_t barrier;
	double started, elapsed;

	pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
	for (int t = 0; t < threads; t++) {
		shares[t] = (struct share){
			.data = data + count / threads * t,
			.count = count / threads,
			.barrier = &barrier,
		};
		pthread_create(&ids[t], NULL, fn, &shares[t]);
	}
	started = now_seconds();
	pthread_barrier_wait(&barrier);
	for (int t = 0; t < threads; t++)
		pthread_join(ids[t], NULL);
	elapsed = now_seconds() - started;
	pthread_barrier_destroy(&barrier);
	return elapsed;
}


int main(void)
{
	int threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
	size_t count = BUFFER_BYTES / sizeof(float);
	float *data = aligned_alloc(64, BUFFER_BYTES);
	double best = 1e9;

	if (!__builtin_cpu_supports("avx512f")) {
		fprintf(stderr, "slab-probe: needs AVX-512\n");
		return 1;
	}
	if (data == NULL)
		return 1;
	for (size_t i = 0; i < count; i++)
		data[i] = (float)(i & 1023);

	for (int pass = 0; pass < 5; pass++) {
		double t = run_threads(threads, read_share, data, count);

		if (t < best)
			best = t;
	}
	printf("read_gbps %.1f\n", (double)BUFFER_BYTES / best / 1e9);

	double t = run_threads(threads, fma_share, NULL, (size_t)threads);

	printf("fma_gflops %.1f\n",
	       (double)threads * FMA_ITERATIONS * 12 * 16 * 2 / t / 1e9);
	free(data);
	return 0;
}
