/*
 * slabd: the broker. Loads the tokenizer and the model's shape, creates (or
 * reattaches to) the instance's shared memory, starts the workers, and once
 * every worker is ready listens on its Unix socket and serves clients until
 * SIGTERM or SIGINT.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

/* Period of the housekeeping tick: idle sessions, watchdog, drain. */
#define TICK_NS 200000000ull


static void on_signal(struct loop_op *op, int result);
static void on_tick(struct loop_op *op, int result);


static void begin_drain(struct broker *broker, const char *why)
{
	if (broker->draining)
		return;
	log_notice("%s: draining for up to %d s", why,
		   broker->config.drain_seconds);
	sd_notify(0, "STOPPING=1");
	broker->draining = true;
	broker->drain_deadline_ns = engine_now_ns() +
				    (uint64_t)broker->config.drain_seconds *
					    1000000000ull;
	broker_stop_listening(broker);
}


static void on_signal(struct loop_op *op, int result)
{
	struct broker *broker = op->data;
	struct signalfd_siginfo info;

	if (result < 0 && result != -ECANCELED) {
		log_error("poll of the signal fd failed: %s", strerror(-result));
		return;
	}
	while (read(broker->signal_fd, &info, sizeof(info)) ==
	       (ssize_t)sizeof(info)) {
		if (info.ssi_signo == SIGTERM || info.ssi_signo == SIGINT)
			begin_drain(broker, info.ssi_signo == SIGTERM
						    ? "SIGTERM received"
						    : "SIGINT received");
	}
	if (!broker->stopping)
		loop_poll(broker->loop, &broker->signal_op, broker->signal_fd);
}


/* Whether any step is still running on a worker. */
static bool steps_in_flight(const struct broker *broker)
{
	for (int i = 0; i < broker->config.workers; i++)
		if (broker->workers[i].state == WORKER_BUSY)
			return true;
	return false;
}


static void on_tick(struct loop_op *op, int result)
{
	struct broker *broker = op->data;
	static uint64_t last_status_ns;
	uint64_t now = engine_now_ns();

	(void)result;
	if (broker->stopping)
		return;
	session_expire_idle(broker);
	workers_check_deadlines(broker);
	connections_check_stalled(broker);

	if (broker->ready) {
		sd_notify(0, "WATCHDOG=1");
		if (now - last_status_ns > 1000000000ull) {
			int open = 0;

			for (int i = 0; i < broker->config.max_sessions; i++)
				open += broker->sessions[i].in_use;
			sd_notifyf(0, "STATUS=%d sessions open, %d of %d workers live%s",
				   open, broker->live_workers,
				   broker->config.workers,
				   broker->degraded ? ", degraded" : "");
			last_status_ns = now;
		}
	}

	if (broker->draining) {
		bool busy = steps_in_flight(broker);

		if (busy && now >= broker->drain_deadline_ns) {
			log_warning("drain deadline passed with steps in "
				    "flight; stopping anyway");
			busy = false;
		}
		if (!busy) {
			/* End every request that is still running. */
			for (int i = 0; i < broker->config.max_sessions; i++) {
				struct broker_session *s = &broker->sessions[i];

				if (s->in_use && s->request != NULL)
					request_finish(broker, s->request,
						       SLABD__FINISH_REASON__FINISH_REASON_CANCELLED);
			}
			broker->stopping = true;
			return;
		}
	}
	loop_timeout(broker->loop, &broker->tick_op, TICK_NS);
}


/* SIGTERM and SIGINT, blocked from the start and read from a signalfd. */
static void termination_signals(sigset_t *mask)
{
	sigemptyset(mask);
	sigaddset(mask, SIGTERM);
	sigaddset(mask, SIGINT);
}


static int setup_signals(struct broker *broker)
{
	sigset_t mask;

	termination_signals(&mask);
	broker->signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (broker->signal_fd < 0) {
		log_error("signalfd failed: %s", strerror(errno));
		return -errno;
	}
	broker->signal_op = (struct loop_op){ .callback = on_signal,
					      .data = broker };
	return loop_poll(broker->loop, &broker->signal_op, broker->signal_fd);
}


