/*
 * Tests of the inference engine through worker/engine.h. Greedy generation
 * on stories260K must reproduce the output of the llama2.c reference
 * implementation, in process and through slab-run. Logits must be bitwise
 * equal whether a position is prefilled or decoded, batched or alone, and
 * whatever the thread count. Synthetic checkpoints cover shapes no real
 * file has. The remaining tests cover malformed checkpoints and tokenizers,
 * engine_step argument checks, the float16 KV cache, the sampler and the
 * metrics.
 *
 * Model files come from SLAB_MODELS, the expected outputs from the golden/
 * folder beside it, and slab-run from SLAB_BUILD_DIR. Synthetic checkpoints
 * and malformed files are written into a fresh folder under TMPDIR (or
 * /tmp) that each test removes.
 */
#include "worker/engine.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/*
 * Seconds each test may run. One value for all, because the Criterion
 * 2.4.1 runner leaks memory when the tests of one run have different
 * timeouts, and LeakSanitizer then fails a sanitized binary at exit.
 */
#define TEST_TIMEOUT 30

#define STORIES_VOCAB 512

/* "Once upon a time" in tok512, BOS first. */
static const int32_t once_upon_a_time[] = { 1, 403, 407, 261, 378 };


/* ---- Files and folders -------------------------------------------------- */

/* Returns SLAB_MODELS/relative in a malloc'd string. */
static char *data_path(const char *relative)
{
	const char *models = getenv("SLAB_MODELS");
	char *path;

	cr_assert_not_null(models, "SLAB_MODELS is not set; set it to the "
			   "folder that contains stories260K.bin");
	cr_assert(asprintf(&path, "%s/%s", models, relative) > 0);
	return path;
}


/* Returns the expected-output file golden/name beside the models folder. */
static char *golden_path(const char *name)
{
	char *relative, *path;

	cr_assert(asprintf(&relative, "../golden/%s", name) > 0);
	path = data_path(relative);
	free(relative);
	return path;
}


/* Reads a whole file into a malloc'd, NUL-terminated buffer. */
static char *read_file(const char *path, size_t *len)
{
	FILE *file = fopen(path, "rb");
	char *buffer;
	long size;

	cr_assert_not_null(file, "%s: %s", path, strerror(errno));
	cr_assert_eq(fseek(file, 0, SEEK_END), 0);
	size = ftell(file);
	cr_assert_geq(size, 0);
	rewind(file);
	buffer = malloc((size_t)size + 1);
	cr_assert_not_null(buffer);
	cr_assert_eq(fread(buffer, 1, (size_t)size, file), (size_t)size,
		     "%s: short read", path);
	buffer[size] = '\0';
	fclose(file);
	*len = (size_t)size;
	return buffer;
}


static void write_bytes(const char *path, const void *bytes, size_t len)
{
	FILE *file = fopen(path, "wb");

	cr_assert_not_null(file, "%s: %s", path, strerror(errno));
	cr_assert_eq(fwrite(bytes, 1, len, file), len, "%s: short write", path);
	cr_assert_eq(fclose(file), 0, "%s: %s", path, strerror(errno));
}


/* Folders of the running test (each runs in its own process) to remove. */
static char *open_temp_dirs[4];


/* Creates an empty folder for one test's files. */
static char *make_temp_dir(void)
{
	const char *base = getenv("TMPDIR");
	char *dir;
	size_t slot = 0;

	while (slot < 4 && open_temp_dirs[slot] != NULL)
		slot++;
	cr_assert_lt(slot, 4, "more than 4 temporary folders in one test");
	cr_assert(asprintf(&dir, "%s/slab-test-engine-XXXXXX",
			   base != NULL && base[0] != '\0' ? base : "/tmp") > 0);
	cr_assert_not_null(mkdtemp(dir), "mkdtemp(%s): %s", dir,
			   strerror(errno));
	open_temp_dirs[slot] = dir;
	return dir;
}


/*
 * Removes dir and the files and empty folders in it, and returns 0 or -1.
 * Uses no asserts, so the suite cleanup can call it after a failure.
 */
static int remove_dir_contents(const char *dir)
{
	DIR *stream = opendir(dir);
	struct dirent *entry;
	int rc = 0;

	if (stream == NULL)
		return -1;
	while ((entry = readdir(stream)) != NULL) {
		char *path;

		if (strcmp(entry->d_name, ".") == 0 ||
		    strcmp(entry->d_name, "..") == 0)
			continue;
		if (asprintf(&path, "%s/%s", dir, entry->d_name) < 0) {
			rc = -1;
			continue;
		}
		if (unlink(path) != 0 && rmdir(path) != 0)
			rc = -1;
		free(path);
	}
	closedir(stream);
	if (rmdir(dir) != 0)
		rc = -1;
	return rc;
}


/* Removes a folder made by make_temp_dir() and everything in it. */
static void remove_temp_dir(char *dir)
{
	for (size_t slot = 0; slot < 4; slot++)
		if (open_temp_dirs[slot] == dir)
			open_temp_dirs[slot] = NULL;
	cr_assert_eq(remove_dir_contents(dir), 0, "cannot remove %s: %s", dir,
		     strerror(errno));
	free(dir);
}


/* Suite cleanup: removes the folders a failed test left behind. */
static void remove_leftover_temp_dirs(void)
{
	for (size_t slot = 0; slot < 4; slot++) {
		if (open_temp_dirs[slot] == NULL)
			continue;
		remove_dir_contents(open_temp_dirs[slot]);
		free(open_temp_dirs[slot]);
		open_temp_dirs[slot] = NULL;
	}
}


TestSuite(determinism, .fini = remove_leftover_temp_dirs);
TestSuite(shapes, .fini = remove_leftover_temp_dirs);
TestSuite(bad_files, .fini = remove_leftover_temp_dirs);


static char *join_path(const char *dir, const char *name)
{
	char *path;

	cr_assert(asprintf(&path, "%s/%s", dir, name) > 0);
	return path;
}


/* ---- Synthetic checkpoints ---------------------------------------------- */

/* splitmix64 step, for reproducible weights and token ids. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}


/* Uniform float in [0, 1). */
static float next_unit(uint64_t *state)
{
	return (float)(next_random(state) >> 40) / 16777216.0f;
}


/*
 * Writes count floats to file: uniform in [-scale, scale), or all equal to
 * scale when constant is set.
 */
static void write_floats(FILE *file, uint64_t count, float scale,
			 bool constant, uint64_t *state)
{
	float buffer[1024];

	while (count > 0) {
		size_t n = count < 1024 ? (size_t)count : 1024;

		for (size_t i = 0; i < n; i++)
			buffer[i] = constant ? scale
					     : (2.0f * next_unit(state) - 1.0f) *
						       scale;
		cr_assert_eq(fwrite(buffer, sizeof(float), n, file), n);
		count -= n;
	}
}


/*
 * Writes a llama2.c checkpoint of this shape: embeddings uniform in
 * [-1, 1), each matrix uniform in +-1/sqrt(fan-in), RMSNorm weights 1, so
 * activations keep a realistic range. A separate classifier is written
 * when shape->shared_classifier is false (negative vocab_size in the header).
 */
static void write_checkpoint(const char *path, const struct engine_shape *s,
			     uint64_t seed)
{
	uint64_t dim = (uint64_t)s->dim, hidden = (uint64_t)s->hidden_dim;
	uint64_t layers = (uint64_t)s->n_layers;
	uint64_t kv_dim = (uint64_t)engine_kv_dim(s);
	uint64_t head_size = (uint64_t)engine_head_size(s);
	float in_dim = 1.0f / sqrtf((float)s->dim);
	float in_hidden = 1.0f / sqrtf((float)s->hidden_dim);
	int32_t header[7] = { s->dim, s->hidden_dim, s->n_layers, s->n_heads,
			      s->n_kv_heads,
			      s->shared_classifier ? s->vocab_size
						   : -s->vocab_size,
			      s->seq_len };
	uint64_t state = seed;
	FILE *file = fopen(path, "wb");

	cr_assert_not_null(file, "%s: %s", path, strerror(errno));
	cr_assert_eq(fwrite(header, sizeof(header), 1, file), 1);
	write_floats(file, (uint64_t)s->vocab_size * dim, 1.0f, false, &state);
	write_floats(file, layers * dim, 1.0f, true, &state);        /* rms_att */
	write_floats(file, layers * dim * dim, in_dim, false, &state); /* wq */
	write_floats(file, 2 * layers * kv_dim * dim, in_dim, false,
		     &state);                                        /* wk, wv */
	write_floats(file, layers * dim * dim, in_dim, false, &state); /* wo */
	write_floats(file, layers * dim, 1.0f, true, &state);        /* rms_ffn */
	write_floats(file, layers * hidden * dim, in_dim, false, &state); /* w1 */
	write_floats(file, layers * dim * hidden, in_hidden, false,
		     &state);                                        /* w2 */
	write_floats(file, layers * hidden * dim, in_dim, false, &state); /* w3 */
	write_floats(file, dim, 1.0f, true, &state);            /* rms_final */
	write_floats(file, (uint64_t)s->seq_len * head_size, 0.0f, true,
		     &state);                              /* unused RoPE tables */
	if (!s->shared_classifier)
		write_floats(file, (uint64_t)s->vocab_size * dim, in_dim, false,
			     &state);
	cr_assert_eq(fclose(file), 0, "%s: %s", path, strerror(errno));
}


/* Multi-head attention (n_kv_heads == n_heads), unlike stories260K. */
static const struct engine_shape synthetic_mha = {
	.dim = 64, .hidden_dim = 176, .n_layers = 2, .n_heads = 4,
	.n_kv_heads = 4, .vocab_size = 512, .seq_len = 128,
	.shared_classifier = true,
};


enum model_kind {
	MODEL_STORIES,
	MODEL_SYNTHETIC_MHA,
};

/* A loaded model and the temporary folder of its file, if synthetic. */
struct test_model {
	char *dir;
	char *path;
	struct engine_model *model;
	const struct engine_shape *shape;
};


static struct engine_model *open_model(const char *path)
{
	struct engine_model *model = NULL;
	struct engine_error err = { { 0 } };
	int rc = engine_model_open(path, &model, &err);

	cr_assert_eq(rc, 0, "engine_model_open(%s) returned %d: %s", path, rc,
		     err.message);
	return model;
}


static void test_model_open_shape(struct test_model *m,
				  const struct engine_shape *shape,
				  uint64_t seed)
{
	m->dir = make_temp_dir();
	m->path = join_path(m->dir, "model.bin");
	write_checkpoint(m->path, shape, seed);
	m->model = open_model(m->path);
	m->shape = engine_model_shape(m->model);
}


static void test_model_open(struct test_model *m, enum model_kind kind)
{
	*m = (struct test_model){ 0 };
	if (kind == MODEL_SYNTHETIC_MHA) {
		test_model_open_shape(m, &synthetic_mha, 7);
		return;
	}
	m->path = data_path("stories260K.bin");
	m->model = open_model(m->path);
	m->shape = engine_model_shape(m->model);
}


