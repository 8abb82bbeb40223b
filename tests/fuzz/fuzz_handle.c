/*
 * libFuzzer harness: arbitrary strings through the session handle parser.
 * Whatever parses must format back to the same string.
 */
#include "shm/shm.h"

#include <stdlib.h>
#include <string.h>


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char text[128], again[SHM_HANDLE_STRLEN];
	struct shm_handle handle;

	if (size >= sizeof(text))
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	if (shm_handle_parse(text, &handle) == 0) {
		if (shm_handle_format(&handle, again, sizeof(again)) < 0 ||
		    strcmp(again, text) != 0)
			abort();
	}
	return 0;
}
