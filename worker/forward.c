/*
 * The Llama 2 forward pass over a paged KV cache. One step runs any mix of
 * prefill chunks and decode tokens of several sessions with one pass over
 * each weight matrix: the step's tokens are stacked into one (n_tokens, dim)
 * activation matrix, and only attention looks at which session a token
 * belongs to.
 *
 * Scratch buffers are allocated by engine_create() for max_step_tokens
 * tokens and max_context positions; engine_step() allocates nothing.
 *
 * A quantized matrix multiplies activations quantized to Q8_0: the input
 * of a product is quantized once, token by token, before its rows are
 * split among threads, so its quantization depends only on the token.
 */
#include "worker/engine_internal.h"
#include "worker/simd.h"

#include <assert.h>
#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Matrix products smaller than this many multiply-adds run on one thread. */
#define PARALLEL_MIN_WORK (1 << 16)

/* Positions whose K or V rows attention reads in one run. */
#define ATTENTION_ROWS 16

/* Tokens of one sequence whose attention shares the runs of rows. */
#define ATTENTION_TOKENS 8

/* Steps of fewer tokens do their per-token work on one thread. */
#define TOKENS_PARALLEL_MIN 8

/* Activations of fewer elements are quantized on one thread. */
#define QUANTIZE_PARALLEL_MIN (1 << 14)

/* One weight matrix times the step's activations. */
struct matmul_job {
	float *out;             /* (n_tokens, rows) */
	const float *x;         /* (n_tokens, n) */
	struct engine_tensor w; /* (rows, n) */
	int rows;
	int n;
};

/*
 * Up to three products over the same tokens and the same input x, split by
 * rows among threads.
 */
struct matmul_task {
	struct matmul_job jobs[3];
	int n_jobs;
	int n_tokens;
	bool swiglu;       /* jobs[0] = silu(jobs[0]) * jobs[1] afterwards */
	const int8_t *xq;  /* (n_tokens, n) x quantized, for quantized jobs */
	const float *xd;   /* (n_tokens, n / 32) scales of xq */
	const int32_t *xs; /* (n_tokens, n / 32) sums of the codes of xq */
};

/* Rows of activations to quantize, split by tokens among threads. */
struct quantize_task {
	int8_t *xq;        /* (n_tokens, n) */
	float *xd;         /* (n_tokens, n / 32) */
	int32_t *xs;       /* (n_tokens, n / 32) */
	const float *x;    /* (n_tokens, n) */
	int n_tokens;
	int n;
};

struct engine {
	const struct engine_model *model;
	struct engine_options options;
	struct engine_pool *pool;
	struct engine_metrics metrics;

	float *rope;      /* (max_context, head_size / 2, 2) cos and sin */
	float *x;         /* (max_step_tokens, dim) residual stream */
	float *xb;        /* (max_step_tokens, dim) */
	float *xb2;       /* (max_step_tokens, dim) attention output */
	float *q;         /* (max_step_tokens, dim) */
	float *k;         /* (max_step_tokens, kv_dim) */
	float *v;         /* (max_step_tokens, kv_dim) */
	float *hb;        /* (max_step_tokens, hidden_dim) */
	float *hb2;       /* (max_step_tokens, hidden_dim) */
	float *att;       /* (threads, ATTENTION_TOKENS, n_heads, max_context)
			     attention scores */
	float *kv_rows;   /* (threads, ATTENTION_ROWS, kv_dim) float16 rows
			     widened */
	bool avx512;      /* attention runs its AVX-512 path */
	float *last;      /* (max_batch, dim) final hidden state per sequence */
	float *logits;    /* (max_batch, vocab_size) */
	int8_t *xq;       /* (max_step_tokens, max(dim, hidden_dim)) quantized
			     input of a product of quantized weights */
	float *xd;        /* (max_step_tokens, max(dim, hidden_dim) / 32) */
	int32_t *xs;      /* (max_step_tokens, max(dim, hidden_dim) / 32) */
	int32_t *token_sequence; /* (max_step_tokens) sequence of each token */
	int32_t *token_position; /* (max_step_tokens) position of each token */
	int32_t *query_blocks;   /* (max_step_tokens + 1) first token of each
				    query block, then n_tokens */
	int n_query_blocks;

	/* State of the step being run, read by the attention task. */
	const struct engine_kv *kv;
	uint64_t kv_stride;       /* bytes from one KV block to the next */
	const struct engine_sequence *sequences;
	int n_tokens;
	int layer;
};


/*
 * Rows [*begin, *end) of rows that thread ith of nth computes. Ranges are a
 * multiple of ENGINE_QUANT_GROUP rows, so that tiles and packed groups of
 * quantized rows stay whole. Returns false when the thread has no rows.
 */
static bool thread_rows(int rows, int ith, int nth, int *begin, int *end)
{
	int per_thread = (rows + nth - 1) / nth;

	per_thread = (per_thread + ENGINE_QUANT_GROUP - 1) /
		     ENGINE_QUANT_GROUP * ENGINE_QUANT_GROUP;
	*begin = ith * per_thread;
	*end = *begin + per_thread < rows ? *begin + per_thread : rows;
	return *begin < *end;
}


