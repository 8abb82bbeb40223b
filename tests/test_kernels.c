/*
 * Tests of the compute kernels of worker/kernels.c. Each kernel is checked
 * against a plain reference that accumulates in double, within
 * REL_TOLERANCE times the sum of the absolute values of the terms. The
 * determinism rules of the forward pass are checked bit for bit. Dot
 * products follow the documented 16-lane order, and a matrix product does
 * not depend on how its tokens and rows are tiled. Every instruction set
 * gives the same bits as the scalar path.
 *
 * The instruction-set comparison runs this binary again with SLAB_ISA set;
 * the child sees DUMP_VARIABLE, writes its results to standard output from
 * main() and exits without running any test.
 */
#include "worker/engine_internal.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/*
 * Seconds each test may run. One value for all, because the Criterion
 * 2.4.1 runner leaks memory when the tests of one run have different
 * timeouts, and LeakSanitizer then fails a sanitized binary at exit.
 */
#define TEST_TIMEOUT 30

/* Allowed error relative to the sum of absolute values of the terms. */
#define REL_TOLERANCE 1e-5

/* Set in the environment of a child that only writes the kernel dump. */
#define DUMP_VARIABLE "SLAB_TEST_KERNEL_DUMP"

#define LANES 16


/* ---- Inputs and references ---------------------------------------------- */

/* splitmix64 step: reproducible inputs, not strong randomness. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}


/* Fills x with uniform values in [-scale, scale). */
static void fill_uniform(float *x, size_t n, float scale, uint64_t seed)
{
	uint64_t state = seed;

	for (size_t i = 0; i < n; i++) {
		float unit = (float)(next_random(&state) >> 40) / 16777216.0f;

		x[i] = (2.0f * unit - 1.0f) * scale;
	}
}


static float *alloc_uniform(size_t n, float scale, uint64_t seed)
{
	float *x = malloc((n == 0 ? 1 : n) * sizeof(float));

	cr_assert_not_null(x, "malloc of %zu floats failed", n);
	fill_uniform(x, n, scale, seed);
	return x;
}


/* Returns the dot product in double and stores sum |a[i] * b[i]| in *scale. */
static double dot_reference(const float *a, const float *b, int n,
			    double *scale)
{
	double sum = 0.0, magnitude = 0.0;

	for (int i = 0; i < n; i++) {
		double product = (double)a[i] * (double)b[i];

		sum += product;
		magnitude += fabs(product);
	}
	*scale = magnitude;
	return sum;
}


/*
 * The order the engine documents for every dot product: 16 partial sums,
 * lane j taking elements j, j + 16, ... with fmaf, then the tree (j, j + 8),
 * (j, j + 4), (j, j + 2), (j, j + 1).
 */
static float dot_documented_order(const float *a, const float *b, int n)
{
	float acc[LANES] = { 0 };

	for (int k = 0; k < n; k++)
		acc[k % LANES] = fmaf(a[k], b[k], acc[k % LANES]);
	for (int width = LANES / 2; width >= 1; width /= 2)
		for (int j = 0; j < width; j++)
			acc[j] = acc[j] + acc[j + width];
	return acc[0];
}


static bool within_tolerance(double got, double expected, double scale)
{
	return fabs(got - expected) <= REL_TOLERANCE * scale + FLT_MIN;
}


/* ---- kernel_dot --------------------------------------------------------- */

static const int dot_lengths[] = {
	1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 72, 100,
	127, 128, 129, 172, 255, 256, 257, 1000, 4099,
};


