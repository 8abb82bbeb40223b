/*
 * End-to-end tests of the service: the real slabd with two real workers on
 * stories260K, driven through libslab and through raw sockets. Outputs are
 * compared bit for bit with the golden files and with slab-run, which runs
 * the same engine in one process. Every test starts its own broker and
 * stops it with SIGTERM, checking that no process or segment remains.
 */
#include "tests/service_helpers.h"

#include <math.h>
#include <pthread.h>

#define TEST_TIMEOUT_S 90

/* Prompts of the concurrent clients: different lengths and texts. */
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


/* Reads a whole file into a new NUL-terminated buffer. */
static char *read_file(const char *path)
{
	FILE *file = fopen(path, "rb");
	char *text;
	long size;

	cr_assert_not_null(file, "open %s: %s", path, strerror(errno));
	fseek(file, 0, SEEK_END);
	size = ftell(file);
	fseek(file, 0, SEEK_SET);
	text = malloc((size_t)size + 1);
	cr_assert_not_null(text);
	cr_assert_eq(fread(text, 1, (size_t)size, file), (size_t)size);
	text[size] = '\0';
	fclose(file);
	return text;
}


/* Parses the ids after `label` in a golden .ids file. Returns their count. */
static size_t parse_ids(const char *text, const char *label, int32_t *ids,
			size_t max)
{
	const char *p = strstr(text, label);
	size_t n = 0;

	cr_assert_not_null(p, "golden ids lack '%s'", label);
	p += strlen(label);
	while (n < max) {
		char *end;
		long value = strtol(p, &end, 10);

		if (end == p)
			break;
		ids[n++] = (int32_t)value;
		p = end;
		if (*p == '\n' || *p == '\0')
			break;
	}
	return n;
}


/* Tokenizes text with BOS through the broker. Returns the count. */
static size_t tokenize(struct slab_client *client, const char *text,
		       int32_t *ids, size_t max)
{
	int32_t *out = NULL;
	size_t n = 0;
	int rc = slab_tokenize(client, text, true, &out, &n);

	cr_assert_geq(rc, 0, "tokenize: %s", slab_error_message(client));
	cr_assert_leq(n, max);
	memcpy(ids, out, n * sizeof(int32_t));
	free(out);
	return n;
}


/* Opens a session with the broker's maximum context and a fixed seed. */
static void open_session(struct slab_client *client, char *handle)
{
	struct slab_session_options options;
	int rc;

	slab_session_options_init(&options);
	options.has_seed = true;
	options.seed = 42;
	rc = slab_session_open(client, &options, handle, NULL);
	cr_assert_eq(rc, 0, "open session: %s", slab_error_message(client));
}


/* Greedy generation over token ids on a session; asserts it ends by LENGTH. */
static void generate_ids(struct slab_client *client, const char *session,
			 const int32_t *ids, size_t n_ids, uint32_t max_tokens,
			 struct generation *g)
{
	struct slab_generate_options options;

	generation_greedy(&options, session, NULL, max_tokens);
	options.prompt_ids = ids;
	options.n_prompt_ids = n_ids;
	generation_run(client, &options, g);
	cr_assert_eq(g->rc, 0, "generate: %s", g->error);
	cr_assert_eq(g->result.finish_reason, SLAB_FINISH_LENGTH, "finish %s",
		     slab_finish_reason_name(g->result.finish_reason));
	cr_assert_eq(g->n_tokens, max_tokens);
}


static void assert_same_ids(const struct generation *got,
			    const struct generation *expected)
{
	cr_assert_eq(got->n_tokens, expected->n_tokens);
	for (size_t i = 0; i < got->n_tokens; i++)
		cr_assert_eq(got->ids[i], expected->ids[i],
			     "token %zu: %d, expected %d", i, got->ids[i],
			     expected->ids[i]);
}


/* ---- Outputs --------------------------------------------------------------- */


Test(service, golden_output, .timeout = TEST_TIMEOUT_S, .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	char path[PATH_MAX];
	char expected[8192];
	int32_t golden_ids[256];
	struct slab_generate_options options;
	struct slab_client *client;
	const char *prompt = "Once upon a time";
	char *golden_text, *golden_id_text;
	size_t n_golden;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);

	generation_greedy(&options, NULL, prompt, 196);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	cr_assert_eq(g.result.finish_reason, SLAB_FINISH_LENGTH);
	cr_assert_eq(g.result.completion_tokens, 196);
	cr_assert_eq(g.result.prompt_tokens, 5);

	service_model_path(path, sizeof(path),
			   "../golden/stories260K-once-upon-a-time.n200.txt");
	golden_text = read_file(path);
	cr_assert_gt(strlen(golden_text), 0);
	cr_assert_eq(golden_text[strlen(golden_text) - 1], '\n');
	golden_text[strlen(golden_text) - 1] = '\0';
	snprintf(expected, sizeof(expected), "%s%s", prompt, g.text);
	cr_assert_str_eq(expected, golden_text);

	service_model_path(path, sizeof(path),
			   "../golden/stories260K-once-upon-a-time.n200.ids");
	golden_id_text = read_file(path);
	n_golden = parse_ids(golden_id_text, "generated_ids:", golden_ids, 256);
	cr_assert_eq(n_golden, 196);
	cr_assert_eq(g.n_tokens, n_golden);
	for (size_t i = 0; i < n_golden; i++)
		cr_assert_eq(g.ids[i], golden_ids[i], "token %zu: %d, golden %d",
			     i, g.ids[i], golden_ids[i]);

	free(golden_text);
	free(golden_id_text);
	slab_close(client);
	service_stop(&service);
}


