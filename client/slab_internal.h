/*
 * Internals of libslab shared by its source files: the client structure and
 * the send and receive machinery that every request goes through.
 */
#ifndef SLAB_CLIENT_SLAB_INTERNAL_H
#define SLAB_CLIENT_SLAB_INTERNAL_H

#include <stdint.h>

#include "client/slab.h"
#include "proto/frame.h"

/* Interval at which a wait re-checks the interrupt flag, in milliseconds. */
#define SLAB_INTERRUPT_POLL_MS 200

struct slab_client {
	int fd;
	uint64_t next_request_id;       /* starts at 1; 0 is never sent */
	uint64_t pending_cancel_id;     /* Cancel whose reply is due, or 0 */
	int broken;                     /* negative errno that desynchronized
					 * the stream, or 0 */
	enum slab_error_code server_error;
	char message[SLAB_MESSAGE_SIZE];
	volatile sig_atomic_t *interrupt; /* may be NULL */
};

/* Clears the error state at the start of a call. Returns client->broken. */
int slab_client_begin(struct slab_client *client);

/* Records a local failure with a printf-style message and returns rc. */
int slab_client_fail(struct slab_client *client, int rc, const char *format, ...)
	__attribute__((format(printf, 3, 4)));

/* Records a failure that leaves the stream unusable, then as slab_client_fail(). */
int slab_client_break(struct slab_client *client, int rc, const char *format, ...)
	__attribute__((format(printf, 3, 4)));

/* Records the broker's error and returns the errno mapped from its code. */
int slab_client_server_error(struct slab_client *client,
			const Slabd__Error *error);

/* Gives request the next request id and sends it. Returns 0 or an error
 * recorded in the client. */
int slab_client_send(struct slab_client *client, Slabd__Request *request);

/*
 * Receives the next reply in *reply. A reply to the Cancel that
 * client->pending_cancel_id names is consumed here and not returned. When
 * cancel_target is non-zero, an interrupt flag is registered and it becomes
 * non-zero during the wait, a Cancel for cancel_target is sent once and
 * *cancel_sent is set. Returns 0 or an error recorded in the client.
 */
int slab_client_receive(struct slab_client *client, Slabd__Reply **reply,
		   uint64_t cancel_target, bool *cancel_sent);

/* Sends a Cancel for target on this connection and remembers its id. */
int slab_client_send_cancel(struct slab_client *client, uint64_t target);

/*
 * Sends request and receives its one reply, which must echo its id and be
 * of kind expected. An Error reply becomes the broker error it carries.
 * Returns 0 with *reply set, or a negative errno.
 */
int slab_client_call(struct slab_client *client, Slabd__Request *request,
		Slabd__Reply__KindCase expected, Slabd__Reply **reply);

enum slab_client_prompt {
	SLAB_PROMPT_NONE,
	SLAB_PROMPT_TEXT,
	SLAB_PROMPT_TOKENS,
};

/*
 * Points the prompt oneof of a Generate or Prefill at text or at n_ids token
 * ids, using *tokens as the TokenIds message, and stores which one in *kind.
 * Returns -EINVAL, recorded in the client, when both are given.
 */
int slab_client_set_prompt(struct slab_client *client, const char *text,
		      const int32_t *ids, size_t n_ids,
		      enum slab_client_prompt *kind, char **text_field,
		      Slabd__TokenIds *tokens, Slabd__TokenIds **tokens_field);

#endif /* SLAB_CLIENT_SLAB_INTERNAL_H */
