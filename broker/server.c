/*
 * The client side of the broker: the listening Unix socket and each client
 * connection, with frames read and written through the event loop.
 *
 * A connection owns a receive buffer, a frame reader bounded by --max-frame
 * and an output queue bounded by send_buffer_limit. The broker replies to a
 * malformed or oversized frame with an error and then closes the
 * connection. No other connection or session is affected.
 */
#include "broker/broker.h"
#include "broker/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

static void on_accept(struct loop_op *op, int result);
static void on_recv(struct loop_op *op, int result);
static void on_send(struct loop_op *op, int result);


/* Creates each missing directory of path's parent with mode 0750. */
static int make_parent_dirs(const char *path)
{
	char dir[256];

	snprintf(dir, sizeof(dir), "%s", path);
	for (char *p = dir + 1; *p != '\0'; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		/* mkdir() applies the umask, which may remove group bits. */
		if (mkdir(dir, 0750) == 0) {
			if (chmod(dir, 0750) < 0)
				return -errno;
		} else if (errno != EEXIST) {
			return -errno;
		}
		*p = '/';
	}
	return 0;
}


/*
 * Takes the lock file PATH.lock beside the socket for the life of the
 * process. The process with the lock owns the socket path, so a socket
 * file it finds there is stale and can be replaced. A connect test cannot
 * tell this reliably: a broker killed with a pending io_uring accept keeps
 * its listening socket open for a moment after it has been reaped.
 */
int broker_lock_socket(struct broker *broker)
{
	const char *path = broker->config.socket_path;
	char lock_path[sizeof(broker->config.socket_path) + 8];
	int rc;

	rc = make_parent_dirs(path);
	if (rc < 0) {
		log_error("cannot create the directory of socket %s: %s; pass "
			  "--socket PATH in a writable directory", path,
			  strerror(-rc));
		return rc;
	}
	snprintf(lock_path, sizeof(lock_path), "%s.lock", path);
	broker->socket_lock_fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC,
				      0600);
	if (broker->socket_lock_fd < 0) {
		rc = -errno;
		log_error("cannot open lock file %s: %s", lock_path,
			  strerror(errno));
		return rc;
	}
	if (flock(broker->socket_lock_fd, LOCK_EX | LOCK_NB) < 0) {
		rc = -errno;
		log_error("another slabd serves socket %s (it holds %s); stop it "
			  "or pass another --socket", path, lock_path);
		close(broker->socket_lock_fd);
		broker->socket_lock_fd = -1;
		return rc;
	}
	return 0;
}


/* Removes the socket and its lock file; for a clean shutdown. */
void broker_unlock_socket(struct broker *broker)
{
	char lock_path[sizeof(broker->config.socket_path) + 8];

	if (broker->socket_lock_fd < 0)
		return;
	snprintf(lock_path, sizeof(lock_path), "%s.lock",
		 broker->config.socket_path);
	unlink(broker->config.socket_path);
	unlink(lock_path);
	close(broker->socket_lock_fd);
	broker->socket_lock_fd = -1;
}


int broker_listen(struct broker *broker)
{
	const char *path = broker->config.socket_path;
	struct sockaddr_un address = { .sun_family = AF_UNIX };
	int fd, rc;

	if (strlen(path) >= sizeof(address.sun_path)) {
		log_error("socket path %s is longer than %zu bytes; pass a "
			  "shorter --socket", path, sizeof(address.sun_path) - 1);
		return -ENAMETOOLONG;
	}
	memcpy(address.sun_path, path, strlen(path) + 1);
	/* The socket lock is ours, so a socket file here is stale. */
	unlink(path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		log_error("socket failed: %s", strerror(errno));
		return -errno;
	}
	if (bind(fd, (struct sockaddr *)&address, sizeof(address)) < 0 ||
	    chmod(path, broker->config.socket_mode) < 0 || listen(fd, 128) < 0) {
		rc = -errno;
		log_error("cannot listen on socket %s: %s", path, strerror(errno));
		close(fd);
		return rc;
	}
	broker->listen_fd = fd;
	broker->accepting = true;
	broker->accept_op = (struct loop_op){ .callback = on_accept,
					      .data = broker };
	loop_accept(broker->loop, &broker->accept_op, fd);
	log_notice("ready: listening on %s; workers live: %d", path,
		   broker->live_workers);
	sd_notify(0, "READY=1");
	return 0;
}


