/*
 * Tests of proto/: the incremental frame reader, the frame encoder, envelope
 * packing and unpacking for every request kind, and the blocking descriptor
 * helpers over a socketpair.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "proto/frame.h"

#define TEST_TIMEOUT_S 10


/* Writes the frame of len bytes of payload into out; returns its size. */
static size_t build_frame(uint8_t *out, const void *payload, uint32_t len)
{
	frame_put_length(out, len);
	memcpy(out + FRAME_HEADER_SIZE, payload, len);
	return FRAME_HEADER_SIZE + (size_t)len;
}


/* Fills len bytes with a pattern that depends on seed. */
static void fill_pattern(uint8_t *data, size_t len, unsigned seed)
{
	for (size_t i = 0; i < len; i++)
		data[i] = (uint8_t)(i * 31u + seed);
}


Test(frame_reader, length_prefix_is_little_endian, .timeout = TEST_TIMEOUT_S)
{
	uint8_t header[FRAME_HEADER_SIZE];

	frame_put_length(header, 0x01020304u);
	cr_assert_eq(header[0], 0x04);
	cr_assert_eq(header[1], 0x03);
	cr_assert_eq(header[2], 0x02);
	cr_assert_eq(header[3], 0x01);
	cr_assert_eq(frame_get_length(header), 0x01020304u);
}


Test(frame_reader, init_rejects_max_above_limit, .timeout = TEST_TIMEOUT_S)
{
	struct frame_reader reader;

	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	cr_assert_eq(reader.max_payload, FRAME_DEFAULT_MAX);
	frame_reader_destroy(&reader);

	cr_assert_eq(frame_reader_init(&reader, FRAME_LIMIT_MAX + 1), -EINVAL);
}


Test(frame_reader, partial_frames_byte_by_byte, .timeout = TEST_TIMEOUT_S)
{
	static const uint32_t lengths[] = { 1, 7, 300, 4096 };
	uint8_t stream[8192];
	uint8_t payloads[4][4096];
	size_t stream_len = 0;
	size_t frames_seen = 0;
	struct frame_reader reader;

	for (size_t i = 0; i < 4; i++) {
		fill_pattern(payloads[i], lengths[i], (unsigned)i);
		stream_len += build_frame(stream + stream_len, payloads[i],
					  lengths[i]);
	}

	cr_assert_eq(frame_reader_init(&reader, 4096), 0);
	for (size_t offset = 0; offset < stream_len; offset++) {
		const uint8_t *payload;
		size_t payload_len;
		size_t consumed;
		int rc;

		rc = frame_reader_feed(&reader, stream + offset, 1, &consumed,
				       &payload, &payload_len);
		cr_assert_geq(rc, 0, "feed failed at byte %zu: %d", offset, rc);
		cr_assert_eq(consumed, 1);
		if (rc == 0) {
			cr_assert_null(payload);
			continue;
		}

		cr_assert_lt(frames_seen, 4);
		cr_assert_eq(payload_len, lengths[frames_seen]);
		cr_assert_eq(memcmp(payload, payloads[frames_seen],
				    payload_len), 0);
		frames_seen++;
	}
	cr_assert_eq(frames_seen, 4);
	cr_assert_eq(frame_reader_buffered(&reader), 0);
	frame_reader_destroy(&reader);
}


Test(frame_reader, several_frames_in_one_feed, .timeout = TEST_TIMEOUT_S)
{
	uint8_t stream[256];
	size_t stream_len = 0;
	const char *texts[] = { "alpha", "b", "gamma delta" };
	struct frame_reader reader;
	const uint8_t *data = stream;
	size_t frames_seen = 0;

	for (size_t i = 0; i < 3; i++)
		stream_len += build_frame(stream + stream_len, texts[i],
					  (uint32_t)strlen(texts[i]));
	/* Half of a fourth frame's length prefix trails the three frames. */
	stream[stream_len++] = 9;
	stream[stream_len++] = 0;

	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	size_t left = stream_len;
	for (;;) {
		const uint8_t *payload;
		size_t payload_len;
		size_t consumed;
		int rc = frame_reader_feed(&reader, data, left, &consumed,
					   &payload, &payload_len);

		cr_assert_geq(rc, 0);
		data += consumed;
		left -= consumed;
		if (rc == 0)
			break;
		cr_assert_lt(frames_seen, 3);
		cr_assert_eq(payload_len, strlen(texts[frames_seen]));
		cr_assert_eq(memcmp(payload, texts[frames_seen], payload_len),
			     0);
		frames_seen++;
	}
	cr_assert_eq(frames_seen, 3);
	cr_assert_eq(left, 0);
	cr_assert_eq(frame_reader_buffered(&reader), 2);
	frame_reader_destroy(&reader);
}


