/*
 * Client request handlers. Each validates its input first and answers a
 * bad value with INVALID_ARGUMENT naming the field, the value and the
 * accepted range; nothing is changed before validation passes.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define INVALID SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT


/* Whether n bytes are valid UTF-8 (no overlong forms or surrogates). */
static bool utf8_valid(const char *text, size_t n)
{
	const uint8_t *s = (const uint8_t *)text;
	size_t i = 0;

	while (i < n) {
		uint8_t c = s[i];
		size_t len;
		uint32_t min, cp;

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF) {
			len = 2, min = 0x80, cp = c & 0x1F;
		} else if (c >= 0xE0 && c <= 0xEF) {
			len = 3, min = 0x800, cp = c & 0x0F;
		} else if (c >= 0xF0 && c <= 0xF4) {
			len = 4, min = 0x10000, cp = c & 0x07;
		} else {
			return false;
		}
		if (i + len > n)
			return false;
		for (size_t k = 1; k < len; k++) {
			if ((s[i + k] & 0xC0) != 0x80)
				return false;
			cp = (cp << 6) | (s[i + k] & 0x3F);
		}
		if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return false;
		i += len;
	}
	return true;
}


static uint64_t random_seed(void)
{
	uint64_t seed = 0;

	if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
		seed = engine_now_ns();
	return seed;
}


static void send_reply(struct broker_connection *c, uint64_t request_id,
		       Slabd__Reply *reply)
{
	reply->request_id = request_id;
	connection_send_reply(c, reply);
}


static void handle_hello(struct broker_connection *c, uint64_t id,
			 const Slabd__HelloRequest *hello)
{
	struct broker *broker = c->broker;
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__HelloReply out = SLABD__HELLO_REPLY__INIT;
	Slabd__ModelShape shape = SLABD__MODEL_SHAPE__INIT;

	if (hello->protocol_version != BROKER_PROTOCOL_VERSION) {
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_FAILED_PRECONDITION,
				      "protocol version %u is not supported; this "
				      "broker speaks version %d",
				      hello->protocol_version,
				      BROKER_PROTOCOL_VERSION);
		return;
	}
	shape.dim = broker->shape.dim;
	shape.hidden_dim = broker->shape.hidden_dim;
	shape.n_layers = broker->shape.n_layers;
	shape.n_heads = broker->shape.n_heads;
	shape.n_kv_heads = broker->shape.n_kv_heads;
	shape.vocab_size = broker->shape.vocab_size;
	shape.seq_len = broker->shape.seq_len;
	out.protocol_version = BROKER_PROTOCOL_VERSION;
	out.server_version = BROKER_VERSION;
	out.model = &shape;
	out.max_context = (uint32_t)broker->config.max_context;
	reply.kind_case = SLABD__REPLY__KIND_HELLO;
	reply.hello = &out;
	send_reply(c, id, &reply);
}


static void handle_open_session(struct broker_connection *c, uint64_t id,
				const Slabd__OpenSessionRequest *open)
{
	struct broker *broker = c->broker;
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__OpenSessionReply out = SLABD__OPEN_SESSION_REPLY__INIT;
	struct shm_session_params params = { 0 };
	struct broker_session *session;
	uint32_t limit = open->max_context;
	int rc;

	if (limit == 0)
		limit = (uint32_t)broker->config.max_context;
	if (limit > (uint32_t)broker->config.max_context) {
		connection_send_error(c, id, INVALID,
				      "max_context %u is above the broker's maximum "
				      "of %d positions", open->max_context,
				      broker->config.max_context);
		return;
	}
	if (open->policy != SLABD__CONTEXT_POLICY__CONTEXT_POLICY_ERROR &&
	    open->policy != SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT) {
		connection_send_error(c, id, INVALID,
				      "context policy %d is unknown; use ERROR "
				      "or SHIFT", (int)open->policy);
		return;
	}
	if (open->policy == SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT &&
	    open->n_keep >= limit / 2) {
		connection_send_error(c, id, INVALID,
				      "n_keep %u leaves too little room to shift a "
				      "context of %u positions; use at most %u",
				      open->n_keep, limit, limit / 2 - 1);
		return;
	}

	params.context_limit = limit;
	params.policy = open->policy == SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT
				? SHM_CONTEXT_SHIFT
				: SHM_CONTEXT_ERROR;
	params.n_keep = params.policy == SHM_CONTEXT_SHIFT ? open->n_keep : 0;
	params.seed = open->optional_seed_case ==
				      SLABD__OPEN_SESSION_REQUEST__OPTIONAL_SEED_SEED
			      ? open->seed
			      : random_seed();
	rc = session_open(broker, &params, false, &session);
	if (rc == -ENOSPC) {
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
				      "all %d session slots are in use "
				      "(--max-sessions); close sessions or retry "
				      "later", broker->config.max_sessions);
		return;
	}
	if (rc < 0) {
		connection_send_error(c, id, SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
				      "cannot open a session: %s", shm_strerror(rc));
		return;
	}
	out.handle = session->handle_text;
	out.max_context = limit;
	reply.kind_case = SLABD__REPLY__KIND_OPEN_SESSION;
	reply.open_session = &out;
	send_reply(c, id, &reply);
}


