/*
 * Tests of the broker's event loop (broker/loop.h). Each test runs once per
 * backend: the Criterion parameter is force_epoll, false for io_uring and
 * true for epoll. The io_uring run is skipped where io_uring cannot be set
 * up. Tests use only socketpairs, Unix sockets in their own temporary
 * directory, and child processes they fork themselves.
 */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "broker/loop.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define NS_PER_MS 1000000ULL
#define NS_PER_SEC 1000000000ULL

/* How long run_until() waits for a condition before the test fails. */
#define RUN_LIMIT_NS (5 * NS_PER_SEC)

static bool test_backends[] = { false, true };

/* Name of the backend under test, for failure messages. */
static const char *backend = "?";

/* Set while a test is inside a submission or cancel call. */
static bool in_submission;

/* Declares a test that runs once per backend, with force_epoll as its
 * parameter. */
#define LOOP_TEST(name, ...)                                              \
	ParameterizedTestParameters(loop, name)                           \
	{                                                                 \
		return cr_make_param_array(bool, test_backends,           \
					   sizeof(test_backends) /        \
						   sizeof(test_backends[0])); \
	}                                                                 \
	ParameterizedTest(bool *force_epoll, loop, name, __VA_ARGS__)


static uint64_t now_ns(void)
{
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * NS_PER_SEC + (uint64_t)now.tv_nsec;
}


/* Creates a loop on the requested backend, skipping the test when
 * io_uring was requested and is not available. */
static struct loop *open_loop(bool force_epoll)
{
	struct loop *loop = NULL;
	int reason = -1;
	int err;

	/* A SLABD_LOOP in the caller's environment would hide the io_uring
	 * runs. */
	unsetenv("SLABD_LOOP");

	err = loop_create(force_epoll, &loop, &reason);
	cr_assert_eq(err, 0, "loop_create failed: %s", strerror(-err));
	cr_assert_not_null(loop);

	if (force_epoll) {
		cr_assert_eq(loop_backend(loop), LOOP_BACKEND_EPOLL);
		cr_assert_eq(reason, 0, "forced epoll reported reason %d", reason);
	} else if (loop_backend(loop) == LOOP_BACKEND_EPOLL) {
		loop_destroy(loop);
		cr_skip_test("io_uring is not available here: %s",
			     strerror(-reason));
	} else {
		cr_assert_eq(reason, 0);
	}

	backend = loop_backend_name(loop);
	return loop;
}


/* Destroys a loop after checking that no operation is left. */
static void close_loop(struct loop *loop)
{
	cr_assert_eq(loop_pending(loop), 0, "%s: %d ops still pending",
		     backend, loop_pending(loop));
	loop_destroy(loop);
}


/* Runs the loop until *counter reaches target, failing the test after
 * RUN_LIMIT_NS. */
static void run_until(struct loop *loop, const int *counter, int target)
{
	uint64_t start = now_ns();

	while (*counter < target) {
		int ret = loop_run(loop, 100);

		cr_assert_geq(ret, 0, "%s: loop_run failed: %s", backend,
			      strerror(-ret));
		cr_assert_lt(now_ns() - start, RUN_LIMIT_NS,
			     "%s: timed out with %d of %d callbacks", backend,
			     *counter, target);
	}
}


/* What one op's callback saw. */
struct record {
	int calls;
	int result;
	uint64_t done_ns;
	int order;              /* value of *sequence when the callback ran */
	int *sequence;          /* shared counter, may be NULL */
};


static void record_callback(struct loop_op *op, int result)
{
	struct record *record = op->data;

	cr_assert_not(in_submission, "%s: callback ran inside a submission",
		      backend);
	record->calls++;
	record->result = result;
	record->done_ns = now_ns();
	if (record->sequence != NULL)
		record->order = (*record->sequence)++;
}


static void init_op(struct loop_op *op, struct record *record)
{
	memset(op, 0, sizeof(*op));
	memset(record, 0, sizeof(*record));
	op->callback = record_callback;
	op->data = record;
}


static void make_socketpair(int type, int fds[2])
{
	int ret = socketpair(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0,
			     fds);

	cr_assert_eq(ret, 0, "socketpair failed: %s", strerror(errno));
}


/* Temporary directory holding one listening socket. */
struct listener {
	char directory[256];
	char path[300];
	int fd;
};


