/*
 * test_shm.c - tests of the shm module: segments, block pool, session table,
 * crash recovery.
 *
 * Every test creates its own instances, named after its pid, and the fini
 * hook unlinks them, so no segment stays in /dev/shm after a failed assert.
 * Helper processes are forked children that report through their exit
 * status and never call Criterion asserts. Some tests include the internal
 * header to corrupt a header field or leave a slot half-closed on purpose.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../shm/shm.h"
#include "../shm/shm_internal.h"

#define MAX_TEST_INSTANCES 8

static char instances[MAX_TEST_INSTANCES][SHM_INSTANCE_MAX + 1];
static int n_instances;


/* Return a fresh instance name, registered for removal by the fini hook. */
static const char *new_instance(void)
{
	char *name;

	cr_assert_lt(n_instances, MAX_TEST_INSTANCES);
	name = instances[n_instances++];
	snprintf(name, SHM_INSTANCE_MAX + 1, "test-%d-%d", (int)getpid(), n_instances);
	return name;
}


static void remove_instances(void)
{
	for (int i = 0; i < n_instances; i++)
		shm_segments_unlink(instances[i]);
	n_instances = 0;
}


TestSuite(shm, .fini = remove_instances, .timeout = 30);


/* 2 layers, 2 KV heads of 8 floats, 16 positions per block: 4096-byte blocks. */
static struct shm_config small_config(void)
{
	struct shm_config config = {
		.shape = {
			.n_layers = 2,
			.n_kv_heads = 2,
			.head_size = 8,
			.kv_type = SHM_KV_F32,
			.max_context = 256,
		},
		.block_tokens = 16,
		.n_blocks = 64,
		.max_sessions = 8,
	};
	return config;
}


static struct shm_arena *create_arena(const char *instance,
				      const struct shm_config *config)
{
	struct shm_arena *arena = NULL;
	int rc = shm_arena_create(instance, config, &arena);

	cr_assert_eq(rc, 0, "shm_arena_create: %s", shm_strerror(rc));
	cr_assert_not_null(arena);
	return arena;
}


static struct shm_arena *attach_arena(const char *instance,
				      const struct shm_config *config,
				      struct shm_repair *report)
{
	struct shm_mismatch mismatch = { 0 };
	struct shm_arena *arena = NULL;
	int rc = shm_arena_attach(instance, config, &arena, report, &mismatch);

	cr_assert_eq(rc, 0, "shm_arena_attach: %s (field %s)", shm_strerror(rc),
		     mismatch.field ? mismatch.field : "-");
	return arena;
}


/* Wait for a child and return its exit status, or -1 if it did not exit. */
static int wait_child(pid_t pid)
{
	int status;

	if (waitpid(pid, &status, 0) != pid)
		return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}


static void sleep_us(long us)
{
	struct timespec ts = { .tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000 };

	nanosleep(&ts, NULL);
}


/* Segments */

Test(shm, segment_create_open_from_child)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	const struct shm_kv_map *kv = shm_arena_kv(arena);
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX], path[128];
	struct stat st;
	pid_t pid;

	/* Names and permissions. */
	cr_assert_eq(shm_segment_names(instance, kv_name, ctl_name), 0);
	snprintf(path, sizeof(path), "/dev/shm%s", kv_name);
	cr_assert_eq(stat(path, &st), 0, "missing %s", path);
	cr_assert_eq(st.st_mode & 0777, 0600);
	snprintf(path, sizeof(path), "/dev/shm%s", ctl_name);
	cr_assert_eq(stat(path, &st), 0, "missing %s", path);
	cr_assert_eq(st.st_mode & 0777, 0600);

	cr_assert_eq(kv->n_blocks, 64);
	cr_assert_eq(kv->block_bytes, 4096);
	cr_assert_eq((uintptr_t)kv->blocks % 64, 0);

	pid = fork();
	cr_assert_neq(pid, -1);
	if (pid == 0) {
		struct shm_kv_map child_kv;
		struct shm_segment_info info;
		struct shm_arena *second = NULL;

		if (shm_kv_open(instance, &config.shape, config.block_tokens,
				&child_kv, NULL) != 0)
			_exit(1);
		if (child_kv.n_blocks != 64 || child_kv.block_bytes != 4096)
			_exit(2);
		memset(shm_kv_block(&child_kv, 3), 0xab, child_kv.block_bytes);
		shm_kv_close(&child_kv);

		if (shm_arena_describe(instance, &info, NULL) != 0)
			_exit(3);
		if (shm_config_compare(&config, &info.config, NULL, 0) != 0)
			_exit(4);

		/* The creator still has the arena attached, so a second broker is rejected. */
		if (shm_arena_attach(instance, &config, &second, NULL, NULL) != -EBUSY)
			_exit(5);
		_exit(0);
	}
	cr_assert_eq(wait_child(pid), 0);

	/* The child's write is visible through the creator's mapping. */
	for (uint64_t i = 0; i < kv->block_bytes; i++)
		cr_assert_eq(((uint8_t *)shm_kv_block(kv, 3))[i], 0xab);
	cr_assert_eq(((uint8_t *)shm_kv_block(kv, 2))[0], 0);
	shm_arena_close(arena);
}


Test(shm, segment_create_twice_rejected)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_arena *second = NULL;

	cr_assert_eq(shm_arena_create(instance, &config, &second), -EEXIST);
	cr_assert_null(second);
	shm_arena_close(arena);
}


Test(shm, instance_name_validation)
{
	const char *valid[] = { "a", "main", "node-1_test.2", "A.B" };
	const char *invalid[] = { "", "a/b", "a b", "ä", "x\n", "semi;colon", "star*" };
	char long_name[SHM_INSTANCE_MAX + 2];
	struct shm_config config = small_config();
	struct shm_arena *arena = NULL;

	for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++)
		cr_assert_eq(shm_instance_name_valid(valid[i]), 0, "%s", valid[i]);
	for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++)
		cr_assert_eq(shm_instance_name_valid(invalid[i]), -EINVAL, "%s", invalid[i]);
	cr_assert_eq(shm_instance_name_valid(NULL), -EINVAL);

	memset(long_name, 'x', sizeof(long_name));
	long_name[SHM_INSTANCE_MAX] = '\0';
	cr_assert_eq(shm_instance_name_valid(long_name), 0);
	long_name[SHM_INSTANCE_MAX] = 'x';
	long_name[SHM_INSTANCE_MAX + 1] = '\0';
	cr_assert_eq(shm_instance_name_valid(long_name), -EINVAL);

	cr_assert_eq(shm_arena_create("bad/name", &config, &arena), -EINVAL);
	cr_assert_eq(shm_segments_unlink("bad name"), -EINVAL);
}