/*
 * Turns a request's prompt into token ids, BOS first for an empty session.
 * Returns the count, or -1 after answering the client with an error.
 */
static int64_t read_prompt(struct broker_connection *c, uint64_t id,
			   struct broker_session *session, bool has_text,
			   const char *text, const Slabd__TokenIds *ids,
			   int32_t **out)
{
	struct broker *broker = c->broker;
	bool bos = session == NULL || session->committed == 0;
	size_t limit = (size_t)broker->config.max_context;
	size_t n = 0;
	int32_t *tokens;

	if (has_text) {
		size_t len = strlen(text);

		if (!utf8_valid(text, len)) {
			connection_send_error(c, id, INVALID,
					      "prompt text is not valid UTF-8");
			return -1;
		}
		tokens = malloc((len + 2) * sizeof(int32_t));
		if (tokens == NULL ||
		    engine_tokenize(broker->tokenizer, text, len, bos, tokens,
				    len + 2, &n) < 0) {
			free(tokens);
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
					      "cannot tokenize the prompt");
			return -1;
		}
	} else {
		size_t count = ids != NULL ? ids->n_ids : 0;

		if (count > limit) {
			connection_send_error(c, id, INVALID,
					      "prompt of %zu token ids is longer than "
					      "the maximum context of %zu", count,
					      limit);
			return -1;
		}
		tokens = malloc((count + 1) * sizeof(int32_t));
		if (tokens == NULL) {
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
					      "out of memory");
			return -1;
		}
		if (bos && (count == 0 || ids->ids[0] != ENGINE_TOKEN_BOS))
			tokens[n++] = ENGINE_TOKEN_BOS;
		for (size_t i = 0; i < count; i++) {
			int32_t token = ids->ids[i];

			if (token < 0 || token >= broker->shape.vocab_size) {
				connection_send_error(c, id, INVALID,
						      "token id %d at index %zu is "
						      "outside the vocabulary: "
						      "expected 0 to %d",
						      (int)token, i,
						      (int)broker->shape.vocab_size - 1);
				free(tokens);
				return -1;
			}
			tokens[n++] = token;
		}
	}
	*out = tokens;
	return (int64_t)n;
}


