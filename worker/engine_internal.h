/*
 * Engine internals shared by the files of worker/: the weight views of a
 * mapped checkpoint, the compute kernels and the thread pool.
 */
#ifndef SLAB_ENGINE_INTERNAL_H
#define SLAB_ENGINE_INTERNAL_H

#include "worker/engine.h"

#include <stdarg.h>

/*
 * A tensor of matrices of one weight type stored back to back, pointing
 * into the read-only mapping. Float32 data is an array of floats, quantized
 * data an array of blocks along each row.
 */
struct engine_tensor {
	const void *data;
	enum engine_weight_type type;
};

/* Weights of a checkpoint, pointing into the read-only mapping. */
struct engine_weights {
	const float *token_embedding;    /* (vocab_size, dim) */
	const float *rms_att;            /* (layer, dim) */
	struct engine_tensor wq;         /* (layer, dim, dim) */
	struct engine_tensor wk;         /* (layer, kv_dim, dim) */
	struct engine_tensor wv;         /* (layer, kv_dim, dim) */
	struct engine_tensor wo;         /* (layer, dim, dim) */
	const float *rms_ffn;            /* (layer, dim) */
	struct engine_tensor w1;         /* (layer, hidden_dim, dim) */
	struct engine_tensor w2;         /* (layer, dim, hidden_dim) */
	struct engine_tensor w3;         /* (layer, hidden_dim, dim) */
	const float *rms_final;          /* (dim) */
	struct engine_tensor classifier; /* (vocab_size, dim) */
};

struct engine_model {
	struct engine_shape shape;
	struct engine_weights weights;
	enum engine_weight_type file_type;
	const void *map;
	size_t map_size;
};

/* Matrix index (rows, cols) of a tensor, such as the wq of one layer. */
static inline struct engine_tensor engine_tensor_matrix(struct engine_tensor t,
							int index, int rows,
							int cols)
{
	uint64_t bytes = engine_matrix_bytes(t.type, (uint64_t)rows,
					     (uint64_t)cols);

	t.data = (const char *)t.data + (uint64_t)index * bytes;
	return t;
}

/* Validates and maps a quantized checkpoint (quant.c); like engine_model_open. */
int engine_quant_open(const char *path, int fd, uint64_t file_size,
		      struct engine_model *model, struct engine_error *err);

/* Checks the shape fields of a header, whatever the file format. */
int engine_shape_check_fields(const char *path, const struct engine_shape *shape,
			      struct engine_error *err);

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

/*
 * Index of the largest of x (n): the first one on ties, NaN values left out
 * (but a NaN x[0] is returned as the largest).
 */
int32_t kernel_argmax(const float *x, int32_t n);

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

/* ---- Quantized kernels (kernels_quant.c) ----------------------------------
 *
 * A quantized matrix product multiplies Q8_0 or Q4_0 weights, packed in
 * groups of 16 rows (struct engine_group_q8_0, engine_group_q4_0), by
 * activations quantized per block of 32 to int8 with a float scale
 * (kernel_quantize_row). Every path computes each output in this order:
 * acc = 0, then for each block in order along the row,
 * acc = fmaf((float)s, dw * dx, acc), where s is the exact integer sum of
 * the block's 32 products and dw * dx the float product of the two block
 * scales. Integer sums are exact and every float operation is fixed, so the
 * AVX-512 VNNI, AVX2 and scalar paths agree bit for bit, whatever the
 * tiling of rows and tokens.
 */

/*
 * Quantizes one row x (n), n a multiple of 32, to xq (n), the scales
 * xd (n / 32) and the sums of each block's codes xs (n / 32). Per block,
 * d = max |x| / 127 and q = x * (1 / d) clamped to [-127, 127] and rounded
 * to nearest even, with q = 0 when d is 0. NaN is left out of the maximum
 * and becomes -127. Every path gives the same bits.
 */
void kernel_quantize_row(int8_t *xq, float *xd, int32_t *xs, const float *x,
			 int n);

/*
 * out (n_tokens, rows) = w (rows, n) of type Q8_0 or Q4_0, packed in groups
 * of 16 rows, times the quantized activations xq (n_tokens, n) with scales
 * xd and sums xs (n_tokens, n / 32), for rows [row_begin, row_end) only.
 * row_begin must be a multiple of 16. out has row stride out_stride.
 */
void kernel_matmul_quant(float *out, int out_stride, const int8_t *xq,
			 const float *xd, const int32_t *xs, int n_tokens,
			 const void *w, enum engine_weight_type type, int n,
			 int row_begin, int row_end);

/* Instruction set of the quantized kernels: "avx512-vnni", "avx2", "scalar". */
const char *kernel_quant_isa(void);

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