Test(shm, invalid_config_rejected)
{
	const char *instance = new_instance();
	struct shm_arena *arena = NULL;
	struct shm_config config;

	config = small_config();
	config.shape.kv_type = 7;
	cr_assert_eq(shm_arena_create(instance, &config, &arena), -EINVAL);
	config = small_config();
	config.n_blocks = 0;
	cr_assert_eq(shm_arena_create(instance, &config, &arena), -EINVAL);
	config = small_config();
	config.max_sessions = 0;
	cr_assert_eq(shm_arena_create(instance, &config, &arena), -EINVAL);
	config = small_config();
	config.block_tokens = 0;
	cr_assert_eq(shm_arena_create(instance, &config, &arena), -EINVAL);
	cr_assert_eq(shm_segments_unlink(instance), -ENOENT);
}


/* Map a segment of an instance read-write for corrupting its header. */
static void *map_segment(const char *instance, bool kv, size_t *size)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	struct stat st;
	void *base;
	int fd;

	cr_assert_eq(shm_segment_names(instance, kv_name, ctl_name), 0);
	fd = shm_open(kv ? kv_name : ctl_name, O_RDWR, 0);
	cr_assert_geq(fd, 0);
	cr_assert_eq(fstat(fd, &st), 0);
	base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	cr_assert_neq(base, MAP_FAILED);
	close(fd);
	*size = (size_t)st.st_size;
	return base;
}


static int attach_error(const char *instance, const struct shm_config *config,
			struct shm_mismatch *mismatch)
{
	struct shm_arena *arena = NULL;
	int rc;

	memset(mismatch, 0, sizeof(*mismatch));
	rc = shm_arena_attach(instance, config, &arena, NULL, mismatch);
	if (rc == 0)
		shm_arena_close(arena);
	return rc;
}


Test(shm, header_shape_and_size_mismatch)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_config other;
	struct shm_mismatch mismatch;
	struct shm_kv_map kv;

	shm_arena_close(create_arena(instance, &config));

	other = config;
	other.shape.n_layers = 3;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SHAPE);
	cr_assert_str_eq(mismatch.field, "n_layers");
	cr_assert_eq(mismatch.expected, 3);
	cr_assert_eq(mismatch.found, 2);

	other = config;
	other.shape.kv_type = SHM_KV_F16;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SHAPE);
	cr_assert_str_eq(mismatch.field, "kv_type");

	other = config;
	other.shape.max_context = 512;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SHAPE);
	cr_assert_str_eq(mismatch.field, "max_context");

	other = config;
	other.n_blocks = 32;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SIZE);
	cr_assert_str_eq(mismatch.field, "n_blocks");
	cr_assert_eq(mismatch.expected, 32);
	cr_assert_eq(mismatch.found, 64);

	other = config;
	other.max_sessions = 9;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SIZE);
	cr_assert_str_eq(mismatch.field, "max_sessions");

	other = config;
	other.block_tokens = 32;
	cr_assert_eq(attach_error(instance, &other, &mismatch), SHM_ERR_SIZE);
	cr_assert_str_eq(mismatch.field, "block_tokens");

	/* A worker's KV-only open checks the shape too. */
	other = config;
	other.shape.head_size = 16;
	cr_assert_eq(shm_kv_open(instance, &other.shape, other.block_tokens, &kv,
				 &mismatch), SHM_ERR_SHAPE);
	cr_assert_str_eq(mismatch.field, "head_size");

	cr_assert_eq(attach_error(instance, &config, &mismatch), 0);
}


Test(shm, header_corruption_errors)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_header_sh *ctl, *kv;
	struct shm_mismatch mismatch;
	size_t ctl_size, kv_size;
	uint64_t saved;

	shm_arena_close(create_arena(instance, &config));
	ctl = map_segment(instance, false, &ctl_size);
	kv = map_segment(instance, true, &kv_size);

	saved = ctl->magic;
	ctl->magic = 0x1234;
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_MAGIC);
	cr_assert_str_eq(mismatch.field, "magic");
	cr_assert_eq(mismatch.found, 0x1234);
	ctl->magic = saved;

	/* A KV segment in place of a control segment has the wrong magic too. */
	kv->magic = SHM_MAGIC_CTL;
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_MAGIC);
	kv->magic = SHM_MAGIC_KV;

	kv->layout_version = SHM_LAYOUT_VERSION + 1;
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_VERSION);
	cr_assert_str_eq(mismatch.field, "layout_version");
	cr_assert_eq(mismatch.expected, SHM_LAYOUT_VERSION);
	cr_assert_eq(mismatch.found, SHM_LAYOUT_VERSION + 1);
	kv->layout_version = SHM_LAYOUT_VERSION;

	/* A creation that did not finish reads as truncated. */
	atomic_store(&ctl->ready, 0);
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_TRUNCATED);
	cr_assert_str_eq(mismatch.field, "ready");
	atomic_store(&ctl->ready, 1);

	saved = kv->instance_id;
	kv->instance_id ^= 1;
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_INSTANCE);
	cr_assert_str_eq(mismatch.field, "instance_id");
	kv->instance_id = saved;

	saved = kv->block_stride;
	kv->block_stride += 64;
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_SIZE);
	cr_assert_str_eq(mismatch.field, "block_stride");
	kv->block_stride = saved;

	cr_assert_eq(attach_error(instance, &config, &mismatch), 0);
	munmap(ctl, ctl_size);
	munmap(kv, kv_size);
}


Test(shm, header_truncated_segment)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	struct shm_mismatch mismatch;
	struct stat st;
	int fd;

	shm_arena_close(create_arena(instance, &config));
	cr_assert_eq(shm_segment_names(instance, kv_name, ctl_name), 0);
	fd = shm_open(kv_name, O_RDWR, 0);
	cr_assert_geq(fd, 0);
	cr_assert_eq(fstat(fd, &st), 0);

	cr_assert_eq(ftruncate(fd, st.st_size - 4096), 0);
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_TRUNCATED);
	cr_assert_str_eq(mismatch.field, "file_size");
	cr_assert_eq(mismatch.expected, (uint64_t)st.st_size);
	cr_assert_eq(mismatch.found, (uint64_t)st.st_size - 4096);

	cr_assert_eq(ftruncate(fd, 100), 0);
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_TRUNCATED);
	cr_assert_eq(mismatch.found, 100);

	cr_assert_eq(ftruncate(fd, 0), 0);
	cr_assert_eq(attach_error(instance, &config, &mismatch), SHM_ERR_TRUNCATED);
	close(fd);
}


