/*
 * slab-run: the engine in one process, without broker or shared memory. It
 * prefills the prompt, decodes until an end token, the token limit or the
 * end of the context, and prints the text. It is the baseline the service
 * is measured against and a tool for debugging the engine.
 */
#include "worker/engine.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK_TOKENS 16

struct run_options {
	const char *model;
	const char *tokenizer;
	const char *prompt;
	const char *tokenize;
	int max_tokens;
	int threads;
	int max_context;
	enum engine_kv_type kv_type;
	struct engine_sampling sampling;
};


static void usage(FILE *out)
{
	fprintf(out,
		"Usage: slab-run --model PATH --tokenizer PATH [options]\n"
		"\n"
		"Runs a llama2.c checkpoint in one process: prints the prompt and its\n"
		"completion on standard output, and the prefill and decode rates on\n"
		"standard error.\n"
		"\n"
		"  --model PATH          llama2.c checkpoint, or a quantized checkpoint\n"
		"                        written by slab-quantize (required)\n"
		"  --tokenizer PATH      tokenizer file of the same vocabulary (required)\n"
		"  --prompt TEXT         text to continue (default: empty, BOS only)\n"
		"  --max-tokens N        tokens to generate, prompt not counted (default 256)\n"
		"  --temperature T       sampling temperature, 0 = greedy (default 0)\n"
		"  --top-k K             keep the K most likely tokens, 0 = off (default 0)\n"
		"  --top-p P             nucleus sampling mass in (0, 1], 1 = off (default 1)\n"
		"  --min-p P             drop tokens below P times the most likely, in\n"
		"                        [0, 1], 0 = off (default 0)\n"
		"  --repetition-penalty R  penalty > 0 for tokens already in the context,\n"
		"                        1 = off (default 1)\n"
		"  --seed S              sampling seed, an unsigned 64-bit integer (default 0)\n"
		"  --threads N           threads splitting each matrix product (default:\n"
		"                        number of online CPUs)\n"
		"  --max-context N       positions in the context (default: the model's)\n"
		"  --kv-type TYPE        KV cache element type, f32 or f16 (default f32)\n"
		"  --tokenize TEXT       print the token ids of TEXT (BOS first) and exit\n"
		"  --help                print this help and exit\n");
}


static void die_usage(const char *option, const char *value,
		      const char *expected)
{
	fprintf(stderr, "slab-run: invalid value '%s' for %s: expected %s\n",
		value, option, expected);
	exit(2);
}


static long parse_long(const char *option, const char *value, long min,
		       long max, const char *expected)
{
	char *end;
	long result;

	errno = 0;
	result = strtol(value, &end, 10);
	if (errno != 0 || end == value || *end != '\0' || result < min ||
	    result > max)
		die_usage(option, value, expected);
	return result;
}


static float parse_float(const char *option, const char *value, float min,
			 float max, bool min_open, const char *expected)
{
	char *end;
	float result;

	errno = 0;
	result = strtof(value, &end);
	if (errno != 0 || end == value || *end != '\0' || !isfinite(result) ||
	    result < min || result > max || (min_open && result == min))
		die_usage(option, value, expected);
	return result;
}


