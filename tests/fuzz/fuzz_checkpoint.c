/*
 * libFuzzer harness: arbitrary bytes as a checkpoint file. Loading must
 * either fail with a message or give a model whose every weight can be
 * read.
 */
#include "worker/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[] = "/tmp/slab-fuzz-checkpoint-XXXXXX";
	struct engine_model *model;
	struct engine_error err;
	int fd = mkstemp(path);

	if (fd < 0)
		return 0;
	if (write(fd, data, size) != (ssize_t)size) {
		close(fd);
		unlink(path);
		return 0;
	}
	close(fd);

	if (engine_model_open(path, &model, &err) == 0) {
		const struct engine_shape *shape = engine_model_shape(model);
		struct engine_tokenizer *tokenizer;

		/* A model that loads must have a shape the engine accepts. */
		if (shape->dim % shape->n_heads != 0 ||
		    shape->n_heads % shape->n_kv_heads != 0)
			abort();
		if (engine_tokenizer_open(path, shape->vocab_size, &tokenizer,
					  &err) == 0)
			engine_tokenizer_close(tokenizer);
		engine_model_close(model);
	} else if (err.message[0] == '\0') {
		abort(); /* every failure must say why */
	}
	unlink(path);
	return 0;
}
