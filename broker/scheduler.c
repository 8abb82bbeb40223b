/*
 * The scheduler: turns runnable sessions into worker steps and commits
 * their results.
 *
 * Each idle worker takes sessions from the front of the runnable queue, up
 * to --max-batch sessions and max_step_tokens tokens: one token for a
 * session that is decoding, or a chunk of at most --prefill-chunk prompt
 * tokens, so a long prompt never holds up other sessions' decode steps for
 * more than one chunk. The broker rents any new KV block before it sends a
 * step and commits (committed = start + n) only when the reply arrives, so
 * a step lost with its worker is sent again unchanged.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long after a worker failure the others are checked before each step. */
#define WORKER_CHECK_AFTER_FAILURE_NS (5ull * 1000000000ull)

/* A session whose steps killed this many workers fails its request. */
#define POISON_CRASHES 2

/* Per-step message storage, sized for the largest step. */
struct step_message {
	Slabd__Worker__StepRequest request;
	Slabd__Worker__Sequence *sequence_ptrs[1024];
	Slabd__Worker__Sequence sequences[1024];
	Slabd__Worker__Sampling sampling[1024];
	Slabd__Worker__Shift shift;
	int32_t history[1024][ENGINE_PENALTY_WINDOW];
};

static struct step_message message;


/* Puts a session back at the front of the queue, ahead of new work. */
static void make_runnable_first(struct broker *broker, struct broker_session *s)
{
	if (s->queued || s->request == NULL)
		return;
	s->queued = true;
	s->next_runnable = broker->runnable_head;
	broker->runnable_head = s;
	if (broker->runnable_tail == NULL)
		broker->runnable_tail = s;
}


/*
 * Points runnable_tail at the last queued session again. build_step()
 * unlinks sessions through a link pointer, so it calls this on every return
 * path. A stale tail that points at an unlinked session makes the next
 * append vanish from the queue.
 */
static void reset_runnable_tail(struct broker *broker)
{
	broker->runnable_tail = NULL;
	for (struct broker_session *s = broker->runnable_head; s != NULL;
	     s = s->next_runnable)
		broker->runnable_tail = s;
}


/*
 * Rents one KV block for session s, evicting idle sessions while the pool
 * is empty. Returns 0, or -ENOSPC when nothing more can be evicted.
 */
static int rent_block(struct broker *broker, struct broker_session *s,
		      int32_t *block)
{
	for (;;) {
		uint32_t index;
		int rc = shm_pool_rent(broker->arena, &broker->kv_shape,
				       &s->handle, &index);

		if (rc == -ENOSPC && session_evict_lru(broker, s))
			continue;
		if (rc == 0)
			*block = (int32_t)index;
		return rc;
	}
}


/* Rents blocks until the session's table covers `length` positions. */
static int ensure_blocks(struct broker *broker, struct broker_session *s,
			 uint32_t length)
{
	uint32_t bt = (uint32_t)broker->config.block_tokens;
	uint32_t need = (length + bt - 1) / bt;

	while (s->n_blocks < need) {
		int rc = rent_block(broker, s, &s->blocks[s->n_blocks]);

		if (rc < 0)
			return rc;
		s->n_blocks++;
		s->n_rented++;
	}
	return 0;
}


static void fail_exhausted(struct broker *broker, struct broker_session *s)
{
	struct shm_pool_stats stats;

	shm_pool_stats(broker->arena, &stats);
	session_release_rented(broker, s);
	request_fail(broker, s->request,
		     SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED,
		     "KV cache exhausted: all %llu blocks are in use by "
		     "sessions with running requests; retry later, close "
		     "sessions or start slabd with a larger --kv-memory",
		     (unsigned long long)stats.blocks_total);
}


/*
 * Prepares a context shift of session s into fresh blocks: the first n_keep
 * positions stay and half of the rest is dropped. Returns 0, or a negative
 * errno value when no shift can make room.
 */