static void open_listener(struct listener *listener)
{
	const char *tmp = getenv("TMPDIR");
	struct sockaddr_un address;
	int ret;

	if (tmp == NULL || tmp[0] == '\0')
		tmp = "/tmp";
	snprintf(listener->directory, sizeof(listener->directory),
		 "%s/test_loop.XXXXXX", tmp);
	cr_assert_not_null(mkdtemp(listener->directory), "mkdtemp in %s failed: %s",
			   tmp, strerror(errno));
	snprintf(listener->path, sizeof(listener->path), "%s/listen.sock",
		 listener->directory);

	memset(&address, 0, sizeof(address));
	address.sun_family = AF_UNIX;
	cr_assert_lt(strlen(listener->path), sizeof(address.sun_path),
		     "socket path too long: %s", listener->path);
	strcpy(address.sun_path, listener->path);

	listener->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	cr_assert_geq(listener->fd, 0, "socket failed: %s", strerror(errno));
	ret = bind(listener->fd, (struct sockaddr *)&address, sizeof(address));
	cr_assert_eq(ret, 0, "bind %s failed: %s", listener->path, strerror(errno));
	ret = listen(listener->fd, 16);
	cr_assert_eq(ret, 0, "listen failed: %s", strerror(errno));
}


/* Connects a blocking client socket to the listener. */
static int connect_client(const struct listener *listener)
{
	struct sockaddr_un address;
	int fd;
	int ret;

	memset(&address, 0, sizeof(address));
	address.sun_family = AF_UNIX;
	strcpy(address.sun_path, listener->path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0, "socket failed: %s", strerror(errno));
	ret = connect(fd, (struct sockaddr *)&address, sizeof(address));
	cr_assert_eq(ret, 0, "connect %s failed: %s", listener->path,
		     strerror(errno));
	return fd;
}


static void close_listener(struct listener *listener)
{
	close(listener->fd);
	unlink(listener->path);
	rmdir(listener->directory);
}


/* Server side of the echo test: every byte received is sent back. */
struct echo_server {
	struct loop *loop;
	int fd;
	char buffer[64];
	struct loop_op recv_op;
	struct loop_op send_op;
	int received;
	int sent;
};


static void echo_send_done(struct loop_op *op, int result)
{
	struct echo_server *server = op->data;

	cr_assert_gt(result, 0, "%s: echo send failed: %s", backend,
		     strerror(-result));
	server->sent += result;
}


static void echo_recv_done(struct loop_op *op, int result)
{
	struct echo_server *server = op->data;
	int err;

	cr_assert_gt(result, 0, "%s: echo recv returned %d", backend, result);
	server->received += result;

	/* The reply goes out from inside the callback. */
	err = loop_send(server->loop, &server->send_op, server->fd,
			server->buffer, (size_t)result);
	cr_assert_eq(err, 0, "%s: loop_send failed: %s", backend, strerror(-err));
}


LOOP_TEST(accept_and_echo, .timeout = 10)
{
	static const char message[] = "hello, broker";
	struct loop *loop = open_loop(*force_epoll);
	struct listener listener;
	struct echo_server server;
	struct loop_op accept_op;
	struct record accept_record;
	struct loop_op reply_op;
	struct record reply_record;
	char reply[64];
	int client;
	int flags;
	int err;

	open_listener(&listener);
	init_op(&accept_op, &accept_record);
	err = loop_accept(loop, &accept_op, listener.fd);
	cr_assert_eq(err, 0, "loop_accept failed: %s", strerror(-err));

	client = connect_client(&listener);
	run_until(loop, &accept_record.calls, 1);
	cr_assert_geq(accept_record.result, 0, "%s: accept failed: %s", backend,
		      strerror(-accept_record.result));

	/* The accepted socket must be nonblocking and close-on-exec. */
	flags = fcntl(accept_record.result, F_GETFL);
	cr_assert(flags & O_NONBLOCK, "%s: accepted fd is blocking", backend);
	flags = fcntl(accept_record.result, F_GETFD);
	cr_assert(flags & FD_CLOEXEC, "%s: accepted fd lacks FD_CLOEXEC", backend);

	memset(&server, 0, sizeof(server));
	server.loop = loop;
	server.fd = accept_record.result;
	server.recv_op.callback = echo_recv_done;
	server.recv_op.data = &server;
	server.send_op.callback = echo_send_done;
	server.send_op.data = &server;
	err = loop_recv(loop, &server.recv_op, server.fd, server.buffer,
			sizeof(server.buffer));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));

	init_op(&reply_op, &reply_record);
	err = loop_recv(loop, &reply_op, client, reply, sizeof(reply));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));

	cr_assert_eq(send(client, message, sizeof(message), 0),
		     (ssize_t)sizeof(message));
	run_until(loop, &reply_record.calls, 1);

	cr_assert_eq(server.received, (int)sizeof(message));
	cr_assert_eq(server.sent, (int)sizeof(message));
	cr_assert_eq(reply_record.result, (int)sizeof(message),
		     "%s: echo returned %d bytes", backend, reply_record.result);
	cr_assert_str_eq(reply, message);

	close(server.fd);
	close(client);
	close_listener(&listener);
	close_loop(loop);
}


/* One direction of a large transfer through a stream socketpair. */
struct transfer {
	struct loop *loop;
	struct loop_op op;
	int fd;
	uint8_t *data;          /* (size) bytes, sender only */
	uint8_t chunk[65536];   /* receiver only */
	size_t size;
	size_t done;            /* bytes sent or received so far */
	int calls;
	bool finished;
	size_t first_mismatch;  /* receiver: offset of the first wrong byte */
};