static void parse_options(int argc, char **argv, struct run_options *o)
{
	enum {
		OPT_MODEL = 256, OPT_TOKENIZER, OPT_PROMPT, OPT_MAX_TOKENS,
		OPT_TEMPERATURE, OPT_TOP_K, OPT_TOP_P, OPT_MIN_P,
		OPT_REPETITION, OPT_SEED, OPT_THREADS, OPT_MAX_CONTEXT,
		OPT_KV_TYPE, OPT_TOKENIZE, OPT_HELP,
	};
	static const struct option long_options[] = {
		{ "model", required_argument, NULL, OPT_MODEL },
		{ "tokenizer", required_argument, NULL, OPT_TOKENIZER },
		{ "prompt", required_argument, NULL, OPT_PROMPT },
		{ "max-tokens", required_argument, NULL, OPT_MAX_TOKENS },
		{ "temperature", required_argument, NULL, OPT_TEMPERATURE },
		{ "top-k", required_argument, NULL, OPT_TOP_K },
		{ "top-p", required_argument, NULL, OPT_TOP_P },
		{ "min-p", required_argument, NULL, OPT_MIN_P },
		{ "repetition-penalty", required_argument, NULL, OPT_REPETITION },
		{ "seed", required_argument, NULL, OPT_SEED },
		{ "threads", required_argument, NULL, OPT_THREADS },
		{ "max-context", required_argument, NULL, OPT_MAX_CONTEXT },
		{ "kv-type", required_argument, NULL, OPT_KV_TYPE },
		{ "tokenize", required_argument, NULL, OPT_TOKENIZE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ NULL, 0, NULL, 0 },
	};
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	int c;

	*o = (struct run_options){
		.prompt = "",
		.max_tokens = 256,
		.threads = cpus > 0 ? (int)cpus : 1,
		.kv_type = ENGINE_KV_F32,
	};
	engine_sampling_defaults(&o->sampling);

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL:
			o->model = optarg;
			break;
		case OPT_TOKENIZER:
			o->tokenizer = optarg;
			break;
		case OPT_PROMPT:
			o->prompt = optarg;
			break;
		case OPT_MAX_TOKENS:
			o->max_tokens = (int)parse_long("--max-tokens", optarg, 1,
							ENGINE_MAX_SEQ_LEN,
							"an integer from 1 to 1048576");
			break;
		case OPT_TEMPERATURE:
			o->sampling.temperature = parse_float(
				"--temperature", optarg, 0.0f, 100.0f, false,
				"a number from 0 to 100");
			break;
		case OPT_TOP_K:
			o->sampling.top_k = (int32_t)parse_long(
				"--top-k", optarg, 0, ENGINE_MAX_VOCAB,
				"an integer from 0 to 1048576");
			break;
		case OPT_TOP_P:
			o->sampling.top_p = parse_float("--top-p", optarg, 0.0f,
							1.0f, true,
							"a number in (0, 1]");
			break;
		case OPT_MIN_P:
			o->sampling.min_p = parse_float("--min-p", optarg, 0.0f,
							1.0f, false,
							"a number in [0, 1]");
			break;
		case OPT_REPETITION:
			o->sampling.repetition_penalty = parse_float(
				"--repetition-penalty", optarg, 0.0f, 100.0f,
				true, "a number in (0, 100]");
			break;
		case OPT_SEED: {
			char *end;

			errno = 0;
			o->sampling.seed = strtoull(optarg, &end, 10);
			if (errno != 0 || end == optarg || *end != '\0' ||
			    optarg[0] == '-')
				die_usage("--seed", optarg,
					  "an unsigned 64-bit integer");
			break;
		}
		case OPT_THREADS:
			o->threads = (int)parse_long("--threads", optarg, 1, 1024,
						     "an integer from 1 to 1024");
			break;
		case OPT_MAX_CONTEXT:
			o->max_context = (int)parse_long(
				"--max-context", optarg, 1, ENGINE_MAX_SEQ_LEN,
				"an integer from 1 to 1048576");
			break;
		case OPT_KV_TYPE:
			if (strcmp(optarg, "f32") == 0)
				o->kv_type = ENGINE_KV_F32;
			else if (strcmp(optarg, "f16") == 0)
				o->kv_type = ENGINE_KV_F16;
			else
				die_usage("--kv-type", optarg, "f32 or f16");
			break;
		case OPT_TOKENIZE:
			o->tokenize = optarg;
			break;
		case OPT_HELP:
			usage(stdout);
			exit(0);
		default:
			if (optopt != 0)
				fprintf(stderr, "slab-run: option %s needs a value\n",
					argv[optind - 1]);
			else
				fprintf(stderr, "slab-run: unknown option %s\n",
					argv[optind - 1]);
			fprintf(stderr, "Run 'slab-run --help' for the options.\n");
			exit(2);
		}
	}
	if (optind < argc) {
		fprintf(stderr, "slab-run: unexpected argument '%s'; pass the "
			"prompt with --prompt\n", argv[optind]);
		exit(2);
	}
	if (o->model == NULL || o->tokenizer == NULL) {
		fprintf(stderr, "slab-run: %s is required\n",
			o->model == NULL ? "--model" : "--tokenizer");
		exit(2);
	}
}


/* Encodes text with BOS first into a new array; exits on failure. */
static int32_t *encode(const struct engine_tokenizer *tokenizer,
		       const char *text, size_t *n)
{
	size_t len = strlen(text);
	int32_t *ids = malloc((len + 2) * sizeof(int32_t));

	if (ids == NULL ||
	    engine_tokenize(tokenizer, text, len, true, ids, len + 2, n) < 0) {
		fprintf(stderr, "slab-run: cannot tokenize the prompt\n");
		exit(1);
	}
	return ids;
}


static void print_rate(const char *stage, uint64_t tokens, uint64_t ns)
{
	double seconds = (double)ns / 1e9;

	fprintf(stderr, "%s: %llu tokens in %.1f ms, %.1f tokens/s\n", stage,
		(unsigned long long)tokens, seconds * 1e3,
		seconds > 0 ? (double)tokens / seconds : 0.0);
}


static int generate(const struct run_options *o, struct engine_model *model,
		    struct engine_tokenizer *tokenizer)
{
	const struct engine_shape *shape = engine_model_shape(model);
	struct engine_options engine_options = {
		.threads = o->threads,
		.max_batch = 1,
		.max_step_tokens = 256,
		.max_context = o->max_context,
	};
	struct engine_detokenizer detokenizer;
	struct engine_sampler *sampler = NULL;
	struct engine *engine = NULL;
	struct engine_error err;
	struct engine_kv kv = { .block_tokens = BLOCK_TOKENS, .type = o->kv_type };
	int32_t *blocks = NULL, *tokens = NULL;
	float *logits = NULL;
	char text[4096];
	size_t n_prompt;
	int rc = 1;

