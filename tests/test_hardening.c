/*
 * Hardening tests of the service. Each test starts the real slabd with
 * small limits and feeds it one kind of bad input. The inputs are broken
 * frames, invalid requests, exhausted resources, stalled or slow clients,
 * requests aimed at another connection's work, corrupt model files and
 * peers that are not allowed in. Each test checks the typed error, that
 * only the offending request or connection ends, and that other clients
 * keep getting output equal to slab-run's. The last test mixes 64 clients
 * with these inputs and checks every output, the broker's memory and the
 * KV pool.
 */
#include "tests/service_helpers.h"

#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>

#include "shm/shm.h"

#define TEST_TIMEOUT_S 40
#define LOAD_TIMEOUT_S 60

/* Vocabulary size of stories260K and tok512. */
#define VOCAB_SIZE 512

/*
 * Bytes of one KV block of stories260K with f32 entries: 16 positions x 5
 * layers x 4 KV heads x head size 8 x (K, V) x 4 bytes.
 */
#define BLOCK_BYTES 20480

/* Prompts of the load test, and their greedy references. */
static const char *const prompts[] = {
	"Once upon a time",
	"The cat sat",
	"Lily and Ben went to the park",
	"One day",
	"Tom had a big red ball",
	"The sun was hot and",
	"Sam liked to",
	"There was a little bird who",
};
#define N_PROMPTS (sizeof(prompts) / sizeof(prompts[0]))


/* ---- Checks on messages ------------------------------------------------------ */

/*
 * Whether message contains number as a whole number: "64" does not match
 * inside "640" or "-64".
 */
static bool names_number(const char *message, long long number)
{
	char text[32];
	size_t len;

	snprintf(text, sizeof(text), "%lld", number);
	len = strlen(text);
	for (const char *at = strstr(message, text); at != NULL;
	     at = strstr(at + 1, text)) {
		bool joined_before = at > message &&
				     (isdigit((unsigned char)at[-1]) ||
				      (number >= 0 && at[-1] == '-'));
		bool joined_after = isdigit((unsigned char)at[len]);

		if (!joined_before && !joined_after)
			return true;
	}
	return false;
}


/*
 * Runs a generation that the broker must reject with code before any token.
 * Copies its message to message (SLAB_MESSAGE_SIZE bytes).
 */
static void expect_generate_rejected(struct slab_client *client,
				     const struct slab_generate_options *options,
				     enum slab_error_code code, const char *what,
				     char *message)
{
	static struct generation g;

	generation_run(client, options, &g);
	cr_assert_lt(g.rc, 0, "%s: accepted", what);
	cr_assert_eq(g.error_code, code, "%s: code %s, expected %s: %s", what,
		     slab_error_code_name(g.error_code),
		     slab_error_code_name(code), g.error);
	cr_assert_eq(g.rc, slab_errno_from_code(code), "%s: return value %d",
		     what, g.rc);
	cr_assert_eq(g.n_tokens, 0, "%s: %zu tokens streamed", what,
		     g.n_tokens);
	cr_assert_gt(strlen(g.error), 0, "%s: empty message", what);
	snprintf(message, SLAB_MESSAGE_SIZE, "%s", g.error);
}


/* Runs a generation that must succeed; asserts rc 0 and returns g. */
static struct generation *expect_generate_ok(struct slab_client *client,
					     const struct slab_generate_options *options,
					     const char *what)
{
	static struct generation g;

	generation_run(client, options, &g);
	cr_assert_eq(g.rc, 0, "%s: rejected: %s %s", what,
		     slab_error_code_name(g.error_code), g.error);
	return &g;
}


/* Opens a session with a fixed seed; policy SHIFT keeps n_keep 4. */
static void open_session(struct slab_client *client,
			 enum slab_context_policy policy, uint32_t max_context,
			 char *handle)
{
	struct slab_session_options options;
	int rc;

	slab_session_options_init(&options);
	options.policy = policy;
	options.max_context = max_context;
	options.n_keep = policy == SLAB_CONTEXT_SHIFT ? 4 : 0;
	options.has_seed = true;
	options.seed = 42;
	rc = slab_session_open(client, &options, handle, NULL);
	cr_assert_eq(rc, 0, "open session: %s", slab_error_message(client));
}


/* Returns the committed length of a listed session; fails when unlisted. */
static uint32_t committed_length(struct slab_client *client, const char *handle)
{
	struct slab_session_info info;

	cr_assert(service_find_session(client, handle, &info),
		  "session %s is not listed", handle);
	return info.committed_length;
}


/* Polls a metric until it equals value, for up to timeout_ms. Returns it. */
static double wait_metric(struct slab_client *client, const char *name,
			  double value, unsigned timeout_ms)
{
	uint64_t deadline = service_now_ns() + timeout_ms * 1000000ull;
	double current;

	for (;;) {
		current = service_metric(client, name);
		if (current == value || service_now_ns() > deadline)
			return current;
		service_sleep_ms(20);
	}
}


/* ---- Raw protocol ------------------------------------------------------------ */

static void raw_send_all(int fd, const void *data, size_t len)
{
	ssize_t n = send(fd, data, len, MSG_NOSIGNAL);

	cr_assert_eq(n, (ssize_t)len, "send of %zu bytes: %zd, %s", len, n,
		     strerror(errno));
}


/* Packs a greedy text Generate into a new frame. Returns its size. */
static size_t pack_generate(uint64_t request_id, const char *session,
			    const char *prompt, uint32_t max_tokens,
			    bool stream, uint8_t **frame)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__GenerateRequest generate = SLABD__GENERATE_REQUEST__INIT;
	size_t len = 0;

	request.request_id = request_id;
	request.kind_case = SLABD__REQUEST__KIND_GENERATE;
	request.generate = &generate;
	generate.session = (char *)session;
	generate.prompt_case = SLABD__GENERATE_REQUEST__PROMPT_TEXT;
	generate.text = (char *)prompt;
	generate.max_tokens = max_tokens;
	generate.optional_temperature_case =
		SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE_TEMPERATURE;
	generate.temperature = 0.0f;
	generate.stream = stream;
	cr_assert_eq(proto_pack_frame(&request.base, 0, frame, &len), 0);
	return len;
}


/* Sends a frame with the given payload bytes. */
static void raw_send_payload(int fd, const uint8_t *payload, size_t len)
{
	uint8_t frame[FRAME_HEADER_SIZE + 64];

	cr_assert_leq(len, 64);
	frame_put_length(frame, (uint32_t)len);
	memcpy(frame + FRAME_HEADER_SIZE, payload, len);
	raw_send_all(fd, frame, FRAME_HEADER_SIZE + len);
}


/*
 * Reads one reply, expects an Error with code and returns its message in
 * message (SLAB_MESSAGE_SIZE bytes).
 */
static void raw_expect_error(int fd, Slabd__ErrorCode code, const char *what,
			     char *message)
{
	Slabd__Reply *reply = raw_read_reply(fd);

	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_ERROR,
		     "%s: reply kind %d, expected an error", what,
		     (int)reply->kind_case);
	cr_assert_eq(reply->error->code, code, "%s: code %s, expected %s: %s",
		     what, proto_error_code_name(reply->error->code),
		     proto_error_code_name(code), reply->error->message);
	cr_assert_gt(strlen(reply->error->message), 0, "%s: empty message",
		     what);
	snprintf(message, SLAB_MESSAGE_SIZE, "%s", reply->error->message);
	slabd__reply__free_unpacked(reply, NULL);
}


/* ---- A client that checks its output while a test runs -------------------- */

#define BYSTANDER_PROMPT "Once upon a time"
#define BYSTANDER_TOKENS 60

/*
 * Another client of the same broker, generating greedily in a loop and
 * comparing each output with slab-run's, until the test stops it.
 */
struct bystander {
	const struct service *service;
	char expected[8192];
	atomic_bool stop;
	atomic_int runs;
	int failures;
	int mismatches;
	char last_error[SLAB_MESSAGE_SIZE];
	pthread_t thread;
};


static void *bystander_run(void *arg)
{
	struct bystander *b = arg;
	struct generation *g = calloc(1, sizeof(*g));
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	if (g == NULL || slab_connect(b->service->socket_path, &client) < 0) {
		b->failures++;
		snprintf(b->last_error, sizeof(b->last_error), "cannot connect");
		free(g);
		return NULL;
	}

	/* Bounded: the test stops it long before 5000 generations. */
	for (int i = 0; i < 5000 && !atomic_load(&b->stop); i++) {
		generation_greedy(&options, NULL, BYSTANDER_PROMPT,
				  BYSTANDER_TOKENS);
		generation_run(client, &options, g);
		if (g->rc != 0) {
			b->failures++;
			snprintf(b->last_error, sizeof(b->last_error), "%s",
				 g->error);
		} else if (strcmp(g->text, b->expected) != 0) {
			b->mismatches++;
		}
		atomic_fetch_add(&b->runs, 1);
	}
	slab_close(client);
	free(g);
	return NULL;
}


/* Computes the bystander's reference; call before any broker starts. */
static void bystander_prepare(struct bystander *b)
{
	memset(b, 0, sizeof(*b));
	reference_completion(BYSTANDER_PROMPT, BYSTANDER_TOKENS, b->expected,
			     sizeof(b->expected));
}


static void bystander_start(struct bystander *b, const struct service *s)
{
	b->service = s;
	cr_assert_eq(pthread_create(&b->thread, NULL, bystander_run, b), 0);
}


/* Waits until the bystander has finished `runs` generations in all. */
static void bystander_wait_runs(struct bystander *b, int runs)
{
	uint64_t deadline = service_now_ns() + 20000000000ull;

	while (atomic_load(&b->runs) < runs) {
		cr_assert_lt(service_now_ns(), deadline,
			     "the other client finished %d of %d generations "
			     "in 20 s", atomic_load(&b->runs), runs);
		service_sleep_ms(5);
	}
}


/* Waits for two more generations, stops the bystander and checks them all. */
static void bystander_finish(struct bystander *b)
{
	bystander_wait_runs(b, atomic_load(&b->runs) + 2);
	atomic_store(&b->stop, true);
	pthread_join(b->thread, NULL);
	cr_assert_eq(b->failures, 0,
		     "%d of %d generations of another client failed: %s",
		     b->failures, atomic_load(&b->runs), b->last_error);
	cr_assert_eq(b->mismatches, 0,
		     "%d of %d generations of another client differ from "
		     "slab-run", b->mismatches, atomic_load(&b->runs));
}


/* ---- A generation running on its own thread and connection --------------- */

/*
 * One streamed generation on its own connection, run on a thread so that
 * the test can act while it runs. The connection sends nothing before the
 * Generate, so its request id is 1.
 */
struct runner {
	const struct service *service;
	char session[SLAB_HANDLE_SIZE];
	const char *prompt;
	uint32_t max_tokens;
	size_t mark;             /* record the text length after this many tokens */
	size_t text_len_at_mark;
	atomic_size_t tokens;
	atomic_bool finished;
	int connect_rc;
	struct generation g;
	pthread_t thread;
};


static void runner_on_token(struct generation *g)
{
	struct runner *r = g->user;

	if (g->n_tokens == r->mark)
		r->text_len_at_mark = g->text_len;
	atomic_fetch_add(&r->tokens, 1);
}


static void *runner_run(void *arg)
{
	struct runner *r = arg;
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	r->connect_rc = slab_connect(r->service->socket_path, &client);
	if (r->connect_rc == 0) {
		generation_greedy(&options, r->session, r->prompt,
				  r->max_tokens);
		r->g.on_token = runner_on_token;
		r->g.user = r;
		generation_run(client, &options, &r->g);
		slab_close(client);
	}
	atomic_store(&r->finished, true);
	return NULL;
}


