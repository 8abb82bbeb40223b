/*
 * Worker processes: spawning (fork + exec of slabd-worker with one end of a
 * SOCK_SEQPACKET socketpair), the Ready handshake, sending steps and
 * receiving replies, and noticing death at once through the worker's pidfd
 * and end of file on its socket. A worker that dies, sends a malformed
 * reply or misses its step deadline is killed and replaced, and the step it
 * held goes back to the scheduler to run again.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define RECV_BUFFER_BYTES 65536
/* Window over which --crash-loop-restarts counts worker restarts. */
#define CRASH_LOOP_WINDOW_NS (60ull * 1000000000ull)
#define MAX_BACKOFF_MS 10000

static void on_worker_recv(struct loop_op *op, int result);
static void on_worker_send(struct loop_op *op, int result);
static void on_worker_exit(struct loop_op *op, int result);
static void on_worker_restart(struct loop_op *op, int result);
static void worker_failed(struct broker_worker *worker, const char *reason);


/* Operations of a worker still pending in the loop. */
static int worker_ops_pending(const struct broker_worker *worker)
{
	return worker->recv_op.pending + worker->send_op.pending +
	       worker->exit_op.pending;
}


static void set_buffer_size(int fd)
{
	int size = (int)BROKER_MAX_PACKET + 65536;

	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}


/*
 * Starts one worker process. The child keeps only its socket (as fd 3) and
 * the standard streams; every other descriptor is close-on-exec.
 */
static int worker_spawn(struct broker_worker *worker)
{
	struct broker *broker = worker->broker;
	const struct broker_config *c = &broker->config;
	char fd_arg[16], id_arg[16], parent_arg[24], threads_arg[16];
	char batch_arg[16], step_arg[16], context_arg[16], block_arg[16];
	const char *log_names[] = { "error", "warning", "notice", "info", "debug" };
	int sv[2];
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		log_error("socketpair for worker %d failed: %s", worker->id,
			  strerror(errno));
		return -errno;
	}
	set_buffer_size(sv[0]);
	set_buffer_size(sv[1]);

	snprintf(fd_arg, sizeof(fd_arg), "%d", 3);
	snprintf(id_arg, sizeof(id_arg), "%d", worker->id);
	snprintf(parent_arg, sizeof(parent_arg), "%d", (int)getpid());
	snprintf(threads_arg, sizeof(threads_arg), "%d", c->threads_per_worker);
	snprintf(batch_arg, sizeof(batch_arg), "%d", c->max_batch);
	snprintf(step_arg, sizeof(step_arg), "%d", broker->max_step_tokens);
	snprintf(context_arg, sizeof(context_arg), "%d", c->max_context);
	snprintf(block_arg, sizeof(block_arg), "%d", c->block_tokens);
	const char *argv[] = {
		c->worker_path, "--fd", fd_arg, "--worker-id", id_arg,
		"--parent", parent_arg, "--instance", c->instance,
		"--model", c->model, "--threads", threads_arg,
		"--max-batch", batch_arg, "--max-step-tokens", step_arg,
		"--max-context", context_arg, "--block-tokens", block_arg,
		"--kv-type", c->kv_type == ENGINE_KV_F16 ? "f16" : "f32",
		"--log-level", log_names[c->log_level - LOG_LEVEL_ERROR],
		c->fault_injection ? "--fault-injection" : NULL, NULL,
	};

	pid = fork();
	if (pid < 0) {
		log_error("fork of worker %d failed: %s", worker->id,
			  strerror(errno));
		close(sv[0]);
		close(sv[1]);
		return -errno;
	}
	if (pid == 0) {
		/* Child: the socket becomes fd 3 (dup2 clears close-on-exec). */
		sigset_t none;

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		if (dup2(sv[1], 3) < 0)
			_exit(127);
		execv(argv[0], (char *const *)argv);
		fprintf(stderr, "slabd: exec of %s failed: %s\n", argv[0],
			strerror(errno));
		_exit(127);
	}

	close(sv[1]);
	worker->pid = pid;
	worker->fd = sv[0];
	worker->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	worker->exited = false;
	worker->started_ns = engine_now_ns();
	worker->state = WORKER_STARTING;
	if (worker->pidfd < 0)
		log_warning("pidfd_open for worker %d (pid %d) failed: %s; its "
			    "exit is noticed by end of file only",
			    worker->id, (int)pid, strerror(errno));
	log_info("worker %d started, pid %d", worker->id, (int)pid);

	worker->recv_op = (struct loop_op){ .callback = on_worker_recv,
					    .data = worker };
	loop_recv(broker->loop, &worker->recv_op, worker->fd,
		  worker->recv_buffer, RECV_BUFFER_BYTES);
	if (worker->pidfd >= 0) {
		worker->exit_op = (struct loop_op){ .callback = on_worker_exit,
						    .data = worker };
		loop_poll(broker->loop, &worker->exit_op, worker->pidfd);
	}
	return 0;
}


