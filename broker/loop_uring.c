/*
 * io_uring backend of the event loop. Each operation is one submission
 * queue entry (SQE) whose user_data is the op pointer, and its completion
 * queue entry (CQE) carries the result.
 *
 * - SQEs wait in the submission queue and reach the kernel at the next poll,
 *   or earlier when the queue is full. Entering the kernel never runs a
 *   callback: CQEs are copied onto the loop's completed list and the CQ head
 *   is advanced before loop.c runs any callback.
 * - A cancel request is an IORING_OP_ASYNC_CANCEL SQE keyed by the op
 *   pointer. Its own user_data is LOOP_URING_CANCEL_DATA, and its CQE is
 *   dropped: the cancelled op reports through its own CQE.
 * - The completion queue is larger than the submission queue, and since
 *   Linux 5.5 (IORING_FEAT_NODROP) the kernel keeps CQEs that do not fit
 *   until they are reaped, so any number of ops may be pending.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#include "broker/loop_internal.h"

#define LOOP_URING_SQ_ENTRIES 256
#define LOOP_URING_CQ_ENTRIES 4096

/* user_data of cancel requests. No op lives at address 1. */
#define LOOP_URING_CANCEL_DATA ((uint64_t)1)

/* CQEs copied per peek. */
#define LOOP_URING_REAP_BATCH 64

_Static_assert(sizeof(struct __kernel_timespec) ==
	       sizeof(((struct loop_op *)0)->timespec),
	       "loop_op.timespec must hold a struct __kernel_timespec");

/* Opcodes the backend uses. Linux 5.6 is the first with all of them. */
static const int loop_uring_opcodes[] = {
	IORING_OP_ACCEPT,
	IORING_OP_RECV,
	IORING_OP_SEND,
	IORING_OP_POLL_ADD,
	IORING_OP_TIMEOUT,
	IORING_OP_ASYNC_CANCEL,
};


/* Returns 0 when the kernel supports every opcode the backend uses, else
 * -EOPNOTSUPP. */
static int loop_uring_probe(struct io_uring *ring)
{
	struct io_uring_probe *probe;
	size_t i;
	int err = 0;

	/* Probing arrived in Linux 5.6 with IORING_OP_RECV and IORING_OP_SEND,
	 * so a kernel that cannot be probed lacks those opcodes too. */
	probe = io_uring_get_probe_ring(ring);
	if (probe == NULL)
		return -EOPNOTSUPP;

	for (i = 0; i < sizeof(loop_uring_opcodes) / sizeof(loop_uring_opcodes[0]); i++) {
		if (!io_uring_opcode_supported(probe, loop_uring_opcodes[i])) {
			err = -EOPNOTSUPP;
			break;
		}
	}
	io_uring_free_probe(probe);
	return err;
}


int loop_uring_init(struct loop *loop)
{
	struct loop_uring *uring = &loop->uring;
	struct io_uring_params params;
	int err;

	memset(uring, 0, sizeof(*uring));
	memset(&params, 0, sizeof(params));
	params.flags = IORING_SETUP_CQSIZE;
	params.cq_entries = LOOP_URING_CQ_ENTRIES;

	/* The ring fd is close-on-exec, so workers never inherit it. */
	err = io_uring_queue_init_params(LOOP_URING_SQ_ENTRIES, &uring->ring,
					 &params);
	if (err < 0)
		return err;

	/* Before Linux 5.5 the kernel drops CQEs that do not fit in the CQ,
	 * and the callbacks of those ops would never run. */
	if (!(params.features & IORING_FEAT_NODROP)) {
		err = -EOPNOTSUPP;
		goto err_exit_ring;
	}

	err = loop_uring_probe(&uring->ring);
	if (err < 0)
		goto err_exit_ring;
	return 0;

err_exit_ring:
	io_uring_queue_exit(&uring->ring);
	return err;
}


void loop_uring_close(struct loop *loop)
{
	io_uring_queue_exit(&loop->uring.ring);
}


