/*
 * pool.c - the KV block pool: rent, return, statistics, size arithmetic.
 *
 * The free list is a stack of block indices in the control segment, and each
 * block has an owner word (see shm_owner_word). Only the broker changes
 * them, from one thread, so no lock protects them. The invariant between
 * calls: a block is in the free stack exactly when its owner word is 0. A
 * crash can break it for the one block being rented or returned, and
 * shm_recover rebuilds both from the committed block tables on attach.
 */
#include <string.h>

#include "shm_internal.h"


uint64_t shm_block_bytes(const struct shm_shape *shape, uint32_t block_tokens)
{
	uint64_t element, bytes;

	if (shape == NULL || block_tokens == 0 || shape->n_layers == 0 ||
	    shape->n_kv_heads == 0 || shape->head_size == 0)
		return 0;
	if (shape->kv_type == SHM_KV_F32)
		element = 4;
	else if (shape->kv_type == SHM_KV_F16)
		element = 2;
	else
		return 0;

	/* (n_layers, 2, block_tokens, n_kv_heads * head_size) elements. */
	bytes = (uint64_t)shape->n_layers * 2;
	if (__builtin_mul_overflow(bytes, (uint64_t)block_tokens, &bytes) ||
	    __builtin_mul_overflow(bytes, (uint64_t)shape->n_kv_heads, &bytes) ||
	    __builtin_mul_overflow(bytes, (uint64_t)shape->head_size, &bytes) ||
	    __builtin_mul_overflow(bytes, element, &bytes))
		return 0;
	return bytes;
}


int shm_parse_size(const char *text, uint64_t *bytes)
{
	uint64_t value = 0, unit = 1;
	const char *p = text;

	if (text == NULL || bytes == NULL)
		return -EINVAL;
	if (*p < '0' || *p > '9')
		return -EINVAL;

	for (; *p >= '0' && *p <= '9'; p++) {
		if (__builtin_mul_overflow(value, 10, &value) ||
		    __builtin_add_overflow(value, (uint64_t)(*p - '0'), &value))
			return -ERANGE;
	}
	switch (*p) {
	case '\0':
		break;
	case 'K': case 'k':
		unit = UINT64_C(1) << 10;
		p++;
		break;
	case 'M': case 'm':
		unit = UINT64_C(1) << 20;
		p++;
		break;
	case 'G': case 'g':
		unit = UINT64_C(1) << 30;
		p++;
		break;
	default:
		return -EINVAL;
	}
	if (*p != '\0' || value == 0)
		return -EINVAL;
	if (__builtin_mul_overflow(value, unit, &value))
		return -ERANGE;
	*bytes = value;
	return 0;
}


int shm_budget_blocks(uint64_t budget_bytes, const struct shm_shape *shape,
		      uint32_t block_tokens, uint32_t *n_blocks,
		      uint64_t *unused_bytes)
{
	uint64_t block_bytes = shm_block_bytes(shape, block_tokens);
	uint64_t stride, count;

	if (block_bytes == 0 || n_blocks == NULL)
		return -EINVAL;
	stride = (block_bytes + SHM_BLOCK_ALIGN - 1) / SHM_BLOCK_ALIGN * SHM_BLOCK_ALIGN;
	count = budget_bytes / stride;
	if (count == 0)
		return -EINVAL;
	if (count > SHM_MAX_BLOCKS)
		return -ERANGE;
	*n_blocks = (uint32_t)count;
	if (unused_bytes != NULL)
		*unused_bytes = budget_bytes - count * stride;
	return 0;
}


/* Fill the free stack so that blocks are rented in ascending order. */
int shm_pool_init(struct shm_arena *arena)
{
	uint32_t n = arena->config.n_blocks;

	for (uint32_t i = 0; i < n; i++) {
		atomic_store_explicit(&arena->owner[i], 0, memory_order_relaxed);
		arena->free_stack[i] = n - 1 - i;
	}
	atomic_store_explicit(&arena->pool->free_count, n, memory_order_release);
	return 0;
}


static bool shape_equal(const struct shm_shape *a, const struct shm_shape *b)
{
	return a->n_layers == b->n_layers && a->n_kv_heads == b->n_kv_heads &&
	       a->head_size == b->head_size && a->kv_type == b->kv_type &&
	       a->max_context == b->max_context;
}


static void counter_add(_Atomic uint64_t *counter)
{
	atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
}