/* Reaps the worker if it has exited and logs how it ended. */
static void worker_reap(struct broker_worker *worker)
{
	int status;
	pid_t rc;

	if (worker->pid <= 0)
		return;
	rc = waitpid(worker->pid, &status, WNOHANG);
	if (rc != worker->pid)
		return;
	if (WIFSIGNALED(status))
		log_warning("worker %d (pid %d) was killed by signal %d (%s)",
			    worker->id, (int)worker->pid, WTERMSIG(status),
			    strsignal(WTERMSIG(status)));
	else if (WEXITSTATUS(status) != 0)
		log_warning("worker %d (pid %d) exited with status %d",
			    worker->id, (int)worker->pid, WEXITSTATUS(status));
	else
		log_info("worker %d (pid %d) exited", worker->id,
			 (int)worker->pid);
	worker->exited = true;
	worker->pid = 0;
}


/* Delay before restarting a worker that failed n times in a row. */
static uint64_t backoff_ms(int failures)
{
	uint64_t ms = 0;

	if (failures > 1) {
		ms = 100;
		for (int i = 2; i < failures && ms < MAX_BACKOFF_MS; i++)
			ms *= 2;
	}
	return ms > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : ms;
}


/* Closes a dead worker's descriptors and schedules its replacement. */
static void worker_cleanup(struct broker_worker *worker)
{
	struct broker *broker = worker->broker;
	uint64_t now = engine_now_ns();
	uint64_t delay;

	if (worker_ops_pending(worker) > 0 || worker->state != WORKER_DEAD)
		return;
	if (!worker->exited)
		worker_reap(worker);
	if (worker->fd >= 0)
		close(worker->fd);
	if (worker->pidfd >= 0)
		close(worker->pidfd);
	worker->fd = worker->pidfd = -1;
	worker->state = WORKER_STOPPED;
	if (broker->stopping || broker->draining)
		return;

	/* Crash-loop accounting over a sliding window. */
	if (now - broker->restart_window_start_ns > CRASH_LOOP_WINDOW_NS) {
		broker->restart_window_start_ns = now;
		broker->restarts_in_window = 0;
	}
	broker->restarts_in_window++;
	if (broker->restarts_in_window > broker->config.crash_loop_restarts &&
	    !broker->degraded) {
		broker->degraded = true;
		log_error("%d worker restarts within %llu s: crash loop, "
			  "reporting degraded", broker->restarts_in_window,
			  (unsigned long long)(CRASH_LOOP_WINDOW_NS / 1000000000ull));
	}

	delay = backoff_ms(worker->consecutive_failures);
	if (delay > 0)
		log_notice("worker %d restarts in %llu ms after %d failures in "
			   "a row", worker->id, (unsigned long long)delay,
			   worker->consecutive_failures);
	worker->restart_op = (struct loop_op){ .callback = on_worker_restart,
					       .data = worker };
	loop_timeout(broker->loop, &worker->restart_op, delay * 1000000ull);
}


