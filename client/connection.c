/*
 * libslab connection handling: socket path, connect, error state, and the
 * send and receive path that every request takes.
 *
 * One request is outstanding at a time, except for a Cancel sent while a
 * Generate runs. Its reply may arrive before or after the Generate's Done,
 * so the receive path consumes it wherever it shows up. Any other reply
 * whose id does not match is a protocol error that marks the connection
 * broken, because the stream can no longer be trusted.
 */
#include "client/slab_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>


int slab_default_socket_path(char *buffer, size_t size)
{
	const char *path = getenv(SLAB_SOCKET_ENV);
	const char *runtime_dir = getenv("XDG_RUNTIME_DIR");
	int len;

	if (buffer == NULL || size == 0)
		return -EINVAL;

	if (path != NULL && path[0] != '\0')
		len = snprintf(buffer, size, "%s", path);
	else if (runtime_dir != NULL && runtime_dir[0] != '\0')
		len = snprintf(buffer, size, "%s/slabd/default.sock",
			       runtime_dir);
	else
		len = snprintf(buffer, size, "%s", SLAB_SYSTEM_SOCKET);

	if (len < 0 || (size_t)len >= size)
		return -ENAMETOOLONG;
	return len;
}


/* Waits for a connect() that a signal interrupted and returns its result
 * as 0 or a negative errno. */
static int slab_connect_finish(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	int error = 0;
	socklen_t error_len = sizeof(error);

	for (;;) {
		int n = poll(&pfd, 1, -1);

		if (n > 0)
			break;
		if (n < 0 && errno != EINTR)
			return -errno;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &error_len) < 0)
		return -errno;
	return -error;
}


int slab_connect(const char *socket_path, struct slab_client **out)
{
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	char default_path[sizeof(address.sun_path)];
	struct slab_client *client;
	int fd;
	int rc;

	if (out == NULL)
		return -EINVAL;
	*out = NULL;

	if (socket_path == NULL) {
		rc = slab_default_socket_path(default_path,
					      sizeof(default_path));
		if (rc < 0)
			return rc;
		socket_path = default_path;
	}
	if (socket_path[0] == '\0')
		return -EINVAL;
	if (strlen(socket_path) >= sizeof(address.sun_path))
		return -ENAMETOOLONG;
	memcpy(address.sun_path, socket_path, strlen(socket_path) + 1);

	client = calloc(1, sizeof(*client));
	if (client == NULL)
		return -ENOMEM;

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		rc = -errno;
		goto err_free;
	}

	if (connect(fd, (struct sockaddr *)&address, sizeof(address)) < 0) {
		rc = errno == EINTR ? slab_connect_finish(fd) : -errno;
		if (rc < 0)
			goto err_close;
	}

	client->fd = fd;
	client->next_request_id = 1;
	*out = client;
	return 0;

err_close:
	close(fd);
err_free:
	free(client);
	return rc;
}


void slab_close(struct slab_client *client)
{
	if (client == NULL)
		return;
	close(client->fd);
	free(client);
}


int slab_fd(const struct slab_client *client)
{
	return client->fd;
}


const char *slab_error_message(const struct slab_client *client)
{
	return client->message;
}


enum slab_error_code slab_server_error(const struct slab_client *client)
{
	return client->server_error;
}


void slab_set_interrupt_flag(struct slab_client *client,
			     volatile sig_atomic_t *flag)
{
	client->interrupt = flag;
}


int slab_errno_from_code(enum slab_error_code code)
{
	switch (code) {
	case SLAB_ERROR_INVALID_ARGUMENT:
		return -EINVAL;
	case SLAB_ERROR_NOT_FOUND:
		return -ENOENT;
	case SLAB_ERROR_RESOURCE_EXHAUSTED:
		return -ENOSPC;
	case SLAB_ERROR_CONTEXT_FULL:
		return -EOVERFLOW;
	case SLAB_ERROR_UNAVAILABLE:
		return -EAGAIN;
	case SLAB_ERROR_FAILED_PRECONDITION:
		return -EBUSY;
	case SLAB_ERROR_CANCELLED:
		return -ECANCELED;
	case SLAB_ERROR_UNIMPLEMENTED:
		return -EOPNOTSUPP;
	case SLAB_ERROR_PERMISSION_DENIED:
		return -EACCES;
	default:
		return -EREMOTEIO;
	}
}


