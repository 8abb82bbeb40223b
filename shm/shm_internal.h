/*
 * shm_internal.h - layout of the shared segments and the process-local arena.
 *
 * Types with the suffix _sh live in shared memory. They use fixed-width types
 * and offsets from the segment start, never pointers, because every process
 * maps the segments at its own address. Their sizes are fixed by
 * _Static_assert so that a layout change cannot go unnoticed; any change must
 * bump SHM_LAYOUT_VERSION.
 *
 * Control segment:
 *
 *   header        struct shm_header_sh
 *   pool_off      struct shm_pool_sh: statistics and free list length
 *   owner_off     _Atomic uint64_t owner[n_blocks]: who rented each block
 *   free_off      uint32_t free_stack[n_blocks]: free block indices, a stack
 *   slots_off     max_sessions slots of slot_stride bytes, each:
 *                   struct shm_slot_sh
 *                   uint32_t blocks[2][slot_max_blocks]  at slot_blocks_off
 *                   int32_t  tokens[2][max_context]      at slot_tokens_off
 *
 * KV segment:
 *
 *   header        struct shm_header_sh
 *   blocks_off    n_blocks blocks of block_stride bytes, page aligned
 */
#ifndef SLABD_SHM_INTERNAL_H
#define SLABD_SHM_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "shm.h"

#define SHM_MAGIC_KV  UINT64_C(0x564b2d4442414c53) /* "SLABD-KV" little-endian */
#define SHM_MAGIC_CTL UINT64_C(0x4c54432d42414c53) /* "SLAB-CTL" little-endian */
#define SHM_LAYOUT_VERSION 1

#define SHM_HEADER_BYTES 512
#define SHM_BLOCK_ALIGN 64
#define SHM_BLOCKS_ALIGN 4096

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2,
	       "shared-memory atomics must be lock-free to be address-free");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2,
	       "shared-memory atomics must be lock-free to be address-free");

/* Model shape as stored in a header, with the fields of struct shm_shape. */
struct shm_shape_sh {
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_size;
	uint32_t kv_type;
	uint32_t max_context;
	uint32_t reserved;
};

_Static_assert(sizeof(struct shm_shape_sh) == 24, "shm_shape_sh size");

/*
 * Header at offset 0 of both segments. Every field is written before ready
 * is set to 1 with a release store, so a reader that sees ready == 1 sees a
 * complete header. Fields that one kind of segment does not use are 0.
 */
struct shm_header_sh {
	uint64_t magic;            /* SHM_MAGIC_KV or SHM_MAGIC_CTL */
	uint32_t layout_version;   /* SHM_LAYOUT_VERSION */
	uint32_t header_bytes;     /* SHM_HEADER_BYTES */
	uint64_t instance_id;      /* random, equal in both segments */
	char instance[SHM_INSTANCE_MAX + 1]; /* NUL-padded instance name */
	int64_t created_ns;        /* CLOCK_REALTIME at creation */
	_Atomic int32_t owner_pid; /* creator, or the broker that attached last */
	uint32_t block_tokens;
	uint64_t total_bytes;      /* segment size */
	uint64_t block_bytes;
	uint64_t block_stride;
	uint64_t n_blocks;
	struct shm_shape_sh shape;
	uint32_t max_sessions;
	uint32_t slot_max_blocks;  /* ceil(max_context / block_tokens) */
	uint64_t blocks_off;       /* KV segment: block 0 */
	uint64_t pool_off;         /* control segment offsets from here on */
	uint64_t owner_off;
	uint64_t free_off;
	uint64_t slots_off;
	uint64_t slot_stride;
	uint64_t slot_blocks_off;  /* from the start of a slot */
	uint64_t slot_tokens_off;  /* from the start of a slot */
	_Atomic uint32_t ready;    /* 1 once the segment is fully initialized */
	uint32_t reserved0;
	uint8_t reserved[SHM_HEADER_BYTES - 240];
};

_Static_assert(sizeof(struct shm_header_sh) == SHM_HEADER_BYTES,
	       "shm_header_sh size");
_Static_assert(offsetof(struct shm_header_sh, ready) == 232,
	       "shm_header_sh field offsets");
_Static_assert(_Alignof(struct shm_header_sh) == 8, "shm_header_sh alignment");

/*
 * Pool state. free_count entries at the bottom of free_stack are free block
 * indices. The statistics are advisory: a crash can lose the update of the
 * operation it interrupted.
 */
struct shm_pool_sh {
	_Atomic uint64_t free_count;
	_Atomic uint64_t high_water;
	_Atomic uint64_t rents;
	_Atomic uint64_t returns;
	_Atomic uint64_t failed_rents;
	uint64_t reserved[3];
};

_Static_assert(sizeof(struct shm_pool_sh) == 64, "shm_pool_sh size");

/*
 * Owner word of a block, 0 when the block is free. A rented block has
 * SHM_OWNER_RENTED set, the owning slot + 1 in bits 32..62 and the session's
 * generation in bits 0..31. Slot + 1 is 0 for a block rented without a
 * session. Committed blocks keep the owner word of their session.
 */
#define SHM_OWNER_RENTED (UINT64_C(1) << 63)

static inline uint64_t shm_owner_word(uint32_t slot_plus_one, uint32_t generation)
{
	return SHM_OWNER_RENTED | ((uint64_t)slot_plus_one << 32) | generation;
}