static void matmul_task_run(void *arg, int ith, int nth)
{
	struct matmul_task *task = arg;

	for (int j = 0; j < task->n_jobs; j++) {
		struct matmul_job *job = &task->jobs[j];
		int begin, end;

		if (!thread_rows(job->rows, ith, nth, &begin, &end))
			continue;
		if (job->w.type == ENGINE_WEIGHT_F32)
			kernel_matmul(job->out, job->rows, job->x,
				      task->n_tokens, job->w.data, job->n,
				      begin, end);
		else
			kernel_matmul_quant(job->out, job->rows, task->xq,
					    task->xd, task->xs, task->n_tokens,
					    job->w.data, job->w.type, job->n,
					    begin, end);
	}

	if (task->swiglu) {
		struct matmul_job *gate = &task->jobs[0];
		int begin, end;

		if (!thread_rows(gate->rows, ith, nth, &begin, &end))
			return;
		for (int t = 0; t < task->n_tokens; t++) {
			size_t row = (size_t)t * gate->rows;

			kernel_swiglu(gate->out + row + begin,
				      gate->out + row + begin,
				      task->jobs[1].out + row + begin,
				      end - begin);
		}
	}
}


static void quantize_task_run(void *arg, int ith, int nth)
{
	struct quantize_task *task = arg;
	int per_thread = (task->n_tokens + nth - 1) / nth;
	int begin = ith * per_thread;
	int end = begin + per_thread > task->n_tokens ? task->n_tokens
						      : begin + per_thread;

	size_t blocks = (size_t)(task->n / ENGINE_QUANT_BLOCK);

	for (int t = begin; t < end; t++)
		kernel_quantize_row(task->xq + (size_t)t * task->n,
				    task->xd + (size_t)t * blocks,
				    task->xs + (size_t)t * blocks,
				    task->x + (size_t)t * task->n, task->n);
}


static void run_matmuls(struct engine *engine, struct matmul_task *task)
{
	uint64_t work = 0;
	bool quantized = false;

	for (int j = 0; j < task->n_jobs; j++) {
		work += (uint64_t)task->jobs[j].rows * (uint64_t)task->jobs[j].n *
			(uint64_t)task->n_tokens;
		quantized |= task->jobs[j].w.type != ENGINE_WEIGHT_F32;
	}

	/* Quantize the shared input once for every quantized job. */
	if (quantized) {
		struct quantize_task quantize = {
			.xq = engine->xq,
			.xd = engine->xd,
			.xs = engine->xs,
			.x = task->jobs[0].x,
			.n_tokens = task->n_tokens,
			.n = task->jobs[0].n,
		};

		for (int j = 1; j < task->n_jobs; j++)
			assert(task->jobs[j].x == quantize.x &&
			       task->jobs[j].n == quantize.n);
		if ((uint64_t)quantize.n_tokens * (uint64_t)quantize.n <
		    QUANTIZE_PARALLEL_MIN)
			quantize_task_run(&quantize, 0, 1);
		else
			engine_pool_run(engine->pool, quantize_task_run,
					&quantize);
		task->xq = engine->xq;
		task->xd = engine->xd;
		task->xs = engine->xs;
	}
	if (work < PARALLEL_MIN_WORK)
		matmul_task_run(task, 0, 1);
	else
		engine_pool_run(engine->pool, matmul_task_run, task);
}


/* Makes kv the cache of the running step or shift. */
static void use_kv(struct engine *engine, const struct engine_kv *kv)
{
	engine->kv = kv;
	engine->kv_stride = kv->block_stride != 0
				    ? kv->block_stride
				    : engine_kv_block_bytes(&engine->model->shape,
							    kv->block_tokens,
							    kv->type);
}


/* Address of the K (kv = 0) or V (kv = 1) row of one position. */
static void *kv_row_address(const struct engine *engine,
			    const struct engine_sequence *sequence, int layer,
			    int kv, int position)
{
	const struct engine_shape *shape = &engine->model->shape;
	const struct engine_kv *cache = engine->kv;
	uint64_t block_bytes = engine->kv_stride;
	size_t element = cache->type == ENGINE_KV_F16 ? 2 : 4;
	int32_t block = sequence->blocks[position / (int)cache->block_tokens];
	size_t row = ((size_t)layer * 2 + (size_t)kv) * cache->block_tokens +
		     (size_t)(position % (int)cache->block_tokens);

	return (char *)cache->base + (uint64_t)block * block_bytes +
	       row * (size_t)engine_kv_dim(shape) * element;
}


/*
 * A run of consecutive K or V rows of one KV block: row r starts at element
 * r * stride of rows, float32 or, on the AVX-512 path, float16.
 */
struct kv_run {
	const void *rows;
	size_t stride;
	bool half;
};


/*
 * Returns n_rows consecutive K or V rows of one block, from position first
 * on, starting at element offset, as floats with row stride *stride.
 * float16 rows are widened into scratch (n_rows x n floats).
 */
static const float *kv_rows_read(const struct engine *engine,
				 const struct engine_sequence *sequence,
				 int layer, int kv, int first, int n_rows,
				 int offset, int n, float *scratch,
				 size_t *stride)
{
	const void *row = kv_row_address(engine, sequence, layer, kv, first);
	size_t kv_dim = (size_t)engine_kv_dim(&engine->model->shape);

	if (engine->kv->type == ENGINE_KV_F32) {
		*stride = kv_dim;
		return (const float *)row + offset;
	}

	for (int r = 0; r < n_rows; r++) {
		const _Float16 *half = (const _Float16 *)row + r * kv_dim + offset;

		for (int i = 0; i < n; i++)
			scratch[(size_t)r * n + i] = (float)half[i];
	}
	*stride = (size_t)n;
	return scratch;
}


/*
 * Returns a run of n_rows K or V rows as kv_rows_read() does, except that
 * the AVX-512 path reads float16 rows in place. Elements of the run start
 * at element offset of each row.
 */
static struct kv_run kv_run_read(const struct engine *engine,
				 const struct engine_sequence *sequence,
				 int layer, int kv, int first, int n_rows,
				 int offset, int n, float *scratch)
{
	struct kv_run run = { .half = false };

	if (engine->avx512 && engine->kv->type == ENGINE_KV_F16) {
		run.rows = (const _Float16 *)kv_row_address(engine, sequence,
							    layer, kv, first) +
			   offset;
		run.stride = (size_t)engine_kv_dim(&engine->model->shape);
		run.half = true;
		return run;
	}
	run.rows = kv_rows_read(engine, sequence, layer, kv, first, n_rows,
				offset, n, scratch, &run.stride);
	return run;
}


