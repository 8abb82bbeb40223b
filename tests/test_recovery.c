/*
 * End-to-end tests of recovery. Workers are killed, hang or send malformed
 * replies in the middle of generations. A step kills every worker it runs
 * on, workers are killed at random under load, the broker is killed and
 * restarted on its shared memory, and SIGTERM drains it. Each greedy output
 * must equal the fault-free one from slab-run bit for bit, because a step
 * is idempotent and a retried step draws the same numbers.
 */
#include "tests/service_helpers.h"

#include <pthread.h>

#define TEST_TIMEOUT_S 120


/* Kills worker 0 once the generation has `after` tokens. */
struct kill_plan {
	struct service *service;
	size_t after;
	bool done;
	pid_t killed;            /* pid of the worker killed, or 0 */
	size_t token_index;      /* tokens received when the kill was sent */
};


static void kill_worker_once(struct generation *g)
{
	struct kill_plan *plan = g->user;
	pid_t pid;

	if (plan->done || g->n_tokens < plan->after)
		return;
	plan->done = true;
	pid = service_worker_pid_with_id(plan->service, 0);
	if (pid > 0 && kill(pid, SIGKILL) == 0)
		plan->killed = pid;
	plan->token_index = g->n_tokens;
}


/* Maximum gap between token arrivals from index `from` on, in ms. */
static double max_gap_ms(const struct generation *g, size_t from)
{
	double max_gap = 0;

	for (size_t i = from + 1; i < g->n_tokens; i++) {
		double gap = (double)(g->arrival_ns[i] - g->arrival_ns[i - 1]) / 1e6;

		if (gap > max_gap)
			max_gap = gap;
	}
	return max_gap;
}


/*
 * Returns the metric once it reaches at_least, or its last value after 5 s.
 * A replacement worker starts asynchronously, so a generation retried on
 * another worker can finish before the restart is counted.
 */
static double wait_for_metric(struct slab_client *client, const char *name,
			      double at_least)
{
	uint64_t deadline = service_now_ns() + 5000000000ull;
	double value;

	while ((value = service_metric(client, name)) < at_least &&
	       service_now_ns() < deadline)
		service_sleep_ms(10);
	return value;
}


Test(recovery, worker_sigkill_mid_generation, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	static char expected[16384];
	struct kill_plan plan = { .service = &service, .after = 20 };
	struct slab_generate_options options;
	struct slab_client *client;

	reference_completion("Once upon a time", 400, expected,
			     sizeof(expected));
	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);

	g.on_token = kill_worker_once;
	g.user = &plan;
	generation_greedy(&options, NULL, "Once upon a time", 400);
	generation_run(client, &options, &g);
	cr_assert(plan.done, "the generation ended before the kill");
	cr_assert_gt(plan.killed, 0, "worker 0 was not found");
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	/* The uninterrupted greedy text ends with an end token after 342
	 * tokens, before max_tokens. */
	cr_assert_eq(g.result.finish_reason, SLAB_FINISH_EOS, "finish %s",
		     slab_finish_reason_name(g.result.finish_reason));
	cr_assert_gt(g.n_tokens, 300);
	cr_assert_str_eq(g.text, expected);

	cr_assert_geq(wait_for_metric(client, "slabd_worker_restarts_total", 1),
		      1, "no worker restart within 5 s");
	cr_assert_geq(service_metric(client, "slabd_step_retries_total"), 1);
	cr_log_info("worker SIGKILL after token %zu: maximum gap between tokens "
		    "afterwards %.1f ms", plan.token_index,
		    max_gap_ms(&g, plan.token_index - 1));
	slab_close(client);
	service_stop(&service);
}