const char *slab_error_code_name(enum slab_error_code code)
{
	if (code == SLAB_ERROR_NONE)
		return "NONE";
	return proto_error_code_name((Slabd__ErrorCode)code);
}


const char *slab_finish_reason_name(enum slab_finish_reason reason)
{
	return proto_finish_reason_name((Slabd__FinishReason)reason);
}


const char *slab_health_status_name(enum slab_health_status status)
{
	return proto_health_status_name((Slabd__HealthStatus)status);
}


int slab_client_begin(struct slab_client *client)
{
	client->server_error = SLAB_ERROR_NONE;
	client->message[0] = '\0';
	if (client->broken < 0) {
		snprintf(client->message, sizeof(client->message),
			 "connection to the broker is unusable after an earlier "
			 "error (%s); connect again",
			 strerror(-client->broken));
		return -ENOTCONN;
	}
	return 0;
}


static void slab_client_format(struct slab_client *client, const char *format,
			  va_list args)
{
	vsnprintf(client->message, sizeof(client->message), format, args);
}


int slab_client_fail(struct slab_client *client, int rc, const char *format, ...)
{
	va_list args;

	va_start(args, format);
	slab_client_format(client, format, args);
	va_end(args);
	client->server_error = SLAB_ERROR_NONE;
	return rc;
}


int slab_client_break(struct slab_client *client, int rc, const char *format, ...)
{
	va_list args;

	va_start(args, format);
	slab_client_format(client, format, args);
	va_end(args);
	client->server_error = SLAB_ERROR_NONE;
	client->broken = rc;
	return rc;
}


int slab_client_server_error(struct slab_client *client, const Slabd__Error *error)
{
	enum slab_error_code code = SLAB_ERROR_INTERNAL;
	const char *text = "";

	if (error != NULL) {
		if (error->code > SLABD__ERROR_CODE__ERROR_CODE_UNSPECIFIED &&
		    error->code <= SLABD__ERROR_CODE__ERROR_CODE_PERMISSION_DENIED)
			code = (enum slab_error_code)error->code;
		if (error->message != NULL)
			text = error->message;
	}

	if (text[0] != '\0')
		snprintf(client->message, sizeof(client->message), "%s", text);
	else
		snprintf(client->message, sizeof(client->message),
			 "broker returned error %s without a message",
			 slab_error_code_name(code));
	client->server_error = code;
	return slab_errno_from_code(code);
}


int slab_client_send(struct slab_client *client, Slabd__Request *request)
{
	int rc;

	request->request_id = client->next_request_id++;
	rc = proto_send_fd(client->fd, &request->base, FRAME_DEFAULT_MAX);
	if (rc == -EMSGSIZE)
		return slab_client_fail(client, rc,
				   "request is larger than the %zu-byte frame "
				   "limit; send a shorter prompt",
				   FRAME_DEFAULT_MAX);
	if (rc < 0)
		return slab_client_break(client, rc,
				    "sending the request to the broker failed: "
				    "%s", strerror(-rc));
	return 0;
}


int slab_client_send_cancel(struct slab_client *client, uint64_t target)
{
	Slabd__Request request = SLABD__REQUEST__INIT;
	Slabd__CancelRequest cancel = SLABD__CANCEL_REQUEST__INIT;
	int rc;

	cancel.target_request_id = target;
	request.kind_case = SLABD__REQUEST__KIND_CANCEL;
	request.cancel = &cancel;

	rc = slab_client_send(client, &request);
	if (rc < 0)
		return rc;
	client->pending_cancel_id = request.request_id;
	return 0;
}