static void loop_uring_cancel_list_add(struct loop_uring *uring,
				       struct loop_op *op)
{
	op->prev = NULL;
	op->next = uring->cancel_head;
	if (uring->cancel_head != NULL)
		uring->cancel_head->prev = op;
	uring->cancel_head = op;
}


static void loop_uring_cancel_list_remove(struct loop_uring *uring,
					  struct loop_op *op)
{
	if (op->prev != NULL)
		op->prev->next = op->next;
	else if (uring->cancel_head == op)
		uring->cancel_head = op->next;
	else
		return;         /* not on the list */
	if (op->next != NULL)
		op->next->prev = op->prev;
	op->next = NULL;
	op->prev = NULL;
}


/* Converts a CQE result into the result the loop reports for op. */
static int loop_uring_result(const struct loop_op *op, int res)
{
	/* A timeout that fires completes with -ETIME. */
	if (op->kind == LOOP_OP_TIMEOUT && res == -ETIME)
		return 0;

	/* A poll completes with the mask of ready events, reported as 0. */
	if (op->kind == LOOP_OP_POLL && res > 0)
		return 0;

	/* A cancelled request that an io-wq worker was running is stopped by
	 * a signal to the worker, so it may complete with -EINTR instead. */
	if (op->cancelled && res == -EINTR)
		return -ECANCELED;
	return res;
}


/* Copies every available CQE onto the completed list and advances the CQ
 * head, which also lets the kernel flush CQEs it held back when the CQ was
 * full. Returns the number of ops completed. */
static int loop_uring_reap(struct loop *loop)
{
	struct loop_uring *uring = &loop->uring;
	struct io_uring_cqe *cqes[LOOP_URING_REAP_BATCH];
	int completed = 0;

	for (;;) {
		unsigned count;
		unsigned i;

		count = io_uring_peek_batch_cqe(&uring->ring, cqes,
						LOOP_URING_REAP_BATCH);
		if (count == 0)
			break;

		for (i = 0; i < count; i++) {
			uint64_t data = cqes[i]->user_data;
			struct loop_op *op;

			/* LIBURING_UDATA_TIMEOUT marks the timeouts liburing
			 * adds for waits on kernels before Linux 5.11. */
			if (data == LOOP_URING_CANCEL_DATA ||
			    data == LIBURING_UDATA_TIMEOUT)
				continue;

			op = (struct loop_op *)(uintptr_t)data;
			loop_uring_cancel_list_remove(uring, op);
			loop_push_completed(loop, op,
					    loop_uring_result(op, cqes[i]->res));
			completed++;
		}
		io_uring_cq_advance(&uring->ring, count);
	}
	return completed;
}


/* Returns a free SQE, submitting the queued ones first when the queue is
 * full. Returns NULL with *error set when the kernel takes no more. */
static struct io_uring_sqe *loop_uring_get_sqe(struct loop *loop, int *error)
{
	struct io_uring *ring = &loop->uring.ring;
	struct io_uring_sqe *sqe;
	int ret;

	sqe = io_uring_get_sqe(ring);
	if (sqe != NULL)
		return sqe;

	/* Submitting only queues work, so no callback runs here. */
	ret = io_uring_submit(ring);

	/* A kernel that holds back CQEs for a full CQ may reject
	 * submissions with -EBUSY until the CQ is reaped. Reaping only moves
	 * results to the completed list, so it is safe here too. */
	if (ret == -EBUSY) {
		loop_uring_reap(loop);
		ret = io_uring_submit(ring);
	}
	if (ret < 0) {
		*error = ret;
		return NULL;
	}

	sqe = io_uring_get_sqe(ring);
	if (sqe == NULL)
		*error = -EBUSY;
	return sqe;
}