Test(shm, attach_missing_segment)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_segment_info info;
	struct shm_mismatch mismatch;
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];

	cr_assert_eq(attach_error(instance, &config, &mismatch), -ENOENT);
	cr_assert_eq(shm_arena_describe(instance, &info, NULL), -ENOENT);

	shm_arena_close(create_arena(instance, &config));
	cr_assert_eq(shm_segment_names(instance, kv_name, ctl_name), 0);
	cr_assert_eq(shm_unlink(kv_name), 0);
	cr_assert_eq(attach_error(instance, &config, &mismatch), -ENOENT);
}


Test(shm, describe_reports_config)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_config restarted = config;
	struct shm_segment_info info;
	struct shm_mismatch diffs[8];
	int64_t before = 0, after;
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	before = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
	shm_arena_close(create_arena(instance, &config));
	clock_gettime(CLOCK_REALTIME, &ts);
	after = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;

	cr_assert_eq(shm_arena_describe(instance, &info, NULL), 0);
	cr_assert_eq(shm_config_compare(&config, &info.config, NULL, 0), 0);
	cr_assert_eq(info.owner_pid, getpid());
	cr_assert_eq(info.layout_version, SHM_LAYOUT_VERSION);
	cr_assert_geq(info.created_ns, before);
	cr_assert_leq(info.created_ns, after);
	cr_assert_eq(info.block_bytes, 4096);
	cr_assert_eq(info.block_stride, 4096);
	cr_assert_eq(info.kv_bytes, 4096 + 64 * 4096);
	cr_assert_gt(info.ctl_bytes, 0);

	/* A broker restarted with another configuration can list what differs. */
	restarted.shape.n_layers = 4;
	restarted.n_blocks = 128;
	cr_assert_eq(shm_config_compare(&restarted, &info.config, diffs, 8), 2);
	cr_assert_str_eq(diffs[0].field, "n_layers");
	cr_assert_eq(diffs[0].expected, 4);
	cr_assert_eq(diffs[0].found, 2);
	cr_assert_str_eq(diffs[1].field, "n_blocks");
	cr_assert_eq(diffs[1].expected, 128);
	cr_assert_eq(diffs[1].found, 64);
	cr_assert_eq(shm_config_compare(&restarted, &info.config, diffs, 1), 2);
}


Test(shm, segments_unlink)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_segment_info info;

	cr_assert_eq(shm_segments_unlink(instance), 0);
	cr_assert_eq(shm_arena_describe(instance, &info, NULL), -ENOENT);
	cr_assert_eq(shm_segments_unlink(instance), -ENOENT);

	/* The mapping stays usable after unlink. */
	memset(shm_kv_block(shm_arena_kv(arena), 0), 1, 4096);
	shm_arena_close(arena);
}


/* Block pool */

Test(shm, block_bytes_and_alignment)
{
	struct shm_shape shape = { 2, 2, 8, SHM_KV_F32, 256 };
	struct shm_shape odd = { 1, 1, 3, SHM_KV_F16, 64 };
	struct shm_config config = small_config();
	const char *instance = new_instance();
	const struct shm_kv_map *kv;
	struct shm_arena *arena;

	cr_assert_eq(shm_block_bytes(&shape, 16), 2 * 2 * 16 * 2 * 8 * 4);
	shape.kv_type = SHM_KV_F16;
	cr_assert_eq(shm_block_bytes(&shape, 16), 2 * 2 * 16 * 2 * 8 * 2);
	cr_assert_eq(shm_block_bytes(&odd, 1), 12);
	cr_assert_eq(shm_block_bytes(&shape, 0), 0);
	shape.kv_type = 2;
	cr_assert_eq(shm_block_bytes(&shape, 16), 0);
	shape = (struct shm_shape){ UINT32_MAX, UINT32_MAX, UINT32_MAX, SHM_KV_F32, 1 };
	cr_assert_eq(shm_block_bytes(&shape, UINT32_MAX), 0);

	/* 12-byte blocks are placed 64 bytes apart. */
	config.shape = odd;
	config.block_tokens = 1;
	arena = create_arena(instance, &config);
	kv = shm_arena_kv(arena);
	cr_assert_eq(kv->block_bytes, 12);
	cr_assert_eq(kv->block_stride, 64);
	for (uint32_t b = 0; b < kv->n_blocks; b++)
		cr_assert_eq((uintptr_t)shm_kv_block(kv, b) % 64, 0, "block %u", b);
	shm_arena_close(arena);
}


static void assert_stats(struct shm_arena *arena, uint64_t in_use,
			 uint64_t high_water, uint64_t rents, uint64_t returns,
			 uint64_t failed)
{
	struct shm_pool_stats stats;

	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_total, 64);
	cr_assert_eq(stats.blocks_in_use, in_use);
	cr_assert_eq(stats.high_water, high_water);
	cr_assert_eq(stats.rents, rents);
	cr_assert_eq(stats.returns, returns);
	cr_assert_eq(stats.failed_rents, failed);
}


Test(shm, pool_rent_until_exhausted)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_shape other = config.shape;
	uint32_t blocks[64], extra;
	bool seen[64] = { false };
	struct shm_repair report;

	assert_stats(arena, 0, 0, 0, 0, 0);
	for (int i = 0; i < 64; i++) {
		cr_assert_eq(shm_pool_rent(arena, &config.shape, NULL, &blocks[i]), 0);
		cr_assert_lt(blocks[i], 64);
		cr_assert_not(seen[blocks[i]], "block %u rented twice", blocks[i]);
		seen[blocks[i]] = true;
	}
	cr_assert_eq(shm_pool_rent(arena, &config.shape, NULL, &extra), -ENOSPC);
	cr_assert_eq(shm_pool_rent(arena, &config.shape, NULL, &extra), -ENOSPC);
	assert_stats(arena, 64, 64, 64, 0, 2);

	for (int i = 0; i < 64; i++)
		cr_assert_eq(shm_pool_return(arena, blocks[i]), 0);
	assert_stats(arena, 0, 64, 64, 64, 2);

	/* Returning twice or out of range is rejected and changes nothing. */
	cr_assert_eq(shm_pool_return(arena, blocks[0]), -EINVAL);
	cr_assert_eq(shm_pool_return(arena, 64), -EINVAL);
	assert_stats(arena, 0, 64, 64, 64, 2);

	for (int i = 0; i < 64; i++)
		cr_assert_eq(shm_pool_rent(arena, &config.shape, NULL, &blocks[i]), 0);
	assert_stats(arena, 64, 64, 128, 64, 2);
	for (int i = 0; i < 10; i++)
		cr_assert_eq(shm_pool_return(arena, blocks[i]), 0);
	assert_stats(arena, 54, 64, 128, 74, 2);

	/* A shape the pool was not made for is rejected before anything else. */
	other.n_kv_heads = 4;
	cr_assert_eq(shm_pool_rent(arena, &other, NULL, &extra), SHM_ERR_SHAPE);
	assert_stats(arena, 54, 64, 128, 74, 2);

	cr_assert_eq(shm_arena_check(arena, &report), 0);
	cr_assert_eq(report.free_list_fixed, 0);
	cr_assert_eq(report.blocks_owner_fixed, 0);
	cr_assert_eq(report.blocks_uncommitted, 54);
	shm_arena_close(arena);
}