static uint8_t pattern_byte(size_t offset)
{
	return (uint8_t)(offset % 251);
}


static void transfer_sent(struct loop_op *op, int result)
{
	struct transfer *sender = op->data;
	int err;

	cr_assert_gt(result, 0, "%s: send returned %d", backend, result);
	sender->calls++;
	sender->done += (size_t)result;
	if (sender->done == sender->size) {
		sender->finished = true;
		return;
	}

	err = loop_send(sender->loop, &sender->op, sender->fd,
			sender->data + sender->done, sender->size - sender->done);
	cr_assert_eq(err, 0, "%s: loop_send failed: %s", backend, strerror(-err));
}


static void transfer_received(struct loop_op *op, int result)
{
	struct transfer *receiver = op->data;
	int err;
	int i;

	cr_assert_gt(result, 0, "%s: recv returned %d", backend, result);
	receiver->calls++;
	for (i = 0; i < result; i++) {
		size_t offset = receiver->done + (size_t)i;

		if (receiver->chunk[i] != pattern_byte(offset) &&
		    receiver->first_mismatch == SIZE_MAX)
			receiver->first_mismatch = offset;
	}
	receiver->done += (size_t)result;
	if (receiver->done == receiver->size) {
		receiver->finished = true;
		return;
	}

	err = loop_recv(receiver->loop, &receiver->op, receiver->fd,
			receiver->chunk, sizeof(receiver->chunk));
	cr_assert_eq(err, 0, "%s: loop_recv failed: %s", backend, strerror(-err));
}


LOOP_TEST(send_large_buffer_in_parts, .timeout = 20)
{
	const size_t size = 8u << 20;
	struct loop *loop = open_loop(*force_epoll);
	struct transfer *sender = calloc(1, sizeof(*sender));
	struct transfer *receiver = calloc(1, sizeof(*receiver));
	int finished = 0;
	uint64_t start;
	int fds[2];
	size_t i;
	int err;

	cr_assert_not_null(sender);
	cr_assert_not_null(receiver);
	make_socketpair(SOCK_STREAM, fds);

	sender->data = malloc(size);
	cr_assert_not_null(sender->data);
	for (i = 0; i < size; i++)
		sender->data[i] = pattern_byte(i);

	sender->loop = loop;
	sender->fd = fds[0];
	sender->size = size;
	sender->op.callback = transfer_sent;
	sender->op.data = sender;
	receiver->loop = loop;
	receiver->fd = fds[1];
	receiver->size = size;
	receiver->first_mismatch = SIZE_MAX;
	receiver->op.callback = transfer_received;
	receiver->op.data = receiver;

	err = loop_send(loop, &sender->op, sender->fd, sender->data, size);
	cr_assert_eq(err, 0, "loop_send failed: %s", strerror(-err));
	err = loop_recv(loop, &receiver->op, receiver->fd, receiver->chunk,
			sizeof(receiver->chunk));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));

	start = now_ns();
	while (finished < 2) {
		int ret = loop_run(loop, 100);

		cr_assert_geq(ret, 0, "%s: loop_run failed: %s", backend,
			      strerror(-ret));
		cr_assert_lt(now_ns() - start, 2 * RUN_LIMIT_NS,
			     "%s: transfer stalled at %zu sent, %zu received",
			     backend, sender->done, receiver->done);
		finished = sender->finished + receiver->finished;
	}

	cr_assert_eq(sender->done, size);
	cr_assert_eq(receiver->done, size);
	cr_assert_eq(receiver->first_mismatch, SIZE_MAX,
		     "%s: received data differs at offset %zu", backend,
		     receiver->first_mismatch);

	/* A socket buffer far smaller than 8 MiB forces short sends. */
	cr_assert_gt(sender->calls, 1, "%s: expected short sends, got %d call",
		     backend, sender->calls);

	close(fds[0]);
	close(fds[1]);
	free(sender->data);
	free(sender);
	free(receiver);
	close_loop(loop);
}


/* Receiver that stores the length of every packet it gets. */
struct packet_reader {
	struct loop *loop;
	struct loop_op op;
	int fd;
	char buffer[4096];
	int lengths[3];
	char first_bytes[3];
	int count;
};


static void packet_received(struct loop_op *op, int result)
{
	struct packet_reader *reader = op->data;
	int err;

	cr_assert_lt(reader->count, 3, "%s: too many packets", backend);
	reader->lengths[reader->count] = result;
	reader->first_bytes[reader->count] = result > 0 ? reader->buffer[0] : 0;
	reader->count++;
	if (reader->count == 3)
		return;

	err = loop_recv(reader->loop, &reader->op, reader->fd, reader->buffer,
			sizeof(reader->buffer));
	cr_assert_eq(err, 0, "%s: loop_recv failed: %s", backend, strerror(-err));
}


