/*
 * slab-recovery: measures how long a session waits when the worker running
 * its steps is killed. It streams one greedy generation from a running
 * slabd, sends SIGKILL to the worker process given on the command line
 * after a chosen number of tokens, and prints the longest gap between two
 * tokens after the kill next to the median gap before it, in milliseconds.
 *
 * Usage: slab-recovery SOCKET WORKER_PID [KILL_AFTER_TOKENS]
 */
#include "client/slab.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TOKENS 300

struct timing {
	double at[MAX_TOKENS + 1];
	int count;
	int kill_after;
	pid_t worker;
	int kill_index;
};


static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}


static int on_token(const struct slab_token *token, void *user)
{
	struct timing *t = user;

	(void)token;
	if (t->count <= MAX_TOKENS)
		t->at[t->count++] = now_ms();
	if (t->count == t->kill_after) {
		kill(t->worker, SIGKILL);
		t->kill_index = t->count;
	}
	return 0;
}


static int compare_doubles(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}


int main(int argc, char **argv)
{
	struct slab_generate_options options;
	struct slab_generate_result result = { 0 };
	struct slab_client *client;
	struct timing timing = { .kill_after = 100 };
	double gaps[MAX_TOKENS], worst = 0.0;
	int rc;

	if (argc < 3) {
		fprintf(stderr, "usage: slab-recovery SOCKET WORKER_PID "
			"[KILL_AFTER_TOKENS]\n");
		return 2;
	}
	timing.worker = (pid_t)atoi(argv[2]);
	if (argc > 3)
		timing.kill_after = atoi(argv[3]);
	if (timing.worker <= 0 || timing.kill_after < 2 ||
	    timing.kill_after >= MAX_TOKENS) {
		fprintf(stderr, "slab-recovery: invalid worker pid or token count\n");
		return 2;
	}
	rc = slab_connect(argv[1], &client);
	if (rc < 0) {
		fprintf(stderr, "slab-recovery: cannot connect to %s: %s\n",
			argv[1], strerror(-rc));
		return 3;
	}

	slab_generate_options_init(&options);
	options.prompt = "Once upon a time";
	options.max_tokens = MAX_TOKENS;
	options.has_temperature = true;
	options.temperature = 0.0f;
	rc = slab_generate(client, &options, on_token, &timing, &result);
	if (rc < 0 || timing.kill_index == 0) {
		fprintf(stderr, "slab-recovery: generation failed or ended before "
			"the kill: %s\n", slab_error_message(client));
		return 1;
	}

	for (int i = 1; i < timing.kill_index; i++)
		gaps[i - 1] = timing.at[i] - timing.at[i - 1];
	qsort(gaps, (size_t)timing.kill_index - 1, sizeof(double),
	      compare_doubles);
	for (int i = timing.kill_index; i < timing.count; i++)
		if (timing.at[i] - timing.at[i - 1] > worst)
			worst = timing.at[i] - timing.at[i - 1];
	printf("recovery_ms %.2f median_gap_ms %.3f tokens %d\n", worst,
	       gaps[(timing.kill_index - 1) / 2], timing.count);
	slab_generate_result_free(&result);
	slab_close(client);
	return 0;
}
