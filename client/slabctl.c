/*
 * slabctl: command-line client of slabd, built on libslab.
 *
 * Each command connects, checks the protocol version with Hello, sends its
 * request and prints the reply. Exit status: 0 on success, 1 when the broker
 * returns an error (or health is not OK), 2 for a usage error, 3 when the
 * broker cannot be reached, and 130 when Ctrl-C cancelled a generation.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/slab.h"

#define EXIT_SERVER_ERROR 1
#define EXIT_USAGE 2
#define EXIT_NO_CONNECTION 3
#define EXIT_INTERRUPTED 130

/* Default for --max-tokens, in tokens. */
#define SLABCTL_DEFAULT_MAX_TOKENS 256

static const char usage_text[] =
	"Usage: slabctl [--socket PATH] COMMAND [OPTIONS] [ARGUMENTS]\n"
	"\n"
	"Command-line client of the slabd inference service.\n"
	"\n"
	"Global options (also accepted after the command):\n"
	"  -s, --socket PATH   Unix socket of the broker. Default: $SLABD_SOCKET,\n"
	"                      else $XDG_RUNTIME_DIR/slabd/default.sock, else\n"
	"                      /run/slabd/default.sock.\n"
	"  -h, --help          Print this help and exit.\n"
	"\n"
	"Commands:\n"
	"  generate [OPTIONS] PROMPT\n"
	"      Generate text after PROMPT and stream it to standard output as the\n"
	"      tokens arrive, followed by a newline. Ctrl-C cancels the generation\n"
	"      and waits for the broker to confirm; a second Ctrl-C exits at once.\n"
	"      --session HANDLE         Continue this session. Default: a one-shot\n"
	"                               session that is closed afterwards.\n"
	"      --max-tokens N           Maximum tokens to generate, at least 1; an end\n"
	"                               token, a stop string or a full context ends\n"
	"                               the generation earlier. Default 256.\n"
	"      --temperature T          Softmax temperature, >= 0; 0 is greedy.\n"
	"                               Default: not sent, so the broker uses 0.\n"
	"      --top-k K                Sample from the K most likely tokens; 0 is\n"
	"                               off. Default: not sent (off).\n"
	"      --top-p P                Nucleus sampling probability mass, in\n"
	"                               (0, 1]; 1 is off. Default: not sent (off).\n"
	"      --min-p P                Minimum probability relative to the most\n"
	"                               likely token, in [0, 1]; 0 is off.\n"
	"                               Default: not sent (off).\n"
	"      --repetition-penalty R   Penalty on tokens already in the context,\n"
	"                               > 0; 1 is off. Default: not sent (off).\n"
	"      --seed S                 Sampling seed, 0 to 2^64-1. Default: the\n"
	"                               session's seed.\n"
	"      --stop TEXT              End the generation at TEXT; repeat for\n"
	"                               several stop strings. Default: none.\n"
	"      --no-echo                Do not print PROMPT before the generated\n"
	"                               text. Default: print it.\n"
	"      --verbose                Print the finish reason, token counts, time\n"
	"                               to first token (ms) and decode rate\n"
	"                               (tokens/s) to standard error.\n"
	"  session open [OPTIONS]\n"
	"      Open a session and print its handle.\n"
	"      --context N              Context limit in tokens; 0 means the\n"
	"                               broker's maximum. Default 0.\n"
	"      --policy error|shift     When the context is full: fail (error), or\n"
	"                               drop the oldest tokens after the first\n"
	"                               --n-keep tokens (shift). Default error.\n"
	"      --n-keep N               Tokens never dropped under shift. Default 0.\n"
	"      --seed S                 Sampling seed of the session, 0 to 2^64-1.\n"
	"                               Default: drawn at random by the broker.\n"
	"  session close HANDLE\n"
	"      Close a session and free its KV cache.\n"
	"  session list\n"
	"      List sessions: handle, committed length and context limit in\n"
	"      tokens, context policy, and last use (UTC).\n"
	"  prefill --session HANDLE TEXT\n"
	"      Append TEXT to a session without generating; print the tokens\n"
	"      appended and the committed length.\n"
	"  tokenize [--bos] TEXT\n"
	"      Print the token ids of TEXT on one line. --bos puts the BOS token\n"
	"      first. Default: no BOS.\n"
	"  stats [--prometheus]\n"
	"      Print the broker's counters and gauges, one 'name value' line\n"
	"      each, or with --prometheus the Prometheus text format.\n"
	"  health\n"
	"      Print the broker's status and live workers; exit 0 only when the\n"
	"      status is OK.\n"
	"\n"
	"Exit status: 0 success, 1 error returned by the broker (or health not\n"
	"OK), 2 usage error, 3 cannot connect to the broker, 130 generation\n"
	"cancelled with Ctrl-C.\n";

