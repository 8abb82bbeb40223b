/*
 * Sessions as the running broker sees them, and the life of the request
 * running on one: accepting sampled tokens (detokenizing, matching stop
 * strings, streaming), and finishing with Done or an error.
 *
 * Rule: every sampled token is committed to the session before the request
 * ends (unless the context is full), so a session's committed state in
 * shared memory is all a restarted broker needs to continue it.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>


/* Blocks a session may hold: its context plus one block for a shift. */
static uint32_t table_capacity(const struct broker *broker)
{
	uint32_t bt = (uint32_t)broker->config.block_tokens;

	return ((uint32_t)broker->config.max_context + bt - 1) / bt + 1;
}


/* Fills the broker's view of a session from the shared table. */
static int session_load(struct broker *broker, struct broker_session *s,
			const struct shm_session_info *info)
{
	uint32_t capacity = table_capacity(broker);

	memset(s, 0, sizeof(*s));
	s->blocks = calloc(capacity, sizeof(int32_t));
	s->shift_blocks = calloc(capacity, sizeof(int32_t));
	if (s->blocks == NULL || s->shift_blocks == NULL) {
		free(s->blocks);
		free(s->shift_blocks);
		s->blocks = s->shift_blocks = NULL;
		return -ENOMEM;
	}
	s->in_use = true;
	s->handle = info->handle;
	shm_handle_format(&s->handle, s->handle_text, sizeof(s->handle_text));
	s->committed = info->committed;
	s->context_limit = info->params.context_limit;
	s->policy = info->params.policy;
	s->n_keep = info->params.n_keep;
	s->seed = info->params.seed;
	s->pending_token = -1;
	s->n_blocks = info->n_blocks;
	for (uint32_t i = 0; i < info->n_blocks; i++)
		s->blocks[i] = (int32_t)info->blocks[i];
	return 0;
}


int session_open(struct broker *broker,
		 const struct shm_session_params *params, bool one_shot,
		 struct broker_session **out)
{
	struct shm_session_info info;
	struct shm_handle handle;
	int rc;

	rc = shm_session_open(broker->arena, params, &handle);
	if (rc < 0)
		return rc;
	rc = shm_session_get(broker->arena, &handle, &info);
	if (rc == 0)
		rc = session_load(broker, &broker->sessions[handle.slot], &info);
	if (rc < 0) {
		shm_session_close(broker->arena, &handle);
		return rc;
	}
	broker->sessions[handle.slot].one_shot = one_shot;
	broker->stats.sessions_opened++;
	*out = &broker->sessions[handle.slot];
	log_debug("session %u/%u opened", handle.slot, handle.generation);
	return 0;
}


/*
 * Returns the session a handle names, or NULL. One-shot sessions are never
 * found, because their handle was never sent to a client, or because a
 * CloseSession that arrived while their step ran made the handle invalid.
 */
struct broker_session *session_find(struct broker *broker, const char *text)
{
	struct shm_handle handle;

	if (text == NULL || shm_handle_parse(text, &handle) < 0 ||
	    handle.slot >= (uint32_t)broker->config.max_sessions ||
	    shm_session_lookup(broker->arena, &handle) < 0 ||
	    !broker->sessions[handle.slot].in_use ||
	    broker->sessions[handle.slot].one_shot)
		return NULL;
	return &broker->sessions[handle.slot];
}


/* Returns the blocks rented for a step that will not commit them. */
void session_release_rented(struct broker *broker, struct broker_session *s)
{
	for (uint32_t i = s->n_blocks - s->n_rented; i < s->n_blocks; i++)
		shm_pool_return(broker->arena, (uint32_t)s->blocks[i]);
	s->n_blocks -= s->n_rented;
	s->n_rented = 0;
	for (uint32_t i = 0; i < s->n_shift_blocks; i++) {
		bool reused = false;

		for (uint32_t j = 0; j < s->n_blocks && !reused; j++)
			reused = s->blocks[j] == s->shift_blocks[i];
		if (!reused)
			shm_pool_return(broker->arena,
					(uint32_t)s->shift_blocks[i]);
	}
	s->n_shift_blocks = 0;
}


static void session_unqueue(struct broker *broker, struct broker_session *s)
{
	struct broker_session **link = &broker->runnable_head;

	if (!s->queued)
		return;
	broker->runnable_tail = NULL;
	while (*link != NULL) {
		if (*link == s)
			*link = s->next_runnable;
		else {
			broker->runnable_tail = *link;
			link = &(*link)->next_runnable;
		}
	}
	s->queued = false;
	s->next_runnable = NULL;
}