static void test_model_close(struct test_model *m)
{
	engine_model_close(m->model);
	free(m->path);
	if (m->dir != NULL)
		remove_temp_dir(m->dir);
}


/* ---- Engines and KV caches ---------------------------------------------- */

static struct engine *create_engine(const struct engine_model *model,
				    int threads, int max_batch,
				    int max_step_tokens, int max_context)
{
	struct engine_options options = {
		.threads = threads,
		.max_batch = max_batch,
		.max_step_tokens = max_step_tokens,
		.max_context = max_context,
	};
	struct engine *engine = NULL;
	struct engine_error err = { { 0 } };
	int rc = engine_create(model, &options, &engine, &err);

	cr_assert_eq(rc, 0, "engine_create returned %d: %s", rc, err.message);
	return engine;
}


/* A zero-filled KV cache of n_blocks blocks. */
struct kv_cache {
	struct engine_kv kv;
	size_t bytes;
	size_t block_bytes;
};


static void kv_cache_init(struct kv_cache *cache,
			  const struct engine_shape *shape, uint32_t n_blocks,
			  uint32_t block_tokens, enum engine_kv_type type)
{
	cache->block_bytes = (size_t)engine_kv_block_bytes(shape, block_tokens,
							   type);
	cache->bytes = cache->block_bytes * n_blocks;
	cache->kv = (struct engine_kv){
		.base = calloc(n_blocks, cache->block_bytes),
		.n_blocks = n_blocks,
		.block_tokens = block_tokens,
		.type = type,
	};
	cr_assert_not_null(cache->kv.base, "calloc of %zu bytes failed",
			   cache->bytes);
}


static void kv_cache_free(struct kv_cache *cache)
{
	free(cache->kv.base);
	cache->kv.base = NULL;
}


static const void *kv_block(const struct kv_cache *cache, int32_t block)
{
	return (const char *)cache->kv.base + (size_t)block * cache->block_bytes;
}


static float *alloc_logits(size_t rows, int32_t vocab_size)
{
	float *logits = malloc(rows * (size_t)vocab_size * sizeof(float));

	cr_assert_not_null(logits);
	return logits;
}


/* Fills ids with reproducible token ids in [3, vocab_size), BOS first. */
static void random_tokens(int32_t *ids, int n, int32_t vocab_size,
			  uint64_t seed)
{
	uint64_t state = seed;

	for (int i = 0; i < n; i++)
		ids[i] = i == 0 ? ENGINE_TOKEN_BOS
				: 3 + (int32_t)(next_random(&state) %
						(uint64_t)(vocab_size - 3));
}


/* Fills blocks with a reproducible permutation of 0 .. n - 1. */
static void shuffled_blocks(int32_t *blocks, int n, uint64_t seed)
{
	uint64_t state = seed;

	for (int i = 0; i < n; i++)
		blocks[i] = i;
	for (int i = n - 1; i > 0; i--) {
		int j = (int)(next_random(&state) % (uint64_t)(i + 1));
		int32_t swap = blocks[i];

		blocks[i] = blocks[j];
		blocks[j] = swap;
	}
}


static void prefill(struct engine *engine, const struct engine_kv *kv,
		    const int32_t *blocks, int32_t n_blocks,
		    const int32_t *tokens, int32_t n, int32_t start,
		    float *logits)
{
	struct engine_error err = { { 0 } };
	int rc = engine_prefill(engine, kv, blocks, n_blocks, tokens, n, start,
				logits, &err);

	cr_assert_eq(rc, 0, "prefill of %d tokens at %d returned %d: %s", n,
		     start, rc, err.message);
}


static void decode(struct engine *engine, const struct engine_kv *kv,
		   const int32_t *blocks, int32_t n_blocks, int32_t token,
		   int32_t position, float *logits)
{
	struct engine_error err = { { 0 } };
	int rc = engine_decode(engine, kv, blocks, n_blocks, token, position,
			       logits, &err);

	cr_assert_eq(rc, 0, "decode at %d returned %d: %s", position, rc,
		     err.message);
}


static void step(struct engine *engine, const struct engine_kv *kv,
		 const struct engine_sequence *sequences, int n_sequences)
{
	struct engine_error err = { { 0 } };
	int rc = engine_step(engine, kv, sequences, n_sequences, &err);

	cr_assert_eq(rc, 0, "step of %d sequences returned %d: %s",
		     n_sequences, rc, err.message);
}


/* Asserts two logits rows are bitwise equal, naming the first difference. */
static void assert_same_logits(const float *a, const float *b,
			       int32_t vocab_size, const char *what)
{
	if (memcmp(a, b, (size_t)vocab_size * sizeof(float)) == 0)
		return;
	for (int32_t i = 0; i < vocab_size; i++)
		cr_assert(memcmp(&a[i], &b[i], sizeof(float)) == 0,
			  "%s: logit %d is %a and %a", what, i, (double)a[i],
			  (double)b[i]);
}


static void assert_finite_logits(const float *logits, int32_t vocab_size,
				 const char *what)
{
	for (int32_t i = 0; i < vocab_size; i++)
		cr_assert(isfinite(logits[i]), "%s: logit %d is %g", what, i,
			  (double)logits[i]);
}


/* ---- Greedy generation -------------------------------------------------- */

struct text {
	char *bytes;
	size_t len;
	size_t capacity;
};


static void text_append(struct text *text, const char *bytes, size_t len)
{
	if (text->len + len + 1 > text->capacity) {
		text->capacity = 2 * (text->len + len + 1);
		text->bytes = realloc(text->bytes, text->capacity);
		cr_assert_not_null(text->bytes);
	}
	memcpy(text->bytes + text->len, bytes, len);
	text->len += len;
	text->bytes[text->len] = '\0';
}


struct generation {
	int32_t ids[1024]; /* generated ids, prompt not included */
	size_t n_ids;
	struct text text;  /* prompt, completion, then "\n" */
};


/*
 * Generates up to max_tokens tokens greedily with stories260K after the
 * prompt, the way slab-run does: prefill the prompt, then sample from the
 * last logits and decode the token, stopping at an end token.
 */
static void generate_greedy(const char *prompt, int max_tokens,
			    enum engine_kv_type kv_type,
			    struct generation *out)
{
	const uint32_t block_tokens = 16;
	char *model_file = data_path("stories260K.bin");
	char *tokenizer_file = data_path("tok512.bin");
	struct engine_model *model = open_model(model_file);
	const struct engine_shape *shape = engine_model_shape(model);
	struct engine_tokenizer *tokenizer = NULL;
	struct engine_sampler *sampler = NULL;
	struct engine_sampling sampling;
	struct engine_detokenizer detokenizer;
	struct engine_error err = { { 0 } };
	struct engine *engine;
	struct kv_cache cache;
	int32_t tokens[1024], blocks[64];
	size_t n_prompt;
	char chunk[4096];
	float *logits = alloc_logits(1, shape->vocab_size);

	cr_assert_eq(engine_tokenizer_open(tokenizer_file, shape->vocab_size,
					   &tokenizer, &err), 0,
		     "%s", err.message);
	cr_assert_eq(engine_tokenize(tokenizer, prompt, strlen(prompt), true,
				     tokens, 1024, &n_prompt), 0);
	cr_assert_leq(n_prompt + (size_t)max_tokens, 1024);
	cr_assert_eq(engine_sampler_create(shape->vocab_size, &sampler), 0);
	engine_sampling_defaults(&sampling);
	engine = create_engine(model, 2, 1, 256, 0);
	kv_cache_init(&cache, shape, 64, block_tokens, kv_type);
	for (int32_t b = 0; b < 64; b++)
		blocks[b] = b;

	prefill(engine, &cache.kv, blocks, 64, tokens, (int32_t)n_prompt, 0,
		logits);
	*out = (struct generation){ .n_ids = 0 };
	text_append(&out->text, prompt, strlen(prompt));
	engine_detokenizer_init(&detokenizer, tokens[n_prompt - 1]);

	size_t n = n_prompt;

	for (int generated = 0; generated < max_tokens; generated++) {
		int32_t next = engine_sample(sampler, &sampling, logits, tokens,
					     n, n);

		if (engine_is_end_token(next))
			break;
		out->ids[out->n_ids++] = next;
		text_append(&out->text, chunk,
			    engine_detokenize(tokenizer, &detokenizer, next,
					      chunk, sizeof(chunk)));
		tokens[n++] = next;
		if (generated + 1 == max_tokens)
			break;
		decode(engine, &cache.kv, blocks, 64, next, (int32_t)n - 1,
		       logits);
	}
	text_append(&out->text, chunk,
		    engine_detokenize_flush(&detokenizer, chunk, sizeof(chunk)));
	text_append(&out->text, "\n", 1);

	free(logits);
	kv_cache_free(&cache);
	engine_destroy(engine);
	engine_sampler_destroy(sampler);
	engine_tokenizer_close(tokenizer);
	engine_model_close(model);
	free(model_file);
	free(tokenizer_file);
}


/*
 * Parses the line starting with label (e.g. "generated_ids:") of an ids
 * file into ids and returns the count.
 */
static size_t parse_ids_line(const char *content, const char *label,
			     int32_t *ids, size_t max_ids)
{
	const char *line = strstr(content, label);
	const char *cursor;
	size_t n = 0;

	cr_assert_not_null(line, "no line starts with \"%s\"", label);
	cursor = line + strlen(label);
	for (;;) {
		char *end;
		long id;

		while (*cursor == ' ' || *cursor == '\t')
			cursor++;
		if (*cursor == '\n' || *cursor == '\0')
			break;
		id = strtol(cursor, &end, 10);
		cr_assert(end != cursor, "\"%s\": not an id at \"%.10s\"", label,
			  cursor);
		cr_assert_lt(n, max_ids);
		ids[n++] = (int32_t)id;
		cursor = end;
	}
	return n;
}


/* Asserts got equals the expected text, naming the first differing byte. */
static void assert_same_text(const char *got, size_t got_len,
			     const char *expected, size_t expected_len,
			     const char *what)
{
	size_t i = 0;

	while (i < got_len && i < expected_len && got[i] == expected[i])
		i++;
	cr_assert(i == got_len && i == expected_len,
		  "%s: %zu bytes, expected %zu; first difference at byte %zu: "
		  "\"%.40s\" against \"%.40s\"", what, got_len, expected_len,
		  i, got + i, expected + i);
}


/*
 * Runs slab-run on stories260K with extra arguments and returns its
 * standard output; fails the test unless it exits with status 0.
 */