/* Set by the SIGINT handler while a generation runs. */
static volatile sig_atomic_t interrupted;

/* Socket path from --socket, or NULL for the default. */
static const char *socket_path;


static int usage_error(const char *format, ...)
	__attribute__((format(printf, 1, 2)));

static int usage_error(const char *format, ...)
{
	va_list args;

	fputs("slabctl: ", stderr);
	va_start(args, format);
	vfprintf(stderr, format, args);
	va_end(args);
	fputs("\nTry 'slabctl --help' for more information.\n", stderr);
	return EXIT_USAGE;
}


static int print_help(void)
{
	fputs(usage_text, stdout);
	return EXIT_SUCCESS;
}


/* Parses an unsigned decimal integer in [0, max] for option name. */
static bool parse_unsigned(const char *name, const char *text, uint64_t max,
			   uint64_t *out)
{
	char *end;
	unsigned long long value;

	errno = 0;
	if (text[0] < '0' || text[0] > '9')
		goto invalid;
	value = strtoull(text, &end, 10);
	if (errno != 0 || *end != '\0' || value > max)
		goto invalid;
	*out = value;
	return true;

invalid:
	usage_error("invalid value '%s' for %s: expected an integer from 0 "
		    "to %" PRIu64, text, name, max);
	return false;
}


static bool parse_u32(const char *name, const char *text, uint32_t *out)
{
	uint64_t value;

	if (!parse_unsigned(name, text, UINT32_MAX, &value))
		return false;
	*out = (uint32_t)value;
	return true;
}


/*
 * Parses a finite float for option name that lies in [min, max], or in
 * (min, max] when min_exclusive is set. range names the range in the error
 * message.
 */
static bool parse_float(const char *name, const char *text, float min,
			bool min_exclusive, float max, const char *range,
			float *out)
{
	char *end;
	float value;

	errno = 0;
	value = strtof(text, &end);
	if (end == text || *end != '\0' || errno != 0 || !isfinite(value) ||
	    value < min || (min_exclusive && value == min) || value > max) {
		usage_error("invalid value '%s' for %s: expected a number %s",
			    text, name, range);
		return false;
	}
	*out = value;
	return true;
}


/* Connects and checks the protocol version. Returns the client, or NULL
 * after printing why, with *status set to the exit status. */
static struct slab_client *connect_broker(int *status)
{
	char path[128];
	struct slab_client *client;
	int rc;

	if (socket_path != NULL)
		snprintf(path, sizeof(path), "%s", socket_path);
	else if (slab_default_socket_path(path, sizeof(path)) < 0)
		snprintf(path, sizeof(path), "(default path too long)");

	rc = slab_connect(socket_path, &client);
	if (rc < 0) {
		fprintf(stderr,
			"slabctl: cannot connect to the broker at %s: %s; "
			"check that slabd runs, or set --socket or "
			"SLABD_SOCKET\n", path, strerror(-rc));
		*status = EXIT_NO_CONNECTION;
		return NULL;
	}

	rc = slab_hello(client, NULL);
	if (rc < 0) {
		fprintf(stderr, "slabctl: hello to the broker at %s failed: %s\n",
			path, slab_error_message(client));
		slab_close(client);
		*status = EXIT_SERVER_ERROR;
		return NULL;
	}
	return client;
}


