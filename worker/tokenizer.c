/*
 * SentencePiece-style BPE tokenizer in the llama2.c file format: int32
 * max_token_length, then for each piece a float32 merge score, an int32
 * byte length and the bytes. Pieces `<0xHH>` stand for the raw byte HH and
 * are the fallback for text no other piece covers.
 *
 * Encoding follows SentencePiece with add_dummy_prefix: a space is put in
 * front of non-empty text, the text is split into UTF-8 characters, each
 * becomes its piece (or byte pieces), and then the adjacent pair whose
 * merged piece has the highest score is merged, leftmost first on ties,
 * until no pair merges.
 */
#include "worker/engine_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Longest piece accepted from a file, in bytes. */
#define MAX_PIECE_BYTES 1024
#define NO_TOKEN (-1)

struct engine_tokenizer {
	int32_t vocab_size;
	char **pieces;          /* (vocab_size) piece bytes, NUL-terminated */
	uint32_t *piece_len;    /* (vocab_size) */
	float *scores;          /* (vocab_size) */
	int32_t byte_token[256];/* piece id of each raw byte, or NO_TOKEN */
	int32_t *is_byte;       /* (vocab_size) byte + 1 for <0xHH>, else 0 */
	int32_t *table;         /* open-addressing hash of piece ids */
	uint32_t table_mask;
	char *storage;          /* every piece, back to back */
};


static uint32_t hash_bytes(const char *s, size_t len)
{
	uint32_t h = 2166136261u;

	for (size_t i = 0; i < len; i++) {
		h ^= (uint8_t)s[i];
		h *= 16777619u;
	}
	return h;
}


/* Returns the id of the piece with exactly these bytes, or NO_TOKEN. */
static int32_t lookup(const struct engine_tokenizer *t, const char *s,
		      size_t len)
{
	uint32_t slot = hash_bytes(s, len) & t->table_mask;

	for (;;) {
		int32_t id = t->table[slot];

		if (id == NO_TOKEN)
			return NO_TOKEN;
		if (t->piece_len[id] == len && memcmp(t->pieces[id], s, len) == 0)
			return id;
		slot = (slot + 1) & t->table_mask;
	}
}


/* Parses `<0xHH>` and returns HH + 1, or 0 for any other piece. */
static int32_t parse_byte_piece(const char *piece, size_t len)
{
	static const char digits[] = "0123456789ABCDEF";
	const char *hi, *lo;

	if (len != 6 || memcmp(piece, "<0x", 3) != 0 || piece[5] != '>')
		return 0;
	hi = memchr(digits, piece[3], 16);
	lo = memchr(digits, piece[4], 16);
	if (hi == NULL || lo == NULL)
		return 0;
	return (int32_t)((hi - digits) * 16 + (lo - digits)) + 1;
}


void engine_tokenizer_close(struct engine_tokenizer *t)
{
	if (t == NULL)
		return;
	free(t->pieces);
	free(t->piece_len);
	free(t->scores);
	free(t->is_byte);
	free(t->table);
	free(t->storage);
	free(t);
}


static int read_exact(FILE *file, void *buffer, size_t size)
{
	return fread(buffer, 1, size, file) == size ? 0 : -1;
}


/* Reads every piece of the file into t, which has room for vocab_size. */
static int read_pieces(const char *path, FILE *file, struct engine_tokenizer *t,
		       long file_size, struct engine_error *err)
{
	int32_t max_token_length;
	size_t used = 0;

	if (read_exact(file, &max_token_length, sizeof(max_token_length)) < 0)
		return engine_fail(err,
				   "%s: file is %ld bytes, too short for the "
				   "tokenizer header; expected a llama2.c "
				   "tokenizer file",
				   path, file_size);
	if (max_token_length <= 0 || max_token_length > MAX_PIECE_BYTES)
		return engine_fail(err,
				   "%s: max_token_length is %d, expected 1 to "
				   "%d; the file is not a llama2.c tokenizer",
				   path, (int)max_token_length, MAX_PIECE_BYTES);

	for (int32_t id = 0; id < t->vocab_size; id++) {
		float score;
		int32_t len;

		if (read_exact(file, &score, sizeof(score)) < 0 ||
		    read_exact(file, &len, sizeof(len)) < 0)
			return engine_fail(err,
					   "%s: the file ends after %d pieces, "
					   "expected %d pieces (the model's "
					   "vocab_size); use the tokenizer "
					   "that belongs to the model",
					   path, (int)id, (int)t->vocab_size);
		if (len < 0 || len > max_token_length)
			return engine_fail(err,
					   "%s: piece %d has length %d, expected "
					   "0 to max_token_length %d; the file is "
					   "not a llama2.c tokenizer or is corrupt",
					   path, (int)id, (int)len,
					   (int)max_token_length);
		if (used + (size_t)len + 1 > (size_t)file_size)
			return engine_fail(err, "%s: piece %d runs past the end "
					   "of the file", path, (int)id);
		if (read_exact(file, t->storage + used, (size_t)len) < 0)
			return engine_fail(err,
					   "%s: piece %d is truncated: expected "
					   "%d bytes",
					   path, (int)id, (int)len);
		t->storage[used + (size_t)len] = '\0';
		t->pieces[id] = t->storage + used;
		t->piece_len[id] = (uint32_t)len;
		t->scores[id] = score;
		used += (size_t)len + 1;
	}

	if (fgetc(file) != EOF)
		return engine_fail(err,
				   "%s: the file holds more than %d pieces, "
				   "expected exactly %d (the model's "
				   "vocab_size); use the tokenizer that "
				   "belongs to the model",
				   path, (int)t->vocab_size, (int)t->vocab_size);
	return 0;
}