static char *run_slab_run(char *const extra[], size_t *len)
{
	const char *build = getenv("SLAB_BUILD_DIR");
	char *program, *model = data_path("stories260K.bin");
	char *tokenizer = data_path("tok512.bin");
	char *argv[32];
	int argc = 0, out_pipe[2], err_pipe[2], status;
	struct text output = { 0 }, errors = { 0 };
	char buffer[4096];
	ssize_t n;
	pid_t pid;

	cr_assert_not_null(build, "SLAB_BUILD_DIR is not set; set it to the "
			   "folder that contains slab-run");
	program = join_path(build, "slab-run");
	cr_assert(access(program, X_OK) == 0, "%s: %s; build it with make",
		  program, strerror(errno));
	argv[argc++] = program;
	argv[argc++] = "--model";
	argv[argc++] = model;
	argv[argc++] = "--tokenizer";
	argv[argc++] = tokenizer;
	for (size_t i = 0; extra[i] != NULL; i++)
		argv[argc++] = extra[i];
	argv[argc] = NULL;

	cr_assert(pipe2(out_pipe, O_CLOEXEC) == 0 &&
		  pipe2(err_pipe, O_CLOEXEC) == 0);
	pid = fork();
	cr_assert(pid >= 0, "fork failed: %s", strerror(errno));
	if (pid == 0) {
		dup2(out_pipe[1], STDOUT_FILENO);
		dup2(err_pipe[1], STDERR_FILENO);
		execv(program, argv);
		_exit(127);
	}
	close(out_pipe[1]);
	close(err_pipe[1]);

	/* Standard error gets two short lines, so it cannot fill its pipe. */
	text_append(&output, "", 0);
	while ((n = read(out_pipe[0], buffer, sizeof(buffer))) != 0) {
		cr_assert(n > 0 || errno == EINTR, "read: %s", strerror(errno));
		if (n > 0)
			text_append(&output, buffer, (size_t)n);
	}
	text_append(&errors, "", 0);
	while ((n = read(err_pipe[0], buffer, sizeof(buffer))) != 0) {
		cr_assert(n > 0 || errno == EINTR, "read: %s", strerror(errno));
		if (n > 0)
			text_append(&errors, buffer, (size_t)n);
	}
	close(out_pipe[0]);
	close(err_pipe[0]);
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "slab-run failed (status 0x%x): %s", status, errors.bytes);

	free(errors.bytes);
	free(program);
	free(model);
	free(tokenizer);
	*len = output.len;
	return output.bytes;
}


/* ---- Golden outputs ----------------------------------------------------- */

Test(golden, once_upon_a_time_in_process, .timeout = TEST_TIMEOUT)
{
	int32_t prompt_ids[16], expected_ids[1024];
	char *ids_file = golden_path("stories260K-once-upon-a-time.n200.ids");
	char *text_file = golden_path("stories260K-once-upon-a-time.n200.txt");
	size_t ids_len, text_len, n_prompt, n_expected;
	char *ids_content = read_file(ids_file, &ids_len);
	char *expected_text = read_file(text_file, &text_len);
	struct generation *got = calloc(1, sizeof(*got));

	cr_assert_not_null(got);
	n_prompt = parse_ids_line(ids_content, "prompt_ids:", prompt_ids, 16);
	n_expected = parse_ids_line(ids_content, "generated_ids:", expected_ids,
				    1024);
	cr_assert_eq(n_prompt, 5);
	for (size_t i = 0; i < n_prompt; i++)
		cr_assert_eq(prompt_ids[i], once_upon_a_time[i]);
	cr_assert_eq(n_expected, 196, "%s lists %zu generated ids", ids_file,
		     n_expected);

	generate_greedy("Once upon a time", 196, ENGINE_KV_F32, got);
	cr_assert_eq(got->n_ids, n_expected, "generated %zu ids, expected %zu",
		     got->n_ids, n_expected);
	for (size_t i = 0; i < n_expected; i++)
		cr_assert_eq(got->ids[i], expected_ids[i],
			     "generated id %zu is %d, expected %d", i,
			     got->ids[i], expected_ids[i]);
	assert_same_text(got->text.bytes, got->text.len, expected_text,
			 text_len, "generated text");

	free(got->text.bytes);
	free(got);
	free(ids_content);
	free(expected_text);
	free(ids_file);
	free(text_file);
}


Test(golden, once_upon_a_time_slab_run, .timeout = TEST_TIMEOUT)
{
	char *text_file = golden_path("stories260K-once-upon-a-time.n200.txt");
	char *extra[] = { "--prompt", "Once upon a time", "--max-tokens", "196",
			  NULL };
	size_t expected_len, output_len;
	char *expected = read_file(text_file, &expected_len);
	char *output = run_slab_run(extra, &output_len);

	assert_same_text(output, output_len, expected, expected_len,
			 "slab-run output");
	free(output);
	free(expected);
	free(text_file);
}


Test(golden, empty_prompt_in_process, .timeout = TEST_TIMEOUT)
{
	char *text_file = golden_path("stories260K-no-prompt.n256.txt");
	size_t expected_len;
	char *expected = read_file(text_file, &expected_len);
	struct generation *got = calloc(1, sizeof(*got));

	cr_assert_not_null(got);
	generate_greedy("", 256, ENGINE_KV_F32, got);
	cr_assert_eq(got->n_ids, 256, "generated %zu ids, expected 256",
		     got->n_ids);
	assert_same_text(got->text.bytes, got->text.len, expected,
			 expected_len, "generated text");
	free(got->text.bytes);
	free(got);
	free(expected);
	free(text_file);
}


Test(golden, empty_prompt_slab_run, .timeout = TEST_TIMEOUT)
{
	char *text_file = golden_path("stories260K-no-prompt.n256.txt");
	char *extra[] = { "--max-tokens", "256", NULL };
	size_t expected_len, output_len;
	char *expected = read_file(text_file, &expected_len);
	char *output = run_slab_run(extra, &output_len);

	assert_same_text(output, output_len, expected, expected_len,
			 "slab-run output");
	free(output);
	free(expected);
	free(text_file);
}


/* ---- Determinism -------------------------------------------------------- */

/*
 * Prefill of a prompt, in one call and in two chunks, against decoding every
 * token from position 0: the logits of the last prompt position and of the
 * decode steps after it, and the KV cache contents, are bitwise equal.
 */
static void check_prefill_matches_decode(enum model_kind kind)
{
	enum { N_PROMPT = 40, N_DECODE = 6, N_TOTAL = N_PROMPT + N_DECODE };
	const uint32_t block_tokens = 8, n_blocks = 8;
	struct test_model m;
	struct kv_cache whole, chunked, single;
	int32_t tokens[N_TOTAL], blocks[8];
	struct engine *engine;
	int32_t vocab;
	float *expected, *got;

	test_model_open(&m, kind);
	vocab = m.shape->vocab_size;
	engine = create_engine(m.model, 2, 1, 64, 64);
	random_tokens(tokens, N_TOTAL, vocab, 11);
	shuffled_blocks(blocks, (int)n_blocks, 12);
	kv_cache_init(&whole, m.shape, n_blocks, block_tokens, ENGINE_KV_F32);
	kv_cache_init(&chunked, m.shape, n_blocks, block_tokens, ENGINE_KV_F32);
	kv_cache_init(&single, m.shape, n_blocks, block_tokens, ENGINE_KV_F32);
	expected = alloc_logits(N_DECODE + 1, vocab);
	got = alloc_logits(2, vocab);

	/* One token at a time from position 0. */
	for (int32_t pos = 0; pos < N_TOTAL; pos++)
		decode(engine, &single.kv, blocks, 8, tokens[pos], pos,
		       pos >= N_PROMPT - 1
			       ? expected + (size_t)(pos - (N_PROMPT - 1)) * vocab
			       : NULL);

	/* The prompt in one call, then the same decode steps. */
	prefill(engine, &whole.kv, blocks, 8, tokens, N_PROMPT, 0, got);
	assert_same_logits(got, expected, vocab, "last prompt position");
	for (int32_t pos = N_PROMPT; pos < N_TOTAL; pos++) {
		char what[64];

		decode(engine, &whole.kv, blocks, 8, tokens[pos], pos, got);
		snprintf(what, sizeof(what), "decode at position %d", pos);
		assert_same_logits(got, expected +
					       (size_t)(pos - (N_PROMPT - 1)) *
						       vocab,
				   vocab, what);
	}
	cr_assert(memcmp(whole.kv.base, single.kv.base, whole.bytes) == 0,
		  "KV cache after prefill differs from token by token");

	/* The prompt in chunks of 17 and 23 tokens. */
	prefill(engine, &chunked.kv, blocks, 8, tokens, 17, 0, NULL);
	prefill(engine, &chunked.kv, blocks, 8, tokens + 17, N_PROMPT - 17, 17,
		got);
	assert_same_logits(got, expected, vocab, "prompt in two chunks");

	free(expected);
	free(got);
	kv_cache_free(&whole);
	kv_cache_free(&chunked);
	kv_cache_free(&single);
	engine_destroy(engine);
	test_model_close(&m);
}


Test(determinism, prefill_matches_decode_stories260K, .timeout = TEST_TIMEOUT)
{
	check_prefill_matches_decode(MODEL_STORIES);
}


Test(determinism, prefill_matches_decode_synthetic_mha, .timeout = TEST_TIMEOUT)
{
	check_prefill_matches_decode(MODEL_SYNTHETIC_MHA);
}


/* Three sessions at different positions, for the batching tests. */
enum { N_SESSIONS = 3, SESSION_BLOCKS = 8, SESSION_TOKENS = 64 };

struct session {
	int32_t tokens[SESSION_TOKENS];
	int32_t blocks[SESSION_BLOCKS];
	int32_t length; /* positions already in the KV cache */
};

static const int32_t session_prompts[N_SESSIONS] = { 9, 21, 3 };


/*
 * Gives each session its tokens, and its blocks from a shuffled
 * permutation of the shared cache's blocks when shared is set, or blocks
 * 0 .. SESSION_BLOCKS - 1 of its own cache otherwise.
 */
static void sessions_init(struct session *sessions, int32_t vocab,
			  bool shared)
{
	int32_t permutation[N_SESSIONS * SESSION_BLOCKS];

	shuffled_blocks(permutation, N_SESSIONS * SESSION_BLOCKS, 21);
	for (int s = 0; s < N_SESSIONS; s++) {
		random_tokens(sessions[s].tokens, SESSION_TOKENS, vocab,
			      100 + (uint64_t)s);
		for (int b = 0; b < SESSION_BLOCKS; b++)
			sessions[s].blocks[b] =
				shared ? permutation[s * SESSION_BLOCKS + b] : b;
		sessions[s].length = 0;
	}
}


static struct engine_sequence session_sequence(struct session *session,
					       int32_t n, float *logits)
{
	return (struct engine_sequence){
		.tokens = session->tokens + session->length,
		.n = n,
		.start = session->length,
		.blocks = session->blocks,
		.n_blocks = SESSION_BLOCKS,
		.logits = logits,
	};
}