static void on_worker_restart(struct loop_op *op, int result)
{
	struct broker_worker *worker = op->data;
	struct broker *broker = worker->broker;

	if (result == -ECANCELED || broker->stopping || broker->draining ||
	    worker->state != WORKER_STOPPED)
		return;
	worker->restarts++;
	broker->stats.worker_restarts++;
	log_notice("restarting worker %d (restart %d)", worker->id,
		   worker->restarts);
	if (worker_spawn(worker) < 0) {
		worker->state = WORKER_DEAD;
		worker->consecutive_failures++;
		worker_cleanup(worker);
	}
}


/*
 * Handles the end of a worker, whatever noticed it first: the step it held
 * goes back to the scheduler, the process is killed if it still runs, and
 * the replacement starts once every pending operation has completed.
 */
static void worker_failed(struct broker_worker *worker, const char *reason)
{
	struct broker *broker = worker->broker;
	enum broker_worker_state previous = worker->state;

	if (previous == WORKER_DEAD || previous == WORKER_STOPPED)
		return;
	worker->state = WORKER_DEAD;
	if (previous == WORKER_IDLE || previous == WORKER_BUSY)
		broker->live_workers--;
	broker->last_worker_failure_ns = engine_now_ns();
	worker->consecutive_failures++;
	if (!broker->stopping)
		log_warning("worker %d (pid %d) lost: %s%s", worker->id,
			    (int)worker->pid, reason,
			    previous == WORKER_BUSY ? "; its step will be retried"
						    : "");

	if (worker->pid > 0 && !worker->exited)
		kill(worker->pid, SIGKILL);
	if (previous == WORKER_BUSY)
		scheduler_step_lost(broker, worker);
	if (previous == WORKER_STARTING && !broker->ready) {
		log_error("worker %d failed to start; stopping", worker->id);
		broker->stopping = true;
		broker->exit_status = 1;
	}

	loop_cancel(broker->loop, &worker->recv_op);
	loop_cancel(broker->loop, &worker->send_op);
	if (worker->fd >= 0)
		shutdown(worker->fd, SHUT_RDWR);
	worker_cleanup(worker);
	scheduler_run(broker);
}


bool worker_alive(const struct broker_worker *worker)
{
	struct pollfd exit = { .fd = worker->pidfd, .events = POLLIN };

	if (worker->pidfd < 0)
		return true;
	return poll(&exit, 1, 0) == 0;
}


void worker_kill(struct broker_worker *worker, const char *reason)
{
	worker_failed(worker, reason);
}


static void on_worker_exit(struct loop_op *op, int result)
{
	struct broker_worker *worker = op->data;

	if (result == -ECANCELED && worker->state == WORKER_DEAD) {
		worker_cleanup(worker);
		return;
	}
	worker_reap(worker);
	if (!worker->exited) {
		/* The pidfd became readable but the child is not reapable yet. */
		worker->exit_op.pending = false;
		loop_poll(worker->broker->loop, &worker->exit_op, worker->pidfd);
		return;
	}
	worker_failed(worker, "process exited");
	worker_cleanup(worker);
}


static void handle_ready(struct broker_worker *worker,
			 const Slabd__Worker__Ready *ready)
{
	struct broker *broker = worker->broker;

	if (ready->error != NULL && ready->error[0] != '\0') {
		log_error("worker %d cannot start: %s", worker->id, ready->error);
		worker_failed(worker, "start failed");
		return;
	}
	if (ready->dim != broker->shape.dim ||
	    ready->n_layers != broker->shape.n_layers ||
	    ready->vocab_size != broker->shape.vocab_size) {
		log_error("worker %d loaded a model of another shape (dim %d, "
			  "%d layers, vocab %d)", worker->id, (int)ready->dim,
			  (int)ready->n_layers, (int)ready->vocab_size);
		worker_failed(worker, "model shape mismatch");
		return;
	}
	worker->state = WORKER_IDLE;
	broker->live_workers++;
	log_info("worker %d (pid %d) ready in %.1f ms, kernels %s", worker->id,
		 (int)ready->pid,
		 (double)(engine_now_ns() - worker->started_ns) / 1e6,
		 ready->isa);

	if (!broker->ready && broker->live_workers == broker->config.workers) {
		broker->ready = true;
		if (broker_listen(broker) < 0) {
			broker->stopping = true;
			broker->exit_status = 1;
			return;
		}
	}
	if (broker->live_workers == broker->config.workers && broker->degraded &&
	    broker->restarts_in_window <= broker->config.crash_loop_restarts) {
		broker->degraded = false;
		log_notice("all %d workers live again", broker->live_workers);
	}
	scheduler_run(broker);
}


static void on_worker_recv(struct loop_op *op, int result)
{
	struct broker_worker *worker = op->data;
	struct broker *broker = worker->broker;
	Slabd__Worker__WorkerMessage *message;

	if (worker->state == WORKER_DEAD) {
		worker_cleanup(worker);
		return;
	}
	if (result <= 0) {
		worker_failed(worker, result == 0 ? "socket closed"
						  : strerror(-result));
		return;
	}

	message = slabd__worker__worker_message__unpack(NULL, (size_t)result,
							worker->recv_buffer);
	if (message == NULL) {
		log_error("worker %d (pid %d) sent a malformed message of %d "
			  "bytes; killing it", worker->id, (int)worker->pid,
			  result);
		worker_kill(worker, "malformed message");
		return;
	}

	if (message->kind_case == SLABD__WORKER__WORKER_MESSAGE__KIND_READY &&
	    worker->state == WORKER_STARTING) {
		handle_ready(worker, message->ready);
	} else if (message->kind_case == SLABD__WORKER__WORKER_MESSAGE__KIND_REPLY &&
		   worker->state == WORKER_BUSY &&
		   message->reply->step_id == worker->step.id) {
		/* A decode run's worker stays busy until its last reply. */
		if (!message->reply->more)
			worker->state = WORKER_IDLE;
		worker->consecutive_failures = 0;
		scheduler_step_done(broker, worker, message->reply);
	} else {
		log_error("worker %d (pid %d) sent an unexpected message; "
			  "killing it", worker->id, (int)worker->pid);
		slabd__worker__worker_message__free_unpacked(message, NULL);
		worker_kill(worker, "unexpected message");
		return;
	}
	slabd__worker__worker_message__free_unpacked(message, NULL);

	if (worker->state != WORKER_DEAD && worker->state != WORKER_STOPPED)
		loop_recv(broker->loop, &worker->recv_op, worker->fd,
			  worker->recv_buffer, RECV_BUFFER_BYTES);
	else
		worker_cleanup(worker);
	scheduler_run(broker);
}


static void on_worker_send(struct loop_op *op, int result)
{
	struct broker_worker *worker = op->data;

	if (worker->state == WORKER_DEAD) {
		worker_cleanup(worker);
		return;
	}
	if (result < 0)
		worker_failed(worker, strerror(-result));
}


int worker_send_step(struct broker_worker *worker,
		     const Slabd__Worker__StepRequest *request)
{
	struct broker *broker = worker->broker;
	size_t size = slabd__worker__step_request__get_packed_size(request);

	if (size > BROKER_MAX_PACKET)
		return -EMSGSIZE;
	if (size > worker->send_capacity) {
		uint8_t *grown = realloc(worker->send_buffer, size);

		if (grown == NULL)
			return -ENOMEM;
		worker->send_buffer = grown;
		worker->send_capacity = size;
	}
	slabd__worker__step_request__pack(request, worker->send_buffer);
	worker->send_op = (struct loop_op){ .callback = on_worker_send,
					    .data = worker };
	worker->state = WORKER_BUSY;
	worker->step.sent_ns = engine_now_ns();
	return loop_send(broker->loop, &worker->send_op, worker->fd,
			 worker->send_buffer, size);
}