/*
 * Converts n floats to float16, rounding to nearest even as a cast does,
 * 16 at a time.
 */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static void
narrow_avx512(_Float16 *out, const float *in, int n)
{
	for (int i = 0; i < n; i += 16) {
		__mmask16 mask = lanes_mask(n - i);
		__m256i half = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(mask, in + i),
					       _MM_FROUND_TO_NEAREST_INT |
						       _MM_FROUND_NO_EXC);

		_mm256_mask_storeu_epi16((void *)(out + i), mask, half);
	}
}


static void kv_row_write(const struct engine *engine,
			 const struct engine_sequence *sequence, int layer,
			 int kv, int position, const float *values)
{
	void *row = kv_row_address(engine, sequence, layer, kv, position);
	int kv_dim = engine_kv_dim(&engine->model->shape);

	if (engine->kv->type == ENGINE_KV_F32) {
		memcpy(row, values, (size_t)kv_dim * sizeof(float));
		return;
	}
	_Float16 *half = row;

	if (engine->avx512) {
		narrow_avx512(half, values, kv_dim);
		return;
	}
	for (int i = 0; i < kv_dim; i++)
		half[i] = (_Float16)values[i];
}


/* Loads elements i .. i + 15 of a run (those in mask) as floats. */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static inline __m512
run_load(const struct kv_run *run, size_t i, __mmask16 mask)
{
	if (run->half)
		return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
			mask, (const _Float16 *)run->rows + i));
	return _mm512_maskz_loadu_ps(mask, (const float *)run->rows + i);
}


/*
 * scores[r] = dot(q, row r) / scale for n_rows rows of n elements from
 * element offset on. The AVX-512 path computes the dot product as
 * kernel_dot does (16 lanes of fused multiply-adds in element order, then
 * the fixed tree), four rows at a time, so every path gives the same bits.
 */
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,f16c,fma"))) static void
attention_scores_avx512(float *scores, const float *q,
			const struct kv_run *run, size_t offset, int n_rows,
			int n, float scale)
{
	const __mmask16 all = 0xffff;
	int full = n / 16 * 16;
	__mmask16 tail = lanes_mask(n - full);
	__m512 q_tail = _mm512_maskz_loadu_ps(tail, q + full);

	for (int first = 0; first < n_rows; first += 4) {
		int count = n_rows - first < 4 ? n_rows - first : 4;
		__m512 acc[4];

#pragma GCC unroll 4
		for (int r = 0; r < 4; r++)
			acc[r] = _mm512_setzero_ps();
		for (int k = 0; k < full; k += 16) {
			__m512 qk = _mm512_loadu_ps(q + k);

#pragma GCC unroll 4
			for (int r = 0; r < count; r++)
				acc[r] = _mm512_fmadd_ps(
					qk,
					run_load(run,
						 (first + r) * run->stride + offset + k,
						 all),
					acc[r]);
		}
#pragma GCC unroll 4
		for (int r = 0; r < count && tail != 0; r++)
			acc[r] = _mm512_mask3_fmadd_ps(
				q_tail,
				run_load(run, (first + r) * run->stride + offset + full,
					 tail),
				acc[r], tail);
		if (count == 4) {
			_mm_storeu_ps(scores + first,
				      _mm_div_ps(reduce_four_avx512(acc[0], acc[1],
								    acc[2], acc[3]),
						 _mm_set1_ps(scale)));
			continue;
		}
#pragma GCC unroll 4
		for (int r = 0; r < count; r++)
			scores[first + r] = reduce_avx512(acc[r]) / scale;
	}
}


/*
 * out (n) += weights[r] * row r for n_rows rows of n elements from element
 * offset on, rows in order, each element as a product then a sum, as
 * kernel_axpy does row by row. The AVX-512 path keeps up to 64 elements of
 * out in four registers across all rows.
 */
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,f16c,fma"))) static void
attention_values_avx512(float *out, const float *weights,
			const struct kv_run *run, size_t offset, int n_rows,
			int n)
{
	/*
	 * Up to four registers of out at a time, so that four chains of
	 * adds run side by side: each element still adds the rows in order.
	 */
	for (int first = 0; first < n; first += 64) {
		__mmask16 mask[4];
		__m512 sum[4];

#pragma GCC unroll 4
		for (int c = 0; c < 4; c++) {
			int k = first + 16 * c;

			mask[c] = lanes_mask(n - k);
			sum[c] = _mm512_maskz_loadu_ps(mask[c], out + k);
		}
		for (int r = 0; r < n_rows; r++) {
			__m512 weight = _mm512_set1_ps(weights[r]);

#pragma GCC unroll 4
			for (int c = 0; c < 4; c++)
				sum[c] = _mm512_add_ps(
					sum[c],
					_mm512_mul_ps(weight,
						      run_load(run,
							       r * run->stride + offset +
								       first + 16 * c,
							       mask[c])));
		}
#pragma GCC unroll 4
		for (int c = 0; c < 4; c++)
			_mm512_mask_storeu_ps(out + first + 16 * c, mask[c], sum[c]);
	}
}


static void attention_scores(const struct engine *engine, float *scores,
			     const float *q, const struct kv_run *run,
			     size_t offset, int n_rows, int n, float scale)
{
	if (engine->avx512) {
		attention_scores_avx512(scores, q, run, offset, n_rows, n,
					scale);
		return;
	}
	for (int r = 0; r < n_rows; r++)
		scores[r] = kernel_dot(q,
				       (const float *)run->rows +
					       r * run->stride + offset,
				       n) /
			    scale;
}


