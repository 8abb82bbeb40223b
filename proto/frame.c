/*
 * Length-prefixed frames on a byte stream: the incremental reader, the
 * encoder, and blocking read and write helpers for one descriptor.
 *
 * The reader keeps at most one frame. It checks each length against its
 * maximum before it allocates, so a peer cannot make it allocate more than
 * max_payload bytes.
 */
#include "proto/frame.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/*
 * Payload buffers up to this size are kept between frames. Larger ones are
 * freed once their frame has been handed out, so that an idle connection
 * does not keep a buffer sized for its largest frame.
 */
#define FRAME_READER_KEEP_BYTES ((size_t)64 * 1024)


static size_t frame_effective_max(size_t max_payload)
{
	return max_payload == 0 ? FRAME_DEFAULT_MAX : max_payload;
}


/* Returns 0 when len is a valid payload length for max_payload bytes. */
static int frame_check_length(size_t len, size_t max_payload)
{
	if (len == 0)
		return -EPROTO;
	if (len > frame_effective_max(max_payload) || len > FRAME_LIMIT_MAX)
		return -EMSGSIZE;
	return 0;
}


void frame_put_length(uint8_t header[FRAME_HEADER_SIZE], uint32_t len)
{
	header[0] = (uint8_t)(len & 0xff);
	header[1] = (uint8_t)((len >> 8) & 0xff);
	header[2] = (uint8_t)((len >> 16) & 0xff);
	header[3] = (uint8_t)((len >> 24) & 0xff);
}


uint32_t frame_get_length(const uint8_t header[FRAME_HEADER_SIZE])
{
	return (uint32_t)header[0] | (uint32_t)header[1] << 8 |
	       (uint32_t)header[2] << 16 | (uint32_t)header[3] << 24;
}


int frame_reader_init(struct frame_reader *reader, size_t max_payload)
{
	if (reader == NULL)
		return -EINVAL;
	if (max_payload > FRAME_LIMIT_MAX)
		return -EINVAL;

	memset(reader, 0, sizeof(*reader));
	reader->max_payload = frame_effective_max(max_payload);
	return 0;
}


void frame_reader_destroy(struct frame_reader *reader)
{
	if (reader == NULL)
		return;
	free(reader->payload);
	memset(reader, 0, sizeof(*reader));
}


size_t frame_reader_buffered(const struct frame_reader *reader)
{
	if (reader->frame_returned)
		return 0;
	return reader->header_fill + reader->payload_fill;
}


/* Forgets the frame handed out by the previous call and, when its buffer is
 * large, frees the buffer too. */
static void frame_reader_release(struct frame_reader *reader)
{
	reader->frame_returned = false;
	reader->header_fill = 0;
	reader->payload_len = 0;
	reader->payload_fill = 0;

	if (reader->payload_capacity > FRAME_READER_KEEP_BYTES) {
		free(reader->payload);
		reader->payload = NULL;
		reader->payload_capacity = 0;
	}
}


/* Validates the completed length prefix and makes room for the payload.
 * Returns 0 or a negative errno, which the caller makes sticky. */
static int frame_reader_start_payload(struct frame_reader *reader)
{
	uint32_t len = frame_get_length(reader->header);
	int rc = frame_check_length(len, reader->max_payload);

	if (rc < 0)
		return rc;

	if (reader->payload_capacity < len) {
		uint8_t *buffer = realloc(reader->payload, len);

		if (buffer == NULL)
			return -ENOMEM;
		reader->payload = buffer;
		reader->payload_capacity = len;
	}

	reader->payload_len = len;
	reader->payload_fill = 0;
	return 0;
}


int frame_reader_feed(struct frame_reader *reader, const void *data,
		      size_t len, size_t *consumed, const uint8_t **payload,
		      size_t *payload_len)
{
	const uint8_t *bytes = data;
	size_t used = 0;

	if (reader == NULL || consumed == NULL || payload == NULL ||
	    payload_len == NULL || (data == NULL && len > 0))
		return -EINVAL;

	*consumed = 0;
	*payload = NULL;
	*payload_len = 0;

	if (reader->error < 0)
		return reader->error;
	if (reader->frame_returned)
		frame_reader_release(reader);
	if (len == 0)
		return 0;

	/* Length prefix: it may arrive split across any number of calls. */
	if (reader->payload_len == 0) {
		size_t want = FRAME_HEADER_SIZE - reader->header_fill;
		size_t take = len < want ? len : want;
		int rc;

		memcpy(reader->header + reader->header_fill, bytes, take);
		reader->header_fill += take;
		used += take;
		if (reader->header_fill < FRAME_HEADER_SIZE) {
			*consumed = used;
			return 0;
		}

		rc = frame_reader_start_payload(reader);
		if (rc < 0) {
			reader->error = rc;
			*consumed = used;
			return rc;
		}
	}

	/* Payload: copy what this call has, up to the end of the frame. */
	size_t missing = reader->payload_len - reader->payload_fill;
	size_t left = len - used;
	size_t copy = left < missing ? left : missing;

	if (copy > 0)
		memcpy(reader->payload + reader->payload_fill, bytes + used, copy);
	reader->payload_fill += copy;
	used += copy;
	*consumed = used;

	if (reader->payload_fill < reader->payload_len)
		return 0;

	reader->frame_returned = true;
	*payload = reader->payload;
	*payload_len = reader->payload_len;
	return 1;
}