Test(shm, size_parser_cases)
{
	const struct {
		const char *text;
		int rc;
		uint64_t bytes;
	} cases[] = {
		{ "1048576", 0, 1048576 },
		{ "1", 0, 1 },
		{ "64K", 0, 64 * 1024 },
		{ "64k", 0, 64 * 1024 },
		{ "512M", 0, UINT64_C(512) << 20 },
		{ "1G", 0, UINT64_C(1) << 30 },
		{ "16g", 0, UINT64_C(16) << 30 },
		{ "18446744073709551615", 0, UINT64_MAX },
		{ "18446744073709551616", -ERANGE, 0 },
		{ "17179869184G", -ERANGE, 0 },
		{ "", -EINVAL, 0 },
		{ "0", -EINVAL, 0 },
		{ "0K", -EINVAL, 0 },
		{ "K", -EINVAL, 0 },
		{ "-1", -EINVAL, 0 },
		{ "+1", -EINVAL, 0 },
		{ " 1", -EINVAL, 0 },
		{ "1 ", -EINVAL, 0 },
		{ "1KB", -EINVAL, 0 },
		{ "1T", -EINVAL, 0 },
		{ "1.5G", -EINVAL, 0 },
		{ "0x10", -EINVAL, 0 },
		{ "12abc", -EINVAL, 0 },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t bytes = 0;
		int rc = shm_parse_size(cases[i].text, &bytes);

		cr_assert_eq(rc, cases[i].rc, "\"%s\": rc %d", cases[i].text, rc);
		if (rc == 0)
			cr_assert_eq(bytes, cases[i].bytes, "\"%s\"", cases[i].text);
	}
	cr_assert_eq(shm_parse_size(NULL, NULL), -EINVAL);
}


Test(shm, budget_rounds_down)
{
	struct shm_shape shape = { 2, 2, 8, SHM_KV_F32, 256 };
	struct shm_shape odd = { 1, 1, 3, SHM_KV_F16, 64 };
	uint64_t unused = 1;
	uint32_t n = 0;

	cr_assert_eq(shm_budget_blocks(UINT64_C(1) << 20, &shape, 16, &n, &unused), 0);
	cr_assert_eq(n, 256);
	cr_assert_eq(unused, 0);

	cr_assert_eq(shm_budget_blocks(10000, &shape, 16, &n, &unused), 0);
	cr_assert_eq(n, 2);
	cr_assert_eq(unused, 10000 - 2 * 4096);

	/* Odd block sizes are counted with their 64-byte stride. */
	cr_assert_eq(shm_budget_blocks(1000, &odd, 1, &n, &unused), 0);
	cr_assert_eq(n, 15);
	cr_assert_eq(unused, 1000 - 15 * 64);

	cr_assert_eq(shm_budget_blocks(4095, &shape, 16, &n, &unused), -EINVAL);
	cr_assert_eq(shm_budget_blocks(0, &shape, 16, &n, &unused), -EINVAL);
	cr_assert_eq(shm_budget_blocks(UINT64_MAX, &odd, 1, &n, &unused), -ERANGE);
	cr_assert_eq(shm_budget_blocks(1 << 20, &shape, 0, &n, &unused), -EINVAL);
}


/* Session table */

static const struct shm_session_params default_params = { 0, SHM_CONTEXT_ERROR, 0, 42 };


Test(shm, handle_round_trip)
{
	struct shm_handle handle = { 7, 0x12345678, UINT64_C(0xdeadbeef00c0ffee) };
	struct shm_handle parsed;
	char text[SHM_HANDLE_STRLEN];

	cr_assert_eq(shm_handle_format(&handle, text, sizeof(text)), 0);
	cr_assert_str_eq(text, "s0000000712345678deadbeef00c0ffee");
	cr_assert_eq(shm_handle_parse(text, &parsed), 0);
	cr_assert_eq(parsed.slot, 7);
	cr_assert_eq(parsed.generation, 0x12345678);
	cr_assert_eq(parsed.secret, UINT64_C(0xdeadbeef00c0ffee));
	cr_assert_eq(shm_handle_format(&handle, text, SHM_HANDLE_STRLEN - 1), -ENOSPC);
}


Test(shm, handle_malformed_rejected)
{
	const char *malformed[] = {
		"",
		"s",
		"s0000000712345678deadbeef00c0ffe",   /* one digit short */
		"s0000000712345678deadbeef00c0ffee0", /* one digit long */
		"t0000000712345678deadbeef00c0ffee",  /* wrong prefix */
		"S0000000712345678deadbeef00c0ffee",
		"s0000000712345678DEADBEEF00C0FFEE",  /* uppercase */
		"s00000007123456780xadbeef00c0ffee",
		"s0000000712345678deadbeef00c0ffe ",
		" s0000000712345678deadbeef00c0ffe",
		"s-000000712345678deadbeef00c0ffee",
		"0000000712345678deadbeef00c0ffee0",
	};
	struct shm_handle parsed;

	for (size_t i = 0; i < sizeof(malformed) / sizeof(malformed[0]); i++)
		cr_assert_eq(shm_handle_parse(malformed[i], &parsed), -EINVAL,
			     "\"%s\" accepted", malformed[i]);
	cr_assert_eq(shm_handle_parse(NULL, &parsed), -EINVAL);
}


