/*
 * Tests of slabctl and libslab. slabctl runs as a child process from
 * $SLAB_BUILD_DIR (default "build"); it is checked for its help text, usage
 * errors and exit statuses, and against a scripted broker: a thread in the
 * test that replies to each request kind with fixed replies over a Unix socket
 * in a temporary directory. The scripted broker checks the protocol from the
 * client side only; tests against the real slabd live with the broker.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client/slab.h"
#include "proto/frame.h"

#define TEST_TIMEOUT_S 20
#define OUTPUT_SIZE 16384

/* Prompt that makes the scripted broker stream tokens until cancelled. */
#define SLOW_PROMPT "slow"

struct child_result {
	int status;                 /* exit status, or 128 + signal */
	char out[OUTPUT_SIZE];      /* standard output, NUL-terminated */
	char err[OUTPUT_SIZE];      /* standard error, NUL-terminated */
};

/* Called with the child's pid once its first output byte arrived. */
typedef void (*child_output_fn)(pid_t pid);


static const char *build_dir(void)
{
	const char *dir = getenv("SLAB_BUILD_DIR");

	return dir != NULL && dir[0] != '\0' ? dir : "build";
}


/*
 * Runs slabctl with args (NULL-terminated, program name excluded) and an
 * environment of PATH plus the given SLABD_SOCKET and XDG_RUNTIME_DIR (each
 * left out when NULL). Collects both outputs and the exit status.
 */
static void run_slabctl(const char *const *args, const char *socket_env,
			const char *runtime_dir, child_output_fn on_output,
			struct child_result *result)
{
	char program[512];
	char socket_var[512];
	char runtime_var[512];
	const char *argv[32];
	const char *envp[4];
	size_t n_args = 0;
	size_t n_env = 0;
	size_t out_len = 0;
	size_t err_len = 0;
	bool notified = false;
	int out_pipe[2];
	int err_pipe[2];
	pid_t pid;
	int status;

	snprintf(program, sizeof(program), "%s/slabctl", build_dir());
	cr_assert_eq(access(program, X_OK), 0, "%s is missing; run make",
		     program);
	argv[n_args++] = program;
	while (*args != NULL && n_args < 31)
		argv[n_args++] = *args++;
	argv[n_args] = NULL;

	envp[n_env++] = "PATH=/usr/bin:/bin";
	if (socket_env != NULL) {
		snprintf(socket_var, sizeof(socket_var), "SLABD_SOCKET=%s",
			 socket_env);
		envp[n_env++] = socket_var;
	}
	if (runtime_dir != NULL) {
		snprintf(runtime_var, sizeof(runtime_var),
			 "XDG_RUNTIME_DIR=%s", runtime_dir);
		envp[n_env++] = runtime_var;
	}
	envp[n_env] = NULL;

	cr_assert_eq(pipe2(out_pipe, O_CLOEXEC), 0);
	cr_assert_eq(pipe2(err_pipe, O_CLOEXEC), 0);
	pid = fork();
	cr_assert_geq(pid, 0, "fork: %s", strerror(errno));
	if (pid == 0) {
		dup2(out_pipe[1], STDOUT_FILENO);
		dup2(err_pipe[1], STDERR_FILENO);
		execve(program, (char *const *)argv, (char *const *)envp);
		_exit(127);
	}
	close(out_pipe[1]);
	close(err_pipe[1]);

	struct pollfd pfds[2] = {
		{ .fd = out_pipe[0], .events = POLLIN },
		{ .fd = err_pipe[0], .events = POLLIN },
	};
	while (pfds[0].fd >= 0 || pfds[1].fd >= 0) {
		cr_assert_geq(poll(pfds, 2, -1), 0);
		for (int i = 0; i < 2; i++) {
			char *buffer = i == 0 ? result->out : result->err;
			size_t *len = i == 0 ? &out_len : &err_len;
			ssize_t n;

			if (pfds[i].fd < 0 || pfds[i].revents == 0)
				continue;
			n = read(pfds[i].fd, buffer + *len,
				 OUTPUT_SIZE - 1 - *len);
			if (n <= 0) {
				close(pfds[i].fd);
				pfds[i].fd = -1;
				continue;
			}
			*len += (size_t)n;
			if (i == 0 && on_output != NULL && !notified) {
				notified = true;
				on_output(pid);
			}
		}
	}
	result->out[out_len] = '\0';
	result->err[err_len] = '\0';