Test(frame_reader, frame_exactly_at_max, .timeout = TEST_TIMEOUT_S)
{
	const size_t max = 1024;
	uint8_t stream[FRAME_HEADER_SIZE + 1024];
	uint8_t payload_in[1024];
	struct frame_reader reader;
	const uint8_t *payload;
	size_t payload_len;
	size_t consumed;

	fill_pattern(payload_in, max, 5);
	build_frame(stream, payload_in, (uint32_t)max);

	cr_assert_eq(frame_reader_init(&reader, max), 0);
	cr_assert_eq(frame_reader_feed(&reader, stream, sizeof(stream),
				       &consumed, &payload, &payload_len), 1);
	cr_assert_eq(consumed, sizeof(stream));
	cr_assert_eq(payload_len, max);
	cr_assert_eq(memcmp(payload, payload_in, max), 0);
	cr_assert_leq(reader.payload_capacity, max);
	frame_reader_destroy(&reader);
}


Test(frame_reader, one_byte_above_max_rejected, .timeout = TEST_TIMEOUT_S)
{
	const size_t max = 1024;
	uint8_t header[FRAME_HEADER_SIZE];
	struct frame_reader reader;
	const uint8_t *payload;
	size_t payload_len;
	size_t consumed;

	frame_put_length(header, (uint32_t)max + 1);
	cr_assert_eq(frame_reader_init(&reader, max), 0);
	cr_assert_eq(frame_reader_feed(&reader, header, sizeof(header),
				       &consumed, &payload, &payload_len),
		     -EMSGSIZE);
	cr_assert_eq(consumed, FRAME_HEADER_SIZE);

	/* Rejected from the length alone: no payload buffer exists. */
	cr_assert_null(reader.payload);
	cr_assert_eq(reader.payload_capacity, 0);

	/* The error is sticky, because the stream cannot be resynchronized. */
	cr_assert_eq(frame_reader_feed(&reader, "x", 1, &consumed, &payload,
				       &payload_len), -EMSGSIZE);
	cr_assert_eq(consumed, 0);
	frame_reader_destroy(&reader);
}


Test(frame_reader, default_max_rejects_above_1mib, .timeout = TEST_TIMEOUT_S)
{
	uint8_t header[FRAME_HEADER_SIZE];
	struct frame_reader reader;
	const uint8_t *payload;
	size_t payload_len;
	size_t consumed;

	frame_put_length(header, (uint32_t)FRAME_DEFAULT_MAX + 1);
	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	cr_assert_eq(frame_reader_feed(&reader, header, sizeof(header),
				       &consumed, &payload, &payload_len),
		     -EMSGSIZE);
	cr_assert_null(reader.payload);
	frame_reader_destroy(&reader);

	/* The largest length the prefix can hold is rejected the same way. */
	frame_put_length(header, UINT32_MAX);
	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	cr_assert_eq(frame_reader_feed(&reader, header, sizeof(header),
				       &consumed, &payload, &payload_len),
		     -EMSGSIZE);
	cr_assert_null(reader.payload);
	frame_reader_destroy(&reader);
}


Test(frame_reader, zero_length_rejected, .timeout = TEST_TIMEOUT_S)
{
	uint8_t header[FRAME_HEADER_SIZE] = { 0, 0, 0, 0 };
	struct frame_reader reader;
	const uint8_t *payload;
	size_t payload_len;
	size_t consumed;

	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	cr_assert_eq(frame_reader_feed(&reader, header, sizeof(header),
				       &consumed, &payload, &payload_len),
		     -EPROTO);
	cr_assert_null(payload);
	cr_assert_null(reader.payload);
	frame_reader_destroy(&reader);
}


