/*
 * segment.c - segment names, sizes and headers, and opening by name for
 * workers (shm_kv_open), shm_arena_describe and shm_segments_unlink.
 *
 * A header is
 * trusted only after shm_header_check: magic, version, the ready flag,
 * instance name, a configuration that passes shm_config_validate, offsets that
 * match the layout computed from it, and a file size equal to the header's
 * total size. Callers then compare the configuration with what they expect
 * in shm_header_expect.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shm_internal.h"


static void mismatch_set(struct shm_mismatch *mismatch, const char *field,
			 uint64_t expected, uint64_t found)
{
	if (mismatch == NULL)
		return;
	mismatch->field = field;
	mismatch->expected = expected;
	mismatch->found = found;
}


int64_t shm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}


int shm_instance_name_valid(const char *instance)
{
	size_t len;

	if (instance == NULL)
		return -EINVAL;
	len = strnlen(instance, SHM_INSTANCE_MAX + 1);
	if (len == 0 || len > SHM_INSTANCE_MAX)
		return -EINVAL;

	for (size_t i = 0; i < len; i++) {
		char c = instance[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '-' || c == '_' ||
			  c == '.';

		if (!ok)
			return -EINVAL;
	}
	return 0;
}


int shm_segment_names(const char *instance, char kv_name[SHM_NAME_MAX],
		      char ctl_name[SHM_NAME_MAX])
{
	int rc = shm_instance_name_valid(instance);

	if (rc < 0)
		return rc;
	snprintf(kv_name, SHM_NAME_MAX, "/slabd-%s-kv", instance);
	snprintf(ctl_name, SHM_NAME_MAX, "/slabd-%s-ctl", instance);
	return 0;
}


/*
 * Check a configuration for values that the layout cannot represent.
 * Returns 0 or -EINVAL.
 */
int shm_config_validate(const struct shm_config *config)
{
	const struct shm_shape *shape = &config->shape;

	if (shape->n_layers == 0 || shape->n_kv_heads == 0 ||
	    shape->head_size == 0 || shape->max_context == 0)
		return -EINVAL;
	if (shape->kv_type != SHM_KV_F32 && shape->kv_type != SHM_KV_F16)
		return -EINVAL;
	if (shape->max_context > SHM_MAX_CONTEXT)
		return -EINVAL;
	if (config->block_tokens == 0 || config->block_tokens > shape->max_context)
		return -EINVAL;
	if (config->n_blocks == 0 || config->n_blocks > SHM_MAX_BLOCKS)
		return -EINVAL;
	if (config->max_sessions == 0 || config->max_sessions > SHM_MAX_SESSIONS)
		return -EINVAL;
	return 0;
}


static uint64_t align_up(uint64_t value, uint64_t alignment)
{
	return (value + alignment - 1) / alignment * alignment;
}


/*
 * Compute the sizes and offsets of both segments for a configuration.
 * Returns -EINVAL for an invalid configuration and -ERANGE when a size does
 * not fit in 64 bits.
 */
