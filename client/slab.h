/*
 * libslab: the client library of slabd.
 *
 * A struct slab_client is one connection to the broker's Unix stream socket.
 * Every call sends one request and blocks until its reply arrives, so a
 * client serves one thread at a time; use one client per thread.
 *
 * Every function returns 0 (or a count) on success and a negative errno value
 * on failure. When the broker replies with an error, the return value is the
 * errno mapped from its error code (see slab_errno_from_code()) and
 * slab_error_message() returns the broker's message. Local failures leave
 * slab_server_error() at 0 and put a description in slab_error_message() too.
 * The library never logs and never prints.
 */
#ifndef SLAB_CLIENT_SLAB_H
#define SLAB_CLIENT_SLAB_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Environment variable naming the socket that slab_connect(NULL) uses. */
#define SLAB_SOCKET_ENV "SLABD_SOCKET"

/* Socket path used when neither SLABD_SOCKET nor XDG_RUNTIME_DIR is set. */
#define SLAB_SYSTEM_SOCKET "/run/slabd/default.sock"

/* Buffer size for a session handle, terminating NUL included. */
#define SLAB_HANDLE_SIZE 64

/* Buffer size for the last error message, terminating NUL included. */
#define SLAB_MESSAGE_SIZE 512

/* Error codes the broker sends, with the same values as slabd.ErrorCode. */
enum slab_error_code {
	SLAB_ERROR_NONE = 0, /* no broker error: the failure was local */
	SLAB_ERROR_INVALID_ARGUMENT = 1,
	SLAB_ERROR_NOT_FOUND = 2,
	SLAB_ERROR_RESOURCE_EXHAUSTED = 3,
	SLAB_ERROR_CONTEXT_FULL = 4,
	SLAB_ERROR_UNAVAILABLE = 5,
	SLAB_ERROR_INTERNAL = 6,
	SLAB_ERROR_FAILED_PRECONDITION = 7,
	SLAB_ERROR_CANCELLED = 8,
	SLAB_ERROR_UNIMPLEMENTED = 9,
	SLAB_ERROR_PERMISSION_DENIED = 10,
};

enum slab_context_policy {
	SLAB_CONTEXT_ERROR = 0, /* reject what does not fit */
	SLAB_CONTEXT_SHIFT = 1, /* drop old positions after the first n_keep */
};

/* Reason a generation ended, with the same values as slabd.FinishReason. */
enum slab_finish_reason {
	SLAB_FINISH_UNSPECIFIED = 0,
	SLAB_FINISH_LENGTH = 1,
	SLAB_FINISH_STOP = 2,
	SLAB_FINISH_EOS = 3,
	SLAB_FINISH_CONTEXT_FULL = 4,
	SLAB_FINISH_CANCELLED = 5,
	SLAB_FINISH_ERROR = 6,
};

/* Broker state, with the same values as slabd.HealthStatus. */
enum slab_health_status {
	SLAB_HEALTH_UNSPECIFIED = 0,
	SLAB_HEALTH_OK = 1,
	SLAB_HEALTH_DEGRADED = 2,
	SLAB_HEALTH_STARTING = 3,
	SLAB_HEALTH_DRAINING = 4,
};

struct slab_client;

/* Model shape as the broker reports it. */
struct slab_model_shape {
	int32_t dim;        /* embedding width, elements */
	int32_t hidden_dim; /* feed-forward width, elements */
	int32_t n_layers;
	int32_t n_heads;
	int32_t n_kv_heads;
	int32_t vocab_size; /* tokens */
	int32_t seq_len;    /* trained sequence length, tokens */
};

struct slab_server_info {
	uint32_t protocol_version;
	char server_version[128];     /* truncated to fit */
	struct slab_model_shape model;
	uint32_t max_context;         /* largest session context, tokens */
};

struct slab_session_options {
	uint32_t max_context;            /* tokens; 0 = the broker's maximum */
	enum slab_context_policy policy; /* default SLAB_CONTEXT_ERROR */
	uint32_t n_keep;                 /* tokens kept under SHIFT; default 0 */
	bool has_seed;                   /* false: the broker draws a seed */
	uint64_t seed;
};

struct slab_session_info {
	char handle[SLAB_HANDLE_SIZE];
	uint32_t committed_length;       /* tokens */
	uint32_t max_context;            /* tokens */
	uint64_t last_use_unix_ms;       /* ms since the Unix epoch */
	enum slab_context_policy policy;
};

