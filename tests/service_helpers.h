/*
 * Helpers of the end-to-end tests, which run the real slabd with real
 * workers: start a broker in a temporary directory with its own instance
 * name and socket, wait until it listens, stop it with SIGTERM and check its
 * exit status, find its worker pids, and remove whatever a test leaves
 * behind. Also collects streamed generations and runs slab-run for
 * reference outputs.
 *
 * Programs come from $SLAB_BUILD_DIR (default "build") and model files from
 * $SLAB_MODELS; `make test` exports both. Every broker registers itself so
 * that service_fini(), the .fini hook of each test, kills only the processes
 * the test started (by pid) and removes its segments and temporary
 * directory, whether the test passed or failed.
 *
 * Functions that assert (cr_assert) run on the test's main thread only. The
 * generation helpers never assert, so client threads may use them.
 */
#ifndef SLAB_TESTS_SERVICE_HELPERS_H
#define SLAB_TESTS_SERVICE_HELPERS_H

#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client/slab.h"
#include "proto/frame.h"

#define SERVICE_START_TIMEOUT_MS 10000
#define SERVICE_STOP_TIMEOUT_MS 20000
#define SERVICE_MAX_ARGS 48
#define SERVICE_MAX_WORKERS 64
#define SERVICE_MAX_REGISTERED 4

/* Tokens one collected generation can hold. */
#define GENERATION_MAX_TOKENS 1024

/* Model and tokenizer file names under $SLAB_MODELS. */
#define SERVICE_MODEL "stories260K.bin"
#define SERVICE_TOKENIZER "tok512.bin"

struct service {
	char dir[64];              /* temporary directory, removed at cleanup */
	char socket_path[128];
	char log_path[128];        /* standard error of every slabd started */
	char instance[64];
	pid_t pid;                 /* broker, 0 once reaped */
	int status;                /* wait status of the last broker reaped */
	pid_t workers_seen[SERVICE_MAX_WORKERS];
	size_t n_workers_seen;
	int ready_lines;           /* "ready:" lines in the log before a start */
};

static struct service *service_registry[SERVICE_MAX_REGISTERED];
static int service_registry_count;
static int service_instance_counter;


static inline uint64_t service_now_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}


static inline void service_sleep_ms(unsigned ms)
{
	struct timespec delay = { .tv_sec = ms / 1000,
				  .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&delay, &delay) < 0 && errno == EINTR)
		;
}


static inline const char *service_build_dir(void)
{
	const char *dir = getenv("SLAB_BUILD_DIR");

	return dir != NULL && dir[0] != '\0' ? dir : "build";
}


/* Writes $SLAB_MODELS/name to out; fails the test when SLAB_MODELS is unset. */
static inline void service_model_path(char *out, size_t size, const char *name)
{
	const char *dir = getenv("SLAB_MODELS");

	cr_assert(dir != NULL && dir[0] != '\0',
		  "SLAB_MODELS is not set; run the tests with make test or set "
		  "it to the directory of the model files");
	snprintf(out, size, "%s/%s", dir, name);
	cr_assert_eq(access(out, R_OK), 0, "model file %s is missing: %s", out,
		     strerror(errno));
}


static inline void service_program_path(char *out, size_t size,
					const char *name)
{
	snprintf(out, size, "%s/%s", service_build_dir(), name);
	cr_assert_eq(access(out, X_OK), 0, "%s is missing; run make", out);
}


/* Reads up to size - 1 bytes of the end of the broker log into out. */
static inline const char *service_log_tail(const struct service *s, char *out,
					   size_t size)
{
	int fd = open(s->log_path, O_RDONLY | O_CLOEXEC);
	off_t end;
	ssize_t n;

	out[0] = '\0';
	if (fd < 0)
		return out;
	end = lseek(fd, 0, SEEK_END);
	if (end > (off_t)(size - 1))
		lseek(fd, end - (off_t)(size - 1), SEEK_SET);
	else
		lseek(fd, 0, SEEK_SET);
	n = read(fd, out, size - 1);
	out[n > 0 ? n : 0] = '\0';
	close(fd);
	return out;
}


/* Whether the broker log contains text. */
static inline bool service_log_contains(const struct service *s,
					const char *text)
{
	static char log[1 << 16];

	return strstr(service_log_tail(s, log, sizeof(log)), text) != NULL;
}


/* Counts the lines of the log where a broker announced it listens. */
static inline int service_ready_lines(const struct service *s)
{
	static char log[1 << 16];
	const char *at = service_log_tail(s, log, sizeof(log));
	int count = 0;

	while ((at = strstr(at, "ready: listening")) != NULL) {
		count++;
		at++;
	}
	return count;
}