Test(kernel_dot, matches_reference, .timeout = TEST_TIMEOUT)
{
	for (size_t c = 0; c < sizeof(dot_lengths) / sizeof(dot_lengths[0]);
	     c++) {
		int n = dot_lengths[c];
		/* One extra element so b can start at an unaligned address. */
		float *a = alloc_uniform((size_t)n, 1.0f, 1000 + (uint64_t)n);
		float *b = alloc_uniform((size_t)n + 1, 3.0f, 2000 + (uint64_t)n);
		double scale;
		double expected = dot_reference(a, b + 1, n, &scale);
		float got = kernel_dot(a, b + 1, n);

		cr_assert(within_tolerance(got, expected, scale),
			  "n %d: kernel_dot %.9g, reference %.9g, allowed "
			  "error %.3g", n, (double)got, expected,
			  REL_TOLERANCE * scale);
		free(a);
		free(b);
	}
}


Test(kernel_dot, follows_lane_order, .timeout = TEST_TIMEOUT)
{
	for (size_t c = 0; c < sizeof(dot_lengths) / sizeof(dot_lengths[0]);
	     c++) {
		int n = dot_lengths[c];
		float *a = alloc_uniform((size_t)n, 1.0f, 3000 + (uint64_t)n);
		float *b = alloc_uniform((size_t)n, 1.0f, 4000 + (uint64_t)n);
		float expected = dot_documented_order(a, b, n);
		float got = kernel_dot(a, b, n);

		cr_assert(memcmp(&got, &expected, sizeof(float)) == 0,
			  "n %d, isa %s: kernel_dot %a, 16-lane order %a", n,
			  kernel_isa(), (double)got, (double)expected);
		free(a);
		free(b);
	}
}


Test(kernel_dot, zero_length_is_zero, .timeout = TEST_TIMEOUT)
{
	float a[1] = { 1.0f }, b[1] = { 1.0f };

	cr_assert_eq(kernel_dot(a, b, 0), 0.0f);
}


/* ---- kernel_matmul ------------------------------------------------------ */

/*
 * Fill value of output cells outside the requested rows. No tested dot
 * product comes near it, because |w| <= 1, |x| <= 2 and n <= 100.
 */
static const float SENTINEL = -12345.678f;

static const int matmul_widths[] = { 1, 7, 16, 33, 64, 100 };
static const int matmul_tokens[] = { 1, 2, 3, 4, 5, 7, 9 };
static const int matmul_rows[] = { 1, 4, 6, 13, 17 };


/* Fills out (n_tokens, stride) with SENTINEL. */
static void fill_sentinel(float *out, size_t count)
{
	for (size_t i = 0; i < count; i++)
		out[i] = SENTINEL;
}


/* Checks one kernel_matmul call on rows [begin, end) against doubles. */
static void check_matmul_case(int n, int n_tokens, int rows, int begin,
			      int end)
{
	int stride = rows + 3;
	uint64_t seed = (uint64_t)n * 1000003u + (uint64_t)n_tokens * 1009u +
			(uint64_t)rows;
	float *w = alloc_uniform((size_t)rows * n, 1.0f, seed);
	float *x = alloc_uniform((size_t)n_tokens * n, 2.0f, seed + 1);
	float *out = malloc((size_t)n_tokens * stride * sizeof(float));

	cr_assert_not_null(out);
	fill_sentinel(out, (size_t)n_tokens * stride);
	kernel_matmul(out, stride, x, n_tokens, w, n, begin, end);

	for (int t = 0; t < n_tokens; t++) {
		for (int i = 0; i < stride; i++) {
			float got = out[(size_t)t * stride + i];
			double scale, expected;

			if (i < begin || i >= end) {
				cr_assert(memcmp(&got, &SENTINEL,
						 sizeof(float)) == 0,
					  "n %d, %d tokens, rows [%d, %d): "
					  "cell (%d, %d) outside the rows was "
					  "written", n, n_tokens, begin, end,
					  t, i);
				continue;
			}
			expected = dot_reference(w + (size_t)i * n,
						 x + (size_t)t * n, n, &scale);
			cr_assert(within_tolerance(got, expected, scale),
				  "n %d, %d tokens, rows [%d, %d): cell "
				  "(%d, %d) is %.9g, reference %.9g", n,
				  n_tokens, begin, end, t, i, (double)got,
				  expected);
		}
	}
	free(w);
	free(x);
	free(out);
}