int loop_uring_submit(struct loop *loop, struct loop_op *op)
{
	struct io_uring_sqe *sqe;
	int err = 0;

	sqe = loop_uring_get_sqe(loop, &err);
	if (sqe == NULL)
		return err;

	switch (op->kind) {
	case LOOP_OP_ACCEPT:
		io_uring_prep_accept(sqe, op->fd, NULL, NULL,
				     SOCK_CLOEXEC | SOCK_NONBLOCK);
		break;
	case LOOP_OP_RECV:
		io_uring_prep_recv(sqe, op->fd, op->buffer, op->length, 0);
		break;
	case LOOP_OP_SEND:
		io_uring_prep_send(sqe, op->fd, op->buffer, op->length,
				   MSG_NOSIGNAL);
		break;
	case LOOP_OP_POLL:
		io_uring_prep_poll_add(sqe, op->fd, POLLIN);
		break;
	case LOOP_OP_TIMEOUT:
		/* A relative timeout with count 0 fires only on its timer.
		 * The kernel reads the timespec when it issues the SQE, which
		 * is why it lives in the op and not on this stack. */
		io_uring_prep_timeout(sqe,
				      (struct __kernel_timespec *)op->timespec,
				      0, 0);
		break;
	case LOOP_OP_NONE:
	default:
		/* Give the SQE back to the kernel as a no-op. */
		io_uring_prep_nop(sqe);
		io_uring_sqe_set_data64(sqe, LOOP_URING_CANCEL_DATA);
		return -EINVAL;
	}

	io_uring_sqe_set_data(sqe, op);
	return 0;
}


/* Queues an IORING_OP_ASYNC_CANCEL for op. Returns false when no SQE was
 * free. */
static bool loop_uring_send_cancel(struct loop *loop, struct loop_op *op)
{
	struct io_uring_sqe *sqe;
	int err = 0;

	sqe = loop_uring_get_sqe(loop, &err);
	if (sqe == NULL)
		return false;

	io_uring_prep_cancel(sqe, op, 0);
	io_uring_sqe_set_data64(sqe, LOOP_URING_CANCEL_DATA);
	return true;
}


void loop_uring_cancel(struct loop *loop, struct loop_op *op)
{
	/* loop_cancel() returns nothing, so a cancel that cannot be queued
	 * now is kept and queued by the next poll. */
	if (!loop_uring_send_cancel(loop, op)) {
		loop_uring_cancel_list_add(&loop->uring, op);
		return;
	}

	/* Submitting now hands the cancel to the kernel before op's callback
	 * can run, so it cannot hit a resubmission of op or a later op at the
	 * same address. On failure the SQE stays queued for the next poll. */
	io_uring_submit(&loop->uring.ring);
}


/* Queues the cancel requests that found no free SQE earlier. The get_sqe
 * call may reap CQEs, which removes ops from the list, so the walk restarts
 * from the head after each request. */
static void loop_uring_flush_cancels(struct loop *loop)
{
	struct loop_uring *uring = &loop->uring;

	while (uring->cancel_head != NULL) {
		struct loop_op *op = uring->cancel_head;

		if (!loop_uring_send_cancel(loop, op))
			return;
		loop_uring_cancel_list_remove(uring, op);
	}
}


int loop_uring_poll(struct loop *loop, int timeout_ms)
{
	struct io_uring *ring = &loop->uring.ring;
	struct io_uring_cqe *cqe;
	int ret;

	loop_uring_flush_cancels(loop);

	if (timeout_ms == 0) {
		ret = io_uring_submit(ring);
	} else if (timeout_ms < 0) {
		ret = io_uring_submit_and_wait(ring, 1);
	} else {
		struct __kernel_timespec wait = {
			.tv_sec = timeout_ms / 1000,
			.tv_nsec = (long long)(timeout_ms % 1000) * LOOP_NS_PER_MS,
		};

		ret = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &wait,
						       NULL);
	}

	/* A signal interrupted the wait. The CQEs stay in the ring for the
	 * next poll. */
	if (ret == -EINTR)
		return -EINTR;

	/* -EBUSY and -EAGAIN mean the kernel took no new SQEs this time.
	 * Reaping makes room, and the SQEs stay queued for the next poll.
	 * The error is returned only when there is nothing to reap, so the
	 * caller does not spin. */
	if (ret == -EBUSY || ret == -EAGAIN) {
		if (loop_uring_reap(loop) == 0)
			return ret;
		return 0;
	}
	if (ret < 0 && ret != -ETIME)
		return ret;

	loop_uring_reap(loop);
	return 0;
}