void session_close(struct broker *broker, struct broker_session *s)
{
	if (!s->in_use)
		return;
	if (s->request != NULL)
		request_finish(broker, s->request,
			       SLABD__FINISH_REASON__FINISH_REASON_CANCELLED);
	session_unqueue(broker, s);
	shm_session_close(broker->arena, &s->handle);
	log_debug("session %u/%u closed", s->handle.slot, s->handle.generation);
	free(s->blocks);
	free(s->shift_blocks);
	memset(s, 0, sizeof(*s));
	broker->stats.sessions_closed++;
}


void session_attach_existing(struct broker *broker)
{
	int recovered = 0;

	for (int slot = 0; slot < broker->config.max_sessions; slot++) {
		struct shm_session_info info;

		if (shm_session_at(broker->arena, (uint32_t)slot, &info) < 0)
			continue;
		if (session_load(broker, &broker->sessions[slot], &info) < 0) {
			log_error("out of memory while recovering sessions");
			return;
		}
		recovered++;
		log_info("session %u/%u recovered: %u positions committed",
			 info.handle.slot, info.handle.generation, info.committed);
	}
	if (recovered > 0)
		log_notice("%d sessions recovered from shared memory", recovered);
}


/* Last-use time of a session, or 0 if it cannot be read. */
static int64_t session_last_use(struct broker *broker, struct broker_session *s)
{
	struct shm_session_info info;

	if (shm_session_get(broker->arena, &s->handle, &info) < 0)
		return 0;
	return info.last_use_ns;
}


/*
 * Closes the least recently used session that runs no request, other than
 * keep. Returns false when there is none.
 */
bool session_evict_lru(struct broker *broker, struct broker_session *keep)
{
	struct broker_session *victim = NULL;
	int64_t oldest = INT64_MAX;

	for (int i = 0; i < broker->config.max_sessions; i++) {
		struct broker_session *s = &broker->sessions[i];
		int64_t last_use;

		if (!s->in_use || s == keep || s->request != NULL || s->in_step)
			continue;
		last_use = session_last_use(broker, s);
		if (last_use < oldest) {
			oldest = last_use;
			victim = s;
		}
	}
	if (victim == NULL)
		return false;
	log_notice("evicting idle session %u/%u (%u positions) to free KV "
		   "blocks", victim->handle.slot, victim->handle.generation, victim->committed);
	session_close(broker, victim);
	broker->stats.sessions_evicted++;
	return true;
}


void session_expire_idle(struct broker *broker)
{
	struct timespec now;
	int64_t now_ns, limit_ns;

	if (broker->config.session_idle_timeout == 0)
		return;
	clock_gettime(CLOCK_REALTIME, &now);
	now_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
	limit_ns = (int64_t)broker->config.session_idle_timeout * 1000000000;
	for (int i = 0; i < broker->config.max_sessions; i++) {
		struct broker_session *s = &broker->sessions[i];

		if (!s->in_use || s->request != NULL || s->in_step)
			continue;
		if (now_ns - session_last_use(broker, s) > limit_ns) {
			log_info("session %u/%u idle for more than %d s; "
				 "closing it", s->handle.slot, s->handle.generation,
				 broker->config.session_idle_timeout);
			session_close(broker, s);
		}
	}
}


void session_make_runnable(struct broker *broker, struct broker_session *s)
{
	if (s->queued || s->in_step || s->request == NULL)
		return;
	s->queued = true;
	s->next_runnable = NULL;
	if (broker->runnable_tail != NULL)
		broker->runnable_tail->next_runnable = s;
	else
		broker->runnable_head = s;
	broker->runnable_tail = s;
}


/* ---- Requests ----------------------------------------------------------- */

/* Appends bytes to the text that Done carries. */
static void text_append(struct broker_request *r, const char *bytes, size_t n)
{
	if (n == 0)
		return;
	if (r->n_text + n > r->text_capacity) {
		size_t capacity = r->text_capacity ? r->text_capacity * 2 : 256;
		char *grown;

		while (capacity < r->n_text + n)
			capacity *= 2;
		grown = realloc(r->text, capacity);
		if (grown == NULL)
			return;
		r->text = grown;
		r->text_capacity = capacity;
	}
	memcpy(r->text + r->n_text, bytes, n);
	r->n_text += n;
}


/* Sends a Token reply carrying piece (possibly empty). */
static void send_token(struct broker_request *r, int32_t id, uint32_t position,
		       const char *piece, size_t n)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Token token = SLABD__TOKEN__INIT;

	if (!r->stream) {
		text_append(r, piece, n);
		return;
	}
	if (r->connection == NULL)
		return;
	token.id = id;
	token.position = position;
	token.piece.data = (uint8_t *)piece;
	token.piece.len = n;
	reply.request_id = r->request_id;
	reply.kind_case = SLABD__REPLY__KIND_TOKEN;
	reply.token = &token;
	connection_send_reply(r->connection, &reply);
}