static void runner_start(struct runner *r, const struct service *s,
			 const char *session, const char *prompt,
			 uint32_t max_tokens, size_t mark)
{
	memset(r, 0, sizeof(*r));
	r->service = s;
	snprintf(r->session, sizeof(r->session), "%s", session);
	r->prompt = prompt;
	r->max_tokens = max_tokens;
	r->mark = mark;
	cr_assert_eq(pthread_create(&r->thread, NULL, runner_run, r), 0);
}


/* Waits until the runner has streamed `tokens` tokens and is still running. */
static void runner_wait_tokens(struct runner *r, size_t tokens)
{
	uint64_t deadline = service_now_ns() + 10000000000ull;

	while (atomic_load(&r->tokens) < tokens) {
		cr_assert(!atomic_load(&r->finished),
			  "the generation ended after %zu tokens, before %zu: "
			  "%s", atomic_load(&r->tokens), tokens, r->g.error);
		cr_assert_lt(service_now_ns(), deadline,
			     "%zu of %zu tokens in 10 s",
			     atomic_load(&r->tokens), tokens);
		service_sleep_ms(1);
	}
	cr_assert(!atomic_load(&r->finished),
		  "the generation ended after %zu tokens",
		  atomic_load(&r->tokens));
}


static void runner_join(struct runner *r)
{
	pthread_join(r->thread, NULL);
	cr_assert_eq(r->connect_rc, 0, "connect: %s", strerror(-r->connect_rc));
}


/* ---- Frames -------------------------------------------------------------------- */


Test(hardening, truncated_frames_isolated, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct bystander bystander;
	const char *const extra[] = { "--max-frame", "4096", NULL };
	char message[SLAB_MESSAGE_SIZE];
	uint8_t partial[FRAME_HEADER_SIZE + 10] = { 0 };
	struct slab_client *client;
	struct slab_health health;
	Slabd__Reply *reply;
	uint8_t *frame;
	size_t len;
	int fd, runs;

	bystander_prepare(&bystander);
	service_init(&service);
	service_start(&service, extra);
	bystander_start(&bystander, &service);
	bystander_wait_runs(&bystander, 1);
	runs = atomic_load(&bystander.runs);
	frame_put_length(partial, 64);

	/* The peer closes after half of a length prefix. */
	fd = raw_connect(&service);
	raw_send_all(fd, partial, 2);
	service_sleep_ms(20);
	close(fd);

	/* The peer closes after the prefix and 10 of 64 payload bytes. */
	fd = raw_connect(&service);
	raw_send_all(fd, partial, sizeof(partial));
	service_sleep_ms(20);
	close(fd);

	/* A whole request, then the start of another: the first gets a reply. */
	fd = raw_connect(&service);
	len = raw_request_frame(7, true, &frame);
	frame = realloc(frame, len + 3);
	cr_assert_not_null(frame);
	memcpy(frame + len, partial, 3);
	raw_send_all(fd, frame, len + 3);
	free(frame);
	reply = raw_read_reply(fd);
	cr_assert_eq(reply->request_id, 7);
	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HELLO);
	slabd__reply__free_unpacked(reply, NULL);
	close(fd);

	/*
	 * The peer stops writing in the middle of a frame but still reads:
	 * the broker can send an error naming the bytes it held, then closes.
	 */
	fd = raw_connect(&service);
	raw_send_all(fd, partial, sizeof(partial));
	cr_assert_eq(shutdown(fd, SHUT_WR), 0);
	raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT,
			 "stream ended inside a frame", message);
	cr_assert(names_number(message, (long long)sizeof(partial)),
		  "message does not name the %zu bytes received: %s",
		  sizeof(partial), message);
	cr_assert(raw_closed_by_peer(fd), "connection not closed");
	close(fd);

	/* The broker still serves new connections and the other client. */
	bystander_wait_runs(&bystander, runs + 2);
	client = service_connect(&service);
	cr_assert_eq(slab_health(client, &health), 0, "health: %s",
		     slab_error_message(client));
	cr_assert_eq(health.status, SLAB_HEALTH_OK, "health %s: %s",
		     slab_health_status_name(health.status), health.message);
	bystander_finish(&bystander);
	cr_assert_eq(wait_metric(client, "slabd_connections_open", 1, 2000), 1,
		     "connections of the truncated streams are still open");
	slab_close(client);
	service_stop(&service);
}


/* Payloads that are not a valid slabd.Request. */
static const struct {
	const char *name;
	uint8_t bytes[8];
	size_t len;
} bad_payloads[] = {
	{ "wire type 7 does not exist", { 0x0f, 0x00 }, 2 },
	{ "end-group tag without a start", { 0x0c }, 1 },
	{ "unterminated varint", { 0x08, 0xff, 0xff }, 3 },
	{ "field length past the end", { 0x22, 0x10, 0x08 }, 3 },
	{ "message field sent as a varint", { 0x20, 0x01 }, 2 },
	{ "malformed nested message", { 0x22, 0x02, 0x0f, 0x00 }, 4 },
	{ "nested string past the end", { 0x22, 0x03, 0x0a, 0x05, 0x61 }, 5 },
};
#define N_BAD_PAYLOADS (sizeof(bad_payloads) / sizeof(bad_payloads[0]))


Test(hardening, invalid_messages_close_connection, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct bystander bystander;
	char message[SLAB_MESSAGE_SIZE];
	struct slab_client *client;
	Slabd__Reply *reply;
	uint8_t *frame;
	size_t len;
	double bad_frames;
	int fd, runs;

	bystander_prepare(&bystander);
	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	bad_frames = service_metric(client, "slabd_bad_frames_total");
	bystander_start(&bystander, &service);
	bystander_wait_runs(&bystander, 1);
	runs = atomic_load(&bystander.runs);

	for (size_t i = 0; i < N_BAD_PAYLOADS; i++) {
		fd = raw_connect(&service);
		raw_send_payload(fd, bad_payloads[i].bytes, bad_payloads[i].len);
		raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT,
				 bad_payloads[i].name, message);
		cr_assert(names_number(message, (long long)bad_payloads[i].len),
			  "%s: message does not name the %zu-byte frame: %s",
			  bad_payloads[i].name, bad_payloads[i].len, message);
		cr_assert(raw_closed_by_peer(fd), "%s: connection not closed",
			  bad_payloads[i].name);
		close(fd);
	}

	/*
	 * A valid envelope whose kind this broker does not know is not a
	 * framing error: it gets UNIMPLEMENTED and the connection stays open.
	 */
	{
		const uint8_t unknown_kind[] = { 0x08, 0x05, 0x78, 0x01 };

		fd = raw_connect(&service);
		raw_send_payload(fd, unknown_kind, sizeof(unknown_kind));
		raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_UNIMPLEMENTED,
				 "unknown request kind", message);
		len = raw_request_frame(6, false, &frame);
		raw_send_all(fd, frame, len);
		free(frame);
		reply = raw_read_reply(fd);
		cr_assert_eq(reply->request_id, 6);
		cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HEALTH);
		slabd__reply__free_unpacked(reply, NULL);
		close(fd);
	}

	bystander_wait_runs(&bystander, runs + 2);
	bystander_finish(&bystander);
	cr_assert_eq(service_metric(client, "slabd_bad_frames_total"),
		     bad_frames + N_BAD_PAYLOADS);
	slab_close(client);
	service_stop(&service);
}


/* ---- Session handles ----------------------------------------------------------- */

/* Request kinds that take a session handle. */
enum handle_request {
	HANDLE_GENERATE,
	HANDLE_PREFILL,
	HANDLE_CLOSE,
	HANDLE_CANCEL,
	N_HANDLE_REQUESTS,
};

static const char *const handle_request_names[] = {
	"generate", "prefill", "close", "cancel",
};


/* Sends one request naming handle; expects NOT_FOUND and returns its message. */
static void expect_not_found(struct slab_client *client,
			     enum handle_request kind, const char *handle,
			     const char *what, char *message)
{
	struct slab_generate_options options;
	bool cancelled = true;
	int rc;

	switch (kind) {
	case HANDLE_GENERATE:
		generation_greedy(&options, handle, "Hi", 4);
		expect_generate_rejected(client, &options, SLAB_ERROR_NOT_FOUND,
					 what, message);
		return;
	case HANDLE_PREFILL:
		rc = slab_prefill(client, handle, "Hi", NULL, 0, NULL);
		break;
	case HANDLE_CLOSE:
		rc = slab_session_close(client, handle);
		break;
	default:
		rc = slab_cancel(client, 0, handle, &cancelled);
		break;
	}
	cr_assert_eq(rc, -ENOENT, "%s %s: return value %d: %s",
		     handle_request_names[kind], what, rc,
		     slab_error_message(client));
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_NOT_FOUND,
		     "%s %s: code %s", handle_request_names[kind], what,
		     slab_error_code_name(slab_server_error(client)));
	snprintf(message, SLAB_MESSAGE_SIZE, "%s", slab_error_message(client));
}


Test(hardening, bad_handles_get_one_message, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	const char *const extra[] = { "--max-sessions", "4", NULL };
	char closed[SLAB_HANDLE_SIZE], live[SLAB_HANDLE_SIZE];
	char first[SLAB_MESSAGE_SIZE], message[SLAB_MESSAGE_SIZE];
	struct shm_handle closed_handle, live_handle, h;
	struct slab_generate_options options;
	struct slab_client *client;
	uint32_t live_committed;
	int rc;

	struct {
		const char *name;
		char handle[80];
	} cases[10];
	size_t n_cases = 0;

	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);

	/* A closed session, then a live one that takes its slot again. */
	open_session(client, SLAB_CONTEXT_ERROR, 0, closed);
	rc = slab_session_close(client, closed);
	cr_assert_eq(rc, 0, "close: %s", slab_error_message(client));
	open_session(client, SLAB_CONTEXT_ERROR, 0, live);
	generation_greedy(&options, live, "The cat sat", 5);
	expect_generate_ok(client, &options, "generate on the live session");
	live_committed = committed_length(client, live);
	cr_assert_eq(shm_handle_parse(closed, &closed_handle), 0);
	cr_assert_eq(shm_handle_parse(live, &live_handle), 0);

	/* Unknown: a well-formed handle of a slot that is free. */
	h = (struct shm_handle){ .slot = (live_handle.slot + 2) % 4,
				 .generation = 1,
				 .secret = 0x0123456789abcdefull };
	cases[n_cases].name = "unknown handle";
	shm_handle_format(&h, cases[n_cases++].handle, 80);
	h.slot = 1000;
	cases[n_cases].name = "slot beyond --max-sessions";
	shm_handle_format(&h, cases[n_cases++].handle, 80);

	/* The live session's slot and generation with another secret. */
	h = live_handle;
	h.secret ^= 1;
	cases[n_cases].name = "wrong secret";
	shm_handle_format(&h, cases[n_cases++].handle, 80);

	/* Stale generations: the closed session, and the live secret with an
	 * older and a newer generation. */
	cases[n_cases].name = "closed session";
	snprintf(cases[n_cases++].handle, 80, "%s", closed);
	h = live_handle;
	h.generation -= 1;
	cases[n_cases].name = "older generation";
	shm_handle_format(&h, cases[n_cases++].handle, 80);
	h.generation += 2;
	cases[n_cases].name = "newer generation";
	shm_handle_format(&h, cases[n_cases++].handle, 80);

	/* Malformed handles. */
	cases[n_cases].name = "not a handle";
	snprintf(cases[n_cases++].handle, 80, "not-a-handle");
	cases[n_cases].name = "too short";
	snprintf(cases[n_cases++].handle, 80, "s12");
	cases[n_cases].name = "upper-case hex";
	snprintf(cases[n_cases].handle, 80, "%s", live);
	for (char *p = cases[n_cases].handle; *p != '\0'; p++)
		*p = (char)toupper((unsigned char)*p);
	n_cases++;
	cases[n_cases].name = "one character too many";
	snprintf(cases[n_cases++].handle, 80, "%s0", live);

	cr_assert_eq(closed_handle.slot, live_handle.slot,
		     "the live session did not reuse the closed slot");
	for (int kind = 0; kind < N_HANDLE_REQUESTS; kind++) {
		for (size_t i = 0; i < n_cases; i++) {
			expect_not_found(client, (enum handle_request)kind,
					 cases[i].handle, cases[i].name,
					 i == 0 ? first : message);
			if (i == 0)
				continue;
			cr_assert_str_eq(message, first,
					 "%s with %s: the message differs from "
					 "the one for an %s",
					 handle_request_names[kind],
					 cases[i].name, cases[0].name);
		}
		cr_assert_null(strstr(first, "secret"), "message: %s", first);
		cr_assert_null(strstr(first, "generation"), "message: %s", first);
		cr_assert_null(strstr(first, "slot"), "message: %s", first);
		cr_assert_null(strstr(first, "malformed"), "message: %s", first);
		cr_assert_null(strstr(first, cases[0].handle), "message: %s",
			       first);
	}

	/* None of them touched the live session. */
	cr_assert_eq(committed_length(client, live), live_committed);
	generation_greedy(&options, live, " Then", 5);
	expect_generate_ok(client, &options, "generate after the bad handles");
	slab_close(client);
	service_stop(&service);
}