/* Prints a failed call's message with the broker's error code when there is
 * one, and returns the exit status for it. */
static int report_failure(struct slab_client *client, const char *what)
{
	enum slab_error_code code = slab_server_error(client);

	if (code != SLAB_ERROR_NONE)
		fprintf(stderr, "slabctl: %s failed: %s: %s\n", what,
			slab_error_code_name(code), slab_error_message(client));
	else
		fprintf(stderr, "slabctl: %s failed: %s\n", what,
			slab_error_message(client));
	return EXIT_SERVER_ERROR;
}


static void on_sigint(int signo)
{
	(void)signo;
	interrupted = 1;

	/* A second Ctrl-C ends the program without waiting for the broker. */
	signal(SIGINT, SIG_DFL);
}


/* The prompt to print before the first generated text, once. */
struct prompt_echo {
	const char *prompt; /* NULL once printed, or with --no-echo */
};


static void echo_prompt(struct prompt_echo *echo)
{
	if (echo->prompt == NULL)
		return;
	fputs(echo->prompt, stdout);
	echo->prompt = NULL;
}


static int print_token(const struct slab_token *token, void *user)
{
	echo_prompt(user);
	if (token->piece_len > 0) {
		fwrite(token->piece, 1, token->piece_len, stdout);
		fflush(stdout);
	}
	return 0;
}


static void print_generate_summary(const struct slab_generate_result *result)
{
	fprintf(stderr,
		"finish reason %s, %" PRIu32 " prompt tokens, %" PRIu32
		" generated tokens, first token after %.1f ms, decode %.1f "
		"tokens/s, session length %" PRIu32 " tokens\n",
		slab_finish_reason_name(result->finish_reason),
		result->prompt_tokens, result->completion_tokens,
		(double)result->time_to_first_token_us / 1000.0,
		result->decode_tokens_per_second, result->committed_length);
}


enum {
	OPTION_SOCKET = 's',
	OPTION_HELP = 'h',
	OPTION_SESSION = 256,
	OPTION_MAX_TOKENS,
	OPTION_TEMPERATURE,
	OPTION_TOP_P,
	OPTION_TOP_K,
	OPTION_MIN_P,
	OPTION_REPETITION_PENALTY,
	OPTION_SEED,
	OPTION_STOP,
	OPTION_NO_ECHO,
	OPTION_VERBOSE,
	OPTION_CONTEXT,
	OPTION_POLICY,
	OPTION_N_KEEP,
	OPTION_BOS,
	OPTION_PROMETHEUS,
};

#define COMMON_OPTIONS                                                 \
	{ "socket", required_argument, NULL, OPTION_SOCKET },          \
	{ "help", no_argument, NULL, OPTION_HELP }

/*
 * Handles the options every command accepts. Returns 1 when opt was one of
 * them and parsing goes on, 0 when it was not, or -1 after --help (printed)
 * or an unknown option (getopt printed its name).
 */
static int handle_common_option(int opt)
{
	switch (opt) {
	case OPTION_SOCKET:
		socket_path = optarg;
		return 1;
	case OPTION_HELP:
		print_help();
		return -1;
	case '?':
		/* getopt has printed which option is wrong. */
		fputs("Try 'slabctl --help' for more information.\n", stderr);
		return -1;
	default:
		return 0;
	}
}


/* Runs getopt_long on a command's arguments, which may mix options and
 * operands; "--" ends the options. argv[0] is the command name, which getopt
 * puts in front of its messages. */
static int next_option(int argc, char **argv, const struct option *options)
{
	return getopt_long(argc, argv, "hs:", options, NULL);
}


struct generate_args {
	struct slab_generate_options options;
	const char **stop;
	bool echo;
	bool verbose;
};


/* Parses the options of generate into args. Returns -1 to go on, or the
 * exit status. */