/* Builds the piece hash table and the raw byte table. */
static int index_pieces(struct engine_tokenizer *t)
{
	uint32_t size = 1;

	while (size < (uint32_t)t->vocab_size * 2)
		size <<= 1;
	t->table = malloc(size * sizeof(int32_t));
	if (t->table == NULL)
		return -ENOMEM;
	t->table_mask = size - 1;
	for (uint32_t i = 0; i < size; i++)
		t->table[i] = NO_TOKEN;
	for (int i = 0; i < 256; i++)
		t->byte_token[i] = NO_TOKEN;

	for (int32_t id = 0; id < t->vocab_size; id++) {
		uint32_t slot = hash_bytes(t->pieces[id], t->piece_len[id]) &
				t->table_mask;
		int32_t byte = parse_byte_piece(t->pieces[id], t->piece_len[id]);

		t->is_byte[id] = byte;
		if (byte > 0 && t->byte_token[byte - 1] == NO_TOKEN)
			t->byte_token[byte - 1] = id;

		/* The first of duplicate pieces wins, as a sorted search would. */
		if (lookup(t, t->pieces[id], t->piece_len[id]) != NO_TOKEN)
			continue;
		while (t->table[slot] != NO_TOKEN)
			slot = (slot + 1) & t->table_mask;
		t->table[slot] = id;
	}
	return 0;
}


int engine_tokenizer_open(const char *path, int32_t vocab_size,
			  struct engine_tokenizer **out,
			  struct engine_error *err)
{
	struct engine_tokenizer *t;
	struct stat st;
	FILE *file;
	long file_size;
	int rc;

	if (vocab_size <= 0 || vocab_size > ENGINE_MAX_VOCAB)
		return engine_fail(err, "vocab size %d is out of range 1 to %d",
				   (int)vocab_size, ENGINE_MAX_VOCAB);
	file = fopen(path, "rbe");
	if (file == NULL) {
		rc = -errno;
		snprintf(err->message, sizeof(err->message),
			 "%s: cannot open the tokenizer file: %s; check the "
			 "--tokenizer path",
			 path, strerror(errno));
		return rc;
	}
	/*
	 * A folder opens for reading too, and on ext4 its end offset can be
	 * LLONG_MAX, which would become the size of the piece storage.
	 */
	if (fstat(fileno(file), &st) != 0 || !S_ISREG(st.st_mode)) {
		fclose(file);
		return engine_fail(err, "%s: not a regular file; expected a "
				   "llama2.c tokenizer file", path);
	}
	if (fseek(file, 0, SEEK_END) != 0 || (file_size = ftell(file)) < 0 ||
	    fseek(file, 0, SEEK_SET) != 0) {
		fclose(file);
		return engine_fail(err, "%s: not a seekable regular file", path);
	}

	t = calloc(1, sizeof(*t));
	if (t == NULL) {
		fclose(file);
		return -ENOMEM;
	}
	t->vocab_size = vocab_size;
	t->pieces = calloc((size_t)vocab_size, sizeof(char *));
	t->piece_len = calloc((size_t)vocab_size, sizeof(uint32_t));
	t->scores = calloc((size_t)vocab_size, sizeof(float));
	t->is_byte = calloc((size_t)vocab_size, sizeof(int32_t));
	t->storage = malloc((size_t)file_size + 1);
	if (t->pieces == NULL || t->piece_len == NULL || t->scores == NULL ||
	    t->is_byte == NULL || t->storage == NULL) {
		rc = -ENOMEM;
		goto err_free;
	}