/* ---- Prompt tokens and context ----------------------------------------------- */

/* Generates from prompt ids on session; expects INVALID_ARGUMENT naming both. */
static void expect_ids_rejected(struct slab_client *client, const char *session,
				const int32_t *ids, size_t n_ids,
				long long named, long long limit,
				const char *what)
{
	struct slab_generate_options options;
	char message[SLAB_MESSAGE_SIZE];
	int rc;

	generation_greedy(&options, session, NULL, 4);
	options.prompt_ids = ids;
	options.n_prompt_ids = n_ids;
	expect_generate_rejected(client, &options, SLAB_ERROR_INVALID_ARGUMENT,
				 what, message);
	cr_assert(names_number(message, named), "%s: message lacks %lld: %s",
		  what, named, message);
	cr_assert(names_number(message, limit), "%s: message lacks %lld: %s",
		  what, limit, message);

	rc = slab_prefill(client, session, NULL, ids, n_ids, NULL);
	cr_assert_eq(rc, -EINVAL, "prefill %s: return value %d: %s", what, rc,
		     slab_error_message(client));
	cr_assert(names_number(slab_error_message(client), named),
		  "prefill %s: message lacks %lld: %s", what, named,
		  slab_error_message(client));
	cr_assert(names_number(slab_error_message(client), limit),
		  "prefill %s: message lacks %lld: %s", what, limit,
		  slab_error_message(client));
}


Test(hardening, token_ids_out_of_range, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	const char *const extra[] = { "--max-context", "64", NULL };
	char handle[SLAB_HANDLE_SIZE], fresh[SLAB_HANDLE_SIZE];
	static const int32_t bad_ids[] = { VOCAB_SIZE, -1, 5000, INT32_MAX,
					   INT32_MIN };
	struct slab_generate_options options;
	struct slab_client *client;
	int32_t ids[1000];

	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	open_session(client, SLAB_CONTEXT_ERROR, 0, handle);

	/* Ids outside [0, 511], at index 2 after valid ones. */
	for (size_t i = 0; i < sizeof(bad_ids) / sizeof(bad_ids[0]); i++) {
		char what[64];

		ids[0] = 1;
		ids[1] = 300;
		ids[2] = bad_ids[i];
		snprintf(what, sizeof(what), "token id %d", (int)bad_ids[i]);
		expect_ids_rejected(client, handle, ids, 3, bad_ids[i],
				    VOCAB_SIZE - 1, what);
	}

	/* More ids than the maximum context of 64. */
	for (size_t i = 0; i < 1000; i++)
		ids[i] = i == 0 ? 1 : 300 + (int32_t)(i % 100);
	expect_ids_rejected(client, handle, ids, 65, 65, 64, "65 token ids");
	expect_ids_rejected(client, handle, ids, 1000, 1000, 64,
			    "1000 token ids");
	cr_assert_eq(committed_length(client, handle), 0,
		     "a rejected prompt changed the session");

	/* The largest id, and a prompt of exactly the maximum context, pass. */
	ids[1] = VOCAB_SIZE - 1;
	generation_greedy(&options, handle, NULL, 2);
	options.prompt_ids = ids;
	options.n_prompt_ids = 2;
	expect_generate_ok(client, &options, "token id 511");
	open_session(client, SLAB_CONTEXT_ERROR, 0, fresh);
	ids[1] = 300;
	options.session = fresh;
	options.n_prompt_ids = 64;
	expect_generate_ok(client, &options, "64 token ids");
	cr_assert_eq(committed_length(client, fresh), 64);

	slab_close(client);
	service_stop(&service);
}


Test(hardening, prompt_beyond_remaining_context, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	char handle[SLAB_HANDLE_SIZE], shift[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;
	struct generation *g;
	uint32_t committed = 0;
	int32_t ids[64];
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	for (int i = 0; i < 64; i++)
		ids[i] = i == 0 ? 1 : 300 + i;

	/* A 32-position session holding 20 positions has 12 left. */
	open_session(client, SLAB_CONTEXT_ERROR, 32, handle);
	rc = slab_prefill(client, handle, NULL, ids, 20, &committed);
	cr_assert_eq(rc, 20, "prefill: %d, %s", rc, slab_error_message(client));
	cr_assert_eq(committed, 20);

	generation_greedy(&options, handle, NULL, 4);
	options.prompt_ids = ids + 20;
	options.n_prompt_ids = 13;
	expect_generate_rejected(client, &options, SLAB_ERROR_CONTEXT_FULL,
				 "13 tokens into 12 free positions", message);
	cr_assert(names_number(message, 13), "message lacks 13: %s", message);
	cr_assert(names_number(message, 32), "message lacks 32: %s", message);
	cr_assert(names_number(message, 20), "message lacks 20: %s", message);

	rc = slab_prefill(client, handle, NULL, ids + 20, 13, NULL);
	cr_assert_eq(rc, -EOVERFLOW, "prefill of 13 tokens: %d, %s", rc,
		     slab_error_message(client));
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_CONTEXT_FULL);
	cr_assert(names_number(slab_error_message(client), 13), "message: %s",
		  slab_error_message(client));
	cr_assert(names_number(slab_error_message(client), 32), "message: %s",
		  slab_error_message(client));
	cr_assert_eq(committed_length(client, handle), 20,
		     "a rejected prompt changed the committed length");

	/* 12 tokens fill the context exactly and are accepted. */
	options.n_prompt_ids = 12;
	g = expect_generate_ok(client, &options, "12 tokens into 12 positions");
	cr_assert_eq(g->result.prompt_tokens, 12);
	cr_assert_eq(committed_length(client, handle), 32);

	/* Under SHIFT the limit is the context minus n_keep minus one. */
	open_session(client, SLAB_CONTEXT_SHIFT, 32, shift);
	options.session = shift;
	options.prompt_ids = ids;
	options.n_prompt_ids = 28;
	expect_generate_rejected(client, &options, SLAB_ERROR_CONTEXT_FULL,
				 "28 tokens under SHIFT", message);
	cr_assert(names_number(message, 28), "message lacks 28: %s", message);
	cr_assert(names_number(message, 32), "message lacks 32: %s", message);
	options.n_prompt_ids = 27;
	expect_generate_ok(client, &options, "27 tokens under SHIFT");

	slab_close(client);
	service_stop(&service);
}


/* ---- Generate options ----------------------------------------------------------- */


Test(hardening, max_tokens_bounds, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	const char *const extra[] = { "--max-tokens-cap", "40", NULL };
	static const uint32_t bad[] = { 0, 41, 1000, UINT32_MAX };
	char handle[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;
	struct generation *g;

	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	open_session(client, SLAB_CONTEXT_ERROR, 0, handle);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char what[64];

		snprintf(what, sizeof(what), "max_tokens %u", bad[i]);
		generation_greedy(&options, handle, "Once upon a time", bad[i]);
		expect_generate_rejected(client, &options,
					 SLAB_ERROR_INVALID_ARGUMENT, what,
					 message);
		cr_assert_not_null(strstr(message, "max_tokens"),
				   "%s: message does not name the field: %s",
				   what, message);
		cr_assert(names_number(message, bad[i]),
			  "%s: message lacks the value: %s", what, message);
		cr_assert(names_number(message, 40),
			  "%s: message lacks the cap 40: %s", what, message);

		/* A one-shot generation is checked the same way. */
		options.session = NULL;
		expect_generate_rejected(client, &options,
					 SLAB_ERROR_INVALID_ARGUMENT, what,
					 message);
	}
	cr_assert_eq(committed_length(client, handle), 0);

	/* The cap itself is accepted. */
	generation_greedy(&options, handle, "Once upon a time", 40);
	g = expect_generate_ok(client, &options, "max_tokens 40");
	cr_assert_eq(g->result.finish_reason, SLAB_FINISH_LENGTH, "finish %s",
		     slab_finish_reason_name(g->result.finish_reason));
	cr_assert_eq(g->result.completion_tokens, 40);

	slab_close(client);
	service_stop(&service);
}


/* Sampling values the broker must reject, and the field each concerns. */
enum sampling_field { TEMPERATURE, TOP_P, MIN_P, REPETITION_PENALTY };

static const char *const sampling_field_names[] = {
	"temperature", "top_p", "min_p", "repetition_penalty",
};

static void set_sampling(struct slab_generate_options *options,
			 enum sampling_field field, float value)
{
	switch (field) {
	case TEMPERATURE:
		options->has_temperature = true;
		options->temperature = value;
		break;
	case TOP_P:
		options->has_top_p = true;
		options->top_p = value;
		break;
	case MIN_P:
		options->has_min_p = true;
		options->min_p = value;
		break;
	case REPETITION_PENALTY:
		options->has_repetition_penalty = true;
		options->repetition_penalty = value;
		break;
	}
}


