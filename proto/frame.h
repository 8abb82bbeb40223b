/*
 * Framing of the client-to-broker stream socket, and helpers that pack and
 * unpack the protobuf envelopes of proto/slabd.proto into frames.
 *
 * A frame is a 4-byte little-endian payload length followed by that many
 * payload bytes, which hold one serialized slabd.Request or slabd.Reply.
 * A length of 0, or one above the receiver's maximum, is invalid. The stream
 * cannot be resynchronized after an invalid frame, so the receiver closes the
 * connection.
 *
 * Every function returns 0 (or a count) on success and a negative errno value
 * on failure. The framing errors are distinct:
 *
 *   -EMSGSIZE  the length is above the maximum payload length
 *   -EPROTO    the length is 0
 *   -ENODATA   the data ends before the payload the length announces
 *   -EBADMSG   the payload does not unpack as the expected message
 *
 * Nothing here logs.
 */
#ifndef SLAB_PROTO_FRAME_H
#define SLAB_PROTO_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <protobuf-c/protobuf-c.h>

#include "proto/slabd.pb-c.h"

/* Version of proto/slabd.proto, sent in HelloRequest and HelloReply. */
#define PROTO_VERSION 1u

/* Size of the length prefix, in bytes. */
#define FRAME_HEADER_SIZE 4

/* Default maximum payload length, in bytes (1 MiB). */
#define FRAME_DEFAULT_MAX ((size_t)1 << 20)

/* Largest maximum a reader accepts, in bytes: what 4 length bytes can hold. */
#define FRAME_LIMIT_MAX ((size_t)UINT32_MAX)

/*
 * Incremental frame reader for a byte stream. The caller feeds it whatever
 * bytes arrived and it yields complete payloads one at a time. It stores at
 * most one frame, so its buffer never exceeds max_payload bytes. It checks
 * each length before allocating the payload buffer.
 */
struct frame_reader {
	size_t max_payload;                    /* bytes; 1 ... FRAME_LIMIT_MAX */
	uint8_t header[FRAME_HEADER_SIZE];     /* length prefix being read */
	size_t header_fill;                    /* bytes of header[] filled */
	uint8_t *payload;                      /* payload_capacity bytes */
	size_t payload_capacity;               /* bytes allocated */
	size_t payload_len;                    /* bytes announced; 0 until header done */
	size_t payload_fill;                   /* bytes of payload received */
	bool frame_returned;                   /* payload was handed out last call */
	int error;                             /* sticky negative errno, or 0 */
};

/*
 * Initializes reader for payloads of at most max_payload bytes; 0 selects
 * FRAME_DEFAULT_MAX. Returns -EINVAL when max_payload is above
 * FRAME_LIMIT_MAX. Allocates nothing.
 */
int frame_reader_init(struct frame_reader *reader, size_t max_payload);

/* Frees the reader's buffer. The reader may be initialized again. */
void frame_reader_destroy(struct frame_reader *reader);

/*
 * Consumes bytes from data until one frame is complete or data runs out, and
 * stores the number of bytes consumed in *consumed. Returns 1 when a frame is
 * complete, with *payload and *payload_len set to it, or 0 when more bytes
 * are needed. The payload stays valid until the next call on the reader.
 * Call again with the remaining bytes to read further frames from the same
 * data.
 *
 * Returns -EMSGSIZE or -EPROTO for an invalid length, before any allocation,
 * and -ENOMEM when the payload buffer cannot be allocated. After an error the
 * reader returns the same error on every call.
 */
int frame_reader_feed(struct frame_reader *reader, const void *data,
		      size_t len, size_t *consumed, const uint8_t **payload,
		      size_t *payload_len);

/*
 * Returns the number of bytes of an incomplete frame that the reader holds.
 * Non-zero at end of stream means the peer sent a truncated frame.
 */
size_t frame_reader_buffered(const struct frame_reader *reader);

/* Stores len as a little-endian length prefix. */
void frame_put_length(uint8_t header[FRAME_HEADER_SIZE], uint32_t len);

/* Returns the length stored in a little-endian length prefix. */
uint32_t frame_get_length(const uint8_t header[FRAME_HEADER_SIZE]);

