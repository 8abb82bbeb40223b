/*
 * Internals shared by the event loop's front end (loop.c) and its two
 * backends (loop_uring.c, loop_epoll.c).
 *
 * loop.c checks arguments, fills in the op, keeps the pending count and runs
 * every callback. A backend starts and cancels operations, and its poll
 * function waits for the kernel and moves finished ops onto the completed
 * list with loop_push_completed(). No backend function runs a callback, so
 * backend state never changes under a backend's feet.
 *
 * An op is in at most one list at a time, linked through next (and prev for
 * the doubly linked ones): an epoll fd's waiting ops, the epoll timers, the
 * io_uring cancel backlog, or the completed list. op->result is
 * LOOP_RESULT_NONE until the op is on the completed list.
 */
#ifndef SLAB_BROKER_LOOP_INTERNAL_H
#define SLAB_BROKER_LOOP_INTERNAL_H

#include <limits.h>
#include <liburing.h>

#include "broker/loop.h"

/* Value of loop_op.result while an op has no result yet. Real results are
 * byte counts, fds, 0 or -4095..-1, so INT_MIN is never one. */
#define LOOP_RESULT_NONE INT_MIN

#define LOOP_NS_PER_MS 1000000ULL
#define LOOP_NS_PER_SEC 1000000000ULL

struct loop_uring {
	struct io_uring ring;

	/* Ops whose cancel request found no free submission queue entry; the
	 * next poll sends them. Doubly linked through next and prev. */
	struct loop_op *cancel_head;
};

/* Ops waiting on one fd, in submission order. */
struct loop_epoll_fd {
	struct loop_op *head;
	struct loop_op *tail;
	uint32_t events;               /* registered with epoll, 0 if none */
};

struct loop_epoll {
	int epoll_fd;

	/* Indexed by fd number, and grown to hold the largest fd submitted. */
	struct loop_epoll_fd *fds;
	int fd_capacity;

	/* Pending timeouts sorted by deadline_ns. Equal deadlines keep
	 * submission order. Doubly linked through next and prev. */
	struct loop_op *timer_head;
	struct loop_op *timer_tail;
};

struct loop {
	enum loop_backend backend;
	int pending;                   /* submitted, callback not yet run */
	bool running;                  /* inside loop_run(), which is not reentrant */

	/* Ops with a result whose callbacks have not run, in completion
	 * order. Singly linked through next. */
	struct loop_op *completed_head;
	struct loop_op *completed_tail;

	union {
		struct loop_uring uring;
		struct loop_epoll epoll;
	};
};

/* Returns CLOCK_MONOTONIC in nanoseconds. */
uint64_t loop_now_ns(void);

/* Stores the result of a pending op and queues its callback for loop_run(). */
void loop_push_completed(struct loop *loop, struct loop_op *op, int result);

/*
 * Backend entry points. init returns 0 or a negative errno value and leaves
 * nothing to clean up on failure. submit starts op, whose fields loop.c has
 * filled in. cancel is called once per submission, only for an op still
 * pending. poll waits up to timeout_ms (-1 = no limit) for the kernel and
 * queues what finished; it returns 0 or a negative errno value.
 */
int loop_uring_init(struct loop *loop);
void loop_uring_close(struct loop *loop);
int loop_uring_submit(struct loop *loop, struct loop_op *op);
void loop_uring_cancel(struct loop *loop, struct loop_op *op);
int loop_uring_poll(struct loop *loop, int timeout_ms);

int loop_epoll_init(struct loop *loop);
void loop_epoll_close(struct loop *loop);
int loop_epoll_submit(struct loop *loop, struct loop_op *op);
void loop_epoll_cancel(struct loop *loop, struct loop_op *op);
int loop_epoll_poll(struct loop *loop, int timeout_ms);

#endif