LOOP_TEST(seqpacket_one_packet_per_recv, .timeout = 10)
{
	static const int sizes[3] = { 10, 200, 3000 };
	struct loop *loop = open_loop(*force_epoll);
	struct packet_reader reader;
	char packet[3000];
	int fds[2];
	int i;
	int err;

	make_socketpair(SOCK_SEQPACKET, fds);
	for (i = 0; i < 3; i++) {
		memset(packet, 'a' + i, sizeof(packet));
		cr_assert_eq(send(fds[0], packet, (size_t)sizes[i], 0),
			     (ssize_t)sizes[i], "send failed: %s", strerror(errno));
	}

	memset(&reader, 0, sizeof(reader));
	reader.loop = loop;
	reader.fd = fds[1];
	reader.op.callback = packet_received;
	reader.op.data = &reader;
	err = loop_recv(loop, &reader.op, reader.fd, reader.buffer,
			sizeof(reader.buffer));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));
	run_until(loop, &reader.count, 3);

	for (i = 0; i < 3; i++) {
		cr_assert_eq(reader.lengths[i], sizes[i],
			     "%s: packet %d has %d bytes, expected %d", backend,
			     i, reader.lengths[i], sizes[i]);
		cr_assert_eq(reader.first_bytes[i], 'a' + i,
			     "%s: packet %d out of order", backend, i);
	}

	close(fds[0]);
	close(fds[1]);
	close_loop(loop);
}


LOOP_TEST(recv_returns_zero_at_eof, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	char buffer[16];
	int fds[2];
	int err;

	make_socketpair(SOCK_STREAM, fds);
	init_op(&op, &record);
	err = loop_recv(loop, &op, fds[1], buffer, sizeof(buffer));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));

	/* Nothing to read yet, so the recv stays pending. */
	cr_assert_eq(loop_run(loop, 20), 0);
	cr_assert_eq(record.calls, 0, "%s: recv completed without data", backend);

	close(fds[0]);
	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.result, 0, "%s: recv at EOF returned %d", backend,
		     record.result);

	close(fds[1]);
	close_loop(loop);
}


LOOP_TEST(send_to_closed_peer_fails, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	int fds[2];
	int err;

	/* MSG_NOSIGNAL keeps SIGPIPE from killing the test process. */
	make_socketpair(SOCK_STREAM, fds);
	close(fds[1]);
	init_op(&op, &record);
	err = loop_send(loop, &op, fds[0], "x", 1);
	cr_assert_eq(err, 0, "loop_send failed: %s", strerror(-err));
	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.result, -EPIPE, "%s: send returned %d", backend,
		     record.result);

	close(fds[0]);
	close_loop(loop);
}


LOOP_TEST(poll_pidfd_child_exit, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	pid_t child;
	int pidfd;
	int status;
	int err;

	child = fork();
	cr_assert_geq(child, 0, "fork failed: %s", strerror(errno));
	if (child == 0) {
		usleep(100 * 1000);
		_exit(7);
	}

	pidfd = (int)syscall(SYS_pidfd_open, child, 0);
	if (pidfd < 0) {
		int pidfd_error = errno;

		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
		loop_destroy(loop);
		cr_assert_eq(pidfd_error, ENOSYS, "pidfd_open failed: %s",
			     strerror(pidfd_error));
		cr_skip_test("pidfd_open needs Linux 5.3");
	}

	init_op(&op, &record);
	err = loop_poll(loop, &op, pidfd);
	cr_assert_eq(err, 0, "loop_poll failed: %s", strerror(-err));

	/* The child sleeps for 100 ms, so the poll cannot be done yet. */
	cr_assert_eq(loop_run(loop, 0), 0);
	cr_assert_eq(record.calls, 0, "%s: poll completed before exit", backend);

	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.result, 0, "%s: poll returned %d", backend,
		     record.result);

	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status));
	cr_assert_eq(WEXITSTATUS(status), 7);

	close(pidfd);
	close_loop(loop);
}


LOOP_TEST(timeouts_fire_in_order, .timeout = 10)
{
	/* Submitted out of order on purpose. */
	static const uint64_t delays_ms[3] = { 30, 10, 20 };
	static const int expected_order[3] = { 2, 0, 1 };
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op ops[3];
	struct record records[3];
	int sequence = 0;
	uint64_t start;
	int i;
	int err;

	start = now_ns();
	for (i = 0; i < 3; i++) {
		init_op(&ops[i], &records[i]);
		records[i].sequence = &sequence;
		err = loop_timeout(loop, &ops[i], delays_ms[i] * NS_PER_MS);
		cr_assert_eq(err, 0, "loop_timeout failed: %s", strerror(-err));
	}
	run_until(loop, &sequence, 3);

	for (i = 0; i < 3; i++) {
		uint64_t elapsed = records[i].done_ns - start;

		cr_assert_eq(records[i].calls, 1);
		cr_assert_eq(records[i].result, 0, "%s: timeout returned %d",
			     backend, records[i].result);
		cr_assert_eq(records[i].order, expected_order[i],
			     "%s: the %llu ms timeout fired as number %d",
			     backend, (unsigned long long)delays_ms[i],
			     records[i].order);
		cr_assert_geq(elapsed, delays_ms[i] * NS_PER_MS,
			      "%s: the %llu ms timeout fired after %llu ns",
			      backend, (unsigned long long)delays_ms[i],
			      (unsigned long long)elapsed);
		cr_assert_lt(elapsed, 5 * NS_PER_SEC);
	}
	close_loop(loop);
}