Test(frame_reader, large_buffer_freed_after_frame, .timeout = TEST_TIMEOUT_S)
{
	const size_t big = 200 * 1024;
	uint8_t *stream = malloc(FRAME_HEADER_SIZE + big);
	uint8_t *payload_in = malloc(big);
	uint8_t small[FRAME_HEADER_SIZE + 3];
	struct frame_reader reader;
	const uint8_t *payload;
	size_t payload_len;
	size_t consumed;

	cr_assert_not_null(stream);
	cr_assert_not_null(payload_in);
	fill_pattern(payload_in, big, 9);
	build_frame(stream, payload_in, (uint32_t)big);
	build_frame(small, "abc", 3);

	cr_assert_eq(frame_reader_init(&reader, 0), 0);
	cr_assert_eq(frame_reader_feed(&reader, stream, FRAME_HEADER_SIZE + big,
				       &consumed, &payload, &payload_len), 1);
	cr_assert_eq(payload_len, big);
	cr_assert_eq(memcmp(payload, payload_in, big), 0);

	cr_assert_eq(frame_reader_feed(&reader, small, sizeof(small),
				       &consumed, &payload, &payload_len), 1);
	cr_assert_eq(payload_len, 3);
	cr_assert_eq(memcmp(payload, "abc", 3), 0);
	cr_assert_leq(reader.payload_capacity, 3);

	frame_reader_destroy(&reader);
	free(payload_in);
	free(stream);
}


Test(frame_encode, prefixes_length, .timeout = TEST_TIMEOUT_S)
{
	uint8_t out[16];

	cr_assert_eq(frame_encode(out, sizeof(out), "hello", 5, 0), 9);
	cr_assert_eq(frame_get_length(out), 5);
	cr_assert_eq(memcmp(out + FRAME_HEADER_SIZE, "hello", 5), 0);
}


Test(frame_encode, rejects_bad_lengths, .timeout = TEST_TIMEOUT_S)
{
	uint8_t out[16];

	cr_assert_eq(frame_encode(out, sizeof(out), "", 0, 0), -EPROTO);
	cr_assert_eq(frame_encode(out, sizeof(out), "hello", 5, 4), -EMSGSIZE);
	cr_assert_eq(frame_encode(out, 8, "hello", 5, 0), -ENOBUFS);
}


/* ---- Envelopes ---------------------------------------------------------- */


/* Packs request into a frame, unpacks it, and checks the id and kind. The
 * caller frees the result with slabd__request__free_unpacked(). */
static Slabd__Request *round_trip(Slabd__Request *request)
{
	Slabd__Request *copy;
	uint8_t *frame;
	size_t frame_len;

	cr_assert_eq(proto_pack_frame(&request->base, 0, &frame, &frame_len),
		     0);
	cr_assert_eq(frame_get_length(frame), frame_len - FRAME_HEADER_SIZE);
	cr_assert_eq(proto_unpack_request_frame(frame, frame_len, 0, &copy), 0);
	free(frame);

	cr_assert_eq(copy->request_id, request->request_id);
	cr_assert_eq(copy->kind_case, request->kind_case);
	return copy;
}


