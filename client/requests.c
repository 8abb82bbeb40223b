/*
 * libslab requests other than Generate: hello, sessions, prefill, tokenize,
 * cancel, stats and health. Each builds one Request, waits for its reply via
 * slab_client_call(), and copies what the caller needs out of the reply, so no
 * protobuf-c memory outlives the call.
 */
#include "client/slab_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


/* Copies a string the broker sent. Returns the copy, "" for NULL, or NULL
 * when memory runs out. */
static char *copy_string(const char *text)
{
	return strdup(text != NULL ? text : "");
}


int slab_hello(struct slab_client *client, struct slab_server_info *info)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HelloRequest hello = SLABD__HELLO_REQUEST__INIT;
	Slabd__Reply *reply;
	const Slabd__HelloReply *answer;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;

	hello.protocol_version = PROTO_VERSION;
	request.kind_case = SLABD__REQUEST__KIND_HELLO;
	request.hello = &hello;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_HELLO, &reply);
	if (rc < 0)
		return rc;

	answer = reply->hello;
	if (answer->protocol_version != PROTO_VERSION) {
		rc = slab_client_fail(client, -EPROTONOSUPPORT,
				 "broker speaks protocol version %u, this "
				 "client speaks version %u",
				 answer->protocol_version, PROTO_VERSION);
		goto out;
	}

	if (info != NULL) {
		memset(info, 0, sizeof(*info));
		info->protocol_version = answer->protocol_version;
		snprintf(info->server_version, sizeof(info->server_version),
			 "%s",
			 answer->server_version ? answer->server_version : "");
		if (answer->model != NULL) {
			info->model.dim = answer->model->dim;
			info->model.hidden_dim = answer->model->hidden_dim;
			info->model.n_layers = answer->model->n_layers;
			info->model.n_heads = answer->model->n_heads;
			info->model.n_kv_heads = answer->model->n_kv_heads;
			info->model.vocab_size = answer->model->vocab_size;
			info->model.seq_len = answer->model->seq_len;
		}
		info->max_context = answer->max_context;
	}

out:
	slabd__reply__free_unpacked(reply, NULL);
	return rc;
}


void slab_session_options_init(struct slab_session_options *options)
{
	memset(options, 0, sizeof(*options));
	options->policy = SLAB_CONTEXT_ERROR;
}


/* Checks that a handle from the broker fits SLAB_HANDLE_SIZE and copies it. */
static int copy_handle(struct slab_client *client,
		       char handle[SLAB_HANDLE_SIZE], const char *received)
{
	size_t len = received != NULL ? strlen(received) : 0;

	if (len == 0 || len >= SLAB_HANDLE_SIZE)
		return slab_client_break(client, -EPROTO,
				    "broker sent a session handle of %zu bytes, "
				    "expected 1 to %d", len,
				    SLAB_HANDLE_SIZE - 1);
	memcpy(handle, received, len + 1);
	return 0;
}


int slab_session_open(struct slab_client *client,
		      const struct slab_session_options *options,
		      char handle[SLAB_HANDLE_SIZE], uint32_t *max_context)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__OpenSessionRequest open = SLABD__OPEN_SESSION_REQUEST__INIT;
	struct slab_session_options defaults;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (handle == NULL)
		return slab_client_fail(client, -EINVAL, "handle buffer is NULL");
	if (options == NULL) {
		slab_session_options_init(&defaults);
		options = &defaults;
	}
	if (options->policy != SLAB_CONTEXT_ERROR &&
	    options->policy != SLAB_CONTEXT_SHIFT)
		return slab_client_fail(client, -EINVAL,
				   "invalid context policy %d",
				   (int)options->policy);

	open.max_context = options->max_context;
	open.policy = options->policy == SLAB_CONTEXT_SHIFT ?
			      SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT :
			      SLABD__CONTEXT_POLICY__CONTEXT_POLICY_ERROR;
	open.n_keep = options->n_keep;
	if (options->has_seed) {
		open.optional_seed_case =
			SLABD__OPEN_SESSION_REQUEST__OPTIONAL_SEED_SEED;
		open.seed = options->seed;
	}
	request.kind_case = SLABD__REQUEST__KIND_OPEN_SESSION;
	request.open_session = &open;

	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_OPEN_SESSION,
			 &reply);
	if (rc < 0)
		return rc;

	rc = copy_handle(client, handle, reply->open_session->handle);
	if (rc == 0 && max_context != NULL)
		*max_context = reply->open_session->max_context;
	slabd__reply__free_unpacked(reply, NULL);
	return rc;
}


