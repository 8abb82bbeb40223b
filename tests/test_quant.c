/*
 * Tests of quantized weights: the Q8_0 and Q4_0 block formats, the
 * quantized dot product against plain references, quantized checkpoints
 * written by slab-quantize, their accuracy against the float32 model, the
 * determinism rules on the quantized path, and malformed quantized files.
 *
 * Accuracy figures (largest and mean absolute logit difference from
 * float32, greedy match length) are printed with cr_log_info; run with
 * --verbose to see them. Only the Q8_0 golden prefix is asserted.
 *
 * Model files come from SLAB_MODELS, the golden ids from the golden/ folder
 * beside it, and slab-quantize from SLAB_BUILD_DIR. The instruction-set
 * comparison runs this binary again with SLAB_ISA and DUMP_VARIABLE set.
 * That child writes its results to standard output from main() and exits
 * without running any test.
 */
#include "worker/engine_internal.h"

#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
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
#define TEST_TIMEOUT 60

/* Allowed error relative to the sum of absolute values of the terms. */
#define REL_TOLERANCE 1e-5

/* Set in the environment of a child that only writes the kernel dump. */
#define DUMP_VARIABLE "SLAB_TEST_QUANT_DUMP"
/* Quantized model whose logits the dump child writes. */
#define DUMP_MODEL_VARIABLE "SLAB_TEST_QUANT_MODEL"

#define QK ENGINE_QUANT_BLOCK

/* Greedy ids of the golden file that Q8_0 must reproduce. */
#define Q8_0_GOLDEN_PREFIX 100


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


static char *join_path(const char *dir, const char *name)
{
	char *path;

	cr_assert(asprintf(&path, "%s/%s", dir, name) > 0);
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


static char *make_temp_dir(void)
{
	const char *base = getenv("TMPDIR");
	char *dir;
	size_t slot = 0;

	while (slot < 4 && open_temp_dirs[slot] != NULL)
		slot++;
	cr_assert_lt(slot, 4, "more than 4 temporary folders in one test");
	cr_assert(asprintf(&dir, "%s/slab-test-quant-XXXXXX",
			   base != NULL && base[0] != '\0' ? base : "/tmp") > 0);
	cr_assert_not_null(mkdtemp(dir), "mkdtemp(%s): %s", dir,
			   strerror(errno));
	open_temp_dirs[slot] = dir;
	return dir;
}


/* Removes dir and the files in it; returns 0 or -1, without asserts. */
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
		if (unlink(path) != 0)
			rc = -1;
		free(path);
	}
	closedir(stream);
	if (rmdir(dir) != 0)
		rc = -1;
	return rc;
}


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


TestSuite(quant_accuracy, .fini = remove_leftover_temp_dirs);
TestSuite(quant_determinism, .fini = remove_leftover_temp_dirs);
TestSuite(quant_bad_files, .fini = remove_leftover_temp_dirs);
TestSuite(quant_isa, .fini = remove_leftover_temp_dirs);


/* ---- Random inputs and synthetic checkpoints ---------------------------- */

/* splitmix64 step: reproducible inputs, not strong randomness. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}


/* Uniform float in [-1, 1). */
static float next_signed_unit(uint64_t *state)
{
	return 2.0f * ((float)(next_random(state) >> 40) / 16777216.0f) - 1.0f;
}


static float *alloc_uniform(size_t n, float scale, uint64_t seed)
{
	float *x = malloc((n == 0 ? 1 : n) * sizeof(float));
	uint64_t state = seed;

	cr_assert_not_null(x, "malloc of %zu floats failed", n);
	for (size_t i = 0; i < n; i++)
		x[i] = next_signed_unit(&state) * scale;
	return x;
}


static void write_floats(FILE *file, uint64_t count, float scale,
			 bool constant, uint64_t *state)
{
	float buffer[1024];

	while (count > 0) {
		size_t n = count < 1024 ? (size_t)count : 1024;

		for (size_t i = 0; i < n; i++)
			buffer[i] = constant ? scale
					     : next_signed_unit(state) * scale;
		cr_assert_eq(fwrite(buffer, sizeof(float), n, file), n);
		count -= n;
	}
}


/*
 * Writes a llama2.c checkpoint of this shape: embeddings uniform in
 * [-1, 1), each matrix uniform in +-1/sqrt(fan-in), RMSNorm weights 1.
 */
static void write_checkpoint(const char *path, const struct engine_shape *s,
			     uint64_t seed)
{
	uint64_t dim = (uint64_t)s->dim, hidden = (uint64_t)s->hidden_dim;
	uint64_t layers = (uint64_t)s->n_layers;
	uint64_t kv_dim = (uint64_t)engine_kv_dim(s);
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
	write_floats(file, layers * dim, 1.0f, true, &state);
	write_floats(file, layers * dim * dim, in_dim, false, &state);
	write_floats(file, 2 * layers * kv_dim * dim, in_dim, false, &state);
	write_floats(file, layers * dim * dim, in_dim, false, &state);
	write_floats(file, layers * dim, 1.0f, true, &state);
	write_floats(file, layers * hidden * dim, in_dim, false, &state);
	write_floats(file, layers * dim * hidden, in_hidden, false, &state);
	write_floats(file, layers * hidden * dim, in_dim, false, &state);
	write_floats(file, dim, 1.0f, true, &state);
	write_floats(file, (uint64_t)s->seq_len * (uint64_t)engine_head_size(s),
		     0.0f, true, &state);
	if (!s->shared_classifier)
		write_floats(file, (uint64_t)s->vocab_size * dim, in_dim, false,
			     &state);
	cr_assert_eq(fclose(file), 0, "%s: %s", path, strerror(errno));
}


/* The stories15M layout at a small size: 2 layers, 512 tokens. */
static const struct engine_shape synthetic_small = {
	.dim = 288, .hidden_dim = 768, .n_layers = 2, .n_heads = 6,
	.n_kv_heads = 6, .vocab_size = 512, .seq_len = 256,
	.shared_classifier = true,
};


/*
 * Runs slab-quantize on in with --type type (and extra, NULL-terminated,
 * may be NULL) and asserts that it succeeds.
 */
static void run_quantize(const char *in, const char *out, const char *type,
			 const char *const *extra)
{
	const char *build = getenv("SLAB_BUILD_DIR");
	char *program, *argv[16];
	int argc = 0, status;
	pid_t pid;

	cr_assert_not_null(build, "SLAB_BUILD_DIR is not set; set it to the "
			   "folder that contains slab-quantize");
	program = join_path(build, "slab-quantize");
	cr_assert(access(program, X_OK) == 0, "%s: %s; build it with make",
		  program, strerror(errno));
	argv[argc++] = program;
	argv[argc++] = (char *)in;
	argv[argc++] = (char *)out;
	argv[argc++] = "--type";
	argv[argc++] = (char *)type;
	for (size_t i = 0; extra != NULL && extra[i] != NULL; i++)
		argv[argc++] = (char *)extra[i];
	argv[argc] = NULL;

	pid = fork();
	cr_assert(pid >= 0, "fork failed: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		if (null >= 0)
			dup2(null, STDERR_FILENO);
		execv(program, argv);
		_exit(127);
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "slab-quantize %s %s --type %s failed (status 0x%x)", in, out,
		  type, status);
	free(program);
}


static struct engine_model *open_model(const char *path)
{
	struct engine_model *model = NULL;
	struct engine_error err = { { 0 } };
	int rc = engine_model_open(path, &model, &err);

	cr_assert_eq(rc, 0, "engine_model_open(%s) returned %d: %s", path, rc,
		     err.message);
	return model;
}


enum model_kind {
	MODEL_STORIES,
	MODEL_SYNTHETIC,
};

/* A float32 model, a quantized copy of it and the folder of the files. */
struct model_pair {
	char *dir;
	char *f32_path;
	char *quant_path;
	struct engine_model *f32;
	struct engine_model *quant;
	const struct engine_shape *shape;
};