LOOP_TEST(cancel_pending_recv, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	char buffer[16];
	int fds[2];
	int err;

	make_socketpair(SOCK_STREAM, fds);
	init_op(&op, &record);
	err = loop_recv(loop, &op, fds[1], buffer, sizeof(buffer));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));
	cr_assert_eq(loop_run(loop, 0), 0);

	/* The second cancel is a no-op. */
	in_submission = true;
	loop_cancel(loop, &op);
	loop_cancel(loop, &op);
	in_submission = false;
	cr_assert_eq(record.calls, 0, "%s: loop_cancel ran the callback", backend);

	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.result, -ECANCELED, "%s: cancelled recv returned %d",
		     backend, record.result);
	cr_assert_eq(loop_pending(loop), 0);

	/* Neither more time nor a cancel of the finished op brings a second
	 * callback. */
	loop_cancel(loop, &op);
	cr_assert_eq(loop_run(loop, 50), 0);
	cr_assert_eq(record.calls, 1, "%s: %d callbacks for one cancel", backend,
		     record.calls);

	/* The socket still works and the cancelled recv consumed nothing. */
	err = loop_recv(loop, &op, fds[1], buffer, sizeof(buffer));
	cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));
	cr_assert_eq(send(fds[0], "abc", 3, 0), 3);
	run_until(loop, &record.calls, 2);
	cr_assert_eq(record.result, 3, "%s: recv after cancel returned %d",
		     backend, record.result);
	cr_assert_eq(memcmp(buffer, "abc", 3), 0);

	close(fds[0]);
	close(fds[1]);
	close_loop(loop);
}


LOOP_TEST(cancel_pending_timeout, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	struct loop_op idle_op;
	struct record idle_record;
	uint64_t start;
	int err;

	start = now_ns();
	init_op(&op, &record);
	err = loop_timeout(loop, &op, 10 * NS_PER_SEC);
	cr_assert_eq(err, 0, "loop_timeout failed: %s", strerror(-err));
	cr_assert_eq(loop_run(loop, 0), 0);

	in_submission = true;
	loop_cancel(loop, &op);
	in_submission = false;
	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.result, -ECANCELED,
		     "%s: cancelled timeout returned %d", backend, record.result);
	cr_assert_lt(record.done_ns - start, 5 * NS_PER_SEC);

	/* Cancelling an op that was never submitted does nothing. */
	init_op(&idle_op, &idle_record);
	loop_cancel(loop, &idle_op);

	cr_assert_eq(loop_run(loop, 50), 0);
	cr_assert_eq(record.calls, 1, "%s: %d callbacks for one cancel", backend,
		     record.calls);
	cr_assert_eq(idle_record.calls, 0);
	close_loop(loop);
}


/* A chain of timeouts: each callback resubmits its own op and submits one
 * side timeout from a pool. */
struct chain {
	struct loop *loop;
	struct loop_op op;
	int links;
	struct loop_op side_ops[1000];
	struct record side_records[1000];
	int side_calls;
};

#define CHAIN_LENGTH 1000


static void side_timeout_done(struct loop_op *op, int result)
{
	struct chain *chain = op->data;

	cr_assert_eq(result, 0, "%s: side timeout returned %d", backend, result);
	chain->side_calls++;
}


static void chain_link_done(struct loop_op *op, int result)
{
	struct chain *chain = op->data;
	struct loop_op *side;
	int err;

	cr_assert_eq(result, 0, "%s: chained timeout returned %d", backend,
		     result);
	side = &chain->side_ops[chain->links];
	chain->links++;

	side->callback = side_timeout_done;
	side->data = chain;
	err = loop_timeout(chain->loop, side, 0);
	cr_assert_eq(err, 0, "%s: side loop_timeout failed: %s", backend,
		     strerror(-err));

	if (chain->links == CHAIN_LENGTH)
		return;
	err = loop_timeout(chain->loop, &chain->op, 0);
	cr_assert_eq(err, 0, "%s: chained loop_timeout failed: %s", backend,
		     strerror(-err));
}