/*
 * Options of one generation. Fields left as slab_generate_options_init() sets
 * them are not sent, so the broker applies its defaults. Exactly one of
 * prompt and prompt_ids may be set; neither continues from the session's
 * committed text.
 */
struct slab_generate_options {
	const char *session;      /* handle; NULL or "" = one-shot session */
	const char *prompt;       /* UTF-8 text, or NULL */
	const int32_t *prompt_ids; /* token ids, or NULL */
	size_t n_prompt_ids;
	uint32_t max_tokens;      /* 1 to the broker's cap; 0 is rejected */
	bool has_temperature;
	float temperature;        /* 0 = greedy */
	bool has_top_k;
	uint32_t top_k;           /* 0 = off */
	bool has_top_p;
	float top_p;              /* (0, 1]; 1 = off */
	bool has_min_p;
	float min_p;              /* [0, 1]; 0 = off */
	bool has_repetition_penalty;
	float repetition_penalty; /* > 0; 1 = off */
	bool has_seed;
	uint64_t seed;            /* default: the session's seed */
	const char *const *stop;  /* n_stop stop strings */
	size_t n_stop;
};

/* One streamed token. piece is not NUL-terminated and may be empty while a
 * multi-byte UTF-8 character is incomplete. */
struct slab_token {
	int32_t id;
	const char *piece;
	size_t piece_len;
	uint32_t position; /* position in the session, tokens from 0 */
};

/*
 * Callback run once per streamed token. A non-zero return value sends a
 * Cancel for the generation. slab_generate() then keeps reading until the
 * generation's Done arrives, and does not call the callback again.
 */
typedef int (*slab_token_fn)(const struct slab_token *token, void *user);

struct slab_generate_result {
	enum slab_finish_reason finish_reason;
	uint32_t prompt_tokens;          /* tokens appended from the prompt */
	uint32_t completion_tokens;      /* tokens generated */
	uint64_t time_to_first_token_us; /* microseconds; 0 if none */
	double decode_tokens_per_second; /* 0 with fewer than two tokens */
	uint32_t committed_length;       /* session length afterwards, tokens */
	char *text;      /* NUL-terminated: the whole text, or when streamed only
			    the bytes no token carried (usually empty) */
	size_t text_len; /* bytes, NUL excluded */
};

struct slab_metric {
	char *name;
	bool counter; /* true: counter, false: gauge */
	double value;
	char *help;
};

struct slab_stats {
	struct slab_metric *metrics;
	size_t n_metrics;
	char *prometheus_text; /* Prometheus text format, NUL-terminated */
};

struct slab_health {
	enum slab_health_status status;
	uint32_t workers_live;
	uint32_t workers_configured;
	char message[SLAB_MESSAGE_SIZE];
};

/*
 * Writes the default socket path to buffer: $SLABD_SOCKET when set and not
 * empty, else $XDG_RUNTIME_DIR/slabd/default.sock when XDG_RUNTIME_DIR is set,
 * else /run/slabd/default.sock. Returns the path length, or -ENAMETOOLONG
 * when it does not fit in size bytes.
 */
int slab_default_socket_path(char *buffer, size_t size);

/*
 * Connects to the broker at socket_path (NULL selects the default path) and
 * stores a new client in *out. Returns -ENAMETOOLONG for a path longer than a
 * Unix socket address holds, -ENOMEM, or the negative errno of socket() or
 * connect(), such as -ENOENT or -ECONNREFUSED when no broker listens. Sends
 * nothing; call slab_hello() to check the protocol version.
 */
int slab_connect(const char *socket_path, struct slab_client **out);

/* Closes the connection and frees the client. NULL is allowed. */
void slab_close(struct slab_client *client);

/* Returns the connected socket's descriptor. */
int slab_fd(const struct slab_client *client);

/* Returns the message of the last failed call, or "" after a success. The
 * string lives in the client until its next call. */
const char *slab_error_message(const struct slab_client *client);

/* Returns the broker's error code for the last failed call, or
 * SLAB_ERROR_NONE when the failure was local or the call succeeded. */
enum slab_error_code slab_server_error(const struct slab_client *client);

/*
 * Maps a broker error code to the negative errno the calls return:
 * INVALID_ARGUMENT -EINVAL, NOT_FOUND -ENOENT, RESOURCE_EXHAUSTED -ENOSPC,
 * CONTEXT_FULL -EOVERFLOW, UNAVAILABLE -EAGAIN, FAILED_PRECONDITION -EBUSY,
 * CANCELLED -ECANCELED, UNIMPLEMENTED -EOPNOTSUPP, and INTERNAL or any other
 * value -EREMOTEIO.
 */