/* Runs one greedy generation against a broker with a fault and checks it. */
static void check_fault_recovered(const char *fault, const char *log_text)
{
	static struct service service;
	static struct generation g;
	static char expected[16384];
	const char *const extra[] = { "--inject-fault", fault,
				      "--step-timeout-floor", "500",
				      "--step-timeout-factor", "10", NULL };
	struct slab_generate_options options;
	struct slab_client *client;
	uint64_t started;

	reference_completion("Lily and Ben went to the park", 200, expected,
			     sizeof(expected));
	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);

	started = service_now_ns();
	generation_greedy(&options, NULL, "Lily and Ben went to the park", 200);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	cr_assert_eq(g.result.finish_reason, SLAB_FINISH_LENGTH);
	cr_assert_str_eq(g.text, expected);
	cr_log_info("%s: generation took %.0f ms, maximum gap %.1f ms", fault,
		    (double)(service_now_ns() - started) / 1e6,
		    max_gap_ms(&g, 0));

	cr_assert_geq(wait_for_metric(client, "slabd_worker_restarts_total", 1),
		      1, "no worker restart within 5 s");
	cr_assert_geq(service_metric(client, "slabd_step_retries_total"), 1);
	cr_assert(service_log_contains(&service, log_text),
		  "broker log lacks '%s'", log_text);
	slab_close(client);
	service_stop(&service);
}


Test(recovery, hung_worker_killed, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	check_fault_recovered("hang:step:20", "missed the");
}


Test(recovery, malformed_reply_retried, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	check_fault_recovered("malformed:step:20", "malformed message");
}


/* A client thread: one greedy generation on its own connection. */
struct client_thread {
	const struct service *service;
	const char *session;
	const char *prompt;
	uint32_t max_tokens;
	volatile int started;     /* set once the first token arrived */
	int connect_rc;
	struct generation g;
};


static void mark_started(struct generation *g)
{
	struct client_thread *t = g->user;

	t->started = 1;
}


static void *client_thread_run(void *arg)
{
	struct client_thread *t = arg;
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	t->connect_rc = slab_connect(t->service->socket_path, &client);
	if (t->connect_rc < 0)
		return NULL;
	t->g.on_token = mark_started;
	t->g.user = t;
	generation_greedy(&options, t->session, t->prompt, t->max_tokens);
	generation_run(client, &options, &t->g);
	slab_close(client);
	return NULL;
}


Test(recovery, poison_step_fails_request, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation first, poisoned, again;
	static struct client_thread bystander;
	static char expected[16384];
	const char *const extra[] = { "--inject-fault", "crash:position:100",
				      NULL };
	char handle[SLAB_HANDLE_SIZE];
	struct slab_generate_options options;
	struct slab_session_info info;
	struct slab_client *client;
	pthread_t thread;
	int rc;

	/* The bystander stays below position 100: 3 prompt tokens and 80. */
	reference_completion("One day", 80, expected, sizeof(expected));
	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);

	/* Fill the session to 95 positions, short of the fault. */
	rc = slab_session_open(client, NULL, handle, NULL);
	cr_assert_eq(rc, 0, "open: %s", slab_error_message(client));
	generation_greedy(&options, handle, "Once upon a time", 90);
	generation_run(client, &options, &first);
	cr_assert_eq(first.rc, 0, "generate: %s", first.error);
	cr_assert_eq(first.result.committed_length, 95);

	bystander = (struct client_thread){ .service = &service,
					    .prompt = "One day",
					    .max_tokens = 80 };
	cr_assert_eq(pthread_create(&thread, NULL, client_thread_run,
				    &bystander), 0);
	for (int i = 0; i < 1000 && !bystander.started; i++)
		service_sleep_ms(2);
	cr_assert(bystander.started, "the bystander did not start in 2 s");

	/* Continuing the session computes position 100, which crashes. */
	generation_greedy(&options, handle, NULL, 50);
	generation_run(client, &options, &poisoned);
	pthread_join(thread, NULL);

	cr_assert_lt(poisoned.rc, 0, "the poisoned generation succeeded");
	cr_assert_eq(poisoned.result.finish_reason, SLAB_FINISH_ERROR,
		     "finish %s",
		     slab_finish_reason_name(poisoned.result.finish_reason));
	cr_assert_eq(poisoned.error_code, SLAB_ERROR_INTERNAL);
	cr_assert_not_null(strstr(poisoned.error, "killed 2 workers"),
			   "error: %s", poisoned.error);
	cr_assert_not_null(strstr(poisoned.error, "position 100"),
			   "error: %s", poisoned.error);
	cr_assert_eq(poisoned.result.committed_length, 100);

	cr_assert_eq(bystander.connect_rc, 0);
	cr_assert_eq(bystander.g.rc, 0, "bystander: %s", bystander.g.error);
	cr_assert_eq(bystander.g.result.finish_reason, SLAB_FINISH_LENGTH);
	cr_assert_str_eq(bystander.g.text, expected);

	/* The session keeps its committed positions and takes new requests. */
	cr_assert(service_find_session(client, handle, &info));
	cr_assert_eq(info.committed_length, 100);
	generation_greedy(&options, handle, NULL, 10);
	generation_run(client, &options, &again);
	cr_assert_eq(again.result.finish_reason, SLAB_FINISH_ERROR,
		     "finish %s: %s",
		     slab_finish_reason_name(again.result.finish_reason),
		     again.error);
	cr_assert_not_null(strstr(again.error, "killed 2 workers"), "error: %s",
			   again.error);
	cr_assert(service_find_session(client, handle, &info));
	cr_assert_eq(info.committed_length, 100);
	cr_assert_geq(service_metric(client, "slabd_poison_steps_total"), 2);
	rc = slab_session_close(client, handle);
	cr_assert_eq(rc, 0, "close: %s", slab_error_message(client));
	cr_assert_eq(service_metric(client, "slabd_kv_blocks_used"), 0);

	slab_close(client);
	service_stop(&service);
}


