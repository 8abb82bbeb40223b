/*
 * epoll backend of the event loop, for kernels or containers without
 * io_uring. It offers the same completions as the io_uring backend by doing
 * the work itself. Each fd with pending ops is registered level-triggered
 * for the union of what its ops wait for (EPOLLIN for accept, recv and poll,
 * EPOLLOUT for send). When epoll reports the fd ready, the nonblocking
 * system call runs and the op completes with its result; -EAGAIN keeps the
 * op pending. Timeouts live in a list sorted by deadline that bounds the
 * epoll_wait() timeout.
 *
 * The registration is removed as soon as an fd's last op completes, before
 * that op's callback can run. A caller that closes the fd in the callback
 * therefore leaves no stale registration behind, which would otherwise keep
 * reporting events for a later fd with the same number.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker/loop_internal.h"

/* Events read per epoll_wait() call. */
#define LOOP_EPOLL_EVENTS 64


int loop_epoll_init(struct loop *loop)
{
	struct loop_epoll *epoll = &loop->epoll;

	memset(epoll, 0, sizeof(*epoll));
	epoll->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (epoll->epoll_fd < 0)
		return -errno;
	return 0;
}


void loop_epoll_close(struct loop *loop)
{
	close(loop->epoll.epoll_fd);
	free(loop->epoll.fds);
}


/* Grows the fd table to hold fd. Returns 0 or -ENOMEM. */
static int loop_epoll_reserve(struct loop_epoll *epoll, int fd)
{
	struct loop_epoll_fd *fds;
	size_t capacity;

	if (fd < epoll->fd_capacity)
		return 0;

	capacity = epoll->fd_capacity > 0 ? (size_t)epoll->fd_capacity : 64;
	while (capacity <= (size_t)fd)
		capacity *= 2;
	if (capacity > INT_MAX)
		capacity = INT_MAX;

	fds = realloc(epoll->fds, capacity * sizeof(*fds));
	if (fds == NULL)
		return -ENOMEM;
	memset(fds + epoll->fd_capacity, 0,
	       (capacity - (size_t)epoll->fd_capacity) * sizeof(*fds));
	epoll->fds = fds;
	epoll->fd_capacity = (int)capacity;
	return 0;
}


static void loop_epoll_fd_append(struct loop_epoll_fd *entry,
				 struct loop_op *op)
{
	op->next = NULL;
	op->prev = entry->tail;
	if (entry->tail != NULL)
		entry->tail->next = op;
	else
		entry->head = op;
	entry->tail = op;
}


static void loop_epoll_fd_remove(struct loop_epoll_fd *entry,
				 struct loop_op *op)
{
	if (op->prev != NULL)
		op->prev->next = op->next;
	else
		entry->head = op->next;
	if (op->next != NULL)
		op->next->prev = op->prev;
	else
		entry->tail = op->prev;
	op->next = NULL;
	op->prev = NULL;
}


/* Inserts a timeout after every timeout with the same or an earlier
 * deadline. The walk starts at the tail because new timeouts usually end
 * last. */
static void loop_epoll_timer_insert(struct loop_epoll *epoll,
				    struct loop_op *op)
{
	struct loop_op *before = epoll->timer_tail;

	while (before != NULL && before->deadline_ns > op->deadline_ns)
		before = before->prev;

	op->prev = before;
	op->next = before != NULL ? before->next : epoll->timer_head;
	if (op->next != NULL)
		op->next->prev = op;
	else
		epoll->timer_tail = op;
	if (before != NULL)
		before->next = op;
	else
		epoll->timer_head = op;
}


static void loop_epoll_timer_remove(struct loop_epoll *epoll,
				    struct loop_op *op)
{
	if (op->prev != NULL)
		op->prev->next = op->next;
	else
		epoll->timer_head = op->next;
	if (op->next != NULL)
		op->next->prev = op->prev;
	else
		epoll->timer_tail = op->prev;
	op->next = NULL;
	op->prev = NULL;
}