	cr_assert_eq(waitpid(pid, &status, 0), pid);
	if (WIFEXITED(status))
		result->status = WEXITSTATUS(status);
	else
		result->status = 128 + WTERMSIG(status);
}


/* ---- Scripted broker ------------------------------------------------------ */

struct scripted_broker {
	char dir[64];
	char path[96];
	int listen_fd;
	pthread_t thread;
	uint64_t cancel_target;     /* target of the last Cancel received */
	int requests;               /* requests received and replied to */
};


/* Errors are ignored: the client may have gone, and the test that runs it
 * checks what the client saw. */
static void send_reply(int fd, Slabd__Reply *reply)
{
	(void)proto_send_fd(fd, &reply->base, 0);
}


static void send_error(int fd, uint64_t id, Slabd__ErrorCode code,
		       const char *message)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Error error = SLABD__ERROR__INIT;

	error.code = code;
	error.message = (char *)message;
	reply.request_id = id;
	reply.kind_case = SLABD__REPLY__KIND_ERROR;
	reply.error = &error;
	send_reply(fd, &reply);
}


static void send_token(int fd, uint64_t id, int32_t token_id,
		       const char *piece, uint32_t position)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Token token = SLABD__TOKEN__INIT;

	token.id = token_id;
	token.piece.data = (uint8_t *)piece;
	token.piece.len = strlen(piece);
	token.position = position;
	reply.request_id = id;
	reply.kind_case = SLABD__REPLY__KIND_TOKEN;
	reply.token = &token;
	send_reply(fd, &reply);
}


static void send_done(int fd, uint64_t id, Slabd__FinishReason reason,
		      uint32_t completion_tokens, const char *text)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Done done = SLABD__DONE__INIT;

	done.finish_reason = reason;
	done.prompt_tokens = 2;
	done.completion_tokens = completion_tokens;
	done.time_to_first_token_us = 1500;
	done.decode_tokens_per_second = 100.0;
	done.committed_length = 2 + completion_tokens;
	if (text != NULL) {
		done.text.data = (uint8_t *)text;
		done.text.len = strlen(text);
	}
	reply.request_id = id;
	reply.kind_case = SLABD__REPLY__KIND_DONE;
	reply.done = &done;
	send_reply(fd, &reply);
}


/* Streams tokens every 20 ms until a Cancel for request id arrives, then
 * replies to the Cancel and ends with Done CANCELLED. */
static void stream_until_cancel(struct scripted_broker *broker, int fd,
				uint64_t id)
{
	for (uint32_t n = 0; n < 500; n++) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		Slabd__Request *request;
		Slabd__Reply reply = SLABD__REPLY__INIT;
		Slabd__CancelReply cancel_reply = SLABD__CANCEL_REPLY__INIT;
		uint8_t *payload;
		ssize_t len;

		send_token(fd, id, 100, " tick", 2 + n);
		if (poll(&pfd, 1, 20) <= 0)
			continue;

		len = frame_read_fd(fd, 0, &payload);
		if (len <= 0)
			return;
		if (proto_unpack_request(payload, (size_t)len, &request) < 0) {
			free(payload);
			return;
		}
		free(payload);
		if (request->kind_case != SLABD__REQUEST__KIND_CANCEL) {
			slabd__request__free_unpacked(request, NULL);
			return;
		}
		broker->cancel_target = request->cancel->target_request_id;

		cancel_reply.cancelled = true;
		reply.request_id = request->request_id;
		reply.kind_case = SLABD__REPLY__KIND_CANCEL;
		reply.cancel = &cancel_reply;
		send_reply(fd, &reply);
		slabd__request__free_unpacked(request, NULL);

		send_done(fd, id, SLABD__FINISH_REASON__FINISH_REASON_CANCELLED,
			  n + 1, NULL);
		return;
	}
	send_done(fd, id, SLABD__FINISH_REASON__FINISH_REASON_LENGTH, 500,
		  NULL);
}