/* Validates the sampling fields of a Generate; fills *s. Returns 0 or -1. */
static int read_sampling(struct broker_connection *c, uint64_t id,
			 const Slabd__GenerateRequest *g, uint64_t seed,
			 struct engine_sampling *s)
{
	engine_sampling_defaults(s);
	s->seed = seed;
	if (g->optional_temperature_case ==
	    SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE_TEMPERATURE) {
		if (!isfinite(g->temperature) || g->temperature < 0.0f ||
		    g->temperature > 100.0f) {
			connection_send_error(c, id, INVALID,
					      "temperature %g is invalid: expected "
					      "a finite number from 0 to 100",
					      (double)g->temperature);
			return -1;
		}
		s->temperature = g->temperature;
	}
	if (g->optional_top_k_case == SLABD__GENERATE_REQUEST__OPTIONAL_TOP_K_TOP_K) {
		if (g->top_k > (uint32_t)INT32_MAX) {
			connection_send_error(c, id, INVALID,
					      "top_k %u is invalid: expected 0 to "
					      "%d", g->top_k, INT32_MAX);
			return -1;
		}
		s->top_k = (int32_t)g->top_k;
	}
	if (g->optional_top_p_case == SLABD__GENERATE_REQUEST__OPTIONAL_TOP_P_TOP_P) {
		if (!isfinite(g->top_p) || g->top_p <= 0.0f || g->top_p > 1.0f) {
			connection_send_error(c, id, INVALID,
					      "top_p %g is invalid: expected a "
					      "number in (0, 1]", (double)g->top_p);
			return -1;
		}
		s->top_p = g->top_p;
	}
	if (g->optional_min_p_case == SLABD__GENERATE_REQUEST__OPTIONAL_MIN_P_MIN_P) {
		if (!isfinite(g->min_p) || g->min_p < 0.0f || g->min_p > 1.0f) {
			connection_send_error(c, id, INVALID,
					      "min_p %g is invalid: expected a "
					      "number in [0, 1]", (double)g->min_p);
			return -1;
		}
		s->min_p = g->min_p;
	}
	if (g->optional_repetition_penalty_case ==
	    SLABD__GENERATE_REQUEST__OPTIONAL_REPETITION_PENALTY_REPETITION_PENALTY) {
		if (!isfinite(g->repetition_penalty) ||
		    g->repetition_penalty <= 0.0f ||
		    g->repetition_penalty > 100.0f) {
			connection_send_error(c, id, INVALID,
					      "repetition_penalty %g is invalid: "
					      "expected a number in (0, 100]",
					      (double)g->repetition_penalty);
			return -1;
		}
		s->repetition_penalty = g->repetition_penalty;
	}
	if (g->optional_seed_case == SLABD__GENERATE_REQUEST__OPTIONAL_SEED_SEED)
		s->seed = g->seed;
	return 0;
}


static int read_stops(struct broker_connection *c, uint64_t id,
		      const Slabd__GenerateRequest *g, struct broker_request *r)
{
	if (g->n_stop > BROKER_MAX_STOP_STRINGS) {
		connection_send_error(c, id, INVALID,
				      "%zu stop strings given; at most %d are "
				      "allowed", g->n_stop, BROKER_MAX_STOP_STRINGS);
		return -1;
	}
	for (size_t i = 0; i < g->n_stop; i++) {
		size_t len = strlen(g->stop[i]);

		if (len == 0 || len > BROKER_MAX_STOP_BYTES ||
		    !utf8_valid(g->stop[i], len)) {
			connection_send_error(c, id, INVALID,
					      "stop string %zu is invalid: expected "
					      "1 to %d bytes of UTF-8", i,
					      BROKER_MAX_STOP_BYTES);
			return -1;
		}
		r->stop[r->n_stop] = strdup(g->stop[i]);
		if (r->stop[r->n_stop] == NULL)
			return -1;
		r->n_stop++;
	}
	return 0;
}


/* Checks that a prompt fits the session's context. Returns 0 or -1. */
static int check_context(struct broker_connection *c, uint64_t id,
			 const struct broker_session *s, uint32_t n_prompt)
{
	uint64_t end = (uint64_t)s->committed + n_prompt;

	if (s->policy == SHM_CONTEXT_ERROR && end > s->context_limit) {
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_CONTEXT_FULL,
				      "prompt of %u tokens does not fit: the "
				      "session holds %u of %u positions; open "
				      "a session with a larger max_context or "
				      "policy SHIFT",
				      n_prompt, s->committed, s->context_limit);
		return -1;
	}
	if (s->policy == SHM_CONTEXT_SHIFT &&
	    n_prompt > s->context_limit - s->n_keep - 1) {
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_CONTEXT_FULL,
				      "prompt of %u tokens does not fit even after "
				      "a shift: %u positions with n_keep %u",
				      n_prompt, s->context_limit, s->n_keep);
		return -1;
	}
	return 0;
}


/*
 * Starts a Generate (is_prefill false) or Prefill on a session: validates,
 * tokenizes and queues it.
 */