static int prepare_shift(struct broker *broker, struct broker_session *s)
{
	uint32_t bt = (uint32_t)broker->config.block_tokens;
	uint32_t keep = s->n_keep < s->committed ? s->n_keep : s->committed;
	uint32_t discard = (s->committed - keep) / 2;
	uint32_t length, need, reuse;

	if (discard == 0)
		discard = s->committed - keep;
	if (discard == 0)
		return -EOVERFLOW;
	length = s->committed - discard;
	need = (length + bt - 1) / bt;
	reuse = keep / bt; /* whole blocks of kept positions stay in place */
	if (reuse > need)
		reuse = need;

	if (s->n_shift_blocks == 0) {
		for (uint32_t i = 0; i < reuse; i++)
			s->shift_blocks[i] = s->blocks[i];
		s->n_shift_blocks = reuse;
	}
	while (s->n_shift_blocks < need) {
		int rc = rent_block(broker, s,
				    &s->shift_blocks[s->n_shift_blocks]);

		if (rc < 0)
			return rc;
		s->n_shift_blocks++;
	}
	s->shift_discard = discard;
	return 0;
}


static void fill_sampling(Slabd__Worker__Sampling *out,
			  const struct engine_sampling *in)
{
	slabd__worker__sampling__init(out);
	out->temperature = in->temperature;
	out->top_k = in->top_k;
	out->top_p = in->top_p;
	out->min_p = in->min_p;
	out->repetition_penalty = in->repetition_penalty;
	out->seed = in->seed;
}


/*
 * Fills the repetition-penalty history: the last tokens of the context the
 * sampled token follows, that is the committed tokens below start and the
 * n tokens the step feeds.
 */
static size_t fill_history(struct broker *broker, struct broker_session *s,
			   int32_t start, const int32_t *fed, int32_t n,
			   int32_t *history)
{
	struct shm_session_info info;
	size_t window = ENGINE_PENALTY_WINDOW;
	size_t from_fed = (size_t)n < window ? (size_t)n : window;
	size_t from_committed = window - from_fed;

	if (shm_session_get(broker->arena, &s->handle, &info) < 0)
		return 0;
	if (from_committed > (size_t)start)
		from_committed = (size_t)start;
	memcpy(history, info.tokens + start - from_committed,
	       from_committed * sizeof(int32_t));
	memcpy(history + from_committed, fed + n - from_fed,
	       from_fed * sizeof(int32_t));
	return from_committed + from_fed;
}


/* Fault the test flags ask for in this step, if any. */
static Slabd__Worker__Fault step_fault(struct broker *broker, uint64_t step_id,
				       const struct broker_step_entry *e)
{
	const struct broker_config *c = &broker->config;

	for (int i = 0; i < c->n_faults; i++) {
		const struct broker_fault *f = &c->faults[i];

		if (f->step != 0 && f->step == step_id)
			return (Slabd__Worker__Fault)f->kind;
		if (f->position >= 0 && e->start <= f->position &&
		    f->position < e->start + e->n)
			return (Slabd__Worker__Fault)f->kind;
	}
	return SLABD__WORKER__FAULT__FAULT_NONE;
}


static void send_step(struct broker *broker, struct broker_worker *worker)
{
	struct broker_step *step = &worker->step;
	int rc;

	message.request.step_id = step->id;
	message.request.fault = SLABD__WORKER__FAULT__FAULT_NONE;
	if (broker->config.n_faults > 0)
		for (int i = 0; i < step->n_entries &&
				message.request.fault == SLABD__WORKER__FAULT__FAULT_NONE;
		     i++)
			message.request.fault = step_fault(broker, step->id,
							   &step->entries[i]);

	rc = worker_send_step(worker, &message.request);
	if (rc < 0) {
		log_error("cannot send step %llu to worker %d: %s",
			  (unsigned long long)step->id, worker->id,
			  strerror(-rc));
		worker->state = WORKER_BUSY;
		worker_kill(worker, "step send failed");
	}
}


/* Sends a context shift of one session as a step of its own. */
static void build_shift_step(struct broker *broker, struct broker_worker *worker,
			     struct broker_session *s)
{
	struct broker_step *step = &worker->step;
	Slabd__Worker__Shift *shift = &message.shift;