Test(hardening, sampling_values_invalid, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static const struct {
		enum sampling_field field;
		float value;
	} bad[] = {
		{ TEMPERATURE, -0.5f },
		{ TEMPERATURE, NAN },
		{ TEMPERATURE, INFINITY },
		{ TEMPERATURE, -INFINITY },
		{ TOP_P, 0.0f },
		{ TOP_P, -0.25f },
		{ TOP_P, 1.5f },
		{ TOP_P, NAN },
		{ MIN_P, -0.25f },
		{ MIN_P, 1.5f },
		{ MIN_P, NAN },
		{ REPETITION_PENALTY, 0.0f },
		{ REPETITION_PENALTY, -1.0f },
		{ REPETITION_PENALTY, NAN },
		{ REPETITION_PENALTY, INFINITY },
	}, good[] = {
		{ TEMPERATURE, 0.0f },
		{ TEMPERATURE, 0.8f },
		{ TOP_P, 1.0f },
		{ TOP_P, 0.01f },
		{ MIN_P, 0.0f },
		{ MIN_P, 1.0f },
		{ REPETITION_PENALTY, 1.0f },
		{ REPETITION_PENALTY, 0.5f },
	};
	char handle[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	open_session(client, SLAB_CONTEXT_ERROR, 0, handle);

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		const char *name = sampling_field_names[bad[i].field];
		char what[64];

		snprintf(what, sizeof(what), "%s %g", name,
			 (double)bad[i].value);
		generation_greedy(&options, handle, "The cat sat", 4);
		set_sampling(&options, bad[i].field, bad[i].value);
		expect_generate_rejected(client, &options,
					 SLAB_ERROR_INVALID_ARGUMENT, what,
					 message);
		cr_assert_not_null(strstr(message, name),
				   "%s: message does not name the field: %s",
				   what, message);
	}
	cr_assert_eq(committed_length(client, handle), 0,
		     "a rejected request changed the session");

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		char what[64];

		snprintf(what, sizeof(what), "%s %g",
			 sampling_field_names[good[i].field],
			 (double)good[i].value);
		generation_greedy(&options, NULL, "The cat sat", 4);
		set_sampling(&options, good[i].field, good[i].value);
		expect_generate_ok(client, &options, what);
	}
	slab_close(client);
	service_stop(&service);
}


Test(hardening, stop_strings_and_utf8, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static const char *const bad_text[] = {
		"lone continuation \x80 byte",
		"overlong slash \xc0\xaf",
		"surrogate \xed\xa0\x80",
		"truncated euro \xe2\x82",
		"above U+10FFFF \xf4\x90\x80\x80",
		"invalid lead byte \xff",
	};
	char handle[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	char long_stop[258], longest_stop[257];
	const char *stops[17];
	struct slab_generate_options options;
	struct slab_client *client;
	int32_t *ids = NULL;
	size_t n_ids = 0;
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	open_session(client, SLAB_CONTEXT_ERROR, 0, handle);

	/* 17 stop strings, one more than allowed. */
	for (int i = 0; i < 17; i++)
		stops[i] = "zq";
	generation_greedy(&options, handle, "The cat sat", 4);
	options.stop = stops;
	options.n_stop = 17;
	expect_generate_rejected(client, &options, SLAB_ERROR_INVALID_ARGUMENT,
				 "17 stop strings", message);
	cr_assert(names_number(message, 17), "message: %s", message);
	cr_assert(names_number(message, 16), "message: %s", message);

	/* A stop string of 257 bytes, one more than allowed. */
	memset(long_stop, 'z', 257);
	long_stop[257] = '\0';
	stops[0] = long_stop;
	options.n_stop = 1;
	expect_generate_rejected(client, &options, SLAB_ERROR_INVALID_ARGUMENT,
				 "a 257-byte stop string", message);
	cr_assert(names_number(message, 256), "message: %s", message);

	/* A stop string that is not UTF-8. */
	stops[0] = "\xc3";
	expect_generate_rejected(client, &options, SLAB_ERROR_INVALID_ARGUMENT,
				 "a stop string that is not UTF-8", message);

	/* Prompt text that is not UTF-8, in Generate, Prefill and Tokenize. */
	for (size_t i = 0; i < sizeof(bad_text) / sizeof(bad_text[0]); i++) {
		generation_greedy(&options, handle, bad_text[i], 4);
		expect_generate_rejected(client, &options,
					 SLAB_ERROR_INVALID_ARGUMENT,
					 bad_text[i], message);
		cr_assert_not_null(strstr(message, "UTF-8"), "%s: message: %s",
				   bad_text[i], message);
		rc = slab_prefill(client, handle, bad_text[i], NULL, 0, NULL);
		cr_assert_eq(rc, -EINVAL, "prefill %s: %d, %s", bad_text[i], rc,
			     slab_error_message(client));
		rc = slab_tokenize(client, bad_text[i], true, &ids, &n_ids);
		cr_assert_eq(rc, -EINVAL, "tokenize %s: %d, %s", bad_text[i],
			     rc, slab_error_message(client));
	}
	cr_assert_eq(committed_length(client, handle), 0,
		     "a rejected request changed the session");

	/* The limits themselves pass: 16 stop strings, 256 bytes, UTF-8. */
	memset(longest_stop, 'z', 256);
	longest_stop[256] = '\0';
	for (int i = 0; i < 16; i++)
		stops[i] = i == 0 ? longest_stop : "\xc3\xa9t\xc3\xa9";
	generation_greedy(&options, handle, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 4);
	options.stop = stops;
	options.n_stop = 16;
	expect_generate_ok(client, &options, "16 stop strings, 256 bytes");

	slab_close(client);
	service_stop(&service);
}


/* ---- Resources -------------------------------------------------------------------- */


Test(hardening, session_limit_keeps_sessions, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static char first[3][4096], whole[3][4096];
	const char *const extra[] = { "--max-sessions", "3", NULL };
	char handles[3][SLAB_HANDLE_SIZE], extra_handle[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	uint32_t committed[3];
	struct slab_generate_options options;
	struct slab_client *client, *other;
	struct generation *g;
	int rc;

	for (int i = 0; i < 3; i++) {
		reference_completion(prompts[i], 20, first[i], sizeof(first[i]));
		reference_completion(prompts[i], 40, whole[i], sizeof(whole[i]));
	}
	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	other = service_connect(&service);

	for (int i = 0; i < 3; i++) {
		open_session(client, SLAB_CONTEXT_ERROR, 0, handles[i]);
		generation_greedy(&options, handles[i], prompts[i], 20);
		g = expect_generate_ok(client, &options, prompts[i]);
		cr_assert_str_eq(g->text, first[i], "session %d", i);
		committed[i] = committed_length(client, handles[i]);
		cr_assert_eq(committed[i], g->result.committed_length);
	}

	/* A fourth session, from either connection, and a one-shot one. */
	rc = slab_session_open(client, NULL, extra_handle, NULL);
	cr_assert_eq(rc, -ENOSPC, "fourth session: %d, %s", rc,
		     slab_error_message(client));
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_RESOURCE_EXHAUSTED);
	cr_assert(names_number(slab_error_message(client), 3), "message: %s",
		  slab_error_message(client));
	rc = slab_session_open(other, NULL, extra_handle, NULL);
	cr_assert_eq(rc, -ENOSPC, "fourth session on another connection: %d",
		     rc);
	generation_greedy(&options, NULL, "One day", 5);
	expect_generate_rejected(other, &options, SLAB_ERROR_RESOURCE_EXHAUSTED,
				 "one-shot generation", message);

	/* The three sessions keep their length and continue as one run would. */
	for (int i = 0; i < 3; i++) {
		static char joined[32768];

		cr_assert_eq(committed_length(other, handles[i]), committed[i],
			     "session %d", i);
		generation_greedy(&options, handles[i], NULL, 20);
		g = expect_generate_ok(client, &options, "continuation");
		cr_assert_eq(g->result.prompt_tokens, 0);
		cr_assert_eq(g->result.committed_length, committed[i] + 20);
		snprintf(joined, sizeof(joined), "%s%s", first[i], g->text);
		cr_assert_str_eq(joined, whole[i], "session %d", i);
	}

	/* Closing one frees its slot. */
	cr_assert_eq(slab_session_close(client, handles[0]), 0);
	rc = slab_session_open(other, NULL, extra_handle, NULL);
	cr_assert_eq(rc, 0, "open after a close: %s", slab_error_message(other));

	slab_close(other);
	slab_close(client);
	service_stop(&service);
}


Test(hardening, kv_exhausted_keeps_running_session, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct runner runner;
	static char expected[8192];
	char kv_memory[32];
	const char *const extra[] = { "--kv-memory", kv_memory, "--max-context",
				      "192", "--prefill-chunk", "192", NULL };
	char busy[SLAB_HANDLE_SIZE], large[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;
	struct generation *g;
	int32_t ids[191];
	size_t tokens;
	uint32_t committed;
	bool cancelled = false;
	int rc;

	/*
	 * 12 blocks hold 192 positions. The busy session runs a generation
	 * that shifts its 64-position context without end, so it always holds
	 * at least one block and never becomes idle. A 192-position prompt,
	 * prefilled in one chunk, can therefore never get the whole pool.
	 */
	snprintf(kv_memory, sizeof(kv_memory), "%d", 12 * BLOCK_BYTES);
	reference_completion("Once upon a time", 40, expected, sizeof(expected));
	for (int i = 0; i < 191; i++)
		ids[i] = i == 0 ? 1 : 300 + i % 100;
	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	cr_assert_eq(service_metric(client, "slabd_kv_blocks_total"), 12);

	open_session(client, SLAB_CONTEXT_SHIFT, 64, busy);
	runner_start(&runner, &service, busy, "Once upon a time", 1000000, 40);
	runner_wait_tokens(&runner, 50);

	/*
	 * A one-shot session would evict an idle session to make room, so it
	 * runs while the busy session is the only other one.
	 */
	generation_greedy(&options, NULL, NULL, 4);
	options.prompt_ids = ids;
	options.n_prompt_ids = 191;
	expect_generate_rejected(client, &options, SLAB_ERROR_RESOURCE_EXHAUSTED,
				 "one-shot generate on 192 positions", message);
	cr_assert(names_number(message, 12), "message: %s", message);

	open_session(client, SLAB_CONTEXT_ERROR, 0, large);
	rc = slab_prefill(client, large, NULL, ids, 191, NULL);
	cr_assert_eq(rc, -ENOSPC, "prefill of 192 positions: %d, %s", rc,
		     slab_error_message(client));
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_RESOURCE_EXHAUSTED);
	cr_assert(names_number(slab_error_message(client), 12), "message: %s",
		  slab_error_message(client));
	generation_greedy(&options, large, NULL, 4);
	options.prompt_ids = ids;
	options.n_prompt_ids = 191;
	expect_generate_rejected(client, &options, SLAB_ERROR_RESOURCE_EXHAUSTED,
				 "generate on 192 positions", message);
	cr_assert_eq(committed_length(client, large), 0);

	/* The busy session was neither evicted nor stopped. */
	tokens = atomic_load(&runner.tokens);
	runner_wait_tokens(&runner, tokens + 20);
	cr_assert_eq(service_metric(client, "slabd_sessions_evicted_total"), 0);
	rc = slab_cancel(client, 0, busy, &cancelled);
	cr_assert_eq(rc, 0, "cancel: %s", slab_error_message(client));
	cr_assert(cancelled);
	runner_join(&runner);
	cr_assert_eq(runner.g.rc, 0, "busy generation: %s", runner.g.error);
	cr_assert_eq(runner.g.result.finish_reason, SLAB_FINISH_CANCELLED,
		     "busy generation finished %s",
		     slab_finish_reason_name(runner.g.result.finish_reason));
	cr_assert_eq(runner.text_len_at_mark, strlen(expected));
	cr_assert_eq(strncmp(runner.g.text, expected, strlen(expected)), 0,
		     "the first 40 tokens differ from slab-run: %.*s",
		     (int)runner.text_len_at_mark, runner.g.text);

	/* It keeps its committed length and goes on from there. */
	committed = committed_length(client, busy);
	cr_assert_eq(committed, runner.g.result.committed_length);
	generation_greedy(&options, busy, " The end", 10);
	g = expect_generate_ok(client, &options, "busy session afterwards");
	/* Where the cancel landed decides the text, so an end token may come
	 * before the limit. */
	if (g->result.finish_reason == SLAB_FINISH_EOS) {
		cr_assert_leq(g->n_tokens, 10);
	} else {
		cr_assert_eq(g->result.finish_reason, SLAB_FINISH_LENGTH,
			     "busy session afterwards finished %s",
			     slab_finish_reason_name(g->result.finish_reason));
		cr_assert_eq(g->n_tokens, 10);
	}

	cr_assert_eq(slab_session_close(client, busy), 0);
	cr_assert_eq(slab_session_close(client, large), 0);
	cr_assert_eq(service_metric(client, "slabd_kv_blocks_used"), 0);
	slab_close(client);
	service_stop(&service);
}


Test(hardening, connection_limit, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	const char *const extra[] = { "--max-connections", "3", NULL };
	char message[SLAB_MESSAGE_SIZE];
	struct slab_client *clients[3];
	struct slab_health health;
	uint64_t deadline;
	int fd;

	service_init(&service);
	service_start(&service, extra);
	for (int i = 0; i < 3; i++)
		clients[i] = service_connect(&service);
	cr_assert_eq(wait_metric(clients[0], "slabd_connections_open", 3, 2000),
		     3);

	fd = raw_connect(&service);
	raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
			 "fourth connection", message);
	cr_assert_not_null(strstr(message, "connections"), "message: %s",
			   message);
	cr_assert(raw_closed_by_peer(fd), "fourth connection not closed");
	close(fd);

	for (int i = 0; i < 3; i++) {
		cr_assert_eq(slab_health(clients[i], &health), 0,
			     "client %d: %s", i,
			     slab_error_message(clients[i]));
		cr_assert_eq(health.status, SLAB_HEALTH_OK);
	}
	cr_assert_geq(service_metric(clients[0],
				     "slabd_connections_rejected_total"), 1);

	/* A closed connection makes room for a new one. */
	slab_close(clients[2]);
	cr_assert_eq(wait_metric(clients[0], "slabd_connections_open", 2, 2000),
		     2);
	deadline = service_now_ns() + 2000000000ull;
	clients[2] = NULL;
	while (clients[2] == NULL) {
		struct slab_client *client = NULL;

		cr_assert_lt(service_now_ns(), deadline,
			     "no connection accepted after a close");
		if (slab_connect(service.socket_path, &client) == 0 &&
		    slab_hello(client, NULL) == 0)
			clients[2] = client;
		else
			slab_close(client);
	}
	for (int i = 0; i < 3; i++)
		slab_close(clients[i]);
	service_stop(&service);
}


