/*
 * slabd-worker: started only by slabd, one process per configured worker.
 * It maps the model weights read-only and the instance's KV segment
 * read-write, sends Ready, then serves steps from its SOCK_SEQPACKET socket
 * to the broker: one StepRequest packet in, one WorkerMessage packet out.
 * It writes K and V only at the positions and blocks a step names, and
 * dies with its parent.
 */
#include "broker/log.h"
#include "proto/worker.pb-c.h"
#include "shm/shm.h"
#include "worker/engine.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

/*
 * Shortest time between two replies of a decode run; tokens computed
 * faster go out together in the next reply.
 */
#define RUN_REPLY_INTERVAL_NS 1000000

/* How long a worker polls for its next step before it blocks. */
#define POLL_BEFORE_BLOCK_NS 100000

/* Largest packet the broker sends; it sizes its steps to fit. */
#define MAX_PACKET (4u << 20)

struct worker_options {
	int fd;
	int worker_id;
	pid_t parent;
	const char *instance;
	const char *model;
	int threads;
	int max_batch;
	int max_step_tokens;
	int max_context;
	int block_tokens;
	enum engine_kv_type kv_type;
	bool fault_injection;
	int log_level;
};

struct worker {
	struct worker_options options;
	struct engine_model *model;
	struct engine *engine;
	struct engine_sampler **samplers; /* (threads) one per thread */
	struct engine_kv kv;
	struct shm_kv_map kv_map;
	float *logits;                    /* (max_batch, vocab_size) */
	struct engine_sequence *sequences; /* (max_batch) */
	int32_t *results;                 /* (max_batch) */
	uint8_t *packet;                  /* (MAX_PACKET) */
};


static long parse_number(const char *option, const char *value, long min,
			 long max)
{
	char *end;
	long result;

	errno = 0;
	result = strtol(value, &end, 10);
	if (errno != 0 || end == value || *end != '\0' || result < min ||
	    result > max) {
		fprintf(stderr, "slabd-worker: invalid value '%s' for %s\n",
			value, option);
		exit(2);
	}
	return result;
}