static void start_request(struct broker_connection *c, uint64_t id,
			  const Slabd__GenerateRequest *g,
			  const Slabd__PrefillRequest *p)
{
	struct broker *broker = c->broker;
	const char *handle = g != NULL ? g->session : p->session;
	bool has_text = g != NULL ? g->prompt_case == SLABD__GENERATE_REQUEST__PROMPT_TEXT
				  : p->prompt_case == SLABD__PREFILL_REQUEST__PROMPT_TEXT;
	const char *text = g != NULL ? g->text : p->text;
	const Slabd__TokenIds *ids = g != NULL ? g->tokens : p->tokens;
	struct broker_session *session = NULL;
	struct broker_request *r;
	struct engine_sampling sampling;
	int32_t *prompt = NULL;
	int64_t n_prompt;

	if (broker->draining || !broker->ready) {
		connection_send_error(c, id, SLABD__ERROR_CODE__ERROR_CODE_UNAVAILABLE,
				      "the broker is %s; retry later",
				      broker->draining ? "shutting down" : "starting");
		return;
	}
	if (c->n_requests >= broker->config.max_requests_per_connection) {
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
				      "%d requests already run on this connection "
				      "(the per-connection limit); wait for one "
				      "to finish", c->n_requests);
		return;
	}
	if (g != NULL && (g->max_tokens == 0 ||
			  g->max_tokens > (uint32_t)broker->config.max_tokens_cap)) {
		connection_send_error(c, id, INVALID,
				      "max_tokens %u is invalid: expected 1 to %d",
				      g->max_tokens, broker->config.max_tokens_cap);
		return;
	}
	if (handle != NULL && handle[0] != '\0') {
		session = session_find(broker, handle);
		if (session == NULL) {
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
					      "session not found; it was closed, "
					      "expired or never existed");
			return;
		}
		if (session->request != NULL) {
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_FAILED_PRECONDITION,
					      "session %u/%u already runs request "
					      "%llu; wait for it or cancel it",
					      session->handle.slot, session->handle.generation,
					      (unsigned long long)session->request->request_id);
			return;
		}
	} else if (p != NULL) {
		connection_send_error(c, id, INVALID,
				      "prefill needs a session handle");
		return;
	}
	if (g != NULL && read_sampling(c, id, g,
				       session != NULL ? session->seed : random_seed(),
				       &sampling) < 0)
		return;

	n_prompt = read_prompt(c, id, session, has_text, text, ids, &prompt);
	if (n_prompt < 0)
		return;
	if (p != NULL && n_prompt == 0) {
		free(prompt);
		connection_send_error(c, id, INVALID, "prefill of an empty prompt");
		return;
	}
	if (n_prompt > broker->config.max_context) {
		free(prompt);
		connection_send_error(c, id, INVALID,
				      "prompt of %lld tokens is longer than the "
				      "maximum context of %d",
				      (long long)n_prompt, broker->config.max_context);
		return;
	}

	r = calloc(1, sizeof(*r));
	if (r == NULL) {
		free(prompt);
		return;
	}
	r->request_id = id;
	r->connection = c;
	r->is_prefill = p != NULL;
	r->prompt = prompt;
	r->n_prompt = (uint32_t)n_prompt;
	r->received_ns = engine_now_ns();
	if (g != NULL) {
		r->stream = g->stream;
		r->max_tokens = (int32_t)g->max_tokens;
		r->sampling = sampling;
		if (read_stops(c, id, g, r) < 0) {
			for (size_t i = 0; i < r->n_stop; i++)
				free(r->stop[i]);
			free(prompt);
			free(r);
			return;
		}
	}

	if (session == NULL) {
		struct shm_session_params params = {
			.context_limit = (uint32_t)broker->config.max_context,
			.policy = SHM_CONTEXT_ERROR,
			.seed = sampling.seed,
		};
		int rc = session_open(broker, &params, true, &session);

		if (rc < 0) {
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
					      "all %d session slots are in use "
					      "(--max-sessions); retry later",
					      broker->config.max_sessions);
			free(prompt);
			free(r);
			return;
		}
	}
	if (check_context(c, id, session, r->n_prompt) < 0) {
		for (size_t i = 0; i < r->n_stop; i++)
			free(r->stop[i]);
		free(prompt);
		free(r);
		if (session->one_shot)
			session_close(broker, session);
		return;
	}

	/* The token the text continues from decides leading-space handling. */
	if (r->n_prompt > 0) {
		engine_detokenizer_init(&r->detokenizer, prompt[r->n_prompt - 1]);
	} else {
		struct shm_session_info info;

		shm_session_get(broker->arena, &session->handle, &info);
		engine_detokenizer_init(&r->detokenizer,
					info.committed > 0
						? info.tokens[info.committed - 1]
						: ENGINE_TOKEN_BOS);
	}
	r->session = session;
	session->request = r;
	c->n_requests++;
	shm_session_touch(broker->arena, &session->handle);
	session_make_runnable(broker, session);
	scheduler_run(broker);
}