LOOP_TEST(callback_resubmits_own_op, .timeout = 20)
{
	struct loop *loop = open_loop(*force_epoll);
	struct chain *chain = calloc(1, sizeof(*chain));
	uint64_t start;
	int err;

	cr_assert_not_null(chain);
	chain->loop = loop;
	chain->op.callback = chain_link_done;
	chain->op.data = chain;
	err = loop_timeout(loop, &chain->op, 0);
	cr_assert_eq(err, 0, "loop_timeout failed: %s", strerror(-err));

	start = now_ns();
	while (chain->links < CHAIN_LENGTH || chain->side_calls < CHAIN_LENGTH) {
		int ret = loop_run(loop, 100);

		cr_assert_geq(ret, 0, "%s: loop_run failed: %s", backend,
			      strerror(-ret));
		cr_assert_lt(now_ns() - start, 2 * RUN_LIMIT_NS,
			     "%s: chain stalled at %d links, %d side timeouts",
			     backend, chain->links, chain->side_calls);
	}

	cr_assert_eq(chain->links, CHAIN_LENGTH);
	cr_assert_eq(chain->side_calls, CHAIN_LENGTH);
	free(chain);
	close_loop(loop);
}


/* One end of a ping-pong over a stream socketpair. The receiving callback
 * resubmits its recv and submits the reply, so each fd has a recv and a
 * send pending at once. The last reply of each player is never read. */
struct player {
	struct loop *loop;
	int fd;
	struct loop_op recv_op;
	struct loop_op send_op;
	char in;
	char out;
	int rounds;
	int limit;              /* stop receiving after this many rounds */
	bool send_failed;
};


static void player_sent(struct loop_op *op, int result)
{
	struct player *player = op->data;

	if (result != 1)
		player->send_failed = true;
}


static void player_received(struct loop_op *op, int result)
{
	struct player *player = op->data;
	int err;

	cr_assert_eq(result, 1, "%s: ping-pong recv returned %d", backend, result);
	player->rounds++;
	player->out = player->in;
	if (player->rounds < player->limit) {
		err = loop_recv(player->loop, &player->recv_op, player->fd,
				&player->in, 1);
		cr_assert_eq(err, 0, "%s: loop_recv failed: %s", backend,
			     strerror(-err));
	}

	/* The peer received this player's last byte only after that send
	 * completed, so its callback has run before the reply came back. */
	cr_assert_not(player->send_op.pending,
		      "%s: reply arrived before the send completed", backend);
	err = loop_send(player->loop, &player->send_op, player->fd, &player->out, 1);
	cr_assert_eq(err, 0, "%s: loop_send failed: %s", backend, strerror(-err));
}


LOOP_TEST(callback_submits_ping_pong, .timeout = 20)
{
	struct loop *loop = open_loop(*force_epoll);
	struct player players[2];
	int fds[2];
	uint64_t start;
	int i;
	int err;

	make_socketpair(SOCK_STREAM, fds);
	memset(players, 0, sizeof(players));
	for (i = 0; i < 2; i++) {
		players[i].loop = loop;
		players[i].fd = fds[i];
		players[i].limit = 500;
		players[i].recv_op.callback = player_received;
		players[i].recv_op.data = &players[i];
		players[i].send_op.callback = player_sent;
		players[i].send_op.data = &players[i];
		err = loop_recv(loop, &players[i].recv_op, fds[i], &players[i].in, 1);
		cr_assert_eq(err, 0, "loop_recv failed: %s", strerror(-err));
	}

	players[0].out = 'x';
	err = loop_send(loop, &players[0].send_op, fds[0], &players[0].out, 1);
	cr_assert_eq(err, 0, "loop_send failed: %s", strerror(-err));

	start = now_ns();
	while (players[0].rounds < 500 || players[1].rounds < 500 ||
	       loop_pending(loop) > 0) {
		int ret = loop_run(loop, 100);

		cr_assert_geq(ret, 0, "%s: loop_run failed: %s", backend,
			      strerror(-ret));
		cr_assert_lt(now_ns() - start, 2 * RUN_LIMIT_NS,
			     "%s: ping-pong stalled at %d and %d rounds", backend,
			     players[0].rounds, players[1].rounds);
	}

	for (i = 0; i < 2; i++) {
		cr_assert_eq(players[i].rounds, 500, "%s: player %d: %d rounds",
			     backend, i, players[i].rounds);
		cr_assert_not(players[i].send_failed, "%s: player %d send failed",
			      backend, i);
	}

	close(fds[0]);
	close(fds[1]);
	close_loop(loop);
}


#define MANY_SOCKETS 600


