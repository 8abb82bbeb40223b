/*
 * Log lines are built in one buffer and written with one write(2), so lines
 * of the broker and its workers, which share standard error, never
 * interleave.
 */
#include "broker/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int log_current_level = LOG_LEVEL_INFO;

static char log_program[32] = "slabd";
static char log_role[32] = "broker";


void log_init(const char *program, const char *role, int level)
{
	snprintf(log_program, sizeof(log_program), "%s", program);
	snprintf(log_role, sizeof(log_role), "%s", role);
	log_current_level = level;
}


int log_parse_level(const char *name)
{
	static const char *const names[] = { "error", "warning", "notice",
					     "info", "debug" };

	for (int i = 0; i < 5; i++)
		if (strcmp(name, names[i]) == 0)
			return LOG_LEVEL_ERROR + i;
	return -1;
}


void log_write(int level, const char *format, ...)
{
	char line[2048];
	va_list args;
	int n;

	n = snprintf(line, sizeof(line), "<%d>%s[%d] %s: ", level, log_program,
		     (int)getpid(), log_role);
	va_start(args, format);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, format, args);
	va_end(args);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, (size_t)n) < 0) {
		/* Nowhere left to report a failed log write. */
	}
}