	slabd__worker__step_request__init(&message.request);
	slabd__worker__shift__init(shift);
	shift->slot = s->handle.slot;
	shift->source_blocks = s->blocks;
	shift->n_source_blocks = s->n_blocks;
	shift->target_blocks = s->shift_blocks;
	shift->n_target_blocks = s->n_shift_blocks;
	shift->n_keep = (int32_t)(s->n_keep < s->committed ? s->n_keep
							    : s->committed);
	shift->n_discard = (int32_t)s->shift_discard;
	shift->length = (int32_t)s->committed;
	message.request.shift = shift;

	step->id = ++broker->next_step_id;
	step->n_entries = 1;
	step->tokens = s->committed;
	step->run = 0;
	step->entries[0] = (struct broker_step_entry){ .session = s, .shift = true };
	s->in_step = true;
	log_debug("session %u/%u shifts: %u positions dropped after %d kept",
		  s->handle.slot, s->handle.generation, s->shift_discard, shift->n_keep);
	send_step(broker, worker);
}


/* The work a session has next: which tokens, from which position. */
struct session_work {
	const int32_t *tokens;
	int32_t start;
	int32_t n;
	bool sample;
	bool done;      /* nothing to compute: the request can finish */
};


static struct session_work next_work(struct broker *broker,
				     struct broker_session *s, int budget)
{
	struct broker_request *r = s->request;
	struct session_work w = { 0 };

	if (s->pending_token >= 0) {
		w.tokens = &s->pending_token;
		w.start = (int32_t)s->committed;
		w.n = 1;
		w.sample = !r->finishing;
	} else if (r->prompt_fed < r->n_prompt) {
		uint32_t left = r->n_prompt - r->prompt_fed;
		uint32_t chunk = (uint32_t)broker->config.prefill_chunk;

		if (chunk > (uint32_t)budget)
			chunk = (uint32_t)budget;
		w.n = (int32_t)(left < chunk ? left : chunk);
		w.tokens = r->prompt + r->prompt_fed;
		w.start = (int32_t)s->committed;
		w.sample = !r->is_prefill && r->prompt_fed + (uint32_t)w.n == r->n_prompt;
	} else if (!r->is_prefill && s->committed > 0) {
		/* Nothing new to feed: compute the last position again. */
		struct shm_session_info info;

		if (shm_session_get(broker->arena, &s->handle, &info) < 0) {
			w.done = true;
			return w;
		}
		s->refeed_last = true;
		s->pending_token = info.tokens[info.committed - 1];
		w.tokens = &s->pending_token;
		w.start = (int32_t)s->committed - 1;
		w.n = 1;
		w.sample = true;
	} else {
		w.done = true;
	}
	return w;
}


/* Adds a session's work to the step being built and its worker message. */
static void add_sequence(struct broker *broker, struct broker_step *step,
			 struct broker_session *s, const struct session_work *w)
{
	const struct broker_request *r = s->request;
	int i = step->n_entries++;
	Slabd__Worker__Sequence *q = &message.sequences[i];

	step->entries[i] = (struct broker_step_entry){
		.session = s, .start = w->start, .n = w->n, .sample = w->sample,
	};
	slabd__worker__sequence__init(q);
	q->slot = s->handle.slot;
	q->start = w->start;
	q->n_tokens = (size_t)w->n;
	q->tokens = (int32_t *)w->tokens;
	q->n_blocks = s->n_blocks;
	q->blocks = s->blocks;
	q->sample = w->sample;
	if (w->sample) {
		fill_sampling(&message.sampling[i], &r->sampling);
		q->sampling = &message.sampling[i];
		if (r->sampling.repetition_penalty != 1.0f) {
			q->history = message.history[i];
			q->n_history = fill_history(broker, s, w->start,
						    w->tokens, w->n,
						    message.history[i]);
		}
	}
	message.sequence_ptrs[i] = q;
	s->in_step = true;
	step->tokens += (uint64_t)w->n;
}


/*
 * Makes a step of one decoding session a decode run when no other session
 * waits for a worker. The worker then feeds each sampled token itself and
 * replies once per token, which spares a round trip through the broker per
 * token. A run stays within the session's blocks, its context and its
 * max_tokens. Runs are left out under fault injection, whose positions
 * name single steps, and for a session that runs alone after a crash.
 */