/*
 * Blocks until the socket is readable. While an interrupt flag is registered
 * and cancel_target is non-zero, it wakes every SLAB_INTERRUPT_POLL_MS and on
 * every signal to check the flag, and sends one Cancel once the flag is set.
 */
static int slab_client_wait_readable(struct slab_client *client,
				uint64_t cancel_target, bool *cancel_sent)
{
	struct pollfd pfd = { .fd = client->fd, .events = POLLIN };

	if (client->interrupt == NULL || cancel_target == 0)
		return 0;

	for (;;) {
		int n;

		if (*client->interrupt && !*cancel_sent) {
			int rc = slab_client_send_cancel(client, cancel_target);

			if (rc < 0)
				return rc;
			*cancel_sent = true;
		}

		n = poll(&pfd, 1, SLAB_INTERRUPT_POLL_MS);
		if (n > 0)
			return 0;
		if (n < 0 && errno != EINTR)
			return slab_client_break(client, -errno,
					    "waiting for the broker failed: %s",
					    strerror(errno));
	}
}


/* Reads and unpacks one reply frame. */
static int slab_client_read_reply(struct slab_client *client, Slabd__Reply **reply)
{
	uint8_t *payload;
	ssize_t n;
	int rc;

	n = frame_read_fd(client->fd, FRAME_DEFAULT_MAX, &payload);
	if (n == 0)
		return slab_client_break(client, -ECONNRESET,
				    "broker closed the connection");
	if (n < 0)
		return slab_client_break(client, (int)n,
				    "reading a reply from the broker failed: %s",
				    strerror((int)-n));

	rc = proto_unpack_reply(payload, (size_t)n, reply);
	free(payload);
	if (rc < 0)
		return slab_client_break(client, rc,
				    "broker sent a %zd-byte frame that is not "
				    "a valid reply", n);
	return 0;
}


int slab_client_receive(struct slab_client *client, Slabd__Reply **reply,
		   uint64_t cancel_target, bool *cancel_sent)
{
	for (;;) {
		Slabd__Reply *next;
		int rc;

		rc = slab_client_wait_readable(client, cancel_target, cancel_sent);
		if (rc < 0)
			return rc;
		rc = slab_client_read_reply(client, &next);
		if (rc < 0)
			return rc;

		/* The outcome of a Cancel is visible in the cancelled
		 * request's own Done or Error, so its reply is dropped. */
		if (client->pending_cancel_id != 0 &&
		    next->request_id == client->pending_cancel_id) {
			client->pending_cancel_id = 0;
			slabd__reply__free_unpacked(next, NULL);
			continue;
		}

		*reply = next;
		return 0;
	}
}


int slab_client_call(struct slab_client *client, Slabd__Request *request,
		Slabd__Reply__KindCase expected, Slabd__Reply **reply)
{
	Slabd__Reply *received;
	int rc;

	*reply = NULL;
	rc = slab_client_send(client, request);
	if (rc < 0)
		return rc;
	rc = slab_client_receive(client, &received, 0, NULL);
	if (rc < 0)
		return rc;

	/* An Error with id 0 is the reply to a request the broker could not
	 * unpack. */
	if (received->kind_case == SLABD__REPLY__KIND_ERROR &&
	    (received->request_id == request->request_id ||
	     received->request_id == 0)) {
		rc = slab_client_server_error(client, received->error);
		slabd__reply__free_unpacked(received, NULL);
		return rc;
	}

	if (received->request_id != request->request_id) {
		rc = slab_client_break(client, -EPROTO,
				  "broker replied to request %llu while "
				  "request %llu was waiting",
				  (unsigned long long)received->request_id,
				  (unsigned long long)request->request_id);
		slabd__reply__free_unpacked(received, NULL);
		return rc;
	}
	if (received->kind_case != expected) {
		rc = slab_client_break(client, -EPROTO,
				  "broker sent reply kind %d to request %llu, "
				  "expected kind %d",
				  (int)received->kind_case,
				  (unsigned long long)request->request_id,
				  (int)expected);
		slabd__reply__free_unpacked(received, NULL);
		return rc;
	}

	*reply = received;
	return 0;
}
