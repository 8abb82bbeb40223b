/*
 * session.c - session table: handles, open, lookup, commit, shift, close.
 *
 * A slot is free, open or closing. Its committed state is one 64-bit commit
 * word (see shm_commit_pack): the current copy of two block tables and two
 * token arrays, the block count and the committed length. Only the broker
 * writes slots, from one thread. No other process reads the control segment
 * while the broker runs, so the ordering below exists for crash safety alone.
 *
 * Why a SIGKILL of the broker at any instant leaves the old or the new state:
 *
 *   - A commit writes token ids and block indices only past the committed
 *     length of the current copy (append), or only into the other copy
 *     (shift). Nothing there is part of the committed state yet.
 *   - It then publishes with a single release store of the commit word. An
 *     aligned 64-bit store is atomic, so a reader of the segment after the
 *     crash sees either the old word, with the old length, blocks and copy,
 *     or the new word, with data that the release ordering guarantees was
 *     written before it.
 *   - Blocks that leave the table (old blocks after a shift, all blocks on
 *     close) go back to the pool only after the store that removes them
 *     from the committed state. A crash before their return leaves them
 *     rented but uncommitted, and recovery returns them.
 *   - Opening writes generation, secret and parameters while the slot is
 *     free, then sets the state to open with a release store. Closing sets
 *     the state to closing first, so a crash half-way through returning the
 *     blocks is finished by recovery.
 */
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "shm_internal.h"


int shm_handle_format(const struct shm_handle *handle, char *buf, size_t size)
{
	if (handle == NULL || buf == NULL)
		return -EINVAL;
	if (size < SHM_HANDLE_STRLEN)
		return -ENOSPC;
	snprintf(buf, size, "s%08x%08x%016llx", handle->slot, handle->generation,
		 (unsigned long long)handle->secret);
	return 0;
}


static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}


/* Parse exactly `digits` lowercase hex digits. */
static int parse_hex(const char *text, int digits, uint64_t *value)
{
	uint64_t v = 0;

	for (int i = 0; i < digits; i++) {
		int d = hex_value(text[i]);

		if (d < 0)
			return -EINVAL;
		v = v << 4 | (uint64_t)d;
	}
	*value = v;
	return 0;
}


int shm_handle_parse(const char *text, struct shm_handle *handle)
{
	uint64_t slot, generation, secret;

	if (text == NULL || handle == NULL)
		return -EINVAL;
	if (text[0] != 's' || strnlen(text, SHM_HANDLE_STRLEN) != SHM_HANDLE_STRLEN - 1)
		return -EINVAL;
	if (parse_hex(text + 1, 8, &slot) < 0 ||
	    parse_hex(text + 9, 8, &generation) < 0 ||
	    parse_hex(text + 17, 16, &secret) < 0)
		return -EINVAL;

	handle->slot = (uint32_t)slot;
	handle->generation = (uint32_t)generation;
	handle->secret = secret;
	return 0;
}


/* 1 when a != b, computed without a branch on the secret's bits. */
static uint32_t secret_differs(uint64_t a, uint64_t b)
{
	uint64_t diff = a ^ b;

	return (uint32_t)((diff | (0 - diff)) >> 63);
}


/*
 * Find the open slot that a handle names. Returns -ENOENT for a slot out of
 * range, a slot that is not open, another generation or another secret, all
 * checked before the one branch on the result.
 */
int shm_session_find(const struct shm_arena *arena,
		     const struct shm_handle *handle, struct shm_slot_sh **slot_out)
{
	struct shm_slot_sh *slot;
	uint32_t wrong;

	if (arena == NULL || handle == NULL)
		return -ENOENT;
	if (handle->slot >= arena->config.max_sessions)
		return -ENOENT;

	slot = shm_slot(arena, handle->slot);
	wrong = (uint32_t)(atomic_load_explicit(&slot->state, memory_order_acquire) !=
			   SHM_SLOT_OPEN);
	wrong |= (uint32_t)(slot->generation != handle->generation);
	wrong |= secret_differs(slot->secret, handle->secret);
	if (wrong != 0)
		return -ENOENT;
	*slot_out = slot;
	return 0;
}


