/*
 * libFuzzer harness: client bytes through the frame reader and the
 * request decoder, as the broker reads them. The input is split into reads
 * of varying size (the first byte picks the read size) to exercise partial
 * and coalesced frames.
 */
#include "proto/frame.h"

#include <stdint.h>
#include <stdlib.h>

#define MAX_FRAME 4096


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct frame_reader reader;
	size_t chunk, offset = 1;

	if (size < 1 || frame_reader_init(&reader, MAX_FRAME) < 0)
		return 0;
	chunk = (size_t)data[0] % 64 + 1;

	while (offset < size) {
		size_t len = size - offset < chunk ? size - offset : chunk;
		size_t used = 0;

		while (used < len) {
			const uint8_t *payload;
			size_t consumed, payload_len;
			Slabd__Request *request;
			int rc = frame_reader_feed(&reader, data + offset + used,
						   len - used, &consumed,
						   &payload, &payload_len);

			used += consumed;
			if (rc < 0)
				goto out;
			if (rc == 0)
				break;
			if (payload_len > MAX_FRAME)
				abort();
			if (proto_unpack_request(payload, payload_len, &request) == 0)
				slabd__request__free_unpacked(request, NULL);
		}
		offset += len;
	}
out:
	frame_reader_destroy(&reader);
	return 0;
}