Test(envelope, hello_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HelloRequest hello = SLABD__HELLO_REQUEST__INIT;
	Slabd__Request *copy;

	hello.protocol_version = PROTO_VERSION;
	request.request_id = 1;
	request.kind_case = SLABD__REQUEST__KIND_HELLO;
	request.hello = &hello;

	copy = round_trip(&request);
	cr_assert_eq(copy->hello->protocol_version, PROTO_VERSION);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, open_session_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__OpenSessionRequest open = SLABD__OPEN_SESSION_REQUEST__INIT;
	Slabd__Request *copy;

	open.max_context = 2048;
	open.policy = SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT;
	open.n_keep = 16;
	open.optional_seed_case =
		SLABD__OPEN_SESSION_REQUEST__OPTIONAL_SEED_SEED;
	open.seed = 0;
	request.request_id = UINT64_MAX;
	request.kind_case = SLABD__REQUEST__KIND_OPEN_SESSION;
	request.open_session = &open;

	copy = round_trip(&request);
	cr_assert_eq(copy->open_session->max_context, 2048);
	cr_assert_eq(copy->open_session->policy,
		     SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT);
	cr_assert_eq(copy->open_session->n_keep, 16);
	/* A seed of 0 that was set stays distinguishable from no seed. */
	cr_assert_eq(copy->open_session->optional_seed_case,
		     SLABD__OPEN_SESSION_REQUEST__OPTIONAL_SEED_SEED);
	cr_assert_eq(copy->open_session->seed, 0);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, generate_text_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__GenerateRequest generate = SLABD__GENERATE_REQUEST__INIT;
	char *stop[] = { "\n\n", "END" };
	Slabd__Request *copy;

	generate.session = "3.1.00ff00ff00ff00ff";
	generate.prompt_case = SLABD__GENERATE_REQUEST__PROMPT_TEXT;
	generate.text = "Once upon a time";
	generate.max_tokens = 64;
	generate.optional_temperature_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE_TEMPERATURE;
	generate.temperature = 0.0f;
	generate.optional_top_p_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_TOP_P_TOP_P;
	generate.top_p = 0.9f;
	generate.optional_seed_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_SEED_SEED;
	generate.seed = 42;
	generate.stop = stop;
	generate.n_stop = 2;
	generate.stream = true;
	request.request_id = 7;
	request.kind_case = SLABD__REQUEST__KIND_GENERATE;
	request.generate = &generate;

	copy = round_trip(&request);
	cr_assert_str_eq(copy->generate->session, generate.session);
	cr_assert_eq(copy->generate->prompt_case,
		     SLABD__GENERATE_REQUEST__PROMPT_TEXT);
	cr_assert_str_eq(copy->generate->text, "Once upon a time");
	cr_assert_eq(copy->generate->max_tokens, 64);
	cr_assert_eq(copy->generate->optional_temperature_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE_TEMPERATURE);
	cr_assert_float_eq(copy->generate->temperature, 0.0f, 0.0f);
	cr_assert_float_eq(copy->generate->top_p, 0.9f, 0.0f);
	cr_assert_eq(copy->generate->optional_top_k_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_TOP_K__NOT_SET);
	cr_assert_eq(copy->generate->optional_min_p_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_MIN_P__NOT_SET);
	cr_assert_eq(copy->generate->optional_repetition_penalty_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_REPETITION_PENALTY__NOT_SET);
	cr_assert_eq(copy->generate->seed, 42);
	cr_assert_eq(copy->generate->n_stop, 2);
	cr_assert_str_eq(copy->generate->stop[0], "\n\n");
	cr_assert_str_eq(copy->generate->stop[1], "END");
	cr_assert(copy->generate->stream);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, generate_tokens_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__GenerateRequest generate = SLABD__GENERATE_REQUEST__INIT;
	Slabd__TokenIds tokens = SLABD__TOKEN_IDS__INIT;
	int32_t ids[] = { 1, 403, 0, 511 };
	Slabd__Request *copy;

	tokens.ids = ids;
	tokens.n_ids = 4;
	generate.prompt_case = SLABD__GENERATE_REQUEST__PROMPT_TOKENS;
	generate.tokens = &tokens;
	generate.optional_top_k_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_TOP_K_TOP_K;
	generate.top_k = 40;
	generate.optional_min_p_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_MIN_P_MIN_P;
	generate.min_p = 0.05f;
	generate.optional_repetition_penalty_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_REPETITION_PENALTY_REPETITION_PENALTY;
	generate.repetition_penalty = 1.1f;
	request.request_id = 8;
	request.kind_case = SLABD__REQUEST__KIND_GENERATE;
	request.generate = &generate;

	copy = round_trip(&request);
	cr_assert_str_eq(copy->generate->session, "");
	cr_assert_eq(copy->generate->prompt_case,
		     SLABD__GENERATE_REQUEST__PROMPT_TOKENS);
	cr_assert_eq(copy->generate->tokens->n_ids, 4);
	cr_assert_eq(memcmp(copy->generate->tokens->ids, ids, sizeof(ids)), 0);
	cr_assert_eq(copy->generate->top_k, 40);
	cr_assert_float_eq(copy->generate->min_p, 0.05f, 0.0f);
	cr_assert_float_eq(copy->generate->repetition_penalty, 1.1f, 0.0f);
	cr_assert_eq(copy->generate->optional_temperature_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE__NOT_SET);
	cr_assert_eq(copy->generate->optional_seed_case,
		     SLABD__GENERATE_REQUEST__OPTIONAL_SEED__NOT_SET);
	cr_assert_not(copy->generate->stream);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, prefill_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__PrefillRequest prefill = SLABD__PREFILL_REQUEST__INIT;
	Slabd__Request *copy;

	prefill.session = "0.1.1234";
	prefill.prompt_case = SLABD__PREFILL_REQUEST__PROMPT_TEXT;
	prefill.text = "You are a storyteller.";
	request.request_id = 9;
	request.kind_case = SLABD__REQUEST__KIND_PREFILL;
	request.prefill = &prefill;

	copy = round_trip(&request);
	cr_assert_str_eq(copy->prefill->session, "0.1.1234");
	cr_assert_eq(copy->prefill->prompt_case,
		     SLABD__PREFILL_REQUEST__PROMPT_TEXT);
	cr_assert_str_eq(copy->prefill->text, "You are a storyteller.");
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, cancel_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__CancelRequest cancel = SLABD__CANCEL_REQUEST__INIT;
	Slabd__Request *copy;

	cancel.target_request_id = 7;
	cancel.session = "3.1.00ff00ff00ff00ff";
	request.request_id = 10;
	request.kind_case = SLABD__REQUEST__KIND_CANCEL;
	request.cancel = &cancel;

	copy = round_trip(&request);
	cr_assert_eq(copy->cancel->target_request_id, 7);
	cr_assert_str_eq(copy->cancel->session, "3.1.00ff00ff00ff00ff");
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, close_session_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__CloseSessionRequest close_request =
		SLABD__CLOSE_SESSION_REQUEST__INIT;
	Slabd__Request *copy;

	close_request.session = "5.2.abcdef";
	request.request_id = 11;
	request.kind_case = SLABD__REQUEST__KIND_CLOSE_SESSION;
	request.close_session = &close_request;

	copy = round_trip(&request);
	cr_assert_str_eq(copy->close_session->session, "5.2.abcdef");
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, empty_requests_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__ListSessionsRequest list = SLABD__LIST_SESSIONS_REQUEST__INIT;
	Slabd__StatsRequest stats = SLABD__STATS_REQUEST__INIT;
	Slabd__HealthRequest health = SLABD__HEALTH_REQUEST__INIT;
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__Request *copy;

	/* Kinds without fields still pack the oneof tag, so even request id 0
	 * gives a non-empty frame. */
	request.request_id = 0;
	request.kind_case = SLABD__REQUEST__KIND_LIST_SESSIONS;
	request.list_sessions = &list;
	copy = round_trip(&request);
	cr_assert_not_null(copy->list_sessions);
	slabd__request__free_unpacked(copy, NULL);

	request.kind_case = SLABD__REQUEST__KIND_STATS;
	request.stats = &stats;
	copy = round_trip(&request);
	cr_assert_not_null(copy->stats);
	slabd__request__free_unpacked(copy, NULL);

	request.kind_case = SLABD__REQUEST__KIND_HEALTH;
	request.health = &health;
	copy = round_trip(&request);
	cr_assert_not_null(copy->health);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, tokenize_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__TokenizeRequest tokenize = SLABD__TOKENIZE_REQUEST__INIT;
	Slabd__Request *copy;

	tokenize.text = "héllo wörld";
	tokenize.add_bos = true;
	request.request_id = 12;
	request.kind_case = SLABD__REQUEST__KIND_TOKENIZE;
	request.tokenize = &tokenize;

	copy = round_trip(&request);
	cr_assert_str_eq(copy->tokenize->text, "héllo wörld");
	cr_assert(copy->tokenize->add_bos);
	slabd__request__free_unpacked(copy, NULL);
}