Test(hardening, request_limit_per_connection, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static char expected[3][8192];
	const char *const extra[] = { "--max-requests", "2", NULL };
	char handles[3][SLAB_HANDLE_SIZE];
	uint8_t *frames = NULL;
	size_t total = 0;
	bool done[3] = { false };
	bool rejected = false;
	struct slab_client *client;
	int fd;

	for (int i = 0; i < 3; i++)
		reference_completion(prompts[i], 200, expected[i],
				     sizeof(expected[i]));
	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	for (int i = 0; i < 3; i++)
		open_session(client, SLAB_CONTEXT_ERROR, 0, handles[i]);

	/* Three Generates on three sessions in one write, ids 1 to 3. */
	for (int i = 0; i < 3; i++) {
		uint8_t *frame;
		size_t len = pack_generate((uint64_t)i + 1, handles[i],
					   prompts[i], 200, false, &frame);

		frames = realloc(frames, total + len);
		cr_assert_not_null(frames);
		memcpy(frames + total, frame, len);
		total += len;
		free(frame);
	}
	fd = raw_connect(&service);
	raw_send_all(fd, frames, total);
	free(frames);

	/* The third is rejected at once; the first two run to the end. */
	while (!done[0] || !done[1] || !rejected) {
		Slabd__Reply *reply = raw_read_reply(fd);
		uint64_t id = reply->request_id;

		cr_assert(id >= 1 && id <= 3, "reply to request %llu",
			  (unsigned long long)id);
		if (id == 3) {
			cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_ERROR,
				     "request 3: reply kind %d",
				     (int)reply->kind_case);
			cr_assert_eq(reply->error->code,
				     SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
				     "request 3: %s: %s",
				     proto_error_code_name(reply->error->code),
				     reply->error->message);
			cr_assert(!done[0] && !done[1],
				  "request 3 was answered after a Done");
			rejected = true;
		} else {
			cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_DONE,
				     "request %llu: reply kind %d",
				     (unsigned long long)id,
				     (int)reply->kind_case);
			cr_assert_eq((size_t)reply->done->text.len,
				     strlen(expected[id - 1]));
			cr_assert_eq(memcmp(reply->done->text.data,
					    expected[id - 1],
					    reply->done->text.len), 0,
				     "request %llu differs from slab-run",
				     (unsigned long long)id);
			done[id - 1] = true;
		}
		slabd__reply__free_unpacked(reply, NULL);
	}

	/* With the first two finished, the same request is accepted. */
	{
		uint8_t *frame;
		size_t len = pack_generate(4, handles[2], prompts[2], 200, false,
					   &frame);
		Slabd__Reply *reply;

		raw_send_all(fd, frame, len);
		free(frame);
		reply = raw_read_reply(fd);
		cr_assert_eq(reply->request_id, 4);
		cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_DONE,
			     "request 4: reply kind %d", (int)reply->kind_case);
		cr_assert_eq((size_t)reply->done->text.len, strlen(expected[2]));
		cr_assert_eq(memcmp(reply->done->text.data, expected[2],
				    reply->done->text.len), 0);
		slabd__reply__free_unpacked(reply, NULL);
	}
	close(fd);
	slab_close(client);
	service_stop(&service);
}


/* ---- Slow and stalled clients ------------------------------------------------- */

/* Whether the broker has closed fd; reads and drops what it sent. */
static bool peer_closed_now(int fd)
{
	char buffer[256];
	ssize_t n;

	for (;;) {
		n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
		if (n > 0)
			continue;
		if (n == 0)
			return true;
		return errno == ECONNRESET || errno == EPIPE;
	}
}


Test(hardening, stalled_frame_disconnected, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	const char *const extra[] = { "--frame-timeout", "1", NULL };
	enum { HALF_PREFIX, HALF_PAYLOAD, TRICKLE, N_STALLED };
	static const char *const names[] = {
		"half a length prefix", "half a payload", "one byte every 250 ms",
	};
	uint8_t partial[FRAME_HEADER_SIZE + 50] = { 0 };
	uint64_t started[N_STALLED], closed_after[N_STALLED] = { 0 };
	uint64_t deadline, next_trickle;
	struct slab_client *idle_client;
	struct slab_health health;
	Slabd__Reply *reply;
	uint8_t *frame;
	size_t len;
	int fds[N_STALLED], idle_fd;

	service_init(&service);
	service_start(&service, extra);
	idle_client = service_connect(&service);
	idle_fd = raw_connect(&service);
	frame_put_length(partial, 100);

	fds[HALF_PREFIX] = raw_connect(&service);
	started[HALF_PREFIX] = service_now_ns();
	raw_send_all(fds[HALF_PREFIX], partial, 2);
	fds[HALF_PAYLOAD] = raw_connect(&service);
	started[HALF_PAYLOAD] = service_now_ns();
	raw_send_all(fds[HALF_PAYLOAD], partial, sizeof(partial));
	fds[TRICKLE] = raw_connect(&service);
	started[TRICKLE] = service_now_ns();
	raw_send_all(fds[TRICKLE], partial, FRAME_HEADER_SIZE);
	next_trickle = started[TRICKLE] + 250000000ull;

	/* The trickle never completes its 100-byte payload in 4 s. */
	deadline = service_now_ns() + 4000000000ull;
	while (service_now_ns() < deadline) {
		bool all_closed = true;

		for (int i = 0; i < N_STALLED; i++) {
			if (closed_after[i] == 0 && peer_closed_now(fds[i]))
				closed_after[i] = service_now_ns() - started[i];
			all_closed = all_closed && closed_after[i] != 0;
		}
		if (all_closed)
			break;
		if (closed_after[TRICKLE] == 0 &&
		    service_now_ns() >= next_trickle) {
			send(fds[TRICKLE], "x", 1, MSG_NOSIGNAL);
			next_trickle += 250000000ull;
		}
		service_sleep_ms(10);
	}

	for (int i = 0; i < N_STALLED; i++) {
		cr_assert_neq(closed_after[i], 0, "%s: not disconnected in 4 s",
			      names[i]);
		cr_assert_geq(closed_after[i], 1000000000ull,
			      "%s: disconnected after %.3f s, before the 1 s "
			      "--frame-timeout", names[i],
			      (double)closed_after[i] / 1e9);
		cr_assert_leq(closed_after[i], 2500000000ull,
			      "%s: disconnected after %.3f s", names[i],
			      (double)closed_after[i] / 1e9);
		close(fds[i]);
	}

	/* Connections idle between whole frames stay open. */
	service_sleep_ms(300);
	cr_assert_eq(slab_health(idle_client, &health), 0, "idle client: %s",
		     slab_error_message(idle_client));
	len = raw_request_frame(3, false, &frame);
	raw_send_all(idle_fd, frame, len);
	free(frame);
	reply = raw_read_reply(idle_fd);
	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HEALTH);
	slabd__reply__free_unpacked(reply, NULL);
	close(idle_fd);

	cr_assert_eq(service_metric(idle_client,
				    "slabd_stalled_connections_total"),
		     N_STALLED);
	slab_close(idle_client);
	service_stop(&service);
}


#define UNREAD_SESSIONS 48

/* Limit of the replies the broker queues for one connection, in bytes. */
#define SEND_BUFFER_LIMIT (8u << 20)


/* Returns the byte count of the broker's "N bytes queued" line, or 0. */
static size_t queued_bytes_logged(const struct service *s)
{
	static char log[1 << 16];
	const char *at = strstr(service_log_tail(s, log, sizeof(log)),
				"does not read its replies: ");

	if (at == NULL)
		return 0;
	return (size_t)strtoull(at + strlen("does not read its replies: "),
				NULL, 10);
}


