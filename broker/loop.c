/*
 * Front end of the broker's event loop: backend choice, argument checks, the
 * pending count and the callbacks. The backends (loop_uring.c and
 * loop_epoll.c) only talk to the kernel and queue finished ops on the
 * completed list, and loop_run() runs their callbacks from there. Because
 * that list is the only place callbacks come from, no submission or cancel
 * ever runs one, whichever backend is in use.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "broker/loop_internal.h"

/* Largest length passed to one recv or send, so that a byte count always
 * fits the int result. Linux caps the length of send() and recv() at
 * INT_MAX anyway. */
#define LOOP_IO_MAX ((size_t)INT_MAX)


uint64_t loop_now_ns(void)
{
	struct timespec now;

	/* CLOCK_MONOTONIC always exists, so this call cannot fail. */
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * LOOP_NS_PER_SEC + (uint64_t)now.tv_nsec;
}


void loop_push_completed(struct loop *loop, struct loop_op *op, int result)
{
	assert(op->pending);
	assert(op->result == LOOP_RESULT_NONE);
	assert(result != LOOP_RESULT_NONE);

	op->result = result;
	op->next = NULL;
	op->prev = NULL;
	if (loop->completed_tail != NULL)
		loop->completed_tail->next = op;
	else
		loop->completed_head = op;
	loop->completed_tail = op;
}


/* Reads SLABD_LOOP: "epoll" forces the epoll backend, "io_uring" or an
 * empty value keeps the default. Returns -EINVAL for any other value. */
static int loop_read_environment(bool *force_epoll)
{
	const char *value = getenv("SLABD_LOOP");

	if (value == NULL || value[0] == '\0' || strcmp(value, "io_uring") == 0)
		return 0;
	if (strcmp(value, "epoll") == 0) {
		*force_epoll = true;
		return 0;
	}
	return -EINVAL;
}


int loop_create(bool force_epoll, struct loop **out, int *fallback_reason)
{
	struct loop *loop;
	int uring_error = 0;
	int err;

	if (out == NULL)
		return -EINVAL;
	*out = NULL;
	if (fallback_reason != NULL)
		*fallback_reason = 0;

	err = loop_read_environment(&force_epoll);
	if (err < 0)
		return err;

	loop = calloc(1, sizeof(*loop));
	if (loop == NULL)
		return -ENOMEM;

	if (!force_epoll) {
		loop->backend = LOOP_BACKEND_IO_URING;
		uring_error = loop_uring_init(loop);
		if (uring_error == 0)
			goto done;
	}

	loop->backend = LOOP_BACKEND_EPOLL;
	err = loop_epoll_init(loop);
	if (err < 0)
		goto err_free;
	if (fallback_reason != NULL)
		*fallback_reason = uring_error;

done:
	*out = loop;
	return 0;

err_free:
	free(loop);
	return err;
}


void loop_destroy(struct loop *loop)
{
	if (loop == NULL)
		return;

	if (loop->backend == LOOP_BACKEND_IO_URING)
		loop_uring_close(loop);
	else
		loop_epoll_close(loop);
	free(loop);
}


enum loop_backend loop_backend(const struct loop *loop)
{
	return loop->backend;
}


const char *loop_backend_name(const struct loop *loop)
{
	return loop->backend == LOOP_BACKEND_IO_URING ? "io_uring" : "epoll";
}


int loop_pending(const struct loop *loop)
{
	return loop->pending;
}


/* Checks the arguments every submission shares and resets the op's loop
 * fields for a new operation of the given kind. Returns 0, -EINVAL, -EBUSY
 * when the op is still pending, or -EBADF for a negative fd. */
static int loop_prepare(struct loop *loop, struct loop_op *op,
			enum loop_op_kind kind, int fd)
{
	if (loop == NULL || op == NULL || op->callback == NULL)
		return -EINVAL;
	if (op->pending)
		return -EBUSY;
	if (kind != LOOP_OP_TIMEOUT && fd < 0)
		return -EBADF;

	op->kind = kind;
	op->cancelled = false;
	op->fd = fd;
	op->buffer = NULL;
	op->length = 0;
	op->deadline_ns = 0;
	op->next = NULL;
	op->prev = NULL;
	op->timespec[0] = 0;
	op->timespec[1] = 0;
	op->result = LOOP_RESULT_NONE;
	return 0;
}


/* Hands a prepared op to the backend and counts it as pending. */
static int loop_submit(struct loop *loop, struct loop_op *op)
{
	int err;

	if (loop->backend == LOOP_BACKEND_IO_URING)
		err = loop_uring_submit(loop, op);
	else
		err = loop_epoll_submit(loop, op);
	if (err < 0) {
		op->kind = LOOP_OP_NONE;
		return err;
	}

	op->pending = true;
	loop->pending++;
	return 0;
}