LOOP_TEST(more_pending_recvs_than_ring, .timeout = 20)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op *ops = calloc(MANY_SOCKETS, sizeof(*ops));
	struct record *records = calloc(MANY_SOCKETS, sizeof(*records));
	char *buffers = calloc(MANY_SOCKETS, 1);
	int (*pairs)[2] = calloc(MANY_SOCKETS, sizeof(*pairs));
	struct rlimit limit;
	int completed = 0;
	uint64_t start;
	int i;
	int err;

	cr_assert(ops != NULL && records != NULL && buffers != NULL && pairs != NULL);

	/* Two fds per pair plus the test's own. */
	cr_assert_eq(getrlimit(RLIMIT_NOFILE, &limit), 0);
	if (limit.rlim_cur < 2 * MANY_SOCKETS + 64) {
		if (limit.rlim_max < 2 * MANY_SOCKETS + 64) {
			loop_destroy(loop);
			cr_skip_test("RLIMIT_NOFILE hard limit %llu is too low",
				     (unsigned long long)limit.rlim_max);
		}
		limit.rlim_cur = 2 * MANY_SOCKETS + 64;
		cr_assert_eq(setrlimit(RLIMIT_NOFILE, &limit), 0);
	}

	for (i = 0; i < MANY_SOCKETS; i++) {
		make_socketpair(SOCK_STREAM, pairs[i]);
		init_op(&ops[i], &records[i]);
		err = loop_recv(loop, &ops[i], pairs[i][1], &buffers[i], 1);
		cr_assert_eq(err, 0, "%s: loop_recv %d failed: %s", backend, i,
			     strerror(-err));
	}
	cr_assert_eq(loop_pending(loop), MANY_SOCKETS);
	cr_assert_eq(loop_run(loop, 0), 0, "%s: a recv completed without data",
		     backend);

	for (i = 0; i < MANY_SOCKETS; i++) {
		char byte = (char)(i & 0x7f);

		cr_assert_eq(send(pairs[i][0], &byte, 1, 0), 1);
	}

	start = now_ns();
	while (completed < MANY_SOCKETS) {
		int ret = loop_run(loop, 100);

		cr_assert_geq(ret, 0, "%s: loop_run failed: %s", backend,
			      strerror(-ret));
		completed += ret;
		cr_assert_lt(now_ns() - start, RUN_LIMIT_NS,
			     "%s: %d of %d recvs completed", backend, completed,
			     MANY_SOCKETS);
	}

	cr_assert_eq(completed, MANY_SOCKETS);
	for (i = 0; i < MANY_SOCKETS; i++) {
		cr_assert_eq(records[i].calls, 1, "%s: recv %d ran %d callbacks",
			     backend, i, records[i].calls);
		cr_assert_eq(records[i].result, 1, "%s: recv %d returned %d",
			     backend, i, records[i].result);
		cr_assert_eq(buffers[i], (char)(i & 0x7f),
			     "%s: recv %d got another socket's byte", backend, i);
		close(pairs[i][0]);
		close(pairs[i][1]);
	}

	free(ops);
	free(records);
	free(buffers);
	free(pairs);
	close_loop(loop);
}


/* More completions at once than the io_uring completion queue has room for
 * (4096 entries). */
#define MANY_TIMEOUTS 5000


LOOP_TEST(more_completions_than_queue, .timeout = 20)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op *ops = calloc(MANY_TIMEOUTS, sizeof(*ops));
	struct record *records = calloc(MANY_TIMEOUTS, sizeof(*records));
	int sequence = 0;
	int i;
	int err;

	cr_assert(ops != NULL && records != NULL);
	for (i = 0; i < MANY_TIMEOUTS; i++) {
		init_op(&ops[i], &records[i]);
		records[i].sequence = &sequence;
		err = loop_timeout(loop, &ops[i], 0);
		cr_assert_eq(err, 0, "%s: loop_timeout %d failed: %s", backend, i,
			     strerror(-err));
	}
	run_until(loop, &sequence, MANY_TIMEOUTS);

	for (i = 0; i < MANY_TIMEOUTS; i++) {
		cr_assert_eq(records[i].calls, 1, "%s: timeout %d ran %d callbacks",
			     backend, i, records[i].calls);
		cr_assert_eq(records[i].result, 0);
	}
	cr_assert_eq(loop_run(loop, 20), 0);

	free(ops);
	free(records);
	close_loop(loop);
}