Test(kernel_matmul, matches_reference, .timeout = TEST_TIMEOUT)
{
	for (size_t a = 0; a < sizeof(matmul_widths) / sizeof(int); a++) {
		for (size_t b = 0; b < sizeof(matmul_tokens) / sizeof(int); b++) {
			for (size_t c = 0; c < sizeof(matmul_rows) / sizeof(int);
			     c++) {
				int n = matmul_widths[a];
				int tokens = matmul_tokens[b];
				int rows = matmul_rows[c];

				check_matmul_case(n, tokens, rows, 0, rows);
				if (rows > 3)
					check_matmul_case(n, tokens, rows, 1,
							  rows - 2);
				check_matmul_case(n, tokens, rows, rows - 1,
						  rows);
				check_matmul_case(n, tokens, rows, rows / 2,
						  rows / 2);
			}
		}
	}
}


Test(kernel_matmul, independent_of_token_count, .timeout = TEST_TIMEOUT)
{
	const int n = 67, rows = 23, n_tokens = 11;
	float *w = alloc_uniform((size_t)rows * n, 1.0f, 51);
	float *x = alloc_uniform((size_t)n_tokens * n, 1.0f, 52);
	float *all = malloc((size_t)n_tokens * rows * sizeof(float));
	float *part = malloc((size_t)n_tokens * rows * sizeof(float));

	cr_assert(all != NULL && part != NULL);
	kernel_matmul(all, rows, x, n_tokens, w, n, 0, rows);

	/* Groups of every size from 1 to n_tokens, the last one shorter. */
	for (int group = 1; group <= n_tokens; group++) {
		fill_sentinel(part, (size_t)n_tokens * rows);
		for (int t = 0; t < n_tokens; t += group) {
			int count = t + group > n_tokens ? n_tokens - t : group;

			kernel_matmul(part + (size_t)t * rows, rows,
				      x + (size_t)t * n, count, w, n, 0, rows);
		}
		cr_assert(memcmp(all, part, (size_t)n_tokens * rows *
						    sizeof(float)) == 0,
			  "tokens in groups of %d differ from one call over "
			  "%d tokens", group, n_tokens);
	}
	free(w);
	free(x);
	free(all);
	free(part);
}


Test(kernel_matmul, independent_of_row_split, .timeout = TEST_TIMEOUT)
{
	const int n = 100, rows = 37, n_tokens = 6;
	float *w = alloc_uniform((size_t)rows * n, 1.0f, 61);
	float *x = alloc_uniform((size_t)n_tokens * n, 1.0f, 62);
	float *all = malloc((size_t)n_tokens * rows * sizeof(float));
	float *part = malloc((size_t)n_tokens * rows * sizeof(float));

	cr_assert(all != NULL && part != NULL);
	kernel_matmul(all, rows, x, n_tokens, w, n, 0, rows);

	/* Ranges of every width from 1 to rows, the last one shorter. */
	for (int width = 1; width <= rows; width++) {
		fill_sentinel(part, (size_t)n_tokens * rows);
		for (int begin = 0; begin < rows; begin += width) {
			int end = begin + width > rows ? rows : begin + width;

			kernel_matmul(part, rows, x, n_tokens, w, n, begin, end);
		}
		cr_assert(memcmp(all, part, (size_t)n_tokens * rows *
						    sizeof(float)) == 0,
			  "rows in ranges of %d differ from one call over "
			  "%d rows", width, rows);
	}

	/* Every cell equals the dot product of its row and token. */
	for (int t = 0; t < n_tokens; t++) {
		for (int i = 0; i < rows; i++) {
			float dot = kernel_dot(w + (size_t)i * n,
					       x + (size_t)t * n, n);

			cr_assert(memcmp(&dot, &all[(size_t)t * rows + i],
					 sizeof(float)) == 0,
				  "cell (%d, %d): kernel_matmul %a, kernel_dot "
				  "%a", t, i, (double)all[(size_t)t * rows + i],
				  (double)dot);
		}
	}
	free(w);
	free(x);
	free(all);
	free(part);
}


