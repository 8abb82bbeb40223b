/*
 * slab-synth: writes a llama2.c checkpoint of any shape filled with seeded
 * pseudo-random weights, for benchmarks and for tests of shapes no real
 * file covers. Weights are uniform in [-scale, scale] with scale
 * 1 / sqrt(fan-in), and RMSNorm weights are 1, so activations stay in a
 * realistic range through many layers.
 */
#include "worker/engine.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct writer {
	FILE *file;
	uint64_t state;
	const char *path;
};


static void die(const char *message, const char *detail)
{
	fprintf(stderr, "slab-synth: %s%s\n", message, detail);
	exit(1);
}


static float next_uniform(struct writer *w)
{
	/* xorshift64*: fast and good enough for weights. */
	w->state ^= w->state >> 12;
	w->state ^= w->state << 25;
	w->state ^= w->state >> 27;
	return (float)((w->state * 2685821657736338717ull) >> 40) /
		       8388608.0f - 1.0f;
}


static void write_floats(struct writer *w, uint64_t count, float scale,
			 bool constant)
{
	float buffer[4096];

	while (count > 0) {
		size_t n = count < 4096 ? (size_t)count : 4096;

		for (size_t i = 0; i < n; i++)
			buffer[i] = constant ? scale : next_uniform(w) * scale;
		if (fwrite(buffer, sizeof(float), n, w->file) != n)
			die("write failed for ", w->path);
		count -= n;
	}
}


static int parse_int(const char *option, const char *value)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(value, &end, 10);
	if (errno != 0 || *end != '\0' || end == value || v < 1 || v > (1 << 20)) {
		fprintf(stderr, "slab-synth: invalid value '%s' for %s: expected "
			"an integer from 1 to 1048576\n", value, option);
		exit(2);
	}
	return (int)v;
}


static void usage(FILE *out)
{
	fprintf(out,
		"Usage: slab-synth --out PATH [options]\n"
		"Writes a llama2.c checkpoint with seeded random weights.\n"
		"  --out PATH        output file (required)\n"
		"  --dim N           model width (default 288)\n"
		"  --hidden-dim N    feed-forward width (default 768)\n"
		"  --layers N        transformer blocks (default 6)\n"
		"  --heads N         query heads (default 6)\n"
		"  --kv-heads N      key/value heads (default: --heads)\n"
		"  --vocab N         vocabulary size (default 32000)\n"
		"  --seq-len N       maximum context (default 256)\n"
		"  --separate-classifier  write a classifier matrix instead of\n"
		"                    sharing the token embedding\n"
		"  --seed N          weight seed (default 1)\n");
}


int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "out", required_argument, NULL, 'o' },
		{ "dim", required_argument, NULL, 'd' },
		{ "hidden-dim", required_argument, NULL, 'h' },
		{ "layers", required_argument, NULL, 'l' },
		{ "heads", required_argument, NULL, 'n' },
		{ "kv-heads", required_argument, NULL, 'k' },
		{ "vocab", required_argument, NULL, 'v' },
		{ "seq-len", required_argument, NULL, 's' },
		{ "separate-classifier", no_argument, NULL, 'c' },
		{ "seed", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'H' },
		{ NULL, 0, NULL, 0 },
	};
	struct engine_shape s = {
		.dim = 288, .hidden_dim = 768, .n_layers = 6, .n_heads = 6,
		.n_kv_heads = 0, .vocab_size = 32000, .seq_len = 256,
		.shared_classifier = true,
	};
	struct writer w = { .state = 1 };
	struct engine_error err;
	int c;

	while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (c) {
		case 'o': w.path = optarg; break;
		case 'd': s.dim = parse_int("--dim", optarg); break;
		case 'h': s.hidden_dim = parse_int("--hidden-dim", optarg); break;
		case 'l': s.n_layers = parse_int("--layers", optarg); break;
		case 'n': s.n_heads = parse_int("--heads", optarg); break;
		case 'k': s.n_kv_heads = parse_int("--kv-heads", optarg); break;
		case 'v': s.vocab_size = parse_int("--vocab", optarg); break;
		case 's': s.seq_len = parse_int("--seq-len", optarg); break;
		case 'c': s.shared_classifier = false; break;
		case 'r': w.state = (uint64_t)parse_int("--seed", optarg) * 0x9E3779B97F4A7C15ull; break;
		case 'H': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (w.path == NULL) {
		fprintf(stderr, "slab-synth: --out is required\n");
		return 2;
	}
	if (s.n_kv_heads == 0)
		s.n_kv_heads = s.n_heads;
	if (engine_shape_check(w.path, &s, 28 + engine_checkpoint_bytes(&s),
			       &err) < 0) {
		fprintf(stderr, "slab-synth: %s\n", err.message);
		return 2;
	}

	uint64_t dim = (uint64_t)s.dim, hidden = (uint64_t)s.hidden_dim;
	uint64_t layers = (uint64_t)s.n_layers;
	uint64_t kv_dim = (uint64_t)engine_kv_dim(&s);
	float in_dim = 1.0f / sqrtf((float)s.dim);
	float in_hidden = 1.0f / sqrtf((float)s.hidden_dim);
	int32_t header[7] = { s.dim, s.hidden_dim, s.n_layers, s.n_heads,
			      s.n_kv_heads,
			      s.shared_classifier ? s.vocab_size : -s.vocab_size,
			      s.seq_len };

	w.file = fopen(w.path, "wb");
	if (w.file == NULL)
		die("cannot create ", w.path);
	if (fwrite(header, sizeof(header), 1, w.file) != 1)
		die("write failed for ", w.path);
	write_floats(&w, (uint64_t)s.vocab_size * dim, 1.0f, false);
	write_floats(&w, layers * dim, 1.0f, true);           /* rms_att */
	write_floats(&w, layers * dim * dim, in_dim, false);  /* wq */
	write_floats(&w, 2 * layers * kv_dim * dim, in_dim, false); /* wk, wv */
	write_floats(&w, layers * dim * dim, in_dim, false);  /* wo */
	write_floats(&w, layers * dim, 1.0f, true);           /* rms_ffn */
	write_floats(&w, layers * hidden * dim, in_dim, false);    /* w1 */
	write_floats(&w, layers * dim * hidden, in_hidden, false); /* w2 */
	write_floats(&w, layers * hidden * dim, in_dim, false);    /* w3 */
	write_floats(&w, dim, 1.0f, true);                    /* rms_final */
	write_floats(&w, (uint64_t)s.seq_len * (uint64_t)engine_head_size(&s),
		     0.0f, true);                             /* RoPE tables */
	if (!s.shared_classifier)
		write_floats(&w, (uint64_t)s.vocab_size * dim, in_dim, false);
	if (fclose(w.file) != 0)
		die("write failed for ", w.path);
	return 0;
}