int shm_session_lookup(const struct shm_arena *arena,
		       const struct shm_handle *handle)
{
	struct shm_slot_sh *slot;

	return shm_session_find(arena, handle, &slot);
}


static void fill_info(const struct shm_arena *arena, uint32_t index,
		      struct shm_slot_sh *slot, struct shm_session_info *info)
{
	uint64_t commit = atomic_load_explicit(&slot->commit, memory_order_acquire);
	uint32_t copy = shm_commit_copy(commit);

	memset(info, 0, sizeof(*info));
	info->handle.slot = index;
	info->handle.generation = slot->generation;
	info->handle.secret = slot->secret;
	info->params.context_limit = slot->context_limit;
	info->params.policy = slot->policy;
	info->params.n_keep = slot->n_keep;
	info->params.seed = slot->seed;
	info->committed = shm_commit_length(commit);
	info->n_blocks = shm_commit_blocks(commit);
	info->last_use_ns = atomic_load_explicit(&slot->last_use_ns, memory_order_relaxed);
	info->blocks = shm_slot_blocks(arena, slot, copy);
	info->tokens = shm_slot_tokens(arena, slot, copy);
}


int shm_session_get(const struct shm_arena *arena,
		    const struct shm_handle *handle,
		    struct shm_session_info *info)
{
	struct shm_slot_sh *slot;
	int rc;

	if (info == NULL)
		return -EINVAL;
	rc = shm_session_find(arena, handle, &slot);
	if (rc < 0)
		return rc;
	fill_info(arena, handle->slot, slot, info);
	return 0;
}


int shm_session_at(const struct shm_arena *arena, uint32_t index,
		   struct shm_session_info *info)
{
	struct shm_slot_sh *slot;

	if (arena == NULL || info == NULL || index >= arena->config.max_sessions)
		return -EINVAL;
	slot = shm_slot(arena, index);
	if (atomic_load_explicit(&slot->state, memory_order_acquire) != SHM_SLOT_OPEN)
		return -ENOENT;
	fill_info(arena, index, slot, info);
	return 0;
}


static int draw_secret(uint64_t *secret)
{
	ssize_t n;

	/* Zero is the secret of a free slot, so draw again in that case. */
	do {
		n = getrandom(secret, sizeof(*secret), 0);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n >= 0 && n != (ssize_t)sizeof(*secret))
			return -EIO;
	} while (n < 0 || *secret == 0);
	return 0;
}


int shm_session_open(struct shm_arena *arena,
		     const struct shm_session_params *params,
		     struct shm_handle *handle)
{
	uint32_t max_context, limit, index;
	struct shm_slot_sh *slot = NULL;
	uint64_t secret;
	int rc;

	if (arena == NULL || params == NULL || handle == NULL)
		return -EINVAL;
	max_context = arena->config.shape.max_context;
	limit = params->context_limit == 0 ? max_context : params->context_limit;
	if (limit > max_context || params->n_keep > limit)
		return -EINVAL;
	if (params->policy != SHM_CONTEXT_ERROR && params->policy != SHM_CONTEXT_SHIFT)
		return -EINVAL;

	for (index = 0; index < arena->config.max_sessions; index++) {
		slot = shm_slot(arena, index);
		if (atomic_load_explicit(&slot->state, memory_order_acquire) == SHM_SLOT_FREE)
			break;
	}
	if (index == arena->config.max_sessions)
		return -ENOSPC;
	rc = draw_secret(&secret);
	if (rc < 0)
		return rc;

	/* The slot is free, so none of these stores is visible as a session. */
	slot->generation = slot->generation + 1 == 0 ? 1 : slot->generation + 1;
	slot->secret = secret;
	slot->seed = params->seed;
	slot->context_limit = limit;
	slot->policy = params->policy;
	slot->n_keep = params->n_keep;
	atomic_store_explicit(&slot->commit, shm_commit_pack(0, 0, 0), memory_order_relaxed);
	atomic_store_explicit(&slot->last_use_ns, shm_now_ns(), memory_order_relaxed);
	atomic_store_explicit(&slot->state, SHM_SLOT_OPEN, memory_order_release);

