/*
 * The broker's event loop: completion-based operations (accept, receive,
 * send, poll, timeout) on io_uring, with an epoll backend that offers the
 * same completions where io_uring cannot be set up (containers often forbid
 * it).
 *
 * Contract, the same for both backends:
 * - The caller owns each struct loop_op and keeps it alive and untouched
 *   from submission until its callback has run. An op carries one operation
 *   at a time.
 * - Every successful submission (return 0) leads to exactly one callback,
 *   from loop_run(), never from inside the submitting call.
 * - result is what the system call would return: bytes, a new fd, 0, or a
 *   negative errno value. A cancelled operation completes with -ECANCELED
 *   (or with its result, if it finished before the cancel took effect).
 * - Submission functions return 0 or a negative errno value and never log.
 */
#ifndef SLAB_BROKER_LOOP_H
#define SLAB_BROKER_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct loop;
struct loop_op;

typedef void (*loop_callback)(struct loop_op *op, int result);

enum loop_op_kind {
	LOOP_OP_NONE = 0,
	LOOP_OP_ACCEPT,
	LOOP_OP_RECV,
	LOOP_OP_SEND,
	LOOP_OP_POLL,
	LOOP_OP_TIMEOUT,
};

/* One operation; embed it in the object it belongs to. */
struct loop_op {
	loop_callback callback;
	void *data;              /* for the caller */

	/* Owned by the loop while the operation is pending. */
	enum loop_op_kind kind;
	bool pending;
	bool cancelled;
	int fd;
	void *buffer;
	size_t length;
	uint64_t deadline_ns;    /* CLOCK_MONOTONIC, timeouts only */
	struct loop_op *next;    /* the loop's internal lists */
	struct loop_op *prev;
	uint64_t timespec[2];    /* io_uring keeps the timeout here */
	int result;              /* held from completion until the callback runs */
};

enum loop_backend {
	LOOP_BACKEND_IO_URING,
	LOOP_BACKEND_EPOLL,
};

/*
 * Creates a loop on io_uring, or on epoll when io_uring setup fails or
 * force_epoll is set. *fallback_reason is set to the io_uring error (a
 * negative errno value) when the epoll backend was chosen for that reason,
 * else 0, so the caller can log the choice once. The environment variable
 * SLABD_LOOP=epoll forces epoll too. SLABD_LOOP=io_uring or an empty value
 * keeps the default, and any other value makes loop_create return -EINVAL.
 */
int loop_create(bool force_epoll, struct loop **out, int *fallback_reason);

/* Frees the loop. Callbacks of operations still pending never run, so the
 * caller cancels every operation and runs the loop until loop_pending() is 0
 * before it frees the ops and their buffers. */
void loop_destroy(struct loop *loop);

enum loop_backend loop_backend(const struct loop *loop);
const char *loop_backend_name(const struct loop *loop);

/* Accepts one connection on a listening socket; result is the new fd,
 * created with SOCK_CLOEXEC | SOCK_NONBLOCK. */
int loop_accept(struct loop *loop, struct loop_op *op, int listen_fd);

/* Receives up to length bytes (or one packet on a SOCK_SEQPACKET socket);
 * result is the byte count, 0 at end of stream. */
int loop_recv(struct loop *loop, struct loop_op *op, int fd, void *buffer,
	      size_t length);

/* Sends up to length bytes with MSG_NOSIGNAL; result is the count sent,
 * which may be short on a stream socket. */
int loop_send(struct loop *loop, struct loop_op *op, int fd,
	      const void *buffer, size_t length);

/* Waits until fd is readable (a pidfd when its process exits); result 0. */
int loop_poll(struct loop *loop, struct loop_op *op, int fd);

/* Completes with 0 after timeout_ns nanoseconds. */
int loop_timeout(struct loop *loop, struct loop_op *op, uint64_t timeout_ns);

/* Asks a pending operation to stop; its callback still runs once. A no-op
 * for an op that is not pending. */
void loop_cancel(struct loop *loop, struct loop_op *op);

/*
 * Waits up to timeout_ms milliseconds (-1 = no limit) for completions and
 * runs their callbacks. Returns the number of callbacks run, or a negative
 * errno value; -EINTR when a signal interrupted the wait.
 */
int loop_run(struct loop *loop, int timeout_ms);

/* Number of operations submitted and not yet completed. */
int loop_pending(const struct loop *loop);

#endif