static void make_decode_run(struct broker *broker, struct broker_step *step)
{
	const struct broker_step_entry *e = &step->entries[0];
	struct broker_session *s = e->session;
	const struct broker_request *r = s->request;
	int64_t bt = broker->config.block_tokens;
	int64_t run = broker->config.decode_run;

	if (step->n_entries != 1 || run <= 1 || broker->runnable_head != NULL ||
	    broker->config.n_faults > 0 || !e->sample || e->n != 1 ||
	    s->pending_token < 0 || s->refeed_last || s->solo || r == NULL ||
	    r->finishing || r->cancelled)
		return;
	if (run > (int64_t)s->context_limit - e->start)
		run = (int64_t)s->context_limit - e->start;
	if (r->max_tokens > 0 && run > (int64_t)r->max_tokens - (int64_t)r->generated)
		run = (int64_t)r->max_tokens - (int64_t)r->generated;

	/*
	 * Rent the blocks the run may reach, while free blocks last: a run
	 * evicts no other session. They are committed as positions reach
	 * them, and returned with the request's other rented blocks.
	 */
	while (s->n_blocks * bt < e->start + run) {
		uint32_t index;

		if (shm_pool_rent(broker->arena, &broker->kv_shape, &s->handle,
				  &index) < 0)
			break;
		s->blocks[s->n_blocks++] = (int32_t)index;
		s->n_rented++;
	}
	if (run > (int64_t)s->n_blocks * bt - e->start)
		run = (int64_t)s->n_blocks * bt - e->start;
	if (run <= 1)
		return;
	step->run = (int)run;
	message.sequences[0].run = (int32_t)run;
	message.sequences[0].n_blocks = s->n_blocks;
	log_debug("session %u/%u: decode run of %d tokens from position %d",
		  s->handle.slot, s->handle.generation, (int)run, (int)e->start);
}


/* Fills one idle worker's step from the runnable queue and sends it. */
static void build_step(struct broker *broker, struct broker_worker *worker)
{
	struct broker_step *step = &worker->step;
	struct broker_session **link = &broker->runnable_head;
	int budget = broker->max_step_tokens;

	step->n_entries = 0;
	step->tokens = 0;
	step->run = 0;
	step->run_stopped = false;
	step->run_yielding = false;
	slabd__worker__step_request__init(&message.request);

	while (*link != NULL && step->n_entries < broker->config.max_batch &&
	       budget > 0) {
		struct broker_session *s = *link;
		struct broker_request *r = s->request;
		struct session_work w;

		if (r != NULL && r->cancelled && !r->finishing &&
		    s->pending_token < 0) {
			/* Unlink first: finishing may close the session. */
			*link = s->next_runnable;
			s->queued = false;
			request_finish(broker, r,
				       SLABD__FINISH_REASON__FINISH_REASON_CANCELLED);
			continue;
		}
		if (r != NULL && r->cancelled && !r->finishing) {
			r->finishing = true;
			r->finish_reason = SLABD__FINISH_REASON__FINISH_REASON_CANCELLED;
		}
		if (r == NULL) {
			*link = s->next_runnable;
			s->queued = false;
			continue;
		}

		/* A session whose batch crashed runs alone to find the culprit. */
		if (s->solo && step->n_entries > 0) {
			link = &s->next_runnable;
			continue;
		}

		w = next_work(broker, s, budget);
		if (w.done) {
			*link = s->next_runnable;
			s->queued = false;
			request_finish(broker, r, r->finishing ? r->finish_reason
							       : SLABD__FINISH_REASON__FINISH_REASON_LENGTH);
			continue;
		}

		if ((uint32_t)(w.start + w.n) > s->context_limit) {
			if (s->policy == SHM_CONTEXT_SHIFT && step->n_entries == 0) {
				int rc = prepare_shift(broker, s);

				*link = s->next_runnable;
				s->queued = false;
				if (s->refeed_last) {
					s->refeed_last = false;
					s->pending_token = -1;
				}
				if (rc == -ENOSPC) {
					fail_exhausted(broker, s);
					continue;
				}
				if (rc < 0) {
					request_fail(broker, r,
						     SLABD__ERROR_CODE__ERROR_CODE_CONTEXT_FULL,
						     "context of %u positions is "
						     "full and n_keep %u leaves "
						     "nothing to drop",
						     s->context_limit, s->n_keep);
					continue;
				}
				reset_runnable_tail(broker);
				build_shift_step(broker, worker, s);
				return;
			}
			if (s->refeed_last) {
				s->refeed_last = false;
				s->pending_token = -1;
			}
			if (s->policy == SHM_CONTEXT_SHIFT) {
				/* Shift in a step of its own, later. */
				link = &s->next_runnable;
				continue;
			}
			*link = s->next_runnable;
			s->queued = false;
			request_finish(broker, r,
				       SLABD__FINISH_REASON__FINISH_REASON_CONTEXT_FULL);
			continue;
		}

		int rc = ensure_blocks(broker, s, (uint32_t)(w.start + w.n));

		*link = s->next_runnable;
		s->queued = false;
		if (rc < 0) {
			if (s->refeed_last) {
				s->refeed_last = false;
				s->pending_token = -1;
			}
			fail_exhausted(broker, s);
			continue;
		}
		add_sequence(broker, step, s, &w);
		budget -= w.n;
		if (s->solo)
			break;
	}
	reset_runnable_tail(broker);

	if (step->n_entries == 0)
		return;
	make_decode_run(broker, step);
	step->id = ++broker->next_step_id;
	message.request.n_sequences = (size_t)step->n_entries;
	message.request.sequences = message.sequence_ptrs;
	send_step(broker, worker);
}