	rc = read_pieces(path, file, t, file_size, err);
	if (rc < 0)
		goto err_free;
	rc = index_pieces(t);
	if (rc < 0)
		goto err_free;
	fclose(file);
	*out = t;
	return 0;

err_free:
	engine_tokenizer_close(t);
	fclose(file);
	return rc;
}


int32_t engine_tokenizer_vocab_size(const struct engine_tokenizer *t)
{
	return t->vocab_size;
}


/* Length of the UTF-8 character starting with byte c, or 1 if invalid. */
static size_t utf8_length(uint8_t c)
{
	if (c >= 0xF0 && c <= 0xF4)
		return 4;
	if (c >= 0xE0 && c <= 0xEF)
		return 3;
	if (c >= 0xC2 && c <= 0xDF)
		return 2;
	return 1;
}


/* Appends the pieces of text[0..len) before any merge to ids. */
static size_t split_characters(const struct engine_tokenizer *t,
			       const char *text, size_t len, int32_t *ids)
{
	size_t n = 0;
	size_t i = 0;

	while (i < len) {
		size_t char_len = utf8_length((uint8_t)text[i]);
		int32_t id;

		/* A character cut short or with bad continuations goes byte-wise. */
		if (i + char_len > len)
			char_len = 1;
		for (size_t j = 1; j < char_len; j++)
			if (((uint8_t)text[i + j] & 0xC0) != 0x80)
				char_len = 1;

		id = lookup(t, text + i, char_len);
		if (id != NO_TOKEN) {
			ids[n++] = id;
		} else {
			for (size_t j = 0; j < char_len; j++) {
				int32_t byte_id = t->byte_token[(uint8_t)text[i + j]];

				ids[n++] = byte_id == NO_TOKEN ? 0 : byte_id;
			}
		}
		i += char_len;
	}
	return n;
}


/*
 * Returns the id of the piece made of ids a and b, or NO_TOKEN. buffer has
 * room for two pieces.
 */
static int32_t merged_id(const struct engine_tokenizer *t, int32_t a, int32_t b,
			 char *buffer)
{
	size_t la = t->piece_len[a];
	size_t lb = t->piece_len[b];

	memcpy(buffer, t->pieces[a], la);
	memcpy(buffer + la, t->pieces[b], lb);
	return lookup(t, buffer, la + lb);
}


int engine_tokenize(const struct engine_tokenizer *t, const char *text,
		    size_t len, bool add_bos, int32_t *ids, size_t max_ids,
		    size_t *n_ids)
{
	char buffer[2 * MAX_PIECE_BYTES + 2];
	int32_t *work, *pair;
	size_t n = 0;

	/* Worst case: BOS, the dummy prefix, then one byte piece per byte. */
	work = malloc((len + 2) * sizeof(int32_t));
	pair = malloc((len + 2) * sizeof(int32_t));
	if (work == NULL || pair == NULL) {
		free(work);
		free(pair);
		return -ENOMEM;
	}

	if (len > 0) {
		int32_t space = lookup(t, " ", 1);

		if (space != NO_TOKEN)
			work[n++] = space;
		n += split_characters(t, text, len, work + n);
	}

	/* pair[i] is the merge of work[i] and work[i + 1], or NO_TOKEN. */
	for (size_t i = 0; i + 1 < n; i++)
		pair[i] = merged_id(t, work[i], work[i + 1], buffer);

	for (;;) {
		float best_score = -1e10f;
		size_t best = SIZE_MAX;

		for (size_t i = 0; i + 1 < n; i++) {
			if (pair[i] != NO_TOKEN && t->scores[pair[i]] > best_score) {
				best_score = t->scores[pair[i]];
				best = i;
			}
		}
		if (best == SIZE_MAX)
			break;

		work[best] = pair[best];
		memmove(work + best + 1, work + best + 2,
			(n - best - 2) * sizeof(int32_t));
		memmove(pair + best + 1, pair + best + 2,
			(n - best - 2) * sizeof(int32_t));
		n--;
		if (best > 0)
			pair[best - 1] = merged_id(t, work[best - 1], work[best],
						   buffer);
		if (best + 1 < n)
			pair[best] = merged_id(t, work[best], work[best + 1],
					       buffer);
	}

	size_t total = n + (add_bos ? 1 : 0);
	size_t out = 0;

	*n_ids = total;
	if (total > max_ids) {
		free(work);
		free(pair);
		return -ENOBUFS;
	}
	if (add_bos)
		ids[out++] = ENGINE_TOKEN_BOS;
	memcpy(ids + out, work, n * sizeof(int32_t));
	free(work);
	free(pair);
	return 0;
}


