/*
 * arena.c - the broker's mapping of both segments: create, attach, close.
 *
 * A creator writes every header field and initializes the pool before it
 * sets the header's ready flag, so a creation that dies half-way leaves
 * segments that fail validation with SHM_ERR_TRUNCATED instead of segments
 * that look valid. An arena holds an exclusive flock on the control segment
 * for its lifetime: a second broker on the same instance gets -EBUSY, and
 * the kernel drops the lock when the holder dies, even by SIGKILL.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include "shm_internal.h"


/*
 * Give a new segment its size. fallocate reserves the memory now, so that a
 * full /dev/shm fails here with -ENOSPC instead of raising SIGBUS on a later
 * write. File systems without fallocate get ftruncate.
 */
static int segment_reserve(int fd, uint64_t bytes)
{
	if (fallocate(fd, 0, 0, (off_t)bytes) == 0)
		return 0;
	if (errno != EOPNOTSUPP && errno != ENOSYS)
		return -errno;
	if (ftruncate(fd, (off_t)bytes) < 0)
		return -errno;
	return 0;
}


static int lock_control(int fd)
{
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
		return 0;
	return errno == EWOULDBLOCK ? -EBUSY : -errno;
}


static int draw_instance_id(uint64_t *id)
{
	ssize_t n;

	do {
		n = getrandom(id, sizeof(*id), 0);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n == (ssize_t)sizeof(*id) ? 0 : -EIO;
}


/* Point the arena's fields into the mapped control segment. */
static int arena_bind(struct shm_arena *arena)
{
	uint8_t *ctl = arena->ctl_base;

	arena->ctl_header = arena->ctl_base;
	arena->pool = (struct shm_pool_sh *)(ctl + arena->layout.pool_off);
	arena->owner = (_Atomic uint64_t *)(ctl + arena->layout.owner_off);
	arena->free_stack = (uint32_t *)(ctl + arena->layout.free_off);
	arena->slots = ctl + arena->layout.slots_off;
	arena->scratch = calloc(arena->config.n_blocks, 1);
	return arena->scratch != NULL ? 0 : -ENOMEM;
}


static struct shm_arena *arena_new(const char *instance,
				   const struct shm_config *config)
{
	struct shm_arena *arena = calloc(1, sizeof(*arena));

	if (arena == NULL)
		return NULL;
	strncpy(arena->instance, instance, SHM_INSTANCE_MAX);
	arena->config = *config;
	arena->ctl_fd = -1;
	return arena;
}


void shm_arena_close(struct shm_arena *arena)
{
	if (arena == NULL)
		return;
	if (arena->kv.base != NULL)
		munmap(arena->kv.base, arena->kv.size);
	if (arena->ctl_base != NULL)
		munmap(arena->ctl_base, arena->ctl_size);
	if (arena->ctl_fd >= 0)
		close(arena->ctl_fd);
	free(arena->scratch);
	free(arena);
}


int shm_arena_create(const char *instance, const struct shm_config *config,
		     struct shm_arena **out)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	struct shm_header_sh *kv_header;
	struct shm_arena *arena;
	struct shm_layout layout;
	uint64_t instance_id;
	void *kv_base;
	int kv_fd, rc;

	if (config == NULL || out == NULL)
		return -EINVAL;
	rc = shm_segment_names(instance, kv_name, ctl_name);
	if (rc < 0)
		return rc;
	rc = shm_layout_compute(config, &layout);
	if (rc < 0)
		return rc;
	if (layout.kv_bytes > SIZE_MAX || layout.ctl_bytes > SIZE_MAX)
		return -ERANGE;
	rc = draw_instance_id(&instance_id);
	if (rc < 0)
		return rc;

	arena = arena_new(instance, config);
	if (arena == NULL)
		return -ENOMEM;
	arena->layout = layout;

	/* Control segment first: its lock marks the instance as taken. */
	arena->ctl_fd = shm_open(ctl_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (arena->ctl_fd < 0) {
		rc = -errno;
		goto err_free;
	}
	rc = lock_control(arena->ctl_fd);
	if (rc < 0)
		goto err_unlink_ctl;
	kv_fd = shm_open(kv_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (kv_fd < 0) {
		rc = -errno;
		goto err_unlink_ctl;
	}

	rc = segment_reserve(kv_fd, layout.kv_bytes);
	if (rc < 0)
		goto err_unlink_kv;
	rc = segment_reserve(arena->ctl_fd, layout.ctl_bytes);
	if (rc < 0)
		goto err_unlink_kv;
	kv_base = mmap(NULL, layout.kv_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
		       kv_fd, 0);
	if (kv_base == MAP_FAILED) {
		rc = -errno;
		goto err_unlink_kv;
	}
	arena->kv.base = kv_base;
	arena->kv.size = layout.kv_bytes;
	arena->ctl_base = mmap(NULL, layout.ctl_bytes, PROT_READ | PROT_WRITE,
			       MAP_SHARED, arena->ctl_fd, 0);
	if (arena->ctl_base == MAP_FAILED) {
		arena->ctl_base = NULL;
		rc = -errno;
		goto err_unlink_kv;
	}
	arena->ctl_size = layout.ctl_bytes;
	rc = arena_bind(arena);
	if (rc < 0)
		goto err_unlink_kv;

	/* Headers and pool; the new files are zero, so every slot is free. */
	kv_header = kv_base;
	shm_header_init(kv_header, SHM_MAGIC_KV, instance, instance_id, config, &layout);
	shm_header_init(arena->ctl_header, SHM_MAGIC_CTL, instance, instance_id,
			config, &layout);
	shm_kv_map_fill(&arena->kv, kv_base, layout.kv_bytes, kv_header);
	rc = shm_pool_init(arena);
	if (rc < 0)
		goto err_unlink_kv;

	/* Publish: a reader that sees ready == 1 sees everything above. */
	atomic_store_explicit(&kv_header->ready, 1, memory_order_release);
	atomic_store_explicit(&arena->ctl_header->ready, 1, memory_order_release);
	close(kv_fd);
	*out = arena;
	return 0;

err_unlink_kv:
	close(kv_fd);
	shm_unlink(kv_name);
err_unlink_ctl:
	shm_unlink(ctl_name);
err_free:
	shm_arena_close(arena);
	return rc;
}


int shm_arena_attach(const char *instance, const struct shm_config *expect,
		     struct shm_arena **out, struct shm_repair *report,
		     struct shm_mismatch *mismatch)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	struct shm_repair unused_report;
	struct shm_config ctl_found, kv_found;
	const struct shm_header_sh *kv_header;
	struct shm_arena *arena;
	void *kv_base;
	size_t kv_size;
	int rc;

	if (expect == NULL || out == NULL)
		return -EINVAL;
	rc = shm_segment_names(instance, kv_name, ctl_name);
	if (rc < 0)
		return rc;
	if (report == NULL)
		report = &unused_report;
	arena = arena_new(instance, expect);
	if (arena == NULL)
		return -ENOMEM;

	/* Control segment: map, lock, validate on its own, then against expect. */
	rc = shm_segment_map(ctl_name, O_RDWR, &arena->ctl_fd, &arena->ctl_base,
			     &arena->ctl_size, mismatch);
	if (rc < 0)
		goto err_close;
	rc = lock_control(arena->ctl_fd);
	if (rc < 0)
		goto err_close;
	rc = shm_header_check(arena->ctl_base, arena->ctl_size, SHM_MAGIC_CTL,
			      instance, &ctl_found, mismatch);
	if (rc < 0)
		goto err_close;
	rc = shm_header_expect(arena->ctl_base, expect, true, mismatch);
	if (rc < 0)
		goto err_close;

	/* KV segment: same checks, and it must come from the same creation. */
	rc = shm_segment_map(kv_name, O_RDWR, NULL, &kv_base, &kv_size, mismatch);
	if (rc < 0)
		goto err_close;
	arena->kv.base = kv_base;
	arena->kv.size = kv_size;
	kv_header = kv_base;
	rc = shm_header_check(kv_header, kv_size, SHM_MAGIC_KV, instance, &kv_found,
			      mismatch);
	if (rc < 0)
		goto err_close;
	rc = shm_header_expect(kv_header, expect, true, mismatch);
	if (rc < 0)
		goto err_close;
	if (kv_header->instance_id != ((struct shm_header_sh *)arena->ctl_base)->instance_id) {
		if (mismatch != NULL) {
			mismatch->field = "instance_id";
			mismatch->expected = ((struct shm_header_sh *)arena->ctl_base)->instance_id;
			mismatch->found = kv_header->instance_id;
		}
		rc = SHM_ERR_INSTANCE;
		goto err_close;
	}

	rc = shm_layout_compute(expect, &arena->layout);
	if (rc < 0)
		goto err_close;
	shm_kv_map_fill(&arena->kv, kv_base, kv_size, kv_header);
	rc = arena_bind(arena);
	if (rc < 0)
		goto err_close;

	rc = shm_recover(arena, true, report);
	if (rc < 0)
		goto err_close;
	atomic_store_explicit(&arena->ctl_header->owner_pid, (int32_t)getpid(),
			      memory_order_relaxed);
	*out = arena;
	return 0;

err_close:
	shm_arena_close(arena);
	return rc;
}


const struct shm_kv_map *shm_arena_kv(const struct shm_arena *arena)
{
	return &arena->kv;
}


const struct shm_config *shm_arena_config(const struct shm_arena *arena)
{
	return &arena->config;
}


int shm_arena_check(struct shm_arena *arena, struct shm_repair *report)
{
	if (arena == NULL || report == NULL)
		return -EINVAL;
	return shm_recover(arena, false, report);
}