Test(hardening, unread_stream_disconnected, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct bystander bystander;
	static char handles[UNREAD_SESSIONS][SLAB_HANDLE_SIZE];
	static uint32_t lengths[UNREAD_SESSIONS];
	struct slab_generate_options options;
	struct slab_client *client;
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	uint8_t *frames = NULL, *stats_frame;
	size_t total = 0, stats_len, queued;
	int receive_buffer = 4096;
	int stats_sent = 0;
	uint64_t deadline;
	int fd;

	bystander_prepare(&bystander);
	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	for (int i = 0; i < UNREAD_SESSIONS; i++)
		open_session(client, SLAB_CONTEXT_SHIFT, 64, handles[i]);
	bystander_start(&bystander, &service);

	/*
	 * A client with a small receive buffer starts a streamed generation
	 * on every session, each long enough to run for minutes, and never
	 * reads.
	 */
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0);
	cr_assert_eq(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer,
				sizeof(receive_buffer)), 0);
	memcpy(address.sun_path, service.socket_path,
	       strlen(service.socket_path) + 1);
	cr_assert_eq(connect(fd, (struct sockaddr *)&address, sizeof(address)),
		     0, "connect: %s", strerror(errno));
	for (int i = 0; i < UNREAD_SESSIONS; i++) {
		uint8_t *frame;
		size_t len = pack_generate((uint64_t)i + 1, handles[i],
					   "Once upon a time", 1 << 24, true,
					   &frame);

		frames = realloc(frames, total + len);
		cr_assert_not_null(frames);
		memcpy(frames + total, frame, len);
		total += len;
		free(frame);
	}
	raw_send_all(fd, frames, total);
	free(frames);

	/*
	 * Tokens alone took 14 to 25 s to fill 8 MiB in runs on a 2-CPU
	 * machine. So the client also sends Stats requests whose replies fill
	 * all but the last MiB, and the tokens streamed after them cross the
	 * limit while the broker applies a step's results.
	 */
	{
		Slabd__Request request = SLABD__REQUEST__INIT;
		Slabd__StatsRequest stats = SLABD__STATS_REQUEST__INIT;
		Slabd__Reply *reply;
		int probe = raw_connect(&service);
		ssize_t reply_len;
		uint8_t *payload;

		request.request_id = 1000;
		request.kind_case = SLABD__REQUEST__KIND_STATS;
		request.stats = &stats;
		cr_assert_eq(proto_pack_frame(&request.base, 0, &stats_frame,
					      &stats_len), 0);
		raw_send_all(probe, stats_frame, stats_len);
		reply_len = frame_read_fd(probe, 0, &payload);
		cr_assert_gt(reply_len, 0);
		cr_assert_eq(proto_unpack_reply(payload, (size_t)reply_len,
						&reply), 0);
		cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_STATS);
		slabd__reply__free_unpacked(reply, NULL);
		free(payload);
		close(probe);
		stats_sent = (int)((SEND_BUFFER_LIMIT - (1u << 20)) /
				   ((size_t)reply_len + FRAME_HEADER_SIZE));
	}
	frames = malloc(stats_len * (size_t)stats_sent);
	cr_assert_not_null(frames);
	for (int i = 0; i < stats_sent; i++)
		memcpy(frames + stats_len * (size_t)i, stats_frame, stats_len);
	raw_send_all(fd, frames, stats_len * (size_t)stats_sent);
	free(frames);

	deadline = service_now_ns() + 30000000000ull;
	while (!service_log_contains(&service, "does not read its replies")) {
		cr_assert_lt(service_now_ns(), deadline,
			     "the client that does not read was not "
			     "disconnected in 30 s");
		service_sleep_ms(20);
	}
	free(stats_frame);
	queued = queued_bytes_logged(&service);
	cr_log_info("a client that does not read was disconnected with %zu "
		    "bytes queued, after %d Stats requests", queued,
		    stats_sent);
	cr_assert_leq(queued, SEND_BUFFER_LIMIT, "%zu bytes queued", queued);
	cr_assert_geq(queued, SEND_BUFFER_LIMIT - (64u << 10),
		      "disconnected with only %zu bytes queued", queued);
	close(fd);

	/*
	 * Its generations were cancelled: each commits the token it holds,
	 * which takes a few milliseconds, and then no session grows.
	 */
	cr_assert_eq(wait_metric(client, "slabd_connections_open", 2, 2000), 2);
	service_sleep_ms(200);
	for (int i = 0; i < UNREAD_SESSIONS; i++)
		lengths[i] = committed_length(client, handles[i]);
	service_sleep_ms(300);
	for (int i = 0; i < UNREAD_SESSIONS; i++) {
		uint32_t now = committed_length(client, handles[i]);

		cr_assert_eq(now, lengths[i],
			     "session %d still grows: %u positions, then %u "
			     "300 ms later", i, lengths[i], now);
		cr_assert_gt(lengths[i], 5, "session %d never generated", i);
	}

	/* Every session is free for a new request. */
	for (int i = 0; i < UNREAD_SESSIONS; i++) {
		generation_greedy(&options, handles[i], " The end", 2);
		expect_generate_ok(client, &options, "session of the slow client");
	}

	bystander_finish(&bystander);
	slab_close(client);
	service_stop(&service);
}


/* ---- Requests aimed at another connection ---------------------------------- */


Test(hardening, foreign_cancel_and_close, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct runner cancelled_runner, closed_runner;
	char first[SLAB_HANDLE_SIZE], second[SLAB_HANDLE_SIZE];
	char message[SLAB_MESSAGE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;
	bool cancelled = true;
	size_t tokens;
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	open_session(client, SLAB_CONTEXT_SHIFT, 64, first);
	open_session(client, SLAB_CONTEXT_SHIFT, 64, second);

	/* Request 1 of another connection generates without end. */
	runner_start(&cancelled_runner, &service, first, "Once upon a time",
		     1000000, 0);
	runner_wait_tokens(&cancelled_runner, 10);

	/* A bare request id names only this connection's requests. */
	rc = slab_cancel(client, 1, NULL, &cancelled);
	cr_assert_eq(rc, 0, "cancel of request 1: %s",
		     slab_error_message(client));
	cr_assert(!cancelled, "a bare request id cancelled another "
		  "connection's request");
	tokens = atomic_load(&cancelled_runner.tokens);
	runner_wait_tokens(&cancelled_runner, tokens + 30);

	/* With the session handle it works from any connection. */
	cancelled = true;
	rc = slab_cancel(client, 999, first, &cancelled);
	cr_assert_eq(rc, 0, "cancel of request 999: %s",
		     slab_error_message(client));
	cr_assert(!cancelled, "request 999 does not run on the session");
	runner_wait_tokens(&cancelled_runner, tokens + 40);
	rc = slab_cancel(client, 1, first, &cancelled);
	cr_assert_eq(rc, 0, "cancel: %s", slab_error_message(client));
	cr_assert(cancelled, "cancel with the session handle did nothing");
	runner_join(&cancelled_runner);
	cr_assert_eq(cancelled_runner.g.rc, 0, "generate: %s",
		     cancelled_runner.g.error);
	cr_assert_eq(cancelled_runner.g.result.finish_reason,
		     SLAB_FINISH_CANCELLED, "finish %s",
		     slab_finish_reason_name(cancelled_runner.g.result.finish_reason));
	cr_assert_eq(committed_length(client, first),
		     cancelled_runner.g.result.committed_length);

	/*
	 * A close from another connection ends the running request, and the
	 * handle is invalid from then on. A Generate in the same write as the
	 * close is read before the running step returns, so it catches a
	 * session that is closed only once its step is over.
	 */
	for (int round = 0; round < 5; round++) {
		Slabd__Request request = SLABD__REQUEST__INIT;
		Slabd__CloseSessionRequest close_request =
			SLABD__CLOSE_SESSION_REQUEST__INIT;
		Slabd__Reply *reply;
		uint8_t *frames, *generate;
		size_t close_len, generate_len;
		int fd;

		open_session(client, SLAB_CONTEXT_SHIFT, 64, second);
		runner_start(&closed_runner, &service, second, "One day",
			     1000000, 0);
		runner_wait_tokens(&closed_runner, 10);

		request.request_id = 1;
		request.kind_case = SLABD__REQUEST__KIND_CLOSE_SESSION;
		request.close_session = &close_request;
		close_request.session = second;
		cr_assert_eq(proto_pack_frame(&request.base, 0, &frames,
					      &close_len), 0);
		generate_len = pack_generate(2, second, "Hi", 4, false,
					     &generate);
		frames = realloc(frames, close_len + generate_len);
		cr_assert_not_null(frames);
		memcpy(frames + close_len, generate, generate_len);
		free(generate);
		fd = raw_connect(&service);
		raw_send_all(fd, frames, close_len + generate_len);
		free(frames);

		reply = raw_read_reply(fd);
		cr_assert_eq(reply->request_id, 1);
		cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_CLOSE_SESSION,
			     "round %d: close: reply kind %d", round,
			     (int)reply->kind_case);
		slabd__reply__free_unpacked(reply, NULL);
		raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
				 "generate after the close", message);
		close(fd);

		runner_join(&closed_runner);
		cr_assert_eq(closed_runner.g.rc, 0, "generate: %s",
			     closed_runner.g.error);
		cr_assert_eq(closed_runner.g.result.finish_reason,
			     SLAB_FINISH_CANCELLED, "finish %s",
			     slab_finish_reason_name(closed_runner.g.result.finish_reason));
		cr_assert(!service_find_session(client, second, NULL));
	}
	generation_greedy(&options, second, "Hi", 4);
	expect_generate_rejected(client, &options, SLAB_ERROR_NOT_FOUND,
				 "generate on the closed session", message);
	cr_assert_eq(slab_session_close(client, second), -ENOENT,
		     "second close: %s", slab_error_message(client));

	/* The cancelled session is still usable. */
	generation_greedy(&options, first, " The end", 5);
	expect_generate_ok(client, &options, "generate after the cancel");
	slab_close(client);
	service_stop(&service);
}


/* ---- Model and tokenizer files --------------------------------------------- */

/* Reads a whole file into a new buffer; stores its size in *size. */
static uint8_t *read_whole_file(const char *path, size_t *size)
{
	FILE *file = fopen(path, "rb");
	uint8_t *data;
	long len;

	cr_assert_not_null(file, "open %s: %s", path, strerror(errno));
	fseek(file, 0, SEEK_END);
	len = ftell(file);
	fseek(file, 0, SEEK_SET);
	data = malloc((size_t)len + 1);
	cr_assert_not_null(data);
	cr_assert_eq(fread(data, 1, (size_t)len, file), (size_t)len);
	fclose(file);
	*size = (size_t)len;
	return data;
}


static void write_whole_file(const char *path, const void *data, size_t size)
{
	FILE *file = fopen(path, "wb");

	cr_assert_not_null(file, "create %s: %s", path, strerror(errno));
	cr_assert_eq(fwrite(data, 1, size, file), size);
	cr_assert_eq(fclose(file), 0);
}


static void put_int32(uint8_t *at, int32_t value)
{
	memcpy(at, &value, sizeof(value));
}


/* Runs slab-quantize to write a q8_0 copy of the default model to out. */
static void quantize_model(const char *out)
{
	static char program[PATH_MAX], model[PATH_MAX];
	int status;
	pid_t pid;

	service_program_path(program, sizeof(program), "slab-quantize");
	service_model_path(model, sizeof(model), SERVICE_MODEL);
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int null_fd = open("/dev/null", O_WRONLY);

		if (null_fd >= 0) {
			dup2(null_fd, STDOUT_FILENO);
			dup2(null_fd, STDERR_FILENO);
		}
		execl(program, program, model, out, "--type", "q8_0",
		      (char *)NULL);
		_exit(127);
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "slab-quantize failed");
}


/* One corrupt file: how it is made and what the error must name. */
struct corrupt_case {
	const char *name;
	bool tokenizer;       /* corrupt the tokenizer, else the model */
	bool quantized;       /* start from the q8_0 checkpoint */
	long resize;          /* bytes added (> 0) or cut (< 0); 0 keeps it */
	long keep;            /* > 0: keep only this many bytes */
	long offset;          /* int32 field to overwrite, or -1 */
	int32_t value;
	const char *field;    /* text the error must contain */
};