Test(envelope, reply_round_trip, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Done done = SLABD__DONE__INIT;
	Slabd__Error error = SLABD__ERROR__INIT;
	Slabd__Reply *copy;
	uint8_t *frame;
	size_t frame_len;

	error.code = SLABD__ERROR_CODE__ERROR_CODE_INTERNAL;
	error.message = "step for session 2.1.ab killed two workers";
	done.finish_reason = SLABD__FINISH_REASON__FINISH_REASON_ERROR;
	done.prompt_tokens = 5;
	done.completion_tokens = 3;
	done.time_to_first_token_us = 12345;
	done.decode_tokens_per_second = 250.5;
	done.text.data = (uint8_t *)"abc";
	done.text.len = 3;
	done.committed_length = 8;
	done.error = &error;
	reply.request_id = 77;
	reply.kind_case = SLABD__REPLY__KIND_DONE;
	reply.done = &done;

	cr_assert_eq(proto_pack_frame(&reply.base, 0, &frame, &frame_len), 0);
	cr_assert_eq(proto_unpack_reply_frame(frame, frame_len, 0, &copy), 0);
	free(frame);

	cr_assert_eq(copy->request_id, 77);
	cr_assert_eq(copy->kind_case, SLABD__REPLY__KIND_DONE);
	cr_assert_eq(copy->done->finish_reason,
		     SLABD__FINISH_REASON__FINISH_REASON_ERROR);
	cr_assert_eq(copy->done->prompt_tokens, 5);
	cr_assert_eq(copy->done->completion_tokens, 3);
	cr_assert_eq(copy->done->time_to_first_token_us, 12345);
	cr_assert_float_eq(copy->done->decode_tokens_per_second, 250.5, 0.0);
	cr_assert_eq(copy->done->text.len, 3);
	cr_assert_eq(memcmp(copy->done->text.data, "abc", 3), 0);
	cr_assert_eq(copy->done->committed_length, 8);
	cr_assert_eq(copy->done->error->code,
		     SLABD__ERROR_CODE__ERROR_CODE_INTERNAL);
	cr_assert_str_eq(copy->done->error->message, error.message);
	slabd__reply__free_unpacked(copy, NULL);
}


