/*
 * Packing of protobuf messages into frames and unpacking of the slabd.Request
 * and slabd.Reply envelopes, plus names for the protocol's enums.
 *
 * protobuf-c reports every unpack failure, including running out of memory,
 * as a NULL result, so all of them come back as -EBADMSG.
 */
#include "proto/frame.h"

#include <errno.h>
#include <stdlib.h>


int proto_pack_frame(const ProtobufCMessage *msg, size_t max_payload,
		     uint8_t **frame, size_t *frame_len)
{
	size_t max = max_payload == 0 ? FRAME_DEFAULT_MAX : max_payload;
	size_t len;
	uint8_t *buffer;

	if (msg == NULL || frame == NULL || frame_len == NULL)
		return -EINVAL;
	*frame = NULL;
	*frame_len = 0;

	len = protobuf_c_message_get_packed_size(msg);
	if (len == 0)
		return -EPROTO;
	if (len > max || len > FRAME_LIMIT_MAX)
		return -EMSGSIZE;

	buffer = malloc(FRAME_HEADER_SIZE + len);
	if (buffer == NULL)
		return -ENOMEM;

	frame_put_length(buffer, (uint32_t)len);
	protobuf_c_message_pack(msg, buffer + FRAME_HEADER_SIZE);

	*frame = buffer;
	*frame_len = FRAME_HEADER_SIZE + len;
	return 0;
}


int proto_send_fd(int fd, const ProtobufCMessage *msg, size_t max_payload)
{
	uint8_t *frame;
	size_t frame_len;
	int rc;

	rc = proto_pack_frame(msg, max_payload, &frame, &frame_len);
	if (rc < 0)
		return rc;

	rc = frame_write_fd(fd, frame, frame_len);
	free(frame);
	return rc;
}


static int proto_unpack(const ProtobufCMessageDescriptor *descriptor,
			const uint8_t *payload, size_t len,
			ProtobufCMessage **out)
{
	ProtobufCMessage *msg;

	if (out == NULL || (payload == NULL && len > 0))
		return -EINVAL;
	*out = NULL;
	if (len == 0)
		return -EPROTO;

	msg = protobuf_c_message_unpack(descriptor, NULL, len, payload);
	if (msg == NULL)
		return -EBADMSG;

	*out = msg;
	return 0;
}


/* Checks the length prefix of a whole frame against the buffer and the
 * maximum, then unpacks the payload. */
static int proto_unpack_frame(const ProtobufCMessageDescriptor *descriptor,
			      const uint8_t *frame, size_t frame_len,
			      size_t max_payload, ProtobufCMessage **out)
{
	size_t max = max_payload == 0 ? FRAME_DEFAULT_MAX : max_payload;
	uint32_t len;

	if (out == NULL || (frame == NULL && frame_len > 0))
		return -EINVAL;
	*out = NULL;

	if (frame_len < FRAME_HEADER_SIZE)
		return -ENODATA;
	len = frame_get_length(frame);
	if (len == 0)
		return -EPROTO;
	if (len > max)
		return -EMSGSIZE;
	if (frame_len - FRAME_HEADER_SIZE < len)
		return -ENODATA;
	if (frame_len - FRAME_HEADER_SIZE > len)
		return -EPROTO;

	return proto_unpack(descriptor, frame + FRAME_HEADER_SIZE, len, out);
}


int proto_unpack_request(const uint8_t *payload, size_t len,
			 Slabd__Request **out)
{
	return proto_unpack(&slabd__request__descriptor, payload, len,
			    (ProtobufCMessage **)out);
}


int proto_unpack_reply(const uint8_t *payload, size_t len, Slabd__Reply **out)
{
	return proto_unpack(&slabd__reply__descriptor, payload, len,
			    (ProtobufCMessage **)out);
}


int proto_unpack_request_frame(const uint8_t *frame, size_t frame_len,
			       size_t max_payload, Slabd__Request **out)
{
	return proto_unpack_frame(&slabd__request__descriptor, frame,
				  frame_len, max_payload,
				  (ProtobufCMessage **)out);
}


int proto_unpack_reply_frame(const uint8_t *frame, size_t frame_len,
			     size_t max_payload, Slabd__Reply **out)
{
	return proto_unpack_frame(&slabd__reply__descriptor, frame, frame_len,
				  max_payload, (ProtobufCMessage **)out);
}


const char *proto_error_code_name(Slabd__ErrorCode code)
{
	switch (code) {
	case SLABD__ERROR_CODE__ERROR_CODE_UNSPECIFIED:
		return "UNSPECIFIED";
	case SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT:
		return "INVALID_ARGUMENT";
	case SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND:
		return "NOT_FOUND";
	case SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED:
		return "RESOURCE_EXHAUSTED";
	case SLABD__ERROR_CODE__ERROR_CODE_CONTEXT_FULL:
		return "CONTEXT_FULL";
	case SLABD__ERROR_CODE__ERROR_CODE_UNAVAILABLE:
		return "UNAVAILABLE";
	case SLABD__ERROR_CODE__ERROR_CODE_INTERNAL:
		return "INTERNAL";
	case SLABD__ERROR_CODE__ERROR_CODE_FAILED_PRECONDITION:
		return "FAILED_PRECONDITION";
	case SLABD__ERROR_CODE__ERROR_CODE_CANCELLED:
		return "CANCELLED";
	case SLABD__ERROR_CODE__ERROR_CODE_UNIMPLEMENTED:
		return "UNIMPLEMENTED";
	case SLABD__ERROR_CODE__ERROR_CODE_PERMISSION_DENIED:
		return "PERMISSION_DENIED";
	default:
		return "UNKNOWN";
	}
}


const char *proto_finish_reason_name(Slabd__FinishReason reason)
{
	switch (reason) {
	case SLABD__FINISH_REASON__FINISH_REASON_UNSPECIFIED:
		return "UNSPECIFIED";
	case SLABD__FINISH_REASON__FINISH_REASON_LENGTH:
		return "LENGTH";
	case SLABD__FINISH_REASON__FINISH_REASON_STOP:
		return "STOP";
	case SLABD__FINISH_REASON__FINISH_REASON_EOS:
		return "EOS";
	case SLABD__FINISH_REASON__FINISH_REASON_CONTEXT_FULL:
		return "CONTEXT_FULL";
	case SLABD__FINISH_REASON__FINISH_REASON_CANCELLED:
		return "CANCELLED";
	case SLABD__FINISH_REASON__FINISH_REASON_ERROR:
		return "ERROR";
	default:
		return "UNKNOWN";
	}
}


const char *proto_health_status_name(Slabd__HealthStatus status)
{
	switch (status) {
	case SLABD__HEALTH_STATUS__HEALTH_STATUS_UNSPECIFIED:
		return "UNSPECIFIED";
	case SLABD__HEALTH_STATUS__HEALTH_STATUS_OK:
		return "OK";
	case SLABD__HEALTH_STATUS__HEALTH_STATUS_DEGRADED:
		return "DEGRADED";
	case SLABD__HEALTH_STATUS__HEALTH_STATUS_STARTING:
		return "STARTING";
	case SLABD__HEALTH_STATUS__HEALTH_STATUS_DRAINING:
		return "DRAINING";
	default:
		return "UNKNOWN";
	}
}