static int parse_generate(int argc, char **argv, struct generate_args *args)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ "session", required_argument, NULL, OPTION_SESSION },
		{ "max-tokens", required_argument, NULL, OPTION_MAX_TOKENS },
		{ "temperature", required_argument, NULL, OPTION_TEMPERATURE },
		{ "top-p", required_argument, NULL, OPTION_TOP_P },
		{ "top-k", required_argument, NULL, OPTION_TOP_K },
		{ "min-p", required_argument, NULL, OPTION_MIN_P },
		{ "repetition-penalty", required_argument, NULL,
		  OPTION_REPETITION_PENALTY },
		{ "seed", required_argument, NULL, OPTION_SEED },
		{ "stop", required_argument, NULL, OPTION_STOP },
		{ "no-echo", no_argument, NULL, OPTION_NO_ECHO },
		{ "verbose", no_argument, NULL, OPTION_VERBOSE },
		{ 0 },
	};
	struct slab_generate_options *gen = &args->options;
	int opt;

	slab_generate_options_init(gen);
	gen->max_tokens = SLABCTL_DEFAULT_MAX_TOKENS;
	args->echo = true;
	args->verbose = false;
	args->stop = calloc((size_t)argc, sizeof(*args->stop));
	if (args->stop == NULL) {
		fputs("slabctl: out of memory\n", stderr);
		return EXIT_FAILURE;
	}

	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);
		bool ok = true;

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common > 0)
			continue;

		switch (opt) {
		case OPTION_SESSION:
			gen->session = optarg;
			break;
		case OPTION_MAX_TOKENS:
			ok = parse_u32("--max-tokens", optarg,
				       &gen->max_tokens);
			if (ok && gen->max_tokens == 0) {
				fprintf(stderr, "slabctl: invalid value '0' for "
					"--max-tokens: expected at least 1\n");
				ok = false;
			}
			break;
		case OPTION_TEMPERATURE:
			ok = parse_float("--temperature", optarg, 0, false,
					 INFINITY, ">= 0", &gen->temperature);
			gen->has_temperature = true;
			break;
		case OPTION_TOP_K:
			ok = parse_u32("--top-k", optarg, &gen->top_k);
			gen->has_top_k = true;
			break;
		case OPTION_TOP_P:
			ok = parse_float("--top-p", optarg, 0, true, 1,
					 "in (0, 1]", &gen->top_p);
			gen->has_top_p = true;
			break;
		case OPTION_MIN_P:
			ok = parse_float("--min-p", optarg, 0, false, 1,
					 "in [0, 1]", &gen->min_p);
			gen->has_min_p = true;
			break;
		case OPTION_REPETITION_PENALTY:
			ok = parse_float("--repetition-penalty", optarg, 0,
					 true, INFINITY, "> 0",
					 &gen->repetition_penalty);
			gen->has_repetition_penalty = true;
			break;
		case OPTION_SEED:
			ok = parse_unsigned("--seed", optarg, UINT64_MAX,
					    &gen->seed);
			gen->has_seed = true;
			break;
		case OPTION_STOP:
			if (optarg[0] == '\0')
				return usage_error("invalid value '' for "
						   "--stop: expected a "
						   "non-empty string");
			args->stop[gen->n_stop++] = optarg;
			break;
		case OPTION_NO_ECHO:
			args->echo = false;
			break;
		case OPTION_VERBOSE:
			args->verbose = true;
			break;
		default:
			return usage_error("invalid command line");
		}
		if (!ok)
			return EXIT_USAGE;
	}

	if (optind >= argc)
		return usage_error("generate: missing PROMPT");
	if (optind + 1 < argc)
		return usage_error("generate: unexpected argument '%s'; quote "
				   "a prompt that contains spaces",
				   argv[optind + 1]);
	gen->prompt = argv[optind];
	gen->stop = args->stop;
	return -1;
}


static int command_generate(int argc, char **argv)
{
	struct generate_args args;
	struct slab_generate_result result;
	struct sigaction action = { .sa_handler = on_sigint };
	struct sigaction previous;
	struct slab_client *client;
	int status;
	int rc;

	status = parse_generate(argc, argv, &args);
	if (status >= 0)
		goto out_free;

	client = connect_broker(&status);
	if (client == NULL)
		goto out_free;

	/* No SA_RESTART: the signal must interrupt the wait for a reply. */
	sigemptyset(&action.sa_mask);
	sigaction(SIGINT, &action, &previous);
	slab_set_interrupt_flag(client, &interrupted);

	/* A request that fails prints no text, the prompt included. */
	struct prompt_echo echo = {
		.prompt = args.echo ? args.options.prompt : NULL,
	};

	rc = slab_generate(client, &args.options, print_token, &echo, &result);
	if (rc >= 0 || echo.prompt == NULL) {
		if (rc >= 0)
			echo_prompt(&echo);
		if (result.text != NULL)
			fwrite(result.text, 1, result.text_len, stdout);
		fputc('\n', stdout);
		fflush(stdout);
	}
	sigaction(SIGINT, &previous, NULL);

	if (args.verbose && result.finish_reason != SLAB_FINISH_UNSPECIFIED)
		print_generate_summary(&result);
	if (rc < 0)
		status = report_failure(client, "generate");
	else if (interrupted)
		status = EXIT_INTERRUPTED;
	else
		status = EXIT_SUCCESS;

	slab_generate_result_free(&result);
	slab_close(client);
out_free:
	free(args.stop);
	return status;
}


static int command_session_open(int argc, char **argv)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ "context", required_argument, NULL, OPTION_CONTEXT },
		{ "policy", required_argument, NULL, OPTION_POLICY },
		{ "n-keep", required_argument, NULL, OPTION_N_KEEP },
		{ "seed", required_argument, NULL, OPTION_SEED },
		{ 0 },
	};
	struct slab_session_options session;
	char handle[SLAB_HANDLE_SIZE];
	struct slab_client *client;
	int status;
	int opt;

	slab_session_options_init(&session);
	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);
		bool ok = true;

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common > 0)
			continue;

		switch (opt) {
		case OPTION_CONTEXT:
			ok = parse_u32("--context", optarg,
				       &session.max_context);
			break;
		case OPTION_POLICY:
			if (strcmp(optarg, "error") == 0)
				session.policy = SLAB_CONTEXT_ERROR;
			else if (strcmp(optarg, "shift") == 0)
				session.policy = SLAB_CONTEXT_SHIFT;
			else
				return usage_error("invalid value '%s' for "
						   "--policy: expected error "
						   "or shift", optarg);
			break;
		case OPTION_N_KEEP:
			ok = parse_u32("--n-keep", optarg, &session.n_keep);
			break;
		case OPTION_SEED:
			ok = parse_unsigned("--seed", optarg, UINT64_MAX,
					    &session.seed);
			session.has_seed = true;
			break;
		default:
			return usage_error("invalid command line");
		}
		if (!ok)
			return EXIT_USAGE;
	}
	if (optind < argc)
		return usage_error("session open: unexpected argument '%s'",
				   argv[optind]);

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_session_open(client, &session, handle, NULL) < 0) {
		status = report_failure(client, "session open");
	} else {
		printf("%s\n", handle);
		status = EXIT_SUCCESS;
	}
	slab_close(client);
	return status;
}


/* Returns the command name in argv[0] without the "slabctl " prefix. */
static const char *command_name(char **argv)
{
	const char *prefix = "slabctl ";

	if (strncmp(argv[0], prefix, strlen(prefix)) == 0)
		return argv[0] + strlen(prefix);
	return argv[0];
}


/* Parses a command that takes only the common options and exactly
 * n_arguments arguments, named by argument_names for the error message.
 * Returns -1 to go on, or the exit status. */
static int parse_plain(int argc, char **argv, int n_arguments,
		       const char *argument_names)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ 0 },
	};
	int opt;

	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common == 0)
			return usage_error("invalid command line");
	}
	if (argc - optind < n_arguments)
		return usage_error("%s: missing %s", command_name(argv),
				   argument_names);
	if (argc - optind > n_arguments)
		return usage_error("%s: unexpected argument '%s'",
				   command_name(argv), argv[optind + n_arguments]);
	return -1;
}