int shm_layout_compute(const struct shm_config *config, struct shm_layout *layout)
{
	const struct shm_shape *shape = &config->shape;
	uint64_t blocks_total, per_slot, slots_total, owner_bytes, free_bytes;
	int rc = shm_config_validate(config);

	if (rc < 0)
		return rc;
	memset(layout, 0, sizeof(*layout));

	/* KV segment: header, then page-aligned blocks. */
	layout->block_bytes = shm_block_bytes(shape, config->block_tokens);
	if (layout->block_bytes == 0 || layout->block_bytes > UINT64_MAX / 2)
		return -ERANGE;
	layout->block_stride = align_up(layout->block_bytes, SHM_BLOCK_ALIGN);
	layout->blocks_off = align_up(SHM_HEADER_BYTES, SHM_BLOCKS_ALIGN);
	if (__builtin_mul_overflow(layout->block_stride, (uint64_t)config->n_blocks,
				   &blocks_total) ||
	    __builtin_add_overflow(blocks_total, layout->blocks_off,
				   &layout->kv_bytes))
		return -ERANGE;

	/* One slot: fixed part, two block tables, two token arrays. */
	layout->slot_max_blocks = (shape->max_context + config->block_tokens - 1) /
				  config->block_tokens;
	layout->slot_blocks_off = sizeof(struct shm_slot_sh);
	layout->slot_tokens_off = align_up(layout->slot_blocks_off +
					   2 * (uint64_t)layout->slot_max_blocks * sizeof(uint32_t),
					   SHM_BLOCK_ALIGN);
	per_slot = layout->slot_tokens_off +
		   2 * (uint64_t)shape->max_context * sizeof(int32_t);
	layout->slot_stride = align_up(per_slot, SHM_BLOCK_ALIGN);

	/* Control segment: header, pool, owner words, free stack, slots. */
	owner_bytes = (uint64_t)config->n_blocks * sizeof(uint64_t);
	free_bytes = (uint64_t)config->n_blocks * sizeof(uint32_t);
	layout->pool_off = SHM_HEADER_BYTES;
	layout->owner_off = layout->pool_off + sizeof(struct shm_pool_sh);
	layout->free_off = align_up(layout->owner_off + owner_bytes, SHM_BLOCK_ALIGN);
	layout->slots_off = align_up(layout->free_off + free_bytes, SHM_BLOCK_ALIGN);
	if (__builtin_mul_overflow(layout->slot_stride, (uint64_t)config->max_sessions,
				   &slots_total) ||
	    __builtin_add_overflow(slots_total, layout->slots_off,
				   &layout->ctl_bytes))
		return -ERANGE;
	if (layout->kv_bytes > (uint64_t)INT64_MAX || layout->ctl_bytes > (uint64_t)INT64_MAX)
		return -ERANGE;
	return 0;
}


/*
 * Fill a header for a new segment. ready stays 0; the creator sets it after
 * initializing the rest of the segment.
 */
void shm_header_init(struct shm_header_sh *header, uint64_t magic,
		     const char *instance, uint64_t instance_id,
		     const struct shm_config *config,
		     const struct shm_layout *layout)
{
	bool kv = magic == SHM_MAGIC_KV;

	memset(header, 0, sizeof(*header));
	header->magic = magic;
	header->layout_version = SHM_LAYOUT_VERSION;
	header->header_bytes = SHM_HEADER_BYTES;
	header->instance_id = instance_id;
	strncpy(header->instance, instance, SHM_INSTANCE_MAX);
	header->created_ns = shm_now_ns();
	atomic_store_explicit(&header->owner_pid, (int32_t)getpid(),
			      memory_order_relaxed);
	header->block_tokens = config->block_tokens;
	header->total_bytes = kv ? layout->kv_bytes : layout->ctl_bytes;
	header->block_bytes = layout->block_bytes;
	header->block_stride = layout->block_stride;
	header->n_blocks = config->n_blocks;
	header->shape.n_layers = config->shape.n_layers;
	header->shape.n_kv_heads = config->shape.n_kv_heads;
	header->shape.head_size = config->shape.head_size;
	header->shape.kv_type = config->shape.kv_type;
	header->shape.max_context = config->shape.max_context;
	header->max_sessions = config->max_sessions;
	header->slot_max_blocks = layout->slot_max_blocks;
	header->blocks_off = kv ? layout->blocks_off : 0;
	if (!kv) {
		header->pool_off = layout->pool_off;
		header->owner_off = layout->owner_off;
		header->free_off = layout->free_off;
		header->slots_off = layout->slots_off;
		header->slot_stride = layout->slot_stride;
		header->slot_blocks_off = layout->slot_blocks_off;
		header->slot_tokens_off = layout->slot_tokens_off;
	}
	atomic_store_explicit(&header->ready, 0, memory_order_relaxed);
}