/* ---- Element-wise kernels ----------------------------------------------- */

Test(kernel_rmsnorm, matches_reference, .timeout = TEST_TIMEOUT)
{
	static const int lengths[] = { 1, 7, 16, 64, 72, 100, 288, 1000 };
	static const float scales[] = { 1e-3f, 1.0f, 300.0f };

	for (size_t c = 0; c < sizeof(lengths) / sizeof(int); c++) {
		for (size_t s = 0; s < sizeof(scales) / sizeof(float); s++) {
			int n = lengths[c];
			float *x = alloc_uniform((size_t)n, scales[s], 70 + c);
			float *weight = alloc_uniform((size_t)n, 2.0f, 80 + c);
			float *out = malloc((size_t)n * sizeof(float));
			double ss = 0.0;

			cr_assert_not_null(out);
			kernel_rmsnorm(out, x, weight, n);
			for (int i = 0; i < n; i++)
				ss += (double)x[i] * x[i];
			double inverse = 1.0 / sqrt(ss / n + 1e-5);

			for (int i = 0; i < n; i++) {
				double expected = (double)weight[i] * x[i] *
						  inverse;

				cr_assert(within_tolerance(out[i], expected,
							   fabs(expected)),
					  "n %d, scale %g: element %d is %.9g, "
					  "reference %.9g", n,
					  (double)scales[s], i, (double)out[i],
					  expected);
			}
			free(x);
			free(weight);
			free(out);
		}
	}
}


Test(kernel_softmax, matches_reference, .timeout = TEST_TIMEOUT)
{
	static const int lengths[] = { 1, 2, 5, 16, 100, 257 };
	static const float scales[] = { 1.0f, 30.0f, 1000.0f };

	for (size_t c = 0; c < sizeof(lengths) / sizeof(int); c++) {
		for (size_t s = 0; s < sizeof(scales) / sizeof(float); s++) {
			int n = lengths[c];
			float *x = alloc_uniform((size_t)n, scales[s], 90 + c);
			double *expected = malloc((size_t)n * sizeof(double));
			double max = x[0], sum = 0.0, total = 0.0;

			cr_assert_not_null(expected);
			for (int i = 1; i < n; i++)
				max = fmax(max, x[i]);
			for (int i = 0; i < n; i++) {
				expected[i] = exp((double)x[i] - max);
				sum += expected[i];
			}
			kernel_softmax(x, n);

			for (int i = 0; i < n; i++) {
				expected[i] /= sum;
				cr_assert(isfinite(x[i]),
					  "n %d, scale %g: element %d is %g",
					  n, (double)scales[s], i, (double)x[i]);
				cr_assert(within_tolerance(x[i], expected[i],
							   expected[i]),
					  "n %d, scale %g: element %d is %.9g, "
					  "reference %.9g", n,
					  (double)scales[s], i, (double)x[i],
					  expected[i]);
				total += x[i];
			}
			cr_assert(fabs(total - 1.0) <= REL_TOLERANCE,
				  "n %d, scale %g: probabilities sum to %.9g",
				  n, (double)scales[s], total);
			free(x);
			free(expected);
		}
	}
}