static void attention_values(const struct engine *engine, float *out,
			     const float *weights, const struct kv_run *run,
			     size_t offset, int n_rows, int n)
{
	if (engine->avx512) {
		attention_values_avx512(out, weights, run, offset, n_rows, n);
		return;
	}
	for (int r = 0; r < n_rows; r++)
		kernel_axpy(out, weights[r],
			    (const float *)run->rows + r * run->stride + offset,
			    n);
}


/*
 * Attention of every (token, query head) pair of the step, split among
 * threads in items of a query block (up to ATTENTION_TOKENS consecutive
 * tokens of one sequence) and a range of heads. Each pair reads positions
 * 0 .. its own position from the cache, in ascending order, so its result
 * does not depend on the step or on the items. Positions are read in runs
 * of up to ATTENTION_ROWS rows within one KV block. The heads and tokens of
 * an item share each run while it is in the L1 cache: the heads' parts of a
 * row are adjacent, and a prefill's tokens read the same rows.
 */
static void attention_task_run(void *arg, int ith, int nth)
{
	struct engine *engine = arg;
	const struct engine_shape *shape = &engine->model->shape;
	int head_size = engine_head_size(shape);
	int kv_group = shape->n_heads / shape->n_kv_heads;
	int n_blocks = engine->n_query_blocks;
	int block_tokens = (int)engine->kv->block_tokens;
	size_t max_context = (size_t)engine->options.max_context;
	size_t head_scores = (size_t)shape->n_heads * max_context;
	float *att = engine->att + (size_t)ith * ATTENTION_TOKENS * head_scores;
	float *scratch = engine->kv_rows +
			 (size_t)ith * ATTENTION_ROWS * engine_kv_dim(shape);
	float scale = sqrtf((float)head_size);

	/*
	 * Split the heads of a block when there are few blocks, so that
	 * every thread gets several items. Threads take every nth item: a
	 * later token attends to more positions, so contiguous ranges would
	 * give the last thread the most work.
	 */
	int ranges = (4 * nth + n_blocks - 1) / n_blocks;

	ranges = ranges < shape->n_heads ? ranges : shape->n_heads;

	int per_range = (shape->n_heads + ranges - 1) / ranges;

	ranges = (shape->n_heads + per_range - 1) / per_range;
	for (int item = ith; item < n_blocks * ranges; item += nth) {
		int t_begin = engine->query_blocks[item / ranges];
		int t_end = engine->query_blocks[item / ranges + 1];
		int h_begin = item % ranges * per_range;
		int h_end = h_begin + per_range < shape->n_heads
				    ? h_begin + per_range
				    : shape->n_heads;
		/* Tokens of a block have ascending positions. */
		int last = engine->token_position[t_end - 1];
		const struct engine_sequence *sequence =
			&engine->sequences[engine->token_sequence[t_begin]];
		/* KV heads of the range, a contiguous part of each row. */
		int kv_begin = h_begin / kv_group;
		int kv_width = ((h_end - 1) / kv_group - kv_begin + 1) * head_size;

		for (int kv = 0; kv < 2; kv++) {
			for (int t = t_begin; kv == 1 && t < t_end; t++)
				for (int h = h_begin; h < h_end; h++) {
					kernel_softmax(att + (size_t)(t - t_begin) * head_scores +
							       (size_t)(h - h_begin) * max_context,
						       engine->token_position[t] + 1);
					memset(engine->xb2 + (size_t)t * shape->dim +
						       (size_t)h * head_size,
					       0, (size_t)head_size * sizeof(float));
				}
			for (int first = 0; first <= last;) {
				int in_block = block_tokens - first % block_tokens;
				int n_rows = last + 1 - first;
				struct kv_run run;

				n_rows = n_rows < in_block ? n_rows : in_block;
				n_rows = n_rows < ATTENTION_ROWS ? n_rows
								 : ATTENTION_ROWS;
				run = kv_run_read(engine, sequence, engine->layer,
						  kv, first, n_rows,
						  kv_begin * head_size, kv_width,
						  scratch);
				for (int h = h_begin; h < h_end; h++) {
					size_t head = (size_t)(h / kv_group - kv_begin) *
						      head_size;

					for (int t = t_begin; t < t_end; t++) {
						int rows = engine->token_position[t] + 1 - first;
						float *scores = att +
								(size_t)(t - t_begin) * head_scores +
								(size_t)(h - h_begin) * max_context +
								first;
						size_t offset = (size_t)t * shape->dim +
								(size_t)h * head_size;

						rows = rows < n_rows ? rows : n_rows;
						if (rows <= 0)
							continue;
						if (kv == 0)
							attention_scores(engine, scores,
									 engine->q + offset,
									 &run, head, rows,
									 head_size, scale);
						else
							attention_values(engine,
									 engine->xb2 + offset,
									 scores, &run, head,
									 rows, head_size);
					}
				}
				first += n_rows;
			}
		}
	}
}


/* Multiply-adds of the step's attention, to decide whether to split it. */
static uint64_t attention_work(const struct engine *engine)
{
	const struct engine_shape *shape = &engine->model->shape;
	uint64_t positions = 0;

	for (int t = 0; t < engine->n_tokens; t++)
		positions += (uint64_t)engine->token_position[t] + 1;
	return positions * 2 * (uint64_t)shape->dim;
}


static int check_sequence(const struct engine *engine,
			  const struct engine_kv *kv,
			  const struct engine_sequence *sequence, int index,
			  struct engine_error *err)
{
	const struct engine_shape *shape = &engine->model->shape;
	int64_t end = (int64_t)sequence->start + sequence->n;