static void header_config(const struct shm_header_sh *header,
			  struct shm_config *config)
{
	memset(config, 0, sizeof(*config));
	config->shape.n_layers = header->shape.n_layers;
	config->shape.n_kv_heads = header->shape.n_kv_heads;
	config->shape.head_size = header->shape.head_size;
	config->shape.kv_type = header->shape.kv_type;
	config->shape.max_context = header->shape.max_context;
	config->block_tokens = header->block_tokens;
	config->n_blocks = header->n_blocks > UINT32_MAX ? UINT32_MAX
							 : (uint32_t)header->n_blocks;
	/* A KV header stores 0 sessions; any valid count gives its layout. */
	config->max_sessions = header->magic == SHM_MAGIC_KV ? 1 : header->max_sessions;
}


/* Compare one stored offset or size with the computed layout. */
static int check_field(const char *field, uint64_t expected, uint64_t found,
		       struct shm_mismatch *mismatch)
{
	if (expected == found)
		return 0;
	mismatch_set(mismatch, field, expected, found);
	return SHM_ERR_SIZE;
}


/*
 * Validate a mapped header on its own: magic, version, completeness, instance
 * name, internal consistency and file size. On success *found receives the
 * configuration the segment was made for (max_sessions is 0 for a KV
 * segment). Returns 0 or an SHM_ERR_* code with *mismatch filled.
 */
int shm_header_check(const struct shm_header_sh *header, size_t file_size,
		     uint64_t magic, const char *instance,
		     struct shm_config *found, struct shm_mismatch *mismatch)
{
	bool kv = magic == SHM_MAGIC_KV;
	struct shm_layout layout;
	uint32_t ready;
	int rc;

	if (file_size < SHM_HEADER_BYTES) {
		mismatch_set(mismatch, "file_size", SHM_HEADER_BYTES, file_size);
		return SHM_ERR_TRUNCATED;
	}
	if (header->magic != magic) {
		mismatch_set(mismatch, "magic", magic, header->magic);
		return SHM_ERR_MAGIC;
	}
	if (header->layout_version != SHM_LAYOUT_VERSION) {
		mismatch_set(mismatch, "layout_version", SHM_LAYOUT_VERSION,
			     header->layout_version);
		return SHM_ERR_VERSION;
	}

	/* A creator that died before setting ready left a partial segment. */
	ready = atomic_load_explicit(&header->ready, memory_order_acquire);
	if (ready != 1) {
		mismatch_set(mismatch, "ready", 1, ready);
		return SHM_ERR_TRUNCATED;
	}
	if (header->header_bytes != SHM_HEADER_BYTES)
		return check_field("header_bytes", SHM_HEADER_BYTES,
				   header->header_bytes, mismatch);
	if (strncmp(header->instance, instance, sizeof(header->instance)) != 0) {
		mismatch_set(mismatch, "instance", 0, 0);
		return SHM_ERR_INSTANCE;
	}

	/* The stored geometry must be valid and give the stored offsets. */
	header_config(header, found);
	rc = shm_layout_compute(found, &layout);
	if (rc < 0) {
		mismatch_set(mismatch, "config", 0, 0);
		return SHM_ERR_SIZE;
	}
	if (kv)
		found->max_sessions = 0;
	if ((rc = check_field("n_blocks", found->n_blocks, header->n_blocks, mismatch)) ||
	    (rc = check_field("block_bytes", layout.block_bytes, header->block_bytes, mismatch)) ||
	    (rc = check_field("block_stride", layout.block_stride, header->block_stride, mismatch)) ||
	    (rc = check_field("slot_max_blocks", layout.slot_max_blocks,
			      header->slot_max_blocks, mismatch)))
		return rc;
	if (kv) {
		if ((rc = check_field("blocks_off", layout.blocks_off, header->blocks_off, mismatch)) ||
		    (rc = check_field("total_bytes", layout.kv_bytes, header->total_bytes, mismatch)))
			return rc;
	} else {
		if ((rc = check_field("pool_off", layout.pool_off, header->pool_off, mismatch)) ||
		    (rc = check_field("owner_off", layout.owner_off, header->owner_off, mismatch)) ||
		    (rc = check_field("free_off", layout.free_off, header->free_off, mismatch)) ||
		    (rc = check_field("slots_off", layout.slots_off, header->slots_off, mismatch)) ||
		    (rc = check_field("slot_stride", layout.slot_stride, header->slot_stride, mismatch)) ||
		    (rc = check_field("slot_blocks_off", layout.slot_blocks_off,
				      header->slot_blocks_off, mismatch)) ||
		    (rc = check_field("slot_tokens_off", layout.slot_tokens_off,
				      header->slot_tokens_off, mismatch)) ||
		    (rc = check_field("total_bytes", layout.ctl_bytes, header->total_bytes, mismatch)))
			return rc;
	}