int loop_accept(struct loop *loop, struct loop_op *op, int listen_fd)
{
	int err = loop_prepare(loop, op, LOOP_OP_ACCEPT, listen_fd);

	if (err < 0)
		return err;
	return loop_submit(loop, op);
}


int loop_recv(struct loop *loop, struct loop_op *op, int fd, void *buffer,
	      size_t length)
{
	int err;

	if (buffer == NULL && length > 0)
		return -EINVAL;
	err = loop_prepare(loop, op, LOOP_OP_RECV, fd);
	if (err < 0)
		return err;

	op->buffer = buffer;
	op->length = length < LOOP_IO_MAX ? length : LOOP_IO_MAX;
	return loop_submit(loop, op);
}


int loop_send(struct loop *loop, struct loop_op *op, int fd,
	      const void *buffer, size_t length)
{
	int err;

	if (buffer == NULL && length > 0)
		return -EINVAL;
	err = loop_prepare(loop, op, LOOP_OP_SEND, fd);
	if (err < 0)
		return err;

	/* The loop never writes through buffer for a send. */
	op->buffer = (void *)buffer;
	op->length = length < LOOP_IO_MAX ? length : LOOP_IO_MAX;
	return loop_submit(loop, op);
}


int loop_poll(struct loop *loop, struct loop_op *op, int fd)
{
	int err = loop_prepare(loop, op, LOOP_OP_POLL, fd);

	if (err < 0)
		return err;
	return loop_submit(loop, op);
}


int loop_timeout(struct loop *loop, struct loop_op *op, uint64_t timeout_ns)
{
	uint64_t now;
	int err = loop_prepare(loop, op, LOOP_OP_TIMEOUT, -1);

	if (err < 0)
		return err;

	now = loop_now_ns();
	op->deadline_ns = timeout_ns < UINT64_MAX - now ? now + timeout_ns
							: UINT64_MAX;
	op->timespec[0] = timeout_ns / LOOP_NS_PER_SEC;
	op->timespec[1] = timeout_ns % LOOP_NS_PER_SEC;
	return loop_submit(loop, op);
}


void loop_cancel(struct loop *loop, struct loop_op *op)
{
	if (loop == NULL || op == NULL || !op->pending || op->cancelled)
		return;

	op->cancelled = true;

	/* The op already has its result and only waits for its callback. */
	if (op->result != LOOP_RESULT_NONE)
		return;

	if (loop->backend == LOOP_BACKEND_IO_URING)
		loop_uring_cancel(loop, op);
	else
		loop_epoll_cancel(loop, op);
}


/* Runs the callbacks of the ops completed so far and returns how many ran.
 * The list is detached first, so ops that complete while the callbacks run
 * (cancelled ones, on epoll) wait for the next call. */
static int loop_run_callbacks(struct loop *loop)
{
	struct loop_op *op = loop->completed_head;
	int count = 0;

	loop->completed_head = NULL;
	loop->completed_tail = NULL;

	while (op != NULL) {
		struct loop_op *next = op->next;
		int result = op->result;

		op->next = NULL;
		op->result = LOOP_RESULT_NONE;
		op->pending = false;
		loop->pending--;
		count++;

		/* The callback may resubmit op or free the object holding it,
		 * so op is not touched after this call. */
		op->callback(op, result);
		op = next;
	}
	return count;
}


int loop_run(struct loop *loop, int timeout_ms)
{
	uint64_t deadline_ns = 0;
	int wait_ms = timeout_ms;
	int count;
	int err;

	if (loop == NULL || timeout_ms < -1)
		return -EINVAL;
	if (loop->running)
		return -EDEADLK;

	if (timeout_ms > 0)
		deadline_ns = loop_now_ns() + (uint64_t)timeout_ms * LOOP_NS_PER_MS;

	loop->running = true;
	for (;;) {
		if (loop->completed_head != NULL)
			wait_ms = 0;

		if (loop->backend == LOOP_BACKEND_IO_URING)
			err = loop_uring_poll(loop, wait_ms);
		else
			err = loop_epoll_poll(loop, wait_ms);
		if (err < 0) {
			count = err;
			break;
		}

		count = loop_run_callbacks(loop);
		if (count > 0 || timeout_ms == 0)
			break;

		/* Nothing ran: the wakeup was for a cancel request's own
		 * completion, or an fd that was not ready after all. */
		if (timeout_ms > 0) {
			uint64_t now = loop_now_ns();

			if (now >= deadline_ns)
				break;
			wait_ms = (int)((deadline_ns - now + LOOP_NS_PER_MS - 1) /
					LOOP_NS_PER_MS);
		} else {
			wait_ms = -1;
		}
	}
	loop->running = false;
	return count;
}