int shm_pool_rent(struct shm_arena *arena, const struct shm_shape *shape,
		  const struct shm_handle *owner, uint32_t *block)
{
	uint64_t word = shm_owner_word(0, 0);
	uint64_t count, in_use;
	uint32_t b;

	if (arena == NULL || shape == NULL || block == NULL)
		return -EINVAL;
	if (!shape_equal(shape, &arena->config.shape))
		return SHM_ERR_SHAPE;
	if (owner != NULL) {
		struct shm_slot_sh *slot;
		int rc = shm_session_find(arena, owner, &slot);

		if (rc < 0)
			return rc;
		word = shm_owner_word(owner->slot + 1, owner->generation);
	}

	count = atomic_load_explicit(&arena->pool->free_count, memory_order_relaxed);
	if (count == 0) {
		counter_add(&arena->pool->failed_rents);
		return -ENOSPC;
	}
	if (count > arena->config.n_blocks)
		return -EUCLEAN;
	b = arena->free_stack[count - 1];
	if (b >= arena->config.n_blocks ||
	    atomic_load_explicit(&arena->owner[b], memory_order_relaxed) != 0)
		return -EUCLEAN;

	/*
	 * Owner word first, then the stack length. A crash in between leaves
	 * a block that is both on the stack and owned; recovery frees it.
	 */
	atomic_store_explicit(&arena->owner[b], word, memory_order_release);
	atomic_store_explicit(&arena->pool->free_count, count - 1, memory_order_release);
	counter_add(&arena->pool->rents);
	in_use = arena->config.n_blocks - (count - 1);
	if (in_use > atomic_load_explicit(&arena->pool->high_water, memory_order_relaxed))
		atomic_store_explicit(&arena->pool->high_water, in_use, memory_order_relaxed);
	*block = b;
	return 0;
}


/*
 * Push a rented block back onto the free stack. The caller has checked that
 * the block is rented and not committed. Returns -EUCLEAN when the stack is
 * already full, which only a corrupt pool allows; the block is then free by
 * its owner word and the next attach puts it back on the stack.
 */
int shm_pool_release(struct shm_arena *arena, uint32_t block)
{
	uint64_t count = atomic_load_explicit(&arena->pool->free_count,
					      memory_order_relaxed);

	/*
	 * Owner word first: a crash before the stack grows keeps the block
	 * off the stack only until recovery rebuilds the stack from the
	 * committed block tables.
	 */
	atomic_store_explicit(&arena->owner[block], 0, memory_order_release);
	if (count >= arena->config.n_blocks)
		return -EUCLEAN;
	arena->free_stack[count] = block;
	atomic_store_explicit(&arena->pool->free_count, count + 1, memory_order_release);
	counter_add(&arena->pool->returns);
	return 0;
}


/* Whether a block is in the committed block table of its owning session. */
static bool block_committed(const struct shm_arena *arena, uint32_t block,
			    uint64_t word)
{
	uint32_t slot_plus_one = (uint32_t)(word >> 32) & 0x7fffffffu;
	struct shm_slot_sh *slot;
	const uint32_t *table;
	uint64_t commit;
	uint32_t n;

	if (slot_plus_one == 0 || slot_plus_one > arena->config.max_sessions)
		return false;
	slot = shm_slot(arena, slot_plus_one - 1);
	if (atomic_load_explicit(&slot->state, memory_order_acquire) != SHM_SLOT_OPEN ||
	    slot->generation != (uint32_t)word)
		return false;

	commit = atomic_load_explicit(&slot->commit, memory_order_acquire);
	table = shm_slot_blocks(arena, slot, shm_commit_copy(commit));
	n = shm_commit_blocks(commit);
	for (uint32_t i = 0; i < n && i < arena->layout.slot_max_blocks; i++) {
		if (table[i] == block)
			return true;
	}
	return false;
}


int shm_pool_return(struct shm_arena *arena, uint32_t block)
{
	uint64_t word;

	if (arena == NULL || block >= arena->config.n_blocks)
		return -EINVAL;
	word = atomic_load_explicit(&arena->owner[block], memory_order_relaxed);
	if (word == 0)
		return -EINVAL;
	if (block_committed(arena, block, word))
		return -EBUSY;
	return shm_pool_release(arena, block);
}


int shm_pool_stats(const struct shm_arena *arena, struct shm_pool_stats *stats)
{
	uint64_t free_count;

	if (arena == NULL || stats == NULL)
		return -EINVAL;
	free_count = atomic_load_explicit(&arena->pool->free_count, memory_order_acquire);
	if (free_count > arena->config.n_blocks)
		free_count = arena->config.n_blocks;

	memset(stats, 0, sizeof(*stats));
	stats->blocks_total = arena->config.n_blocks;
	stats->blocks_in_use = arena->config.n_blocks - free_count;
	stats->high_water = atomic_load_explicit(&arena->pool->high_water, memory_order_relaxed);
	stats->rents = atomic_load_explicit(&arena->pool->rents, memory_order_relaxed);
	stats->returns = atomic_load_explicit(&arena->pool->returns, memory_order_relaxed);
	stats->failed_rents = atomic_load_explicit(&arena->pool->failed_rents,
						   memory_order_relaxed);
	return 0;
}