/*
 * Returns the length of the longest suffix of text that is a proper prefix
 * of a stop string: those bytes must wait for the next token.
 */
static size_t stop_prefix_length(const struct broker_request *r,
				 const char *text, size_t n)
{
	size_t longest = 0;

	for (size_t s = 0; s < r->n_stop; s++) {
		size_t stop_len = strlen(r->stop[s]);

		for (size_t k = stop_len - 1; k > longest; k--)
			if (k <= n && memcmp(text + n - k, r->stop[s], k) == 0) {
				longest = k;
				break;
			}
	}
	return longest;
}


/* Returns the offset of the first stop string in text, or -1. */
static long find_stop(const struct broker_request *r, const char *text,
		      size_t n)
{
	long first = -1;

	for (size_t s = 0; s < r->n_stop; s++) {
		const char *hit = memmem(text, n, r->stop[s], strlen(r->stop[s]));

		if (hit != NULL && (first < 0 || hit - text < first))
			first = hit - text;
	}
	return first;
}


/*
 * Adds a token's text to what is held back and sends, as this token's
 * piece, what can no longer be part of a stop string; with final set, all
 * of it, including an incomplete UTF-8 character as U+FFFD. Returns true
 * when a stop string was found (its text and what follows is not sent).
 */
static bool emit_text(struct broker_request *r, int32_t id, uint32_t position,
		      const char *piece, size_t n, bool final)
{
	char tail[8];
	size_t n_tail = 0;
	char *grown;
	long stop;
	size_t keep;

	if (final)
		n_tail = engine_detokenize_flush(&r->detokenizer, tail,
						 sizeof(tail));
	grown = realloc(r->held, r->n_held + n + n_tail + 1);
	if (grown == NULL)
		return false;
	r->held = grown;
	memcpy(r->held + r->n_held, piece, n);
	memcpy(r->held + r->n_held + n, tail, n_tail);
	r->n_held += n + n_tail;

	stop = find_stop(r, r->held, r->n_held);
	if (stop >= 0) {
		send_token(r, id, position, r->held, (size_t)stop);
		r->n_held = 0;
		return true;
	}
	keep = final ? 0 : stop_prefix_length(r, r->held, r->n_held);
	send_token(r, id, position, r->held, r->n_held - keep);
	memmove(r->held, r->held + r->n_held - keep, keep);
	r->n_held = keep;
	return false;
}


static void observe_timing(struct broker *broker, struct broker_request *r)
{
	uint64_t now = engine_now_ns();

	if (r->generated == 1) {
		r->first_token_ns = now;
		stats_observe_ttft(broker, (double)(now - r->received_ns) / 1e9);
	} else {
		stats_observe_itl(broker, (double)(now - r->last_token_ns) / 1e9);
	}
	r->last_token_ns = now;
}


/*
 * Marks the request as ending for reason: the token just sampled is
 * committed first when it fits in the context, then Done is sent.
 */
static void begin_finish(struct broker *broker, struct broker_request *r,
			 Slabd__FinishReason reason, int32_t token,
			 uint32_t position)
{
	struct broker_session *s = r->session;

	r->finish_reason = reason;
	if (position < s->context_limit || s->policy == SHM_CONTEXT_SHIFT) {
		r->finishing = true;
		s->pending_token = token;
		session_make_runnable(broker, s);
		return;
	}
	request_finish(broker, r, reason);
}


void request_accept_token(struct broker *broker, struct broker_request *r,
			  int32_t token, uint32_t position)
{
	struct broker_session *s = r->session;
	Slabd__FinishReason reason = SLABD__FINISH_REASON__FINISH_REASON_UNSPECIFIED;
	char text[1200];
	size_t n = 0;
	int64_t limit = r->max_tokens;

	r->generated++;
	observe_timing(broker, r);
	broker->stats.tokens_decoded++;

	/* Decide first whether this token ends the request, so that its
	 * piece can carry every byte still held back. */
	if (engine_is_end_token(token))
		reason = SLABD__FINISH_REASON__FINISH_REASON_EOS;
	else if (r->cancelled)
		reason = SLABD__FINISH_REASON__FINISH_REASON_CANCELLED;
	else if (limit > 0 && r->generated >= (uint64_t)limit)
		reason = SLABD__FINISH_REASON__FINISH_REASON_LENGTH;
	else if (position >= s->context_limit && s->policy == SHM_CONTEXT_ERROR)
		reason = SLABD__FINISH_REASON__FINISH_REASON_CONTEXT_FULL;

	if (!engine_is_end_token(token))
		n = engine_detokenize(broker->tokenizer, &r->detokenizer, token,
				      text, sizeof(text));
	if (emit_text(r, token, position, text, n,
		      reason != SLABD__FINISH_REASON__FINISH_REASON_UNSPECIFIED))
		reason = SLABD__FINISH_REASON__FINISH_REASON_STOP;

	switch (reason) {
	case SLABD__FINISH_REASON__FINISH_REASON_UNSPECIFIED:
		s->pending_token = token;
		session_make_runnable(broker, s);
		break;
	case SLABD__FINISH_REASON__FINISH_REASON_CONTEXT_FULL:
		request_finish(broker, r, reason);
		break;
	default:
		begin_finish(broker, r, reason, token, position);
		break;
	}
}