void scheduler_run(struct broker *broker)
{
	if (broker->stopping || broker->finishing_step)
		return;
	for (int i = 0; i < broker->config.workers && broker->runnable_head; i++) {
		struct broker_worker *worker = &broker->workers[i];

		/*
		 * A worker that died since its last reply must not get a step.
		 * Workers mostly die together (a killed process group, the
		 * machine out of memory), so the pidfd is polled only for a
		 * while after a failure, sparing a system call per step.
		 */
		if (worker->state == WORKER_IDLE &&
		    engine_now_ns() - broker->last_worker_failure_ns <
			    WORKER_CHECK_AFTER_FAILURE_NS &&
		    !worker_alive(worker))
			worker_kill(worker, "process exited");
		if (worker->state == WORKER_IDLE)
			build_step(broker, worker);
	}

	/*
	 * Sessions still waiting: decode runs end after their current token,
	 * so that their sessions join batches with the waiting ones. The
	 * token they end on is kept.
	 */
	for (int i = 0; i < broker->config.workers && broker->runnable_head; i++) {
		struct broker_worker *worker = &broker->workers[i];

		if (worker->state == WORKER_BUSY && worker->step.run > 0 &&
		    !worker->step.run_stopped && !worker->step.run_yielding) {
			log_debug("worker %d: decode run of step %llu ends for "
				  "a waiting session", worker->id,
				  (unsigned long long)worker->step.id);
			worker->step.run_yielding = true;
			worker_stop_run(worker);
		}
	}
}


/* Commits a finished shift: the new block table and tokens replace the old. */
static int commit_shift(struct broker *broker, struct broker_session *s)
{
	struct shm_session_info info;
	uint32_t keep = s->n_keep < s->committed ? s->n_keep : s->committed;
	uint32_t length = s->committed - s->shift_discard;
	uint32_t blocks[s->n_shift_blocks + 1];
	int32_t *tokens = broker->scratch_tokens;
	int rc;

	rc = shm_session_get(broker->arena, &s->handle, &info);
	if (rc < 0)
		return rc;
	memcpy(tokens, info.tokens, keep * sizeof(int32_t));
	memcpy(tokens + keep, info.tokens + keep + s->shift_discard,
	       (length - keep) * sizeof(int32_t));
	for (uint32_t i = 0; i < s->n_shift_blocks; i++)
		blocks[i] = (uint32_t)s->shift_blocks[i];

	rc = shm_session_commit_shift(broker->arena, &s->handle, tokens, length,
				      blocks, s->n_shift_blocks);
	if (rc < 0)
		return rc;
	memcpy(s->blocks, s->shift_blocks, s->n_shift_blocks * sizeof(int32_t));
	s->n_blocks = s->n_shift_blocks;
	s->n_shift_blocks = 0;
	s->committed = length;
	return 0;
}


