/*
 * libslab Generate: builds the request from the caller's options, then reads
 * Token replies until the Done (or an Error) for the request arrives. A
 * cancel, from the token callback or from the interrupt flag, sends one
 * Cancel and keeps reading, because the broker still ends the generation
 * with a Done that reports how many tokens were committed.
 */
#include "client/slab_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>


int slab_client_set_prompt(struct slab_client *client, const char *text,
		      const int32_t *ids, size_t n_ids,
		      enum slab_client_prompt *kind, char **text_field,
		      Slabd__TokenIds *tokens, Slabd__TokenIds **tokens_field)
{
	*kind = SLAB_PROMPT_NONE;
	if (text != NULL && ids != NULL)
		return slab_client_fail(client, -EINVAL,
				   "prompt given both as text and as %zu token "
				   "ids; give one", n_ids);
	if (ids == NULL && n_ids > 0)
		return slab_client_fail(client, -EINVAL,
				   "prompt token ids are NULL but their count "
				   "is %zu", n_ids);

	if (text != NULL) {
		*text_field = (char *)text;
		*kind = SLAB_PROMPT_TEXT;
	} else if (ids != NULL) {
		tokens->ids = (int32_t *)ids;
		tokens->n_ids = n_ids;
		*tokens_field = tokens;
		*kind = SLAB_PROMPT_TOKENS;
	}
	return 0;
}


void slab_generate_options_init(struct slab_generate_options *options)
{
	memset(options, 0, sizeof(*options));
}


void slab_generate_result_free(struct slab_generate_result *result)
{
	if (result == NULL)
		return;
	free(result->text);
	result->text = NULL;
	result->text_len = 0;
}


/* Copies the sampling options that are set into the request. */
static void generate_set_sampling(Slabd__GenerateRequest *generate,
				  const struct slab_generate_options *options)
{
	if (options->has_temperature) {
		generate->optional_temperature_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_TEMPERATURE_TEMPERATURE;
		generate->temperature = options->temperature;
	}
	if (options->has_top_k) {
		generate->optional_top_k_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_TOP_K_TOP_K;
		generate->top_k = options->top_k;
	}
	if (options->has_top_p) {
		generate->optional_top_p_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_TOP_P_TOP_P;
		generate->top_p = options->top_p;
	}
	if (options->has_min_p) {
		generate->optional_min_p_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_MIN_P_MIN_P;
		generate->min_p = options->min_p;
	}
	if (options->has_repetition_penalty) {
		generate->optional_repetition_penalty_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_REPETITION_PENALTY_REPETITION_PENALTY;
		generate->repetition_penalty = options->repetition_penalty;
	}
	if (options->has_seed) {
		generate->optional_seed_case =
			SLABD__GENERATE_REQUEST__OPTIONAL_SEED_SEED;
		generate->seed = options->seed;
	}
}


/* Copies Done into result, including its text: the whole text when not
 * streamed, else the few bytes no Token carried. Returns 0, -ENOMEM, or the
 * broker error of a generation that finished with reason ERROR. */
static int generate_take_done(struct slab_client *client,
			      const Slabd__Done *done,
			      struct slab_generate_result *result)
{
	char *text;

	result->finish_reason = SLAB_FINISH_UNSPECIFIED;
	if (done->finish_reason >= SLABD__FINISH_REASON__FINISH_REASON_LENGTH &&
	    done->finish_reason <= SLABD__FINISH_REASON__FINISH_REASON_ERROR)
		result->finish_reason =
			(enum slab_finish_reason)done->finish_reason;
	result->prompt_tokens = done->prompt_tokens;
	result->completion_tokens = done->completion_tokens;
	result->time_to_first_token_us = done->time_to_first_token_us;
	result->decode_tokens_per_second = done->decode_tokens_per_second;
	result->committed_length = done->committed_length;

	text = malloc(done->text.len + 1);
	if (text == NULL)
		return slab_client_fail(client, -ENOMEM,
				   "out of memory for %zu bytes of "
				   "generated text", done->text.len);
	if (done->text.len > 0)
		memcpy(text, done->text.data, done->text.len);
	text[done->text.len] = '\0';
	result->text = text;
	result->text_len = done->text.len;

	if (result->finish_reason == SLAB_FINISH_ERROR)
		return slab_client_server_error(client, done->error);
	return 0;
}


/*
 * Handles one reply to the generation with id request_id. Returns 1 once the
 * generation is over (with *status set to what slab_generate() returns), 0
 * to keep reading, or a negative errno for a protocol error.
 */
