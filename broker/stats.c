/*
 * Broker statistics: counters and gauges for the Stats request, and the
 * same values in the Prometheus text format, with histograms of time to
 * first token and inter-token latency.
 */
#include "broker/broker.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Upper bounds of the latency histogram buckets, in seconds. */
static const double bucket_bounds[12] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
	0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
};

struct metric_value {
	const char *name;
	const char *help;
	bool counter;
	double value;
};


static void observe(uint64_t *buckets, uint64_t *count, double *sum,
		    double seconds)
{
	for (int i = 0; i < 12; i++)
		if (seconds <= bucket_bounds[i])
			buckets[i]++;
	(*count)++;
	*sum += seconds;
}


void stats_observe_ttft(struct broker *broker, double seconds)
{
	struct broker_stats *s = &broker->stats;

	observe(s->ttft_buckets, &s->ttft_count, &s->ttft_sum, seconds);
}


void stats_observe_itl(struct broker *broker, double seconds)
{
	struct broker_stats *s = &broker->stats;

	observe(s->itl_buckets, &s->itl_count, &s->itl_sum, seconds);
}


/* Fills values with the current metrics and returns how many there are. */
static int collect(struct broker *broker, struct metric_value *values)
{
	const struct broker_stats *s = &broker->stats;
	struct shm_pool_stats pool = { 0 };
	int open = 0, n = 0;

	shm_pool_stats(broker->arena, &pool);
	for (int i = 0; i < broker->config.max_sessions; i++)
		open += broker->sessions[i].in_use;

#define GAUGE(name, help, v) values[n++] = (struct metric_value){ name, help, false, (double)(v) }
#define COUNTER(name, help, v) values[n++] = (struct metric_value){ name, help, true, (double)(v) }
	GAUGE("slabd_sessions_open", "Sessions open now.", open);
	GAUGE("slabd_kv_blocks_used", "KV blocks rented.", pool.blocks_in_use);
	GAUGE("slabd_kv_blocks_total", "KV blocks in the pool.", pool.blocks_total);
	GAUGE("slabd_kv_blocks_high_water", "Most KV blocks rented at once.",
	      pool.high_water);
	GAUGE("slabd_workers_live", "Workers running and ready.",
	      broker->live_workers);
	GAUGE("slabd_workers_configured", "Workers configured.",
	      broker->config.workers);
	GAUGE("slabd_connections_open", "Client connections open now.",
	      broker->n_connections);
	COUNTER("slabd_requests_total", "Requests received.", s->requests);
	COUNTER("slabd_steps_total", "Worker steps completed.", s->steps);
	COUNTER("slabd_tokens_prefilled_total", "Prompt tokens committed.",
		s->tokens_prefilled);
	COUNTER("slabd_tokens_decoded_total", "Tokens generated.",
		s->tokens_decoded);
	COUNTER("slabd_worker_restarts_total", "Workers restarted.",
		s->worker_restarts);
	COUNTER("slabd_step_retries_total", "Steps sent again after a worker died.",
		s->step_retries);
	COUNTER("slabd_poison_steps_total", "Requests failed because their step "
		"killed two workers.", s->poison_steps);
	COUNTER("slabd_sessions_opened_total", "Sessions opened.",
		s->sessions_opened);
	COUNTER("slabd_sessions_evicted_total", "Idle sessions evicted for KV "
		"blocks.", s->sessions_evicted);
	COUNTER("slabd_kv_rents_total", "KV block rents.", pool.rents);
	COUNTER("slabd_kv_failed_rents_total", "KV block rents that found the "
		"pool empty.", pool.failed_rents);
	COUNTER("slabd_connections_rejected_total", "Connections rejected at the "
		"connection limit.", s->rejected_connections);
	COUNTER("slabd_bad_frames_total", "Frames that were oversized or did not "
		"unpack.", s->bad_frames);
	COUNTER("slabd_peers_rejected_total", "Connections rejected by "
		"--allow-uid and --allow-gid.", s->rejected_peers);
	COUNTER("slabd_stalled_connections_total", "Connections closed after a "
		"partial frame stalled.", s->stalled_connections);
#undef GAUGE
#undef COUNTER
	return n;
}


