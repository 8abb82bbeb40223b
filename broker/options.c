/*
 * Command-line options of slabd. Every invalid value exits with status 2
 * and a message naming the option, the value and what is accepted.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


static void usage(FILE *out)
{
	fprintf(out,
"Usage: slabd --model PATH --tokenizer PATH [options]\n"
"       slabd --instance NAME --remove-segments\n"
"\n"
"Serves a llama2.c checkpoint to clients on a Unix socket. Session KV caches\n"
"live in shared memory owned by this broker; worker processes compute steps.\n"
"\n"
"  --model PATH                 llama2.c checkpoint (required)\n"
"  --tokenizer PATH             tokenizer file of the same vocabulary (required)\n"
"  --socket PATH                socket to listen on (default:\n"
"                               $XDG_RUNTIME_DIR/slabd/INSTANCE.sock, else\n"
"                               /run/slabd/INSTANCE.sock)\n"
"  --instance NAME              instance name; shared memory segments are\n"
"                               /slabd-NAME-kv and /slabd-NAME-ctl (default: default)\n"
"  --workers N                  worker processes (default: number of online CPUs)\n"
"  --threads-per-worker N       threads of each worker (default 1)\n"
"  --kv-memory SIZE             bytes of KV cache, with suffix K, M or G\n"
"                               (default 256M), rounded down to whole blocks\n"
"  --kv-type TYPE               KV cache element type, f32 or f16 (default f32)\n"
"  --block-tokens N             positions per KV block (default 16)\n"
"  --max-context N              positions per session (default: the model's)\n"
"  --max-batch N                sessions in one worker step (default 32)\n"
"  --prefill-chunk N            prompt tokens of one session per step (default 128)\n"
"  --decode-run N               tokens a session decoding alone computes per\n"
"                               step request, 1 for one each (default 64)\n"
"  --max-sessions N             open sessions at most (default 256)\n"
"  --max-tokens-cap N           largest max_tokens of a request (default 16777216)\n"
"  --session-idle-timeout SECONDS  close sessions unused this long, 0 = never\n"
"                               (default 600)\n"
"  --max-frame BYTES            largest client message, with suffix K or M\n"
"                               (default 1M)\n"
"  --frame-timeout SECONDS      disconnect a client that sent part of a frame\n"
"                               and nothing more for this long (default 30)\n"
"  --socket-mode MODE           octal permission bits of the socket (default 0660);\n"
"                               its directory is created with mode 0750\n"
"  --allow-uid UID              accept only peers with this uid (repeatable, up\n"
"                               to 16; with --allow-gid, either may match);\n"
"                               default: any peer the socket mode lets in\n"
"  --allow-gid GID              accept only peers with this gid (repeatable)\n"
"  --max-connections N          client connections at once (default 256)\n"
"  --max-requests N             Generate and Prefill requests in progress per\n"
"                               connection (default 64)\n"
"  --step-timeout-floor MS      least time a worker gets for a step (default 5000)\n"
"  --step-timeout-factor MS     further time per token of the step (default 50)\n"
"  --drain-seconds N            time SIGTERM gives running steps (default 10)\n"
"  --crash-loop-restarts N      worker restarts within 60 s above which health\n"
"                               reports degraded (default 10); restarts back off\n"
"                               exponentially from 100 ms to 10 s either way\n"
"  --inject-fault KIND:step:N   make the worker running step N crash, hang or\n"
"                               send a malformed reply (KIND crash, hang or\n"
"                               malformed); for recovery tests\n"
"  --inject-fault KIND:position:P  the same for every step computing position P\n"
"  --event-loop KIND            io_uring (default, with epoll where io_uring\n"
"                               cannot start) or epoll\n"
"  --log-level LEVEL            error, warning, notice, info or debug (default info)\n"
"  --remove-segments            remove the instance's shared memory and exit\n"
"  --help                       print this help and exit\n");
}


static void invalid(const char *option, const char *value, const char *expected)
{
	fprintf(stderr, "slabd: invalid value '%s' for %s: expected %s\n",
		value, option, expected);
	exit(2);
}


static int parse_int(const char *option, const char *value, long min, long max)
{
	char expected[96];
	char *end;
	long result;

	errno = 0;
	result = strtol(value, &end, 10);
	if (errno != 0 || end == value || *end != '\0' || result < min ||
	    result > max) {
		snprintf(expected, sizeof(expected), "an integer from %ld to %ld",
			 min, max);
		invalid(option, value, expected);
	}
	return (int)result;
}


/* Parses KIND:step:N or KIND:position:P. Returns 0 or -1. */
static int parse_fault(const char *text, struct broker_fault *fault)
{
	static const char *const kinds[] = { "crash", "hang", "malformed" };
	char kind[16], where[16];
	long long value;
	int used = 0;

	if (sscanf(text, "%15[a-z]:%15[a-z]:%lld%n", kind, where, &value,
		   &used) != 3 || text[used] != '\0' || value < 0)
		return -1;
	fault->kind = 0;
	for (int i = 0; i < 3; i++)
		if (strcmp(kind, kinds[i]) == 0)
			fault->kind = i + 1;
	fault->step = 0;
	fault->position = -1;
	if (strcmp(where, "step") == 0 && value > 0)
		fault->step = (uint64_t)value;
	else if (strcmp(where, "position") == 0)
		fault->position = value;
	else
		return -1;
	return fault->kind == 0 ? -1 : 0;
}