	handle->slot = index;
	handle->generation = slot->generation;
	handle->secret = secret;
	return 0;
}


int shm_session_touch(struct shm_arena *arena, const struct shm_handle *handle)
{
	struct shm_slot_sh *slot;
	int rc = shm_session_find(arena, handle, &slot);

	if (rc < 0)
		return rc;
	atomic_store_explicit(&slot->last_use_ns, shm_now_ns(), memory_order_relaxed);
	return 0;
}


static uint32_t blocks_for(const struct shm_arena *arena, uint32_t length)
{
	uint32_t bt = arena->config.block_tokens;

	return (uint32_t)(((uint64_t)length + bt - 1) / bt);
}


/*
 * Read a slot's commit word and check it against the slot's limits, which
 * only a corrupt segment can violate. Returns 0 or -EUCLEAN.
 */
static int load_commit(const struct shm_arena *arena, struct shm_slot_sh *slot,
		       uint32_t *copy, uint32_t *length, uint32_t *n_blocks)
{
	uint64_t commit = atomic_load_explicit(&slot->commit, memory_order_relaxed);

	*copy = shm_commit_copy(commit);
	*length = shm_commit_length(commit);
	*n_blocks = shm_commit_blocks(commit);
	if (slot->context_limit > arena->config.shape.max_context ||
	    *length > slot->context_limit ||
	    *n_blocks != blocks_for(arena, *length))
		return -EUCLEAN;
	return 0;
}


static int check_tokens(const int32_t *tokens, uint32_t n)
{
	if (n > 0 && tokens == NULL)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++) {
		if (tokens[i] < 0)
			return -EINVAL;
	}
	return 0;
}


/* Clear the scratch marks of a list of blocks, skipping indices out of range. */
static void unmark(struct shm_arena *arena, const uint32_t *blocks, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (blocks[i] < arena->config.n_blocks)
			arena->scratch[blocks[i]] = 0;
	}
}


/*
 * Check that each block is in range, owned by the session (owner word equal
 * to word) and listed once, counting blocks already marked in the scratch
 * area as listed. Leaves the listed blocks marked on success and no new
 * marks on failure. Returns 0 or -EINVAL.
 */
static int mark_owned_blocks(struct shm_arena *arena, const uint32_t *blocks,
			     uint32_t n, uint64_t word)
{
	uint32_t i;

	if (n > 0 && blocks == NULL)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		uint32_t b = blocks[i];

		if (b >= arena->config.n_blocks || arena->scratch[b] != 0 ||
		    atomic_load_explicit(&arena->owner[b], memory_order_relaxed) != word)
			break;
		arena->scratch[b] = 1;
	}
	if (i == n)
		return 0;
	unmark(arena, blocks, i);
	return -EINVAL;
}


int shm_session_commit(struct shm_arena *arena, const struct shm_handle *handle,
		       const int32_t *tokens, uint32_t n_tokens,
		       const uint32_t *new_blocks, uint32_t n_new_blocks)
{
	struct shm_slot_sh *slot;
	uint32_t copy, length, n_blocks, new_length;
	uint32_t *table;
	uint64_t word;
	int rc;

	rc = shm_session_find(arena, handle, &slot);
	if (rc < 0)
		return rc;
	rc = load_commit(arena, slot, &copy, &length, &n_blocks);
	if (rc < 0)
		return rc;
	table = shm_slot_blocks(arena, slot, copy);

	/* Validate everything before writing anything. */
	if (n_tokens > slot->context_limit - length)
		return SHM_ERR_CONTEXT_FULL;
	new_length = length + n_tokens;
	if ((uint64_t)n_blocks + n_new_blocks != blocks_for(arena, new_length))
		return -EINVAL;
	rc = check_tokens(tokens, n_tokens);
	if (rc < 0)
		return rc;
	word = shm_owner_word(handle->slot + 1, handle->generation);
	if (n_new_blocks > 0) {
		/* New blocks must be rented to the session and not committed yet. */
		for (uint32_t i = 0; i < n_blocks; i++) {
			if (table[i] < arena->config.n_blocks)
				arena->scratch[table[i]] = 1;
		}
		rc = mark_owned_blocks(arena, new_blocks, n_new_blocks, word);
		unmark(arena, table, n_blocks);
		if (rc < 0)
			return rc;
		unmark(arena, new_blocks, n_new_blocks);
	}

	/* Data past the committed length first, then the commit word. */
	if (n_tokens > 0)
		memcpy(shm_slot_tokens(arena, slot, copy) + length, tokens,
		       (size_t)n_tokens * sizeof(int32_t));
	if (n_new_blocks > 0)
		memcpy(table + n_blocks, new_blocks, (size_t)n_new_blocks * sizeof(uint32_t));
	atomic_store_explicit(&slot->commit,
			      shm_commit_pack(copy, n_blocks + n_new_blocks, new_length),
			      memory_order_release);
	atomic_store_explicit(&slot->last_use_ns, shm_now_ns(), memory_order_relaxed);
	return 0;
}