Test(kernel_rope, matches_reference, .timeout = TEST_TIMEOUT)
{
	static const int shapes[][2] = { { 1, 2 }, { 8, 8 }, { 3, 24 },
					 { 4, 16 }, { 2, 64 } };

	for (size_t c = 0; c < sizeof(shapes) / sizeof(shapes[0]); c++) {
		int n_heads = shapes[c][0], head_size = shapes[c][1];
		int n = n_heads * head_size;
		float *x = alloc_uniform((size_t)n, 2.0f, 100 + c);
		float *original = malloc((size_t)n * sizeof(float));
		float *cos_sin = malloc((size_t)head_size * sizeof(float));

		cr_assert(original != NULL && cos_sin != NULL);
		memcpy(original, x, (size_t)n * sizeof(float));
		for (int i = 0; i < head_size / 2; i++) {
			double angle = 37.0 / pow(10000.0, 2.0 * i / head_size);

			cos_sin[2 * i] = (float)cos(angle);
			cos_sin[2 * i + 1] = (float)sin(angle);
		}
		kernel_rope(x, n_heads, head_size, cos_sin);

		for (int h = 0; h < n_heads; h++) {
			for (int i = 0; i < head_size / 2; i++) {
				const float *v = original + h * head_size;
				double c0 = cos_sin[2 * i], s0 = cos_sin[2 * i + 1];
				double v0 = v[2 * i], v1 = v[2 * i + 1];
				double scale = fabs(v0 * c0) + fabs(v1 * s0) +
					       fabs(v0 * s0) + fabs(v1 * c0);
				size_t at = (size_t)h * head_size + 2 * i;

				cr_assert(within_tolerance(x[at], v0 * c0 - v1 * s0,
							   scale),
					  "%d heads of %d: head %d pair %d "
					  "first is %.9g, reference %.9g",
					  n_heads, head_size, h, i,
					  (double)x[at], v0 * c0 - v1 * s0);
				cr_assert(within_tolerance(x[at + 1],
							   v0 * s0 + v1 * c0,
							   scale),
					  "%d heads of %d: head %d pair %d "
					  "second is %.9g, reference %.9g",
					  n_heads, head_size, h, i,
					  (double)x[at + 1], v0 * s0 + v1 * c0);
			}
		}
		free(x);
		free(original);
		free(cos_sin);
	}
}


Test(kernel_swiglu, matches_reference, .timeout = TEST_TIMEOUT)
{
	static const int lengths[] = { 1, 15, 16, 100, 172 };

	for (size_t c = 0; c < sizeof(lengths) / sizeof(int); c++) {
		int n = lengths[c];
		float *gate = alloc_uniform((size_t)n, 10.0f, 110 + c);
		float *up = alloc_uniform((size_t)n, 3.0f, 120 + c);
		float *out = malloc((size_t)n * sizeof(float));
		float *in_place = malloc((size_t)n * sizeof(float));

		cr_assert(out != NULL && in_place != NULL);
		memcpy(in_place, gate, (size_t)n * sizeof(float));
		kernel_swiglu(out, gate, up, n);
		/* The forward pass writes the result over the gate. */
		kernel_swiglu(in_place, in_place, up, n);

		for (int i = 0; i < n; i++) {
			double g = gate[i];
			double expected = g / (1.0 + exp(-g)) * up[i];

			cr_assert(within_tolerance(out[i], expected,
						   fabs(expected)),
				  "n %d: element %d is %.9g, reference %.9g", n,
				  i, (double)out[i], expected);
			cr_assert(memcmp(&out[i], &in_place[i],
					 sizeof(float)) == 0,
				  "n %d: element %d differs when computed in "
				  "place", n, i);
		}
		free(gate);
		free(up);
		free(out);
		free(in_place);
	}
}