/*
 * A session's decode step alone (each session in its own cache with
 * contiguous blocks) against the same steps batched in one engine_step,
 * the sessions sharing one cache through shuffled block tables.
 */
static void check_batch_matches_alone(enum model_kind kind)
{
	const uint32_t block_tokens = 4;
	struct session alone[N_SESSIONS], shared[N_SESSIONS];
	struct engine_sequence batch[N_SESSIONS];
	struct kv_cache own[N_SESSIONS], common;
	struct test_model m;
	struct engine *engine;
	float *expected, *got;
	int32_t vocab;

	test_model_open(&m, kind);
	vocab = m.shape->vocab_size;
	engine = create_engine(m.model, 2, N_SESSIONS, 64, 32);
	expected = alloc_logits(N_SESSIONS, vocab);
	got = alloc_logits(N_SESSIONS, vocab);
	sessions_init(alone, vocab, false);
	sessions_init(shared, vocab, true);
	kv_cache_init(&common, m.shape, N_SESSIONS * SESSION_BLOCKS,
		      block_tokens, ENGINE_KV_F32);

	for (int s = 0; s < N_SESSIONS; s++) {
		struct engine_sequence sequence;

		kv_cache_init(&own[s], m.shape, SESSION_BLOCKS, block_tokens,
			      ENGINE_KV_F32);
		sequence = session_sequence(&alone[s], session_prompts[s], NULL);
		step(engine, &own[s].kv, &sequence, 1);
		alone[s].length += session_prompts[s];
		sequence = session_sequence(&alone[s], 1,
					    expected + (size_t)s * vocab);
		step(engine, &own[s].kv, &sequence, 1);
		alone[s].length++;

		sequence = session_sequence(&shared[s], session_prompts[s],
					    NULL);
		step(engine, &common.kv, &sequence, 1);
		shared[s].length += session_prompts[s];
	}

	for (int s = 0; s < N_SESSIONS; s++)
		batch[s] = session_sequence(&shared[s], 1,
					    got + (size_t)s * vocab);
	step(engine, &common.kv, batch, N_SESSIONS);

	for (int s = 0; s < N_SESSIONS; s++) {
		char what[64];

		snprintf(what, sizeof(what), "session %d at position %d", s,
			 session_prompts[s]);
		assert_same_logits(got + (size_t)s * vocab,
				   expected + (size_t)s * vocab, vocab, what);
		for (int b = 0; b < SESSION_BLOCKS; b++)
			cr_assert(memcmp(kv_block(&own[s], b),
					 kv_block(&common, shared[s].blocks[b]),
					 own[s].block_bytes) == 0,
				  "session %d: KV block %d alone differs from "
				  "block %d of the shared cache", s, b,
				  shared[s].blocks[b]);
		kv_cache_free(&own[s]);
	}

	free(expected);
	free(got);
	kv_cache_free(&common);
	engine_destroy(engine);
	test_model_close(&m);
}


Test(determinism, batch_matches_alone_stories260K, .timeout = TEST_TIMEOUT)
{
	check_batch_matches_alone(MODEL_STORIES);
}


Test(determinism, batch_matches_alone_synthetic_mha, .timeout = TEST_TIMEOUT)
{
	check_batch_matches_alone(MODEL_SYNTHETIC_MHA);
}


/*
 * Runs three sessions with the given thread count: one step prefilling
 * all three prompts (40, 21 and 3 tokens), one decode step of all three,
 * and one step mixing an 8-token prefill chunk with two decode tokens.
 * Writes the 9 logits rows to logits and returns the KV cache.
 */
static struct kv_cache run_thread_scenario(const struct test_model *m,
					   int threads, float *logits)
{
	static const int32_t prompts[N_SESSIONS] = { 40, 21, 3 };
	const int32_t vocab = m->shape->vocab_size;
	struct session sessions[N_SESSIONS];
	struct engine_sequence batch[N_SESSIONS];
	struct engine *engine = create_engine(m->model, threads, N_SESSIONS,
					      64, 64);
	struct kv_cache cache;
	int row = 0;

	sessions_init(sessions, vocab, true);
	kv_cache_init(&cache, m->shape, N_SESSIONS * SESSION_BLOCKS, 8,
		      ENGINE_KV_F32);

	for (int s = 0; s < N_SESSIONS; s++)
		batch[s] = session_sequence(&sessions[s], prompts[s],
					    logits + (size_t)row++ * vocab);
	step(engine, &cache.kv, batch, N_SESSIONS);
	for (int s = 0; s < N_SESSIONS; s++)
		sessions[s].length += prompts[s];

	for (int s = 0; s < N_SESSIONS; s++)
		batch[s] = session_sequence(&sessions[s], 1,
					    logits + (size_t)row++ * vocab);
	step(engine, &cache.kv, batch, N_SESSIONS);
	for (int s = 0; s < N_SESSIONS; s++)
		sessions[s].length++;

	for (int s = 0; s < N_SESSIONS; s++)
		batch[s] = session_sequence(&sessions[s], s == 0 ? 8 : 1,
					    logits + (size_t)row++ * vocab);
	step(engine, &cache.kv, batch, N_SESSIONS);

	engine_destroy(engine);
	return cache;
}


static void check_threads_agree(enum model_kind kind)
{
	static const int thread_counts[] = { 2, 3 };
	struct test_model m;
	struct kv_cache single;
	float *expected, *got;
	int32_t vocab;

	test_model_open(&m, kind);
	vocab = m.shape->vocab_size;
	expected = alloc_logits(9, vocab);
	got = alloc_logits(9, vocab);
	single = run_thread_scenario(&m, 1, expected);

	for (size_t c = 0; c < sizeof(thread_counts) / sizeof(int); c++) {
		struct kv_cache cache = run_thread_scenario(&m, thread_counts[c],
							    got);

		for (int row = 0; row < 9; row++) {
			char what[64];

			snprintf(what, sizeof(what), "%d threads, logits row %d",
				 thread_counts[c], row);
			assert_same_logits(got + (size_t)row * vocab,
					   expected + (size_t)row * vocab, vocab,
					   what);
		}
		cr_assert(memcmp(cache.kv.base, single.kv.base, cache.bytes) == 0,
			  "KV cache with %d threads differs from 1 thread",
			  thread_counts[c]);
		kv_cache_free(&cache);
	}

	free(expected);
	free(got);
	kv_cache_free(&single);
	test_model_close(&m);
}


Test(determinism, threads_agree_stories260K, .timeout = TEST_TIMEOUT)
{
	check_threads_agree(MODEL_STORIES);
}


Test(determinism, threads_agree_synthetic_mha, .timeout = TEST_TIMEOUT)
{
	check_threads_agree(MODEL_SYNTHETIC_MHA);
}


/*
 * One step with a 6-token prefill chunk of session 0 and decode tokens of
 * sessions 1 and 2, against the three as separate calls.
 */
static void check_mixed_step(enum model_kind kind)
{
	static const int32_t chunk = 6;
	struct session separate[N_SESSIONS], mixed[N_SESSIONS];
	struct engine_sequence sequences[N_SESSIONS];
	struct kv_cache separate_cache, mixed_cache;
	struct test_model m;
	struct engine *engine;
	float *expected, *got;
	int32_t vocab;

	test_model_open(&m, kind);
	vocab = m.shape->vocab_size;
	engine = create_engine(m.model, 2, N_SESSIONS, 64, 32);
	expected = alloc_logits(N_SESSIONS, vocab);
	got = alloc_logits(N_SESSIONS, vocab);
	sessions_init(separate, vocab, true);
	sessions_init(mixed, vocab, true);
	kv_cache_init(&separate_cache, m.shape, N_SESSIONS * SESSION_BLOCKS, 4,
		      ENGINE_KV_F32);
	kv_cache_init(&mixed_cache, m.shape, N_SESSIONS * SESSION_BLOCKS, 4,
		      ENGINE_KV_F32);

	/* The same prompts in both caches, one session per call. */
	for (int s = 0; s < N_SESSIONS; s++) {
		struct engine_sequence sequence;

		sequence = session_sequence(&separate[s], session_prompts[s],
					    NULL);
		step(engine, &separate_cache.kv, &sequence, 1);
		separate[s].length += session_prompts[s];
		sequence = session_sequence(&mixed[s], session_prompts[s], NULL);
		step(engine, &mixed_cache.kv, &sequence, 1);
		mixed[s].length += session_prompts[s];
	}

	for (int s = 0; s < N_SESSIONS; s++) {
		struct engine_sequence sequence = session_sequence(
			&separate[s], s == 0 ? chunk : 1,
			expected + (size_t)s * vocab);

		step(engine, &separate_cache.kv, &sequence, 1);
		sequences[s] = session_sequence(&mixed[s], s == 0 ? chunk : 1,
						got + (size_t)s * vocab);
	}
	step(engine, &mixed_cache.kv, sequences, N_SESSIONS);

	for (int s = 0; s < N_SESSIONS; s++) {
		char what[64];

		snprintf(what, sizeof(what), "session %d", s);
		assert_same_logits(got + (size_t)s * vocab,
				   expected + (size_t)s * vocab, vocab, what);
	}
	cr_assert(memcmp(mixed_cache.kv.base, separate_cache.kv.base,
			 mixed_cache.bytes) == 0,
		  "KV cache after the mixed step differs from separate calls");

	free(expected);
	free(got);
	kv_cache_free(&separate_cache);
	kv_cache_free(&mixed_cache);
	engine_destroy(engine);
	test_model_close(&m);
}


Test(determinism, mixed_step_matches_separate_stories260K, .timeout = TEST_TIMEOUT)
{
	check_mixed_step(MODEL_STORIES);
}


Test(determinism, mixed_step_matches_separate_synthetic_mha, .timeout = TEST_TIMEOUT)
{
	check_mixed_step(MODEL_SYNTHETIC_MHA);
}


/* ---- Synthetic shapes --------------------------------------------------- */

/*
 * Prefills prompt (n_prompt ids) and decodes n_decode greedy tokens,
 * asserting that every logits row is finite. Writes the n_decode + 1 rows
 * to logits and the chosen ids to generated.
 */
static void run_greedy_steps(const struct test_model *m, const int32_t *prompt,
			     int32_t n_prompt, int n_decode, float *logits,
			     int32_t *generated)
{
	const int32_t vocab = m->shape->vocab_size;
	struct engine *engine = create_engine(m->model, 2, 1, 32, 32);
	struct engine_sampler *sampler = NULL;
	struct engine_sampling greedy;
	struct kv_cache cache;
	int32_t blocks[4] = { 3, 1, 0, 2 };
	float *scratch = alloc_logits(1, vocab);

	cr_assert_eq(engine_sampler_create(vocab, &sampler), 0);
	engine_sampling_defaults(&greedy);
	kv_cache_init(&cache, m->shape, 4, 8, ENGINE_KV_F32);

	prefill(engine, &cache.kv, blocks, 4, prompt, n_prompt, 0, logits);
	for (int i = 0; i <= n_decode; i++) {
		float *row = logits + (size_t)i * vocab;
		char what[64];

		snprintf(what, sizeof(what), "step %d", i);
		assert_finite_logits(row, vocab, what);
		if (i == n_decode)
			break;
		memcpy(scratch, row, (size_t)vocab * sizeof(float));
		generated[i] = engine_sample(sampler, &greedy, scratch, NULL, 0,
					     0);
		cr_assert(generated[i] >= 0 && generated[i] < vocab);
		decode(engine, &cache.kv, blocks, 4, generated[i], n_prompt + i,
		       row + vocab);
	}

	free(scratch);
	kv_cache_free(&cache);
	engine_sampler_destroy(sampler);
	engine_destroy(engine);
}