static void request_release(struct broker *broker, struct broker_request *r)
{
	struct broker_session *s = r->session;

	if (s != NULL) {
		s->request = NULL;
		s->pending_token = -1;
		s->refeed_last = false;
		s->crash_count = 0;
		if (!s->in_step)
			session_release_rented(broker, s);
		shm_session_touch(broker->arena, &s->handle);
	}
	if (r->connection != NULL)
		r->connection->n_requests--;
	for (size_t i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	free(r->prompt);
	free(r->held);
	free(r->text);
	free(r);
	if (s != NULL && s->one_shot && !s->in_step)
		session_close(broker, s);
}


void request_finish(struct broker *broker, struct broker_request *r,
		    Slabd__FinishReason reason)
{
	struct broker_session *s = r->session;
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Done done = SLABD__DONE__INIT;
	Slabd__Error error = SLABD__ERROR__INIT;
	char tail[8];
	size_t n;

	/*
	 * A request that ends between tokens (cancel, error, drain) may still
	 * hold the start of a stop string or of a UTF-8 character: it goes
	 * into Done.text, which for a streamed request holds only such bytes.
	 */
	if (reason != SLABD__FINISH_REASON__FINISH_REASON_STOP) {
		text_append(r, r->held, r->n_held);
		n = engine_detokenize_flush(&r->detokenizer, tail, sizeof(tail));
		text_append(r, tail, n);
	}
	r->n_held = 0;

	if (r->is_prefill) {
		if (reason == SLABD__FINISH_REASON__FINISH_REASON_ERROR ||
		    reason == SLABD__FINISH_REASON__FINISH_REASON_CANCELLED) {
			if (r->connection != NULL)
				connection_send_error(
					r->connection, r->request_id,
					reason == SLABD__FINISH_REASON__FINISH_REASON_CANCELLED
						? SLABD__ERROR_CODE__ERROR_CODE_CANCELLED
						: r->error_code,
					"%s", reason == SLABD__FINISH_REASON__FINISH_REASON_CANCELLED
						      ? "prefill cancelled"
						      : r->error);
		} else if (r->connection != NULL) {
			Slabd__PrefillReply prefill = SLABD__PREFILL_REPLY__INIT;

			prefill.prompt_tokens = r->prompt_fed;
			prefill.committed_length = s->committed;
			reply.request_id = r->request_id;
			reply.kind_case = SLABD__REPLY__KIND_PREFILL;
			reply.prefill = &prefill;
			connection_send_reply(r->connection, &reply);
		}
		request_release(broker, r);
		return;
	}

	done.finish_reason = reason;
	done.prompt_tokens = r->prompt_fed;
	done.completion_tokens = r->generated;
	done.committed_length = s->committed;
	if (r->first_token_ns != 0)
		done.time_to_first_token_us =
			(r->first_token_ns - r->received_ns) / 1000;
	if (r->generated > 1 && r->last_token_ns > r->first_token_ns)
		done.decode_tokens_per_second =
			(double)(r->generated - 1) /
			((double)(r->last_token_ns - r->first_token_ns) / 1e9);
	done.text.data = (uint8_t *)r->text;
	done.text.len = r->n_text;
	if (reason == SLABD__FINISH_REASON__FINISH_REASON_ERROR) {
		error.code = r->error_code;
		error.message = r->error;
		done.error = &error;
	}
	if (r->connection != NULL) {
		reply.request_id = r->request_id;
		reply.kind_case = SLABD__REPLY__KIND_DONE;
		reply.done = &done;
		connection_send_reply(r->connection, &reply);
	}
	log_debug("request %llu on session %u/%u done: %s, %u prompt and %u "
		  "generated tokens", (unsigned long long)r->request_id,
		  s->handle.slot, s->handle.generation, proto_finish_reason_name(reason),
		  r->prompt_fed, r->generated);
	request_release(broker, r);
}


void request_fail(struct broker *broker, struct broker_request *r,
		  Slabd__ErrorCode code, const char *format, ...)
{
	va_list args;

	va_start(args, format);
	vsnprintf(r->error, sizeof(r->error), format, args);
	va_end(args);
	r->error_code = code;
	request_finish(broker, r, SLABD__FINISH_REASON__FINISH_REASON_ERROR);
}