/* Commits one sequence of a finished step. */
static int commit_sequence(struct broker *broker, struct broker_session *s,
			   const struct broker_step_entry *e,
			   const int32_t *tokens)
{
	uint32_t bt = (uint32_t)broker->config.block_tokens;
	uint32_t committed_blocks = s->n_blocks - s->n_rented;
	uint32_t needed = ((uint32_t)(e->start + e->n) + bt - 1) / bt;
	uint32_t n_new = needed > committed_blocks ? needed - committed_blocks : 0;
	uint32_t new_blocks[s->n_rented + 1];
	int rc;

	if ((uint32_t)e->start < s->committed)
		return 0; /* the last position computed again, nothing new */
	/* A decode run rents ahead: blocks past the new length stay rented. */
	for (uint32_t i = 0; i < n_new; i++)
		new_blocks[i] = (uint32_t)s->blocks[committed_blocks + i];
	rc = shm_session_commit(broker->arena, &s->handle, tokens,
				(uint32_t)e->n, new_blocks, n_new);
	if (rc < 0)
		return rc;
	s->committed = (uint32_t)(e->start + e->n);
	s->n_rented -= n_new;
	return 0;
}


/* Logs a failed commit at position and fails the session's request. */
static void fail_commit(struct broker *broker, struct broker_session *s,
			int32_t position, int rc)
{
	log_error("commit of session %u/%u at position %d failed: %s",
		  s->handle.slot, s->handle.generation, (int)position,
		  shm_strerror(rc));
	if (s->request != NULL)
		request_fail(broker, s->request,
			     SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
			     "commit at position %d failed: %s", (int)position,
			     shm_strerror(rc));
}


/* Applies one sequence's result to its session and request. */
static void finish_entry(struct broker *broker, const struct broker_step_entry *e,
			 int32_t token)
{
	struct broker_session *s = e->session;
	struct broker_request *r = s->request;
	const int32_t *tokens;
	bool fed_pending = s->pending_token >= 0;
	int rc;

	s->in_step = false;
	s->crash_count = 0;
	s->solo = false;
	if (e->shift) {
		rc = commit_shift(broker, s);
		if (rc < 0) {
			log_error("commit of the shift of session %u/%u "
				  "failed: %s", s->handle.slot, s->handle.generation, shm_strerror(rc));
			session_release_rented(broker, s);
			if (r != NULL)
				request_fail(broker, r,
					     SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
					     "context shift could not be committed: %s",
					     shm_strerror(rc));
			return;
		}
		if (r != NULL)
			session_make_runnable(broker, s);
		else if (s->one_shot)
			session_close(broker, s);
		return;
	}

	tokens = fed_pending ? &s->pending_token
			     : (r != NULL ? r->prompt + r->prompt_fed : NULL);
	if (tokens == NULL) {
		/* The request went away; the prompt chunk is gone with it. */
		session_release_rented(broker, s);
		if (s->one_shot)
			session_close(broker, s);
		return;
	}
	rc = commit_sequence(broker, s, e, tokens);
	if (rc < 0) {
		session_release_rented(broker, s);
		fail_commit(broker, s, e->start, rc);
		return;
	}
	if (s->refeed_last) {
		s->refeed_last = false;
		fed_pending = true;
	} else if (!fed_pending) {
		broker->stats.tokens_prefilled += (uint64_t)e->n;
	}
	s->pending_token = -1;

	if (r == NULL) {
		if (s->one_shot)
			session_close(broker, s);
		return;
	}
	if (!fed_pending)
		r->prompt_fed += (uint32_t)e->n;
	if (r->finishing) {
		request_finish(broker, r, r->finish_reason);
		return;
	}
	if (r->is_prefill && r->prompt_fed == r->n_prompt) {
		request_finish(broker, r, SLABD__FINISH_REASON__FINISH_REASON_LENGTH);
		return;
	}
	if (r->cancelled && !e->sample) {
		request_finish(broker, r,
			       SLABD__FINISH_REASON__FINISH_REASON_CANCELLED);
		return;
	}
	if (e->sample)
		request_accept_token(broker, r, token,
				     (uint32_t)(e->start + e->n));
	else
		session_make_runnable(broker, s);
}