static void parse_options(int argc, char **argv, struct worker_options *o)
{
	static const struct option long_options[] = {
		{ "fd", required_argument, NULL, 'f' },
		{ "worker-id", required_argument, NULL, 'w' },
		{ "parent", required_argument, NULL, 'P' },
		{ "instance", required_argument, NULL, 'i' },
		{ "model", required_argument, NULL, 'm' },
		{ "threads", required_argument, NULL, 't' },
		{ "max-batch", required_argument, NULL, 'b' },
		{ "max-step-tokens", required_argument, NULL, 's' },
		{ "max-context", required_argument, NULL, 'c' },
		{ "block-tokens", required_argument, NULL, 'k' },
		{ "kv-type", required_argument, NULL, 'y' },
		{ "fault-injection", no_argument, NULL, 'F' },
		{ "log-level", required_argument, NULL, 'l' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	*o = (struct worker_options){
		.fd = -1,
		.threads = 1,
		.max_batch = 16,
		.max_step_tokens = 512,
		.block_tokens = SHM_DEFAULT_BLOCK_TOKENS,
		.log_level = LOG_LEVEL_INFO,
	};
	while ((c = getopt_long(argc, argv, "", long_options, NULL)) != -1) {
		switch (c) {
		case 'f': o->fd = (int)parse_number("--fd", optarg, 0, 1 << 20); break;
		case 'w': o->worker_id = (int)parse_number("--worker-id", optarg, 0, 1 << 20); break;
		case 'P': o->parent = (pid_t)parse_number("--parent", optarg, 1, 1L << 30); break;
		case 'i': o->instance = optarg; break;
		case 'm': o->model = optarg; break;
		case 't': o->threads = (int)parse_number("--threads", optarg, 1, 1024); break;
		case 'b': o->max_batch = (int)parse_number("--max-batch", optarg, 1, 65536); break;
		case 's': o->max_step_tokens = (int)parse_number("--max-step-tokens", optarg, 1, 1 << 20); break;
		case 'c': o->max_context = (int)parse_number("--max-context", optarg, 1, ENGINE_MAX_SEQ_LEN); break;
		case 'k': o->block_tokens = (int)parse_number("--block-tokens", optarg, 1, 65536); break;
		case 'y': o->kv_type = strcmp(optarg, "f16") == 0 ? ENGINE_KV_F16 : ENGINE_KV_F32; break;
		case 'F': o->fault_injection = true; break;
		case 'l': o->log_level = log_parse_level(optarg); break;
		default:
			fprintf(stderr, "slabd-worker: started with invalid "
				"options; it is started only by slabd\n");
			exit(2);
		}
	}
	if (o->fd < 0 || o->instance == NULL || o->model == NULL ||
	    o->max_context == 0) {
		fprintf(stderr, "slabd-worker: --fd, --instance, --model and "
			"--max-context are required; it is started only by "
			"slabd\n");
		exit(2);
	}
	if (o->log_level < 0)
		o->log_level = LOG_LEVEL_INFO;
}


/* Packs and sends one message as one packet. Returns 0 or -errno. */
static int send_message(struct worker *w, const Slabd__Worker__WorkerMessage *message)
{
	size_t size = slabd__worker__worker_message__get_packed_size(message);

	if (size > MAX_PACKET)
		return -EMSGSIZE;
	slabd__worker__worker_message__pack(message, w->packet);
	while (send(w->options.fd, w->packet, size, MSG_NOSIGNAL) < 0)
		if (errno != EINTR)
			return -errno;
	return 0;
}


static void send_ready(struct worker *w, const char *error)
{
	Slabd__Worker__WorkerMessage message = SLABD__WORKER__WORKER_MESSAGE__INIT;
	Slabd__Worker__Ready ready = SLABD__WORKER__READY__INIT;

	ready.pid = (int32_t)getpid();
	ready.error = (char *)(error != NULL ? error : "");
	if (w->model != NULL) {
		const struct engine_shape *shape = engine_model_shape(w->model);

		ready.dim = shape->dim;
		ready.n_layers = shape->n_layers;
		ready.n_kv_heads = shape->n_kv_heads;
		ready.vocab_size = shape->vocab_size;
	}
	ready.isa = (char *)engine_kernel_isa();
	message.kind_case = SLABD__WORKER__WORKER_MESSAGE__KIND_READY;
	message.ready = &ready;
	send_message(w, &message);
}


/* Loads the model, maps the KV segment and allocates everything a step needs. */
static int start(struct worker *w, char *error, size_t error_size)
{
	const struct worker_options *o = &w->options;
	struct engine_options engine_options = {
		.threads = o->threads,
		.max_batch = o->max_batch,
		.max_step_tokens = o->max_step_tokens,
		.max_context = o->max_context,
	};
	struct engine_error err;
	struct shm_mismatch mismatch = { 0 };
	const struct engine_shape *shape;
	int rc;

	rc = engine_model_open(o->model, &w->model, &err);
	if (rc < 0) {
		snprintf(error, error_size, "%s", err.message);
		return rc;
	}
	shape = engine_model_shape(w->model);

	struct shm_shape kv_shape = {
		.n_layers = (uint32_t)shape->n_layers,
		.n_kv_heads = (uint32_t)shape->n_kv_heads,
		.head_size = (uint32_t)engine_head_size(shape),
		.kv_type = o->kv_type == ENGINE_KV_F16 ? SHM_KV_F16 : SHM_KV_F32,
		.max_context = (uint32_t)o->max_context,
	};

	rc = shm_kv_open(o->instance, &kv_shape, (uint32_t)o->block_tokens,
			 &w->kv_map, &mismatch);
	if (rc < 0) {
		snprintf(error, error_size,
			 "cannot map the KV segment of instance '%s': %s "
			 "(field %s: expected %llu, found %llu)",
			 o->instance, shm_strerror(rc),
			 mismatch.field ? mismatch.field : "none",
			 (unsigned long long)mismatch.expected,
			 (unsigned long long)mismatch.found);
		return rc;
	}
	w->kv = (struct engine_kv){
		.base = w->kv_map.blocks,
		.n_blocks = w->kv_map.n_blocks,
		.block_tokens = w->kv_map.block_tokens,
		.block_stride = w->kv_map.block_stride,
		.type = o->kv_type,
	};

	rc = engine_create(w->model, &engine_options, &w->engine, &err);
	if (rc < 0) {
		snprintf(error, error_size, "%s", err.message);
		return rc;
	}
	w->samplers = calloc((size_t)o->threads, sizeof(*w->samplers));
	for (int i = 0; rc == 0 && w->samplers != NULL && i < o->threads; i++)
		rc = engine_sampler_create(shape->vocab_size, &w->samplers[i]);
	w->logits = malloc((size_t)o->max_batch * (size_t)shape->vocab_size *
			   sizeof(float));
	w->sequences = calloc((size_t)o->max_batch, sizeof(*w->sequences));
	w->results = calloc((size_t)o->max_batch, sizeof(*w->results));
	w->packet = malloc(MAX_PACKET);
	if (rc < 0 || w->samplers == NULL || w->logits == NULL ||
	    w->sequences == NULL ||
	    w->results == NULL || w->packet == NULL) {
		snprintf(error, error_size, "out of memory for step buffers");
		return -ENOMEM;
	}
	return 0;
}


/* Acts out an injected fault; returns only for FAULT_NONE. */
static void act_out_fault(struct worker *w, Slabd__Worker__Fault fault)
{
	static const uint8_t garbage[] = { 0xff, 0xff, 0xff, 0xff, 0x0f };

	switch (fault) {
	case SLABD__WORKER__FAULT__FAULT_CRASH:
		log_notice("injected fault: crashing");
		abort();
	case SLABD__WORKER__FAULT__FAULT_HANG:
		log_notice("injected fault: hanging");
		for (;;)
			pause();
	case SLABD__WORKER__FAULT__FAULT_MALFORMED_REPLY:
		log_notice("injected fault: sending a malformed reply");
		send(w->options.fd, garbage, sizeof(garbage), MSG_NOSIGNAL);
		for (;;)
			pause();
	default:
		return;
	}
}


/* The sequences of a step that sample a token, split among threads. */
struct sample_task {
	struct worker *w;
	const Slabd__Worker__StepRequest *step;
};


/*
 * Samples the tokens of every nth sequence from ith on. A sequence's token
 * depends only on its logits, settings, history and position, so the
 * split does not change any result.
 */
static void sample_task_run(void *arg, int ith, int nth)
{
	struct sample_task *task = arg;
	struct worker *w = task->w;
	size_t vocab = (size_t)engine_model_shape(w->model)->vocab_size;

	for (size_t i = (size_t)ith; i < task->step->n_sequences; i += (size_t)nth) {
		const Slabd__Worker__Sequence *s = task->step->sequences[i];
		const Slabd__Worker__Sampling *p = s->sampling;

		w->results[i] = -1;
		if (!s->sample)
			continue;

		struct engine_sampling sampling = {
			.temperature = p->temperature,
			.top_k = p->top_k,
			.top_p = p->top_p,
			.min_p = p->min_p,
			.repetition_penalty = p->repetition_penalty,
			.seed = p->seed,
		};

		w->results[i] = engine_sample(w->samplers[ith], &sampling,
					      w->logits + i * vocab, s->history,
					      s->n_history,
					      (uint64_t)s->start + s->n_tokens);
	}
}


/* Runs the sequences of a step and samples where asked. */
static int run_sequences(struct worker *w, const Slabd__Worker__StepRequest *step,
			 struct engine_error *err)
{
	int32_t vocab = engine_model_shape(w->model)->vocab_size;
	size_t n = step->n_sequences;
	int rc;

	if (n == 0 || n > (size_t)w->options.max_batch) {
		snprintf(err->message, sizeof(err->message),
			 "step of %zu sequences, expected 1 to %d", n,
			 w->options.max_batch);
		return -EINVAL;
	}
	for (size_t i = 0; i < n; i++) {
		const Slabd__Worker__Sequence *s = step->sequences[i];

		w->sequences[i] = (struct engine_sequence){
			.tokens = s->tokens,
			.n = (int32_t)s->n_tokens,
			.start = s->start,
			.blocks = s->blocks,
			.n_blocks = (int32_t)s->n_blocks,
			.logits = s->sample ? w->logits + i * (size_t)vocab : NULL,
		};
		if (s->sample && s->sampling == NULL) {
			snprintf(err->message, sizeof(err->message),
				 "sequence of slot %u asks for a token without "
				 "sampling settings", s->slot);
			return -EINVAL;
		}
	}

	rc = engine_step(w->engine, &w->kv, w->sequences, (int)n, err);
	if (rc < 0)
		return rc;

	struct sample_task task = { .w = w, .step = step };

	/* One sequence samples in place, without waking the other threads. */
	if (n > 1)
		engine_run_on_threads(w->engine, sample_task_run, &task);
	else
		sample_task_run(&task, 0, 1);
	return 0;
}


/*
 * Sends the reply to step: its results, or err when rc is negative. A
 * decode run's reply also carries the n_earlier tokens sampled before the
 * sequence's result.
 */
static void send_reply(struct worker *w, const Slabd__Worker__StepRequest *step,
		       int rc, const struct engine_error *err,
		       uint64_t compute_ns, bool more, int32_t *earlier,
		       size_t n_earlier)
{
	Slabd__Worker__WorkerMessage message = SLABD__WORKER__WORKER_MESSAGE__INIT;
	Slabd__Worker__StepReply reply = SLABD__WORKER__STEP_REPLY__INIT;
	Slabd__Worker__SequenceResult results[step->n_sequences + 1];
	Slabd__Worker__SequenceResult *result_ptrs[step->n_sequences + 1];

	reply.step_id = step->step_id;
	reply.compute_ns = compute_ns;
	reply.more = more;
	if (rc < 0) {
		reply.error = (char *)err->message;
		log_warning("step %llu rejected: %s",
			    (unsigned long long)step->step_id, err->message);
	} else if (step->shift == NULL) {
		for (size_t i = 0; i < step->n_sequences; i++) {
			slabd__worker__sequence_result__init(&results[i]);
			results[i].slot = step->sequences[i]->slot;
			results[i].token = w->results[i];
			result_ptrs[i] = &results[i];
		}
		reply.n_results = step->n_sequences;
		reply.results = result_ptrs;
		results[0].earlier = earlier;
		results[0].n_earlier = n_earlier;
	}
	message.kind_case = SLABD__WORKER__WORKER_MESSAGE__KIND_REPLY;
	message.reply = &reply;
	rc = send_message(w, &message);
	if (rc < 0) {
		log_error("send of the reply to step %llu failed: %s",
			  (unsigned long long)step->step_id, strerror(-rc));
		exit(1);
	}
}


/*
 * Tokens the step requests in a run: the run field of its only
 * sequence when that sequence feeds one token and samples, else 1. A run
 * never goes past the positions its blocks cover or the context.
 */
static int run_length(const struct worker *w,
		      const Slabd__Worker__StepRequest *step)
{
	const Slabd__Worker__Sequence *s;
	int64_t covered, run;

	if (step->shift != NULL || step->n_sequences != 1)
		return 1;
	s = step->sequences[0];
	if (s->run <= 1 || s->n_tokens != 1 || !s->sample || s->start < 0)
		return 1;
	run = s->run;
	covered = (int64_t)s->n_blocks * w->kv.block_tokens - s->start;
	if (run > covered)
		run = covered;
	if (run > (int64_t)w->options.max_context - s->start)
		run = (int64_t)w->options.max_context - s->start;
	return run > 1 ? (int)run : 1;
}


/*
 * True when the broker asked to end the run of step_id. Called between
 * the tokens of a run, when the broker sends nothing but such requests.
 */
static bool run_stop_requested(struct worker *w, uint64_t step_id)
{
	uint8_t packet[256];
	bool stop = false;
	ssize_t n;

	while ((n = recv(w->options.fd, packet, sizeof(packet),
			 MSG_DONTWAIT)) > 0) {
		Slabd__Worker__StepRequest *request =
			slabd__worker__step_request__unpack(NULL, (size_t)n,
							    packet);

		if (request == NULL || !request->stop_run) {
			log_error("the broker sent a step of %zd bytes during "
				  "the decode run of step %llu",
				  n, (unsigned long long)step_id);
			exit(1);
		}
		stop |= request->step_id == step_id;
		slabd__worker__step_request__free_unpacked(request, NULL);
	}
	return stop;
}


/*
 * Runs a decode run: the step's sequence, then each sampled token fed at
 * the next position, with one reply per token. The step stays as the
 * broker sent it; copies of its sequence carry the advancing position,
 * token and repetition history.
 */
static void serve_run(struct worker *w, const Slabd__Worker__StepRequest *step,
		      int run)
{
	const Slabd__Worker__Sequence *first = step->sequences[0];
	Slabd__Worker__Sequence sequence = *first;
	Slabd__Worker__Sequence *sequences[1] = { &sequence };
	Slabd__Worker__StepRequest current = *step;
	int32_t history[ENGINE_PENALTY_WINDOW];
	size_t n_history = first->n_history < ENGINE_PENALTY_WINDOW
				   ? first->n_history
				   : ENGINE_PENALTY_WINDOW;
	int32_t token = first->tokens[0];

	if (n_history > 0)
		memcpy(history, first->history + (first->n_history - n_history),
		       n_history * sizeof(int32_t));
	sequence.tokens = &token;
	sequence.history = history;
	sequence.n_history = n_history;
	current.sequences = sequences;

	int32_t earlier[run];
	size_t n_earlier = 0;
	uint64_t replied = engine_now_ns();
	uint64_t compute_ns = 0;

	for (int k = 1;; k++) {
		struct engine_error err = { .message = "" };
		uint64_t started = engine_now_ns();
		int rc = run_sequences(w, &current, &err);
		bool more = rc == 0 && k < run &&
			    !engine_is_end_token(w->results[0]);
		uint64_t now = engine_now_ns();
		bool reply_due = now - replied >= RUN_REPLY_INTERVAL_NS;

		/*
		 * Tokens that come fast wait for the next reply: each reply
		 * costs a system call here and a wake-up of the broker. A
		 * request to stop is looked for when a reply is due.
		 */
		if (more && reply_due)
			more = !run_stop_requested(w, step->step_id);
		compute_ns += now - started;
		if (!more || reply_due) {
			send_reply(w, &current, rc, &err, compute_ns, more,
				   earlier, rc < 0 ? 0 : n_earlier);
			replied = now;
			compute_ns = 0;
			n_earlier = 0;
		} else {
			earlier[n_earlier++] = w->results[0];
		}
		if (!more)
			return;

		/* The sampled token is fed next; a history keeps its window. */
		token = w->results[0];
		sequence.start++;
		if (first->n_history > 0) {
			if (n_history == ENGINE_PENALTY_WINDOW) {
				memmove(history, history + 1,
					(n_history - 1) * sizeof(int32_t));
				n_history--;
			}
			history[n_history++] = token;
			sequence.n_history = n_history;
		}
	}
}


static void serve_step(struct worker *w, const Slabd__Worker__StepRequest *step)
{
	struct engine_error err = { .message = "" };
	uint64_t started = engine_now_ns();
	int run, rc;

	if (step->stop_run)
		return; /* the run it names has ended already */
	if (w->options.fault_injection)
		act_out_fault(w, step->fault);

	run = run_length(w, step);
	if (run > 1) {
		serve_run(w, step, run);
		return;
	}
	if (step->shift != NULL) {
		const Slabd__Worker__Shift *shift = step->shift;

		rc = engine_kv_shift(w->engine, &w->kv, shift->source_blocks,
				     (int32_t)shift->n_source_blocks,
				     shift->target_blocks,
				     (int32_t)shift->n_target_blocks,
				     shift->n_keep, shift->n_discard,
				     shift->length, &err);
	} else {
		rc = run_sequences(w, step, &err);
	}
	send_reply(w, step, rc, &err, engine_now_ns() - started, false, NULL,
		   0);
}


/*
 * Receives the next step. A decoding session's next step follows the
 * reply within tens of microseconds, so the worker polls for it briefly
 * before it blocks: a blocking receive adds a sleep and a wake-up to every
 * token. Returns what recv returns.
 */
static ssize_t receive_step(struct worker *w)
{
	uint64_t until = engine_now_ns() + POLL_BEFORE_BLOCK_NS;

	do {
		ssize_t n = recv(w->options.fd, w->packet, MAX_PACKET,
				 MSG_DONTWAIT);

		if (n >= 0 || (errno != EAGAIN && errno != EINTR))
			return n;
	} while (engine_now_ns() < until);
	return recv(w->options.fd, w->packet, MAX_PACKET, 0);
}


int main(int argc, char **argv)
{
	struct worker w = { 0 };
	char role[32];
	char error[600] = "";

	parse_options(argc, argv, &w.options);
	snprintf(role, sizeof(role), "worker %d", w.options.worker_id);
	log_init("slabd-worker", role, w.options.log_level);

	/*
	 * Die with the broker, and notice if it died before we got here.
	 * SIGINT and SIGTERM sent to the whole process group (Ctrl-C, or a
	 * supervisor stopping the service) are the broker's to handle: it
	 * drains, then closes the socket, and the worker exits on that.
	 */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	signal(SIGINT, SIG_IGN);
	signal(SIGTERM, SIG_IGN);
	if (w.options.parent != 0 && getppid() != w.options.parent)
		return 1;

	if (start(&w, error, sizeof(error)) < 0) {
		log_error("cannot start: %s", error);
		if (w.packet == NULL)
			w.packet = malloc(MAX_PACKET);
		if (w.packet != NULL)
			send_ready(&w, error);
		return 1;
	}
	send_ready(&w, NULL);
	log_info("ready: model %s, threads: %d, kernels %s", w.options.model,
		 w.options.threads, engine_kernel_isa());

	for (;;) {
		ssize_t n = receive_step(&w);
		Slabd__Worker__StepRequest *step;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			log_error("recv from the broker failed: %s",
				  strerror(errno));
			return 1;
		}
		if (n == 0)
			break; /* The broker closed the socket: shut down. */

		step = slabd__worker__step_request__unpack(NULL, (size_t)n,
							   w.packet);
		if (step == NULL) {
			log_error("malformed step request of %zd bytes from "
				  "the broker", n);
			return 1;
		}
		serve_step(&w, step);
		slabd__worker__step_request__free_unpacked(step, NULL);
	}

	for (int i = 0; w.samplers != NULL && i < w.options.threads; i++)
		engine_sampler_destroy(w.samplers[i]);
	free(w.samplers);
	engine_destroy(w.engine);
	shm_kv_close(&w.kv_map);
	engine_model_close(w.model);
	free(w.logits);
	free(w.sequences);
	free(w.results);
	free(w.packet);
	return 0;
}
