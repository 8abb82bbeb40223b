/*
 * recover.c - rebuild the block pool from the session table after a crash.
 *
 * The committed block tables are the source of truth. Attaching runs
 * shm_recover with apply set: every open session whose committed state is
 * valid keeps its blocks, and every other block becomes free. That includes
 * blocks rented for a step that was never committed: the broker that rented
 * them died with the step, and the step is sent again from the committed
 * length, so keeping them would only leak them. Sessions left closing are
 * closed, and sessions whose state is invalid or whose blocks collide with
 * an earlier slot's are dropped.
 *
 * Recovery is idempotent: it writes owner words and the free stack before it
 * frees any slot, so a crash during recovery leaves work that the next run
 * repeats with the same result.
 */
#include <stdlib.h>
#include <string.h>

#include "shm_internal.h"

enum slot_action {
	SLOT_KEEP = 0,
	SLOT_FREE, /* closing, dropped or unknown state: free after the pool */
};


/*
 * Claim the blocks of an open session in claim[] (slot + 1 per block).
 * Returns false without claiming anything when the committed state is
 * invalid: a length or block count out of range, a block out of range, a
 * block listed twice or already claimed, or a negative token id.
 */
static bool claim_session(const struct shm_arena *arena, uint32_t index,
			  struct shm_slot_sh *slot, uint32_t *claim)
{
	uint64_t commit = atomic_load_explicit(&slot->commit, memory_order_acquire);
	uint32_t copy = shm_commit_copy(commit);
	uint32_t length = shm_commit_length(commit);
	uint32_t n_blocks = shm_commit_blocks(commit);
	uint32_t bt = arena->config.block_tokens;
	const uint32_t *table;
	const int32_t *tokens;
	uint32_t i;

	if (slot->context_limit == 0 ||
	    slot->context_limit > arena->config.shape.max_context ||
	    length > slot->context_limit ||
	    n_blocks != (uint32_t)(((uint64_t)length + bt - 1) / bt) ||
	    n_blocks > arena->layout.slot_max_blocks ||
	    slot->policy > SHM_CONTEXT_SHIFT || slot->n_keep > slot->context_limit)
		return false;

	tokens = shm_slot_tokens(arena, slot, copy);
	for (i = 0; i < length; i++) {
		if (tokens[i] < 0)
			return false;
	}

	table = shm_slot_blocks(arena, slot, copy);
	for (i = 0; i < n_blocks; i++) {
		uint32_t b = table[i];

		if (b >= arena->config.n_blocks || claim[b] != 0)
			break;
		claim[b] = index + 1;
	}
	if (i == n_blocks)
		return true;

	/* Undo this slot's claims. A block listed twice was claimed only once. */
	for (uint32_t j = 0; j < i; j++)
		claim[table[j]] = 0;
	return false;
}


/*
 * Compare the stored free stack with the stored owner words, which agree
 * between calls: a block is on the stack exactly when its owner word is 0.
 * Returns how many blocks break that (invalid or duplicate entries, owned
 * blocks on the stack, unowned blocks missing from it), the trace of a
 * rent or return that a crash interrupted.
 */
static uint32_t free_list_differences(struct shm_arena *arena)
{
	uint32_t n = arena->config.n_blocks;
	uint64_t count = atomic_load_explicit(&arena->pool->free_count,
					      memory_order_acquire);
	uint32_t differences = 0;

	if (count > n) {
		differences += (uint32_t)(count - n > UINT32_MAX ? UINT32_MAX : count - n);
		count = n;
	}
	for (uint64_t i = 0; i < count; i++) {
		uint32_t b = arena->free_stack[i];

		if (b >= n || arena->scratch[b] != 0) {
			differences++;
			continue;
		}
		arena->scratch[b] = 1;
	}
	for (uint32_t b = 0; b < n; b++) {
		bool unowned = atomic_load_explicit(&arena->owner[b],
						    memory_order_relaxed) == 0;
		bool on_stack = arena->scratch[b] != 0;

		if (unowned != on_stack)
			differences++;
		arena->scratch[b] = 0;
	}
	return differences;
}


