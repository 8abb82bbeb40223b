/*
 * The broker's state, shared by the files of broker/: configuration, client
 * connections, sessions with their running request, workers and steps.
 *
 * Everything runs on one thread, driven by the event loop. The session
 * table and the KV block pool live in shared memory (shm/); struct
 * broker_session adds what only the running broker needs: the request in
 * progress and the blocks rented for a step that has not committed yet.
 */
#ifndef SLAB_BROKER_BROKER_H
#define SLAB_BROKER_BROKER_H

#include "broker/loop.h"
#include "proto/frame.h"
#include "proto/slabd.pb-c.h"
#include "proto/worker.pb-c.h"
#include "shm/shm.h"
#include "worker/engine.h"

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define BROKER_VERSION "slabd 0.1.0"
#define BROKER_PROTOCOL_VERSION 1

/* Bound on one worker packet. */
#define BROKER_MAX_PACKET (4u << 20)
/* Stop strings per request, and bytes per stop string. */
#define BROKER_MAX_STOP_STRINGS 16
#define BROKER_MAX_STOP_BYTES 256

/* A fault to inject into worker steps, for tests of recovery. */
struct broker_fault {
	int kind;           /* Slabd__Worker__Fault */
	uint64_t step;      /* inject into this step id once, or 0 */
	int64_t position;   /* inject into every step computing it, or -1 */
};

#define BROKER_MAX_FAULTS 8

struct broker_config {
	const char *model;
	const char *tokenizer;
	char socket_path[256];
	const char *instance;
	const char *worker_path;     /* slabd-worker executable */
	int workers;
	int threads_per_worker;
	uint64_t kv_memory;          /* bytes */
	int block_tokens;
	int max_batch;
	int prefill_chunk;           /* tokens */
	int decode_run;              /* tokens per decode run, 1 = no runs */
	int max_sessions;
	int max_context;             /* 0 = the model's */
	enum engine_kv_type kv_type;
	int session_idle_timeout;    /* seconds, 0 = never */
	uint32_t max_frame;          /* bytes */
	int max_connections;
	int max_requests_per_connection;
	int max_tokens_cap;          /* largest max_tokens a request may ask */
	uint64_t send_buffer_limit;  /* bytes queued to one client */
	int step_timeout_floor_ms;   /* minimum step deadline */
	double step_timeout_factor;  /* deadline ms per token of the step */
	int drain_seconds;
	int crash_loop_restarts;     /* restarts a minute before degraded */
	bool fault_injection;        /* workers act out requested faults */
	struct broker_fault faults[BROKER_MAX_FAULTS];
	int n_faults;
	bool force_epoll;
	int log_level;
	unsigned socket_mode;        /* permission bits of the socket */
	uid_t allow_uids[16];        /* peers allowed by uid, with allow_gids */
	int n_allow_uids;
	gid_t allow_gids[16];
	int n_allow_gids;
	int frame_timeout;           /* seconds a partial frame may stall */
};

struct broker;
struct broker_session;
struct broker_connection;

/* A Generate or Prefill in progress on a session. */
struct broker_request {
	uint64_t request_id;
	struct broker_connection *connection; /* NULL once the client left */
	struct broker_session *session;
	bool is_prefill;
	bool stream;
	bool cancelled;
	bool finishing;         /* the last token is being committed */
	Slabd__FinishReason finish_reason;
	char error[512];        /* for FINISH_REASON_ERROR */
	Slabd__ErrorCode error_code;

	int32_t *prompt;        /* tokens still to feed, in order */
	uint32_t n_prompt;
	uint32_t prompt_fed;    /* committed prompt tokens */

	int32_t max_tokens;     /* 0 = no own limit */
	uint32_t generated;
	struct engine_sampling sampling;
	char *stop[BROKER_MAX_STOP_STRINGS];
	size_t n_stop;

	struct engine_detokenizer detokenizer;
	char *held;             /* text not yet sent: may start a stop string */
	size_t n_held;
	char *text;             /* everything sent, for non-streaming Done */
	size_t n_text, text_capacity;

	uint64_t received_ns;
	uint64_t first_token_ns;
	uint64_t last_token_ns;
};