const char *engine_token_bytes(const struct engine_tokenizer *t,
			       int32_t previous, int32_t id, size_t *len)
{
	static const char raw_bytes[256] = {
#define B(x) (char)(x), (char)(x + 1), (char)(x + 2), (char)(x + 3)
#define B16(x) B(x), B(x + 4), B(x + 8), B(x + 12)
		B16(0), B16(16), B16(32), B16(48), B16(64), B16(80),
		B16(96), B16(112), B16(128), B16(144), B16(160), B16(176),
		B16(192), B16(208), B16(224), B16(240)
#undef B16
#undef B
	};
	const char *piece;

	/* Out-of-range ids and the BOS and EOS markers have no text. */
	if (id < 0 || id >= t->vocab_size || engine_is_end_token(id)) {
		*len = 0;
		return "";
	}
	if (t->is_byte[id] > 0) {
		*len = 1;
		return &raw_bytes[t->is_byte[id] - 1];
	}
	piece = t->pieces[id];
	*len = t->piece_len[id];
	if (previous == ENGINE_TOKEN_BOS && *len > 0 && piece[0] == ' ') {
		piece++;
		(*len)--;
	}
	return piece;
}


/* ---- Streaming detokenizer --------------------------------------------- */

static const char replacement[] = "\xEF\xBF\xBD"; /* U+FFFD */


void engine_detokenizer_init(struct engine_detokenizer *d, int32_t previous)
{
	memset(d, 0, sizeof(*d));
	d->previous = previous;
}


/* Whether c may follow the lead byte `lead` as the second byte. */
static bool valid_second(uint8_t lead, uint8_t c)
{
	switch (lead) {
	case 0xE0:
		return c >= 0xA0 && c <= 0xBF;
	case 0xED:
		return c >= 0x80 && c <= 0x9F;
	case 0xF0:
		return c >= 0x90 && c <= 0xBF;
	case 0xF4:
		return c >= 0x80 && c <= 0x8F;
	default:
		return (c & 0xC0) == 0x80;
	}
}


static size_t emit(char *out, size_t capacity, size_t at, const void *bytes,
		   size_t n)
{
	if (at + n > capacity)
		n = capacity > at ? capacity - at : 0;
	memcpy(out + at, bytes, n);
	return at + n;
}


/* Feeds one byte; appends whatever became complete to out. */
static size_t push_byte(struct engine_detokenizer *d, uint8_t c, char *out,
			size_t capacity, size_t at)
{
	if (d->n_pending > 0) {
		size_t need = utf8_length(d->pending[0]);
		bool fits = d->n_pending == 1 ? valid_second(d->pending[0], c)
					      : (c & 0xC0) == 0x80;

		if (fits) {
			d->pending[d->n_pending++] = c;
			if (d->n_pending == need) {
				at = emit(out, capacity, at, d->pending, need);
				d->n_pending = 0;
			}
			return at;
		}
		/* The pending character is broken: replace it, then go on with c. */
		at = emit(out, capacity, at, replacement, 3);
		d->n_pending = 0;
	}

	if (c < 0x80)
		return emit(out, capacity, at, &c, 1);
	if (utf8_length(c) > 1) {
		d->pending[0] = c;
		d->n_pending = 1;
		return at;
	}
	return emit(out, capacity, at, replacement, 3);
}


size_t engine_detokenize(const struct engine_tokenizer *t,
			 struct engine_detokenizer *d, int32_t id, char *out,
			 size_t capacity)
{
	size_t len;
	const char *bytes = engine_token_bytes(t, d->previous, id, &len);
	size_t at = 0;

	for (size_t i = 0; i < len; i++)
		at = push_byte(d, (uint8_t)bytes[i], out, capacity, at);
	d->previous = id;
	return at;
}


size_t engine_detokenize_flush(struct engine_detokenizer *d, char *out,
			       size_t capacity)
{
	size_t at = 0;

	if (d->n_pending > 0)
		at = emit(out, capacity, 0, replacement, 3);
	d->n_pending = 0;
	return at;
}