static void handle_cancel(struct broker_connection *c, uint64_t id,
			  const Slabd__CancelRequest *cancel)
{
	struct broker *broker = c->broker;
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__CancelReply out = SLABD__CANCEL_REPLY__INIT;
	struct broker_request *target = NULL;

	if (cancel->session != NULL && cancel->session[0] != '\0') {
		struct broker_session *s = session_find(broker, cancel->session);

		if (s == NULL) {
			connection_send_error(c, id,
					      SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
					      "session not found");
			return;
		}
		if (s->request != NULL &&
		    (cancel->target_request_id == 0 ||
		     s->request->request_id == cancel->target_request_id))
			target = s->request;
	} else {
		for (int i = 0; i < broker->config.max_sessions && !target; i++) {
			struct broker_request *r = broker->sessions[i].request;

			if (broker->sessions[i].in_use && r != NULL &&
			    r->connection == c &&
			    r->request_id == cancel->target_request_id)
				target = r;
		}
	}
	if (target != NULL && !target->cancelled) {
		target->cancelled = true;
		out.cancelled = true;
		session_make_runnable(broker, target->session);
	}
	reply.kind_case = SLABD__REPLY__KIND_CANCEL;
	reply.cancel = &out;
	send_reply(c, id, &reply);
	scheduler_run(broker);
}


static void handle_close_session(struct broker_connection *c, uint64_t id,
				 const Slabd__CloseSessionRequest *close)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__CloseSessionReply out = SLABD__CLOSE_SESSION_REPLY__INIT;
	struct broker_session *s = session_find(c->broker, close->session);

	if (s == NULL) {
		connection_send_error(c, id, SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
				      "session not found");
		return;
	}
	if (s->in_step) {
		/* Closed once its step returns; the request ends now. */
		s->one_shot = true;
		if (s->request != NULL)
			request_finish(c->broker, s->request,
				       SLABD__FINISH_REASON__FINISH_REASON_CANCELLED);
	} else {
		session_close(c->broker, s);
	}
	reply.kind_case = SLABD__REPLY__KIND_CLOSE_SESSION;
	reply.close_session = &out;
	send_reply(c, id, &reply);
}


static void handle_list_sessions(struct broker_connection *c, uint64_t id)
{
	struct broker *broker = c->broker;
	int n = broker->config.max_sessions;
	Slabd__SessionInfo *infos = calloc((size_t)n, sizeof(*infos));
	Slabd__SessionInfo **ptrs = calloc((size_t)n, sizeof(*ptrs));
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__ListSessionsReply out = SLABD__LIST_SESSIONS_REPLY__INIT;
	size_t count = 0;

	for (int i = 0; i < n && infos != NULL && ptrs != NULL; i++) {
		struct broker_session *s = &broker->sessions[i];
		struct shm_session_info info;

		if (!s->in_use || s->one_shot ||
		    shm_session_get(broker->arena, &s->handle, &info) < 0)
			continue;
		slabd__session_info__init(&infos[count]);
		infos[count].handle = s->handle_text;
		infos[count].committed_length = info.committed;
		infos[count].max_context = s->context_limit;
		infos[count].last_use_unix_ms = (uint64_t)info.last_use_ns / 1000000;
		infos[count].policy = s->policy == SHM_CONTEXT_SHIFT
					      ? SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT
					      : SLABD__CONTEXT_POLICY__CONTEXT_POLICY_ERROR;
		ptrs[count] = &infos[count];
		count++;
	}
	out.n_sessions = count;
	out.sessions = ptrs;
	reply.kind_case = SLABD__REPLY__KIND_LIST_SESSIONS;
	reply.list_sessions = &out;
	send_reply(c, id, &reply);
	free(infos);
	free(ptrs);
}


