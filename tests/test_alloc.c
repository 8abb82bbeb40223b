/*
 * Steady-state allocation test: once an engine and a sampler exist, decode
 * steps and sampling must not call malloc. The test binary interposes
 * malloc, calloc and realloc to count calls. Sanitizer builds replace the
 * allocator themselves, so the Makefile leaves this test out of them, and
 * it skips itself if built with one anyway.
 */
#include "worker/engine.h"

#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define COUNTING_ALLOCATOR 0
#else
#define COUNTING_ALLOCATOR 1
#endif

static atomic_long allocations;

#if COUNTING_ALLOCATOR
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);


void *malloc(size_t size)
{
	atomic_fetch_add(&allocations, 1);
	return __libc_malloc(size);
}


void *calloc(size_t count, size_t size)
{
	atomic_fetch_add(&allocations, 1);
	return __libc_calloc(count, size);
}


void *realloc(void *pointer, size_t size)
{
	atomic_fetch_add(&allocations, 1);
	return __libc_realloc(pointer, size);
}
#endif


static char *model_path(const char *name)
{
	const char *models = getenv("SLAB_MODELS");
	char *path = NULL;

	cr_assert_not_null(models, "SLAB_MODELS is not set");
	cr_assert_gt(asprintf(&path, "%s/%s", models, name), 0);
	return path;
}


Test(allocation, decode_steady_state, .timeout = 30)
{
	struct engine_options options = {
		.threads = 2, .max_batch = 2, .max_step_tokens = 64,
		.max_context = 128,
	};
	struct engine_model *model = NULL;
	struct engine *engine = NULL;
	struct engine_sampler *sampler = NULL;
	struct engine_sampling sampling;
	struct engine_error err = { { 0 } };
	struct engine_kv kv = { .block_tokens = 16, .n_blocks = 8,
				.type = ENGINE_KV_F32 };
	int32_t blocks[8] = { 0, 1, 2, 3, 4, 5, 6, 7 };
	int32_t history[64] = { 1 };
	char *path = model_path("stories260K.bin");
	float *logits;
	int32_t token = 1;
	long before;

	if (!COUNTING_ALLOCATOR)
		cr_skip_test("the sanitizer's allocator cannot be counted");

	cr_assert_eq(engine_model_open(path, &model, &err), 0, "%s", err.message);
	cr_assert_eq(engine_create(model, &options, &engine, &err), 0, "%s",
		     err.message);
	const struct engine_shape *shape = engine_model_shape(model);

	cr_assert_eq(engine_sampler_create(shape->vocab_size, &sampler), 0);
	kv.base = calloc(kv.n_blocks,
			 engine_kv_block_bytes(shape, kv.block_tokens, kv.type));
	logits = malloc((size_t)shape->vocab_size * sizeof(float));
	cr_assert_not_null(kv.base);
	cr_assert_not_null(logits);
	engine_sampling_defaults(&sampling);
	sampling.temperature = 0.8f;
	sampling.top_k = 40;
	sampling.top_p = 0.9f;
	sampling.min_p = 0.05f;
	sampling.repetition_penalty = 1.1f;

	/* Warm up, so that lazily started threads and buffers exist. */
	cr_assert_eq(engine_decode(engine, &kv, blocks, 8, token, 0, logits, &err),
		     0, "%s", err.message);

	before = atomic_load(&allocations);
	for (int pos = 1; pos < 100; pos++) {
		token = engine_sample(sampler, &sampling, logits, history,
				      (size_t)(pos < 64 ? pos : 64), (uint64_t)pos);
		history[pos % 64] = token;
		cr_assert_eq(engine_decode(engine, &kv, blocks, 8, token, pos,
					   logits, &err), 0, "%s", err.message);
	}
	cr_assert_eq(atomic_load(&allocations) - before, 0,
		     "%ld allocations during 99 decode steps and samples",
		     atomic_load(&allocations) - before);

	free(logits);
	free(kv.base);
	engine_sampler_destroy(sampler);
	engine_destroy(engine);
	engine_model_close(model);
	free(path);
}