/* Fills the default socket path for an instance. */
static void default_socket(struct broker_config *config)
{
	const char *runtime = getenv("XDG_RUNTIME_DIR");

	if (runtime != NULL && runtime[0] != '\0')
		snprintf(config->socket_path, sizeof(config->socket_path),
			 "%s/slabd/%s.sock", runtime, config->instance);
	else
		snprintf(config->socket_path, sizeof(config->socket_path),
			 "/run/slabd/%s.sock", config->instance);
}


/* Path of slabd-worker: beside this executable. */
static const char *worker_path(void)
{
	static char path[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 32);
	char *slash;

	if (n <= 0)
		return "slabd-worker";
	path[n] = '\0';
	slash = strrchr(path, '/');
	strcpy(slash != NULL ? slash + 1 : path, "slabd-worker");
	return path;
}


/*
 * Parses argv into config. Returns 0 to run, -1 after printing help, and
 * exits with status 2 on a usage error.
 */
int broker_parse_options(int argc, char **argv, struct broker_config *config)
{
	enum {
		OPT_MODEL = 256, OPT_TOKENIZER, OPT_SOCKET, OPT_INSTANCE,
		OPT_WORKERS, OPT_THREADS, OPT_KV_MEMORY, OPT_KV_TYPE,
		OPT_BLOCK_TOKENS, OPT_MAX_CONTEXT, OPT_MAX_BATCH,
		OPT_PREFILL_CHUNK, OPT_DECODE_RUN, OPT_MAX_SESSIONS, OPT_MAX_TOKENS_CAP,
		OPT_IDLE, OPT_MAX_FRAME, OPT_MAX_CONNECTIONS,
		OPT_MAX_REQUESTS, OPT_STEP_FLOOR, OPT_STEP_FACTOR, OPT_DRAIN,
		OPT_FAULT, OPT_EVENT_LOOP, OPT_LOG_LEVEL, OPT_REMOVE, OPT_HELP,
		OPT_SOCKET_MODE, OPT_ALLOW_UID, OPT_ALLOW_GID, OPT_FRAME_TIMEOUT,
		OPT_CRASH_LOOP,
	};
	static const struct option options[] = {
		{ "model", required_argument, NULL, OPT_MODEL },
		{ "tokenizer", required_argument, NULL, OPT_TOKENIZER },
		{ "socket", required_argument, NULL, OPT_SOCKET },
		{ "instance", required_argument, NULL, OPT_INSTANCE },
		{ "workers", required_argument, NULL, OPT_WORKERS },
		{ "threads-per-worker", required_argument, NULL, OPT_THREADS },
		{ "kv-memory", required_argument, NULL, OPT_KV_MEMORY },
		{ "kv-type", required_argument, NULL, OPT_KV_TYPE },
		{ "block-tokens", required_argument, NULL, OPT_BLOCK_TOKENS },
		{ "max-context", required_argument, NULL, OPT_MAX_CONTEXT },
		{ "max-batch", required_argument, NULL, OPT_MAX_BATCH },
		{ "prefill-chunk", required_argument, NULL, OPT_PREFILL_CHUNK },
		{ "decode-run", required_argument, NULL, OPT_DECODE_RUN },
		{ "max-sessions", required_argument, NULL, OPT_MAX_SESSIONS },
		{ "max-tokens-cap", required_argument, NULL, OPT_MAX_TOKENS_CAP },
		{ "session-idle-timeout", required_argument, NULL, OPT_IDLE },
		{ "max-frame", required_argument, NULL, OPT_MAX_FRAME },
		{ "max-connections", required_argument, NULL, OPT_MAX_CONNECTIONS },
		{ "max-requests", required_argument, NULL, OPT_MAX_REQUESTS },
		{ "step-timeout-floor", required_argument, NULL, OPT_STEP_FLOOR },
		{ "step-timeout-factor", required_argument, NULL, OPT_STEP_FACTOR },
		{ "drain-seconds", required_argument, NULL, OPT_DRAIN },
		{ "inject-fault", required_argument, NULL, OPT_FAULT },
		{ "event-loop", required_argument, NULL, OPT_EVENT_LOOP },
		{ "log-level", required_argument, NULL, OPT_LOG_LEVEL },
		{ "remove-segments", no_argument, NULL, OPT_REMOVE },
		{ "help", no_argument, NULL, OPT_HELP },
		{ "socket-mode", required_argument, NULL, OPT_SOCKET_MODE },
		{ "allow-uid", required_argument, NULL, OPT_ALLOW_UID },
		{ "allow-gid", required_argument, NULL, OPT_ALLOW_GID },
		{ "frame-timeout", required_argument, NULL, OPT_FRAME_TIMEOUT },
		{ "crash-loop-restarts", required_argument, NULL, OPT_CRASH_LOOP },
		{ NULL, 0, NULL, 0 },
	};
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	bool remove = false;
	bool socket_set = false;
	uint64_t bytes;
	int c;

	*config = (struct broker_config){
		.instance = "default",
		.workers = cpus > 0 ? (int)cpus : 1,
		.threads_per_worker = 1,
		.kv_memory = 256ull << 20,
		.block_tokens = SHM_DEFAULT_BLOCK_TOKENS,
		.max_batch = 32,
		.prefill_chunk = 128,
		.decode_run = 64,
		.max_sessions = 256,
		.session_idle_timeout = 600,
		.max_frame = FRAME_DEFAULT_MAX,
		.max_connections = 256,
		.max_requests_per_connection = 64,
		.send_buffer_limit = 8u << 20,
		.step_timeout_floor_ms = 5000,
		.step_timeout_factor = 50.0,
		.drain_seconds = 10,
		.log_level = LOG_LEVEL_INFO,
		.worker_path = worker_path(),
		.socket_mode = 0660,
		.frame_timeout = 30,
		.crash_loop_restarts = 10,
	};

	opterr = 0;
	while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL: config->model = optarg; break;
		case OPT_TOKENIZER: config->tokenizer = optarg; break;
		case OPT_SOCKET:
			if (strlen(optarg) >= 108 || optarg[0] == '\0')
				invalid("--socket", optarg,
					"a path of 1 to 107 bytes");
			snprintf(config->socket_path,
				 sizeof(config->socket_path), "%s", optarg);
			socket_set = true;
			break;
		case OPT_INSTANCE:
			if (shm_instance_name_valid(optarg) < 0)
				invalid("--instance", optarg,
					"1 to 63 letters, digits, '-', '_' or '.'");
			config->instance = optarg;
			break;
		case OPT_WORKERS:
			config->workers = parse_int("--workers", optarg, 1, 256);
			break;
		case OPT_THREADS:
			config->threads_per_worker =
				parse_int("--threads-per-worker", optarg, 1, 256);
			break;
		case OPT_KV_MEMORY:
			if (shm_parse_size(optarg, &bytes) < 0)
				invalid("--kv-memory", optarg,
					"a byte count such as 512M or 2G");
			config->kv_memory = bytes;
			break;
		case OPT_KV_TYPE:
			if (strcmp(optarg, "f32") == 0)
				config->kv_type = ENGINE_KV_F32;
			else if (strcmp(optarg, "f16") == 0)
				config->kv_type = ENGINE_KV_F16;
			else
				invalid("--kv-type", optarg, "f32 or f16");
			break;
		case OPT_BLOCK_TOKENS:
			config->block_tokens =
				parse_int("--block-tokens", optarg, 1, 4096);
			break;
		case OPT_MAX_CONTEXT:
			config->max_context =
				parse_int("--max-context", optarg, 1, 1 << 20);
			break;
		case OPT_MAX_BATCH:
			config->max_batch = parse_int("--max-batch", optarg, 1, 1024);
			break;
		case OPT_PREFILL_CHUNK:
			config->prefill_chunk =
				parse_int("--prefill-chunk", optarg, 1, 65536);
			break;
		case OPT_DECODE_RUN:
			config->decode_run =
				parse_int("--decode-run", optarg, 1, 1024);
			break;
		case OPT_MAX_SESSIONS:
			config->max_sessions =
				parse_int("--max-sessions", optarg, 1, 65536);
			break;
		case OPT_MAX_TOKENS_CAP:
			config->max_tokens_cap =
				parse_int("--max-tokens-cap", optarg, 1, 1 << 24);
			break;
		case OPT_IDLE:
			config->session_idle_timeout = parse_int(
				"--session-idle-timeout", optarg, 0, 1 << 30);
			break;
		case OPT_MAX_FRAME:
			if (shm_parse_size(optarg, &bytes) < 0 || bytes < 64 ||
			    bytes > FRAME_LIMIT_MAX)
				invalid("--max-frame", optarg,
					"a byte count from 64 to 64M");
			config->max_frame = (uint32_t)bytes;
			break;
		case OPT_MAX_CONNECTIONS:
			config->max_connections =
				parse_int("--max-connections", optarg, 1, 65536);
			break;
		case OPT_MAX_REQUESTS:
			config->max_requests_per_connection =
				parse_int("--max-requests", optarg, 1, 65536);
			break;
		case OPT_STEP_FLOOR:
			config->step_timeout_floor_ms = parse_int(
				"--step-timeout-floor", optarg, 1, 3600000);
			break;
		case OPT_STEP_FACTOR:
			config->step_timeout_factor = parse_int(
				"--step-timeout-factor", optarg, 0, 600000);
			break;
		case OPT_DRAIN:
			config->drain_seconds =
				parse_int("--drain-seconds", optarg, 0, 3600);
			break;
		case OPT_FAULT:
			if (config->n_faults == BROKER_MAX_FAULTS ||
			    parse_fault(optarg, &config->faults[config->n_faults]) < 0)
				invalid("--inject-fault", optarg,
					"KIND:step:N or KIND:position:P with "
					"KIND crash, hang or malformed, at most 8 times");
			config->n_faults++;
			config->fault_injection = true;
			break;
		case OPT_EVENT_LOOP:
			if (strcmp(optarg, "epoll") == 0)
				config->force_epoll = true;
			else if (strcmp(optarg, "io_uring") != 0)
				invalid("--event-loop", optarg, "io_uring or epoll");
			break;
		case OPT_LOG_LEVEL:
			config->log_level = log_parse_level(optarg);
			if (config->log_level < 0)
				invalid("--log-level", optarg,
					"error, warning, notice, info or debug");
			break;
		case OPT_REMOVE: remove = true; break;
		case OPT_SOCKET_MODE: {
			char *end;
			unsigned long mode = strtoul(optarg, &end, 8);

			if (end == optarg || *end != '\0' || mode > 0777)
				invalid("--socket-mode", optarg,
					"octal permission bits such as 0660");
			config->socket_mode = (unsigned)mode;
			break;
		}
		case OPT_ALLOW_UID:
			if (config->n_allow_uids == 16)
				invalid("--allow-uid", optarg, "at most 16 uids");
			config->allow_uids[config->n_allow_uids++] =
				(uid_t)parse_int("--allow-uid", optarg, 0, INT32_MAX);
			break;
		case OPT_ALLOW_GID:
			if (config->n_allow_gids == 16)
				invalid("--allow-gid", optarg, "at most 16 gids");
			config->allow_gids[config->n_allow_gids++] =
				(gid_t)parse_int("--allow-gid", optarg, 0, INT32_MAX);
			break;
		case OPT_CRASH_LOOP:
			config->crash_loop_restarts = parse_int(
				"--crash-loop-restarts", optarg, 1, 100000);
			break;
		case OPT_FRAME_TIMEOUT:
			config->frame_timeout =
				parse_int("--frame-timeout", optarg, 1, 3600);
			break;
		case OPT_HELP:
			usage(stdout);
			return -1;
		default:
			if (optopt != 0)
				fprintf(stderr, "slabd: option %s needs a value\n",
					argv[optind - 1]);
			else
				fprintf(stderr, "slabd: unknown option %s\n",
					argv[optind - 1]);
			fprintf(stderr, "Run 'slabd --help' for the options.\n");
			exit(2);
		}
	}
	if (optind < argc) {
		fprintf(stderr, "slabd: unexpected argument '%s'\n", argv[optind]);
		exit(2);
	}
	if (remove) {
		config->model = NULL;
		return 0;
	}
	if (config->model == NULL || config->tokenizer == NULL) {
		fprintf(stderr, "slabd: %s is required; run 'slabd --help'\n",
			config->model == NULL ? "--model" : "--tokenizer");
		exit(2);
	}
	if (!socket_set)
		default_socket(config);
	if (config->max_tokens_cap == 0)
		config->max_tokens_cap = 1 << 24;
	return 0;
}