/* ---- Chaos ------------------------------------------------------------------- */

#define CHAOS_SESSIONS 16
#define CHAOS_TOKENS 150
#define CHAOS_SECONDS 4

static const char *const chaos_prompts[CHAOS_SESSIONS] = {
	"Once upon a time", "The cat sat", "Lily and Ben", "One day",
	"Tom had a big red ball", "The sun was hot and", "Sam liked to",
	"There was a little bird", "The dog ran", "Mom said",
	"A big tree", "The girl saw a", "Max was a", "In the park",
	"The fish", "Anna and her",
};

struct chaos_client {
	const struct service *service;
	const char *prompt;
	const char *expected;
	volatile int *stop;
	int runs;
	int mismatches;
	int failures;
	char last_error[SLAB_MESSAGE_SIZE];
	struct generation g;
};


/* Opens a session, generates, checks and closes, until the stop flag is set. */
static void *chaos_client_run(void *arg)
{
	struct chaos_client *c = arg;
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	if (slab_connect(c->service->socket_path, &client) < 0) {
		c->failures++;
		return NULL;
	}
	for (int i = 0; i < 200 && (!*c->stop || c->runs == 0); i++) {
		char handle[SLAB_HANDLE_SIZE];
		int rc = slab_session_open(client, NULL, handle, NULL);

		if (rc < 0) {
			c->failures++;
			snprintf(c->last_error, sizeof(c->last_error),
				 "open: %s", slab_error_message(client));
			break;
		}
		generation_greedy(&options, handle, c->prompt, CHAOS_TOKENS);
		generation_run(client, &options, &c->g);
		c->runs++;
		if (c->g.rc != 0) {
			c->failures++;
			snprintf(c->last_error, sizeof(c->last_error), "%s",
				 c->g.error);
		} else if (strcmp(c->g.text, c->expected) != 0) {
			c->mismatches++;
		}
		if (slab_session_close(client, handle) < 0) {
			c->failures++;
			snprintf(c->last_error, sizeof(c->last_error),
				 "close: %s", slab_error_message(client));
		}
	}
	slab_close(client);
	return NULL;
}


struct chaos_killer {
	struct service *service;
	volatile int *stop;
	int kills;
};


/* Sends SIGKILL to a random worker every 50 to 200 ms until stopped. */
static void *chaos_killer_run(void *arg)
{
	struct chaos_killer *k = arg;
	unsigned seed = (unsigned)getpid();

	/* Bounded: a few seconds at 50 ms or more per round. */
	for (int round = 0; round < 200 && !*k->stop; round++) {
		pid_t pids[SERVICE_MAX_WORKERS];
		size_t n;

		service_sleep_ms(50 + (unsigned)rand_r(&seed) % 151);
		n = service_worker_pids(k->service, pids, SERVICE_MAX_WORKERS);
		if (n > 0 && kill(pids[(size_t)rand_r(&seed) % n], SIGKILL) == 0)
			k->kills++;
	}
	return NULL;
}