enum shm_slot_state {
	SHM_SLOT_FREE = 0,
	SHM_SLOT_OPEN = 1,
	SHM_SLOT_CLOSING = 2,
};

/*
 * Commit word of a slot: which copy of the block table and tokens is current
 * (bit 63), the committed block count (bits 32..62) and the committed length
 * (bits 0..31). One aligned 64-bit store publishes all three at once.
 */
#define SHM_COMMIT_COPY_BIT (UINT64_C(1) << 63)

static inline uint64_t shm_commit_pack(uint32_t copy, uint32_t n_blocks,
				       uint32_t length)
{
	return ((uint64_t)(copy & 1) << 63) |
	       ((uint64_t)(n_blocks & 0x7fffffffu) << 32) | length;
}

static inline uint32_t shm_commit_copy(uint64_t word)
{
	return (uint32_t)(word >> 63);
}

static inline uint32_t shm_commit_blocks(uint64_t word)
{
	return (uint32_t)(word >> 32) & 0x7fffffffu;
}

static inline uint32_t shm_commit_length(uint64_t word)
{
	return (uint32_t)word;
}

/*
 * Fixed part of a session slot. generation, secret and the parameters are
 * written only while the slot is free, before the release store that opens
 * it.
 */
struct shm_slot_sh {
	_Atomic uint32_t state;      /* enum shm_slot_state */
	uint32_t generation;         /* incremented each time the slot opens */
	uint64_t secret;
	_Atomic uint64_t commit;     /* see shm_commit_pack */
	uint64_t seed;
	uint32_t context_limit;
	uint32_t policy;
	uint32_t n_keep;
	uint32_t reserved0;
	_Atomic int64_t last_use_ns; /* CLOCK_REALTIME */
	uint64_t reserved[1];
};

_Static_assert(sizeof(struct shm_slot_sh) == 64, "shm_slot_sh size");

/* Sizes and offsets derived from a configuration. */
struct shm_layout {
	uint64_t block_bytes;
	uint64_t block_stride;
	uint64_t blocks_off;
	uint64_t kv_bytes;
	uint32_t slot_max_blocks;
	uint64_t slot_blocks_off;
	uint64_t slot_tokens_off;
	uint64_t slot_stride;
	uint64_t pool_off;
	uint64_t owner_off;
	uint64_t free_off;
	uint64_t slots_off;
	uint64_t ctl_bytes;
};

/* Process-local view of both mapped segments. */
struct shm_arena {
	char instance[SHM_INSTANCE_MAX + 1];
	struct shm_config config;
	struct shm_layout layout;
	struct shm_kv_map kv;
	int ctl_fd;                    /* kept open for the flock */
	void *ctl_base;
	size_t ctl_size;
	struct shm_header_sh *ctl_header;
	struct shm_pool_sh *pool;
	_Atomic uint64_t *owner;       /* (n_blocks) */
	uint32_t *free_stack;          /* (n_blocks) */
	uint8_t *slots;                /* (max_sessions, slot_stride) */
	uint8_t *scratch;              /* (n_blocks) process-local marks, all 0 between calls */
};

/* segment.c */
int shm_config_validate(const struct shm_config *config);
int shm_layout_compute(const struct shm_config *config, struct shm_layout *layout);
void shm_header_init(struct shm_header_sh *header, uint64_t magic,
		     const char *instance, uint64_t instance_id,
		     const struct shm_config *config,
		     const struct shm_layout *layout);
int shm_header_check(const struct shm_header_sh *header, size_t file_size,
		     uint64_t magic, const char *instance,
		     struct shm_config *found, struct shm_mismatch *mismatch);
int shm_header_expect(const struct shm_header_sh *header,
		      const struct shm_config *expect, bool check_blocks,
		      struct shm_mismatch *mismatch);
int shm_segment_map(const char *name, int flags, int *fd_out, void **base,
		    size_t *size, struct shm_mismatch *mismatch);
void shm_kv_map_fill(struct shm_kv_map *kv, void *base, size_t size,
		     const struct shm_header_sh *header);
int64_t shm_now_ns(void);

/* session.c */
static inline struct shm_slot_sh *shm_slot(const struct shm_arena *arena,
					   uint32_t slot)
{
	return (struct shm_slot_sh *)(arena->slots +
				      (uint64_t)slot * arena->layout.slot_stride);
}

static inline uint32_t *shm_slot_blocks(const struct shm_arena *arena,
					struct shm_slot_sh *slot, uint32_t copy)
{
	uint8_t *p = (uint8_t *)slot + arena->layout.slot_blocks_off;

	return (uint32_t *)p + (uint64_t)copy * arena->layout.slot_max_blocks;
}

static inline int32_t *shm_slot_tokens(const struct shm_arena *arena,
				       struct shm_slot_sh *slot, uint32_t copy)
{
	uint8_t *p = (uint8_t *)slot + arena->layout.slot_tokens_off;

	return (int32_t *)p + (uint64_t)copy * arena->config.shape.max_context;
}

int shm_session_find(const struct shm_arena *arena,
		     const struct shm_handle *handle, struct shm_slot_sh **slot);

/* pool.c */
int shm_pool_init(struct shm_arena *arena);
int shm_pool_release(struct shm_arena *arena, uint32_t block);

/* recover.c */
int shm_recover(struct shm_arena *arena, bool apply, struct shm_repair *report);

#endif /* SLABD_SHM_INTERNAL_H */