static void reply_to_generate(struct scripted_broker *broker, int fd,
			    uint64_t id, const Slabd__GenerateRequest *generate)
{
	if (generate->prompt_case == SLABD__GENERATE_REQUEST__PROMPT_TEXT &&
	    strcmp(generate->text, SLOW_PROMPT) == 0) {
		stream_until_cancel(broker, fd, id);
		return;
	}
	if (generate->session[0] != '\0' &&
	    strcmp(generate->session, "0.1.feedbeef") != 0) {
		send_error(fd, id, SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
			   "session handle 'nope' not found");
		return;
	}
	if (!generate->stream) {
		send_done(fd, id, SLABD__FINISH_REASON__FINISH_REASON_EOS, 2,
			  " there!");
		return;
	}
	send_token(fd, id, 31, " there", 2);
	send_token(fd, id, 32, "!", 3);
	send_done(fd, id, SLABD__FINISH_REASON__FINISH_REASON_EOS, 2, NULL);
}


/* Sends the scripted reply to one request. */
static void send_scripted_reply(struct scripted_broker *broker, int fd,
		   const Slabd__Request *request)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	uint64_t id = request->request_id;

	reply.request_id = id;
	switch (request->kind_case) {
	case SLABD__REQUEST__KIND_HELLO: {
		Slabd__HelloReply hello = SLABD__HELLO_REPLY__INIT;
		Slabd__ModelShape model = SLABD__MODEL_SHAPE__INIT;

		model.dim = 64;
		model.vocab_size = 512;
		hello.protocol_version = PROTO_VERSION;
		hello.server_version = "scripted";
		hello.model = &model;
		hello.max_context = 512;
		reply.kind_case = SLABD__REPLY__KIND_HELLO;
		reply.hello = &hello;
		send_reply(fd, &reply);
		return;
	}
	case SLABD__REQUEST__KIND_GENERATE:
		reply_to_generate(broker, fd, id, request->generate);
		return;
	case SLABD__REQUEST__KIND_OPEN_SESSION: {
		Slabd__OpenSessionReply open = SLABD__OPEN_SESSION_REPLY__INIT;

		open.handle = "0.1.feedbeef";
		open.max_context = request->open_session->max_context;
		reply.kind_case = SLABD__REPLY__KIND_OPEN_SESSION;
		reply.open_session = &open;
		send_reply(fd, &reply);
		return;
	}
	case SLABD__REQUEST__KIND_CLOSE_SESSION:
		send_error(fd, id, SLABD__ERROR_CODE__ERROR_CODE_NOT_FOUND,
			   "session handle 'nope' not found");
		return;
	case SLABD__REQUEST__KIND_TOKENIZE: {
		Slabd__TokenizeReply tokenize = SLABD__TOKENIZE_REPLY__INIT;
		int32_t ids[] = { 1, 22, 333 };

		tokenize.ids = ids;
		tokenize.n_ids = 3;
		reply.kind_case = SLABD__REPLY__KIND_TOKENIZE;
		reply.tokenize = &tokenize;
		send_reply(fd, &reply);
		return;
	}
	case SLABD__REQUEST__KIND_STATS: {
		Slabd__StatsReply stats = SLABD__STATS_REPLY__INIT;
		Slabd__Metric metric = SLABD__METRIC__INIT;
		Slabd__Metric *metrics[] = { &metric };

		metric.name = "slabd_kv_blocks_used";
		metric.type = SLABD__METRIC_TYPE__METRIC_TYPE_GAUGE;
		metric.value = 3;
		stats.metrics = metrics;
		stats.n_metrics = 1;
		stats.prometheus_text = "# TYPE slabd_kv_blocks_used gauge\n"
					"slabd_kv_blocks_used 3\n";
		reply.kind_case = SLABD__REPLY__KIND_STATS;
		reply.stats = &stats;
		send_reply(fd, &reply);
		return;
	}
	case SLABD__REQUEST__KIND_HEALTH: {
		Slabd__HealthReply health = SLABD__HEALTH_REPLY__INIT;

		health.status = SLABD__HEALTH_STATUS__HEALTH_STATUS_DEGRADED;
		health.workers_live = 1;
		health.workers_configured = 2;
		health.message = "worker 1 is restarting";
		reply.kind_case = SLABD__REPLY__KIND_HEALTH;
		reply.health = &health;
		send_reply(fd, &reply);
		return;
	}
	default:
		send_error(fd, id, SLABD__ERROR_CODE__ERROR_CODE_UNIMPLEMENTED,
			   "request kind not scripted");
		return;
	}
}