Test(recovery, chaos_random_worker_kills, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct chaos_client clients[CHAOS_SESSIONS];
	static char expected[CHAOS_SESSIONS][8192];
	static struct chaos_killer killer;
	volatile int clients_stop = 0, killer_stop = 0;
	pthread_t client_threads[CHAOS_SESSIONS], killer_thread;
	struct slab_client *client;
	int runs = 0, failures = 0, mismatches = 0;
	double restarts, retries;

	for (int i = 0; i < CHAOS_SESSIONS; i++)
		reference_completion(chaos_prompts[i], CHAOS_TOKENS,
				     expected[i], sizeof(expected[i]));
	service_init(&service);
	service_start(&service, NULL);

	killer = (struct chaos_killer){ .service = &service,
					.stop = &killer_stop };
	for (int i = 0; i < CHAOS_SESSIONS; i++) {
		clients[i] = (struct chaos_client){
			.service = &service, .prompt = chaos_prompts[i],
			.expected = expected[i], .stop = &clients_stop,
		};
		cr_assert_eq(pthread_create(&client_threads[i], NULL,
					    chaos_client_run, &clients[i]), 0);
	}
	cr_assert_eq(pthread_create(&killer_thread, NULL, chaos_killer_run,
				    &killer), 0);

	service_sleep_ms(CHAOS_SECONDS * 1000);
	killer_stop = 1;
	pthread_join(killer_thread, NULL);
	clients_stop = 1;
	for (int i = 0; i < CHAOS_SESSIONS; i++)
		pthread_join(client_threads[i], NULL);

	for (int i = 0; i < CHAOS_SESSIONS; i++) {
		runs += clients[i].runs;
		failures += clients[i].failures;
		mismatches += clients[i].mismatches;
		cr_expect_eq(clients[i].failures, 0, "client %d ('%s'): %d "
			     "failures, last: %s", i, chaos_prompts[i],
			     clients[i].failures, clients[i].last_error);
		cr_expect_eq(clients[i].mismatches, 0, "client %d ('%s'): %d of "
			     "%d outputs differ from slab-run", i,
			     chaos_prompts[i], clients[i].mismatches,
			     clients[i].runs);
	}

	client = service_connect(&service);
	restarts = service_metric(client, "slabd_worker_restarts_total");
	retries = service_metric(client, "slabd_step_retries_total");
	cr_log_info("chaos: %d workers killed, %.0f restarts, %.0f steps "
		    "retried, %d generations, %d failed, %d differ", killer.kills,
		    restarts, retries, runs, failures, mismatches);
	cr_assert_gt(killer.kills, 5, "only %d workers killed", killer.kills);
	cr_assert_geq(restarts, 1);
	cr_assert_geq(runs, CHAOS_SESSIONS);
	cr_assert_eq(service_metric(client, "slabd_sessions_open"), 0);
	cr_assert_eq(service_metric(client, "slabd_kv_blocks_used"), 0);
	slab_close(client);
	service_stop(&service);
}


/* ---- Broker restart and drain ---------------------------------------------------- */


/* Generates max_tokens greedily after a text prompt or none; asserts LENGTH. */
static void generate_on(struct slab_client *client, const char *handle,
			const char *prompt, uint32_t max_tokens,
			struct generation *g)
{
	struct slab_generate_options options;

	generation_greedy(&options, handle, prompt, max_tokens);
	generation_run(client, &options, g);
	cr_assert_eq(g->rc, 0, "generate: %s", g->error);
	cr_assert_eq(g->result.finish_reason, SLAB_FINISH_LENGTH);
	cr_assert_eq(g->n_tokens, max_tokens);
}