struct client_thread {
	struct service *service;
	const char *prompt;
	uint32_t max_tokens;
	int connect_rc;
	struct generation g;
	pthread_t thread;
};


static void *client_thread_run(void *arg)
{
	struct client_thread *t = arg;
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	t->connect_rc = slab_connect(t->service->socket_path, &client);
	if (t->connect_rc < 0)
		return NULL;
	generation_greedy(&options, NULL, t->prompt, t->max_tokens);
	generation_run(client, &options, &t->g);
	slab_close(client);
	return NULL;
}


Test(service, concurrent_clients_match_reference, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct client_thread threads[N_PROMPTS];
	static char expected[N_PROMPTS][8192];
	pthread_t ids[N_PROMPTS];

	for (size_t i = 0; i < N_PROMPTS; i++)
		reference_completion(prompts[i], 150, expected[i],
				     sizeof(expected[i]));

	service_init(&service);
	service_start(&service, NULL);
	for (size_t i = 0; i < N_PROMPTS; i++) {
		threads[i] = (struct client_thread){ .service = &service,
						     .prompt = prompts[i],
						     .max_tokens = 150 };
		cr_assert_eq(pthread_create(&ids[i], NULL, client_thread_run,
					    &threads[i]), 0);
	}
	for (size_t i = 0; i < N_PROMPTS; i++)
		pthread_join(ids[i], NULL);

	for (size_t i = 0; i < N_PROMPTS; i++) {
		struct generation *g = &threads[i].g;

		cr_expect_eq(threads[i].connect_rc, 0, "client %zu: connect: %s",
			     i, strerror(-threads[i].connect_rc));
		cr_expect_eq(g->rc, 0, "client %zu: %s", i, g->error);
		cr_expect_eq(g->result.finish_reason, SLAB_FINISH_LENGTH,
			     "client %zu: finish %s", i,
			     slab_finish_reason_name(g->result.finish_reason));
		cr_expect_str_eq(g->text, expected[i], "client %zu, prompt '%s'",
				 i, prompts[i]);
	}
	service_stop(&service);
}


Test(service, prefill_then_generate_matches, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation whole, split;
	char whole_handle[SLAB_HANDLE_SIZE], split_handle[SLAB_HANDLE_SIZE];
	int32_t ids[128];
	uint32_t committed = 0;
	struct slab_client *client;
	size_t n, cut;
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	n = tokenize(client, "Lily and Ben went to the park to play", ids, 128);
	cr_assert_gt(n, 4);
	cut = n / 2;

	open_session(client, whole_handle);
	generate_ids(client, whole_handle, ids, n, 60, &whole);

	open_session(client, split_handle);
	rc = slab_prefill(client, split_handle, NULL, ids, cut, &committed);
	cr_assert_eq(rc, (int)cut, "prefill: %d, %s", rc,
		     slab_error_message(client));
	cr_assert_eq(committed, cut);
	generate_ids(client, split_handle, ids + cut, n - cut, 60, &split);
	cr_assert_eq(split.result.prompt_tokens, n - cut);
	assert_same_ids(&split, &whole);

	slab_close(client);
	service_stop(&service);
}


Test(service, two_turns_match_one, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation first, second, joined;
	char turns_handle[SLAB_HANDLE_SIZE], joined_handle[SLAB_HANDLE_SIZE];
	int32_t prompt1[64], prompt2[64], all[256];
	struct slab_session_info info;
	struct slab_client *client;
	size_t n1, n2, n_all = 0;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	n1 = tokenize(client, "The cat sat", prompt1, 64);
	n2 = tokenize(client, " Then the dog came", prompt2, 64);
	cr_assert_eq(prompt2[0], 1, "tokenize with BOS starts with id 1");

	open_session(client, turns_handle);
	generate_ids(client, turns_handle, prompt1, n1, 30, &first);
	generate_ids(client, turns_handle, prompt2 + 1, n2 - 1, 30, &second);
	cr_assert(service_find_session(client, turns_handle, &info));
	cr_assert_eq(info.committed_length, n1 + 30 + (n2 - 1) + 30);

	/* The same context as token ids, on a fresh session. */
	memcpy(all, prompt1, n1 * sizeof(int32_t));
	n_all = n1;
	memcpy(all + n_all, first.ids, 30 * sizeof(int32_t));
	n_all += 30;
	memcpy(all + n_all, prompt2 + 1, (n2 - 1) * sizeof(int32_t));
	n_all += n2 - 1;
	open_session(client, joined_handle);
	generate_ids(client, joined_handle, all, n_all, 30, &joined);
	assert_same_ids(&second, &joined);

	slab_close(client);
	service_stop(&service);
}