Test(kernel_axpy, matches_reference, .timeout = TEST_TIMEOUT)
{
	static const int lengths[] = { 1, 15, 16, 24, 100 };
	static const float factors[] = { 0.0f, 0.37f, -2.5f };

	for (size_t c = 0; c < sizeof(lengths) / sizeof(int); c++) {
		for (size_t f = 0; f < sizeof(factors) / sizeof(float); f++) {
			int n = lengths[c];
			float a = factors[f];
			float *out = alloc_uniform((size_t)n, 1.0f, 130 + c);
			float *v = alloc_uniform((size_t)n, 4.0f, 140 + c);
			float *before = malloc((size_t)n * sizeof(float));

			cr_assert_not_null(before);
			memcpy(before, out, (size_t)n * sizeof(float));
			kernel_axpy(out, a, v, n);

			for (int i = 0; i < n; i++) {
				double product = (double)a * v[i];
				double expected = before[i] + product;
				double scale = fabs((double)before[i]) +
					       fabs(product);

				cr_assert(within_tolerance(out[i], expected,
							   scale),
					  "n %d, a %g: element %d is %.9g, "
					  "reference %.9g", n, (double)a, i,
					  (double)out[i], expected);
			}
			free(out);
			free(v);
			free(before);
		}
	}
}


/* ---- Instruction sets --------------------------------------------------- */

Test(kernel_isa, reports_known_name, .timeout = TEST_TIMEOUT)
{
	const char *isa = kernel_isa();

	cr_assert(strcmp(isa, "avx512") == 0 || strcmp(isa, "avx2") == 0 ||
		  strcmp(isa, "scalar") == 0,
		  "kernel_isa() is \"%s\"", isa);
}


/* Writes count floats and returns 0, or -1 when the write fails. */
static int dump_floats(FILE *out, const float *x, size_t count)
{
	return fwrite(x, sizeof(float), count, out) == count ? 0 : -1;
}


/* Dumps the logits of a short prefill and decode run on stories260K. */
static int dump_model_logits(FILE *out)
{
	static const int32_t tokens[] = { 1, 403, 407, 261, 378, 432, 383, 286 };
	const int n_prompt = 5, n_total = 8, block_tokens = 16;
	const char *models = getenv("SLAB_MODELS");
	struct engine_options options = {
		.threads = 2, .max_batch = 1, .max_step_tokens = 16,
		.max_context = 32,
	};
	struct engine_model *model = NULL;
	struct engine *engine = NULL;
	struct engine_error err;
	struct engine_kv kv = { .n_blocks = 2, .block_tokens = block_tokens };
	int32_t blocks[2] = { 1, 0 };
	char path[4096];
	float *logits = NULL;
	int rc = -1;

	if (models == NULL)
		return -1;
	snprintf(path, sizeof(path), "%s/stories260K.bin", models);
	if (engine_model_open(path, &model, &err) < 0)
		return -1;
	if (engine_create(model, &options, &engine, &err) < 0)
		goto out;
	int32_t vocab = engine_model_shape(model)->vocab_size;

	kv.base = calloc(kv.n_blocks, engine_kv_block_bytes(
				engine_model_shape(model), block_tokens,
				ENGINE_KV_F32));
	logits = malloc((size_t)vocab * sizeof(float));
	if (kv.base == NULL || logits == NULL)
		goto out;

	if (engine_prefill(engine, &kv, blocks, 2, tokens, n_prompt, 0, logits,
			   &err) < 0 ||
	    dump_floats(out, logits, (size_t)vocab) < 0)
		goto out;
	for (int pos = n_prompt; pos < n_total; pos++)
		if (engine_decode(engine, &kv, blocks, 2, tokens[pos], pos,
				  logits, &err) < 0 ||
		    dump_floats(out, logits, (size_t)vocab) < 0)
			goto out;
	rc = 0;
out:
	free(kv.base);
	free(logits);
	engine_destroy(engine);
	engine_model_close(model);
	return rc;
}


/*
 * Writes the selected instruction set's name (16 bytes, NUL-padded), then
 * the results of every kernel on fixed inputs, then model logits.
 */