ssize_t frame_encode(void *out, size_t out_size, const void *payload,
		     size_t len, size_t max_payload)
{
	int rc;

	if (out == NULL || (payload == NULL && len > 0))
		return -EINVAL;

	rc = frame_check_length(len, max_payload);
	if (rc < 0)
		return rc;
	if (out_size < len + FRAME_HEADER_SIZE)
		return -ENOBUFS;

	frame_put_length(out, (uint32_t)len);
	memcpy((uint8_t *)out + FRAME_HEADER_SIZE, payload, len);
	return (ssize_t)(len + FRAME_HEADER_SIZE);
}


/* Writes up to len bytes once, as send() with MSG_NOSIGNAL on a socket and
 * as write() on anything else. Returns what the call returned. */
static ssize_t frame_write_once(int fd, const void *data, size_t len,
				bool *not_socket)
{
	if (!*not_socket) {
		ssize_t n = send(fd, data, len, MSG_NOSIGNAL);

		if (n >= 0 || errno != ENOTSOCK)
			return n;
		*not_socket = true;
	}
	return write(fd, data, len);
}


int frame_write_fd(int fd, const void *data, size_t len)
{
	const uint8_t *bytes = data;
	bool not_socket = false;

	if (fd < 0 || (data == NULL && len > 0))
		return -EINVAL;

	while (len > 0) {
		ssize_t n = frame_write_once(fd, bytes, len, &not_socket);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		bytes += n;
		len -= (size_t)n;
	}
	return 0;
}


int frame_send_fd(int fd, const void *payload, size_t len,
		  size_t max_payload)
{
	uint8_t header[FRAME_HEADER_SIZE];
	int rc;

	if (payload == NULL && len > 0)
		return -EINVAL;

	rc = frame_check_length(len, max_payload);
	if (rc < 0)
		return rc;

	/* Two writes keep this free of allocation. The kernel may deliver
	 * them in separate reads, which every reader handles. */
	frame_put_length(header, (uint32_t)len);
	rc = frame_write_fd(fd, header, sizeof(header));
	if (rc < 0)
		return rc;
	return frame_write_fd(fd, payload, len);
}


/*
 * Reads exactly len bytes unless the stream ends first. Returns the number of
 * bytes read (less than len only at end of stream) or a negative errno.
 */
static ssize_t frame_read_exact(int fd, void *data, size_t len)
{
	uint8_t *bytes = data;
	size_t done = 0;

	while (done < len) {
		ssize_t n = read(fd, bytes + done, len - done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (ssize_t)done;
}


ssize_t frame_read_fd(int fd, size_t max_payload, uint8_t **payload)
{
	uint8_t header[FRAME_HEADER_SIZE];
	uint8_t *buffer;
	uint32_t len;
	ssize_t n;
	int rc;

	if (payload == NULL)
		return -EINVAL;
	*payload = NULL;
	if (fd < 0 || max_payload > FRAME_LIMIT_MAX)
		return -EINVAL;

	n = frame_read_exact(fd, header, sizeof(header));
	if (n < 0)
		return n;
	if (n == 0)
		return 0;
	if ((size_t)n < sizeof(header))
		return -ENODATA;

	len = frame_get_length(header);
	rc = frame_check_length(len, max_payload);
	if (rc < 0)
		return rc;

	buffer = malloc(len);
	if (buffer == NULL)
		return -ENOMEM;

	n = frame_read_exact(fd, buffer, len);
	if (n < 0 || (size_t)n < len) {
		free(buffer);
		return n < 0 ? n : -ENODATA;
	}

	*payload = buffer;
	return (ssize_t)len;
}