/* Runs one turn of decode_runs_match_single_steps on a session. */
static void run_turn(struct slab_client *client, const char *handle, int turn,
		     struct generation *g)
{
	static const char *const stop[] = { "." };
	struct slab_generate_options options;

	if (turn == 0) {
		/* Sampled, with the repetition penalty's history in the run. */
		generation_greedy(&options, handle, "Once upon a time", 37);
		options.temperature = 0.9f;
		options.has_top_p = true;
		options.top_p = 0.9f;
		options.has_repetition_penalty = true;
		options.repetition_penalty = 1.3f;
	} else if (turn == 1) {
		/* Greedy: a penalty strong enough to change the choices. */
		generation_greedy(&options, handle, " She", 60);
		options.has_repetition_penalty = true;
		options.repetition_penalty = 2.0f;
	} else if (turn == 2) {
		/* Ends on a stop string in the middle of a run. */
		generation_greedy(&options, handle, " Then", 100);
		options.stop = stop;
		options.n_stop = 1;
	} else {
		generation_greedy(&options, handle, " Next", 20);
	}
	generation_run(client, &options, g);
	cr_assert_eq(g->rc, 0, "turn %d: %s", turn, g->error);
}


/*
 * A session that decodes alone computes several tokens per step request.
 * Runs of up to 16 tokens, which end at block ends, at max_tokens and on a
 * stop string, must give the tokens, text, finish reason and session
 * length of one step per token, turn after turn on the same session. Long
 * runs matter for the repetition penalty, whose history the worker extends
 * within a run.
 */
Test(service, decode_runs_match_single_steps, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service single, runs;
	static struct generation expected[4], got[4];
	static const char *const single_args[] = { "--decode-run", "1", NULL };
	static const char *const run_args[] = { "--decode-run", "16",
						"--log-level", "debug", NULL };
	char single_handle[SLAB_HANDLE_SIZE], run_handle[SLAB_HANDLE_SIZE];
	struct slab_client *single_client, *run_client;

	service_init(&single);
	service_start(&single, single_args);
	service_init(&runs);
	service_start(&runs, run_args);
	single_client = service_connect(&single);
	run_client = service_connect(&runs);
	open_session(single_client, single_handle);
	open_session(run_client, run_handle);

	for (int turn = 0; turn < 4; turn++) {
		run_turn(single_client, single_handle, turn, &expected[turn]);
		run_turn(run_client, run_handle, turn, &got[turn]);
		assert_same_ids(&got[turn], &expected[turn]);
		cr_assert_str_eq(got[turn].text, expected[turn].text,
				 "turn %d", turn);
		cr_assert_eq(got[turn].result.finish_reason,
			     expected[turn].result.finish_reason, "turn %d",
			     turn);
		cr_assert_eq(got[turn].result.committed_length,
			     expected[turn].result.committed_length,
			     "turn %d", turn);
	}
	cr_assert_eq(expected[2].result.finish_reason, SLAB_FINISH_STOP,
		     "the third turn ends on its stop string");
	cr_assert(service_log_contains(&runs, "decode run of 16 tokens"),
		  "the broker ran no decode run");

	slab_close(single_client);
	slab_close(run_client);
	service_stop(&single);
	service_stop(&runs);
}


/*
 * Starts the second client of decode_run_yields once the first has 10
 * tokens. The worker is stopped meanwhile, so that the second request
 * reaches the broker while the first session's run is certain to go on.
 */
static void start_second_client(struct generation *g)
{
	struct client_thread *second = g->user;
	pid_t worker;

	if (g->n_tokens != 10)
		return;
	cr_assert_eq(service_worker_pids(second->service, &worker, 1), 1);
	cr_assert_eq(kill(worker, SIGSTOP), 0);
	cr_assert_eq(pthread_create(&second->thread, NULL, client_thread_run,
				    second), 0);
	service_sleep_ms(300);
	cr_assert_eq(kill(worker, SIGCONT), 0);
}


/* Counts the occurrences of text in the end of a service's log. */
static int log_count(const struct service *s, const char *text)
{
	static char log[1 << 16];
	const char *at = service_log_tail(s, log, sizeof(log));
	int count = 0;

	while ((at = strstr(at, text)) != NULL) {
		count++;
		at += strlen(text);
	}
	return count;
}


/*
 * A decode run may cover a whole generation, but a session that starts
 * meanwhile must not wait for it: the run ends after its current token and
 * both sessions are batched. With one worker, the short second generation
 * then finishes long before the first, whose greedy text runs the whole
 * 480 tokens. The worker computes those in about 15 ms, so it may finish
 * before the second request arrives. Such an attempt shows nothing and is
 * repeated.
 */