	/* Last, the file must hold everything the header describes. */
	if (file_size < header->total_bytes) {
		mismatch_set(mismatch, "file_size", header->total_bytes, file_size);
		return SHM_ERR_TRUNCATED;
	}
	if (file_size > header->total_bytes)
		return check_field("file_size", header->total_bytes, file_size, mismatch);
	return 0;
}


/*
 * Compare a checked header with the expected configuration: the shape first
 * (SHM_ERR_SHAPE), then block_tokens, n_blocks when check_blocks is set, and
 * for a control segment max_sessions (SHM_ERR_SIZE).
 */
int shm_header_expect(const struct shm_header_sh *header,
		      const struct shm_config *expect, bool check_blocks,
		      struct shm_mismatch *mismatch)
{
	const struct shm_shape_sh *found = &header->shape;
	const struct shm_shape *shape = &expect->shape;
	const struct {
		const char *field;
		uint64_t expected, found;
	} shape_fields[] = {
		{ "n_layers", shape->n_layers, found->n_layers },
		{ "n_kv_heads", shape->n_kv_heads, found->n_kv_heads },
		{ "head_size", shape->head_size, found->head_size },
		{ "kv_type", shape->kv_type, found->kv_type },
		{ "max_context", shape->max_context, found->max_context },
	};

	for (size_t i = 0; i < sizeof(shape_fields) / sizeof(shape_fields[0]); i++) {
		if (shape_fields[i].expected != shape_fields[i].found) {
			mismatch_set(mismatch, shape_fields[i].field,
				     shape_fields[i].expected, shape_fields[i].found);
			return SHM_ERR_SHAPE;
		}
	}
	if (expect->block_tokens != header->block_tokens)
		return check_field("block_tokens", expect->block_tokens,
				   header->block_tokens, mismatch);
	if (check_blocks && expect->n_blocks != header->n_blocks)
		return check_field("n_blocks", expect->n_blocks, header->n_blocks,
				   mismatch);
	if (header->magic == SHM_MAGIC_CTL &&
	    expect->max_sessions != header->max_sessions)
		return check_field("max_sessions", expect->max_sessions,
				   header->max_sessions, mismatch);
	return 0;
}


/*
 * Open a segment by name and map all of it, read-write when flags is O_RDWR.
 * The descriptor is stored in *fd_out, or closed when fd_out is NULL.
 * Returns SHM_ERR_TRUNCATED (with *mismatch) for a file too short to hold a
 * header, or the error of shm_open, fstat or mmap.
 */
int shm_segment_map(const char *name, int flags, int *fd_out, void **base,
		    size_t *size, struct shm_mismatch *mismatch)
{
	int prot = flags == O_RDWR ? PROT_READ | PROT_WRITE : PROT_READ;
	struct stat st;
	void *addr;
	int fd, rc;

	fd = shm_open(name, flags | O_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		goto err_close;
	}
	if ((uint64_t)st.st_size < SHM_HEADER_BYTES) {
		mismatch_set(mismatch, "file_size", SHM_HEADER_BYTES,
			     (uint64_t)st.st_size);
		rc = SHM_ERR_TRUNCATED;
		goto err_close;
	}

	/*
	 * NOTE: a process that shrinks the file after this mmap makes later
	 * accesses raise SIGBUS. Only the owner (mode 0600) can do that.
	 */
	addr = mmap(NULL, (size_t)st.st_size, prot, MAP_SHARED, fd, 0);
	if (addr == MAP_FAILED) {
		rc = -errno;
		goto err_close;
	}
	*base = addr;
	*size = (size_t)st.st_size;
	if (fd_out != NULL)
		*fd_out = fd;
	else
		close(fd);
	return 0;

err_close:
	close(fd);
	return rc;
}


