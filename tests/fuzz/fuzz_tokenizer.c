/*
 * libFuzzer harness: the first 2 bytes give a vocabulary size, the next
 * bytes up to a 0xFF 0xFF separator are a tokenizer file, and what follows
 * is text to encode and decode again with the tokenizer when it loads.
 */
#include "worker/engine.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char path[] = "/tmp/slab-fuzz-tokenizer-XXXXXX";
	struct engine_tokenizer *tokenizer;
	struct engine_error err;
	const uint8_t *text;
	size_t file_size, text_size;
	int32_t vocab;
	int fd;

	if (size < 2)
		return 0;
	vocab = (int32_t)(data[0] | data[1] << 8) % 1024 + 1;
	data += 2;
	size -= 2;
	text = memmem(data, size, "\xff\xff", 2);
	file_size = text != NULL ? (size_t)(text - data) : size;
	text = text != NULL ? text + 2 : data + size;
	text_size = (size_t)(data + size - text);

	fd = mkstemp(path);
	if (fd < 0)
		return 0;
	if (write(fd, data, file_size) != (ssize_t)file_size) {
		close(fd);
		unlink(path);
		return 0;
	}
	close(fd);

	if (engine_tokenizer_open(path, vocab, &tokenizer, &err) == 0) {
		int32_t *ids = malloc((text_size + 2) * sizeof(int32_t));
		size_t n = 0;

		if (ids != NULL &&
		    engine_tokenize(tokenizer, (const char *)text, text_size, true,
				    ids, text_size + 2, &n) == 0) {
			struct engine_detokenizer detokenizer;
			char out[4200];

			engine_detokenizer_init(&detokenizer, ENGINE_TOKEN_BOS);
			for (size_t i = 1; i < n; i++) {
				if (ids[i] < 0 || ids[i] >= vocab)
					abort();
				engine_detokenize(tokenizer, &detokenizer, ids[i],
						  out, sizeof(out));
			}
			engine_detokenize_flush(&detokenizer, out, sizeof(out));
		}
		free(ids);
		engine_tokenizer_close(tokenizer);
	}
	unlink(path);
	return 0;
}