Test(service, decode_run_yields_to_new_session, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static const char *const args[] = { "--workers", "1", "--decode-run",
					    "1024", "--log-level", "debug",
					    NULL };
	static const char yielded[] = "ends for a waiting session";
	static struct service service;
	static struct generation first;
	static struct client_thread second;
	static char expected_first[8192], expected_second[8192];
	struct slab_generate_options options;
	struct slab_client *client;
	bool seen = false;

	reference_completion("Lily and Ben went to the park", 480, expected_first,
			     sizeof(expected_first));
	reference_completion("Sam liked to", 20, expected_second,
			     sizeof(expected_second));
	service_init(&service);
	service_start(&service, args);
	client = service_connect(&service);

	for (int attempt = 0; attempt < 5 && !seen; attempt++) {
		int before = log_count(&service, yielded);

		memset(&first, 0, sizeof(first));
		second = (struct client_thread){ .service = &service,
						 .prompt = "Sam liked to",
						 .max_tokens = 20 };
		first.on_token = start_second_client;
		first.user = &second;
		generation_greedy(&options, NULL, "Lily and Ben went to the park", 480);
		generation_run(client, &options, &first);
		cr_assert_eq(first.rc, 0, "first generation: %s", first.error);
		cr_assert_gt(first.n_tokens, 10);
		pthread_join(second.thread, NULL);
		cr_assert_eq(second.connect_rc, 0, "connect: %s",
			     strerror(-second.connect_rc));
		cr_assert_eq(second.g.rc, 0, "second generation: %s",
			     second.g.error);
		cr_assert_str_eq(first.text, expected_first);
		cr_assert_str_eq(second.g.text, expected_second);
		seen = log_count(&service, yielded) > before;
	}
	cr_assert(seen, "no decode run ended for a waiting session in 5 "
			"attempts");
	cr_assert_lt(second.g.arrival_ns[second.g.n_tokens - 1],
		     first.arrival_ns[first.n_tokens - 1],
		     "the second generation ended after the first");

	slab_close(client);
	service_stop(&service);
}


/* ---- Streaming, cancel and session requests ----------------------------------- */


Test(service, streaming_positions_increase, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	char expected[8192];
	struct slab_generate_options options;
	struct slab_client *client;

	reference_completion("The sun was hot and", 300, expected,
			     sizeof(expected));
	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);

	generation_greedy(&options, NULL, "The sun was hot and", 300);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	cr_assert(g.result.finish_reason == SLAB_FINISH_LENGTH ||
		  g.result.finish_reason == SLAB_FINISH_EOS, "finish %s",
		  slab_finish_reason_name(g.result.finish_reason));
	cr_assert_gt(g.n_tokens, 100);
	/* An end token counts as generated but carries no text to stream. */
	cr_assert_leq(g.n_tokens, g.result.completion_tokens);
	cr_assert_leq(g.result.completion_tokens, g.n_tokens + 1);
	cr_assert_eq(g.n_pieces, 0, "%zu Token replies without an id",
		     g.n_pieces);
	cr_assert_eq(g.positions[0], g.result.prompt_tokens,
		     "first token at position %u after %u prompt tokens",
		     g.positions[0], g.result.prompt_tokens);
	for (size_t i = 1; i < g.n_tokens; i++)
		cr_assert_eq(g.positions[i], g.positions[i - 1] + 1,
			     "token %zu at position %u after %u", i,
			     g.positions[i], g.positions[i - 1]);
	cr_assert_str_eq(g.text, expected);

	slab_close(client);
	service_stop(&service);
}


Test(service, cancel_keeps_session_usable, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation cancelled, after;
	char handle[SLAB_HANDLE_SIZE];
	struct slab_generate_options options;
	struct slab_session_info info;
	struct slab_client *client;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);
	open_session(client, handle);

	cancelled.cancel_after = 5;
	generation_greedy(&options, handle, "Once upon a time", 480);
	generation_run(client, &options, &cancelled);
	cr_assert_eq(cancelled.rc, 0, "generate: %s", cancelled.error);
	cr_assert_eq(cancelled.result.finish_reason, SLAB_FINISH_CANCELLED,
		     "finish %s after %u tokens",
		     slab_finish_reason_name(cancelled.result.finish_reason),
		     cancelled.result.completion_tokens);
	cr_assert_geq(cancelled.result.completion_tokens, 5);
	cr_assert_lt(cancelled.result.completion_tokens, 480);
	cr_assert_eq(cancelled.result.committed_length,
		     cancelled.result.prompt_tokens +
			     cancelled.result.completion_tokens);
	cr_assert(service_find_session(client, handle, &info));
	cr_assert_eq(info.committed_length, cancelled.result.committed_length);

	/* The session goes on from where the cancel left it. */
	generation_greedy(&options, handle, " The end", 20);
	generation_run(client, &options, &after);
	cr_assert_eq(after.rc, 0, "generate after cancel: %s", after.error);
	cr_assert_eq(after.result.finish_reason, SLAB_FINISH_LENGTH);
	cr_assert_eq(after.n_tokens, 20);
	cr_assert_eq(after.positions[0], info.committed_length +
						 after.result.prompt_tokens);
	cr_assert_eq(after.result.committed_length,
		     info.committed_length + after.result.prompt_tokens + 20);

	slab_close(client);
	service_stop(&service);
}


Test(service, close_list_stats_health, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	char handle[SLAB_HANDLE_SIZE];
	struct slab_generate_options options;
	struct slab_session_info info;
	struct slab_health health;
	struct slab_client *client;
	double decoded, steps, opened;
	int rc;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);

	rc = slab_health(client, &health);
	cr_assert_eq(rc, 0, "health: %s", slab_error_message(client));
	cr_assert_eq(health.status, SLAB_HEALTH_OK, "health %s: %s",
		     slab_health_status_name(health.status), health.message);
	cr_assert_eq(health.workers_live, 2);
	cr_assert_eq(health.workers_configured, 2);

	decoded = service_metric(client, "slabd_tokens_decoded_total");
	steps = service_metric(client, "slabd_steps_total");
	opened = service_metric(client, "slabd_sessions_opened_total");

	open_session(client, handle);
	cr_assert(service_find_session(client, handle, &info),
		  "list lacks session %s", handle);
	cr_assert_eq(info.committed_length, 0);
	cr_assert_eq(info.policy, SLAB_CONTEXT_ERROR);

	generation_greedy(&options, handle, "One day", 40);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	cr_assert(service_find_session(client, handle, &info));
	cr_assert_eq(info.committed_length, g.result.committed_length);
	cr_assert_eq(info.committed_length, g.result.prompt_tokens + 40);
	cr_assert_gt(info.last_use_unix_ms, 0);

	cr_assert_eq(service_metric(client, "slabd_tokens_decoded_total"),
		     decoded + 40);
	cr_assert_geq(service_metric(client, "slabd_steps_total"), steps + 40);
	cr_assert_eq(service_metric(client, "slabd_sessions_opened_total"),
		     opened + 1);
	cr_assert_gt(service_metric(client, "slabd_kv_blocks_used"), 0);

	rc = slab_session_close(client, handle);
	cr_assert_eq(rc, 0, "close: %s", slab_error_message(client));
	cr_assert(!service_find_session(client, handle, NULL),
		  "closed session %s still listed", handle);
	cr_assert_eq(service_metric(client, "slabd_kv_blocks_used"), 0);

	generation_greedy(&options, handle, "One day", 5);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, -ENOENT, "generate on a closed handle: %d", g.rc);
	cr_assert_eq(g.error_code, SLAB_ERROR_NOT_FOUND);
	rc = slab_session_close(client, handle);
	cr_assert_eq(rc, -ENOENT);
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_NOT_FOUND);

	slab_close(client);
	service_stop(&service);
}


/* ---- Context limit ------------------------------------------------------------- */


static void open_short_session(struct slab_client *client,
			       enum slab_context_policy policy, char *handle)
{
	struct slab_session_options options;
	uint32_t granted = 0;
	int rc;

	slab_session_options_init(&options);
	options.max_context = 64;
	options.policy = policy;
	options.n_keep = policy == SLAB_CONTEXT_SHIFT ? 4 : 0;
	options.has_seed = true;
	options.seed = 7;
	rc = slab_session_open(client, &options, handle, &granted);
	cr_assert_eq(rc, 0, "open: %s", slab_error_message(client));
	cr_assert_eq(granted, 64);
}


Test(service, context_full_policies, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation full, shifted;
	char error_handle[SLAB_HANDLE_SIZE], shift_handle[SLAB_HANDLE_SIZE];
	struct slab_generate_options options;
	struct slab_session_info info;
	struct slab_client *client;

	service_init(&service);
	service_start(&service, NULL);
	client = service_connect(&service);

	open_short_session(client, SLAB_CONTEXT_ERROR, error_handle);
	generation_greedy(&options, error_handle, "Once upon a time", 150);
	generation_run(client, &options, &full);
	cr_assert_eq(full.rc, 0, "generate: %s", full.error);
	cr_assert_eq(full.result.finish_reason, SLAB_FINISH_CONTEXT_FULL,
		     "finish %s",
		     slab_finish_reason_name(full.result.finish_reason));
	cr_assert_lt(full.result.completion_tokens, 150);
	cr_assert_leq(full.result.committed_length, 64);
	cr_assert(service_find_session(client, error_handle, &info));
	cr_assert_leq(info.committed_length, 64);
	cr_assert_geq(info.committed_length, 63);

	open_short_session(client, SLAB_CONTEXT_SHIFT, shift_handle);
	generation_greedy(&options, shift_handle, "Once upon a time", 150);
	generation_run(client, &options, &shifted);
	cr_assert_eq(shifted.rc, 0, "generate: %s", shifted.error);
	cr_assert_eq(shifted.result.finish_reason, SLAB_FINISH_LENGTH,
		     "finish %s",
		     slab_finish_reason_name(shifted.result.finish_reason));
	cr_assert_eq(shifted.result.completion_tokens, 150);
	cr_assert_eq(shifted.n_tokens, 150);
	cr_assert_leq(shifted.result.committed_length, 64);
	for (size_t i = 0; i < shifted.n_tokens; i++)
		cr_assert_leq(shifted.positions[i], 64,
			      "token %zu at position %u of a 64-token context",
			      i, shifted.positions[i]);

	/* Before the first shift the text equals the unshifted one. */
	for (size_t i = 0; i < full.n_tokens && shifted.positions[i] > 0 &&
			   (i == 0 || shifted.positions[i] > shifted.positions[i - 1]);
	     i++)
		cr_assert_eq(shifted.ids[i], full.ids[i], "token %zu", i);

	slab_close(client);
	service_stop(&service);
}


/* ---- Framing ---------------------------------------------------------------- */

/* A client that generates and checks its output until its stop flag is set. */
struct background_client {
	const struct service *service;
	const char *expected;
	volatile int stop;
	int runs;
	int mismatches;
	int failures;
	char last_error[SLAB_MESSAGE_SIZE];
};


static void *background_client_run(void *arg)
{
	struct background_client *b = arg;
	static struct generation g;
	struct slab_generate_options options;
	struct slab_client *client = NULL;

	if (slab_connect(b->service->socket_path, &client) < 0) {
		b->failures++;
		return NULL;
	}
	/* Bounded: at most 500 generations, stopped much earlier by the test. */
	for (int i = 0; i < 500 && (!b->stop || b->runs == 0); i++) {
		generation_greedy(&options, NULL, "Once upon a time", 200);
		generation_run(client, &options, &g);
		b->runs++;
		if (g.rc != 0) {
			b->failures++;
			snprintf(b->last_error, sizeof(b->last_error), "%s",
				 g.error);
		} else if (strcmp(g.text, b->expected) != 0) {
			b->mismatches++;
		}
	}
	slab_close(client);
	return NULL;
}


/*
 * Expects an INVALID_ARGUMENT error reply whose message contains value,
 * then the end of the connection.
 */
static void expect_error_then_close(int fd, const char *what,
				    const char *value)
{
	Slabd__Reply *reply = raw_read_reply(fd);

	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_ERROR,
		     "%s: reply kind %d", what, (int)reply->kind_case);
	cr_assert_eq(reply->error->code,
		     SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT, "%s: code %d",
		     what, (int)reply->error->code);
	cr_assert_gt(strlen(reply->error->message), 0, "%s: empty message",
		     what);
	cr_assert_not_null(strstr(reply->error->message, value),
			   "%s: message does not name %s: %s", what, value,
			   reply->error->message);
	slabd__reply__free_unpacked(reply, NULL);
	cr_assert(raw_closed_by_peer(fd), "%s: connection not closed", what);
}