/* stories260K.bin is 1056540 bytes and tok512.bin 6227 bytes. */
static const struct corrupt_case corrupt_cases[] = {
	{ "model truncated by half", false, false, 0, 528270, -1, 0, "truncated" },
	{ "model cut by 4 bytes", false, false, -4, 0, -1, 0, "truncated" },
	{ "model with 64 extra bytes", false, false, 64, 0, -1, 0,
	  "longer than its shape" },
	{ "model of 10 bytes", false, false, 0, 10, -1, 0, "header" },
	{ "empty model", false, false, 0, -1, -1, 0, "header" },
	{ "model dim 0", false, false, 0, 0, 0, 0, "dim" },
	{ "model dim too large", false, false, 0, 0, 0, 1 << 30, "dim" },
	{ "model hidden_dim -1", false, false, 0, 0, 4, -1, "hidden_dim" },
	{ "model n_layers 0", false, false, 0, 0, 8, 0, "n_layers" },
	{ "model n_heads 1000", false, false, 0, 0, 12, 1000, "n_heads" },
	{ "model n_kv_heads 3", false, false, 0, 0, 16, 3, "n_kv_heads" },
	{ "model vocab_size 1<<30", false, false, 0, 0, 20, 1 << 30,
	  "vocab_size" },
	{ "model vocab_size INT32_MIN", false, false, 0, 0, 20, INT32_MIN,
	  "vocab_size" },
	{ "model seq_len 0", false, false, 0, 0, 24, 0, "seq_len" },
	{ "quantized model cut by 100 bytes", false, true, -100, 0, -1, 0,
	  "tensor" },
	{ "quantized model weight_type 9", false, true, 0, 0, 8, 9,
	  "weight_type" },
	{ "quantized model version 99", false, true, 0, 0, 4, 99, "version" },
	{ "tokenizer truncated by half", true, false, 0, 3113, -1, 0, "pieces" },
	{ "tokenizer with 16 extra bytes", true, false, 16, 0, -1, 0, "pieces" },
	{ "tokenizer of 2 bytes", true, false, 0, 2, -1, 0, "header" },
	{ "tokenizer max_token_length 0", true, false, 0, 0, 0, 0,
	  "max_token_length" },
	{ "tokenizer piece length -7", true, false, 0, 0, 8, -7, "piece 0" },
	{ "tokenizer piece length 1<<30", true, false, 0, 0, 8, 1 << 30,
	  "piece 0" },
};
#define N_CORRUPT_CASES (sizeof(corrupt_cases) / sizeof(corrupt_cases[0]))


/* Writes the corrupt file of case c to path. */
static void write_corrupt_file(const struct corrupt_case *c,
			       const char *quantized, const char *path)
{
	char source[PATH_MAX];
	uint8_t *data;
	size_t size;

	if (c->quantized)
		snprintf(source, sizeof(source), "%s", quantized);
	else
		service_model_path(source, sizeof(source),
				   c->tokenizer ? SERVICE_TOKENIZER : SERVICE_MODEL);
	data = read_whole_file(source, &size);
	if (c->keep != 0)
		size = c->keep > 0 ? (size_t)c->keep : 0;
	if (c->resize != 0) {
		data = realloc(data, size + (c->resize > 0 ? (size_t)c->resize : 0));
		cr_assert_not_null(data);
		if (c->resize > 0)
			memset(data + size, 0x41, (size_t)c->resize);
		size = (size_t)((long)size + c->resize);
	}
	if (c->offset >= 0)
		put_int32(data + c->offset, c->value);
	write_whole_file(path, data, size);
	free(data);
}


Test(hardening, corrupt_model_files_rejected, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static char log[16384];
	char quantized[PATH_MAX], corrupt[PATH_MAX];
	char model[PATH_MAX], tokenizer[PATH_MAX];

	service_init(&service);
	snprintf(quantized, sizeof(quantized), "%s/q8.bin", service.dir);
	snprintf(corrupt, sizeof(corrupt), "%s/corrupt.bin", service.dir);
	service_model_path(model, sizeof(model), SERVICE_MODEL);
	service_model_path(tokenizer, sizeof(tokenizer), SERVICE_TOKENIZER);
	quantize_model(quantized);

	for (size_t i = 0; i < N_CORRUPT_CASES; i++) {
		const struct corrupt_case *c = &corrupt_cases[i];
		const char *start;
		off_t log_start;
		struct stat st;

		write_corrupt_file(c, quantized, corrupt);
		log_start = stat(service.log_path, &st) == 0 ? st.st_size : 0;
		service_spawn_paths(&service, c->tokenizer ? model : corrupt,
				    c->tokenizer ? corrupt : tokenizer, NULL);
		cr_assert(service_wait_exit(&service, 10000),
			  "%s: slabd still runs after 10 s", c->name);

		service_log_tail(&service, log, sizeof(log));
		cr_assert_geq(stat(service.log_path, &st), 0);
		start = log + strlen(log) -
			(size_t)(st.st_size - log_start < (off_t)strlen(log)
					 ? st.st_size - log_start
					 : (off_t)strlen(log));
		cr_assert(!WIFSIGNALED(service.status),
			  "%s: slabd ended by signal %d%s; log:\n%s", c->name,
			  WTERMSIG(service.status),
			  WCOREDUMP(service.status) ? " with a core dump" : "",
			  start);
		cr_assert(WIFEXITED(service.status));
		cr_assert_eq(WEXITSTATUS(service.status), 1,
			     "%s: exit status %d; log:\n%s", c->name,
			     WEXITSTATUS(service.status), start);
		cr_assert_not_null(strstr(start, corrupt),
				   "%s: the message does not name the file; "
				   "log:\n%s", c->name, start);
		cr_assert_not_null(strstr(start, c->field),
				   "%s: the message does not name '%s'; "
				   "log:\n%s", c->name, c->field, start);
		cr_assert(!service_segments_exist(service.instance),
			  "%s: segments were created", c->name);
	}
	unlink(corrupt);
	unlink(quantized);
}


/* ---- Peers and the socket ------------------------------------------------------- */

static char permission_socket_dir[PATH_MAX];


/* Removes the nested socket folders, then what service_fini() removes. */
static void permission_fini(void)
{
	char path[PATH_MAX + 16];

	if (permission_socket_dir[0] != '\0') {
		snprintf(path, sizeof(path), "%s/s.sock", permission_socket_dir);
		unlink(path);
		snprintf(path, sizeof(path), "%s/s.sock.lock",
			 permission_socket_dir);
		unlink(path);
		rmdir(permission_socket_dir);
		snprintf(path, sizeof(path), "%s", permission_socket_dir);
		*strrchr(path, '/') = '\0';
		rmdir(path);
	}
	service_fini();
}


Test(hardening, peer_and_socket_permissions, .timeout = TEST_TIMEOUT_S,
     .fini = permission_fini)
{
	static struct service service;
	char other_uid[16], other_gid[16], own_uid[16];
	char message[SLAB_MESSAGE_SIZE];
	char parent[PATH_MAX];
	struct slab_client *client;
	struct stat st;
	int fd;

	snprintf(other_uid, sizeof(other_uid), "%u", (unsigned)getuid() + 1);
	snprintf(other_gid, sizeof(other_gid), "%u", (unsigned)getgid() + 1);
	snprintf(own_uid, sizeof(own_uid), "%u", (unsigned)getuid());
	const char *const denied[] = { "--allow-uid", other_uid, "--allow-gid",
				       other_gid, "--socket-mode", "0640", NULL };
	const char *const allowed[] = { "--allow-uid", other_uid, "--allow-uid",
					own_uid, "--socket-mode", "0600", NULL };

	/*
	 * The socket sits two folders below the test directory, and slabd
	 * creates both. A umask that removes group bits must not change
	 * their mode.
	 */
	service_init(&service);
	snprintf(parent, sizeof(parent), "%s/run", service.dir);
	snprintf(permission_socket_dir, sizeof(permission_socket_dir),
		 "%s/run/slabd", service.dir);
	snprintf(service.socket_path, sizeof(service.socket_path),
		 "%s/run/slabd/s.sock", service.dir);
	umask(077);
	service_start(&service, denied);

	cr_assert_eq(stat(service.socket_path, &st), 0);
	cr_assert(S_ISSOCK(st.st_mode));
	cr_assert_eq(st.st_mode & 07777, 0640, "socket mode %04o",
		     (unsigned)(st.st_mode & 07777));
	cr_assert_eq(stat(permission_socket_dir, &st), 0);
	cr_assert_eq(st.st_mode & 07777, 0750, "%s has mode %04o",
		     permission_socket_dir, (unsigned)(st.st_mode & 07777));
	cr_assert_eq(stat(parent, &st), 0);
	cr_assert_eq(st.st_mode & 07777, 0750, "%s has mode %04o", parent,
		     (unsigned)(st.st_mode & 07777));

	/* This process's uid and gid are not allowed. */
	fd = raw_connect(&service);
	raw_expect_error(fd, SLABD__ERROR_CODE__ERROR_CODE_PERMISSION_DENIED,
			 "uid not allowed", message);
	cr_assert(raw_closed_by_peer(fd), "rejected connection not closed");
	close(fd);
	cr_assert(service_log_contains(&service, "rejected: not in --allow-uid"));
	service_stop(&service);

	/* Listing the uid lets it in; the socket gets the new mode. */
	service_start(&service, allowed);
	cr_assert_eq(stat(service.socket_path, &st), 0);
	cr_assert_eq(st.st_mode & 07777, 0600, "socket mode %04o",
		     (unsigned)(st.st_mode & 07777));
	client = service_connect(&service);
	cr_assert_eq(service_metric(client, "slabd_peers_rejected_total"), 0);
	slab_close(client);
	service_stop(&service);
}


/* ---- Load ------------------------------------------------------------------------ */

#define LOAD_CLIENTS 64
#define LOAD_TOKENS 16
#define LOAD_WARMUP_MS 1500
#define LOAD_RUN_MS 3000

/*
 * Growth of the broker's VmRSS from the end of the warm-up to the end of
 * the run that the test accepts, in KiB. The run sends about 10^4 requests
 * on a 2-CPU machine, so a leak of a few hundred bytes per request exceeds
 * it. Runs there measured growth of 128 to 300 KiB.
 */
#define LOAD_RSS_GROWTH_KIB 1024