static void handle_tokenize(struct broker_connection *c, uint64_t id,
			    const Slabd__TokenizeRequest *t)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__TokenizeReply out = SLABD__TOKENIZE_REPLY__INIT;
	size_t len = strlen(t->text);
	int32_t *ids;
	size_t n = 0;

	if (!utf8_valid(t->text, len)) {
		connection_send_error(c, id, INVALID, "text is not valid UTF-8");
		return;
	}
	ids = malloc((len + 2) * sizeof(int32_t));
	if (ids == NULL || engine_tokenize(c->broker->tokenizer, t->text, len,
					   t->add_bos, ids, len + 2, &n) < 0) {
		free(ids);
		connection_send_error(c, id, SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
				      "cannot tokenize the text");
		return;
	}
	out.ids = ids;
	out.n_ids = n;
	reply.kind_case = SLABD__REPLY__KIND_TOKENIZE;
	reply.tokenize = &out;
	send_reply(c, id, &reply);
	free(ids);
}


static void handle_health(struct broker_connection *c, uint64_t id)
{
	struct broker *broker = c->broker;
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__HealthReply out = SLABD__HEALTH_REPLY__INIT;
	char message[200] = "";

	out.workers_live = (uint32_t)broker->live_workers;
	out.workers_configured = (uint32_t)broker->config.workers;
	if (broker->draining) {
		out.status = SLABD__HEALTH_STATUS__HEALTH_STATUS_DRAINING;
		snprintf(message, sizeof(message), "shutting down");
	} else if (!broker->ready) {
		out.status = SLABD__HEALTH_STATUS__HEALTH_STATUS_STARTING;
		snprintf(message, sizeof(message), "workers are starting");
	} else if (broker->degraded || broker->live_workers < broker->config.workers) {
		out.status = SLABD__HEALTH_STATUS__HEALTH_STATUS_DEGRADED;
		snprintf(message, sizeof(message), "%d of %d workers live%s",
			 broker->live_workers, broker->config.workers,
			 broker->degraded ? "; workers are crash-looping" : "");
	} else {
		out.status = SLABD__HEALTH_STATUS__HEALTH_STATUS_OK;
	}
	out.message = message;
	reply.kind_case = SLABD__REPLY__KIND_HEALTH;
	reply.health = &out;
	send_reply(c, id, &reply);
}


void broker_handle_request(struct broker_connection *c,
			   const Slabd__Request *request)
{
	uint64_t id = request->request_id;

	switch (request->kind_case) {
	case SLABD__REQUEST__KIND_HELLO:
		handle_hello(c, id, request->hello);
		break;
	case SLABD__REQUEST__KIND_OPEN_SESSION:
		handle_open_session(c, id, request->open_session);
		break;
	case SLABD__REQUEST__KIND_GENERATE:
		start_request(c, id, request->generate, NULL);
		break;
	case SLABD__REQUEST__KIND_PREFILL:
		start_request(c, id, NULL, request->prefill);
		break;
	case SLABD__REQUEST__KIND_CANCEL:
		handle_cancel(c, id, request->cancel);
		break;
	case SLABD__REQUEST__KIND_CLOSE_SESSION:
		handle_close_session(c, id, request->close_session);
		break;
	case SLABD__REQUEST__KIND_LIST_SESSIONS:
		handle_list_sessions(c, id);
		break;
	case SLABD__REQUEST__KIND_TOKENIZE:
		handle_tokenize(c, id, request->tokenize);
		break;
	case SLABD__REQUEST__KIND_STATS:
		stats_send(c, id);
		break;
	case SLABD__REQUEST__KIND_HEALTH:
		handle_health(c, id);
		break;
	default:
		connection_send_error(c, id,
				      SLABD__ERROR_CODE__ERROR_CODE_UNIMPLEMENTED,
				      "request kind %d is not known to this "
				      "broker", (int)request->kind_case);
		break;
	}
}


void broker_connection_gone(struct broker *broker, struct broker_connection *c)
{
	for (int i = 0; i < broker->config.max_sessions; i++) {
		struct broker_session *s = &broker->sessions[i];
		struct broker_request *r = s->request;

		if (!s->in_use || r == NULL || r->connection != c)
			continue;
		r->connection = NULL;
		r->cancelled = true;
		c->n_requests--;
		session_make_runnable(broker, s);
	}
	scheduler_run(broker);
}