int shm_session_commit_shift(struct shm_arena *arena,
			     const struct shm_handle *handle,
			     const int32_t *tokens, uint32_t n_tokens,
			     const uint32_t *blocks, uint32_t n_blocks)
{
	struct shm_slot_sh *slot;
	uint32_t copy, old_length, old_n_blocks, next;
	const uint32_t *old_table;
	uint64_t word;
	int rc, first_error = 0;

	rc = shm_session_find(arena, handle, &slot);
	if (rc < 0)
		return rc;
	rc = load_commit(arena, slot, &copy, &old_length, &old_n_blocks);
	if (rc < 0)
		return rc;
	old_table = shm_slot_blocks(arena, slot, copy);
	next = copy ^ 1;

	if (n_tokens > slot->context_limit)
		return SHM_ERR_CONTEXT_FULL;
	if (n_blocks != blocks_for(arena, n_tokens))
		return -EINVAL;
	rc = check_tokens(tokens, n_tokens);
	if (rc < 0)
		return rc;
	word = shm_owner_word(handle->slot + 1, handle->generation);
	rc = mark_owned_blocks(arena, blocks, n_blocks, word);
	if (rc < 0)
		return rc;

	/* The other copy is not part of the committed state: fill it, then flip. */
	if (n_tokens > 0)
		memcpy(shm_slot_tokens(arena, slot, next), tokens,
		       (size_t)n_tokens * sizeof(int32_t));
	if (n_blocks > 0)
		memcpy(shm_slot_blocks(arena, slot, next), blocks,
		       (size_t)n_blocks * sizeof(uint32_t));
	atomic_store_explicit(&slot->commit, shm_commit_pack(next, n_blocks, n_tokens),
			      memory_order_release);
	atomic_store_explicit(&slot->last_use_ns, shm_now_ns(), memory_order_relaxed);

	/* Only now return the old blocks that the new table left out. */
	for (uint32_t i = 0; i < old_n_blocks; i++) {
		uint32_t b = old_table[i];

		if (b < arena->config.n_blocks && arena->scratch[b] == 0) {
			rc = shm_pool_release(arena, b);
			if (rc < 0 && first_error == 0)
				first_error = rc;
		}
	}
	unmark(arena, blocks, n_blocks);
	return first_error;
}


int shm_session_close(struct shm_arena *arena, const struct shm_handle *handle)
{
	struct shm_slot_sh *slot;
	uint64_t word;
	int rc, first_error = 0;

	rc = shm_session_find(arena, handle, &slot);
	if (rc < 0)
		return rc;
	word = shm_owner_word(handle->slot + 1, handle->generation);
	atomic_store_explicit(&slot->state, SHM_SLOT_CLOSING, memory_order_release);

	/* Every block with this session's owner word: committed or only rented. */
	for (uint32_t b = 0; b < arena->config.n_blocks; b++) {
		if (atomic_load_explicit(&arena->owner[b], memory_order_relaxed) != word)
			continue;
		rc = shm_pool_release(arena, b);
		if (rc < 0 && first_error == 0)
			first_error = rc;
	}

	slot->secret = 0;
	atomic_store_explicit(&slot->commit, 0, memory_order_relaxed);
	atomic_store_explicit(&slot->state, SHM_SLOT_FREE, memory_order_release);
	return first_error;
}