static void model_pair_open(struct model_pair *p, enum model_kind kind,
			    const char *type)
{
	*p = (struct model_pair){ 0 };
	p->dir = make_temp_dir();
	if (kind == MODEL_STORIES) {
		p->f32_path = data_path("stories260K.bin");
	} else {
		p->f32_path = join_path(p->dir, "synthetic.bin");
		write_checkpoint(p->f32_path, &synthetic_small, 5);
	}
	p->quant_path = join_path(p->dir, "quantized.bin");
	run_quantize(p->f32_path, p->quant_path, type, NULL);
	p->f32 = open_model(p->f32_path);
	p->quant = open_model(p->quant_path);
	p->shape = engine_model_shape(p->quant);
}


static void model_pair_close(struct model_pair *p)
{
	engine_model_close(p->f32);
	engine_model_close(p->quant);
	free(p->f32_path);
	free(p->quant_path);
	remove_temp_dir(p->dir);
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


struct kv_cache {
	struct engine_kv kv;
	size_t bytes;
};


static void kv_cache_init(struct kv_cache *cache,
			  const struct engine_shape *shape, uint32_t n_blocks,
			  uint32_t block_tokens)
{
	size_t block_bytes = (size_t)engine_kv_block_bytes(shape, block_tokens,
							   ENGINE_KV_F32);

	cache->bytes = block_bytes * n_blocks;
	cache->kv = (struct engine_kv){
		.base = calloc(n_blocks, block_bytes),
		.n_blocks = n_blocks,
		.block_tokens = block_tokens,
		.type = ENGINE_KV_F32,
	};
	cr_assert_not_null(cache->kv.base, "calloc of %zu bytes failed",
			   cache->bytes);
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


static void step(struct engine *engine, const struct engine_kv *kv,
		 const struct engine_sequence *sequences, int n_sequences)
{
	struct engine_error err = { { 0 } };
	int rc = engine_step(engine, kv, sequences, n_sequences, &err);

	cr_assert_eq(rc, 0, "step of %d sequences returned %d: %s",
		     n_sequences, rc, err.message);
}


/* One session's tokens [start, start + n) through engine_step. */
static void run_tokens(struct engine *engine, const struct engine_kv *kv,
		       const int32_t *blocks, int32_t n_blocks,
		       const int32_t *tokens, int32_t n, int32_t start,
		       float *logits)
{
	struct engine_sequence sequence = {
		.tokens = tokens + start,
		.n = n,
		.start = start,
		.blocks = blocks,
		.n_blocks = n_blocks,
		.logits = logits,
	};

	step(engine, kv, &sequence, 1);
}


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


static int32_t argmax(const float *x, int32_t n)
{
	int32_t best = 0;

	for (int32_t i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}


/* ---- Block formats ------------------------------------------------------ */

Test(quant_format, q4_0_nibble_layout, .timeout = TEST_TIMEOUT)
{
	float x[QK], back[QK];
	struct engine_block_q4_0 block;

	/* Weight j is -8 + (j % 16) times 0.5, so every code appears. */
	for (int j = 0; j < QK; j++)
		x[j] = 0.5f * (float)(-8 + (j % 16));
	cr_assert_eq(engine_quantize_q4_0(&block, x, QK), 0);
	cr_assert_eq((float)block.d, 0.5f, "scale is %g, expected 0.5",
		     (double)(float)block.d);
	for (int j = 0; j < QK / 2; j++) {
		cr_assert_eq(block.qs[j] & 15, j,
			     "byte %d low nibble is %d, expected %d", j,
			     block.qs[j] & 15, j);
		cr_assert_eq(block.qs[j] >> 4, j,
			     "byte %d high nibble is %d, expected %d", j,
			     block.qs[j] >> 4, j);
	}
	engine_dequantize(ENGINE_WEIGHT_Q4_0, back, &block, QK);
	for (int j = 0; j < QK; j++)
		cr_assert_eq(back[j], x[j], "weight %d is %g, expected %g", j,
			     (double)back[j], (double)x[j]);
}


Test(quant_format, round_trip_error_bound, .timeout = TEST_TIMEOUT)
{
	enum { N = 32 * 64 };
	float *x = alloc_uniform(N, 3.0f, 41);
	float back[N];
	struct engine_block_q8_0 q8[N / QK];
	struct engine_block_q4_0 q4[N / QK];

	cr_assert_eq(engine_quantize_q8_0(q8, x, N), 0);
	cr_assert_eq(engine_quantize_q4_0(q4, x, N), 0);

	/* Rounding to the nearest step leaves at most half a step, plus the
	 * float16 rounding of the scale times the largest code. Q4_0 maps the
	 * largest magnitude to -8, so a value of the other sign near it is
	 * clamped from +8 to +7 and may be a whole step off. */
	engine_dequantize(ENGINE_WEIGHT_Q8_0, back, q8, N);
	for (int i = 0; i < N; i++) {
		float d = fabsf((float)q8[i / QK].d);

		cr_assert_leq(fabsf(back[i] - x[i]), 0.5f * d + 127.0f * d / 1024.0f,
			      "q8_0 weight %d: %g against %g, scale %g", i,
			      (double)back[i], (double)x[i], (double)d);
	}
	engine_dequantize(ENGINE_WEIGHT_Q4_0, back, q4, N);
	for (int i = 0; i < N; i++) {
		float d = fabsf((float)q4[i / QK].d);

		cr_assert_leq(fabsf(back[i] - x[i]), d + 8.0f * d / 1024.0f,
			      "q4_0 weight %d: %g against %g, scale %g", i,
			      (double)back[i], (double)x[i], (double)d);
	}
	free(x);
}


Test(quant_format, rejects_non_finite_and_huge, .timeout = TEST_TIMEOUT)
{
	float x[QK] = { 0 };
	struct engine_block_q8_0 q8;
	struct engine_block_q4_0 q4;

	x[3] = NAN;
	cr_assert_eq(engine_quantize_q8_0(&q8, x, QK), -ERANGE);
	cr_assert_eq(engine_quantize_q4_0(&q4, x, QK), -ERANGE);
	x[3] = 1e9f;
	cr_assert_eq(engine_quantize_q8_0(&q8, x, QK), -ERANGE);
	cr_assert_eq(engine_quantize_q4_0(&q4, x, QK), -ERANGE);
}


/* ---- Quantized dot product ---------------------------------------------- */

/* Quantized activations: (n_tokens, n) codes and (n_tokens, n / 32) scales. */
struct activations {
	int8_t *q;
	float *d;
	int32_t *s;
};


static struct activations quantize_activations(const float *x, int n_tokens,
					       int n)
{
	struct activations a = {
		.q = malloc((size_t)n_tokens * (size_t)n),
		.d = malloc((size_t)n_tokens * (size_t)(n / QK) * sizeof(float)),
		.s = malloc((size_t)n_tokens * (size_t)(n / QK) * sizeof(int32_t)),
	};

	cr_assert(a.q != NULL && a.d != NULL && a.s != NULL);
	for (int t = 0; t < n_tokens; t++)
		kernel_quantize_row(a.q + (size_t)t * n,
				    a.d + (size_t)t * (n / QK),
				    a.s + (size_t)t * (n / QK),
				    x + (size_t)t * n, n);
	return a;
}


static void free_activations(struct activations *a)
{
	free(a->q);
	free(a->d);
	free(a->s);
}


/* Quantizes rows x n random weights into a malloc'd buffer of that type. */
static void *random_weights(enum engine_weight_type type, int rows, int n,
			    uint64_t seed)
{
	float *w = alloc_uniform((size_t)rows * n, 0.2f, seed);
	void *blocks = malloc((size_t)engine_weight_bytes(type,
							  (uint64_t)rows * n));

	cr_assert_not_null(blocks);
	if (type == ENGINE_WEIGHT_Q8_0)
		cr_assert_eq(engine_quantize_q8_0(blocks, w, (size_t)rows * n), 0);
	else
		cr_assert_eq(engine_quantize_q4_0(blocks, w, (size_t)rows * n), 0);
	free(w);
	return blocks;
}


/*
 * Packs rows quantized rows of n weights (blocks back to back) into groups
 * of 16 rows, as a quantized checkpoint stores a matrix.
 */
static void *pack_rows(enum engine_weight_type type, const void *blocks,
		       int rows, int n)
{
	size_t row_bytes = (size_t)engine_weight_bytes(type, (uint64_t)n);
	char *packed = malloc((size_t)engine_matrix_bytes(type, (uint64_t)rows,
							  (uint64_t)n));

	cr_assert_not_null(packed);
	for (int r = 0; r < rows; r += ENGINE_QUANT_GROUP) {
		int n_rows = rows - r < ENGINE_QUANT_GROUP ? rows - r
							   : ENGINE_QUANT_GROUP;

		engine_pack_group(type,
				  packed + (size_t)engine_matrix_bytes(
						   type, (uint64_t)r, (uint64_t)n),
				  (const char *)blocks + (size_t)r * row_bytes,
				  n_rows, n);
	}
	return packed;
}


/* The kernel's dot product of one quantized row and one activation row. */
static float quant_row_dot(const void *row, enum engine_weight_type type,
			const int8_t *xq, const float *xd, const int32_t *xs,
			int n)
{
	void *packed = pack_rows(type, row, 1, n);
	float out;

	kernel_matmul_quant(&out, 1, xq, xd, xs, 1, packed, type, n, 0, 1);
	free(packed);
	return out;
}


/* Unpacks block b of a row to 32 codes and returns its scale. */
static float reference_block(const void *w, enum engine_weight_type type,
			     int b, int8_t *q)
{
	if (type == ENGINE_WEIGHT_Q8_0) {
		const struct engine_block_q8_0 *block =
			(const struct engine_block_q8_0 *)w + b;

		for (int i = 0; i < QK; i++)
			q[i] = block->qs[i];
		return (float)block->d;
	}

	const struct engine_block_q4_0 *block =
		(const struct engine_block_q4_0 *)w + b;

	for (int i = 0; i < QK; i++) {
		uint8_t byte = block->qs[i % 16];

		q[i] = (int8_t)((i < 16 ? byte & 15 : byte >> 4) - 8);
	}
	return (float)block->d;
}


/*
 * The plain reference: exact integer sums per block, combined in double.
 * Stores the sum of the absolute block terms in *scale.
 */
static double dot_reference(const void *w, enum engine_weight_type type,
			    const int8_t *xq, const float *xd, int n,
			    double *scale)
{
	double sum = 0.0, magnitude = 0.0;

	for (int b = 0; b < n / QK; b++) {
		int8_t q[QK];
		double dw = reference_block(w, type, b, q);
		int64_t integer = 0;

		for (int i = 0; i < QK; i++)
			integer += (int64_t)q[i] * xq[b * QK + i];
		sum += dw * (double)xd[b] * (double)integer;
		magnitude += fabs(dw * (double)xd[b] * (double)integer);
	}
	*scale = magnitude;
	return sum;
}


/* The documented order, written out independently of the engine. */
static float dot_documented_order(const void *w, enum engine_weight_type type,
				  const int8_t *xq, const float *xd, int n)
{
	float acc = 0.0f;

	for (int b = 0; b < n / QK; b++) {
		int8_t q[QK];
		float scale = reference_block(w, type, b, q) * xd[b];
		int32_t sum = 0;

		for (int i = 0; i < QK; i++)
			sum += q[i] * xq[b * QK + i];
		acc = fmaf(scale, (float)sum, acc);
	}
	return acc;
}


static const enum engine_weight_type quant_types[] = { ENGINE_WEIGHT_Q8_0,
						       ENGINE_WEIGHT_Q4_0 };
static const int quant_lengths[] = { 32, 64, 96, 160, 288, 768, 2048 };


Test(quant_dot, matches_reference_and_order, .timeout = TEST_TIMEOUT)
{
	for (size_t k = 0; k < 2; k++) {
		enum engine_weight_type type = quant_types[k];

		for (size_t c = 0; c < sizeof(quant_lengths) / sizeof(int); c++) {
			int n = quant_lengths[c];
			void *w = random_weights(type, 1, n, 100 + c);
			float *x = alloc_uniform((size_t)n, 2.0f, 200 + c);
			struct activations a = quantize_activations(x, 1, n);
			double scale;
			double expected = dot_reference(w, type, a.q, a.d, n,
							&scale);
			float got = quant_row_dot(w, type, a.q, a.d, a.s, n);
			float ordered = dot_documented_order(w, type, a.q,
							     a.d, n);

			cr_assert(fabs(got - expected) <=
					  REL_TOLERANCE * scale + FLT_MIN,
				  "%s, n = %d: %a, reference %a",
				  engine_weight_type_name(type), n,
				  (double)got, expected);
			cr_assert(memcmp(&got, &ordered, sizeof(float)) == 0,
				  "%s, n = %d: %a, documented order gives %a",
				  engine_weight_type_name(type), n,
				  (double)got, (double)ordered);
			free(w);
			free(x);
			free_activations(&a);
		}
	}
}


/*
 * With every scale 1 the result is the integer dot product itself, which
 * stays exact in float: the extreme codes (weights -128 and 127,
 * activations -127 and 127) must not saturate any path.
 */
Test(quant_dot, integer_sums_exact, .timeout = TEST_TIMEOUT)
{
	enum { N = 160, BLOCKS = N / QK };
	struct engine_block_q8_0 w[BLOCKS];
	int8_t xq[N];
	float xd[BLOCKS];
	int32_t xs[BLOCKS];
	uint64_t state = 77;

	for (int pattern = 0; pattern < 4; pattern++) {
		int64_t expected = 0;

		for (int b = 0; b < BLOCKS; b++) {
			w[b].d = (_Float16)1.0f;
			xd[b] = 1.0f;
			xs[b] = 0;
			for (int i = 0; i < QK; i++) {
				int8_t wq, x;

				if (pattern == 0) {
					wq = -128;
					x = -127;
				} else if (pattern == 1) {
					wq = 127;
					x = 127;
				} else if (pattern == 2) {
					wq = -128;
					x = 127;
				} else {
					wq = (int8_t)(next_random(&state) & 255);
					x = (int8_t)((int)(next_random(&state) %
							   255) - 127);
				}
				w[b].qs[i] = wq;
				xq[b * QK + i] = x;
				xs[b] += x;
				expected += (int64_t)wq * x;
			}
		}

		float got = quant_row_dot(w, ENGINE_WEIGHT_Q8_0, xq, xd, xs, N);

		cr_assert_eq((double)got, (double)expected,
			     "pattern %d: %.1f, exact integer sum %lld",
			     pattern, (double)got, (long long)expected);
	}
}


Test(quant_dot, activation_quantization_rule, .timeout = TEST_TIMEOUT)
{
	float x[QK];
	int8_t q[QK];
	float d;
	int32_t sum;

	for (int i = 0; i < QK; i++)
		x[i] = (float)(i - 16) * 0.25f;
	kernel_quantize_row(q, &d, &sum, x, QK);
	cr_assert_eq(d, 4.0f / 127.0f, "scale is %a, expected %a", (double)d,
		     (double)(4.0f / 127.0f));
	cr_assert_eq(q[0], -127);
	int32_t expected_sum = 0;

	for (int i = 0; i < QK; i++) {
		cr_assert_eq(q[i], (int8_t)nearbyintf(x[i] * (1.0f / d)),
			     "code %d is %d", i, q[i]);
		expected_sum += q[i];
	}
	cr_assert_eq(sum, expected_sum, "sum of codes is %d, expected %d",
		     sum, expected_sum);

	memset(x, 0, sizeof(x));
	kernel_quantize_row(q, &d, &sum, x, QK);
	cr_assert_eq(d, 0.0f);
	for (int i = 0; i < QK; i++)
		cr_assert_eq(q[i], 0);

	/* With max |x| = 127 the scale is 1: ties go to even, NaN to -127. */
	x[0] = 127.0f;
	x[1] = 2.5f;
	x[2] = -3.5f;
	x[3] = 0.5f;
	x[4] = NAN;
	kernel_quantize_row(q, &d, &sum, x, QK);
	cr_assert_eq(d, 1.0f, "scale is %a, expected 1", (double)d);
	cr_assert_eq(q[0], 127);
	cr_assert_eq(q[1], 2, "2.5 became %d, expected 2", q[1]);
	cr_assert_eq(q[2], -4, "-3.5 became %d, expected -4", q[2]);
	cr_assert_eq(q[3], 0, "0.5 became %d, expected 0", q[3]);
	cr_assert_eq(q[4], -127, "NaN became %d, expected -127", q[4]);
}


/* A matrix product must not depend on how tokens and rows are grouped. */
Test(quant_matmul, independent_of_tiling, .timeout = TEST_TIMEOUT)
{
	enum { ROWS = 37, N = 288, TOKENS = 9 };
	float *x = alloc_uniform((size_t)TOKENS * N, 1.5f, 300);
	struct activations a = quantize_activations(x, TOKENS, N);
	float *whole = malloc(TOKENS * ROWS * sizeof(float));
	float *part = malloc(TOKENS * ROWS * sizeof(float));

	cr_assert(whole != NULL && part != NULL);
	for (size_t k = 0; k < 2; k++) {
		enum engine_weight_type type = quant_types[k];
		void *w = random_weights(type, ROWS, N, 400 + k);
		void *packed = pack_rows(type, w, ROWS, N);

		kernel_matmul_quant(whole, ROWS, a.q, a.d, a.s, TOKENS, packed,
				    type, N, 0, ROWS);

		/*
		 * Token by token, and rows in ranges that start at a group
		 * of 16 and end anywhere: each range is computed, then the
		 * rest of it again by the next, shorter range.
		 */
		for (int t = 0; t < TOKENS; t++) {
			static const int ranges[][2] = {
				{ 0, 3 }, { 0, 16 }, { 16, 17 }, { 16, 32 },
				{ 32, 35 }, { 32, ROWS },
			};

			for (size_t c = 0; c < sizeof(ranges) / sizeof(ranges[0]); c++)
				kernel_matmul_quant(part + (size_t)t * ROWS,
						    ROWS, a.q + (size_t)t * N,
						    a.d + (size_t)t * (N / QK),
						    a.s + (size_t)t * (N / QK),
						    1, packed, type, N,
						    ranges[c][0], ranges[c][1]);
		}
		for (int i = 0; i < TOKENS * ROWS; i++)
			cr_assert(memcmp(&whole[i], &part[i], sizeof(float)) == 0,
				  "%s: token %d row %d: %a and %a",
				  engine_weight_type_name(type), i / ROWS,
				  i % ROWS, (double)whole[i], (double)part[i]);

		/* Each entry is the single dot product of its row and token. */
		size_t row_bytes = (size_t)engine_weight_bytes(type, N);

		for (int t = 0; t < TOKENS; t++)
			for (int r = 0; r < ROWS; r++) {
				float dot = dot_documented_order(
					(const char *)w + (size_t)r * row_bytes,
					type, a.q + (size_t)t * N,
					a.d + (size_t)t * (N / QK), N);

				cr_assert(memcmp(&dot, &whole[t * ROWS + r],
						 sizeof(float)) == 0,
					  "%s: token %d row %d: %a, documented "
					  "order gives %a",
					  engine_weight_type_name(type), t, r,
					  (double)whole[t * ROWS + r],
					  (double)dot);
			}
		free(w);
		free(packed);
	}
	free(x);
	free_activations(&a);
	free(whole);
	free(part);
}


/* ---- Accuracy against float32 ------------------------------------------- */

/* Logit differences of the quantized model from float32 over a sequence. */
struct logit_difference {
	double max;
	double mean;
	int top1_agree; /* positions where both pick the same argmax */
	int positions;
};


/*
 * Feeds both models the same n tokens one at a time and compares the
 * logits of every position.
 */
static struct logit_difference measure_logits(const struct model_pair *p,
					      const int32_t *tokens, int n)
{
	int32_t vocab = p->shape->vocab_size;
	int32_t blocks[64];
	struct engine *reference = create_engine(p->f32, 2, 1, 16, n);
	struct engine *quantized = create_engine(p->quant, 2, 1, 16, n);
	struct kv_cache ref_cache, quant_cache;
	float *ref_logits = alloc_logits(1, vocab);
	float *quant_logits = alloc_logits(1, vocab);
	struct logit_difference result = { 0 };
	double total = 0.0;

	cr_assert_leq(n, 64 * 16);
	for (int b = 0; b < 64; b++)
		blocks[b] = b;
	kv_cache_init(&ref_cache, p->shape, 64, 16);
	kv_cache_init(&quant_cache, p->shape, 64, 16);

	for (int pos = 0; pos < n; pos++) {
		run_tokens(reference, &ref_cache.kv, blocks, 64, tokens, 1, pos,
			   ref_logits);
		run_tokens(quantized, &quant_cache.kv, blocks, 64, tokens, 1,
			   pos, quant_logits);
		for (int32_t i = 0; i < vocab; i++) {
			double diff = fabs((double)quant_logits[i] -
					   (double)ref_logits[i]);

			cr_assert(isfinite(diff), "position %d: logit %d is %g",
				  pos, i, (double)quant_logits[i]);
			total += diff;
			if (diff > result.max)
				result.max = diff;
		}
		result.top1_agree += argmax(ref_logits, vocab) ==
				     argmax(quant_logits, vocab);
	}
	result.positions = n;
	result.mean = total / ((double)n * vocab);

	free(ref_logits);
	free(quant_logits);
	free(ref_cache.kv.base);
	free(quant_cache.kv.base);
	engine_destroy(reference);
	engine_destroy(quantized);
	return result;
}


/*
 * Generates greedily after the prompt, prefilling it and decoding one
 * token at a time. Returns the number of ids written, at most max_tokens
 * because an end token stops it early.
 */
static size_t generate_greedy(const struct engine_model *model,
			      const int32_t *prompt, int n_prompt,
			      int max_tokens, int32_t *ids)
{
	const struct engine_shape *shape = engine_model_shape(model);
	int32_t tokens[1024], blocks[64];
	struct engine *engine = create_engine(model, 2, 1, 256, 0);
	struct kv_cache cache;
	float *logits = alloc_logits(1, shape->vocab_size);
	size_t n_ids = 0;
	int n = n_prompt;

	cr_assert_leq(n_prompt + max_tokens, 1024);
	cr_assert_leq(n_prompt + max_tokens, shape->seq_len);
	for (int b = 0; b < 64; b++)
		blocks[b] = b;
	kv_cache_init(&cache, shape, 64, 16);
	memcpy(tokens, prompt, (size_t)n_prompt * sizeof(int32_t));

	run_tokens(engine, &cache.kv, blocks, 64, tokens, n_prompt, 0, logits);
	while ((int)n_ids < max_tokens) {
		int32_t next = argmax(logits, shape->vocab_size);

		if (engine_is_end_token(next))
			break;
		ids[n_ids++] = next;
		tokens[n++] = next;
		if ((int)n_ids == max_tokens)
			break;
		run_tokens(engine, &cache.kv, blocks, 64, tokens, 1, n - 1,
			   logits);
	}

	free(logits);
	free(cache.kv.base);
	engine_destroy(engine);
	return n_ids;
}


static size_t match_length(const int32_t *a, size_t n_a, const int32_t *b,
			   size_t n_b)
{
	size_t i = 0;

	while (i < n_a && i < n_b && a[i] == b[i])
		i++;
	return i;
}


/* Parses the line starting with label of an ids file; returns the count. */
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


struct golden {
	int32_t prompt[16];
	size_t n_prompt;
	int32_t generated[1024];
	size_t n_generated;
};


static void read_golden(struct golden *g)
{
	char *path = data_path("../golden/stories260K-once-upon-a-time.n200.ids");
	size_t len;
	char *content = read_file(path, &len);

	g->n_prompt = parse_ids_line(content, "prompt_ids:", g->prompt, 16);
	g->n_generated = parse_ids_line(content, "generated_ids:", g->generated,
					1024);
	cr_assert_eq(g->n_generated, 196, "%s lists %zu generated ids", path,
		     g->n_generated);
	free(content);
	free(path);
}


/*
 * Measures a quantized stories260K against float32 on the golden text and
 * returns the length of the greedy prefix that matches the golden ids.
 */
static size_t check_stories_accuracy(const char *type)
{
	struct model_pair p;
	struct golden *g = malloc(sizeof(*g));
	int32_t sequence[1024], ids[1024];
	size_t n_ids, matched;
	struct logit_difference diff;

	cr_assert_not_null(g);
	read_golden(g);
	model_pair_open(&p, MODEL_STORIES, type);

	/* Float32 itself must reproduce the golden ids. */
	n_ids = generate_greedy(p.f32, g->prompt, (int)g->n_prompt, 196, ids);
	cr_assert_eq(match_length(ids, n_ids, g->generated, g->n_generated),
		     196, "float32 no longer reproduces the golden ids");

	memcpy(sequence, g->prompt, g->n_prompt * sizeof(int32_t));
	memcpy(sequence + g->n_prompt, g->generated,
	       g->n_generated * sizeof(int32_t));
	diff = measure_logits(&p, sequence, (int)(g->n_prompt + g->n_generated));

	n_ids = generate_greedy(p.quant, g->prompt, (int)g->n_prompt, 196, ids);
	matched = match_length(ids, n_ids, g->generated, g->n_generated);
	cr_log_info("stories260K %s: logit difference from f32 max %.4f mean "
		    "%.5f over %d positions; same argmax at %d of them; greedy "
		    "ids match the golden ids for %zu of 196",
		    type, diff.max, diff.mean, diff.positions, diff.top1_agree,
		    matched);

	model_pair_close(&p);
	free(g);
	return matched;
}


Test(quant_accuracy, stories260K_q8_0, .timeout = TEST_TIMEOUT)
{
	size_t matched = check_stories_accuracy("q8_0");

	cr_assert_geq(matched, Q8_0_GOLDEN_PREFIX,
		      "q8_0 greedy ids match the golden ids for %zu tokens, "
		      "expected at least %d", matched, Q8_0_GOLDEN_PREFIX);
}


Test(quant_accuracy, stories260K_q4_0, .timeout = TEST_TIMEOUT)
{
	check_stories_accuracy("q4_0");
}


static void check_synthetic_accuracy(const char *type)
{
	enum { N_SEQUENCE = 96, N_GENERATE = 128 };
	struct model_pair p;
	int32_t sequence[N_SEQUENCE], reference[N_GENERATE], got[N_GENERATE];
	const int32_t prompt[] = { ENGINE_TOKEN_BOS, 17, 300, 45 };
	struct logit_difference diff;
	size_t n_reference, n_got;

	model_pair_open(&p, MODEL_SYNTHETIC, type);
	random_tokens(sequence, N_SEQUENCE, p.shape->vocab_size, 61);
	diff = measure_logits(&p, sequence, N_SEQUENCE);
	n_reference = generate_greedy(p.f32, prompt, 4, N_GENERATE, reference);
	n_got = generate_greedy(p.quant, prompt, 4, N_GENERATE, got);
	cr_log_info("synthetic dim 288 hidden 768 2 layers vocab 512 %s: logit "
		    "difference from f32 max %.4f mean %.5f over %d positions; "
		    "same argmax at %d of them; greedy ids match f32 for %zu "
		    "of %zu",
		    type, diff.max, diff.mean, diff.positions, diff.top1_agree,
		    match_length(got, n_got, reference, n_reference),
		    n_reference);
	model_pair_close(&p);
}


Test(quant_accuracy, synthetic_q8_0, .timeout = TEST_TIMEOUT)
{
	check_synthetic_accuracy("q8_0");
}


Test(quant_accuracy, synthetic_q4_0, .timeout = TEST_TIMEOUT)
{
	check_synthetic_accuracy("q4_0");
}


/* Per-tensor types: w2 of stories260K (rows of 172) stays float32. */
Test(quant_accuracy, tensor_types_recorded, .timeout = TEST_TIMEOUT)
{
	struct model_pair p;

	model_pair_open(&p, MODEL_STORIES, "q4_0");
	cr_assert_eq(engine_model_weight_type(p.quant), ENGINE_WEIGHT_Q4_0);
	for (int id = 0; id < ENGINE_TENSOR_COUNT; id++) {
		struct engine_tensor_view view = engine_model_tensor(p.quant, id);
		enum engine_weight_type expected = ENGINE_WEIGHT_Q4_0;

		if (!engine_tensor_is_matrix(id) || id == ENGINE_TENSOR_W2)
			expected = ENGINE_WEIGHT_F32;
		else if (id == ENGINE_TENSOR_CLASSIFIER)
			expected = ENGINE_WEIGHT_Q8_0;
		cr_assert_eq(view.type, expected, "tensor %s is %s, expected %s",
			     engine_tensor_name(id),
			     engine_weight_type_name(view.type),
			     engine_weight_type_name(expected));
		cr_assert_eq((uintptr_t)view.data % ENGINE_QUANT_ALIGN, 0,
			     "tensor %s is not 64-byte aligned",
			     engine_tensor_name(id));
	}
	model_pair_close(&p);
}


/* ---- Determinism on the quantized path ---------------------------------- */

static const char *const determinism_types[] = { "q8_0", "q4_0" };


/*
 * A 40-token prompt in one step, in two chunks, and token by token: the
 * logits of the last position and the KV cache are bitwise equal.
 */
static void check_prefill_matches_decode(enum model_kind kind, const char *type)
{
	enum { N_PROMPT = 40 };
	struct model_pair p;
	struct kv_cache whole, chunked, single;
	int32_t tokens[N_PROMPT], blocks[8] = { 5, 2, 7, 0, 1, 6, 3, 4 };
	struct engine *engine;
	float *expected, *got;
	int32_t vocab;

	model_pair_open(&p, kind, type);
	vocab = p.shape->vocab_size;
	engine = create_engine(p.quant, 2, 1, 64, 64);
	random_tokens(tokens, N_PROMPT, vocab, 11);
	kv_cache_init(&whole, p.shape, 8, 8);
	kv_cache_init(&chunked, p.shape, 8, 8);
	kv_cache_init(&single, p.shape, 8, 8);
	expected = alloc_logits(1, vocab);
	got = alloc_logits(1, vocab);

	for (int32_t pos = 0; pos < N_PROMPT; pos++)
		run_tokens(engine, &single.kv, blocks, 8, tokens, 1, pos,
			   pos == N_PROMPT - 1 ? expected : NULL);
	run_tokens(engine, &whole.kv, blocks, 8, tokens, N_PROMPT, 0, got);
	assert_same_logits(got, expected, vocab, "prompt in one step");
	cr_assert(memcmp(whole.kv.base, single.kv.base, whole.bytes) == 0,
		  "%s: KV cache after prefill differs from token by token",
		  type);
	run_tokens(engine, &chunked.kv, blocks, 8, tokens, 17, 0, NULL);
	run_tokens(engine, &chunked.kv, blocks, 8, tokens, N_PROMPT - 17, 17,
		   got);
	assert_same_logits(got, expected, vocab, "prompt in two chunks");

	free(expected);
	free(got);
	free(whole.kv.base);
	free(chunked.kv.base);
	free(single.kv.base);
	engine_destroy(engine);
	model_pair_close(&p);
}


Test(quant_determinism, prefill_matches_decode_stories260K, .timeout = TEST_TIMEOUT)
{
	for (size_t i = 0; i < 2; i++)
		check_prefill_matches_decode(MODEL_STORIES, determinism_types[i]);
}


Test(quant_determinism, prefill_matches_decode_synthetic, .timeout = TEST_TIMEOUT)
{
	for (size_t i = 0; i < 2; i++)
		check_prefill_matches_decode(MODEL_SYNTHETIC, determinism_types[i]);
}


enum { N_SESSIONS = 3, SESSION_BLOCKS = 8 };


/*
 * Runs three sessions (prompts of 9, 21 and 3 tokens) with the given
 * thread count, alone or batched: each prompt, then one decode token of
 * each. Writes the 3 decode logits rows and returns the KV cache, each
 * session in blocks s * SESSION_BLOCKS ... of one cache.
 */
static struct kv_cache run_sessions(const struct model_pair *p, int threads,
				    bool batched, float *logits)
{
	static const int32_t prompts[N_SESSIONS] = { 9, 21, 3 };
	int32_t vocab = p->shape->vocab_size;
	int32_t tokens[N_SESSIONS][32], blocks[N_SESSIONS][SESSION_BLOCKS];
	struct engine_sequence batch[N_SESSIONS];
	struct engine *engine = create_engine(p->quant, threads, N_SESSIONS,
					      64, 32);
	struct kv_cache cache;

	kv_cache_init(&cache, p->shape, N_SESSIONS * SESSION_BLOCKS, 4);
	for (int s = 0; s < N_SESSIONS; s++) {
		random_tokens(tokens[s], 32, vocab, 100 + (uint64_t)s);
		for (int b = 0; b < SESSION_BLOCKS; b++)
			blocks[s][b] = s * SESSION_BLOCKS + (SESSION_BLOCKS - 1 - b);
	}

	for (int s = 0; s < N_SESSIONS; s++) {
		batch[s] = (struct engine_sequence){
			.tokens = tokens[s], .n = prompts[s], .start = 0,
			.blocks = blocks[s], .n_blocks = SESSION_BLOCKS,
		};
		if (!batched)
			step(engine, &cache.kv, &batch[s], 1);
	}
	if (batched)
		step(engine, &cache.kv, batch, N_SESSIONS);

	for (int s = 0; s < N_SESSIONS; s++) {
		batch[s] = (struct engine_sequence){
			.tokens = tokens[s] + prompts[s], .n = 1,
			.start = prompts[s], .blocks = blocks[s],
			.n_blocks = SESSION_BLOCKS,
			.logits = logits + (size_t)s * vocab,
		};
		if (!batched)
			step(engine, &cache.kv, &batch[s], 1);
	}
	if (batched)
		step(engine, &cache.kv, batch, N_SESSIONS);

	engine_destroy(engine);
	return cache;
}


/* Batch of 3 against alone, and 2 threads against 1, bit for bit. */
static void check_batch_and_threads(enum model_kind kind, const char *type)
{
	struct model_pair p;
	float *expected, *got;
	struct kv_cache alone, other;
	int32_t vocab;

	model_pair_open(&p, kind, type);
	vocab = p.shape->vocab_size;
	expected = alloc_logits(N_SESSIONS, vocab);
	got = alloc_logits(N_SESSIONS, vocab);
	alone = run_sessions(&p, 1, false, expected);

	for (int variant = 0; variant < 3; variant++) {
		int threads = variant == 0 ? 1 : 2;
		bool batched = variant != 2;
		char what[96];

		other = run_sessions(&p, threads, batched, got);
		for (int s = 0; s < N_SESSIONS; s++) {
			snprintf(what, sizeof(what), "%s, %d threads, %s, "
				 "session %d", type, threads,
				 batched ? "batched" : "alone", s);
			assert_same_logits(got + (size_t)s * vocab,
					   expected + (size_t)s * vocab, vocab,
					   what);
		}
		cr_assert(memcmp(other.kv.base, alone.kv.base, alone.bytes) == 0,
			  "%s: KV cache with %d threads %s differs from 1 "
			  "thread alone", type, threads,
			  batched ? "batched" : "alone");
		free(other.kv.base);
	}

	free(expected);
	free(got);
	free(alone.kv.base);
	model_pair_close(&p);
}


Test(quant_determinism, batch_and_threads_stories260K, .timeout = TEST_TIMEOUT)
{
	for (size_t i = 0; i < 2; i++)
		check_batch_and_threads(MODEL_STORIES, determinism_types[i]);
}


Test(quant_determinism, batch_and_threads_synthetic, .timeout = TEST_TIMEOUT)
{
	for (size_t i = 0; i < 2; i++)
		check_batch_and_threads(MODEL_SYNTHETIC, determinism_types[i]);
}


/* ---- Malformed quantized files ------------------------------------------ */

#define NEEDLES(...) (const char *const[]){ __VA_ARGS__ }, \
	sizeof((const char *const[]){ __VA_ARGS__ }) / sizeof(const char *)

/* A valid Q8_0 stories260K file in memory, to damage. */
struct quant_file {
	char *dir;
	char *bytes;
	size_t len;
	struct engine_quant_header header;
};


static void quant_file_open(struct quant_file *f)
{
	char *source = data_path("stories260K.bin");
	char *path;

	f->dir = make_temp_dir();
	path = join_path(f->dir, "good.bin");
	run_quantize(source, path, "q8_0", NULL);
	f->bytes = read_file(path, &f->len);
	cr_assert_geq(f->len, sizeof(f->header));
	memcpy(&f->header, f->bytes, sizeof(f->header));
	free(path);
	free(source);
}


static void quant_file_close(struct quant_file *f)
{
	free(f->bytes);
	remove_temp_dir(f->dir);
}


/*
 * Writes f's bytes with header h, cut or zero-extended to len bytes, and
 * asserts that opening it fails with -EINVAL and a message naming the file
 * and containing every needle.
 */
static void expect_error(struct quant_file *f, const char *name,
			 const struct engine_quant_header *h, size_t len,
			 const char *const *needles, size_t n_needles)
{
	char *path = join_path(f->dir, name);
	char *bytes = calloc(1, len > f->len ? len : f->len);
	struct engine_model *model = NULL;
	struct engine_error err = { { 0 } };
	int rc;

	cr_assert_not_null(bytes);
	memcpy(bytes, f->bytes, f->len);
	if (len >= sizeof(*h))
		memcpy(bytes, h, sizeof(*h));
	write_bytes(path, bytes, len);

	rc = engine_model_open(path, &model, &err);
	cr_assert_eq(rc, -EINVAL, "%s: returned %d, expected -EINVAL (%s)",
		     name, rc, err.message);
	cr_assert_null(model);
	cr_assert_not_null(strstr(err.message, path),
			   "message does not name the file: %s", err.message);
	for (size_t i = 0; i < n_needles; i++)
		cr_assert_not_null(strstr(err.message, needles[i]),
				   "%s: message lacks \"%s\": %s", name,
				   needles[i], err.message);
	cr_log_info("%s: %s", name, err.message);
	free(bytes);
	free(path);
}


Test(quant_bad_files, valid_file_opens, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	char *path;
	struct engine_model *model;

	quant_file_open(&f);
	path = join_path(f.dir, "copy.bin");
	write_bytes(path, f.bytes, f.len);
	model = open_model(path);
	cr_assert_eq(engine_model_weight_type(model), ENGINE_WEIGHT_Q8_0);
	cr_assert_eq(engine_model_shape(model)->dim, 64);
	cr_assert(engine_model_shape(model)->shared_classifier);
	engine_model_close(model);
	free(path);
	quant_file_close(&f);
}


Test(quant_bad_files, truncated, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;

	quant_file_open(&f);
	expect_error(&f, "cut.bin", &f.header, f.len - 100,
		     NEEDLES("tensor classifier", "offset"));
	expect_error(&f, "header-cut.bin", &f.header, 200,
		     NEEDLES("shorter than the", "header"));
	quant_file_close(&f);
}


Test(quant_bad_files, oversized, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;

	quant_file_open(&f);
	expect_error(&f, "long.bin", &f.header, f.len + 64,
		     NEEDLES("file size", "longer than"));
	quant_file_close(&f);
}


Test(quant_bad_files, bad_magic, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	struct engine_quant_header h;

	quant_file_open(&f);
	h = f.header;
	h.magic = 0x58514c53u; /* "SLQX" */
	expect_error(&f, "magic.bin", &h, f.len, NEEDLES("dim"));
	quant_file_close(&f);
}


Test(quant_bad_files, bad_version, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	struct engine_quant_header h;

	quant_file_open(&f);
	h = f.header;
	h.version = 1;
	expect_error(&f, "version.bin", &h, f.len,
		     NEEDLES("version is 1", "expected 2"));
	quant_file_close(&f);
}


Test(quant_bad_files, offsets_out_of_range, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	struct engine_quant_header h;

	quant_file_open(&f);

	h = f.header;
	h.tensors[ENGINE_TENSOR_WQ].offset = (uint64_t)f.len * 64;
	expect_error(&f, "far.bin", &h, f.len, NEEDLES("tensor wq", "offset"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_CLASSIFIER].offset = UINT64_MAX - 63;
	expect_error(&f, "wrap.bin", &h, f.len,
		     NEEDLES("tensor classifier", "offset"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_WK].offset += 2;
	expect_error(&f, "unaligned.bin", &h, f.len,
		     NEEDLES("tensor wk", "multiple of 64"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_WV].offset = h.tensors[ENGINE_TENSOR_WK].offset;
	expect_error(&f, "overlap.bin", &h, f.len, NEEDLES("tensor wv"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_TOKEN_EMBEDDING].offset = 0;
	expect_error(&f, "in-header.bin", &h, f.len,
		     NEEDLES("tensor token_embedding"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_W1].size += 34;
	expect_error(&f, "size.bin", &h, f.len,
		     NEEDLES("tensor w1", "expected 59840 bytes"));
	quant_file_close(&f);
}


Test(quant_bad_files, wrong_type_fields, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	struct engine_quant_header h;

	quant_file_open(&f);

	h = f.header;
	h.weight_type = 7;
	expect_error(&f, "file-type.bin", &h, f.len,
		     NEEDLES("weight_type is 7"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_WO].type = 9;
	expect_error(&f, "tensor-type.bin", &h, f.len,
		     NEEDLES("tensor wo", "weight type 9"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_RMS_ATT].type = ENGINE_WEIGHT_Q8_0;
	expect_error(&f, "norm-type.bin", &h, f.len,
		     NEEDLES("tensor rms_att", "only matrices"));

	/* w2 rows are 172 weights long, so it cannot be quantized. */
	h = f.header;
	h.tensors[ENGINE_TENSOR_W2].type = ENGINE_WEIGHT_Q8_0;
	expect_error(&f, "w2-type.bin", &h, f.len,
		     NEEDLES("tensor w2", "not a multiple of 32"));

	/* A type with the wrong size for the bytes there. */
	h = f.header;
	h.tensors[ENGINE_TENSOR_W1].type = ENGINE_WEIGHT_Q4_0;
	expect_error(&f, "w1-type.bin", &h, f.len,
		     NEEDLES("tensor w1", "type q4_0"));
	quant_file_close(&f);
}


Test(quant_bad_files, shape_and_count_fields, .timeout = TEST_TIMEOUT)
{
	struct quant_file f;
	struct engine_quant_header h;

	quant_file_open(&f);

	h = f.header;
	h.dim = 0;
	expect_error(&f, "dim.bin", &h, f.len, NEEDLES("dim is 0"));

	h = f.header;
	h.n_kv_heads = 5;
	expect_error(&f, "kv-heads.bin", &h, f.len, NEEDLES("n_kv_heads 5"));

	h = f.header;
	h.vocab_size = -512;
	expect_error(&f, "vocab.bin", &h, f.len, NEEDLES("vocab_size is -512"));

	h = f.header;
	h.n_tensors = 11;
	expect_error(&f, "count.bin", &h, f.len, NEEDLES("n_tensors is 11"));

	h = f.header;
	h.shared_classifier = 2;
	expect_error(&f, "shared.bin", &h, f.len,
		     NEEDLES("shared_classifier is 2"));

	h = f.header;
	h.tensors[ENGINE_TENSOR_WQ].reserved = 1;
	expect_error(&f, "reserved.bin", &h, f.len,
		     NEEDLES("tensor wq", "reserved"));
	quant_file_close(&f);
}


/* ---- Instruction sets ---------------------------------------------------- */

static int dump_floats(FILE *out, const float *x, size_t count)
{
	return fwrite(x, sizeof(float), count, out) == count ? 0 : -1;
}


/* Dumps the logits of a short prefill and decode run of a quantized model. */
/*
 * Dumps the logits of a short prefill and decode of the model at path,
 * with a float32 and then a float16 KV cache.
 */
static int dump_model_logits(FILE *out, const char *path)
{
	static const int32_t tokens[] = { 1, 403, 407, 261, 378, 432, 383, 286 };
	static const enum engine_kv_type kv_types[] = { ENGINE_KV_F32,
							ENGINE_KV_F16 };
	const int n_prompt = 5, n_total = 8;
	struct engine_options options = {
		.threads = 2, .max_batch = 1, .max_step_tokens = 16,
		.max_context = 32,
	};
	struct engine_model *model = NULL;
	struct engine *engine = NULL;
	struct engine_error err;
	int32_t blocks[2] = { 1, 0 };
	float *logits = NULL;
	void *cache = NULL;
	int rc = -1;

	if (engine_model_open(path, &model, &err) < 0)
		return -1;
	if (engine_create(model, &options, &engine, &err) < 0)
		goto out;
	int32_t vocab = engine_model_shape(model)->vocab_size;

	/* A float32 block is the larger, so it fits either type. */
	cache = calloc(2, engine_kv_block_bytes(engine_model_shape(model), 16,
						ENGINE_KV_F32));
	logits = malloc((size_t)vocab * sizeof(float));
	if (cache == NULL || logits == NULL)
		goto out;
	for (size_t i = 0; i < sizeof(kv_types) / sizeof(kv_types[0]); i++) {
		struct engine_kv kv = {
			.base = cache,
			.n_blocks = 2,
			.block_tokens = 16,
			.type = kv_types[i],
		};

		if (engine_prefill(engine, &kv, blocks, 2, tokens, n_prompt, 0,
				   logits, &err) < 0 ||
		    dump_floats(out, logits, (size_t)vocab) < 0)
			goto out;
		for (int pos = n_prompt; pos < n_total; pos++)
			if (engine_decode(engine, &kv, blocks, 2, tokens[pos],
					  pos, logits, &err) < 0 ||
			    dump_floats(out, logits, (size_t)vocab) < 0)
				goto out;
	}
	rc = 0;
out:
	free(cache);
	free(logits);
	engine_destroy(engine);
	engine_model_close(model);
	return rc;
}


/*
 * Writes the quantized kernels' instruction set (16 bytes, NUL-padded),
 * their products on fixed inputs (5 blocks per row, an odd count, for 1 to
 * 9 tokens), then the logits of the quantized model in DUMP_MODEL_VARIABLE.
 * Uses no Criterion asserts: the dump child runs outside any test.
 */
static int write_quant_dump(FILE *out)
{
	enum { ROWS = 37, N = 160, TOKENS = 9 };
	const char *model = getenv(DUMP_MODEL_VARIABLE);
	char isa[16] = { 0 };
	float x[TOKENS * N], result[TOKENS * ROWS];
	int8_t xq[TOKENS * N];
	float xd[TOKENS * N / QK];
	int32_t xs[TOKENS * N / QK];
	struct engine_block_q8_0 w8[ROWS * N / QK];
	struct engine_block_q4_0 w4[ROWS * N / QK];
	float w[ROWS * N];
	uint64_t state = 9;

	if (model == NULL)
		return -1;
	for (int i = 0; i < TOKENS * N; i++)
		x[i] = next_signed_unit(&state);
	for (int i = 0; i < ROWS * N; i++)
		w[i] = next_signed_unit(&state);
	if (engine_quantize_q8_0(w8, w, ROWS * N) < 0 ||
	    engine_quantize_q4_0(w4, w, ROWS * N) < 0)
		return -1;

	void *packed8 = pack_rows(ENGINE_WEIGHT_Q8_0, w8, ROWS, N);
	void *packed4 = pack_rows(ENGINE_WEIGHT_Q4_0, w4, ROWS, N);
	int rc = -1;

	strncpy(isa, kernel_quant_isa(), sizeof(isa) - 1);
	if (fwrite(isa, 1, sizeof(isa), out) != sizeof(isa))
		goto out;

	/* Activation quantization, with special values in the first rows:
	 * infinities, NaN, ties, tiny and huge magnitudes. */
	static const float special[] = { INFINITY, -INFINITY, NAN, 0.5f, 2.5f,
					 -3.5f, 1e-40f, -1e-41f, 3e38f,
					 -0.0f, 127.0f, 1e-38f };

	for (size_t i = 0; i < sizeof(special) / sizeof(float); i++)
		x[i * 11 % (2 * N)] = special[i];
	for (int i = 2 * N; i < 2 * N + QK; i++)
		x[i] = 1e-39f * (float)(i % 7);
	for (int t = 0; t < TOKENS; t++)
		kernel_quantize_row(xq + t * N, xd + t * (N / QK),
				    xs + t * (N / QK), x + t * N, N);
	if (fwrite(xq, 1, sizeof(xq), out) != sizeof(xq) ||
	    fwrite(xs, 1, sizeof(xs), out) != sizeof(xs) ||
	    dump_floats(out, xd, TOKENS * N / QK) < 0)
		goto out;
	for (int i = 0; i < 2 * N + QK; i++)
		x[i] = next_signed_unit(&state);
	for (int t = 0; t < TOKENS; t++)
		kernel_quantize_row(xq + t * N, xd + t * (N / QK),
				    xs + t * (N / QK), x + t * N, N);

	for (int n_tokens = 1; n_tokens <= TOKENS; n_tokens++) {
		kernel_matmul_quant(result, ROWS, xq, xd, xs, n_tokens, packed8,
				    ENGINE_WEIGHT_Q8_0, N, 0, ROWS);
		if (dump_floats(out, result, (size_t)n_tokens * ROWS) < 0)
			goto out;
		kernel_matmul_quant(result, ROWS, xq, xd, xs, n_tokens, packed4,
				    ENGINE_WEIGHT_Q4_0, N, 0, ROWS);
		if (dump_floats(out, result, (size_t)n_tokens * ROWS) < 0)
			goto out;
	}
	rc = dump_model_logits(out, model);
out:
	free(packed8);
	free(packed4);
	return rc;
}


static char *read_all(int fd, size_t *len)
{
	size_t capacity = 1 << 16, used = 0;
	char *buffer = malloc(capacity);

	cr_assert_not_null(buffer);
	for (;;) {
		ssize_t n;

		if (used == capacity) {
			capacity *= 2;
			buffer = realloc(buffer, capacity);
			cr_assert_not_null(buffer);
		}
		n = read(fd, buffer + used, capacity - used);
		if (n < 0 && errno == EINTR)
			continue;
		cr_assert(n >= 0, "read from the child failed: %s",
			  strerror(errno));
		if (n == 0)
			break;
		used += (size_t)n;
	}
	*len = used;
	return buffer;
}


/*
 * Runs this binary with SLAB_ISA=isa in dump mode for the quantized model
 * at model_path and returns what it wrote.
 */
static char *run_dump_child(const char *isa, const char *model_path,
			    size_t *len)
{
	static const char *passed[] = { "ASAN_OPTIONS", "UBSAN_OPTIONS",
					"LSAN_OPTIONS" };
	char *env[8];
	char isa_entry[64];
	char *model_entry;
	int n_env = 0, fds[2], status;
	char *argv[] = { "test_quant", NULL };
	pid_t pid;
	char *output;

	cr_assert(asprintf(&model_entry, "%s=%s", DUMP_MODEL_VARIABLE,
			   model_path) > 0);
	snprintf(isa_entry, sizeof(isa_entry), "SLAB_ISA=%s", isa);
	env[n_env++] = DUMP_VARIABLE "=1";
	env[n_env++] = isa_entry;
	env[n_env++] = model_entry;
	for (size_t i = 0; i < sizeof(passed) / sizeof(passed[0]); i++) {
		const char *value = getenv(passed[i]);

		if (value == NULL)
			continue;
		cr_assert(asprintf(&env[n_env], "%s=%s", passed[i], value) > 0);
		n_env++;
	}
	env[n_env] = NULL;

	cr_assert(pipe2(fds, O_CLOEXEC) == 0, "pipe2 failed: %s",
		  strerror(errno));
	pid = fork();
	cr_assert(pid >= 0, "fork failed: %s", strerror(errno));
	if (pid == 0) {
		dup2(fds[1], STDOUT_FILENO);
		execve("/proc/self/exe", argv, env);
		_exit(127);
	}
	close(fds[1]);
	output = read_all(fds[0], len);
	close(fds[0]);
	cr_assert(waitpid(pid, &status, 0) == pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "dump child with SLAB_ISA=%s failed (status 0x%x)", isa,
		  status);
	for (int i = 2; i < n_env; i++)
		free(env[i]);
	return output;
}


static void assert_same_dump(const char *isa, const char *own, size_t own_len,
			     const char *model_path)
{
	size_t len;
	char *child = run_dump_child(isa, model_path, &len);

	cr_assert(len >= 16, "dump with SLAB_ISA=%s is %zu bytes", isa, len);
	cr_assert_str_eq(child, isa, "child with SLAB_ISA=%s selected %s", isa,
			 child);
	cr_assert_eq(len, own_len, "dump with SLAB_ISA=%s is %zu bytes, "
		     "this process wrote %zu", isa, len, own_len);
	for (size_t at = 16; at < len; at += sizeof(float)) {
		float mine, theirs;

		memcpy(&mine, own + at, sizeof(float));
		memcpy(&theirs, child + at, sizeof(float));
		cr_assert(memcmp(&mine, &theirs, sizeof(float)) == 0,
			  "float %zu of the dump: %s gives %a, %s gives %a",
			  (at - 16) / sizeof(float), child, (double)theirs,
			  own, (double)mine);
	}
	free(child);
}


/* The default kernels, AVX2 and scalar give the same bits. */
Test(quant_isa, simd_matches_scalar_bitwise, .timeout = TEST_TIMEOUT)
{
	static const char *const types[] = { "q8_0", "q4_0" };

	for (size_t k = 0; k < 2; k++) {
		struct model_pair p;
		char *own;
		size_t own_len;
		FILE *memory;

		model_pair_open(&p, MODEL_STORIES, types[k]);
		setenv(DUMP_MODEL_VARIABLE, p.quant_path, 1);
		memory = open_memstream(&own, &own_len);
		cr_assert_not_null(memory);
		cr_assert_eq(write_quant_dump(memory), 0,
			     "computing the kernel dump failed");
		cr_assert_eq(fclose(memory), 0);
		cr_log_info("quantized kernels in use: %s", own);

		assert_same_dump("scalar", own, own_len, p.quant_path);
		__builtin_cpu_init();
		if (__builtin_cpu_supports("avx2") &&
		    __builtin_cpu_supports("fma"))
			assert_same_dump("avx2", own, own_len, p.quant_path);
		free(own);
		model_pair_close(&p);
	}
}


/*
 * Criterion's default main, preceded by the dump mode that the
 * instruction-set test starts this binary in.
 */
int main(int argc, char *argv[])
{
	const char *dump = getenv(DUMP_VARIABLE);
	struct criterion_test_set *tests;
	int result = 0;

	if (dump != NULL && strcmp(dump, "1") == 0) {
		if (write_quant_dump(stdout) < 0 || fflush(stdout) != 0)
			return 1;
		return 0;
	}

	tests = criterion_initialize();
	if (criterion_handle_args(argc, argv, true))
		result = !criterion_run_all_tests(tests);
	criterion_finalize(tests);
	return result;
}