void shm_kv_map_fill(struct shm_kv_map *kv, void *base, size_t size,
		     const struct shm_header_sh *header)
{
	kv->base = base;
	kv->size = size;
	kv->blocks = (uint8_t *)base + header->blocks_off;
	kv->n_blocks = (uint32_t)header->n_blocks;
	kv->block_tokens = header->block_tokens;
	kv->block_bytes = header->block_bytes;
	kv->block_stride = header->block_stride;
	kv->shape.n_layers = header->shape.n_layers;
	kv->shape.n_kv_heads = header->shape.n_kv_heads;
	kv->shape.head_size = header->shape.head_size;
	kv->shape.kv_type = header->shape.kv_type;
	kv->shape.max_context = header->shape.max_context;
}


int shm_kv_open(const char *instance, const struct shm_shape *shape,
		uint32_t block_tokens, struct shm_kv_map *kv,
		struct shm_mismatch *mismatch)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	struct shm_config expect = { 0 }, found;
	void *base;
	size_t size;
	int rc;

	if (shape == NULL || kv == NULL)
		return -EINVAL;
	rc = shm_segment_names(instance, kv_name, ctl_name);
	if (rc < 0)
		return rc;

	rc = shm_segment_map(kv_name, O_RDWR, NULL, &base, &size, mismatch);
	if (rc < 0)
		return rc;
	rc = shm_header_check(base, size, SHM_MAGIC_KV, instance, &found, mismatch);
	if (rc < 0)
		goto err_unmap;
	expect.shape = *shape;
	expect.block_tokens = block_tokens;
	rc = shm_header_expect(base, &expect, false, mismatch);
	if (rc < 0)
		goto err_unmap;

	shm_kv_map_fill(kv, base, size, base);
	return 0;

err_unmap:
	munmap(base, size);
	return rc;
}


void shm_kv_close(struct shm_kv_map *kv)
{
	if (kv == NULL)
		return;
	if (kv->base != NULL)
		munmap(kv->base, kv->size);
	memset(kv, 0, sizeof(*kv));
}


int shm_arena_describe(const char *instance, struct shm_segment_info *info,
		       struct shm_mismatch *mismatch)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	const struct shm_header_sh *kv, *ctl;
	struct shm_config kv_config, ctl_config;
	void *kv_base, *ctl_base;
	size_t kv_size, ctl_size;
	int rc;

	if (info == NULL)
		return -EINVAL;
	rc = shm_segment_names(instance, kv_name, ctl_name);
	if (rc < 0)
		return rc;

	rc = shm_segment_map(ctl_name, O_RDONLY, NULL, &ctl_base, &ctl_size, mismatch);
	if (rc < 0)
		return rc;
	ctl = ctl_base;
	rc = shm_header_check(ctl, ctl_size, SHM_MAGIC_CTL, instance, &ctl_config,
			      mismatch);
	if (rc < 0)
		goto err_unmap_ctl;

	rc = shm_segment_map(kv_name, O_RDONLY, NULL, &kv_base, &kv_size, mismatch);
	if (rc < 0)
		goto err_unmap_ctl;
	kv = kv_base;
	rc = shm_header_check(kv, kv_size, SHM_MAGIC_KV, instance, &kv_config, mismatch);
	if (rc < 0)
		goto err_unmap_kv;

	/* Both segments must come from one creation. */
	if (kv->instance_id != ctl->instance_id) {
		mismatch_set(mismatch, "instance_id", ctl->instance_id, kv->instance_id);
		rc = SHM_ERR_INSTANCE;
		goto err_unmap_kv;
	}
	kv_config.max_sessions = ctl_config.max_sessions;
	if (shm_config_compare(&ctl_config, &kv_config, mismatch,
			       mismatch != NULL ? 1 : 0) != 0) {
		rc = SHM_ERR_INSTANCE;
		goto err_unmap_kv;
	}

	memset(info, 0, sizeof(*info));
	info->config = ctl_config;
	info->instance_id = ctl->instance_id;
	info->owner_pid = atomic_load_explicit(&ctl->owner_pid, memory_order_relaxed);
	info->created_ns = ctl->created_ns;
	info->layout_version = ctl->layout_version;
	info->kv_bytes = kv->total_bytes;
	info->ctl_bytes = ctl->total_bytes;
	info->block_bytes = kv->block_bytes;
	info->block_stride = kv->block_stride;
	rc = 0;

err_unmap_kv:
	munmap(kv_base, kv_size);
err_unmap_ctl:
	munmap(ctl_base, ctl_size);
	return rc;
}


size_t shm_config_compare(const struct shm_config *expect,
			  const struct shm_config *found,
			  struct shm_mismatch *out, size_t max_out)
{
	const struct {
		const char *field;
		uint64_t expected, found;
	} fields[] = {
		{ "n_layers", expect->shape.n_layers, found->shape.n_layers },
		{ "n_kv_heads", expect->shape.n_kv_heads, found->shape.n_kv_heads },
		{ "head_size", expect->shape.head_size, found->shape.head_size },
		{ "kv_type", expect->shape.kv_type, found->shape.kv_type },
		{ "max_context", expect->shape.max_context, found->shape.max_context },
		{ "block_tokens", expect->block_tokens, found->block_tokens },
		{ "n_blocks", expect->n_blocks, found->n_blocks },
		{ "max_sessions", expect->max_sessions, found->max_sessions },
	};
	size_t n = 0;

	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		if (fields[i].expected == fields[i].found)
			continue;
		if (out != NULL && n < max_out)
			mismatch_set(&out[n], fields[i].field, fields[i].expected,
				     fields[i].found);
		n++;
	}
	return n;
}


int shm_segments_unlink(const char *instance)
{
	char kv_name[SHM_NAME_MAX], ctl_name[SHM_NAME_MAX];
	const char *names[2] = { kv_name, ctl_name };
	int removed = 0, first_error = 0;
	int rc = shm_segment_names(instance, kv_name, ctl_name);

	if (rc < 0)
		return rc;
	for (int i = 0; i < 2; i++) {
		if (shm_unlink(names[i]) == 0)
			removed++;
		else if (errno != ENOENT && first_error == 0)
			first_error = -errno;
	}
	if (first_error != 0)
		return first_error;
	return removed > 0 ? 0 : -ENOENT;
}


const char *shm_strerror(int err)
{
	const char *text;

	switch (err) {
	case 0:
		return "success";
	case SHM_ERR_MAGIC:
		return "not a slabd segment of the expected kind (wrong magic)";
	case SHM_ERR_VERSION:
		return "segment has another layout version";
	case SHM_ERR_SHAPE:
		return "segment was made for another model shape";
	case SHM_ERR_SIZE:
		return "segment has another block geometry, session count or size";
	case SHM_ERR_TRUNCATED:
		return "segment is truncated or its creation did not finish";
	case SHM_ERR_INSTANCE:
		return "KV and control segments belong to different instances";
	case SHM_ERR_CONTEXT_FULL:
		return "session context is full";
	case -ENOSPC:
		return "resource exhausted";
	case -ENOENT:
		return "not found";
	default:
		break;
	}
	text = err < 0 ? strerrordesc_np(-err) : NULL;
	return text != NULL ? text : "unknown error";
}