/*
 * Writes the frame of payload (length prefix, then the payload) to out.
 * Returns the frame size in bytes, -EPROTO when len is 0, -EMSGSIZE when len
 * is above max_payload (0 selects FRAME_DEFAULT_MAX), or -ENOBUFS when
 * out_size is below len + FRAME_HEADER_SIZE.
 */
ssize_t frame_encode(void *out, size_t out_size, const void *payload,
		     size_t len, size_t max_payload);

/*
 * Writes all len bytes of data to the blocking descriptor fd, retrying after
 * EINTR and short writes. Sockets are written with MSG_NOSIGNAL, so a closed
 * peer gives -EPIPE and no SIGPIPE. Returns 0 or the negative errno of the
 * failed call; bytes written before a failure are not taken back.
 */
int frame_write_fd(int fd, const void *data, size_t len);

/*
 * Writes the frame of payload to fd as frame_write_fd() does. Returns 0,
 * -EPROTO or -EMSGSIZE as frame_encode() does (max_payload 0 selects
 * FRAME_DEFAULT_MAX), or an error of the write.
 */
int frame_send_fd(int fd, const void *payload, size_t len,
		  size_t max_payload);

/*
 * Reads one frame from the blocking descriptor fd, retrying after EINTR and
 * short reads, and stores its payload, allocated with malloc(), in *payload.
 * Returns the payload length (at least 1), or 0 when the peer closed the
 * stream before the first byte of a frame. Errors: -ENODATA when the stream
 * ends inside a frame, and -EMSGSIZE or -EPROTO for an invalid length, which
 * is checked before allocating (max_payload 0 selects FRAME_DEFAULT_MAX).
 * Also -ENOMEM, or the negative errno of a failed read(). *payload is NULL
 * unless a frame is returned.
 */
ssize_t frame_read_fd(int fd, size_t max_payload, uint8_t **payload);

/*
 * Packs msg into a new frame allocated with malloc(), stored in *frame with
 * its size in bytes in *frame_len. Returns -EMSGSIZE when the packed message
 * is above max_payload bytes (0 selects FRAME_DEFAULT_MAX), -EPROTO when it
 * packs to 0 bytes (an envelope with nothing set), or -ENOMEM.
 */
int proto_pack_frame(const ProtobufCMessage *msg, size_t max_payload,
		     uint8_t **frame, size_t *frame_len);

/* Packs msg and writes its frame to fd; errors as proto_pack_frame() and
 * frame_write_fd(). */
int proto_send_fd(int fd, const ProtobufCMessage *msg, size_t max_payload);

/*
 * Unpacks a frame payload (without the length prefix) into a new Request or
 * Reply, freed with slabd__request__free_unpacked() or
 * slabd__reply__free_unpacked(). Returns -EPROTO when len is 0 and -EBADMSG
 * when the bytes are not a valid envelope. An envelope whose kind is a field
 * this schema does not know unpacks with kind NOT_SET; the caller decides
 * what to do with it.
 */
int proto_unpack_request(const uint8_t *payload, size_t len,
			 Slabd__Request **out);
int proto_unpack_reply(const uint8_t *payload, size_t len, Slabd__Reply **out);

/*
 * Unpacks a whole frame (length prefix and payload in one buffer of
 * frame_len bytes). Returns -ENODATA when the buffer is shorter than the
 * prefix announces, -EMSGSIZE when the length is above max_payload (0
 * selects FRAME_DEFAULT_MAX), -EPROTO for a zero length or bytes after the
 * payload, and -EBADMSG when the payload does not unpack.
 */
int proto_unpack_request_frame(const uint8_t *frame, size_t frame_len,
			       size_t max_payload, Slabd__Request **out);
int proto_unpack_reply_frame(const uint8_t *frame, size_t frame_len,
			     size_t max_payload, Slabd__Reply **out);

/* Returns the upper-case name of an error code without its prefix, such as
 * "NOT_FOUND", or "UNKNOWN" for a value outside the enum. */
const char *proto_error_code_name(Slabd__ErrorCode code);

/* Returns the upper-case name of a finish reason, such as "EOS", or "UNKNOWN". */
const char *proto_finish_reason_name(Slabd__FinishReason reason);

/* Returns the upper-case name of a health status, such as "OK", or "UNKNOWN". */
const char *proto_health_status_name(Slabd__HealthStatus status);

#endif /* SLAB_PROTO_FRAME_H */