/*
 * Ends a decode run whose later tokens were not wanted: the session leaves
 * the step as a lost step's would, without the final reply's token.
 */
static void end_stopped_run(struct broker *broker, struct broker_session *s)
{
	s->in_step = false;
	if (s->request != NULL) {
		session_make_runnable(broker, s);
		return;
	}
	session_release_rented(broker, s);
	if (s->one_shot)
		session_close(broker, s);
}


/*
 * Takes one token of a decode run that is not the last of the run. The
 * token is committed and delivered as a step of its own would be, but the
 * session stays in the step, since the worker goes on writing its KV rows.
 * When the request ends or fails on this token, the worker is asked to
 * stop and the tokens it sends until then are dropped.
 */
static void run_token(struct broker *broker, struct broker_worker *worker,
		      int32_t token)
{
	struct broker_step *step = &worker->step;
	struct broker_step_entry *e = &step->entries[0];
	struct broker_session *s = e->session;
	int rc;

	step->run--;
	if (step->run_stopped)
		return;

	broker->finishing_step = true;
	rc = commit_sequence(broker, s, e, &s->pending_token);
	if (rc < 0) {
		fail_commit(broker, s, e->start, rc);
	} else {
		s->pending_token = -1;
		s->crash_count = 0;
		if (s->request != NULL)
			request_accept_token(broker, s->request, token,
					     (uint32_t)(e->start + 1));
	}
	broker->finishing_step = false;

	/* The request takes the token and goes on: it is the one fed next. */
	if (rc == 0 && s->request != NULL && !s->request->finishing &&
	    s->pending_token == token) {
		e->start++;
		return;
	}
	step->run_stopped = true;
	worker_stop_run(worker);
}


/*
 * Takes a reply of a decode run: the tokens it carries before its last,
 * and its last too when more replies follow. The last token of the final
 * reply is left to the caller, which finishes the step with it. Returns
 * false when the reply does not fit the run and the worker was killed.
 */
static bool run_reply(struct broker *broker, struct broker_worker *worker,
		      const Slabd__Worker__StepReply *reply)
{
	struct broker_step *step = &worker->step;
	const Slabd__Worker__SequenceResult *result =
		reply->n_results == 1 ? reply->results[0] : NULL;
	size_t tokens = result != NULL ? result->n_earlier + 1 : 0;
	bool valid = step->run > 0 && result != NULL &&
		     result->slot == step->entries[0].session->handle.slot &&
		     result->token >= 0 &&
		     tokens + (reply->more ? 1 : 0) <= (size_t)step->run;

	for (size_t i = 0; valid && i + 1 < tokens; i++)
		valid = result->earlier[i] >= 0;
	if (!valid) {
		log_error("worker %d sent a reply to step %llu that does not "
			  "fit its decode run (%d tokens left)", worker->id,
			  (unsigned long long)step->id, step->run);
		worker_kill(worker, "unexpected decode run reply");
		return false;
	}
	/* Each token of a run is a step of the model; the reply counts one. */
	broker->stats.steps += tokens - 1;
	step->sent_ns = engine_now_ns();
	for (size_t i = 0; i + 1 < tokens; i++)
		run_token(broker, worker, result->earlier[i]);
	if (reply->more)
		run_token(broker, worker, result->token);
	return true;
}