Test(envelope, garbage_payload_rejected, .timeout = TEST_TIMEOUT_S)
{
	/* 0xff starts a field with wire type 7, which does not exist. */
	static const uint8_t invalid_wire_type[] = { 0xff, 0xff, 0xff, 0xff };
	/* Field 2 (hello) as length-delimited with length 100 and 1 byte. */
	static const uint8_t truncated_field[] = { 0x12, 0x64, 0x08 };
	/* A varint that never ends. */
	static const uint8_t endless_varint[] = { 0x08, 0x80, 0x80, 0x80 };
	Slabd__Request *request;
	Slabd__Reply *reply;

	cr_assert_eq(proto_unpack_request(invalid_wire_type,
					  sizeof(invalid_wire_type), &request),
		     -EBADMSG);
	cr_assert_null(request);
	cr_assert_eq(proto_unpack_request(truncated_field,
					  sizeof(truncated_field), &request),
		     -EBADMSG);
	cr_assert_eq(proto_unpack_reply(endless_varint, sizeof(endless_varint),
					&reply),
		     -EBADMSG);
	cr_assert_null(reply);
	cr_assert_eq(proto_unpack_request(invalid_wire_type, 0, &request),
		     -EPROTO);
}


Test(envelope, frame_errors_are_distinct, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HelloRequest hello = SLABD__HELLO_REQUEST__INIT;
	Slabd__Request *copy;
	uint8_t *frame;
	size_t frame_len;

	request.request_id = 3;
	request.kind_case = SLABD__REQUEST__KIND_HELLO;
	request.hello = &hello;
	hello.protocol_version = PROTO_VERSION;
	cr_assert_eq(proto_pack_frame(&request.base, 0, &frame, &frame_len), 0);

	/* Truncated: shorter than the length prefix, or than the payload. */
	cr_assert_eq(proto_unpack_request_frame(frame, 2, 0, &copy), -ENODATA);
	cr_assert_eq(proto_unpack_request_frame(frame, frame_len - 1, 0, &copy),
		     -ENODATA);
	/* Oversize: the payload is above a maximum of one byte. */
	cr_assert_eq(proto_unpack_request_frame(frame, frame_len, 1, &copy),
		     -EMSGSIZE);
	/* Unpack failure: a valid length prefix around invalid bytes. */
	memset(frame + FRAME_HEADER_SIZE, 0xff,
	       frame_len - FRAME_HEADER_SIZE);
	cr_assert_eq(proto_unpack_request_frame(frame, frame_len, 0, &copy),
		     -EBADMSG);
	free(frame);
}


Test(envelope, pack_rejects_oversize_and_empty, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__TokenizeRequest tokenize = SLABD__TOKENIZE_REQUEST__INIT;
	char text[200];
	uint8_t *frame;
	size_t frame_len;

	memset(text, 'a', sizeof(text) - 1);
	text[sizeof(text) - 1] = '\0';
	tokenize.text = text;
	request.kind_case = SLABD__REQUEST__KIND_TOKENIZE;
	request.tokenize = &tokenize;
	cr_assert_eq(proto_pack_frame(&request.base, 100, &frame, &frame_len),
		     -EMSGSIZE);
	cr_assert_null(frame);

	/* An envelope with nothing set packs to 0 bytes, which no frame can
	 * carry. */
	Slabd__Request empty = SLABD__REQUEST__INIT;
	cr_assert_eq(proto_pack_frame(&empty.base, 0, &frame, &frame_len),
		     -EPROTO);
}