void broker_stop_listening(struct broker *broker)
{
	if (broker->listen_fd < 0)
		return;
	broker->accepting = false;
	loop_cancel(broker->loop, &broker->accept_op);
	if (!broker->accept_op.pending) {
		close(broker->listen_fd);
		broker->listen_fd = -1;
	}
	unlink(broker->config.socket_path);
}


/* Sends an error frame straight away on a connection that is not served. */
static void reject_connection(struct broker *broker, int fd, const char *why)
{
	bool denied = strncmp(why, "permission denied", 17) == 0;

	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Error error = SLABD__ERROR__INIT;
	uint8_t *frame;
	size_t len;

	error.code = denied ? SLABD__ERROR_CODE__ERROR_CODE_PERMISSION_DENIED
			    : SLABD__ERROR_CODE__ERROR_CODE_RESOURCE_EXHAUSTED;
	error.message = (char *)why;
	reply.kind_case = SLABD__REPLY__KIND_ERROR;
	reply.error = &error;
	if (proto_pack_frame(&reply.base, broker->config.max_frame, &frame,
			     &len) == 0) {
		send(fd, frame, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		free(frame);
	}
	close(fd);
}


/*
 * Whether a peer may connect: always when no --allow-uid or --allow-gid is
 * given (the socket's mode then decides), else when its uid or gid is
 * listed. Root is not special.
 */
static bool peer_allowed(const struct broker_config *config,
			 const struct ucred *peer)
{
	if (config->n_allow_uids == 0 && config->n_allow_gids == 0)
		return true;
	for (int i = 0; i < config->n_allow_uids; i++)
		if (config->allow_uids[i] == peer->uid)
			return true;
	for (int i = 0; i < config->n_allow_gids; i++)
		if (config->allow_gids[i] == peer->gid)
			return true;
	return false;
}


/* Rejects a peer that is not allowed; logs at most one line a second. */
static void reject_peer(struct broker *broker, int fd, const struct ucred *peer)
{
	struct broker_stats *stats = &broker->stats;
	uint64_t now = engine_now_ns();

	stats->rejected_peers++;
	if (now - stats->last_reject_log_ns >= 1000000000ull) {
		log_warning("connection from uid %d gid %d pid %d rejected: not "
			    "in --allow-uid or --allow-gid%s",
			    (int)peer->uid, (int)peer->gid, (int)peer->pid,
			    stats->rejects_not_logged > 0 ? " (more rejections "
							    "not logged)" : "");
		stats->last_reject_log_ns = now;
		stats->rejects_not_logged = 0;
	} else {
		stats->rejects_not_logged++;
	}
	reject_connection(broker, fd, "permission denied: this user may not "
			  "use the service");
}


static void on_accept(struct loop_op *op, int result)
{
	struct broker *broker = op->data;
	struct broker_connection *c;
	struct ucred peer = { 0 };
	socklen_t peer_len = sizeof(peer);

	if (!broker->accepting) {
		if (result >= 0)
			close(result);
		if (broker->listen_fd >= 0) {
			close(broker->listen_fd);
			broker->listen_fd = -1;
		}
		return;
	}
	if (result < 0) {
		log_warning("accept on %s failed: %s", broker->config.socket_path,
			    strerror(-result));
		loop_accept(broker->loop, &broker->accept_op, broker->listen_fd);
		return;
	}
	loop_accept(broker->loop, &broker->accept_op, broker->listen_fd);

	getsockopt(result, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len);
	if (!peer_allowed(&broker->config, &peer)) {
		reject_peer(broker, result, &peer);
		return;
	}
	if (broker->n_connections >= broker->config.max_connections) {
		broker->stats.rejected_connections++;
		log_warning("connection from pid %d rejected: %d connections "
			    "already open (--max-connections)", (int)peer.pid,
			    broker->n_connections);
		reject_connection(broker, result,
				  "too many connections; retry later");
		return;
	}

	c = calloc(1, sizeof(*c));
	if (c == NULL || frame_reader_init(&c->reader, broker->config.max_frame) < 0) {
		free(c);
		reject_connection(broker, result, "out of memory");
		return;
	}
	c->broker = broker;
	c->id = ++broker->next_connection_id;
	c->fd = result;
	c->peer_pid = peer.pid;
	c->peer_uid = peer.uid;
	c->next = broker->connections;
	if (c->next != NULL)
		c->next->prev = c;
	broker->connections = c;
	broker->n_connections++;
	broker->stats.connections++;
	log_debug("connection %llu from pid %d uid %d",
		  (unsigned long long)c->id, (int)peer.pid, (int)peer.uid);

	c->recv_op = (struct loop_op){ .callback = on_recv, .data = c };
	c->send_op = (struct loop_op){ .callback = on_send, .data = c };
	loop_recv(broker->loop, &c->recv_op, c->fd, c->recv_buffer,
		  sizeof(c->recv_buffer));
}


/* Frees a closing connection once none of its operations is pending. */
static void connection_free_if_idle(struct broker_connection *c)
{
	struct broker *broker = c->broker;

	if (!c->closing || c->recv_op.pending || c->send_op.pending)
		return;
	if (c->prev != NULL)
		c->prev->next = c->next;
	else
		broker->connections = c->next;
	if (c->next != NULL)
		c->next->prev = c->prev;
	broker->n_connections--;
	close(c->fd);
	frame_reader_destroy(&c->reader);
	free(c->out);
	free(c);
}


void connection_close(struct broker_connection *c)
{
	struct broker *broker = c->broker;

	if (c->closing)
		return;
	c->closing = true;
	broker_connection_gone(broker, c);
	shutdown(c->fd, SHUT_RDWR);
	loop_cancel(broker->loop, &c->recv_op);
	loop_cancel(broker->loop, &c->send_op);
	connection_free_if_idle(c);
}


static void start_send(struct broker_connection *c)
{
	if (c->sending || c->closing || c->out_sent == c->out_len)
		return;
	c->sending = true;
	loop_send(c->broker->loop, &c->send_op, c->fd, c->out + c->out_sent,
		  c->out_len - c->out_sent);
}


static void on_send(struct loop_op *op, int result)
{
	struct broker_connection *c = op->data;

	c->sending = false;
	if (c->closing) {
		connection_free_if_idle(c);
		return;
	}
	if (result < 0) {
		log_debug("connection %llu: send failed: %s",
			  (unsigned long long)c->id, strerror(-result));
		connection_close(c);
		return;
	}
	c->out_sent += (size_t)result;
	if (c->out_sent == c->out_len)
		c->out_sent = c->out_len = 0;
	start_send(c);
}


void connection_send_reply(struct broker_connection *c, Slabd__Reply *reply)
{
	size_t size = slabd__reply__get_packed_size(reply);
	size_t need;

	if (c->closing)
		return;
	if (c->out_len - c->out_sent + size + FRAME_HEADER_SIZE >
	    c->broker->config.send_buffer_limit) {
		log_warning("connection %llu (pid %d) does not read its replies: "
			    "%zu bytes queued; disconnecting it",
			    (unsigned long long)c->id, (int)c->peer_pid,
			    c->out_len - c->out_sent);
		connection_close(c);
		return;
	}

	/* Compact what was sent when the queue is idle-free at the front. */
	if (!c->sending && c->out_sent > 0) {
		memmove(c->out, c->out + c->out_sent, c->out_len - c->out_sent);
		c->out_len -= c->out_sent;
		c->out_sent = 0;
	}
	need = c->out_len + FRAME_HEADER_SIZE + size;
	if (need > c->out_capacity) {
		size_t capacity = c->out_capacity ? c->out_capacity : 4096;
		uint8_t *grown;

		while (capacity < need)
			capacity *= 2;
		grown = realloc(c->out, capacity);
		if (grown == NULL) {
			connection_close(c);
			return;
		}
		c->out = grown;
		c->out_capacity = capacity;
	}
	frame_put_length(c->out + c->out_len, (uint32_t)size);
	slabd__reply__pack(reply, c->out + c->out_len + FRAME_HEADER_SIZE);
	c->out_len = need;
	start_send(c);
}


void connection_send_error(struct broker_connection *c, uint64_t request_id,
			   Slabd__ErrorCode code, const char *format, ...)
{
	Slabd__Reply reply = SLABD__REPLY__INIT;
	Slabd__Error error = SLABD__ERROR__INIT;
	char message[600];
	va_list args;

	va_start(args, format);
	vsnprintf(message, sizeof(message), format, args);
	va_end(args);
	error.code = code;
	error.message = message;
	reply.request_id = request_id;
	reply.kind_case = SLABD__REPLY__KIND_ERROR;
	reply.error = &error;
	connection_send_reply(c, &reply);
}


/* Replies to a protocol violation with an error, then closes the connection. */
static void close_with_error(struct broker_connection *c, const char *format,
			     const char *detail, size_t number)
{
	c->broker->stats.bad_frames++;
	log_info("connection %llu (pid %d): bad frame; closing it",
		 (unsigned long long)c->id, (int)c->peer_pid);
	connection_send_error(c, 0, SLABD__ERROR_CODE__ERROR_CODE_INVALID_ARGUMENT,
			      format, detail, number);
	/* Stop reading; the queued error goes out, then the socket closes. */
	shutdown(c->fd, SHUT_RD);
	c->closing = true;
	broker_connection_gone(c->broker, c);
	loop_cancel(c->broker->loop, &c->recv_op);
	if (c->out_sent < c->out_len && !c->send_op.pending) {
		c->sending = true;
		loop_send(c->broker->loop, &c->send_op, c->fd,
			  c->out + c->out_sent, c->out_len - c->out_sent);
	}
	connection_free_if_idle(c);
}


static void on_recv(struct loop_op *op, int result)
{
	struct broker_connection *c = op->data;
	struct broker *broker = c->broker;
	size_t offset = 0;

	if (c->closing) {
		connection_free_if_idle(c);
		return;
	}
	if (result == 0 && frame_reader_buffered(&c->reader) > 0) {
		/* A peer that only shut down its writing side still reads. */
		close_with_error(c, "the stream ended %s%zu bytes into a frame; "
				 "send whole frames", "",
				 frame_reader_buffered(&c->reader));
		return;
	}
	if (result <= 0) {
		connection_close(c);
		return;
	}

	while (offset < (size_t)result && !c->closing) {
		const uint8_t *payload;
		size_t consumed, len;
		Slabd__Request *request;
		int rc = frame_reader_feed(&c->reader, c->recv_buffer + offset,
					   (size_t)result - offset, &consumed,
					   &payload, &len);

		offset += consumed;
		if (rc == -EMSGSIZE) {
			char length[16];

			snprintf(length, sizeof(length), "%u",
				 frame_get_length(c->reader.header));
			close_with_error(c, "frame length %s is above the maximum "
					 "of %zu bytes; send smaller requests",
					 length, (size_t)broker->config.max_frame);
			return;
		}
		if (rc == -EPROTO) {
			close_with_error(c, "invalid frame length %s%zu; frames "
					 "start with a 4-byte little-endian length "
					 "above 0", "", (size_t)0);
			return;
		}
		if (rc < 0) {
			close_with_error(c, "out of memory for a frame of %s%zu "
					 "bytes; retry later", "",
					 frame_get_length(c->reader.header));
			return;
		}
		if (rc == 0)
			break;
		request = slabd__request__unpack(NULL, len, payload);
		if (request == NULL) {
			close_with_error(c, "a frame of %s%zu bytes is not a valid "
					 "slabd.Request message", "", len);
			return;
		}
		broker->stats.requests++;
		broker_handle_request(c, request);
		slabd__request__free_unpacked(request, NULL);
	}
	if (c->closing)
		return;
	if (frame_reader_buffered(&c->reader) == 0)
		c->partial_since_ns = 0;
	else if (c->partial_since_ns == 0)
		c->partial_since_ns = engine_now_ns();
	loop_recv(broker->loop, &c->recv_op, c->fd, c->recv_buffer,
		  sizeof(c->recv_buffer));
}


void connections_check_stalled(struct broker *broker)
{
	uint64_t limit = (uint64_t)broker->config.frame_timeout * 1000000000ull;
	uint64_t now = engine_now_ns();
	struct broker_connection *c = broker->connections;

	while (c != NULL) {
		struct broker_connection *next = c->next;

		if (!c->closing && c->partial_since_ns != 0 &&
		    now - c->partial_since_ns > limit) {
			broker->stats.stalled_connections++;
			log_info("connection %llu (pid %d) sent part of a frame and "
				 "nothing more for %d s; disconnecting it",
				 (unsigned long long)c->id, (int)c->peer_pid,
				 broker->config.frame_timeout);
			connection_close(c);
		}
		c = next;
	}
}