static inline bool service_segment_exists(const char *instance,
					  const char *suffix)
{
	char path[128];

	snprintf(path, sizeof(path), "/dev/shm/slabd-%s-%s", instance, suffix);
	return access(path, F_OK) == 0;
}


static inline bool service_segments_exist(const char *instance)
{
	return service_segment_exists(instance, "kv") ||
	       service_segment_exists(instance, "ctl");
}


/* Whether pid is a live (not zombie) slabd-worker process. */
static inline bool service_is_live_worker(pid_t pid)
{
	char path[64], buffer[512];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buffer, sizeof(buffer) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buffer[n] = '\0';

	/* The state follows the parenthesized command name. */
	char *paren = strrchr(buffer, ')');

	if (paren == NULL || paren[1] == '\0' || paren[2] == 'Z' ||
	    paren[2] == 'X')
		return false;
	return strstr(buffer, "(slabd-worker)") != NULL;
}


/*
 * Writes the pids of the broker's live worker processes (its children) to
 * pids and returns their number. Each is remembered for cleanup.
 */
static inline size_t service_worker_pids(struct service *s, pid_t *pids,
					 size_t max)
{
	char path[96], buffer[1024];
	size_t count = 0;
	ssize_t n;
	int fd;

	if (s->pid <= 0)
		return 0;
	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)s->pid,
		 (int)s->pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buffer, sizeof(buffer) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buffer[n] = '\0';

	for (char *p = buffer; *p != '\0' && count < max;) {
		char *end;
		long value = strtol(p, &end, 10);

		if (end == p)
			break;
		p = end;
		if (value <= 0 || !service_is_live_worker((pid_t)value))
			continue;
		pids[count++] = (pid_t)value;

		bool known = false;

		for (size_t i = 0; i < s->n_workers_seen; i++)
			known = known || s->workers_seen[i] == (pid_t)value;
		if (!known && s->n_workers_seen < SERVICE_MAX_WORKERS)
			s->workers_seen[s->n_workers_seen++] = (pid_t)value;
	}
	return count;
}


/*
 * Returns the pid of the live worker started with --worker-id id, or 0.
 * Worker 0 is the first idle worker the scheduler picks, so it runs most
 * steps of a lone session.
 */
static inline pid_t service_worker_pid_with_id(struct service *s, int id)
{
	pid_t pids[SERVICE_MAX_WORKERS];
	size_t n = service_worker_pids(s, pids, SERVICE_MAX_WORKERS);
	char wanted[16];

	snprintf(wanted, sizeof(wanted), "%d", id);
	for (size_t i = 0; i < n; i++) {
		char path[64], cmdline[4096];
		ssize_t len;
		int fd;

		snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pids[i]);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		len = read(fd, cmdline, sizeof(cmdline) - 1);
		close(fd);
		if (len <= 0)
			continue;
		cmdline[len] = '\0';

		/* Arguments are separated by NUL bytes. */
		for (char *arg = cmdline; arg < cmdline + len;
		     arg += strlen(arg) + 1) {
			char *next = arg + strlen(arg) + 1;

			if (strcmp(arg, "--worker-id") == 0 &&
			    next < cmdline + len && strcmp(next, wanted) == 0)
				return pids[i];
		}
	}
	return 0;
}


/* Waits until no worker this service saw is alive. Returns whether none is. */
static inline bool service_wait_workers_gone(const struct service *s,
					     unsigned timeout_ms)
{
	uint64_t deadline = service_now_ns() + timeout_ms * 1000000ull;

	for (;;) {
		bool alive = false;

		for (size_t i = 0; i < s->n_workers_seen; i++)
			alive = alive || service_is_live_worker(s->workers_seen[i]);
		if (!alive)
			return true;
		if (service_now_ns() > deadline)
			return false;
		service_sleep_ms(10);
	}
}


/*
 * Prepares a service: a temporary directory holding the socket and the log,
 * and an instance name unique to this test process. Registers it for
 * service_fini().
 */