	if (sequence->n < 1 || sequence->start < 0)
		return engine_fail(err,
				   "sequence %d: start %d and token count %d; "
				   "expected start >= 0 and at least one token",
				   index, (int)sequence->start,
				   (int)sequence->n);
	if (end > engine->options.max_context)
		return engine_fail(err,
				   "sequence %d: positions up to %lld exceed "
				   "the maximum context of %d",
				   index, (long long)end,
				   engine->options.max_context);
	if ((int64_t)sequence->n_blocks * kv->block_tokens < end)
		return engine_fail(err,
				   "sequence %d: block table of %d blocks of "
				   "%u positions does not cover position %lld",
				   index, (int)sequence->n_blocks,
				   kv->block_tokens, (long long)end - 1);
	for (int64_t b = 0; b * kv->block_tokens < end; b++) {
		int32_t block = sequence->blocks[b];

		if (block < 0 || (uint32_t)block >= kv->n_blocks)
			return engine_fail(err,
					   "sequence %d: block table entry "
					   "%lld is block %d, expected 0 to %u",
					   index, (long long)b, (int)block,
					   kv->n_blocks - 1);
	}
	for (int i = 0; i < sequence->n; i++) {
		int32_t token = sequence->tokens[i];

		if (token < 0 || token >= shape->vocab_size)
			return engine_fail(err,
					   "sequence %d: token id %d is outside "
					   "the vocabulary of %d tokens",
					   index, (int)token,
					   (int)shape->vocab_size);
	}
	return 0;
}


static int check_step(const struct engine *engine, const struct engine_kv *kv,
		      const struct engine_sequence *sequences,
		      int n_sequences, struct engine_error *err)
{
	int64_t n_tokens = 0;
	int rc;

	if (n_sequences < 1 || n_sequences > engine->options.max_batch)
		return engine_fail(err,
				   "step of %d sequences, expected 1 to %d "
				   "(the maximum batch)",
				   n_sequences, engine->options.max_batch);
	if (kv == NULL || kv->base == NULL || kv->block_tokens == 0)
		return engine_fail(err, "step without a KV cache");
	for (int s = 0; s < n_sequences; s++) {
		rc = check_sequence(engine, kv, &sequences[s], s, err);
		if (rc < 0)
			return rc;
		n_tokens += sequences[s].n;
	}
	if (n_tokens > engine->options.max_step_tokens)
		return engine_fail(err,
				   "step of %lld tokens exceeds the maximum of "
				   "%d tokens per step",
				   (long long)n_tokens,
				   engine->options.max_step_tokens);
	return 0;
}


/* One transformer block over the step's tokens, updating engine->x. */
/* Work that each token of a step does on its own, between products. */
enum token_work {
	TOKENS_ATTENTION_NORM, /* RMSNorm of x before attention */
	TOKENS_ROPE_KV,        /* RoPE on q and k, then k and v into the cache */
	TOKENS_RESIDUAL_NORM,  /* x += xb, then RMSNorm of x before the FFN */
	TOKENS_RESIDUAL,       /* x += xb */
};

struct token_task {
	struct engine *engine;
	enum token_work work;
	int layer;
};


/* Runs a token task for a contiguous share of the step's tokens. */
static void token_task_run(void *arg, int ith, int nth)
{
	const struct token_task *task = arg;
	struct engine *engine = task->engine;
	const struct engine_shape *shape = &engine->model->shape;
	const struct engine_weights *w = &engine->model->weights;
	size_t dim = (size_t)shape->dim;
	size_t kv_dim = (size_t)engine_kv_dim(shape);
	int head_size = engine_head_size(shape);
	int per_thread = (engine->n_tokens + nth - 1) / nth;
	int begin = ith * per_thread;
	int end = begin + per_thread < engine->n_tokens ? begin + per_thread
							: engine->n_tokens;

	for (int t = begin; t < end; t++) {
		float *x = engine->x + (size_t)t * dim;
		float *xb = engine->xb + (size_t)t * dim;

		switch (task->work) {
		case TOKENS_ATTENTION_NORM:
			kernel_rmsnorm(xb, x, w->rms_att + (size_t)task->layer * dim,
				       (int)dim);
			break;
		case TOKENS_ROPE_KV: {
			const struct engine_sequence *sequence =
				&engine->sequences[engine->token_sequence[t]];
			int position = engine->token_position[t];
			const float *cos_sin = engine->rope +
					       (size_t)position * head_size;

			kernel_rope(engine->q + (size_t)t * dim, shape->n_heads,
				    head_size, cos_sin);
			kernel_rope(engine->k + (size_t)t * kv_dim,
				    shape->n_kv_heads, head_size, cos_sin);
			kv_row_write(engine, sequence, task->layer, 0, position,
				     engine->k + (size_t)t * kv_dim);
			kv_row_write(engine, sequence, task->layer, 1, position,
				     engine->v + (size_t)t * kv_dim);
			break;
		}
		case TOKENS_RESIDUAL_NORM:
			for (size_t i = 0; i < dim; i++)
				x[i] += xb[i];
			kernel_rmsnorm(xb, x, w->rms_ffn + (size_t)task->layer * dim,
				       (int)dim);
			break;
		case TOKENS_RESIDUAL:
			for (size_t i = 0; i < dim; i++)
				x[i] += xb[i];
			break;
		}
	}
}


/*
 * Runs work for every token of the step, split among threads when the step
 * has enough tokens: a prefill's norms, rotations and residual sums would
 * otherwise leave the other threads waiting.
 */
static void run_tokens(struct engine *engine, enum token_work work, int layer)
{
	struct token_task task = { .engine = engine, .work = work,
				   .layer = layer };

	if (engine->n_tokens >= TOKENS_PARALLEL_MIN &&
	    engine_pool_threads(engine->pool) > 1)
		engine_pool_run(engine->pool, token_task_run, &task);
	else
		token_task_run(&task, 0, 1);
}


