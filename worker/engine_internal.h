/*
 * Engine internals shared by the files of worker/: the weight views of a
 * mapped checkpoint, the compute kernels and the thread pool.
 */
#ifndef SLAB_ENGINE_INTERNAL_H
#define SLAB_ENGINE_INTERNAL_H

#include "worker/engine.h"

#include <stdarg.h>

/* Weights of a float32 checkpoint, pointing into the read-only mapping. */
struct engine_weights {
	const float *token_embedding; /* (vocab_size, dim) */
	const float *rms_att;         /* (layer, dim) */
	const float *wq;              /* (layer, dim, dim) */
	const float *wk;              /* (layer, kv_dim, dim) */
	const float *wv;              /* (layer, kv_dim, dim) */
	const float *wo;              /* (layer, dim, dim) */
	const float *rms_ffn;         /* (layer, dim) */
	const float *w1;              /* (layer, hidden_dim, dim) */
	const float *w2;              /* (layer, dim, hidden_dim) */
	const float *w3;              /* (layer, hidden_dim, dim) */
	const float *rms_final;       /* (dim) */
	const float *classifier;      /* (vocab_size, dim) */
};

struct engine_model {
	struct engine_shape shape;
	struct engine_weights weights;
	const void *map;
	size_t map_size;
};

/* Fills err->message like snprintf and returns -EINVAL. */
int engine_fail(struct engine_error *err, const char *format, ...)
	__attribute__((format(printf, 2, 3)));

/* ---- Kernels (kernels.c) -------------------------------------------------
 *
 * Every dot product, whatever the instruction set, is computed as 16
 * interleaved partial sums (lane j takes elements j, j + 16, ..., each added
 * with a fused multiply-add), reduced by the fixed tree (j, j + 8), then
 * (j, j + 4), (j, j + 2), (j, j + 1). The AVX-512, AVX2 and scalar paths
 * therefore give bitwise identical results.
 */

/* Dot product of n floats in the fixed order described above. */
float kernel_dot(const float *a, const float *b, int n);

/*
 * out (n_tokens, rows) = x (n_tokens, n) times the transpose of
 * w (rows, n), for rows [row_begin, row_end) only. out has row stride
 * out_stride and x has row stride n.
 */
void kernel_matmul(float *out, int out_stride, const float *x, int n_tokens,
		   const float *w, int n, int row_begin, int row_end);

/* out (n) = x (n) normalized by its root mean square, times weight (n). */
void kernel_rmsnorm(float *out, const float *x, const float *weight, int n);

/* x (n) becomes its softmax, in place. */
void kernel_softmax(float *x, int n);

/*
 * Rotates pairs (x[2i], x[2i + 1]) of each head of x (n_heads, head_size)
 * by the angles of one position: cos_sin holds (head_size / 2, 2) values.
 */
void kernel_rope(float *x, int n_heads, int head_size, const float *cos_sin);

/* Undoes kernel_rope() for the same angles. */
void kernel_rope_inverse(float *x, int n_heads, int head_size,
			 const float *cos_sin);

/* out (n) += a * v (n), element by element. */
void kernel_axpy(float *out, float a, const float *v, int n);

/* out (n) = silu(gate (n)) * up (n). */
void kernel_swiglu(float *out, const float *gate, const float *up, int n);

/* Name of the instruction set the kernels selected: "avx512", "avx2", "scalar". */
const char *kernel_isa(void);

/* ---- Thread pool (threads.c) -------------------------------------------- */

struct engine_pool;

/* A task runs as task(arg, ith, nth) on nth threads, ith = 0 .. nth - 1. */
typedef void (*engine_task)(void *arg, int ith, int nth);

int engine_pool_create(int threads, struct engine_pool **out);
void engine_pool_destroy(struct engine_pool *pool);

/* Runs task on every thread of the pool and returns when all are done. */
void engine_pool_run(struct engine_pool *pool, engine_task task, void *arg);
int engine_pool_threads(const struct engine_pool *pool);

#endif
