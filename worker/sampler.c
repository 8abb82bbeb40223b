/*
 * Next-token sampling. The stages run in a fixed order: repetition penalty,
 * then greedy argmax when the temperature is 0; otherwise temperature,
 * softmax, top-k, top-p, min-p and one draw. The draw's random number comes
 * from a counter-based generator keyed by (seed, position), so sampling the
 * same logits for the same position again gives the same token.
 */
#include "worker/engine_internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct candidate {
	float probability;
	int32_t id;
};

struct engine_sampler {
	int32_t vocab_size;
	struct candidate *candidates; /* (vocab_size) */
	uint32_t *stamp;              /* (vocab_size) repetition marks */
	uint32_t mark;
};


void engine_sampling_defaults(struct engine_sampling *s)
{
	*s = (struct engine_sampling){
		.temperature = 0.0f,
		.top_k = 0,
		.top_p = 1.0f,
		.min_p = 0.0f,
		.repetition_penalty = 1.0f,
		.seed = 0,
	};
}


static uint64_t mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xBF58476D1CE4E5B9ull;
	x ^= x >> 27;
	x *= 0x94D049BB133111EBull;
	x ^= x >> 31;
	return x;
}


float engine_random(uint64_t seed, uint64_t position)
{
	uint64_t x = mix64(seed + 0x9E3779B97F4A7C15ull);

	x = mix64(x ^ (position * 0xD6E8FEB86659FD93ull));
	return (float)(x >> 40) * (1.0f / 16777216.0f);
}


int engine_sampler_create(int32_t vocab_size, struct engine_sampler **out)
{
	struct engine_sampler *sampler;

	if (vocab_size <= 0)
		return -EINVAL;
	sampler = calloc(1, sizeof(*sampler));
	if (sampler == NULL)
		return -ENOMEM;
	sampler->vocab_size = vocab_size;
	sampler->candidates = calloc((size_t)vocab_size,
				     sizeof(struct candidate));
	sampler->stamp = calloc((size_t)vocab_size, sizeof(uint32_t));
	if (sampler->candidates == NULL || sampler->stamp == NULL) {
		free(sampler->candidates);
		free(sampler->stamp);
		free(sampler);
		return -ENOMEM;
	}
	*out = sampler;
	return 0;
}


void engine_sampler_destroy(struct engine_sampler *sampler)
{
	if (sampler == NULL)
		return;
	free(sampler->candidates);
	free(sampler->stamp);
	free(sampler);
}


/* Orders by probability, highest first, and by id on ties. */
static int compare_candidates(const void *a, const void *b)
{
	const struct candidate *x = a;
	const struct candidate *y = b;

	if (x->probability != y->probability)
		return x->probability > y->probability ? -1 : 1;
	return (x->id > y->id) - (x->id < y->id);
}


/* Whether candidate a sorts before b: more probable first, lower id on ties. */
static bool ranks_before(const struct candidate *a, const struct candidate *b)
{
	return compare_candidates(a, b) < 0;
}


/*
 * Restores the heap property below index i of a heap of n candidates
 * whose root is the one that ranks last.
 */
static void sift_down(struct candidate *heap, int32_t n, int32_t i)
{
	for (;;) {
		int32_t child = 2 * i + 1;
		struct candidate swap;

		if (child >= n)
			return;
		if (child + 1 < n && ranks_before(&heap[child], &heap[child + 1]))
			child++;
		if (!ranks_before(&heap[i], &heap[child]))
			return;
		swap = heap[i];
		heap[i] = heap[child];
		heap[child] = swap;
		i = child;
	}
}


/*
 * Moves the k best of n candidates to the front, in rank order, in place:
 * a heap of the k best so far, then a heap sort of it. Unlike qsort, which
 * may allocate a merge buffer, this never allocates.
 */
static void select_best(struct candidate *c, int32_t n, int32_t k)
{
	if (k > n)
		k = n;
	for (int32_t i = k / 2 - 1; i >= 0; i--)
		sift_down(c, k, i);
	for (int32_t i = k; i < n; i++) {
		if (!ranks_before(&c[i], &c[0]))
			continue;
		c[0] = c[i];
		sift_down(c, k, 0);
	}
	for (int32_t end = k - 1; end > 0; end--) {
		struct candidate swap = c[0];

		c[0] = c[end];
		c[end] = swap;
		sift_down(c, end, 0);
	}
}