/* Appends formatted text to a growing buffer; returns false when out of memory. */
static bool append(char **text, size_t *len, size_t *capacity,
		   const char *format, ...) __attribute__((format(printf, 4, 5)));

static bool append(char **text, size_t *len, size_t *capacity,
		   const char *format, ...)
{
	va_list args;
	int n;

	for (;;) {
		va_start(args, format);
		n = vsnprintf(*text + *len, *capacity - *len, format, args);
		va_end(args);
		if (n < 0)
			return false;
		if ((size_t)n < *capacity - *len) {
			*len += (size_t)n;
			return true;
		}
		char *grown = realloc(*text, *capacity * 2 + (size_t)n);

		if (grown == NULL)
			return false;
		*text = grown;
		*capacity = *capacity * 2 + (size_t)n;
	}
}


static void append_histogram(char **text, size_t *len, size_t *capacity,
			     const char *name, const char *help,
			     const uint64_t *buckets, uint64_t count, double sum)
{
	append(text, len, capacity, "# HELP %s %s\n# TYPE %s histogram\n", name,
	       help, name);
	for (int i = 0; i < 12; i++)
		append(text, len, capacity, "%s_bucket{le=\"%g\"} %llu\n", name,
		       bucket_bounds[i], (unsigned long long)buckets[i]);
	append(text, len, capacity, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %g\n"
	       "%s_count %llu\n", name, (unsigned long long)count, name, sum,
	       name, (unsigned long long)count);
}


char *stats_prometheus(struct broker *broker)
{
	struct metric_value values[64];
	int n = collect(broker, values);
	size_t len = 0, capacity = 4096;
	char *text = malloc(capacity);
	const struct broker_stats *s = &broker->stats;

	if (text == NULL)
		return NULL;
	text[0] = '\0';
	for (int i = 0; i < n; i++)
		append(&text, &len, &capacity, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n",
		       values[i].name, values[i].help, values[i].name,
		       values[i].counter ? "counter" : "gauge", values[i].name,
		       values[i].value);
	append_histogram(&text, &len, &capacity,
			 "slabd_time_to_first_token_seconds",
			 "Time from a Generate request to its first token.",
			 s->ttft_buckets, s->ttft_count, s->ttft_sum);
	append_histogram(&text, &len, &capacity,
			 "slabd_inter_token_latency_seconds",
			 "Time between consecutive tokens of a generation.",
			 s->itl_buckets, s->itl_count, s->itl_sum);
	return text;
}


void stats_send(struct broker_connection *c, uint64_t id)
{
	struct metric_value values[64];
	int n = collect(c->broker, values);
	Slabd__Metric metrics[64];
	Slabd__Metric *ptrs[64];
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__StatsReply out = SLABD__STATS_REPLY__INIT;
	char *text = stats_prometheus(c->broker);

	for (int i = 0; i < n; i++) {
		slabd__metric__init(&metrics[i]);
		metrics[i].name = (char *)values[i].name;
		metrics[i].help = (char *)values[i].help;
		metrics[i].type = values[i].counter
					  ? SLABD__METRIC_TYPE__METRIC_TYPE_COUNTER
					  : SLABD__METRIC_TYPE__METRIC_TYPE_GAUGE;
		metrics[i].value = values[i].value;
		ptrs[i] = &metrics[i];
	}
	out.n_metrics = (size_t)n;
	out.metrics = ptrs;
	out.prometheus_text = text != NULL ? text : "";
	reply.request_id = id;
	reply.kind_case = SLABD__REPLY__KIND_STATS;
	reply.stats = &out;
	connection_send_reply(c, &reply);
	free(text);
}