/* Serves connections one after the other until the test process exits. */
static void *scripted_broker_run(void *arg)
{
	struct scripted_broker *broker = arg;

	for (;;) {
		int fd = accept4(broker->listen_fd, NULL, NULL, SOCK_CLOEXEC);

		if (fd < 0)
			return NULL;
		for (;;) {
			Slabd__Request *request;
			uint8_t *payload;
			ssize_t len = frame_read_fd(fd, 0, &payload);

			if (len <= 0)
				break;
			if (proto_unpack_request(payload, (size_t)len,
						 &request) < 0) {
				free(payload);
				break;
			}
			free(payload);
			send_scripted_reply(broker, fd, request);
			__atomic_add_fetch(&broker->requests, 1,
					   __ATOMIC_SEQ_CST);
			slabd__request__free_unpacked(request, NULL);
		}
		close(fd);
	}
}


static void scripted_broker_start(struct scripted_broker *broker)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };

	memset(broker, 0, sizeof(*broker));
	snprintf(broker->dir, sizeof(broker->dir), "/tmp/slabctl-test-XXXXXX");
	cr_assert_not_null(mkdtemp(broker->dir));
	snprintf(broker->path, sizeof(broker->path), "%s/broker.sock",
		 broker->dir);
	snprintf(address.sun_path, sizeof(address.sun_path), "%s",
		 broker->path);

	broker->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(broker->listen_fd, 0);
	cr_assert_eq(bind(broker->listen_fd, (struct sockaddr *)&address,
			  sizeof(address)), 0, "bind: %s", strerror(errno));
	cr_assert_eq(listen(broker->listen_fd, 8), 0);
	cr_assert_eq(pthread_create(&broker->thread, NULL, scripted_broker_run,
				    broker), 0);
}


static void scripted_broker_stop(struct scripted_broker *broker)
{
	/* Shutting the listening socket down makes accept() fail, which ends
	 * the thread once its current connection is closed. */
	shutdown(broker->listen_fd, SHUT_RDWR);
	pthread_join(broker->thread, NULL);
	close(broker->listen_fd);
	unlink(broker->path);
	rmdir(broker->dir);
}


/* ---- Command line without a broker ------------------------------------------ */


Test(slabctl, help_documents_every_option, .timeout = TEST_TIMEOUT_S)
{
	static const char *const options[] = {
		"--socket", "--session", "--max-tokens", "--temperature",
		"--top-p", "--top-k", "--min-p", "--repetition-penalty",
		"--seed", "--stop", "--no-echo", "--verbose", "--context",
		"--policy", "--n-keep", "--prometheus", "SLABD_SOCKET",
		"session open", "session close", "session list", "prefill",
		"tokenize", "stats", "health",
	};
	const char *args[] = { "--help", NULL };
	struct child_result result;

	run_slabctl(args, "/nonexistent/slabd.sock", NULL, NULL, &result);
	cr_assert_eq(result.status, 0, "stderr: %s", result.err);
	for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++)
		cr_expect_not_null(strstr(result.out, options[i]),
				   "--help does not mention %s", options[i]);
	cr_assert_str_empty(result.err);
}


Test(slabctl, command_help_exits_zero, .timeout = TEST_TIMEOUT_S)
{
	const char *args[] = { "generate", "--help", NULL };
	struct child_result result;

	run_slabctl(args, "/nonexistent/slabd.sock", NULL, NULL, &result);
	cr_assert_eq(result.status, 0);
	cr_assert_not_null(strstr(result.out, "--max-tokens"));
}


Test(slabctl, bad_values_exit_2_naming_option, .timeout = TEST_TIMEOUT_S)
{
	static const char *const cases[][6] = {
		{ "generate", "--max-tokens", "ten", "hi", NULL },
		{ "generate", "--max-tokens", "-1", "hi", NULL },
		{ "generate", "--max-tokens", "4294967296", "hi", NULL },
		{ "generate", "--temperature", "-0.5", "hi", NULL },
		{ "generate", "--temperature", "nan", "hi", NULL },
		{ "generate", "--top-p", "0", "hi", NULL },
		{ "generate", "--top-p", "1.5", "hi", NULL },
		{ "generate", "--top-k", "x", "hi", NULL },
		{ "generate", "--min-p", "2", "hi", NULL },
		{ "generate", "--repetition-penalty", "0", "hi", NULL },
		{ "generate", "--seed", "18446744073709551616", "hi", NULL },
		{ "generate", "--stop", "", "hi", NULL },
		{ "session", "open", "--context", "big", NULL },
		{ "session", "open", "--policy", "drop", NULL },
		{ "session", "open", "--n-keep", "1e3", NULL },
		{ "session", "open", "--seed", "", NULL },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *option = cases[i][0][0] == 's' ? cases[i][2] :
							     cases[i][1];
		struct child_result result;

		run_slabctl(cases[i], "/nonexistent/slabd.sock", NULL, NULL,
			    &result);
		cr_expect_eq(result.status, 2, "%s %s: status %d",
			     option, cases[i][0][0] == 's' ? cases[i][3] :
							     cases[i][2],
			     result.status);
		cr_expect_not_null(strstr(result.err, option),
				   "message does not name %s: %s", option,
				   result.err);
	}
}