int slab_session_close(struct slab_client *client, const char *handle)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__CloseSessionRequest close_request =
		SLABD__CLOSE_SESSION_REQUEST__INIT;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (handle == NULL || handle[0] == '\0')
		return slab_client_fail(client, -EINVAL, "session handle is empty");

	close_request.session = (char *)handle;
	request.kind_case = SLABD__REQUEST__KIND_CLOSE_SESSION;
	request.close_session = &close_request;

	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_CLOSE_SESSION,
			 &reply);
	if (rc < 0)
		return rc;
	slabd__reply__free_unpacked(reply, NULL);
	return 0;
}


int slab_session_list(struct slab_client *client,
		      struct slab_session_info **sessions, size_t *count)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__ListSessionsRequest list = SLABD__LIST_SESSIONS_REQUEST__INIT;
	const Slabd__ListSessionsReply *answer;
	struct slab_session_info *infos;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (sessions == NULL || count == NULL)
		return slab_client_fail(client, -EINVAL, "output pointer is NULL");
	*sessions = NULL;
	*count = 0;

	request.kind_case = SLABD__REQUEST__KIND_LIST_SESSIONS;
	request.list_sessions = &list;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_LIST_SESSIONS,
			 &reply);
	if (rc < 0)
		return rc;
	answer = reply->list_sessions;

	infos = calloc(answer->n_sessions > 0 ? answer->n_sessions : 1,
		       sizeof(*infos));
	if (infos == NULL) {
		rc = slab_client_fail(client, -ENOMEM,
				 "out of memory for %zu sessions",
				 answer->n_sessions);
		goto out;
	}

	for (size_t i = 0; i < answer->n_sessions; i++) {
		const Slabd__SessionInfo *session = answer->sessions[i];

		rc = copy_handle(client, infos[i].handle, session->handle);
		if (rc < 0) {
			free(infos);
			goto out;
		}
		infos[i].committed_length = session->committed_length;
		infos[i].max_context = session->max_context;
		infos[i].last_use_unix_ms = session->last_use_unix_ms;
		infos[i].policy =
			session->policy ==
					SLABD__CONTEXT_POLICY__CONTEXT_POLICY_SHIFT ?
				SLAB_CONTEXT_SHIFT :
				SLAB_CONTEXT_ERROR;
	}

	*sessions = infos;
	*count = answer->n_sessions;
	rc = (int)answer->n_sessions;
out:
	slabd__reply__free_unpacked(reply, NULL);
	return rc;
}


int slab_prefill(struct slab_client *client, const char *session,
		 const char *text, const int32_t *ids, size_t n_ids,
		 uint32_t *committed_length)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__PrefillRequest prefill = SLABD__PREFILL_REQUEST__INIT;
	Slabd__TokenIds tokens = SLABD__TOKEN_IDS__INIT;
	Slabd__Reply *reply;
	enum slab_client_prompt prompt;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (session == NULL || session[0] == '\0')
		return slab_client_fail(client, -EINVAL,
				   "prefill needs a session handle");

	rc = slab_client_set_prompt(client, text, ids, n_ids, &prompt,
			       &prefill.text, &tokens, &prefill.tokens);
	if (rc < 0)
		return rc;
	if (prompt == SLAB_PROMPT_NONE)
		return slab_client_fail(client, -EINVAL,
				   "prefill needs text or token ids");
	prefill.prompt_case = prompt == SLAB_PROMPT_TEXT ?
				      SLABD__PREFILL_REQUEST__PROMPT_TEXT :
				      SLABD__PREFILL_REQUEST__PROMPT_TOKENS;
	prefill.session = (char *)session;
	request.kind_case = SLABD__REQUEST__KIND_PREFILL;
	request.prefill = &prefill;

	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_PREFILL, &reply);
	if (rc < 0)
		return rc;

	if (committed_length != NULL)
		*committed_length = reply->prefill->committed_length;
	rc = reply->prefill->prompt_tokens > INT32_MAX ?
		     INT32_MAX :
		     (int)reply->prefill->prompt_tokens;
	slabd__reply__free_unpacked(reply, NULL);
	return rc;
}


int slab_tokenize(struct slab_client *client, const char *text, bool add_bos,
		  int32_t **ids, size_t *n_ids)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__TokenizeRequest tokenize = SLABD__TOKENIZE_REQUEST__INIT;
	const Slabd__TokenizeReply *answer;
	Slabd__Reply *reply;
	int32_t *copy;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (text == NULL || ids == NULL || n_ids == NULL)
		return slab_client_fail(client, -EINVAL,
				   "text or output pointer is NULL");
	*ids = NULL;
	*n_ids = 0;

	tokenize.text = (char *)text;
	tokenize.add_bos = add_bos;
	request.kind_case = SLABD__REQUEST__KIND_TOKENIZE;
	request.tokenize = &tokenize;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_TOKENIZE, &reply);
	if (rc < 0)
		return rc;
	answer = reply->tokenize;

	copy = malloc((answer->n_ids > 0 ? answer->n_ids : 1) * sizeof(*copy));
	if (copy == NULL) {
		rc = slab_client_fail(client, -ENOMEM,
				 "out of memory for %zu token ids",
				 answer->n_ids);
		goto out;
	}
	if (answer->n_ids > 0)
		memcpy(copy, answer->ids, answer->n_ids * sizeof(*copy));

	*ids = copy;
	*n_ids = answer->n_ids;
	rc = answer->n_ids > INT32_MAX ? INT32_MAX : (int)answer->n_ids;