static inline void service_init(struct service *s)
{
	memset(s, 0, sizeof(*s));
	snprintf(s->dir, sizeof(s->dir), "/tmp/slabd-test-XXXXXX");
	cr_assert_not_null(mkdtemp(s->dir), "mkdtemp: %s", strerror(errno));
	snprintf(s->socket_path, sizeof(s->socket_path), "%s/s.sock", s->dir);
	snprintf(s->log_path, sizeof(s->log_path), "%s/slabd.log", s->dir);
	snprintf(s->instance, sizeof(s->instance), "test-%d-%d", (int)getpid(),
		 ++service_instance_counter);
	cr_assert_lt(service_registry_count, SERVICE_MAX_REGISTERED);
	service_registry[service_registry_count++] = s;
}


/*
 * Starts slabd with the model and tokenizer files at the given paths, 2
 * workers, this service's socket and instance, and the extra arguments
 * (NULL-terminated, may be NULL). Standard error is appended to the log.
 * Does not wait for the broker to listen.
 */
static inline void service_spawn_paths(struct service *s,
				       const char *model_path,
				       const char *tokenizer_path,
				       const char *const *extra)
{
	static char program[PATH_MAX];
	const char *argv[SERVICE_MAX_ARGS];
	size_t n = 0;
	pid_t parent = getpid();
	pid_t pid;
	int log_fd;

	service_program_path(program, sizeof(program), "slabd");
	argv[n++] = program;
	argv[n++] = "--model";
	argv[n++] = model_path;
	argv[n++] = "--tokenizer";
	argv[n++] = tokenizer_path;
	argv[n++] = "--socket";
	argv[n++] = s->socket_path;
	argv[n++] = "--instance";
	argv[n++] = s->instance;
	argv[n++] = "--workers";
	argv[n++] = "2";
	argv[n++] = "--log-level";
	argv[n++] = "info";
	while (extra != NULL && *extra != NULL && n < SERVICE_MAX_ARGS - 1)
		argv[n++] = *extra++;
	argv[n] = NULL;

	s->ready_lines = service_ready_lines(s);
	log_fd = open(s->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
		      0600);
	cr_assert_geq(log_fd, 0, "open %s: %s", s->log_path, strerror(errno));
	pid = fork();
	cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		/* A broker outlives no test process, even one killed on its
		 * timeout; its workers die with it in turn. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127);
		dup2(log_fd, STDOUT_FILENO);
		dup2(log_fd, STDERR_FILENO);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(log_fd);
	s->pid = pid;
}


/*
 * Starts slabd as service_spawn_paths() does, with model and tokenizer file
 * names under $SLAB_MODELS.
 */
static inline void service_spawn_model(struct service *s, const char *model,
				       const char *tokenizer,
				       const char *const *extra)
{
	static char model_path[PATH_MAX], tokenizer_path[PATH_MAX];

	service_model_path(model_path, sizeof(model_path), model);
	service_model_path(tokenizer_path, sizeof(tokenizer_path), tokenizer);
	service_spawn_paths(s, model_path, tokenizer_path, extra);
}


/* Reaps the broker if it has exited. Returns whether it has. */
static inline bool service_reap(struct service *s)
{
	int status;

	if (s->pid <= 0)
		return true;
	if (waitpid(s->pid, &status, WNOHANG) != s->pid)
		return false;
	s->status = status;
	s->pid = 0;
	return true;
}


/* Waits up to timeout_ms for the broker to exit. Returns whether it did. */
static inline bool service_wait_exit(struct service *s, unsigned timeout_ms)
{
	uint64_t deadline = service_now_ns() + timeout_ms * 1000000ull;

	while (!service_reap(s)) {
		if (service_now_ns() > deadline)
			return false;
		service_sleep_ms(5);
	}
	return true;
}


/* Polls the socket until the broker accepts a connection, for up to 10 s. */
static inline void service_wait_ready(struct service *s)
{
	static char log[4096];
	uint64_t deadline = service_now_ns() +
			    SERVICE_START_TIMEOUT_MS * 1000000ull;

	/*
	 * Wait for this broker's own "ready" line first: a broker killed just
	 * before may leave its listening socket open for a moment (io_uring
	 * releases it after the process is reaped), and a connect to it would
	 * succeed.
	 */
	for (;;) {
		struct slab_client *client = NULL;

		if (service_ready_lines(s) > s->ready_lines &&
		    slab_connect(s->socket_path, &client) == 0) {
			slab_close(client);
			break;
		}
		cr_assert(!service_reap(s),
			  "slabd exited during startup with status %d; log:\n%s",
			  WIFEXITED(s->status) ? WEXITSTATUS(s->status) : -1,
			  service_log_tail(s, log, sizeof(log)));
		cr_assert_lt(service_now_ns(), deadline,
			     "slabd did not listen on %s within %d ms; log:\n%s",
			     s->socket_path, SERVICE_START_TIMEOUT_MS,
			     service_log_tail(s, log, sizeof(log)));
		service_sleep_ms(10);
	}

	pid_t pids[SERVICE_MAX_WORKERS];

	service_worker_pids(s, pids, SERVICE_MAX_WORKERS);
}


/* Starts slabd on the default model with extra arguments and waits for it. */
static inline void service_start(struct service *s, const char *const *extra)
{
	service_spawn_model(s, SERVICE_MODEL, SERVICE_TOKENIZER, extra);
	service_wait_ready(s);
}


/* Connects a client and exchanges Hello; fails the test on error. */
static inline struct slab_client *service_connect(const struct service *s)
{
	struct slab_client *client = NULL;
	int rc = slab_connect(s->socket_path, &client);

	cr_assert_eq(rc, 0, "connect to %s: %s", s->socket_path,
		     strerror(-rc));
	rc = slab_hello(client, NULL);
	cr_assert_eq(rc, 0, "hello: %s", slab_error_message(client));
	return client;
}


/*
 * Sends SIGTERM, waits for the exit, and checks exit status 0, that no
 * worker is left and that the instance's segments and socket are gone.
 */
static inline void service_stop(struct service *s)
{
	static char log[4096];

	cr_assert_gt(s->pid, 0, "slabd is not running");
	{
		pid_t pids[SERVICE_MAX_WORKERS];

		service_worker_pids(s, pids, SERVICE_MAX_WORKERS);
	}
	cr_assert_eq(kill(s->pid, SIGTERM), 0, "kill: %s", strerror(errno));
	cr_assert(service_wait_exit(s, SERVICE_STOP_TIMEOUT_MS),
		  "slabd did not exit within %d ms of SIGTERM",
		  SERVICE_STOP_TIMEOUT_MS);
	cr_assert(WIFEXITED(s->status),
		  "slabd ended by signal %d after SIGTERM; log:\n%s",
		  WTERMSIG(s->status), service_log_tail(s, log, sizeof(log)));
	cr_assert_eq(WEXITSTATUS(s->status), 0,
		     "slabd exit status %d after SIGTERM; log:\n%s",
		     WEXITSTATUS(s->status),
		     service_log_tail(s, log, sizeof(log)));
	cr_assert(service_wait_workers_gone(s, 5000),
		  "a worker outlived its broker");
	cr_assert(!service_segment_exists(s->instance, "kv"),
		  "/dev/shm/slabd-%s-kv left after SIGTERM", s->instance);
	cr_assert(!service_segment_exists(s->instance, "ctl"),
		  "/dev/shm/slabd-%s-ctl left after SIGTERM", s->instance);
	cr_assert_neq(access(s->socket_path, F_OK), 0,
		      "socket %s left after SIGTERM", s->socket_path);
}


/* Sends SIGKILL to the broker and reaps it; its workers die with it. */
static inline void service_kill(struct service *s)
{
	pid_t pids[SERVICE_MAX_WORKERS];

	cr_assert_gt(s->pid, 0, "slabd is not running");
	service_worker_pids(s, pids, SERVICE_MAX_WORKERS);
	cr_assert_eq(kill(s->pid, SIGKILL), 0, "kill: %s", strerror(errno));
	cr_assert(service_wait_exit(s, 5000), "slabd survived SIGKILL");
	cr_assert(service_wait_workers_gone(s, 5000),
		  "workers did not exit after their broker was killed");
}


/* Kills what is left of one service and removes its files and segments. */
static inline void service_cleanup(struct service *s)
{
	char path[PATH_MAX];

	if (s->pid > 0) {
		kill(s->pid, SIGKILL);
		waitpid(s->pid, NULL, 0);
		s->pid = 0;
	}
	for (size_t i = 0; i < s->n_workers_seen; i++)
		if (service_is_live_worker(s->workers_seen[i]))
			kill(s->workers_seen[i], SIGKILL);
	if (s->instance[0] != '\0') {
		snprintf(path, sizeof(path), "/slabd-%s-kv", s->instance);
		shm_unlink(path);
		snprintf(path, sizeof(path), "/slabd-%s-ctl", s->instance);
		shm_unlink(path);
	}
	if (s->dir[0] != '\0') {
		/* A killed broker leaves the lock file beside its socket. */
		snprintf(path, sizeof(path), "%s.lock", s->socket_path);
		unlink(path);
		unlink(s->socket_path);
		unlink(s->log_path);
		rmdir(s->dir);
		s->dir[0] = '\0';
	}
}


/* .fini hook of every end-to-end test: cleans up each registered service. */
static inline void service_fini(void)
{
	for (int i = 0; i < service_registry_count; i++)
		service_cleanup(service_registry[i]);
	service_registry_count = 0;
}


/* Returns the value of the named metric, or -1 when it is missing. */
static inline double service_metric(struct slab_client *client,
				    const char *name)
{
	struct slab_stats stats;
	double value = -1;
	int rc = slab_stats(client, &stats);

	cr_assert_eq(rc, 0, "stats: %s", slab_error_message(client));
	for (size_t i = 0; i < stats.n_metrics; i++)
		if (strcmp(stats.metrics[i].name, name) == 0)
			value = stats.metrics[i].value;
	slab_stats_free(&stats);
	cr_assert_geq(value, 0, "metric %s is missing", name);
	return value;
}


/* Finds a session in the broker's list. Returns whether it is listed. */
static inline bool service_find_session(struct slab_client *client,
					const char *handle,
					struct slab_session_info *out)
{
	struct slab_session_info *sessions = NULL;
	size_t count = 0;
	bool found = false;
	int rc = slab_session_list(client, &sessions, &count);

	cr_assert_geq(rc, 0, "list: %s", slab_error_message(client));
	for (size_t i = 0; i < count; i++)
		if (strcmp(sessions[i].handle, handle) == 0) {
			if (out != NULL)
				*out = sessions[i];
			found = true;
		}
	free(sessions);
	return found;
}


/* ---- Generations ----------------------------------------------------------- */

/* One streamed generation: what the caller asks and what arrived. */
struct generation {
	uint32_t cancel_after;    /* stop after this many tokens; 0 = never */
	void (*on_token)(struct generation *g); /* run after each token */
	void *user;

	int rc;                   /* slab_generate() return value */
	enum slab_error_code error_code;
	char error[SLAB_MESSAGE_SIZE];
	struct slab_generate_result result;
	char text[16384];         /* streamed pieces, NUL-terminated */
	size_t text_len;
	bool text_truncated;
	int32_t ids[GENERATION_MAX_TOKENS];
	uint32_t positions[GENERATION_MAX_TOKENS];
	uint64_t arrival_ns[GENERATION_MAX_TOKENS];
	size_t n_tokens;          /* tokens with an id, at most the arrays' size */
	size_t n_pieces;          /* Token replies without an id (flushed text) */
};


static inline int generation_collect(const struct slab_token *token,
				     void *user)
{
	struct generation *g = user;

	if (g->text_len + token->piece_len < sizeof(g->text)) {
		memcpy(g->text + g->text_len, token->piece, token->piece_len);
		g->text_len += token->piece_len;
		g->text[g->text_len] = '\0';
	} else {
		g->text_truncated = true;
	}
	if (token->id < 0) {
		g->n_pieces++;
		return 0;
	}
	if (g->n_tokens < GENERATION_MAX_TOKENS) {
		g->ids[g->n_tokens] = token->id;
		g->positions[g->n_tokens] = token->position;
		g->arrival_ns[g->n_tokens] = service_now_ns();
		g->n_tokens++;
	}
	if (g->on_token != NULL)
		g->on_token(g);
	return g->cancel_after > 0 && g->n_tokens >= g->cancel_after;
}


/*
 * Runs one streamed generation on client and records it in g. Never
 * asserts, so any thread may call it. Returns slab_generate()'s value.
 */
static inline int generation_run(struct slab_client *client,
				 const struct slab_generate_options *options,
				 struct generation *g)
{
	g->text_len = 0;
	g->text[0] = '\0';
	g->n_tokens = 0;
	g->n_pieces = 0;
	g->rc = slab_generate(client, options, generation_collect, g,
			      &g->result);
	g->error_code = slab_server_error(client);
	snprintf(g->error, sizeof(g->error), "%s", slab_error_message(client));
	slab_generate_result_free(&g->result);
	return g->rc;
}


/* Sets up greedy options for a text prompt on a session (NULL: one-shot). */
static inline void generation_greedy(struct slab_generate_options *options,
				     const char *session, const char *prompt,
				     uint32_t max_tokens)
{
	slab_generate_options_init(options);
	options->session = session;
	options->prompt = prompt;
	options->max_tokens = max_tokens;
	options->has_temperature = true;
	options->temperature = 0.0f;
}


/*
 * Runs slab-run greedily on the default model for prompt and max_tokens
 * and writes the completion (its output minus the prompt and the final
 * newline) to out.
 */
static inline void reference_completion(const char *prompt,
					uint32_t max_tokens, char *out,
					size_t size)
{
	static char program[PATH_MAX], model[PATH_MAX], tokenizer[PATH_MAX];
	char tokens_arg[16];
	char output[32768];
	size_t len = 0;
	int pipe_fds[2];
	int status;
	pid_t pid;

	service_program_path(program, sizeof(program), "slab-run");
	service_model_path(model, sizeof(model), SERVICE_MODEL);
	service_model_path(tokenizer, sizeof(tokenizer), SERVICE_TOKENIZER);
	snprintf(tokens_arg, sizeof(tokens_arg), "%u", max_tokens);
	const char *argv[] = { program, "--model", model, "--tokenizer",
			       tokenizer, "--prompt", prompt, "--max-tokens",
			       tokens_arg, "--temperature", "0", "--threads",
			       "1", NULL };

	cr_assert_eq(pipe2(pipe_fds, O_CLOEXEC), 0);
	pid = fork();
	cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		int null_fd = open("/dev/null", O_WRONLY);

		dup2(pipe_fds[1], STDOUT_FILENO);
		if (null_fd >= 0)
			dup2(null_fd, STDERR_FILENO);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(pipe_fds[1]);
	for (;;) {
		ssize_t n = read(pipe_fds[0], output + len,
				 sizeof(output) - 1 - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(pipe_fds[0]);
	output[len] = '\0';
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		  "slab-run for prompt '%s' ended with %s %d", prompt,
		  WIFEXITED(status) ? "exit status" : "signal",
		  WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));

	cr_assert_gt(len, 0, "slab-run printed nothing");
	cr_assert_eq(output[len - 1], '\n', "slab-run output lacks its newline");
	output[--len] = '\0';
	cr_assert_eq(strncmp(output, prompt, strlen(prompt)), 0,
		     "slab-run output does not start with the prompt '%s': %s",
		     prompt, output);
	cr_assert_lt(len - strlen(prompt), size);
	snprintf(out, size, "%s", output + strlen(prompt));
}


/* ---- Raw protocol ------------------------------------------------------------ */

/* Connects a plain socket to the broker, with a 10 s receive timeout. */
static inline int raw_connect(const struct service *s)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	struct timeval timeout = { .tv_sec = 10 };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	cr_assert_geq(fd, 0, "socket: %s", strerror(errno));
	cr_assert_lt(strlen(s->socket_path), sizeof(address.sun_path));
	memcpy(address.sun_path, s->socket_path, strlen(s->socket_path) + 1);
	cr_assert_eq(connect(fd, (struct sockaddr *)&address, sizeof(address)),
		     0, "connect: %s", strerror(errno));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	return fd;
}