static int32_t argmax(const float *logits, int32_t n)
{
	return kernel_argmax(logits, n);
}


/*
 * Divides positive logits and multiplies negative ones by the penalty, once
 * per distinct token of the history. stamp marks the tokens already done in
 * this call.
 */
static void apply_repetition_penalty(struct engine_sampler *sampler,
				     float *logits, float penalty,
				     const int32_t *history, size_t n_history)
{
	uint32_t mark = ++sampler->mark;

	if (mark == 0) {
		memset(sampler->stamp, 0,
		       (size_t)sampler->vocab_size * sizeof(uint32_t));
		mark = sampler->mark = 1;
	}
	for (size_t i = 0; i < n_history; i++) {
		int32_t id = history[i];

		if (id < 0 || id >= sampler->vocab_size ||
		    sampler->stamp[id] == mark)
			continue;
		sampler->stamp[id] = mark;
		if (logits[id] > 0.0f)
			logits[id] /= penalty;
		else
			logits[id] *= penalty;
	}
}


int32_t engine_sample(struct engine_sampler *sampler,
		      const struct engine_sampling *s, float *logits,
		      const int32_t *history, size_t n_history,
		      uint64_t position)
{
	int32_t vocab = sampler->vocab_size;
	struct candidate *c = sampler->candidates;
	int32_t n = vocab;
	float max, sum = 0.0f, mass = 0.0f;
	bool sorted = false;

	if (s->repetition_penalty != 1.0f && n_history > 0)
		apply_repetition_penalty(sampler, logits,
					 s->repetition_penalty, history,
					 n_history);
	if (s->temperature <= 0.0f)
		return argmax(logits, vocab);

	/* Temperature and softmax. */
	max = logits[argmax(logits, vocab)];
	for (int32_t i = 0; i < vocab; i++) {
		float p = expf((logits[i] - max) / s->temperature);

		c[i] = (struct candidate){ .probability = p, .id = i };
		sum += p;
	}
	for (int32_t i = 0; i < vocab; i++)
		c[i].probability /= sum;

	/* Top-k keeps the k most probable tokens. */
	if (s->top_k > 0 && s->top_k < vocab) {
		select_best(c, n, s->top_k);
		sorted = true;
		n = s->top_k;
	}

	/* Top-p keeps the smallest prefix whose share of the mass reaches p. */
	if (s->top_p > 0.0f && s->top_p < 1.0f) {
		float kept_mass = 0.0f, cumulative = 0.0f;

		if (!sorted) {
			/* Tokens below (1 - p) / (n - 1) can never be needed. */
			float cutoff = (1.0f - s->top_p) / (float)(n - 1);
			int32_t m = 0;

			for (int32_t i = 0; i < n; i++)
				if (c[i].probability >= cutoff)
					c[m++] = c[i];
			n = m;
			select_best(c, n, n);
			sorted = true;
		}
		for (int32_t i = 0; i < n; i++)
			kept_mass += c[i].probability;
		for (int32_t i = 0; i < n; i++) {
			cumulative += c[i].probability;
			if (cumulative >= s->top_p * kept_mass) {
				n = i + 1;
				break;
			}
		}
	}

	/* Min-p drops tokens less likely than min_p times the most likely. */
	if (s->min_p > 0.0f) {
		float top = 0.0f;
		int32_t m = 0;

		for (int32_t i = 0; i < n; i++)
			if (c[i].probability > top)
				top = c[i].probability;
		for (int32_t i = 0; i < n; i++)
			if (c[i].probability >= s->min_p * top)
				c[m++] = c[i];
		n = m;
	}

	/* One draw over what is left, in candidate order. */
	for (int32_t i = 0; i < n; i++)
		mass += c[i].probability;
	float target = engine_random(s->seed, position) * mass;
	float cumulative = 0.0f;

	for (int32_t i = 0; i < n; i++) {
		cumulative += c[i].probability;
		if (target < cumulative)
			return c[i].id;
	}
	return c[n - 1].id;
}