static void forward_layer(struct engine *engine, int layer)
{
	const struct engine_shape *shape = &engine->model->shape;
	const struct engine_weights *w = &engine->model->weights;
	int dim = shape->dim;
	int kv_dim = engine_kv_dim(shape);
	int hidden = shape->hidden_dim;
	int n = engine->n_tokens;
	struct matmul_task task;

	run_tokens(engine, TOKENS_ATTENTION_NORM, layer);

	/* Q, K and V projections. */
	task = (struct matmul_task){
		.n_jobs = 3,
		.n_tokens = n,
		.jobs = {
			{ engine->q, engine->xb,
			  engine_tensor_matrix(w->wq, layer, dim, dim), dim,
			  dim },
			{ engine->k, engine->xb,
			  engine_tensor_matrix(w->wk, layer, kv_dim, dim),
			  kv_dim, dim },
			{ engine->v, engine->xb,
			  engine_tensor_matrix(w->wv, layer, kv_dim, dim),
			  kv_dim, dim },
		},
	};
	run_matmuls(engine, &task);
	run_tokens(engine, TOKENS_ROPE_KV, layer);

	/* Multi-head attention over the cache. */
	engine->layer = layer;
	if (attention_work(engine) >= PARALLEL_MIN_WORK &&
	    engine_pool_threads(engine->pool) > 1)
		engine_pool_run(engine->pool, attention_task_run, engine);
	else
		attention_task_run(engine, 0, 1);

	/* Output projection, residual and the feed-forward RMSNorm. */
	task = (struct matmul_task){
		.n_jobs = 1,
		.n_tokens = n,
		.jobs = { { engine->xb, engine->xb2,
			    engine_tensor_matrix(w->wo, layer, dim, dim), dim,
			    dim } },
	};
	run_matmuls(engine, &task);
	run_tokens(engine, TOKENS_RESIDUAL_NORM, layer);

	/* SwiGLU feed-forward: w2 (silu(w1 x) * w3 x), then residual. */
	task = (struct matmul_task){
		.n_jobs = 2,
		.n_tokens = n,
		.swiglu = true,
		.jobs = {
			{ engine->hb, engine->xb,
			  engine_tensor_matrix(w->w1, layer, hidden, dim),
			  hidden, dim },
			{ engine->hb2, engine->xb,
			  engine_tensor_matrix(w->w3, layer, hidden, dim),
			  hidden, dim },
		},
	};
	run_matmuls(engine, &task);
	task = (struct matmul_task){
		.n_jobs = 1,
		.n_tokens = n,
		.jobs = { { engine->xb, engine->hb,
			    engine_tensor_matrix(w->w2, layer, dim, hidden),
			    dim, hidden } },
	};
	run_matmuls(engine, &task);
	run_tokens(engine, TOKENS_RESIDUAL, layer);
}


/* Final RMSNorm and classifier for the sequences that asked for logits. */
static void compute_logits(struct engine *engine, int n_sequences)
{
	const struct engine_shape *shape = &engine->model->shape;
	const struct engine_weights *w = &engine->model->weights;
	int dim = shape->dim;
	int n_logits = 0;
	int t_end = 0;
	struct matmul_task task;

	for (int s = 0; s < n_sequences; s++) {
		const struct engine_sequence *sequence = &engine->sequences[s];

		t_end += sequence->n;
		if (sequence->logits == NULL)
			continue;
		kernel_rmsnorm(engine->last + (size_t)n_logits * dim,
			       engine->x + (size_t)(t_end - 1) * dim,
			       w->rms_final, dim);
		n_logits++;
	}
	if (n_logits == 0)
		return;

	task = (struct matmul_task){
		.n_jobs = 1,
		.n_tokens = n_logits,
		.jobs = { { engine->logits, engine->last, w->classifier,
			    shape->vocab_size, dim } },
	};
	run_matmuls(engine, &task);

	n_logits = 0;
	for (int s = 0; s < n_sequences; s++) {
		float *dest = engine->sequences[s].logits;

		if (dest == NULL)
			continue;
		memcpy(dest,
		       engine->logits + (size_t)n_logits * shape->vocab_size,
		       (size_t)shape->vocab_size * sizeof(float));
		n_logits++;
	}
}


int engine_step(struct engine *engine, const struct engine_kv *kv,
		const struct engine_sequence *sequences, int n_sequences,
		struct engine_error *err)
{
	const struct engine_shape *shape = &engine->model->shape;
	uint64_t started = engine_now_ns();
	bool prefill = false;
	int n = 0;
	int rc;

	rc = check_step(engine, kv, sequences, n_sequences, err);
	if (rc < 0)
		return rc;

	use_kv(engine, kv);
	engine->sequences = sequences;

	/* Stack every token's embedding into the activation matrix. */
	for (int s = 0; s < n_sequences; s++) {
		const struct engine_sequence *sequence = &sequences[s];

		if (sequence->n > 1)
			prefill = true;
		for (int i = 0; i < sequence->n; i++, n++) {
			memcpy(engine->x + (size_t)n * shape->dim,
			       engine->model->weights.token_embedding +
				       (size_t)sequence->tokens[i] * shape->dim,
			       (size_t)shape->dim * sizeof(float));
			engine->token_sequence[n] = s;
			engine->token_position[n] = sequence->start + i;
		}
	}
	engine->n_tokens = n;

	/* Query blocks: runs of up to ATTENTION_TOKENS tokens of a sequence. */
	engine->n_query_blocks = 0;
	for (int t = 0; t < n; t++)
		if (t == 0 || engine->token_sequence[t] != engine->token_sequence[t - 1] ||
		    t - engine->query_blocks[engine->n_query_blocks - 1] >=
			    ATTENTION_TOKENS)
			engine->query_blocks[engine->n_query_blocks++] = t;
	engine->query_blocks[engine->n_query_blocks] = n;