Test(service, framing_errors_isolated, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct background_client background;
	static char expected[8192];
	const char *const extra[] = { "--max-frame", "4096", NULL };
	uint8_t *frame, *second;
	Slabd__Reply *reply;
	pthread_t thread;
	size_t len, second_len;
	int fd;

	reference_completion("Once upon a time", 200, expected,
			     sizeof(expected));
	service_init(&service);
	service_start(&service, extra);
	background = (struct background_client){ .service = &service,
						 .expected = expected };
	cr_assert_eq(pthread_create(&thread, NULL, background_client_run,
				    &background), 0);

	/* A frame sent one byte at a time is served like any other. */
	fd = raw_connect(&service);
	len = raw_request_frame(11, true, &frame);
	for (size_t i = 0; i < len; i++) {
		cr_assert_eq(send(fd, frame + i, 1, MSG_NOSIGNAL), 1);
		service_sleep_ms(3);
	}
	free(frame);
	reply = raw_read_reply(fd);
	cr_assert_eq(reply->request_id, 11);
	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HELLO);
	cr_assert_eq(reply->hello->protocol_version, PROTO_VERSION);
	slabd__reply__free_unpacked(reply, NULL);
	close(fd);

	/* Two frames in one write get two replies, in order. */
	fd = raw_connect(&service);
	len = raw_request_frame(21, true, &frame);
	second_len = raw_request_frame(22, false, &second);
	frame = realloc(frame, len + second_len);
	cr_assert_not_null(frame);
	memcpy(frame + len, second, second_len);
	cr_assert_eq(send(fd, frame, len + second_len, MSG_NOSIGNAL),
		     (ssize_t)(len + second_len));
	free(frame);
	free(second);
	reply = raw_read_reply(fd);
	cr_assert_eq(reply->request_id, 21);
	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HELLO);
	slabd__reply__free_unpacked(reply, NULL);
	reply = raw_read_reply(fd);
	cr_assert_eq(reply->request_id, 22);
	cr_assert_eq(reply->kind_case, SLABD__REPLY__KIND_HEALTH);
	slabd__reply__free_unpacked(reply, NULL);
	close(fd);

	/* A length above --max-frame. */
	{
		uint8_t header[FRAME_HEADER_SIZE];

		fd = raw_connect(&service);
		frame_put_length(header, 4097);
		cr_assert_eq(send(fd, header, sizeof(header), MSG_NOSIGNAL),
			     (ssize_t)sizeof(header));
		expect_error_then_close(fd, "oversized frame", "4097");
		close(fd);
	}

	/* A payload that is not a Request. */
	{
		uint8_t garbage[FRAME_HEADER_SIZE + 8];

		fd = raw_connect(&service);
		frame_put_length(garbage, 8);
		memset(garbage + FRAME_HEADER_SIZE, 0xff, 8);
		cr_assert_eq(send(fd, garbage, sizeof(garbage), MSG_NOSIGNAL),
			     (ssize_t)sizeof(garbage));
		expect_error_then_close(fd, "garbage payload", "8 bytes");
		close(fd);
	}

	/* Text where a length belongs reads as a huge length. */
	{
		const char *text = "GET / HTTP/1.0\r\n\r\n";

		fd = raw_connect(&service);
		cr_assert_eq(send(fd, text, strlen(text), MSG_NOSIGNAL),
			     (ssize_t)strlen(text));
		expect_error_then_close(fd, "text instead of frames",
					"4096");
		close(fd);
	}

	/* A zero length. */
	{
		uint8_t header[FRAME_HEADER_SIZE] = { 0 };

		fd = raw_connect(&service);
		cr_assert_eq(send(fd, header, sizeof(header), MSG_NOSIGNAL),
			     (ssize_t)sizeof(header));
		expect_error_then_close(fd, "zero-length frame", "length 0");
		close(fd);
	}

	background.stop = 1;
	pthread_join(thread, NULL);
	cr_assert_gt(background.runs, 0);
	cr_assert_eq(background.failures, 0, "%d of %d generations failed: %s",
		     background.failures, background.runs,
		     background.last_error);
	cr_assert_eq(background.mismatches, 0,
		     "%d of %d generations differ from slab-run",
		     background.mismatches, background.runs);

	{
		struct slab_client *client = service_connect(&service);

		cr_assert_geq(service_metric(client, "slabd_bad_frames_total"), 4);
		slab_close(client);
	}
	service_stop(&service);
}


/* ---- Bad input ---------------------------------------------------------------- */


/* Runs a generation expected to be rejected with code; returns its message. */
static const char *expect_rejected(struct slab_client *client,
				   const struct slab_generate_options *options,
				   enum slab_error_code code, const char *what)
{
	static struct generation g;

	generation_run(client, options, &g);
	cr_assert_lt(g.rc, 0, "%s: accepted", what);
	cr_assert_eq(g.error_code, code, "%s: code %s, expected %s: %s", what,
		     slab_error_code_name(g.error_code),
		     slab_error_code_name(code), g.error);
	cr_assert_eq(g.rc, slab_errno_from_code(code));
	cr_assert_eq(g.n_tokens, 0, "%s: tokens streamed", what);
	return g.error;
}