static int command_session_close(int argc, char **argv)
{
	struct slab_client *client;
	int status;

	status = parse_plain(argc, argv, 1, "HANDLE");
	if (status >= 0)
		return status;

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_session_close(client, argv[optind]) < 0)
		status = report_failure(client, "session close");
	else
		status = EXIT_SUCCESS;
	slab_close(client);
	return status;
}


static void format_utc(uint64_t unix_ms, char *buffer, size_t size)
{
	time_t seconds = (time_t)(unix_ms / 1000);
	struct tm tm;

	if (unix_ms == 0 || gmtime_r(&seconds, &tm) == NULL) {
		snprintf(buffer, size, "-");
		return;
	}
	strftime(buffer, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}


static int command_session_list(int argc, char **argv)
{
	struct slab_session_info *sessions;
	struct slab_client *client;
	size_t count;
	int status;

	status = parse_plain(argc, argv, 0, "");
	if (status >= 0)
		return status;

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_session_list(client, &sessions, &count) < 0) {
		status = report_failure(client, "session list");
		goto out;
	}

	printf("%-40s %10s %10s %-6s %s\n", "HANDLE", "COMMITTED", "CONTEXT",
	       "POLICY", "LAST USE");
	for (size_t i = 0; i < count; i++) {
		char last_use[32];

		format_utc(sessions[i].last_use_unix_ms, last_use,
			   sizeof(last_use));
		printf("%-40s %10" PRIu32 " %10" PRIu32 " %-6s %s\n",
		       sessions[i].handle, sessions[i].committed_length,
		       sessions[i].max_context,
		       sessions[i].policy == SLAB_CONTEXT_SHIFT ? "shift" :
								  "error",
		       last_use);
	}
	free(sessions);
	status = EXIT_SUCCESS;
out:
	slab_close(client);
	return status;
}


static int command_session(int argc, char **argv)
{
	const char *sub;
	char name[64];

	if (argc < 2)
		return usage_error("session: missing open, close or list");
	sub = argv[1];
	if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0)
		return print_help();

	/* getopt prefixes its messages with argv[0]. */
	snprintf(name, sizeof(name), "slabctl session %s", sub);
	argv[1] = name;

	if (strcmp(sub, "open") == 0)
		return command_session_open(argc - 1, argv + 1);
	if (strcmp(sub, "close") == 0)
		return command_session_close(argc - 1, argv + 1);
	if (strcmp(sub, "list") == 0)
		return command_session_list(argc - 1, argv + 1);
	return usage_error("session: unknown subcommand '%s'; expected open, "
			   "close or list", sub);
}


static int command_prefill(int argc, char **argv)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ "session", required_argument, NULL, OPTION_SESSION },
		{ 0 },
	};
	const char *session = NULL;
	struct slab_client *client;
	uint32_t committed;
	int status;
	int opt;
	int rc;

	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common > 0)
			continue;
		if (opt != OPTION_SESSION)
			return usage_error("invalid command line");
		session = optarg;
	}
	if (session == NULL || session[0] == '\0')
		return usage_error("prefill: missing --session HANDLE");
	if (optind >= argc)
		return usage_error("prefill: missing TEXT");
	if (optind + 1 < argc)
		return usage_error("prefill: unexpected argument '%s'; quote "
				   "text that contains spaces",
				   argv[optind + 1]);

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	rc = slab_prefill(client, session, argv[optind], NULL, 0, &committed);
	if (rc < 0) {
		status = report_failure(client, "prefill");
	} else {
		printf("%d tokens appended, committed length %" PRIu32
		       " tokens\n", rc, committed);
		status = EXIT_SUCCESS;
	}
	slab_close(client);
	return status;
}