/* Reads VmRSS or another "Name: N kB" field of /proc/PID/status, in KiB. */
static long status_kib(pid_t pid, const char *field)
{
	char path[64], line[256];
	size_t field_len = strlen(field);
	long value = -1;
	FILE *file;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	file = fopen(path, "r");
	cr_assert_not_null(file, "open %s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), file) != NULL)
		if (strncmp(line, field, field_len) == 0 &&
		    line[field_len] == ':')
			value = strtol(line + field_len + 1, NULL, 10);
	fclose(file);
	cr_assert_geq(value, 0, "%s lacks %s", path, field);
	return value;
}


/* Greedy references of the load prompts, LOAD_TOKENS tokens each. */
static char load_expected[N_PROMPTS][4096];

/* One load client: its own connection, random choices and tallies. */
struct load_client {
	const struct service *service;
	uint64_t rng;
	uint64_t deadline_ns;
	struct generation *g;
	int good;               /* generations that ran to the end */
	int cancelled;          /* generations cancelled part way */
	int rejected;           /* bad requests rejected as expected */
	int failures;           /* anything else */
	char failure[384];
	pthread_t thread;
};


static uint64_t load_random(struct load_client *c)
{
	/* xorshift64*: deterministic for a given seed. */
	c->rng ^= c->rng >> 12;
	c->rng ^= c->rng << 25;
	c->rng ^= c->rng >> 27;
	return c->rng * 0x2545f4914f6cdd1dull;
}


static void load_fail(struct load_client *c, const char *format, ...)
	__attribute__((format(printf, 2, 3)));

static void load_fail(struct load_client *c, const char *format, ...)
{
	va_list args;

	c->failures++;
	va_start(args, format);
	vsnprintf(c->failure, sizeof(c->failure), format, args);
	va_end(args);
}


/* Runs one good generation, cancelled after a few tokens or not. */
static void load_generate(struct load_client *c, struct slab_client *client,
			  bool use_session)
{
	struct slab_session_options session_options;
	struct slab_generate_options options;
	char handle[SLAB_HANDLE_SIZE];
	size_t prompt = load_random(c) % N_PROMPTS;
	const char *expected = load_expected[prompt];
	struct generation *g = c->g;

	g->cancel_after = load_random(c) % 4 == 0
				  ? 1 + (uint32_t)(load_random(c) % 8)
				  : 0;
	if (use_session) {
		slab_session_options_init(&session_options);
		session_options.has_seed = true;
		session_options.seed = load_random(c);
		if (slab_session_open(client, &session_options, handle,
				      NULL) < 0) {
			load_fail(c, "open: %s", slab_error_message(client));
			return;
		}
	}
	generation_greedy(&options, use_session ? handle : NULL,
			  prompts[prompt], LOAD_TOKENS);
	generation_run(client, &options, g);
	if (g->rc != 0) {
		load_fail(c, "generate '%s': %s", prompts[prompt], g->error);
	} else if (g->cancel_after == 0) {
		if (g->result.finish_reason != SLAB_FINISH_LENGTH ||
		    strcmp(g->text, expected) != 0)
			load_fail(c, "generate '%s': finish %s, text '%s', "
				  "expected '%s'", prompts[prompt],
				  slab_finish_reason_name(g->result.finish_reason),
				  g->text, expected);
		else
			c->good++;
	} else {
		/* A cancel may arrive after the last token. */
		if ((g->result.finish_reason != SLAB_FINISH_CANCELLED &&
		     g->result.finish_reason != SLAB_FINISH_LENGTH) ||
		    strncmp(g->text, expected, g->text_len) != 0)
			load_fail(c, "cancelled '%s': finish %s, text '%s' is "
				  "not a prefix of '%s'", prompts[prompt],
				  slab_finish_reason_name(g->result.finish_reason),
				  g->text, expected);
		else
			c->cancelled++;
	}
	if (use_session && slab_session_close(client, handle) < 0)
		load_fail(c, "close: %s", slab_error_message(client));
}


/* Opens a plain connection to the broker, or returns -1. Never asserts. */
static int load_raw_connect(const struct service *s)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	struct timeval timeout = { .tv_sec = 10 };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	memcpy(address.sun_path, s->socket_path, strlen(s->socket_path) + 1);
	if (connect(fd, (struct sockaddr *)&address, sizeof(address)) < 0) {
		close(fd);
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	return fd;
}


/*
 * Sends bytes that break the framing on a connection of its own. expect_error
 * checks for an INVALID_ARGUMENT reply and the close that follows.
 */
static void load_bad_frame(struct load_client *c, const uint8_t *bytes,
			   size_t len, bool expect_error, const char *what)
{
	Slabd__Reply *reply = NULL;
	uint8_t *payload = NULL;
	ssize_t n;
	char byte;
	int fd = load_raw_connect(c->service);

	if (fd < 0) {
		load_fail(c, "%s: connect failed", what);
		return;
	}
	if (send(fd, bytes, len, MSG_NOSIGNAL) != (ssize_t)len) {
		load_fail(c, "%s: send failed: %s", what, strerror(errno));
		close(fd);
		return;
	}
	if (!expect_error) {
		close(fd);
		c->rejected++;
		return;
	}
	n = frame_read_fd(fd, 0, &payload);
	if (n <= 0 || proto_unpack_reply(payload, (size_t)n, &reply) < 0 ||
	    reply->kind_case != SLABD__REPLY__KIND_ERROR ||
	    reply->error->code != SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT)
		load_fail(c, "%s: no INVALID_ARGUMENT reply", what);
	else if (recv(fd, &byte, 1, 0) != 0)
		load_fail(c, "%s: connection not closed", what);
	else
		c->rejected++;
	if (reply != NULL)
		slabd__reply__free_unpacked(reply, NULL);
	free(payload);
	close(fd);
}


/* Sends one bad request of a kind picked at random. */
static void load_bad_input(struct load_client *c, struct slab_client *client)
{
	static const char *const stops[17] = {
		"a", "b", "c", "d", "e", "f", "g", "h", "i",
		"j", "k", "l", "m", "n", "o", "p", "q",
	};
	static const int32_t bad_ids[] = { 1, 300, 9999 };
	struct slab_generate_options options;
	enum slab_error_code expected = SLAB_ERROR_INVALID_ARGUMENT;
	uint8_t frame[FRAME_HEADER_SIZE + 8];
	unsigned kind = (unsigned)(load_random(c) % 10);
	bool cancelled = true;

	generation_greedy(&options, NULL, "The cat sat", 4);
	switch (kind) {
	case 0:
		options.session = "s0000000f000000010123456789abcdef";
		expected = SLAB_ERROR_NOT_FOUND;
		break;
	case 1:
		options.prompt = NULL;
		options.prompt_ids = bad_ids;
		options.n_prompt_ids = 3;
		break;
	case 2:
		options.temperature = NAN;
		break;
	case 3:
		options.stop = stops;
		options.n_stop = 17;
		break;
	case 4:
		options.prompt = "bad \xc3\x28 text";
		break;
	case 5:
		frame_put_length(frame, 0x7fffffff);
		load_bad_frame(c, frame, FRAME_HEADER_SIZE, true,
			       "oversized frame");
		return;
	case 6:
		frame_put_length(frame, 8);
		memset(frame + FRAME_HEADER_SIZE, 0xff, 8);
		load_bad_frame(c, frame, sizeof(frame), true, "garbage payload");
		return;
	case 7:
		frame_put_length(frame, 100);
		load_bad_frame(c, frame, sizeof(frame), false, "truncated frame");
		return;
	case 8:
		/* No request of this connection runs, so nothing matches. */
		if (slab_cancel(client, 1, NULL, &cancelled) < 0 || cancelled)
			load_fail(c, "cancel of a foreign request id: %s",
				  cancelled ? "cancelled" : slab_error_message(client));
		else
			c->rejected++;
		return;
	default:
		if (slab_session_close(client, "s00000000000000000000000000000000") !=
		    -ENOENT)
			load_fail(c, "close of an unknown handle: %s",
				  slab_error_message(client));
		else
			c->rejected++;
		return;
	}

	c->g->cancel_after = 0;
	generation_run(client, &options, c->g);
	if (c->g->rc >= 0 || c->g->error_code != expected)
		load_fail(c, "bad request %u: return value %d, code %s: %s",
			  kind, c->g->rc, slab_error_code_name(c->g->error_code),
			  c->g->error);
	else
		c->rejected++;
}


static void *load_client_run(void *arg)
{
	struct load_client *c = arg;
	struct slab_client *client = NULL;

	if (slab_connect(c->service->socket_path, &client) < 0 ||
	    slab_hello(client, NULL) < 0) {
		load_fail(c, "connect failed");
		slab_close(client);
		return NULL;
	}
	while (service_now_ns() < c->deadline_ns) {
		unsigned choice = (unsigned)(load_random(c) % 100);

		if (choice < 50)
			load_generate(c, client, true);
		else if (choice < 70)
			load_generate(c, client, false);
		else
			load_bad_input(c, client);
	}
	slab_close(client);
	return NULL;
}


/* Runs every load client for duration_ms and waits for them. */
static void load_round(struct load_client *clients, unsigned duration_ms)
{
	uint64_t deadline = service_now_ns() + duration_ms * 1000000ull;

	for (int i = 0; i < LOAD_CLIENTS; i++) {
		clients[i].deadline_ns = deadline;
		cr_assert_eq(pthread_create(&clients[i].thread, NULL,
					    load_client_run, &clients[i]), 0);
	}
	for (int i = 0; i < LOAD_CLIENTS; i++)
		pthread_join(clients[i].thread, NULL);
}


Test(hardening, load_with_bad_input, .timeout = LOAD_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct load_client clients[LOAD_CLIENTS];
	const char *const extra[] = { "--kv-memory", "32M", NULL };
	struct slab_client *client;
	struct slab_health health;
	long rss_warm, rss_end, anon_warm, anon_end;
	int good = 0, cancelled = 0, rejected = 0, failures = 0;
	int warmup_requests = 0;

	for (size_t i = 0; i < N_PROMPTS; i++)
		reference_completion(prompts[i], LOAD_TOKENS, load_expected[i],
				     sizeof(load_expected[i]));
	service_init(&service);
#ifdef __SANITIZE_ADDRESS__
	/*
	 * AddressSanitizer holds freed memory in a quarantine of up to 256 MiB,
	 * so the broker's resident size would grow with traffic alone. Without
	 * the quarantine, growth again means memory the broker keeps.
	 */
	setenv("ASAN_OPTIONS", "quarantine_size_mb=0", 1);
#endif
	service_start(&service, extra);
	for (int i = 0; i < LOAD_CLIENTS; i++) {
		clients[i] = (struct load_client){
			.service = &service,
			.rng = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1),
		};
		clients[i].g = calloc(1, sizeof(*clients[i].g));
		cr_assert_not_null(clients[i].g);
	}

	load_round(clients, LOAD_WARMUP_MS);
	for (int i = 0; i < LOAD_CLIENTS; i++)
		warmup_requests += clients[i].good + clients[i].cancelled +
				   clients[i].rejected + clients[i].failures;
	rss_warm = status_kib(service.pid, "VmRSS");
	anon_warm = status_kib(service.pid, "RssAnon");
	load_round(clients, LOAD_RUN_MS);
	rss_end = status_kib(service.pid, "VmRSS");
	anon_end = status_kib(service.pid, "RssAnon");

	for (int i = 0; i < LOAD_CLIENTS; i++) {
		good += clients[i].good;
		cancelled += clients[i].cancelled;
		rejected += clients[i].rejected;
		failures += clients[i].failures;
		cr_expect_eq(clients[i].failures, 0, "client %d: %d failures, "
			     "the last: %s", i, clients[i].failures,
			     clients[i].failure);
		free(clients[i].g);
	}
	cr_log_info("load: %d generations matched slab-run, %d were "
		    "cancelled, %d bad requests rejected, %d of them after the "
		    "warm-up; broker VmRSS %ld KiB after the warm-up, %ld KiB "
		    "at the end (RssAnon %ld, %ld)", good, cancelled, rejected,
		    good + cancelled + rejected + failures - warmup_requests,
		    rss_warm, rss_end, anon_warm, anon_end);
	cr_assert_eq(failures, 0);
	cr_assert_geq(good, LOAD_CLIENTS, "only %d good generations", good);
	cr_assert_gt(cancelled, 0);
	cr_assert_geq(rejected, LOAD_CLIENTS, "only %d bad requests", rejected);
	cr_assert_leq(rss_end, rss_warm + LOAD_RSS_GROWTH_KIB,
		      "broker VmRSS grew from %ld KiB to %ld KiB", rss_warm,
		      rss_end);

	client = service_connect(&service);
	cr_assert_eq(wait_metric(client, "slabd_kv_blocks_used", 0, 2000), 0,
		     "KV blocks in use after every session closed");
	cr_assert_eq(service_metric(client, "slabd_sessions_open"), 0);
	cr_assert_eq(wait_metric(client, "slabd_connections_open", 1, 2000), 1);
	cr_assert_eq(slab_health(client, &health), 0);
	cr_assert_eq(health.status, SLAB_HEALTH_OK, "health %s: %s",
		     slab_health_status_name(health.status), health.message);
	slab_close(client);
	service_stop(&service);
}