Test(slabctl, usage_errors_exit_2, .timeout = TEST_TIMEOUT_S)
{
	static const char *const cases[][5] = {
		{ NULL },
		{ "frobnicate", NULL },
		{ "generate", NULL },
		{ "generate", "--bogus", "hi", NULL },
		{ "generate", "--session", NULL },
		{ "generate", "one", "two", NULL },
		{ "session", NULL },
		{ "session", "reopen", NULL },
		{ "session", "close", NULL },
		{ "prefill", "text", NULL },
		{ "tokenize", NULL },
		{ "health", "extra", NULL },
	};
	static const char *const expected[] = {
		"missing COMMAND", "frobnicate", "missing PROMPT", "--bogus",
		"--session", "two", "session", "reopen", "missing HANDLE",
		"--session", "missing TEXT", "extra",
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct child_result result;

		run_slabctl(cases[i], "/nonexistent/slabd.sock", NULL, NULL,
			    &result);
		cr_expect_eq(result.status, 2, "case %zu: status %d", i,
			     result.status);
		cr_expect_not_null(strstr(result.err, expected[i]),
				   "case %zu: '%s' not in: %s", i, expected[i],
				   result.err);
	}
}


Test(slabctl, missing_socket_exits_3, .timeout = TEST_TIMEOUT_S)
{
	const char *args[] = { "health", NULL };
	struct child_result result;

	run_slabctl(args, "/nonexistent/slabd.sock", NULL, NULL, &result);
	cr_assert_eq(result.status, 3);
	cr_assert_not_null(strstr(result.err, "/nonexistent/slabd.sock"),
			   "stderr: %s", result.err);
}


Test(slabctl, socket_option_beats_env, .timeout = TEST_TIMEOUT_S)
{
	const char *args[] = { "--socket", "/nonexistent/other.sock", "stats",
			       NULL };
	struct child_result result;

	run_slabctl(args, "/nonexistent/slabd.sock", NULL, NULL, &result);
	cr_assert_eq(result.status, 3);
	cr_assert_not_null(strstr(result.err, "/nonexistent/other.sock"),
			   "stderr: %s", result.err);
}


Test(slabctl, default_socket_under_runtime_dir, .timeout = TEST_TIMEOUT_S)
{
	const char *args[] = { "health", NULL };
	struct child_result result;

	run_slabctl(args, NULL, "/nonexistent/run", NULL, &result);
	cr_assert_eq(result.status, 3);
	cr_assert_not_null(strstr(result.err,
				  "/nonexistent/run/slabd/default.sock"),
			   "stderr: %s", result.err);

	run_slabctl(args, NULL, NULL, NULL, &result);
	cr_assert_eq(result.status, 3);
	cr_assert_not_null(strstr(result.err, "/run/slabd/default.sock"),
			   "stderr: %s", result.err);
}


/* ---- Against the scripted broker ------------------------------------------- */


Test(slabctl, generate_streams_prompt_and_tokens, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "generate", "--max-tokens", "8", "--stop",
			       "\n", "--temperature", "0", "--verbose",
			       "Hello", NULL };
	run_slabctl(args, broker.path, NULL, NULL, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 0, "stderr: %s", result.err);
	cr_assert_str_eq(result.out, "Hello there!\n");
	cr_assert_not_null(strstr(result.err, "EOS"), "stderr: %s",
			   result.err);
	cr_assert_not_null(strstr(result.err, "1.5 ms"), "stderr: %s",
			   result.err);
}