static int write_kernel_dump(FILE *out)
{
	char isa[16] = { 0 };
	float *a = malloc(4099 * sizeof(float));
	float *b = malloc(4099 * sizeof(float));
	float *w = malloc(37 * 100 * sizeof(float));
	float *result = malloc(4099 * sizeof(float));
	int rc = -1;

	/* No Criterion asserts here: the dump child runs outside any test. */
	if (a == NULL || b == NULL || w == NULL || result == NULL)
		goto out;
	fill_uniform(a, 4099, 1.0f, 7);
	fill_uniform(b, 4099, 1.0f, 8);
	fill_uniform(w, 37 * 100, 1.0f, 9);
	strncpy(isa, kernel_isa(), sizeof(isa) - 1);
	if (fwrite(isa, 1, sizeof(isa), out) != sizeof(isa))
		goto out;

	for (size_t c = 0; c < sizeof(dot_lengths) / sizeof(int); c++) {
		float dot = kernel_dot(a, b, dot_lengths[c]);

		if (dump_floats(out, &dot, 1) < 0)
			goto out;
	}
	for (int n_tokens = 1; n_tokens <= 9; n_tokens++) {
		kernel_matmul(result, 37, b, n_tokens, w, 100, 0, 37);
		if (dump_floats(out, result, (size_t)n_tokens * 37) < 0)
			goto out;
	}
	kernel_rmsnorm(result, a, b, 1000);
	if (dump_floats(out, result, 1000) < 0)
		goto out;
	memcpy(result, a, 257 * sizeof(float));
	kernel_softmax(result, 257);
	if (dump_floats(out, result, 257) < 0)
		goto out;
	memcpy(result, a, 72 * sizeof(float));
	kernel_rope(result, 3, 24, b);
	if (dump_floats(out, result, 72) < 0)
		goto out;
	kernel_swiglu(result, a, b, 172);
	if (dump_floats(out, result, 172) < 0)
		goto out;
	memcpy(result, a, 100 * sizeof(float));
	kernel_axpy(result, 0.37f, b, 100);
	if (dump_floats(out, result, 100) < 0)
		goto out;

	rc = dump_model_logits(out);
out:
	free(a);
	free(b);
	free(w);
	free(result);
	return rc;
}


/* Reads fd to its end into a malloc'd buffer and stores its length. */
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
 * Runs this test binary with SLAB_ISA=isa (or without SLAB_ISA when isa is
 * NULL) in dump mode and returns what it wrote. The child gets a fresh
 * environment so it does not take the test runner's variables.
 */
static char *run_dump_child(const char *isa, size_t *len)
{
	static const char *passed[] = { "SLAB_MODELS", "ASAN_OPTIONS",
					"UBSAN_OPTIONS", "LSAN_OPTIONS" };
	char *env[8];
	char isa_entry[64];
	int n_env = 0, fds[2], status;
	char *argv[] = { "test_kernels", NULL };
	pid_t pid;
	char *output;

	env[n_env++] = DUMP_VARIABLE "=1";
	if (isa != NULL) {
		snprintf(isa_entry, sizeof(isa_entry), "SLAB_ISA=%s", isa);
		env[n_env++] = isa_entry;
	}
	for (size_t i = 0; i < sizeof(passed) / sizeof(passed[0]); i++) {
		const char *value = getenv(passed[i]);

		if (value == NULL)
			continue;
		size_t size = strlen(passed[i]) + strlen(value) + 2;

		env[n_env] = malloc(size);
		cr_assert_not_null(env[n_env]);
		snprintf(env[n_env], size, "%s=%s", passed[i], value);
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
		  "dump child with SLAB_ISA=%s failed (status 0x%x)",
		  isa != NULL ? isa : "(unset)", status);
	for (int i = isa != NULL ? 2 : 1; i < n_env; i++)
		free(env[i]);
	return output;
}