	for (int layer = 0; layer < shape->n_layers; layer++)
		forward_layer(engine, layer);
	compute_logits(engine, n_sequences);

	uint64_t elapsed = engine_now_ns() - started;
	struct engine_metrics *m = &engine->metrics;

	if (prefill) {
		m->prefill_tokens += (uint64_t)n;
		m->prefill_ns += elapsed;
	} else {
		m->decode_tokens += (uint64_t)n;
		m->decode_ns += elapsed;
	}
	m->steps++;
	m->last_step_tokens = (uint64_t)n;
	m->last_step_ns = elapsed;
	engine->kv = NULL;
	engine->sequences = NULL;
	return 0;
}


int engine_prefill(struct engine *engine, const struct engine_kv *kv,
		   const int32_t *blocks, int32_t n_blocks,
		   const int32_t *tokens, int32_t n, int32_t start,
		   float *logits, struct engine_error *err)
{
	struct engine_sequence sequence = {
		.tokens = tokens,
		.n = n,
		.start = start,
		.blocks = blocks,
		.n_blocks = n_blocks,
		.logits = logits,
	};

	return engine_step(engine, kv, &sequence, 1, err);
}


int engine_decode(struct engine *engine, const struct engine_kv *kv,
		  const int32_t *blocks, int32_t n_blocks, int32_t token,
		  int32_t pos, float *logits, struct engine_error *err)
{
	return engine_prefill(engine, kv, blocks, n_blocks, &token, 1, pos,
			      logits, err);
}


void engine_get_metrics(const struct engine *engine,
			struct engine_metrics *metrics)
{
	*metrics = engine->metrics;
}


const struct engine_options *engine_get_options(const struct engine *engine)
{
	return &engine->options;
}


/* Checks that a block table covers length positions with valid blocks. */
static int check_blocks(const struct engine_kv *kv, const char *name,
			const int32_t *blocks, int32_t n_blocks,
			int64_t length, struct engine_error *err)
{
	if ((int64_t)n_blocks * kv->block_tokens < length)
		return engine_fail(err,
				   "%s block table of %d blocks of %u positions "
				   "does not cover %lld positions",
				   name, (int)n_blocks, kv->block_tokens,
				   (long long)length);
	for (int64_t b = 0; b * kv->block_tokens < length; b++)
		if (blocks[b] < 0 || (uint32_t)blocks[b] >= kv->n_blocks)
			return engine_fail(err,
					   "%s block table entry %lld is block "
					   "%d, expected 0 to %u",
					   name, (long long)b, (int)blocks[b],
					   kv->n_blocks - 1);
	return 0;
}


int engine_kv_shift(struct engine *engine, const struct engine_kv *kv,
		    const int32_t *source_blocks, int32_t n_source,
		    const int32_t *target_blocks, int32_t n_target,
		    int32_t n_keep, int32_t n_discard, int32_t length,
		    struct engine_error *err)
{
	const struct engine_shape *shape = &engine->model->shape;
	int kv_dim = engine_kv_dim(shape);
	int head_size = engine_head_size(shape);
	struct engine_sequence source = { .blocks = source_blocks,
					  .n_blocks = n_source };
	struct engine_sequence target = { .blocks = target_blocks,
					  .n_blocks = n_target };
	float *row = engine->k; /* (kv_dim) scratch; no step is running */
	const float *cos_sin;
	int rc;

	if (n_keep < 0 || n_discard < 1 || length > engine->options.max_context ||
	    n_discard >= engine->options.max_context ||
	    (int64_t)n_keep + n_discard > length)
		return engine_fail(err,
				   "shift of %d positions after %d kept in a "
				   "session of %d; expected n_keep >= 0, "
				   "n_discard >= 1 and n_keep + n_discard <= "
				   "length <= %d",
				   (int)n_discard, (int)n_keep, (int)length,
				   engine->options.max_context);
	rc = check_blocks(kv, "source", source_blocks, n_source, length, err);
	if (rc == 0)
		rc = check_blocks(kv, "target", target_blocks, n_target,
				  length - n_discard, err);
	if (rc < 0)
		return rc;

	use_kv(engine, kv);
	cos_sin = engine->rope + (size_t)n_discard * head_size;
	for (int layer = 0; layer < shape->n_layers; layer++) {
		for (int32_t p = 0; p < length; p++) {
			int32_t to = p;

			if (p >= n_keep && p < n_keep + n_discard)
				continue;
			if (p >= n_keep + n_discard)
				to = p - n_discard;

			/* Keys rotate back by n_discard positions. */
			size_t stride;
			const float *k = kv_rows_read(engine, &source, layer, 0,
						      p, 1, 0, kv_dim, row,
						      &stride);

			if (k != row)
				memcpy(row, k, (size_t)kv_dim * sizeof(float));
			if (to != p)
				kernel_rope_inverse(row, shape->n_kv_heads,
						    head_size, cos_sin);
			kv_row_write(engine, &target, layer, 0, to, row);

			const float *v = kv_rows_read(engine, &source, layer, 1,
						      p, 1, 0, kv_dim, row,
						      &stride);

			if (v != row)
				memcpy(row, v, (size_t)kv_dim * sizeof(float));
			kv_row_write(engine, &target, layer, 1, to, row);
		}
	}
	engine->kv = NULL;
	return 0;
}


int engine_thread_count(const struct engine *engine)
{
	return engine->options.threads;
}


void engine_run_on_threads(struct engine *engine,
			   void (*task)(void *arg, int ith, int nth),
			   void *arg)
{
	engine_pool_run(engine->pool, task, arg);
}