Test(shm, handle_lookup_rejects_mismatch)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_handle handle, wrong, reopened;
	struct shm_session_info info;
	char text[SHM_HANDLE_STRLEN];

	cr_assert_eq(shm_session_open(arena, &default_params, &handle), 0);
	cr_assert_neq(handle.secret, 0);
	cr_assert_eq(shm_session_lookup(arena, &handle), 0);

	/* The formatted handle resolves to the same session. */
	cr_assert_eq(shm_handle_format(&handle, text, sizeof(text)), 0);
	cr_assert_eq(shm_handle_parse(text, &wrong), 0);
	cr_assert_eq(shm_session_lookup(arena, &wrong), 0);

	wrong = handle;
	wrong.secret ^= 1;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	wrong = handle;
	wrong.secret ^= UINT64_C(1) << 63;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	wrong = handle;
	wrong.generation++;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	wrong = handle;
	wrong.slot = config.max_sessions;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	wrong.slot = UINT32_MAX;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	wrong = handle;
	wrong.slot = handle.slot + 1;
	cr_assert_eq(shm_session_lookup(arena, &wrong), -ENOENT);
	cr_assert_eq(shm_session_get(arena, &wrong, &info), -ENOENT);
	cr_assert_eq(shm_session_touch(arena, &wrong), -ENOENT);

	/* A closed session's handle stays rejected after its slot is reused. */
	cr_assert_eq(shm_session_close(arena, &handle), 0);
	cr_assert_eq(shm_session_lookup(arena, &handle), -ENOENT);
	cr_assert_eq(shm_session_close(arena, &handle), -ENOENT);
	cr_assert_eq(shm_session_open(arena, &default_params, &reopened), 0);
	cr_assert_eq(reopened.slot, handle.slot);
	cr_assert_eq(reopened.generation, handle.generation + 1);
	cr_assert_eq(shm_session_lookup(arena, &handle), -ENOENT);
	cr_assert_eq(shm_session_lookup(arena, &reopened), 0);
	shm_arena_close(arena);
}


Test(shm, session_open_limits)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_session_params params = default_params;
	struct shm_handle handles[8], extra;
	struct shm_session_info info;

	params.context_limit = 257;
	cr_assert_eq(shm_session_open(arena, &params, &extra), -EINVAL);
	params.context_limit = 100;
	params.n_keep = 101;
	cr_assert_eq(shm_session_open(arena, &params, &extra), -EINVAL);
	params = default_params;
	params.policy = 2;
	cr_assert_eq(shm_session_open(arena, &params, &extra), -EINVAL);

	params = (struct shm_session_params){ 128, SHM_CONTEXT_SHIFT, 4, 99 };
	for (int i = 0; i < 8; i++)
		cr_assert_eq(shm_session_open(arena, &params, &handles[i]), 0);
	cr_assert_eq(shm_session_open(arena, &params, &extra), -ENOSPC);

	cr_assert_eq(shm_session_get(arena, &handles[3], &info), 0);
	cr_assert_eq(info.params.context_limit, 128);
	cr_assert_eq(info.params.policy, SHM_CONTEXT_SHIFT);
	cr_assert_eq(info.params.n_keep, 4);
	cr_assert_eq(info.params.seed, 99);
	cr_assert_eq(info.committed, 0);
	cr_assert_eq(info.n_blocks, 0);
	cr_assert_gt(info.last_use_ns, 0);

	cr_assert_eq(shm_session_at(arena, 3, &info), 0);
	cr_assert_eq(info.handle.secret, handles[3].secret);
	cr_assert_eq(shm_session_at(arena, 8, &info), -EINVAL);
	cr_assert_eq(shm_session_close(arena, &handles[3]), 0);
	cr_assert_eq(shm_session_at(arena, 3, &info), -ENOENT);
	cr_assert_eq(shm_session_open(arena, &params, &extra), 0);
	cr_assert_eq(extra.slot, 3);
	shm_arena_close(arena);
}


/* Rent n blocks for a session into blocks[]. */
static void rent_blocks(struct shm_arena *arena, const struct shm_handle *owner,
			uint32_t *blocks, uint32_t n)
{
	const struct shm_config *config = shm_arena_config(arena);

	for (uint32_t i = 0; i < n; i++)
		cr_assert_eq(shm_pool_rent(arena, &config->shape, owner, &blocks[i]), 0);
}


static void fill_tokens(int32_t *tokens, uint32_t n, int32_t first)
{
	for (uint32_t i = 0; i < n; i++)
		tokens[i] = first + (int32_t)i;
}


Test(shm, session_commit_append)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_session_params params = { 40, SHM_CONTEXT_ERROR, 0, 1 };
	struct shm_handle a, b;
	struct shm_session_info info;
	uint32_t blocks[4], foreign;
	int32_t tokens[64];
	struct shm_pool_stats stats;

	cr_assert_eq(shm_session_open(arena, &params, &a), 0);
	cr_assert_eq(shm_session_open(arena, &default_params, &b), 0);
	fill_tokens(tokens, 64, 100);

	/* Prefill of 20 positions needs exactly 2 blocks. */
	rent_blocks(arena, &a, blocks, 2);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 20, blocks, 1), -EINVAL);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 20, blocks, 2), 0);
	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 20);
	cr_assert_eq(info.n_blocks, 2);
	cr_assert_eq(info.blocks[0], blocks[0]);
	cr_assert_eq(info.blocks[1], blocks[1]);
	for (int i = 0; i < 20; i++)
		cr_assert_eq(info.tokens[i], 100 + i);

	/* Decode within the last block needs no new block. */
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 20, 1, NULL, 0), 0);
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 21, 11, blocks, 0), 0);
	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 32);
	cr_assert_eq(info.n_blocks, 2);

	/* Committed blocks cannot be committed again or returned. */
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 1, blocks, 1), -EINVAL);
	cr_assert_eq(shm_pool_return(arena, blocks[0]), -EBUSY);

	/* A block rented to another session or to none is rejected. */
	rent_blocks(arena, &b, &foreign, 1);
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 1, &foreign, 1), -EINVAL);
	cr_assert_eq(shm_pool_return(arena, foreign), 0);
	rent_blocks(arena, NULL, &foreign, 1);
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 1, &foreign, 1), -EINVAL);
	cr_assert_eq(shm_pool_return(arena, foreign), 0);

	/* Duplicates within one commit and negative token ids are rejected. */
	rent_blocks(arena, &b, &foreign, 1);
	blocks[2] = foreign;
	blocks[3] = foreign;
	cr_assert_eq(shm_session_commit(arena, &b, tokens, 17, &blocks[2], 2), -EINVAL);
	cr_assert_eq(shm_pool_return(arena, foreign), 0);
	rent_blocks(arena, &a, &blocks[2], 1);
	tokens[32] = -1;
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 1, &blocks[2], 1), -EINVAL);
	tokens[32] = 132;
	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 32);

	/* The context limit is 40 positions. */
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 9, &blocks[2], 1),
		     SHM_ERR_CONTEXT_FULL);
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 32, 8, &blocks[2], 1), 0);
	cr_assert_eq(shm_session_commit(arena, &a, tokens + 40, 1, NULL, 0),
		     SHM_ERR_CONTEXT_FULL);
	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 40);
	cr_assert_eq(info.n_blocks, 3);
	cr_assert_eq(info.blocks[2], blocks[2]);

	/* Close returns committed and merely rented blocks alike. */
	rent_blocks(arena, &a, &blocks[3], 1);
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 4);
	cr_assert_eq(shm_session_close(arena, &a), 0);
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 0);
	shm_arena_close(arena);
}