/*
 * Check the session table against the pool, and with apply set repair it.
 * Fills *report with what differed. Returns 0, or -ENOMEM when the
 * temporary arrays cannot be allocated (nothing is changed then).
 */
int shm_recover(struct shm_arena *arena, bool apply, struct shm_repair *report)
{
	uint32_t n = arena->config.n_blocks;
	uint32_t max_sessions = arena->config.max_sessions;
	uint32_t *claim;
	uint8_t *action;

	memset(report, 0, sizeof(*report));
	claim = calloc(n, sizeof(*claim));
	action = calloc(max_sessions, sizeof(*action));
	if (claim == NULL || action == NULL) {
		free(claim);
		free(action);
		return -ENOMEM;
	}

	/* Claim the committed blocks of every valid open session, in slot order. */
	for (uint32_t s = 0; s < max_sessions; s++) {
		struct shm_slot_sh *slot = shm_slot(arena, s);
		uint32_t state = atomic_load_explicit(&slot->state, memory_order_acquire);

		switch (state) {
		case SHM_SLOT_FREE:
			break;
		case SHM_SLOT_OPEN:
			if (claim_session(arena, s, slot, claim)) {
				report->sessions_open++;
			} else {
				report->sessions_dropped++;
				action[s] = SLOT_FREE;
			}
			break;
		case SHM_SLOT_CLOSING:
			report->sessions_closed++;
			action[s] = SLOT_FREE;
			break;
		default:
			report->slots_reset++;
			action[s] = SLOT_FREE;
			break;
		}
	}

	/* The stack against the owner words as they were left. */
	report->free_list_fixed = free_list_differences(arena);

	/* Owner words: claimed blocks belong to their session, others are free. */
	for (uint32_t b = 0; b < n; b++) {
		uint64_t word = atomic_load_explicit(&arena->owner[b], memory_order_relaxed);
		uint64_t expected = 0;

		if (claim[b] != 0) {
			struct shm_slot_sh *slot = shm_slot(arena, claim[b] - 1);

			expected = shm_owner_word(claim[b], slot->generation);
			if (word != expected)
				report->blocks_owner_fixed++;
		} else if (word != 0) {
			report->blocks_uncommitted++;
		}
		if (apply && word != expected)
			atomic_store_explicit(&arena->owner[b], expected, memory_order_release);
	}

	/* Free stack: rebuilt in descending order when any block changed state. */
	if (apply && (report->free_list_fixed != 0 || report->blocks_uncommitted != 0 ||
		      report->blocks_owner_fixed != 0)) {
		uint32_t count = 0;

		for (uint32_t b = n; b-- > 0;) {
			if (claim[b] == 0)
				arena->free_stack[count++] = b;
		}
		atomic_store_explicit(&arena->pool->free_count, count, memory_order_release);
	}

	/* Statistics follow the rebuilt pool. */
	if (apply) {
		uint64_t count = atomic_load_explicit(&arena->pool->free_count,
						      memory_order_relaxed);
		uint64_t in_use = n - count;

		if (in_use > atomic_load_explicit(&arena->pool->high_water, memory_order_relaxed))
			atomic_store_explicit(&arena->pool->high_water, in_use,
					      memory_order_relaxed);
	}

	/* Slots last, so a crash before this point repeats the same work. */
	for (uint32_t s = 0; apply && s < max_sessions; s++) {
		struct shm_slot_sh *slot = shm_slot(arena, s);

		if (action[s] != SLOT_FREE)
			continue;
		slot->secret = 0;
		atomic_store_explicit(&slot->commit, 0, memory_order_relaxed);
		atomic_store_explicit(&slot->state, SHM_SLOT_FREE, memory_order_release);
	}

	free(claim);
	free(action);
	return 0;
}