void scheduler_step_done(struct broker *broker, struct broker_worker *worker,
			 const Slabd__Worker__StepReply *reply)
{
	struct broker_step *step = &worker->step;

	broker->stats.steps++;
	log_debug("step %llu on worker %d: %llu tokens, %.3f ms computing, "
		  "%.3f ms from send to reply", (unsigned long long)step->id,
		  worker->id, (unsigned long long)step->tokens,
		  (double)reply->compute_ns / 1e6,
		  (double)(engine_now_ns() - step->sent_ns) / 1e6);
	if (reply->error != NULL && reply->error[0] != '\0') {
		log_error("worker %d rejected step %llu: %s", worker->id,
			  (unsigned long long)step->id, reply->error);
		for (int i = 0; i < step->n_entries; i++) {
			struct broker_session *s = step->entries[i].session;

			s->in_step = false;
			if (s->refeed_last) {
				s->refeed_last = false;
				s->pending_token = -1;
			}
			session_release_rented(broker, s);
			if (s->request != NULL)
				request_fail(broker, s->request,
					     SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
					     "the worker rejected the step: %s",
					     reply->error);
			else if (s->one_shot)
				session_close(broker, s);
		}
		step->n_entries = 0;
		return;
	}
	if (reply->more || step->run > 0) {
		if (!run_reply(broker, worker, reply) || reply->more)
			return;
		if (step->run_stopped) {
			end_stopped_run(broker, step->entries[0].session);
			step->n_entries = 0;
			return;
		}
	}

	for (int i = 0; i < step->n_entries; i++) {
		const struct broker_step_entry *e = &step->entries[i];
		int32_t token = -1;

		if (!e->shift && i < (int)reply->n_results &&
		    reply->results[i]->slot == e->session->handle.slot)
			token = reply->results[i]->token;
		if (e->sample && token < 0) {
			log_error("worker %d returned no token for slot %u in "
				  "step %llu", worker->id, e->session->handle.slot,
				  (unsigned long long)step->id);
			worker_kill(worker, "incomplete reply");
			return;
		}
	}
	/*
	 * Finishing an entry can close a connection whose reply queue is
	 * full, and closing it runs the scheduler. This worker is idle by
	 * now, so that run would build the worker's next step over the
	 * entries still being read here. The caller runs the scheduler once
	 * every entry is finished.
	 */
	broker->finishing_step = true;
	for (int i = 0; i < step->n_entries; i++) {
		const struct broker_step_entry *e = &step->entries[i];

		finish_entry(broker, e,
			     !e->shift && i < (int)reply->n_results
				     ? reply->results[i]->token
				     : -1);
	}
	broker->finishing_step = false;
	step->n_entries = 0;
}


void scheduler_step_lost(struct broker *broker, struct broker_worker *worker)
{
	struct broker_step *step = &worker->step;

	for (int i = step->n_entries - 1; i >= 0; i--) {
		struct broker_session *s = step->entries[i].session;
		struct broker_request *r = s->request;

		s->in_step = false;
		if (s->refeed_last) {
			s->refeed_last = false;
			s->pending_token = -1;
		}
		if (r == NULL) {
			session_release_rented(broker, s);
			if (s->one_shot)
				session_close(broker, s);
			continue;
		}
		/*
		 * A crash in a batch only makes each of its sessions suspect:
		 * they run alone next, and a session counts as poison only
		 * after crashing workers while alone.
		 */
		if (step->n_entries == 1)
			s->crash_count++;
		s->solo = true;
		if (s->crash_count >= POISON_CRASHES) {
			broker->stats.poison_steps++;
			log_error("step of session %u/%u at position %d killed "
				  "%d workers; failing its request",
				  s->handle.slot, s->handle.generation, (int)step->entries[i].start,
				  s->crash_count);
			s->crash_count = 0;
			session_release_rented(broker, s);
			request_fail(broker, r, SLABD__ERROR_CODE__ERROR_CODE_INTERNAL,
				     "the step at position %d killed %d workers "
				     "and was given up; the session keeps its "
				     "%u committed positions",
				     (int)step->entries[i].start, POISON_CRASHES,
				     s->committed);
			continue;
		}
		broker->stats.step_retries++;
		log_notice("retrying the step of session %u/%u at position %d",
			   s->handle.slot, s->handle.generation, (int)step->entries[i].start);
		make_runnable_first(broker, s);
	}
	step->n_entries = 0;
}