/* Brings fd's epoll registration in line with its pending ops by adding,
 * changing, or removing it when none are left. Returns 0 or a negative
 * errno value from epoll_ctl(). Removal always returns 0. */
static int loop_epoll_update(struct loop_epoll *epoll, int fd)
{
	struct loop_epoll_fd *entry = &epoll->fds[fd];
	struct epoll_event event;
	const struct loop_op *op;
	uint32_t interest = 0;
	int ret;

	for (op = entry->head; op != NULL; op = op->next)
		interest |= op->kind == LOOP_OP_SEND ? EPOLLOUT : EPOLLIN;
	if (interest == entry->events)
		return 0;

	if (interest == 0) {
		/* ENOENT or EBADF mean the caller closed the fd already,
		 * which removed the registration with it. */
		epoll_ctl(epoll->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
		entry->events = 0;
		return 0;
	}

	memset(&event, 0, sizeof(event));
	event.events = interest;
	event.data.fd = fd;

	/* The table and the kernel disagree when an fd was closed while
	 * registered, or removal failed, so each call falls back to the
	 * other. */
	if (entry->events == 0) {
		ret = epoll_ctl(epoll->epoll_fd, EPOLL_CTL_ADD, fd, &event);
		if (ret < 0 && errno == EEXIST)
			ret = epoll_ctl(epoll->epoll_fd, EPOLL_CTL_MOD, fd, &event);
	} else {
		ret = epoll_ctl(epoll->epoll_fd, EPOLL_CTL_MOD, fd, &event);
		if (ret < 0 && errno == ENOENT)
			ret = epoll_ctl(epoll->epoll_fd, EPOLL_CTL_ADD, fd, &event);
	}
	if (ret < 0)
		return -errno;

	entry->events = interest;
	return 0;
}


int loop_epoll_submit(struct loop *loop, struct loop_op *op)
{
	struct loop_epoll *epoll = &loop->epoll;
	struct loop_epoll_fd *entry;
	int err;

	if (op->kind == LOOP_OP_TIMEOUT) {
		loop_epoll_timer_insert(epoll, op);
		return 0;
	}

	err = loop_epoll_reserve(epoll, op->fd);
	if (err < 0)
		return err;

	/* The op joins the fd's list before the update so the registration
	 * includes it, and leaves again when the kernel rejects the fd (a
	 * regular file, say, or a closed fd). */
	entry = &epoll->fds[op->fd];
	loop_epoll_fd_append(entry, op);
	err = loop_epoll_update(epoll, op->fd);
	if (err < 0) {
		loop_epoll_fd_remove(entry, op);
		return err;
	}
	return 0;
}


void loop_epoll_cancel(struct loop *loop, struct loop_op *op)
{
	struct loop_epoll *epoll = &loop->epoll;

	if (op->kind == LOOP_OP_TIMEOUT) {
		loop_epoll_timer_remove(epoll, op);
	} else {
		loop_epoll_fd_remove(&epoll->fds[op->fd], op);

		/* The result is ignored because a cancel cannot report it, and
		 * a registration left wider than needed only costs spurious
		 * wakeups. */
		loop_epoll_update(epoll, op->fd);
	}

	/* The callback runs from the next loop_run(), as for any other
	 * completion. */
	loop_push_completed(loop, op, -ECANCELED);
}


/* Runs the nonblocking system call for op. Returns its result, or -EAGAIN
 * when the fd is not ready after all. */
static int loop_epoll_try(struct loop_op *op)
{
	ssize_t ret;

	do {
		switch (op->kind) {
		case LOOP_OP_ACCEPT:
			ret = accept4(op->fd, NULL, NULL,
				      SOCK_CLOEXEC | SOCK_NONBLOCK);
			break;
		case LOOP_OP_RECV:
			ret = recv(op->fd, op->buffer, op->length, MSG_DONTWAIT);
			break;
		case LOOP_OP_SEND:
			ret = send(op->fd, op->buffer, op->length,
				   MSG_NOSIGNAL | MSG_DONTWAIT);
			break;
		case LOOP_OP_POLL:
			return 0;
		default:
			return -EINVAL;
		}
	} while (ret < 0 && errno == EINTR);

	if (ret < 0)
		return errno == EWOULDBLOCK ? -EAGAIN : -errno;
	return (int)ret;
}


/* Completes the ops on fd that the reported events let finish, in
 * submission order per direction. */
static void loop_epoll_dispatch(struct loop *loop, int fd, uint32_t events)
{
	struct loop_epoll *epoll = &loop->epoll;
	struct loop_epoll_fd *entry;
	struct loop_op *op;
	struct loop_op *next;
	bool readable;
	bool writable;

	if (fd < 0 || fd >= epoll->fd_capacity)
		return;
	entry = &epoll->fds[fd];

	/* An error or hangup lets every op run its system call, which then
	 * reports the error or end of stream. */
	readable = events & (EPOLLIN | EPOLLERR | EPOLLHUP);
	writable = events & (EPOLLOUT | EPOLLERR | EPOLLHUP);

	for (op = entry->head; op != NULL; op = next) {
		bool is_send = op->kind == LOOP_OP_SEND;
		int result;

		next = op->next;
		if (is_send ? !writable : !readable)
			continue;

		/* After one -EAGAIN the later ops in the same direction wait
		 * too, so they keep their order. A poll consumes nothing, so
		 * it never stops the others. */
		result = loop_epoll_try(op);
		if (result == -EAGAIN) {
			if (is_send)
				writable = false;
			else if (op->kind != LOOP_OP_POLL)
				readable = false;
			continue;
		}

		loop_epoll_fd_remove(entry, op);
		loop_push_completed(loop, op, result);
	}

	/* NOTE: a failed change of interest (epoll_ctl() out of memory)
	 * keeps the old, wider registration, which costs spurious wakeups
	 * until the next update succeeds. */
	loop_epoll_update(epoll, fd);
}


/* Completes every timeout whose deadline has passed. */
static void loop_epoll_expire_timers(struct loop *loop)
{
	struct loop_epoll *epoll = &loop->epoll;
	uint64_t now = loop_now_ns();

	while (epoll->timer_head != NULL &&
	       epoll->timer_head->deadline_ns <= now) {
		struct loop_op *op = epoll->timer_head;

		loop_epoll_timer_remove(epoll, op);
		loop_push_completed(loop, op, 0);
	}
}


/* Shortens timeout_ms to the first timer's deadline, rounded up to whole
 * milliseconds so that a timer never looks due early. */
static int loop_epoll_wait_ms(const struct loop_epoll *epoll, int timeout_ms)
{
	uint64_t now;
	uint64_t remaining_ms;

	if (epoll->timer_head == NULL || timeout_ms == 0)
		return timeout_ms;

	now = loop_now_ns();
	if (epoll->timer_head->deadline_ns <= now)
		return 0;

	remaining_ms = (epoll->timer_head->deadline_ns - now + LOOP_NS_PER_MS - 1) /
		       LOOP_NS_PER_MS;
	if (remaining_ms > INT_MAX)
		remaining_ms = INT_MAX;
	if (timeout_ms < 0 || remaining_ms < (uint64_t)timeout_ms)
		return (int)remaining_ms;
	return timeout_ms;
}


int loop_epoll_poll(struct loop *loop, int timeout_ms)
{
	struct loop_epoll *epoll = &loop->epoll;
	struct epoll_event events[LOOP_EPOLL_EVENTS];
	int count;
	int i;

	count = epoll_wait(epoll->epoll_fd, events, LOOP_EPOLL_EVENTS,
			   loop_epoll_wait_ms(epoll, timeout_ms));
	if (count < 0)
		return -errno;

	for (i = 0; i < count; i++)
		loop_epoll_dispatch(loop, events[i].data.fd, events[i].events);

	loop_epoll_expire_timers(loop);
	return 0;
}