	if (engine_create(model, &engine_options, &engine, &err) < 0) {
		fprintf(stderr, "slab-run: %s\n", err.message);
		return 1;
	}
	int max_context = engine_get_options(engine)->max_context;

	tokens = encode(tokenizer, o->prompt, &n_prompt);
	if ((int64_t)n_prompt > max_context) {
		fprintf(stderr, "slab-run: the prompt is %zu tokens, more than "
			"the context of %d positions; shorten it or raise "
			"--max-context\n", n_prompt, max_context);
		goto out;
	}
	int32_t *grown = realloc(tokens, ((size_t)max_context + 1) * sizeof(int32_t));

	if (grown == NULL)
		goto out;
	tokens = grown;

	kv.n_blocks = (uint32_t)((max_context + BLOCK_TOKENS - 1) / BLOCK_TOKENS);
	kv.base = calloc(kv.n_blocks,
			 engine_kv_block_bytes(shape, BLOCK_TOKENS, o->kv_type));
	blocks = malloc(kv.n_blocks * sizeof(int32_t));
	logits = malloc((size_t)shape->vocab_size * sizeof(float));
	if (tokens == NULL || kv.base == NULL || blocks == NULL ||
	    logits == NULL || engine_sampler_create(shape->vocab_size, &sampler) < 0) {
		fprintf(stderr, "slab-run: out of memory for a context of %d "
			"positions\n", max_context);
		goto out;
	}
	for (uint32_t b = 0; b < kv.n_blocks; b++)
		blocks[b] = (int32_t)b;

	/* Prefill the prompt in chunks of at most max_step_tokens. */
	for (size_t start = 0; start < n_prompt;) {
		size_t chunk = n_prompt - start;

		if (chunk > (size_t)engine_options.max_step_tokens)
			chunk = (size_t)engine_options.max_step_tokens;
		if (engine_prefill(engine, &kv, blocks, (int32_t)kv.n_blocks,
				   tokens + start, (int32_t)chunk,
				   (int32_t)start,
				   start + chunk == n_prompt ? logits : NULL,
				   &err) < 0) {
			fprintf(stderr, "slab-run: prefill failed: %s\n",
				err.message);
			goto out;
		}
		start += chunk;
	}

	fputs(o->prompt, stdout);
	fflush(stdout);
	engine_detokenizer_init(&detokenizer, tokens[n_prompt - 1]);

	/* Decode: sample from the last logits, feed the token back. */
	size_t n = n_prompt;

	for (int generated = 0; generated < o->max_tokens; generated++) {
		size_t window = n < ENGINE_PENALTY_WINDOW ? n : ENGINE_PENALTY_WINDOW;
		int32_t next = engine_sample(sampler, &o->sampling, logits,
					     tokens + n - window, window, n);
		size_t len;

		if (engine_is_end_token(next))
			break;
		len = engine_detokenize(tokenizer, &detokenizer, next, text,
					sizeof(text));
		fwrite(text, 1, len, stdout);
		fflush(stdout);
		tokens[n++] = next;
		if ((int64_t)n > max_context || generated + 1 == o->max_tokens)
			break;
		if (engine_decode(engine, &kv, blocks, (int32_t)kv.n_blocks,
				  next, (int32_t)n - 1, logits, &err) < 0) {
			fprintf(stderr, "\nslab-run: decode failed: %s\n",
				err.message);
			goto out;
		}
	}
	fwrite(text, 1, engine_detokenize_flush(&detokenizer, text,
						sizeof(text)), stdout);
	fputc('\n', stdout);
	fflush(stdout);

	struct engine_metrics metrics;

	engine_get_metrics(engine, &metrics);
	print_rate("prefill", metrics.prefill_tokens, metrics.prefill_ns);
	print_rate("decode", metrics.decode_tokens, metrics.decode_ns);
	rc = 0;
out:
	engine_sampler_destroy(sampler);
	engine_destroy(engine);
	free(kv.base);
	free(blocks);
	free(tokens);
	free(logits);
	return rc;
}


int main(int argc, char **argv)
{
	struct run_options options;
	struct engine_model *model;
	struct engine_tokenizer *tokenizer;
	struct engine_error err;
	int rc;

	parse_options(argc, argv, &options);
	if (engine_model_open(options.model, &model, &err) < 0) {
		fprintf(stderr, "slab-run: %s\n", err.message);
		return 1;
	}
	if (engine_tokenizer_open(options.tokenizer,
				  engine_model_shape(model)->vocab_size,
				  &tokenizer, &err) < 0) {
		fprintf(stderr, "slab-run: %s\n", err.message);
		engine_model_close(model);
		return 1;
	}

	if (options.tokenize != NULL) {
		size_t n;
		int32_t *ids = encode(tokenizer, options.tokenize, &n);

		for (size_t i = 0; i < n; i++)
			printf(i == 0 ? "%d" : " %d", (int)ids[i]);
		printf("\n");
		free(ids);
		rc = 0;
	} else {
		rc = generate(&options, model, tokenizer);
	}
	engine_tokenizer_close(tokenizer);
	engine_model_close(model);
	return rc;
}