Test(slabctl, generate_no_echo, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "generate", "--no-echo", "Hello", NULL };
	run_slabctl(args, broker.path, NULL, NULL, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 0, "stderr: %s", result.err);
	cr_assert_str_eq(result.out, " there!\n");
	cr_assert_str_empty(result.err);
}


Test(slabctl, server_error_exits_1, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "session", "close", "nope", NULL };
	run_slabctl(args, broker.path, NULL, NULL, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 1);
	cr_assert_not_null(strstr(result.err, "NOT_FOUND"), "stderr: %s",
			   result.err);
	cr_assert_not_null(strstr(result.err, "'nope' not found"),
			   "stderr: %s", result.err);
}


Test(slabctl, failed_generate_prints_nothing, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "generate", "--session", "nope", "Hello", NULL };
	run_slabctl(args, broker.path, NULL, NULL, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 1, "stderr: %s", result.err);
	cr_assert_str_empty(result.out, "stdout: %s", result.out);
	cr_assert_not_null(strstr(result.err, "NOT_FOUND"), "stderr: %s",
			   result.err);
}


Test(slabctl, health_not_ok_exits_1, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "health", NULL };
	run_slabctl(args, broker.path, NULL, NULL, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 1);
	cr_assert_str_eq(result.out,
			 "DEGRADED: 1 of 2 workers live; worker 1 is restarting\n");
}


Test(slabctl, session_tokenize_and_stats, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);

	const char *open_args[] = { "session", "open", "--context", "256",
				    "--policy", "shift", "--n-keep", "4",
				    NULL };
	run_slabctl(open_args, broker.path, NULL, NULL, &result);
	cr_expect_eq(result.status, 0, "stderr: %s", result.err);
	cr_expect_str_eq(result.out, "0.1.feedbeef\n");

	const char *tokenize_args[] = { "tokenize", "a b", NULL };
	run_slabctl(tokenize_args, broker.path, NULL, NULL, &result);
	cr_expect_eq(result.status, 0, "stderr: %s", result.err);
	cr_expect_str_eq(result.out, "1 22 333\n");

	const char *stats_args[] = { "stats", NULL };
	run_slabctl(stats_args, broker.path, NULL, NULL, &result);
	cr_expect_eq(result.status, 0, "stderr: %s", result.err);
	cr_expect_str_eq(result.out, "slabd_kv_blocks_used 3\n");

	const char *prometheus_args[] = { "stats", "--prometheus", NULL };
	run_slabctl(prometheus_args, broker.path, NULL, NULL, &result);
	cr_expect_eq(result.status, 0, "stderr: %s", result.err);
	cr_expect_not_null(strstr(result.out, "# TYPE slabd_kv_blocks_used"));

	scripted_broker_stop(&broker);
}


static void send_sigint(pid_t pid)
{
	kill(pid, SIGINT);
}


Test(slabctl, ctrl_c_cancels_and_waits_for_done, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct child_result result;

	scripted_broker_start(&broker);
	const char *args[] = { "generate", "--no-echo", "--verbose",
			       SLOW_PROMPT, NULL };
	run_slabctl(args, broker.path, NULL, send_sigint, &result);
	scripted_broker_stop(&broker);

	cr_assert_eq(result.status, 130, "stderr: %s", result.err);
	cr_assert_not_null(strstr(result.err, "CANCELLED"), "stderr: %s",
			   result.err);
	/* Hello is request 1 and Generate request 2. */
	cr_assert_eq(broker.cancel_target, 2);
}


/* ---- libslab directly --------------------------------------------------------- */


struct cancel_after {
	int tokens_seen;
	int stop_after;
};


static int count_and_cancel(const struct slab_token *token, void *user)
{
	struct cancel_after *state = user;

	(void)token;
	state->tokens_seen++;
	return state->tokens_seen >= state->stop_after;
}