/* Runs the greedy steps twice on fresh engines and compares bit for bit. */
static void check_shape_runs(const struct engine_shape *shape,
			     const int32_t *prompt, int32_t n_prompt)
{
	enum { N_DECODE = 4 };
	struct test_model m = { 0 };
	int32_t first_ids[N_DECODE], second_ids[N_DECODE];
	float *first, *second;
	int32_t vocab = shape->vocab_size;

	test_model_open_shape(&m, shape, 42);
	cr_assert_eq(m.shape->dim, shape->dim);
	cr_assert_eq(m.shape->n_kv_heads, shape->n_kv_heads);
	cr_assert_eq(m.shape->vocab_size, vocab);
	cr_assert_eq(m.shape->shared_classifier, shape->shared_classifier);
	first = alloc_logits(N_DECODE + 1, vocab);
	second = alloc_logits(N_DECODE + 1, vocab);

	run_greedy_steps(&m, prompt, n_prompt, N_DECODE, first, first_ids);
	run_greedy_steps(&m, prompt, n_prompt, N_DECODE, second, second_ids);
	for (int i = 0; i <= N_DECODE; i++) {
		char what[64];

		snprintf(what, sizeof(what), "second run, step %d", i);
		assert_same_logits(second + (size_t)i * vocab,
				   first + (size_t)i * vocab, vocab, what);
	}
	cr_assert(memcmp(first_ids, second_ids, sizeof(first_ids)) == 0);

	free(first);
	free(second);
	test_model_close(&m);
}


Test(shapes, llama2_vocabulary, .timeout = TEST_TIMEOUT)
{
	const struct engine_shape shape = {
		.dim = 64, .hidden_dim = 172, .n_layers = 2, .n_heads = 4,
		.n_kv_heads = 2, .vocab_size = 32000, .seq_len = 64,
		.shared_classifier = true,
	};
	const char *text = "I believe the meaning of life is";
	char *tokenizer_file = data_path("tokenizer.bin");
	struct engine_tokenizer *tokenizer = NULL;
	struct engine_error err = { { 0 } };
	int32_t ids[64];
	size_t n_ids;

	cr_assert_eq(engine_tokenizer_open(tokenizer_file, shape.vocab_size,
					   &tokenizer, &err), 0,
		     "%s", err.message);
	cr_assert_eq(engine_tokenize(tokenizer, text, strlen(text), true, ids,
				     64, &n_ids), 0);
	cr_assert_eq(n_ids, 8);
	check_shape_runs(&shape, ids, (int32_t)n_ids);
	engine_tokenizer_close(tokenizer);
	free(tokenizer_file);
}


Test(shapes, odd_dimensions, .timeout = TEST_TIMEOUT)
{
	/* Head size 24 and hidden 100 are not multiples of 16; vocab is odd. */
	const struct engine_shape shape = {
		.dim = 72, .hidden_dim = 100, .n_layers = 2, .n_heads = 3,
		.n_kv_heads = 3, .vocab_size = 301, .seq_len = 48,
		.shared_classifier = true,
	};
	int32_t prompt[7];

	random_tokens(prompt, 7, shape.vocab_size, 5);
	check_shape_runs(&shape, prompt, 7);
}


Test(shapes, grouped_query_separate_classifier, .timeout = TEST_TIMEOUT)
{
	const struct engine_shape shape = {
		.dim = 64, .hidden_dim = 172, .n_layers = 3, .n_heads = 8,
		.n_kv_heads = 2, .vocab_size = 512, .seq_len = 64,
		.shared_classifier = false,
	};
	int32_t prompt[6];

	random_tokens(prompt, 6, shape.vocab_size, 6);
	check_shape_runs(&shape, prompt, 6);
}


/* ---- Malformed files ---------------------------------------------------- */

/*
 * Asserts that opening path as a checkpoint fails with expected_rc (or any
 * negative value when expected_rc is 0) and a message that names the file
 * and contains every string of needles.
 */
static void expect_model_error(const char *path, int expected_rc,
			       const char *const *needles, size_t n_needles)
{
	struct engine_model *model = NULL;
	struct engine_error err = { { 0 } };
	int rc = engine_model_open(path, &model, &err);

	if (expected_rc != 0)
		cr_assert_eq(rc, expected_rc, "%s: returned %d, expected %d (%s)",
			     path, rc, expected_rc, err.message);
	else
		cr_assert_lt(rc, 0, "%s: opened, expected an error", path);
	cr_assert_null(model);
	cr_assert_not_null(strstr(err.message, path),
			   "message does not name the file: %s", err.message);
	for (size_t i = 0; i < n_needles; i++)
		cr_assert_not_null(strstr(err.message, needles[i]),
				   "message lacks \"%s\": %s", needles[i],
				   err.message);
}


static void expect_tokenizer_error(const char *path, int32_t vocab_size,
				   int expected_rc,
				   const char *const *needles, size_t n_needles)
{
	struct engine_tokenizer *tokenizer = NULL;
	struct engine_error err = { { 0 } };
	int rc = engine_tokenizer_open(path, vocab_size, &tokenizer, &err);

	if (expected_rc != 0)
		cr_assert_eq(rc, expected_rc, "%s: returned %d, expected %d (%s)",
			     path, rc, expected_rc, err.message);
	else
		cr_assert_lt(rc, 0, "%s: opened, expected an error", path);
	cr_assert_null(tokenizer);
	cr_assert_not_null(strstr(err.message, path),
			   "message does not name the file: %s", err.message);
	for (size_t i = 0; i < n_needles; i++)
		cr_assert_not_null(strstr(err.message, needles[i]),
				   "message lacks \"%s\": %s", needles[i],
				   err.message);
}


#define NEEDLES(...) (const char *const[]){ __VA_ARGS__ }, \
	sizeof((const char *const[]){ __VA_ARGS__ }) / sizeof(const char *)

/* Writes stories260K.bin cut or extended to len bytes into dir/name. */
static char *write_stories_copy(const char *dir, const char *name, size_t len)
{
	char *source = data_path("stories260K.bin");
	size_t source_len;
	char *bytes = read_file(source, &source_len);
	char *path = join_path(dir, name);

	bytes = realloc(bytes, len > source_len ? len : source_len);
	cr_assert_not_null(bytes);
	if (len > source_len)
		memset(bytes + source_len, 0, len - source_len);
	write_bytes(path, bytes, len);
	free(bytes);
	free(source);
	return path;
}