Test(shm, session_commit_shift)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_session_params params = { 64, SHM_CONTEXT_SHIFT, 16, 1 };
	struct shm_handle a;
	struct shm_session_info info;
	struct shm_pool_stats stats;
	struct shm_repair report;
	uint32_t old_blocks[4], new_blocks[3];
	int32_t tokens[64], shifted[48];

	cr_assert_eq(shm_session_open(arena, &params, &a), 0);
	fill_tokens(tokens, 64, 0);
	rent_blocks(arena, &a, old_blocks, 4);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 64, old_blocks, 4), 0);

	/*
	 * Keep the first block (n_keep = 16), drop 32 positions and write the
	 * remaining 16 into a fresh block, leaving room for 16 more.
	 */
	fill_tokens(shifted, 16, 0);
	fill_tokens(shifted + 16, 16, 48);
	new_blocks[0] = old_blocks[0];
	rent_blocks(arena, &a, &new_blocks[1], 1);

	/* A block count that does not match the length is rejected. */
	cr_assert_eq(shm_session_commit_shift(arena, &a, shifted, 32, new_blocks, 1), -EINVAL);
	cr_assert_eq(shm_session_commit_shift(arena, &a, shifted, 65, new_blocks, 5),
		     SHM_ERR_CONTEXT_FULL);
	cr_assert_eq(shm_session_commit_shift(arena, &a, shifted, 32, new_blocks, 2), 0);

	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 32);
	cr_assert_eq(info.n_blocks, 2);
	cr_assert_eq(info.blocks[0], old_blocks[0]);
	cr_assert_eq(info.blocks[1], new_blocks[1]);
	cr_assert_eq(info.tokens[15], 15);
	cr_assert_eq(info.tokens[16], 48);
	cr_assert_eq(info.tokens[31], 63);

	/* The three dropped blocks went back to the pool. */
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 2);
	for (int i = 1; i < 4; i++)
		cr_assert_eq(shm_pool_return(arena, old_blocks[i]), -EINVAL);

	/* Appending continues on the shifted state. */
	fill_tokens(tokens, 16, 64);
	rent_blocks(arena, &a, &new_blocks[2], 1);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 17, &new_blocks[2], 1), -EINVAL);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 16, &new_blocks[2], 1), 0);
	cr_assert_eq(shm_session_get(arena, &a, &info), 0);
	cr_assert_eq(info.committed, 48);
	cr_assert_eq(info.tokens[32], 64);
	cr_assert_eq(info.blocks[2], new_blocks[2]);

	cr_assert_eq(shm_arena_check(arena, &report), 0);
	cr_assert_eq(report.sessions_open, 1);
	cr_assert_eq(report.blocks_uncommitted, 0);
	cr_assert_eq(report.free_list_fixed, 0);
	cr_assert_eq(report.blocks_owner_fixed, 0);
	shm_arena_close(arena);
}


/* Reattach */

struct saved_session {
	char handle[SHM_HANDLE_STRLEN];
	uint32_t committed;
	uint32_t blocks[8];
};


Test(shm, reattach_after_creator_exits)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct saved_session saved[3];
	struct shm_repair report;
	struct shm_pool_stats stats;
	struct shm_arena *arena;
	int fds[2];
	pid_t pid;

	cr_assert_eq(pipe(fds), 0);
	pid = fork();
	cr_assert_neq(pid, -1);
	if (pid == 0) {
		struct shm_arena *child = NULL;
		int32_t tokens[100];
		uint32_t spare;

		close(fds[0]);
		if (shm_arena_create(instance, &config, &child) != 0)
			_exit(1);
		for (uint32_t s = 0; s < 3; s++) {
			struct shm_handle h;
			uint32_t n = 10 + 30 * s, nb = (n + 15) / 16;

			memset(&saved[s], 0, sizeof(saved[s]));
			fill_tokens(tokens, n, (int32_t)(1000 * s));
			if (shm_session_open(child, &default_params, &h) != 0)
				_exit(2);
			for (uint32_t i = 0; i < nb; i++) {
				if (shm_pool_rent(child, &config.shape, &h, &saved[s].blocks[i]) != 0)
					_exit(3);
				memset(shm_kv_block(shm_arena_kv(child), saved[s].blocks[i]),
				       (int)(s + 1), 4096);
			}
			if (shm_session_commit(child, &h, tokens, n, saved[s].blocks, nb) != 0)
				_exit(4);
			shm_handle_format(&h, saved[s].handle, sizeof(saved[s].handle));
			saved[s].committed = n;
			if (s == 1 && shm_pool_rent(child, &config.shape, &h, &spare) != 0)
				_exit(5);
		}
		if (write(fds[1], saved, sizeof(saved)) != (ssize_t)sizeof(saved))
			_exit(6);
		_exit(0); /* no shm_arena_close, no unlink */
	}
	close(fds[1]);
	cr_assert_eq(wait_child(pid), 0);
	cr_assert_eq(read(fds[0], saved, sizeof(saved)), (ssize_t)sizeof(saved));
	close(fds[0]);

	arena = attach_arena(instance, &config, &report);
	cr_assert_eq(report.sessions_open, 3);
	cr_assert_eq(report.sessions_closed, 0);
	cr_assert_eq(report.sessions_dropped, 0);
	cr_assert_eq(report.blocks_uncommitted, 1, "the spare block is returned");
	cr_assert_eq(report.blocks_owner_fixed, 0);
	cr_assert_eq(report.free_list_fixed, 0);

	for (uint32_t s = 0; s < 3; s++) {
		struct shm_handle h;
		struct shm_session_info info;

		cr_assert_eq(shm_handle_parse(saved[s].handle, &h), 0);
		cr_assert_eq(shm_session_get(arena, &h, &info), 0, "session %u", s);
		cr_assert_eq(info.committed, saved[s].committed);
		cr_assert_eq(info.n_blocks, (saved[s].committed + 15) / 16);
		for (uint32_t i = 0; i < info.n_blocks; i++) {
			cr_assert_eq(info.blocks[i], saved[s].blocks[i]);
			cr_assert_eq(*(uint8_t *)shm_kv_block(shm_arena_kv(arena), info.blocks[i]),
				     s + 1);
		}
		for (uint32_t i = 0; i < info.committed; i++)
			cr_assert_eq(info.tokens[i], (int32_t)(1000 * s + i));
	}

	/* 1 + 3 + 5 committed blocks stay in use; the pool has the rest. */
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 9);
	cr_assert_eq(stats.high_water, 10);
	shm_arena_close(arena);

	/* A second attach finds nothing left to repair. */
	arena = attach_arena(instance, &config, &report);
	cr_assert_eq(report.sessions_open, 3);
	cr_assert_eq(report.blocks_uncommitted, 0);
	cr_assert_eq(report.free_list_fixed, 0);
	shm_arena_close(arena);
}