int slab_errno_from_code(enum slab_error_code code);

/* Returns the upper-case name of code, such as "NOT_FOUND". */
const char *slab_error_code_name(enum slab_error_code code);

/* Returns the upper-case name of reason, such as "EOS". */
const char *slab_finish_reason_name(enum slab_finish_reason reason);

/* Returns the upper-case name of status, such as "OK". */
const char *slab_health_status_name(enum slab_health_status status);

/*
 * Registers a flag that a signal handler sets to cancel the running
 * generation, for example on SIGINT. While slab_generate() waits, it checks
 * the flag at least every 200 ms and, once the flag is non-zero, sends one
 * Cancel and keeps waiting for Done. The library only reads the flag. NULL
 * removes it.
 */
void slab_set_interrupt_flag(struct slab_client *client,
			     volatile sig_atomic_t *flag);

/*
 * Exchanges protocol versions and stores what the broker reports in *info
 * (may be NULL). Returns -EPROTONOSUPPORT when the broker speaks another
 * protocol version.
 */
int slab_hello(struct slab_client *client, struct slab_server_info *info);

/* Sets every option to its default: broker maximum context, policy ERROR,
 * n_keep 0, seed drawn by the broker. */
void slab_session_options_init(struct slab_session_options *options);

/*
 * Opens a session and writes its handle, NUL-terminated, to handle, which
 * must hold SLAB_HANDLE_SIZE bytes. options NULL selects the defaults.
 * *max_context (may be NULL) receives the context limit granted, in tokens.
 */
int slab_session_open(struct slab_client *client,
		      const struct slab_session_options *options,
		      char handle[SLAB_HANDLE_SIZE], uint32_t *max_context);

/* Closes the session named by handle and frees its KV cache. */
int slab_session_close(struct slab_client *client, const char *handle);

/*
 * Lists the broker's sessions into a new array stored in *sessions, freed
 * with free(), and their number in *count. Returns the count.
 */
int slab_session_list(struct slab_client *client,
		      struct slab_session_info **sessions, size_t *count);

/* Sets every option to "not set", with no prompt and no session. */
void slab_generate_options_init(struct slab_generate_options *options);

/*
 * Runs one generation. With on_token, tokens are streamed and on_token is
 * called for each of them; without it, the whole text arrives in
 * result->text. Fills *result (call slab_generate_result_free() afterwards,
 * whatever the return value) and returns 0 when the generation ended,
 * cancelled ones included, or a negative errno when the broker rejected it
 * or failed it (finish reason ERROR, with result still filled).
 */
int slab_generate(struct slab_client *client,
		  const struct slab_generate_options *options,
		  slab_token_fn on_token, void *user,
		  struct slab_generate_result *result);

/* Frees the text of result. */
void slab_generate_result_free(struct slab_generate_result *result);

/*
 * Appends text (UTF-8) or, when text is NULL, n_ids token ids to the session
 * without generating. *committed_length (may be NULL) receives the session's
 * committed length afterwards, in tokens. Returns the number of tokens
 * appended.
 */
int slab_prefill(struct slab_client *client, const char *session,
		 const char *text, const int32_t *ids, size_t n_ids,
		 uint32_t *committed_length);

/*
 * Tokenizes text with the broker's tokenizer and stores the ids in a new
 * array freed with free(). Returns the number of ids.
 */
int slab_tokenize(struct slab_client *client, const char *text, bool add_bos,
		  int32_t **ids, size_t *n_ids);

/*
 * Asks the broker to cancel a request. With session NULL or "", request_id
 * names a request of this connection. With a session handle, it cancels the
 * request running on that session from any connection, and request_id 0
 * matches whatever runs there. *cancelled (may be NULL) is true when a
 * running request matched.
 */
int slab_cancel(struct slab_client *client, uint64_t request_id,
		const char *session, bool *cancelled);

/* Fetches the broker's counters and gauges; free with slab_stats_free(). */
int slab_stats(struct slab_client *client, struct slab_stats *stats);

/* Frees what slab_stats() allocated in stats. */
void slab_stats_free(struct slab_stats *stats);

/* Fetches the broker's health. Succeeds whatever the status is. */
int slab_health(struct slab_client *client, struct slab_health *health);

#endif /* SLAB_CLIENT_SLAB_H */