Test(bad_files, truncated_checkpoint, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();
	char *path = write_stories_copy(dir, "truncated.bin", 1056540 - 100);

	expect_model_error(path, -EINVAL,
			   NEEDLES("1056440 bytes", "1056540 bytes",
				   "truncated"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, oversized_checkpoint, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();
	char *path = write_stories_copy(dir, "oversized.bin", 1056540 + 1);

	expect_model_error(path, -EINVAL,
			   NEEDLES("1056541 bytes", "1056540 bytes"));
	free(path);
	remove_temp_dir(dir);
}


/* Writes a 7-field header followed by extra zero bytes. */
static char *write_header(const char *dir, const char *name,
			  const int32_t header[7], size_t extra)
{
	char *path = join_path(dir, name);
	size_t len = 7 * sizeof(int32_t) + extra;
	char *bytes = calloc(1, len);

	cr_assert_not_null(bytes);
	memcpy(bytes, header, 7 * sizeof(int32_t));
	write_bytes(path, bytes, len);
	free(bytes);
	return path;
}


Test(bad_files, dim_not_divisible_by_heads, .timeout = TEST_TIMEOUT)
{
	const int32_t header[7] = { 65, 172, 5, 8, 4, 512, 512 };
	char *dir = make_temp_dir();
	char *path = write_header(dir, "dim.bin", header, 4096);

	expect_model_error(path, -EINVAL, NEEDLES("dim 65", "n_heads 8"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, heads_not_divisible_by_kv_heads, .timeout = TEST_TIMEOUT)
{
	const int32_t header[7] = { 64, 172, 5, 8, 3, 512, 512 };
	char *dir = make_temp_dir();
	char *path = write_header(dir, "heads.bin", header, 4096);

	expect_model_error(path, -EINVAL, NEEDLES("n_heads 8", "n_kv_heads 3"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, odd_head_size, .timeout = TEST_TIMEOUT)
{
	/* dim 24 over 8 heads gives head size 3, which RoPE cannot pair. */
	const int32_t header[7] = { 24, 64, 2, 8, 8, 512, 64 };
	char *dir = make_temp_dir();
	char *path = write_header(dir, "head.bin", header, 4096);

	expect_model_error(path, -EINVAL, NEEDLES("head size", "3"));
	free(path);
	remove_temp_dir(dir);
}


static const struct {
	int field;
	int32_t value;
	const char *name;
	const char *text;
} bad_fields[] = {
	{ 0, 0, "dim", "0" },
	{ 0, -64, "dim", "-64" },
	{ 1, 0, "hidden_dim", "0" },
	{ 1, -172, "hidden_dim", "-172" },
	{ 2, 0, "n_layers", "0" },
	{ 2, -1, "n_layers", "-1" },
	{ 3, 0, "n_heads", "0" },
	{ 3, -8, "n_heads", "-8" },
	{ 4, 0, "n_kv_heads", "0" },
	{ 4, -4, "n_kv_heads", "-4" },
	{ 5, 0, "vocab_size", "0" },
	{ 5, INT32_MIN, "vocab_size", "-2147483648" },
	{ 6, 0, "seq_len", "0" },
	{ 6, -512, "seq_len", "-512" },
	{ 0, 1 << 30, "dim", "1073741824" },
	{ 1, INT32_MAX, "hidden_dim", "2147483647" },
	{ 2, 100000, "n_layers", "100000" },
	{ 3, 4096, "n_heads", "4096" },
	{ 5, 1 << 24, "vocab_size", "16777216" },
	{ 6, INT32_MAX, "seq_len", "2147483647" },
};


Test(bad_files, zero_negative_and_absurd_fields, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();

	for (size_t i = 0; i < sizeof(bad_fields) / sizeof(bad_fields[0]); i++) {
		int32_t header[7] = { 64, 172, 5, 8, 4, 512, 512 };
		char name[32];
		char *path;

		header[bad_fields[i].field] = bad_fields[i].value;
		snprintf(name, sizeof(name), "field%zu.bin", i);
		path = write_header(dir, name, header, 1056540 - 28);
		expect_model_error(path, -EINVAL,
				   NEEDLES(bad_fields[i].name,
					   bad_fields[i].text));
		free(path);
	}
	remove_temp_dir(dir);
}


Test(bad_files, largest_shape_in_small_file, .timeout = TEST_TIMEOUT)
{
	/* Every field at its maximum: the implied size must not overflow. */
	const int32_t header[7] = {
		ENGINE_MAX_DIM, ENGINE_MAX_HIDDEN_DIM, ENGINE_MAX_LAYERS,
		ENGINE_MAX_HEADS, ENGINE_MAX_HEADS, ENGINE_MAX_VOCAB,
		ENGINE_MAX_SEQ_LEN,
	};
	char *dir = make_temp_dir();
	char *path = write_header(dir, "largest.bin", header, 100);

	expect_model_error(path, -EINVAL, NEEDLES("128 bytes", "truncated"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, negative_vocab_without_classifier, .timeout = TEST_TIMEOUT)
{
	/*
	 * A negative vocab_size announces a separate classifier, which
	 * stories260K does not have, so the file is too short for its header.
	 */
	char *dir = make_temp_dir();
	char *path = write_stories_copy(dir, "negative.bin", 1056540);
	FILE *file = fopen(path, "r+b");
	int32_t vocab = -STORIES_VOCAB;

	cr_assert_not_null(file);
	cr_assert_eq(fseek(file, 5 * sizeof(int32_t), SEEK_SET), 0);
	cr_assert_eq(fwrite(&vocab, sizeof(vocab), 1, file), 1);
	cr_assert_eq(fclose(file), 0);
	expect_model_error(path, -EINVAL,
			   NEEDLES("separate classifier", "truncated"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, tokenizer_smaller_than_vocabulary, .timeout = TEST_TIMEOUT)
{
	char *path = data_path("tok512.bin");

	expect_tokenizer_error(path, 32000, -EINVAL, NEEDLES("512", "32000"));
	free(path);
}


Test(bad_files, tokenizer_larger_than_vocabulary, .timeout = TEST_TIMEOUT)
{
	char *model_file = data_path("stories260K.bin");
	char *path = data_path("tokenizer.bin");
	struct engine_model *model = open_model(model_file);
	int32_t vocab = engine_model_shape(model)->vocab_size;

	cr_assert_eq(vocab, STORIES_VOCAB);
	expect_tokenizer_error(path, vocab, -EINVAL, NEEDLES("512 pieces"));
	engine_model_close(model);
	free(model_file);
	free(path);
}


Test(bad_files, truncated_tokenizer, .timeout = TEST_TIMEOUT)
{
	static const size_t cuts[] = { 2, 4, 9, 3000, 6226 };
	char *source = data_path("tok512.bin");
	char *dir = make_temp_dir();
	size_t len;
	char *bytes = read_file(source, &len);

	cr_assert_eq(len, 6227);
	for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
		char name[32], size_text[32];
		char *path;

		snprintf(name, sizeof(name), "tok%zu.bin", cuts[i]);
		path = join_path(dir, name);
		write_bytes(path, bytes, cuts[i]);
		snprintf(size_text, sizeof(size_text), "%zu bytes", cuts[i]);
		if (cuts[i] < 4)
			expect_tokenizer_error(path, STORIES_VOCAB, -EINVAL,
					       NEEDLES(size_text));
		else
			expect_tokenizer_error(path, STORIES_VOCAB, -EINVAL,
					       NEEDLES("piece"));
		free(path);
	}
	free(bytes);
	free(source);
	remove_temp_dir(dir);
}


Test(bad_files, empty_file, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();
	char *path = join_path(dir, "empty.bin");

	write_bytes(path, "", 0);
	expect_model_error(path, -EINVAL, NEEDLES("0 bytes"));
	expect_tokenizer_error(path, STORIES_VOCAB, -EINVAL, NEEDLES("0 bytes"));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, missing_file, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();
	char *path = join_path(dir, "missing.bin");

	expect_model_error(path, -ENOENT, NEEDLES(strerror(ENOENT)));
	expect_tokenizer_error(path, STORIES_VOCAB, -ENOENT,
			       NEEDLES(strerror(ENOENT)));
	free(path);
	remove_temp_dir(dir);
}


Test(bad_files, directory, .timeout = TEST_TIMEOUT)
{
	char *dir = make_temp_dir();
	char *path = join_path(dir, "folder.bin");

	cr_assert_eq(mkdir(path, 0700), 0);
	expect_model_error(path, 0, NEEDLES("regular file"));
	expect_tokenizer_error(path, STORIES_VOCAB, 0, NEEDLES("regular file"));
	free(path);
	remove_temp_dir(dir);
}


/* ---- engine_step argument checks ---------------------------------------- */

/*
 * stories260K with max_batch 2, max_step_tokens 8, max_context 32 and a
 * cache of 4 blocks of 4 positions. Session 0 has positions 0 .. 4 in
 * blocks 2 and 0, so the cache is not all zero.
 */
struct step_fixture {
	struct test_model m;
	struct engine *engine;
	struct kv_cache cache;
	void *snapshot;
};

static const int32_t fixture_blocks[2] = { 2, 0 };


static void step_fixture_open(struct step_fixture *f)
{
	test_model_open(&f->m, MODEL_STORIES);
	f->engine = create_engine(f->m.model, 1, 2, 8, 32);
	kv_cache_init(&f->cache, f->m.shape, 4, 4, ENGINE_KV_F32);
	prefill(f->engine, &f->cache.kv, fixture_blocks, 2, once_upon_a_time,
		5, 0, NULL);
	f->snapshot = malloc(f->cache.bytes);
	cr_assert_not_null(f->snapshot);
	memcpy(f->snapshot, f->cache.kv.base, f->cache.bytes);
}


static void step_fixture_close(struct step_fixture *f)
{
	free(f->snapshot);
	kv_cache_free(&f->cache);
	engine_destroy(f->engine);
	test_model_close(&f->m);
}


/*
 * Asserts that the step fails with -EINVAL, a message containing needle,
 * and no change to the KV cache.
 */
static void expect_step_error(struct step_fixture *f, const char *what,
			      const struct engine_sequence *sequences,
			      int n_sequences, const char *needle)
{
	struct engine_error err = { { 0 } };
	int rc = engine_step(f->engine, &f->cache.kv, sequences, n_sequences,
			     &err);

	cr_assert_eq(rc, -EINVAL, "%s: returned %d, expected -EINVAL", what,
		     rc);
	cr_assert_not_null(strstr(err.message, needle),
			   "%s: message lacks \"%s\": %s", what, needle,
			   err.message);
	cr_assert(memcmp(f->cache.kv.base, f->snapshot, f->cache.bytes) == 0,
		  "%s: the failed step changed the KV cache", what);
}


Test(step_errors, token_outside_vocabulary, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	const int32_t next = 432, other_blocks[1] = { 1 };
	const int32_t too_large[2] = { 1, STORIES_VOCAB };
	const int32_t negative[2] = { 1, -1 };
	struct engine_sequence sequences[2] = {
		{ .tokens = &next, .n = 1, .start = 5,
		  .blocks = fixture_blocks, .n_blocks = 2 },
		{ .tokens = too_large, .n = 2, .start = 0,
		  .blocks = other_blocks, .n_blocks = 1 },
	};

	step_fixture_open(&f);
	expect_step_error(&f, "token 512 after a valid sequence", sequences, 2,
			  "512");
	sequences[1].tokens = negative;
	expect_step_error(&f, "token -1", sequences, 2, "-1");
	step_fixture_close(&f);
}


Test(step_errors, position_beyond_block_table, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	const int32_t tokens[3] = { 432, 383, 286 };
	struct engine_sequence decode_past = {
		.tokens = tokens, .n = 1, .start = 8,
		.blocks = fixture_blocks, .n_blocks = 2,
	};
	struct engine_sequence prefill_past = {
		.tokens = tokens, .n = 3, .start = 6,
		.blocks = fixture_blocks, .n_blocks = 2,
	};

	step_fixture_open(&f);
	expect_step_error(&f, "decode at position 8 with 2 blocks",
			  &decode_past, 1, "block table");
	expect_step_error(&f, "prefill of positions 6 to 8 with 2 blocks",
			  &prefill_past, 1, "block table");
	step_fixture_close(&f);
}


Test(step_errors, position_beyond_context, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	const int32_t token = 432;
	int32_t blocks[9] = { 0 };
	struct engine_sequence sequence = {
		.tokens = &token, .n = 1, .start = 32,
		.blocks = blocks, .n_blocks = 9,
	};

	step_fixture_open(&f);
	expect_step_error(&f, "decode at position 32 of a 32-position context",
			  &sequence, 1, "32");
	step_fixture_close(&f);
}


Test(step_errors, block_index_out_of_range, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	const int32_t token = 432;
	const int32_t past_end[2] = { 2, 4 };
	const int32_t negative[2] = { -1, 0 };
	struct engine_sequence sequence = {
		.tokens = &token, .n = 1, .start = 5,
		.blocks = past_end, .n_blocks = 2,
	};

	step_fixture_open(&f);
	expect_step_error(&f, "block 4 of a 4-block cache", &sequence, 1,
			  "block 4");
	sequence.blocks = negative;
	expect_step_error(&f, "block -1", &sequence, 1, "block -1");
	step_fixture_close(&f);
}


Test(step_errors, too_many_sequences, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	const int32_t token = 432;
	const int32_t blocks[3][1] = { { 1 }, { 3 }, { 1 } };
	struct engine_sequence sequences[3];

	for (int s = 0; s < 3; s++)
		sequences[s] = (struct engine_sequence){
			.tokens = &token, .n = 1, .start = 0,
			.blocks = blocks[s], .n_blocks = 1,
		};
	step_fixture_open(&f);
	expect_step_error(&f, "3 sequences with max_batch 2", sequences, 3,
			  "3 sequences");
	expect_step_error(&f, "0 sequences", sequences, 0, "0 sequences");
	step_fixture_close(&f);
}


Test(step_errors, too_many_tokens, .timeout = TEST_TIMEOUT)
{
	struct step_fixture f;
	int32_t tokens[9];
	const int32_t blocks[3] = { 1, 3, 1 };
	const int32_t other_blocks[2] = { 3, 1 };
	struct engine_sequence one = {
		.tokens = tokens, .n = 9, .start = 0,
		.blocks = blocks, .n_blocks = 3,
	};
	struct engine_sequence two[2] = {
		{ .tokens = tokens, .n = 3, .start = 5,
		  .blocks = fixture_blocks, .n_blocks = 2 },
		{ .tokens = tokens, .n = 6, .start = 0,
		  .blocks = other_blocks, .n_blocks = 2 },
	};
	struct engine_sequence empty = {
		.tokens = tokens, .n = 0, .start = 5,
		.blocks = fixture_blocks, .n_blocks = 2,
	};

	random_tokens(tokens, 9, STORIES_VOCAB, 3);
	step_fixture_open(&f);
	expect_step_error(&f, "9 tokens in one sequence, maximum 8", &one, 1,
			  "9 tokens");
	expect_step_error(&f, "3 + 6 tokens in two sequences, maximum 8", two,
			  2, "9 tokens");
	expect_step_error(&f, "sequence without tokens", &empty, 1,
			  "token count 0");
	step_fixture_close(&f);
}


/* ---- float16 KV cache --------------------------------------------------- */

/*
 * Largest logit difference allowed between the float16 and float32 KV
 * caches, relative to the largest absolute float32 logit. float16 keeps 11
 * significant bits (relative rounding error up to 2^-11, about 4.9e-4)
 * and the error of each K and V value passes through attention and the
 * remaining layers. On stories260K the measured difference is about 8e-4.
 */
#define F16_LOGIT_TOLERANCE 5e-3


Test(kv_f16, logits_close_to_f32, .timeout = TEST_TIMEOUT)
{
	enum { N_PROMPT = 5, N_DECODE = 40 };
	struct test_model m;
	struct engine *engine;
	struct kv_cache f32, f16;
	struct engine_sampler *sampler = NULL;
	struct engine_sampling greedy;
	int32_t blocks[4] = { 0, 1, 2, 3 };
	int32_t vocab;
	float *expected, *got, *scratch;
	double worst = 0.0;

	test_model_open(&m, MODEL_STORIES);
	vocab = m.shape->vocab_size;
	engine = create_engine(m.model, 2, 1, 16, 64);
	kv_cache_init(&f32, m.shape, 4, 16, ENGINE_KV_F32);
	kv_cache_init(&f16, m.shape, 4, 16, ENGINE_KV_F16);
	cr_assert_eq(f16.bytes * 2, f32.bytes);
	cr_assert_eq(engine_sampler_create(vocab, &sampler), 0);
	engine_sampling_defaults(&greedy);
	expected = alloc_logits(1, vocab);
	got = alloc_logits(1, vocab);
	scratch = alloc_logits(1, vocab);

	prefill(engine, &f32.kv, blocks, 4, once_upon_a_time, N_PROMPT, 0,
		expected);
	prefill(engine, &f16.kv, blocks, 4, once_upon_a_time, N_PROMPT, 0, got);
	for (int i = 0; i <= N_DECODE; i++) {
		double largest = 0.0, difference = 0.0;
		int32_t next;

		for (int32_t t = 0; t < vocab; t++) {
			cr_assert(isfinite(got[t]), "step %d: float16 logit %d "
				  "is %g", i, t, (double)got[t]);
			largest = fmax(largest, fabs((double)expected[t]));
			difference = fmax(difference,
					  fabs((double)got[t] - expected[t]));
		}
		cr_assert_leq(difference, F16_LOGIT_TOLERANCE * largest,
			      "step %d: float16 logits differ by %g, largest "
			      "float32 logit %g", i, difference, largest);
		worst = fmax(worst, difference / largest);
		if (i == N_DECODE)
			break;

		/* Both caches see the tokens the float32 run chose. */
		memcpy(scratch, expected, (size_t)vocab * sizeof(float));
		next = engine_sample(sampler, &greedy, scratch, NULL, 0, 0);
		decode(engine, &f32.kv, blocks, 4, next, N_PROMPT + i, expected);
		decode(engine, &f16.kv, blocks, 4, next, N_PROMPT + i, got);
	}
	cr_log_info("float16 KV cache: largest logit difference %.3g of the "
		    "largest logit", worst);

	free(expected);
	free(got);
	free(scratch);
	engine_sampler_destroy(sampler);
	kv_cache_free(&f32);
	kv_cache_free(&f16);
	engine_destroy(engine);
	test_model_close(&m);
}


Test(kv_f16, greedy_matches_golden_prefix, .timeout = TEST_TIMEOUT)
{
	enum { N_MATCH = 50 };
	int32_t expected_ids[1024];
	char *ids_file = golden_path("stories260K-once-upon-a-time.n200.ids");
	size_t ids_len, n_expected, agree = 0;
	char *ids_content = read_file(ids_file, &ids_len);
	struct generation *got = calloc(1, sizeof(*got));

	cr_assert_not_null(got);
	n_expected = parse_ids_line(ids_content, "generated_ids:", expected_ids,
				    1024);
	generate_greedy("Once upon a time", 196, ENGINE_KV_F16, got);
	while (agree < got->n_ids && agree < n_expected &&
	       got->ids[agree] == expected_ids[agree])
		agree++;
	cr_log_info("float16 KV cache: the first %zu of %zu greedy ids match",
		    agree, n_expected);
	cr_assert_geq(agree, N_MATCH, "float16 KV cache: greedy id %zu is %d, "
		      "expected %d", agree, got->ids[agree],
		      expected_ids[agree]);

	free(got->text.bytes);
	free(got);
	free(ids_content);
	free(ids_file);
}


/* ---- Sampler ------------------------------------------------------------ */

static struct engine_sampler *create_sampler(int32_t vocab_size)
{
	struct engine_sampler *sampler = NULL;

	cr_assert_eq(engine_sampler_create(vocab_size, &sampler), 0);
	return sampler;
}


/* Fills logits with reproducible values in [-5, 5). */
static void random_logits(float *logits, int32_t n, uint64_t seed)
{
	uint64_t state = seed;

	for (int32_t i = 0; i < n; i++)
		logits[i] = 10.0f * next_unit(&state) - 5.0f;
}


static int32_t argmax(const float *x, int32_t n)
{
	int32_t best = 0;

	for (int32_t i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}


/* Samples a copy of logits, so the caller's values stay unpenalized. */
static int32_t sample_copy(struct engine_sampler *sampler,
			   const struct engine_sampling *sampling,
			   const float *logits, int32_t n, uint64_t position)
{
	float copy[STORIES_VOCAB];

	cr_assert_leq(n, STORIES_VOCAB);
	memcpy(copy, logits, (size_t)n * sizeof(float));
	return engine_sample(sampler, sampling, copy, NULL, 0, position);
}


Test(sampler, greedy_is_argmax, .timeout = TEST_TIMEOUT)
{
	struct engine_sampler *sampler = create_sampler(STORIES_VOCAB);
	struct engine_sampling greedy;
	float logits[STORIES_VOCAB];

	engine_sampling_defaults(&greedy);
	cr_assert_eq(greedy.temperature, 0.0f);
	for (uint64_t seed = 0; seed < 50; seed++) {
		random_logits(logits, STORIES_VOCAB, seed);
		cr_assert_eq(sample_copy(sampler, &greedy, logits,
					 STORIES_VOCAB, seed),
			     argmax(logits, STORIES_VOCAB), "logits seed %llu",
			     (unsigned long long)seed);
	}
	engine_sampler_destroy(sampler);
}


Test(sampler, same_seed_and_position_same_token, .timeout = TEST_TIMEOUT)
{
	struct engine_sampler *sampler = create_sampler(STORIES_VOCAB);
	struct engine_sampling sampling;
	float logits[STORIES_VOCAB];
	int32_t first[200];
	int distinct_tokens = 0;
	bool seen[STORIES_VOCAB] = { false };

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.0f;
	sampling.seed = 1234;
	random_logits(logits, STORIES_VOCAB, 9);
	for (uint64_t pos = 0; pos < 200; pos++) {
		first[pos] = sample_copy(sampler, &sampling, logits,
					 STORIES_VOCAB, pos);
		if (!seen[first[pos]]) {
			seen[first[pos]] = true;
			distinct_tokens++;
		}
	}
	for (uint64_t pos = 0; pos < 200; pos++)
		cr_assert_eq(sample_copy(sampler, &sampling, logits,
					 STORIES_VOCAB, pos),
			     first[pos], "position %llu gave another token the "
			     "second time", (unsigned long long)pos);
	/* Logits spread over [-5, 5) leave dozens of likely tokens. */
	cr_assert_geq(distinct_tokens, 20, "200 positions drew only %d "
		      "distinct tokens", distinct_tokens);
	engine_sampler_destroy(sampler);
}


Test(sampler, random_in_unit_interval, .timeout = TEST_TIMEOUT)
{
	enum { N = 100000 };
	double sum = 0.0;
	int repeats = 0;
	float previous = -1.0f;

	for (uint64_t pos = 0; pos < N; pos++) {
		float r = engine_random(42, pos);

		cr_assert(r >= 0.0f && r < 1.0f, "engine_random(42, %llu) is %a",
			  (unsigned long long)pos, (double)r);
		cr_assert_eq(r, engine_random(42, pos));
		if (r == previous)
			repeats++;
		previous = r;
		sum += r;
	}
	cr_assert_leq(repeats, 2, "%d consecutive positions repeated a value",
		      repeats);
	cr_assert(fabs(sum / N - 0.5) < 0.01, "mean of %d draws is %g", N,
		  sum / N);
	cr_assert_neq(engine_random(1, 0), engine_random(2, 0),
		      "seeds 1 and 2 give the same number");
	cr_assert(engine_random(UINT64_MAX, UINT64_MAX) < 1.0f);
}


/* Asserts that sampling with these settings always picks the argmax. */
static void expect_greedy(const struct engine_sampling *sampling,
			  const char *what)
{
	struct engine_sampler *sampler = create_sampler(STORIES_VOCAB);
	float logits[STORIES_VOCAB];

	for (uint64_t seed = 0; seed < 20; seed++) {
		random_logits(logits, STORIES_VOCAB, 500 + seed);
		for (uint64_t pos = 0; pos < 20; pos++)
			cr_assert_eq(sample_copy(sampler, sampling, logits,
						 STORIES_VOCAB, pos),
				     argmax(logits, STORIES_VOCAB),
				     "%s: logits seed %llu, position %llu", what,
				     (unsigned long long)seed,
				     (unsigned long long)pos);
	}
	engine_sampler_destroy(sampler);
}


Test(sampler, top_k_one_is_greedy, .timeout = TEST_TIMEOUT)
{
	struct engine_sampling sampling;

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.5f;
	sampling.top_k = 1;
	expect_greedy(&sampling, "top-k 1");
}


Test(sampler, tiny_top_p_is_greedy, .timeout = TEST_TIMEOUT)
{
	struct engine_sampling sampling;

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.5f;
	sampling.top_p = 1e-6f;
	expect_greedy(&sampling, "top-p 1e-6");
}


Test(sampler, min_p_one_is_greedy, .timeout = TEST_TIMEOUT)
{
	struct engine_sampling sampling;

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.5f;
	sampling.min_p = 1.0f;
	expect_greedy(&sampling, "min-p 1");
}


Test(sampler, repetition_penalty_once_per_token, .timeout = TEST_TIMEOUT)
{
	struct engine_sampler *sampler = create_sampler(8);
	struct engine_sampling sampling;
	float logits[8] = { 2.0f, -2.0f, 1.5f, 0.5f, -1.0f, 0.0f, 1.0f, -3.0f };
	const int32_t history[] = { 0, 1, 0, 0, 1, 6, 0 };
	int32_t chosen;

	engine_sampling_defaults(&sampling);
	sampling.repetition_penalty = 2.0f;
	chosen = engine_sample(sampler, &sampling, logits, history,
			       sizeof(history) / sizeof(history[0]), 0);

	cr_assert_eq(logits[0], 1.0f, "positive logit 2 became %g",
		     (double)logits[0]);
	cr_assert_eq(logits[1], -4.0f, "negative logit -2 became %g",
		     (double)logits[1]);
	cr_assert_eq(logits[6], 0.5f, "positive logit 1 became %g",
		     (double)logits[6]);
	cr_assert_eq(logits[2], 1.5f, "token 2 is not in the history");
	cr_assert_eq(logits[7], -3.0f, "token 7 is not in the history");
	cr_assert_eq(chosen, 2, "greedy after the penalty chose %d", chosen);

	/* A second call penalizes afresh, once per token again. */
	float again[8] = { 2.0f, -2.0f, 1.5f, 0.5f, -1.0f, 0.0f, 1.0f, -3.0f };

	engine_sample(sampler, &sampling, again, history,
		      sizeof(history) / sizeof(history[0]), 1);
	cr_assert_eq(again[0], 1.0f);
	cr_assert_eq(again[1], -4.0f);
	engine_sampler_destroy(sampler);
}


/* Probabilities of a four-token vocabulary for the distribution tests. */
static const double four_probabilities[4] = { 0.5, 0.25, 0.15, 0.1 };


/* Counts the tokens drawn at positions 0 .. n_draws - 1. */
static void count_draws(const struct engine_sampling *sampling, int n_draws,
			int counts[4])
{
	struct engine_sampler *sampler = create_sampler(4);
	float logits[4];

	memset(counts, 0, 4 * sizeof(int));
	for (int pos = 0; pos < n_draws; pos++) {
		int32_t token;

		for (int i = 0; i < 4; i++)
			logits[i] = (float)log(four_probabilities[i]);
		token = engine_sample(sampler, sampling, logits, NULL, 0,
				      (uint64_t)pos);
		cr_assert(token >= 0 && token < 4, "drew token %d", token);
		counts[token]++;
	}
	engine_sampler_destroy(sampler);
}


Test(sampler, temperature_one_follows_distribution, .timeout = TEST_TIMEOUT)
{
	enum { N_DRAWS = 20000 };
	struct engine_sampling sampling;
	int counts[4];

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.0f;
	for (uint64_t seed = 1; seed <= 3; seed++) {
		double chi_square = 0.0;

		sampling.seed = seed;
		count_draws(&sampling, N_DRAWS, counts);
		for (int i = 0; i < 4; i++) {
			double expected = four_probabilities[i] * N_DRAWS;
			double d = counts[i] - expected;

			chi_square += d * d / expected;
		}
		/*
		 * 3 degrees of freedom: 16.3 is the 0.999 quantile. The seeds
		 * are fixed, so the bound is loose but cannot flake.
		 */
		cr_assert_lt(chi_square, 30.0, "seed %llu: counts %d %d %d %d, "
			     "chi-square %.2f", (unsigned long long)seed,
			     counts[0], counts[1], counts[2], counts[3],
			     chi_square);
	}
}


Test(sampler, filters_restrict_choices, .timeout = TEST_TIMEOUT)
{
	struct engine_sampling sampling;
	int counts[4];

	/* Each filter keeps exactly the two most likely tokens. */
	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.0f;
	sampling.top_k = 2;
	count_draws(&sampling, 2000, counts);
	cr_assert(counts[0] > 0 && counts[1] > 0 && counts[2] == 0 &&
		  counts[3] == 0, "top-k 2: counts %d %d %d %d", counts[0],
		  counts[1], counts[2], counts[3]);

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.0f;
	sampling.top_p = 0.7f;
	count_draws(&sampling, 2000, counts);
	cr_assert(counts[0] > 0 && counts[1] > 0 && counts[2] == 0 &&
		  counts[3] == 0, "top-p 0.7: counts %d %d %d %d", counts[0],
		  counts[1], counts[2], counts[3]);

	engine_sampling_defaults(&sampling);
	sampling.temperature = 1.0f;
	sampling.min_p = 0.4f;
	count_draws(&sampling, 2000, counts);
	cr_assert(counts[0] > 0 && counts[1] > 0 && counts[2] == 0 &&
		  counts[3] == 0, "min-p 0.4: counts %d %d %d %d", counts[0],
		  counts[1], counts[2], counts[3]);
}


/* ---- Metrics ------------------------------------------------------------ */

Test(metrics, counters_move, .timeout = TEST_TIMEOUT)
{
	struct test_model m;
	struct engine *engine;
	struct engine_metrics metrics;
	struct kv_cache cache;
	int32_t blocks[2] = { 1, 0 };
	float *logits;

	test_model_open(&m, MODEL_STORIES);
	engine = create_engine(m.model, 1, 1, 16, 32);
	kv_cache_init(&cache, m.shape, 2, 16, ENGINE_KV_F32);
	logits = alloc_logits(1, m.shape->vocab_size);

	engine_get_metrics(engine, &metrics);
	cr_assert_eq(metrics.steps, 0);
	cr_assert_eq(metrics.prefill_tokens, 0);
	cr_assert_eq(metrics.decode_tokens, 0);

	prefill(engine, &cache.kv, blocks, 2, once_upon_a_time, 5, 0, logits);
	engine_get_metrics(engine, &metrics);
	cr_assert_eq(metrics.steps, 1);
	cr_assert_eq(metrics.prefill_tokens, 5);
	cr_assert_gt(metrics.prefill_ns, 0);
	cr_assert_eq(metrics.decode_tokens, 0);
	cr_assert_eq(metrics.last_step_tokens, 5);
	cr_assert_gt(metrics.last_step_ns, 0);

	decode(engine, &cache.kv, blocks, 2, 432, 5, logits);
	decode(engine, &cache.kv, blocks, 2, 383, 6, logits);
	engine_get_metrics(engine, &metrics);
	cr_assert_eq(metrics.steps, 3);
	cr_assert_eq(metrics.prefill_tokens, 5);
	cr_assert_eq(metrics.decode_tokens, 2);
	cr_assert_gt(metrics.decode_ns, 0);
	cr_assert_eq(metrics.last_step_tokens, 1);

	free(logits);
	kv_cache_free(&cache);
	engine_destroy(engine);
	test_model_close(&m);
}


/* ---- Context shift ------------------------------------------------------- */

/* Address of the K (kv 0) or V (kv 1) row of a position in a float32 cache. */
static const float *kv_row(const struct kv_cache *cache,
			   const struct engine_shape *shape,
			   const int32_t *blocks, int layer, int kv,
			   int position)
{
	uint32_t bt = cache->kv.block_tokens;
	size_t row = ((size_t)layer * 2 + (size_t)kv) * bt +
		     (size_t)position % bt;

	return (const float *)kv_block(cache, blocks[position / (int)bt]) +
	       row * (size_t)engine_kv_dim(shape);
}


/*
 * After a shift, kept positions below n_keep are copied unchanged, and the
 * moved positions of layer 0 (whose K and V depend on the token alone) match
 * a fresh prefill of the remaining tokens: V exactly, K within rounding of
 * the extra rotation.
 */
Test(determinism, kv_shift_matches_fresh_prefill, .timeout = TEST_TIMEOUT)
{
	struct test_model m;
	struct kv_cache cache;
	enum { LENGTH = 60, KEEP = 5, DISCARD = 20, BLOCK_TOKENS = 16 };
	int32_t tokens[LENGTH], kept[LENGTH - DISCARD];
	int32_t source[4] = { 0, 1, 2, 3 }, target[3] = { 4, 5, 6 };
	int32_t fresh[3] = { 7, 8, 9 };
	struct engine_error err = { { 0 } };
	struct engine *engine;
	int kv_dim;

	test_model_open(&m, MODEL_STORIES);
	kv_dim = engine_kv_dim(m.shape);
	kv_cache_init(&cache, m.shape, 10, BLOCK_TOKENS, ENGINE_KV_F32);
	engine = create_engine(m.model, 1, 1, LENGTH, 128);
	random_tokens(tokens, LENGTH, m.shape->vocab_size, 11);
	prefill(engine, &cache.kv, source, 4, tokens, LENGTH, 0, NULL);

	cr_assert_eq(engine_kv_shift(engine, &cache.kv, source, 4, target, 3,
				     KEEP, DISCARD, LENGTH, &err), 0,
		     "engine_kv_shift failed: %s", err.message);

	memcpy(kept, tokens, KEEP * sizeof(int32_t));
	memcpy(kept + KEEP, tokens + KEEP + DISCARD,
	       (LENGTH - KEEP - DISCARD) * sizeof(int32_t));
	prefill(engine, &cache.kv, fresh, 3, kept, LENGTH - DISCARD, 0, NULL);

	for (int layer = 0; layer < m.shape->n_layers; layer++)
		for (int p = 0; p < KEEP; p++)
			for (int kv = 0; kv < 2; kv++)
				cr_assert_eq(memcmp(kv_row(&cache, m.shape, target, layer, kv, p),
						    kv_row(&cache, m.shape, source, layer, kv, p),
						    (size_t)kv_dim * sizeof(float)), 0,
					     "kept position %d of layer %d changed", p, layer);

	for (int p = KEEP; p < LENGTH - DISCARD; p++) {
		const float *k = kv_row(&cache, m.shape, target, 0, 0, p);
		const float *k_fresh = kv_row(&cache, m.shape, fresh, 0, 0, p);

		cr_assert_eq(memcmp(kv_row(&cache, m.shape, target, 0, 1, p),
				    kv_row(&cache, m.shape, fresh, 0, 1, p),
				    (size_t)kv_dim * sizeof(float)), 0,
			     "V of moved position %d differs from a fresh prefill", p);
		for (int i = 0; i < kv_dim; i++)
			cr_assert_float_eq(k[i], k_fresh[i], 1e-4f,
					   "K[%d] of moved position %d: %g, fresh %g",
					   i, p, (double)k[i], (double)k_fresh[i]);
	}

	cr_assert_neq(engine_kv_shift(engine, &cache.kv, source, 4, target, 3,
				      KEEP, LENGTH, LENGTH, &err), 0,
		      "a shift dropping more positions than the session has "
		      "was accepted");
	engine_destroy(engine);
	kv_cache_free(&cache);
	test_model_close(&m);
}