/* Packs a Hello (kind_hello) or Health request with request_id into a frame. */
static inline size_t raw_request_frame(uint64_t request_id, bool hello,
				       uint8_t **frame)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HelloRequest hello_request = SLABD__HELLO_REQUEST__INIT;
	Slabd__HealthRequest health_request = SLABD__HEALTH_REQUEST__INIT;
	size_t len = 0;

	request.request_id = request_id;
	if (hello) {
		hello_request.protocol_version = PROTO_VERSION;
		request.kind_case = SLABD__REQUEST__KIND_HELLO;
		request.hello = &hello_request;
	} else {
		request.kind_case = SLABD__REQUEST__KIND_HEALTH;
		request.health = &health_request;
	}
	cr_assert_eq(proto_pack_frame(&request.base, 0, frame, &len), 0);
	return len;
}


/* Reads one reply frame; fails the test when none arrives. */
static inline Slabd__Reply *raw_read_reply(int fd)
{
	Slabd__Reply *reply = NULL;
	uint8_t *payload = NULL;
	ssize_t len = frame_read_fd(fd, 0, &payload);

	cr_assert_gt(len, 0, "no reply frame: %s",
		     len == 0 ? "end of stream" : strerror((int)-len));
	cr_assert_eq(proto_unpack_reply(payload, (size_t)len, &reply), 0,
		     "reply does not unpack");
	free(payload);
	return reply;
}


/* Whether the broker closes the connection within the receive timeout. */
static inline bool raw_closed_by_peer(int fd)
{
	char byte;
	ssize_t n;

	do {
		n = recv(fd, &byte, 1, 0);
	} while (n > 0);
	return n == 0 || errno == ECONNRESET;
}

#endif /* SLAB_TESTS_SERVICE_HELPERS_H */