static int generate_handle_reply(struct slab_client *client,
				 const Slabd__Reply *reply,
				 uint64_t request_id, bool stream,
				 slab_token_fn on_token, void *user,
				 bool *cancel_sent,
				 struct slab_generate_result *result,
				 int *status)
{
	if (reply->kind_case == SLABD__REPLY__KIND_ERROR &&
	    (reply->request_id == request_id || reply->request_id == 0)) {
		*status = slab_client_server_error(client, reply->error);
		return 1;
	}
	if (reply->request_id != request_id)
		return slab_client_break(client, -EPROTO,
				    "broker replied to request %llu while "
				    "generation %llu was running",
				    (unsigned long long)reply->request_id,
				    (unsigned long long)request_id);

	if (reply->kind_case == SLABD__REPLY__KIND_DONE) {
		*status = generate_take_done(client, reply->done, result);
		return 1;
	}
	if (reply->kind_case != SLABD__REPLY__KIND_TOKEN || !stream)
		return slab_client_break(client, -EPROTO,
				    "broker sent reply kind %d to generation "
				    "%llu", (int)reply->kind_case,
				    (unsigned long long)request_id);

	/* After a cancel the broker may still send tokens it had computed;
	 * the caller has asked to stop, so they are not passed on. */
	if (*cancel_sent)
		return 0;

	struct slab_token token = {
		.id = reply->token->id,
		.piece = (const char *)reply->token->piece.data,
		.piece_len = reply->token->piece.len,
		.position = reply->token->position,
	};
	if (token.piece == NULL)
		token.piece = "";

	bool stop = on_token(&token, user) != 0;
	bool interrupted = client->interrupt != NULL && *client->interrupt;

	if (stop || interrupted) {
		int rc = slab_client_send_cancel(client, request_id);

		if (rc < 0)
			return rc;
		*cancel_sent = true;
	}
	return 0;
}


int slab_generate(struct slab_client *client,
		  const struct slab_generate_options *options,
		  slab_token_fn on_token, void *user,
		  struct slab_generate_result *result)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__GenerateRequest generate = SLABD__GENERATE_REQUEST__INIT;
	Slabd__TokenIds tokens = SLABD__TOKEN_IDS__INIT;
	enum slab_client_prompt prompt;
	bool cancel_sent = false;
	int status = 0;
	int rc;

	if (result != NULL)
		memset(result, 0, sizeof(*result));
	rc = slab_client_begin(client);
	if (rc < 0)
		return rc;
	if (options == NULL || result == NULL)
		return slab_client_fail(client, -EINVAL,
				   "options or result pointer is NULL");
	if (options->stop == NULL && options->n_stop > 0)
		return slab_client_fail(client, -EINVAL,
				   "stop strings are NULL but their count is "
				   "%zu", options->n_stop);
	for (size_t i = 0; i < options->n_stop; i++)
		if (options->stop[i] == NULL || options->stop[i][0] == '\0')
			return slab_client_fail(client, -EINVAL,
					   "stop string %zu is empty", i);

	rc = slab_client_set_prompt(client, options->prompt, options->prompt_ids,
			       options->n_prompt_ids, &prompt, &generate.text,
			       &tokens, &generate.tokens);
	if (rc < 0)
		return rc;
	if (prompt == SLAB_PROMPT_TEXT)
		generate.prompt_case = SLABD__GENERATE_REQUEST__PROMPT_TEXT;
	else if (prompt == SLAB_PROMPT_TOKENS)
		generate.prompt_case = SLABD__GENERATE_REQUEST__PROMPT_TOKENS;

	generate.session = (char *)(options->session ? options->session : "");
	generate.max_tokens = options->max_tokens;
	generate_set_sampling(&generate, options);
	generate.stop = (char **)options->stop;
	generate.n_stop = options->n_stop;
	generate.stream = on_token != NULL;
	request.kind_case = SLABD__REQUEST__KIND_GENERATE;
	request.generate = &generate;

	rc = slab_client_send(client, &request);
	if (rc < 0)
		return rc;

	for (;;) {
		Slabd__Reply *reply;

		rc = slab_client_receive(client, &reply, request.request_id,
				    &cancel_sent);
		if (rc < 0)
			return rc;
		rc = generate_handle_reply(client, reply, request.request_id,
					   generate.stream, on_token, user,
					   &cancel_sent, result, &status);
		slabd__reply__free_unpacked(reply, NULL);
		if (rc < 0)
			return rc;
		if (rc == 1)
			return status;
	}
}