/* ---- Blocking helpers over a socketpair ----------------------------------- */


static void make_socketpair(int fds[2])
{
	cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds),
		     0, "socketpair: %s", strerror(errno));
}


Test(frame_fd, send_and_read_round_trip, .timeout = TEST_TIMEOUT_S)
{
	int fds[2];
	uint8_t *payload;

	make_socketpair(fds);
	cr_assert_eq(frame_send_fd(fds[0], "first", 5, 0), 0);
	cr_assert_eq(frame_send_fd(fds[0], "second frame", 12, 0), 0);

	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), 5);
	cr_assert_eq(memcmp(payload, "first", 5), 0);
	free(payload);
	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), 12);
	cr_assert_eq(memcmp(payload, "second frame", 12), 0);
	free(payload);

	close(fds[0]);
	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), 0);
	cr_assert_null(payload);
	close(fds[1]);
}


struct writer_args {
	int fd;
	const uint8_t *data;
	size_t len;
	unsigned delay_ms;
	int rc;
};


static void *writer_thread(void *arg)
{
	struct writer_args *args = arg;
	sigset_t all;

	/* Signals for the test go to the reading thread. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	if (args->delay_ms > 0)
		usleep(args->delay_ms * 1000);
	args->rc = frame_send_fd(args->fd, args->data, args->len, 0);
	return NULL;
}


Test(frame_fd, max_frame_with_short_reads, .timeout = TEST_TIMEOUT_S)
{
	const size_t len = FRAME_DEFAULT_MAX;
	uint8_t *data = malloc(len);
	struct writer_args args;
	pthread_t thread;
	uint8_t *payload;
	int buffer_size = 4096;
	int fds[2];

	cr_assert_not_null(data);
	fill_pattern(data, len, 3);
	make_socketpair(fds);
	/* Small socket buffers force many short writes and reads. */
	setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &buffer_size,
		   sizeof(buffer_size));
	setsockopt(fds[1], SOL_SOCKET, SO_RCVBUF, &buffer_size,
		   sizeof(buffer_size));

	args = (struct writer_args){ .fd = fds[0], .data = data, .len = len };
	cr_assert_eq(pthread_create(&thread, NULL, writer_thread, &args), 0);
	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), (ssize_t)len);
	pthread_join(thread, NULL);
	cr_assert_eq(args.rc, 0);
	cr_assert_eq(memcmp(payload, data, len), 0);

	free(payload);
	free(data);
	close(fds[0]);
	close(fds[1]);
}


static void on_alarm(int signo)
{
	(void)signo;
}


Test(frame_fd, read_retries_after_eintr, .timeout = TEST_TIMEOUT_S)
{
	struct sigaction action = { .sa_handler = on_alarm };
	struct itimerval timer = { .it_value = { .tv_usec = 50 * 1000 } };
	struct writer_args args;
	pthread_t thread;
	uint8_t *payload;
	int fds[2];

	/* Without SA_RESTART the alarm makes the blocked read() fail with
	 * EINTR, 50 ms before the writer sends anything. */
	sigemptyset(&action.sa_mask);
	cr_assert_eq(sigaction(SIGALRM, &action, NULL), 0);
	make_socketpair(fds);

	args = (struct writer_args){ .fd = fds[0],
				     .data = (const uint8_t *)"late",
				     .len = 4,
				     .delay_ms = 300 };
	cr_assert_eq(pthread_create(&thread, NULL, writer_thread, &args), 0);
	cr_assert_eq(setitimer(ITIMER_REAL, &timer, NULL), 0);

	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), 4);
	cr_assert_eq(memcmp(payload, "late", 4), 0);
	pthread_join(thread, NULL);
	cr_assert_eq(args.rc, 0);

	free(payload);
	close(fds[0]);
	close(fds[1]);
}


Test(frame_fd, peer_closes_mid_payload, .timeout = TEST_TIMEOUT_S)
{
	uint8_t frame[FRAME_HEADER_SIZE + 10];
	uint8_t *payload;
	int fds[2];

	make_socketpair(fds);
	build_frame(frame, "0123456789", 10);
	cr_assert_eq(frame_write_fd(fds[0], frame, FRAME_HEADER_SIZE + 4), 0);
	close(fds[0]);

	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), -ENODATA);
	cr_assert_null(payload);
	close(fds[1]);
}