/* Work a session has in the step a worker is running. */
struct broker_step_entry {
	struct broker_session *session;
	int32_t start;
	int32_t n;
	bool sample;
	bool shift;
};

struct broker_step {
	uint64_t id;
	int n_entries;
	struct broker_step_entry *entries; /* (max_batch) */
	uint64_t sent_ns;         /* when sent, or when the last run reply came */
	uint64_t tokens;
	int run;                  /* replies a decode run may still send, else 0 */
	bool run_stopped;         /* the run's later tokens are not wanted */
	bool run_yielding;        /* the run was asked to end for other work */
};

enum broker_worker_state {
	WORKER_STOPPED,
	WORKER_STARTING,
	WORKER_IDLE,
	WORKER_BUSY,
	WORKER_DEAD,          /* exited or killed, waiting for its ops */
};

struct broker_worker {
	struct broker *broker;
	int id;
	enum broker_worker_state state;
	pid_t pid;
	int fd;
	int pidfd;
	struct loop_op recv_op, send_op, exit_op, restart_op;
	uint8_t *recv_buffer;     /* (65536) */
	uint8_t *send_buffer;     /* grows up to BROKER_MAX_PACKET */
	size_t send_capacity;
	struct broker_step step;  /* valid while WORKER_BUSY */
	bool exited;              /* pidfd reported the exit */
	uint64_t started_ns;
	int restarts;
	int consecutive_failures;
};

/*
 * A session as the broker sees it. Logs name a session by slot and
 * generation ("session 3/7"), never by its handle, which holds the secret.
 */
struct broker_session {
	bool in_use;
	struct shm_handle handle;
	char handle_text[SHM_HANDLE_STRLEN];
	bool one_shot;
	bool in_step;
	int crash_count;          /* workers that died holding this session */
	bool solo;                /* next step runs this session alone */
	struct broker_request *request;

	uint32_t committed;       /* mirror of the shared session table */
	uint32_t context_limit;
	uint32_t policy;
	uint32_t n_keep;
	uint64_t seed;

	int32_t pending_token;    /* sampled, not yet committed; -1 if none */
	bool refeed_last;         /* recompute the last committed position */
	int32_t *blocks;          /* committed blocks, then rented ones */
	uint32_t n_blocks;        /* committed + rented */
	uint32_t n_rented;        /* rented for the step in flight */
	int32_t *shift_blocks;    /* target table of a shift in flight */
	uint32_t n_shift_blocks;
	uint32_t shift_discard;

	struct broker_session *next_runnable;
	bool queued;
};

struct broker_connection {
	struct broker *broker;
	uint64_t id;
	int fd;
	pid_t peer_pid;
	uid_t peer_uid;
	struct loop_op recv_op, send_op;
	uint8_t recv_buffer[65536];
	struct frame_reader reader;
	uint8_t *out;
	size_t out_len, out_sent, out_capacity;
	bool sending;
	bool closing;
	int n_requests;           /* Generate and Prefill in progress */
	uint64_t partial_since_ns; /* when an incomplete frame started, or 0 */
	struct broker_connection *next, *prev;
};

struct broker_stats {
	uint64_t requests;
	uint64_t steps;
	uint64_t tokens_prefilled;
	uint64_t tokens_decoded;
	uint64_t worker_restarts;
	uint64_t step_retries;
	uint64_t poison_steps;
	uint64_t sessions_opened;
	uint64_t sessions_closed;
	uint64_t sessions_evicted;
	uint64_t connections;
	uint64_t rejected_connections;
	uint64_t bad_frames;
	uint64_t rejected_peers;
	uint64_t stalled_connections;
	uint64_t last_reject_log_ns;  /* rate limit of rejected-peer logs */
	uint64_t rejects_not_logged;
	uint64_t ttft_buckets[12];    /* time to first token histogram */
	uint64_t ttft_count;
	double ttft_sum;
	uint64_t itl_buckets[12];     /* inter-token latency histogram */
	uint64_t itl_count;
	double itl_sum;
};

struct broker {
	struct broker_config config;
	struct loop *loop;
	struct engine_model *model;   /* header only is used; weights stay cold */
	struct engine_shape shape;
	struct engine_tokenizer *tokenizer;
	struct shm_arena *arena;
	struct shm_shape kv_shape;
	int max_step_tokens;