static int command_tokenize(int argc, char **argv)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ "bos", no_argument, NULL, OPTION_BOS },
		{ 0 },
	};
	struct slab_client *client;
	bool add_bos = false;
	int32_t *ids;
	size_t n_ids;
	int status;
	int opt;

	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common > 0)
			continue;
		if (opt != OPTION_BOS)
			return usage_error("invalid command line");
		add_bos = true;
	}
	if (optind >= argc)
		return usage_error("tokenize: missing TEXT");
	if (optind + 1 < argc)
		return usage_error("tokenize: unexpected argument '%s'; quote "
				   "text that contains spaces",
				   argv[optind + 1]);

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_tokenize(client, argv[optind], add_bos, &ids, &n_ids) < 0) {
		status = report_failure(client, "tokenize");
	} else {
		for (size_t i = 0; i < n_ids; i++)
			printf("%s%" PRId32, i > 0 ? " " : "", ids[i]);
		putchar('\n');
		free(ids);
		status = EXIT_SUCCESS;
	}
	slab_close(client);
	return status;
}


static int command_stats(int argc, char **argv)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ "prometheus", no_argument, NULL, OPTION_PROMETHEUS },
		{ 0 },
	};
	struct slab_client *client;
	struct slab_stats stats;
	bool prometheus = false;
	int status;
	int opt;

	while ((opt = next_option(argc, argv, options)) != -1) {
		int common = handle_common_option(opt);

		if (common < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
		if (common > 0)
			continue;
		if (opt != OPTION_PROMETHEUS)
			return usage_error("invalid command line");
		prometheus = true;
	}
	if (optind < argc)
		return usage_error("stats: unexpected argument '%s'",
				   argv[optind]);

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_stats(client, &stats) < 0) {
		status = report_failure(client, "stats");
		goto out;
	}

	if (prometheus) {
		fputs(stats.prometheus_text, stdout);
	} else {
		for (size_t i = 0; i < stats.n_metrics; i++)
			printf("%s %.17g\n", stats.metrics[i].name,
			       stats.metrics[i].value);
	}
	slab_stats_free(&stats);
	status = EXIT_SUCCESS;
out:
	slab_close(client);
	return status;
}


static int command_health(int argc, char **argv)
{
	struct slab_client *client;
	struct slab_health health;
	int status;

	status = parse_plain(argc, argv, 0, "");
	if (status >= 0)
		return status;

	client = connect_broker(&status);
	if (client == NULL)
		return status;
	if (slab_health(client, &health) < 0) {
		status = report_failure(client, "health");
		goto out;
	}

	printf("%s: %" PRIu32 " of %" PRIu32 " workers live%s%s\n",
	       slab_health_status_name(health.status), health.workers_live,
	       health.workers_configured, health.message[0] ? "; " : "",
	       health.message);
	status = health.status == SLAB_HEALTH_OK ? EXIT_SUCCESS :
						   EXIT_SERVER_ERROR;
out:
	slab_close(client);
	return status;
}


int main(int argc, char **argv)
{
	static const struct option options[] = {
		COMMON_OPTIONS,
		{ 0 },
	};
	const char *command;
	char name[32];
	int opt;

	while ((opt = getopt_long(argc, argv, "+hs:", options, NULL)) != -1) {
		if (handle_common_option(opt) < 0)
			return opt == OPTION_HELP ? EXIT_SUCCESS : EXIT_USAGE;
	}
	if (optind >= argc)
		return usage_error("missing COMMAND");

	/* Each command parses argv from its own name on, and getopt prefixes
	 * its messages with that name. */
	command = argv[optind];
	argc -= optind;
	argv += optind;
	optind = 0;
	snprintf(name, sizeof(name), "slabctl %s", command);
	argv[0] = name;

	if (strcmp(command, "generate") == 0)
		return command_generate(argc, argv);
	if (strcmp(command, "session") == 0)
		return command_session(argc, argv);
	if (strcmp(command, "prefill") == 0)
		return command_prefill(argc, argv);
	if (strcmp(command, "tokenize") == 0)
		return command_tokenize(argc, argv);
	if (strcmp(command, "stats") == 0)
		return command_stats(argc, argv);
	if (strcmp(command, "health") == 0)
		return command_health(argc, argv);
	return usage_error("unknown command '%s'; expected generate, session, "
			   "prefill, tokenize, stats or health", command);
}