Test(libslab, callback_cancel_then_next_call, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct slab_generate_options options;
	struct slab_generate_result result;
	struct cancel_after state = { .stop_after = 3 };
	struct slab_server_info info;
	struct slab_client *client;
	int32_t *ids;
	size_t n_ids;

	scripted_broker_start(&broker);
	cr_assert_eq(slab_connect(broker.path, &client), 0);
	cr_assert_eq(slab_hello(client, &info), 0);
	cr_assert_str_eq(info.server_version, "scripted");
	cr_assert_eq(info.model.vocab_size, 512);

	slab_generate_options_init(&options);
	options.prompt = SLOW_PROMPT;
	cr_assert_eq(slab_generate(client, &options, count_and_cancel, &state,
				   &result), 0, "%s",
		     slab_error_message(client));
	cr_assert_eq(result.finish_reason, SLAB_FINISH_CANCELLED);
	cr_assert_eq(state.tokens_seen, 3);
	cr_assert_eq(result.text_len, 0,
		     "a streamed result carries only bytes no token carried");
	slab_generate_result_free(&result);

	/* The Cancel's own reply must not confuse the next call. */
	cr_assert_eq(slab_tokenize(client, "x", false, &ids, &n_ids), 3,
		     "%s", slab_error_message(client));
	cr_assert_eq(ids[2], 333);
	free(ids);

	slab_close(client);
	scripted_broker_stop(&broker);
	cr_assert_eq(broker.cancel_target, 2);
}


Test(libslab, generate_without_stream, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct slab_generate_options options;
	struct slab_generate_result result;
	struct slab_client *client;

	scripted_broker_start(&broker);
	cr_assert_eq(slab_connect(broker.path, &client), 0);

	slab_generate_options_init(&options);
	options.prompt = "Hello";
	cr_assert_eq(slab_generate(client, &options, NULL, NULL, &result), 0);
	cr_assert_eq(result.finish_reason, SLAB_FINISH_EOS);
	cr_assert_str_eq(result.text, " there!");
	cr_assert_eq(result.text_len, 7);
	cr_assert_eq(result.completion_tokens, 2);
	slab_generate_result_free(&result);

	options.session = "nope";
	cr_assert_eq(slab_generate(client, &options, NULL, NULL, &result),
		     -ENOENT);
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_NOT_FOUND);
	cr_assert_str_eq(slab_error_message(client),
			 "session handle 'nope' not found");
	slab_generate_result_free(&result);

	slab_close(client);
	scripted_broker_stop(&broker);
}


Test(libslab, rejects_prompt_text_and_ids, .timeout = TEST_TIMEOUT_S)
{
	struct scripted_broker broker;
	struct slab_generate_options options;
	struct slab_generate_result result;
	struct slab_client *client;
	int32_t ids[] = { 1 };

	scripted_broker_start(&broker);
	cr_assert_eq(slab_connect(broker.path, &client), 0);

	slab_generate_options_init(&options);
	options.prompt = "Hello";
	options.prompt_ids = ids;
	options.n_prompt_ids = 1;
	cr_assert_eq(slab_generate(client, &options, NULL, NULL, &result),
		     -EINVAL);
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_NONE);
	cr_assert_not_null(strstr(slab_error_message(client), "give one"));

	slab_close(client);
	scripted_broker_stop(&broker);
	cr_assert_eq(broker.requests, 0);
}


Test(libslab, default_socket_path_order, .timeout = TEST_TIMEOUT_S)
{
	char path[128];

	cr_assert_eq(setenv("SLABD_SOCKET", "/tmp/a.sock", 1), 0);
	cr_assert_eq(setenv("XDG_RUNTIME_DIR", "/run/user/1000", 1), 0);
	cr_assert_eq(slab_default_socket_path(path, sizeof(path)), 11);
	cr_assert_str_eq(path, "/tmp/a.sock");

	cr_assert_eq(unsetenv("SLABD_SOCKET"), 0);
	cr_assert_gt(slab_default_socket_path(path, sizeof(path)), 0);
	cr_assert_str_eq(path, "/run/user/1000/slabd/default.sock");

	cr_assert_eq(unsetenv("XDG_RUNTIME_DIR"), 0);
	cr_assert_gt(slab_default_socket_path(path, sizeof(path)), 0);
	cr_assert_str_eq(path, "/run/slabd/default.sock");

	cr_assert_eq(slab_default_socket_path(path, 8), -ENAMETOOLONG);
}


Test(libslab, connect_missing_socket_fails, .timeout = TEST_TIMEOUT_S)
{
	struct slab_client *client;
	char long_path[200];

	cr_assert_eq(slab_connect("/nonexistent/slabd.sock", &client), -ENOENT);
	cr_assert_null(client);

	memset(long_path, 'a', sizeof(long_path) - 1);
	long_path[0] = '/';
	long_path[sizeof(long_path) - 1] = '\0';
	cr_assert_eq(slab_connect(long_path, &client), -ENAMETOOLONG);
}