Test(shm, reattach_finishes_interrupted_close)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_handle a, b;
	struct shm_repair report;
	struct shm_pool_stats stats;
	struct shm_slot_sh *slot;
	uint32_t blocks[3];
	int32_t tokens[40];

	fill_tokens(tokens, 40, 7);
	cr_assert_eq(shm_session_open(arena, &default_params, &a), 0);
	cr_assert_eq(shm_session_open(arena, &default_params, &b), 0);
	rent_blocks(arena, &a, blocks, 3);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 40, blocks, 3), 0);
	rent_blocks(arena, &b, blocks, 1);
	cr_assert_eq(shm_session_commit(arena, &b, tokens, 5, blocks, 1), 0);

	/* A close that stopped right after marking the slot closing. */
	slot = shm_slot(arena, a.slot);
	atomic_store(&slot->state, SHM_SLOT_CLOSING);
	shm_arena_close(arena);

	arena = attach_arena(instance, &config, &report);
	cr_assert_eq(report.sessions_closed, 1);
	cr_assert_eq(report.sessions_open, 1);
	cr_assert_eq(report.blocks_uncommitted, 3);
	cr_assert_eq(shm_session_lookup(arena, &a), -ENOENT);
	cr_assert_eq(shm_session_lookup(arena, &b), 0);
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 1);
	shm_arena_close(arena);
}


Test(shm, reattach_drops_invalid_session)
{
	const char *instance = new_instance();
	struct shm_config config = small_config();
	struct shm_arena *arena = create_arena(instance, &config);
	struct shm_handle a, b;
	struct shm_repair report;
	struct shm_pool_stats stats;
	uint32_t blocks_a[2], blocks_b[2];
	int32_t tokens[32];

	fill_tokens(tokens, 32, 0);
	cr_assert_eq(shm_session_open(arena, &default_params, &a), 0);
	cr_assert_eq(shm_session_open(arena, &default_params, &b), 0);
	rent_blocks(arena, &a, blocks_a, 2);
	rent_blocks(arena, &b, blocks_b, 2);
	cr_assert_eq(shm_session_commit(arena, &a, tokens, 32, blocks_a, 2), 0);
	cr_assert_eq(shm_session_commit(arena, &b, tokens, 32, blocks_b, 2), 0);

	/* Corrupt b's table so that it claims one of a's blocks. */
	{
		struct shm_slot_sh *slot = shm_slot(arena, b.slot);
		uint32_t copy = shm_commit_copy(atomic_load(&slot->commit));

		shm_slot_blocks(arena, slot, copy)[1] = blocks_a[0];
	}
	shm_arena_close(arena);

	arena = attach_arena(instance, &config, &report);
	cr_assert_eq(report.sessions_open, 1);
	cr_assert_eq(report.sessions_dropped, 1);
	cr_assert_eq(shm_session_lookup(arena, &a), 0);
	cr_assert_eq(shm_session_lookup(arena, &b), -ENOENT);
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, 2);
	cr_assert_eq(shm_arena_check(arena, &report), 0);
	cr_assert_eq(report.sessions_dropped, 0);
	cr_assert_eq(report.free_list_fixed, 0);
	shm_arena_close(arena);
}


/* Crash safety */

#define CRASH_ROUNDS 50
#define CRASH_SESSIONS 6

static struct shm_config crash_config(void)
{
	struct shm_config config = small_config();

	config.shape.max_context = 128;
	config.n_blocks = 48;
	config.max_sessions = CRASH_SESSIONS;
	return config;
}


/* Value written at the start of each block: ties it to session and position. */
static uint64_t block_stamp(uint32_t slot, uint32_t generation, int32_t first_token)
{
	return UINT64_C(0x5a00000000000000) ^ ((uint64_t)slot << 48) ^
	       ((uint64_t)generation << 24) ^ (uint32_t)first_token;
}


/*
 * Rent n blocks for a session and stamp them for the positions starting at
 * first_index. Returns false, with the blocks returned, when the pool runs
 * out.
 */
static bool child_rent_stamped(struct shm_arena *arena, const struct shm_handle *h,
			       uint32_t *blocks, uint32_t n, const int32_t *tokens,
			       uint32_t first_index)
{
	const struct shm_config *config = shm_arena_config(arena);

	for (uint32_t i = 0; i < n; i++) {
		if (shm_pool_rent(arena, &config->shape, h, &blocks[i]) != 0) {
			while (i-- > 0)
				shm_pool_return(arena, blocks[i]);
			return false;
		}
		*(uint64_t *)shm_kv_block(shm_arena_kv(arena), blocks[i]) =
			block_stamp(h->slot, h->generation,
				    tokens[(first_index + i) * config->block_tokens]);
	}
	return true;
}


/*
 * Broker-like workload for the crash test: open, append, shift and close
 * sessions forever. Token ids of every session are consecutive, so any mix
 * of an old and a new state shows up as a gap or a wrong block stamp.
 */