/* Fills the (max_context, head_size / 2) table of RoPE cosines and sines. */
static void fill_rope_table(float *rope, int max_context, int head_size)
{
	for (int pos = 0; pos < max_context; pos++) {
		float *row = rope + (size_t)pos * head_size;

		for (int i = 0; i < head_size / 2; i++) {
			float freq = 1.0f / powf(10000.0f,
						 (float)(2 * i) / (float)head_size);
			float angle = (float)pos * freq;

			row[2 * i] = cosf(angle);
			row[2 * i + 1] = sinf(angle);
		}
	}
}


static float *alloc_floats(size_t count, bool *failed)
{
	float *p = calloc(count == 0 ? 1 : count, sizeof(float));

	if (p == NULL)
		*failed = true;
	return p;
}


int engine_create(const struct engine_model *model,
		  const struct engine_options *options, struct engine **out,
		  struct engine_error *err)
{
	const struct engine_shape *shape = &model->shape;
	struct engine *engine;
	bool failed = false;
	int rc;

	if (options->threads < 1 || options->threads > 1024)
		return engine_fail(err, "threads is %d, expected 1 to 1024",
				   options->threads);
	if (options->max_batch < 1 || options->max_batch > 65536)
		return engine_fail(err, "max batch is %d, expected 1 to 65536",
				   options->max_batch);
	if (options->max_step_tokens < options->max_batch ||
	    options->max_step_tokens > 1048576)
		return engine_fail(err,
				   "max step tokens is %d, expected %d (the "
				   "max batch) to 1048576",
				   options->max_step_tokens,
				   options->max_batch);
	if (options->max_context < 0 || options->max_context > ENGINE_MAX_SEQ_LEN)
		return engine_fail(err, "max context is %d, expected 0 (the "
				   "model's %d) to %d",
				   options->max_context, (int)shape->seq_len,
				   ENGINE_MAX_SEQ_LEN);

	engine = calloc(1, sizeof(*engine));
	if (engine == NULL)
		return -ENOMEM;
	engine->model = model;
	engine->options = *options;
	if (engine->options.max_context == 0)
		engine->options.max_context = shape->seq_len;

	size_t tokens = (size_t)engine->options.max_step_tokens;
	size_t batch = (size_t)engine->options.max_batch;
	size_t context = (size_t)engine->options.max_context;
	size_t threads = (size_t)engine->options.threads;
	size_t dim = (size_t)shape->dim;
	size_t kv_dim = (size_t)engine_kv_dim(shape);
	size_t hidden = (size_t)shape->hidden_dim;
	size_t head_size = (size_t)engine_head_size(shape);

	engine->rope = alloc_floats(context * head_size, &failed);
	engine->x = alloc_floats(tokens * dim, &failed);
	engine->xb = alloc_floats(tokens * dim, &failed);
	engine->xb2 = alloc_floats(tokens * dim, &failed);
	engine->q = alloc_floats(tokens * dim, &failed);
	engine->k = alloc_floats(tokens * kv_dim, &failed);
	engine->v = alloc_floats(tokens * kv_dim, &failed);
	engine->hb = alloc_floats(tokens * hidden, &failed);
	engine->hb2 = alloc_floats(tokens * hidden, &failed);
	engine->att = alloc_floats(threads * ATTENTION_TOKENS *
					   (size_t)shape->n_heads * context,
				   &failed);
	engine->kv_rows = alloc_floats(threads * ATTENTION_ROWS * kv_dim,
				       &failed);
	engine->avx512 = strcmp(kernel_isa(), "avx512") == 0 &&
			 __builtin_cpu_supports("avx512bw") &&
			 __builtin_cpu_supports("avx512vl");
	engine->last = alloc_floats(batch * dim, &failed);
	engine->logits = alloc_floats(batch * (size_t)shape->vocab_size,
				      &failed);
	engine->token_sequence = calloc(tokens, sizeof(int32_t));
	engine->token_position = calloc(tokens, sizeof(int32_t));
	engine->query_blocks = calloc(tokens + 1, sizeof(int32_t));

	size_t widest = dim > hidden ? dim : hidden;

	engine->xq = calloc(tokens * widest, 1);
	engine->xd = alloc_floats(tokens * (widest / 32 + 1), &failed);
	engine->xs = calloc(tokens * (widest / 32 + 1), sizeof(int32_t));
	if (failed || engine->token_sequence == NULL ||
	    engine->token_position == NULL || engine->query_blocks == NULL ||
	    engine->xq == NULL ||
	    engine->xs == NULL) {
		rc = -ENOMEM;
		engine_fail(err, "cannot allocate scratch buffers for %zu "
			    "tokens per step and %zu positions",
			    tokens, context);
		goto err_destroy;
	}
	fill_rope_table(engine->rope, (int)context, (int)head_size);

	rc = engine_pool_create(options->threads, &engine->pool);
	if (rc < 0) {
		engine_fail(err, "cannot start %d threads", options->threads);
		goto err_destroy;
	}
	*out = engine;
	return 0;

err_destroy:
	engine_destroy(engine);
	return rc;
}


void engine_destroy(struct engine *engine)
{
	if (engine == NULL)
		return;
	engine_pool_destroy(engine->pool);
	free(engine->rope);
	free(engine->x);
	free(engine->xb);
	free(engine->xb2);
	free(engine->q);
	free(engine->k);
	free(engine->v);
	free(engine->hb);
	free(engine->hb2);
	free(engine->att);
	free(engine->kv_rows);
	free(engine->last);
	free(engine->logits);
	free(engine->token_sequence);
	free(engine->token_position);
	free(engine->query_blocks);
	free(engine->xq);
	free(engine->xd);
	free(engine->xs);
	free(engine);
}