void worker_stop_run(struct broker_worker *worker)
{
	Slabd__Worker__StepRequest request = SLABD__WORKER__STEP_REQUEST__INIT;
	uint8_t packet[64];
	size_t size;

	request.step_id = worker->step.id;
	request.stop_run = true;
	size = slabd__worker__step_request__get_packed_size(&request);
	if (size > sizeof(packet))
		return;
	slabd__worker__step_request__pack(&request, packet);
	/*
	 * The step itself was sent long before (its replies are arriving),
	 * so this small send does not race the loop's send of it. When it
	 * fails, the run still ends by itself within its length.
	 */
	if (send(worker->fd, packet, size, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
		log_warning("cannot ask worker %d to end the decode run of "
			    "step %llu: %s", worker->id,
			    (unsigned long long)worker->step.id,
			    strerror(errno));
}


int workers_start(struct broker *broker)
{
	int n = broker->config.workers;

	broker->workers = calloc((size_t)n, sizeof(*broker->workers));
	if (broker->workers == NULL)
		return -ENOMEM;
	for (int i = 0; i < n; i++) {
		struct broker_worker *worker = &broker->workers[i];

		worker->broker = broker;
		worker->id = i;
		worker->fd = worker->pidfd = -1;
		worker->recv_buffer = malloc(RECV_BUFFER_BYTES);
		worker->step.entries = calloc((size_t)broker->config.max_batch,
					      sizeof(*worker->step.entries));
		if (worker->recv_buffer == NULL || worker->step.entries == NULL)
			return -ENOMEM;
		if (worker_spawn(worker) < 0)
			return -1;
	}
	return 0;
}


/* Checks step deadlines; called from the broker's periodic tick. */
void workers_check_deadlines(struct broker *broker)
{
	for (int i = 0; i < broker->config.workers; i++) {
		struct broker_worker *worker = &broker->workers[i];
		uint64_t limit_ms;
		uint64_t now;

		if (worker->state != WORKER_BUSY)
			continue;

		/* Killing one worker resends its step to a later one in this
		 * loop, so the clock is read per worker. A clock read before
		 * that send would make `now - sent_ns` wrap around. */
		now = engine_now_ns();
		limit_ms = (uint64_t)broker->config.step_timeout_floor_ms +
			   (uint64_t)(broker->config.step_timeout_factor *
				      (double)worker->step.tokens);
		if (now - worker->step.sent_ns > limit_ms * 1000000ull) {
			log_error("worker %d (pid %d) missed the %llu ms deadline "
				  "of step %llu; killing it", worker->id,
				  (int)worker->pid,
				  (unsigned long long)limit_ms,
				  (unsigned long long)worker->step.id);
			worker_kill(worker, "step deadline missed");
		}
	}
}


void workers_stop(struct broker *broker)
{
	if (broker->workers == NULL)
		return;
	for (int i = 0; i < broker->config.workers; i++) {
		struct broker_worker *worker = &broker->workers[i];

		loop_cancel(broker->loop, &worker->restart_op);
		if (worker->state == WORKER_STOPPED)
			continue;
		/* Closing the socket makes the worker exit on its own. */
		if (worker->fd >= 0)
			shutdown(worker->fd, SHUT_RDWR);
		if (worker->state == WORKER_BUSY || worker->state == WORKER_STARTING)
			kill(worker->pid, SIGKILL);
		worker->state = WORKER_DEAD;
		loop_cancel(broker->loop, &worker->recv_op);
		loop_cancel(broker->loop, &worker->send_op);
		loop_cancel(broker->loop, &worker->exit_op);
	}
	/* Wait for each child so that none is left behind. */
	for (int i = 0; i < broker->config.workers; i++) {
		struct broker_worker *worker = &broker->workers[i];

		if (worker->pid > 0 && waitpid(worker->pid, NULL, 0) == worker->pid)
			log_info("worker %d (pid %d) stopped", worker->id,
				 (int)worker->pid);
		worker->pid = 0;
		worker->exited = true;
	}
}


void workers_free(struct broker *broker)
{
	if (broker->workers == NULL)
		return;
	for (int i = 0; i < broker->config.workers; i++) {
		struct broker_worker *worker = &broker->workers[i];

		if (worker->fd >= 0)
			close(worker->fd);
		if (worker->pidfd >= 0)
			close(worker->pidfd);
		free(worker->recv_buffer);
		free(worker->send_buffer);
		free(worker->step.entries);
	}
	free(broker->workers);
	broker->workers = NULL;
}