/* Prints what differs between the segments found and this configuration. */
static void report_mismatch(const struct broker *broker,
			    const struct shm_config *expect)
{
	struct shm_segment_info info;
	struct shm_mismatch mismatch = { 0 };
	struct shm_mismatch diffs[8];
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	size_t n;
	int rc;

	shm_segment_names(broker->config.instance, kv_name, ctl_name);
	rc = shm_arena_describe(broker->config.instance, &info, &mismatch);
	if (rc < 0) {
		log_error("shared memory segments %s and %s exist but cannot "
			  "be used: %s (field %s: expected %llu, found %llu); "
			  "remove them with 'slabd --instance %s "
			  "--remove-segments' if no other slabd uses them",
			  kv_name, ctl_name, shm_strerror(rc),
			  mismatch.field ? mismatch.field : "unknown",
			  (unsigned long long)mismatch.expected,
			  (unsigned long long)mismatch.found,
			  broker->config.instance);
		return;
	}
	n = shm_config_compare(expect, &info.config, diffs, 8);
	for (size_t i = 0; i < n && i < 8; i++)
		log_error("segment %s was made for %s %llu, this configuration "
			  "needs %llu",
			  ctl_name, diffs[i].field,
			  (unsigned long long)diffs[i].found,
			  (unsigned long long)diffs[i].expected);
	log_error("shared memory segments %s and %s belong to another "
		  "configuration (pid %d created them) and were left alone; "
		  "remove them with 'slabd --instance %s --remove-segments' "
		  "or start with the same model and memory options",
		  kv_name, ctl_name, (int)info.owner_pid,
		  broker->config.instance);
}


/* Creates the instance's segments, or reattaches to existing ones. */
static int setup_arena(struct broker *broker)
{
	struct shm_config config = {
		.shape = broker->kv_shape,
		.block_tokens = (uint32_t)broker->config.block_tokens,
		.max_sessions = (uint32_t)broker->config.max_sessions,
	};
	uint64_t unused = 0;
	struct shm_repair repair;
	struct shm_mismatch mismatch = { 0 };
	int rc;

	rc = shm_budget_blocks(broker->config.kv_memory, &broker->kv_shape,
			       config.block_tokens, &config.n_blocks, &unused);
	if (rc == -ERANGE) {
		log_error("--kv-memory %llu bytes is too large: it makes more "
			  "than %llu KV blocks; lower --kv-memory",
			  (unsigned long long)broker->config.kv_memory,
			  (unsigned long long)SHM_MAX_BLOCKS);
		return rc;
	}
	if (rc < 0) {
		log_error("--kv-memory %llu bytes cannot hold one KV block of "
			  "%llu bytes for this model: %s; raise --kv-memory",
			  (unsigned long long)broker->config.kv_memory,
			  (unsigned long long)shm_block_bytes(&broker->kv_shape,
							      config.block_tokens),
			  shm_strerror(rc));
		return rc;
	}
	log_info("KV pool: %u blocks of %u positions (%llu bytes each); "
		 "%llu bytes of --kv-memory left unused by rounding down to "
		 "whole blocks",
		 config.n_blocks, config.block_tokens,
		 (unsigned long long)shm_block_bytes(&broker->kv_shape,
						     config.block_tokens),
		 (unsigned long long)unused);

	rc = shm_arena_create(broker->config.instance, &config, &broker->arena);
	if (rc == 0)
		return 0;
	if (rc != -EEXIST) {
		log_error("cannot create the shared memory of instance '%s': %s",
			  broker->config.instance, shm_strerror(rc));
		return rc;
	}

	rc = shm_arena_attach(broker->config.instance, &config, &broker->arena,
			      &repair, &mismatch);
	if (rc == -EBUSY) {
		log_error("instance '%s' is in use by another running slabd; "
			  "choose another --instance",
			  broker->config.instance);
		return rc;
	}
	if (rc < 0) {
		report_mismatch(broker, &config);
		return rc;
	}
	log_notice("reattached to the shared memory of instance '%s': %u "
		   "sessions recovered, %u interrupted closes finished, %u "
		   "sessions dropped, %u blocks returned, %u free-list "
		   "entries repaired",
		   broker->config.instance, repair.sessions_open,
		   repair.sessions_closed, repair.sessions_dropped,
		   repair.blocks_uncommitted, repair.free_list_fixed);
	return 0;
}


static int load_model(struct broker *broker)
{
	struct engine_error err;
	int max_context;

	if (engine_model_open(broker->config.model, &broker->model, &err) < 0) {
		log_error("%s", err.message);
		return -1;
	}
	broker->shape = *engine_model_shape(broker->model);
	if (engine_tokenizer_open(broker->config.tokenizer,
				  broker->shape.vocab_size,
				  &broker->tokenizer, &err) < 0) {
		log_error("%s", err.message);
		return -1;
	}

	max_context = broker->config.max_context;
	if (max_context == 0)
		max_context = broker->shape.seq_len;
	if (max_context > broker->shape.seq_len)
		log_warning("--max-context %d is beyond the %d positions the "
			    "model was trained on; text past position %d may "
			    "degrade", max_context, (int)broker->shape.seq_len,
			    (int)broker->shape.seq_len);
	broker->config.max_context = max_context;
	broker->kv_shape = (struct shm_shape){
		.n_layers = (uint32_t)broker->shape.n_layers,
		.n_kv_heads = (uint32_t)broker->shape.n_kv_heads,
		.head_size = (uint32_t)engine_head_size(&broker->shape),
		.kv_type = broker->config.kv_type == ENGINE_KV_F16 ? SHM_KV_F16
								   : SHM_KV_F32,
		.max_context = (uint32_t)max_context,
	};
	broker->max_step_tokens = broker->config.prefill_chunk +
				  broker->config.max_batch;
	return 0;
}