Test(service, bad_input_rejected, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	const char *const extra[] = { "--max-sessions", "4", NULL };
	char handles[4][SLAB_HANDLE_SIZE];
	char other[SLAB_HANDLE_SIZE];
	char handle_text[SLAB_HANDLE_SIZE + 8];
	struct slab_session_options session_options;
	struct slab_generate_options options;
	struct slab_client *client;
	int32_t ids[32];
	const char *message;
	int rc;

	service_init(&service);
	service_start(&service, extra);
	client = service_connect(&service);
	open_session(client, handles[0]);

	/* Handles that name no session. */
	static const char *const bad_handles[] = {
		"0.1.deadbeef", "not-a-handle", "999.1.00", "0.0.0.0",
	};
	for (size_t i = 0; i < sizeof(bad_handles) / sizeof(bad_handles[0]);
	     i++) {
		generation_greedy(&options, bad_handles[i], "Hi", 5);
		expect_rejected(client, &options, SLAB_ERROR_NOT_FOUND,
				bad_handles[i]);
		rc = slab_session_close(client, bad_handles[i]);
		cr_assert_eq(slab_server_error(client), SLAB_ERROR_NOT_FOUND,
			     "close %s: %d", bad_handles[i], rc);
	}

	/* A real handle with its secret changed. */
	snprintf(handle_text, sizeof(handle_text), "%s", handles[0]);
	{
		size_t last = strlen(handle_text) - 1;

		handle_text[last] = handle_text[last] == '0' ? '1' : '0';
	}
	generation_greedy(&options, handle_text, "Hi", 5);
	expect_rejected(client, &options, SLAB_ERROR_NOT_FOUND, handle_text);

	/* Token ids outside the vocabulary. */
	ids[0] = 1;
	ids[1] = 403;
	ids[2] = 512;
	generation_greedy(&options, handles[0], NULL, 5);
	options.prompt_ids = ids;
	options.n_prompt_ids = 3;
	message = expect_rejected(client, &options,
				  SLAB_ERROR_INVALID_ARGUMENT, "token id 512");
	cr_assert_not_null(strstr(message, "512"), "message: %s", message);
	ids[2] = -5;
	message = expect_rejected(client, &options,
				  SLAB_ERROR_INVALID_ARGUMENT, "token id -5");
	cr_assert_not_null(strstr(message, "-5"), "message: %s", message);

	/* max_tokens 0 and a NaN temperature. */
	generation_greedy(&options, handles[0], "Hi", 0);
	message = expect_rejected(client, &options,
				  SLAB_ERROR_INVALID_ARGUMENT, "max_tokens 0");
	cr_assert_not_null(strstr(message, "max_tokens"), "message: %s",
			   message);
	generation_greedy(&options, handles[0], "Hi", 5);
	options.temperature = NAN;
	message = expect_rejected(client, &options,
				  SLAB_ERROR_INVALID_ARGUMENT, "temperature NaN");
	cr_assert_not_null(strstr(message, "temperature"), "message: %s",
			   message);
	cr_assert_not_null(strstr(message, "nan"), "message: %s", message);

	/* A prompt longer than a 16-token context under policy ERROR. */
	slab_session_options_init(&session_options);
	session_options.max_context = 16;
	rc = slab_session_open(client, &session_options, handles[1], NULL);
	cr_assert_eq(rc, 0, "open: %s", slab_error_message(client));
	for (int i = 0; i < 20; i++)
		ids[i] = i == 0 ? 1 : 300 + i;
	generation_greedy(&options, handles[1], NULL, 5);
	options.prompt_ids = ids;
	options.n_prompt_ids = 20;
	message = expect_rejected(client, &options, SLAB_ERROR_CONTEXT_FULL,
				  "prompt of 20 tokens in 16");
	cr_assert_not_null(strstr(message, "20"), "message: %s", message);
	cr_assert_not_null(strstr(message, "16"), "message: %s", message);

	/* Sessions beyond --max-sessions 4. */
	open_session(client, handles[2]);
	open_session(client, handles[3]);
	rc = slab_session_open(client, NULL, other, NULL);
	cr_assert_eq(rc, -ENOSPC, "fifth session: %d, %s", rc,
		     slab_error_message(client));
	cr_assert_eq(slab_server_error(client), SLAB_ERROR_RESOURCE_EXHAUSTED);
	cr_assert_not_null(strstr(slab_error_message(client), "4"),
			   "message: %s", slab_error_message(client));
	generation_greedy(&options, NULL, "Hi", 5);
	expect_rejected(client, &options, SLAB_ERROR_RESOURCE_EXHAUSTED,
			"one-shot generation with every slot in use");

	for (int i = 0; i < 4; i++) {
		if (i == 1)
			continue;
		generation_greedy(&options, handles[i], "Tom had a ball", 10);
		generation_run(client, &options, &g);
		cr_assert_eq(g.rc, 0, "session %d: %s", i, g.error);
		cr_assert_eq(g.n_tokens, 10);
	}

	/* The connection still serves requests after every rejection. */
	{
		struct slab_health health;

		cr_assert_eq(slab_health(client, &health), 0);
		cr_assert_eq(health.status, SLAB_HEALTH_OK);
	}
	slab_close(client);
	service_stop(&service);
}


/* ---- Shutdown ------------------------------------------------------------------ */


Test(service, sigterm_leaves_nothing, .timeout = TEST_TIMEOUT_S,
     .fini = service_fini)
{
	static struct service service;
	static struct generation g;
	char handle[SLAB_HANDLE_SIZE];
	struct slab_generate_options options;
	struct slab_client *client;
	pid_t workers[SERVICE_MAX_WORKERS];
	size_t n_workers;

	service_init(&service);
	service_start(&service, NULL);
	n_workers = service_worker_pids(&service, workers, SERVICE_MAX_WORKERS);
	cr_assert_eq(n_workers, 2, "%zu worker processes, expected 2",
		     n_workers);
	cr_assert(service_segment_exists(service.instance, "kv"));
	cr_assert(service_segment_exists(service.instance, "ctl"));

	/* An open session with a committed cache must not keep anything. */
	client = service_connect(&service);
	open_session(client, handle);
	generation_greedy(&options, handle, "One day", 30);
	generation_run(client, &options, &g);
	cr_assert_eq(g.rc, 0, "generate: %s", g.error);
	slab_close(client);

	service_stop(&service);
	for (size_t i = 0; i < n_workers; i++)
		cr_assert(!service_is_live_worker(workers[i]),
			  "worker %d is still running", (int)workers[i]);
	cr_assert(service_log_contains(&service, "shared memory removed"));
}
