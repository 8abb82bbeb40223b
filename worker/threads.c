/*
 * Thread pool of the engine: nth - 1 helper threads plus the caller run one
 * task at a time. A task is published by bumping an epoch counter; helpers
 * spin on it for a short while (steps issue many small tasks back to back)
 * and then sleep on a futex, so an idle worker process costs no CPU.
 */
#include "worker/engine_internal.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Spin iterations before a helper sleeps; about 50 microseconds. */
#define SPIN_LIMIT 20000

struct engine_pool {
	int threads;
	pthread_t *helpers;
	engine_task task;
	void *arg;
	_Atomic uint32_t epoch;   /* bumped for each task; futex word */
	_Atomic int remaining;    /* helpers still running the task */
	_Atomic int sleepers;     /* helpers in futex_wait or about to be */
	_Atomic bool stopping;
};

struct helper_start {
	struct engine_pool *pool;
	int ith;
};


static void futex_wait(_Atomic uint32_t *word, uint32_t expected)
{
	syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected,
		NULL, NULL, 0);
}


static void futex_wake_all(_Atomic uint32_t *word)
{
	syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX,
		NULL, NULL, 0);
}


/*
 * Sleeps until the epoch differs from seen. The sleeper count is raised
 * before the futex re-reads the epoch, and the publisher bumps the epoch
 * before it reads the count (both sequentially consistent), so either the
 * publisher sees a sleeper and wakes it or the futex sees the new epoch.
 */
static void sleep_until_changed(struct engine_pool *pool, uint32_t seen)
{
	atomic_fetch_add(&pool->sleepers, 1);
	futex_wait(&pool->epoch, seen);
	atomic_fetch_sub(&pool->sleepers, 1);
}


static void *helper_main(void *start_arg)
{
	struct helper_start start = *(struct helper_start *)start_arg;
	struct engine_pool *pool = start.pool;
	uint32_t seen = 0;

	free(start_arg);
	for (;;) {
		uint32_t epoch;
		int spins = 0;

		/* Wait for a new task: spin first, then sleep. */
		while ((epoch = atomic_load_explicit(&pool->epoch,
						     memory_order_acquire)) == seen) {
			if (++spins < SPIN_LIMIT)
				__builtin_ia32_pause();
			else
				sleep_until_changed(pool, seen);
		}
		seen = epoch;
		if (atomic_load(&pool->stopping))
			return NULL;

		pool->task(pool->arg, start.ith, pool->threads);
		atomic_fetch_sub_explicit(&pool->remaining, 1,
					  memory_order_release);
	}
}


int engine_pool_create(int threads, struct engine_pool **out)
{
	struct engine_pool *pool;
	int started = 0;

	if (threads < 1)
		return -EINVAL;
	pool = calloc(1, sizeof(*pool));
	if (pool == NULL)
		return -ENOMEM;
	pool->threads = threads;
	pool->helpers = calloc((size_t)threads, sizeof(pthread_t));
	if (pool->helpers == NULL)
		goto err_free;

	for (started = 1; started < threads; started++) {
		struct helper_start *start = malloc(sizeof(*start));

		if (start == NULL)
			goto err_stop;
		*start = (struct helper_start){ .pool = pool, .ith = started };
		if (pthread_create(&pool->helpers[started], NULL, helper_main,
				   start) != 0) {
			free(start);
			goto err_stop;
		}
	}
	*out = pool;
	return 0;

err_stop:
	pool->threads = started;
	engine_pool_destroy(pool);
	return -EAGAIN;
err_free:
	free(pool);
	return -ENOMEM;
}


void engine_pool_destroy(struct engine_pool *pool)
{
	if (pool == NULL)
		return;
	atomic_store(&pool->stopping, true);
	atomic_fetch_add_explicit(&pool->epoch, 1, memory_order_release);
	futex_wake_all(&pool->epoch);
	for (int i = 1; i < pool->threads; i++)
		pthread_join(pool->helpers[i], NULL);
	free(pool->helpers);
	free(pool);
}


void engine_pool_run(struct engine_pool *pool, engine_task task, void *arg)
{
	if (pool->threads == 1) {
		task(arg, 0, 1);
		return;
	}

	pool->task = task;
	pool->arg = arg;
	atomic_store_explicit(&pool->remaining, pool->threads - 1,
			      memory_order_relaxed);
	atomic_fetch_add(&pool->epoch, 1);
	if (atomic_load(&pool->sleepers) > 0)
		futex_wake_all(&pool->epoch);

	task(arg, 0, pool->threads);

	while (atomic_load_explicit(&pool->remaining, memory_order_acquire) > 0)
		__builtin_ia32_pause();
}


int engine_pool_threads(const struct engine_pool *pool)
{
	return pool->threads;
}