out:
	slabd__reply__free_unpacked(reply, NULL);
	return rc;
}


int slab_cancel(struct slab_client *client, uint64_t request_id,
		const char *session, bool *cancelled)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__CancelRequest cancel = SLABD__CANCEL_REQUEST__INIT;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;

	cancel.target_request_id = request_id;
	cancel.session = (char *)(session != NULL ? session : "");
	request.kind_case = SLABD__REQUEST__KIND_CANCEL;
	request.cancel = &cancel;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_CANCEL, &reply);
	if (rc < 0)
		return rc;

	if (cancelled != NULL)
		*cancelled = reply->cancel->cancelled;
	slabd__reply__free_unpacked(reply, NULL);
	return 0;
}


void slab_stats_free(struct slab_stats *stats)
{
	if (stats == NULL)
		return;
	for (size_t i = 0; i < stats->n_metrics; i++) {
		free(stats->metrics[i].name);
		free(stats->metrics[i].help);
	}
	free(stats->metrics);
	free(stats->prometheus_text);
	memset(stats, 0, sizeof(*stats));
}


int slab_stats(struct slab_client *client, struct slab_stats *stats)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__StatsRequest stats_request = SLABD__STATS_REQUEST__INIT;
	const Slabd__StatsReply *answer;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (stats == NULL)
		return slab_client_fail(client, -EINVAL, "stats pointer is NULL");
	memset(stats, 0, sizeof(*stats));

	request.kind_case = SLABD__REQUEST__KIND_STATS;
	request.stats = &stats_request;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_STATS, &reply);
	if (rc < 0)
		return rc;
	answer = reply->stats;

	stats->metrics = calloc(answer->n_metrics > 0 ? answer->n_metrics : 1,
				sizeof(*stats->metrics));
	stats->prometheus_text = copy_string(answer->prometheus_text);
	if (stats->metrics == NULL || stats->prometheus_text == NULL)
		goto err_nomem;

	for (size_t i = 0; i < answer->n_metrics; i++) {
		const Slabd__Metric *metric = answer->metrics[i];
		struct slab_metric *copy = &stats->metrics[i];

		stats->n_metrics = i + 1;
		copy->name = copy_string(metric->name);
		copy->help = copy_string(metric->help);
		if (copy->name == NULL || copy->help == NULL)
			goto err_nomem;
		copy->counter =
			metric->type == SLABD__METRIC_TYPE__METRIC_TYPE_COUNTER;
		copy->value = metric->value;
	}

	slabd__reply__free_unpacked(reply, NULL);
	return 0;

err_nomem:
	slab_stats_free(stats);
	slabd__reply__free_unpacked(reply, NULL);
	return slab_client_fail(client, -ENOMEM, "out of memory for the stats");
}


int slab_health(struct slab_client *client, struct slab_health *health)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__HealthRequest health_request = SLABD__HEALTH_REQUEST__INIT;
	const Slabd__HealthReply *answer;
	Slabd__Reply *reply;
	int rc;

	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (health == NULL)
		return slab_client_fail(client, -EINVAL, "health pointer is NULL");

	request.kind_case = SLABD__REQUEST__KIND_HEALTH;
	request.health = &health_request;
	rc = slab_client_call(client, &request, SLABD__REPLY__KIND_HEALTH, &reply);
	if (rc < 0)
		return rc;
	answer = reply->health;

	/* An unknown status from a newer broker reads as UNSPECIFIED, which
	 * callers treat as not healthy. */
	memset(health, 0, sizeof(*health));
	health->status = SLAB_HEALTH_UNSPECIFIED;
	if (answer->status >= SLABD__HEALTH_STATUS__HEALTH_STATUS_OK &&
	    answer->status <= SLABD__HEALTH_STATUS__HEALTH_STATUS_DRAINING)
		health->status = (enum slab_health_status)answer->status;
	health->workers_live = answer->workers_live;
	health->workers_configured = answer->workers_configured;
	snprintf(health->message, sizeof(health->message), "%s",
		 answer->message != NULL ? answer->message : "");

	slabd__reply__free_unpacked(reply, NULL);
	return 0;
}