Test(frame_fd, peer_closes_mid_header, .timeout = TEST_TIMEOUT_S)
{
	uint8_t header[FRAME_HEADER_SIZE];
	uint8_t *payload;
	int fds[2];

	make_socketpair(fds);
	frame_put_length(header, 10);
	cr_assert_eq(frame_write_fd(fds[0], header, 2), 0);
	close(fds[0]);

	cr_assert_eq(frame_read_fd(fds[1], 0, &payload), -ENODATA);
	cr_assert_null(payload);
	close(fds[1]);
}


Test(frame_fd, read_rejects_bad_lengths, .timeout = TEST_TIMEOUT_S)
{
	uint8_t header[FRAME_HEADER_SIZE];
	uint8_t *payload;
	int fds[2];

	make_socketpair(fds);
	frame_put_length(header, 1025);
	cr_assert_eq(frame_write_fd(fds[0], header, sizeof(header)), 0);
	cr_assert_eq(frame_read_fd(fds[1], 1024, &payload), -EMSGSIZE);
	cr_assert_null(payload);

	frame_put_length(header, 0);
	cr_assert_eq(frame_write_fd(fds[0], header, sizeof(header)), 0);
	cr_assert_eq(frame_read_fd(fds[1], 1024, &payload), -EPROTO);
	cr_assert_null(payload);

	close(fds[0]);
	close(fds[1]);
}


Test(frame_fd, send_rejects_bad_lengths, .timeout = TEST_TIMEOUT_S)
{
	int fds[2];

	make_socketpair(fds);
	cr_assert_eq(frame_send_fd(fds[0], "", 0, 0), -EPROTO);
	cr_assert_eq(frame_send_fd(fds[0], "hello", 5, 4), -EMSGSIZE);
	close(fds[0]);
	close(fds[1]);
}


Test(frame_fd, write_to_closed_peer_fails, .timeout = TEST_TIMEOUT_S)
{
	int fds[2];

	make_socketpair(fds);
	close(fds[1]);

	/* MSG_NOSIGNAL turns the SIGPIPE that would kill the test into
	 * -EPIPE. */
	cr_assert_eq(frame_send_fd(fds[0], "hello", 5, 0), -EPIPE);
	close(fds[0]);
}


Test(frame_fd, write_works_on_a_pipe, .timeout = TEST_TIMEOUT_S)
{
	int fds[2];
	uint8_t *payload;

	cr_assert_eq(pipe(fds), 0);
	cr_assert_eq(frame_send_fd(fds[1], "piped", 5, 0), 0);
	cr_assert_eq(frame_read_fd(fds[0], 0, &payload), 5);
	cr_assert_eq(memcmp(payload, "piped", 5), 0);
	free(payload);
	close(fds[0]);
	close(fds[1]);
}


Test(frame_fd, proto_send_then_unpack, .timeout = TEST_TIMEOUT_S)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HealthRequest health = SLABD__HEALTH_REQUEST__INIT;
	Slabd__Request *copy;
	uint8_t *payload;
	ssize_t len;
	int fds[2];

	make_socketpair(fds);
	request.request_id = 99;
	request.kind_case = SLABD__REQUEST__KIND_HEALTH;
	request.health = &health;
	cr_assert_eq(proto_send_fd(fds[0], &request.base, 0), 0);

	len = frame_read_fd(fds[1], 0, &payload);
	cr_assert_gt(len, 0);
	cr_assert_eq(proto_unpack_request(payload, (size_t)len, &copy), 0);
	cr_assert_eq(copy->request_id, 99);
	cr_assert_eq(copy->kind_case, SLABD__REQUEST__KIND_HEALTH);
	slabd__request__free_unpacked(copy, NULL);
	free(payload);
	close(fds[0]);
	close(fds[1]);
}


Test(envelope, enum_names, .timeout = TEST_TIMEOUT_S)
{
	cr_assert_str_eq(proto_error_code_name(
				 SLABD__ERROR_CODE__ERROR_CODE_CONTEXT_FULL),
			 "CONTEXT_FULL");
	cr_assert_str_eq(proto_error_code_name((Slabd__ErrorCode)1000),
			 "UNKNOWN");
	cr_assert_str_eq(proto_finish_reason_name(
				 SLABD__FINISH_REASON__FINISH_REASON_EOS),
			 "EOS");
	cr_assert_str_eq(proto_health_status_name(
				 SLABD__HEALTH_STATUS__HEALTH_STATUS_DEGRADED),
			 "DEGRADED");
}