static int remove_segments(const char *instance)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	int rc = shm_segments_unlink(instance);

	shm_segment_names(instance, kv_name, ctl_name);
	if (rc == -ENOENT) {
		fprintf(stderr, "slabd: no shared memory segments of instance "
			"'%s' (%s, %s)\n", instance, kv_name, ctl_name);
		return 0;
	}
	if (rc < 0) {
		fprintf(stderr, "slabd: cannot remove %s and %s: %s\n", kv_name,
			ctl_name, strerror(-rc));
		return 1;
	}
	fprintf(stderr, "slabd: removed %s and %s\n", kv_name, ctl_name);
	return 0;
}


static void broker_free(struct broker *broker)
{
	for (int i = 0; broker->sessions != NULL &&
			i < broker->config.max_sessions; i++) {
		free(broker->sessions[i].blocks);
		free(broker->sessions[i].shift_blocks);
	}
	free(broker->sessions);
	free(broker->scratch_tokens);
	if (broker->signal_fd > 0)
		close(broker->signal_fd);
	engine_tokenizer_close(broker->tokenizer);
	engine_model_close(broker->model);
	loop_destroy(broker->loop);
	broker_unlock_socket(broker);
}


int main(int argc, char **argv)
{
	static struct broker broker;
	int fallback = 0;
	int rc;

	/*
	 * Block termination signals before anything is created, so that one
	 * arriving during start-up waits for the signalfd and still ends in a
	 * clean shutdown that removes the shared memory.
	 */
	sigset_t termination;

	termination_signals(&termination);
	sigprocmask(SIG_BLOCK, &termination, NULL);
	signal(SIGPIPE, SIG_IGN);

	rc = broker_parse_options(argc, argv, &broker.config);
	if (rc != 0)
		return rc < 0 ? 0 : rc; /* --help returns -1 */
	log_init("slabd", "broker", broker.config.log_level);
	if (broker.config.model == NULL) /* --remove-segments */
		return remove_segments(broker.config.instance);

	broker.started_ns = engine_now_ns();
	broker.listen_fd = -1;
	broker.signal_fd = -1;
	broker.socket_lock_fd = -1;
	if (load_model(&broker) < 0 || broker_lock_socket(&broker) < 0)
		return 1;

	rc = loop_create(broker.config.force_epoll, &broker.loop, &fallback);
	if (rc < 0) {
		log_error("cannot create the event loop: %s", strerror(-rc));
		broker_free(&broker);
		return 1;
	}
	if (fallback != 0)
		log_notice("io_uring is unavailable (%s); using epoll",
			   strerror(-fallback));
	log_info("event loop: %s", loop_backend_name(broker.loop));

	if (setup_arena(&broker) < 0) {
		broker_free(&broker);
		return 1;
	}
	broker.sessions = calloc((size_t)broker.config.max_sessions,
				 sizeof(*broker.sessions));
	broker.scratch_tokens = calloc((size_t)broker.config.max_context + 1,
				       sizeof(int32_t));
	if (broker.sessions == NULL || broker.scratch_tokens == NULL ||
	    setup_signals(&broker) < 0) {
		shm_arena_close(broker.arena);
		broker_free(&broker);
		return 1;
	}
	session_attach_existing(&broker);

	rc = workers_start(&broker);
	if (rc < 0) {
		workers_stop(&broker);
		shm_arena_close(broker.arena);
		shm_segments_unlink(broker.config.instance);
		broker_free(&broker);
		return 1;
	}
	broker.tick_op = (struct loop_op){ .callback = on_tick, .data = &broker };
	loop_timeout(broker.loop, &broker.tick_op, TICK_NS);

	while (!broker.stopping) {
		rc = loop_run(broker.loop, -1);
		if (rc < 0 && rc != -EINTR) {
			log_error("event loop failed: %s", strerror(-rc));
			broker.exit_status = 1;
			break;
		}
	}

	broker_stop_listening(&broker);
	for (struct broker_connection *c = broker.connections; c != NULL;
	     c = c->next)
		connection_close(c);
	workers_stop(&broker);
	loop_cancel(broker.loop, &broker.signal_op);
	loop_cancel(broker.loop, &broker.tick_op);
	/* Let the cancelled operations complete before freeing their owners. */
	for (int i = 0; i < 100 && loop_pending(broker.loop) > 0; i++)
		loop_run(broker.loop, 10);

	workers_free(&broker);
	shm_arena_close(broker.arena);
	if (broker.exit_status == 0) {
		shm_segments_unlink(broker.config.instance);
		log_notice("stopped cleanly; shared memory removed");
	}
	broker_free(&broker);
	return broker.exit_status;
}