LOOP_TEST(no_callback_inside_submission, .timeout = 10)
{
	enum { ACCEPT, RECV, SEND, POLL, TIMEOUT, CANCELLED, OP_COUNT };
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op ops[OP_COUNT];
	struct record records[OP_COUNT];
	struct listener listener;
	char buffer[8];
	int ready[2];
	int idle[2];
	int client;
	int calls;
	int i;
	int err;

	/* Everything is ready before its op is submitted, so only a loop
	 * that runs callbacks early would complete them here. */
	open_listener(&listener);
	client = connect_client(&listener);
	make_socketpair(SOCK_STREAM, ready);
	make_socketpair(SOCK_STREAM, idle);
	cr_assert_eq(send(ready[0], "abcd", 4, 0), 4);

	for (i = 0; i < OP_COUNT; i++)
		init_op(&ops[i], &records[i]);

	in_submission = true;
	err = loop_accept(loop, &ops[ACCEPT], listener.fd);
	cr_assert_eq(err, 0);
	err = loop_recv(loop, &ops[RECV], ready[1], buffer, 2);
	cr_assert_eq(err, 0);
	err = loop_send(loop, &ops[SEND], ready[1], "xy", 2);
	cr_assert_eq(err, 0);
	err = loop_poll(loop, &ops[POLL], ready[1]);
	cr_assert_eq(err, 0);
	err = loop_timeout(loop, &ops[TIMEOUT], 0);
	cr_assert_eq(err, 0);
	err = loop_recv(loop, &ops[CANCELLED], idle[1], buffer + 4, 4);
	cr_assert_eq(err, 0);
	loop_cancel(loop, &ops[CANCELLED]);
	in_submission = false;

	/* The kernel may finish the io_uring ops meanwhile, but their
	 * callbacks wait for loop_run(). */
	usleep(20 * 1000);
	for (i = 0; i < OP_COUNT; i++)
		cr_assert_eq(records[i].calls, 0,
			     "%s: op %d completed outside loop_run", backend, i);
	cr_assert_eq(loop_pending(loop), OP_COUNT);

	calls = 0;
	while (calls < OP_COUNT) {
		int ret = loop_run(loop, 1000);

		cr_assert_gt(ret, 0, "%s: loop_run returned %d with %d of %d done",
			     backend, ret, calls, OP_COUNT);
		calls += ret;
	}
	cr_assert_eq(calls, OP_COUNT);

	cr_assert_geq(records[ACCEPT].result, 0);
	cr_assert_eq(records[RECV].result, 2);
	cr_assert_eq(memcmp(buffer, "ab", 2), 0);
	cr_assert_eq(records[SEND].result, 2);
	cr_assert_eq(records[POLL].result, 0);
	cr_assert_eq(records[TIMEOUT].result, 0);
	cr_assert_eq(records[CANCELLED].result, -ECANCELED);

	close(records[ACCEPT].result);
	close(client);
	close(ready[0]);
	close(ready[1]);
	close(idle[0]);
	close(idle[1]);
	close_listener(&listener);
	close_loop(loop);
}


/* Callback that checks loop_run() refuses to run inside itself. */
static void nested_run_callback(struct loop_op *op, int result)
{
	struct loop *loop = op->data;

	cr_assert_eq(result, 0);
	cr_assert_eq(loop_run(loop, 0), -EDEADLK,
		     "%s: loop_run ran inside a callback", backend);
	op->data = NULL;
}


LOOP_TEST(misuse_returns_errors, .timeout = 10)
{
	struct loop *loop = open_loop(*force_epoll);
	struct loop_op op;
	struct record record;
	struct loop_op nested;
	char buffer[4];
	int err;

	init_op(&op, &record);
	err = loop_timeout(loop, &op, 0);
	cr_assert_eq(err, 0);

	/* A pending op cannot carry a second operation. */
	err = loop_recv(loop, &op, 0, buffer, sizeof(buffer));
	cr_assert_eq(err, -EBUSY, "%s: resubmitting a pending op returned %d",
		     backend, err);
	cr_assert_eq(op.kind, LOOP_OP_TIMEOUT);

	memset(&nested, 0, sizeof(nested));
	err = loop_recv(loop, &nested, 3, buffer, sizeof(buffer));
	cr_assert_eq(err, -EINVAL, "op without callback returned %d", err);
	nested.callback = nested_run_callback;
	err = loop_recv(loop, &nested, -1, buffer, sizeof(buffer));
	cr_assert_eq(err, -EBADF, "negative fd returned %d", err);
	cr_assert_eq(loop_run(loop, -2), -EINVAL);

	run_until(loop, &record.calls, 1);
	cr_assert_eq(record.calls, 1);
	cr_assert_eq(loop_pending(loop), 0);

	nested.data = loop;
	err = loop_timeout(loop, &nested, 0);
	cr_assert_eq(err, 0);
	cr_assert_eq(loop_run(loop, 1000), 1);
	cr_assert_null(nested.data, "%s: nested callback did not run", backend);

	close_loop(loop);
}


Test(loop, environment_forces_epoll, .timeout = 10)
{
	struct loop *loop = NULL;
	int reason = -1;
	int err;

	cr_assert_eq(setenv("SLABD_LOOP", "epoll", 1), 0);
	err = loop_create(false, &loop, &reason);
	cr_assert_eq(err, 0, "loop_create failed: %s", strerror(-err));
	cr_assert_eq(loop_backend(loop), LOOP_BACKEND_EPOLL);
	cr_assert_str_eq(loop_backend_name(loop), "epoll");
	cr_assert_eq(reason, 0, "forced epoll reported reason %d", reason);
	loop_destroy(loop);

	cr_assert_eq(setenv("SLABD_LOOP", "kqueue", 1), 0);
	loop = NULL;
	err = loop_create(false, &loop, &reason);
	cr_assert_eq(err, -EINVAL, "SLABD_LOOP=kqueue gave %d", err);
	cr_assert_null(loop);
	unsetenv("SLABD_LOOP");
}
