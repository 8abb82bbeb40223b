/*
 * Logging of the broker and the workers: one line per event on standard
 * error, starting with a syslog priority prefix that journald understands,
 * then the program, its pid and role: "<6>slabd[1234] broker: ...".
 * The level is checked before any formatting.
 */
#ifndef SLAB_BROKER_LOG_H
#define SLAB_BROKER_LOG_H

enum log_level {
	LOG_LEVEL_ERROR = 3,
	LOG_LEVEL_WARNING = 4,
	LOG_LEVEL_NOTICE = 5,
	LOG_LEVEL_INFO = 6,
	LOG_LEVEL_DEBUG = 7,
};

extern int log_current_level;

/* Sets the program name, role ("broker", "worker 2") and maximum level. */
void log_init(const char *program, const char *role, int level);

/* Parses "error", "warning", "notice", "info" or "debug"; -1 if unknown. */
int log_parse_level(const char *name);

void log_write(int level, const char *format, ...)
	__attribute__((format(printf, 2, 3)));

#define log_at(level, ...)                                 \
	do {                                               \
		if ((level) <= log_current_level)          \
			log_write((level), __VA_ARGS__);   \
	} while (0)

#define log_error(...) log_at(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warning(...) log_at(LOG_LEVEL_WARNING, __VA_ARGS__)
#define log_notice(...) log_at(LOG_LEVEL_NOTICE, __VA_ARGS__)
#define log_info(...) log_at(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_at(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif
