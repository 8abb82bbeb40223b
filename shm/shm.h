/*
 * shm.h - shared memory of slabd: segments, KV block pool and session table.
 *
 * An instance owns two POSIX shared memory segments, both named after the
 * instance name:
 *
 *   /slabd-<instance>-kv   the KV cache: a header, then n_blocks blocks.
 *   /slabd-<instance>-ctl  the control segment: a header, the block pool
 *                          (statistics, per-block owner words, free list)
 *                          and the session table.
 *
 * The broker creates or attaches to both segments through a struct shm_arena
 * and is the only process that rents, returns or commits. Workers map only the
 * KV segment (shm_kv_open) and read and write block contents. The broker side
 * is single-threaded: no function taking a struct shm_arena is thread-safe.
 *
 * Every function returns 0 or a negative errno value unless its comment states
 * otherwise, and none of them logs. Functions that validate a segment header
 * fill an optional struct shm_mismatch with the field that failed.
 *
 * KV block layout. A block holds block_tokens consecutive positions of one
 * session, as elements of the KV type (float32 or float16):
 *
 *   block[n_layers][2][block_tokens][n_kv_heads * head_size]
 *
 * where index 0 of the second dimension is K and 1 is V. So
 *
 *   block_bytes = n_layers * 2 * block_tokens * n_kv_heads * head_size
 *                 * element_size
 *
 * Position p of a session lives in block table entry p / block_tokens, at row
 * p % block_tokens. Blocks start 64-byte aligned: consecutive blocks are
 * block_stride bytes apart, which is block_bytes rounded up to 64.
 */
#ifndef SLABD_SHM_H
#define SLABD_SHM_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Maximum length of an instance name, without the terminating NUL. */
#define SHM_INSTANCE_MAX 63

/* Default number of positions per KV block. */
#define SHM_DEFAULT_BLOCK_TOKENS 16

/* Upper bounds accepted by shm_arena_create, so that sizes fit the header. */
#define SHM_MAX_BLOCKS       (UINT32_C(1) << 31)
#define SHM_MAX_SESSIONS     (UINT32_C(1) << 20)
#define SHM_MAX_CONTEXT      (UINT32_C(1) << 24)

/*
 * Errors of header validation, one per kind of mismatch. They are negative
 * errno values so that they pass through the usual error paths; use
 * shm_strerror() for the text that fits their meaning here.
 */
#define SHM_ERR_MAGIC     (-EBADMSG)         /* not a slabd segment of this kind */
#define SHM_ERR_VERSION   (-EPROTONOSUPPORT) /* other layout version */
#define SHM_ERR_SHAPE     (-EMEDIUMTYPE)     /* made for another model shape */
#define SHM_ERR_SIZE      (-EFBIG)           /* other geometry, session count or total size */
#define SHM_ERR_TRUNCATED (-ENODATA)         /* file shorter than its header says, or
                                                creation did not finish */
#define SHM_ERR_INSTANCE  (-ESTALE)          /* KV and control segment of different
                                                creations, or another instance name */

/* Error of a commit that would exceed the session's context limit. */
#define SHM_ERR_CONTEXT_FULL (-EOVERFLOW)

/* Element type of the KV cache, stored in the segment header. */
enum shm_kv_type {
	SHM_KV_F32 = 0,
	SHM_KV_F16 = 1,
};

/* Model shape that a pool of KV blocks is made for. */
struct shm_shape {
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_size;   /* elements per head */
	uint32_t kv_type;     /* enum shm_kv_type */
	uint32_t max_context; /* maximum positions per session */
};

/* Everything that fixes the size and layout of an instance's segments. */
struct shm_config {
	struct shm_shape shape;
	uint32_t block_tokens; /* positions per block, SHM_DEFAULT_BLOCK_TOKENS by default */
	uint32_t n_blocks;     /* blocks in the KV segment, see shm_budget_blocks */
	uint32_t max_sessions; /* slots in the session table */
};

/*
 * Header field that failed validation, for the caller's log. field is a
 * static string naming the header field ("magic", "n_layers", ...); expected
 * and found are its values. Both values are 0 when the field is not a number
 * (the instance name).
 */
struct shm_mismatch {
	const char *field;
	uint64_t expected;
	uint64_t found;
};

/* Configuration and origin of an existing pair of segments, from shm_arena_describe. */
struct shm_segment_info {
	struct shm_config config;
	uint64_t instance_id;     /* random, shared by both segments of one creation */
	int32_t owner_pid;        /* creator, or the broker that attached last */
	int64_t created_ns;       /* CLOCK_REALTIME at creation, nanoseconds */
	uint32_t layout_version;
	uint64_t kv_bytes;        /* total size of the KV segment */
	uint64_t ctl_bytes;       /* total size of the control segment */
	uint64_t block_bytes;
	uint64_t block_stride;
};

/* KV segment as mapped by a worker (or the broker, see shm_arena_kv). */
struct shm_kv_map {
	void *base;            /* start of the mapping, the segment header */
	size_t size;           /* bytes mapped */
	uint8_t *blocks;       /* block 0, 64-byte aligned */
	uint32_t n_blocks;
	uint32_t block_tokens;
	uint64_t block_bytes;  /* payload of one block, see the layout above */
	uint64_t block_stride; /* distance between blocks, a multiple of 64 */
	struct shm_shape shape;
};

/* Start address of a block in a mapped KV segment; block must be < n_blocks. */
static inline void *shm_kv_block(const struct shm_kv_map *kv, uint32_t block)
{
	return kv->blocks + (uint64_t)block * kv->block_stride;
}

/* Process-local handle of the broker's mapping of both segments. */
struct shm_arena;

/* Allocator statistics, kept in the control segment. */
struct shm_pool_stats {
	uint64_t blocks_total;
	uint64_t blocks_in_use;
	uint64_t high_water;   /* maximum of blocks_in_use since creation */
	uint64_t rents;
	uint64_t returns;
	uint64_t failed_rents; /* rents rejected with -ENOSPC */
};

/*
 * What reattaching changed, or with shm_arena_check what it would change.
 * All counts are zero for segments that were closed cleanly.
 */
struct shm_repair {
	uint32_t sessions_open;         /* open sessions recovered intact */
	uint32_t sessions_closed;       /* closes that a crash interrupted, now finished */
	uint32_t sessions_dropped;      /* sessions with an invalid state or block table */
	uint32_t slots_reset;           /* slots with an unknown state value, now free */
	uint32_t blocks_uncommitted;    /* rented but in no committed block table, returned */
	uint32_t blocks_owner_fixed;    /* committed blocks whose owner word was wrong */
	uint32_t free_list_fixed;       /* free-list entries that disagreed with the owner
					   words, left by an interrupted rent or return */
};

/* Context policy of a session, applied by the broker when the context is full. */
enum shm_context_policy {
	SHM_CONTEXT_ERROR = 0, /* reject the request */
	SHM_CONTEXT_SHIFT = 1, /* drop old positions after the first n_keep */
};

/* Session handle: slot index, the slot's generation and a random secret. */
struct shm_handle {
	uint32_t slot;
	uint32_t generation;
	uint64_t secret;
};

/* Buffer size for a formatted handle: 's', 32 hex digits and a NUL. */
#define SHM_HANDLE_STRLEN 34

/* Parameters of a new session. */
struct shm_session_params {
	uint32_t context_limit; /* maximum committed length; 0 means max_context */
	uint32_t policy;        /* enum shm_context_policy */
	uint32_t n_keep;        /* positions kept at the start on a shift */
	uint64_t seed;          /* sampling seed */
};

/*
 * Committed state of one session. blocks and tokens point into the control
 * segment and stay valid until the next commit, shift or close of this
 * session.
 */
struct shm_session_info {
	struct shm_handle handle;
	struct shm_session_params params; /* context_limit is never 0 here */
	uint32_t committed;               /* committed length in positions */
	uint32_t n_blocks;                /* ceil(committed / block_tokens) */
	int64_t last_use_ns;              /* CLOCK_REALTIME, nanoseconds */
	const uint32_t *blocks;           /* n_blocks block indices */
	const int32_t *tokens;            /* committed token ids */
};

/* Sizes and parsing (pool.c). */

/*
 * Compute the bytes of one KV block for a shape: n_layers * 2 * block_tokens *
 * n_kv_heads * head_size * element_size. Returns 0 for an invalid shape,
 * a zero block_tokens or a result that overflows.
 */
uint64_t shm_block_bytes(const struct shm_shape *shape, uint32_t block_tokens);

/*
 * Parse a byte count such as "1048576", "64K", "512M" or "1G" into *bytes.
 * The suffixes K, M and G (either case) are powers of 1024. Returns -EINVAL
 * for an empty string, other characters or zero, and -ERANGE when the value
 * does not fit in 64 bits.
 */
int shm_parse_size(const char *text, uint64_t *bytes);

/*
 * Turn a memory budget for the KV segment's blocks into a block count,
 * rounded down to whole blocks of block_stride bytes. *unused_bytes receives
 * the part of the budget that the rounding leaves unused. Returns -EINVAL for
 * an invalid shape or a budget smaller than one block, and -ERANGE when the
 * count exceeds SHM_MAX_BLOCKS.
 */
int shm_budget_blocks(uint64_t budget_bytes, const struct shm_shape *shape,
		      uint32_t block_tokens, uint32_t *n_blocks,
		      uint64_t *unused_bytes);

/* Segments (segment.c, arena.c). */

/* Check an instance name: 1 to SHM_INSTANCE_MAX letters, digits, '-', '_' or '.'. */
int shm_instance_name_valid(const char *instance);

/*
 * Write the segment names "/slabd-<instance>-kv" and "/slabd-<instance>-ctl".
 * Each buffer needs SHM_INSTANCE_MAX + 12 bytes. Returns -EINVAL for an
 * invalid instance name.
 */
#define SHM_NAME_MAX (SHM_INSTANCE_MAX + 12)
int shm_segment_names(const char *instance, char kv_name[SHM_NAME_MAX],
		      char ctl_name[SHM_NAME_MAX]);

/*
 * Create both segments of an instance for a configuration and map them.
 * Returns -EEXIST when either segment already exists (nothing is changed
 * then), -EINVAL for an invalid name or configuration, -ERANGE when the sizes
 * overflow, -ENOSPC when /dev/shm cannot hold them, or another error of
 * shm_open, fallocate or mmap. On failure nothing is left behind.
 */
int shm_arena_create(const char *instance, const struct shm_config *config,
		     struct shm_arena **arena);

/*
 * Map the existing segments of an instance, validate both headers against
 * *expect and repair the pool and session table after a crash (see
 * struct shm_repair). report and mismatch may be NULL. Returns the
 * SHM_ERR_* code of the first failed header check, -ENOENT when a segment is
 * missing, -EBUSY when another process holds the arena, or another error of
 * shm_open or mmap.
 */
int shm_arena_attach(const char *instance, const struct shm_config *expect,
		     struct shm_arena **arena, struct shm_repair *report,
		     struct shm_mismatch *mismatch);

/*
 * Unmap both segments and release the arena. The segments stay; a clean
 * shutdown calls shm_segments_unlink afterwards. Accepts NULL.
 */
void shm_arena_close(struct shm_arena *arena);

/*
 * Read what the existing segments of an instance were made for, without an
 * expected configuration and without modifying them. Checks magic, version,
 * completeness and size. Returns the same errors as shm_arena_attach except
 * -EBUSY.
 */
int shm_arena_describe(const char *instance, struct shm_segment_info *info,
		       struct shm_mismatch *mismatch);

/*
 * Compare two configurations field by field. Writes up to max_out differences
 * into out (field, expected value from *expect, found value from *found) and
 * returns the total number of differences, which may exceed max_out.
 */
size_t shm_config_compare(const struct shm_config *expect,
			  const struct shm_config *found,
			  struct shm_mismatch *out, size_t max_out);

/*
 * Unlink both segments of an instance. Processes that have them mapped keep
 * their mappings. Returns 0 when at least one segment was removed, -ENOENT
 * when neither existed, -EINVAL for an invalid name, or the first other error
 * of shm_unlink.
 */
int shm_segments_unlink(const char *instance);

/*
 * Map only the KV segment of an instance read-write and validate its header
 * against a shape and block size; for workers. The block count is taken from
 * the header. Returns the errors of shm_arena_attach except -EBUSY.
 */
int shm_kv_open(const char *instance, const struct shm_shape *shape,
		uint32_t block_tokens, struct shm_kv_map *kv,
		struct shm_mismatch *mismatch);

/* Unmap a KV segment mapped by shm_kv_open and clear *kv. */
void shm_kv_close(struct shm_kv_map *kv);

/* KV mapping of an arena; valid until shm_arena_close. */
const struct shm_kv_map *shm_arena_kv(const struct shm_arena *arena);

/* Configuration of an arena. */
const struct shm_config *shm_arena_config(const struct shm_arena *arena);

/*
 * Check the pool and session table for the inconsistencies that attaching
 * repairs, without changing anything. Returns 0 and fills *report. For a
 * consistent arena every count except sessions_open and blocks_uncommitted
 * is zero; blocks_uncommitted counts the blocks rented for steps not yet
 * committed, which attaching would return to the pool.
 */
int shm_arena_check(struct shm_arena *arena, struct shm_repair *report);

/*
 * Text for an error code of this module: the SHM_ERR_* meanings, otherwise
 * the system's description of -err. Never returns NULL.
 */
const char *shm_strerror(int err);

/* Block pool (pool.c). */

/*
 * Rent a free block for a session (or for no session when owner is NULL) and
 * store its index in *block. The shape must be the one the pool was made for,
 * else SHM_ERR_SHAPE. Returns -ENOENT for an unknown owner handle and
 * -ENOSPC when no block is free; it never waits.
 */
int shm_pool_rent(struct shm_arena *arena, const struct shm_shape *shape,
		  const struct shm_handle *owner, uint32_t *block);

/*
 * Return a rented block that no committed block table references. Returns
 * -EINVAL for an index out of range or a block that is not rented, and
 * -EBUSY for a block in a committed block table (close the session or shift
 * instead).
 */
int shm_pool_return(struct shm_arena *arena, uint32_t block);

/* Copy the allocator statistics. */
int shm_pool_stats(const struct shm_arena *arena, struct shm_pool_stats *stats);

/* Session table (session.c). */

/*
 * Write a handle as an opaque string: 's' and 32 lowercase hex digits.
 * Returns -ENOSPC when size < SHM_HANDLE_STRLEN.
 */
int shm_handle_format(const struct shm_handle *handle, char *buf, size_t size);

/* Parse a string written by shm_handle_format. Returns -EINVAL if malformed. */
int shm_handle_parse(const char *text, struct shm_handle *handle);

/*
 * Open a session in a free slot, with a new generation and a secret from
 * getrandom, and write its handle. Returns -EINVAL for invalid parameters,
 * -ENOSPC when every slot is in use, or the error of getrandom.
 */
int shm_session_open(struct shm_arena *arena,
		     const struct shm_session_params *params,
		     struct shm_handle *handle);

/*
 * Check that a handle names an open session: slot, generation and secret
 * (the secret compared in constant time). Returns -ENOENT for any mismatch,
 * without saying which part was wrong.
 */
int shm_session_lookup(const struct shm_arena *arena,
		       const struct shm_handle *handle);

/* Look up a handle and fill *info. Returns -ENOENT like shm_session_lookup. */
int shm_session_get(const struct shm_arena *arena,
		    const struct shm_handle *handle,
		    struct shm_session_info *info);

/*
 * Fill *info for the session in a slot, including its handle; for iterating
 * sessions after a restart. Returns -EINVAL for a slot out of range and
 * -ENOENT when the slot holds no open session.
 */
int shm_session_at(const struct shm_arena *arena, uint32_t slot,
		   struct shm_session_info *info);

/* Set a session's last-use time to now. Returns -ENOENT for a bad handle. */
int shm_session_touch(struct shm_arena *arena, const struct shm_handle *handle);

/*
 * Commit n_tokens new positions: append their token ids and the n_new_blocks
 * blocks rented for them to the session's block table, then advance the
 * committed length. The new blocks must be rented to this session and the
 * table must end up with exactly ceil(length / block_tokens) entries. Returns
 * SHM_ERR_CONTEXT_FULL past the context limit, -EINVAL for a wrong block
 * count, a foreign or duplicate block or a negative token id, and -ENOENT for
 * a bad handle. A crash at any instant leaves the old or the new state.
 */
int shm_session_commit(struct shm_arena *arena, const struct shm_handle *handle,
		       const int32_t *tokens, uint32_t n_tokens,
		       const uint32_t *new_blocks, uint32_t n_new_blocks);

/*
 * Replace a session's committed state after a context shift: the new token
 * ids and a new block table, with exactly ceil(n_tokens / block_tokens)
 * entries. Each block must be in the old table or rented to this session.
 * Blocks of the old table that the new one does not contain go back to the
 * pool. Errors as shm_session_commit. A crash at any instant leaves the old
 * or the new state.
 */
int shm_session_commit_shift(struct shm_arena *arena,
			     const struct shm_handle *handle,
			     const int32_t *tokens, uint32_t n_tokens,
			     const uint32_t *blocks, uint32_t n_blocks);

/*
 * Close a session and return all its blocks, committed or only rented, to
 * the pool. Its handle is rejected afterwards. Returns -ENOENT for a bad
 * handle. A close interrupted by a crash is finished by the next attach.
 */
int shm_session_close(struct shm_arena *arena, const struct shm_handle *handle);

#endif /* SLABD_SHM_H */