Test(recovery, broker_restart_keeps_sessions, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation before, after, whole;
	const char *const other_shape[] = { "--max-context", "256", NULL };
	char handle[SLAB_HANDLE_SIZE];
	struct slab_session_options session_options;
	struct slab_session_info info;
	struct slab_client *client;
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	slab_session_options_init(&session_options);
	session_options.has_seed = true;
	session_options.seed = 99;
	rc = slab_session_open(client, &session_options, handle, NULL);
	cr_assert_eq(rc, 0, "open: %s", slab_error_message(client));
	generate_on(client, handle, "Once upon a time", 40, &before);
	cr_assert_eq(before.result.committed_length, 45);
	slab_close(client);

	service_kill(&service);
	cr_assert(service_segment_exists(service.instance, "kv"));
	cr_assert(service_segment_exists(service.instance, "ctl"));

	/* Another shape on the same segments is rejected and touches nothing. */
	service_spawn_model(&service, SERVICE_MODEL, SERVICE_TOKENIZER,
			    other_shape);
	cr_assert(service_wait_exit(&service, 10000),
		  "slabd with another --max-context did not exit");
	cr_assert(WIFEXITED(service.status));
	cr_assert_eq(WEXITSTATUS(service.status), 1);
	{
		char segment[96], command[128];

		snprintf(segment, sizeof(segment), "slabd-%s-", service.instance);
		snprintf(command, sizeof(command), "--instance %s --remove-segments",
			 service.instance);
		cr_assert(service_log_contains(&service, segment),
			  "the error does not name segment %s", segment);
		cr_assert(service_log_contains(&service, command),
			  "the error does not give '%s'", command);
	}
	cr_assert(service_segment_exists(service.instance, "kv"));

	/* The same configuration reattaches and serves the old handle. */
	service_start(&service, NULL);
	{
		static char log[1 << 16];

		cr_assert(service_log_contains(&service, "reattached"),
			  "the restarted broker did not log a reattach:\n%s",
			  service_log_tail(&service, log, sizeof(log)));
	}
	client = service_connect(&service);
	cr_assert(service_find_session(client, handle, &info),
		  "session %s not listed after the restart", handle);
	cr_assert_eq(info.committed_length, 45);
	generate_on(client, handle, NULL, 40, &after);
	cr_assert_eq(after.result.committed_length, 85);

	/* One uninterrupted generation of 80 tokens gives the same tokens. */
	generate_on(client, NULL, "Once upon a time", 80, &whole);
	for (size_t i = 0; i < 40; i++) {
		cr_assert_eq(before.ids[i], whole.ids[i], "token %zu", i);
		cr_assert_eq(after.ids[i], whole.ids[40 + i], "token %zu",
			     40 + i);
	}
	rc = slab_session_close(client, handle);
	cr_assert_eq(rc, 0, "close: %s", slab_error_message(client));
	slab_close(client);
	service_stop(&service);
}


Test(recovery, sigterm_drains_generation, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct client_thread running;
	static char expected[16384];
	pthread_t thread;
	struct generation *g = &running.g;

	reference_completion("Once upon a time", 480, expected,
			     sizeof(expected));
	service_init(&service);
	service_start(&service, NULL);
	running = (struct client_thread){ .service = &service,
					  .prompt = "Once upon a time",
					  .max_tokens = 480 };
	cr_assert_eq(pthread_create(&thread, NULL, client_thread_run, &running),
		     0);
	for (int i = 0; i < 1000 && !running.started; i++)
		service_sleep_ms(1);
	cr_assert(running.started, "the generation did not start in 1 s");

	service_stop(&service);
	pthread_join(thread, NULL);

	cr_assert_eq(running.connect_rc, 0);
	cr_assert_eq(g->rc, 0, "generate during drain: %s", g->error);
	cr_assert(g->result.finish_reason == SLAB_FINISH_LENGTH ||
		  g->result.finish_reason == SLAB_FINISH_EOS ||
		  g->result.finish_reason == SLAB_FINISH_CANCELLED,
		  "finish %s", slab_finish_reason_name(g->result.finish_reason));
	cr_assert_leq(g->n_tokens, g->result.completion_tokens);
	cr_assert_eq(strncmp(g->text, expected, g->text_len), 0,
		     "the text before the drain differs from slab-run");
	cr_log_info("drain: generation ended %s after %u tokens",
		    slab_finish_reason_name(g->result.finish_reason),
		    g->result.completion_tokens);
}