	int listen_fd;
	int socket_lock_fd;           /* flock of SOCKET.lock, held for life */
	struct loop_op accept_op;
	bool accepting;
	int signal_fd;
	struct loop_op signal_op;
	struct loop_op tick_op;
	uint8_t signal_buffer[128];

	struct broker_worker *workers;
	int live_workers;
	bool ready;                   /* every worker sent Ready once */
	bool draining;
	uint64_t drain_deadline_ns;
	bool stopping;
	int exit_status;
	uint64_t started_ns;
	uint64_t next_step_id;
	bool finishing_step;          /* scheduler_step_done() applies results */
	uint64_t restart_window_start_ns;
	uint64_t last_worker_failure_ns;  /* 0 before the first failure */
	int restarts_in_window;
	bool degraded;

	struct broker_session *sessions;  /* (max_sessions), by slot */
	struct broker_session *runnable_head, *runnable_tail;
	struct broker_connection *connections;
	int n_connections;
	uint64_t next_connection_id;
	struct broker_stats stats;
	int32_t *scratch_tokens;          /* (max_context + 1) */
};

/* main.c */
int broker_parse_options(int argc, char **argv, struct broker_config *config);

/* server.c: listening socket and client connections. */
int broker_lock_socket(struct broker *broker);
void broker_unlock_socket(struct broker *broker);
int broker_listen(struct broker *broker);
void broker_stop_listening(struct broker *broker);
void connection_send_reply(struct broker_connection *connection,
			   Slabd__Reply *reply);
void connection_send_error(struct broker_connection *connection,
			   uint64_t request_id, Slabd__ErrorCode code,
			   const char *format, ...)
	__attribute__((format(printf, 4, 5)));
void connection_close(struct broker_connection *connection);
void connections_check_stalled(struct broker *broker);

/* requests.c: request handlers. */
void broker_handle_request(struct broker_connection *connection,
			   const Slabd__Request *request);
void broker_connection_gone(struct broker *broker,
			    struct broker_connection *connection);

/* sessions.c: sessions and their generation state. */
int session_open(struct broker *broker,
		 const struct shm_session_params *params, bool one_shot,
		 struct broker_session **out);
struct broker_session *session_find(struct broker *broker, const char *text);
void session_close(struct broker *broker, struct broker_session *session);
void session_attach_existing(struct broker *broker);
void session_expire_idle(struct broker *broker);
void session_make_runnable(struct broker *broker,
			   struct broker_session *session);
void session_release_rented(struct broker *broker,
			    struct broker_session *session);
bool session_evict_lru(struct broker *broker, struct broker_session *keep);
void request_finish(struct broker *broker, struct broker_request *request,
		    Slabd__FinishReason reason);
void request_fail(struct broker *broker, struct broker_request *request,
		  Slabd__ErrorCode code, const char *format, ...)
	__attribute__((format(printf, 4, 5)));
void request_accept_token(struct broker *broker,
			  struct broker_request *request, int32_t token,
			  uint32_t position);

/* scheduler.c: steps. */
void scheduler_run(struct broker *broker);
void scheduler_step_done(struct broker *broker, struct broker_worker *worker,
			 const Slabd__Worker__StepReply *reply);
void scheduler_step_lost(struct broker *broker, struct broker_worker *worker);

/* workers.c: worker processes. */
int workers_start(struct broker *broker);
int worker_send_step(struct broker_worker *worker,
		     const Slabd__Worker__StepRequest *request);
/* Asks a worker to end the decode run of its step after this token. */
void worker_stop_run(struct broker_worker *worker);
void workers_stop(struct broker *broker);
void worker_kill(struct broker_worker *worker, const char *reason);
/* Whether the worker's process still runs, from a poll of its pidfd. */
bool worker_alive(const struct broker_worker *worker);
void workers_check_deadlines(struct broker *broker);
void workers_free(struct broker *broker);

/* stats.c */
void stats_observe_ttft(struct broker *broker, double seconds);
void stats_observe_itl(struct broker *broker, double seconds);
char *stats_prometheus(struct broker *broker);
void stats_send(struct broker_connection *connection, uint64_t request_id);

#endif