/* Compares a child's dump with this process's, naming the first mismatch. */
static void assert_same_dump(const char *isa, const char *expected_isa,
			     const char *own, size_t own_len)
{
	size_t len;
	char *child = run_dump_child(isa, &len);

	cr_assert(len >= 16, "dump with SLAB_ISA=%s is %zu bytes", isa, len);
	cr_assert_str_eq(child, expected_isa,
			 "child with SLAB_ISA=%s selected %s, expected %s",
			 isa, child, expected_isa);
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


Test(kernel_isa, simd_matches_scalar_bitwise, .timeout = TEST_TIMEOUT)
{
	char *own;
	size_t own_len;
	FILE *memory;

	cr_assert_not_null(getenv("SLAB_MODELS"),
			   "SLAB_MODELS is not set; set it to the folder of "
			   "stories260K.bin");
	memory = open_memstream(&own, &own_len);
	cr_assert_not_null(memory);
	cr_assert_eq(write_kernel_dump(memory), 0,
		     "computing the kernel dump failed");
	cr_assert_eq(fclose(memory), 0);

	assert_same_dump("scalar", "scalar", own, own_len);
	__builtin_cpu_init();
	if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
		assert_same_dump("avx2", "avx2", own, own_len);
	free(own);
}


/* Runs slab-run greedy on stories260K and returns its standard output. */
static char *run_slab_run(const char *isa, size_t *len)
{
	const char *build = getenv("SLAB_BUILD_DIR");
	const char *models = getenv("SLAB_MODELS");
	char program[4096], model[4096], tokenizer[4096];
	int fds[2], status;
	pid_t pid;
	char *output;

	cr_assert(build != NULL && models != NULL,
		  "SLAB_BUILD_DIR and SLAB_MODELS must be set; make test sets "
		  "both");
	snprintf(program, sizeof(program), "%s/slab-run", build);
	snprintf(model, sizeof(model), "%s/stories260K.bin", models);
	snprintf(tokenizer, sizeof(tokenizer), "%s/tok512.bin", models);
	cr_assert(access(program, X_OK) == 0, "%s: %s; build it with make",
		  program, strerror(errno));

	char *argv[] = { program, "--model", model, "--tokenizer", tokenizer,
			 "--prompt", "Once upon a time", "--max-tokens", "120",
			 "--temperature", "0", NULL };

	cr_assert(pipe2(fds, O_CLOEXEC) == 0);
	pid = fork();
	cr_assert(pid >= 0, "fork failed: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_WRONLY);

		dup2(fds[1], STDOUT_FILENO);
		if (null >= 0)
			dup2(null, STDERR_FILENO);
		if (isa != NULL)
			setenv("SLAB_ISA", isa, 1);
		else
			unsetenv("SLAB_ISA");
		execv(program, argv);
		_exit(127);
	}
	close(fds[1]);
	output = read_all(fds[0], len);
	close(fds[0]);
	cr_assert(waitpid(pid, &status, 0) == pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "slab-run with SLAB_ISA=%s failed (status 0x%x)",
		  isa != NULL ? isa : "(unset)", status);
	return output;
}


Test(kernel_isa, slab_run_scalar_output_equal, .timeout = TEST_TIMEOUT)
{
	size_t simd_len, scalar_len;
	char *simd = run_slab_run(NULL, &simd_len);
	char *scalar = run_slab_run("scalar", &scalar_len);

	cr_assert_gt(simd_len, strlen("Once upon a time"));
	cr_assert_eq(simd_len, scalar_len,
		     "slab-run wrote %zu bytes by default and %zu with "
		     "SLAB_ISA=scalar", simd_len, scalar_len);
	cr_assert(memcmp(simd, scalar, simd_len) == 0,
		  "slab-run output differs with SLAB_ISA=scalar");
	free(simd);
	free(scalar);
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
		if (write_kernel_dump(stdout) < 0 || fflush(stdout) != 0)
			return 1;
		return 0;
	}

	tests = criterion_initialize();
	if (criterion_handle_args(argc, argv, true))
		result = !criterion_run_all_tests(tests);
	criterion_finalize(tests);
	return result;
}