static void crash_child(const char *instance, unsigned seed)
{
	struct shm_config config = crash_config();
	struct shm_arena *arena = NULL;
	uint32_t bt = config.block_tokens;

	if (shm_arena_attach(instance, &config, &arena, NULL, NULL) != 0)
		_exit(10);
	for (;;) {
		uint32_t s = (uint32_t)rand_r(&seed) % CRASH_SESSIONS;
		unsigned op = (unsigned)rand_r(&seed) % 16;
		struct shm_session_info info;
		struct shm_session_params params = { 0, SHM_CONTEXT_SHIFT, 0, seed };
		struct shm_handle h;
		int32_t tokens[128];
		uint32_t blocks[8];

		if (shm_session_at(arena, s, &info) != 0) {
			if (shm_session_open(arena, &params, &h) != 0)
				_exit(11);
			continue;
		}
		h = info.handle;

		if (op == 0) {
			if (shm_session_close(arena, &h) != 0)
				_exit(12);
		} else if (op < 4 && info.committed >= 2 * bt) {
			/* Shift: keep the second half, in fresh blocks. */
			uint32_t keep = info.committed / 2;
			uint32_t nb = (keep + bt - 1) / bt;

			memcpy(tokens, info.tokens + info.committed - keep,
			       keep * sizeof(int32_t));
			if (!child_rent_stamped(arena, &h, blocks, nb, tokens, 0)) {
				shm_session_close(arena, &h);
				continue;
			}
			if (shm_session_commit_shift(arena, &h, tokens, keep, blocks, nb) != 0)
				_exit(13);
		} else {
			/* Append up to 40 positions, renting the blocks they need. */
			uint32_t n = 1 + (uint32_t)rand_r(&seed) % 40;
			uint32_t length = info.committed;
			int32_t first = length > 0 ? info.tokens[length - 1] + 1
						   : (int32_t)(rand_r(&seed) % 100000);
			uint32_t old_nb = info.n_blocks, new_nb;
			int32_t all[256];

			if (length + n > info.params.context_limit)
				continue;
			new_nb = (length + n + bt - 1) / bt;
			memcpy(all, info.tokens, length * sizeof(int32_t));
			fill_tokens(all + length, n, first);
			if (!child_rent_stamped(arena, &h, blocks, new_nb - old_nb, all, old_nb)) {
				shm_session_close(arena, &h);
				continue;
			}
			if (shm_session_commit(arena, &h, all + length, n, blocks,
					       new_nb - old_nb) != 0)
				_exit(14);
		}
	}
}


/* Check every open session and the pool after a reattach; returns sessions. */
static uint32_t assert_consistent(struct shm_arena *arena)
{
	const struct shm_config *config = shm_arena_config(arena);
	const struct shm_kv_map *kv = shm_arena_kv(arena);
	uint32_t bt = config->block_tokens;
	bool owned[64] = { false };
	uint32_t open = 0, blocks_used = 0;
	struct shm_pool_stats stats;
	struct shm_repair check;

	for (uint32_t s = 0; s < config->max_sessions; s++) {
		struct shm_session_info info;
		char text[SHM_HANDLE_STRLEN];
		struct shm_handle parsed;

		if (shm_session_at(arena, s, &info) != 0)
			continue;
		open++;

		/* The handle still resolves. */
		cr_assert_eq(shm_handle_format(&info.handle, text, sizeof(text)), 0);
		cr_assert_eq(shm_handle_parse(text, &parsed), 0);
		cr_assert_eq(shm_session_lookup(arena, &parsed), 0);

		cr_assert_leq(info.committed, config->shape.max_context);
		cr_assert_eq(info.n_blocks, (info.committed + bt - 1) / bt);
		for (uint32_t i = 1; i < info.committed; i++)
			cr_assert_eq(info.tokens[i], info.tokens[i - 1] + 1,
				     "slot %u: gap at position %u", s, i);
		for (uint32_t i = 0; i < info.n_blocks; i++) {
			uint32_t b = info.blocks[i];

			cr_assert_lt(b, config->n_blocks);
			cr_assert_not(owned[b], "block %u owned twice", b);
			owned[b] = true;
			cr_assert_eq(*(uint64_t *)shm_kv_block(kv, b),
				     block_stamp(s, info.handle.generation, info.tokens[i * bt]),
				     "slot %u: block %u has another session's stamp", s, b);
		}
		blocks_used += info.n_blocks;
	}

	/* Every block is either committed to one session or free. */
	cr_assert_eq(shm_pool_stats(arena, &stats), 0);
	cr_assert_eq(stats.blocks_in_use, blocks_used);
	cr_assert_eq(shm_arena_check(arena, &check), 0);
	cr_assert_eq(check.sessions_open, open);
	cr_assert_eq(check.sessions_closed, 0);
	cr_assert_eq(check.sessions_dropped, 0);
	cr_assert_eq(check.slots_reset, 0);
	cr_assert_eq(check.blocks_uncommitted, 0);
	cr_assert_eq(check.blocks_owner_fixed, 0);
	cr_assert_eq(check.free_list_fixed, 0);
	return open;
}


Test(shm, crash_during_commits_recovers)
{
	const char *instance = new_instance();
	struct shm_config config = crash_config();
	struct shm_arena *arena = create_arena(instance, &config);
	unsigned seed = (unsigned)getpid();
	uint64_t last_rents = 0;
	uint32_t progressed = 0;

	shm_arena_close(arena);
	for (int round = 0; round < CRASH_ROUNDS; round++) {
		struct shm_repair report;
		struct shm_pool_stats stats;
		int status;
		pid_t pid = fork();

		cr_assert_neq(pid, -1);
		if (pid == 0)
			crash_child(instance, seed + (unsigned)round);

		sleep_us(1000 + rand_r(&seed) % 20000);
		cr_assert_eq(kill(pid, SIGKILL), 0);
		cr_assert_eq(waitpid(pid, &status, 0), pid);
		cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
			  "round %d: child exited early with status %d", round,
			  WIFEXITED(status) ? WEXITSTATUS(status) : -1);

		arena = attach_arena(instance, &config, &report);
		cr_assert_eq(report.sessions_dropped, 0, "round %d", round);
		cr_assert_eq(report.slots_reset, 0, "round %d", round);
		cr_assert_eq(report.blocks_owner_fixed, 0, "round %d", round);
		assert_consistent(arena);

		cr_assert_eq(shm_pool_stats(arena, &stats), 0);
		if (stats.rents > last_rents)
			progressed++;
		last_rents = stats.rents;
		shm_arena_close(arena);
	}

	/* The children did real work in most rounds. */
	cr_assert_gt(progressed, CRASH_ROUNDS / 2);
}
