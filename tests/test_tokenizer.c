/*
 * Tests of the tokenizer and the streaming detokenizer of worker/tokenizer.c
 * with the two vocabularies in SLAB_MODELS: tok512.bin (512 pieces, the
 * stories260K vocabulary) and tokenizer.bin (the 32000-piece Llama 2
 * vocabulary). Text is decoded the way a server streams it: every id after
 * BOS goes through engine_detokenize(), starting from BOS, and
 * engine_detokenize_flush() ends the stream.
 */
#include "worker/engine.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * Seconds each test may run. One value for all, because the Criterion
 * 2.4.1 runner leaks memory when the tests of one run have different
 * timeouts, and LeakSanitizer then fails a sanitized binary at exit.
 */
#define TEST_TIMEOUT 30

#define LLAMA2_VOCAB 32000
#define TOK512_VOCAB 512

/* Room for the output of one engine_detokenize() call. */
#define CHUNK_BYTES 4096


/* ---- Helpers ------------------------------------------------------------ */

/* Returns SLAB_MODELS/name in a malloc'd string. */
static char *model_path(const char *name)
{
	const char *models = getenv("SLAB_MODELS");
	char *path;

	cr_assert_not_null(models, "SLAB_MODELS is not set; set it to the "
			   "folder that contains %s", name);
	cr_assert(asprintf(&path, "%s/%s", models, name) > 0);
	return path;
}


static struct engine_tokenizer *open_tokenizer(const char *name,
					       int32_t vocab_size)
{
	struct engine_tokenizer *tokenizer = NULL;
	struct engine_error err = { { 0 } };
	char *path = model_path(name);
	int rc = engine_tokenizer_open(path, vocab_size, &tokenizer, &err);

	cr_assert_eq(rc, 0, "engine_tokenizer_open(%s) returned %d: %s", path,
		     rc, err.message);
	free(path);
	return tokenizer;
}


/* Encodes len bytes of text with BOS first into a malloc'd array. */
static int32_t *encode(const struct engine_tokenizer *tokenizer,
		       const char *text, size_t len, size_t *n_ids)
{
	size_t capacity = len + 2;
	int32_t *ids = malloc(capacity * sizeof(int32_t));
	int rc;

	cr_assert_not_null(ids);
	rc = engine_tokenize(tokenizer, text, len, true, ids, capacity, n_ids);
	cr_assert_eq(rc, 0, "engine_tokenize of %zu bytes returned %d", len,
		     rc);
	cr_assert_geq(*n_ids, 1);
	cr_assert_eq(ids[0], ENGINE_TOKEN_BOS);
	for (size_t i = 0; i < *n_ids; i++)
		cr_assert(ids[i] >= 0 &&
				  ids[i] < engine_tokenizer_vocab_size(tokenizer),
			  "id %zu is %d, outside the vocabulary", i, ids[i]);
	return ids;
}


struct text {
	char *bytes;
	size_t len;
	size_t capacity;
};


static void text_append(struct text *text, const char *bytes, size_t len)
{
	if (text->len + len + 1 > text->capacity) {
		text->capacity = 2 * (text->len + len + 1);
		text->bytes = realloc(text->bytes, text->capacity);
		cr_assert_not_null(text->bytes);
	}
	memcpy(text->bytes + text->len, bytes, len);
	text->len += len;
	text->bytes[text->len] = '\0';
}


/*
 * Returns whether s[0..len) is well-formed UTF-8: no stray continuation
 * bytes, no overlong forms, no surrogates, nothing above U+10FFFF and no
 * character cut off at the end.
 */
static bool is_valid_utf8(const char *s, size_t len)
{
	const uint8_t *p = (const uint8_t *)s;
	size_t i = 0;

	while (i < len) {
		uint8_t c = p[i];
		size_t need;
		uint8_t low = 0x80, high = 0xBF;

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF) {
			need = 1;
		} else if (c >= 0xE0 && c <= 0xEF) {
			need = 2;
			if (c == 0xE0)
				low = 0xA0;
			if (c == 0xED)
				high = 0x9F;
		} else if (c >= 0xF0 && c <= 0xF4) {
			need = 3;
			if (c == 0xF0)
				low = 0x90;
			if (c == 0xF4)
				high = 0x8F;
		} else {
			return false;
		}
		if (i + need >= len)
			return false;
		if (p[i + 1] < low || p[i + 1] > high)
			return false;
		for (size_t j = 2; j <= need; j++)
			if ((p[i + j] & 0xC0) != 0x80)
				return false;
		i += need + 1;
	}
	return true;
}


/*
 * Decodes ids[1..n_ids) (ids[0] is BOS) through the streaming detokenizer
 * and returns the text. When check_each_chunk is set, asserts after every
 * call that the text so far is valid UTF-8.
 */
static struct text decode(const struct engine_tokenizer *tokenizer,
			  const int32_t *ids, size_t n_ids,
			  bool check_each_chunk)
{
	struct engine_detokenizer detokenizer;
	struct text text = { 0 };
	char chunk[CHUNK_BYTES];

	text_append(&text, "", 0);
	engine_detokenizer_init(&detokenizer, ids[0]);
	for (size_t i = 1; i < n_ids; i++) {
		size_t len = engine_detokenize(tokenizer, &detokenizer, ids[i],
					       chunk, sizeof(chunk));

		cr_assert_leq(len, sizeof(chunk));
		text_append(&text, chunk, len);
		if (check_each_chunk)
			cr_assert(is_valid_utf8(text.bytes, text.len),
				  "after id %zu (%d) the streamed text of %zu "
				  "bytes is not valid UTF-8", i, ids[i],
				  text.len);
	}
	text_append(&text, chunk,
		    engine_detokenize_flush(&detokenizer, chunk, sizeof(chunk)));
	return text;
}


/* Returns a malloc'd copy of s with \xHH for backslashes and unprintables. */
static char *escape(const char *s, size_t len)
{
	char *out = malloc(4 * len + 1);
	size_t at = 0;

	cr_assert_not_null(out);
	for (size_t i = 0; i < len; i++) {
		uint8_t c = (uint8_t)s[i];

		if (c >= 0x20 && c < 0x7F && c != '\\')
			out[at++] = (char)c;
		else
			at += (size_t)sprintf(out + at, "\\x%02X", c);
	}
	out[at] = '\0';
	return out;
}


/* Asserts that text survives encode and streaming decode unchanged. */
static void assert_round_trip(const struct engine_tokenizer *tokenizer,
			      const char *name, const char *bytes, size_t len)
{
	size_t n_ids;
	int32_t *ids = encode(tokenizer, bytes, len, &n_ids);
	struct text decoded = decode(tokenizer, ids, n_ids, true);

	if (decoded.len != len || memcmp(decoded.bytes, bytes, len) != 0) {
		char *want = escape(bytes, len);
		char *got = escape(decoded.bytes, decoded.len);

		cr_assert_fail("%s: \"%s\" decodes to \"%s\"", name, want, got);
	}
	free(ids);
	free(decoded.bytes);
}


/* ---- Known encodings ---------------------------------------------------- */

Test(tokenizer_llama2, vocabulary_cases, .timeout = TEST_TIMEOUT)
{
	struct engine_tokenizer *tokenizer = open_tokenizer("tokenizer.bin",
							    LLAMA2_VOCAB);
	/* The expected encodings sit in golden/ beside the models folder. */
	char *path = model_path("../golden/tokenizer-llama2-vocab.tsv");
	char *line = NULL;
	size_t capacity = 0;
	ssize_t length;
	int cases = 0;
	FILE *file;

	file = fopen(path, "r");
	cr_assert_not_null(file, "%s: %s", path, strerror(errno));

	while ((length = getline(&line, &capacity, file)) >= 0) {
		int32_t expected[256];
		size_t n_expected = 0, n_ids;
		char *tab, *cursor;

		if (length > 0 && line[length - 1] == '\n')
			line[--length] = '\0';
		if (line[0] == '#' || length == 0)
			continue;
		tab = strchr(line, '\t');
		cr_assert_not_null(tab, "%s: line without a tab: %s", path, line);
		*tab = '\0';

		cursor = tab + 1;
		for (;;) {
			char *end;
			long id = strtol(cursor, &end, 10);

			if (end == cursor)
				break;
			cr_assert_lt(n_expected, 256);
			expected[n_expected++] = (int32_t)id;
			cursor = end;
		}

		int32_t *ids = encode(tokenizer, line, strlen(line), &n_ids);

		cr_assert_eq(n_ids, n_expected, "\"%s\": %zu ids, expected %zu",
			     line, n_ids, n_expected);
		for (size_t i = 0; i < n_ids; i++)
			cr_assert_eq(ids[i], expected[i],
				     "\"%s\": id %zu is %d, expected %d", line,
				     i, ids[i], expected[i]);
		free(ids);
		cases++;
	}
	cr_assert_geq(cases, 3, "%s holds only %d cases", path, cases);
	free(line);
	fclose(file);
	free(path);
	engine_tokenizer_close(tokenizer);
}


Test(tokenizer_tok512, once_upon_a_time, .timeout = TEST_TIMEOUT)
{
	static const int32_t expected[] = { 1, 403, 407, 261, 378 };
	struct engine_tokenizer *tokenizer = open_tokenizer("tok512.bin",
							    TOK512_VOCAB);
	const char *text = "Once upon a time";
	size_t n_ids;
	int32_t *ids = encode(tokenizer, text, strlen(text), &n_ids);

	cr_assert_eq(engine_tokenizer_vocab_size(tokenizer), TOK512_VOCAB);
	cr_assert_eq(n_ids, 5);
	for (size_t i = 0; i < n_ids; i++)
		cr_assert_eq(ids[i], expected[i], "id %zu is %d, expected %d",
			     i, ids[i], expected[i]);
	free(ids);
	engine_tokenizer_close(tokenizer);
}


Test(tokenizer_tok512, without_bos, .timeout = TEST_TIMEOUT)
{
	struct engine_tokenizer *tokenizer = open_tokenizer("tok512.bin",
							    TOK512_VOCAB);
	int32_t ids[8];
	size_t n_ids;

	cr_assert_eq(engine_tokenize(tokenizer, "Once upon a time", 16, false,
				     ids, 8, &n_ids), 0);
	cr_assert_eq(n_ids, 4);
	cr_assert_eq(ids[0], 403);
	cr_assert_eq(ids[3], 378);

	cr_assert_eq(engine_tokenize(tokenizer, "", 0, false, ids, 8, &n_ids),
		     0);
	cr_assert_eq(n_ids, 0, "empty text without BOS gave %zu ids", n_ids);
	engine_tokenizer_close(tokenizer);
}


Test(token_bytes, strips_space_only_after_bos, .timeout = TEST_TIMEOUT)
{
	struct engine_tokenizer *tokenizer = open_tokenizer("tok512.bin",
							    TOK512_VOCAB);
	size_t len;
	const char *bytes;

	/* 403 is " Once" in tok512. */
	bytes = engine_token_bytes(tokenizer, ENGINE_TOKEN_BOS, 403, &len);
	cr_assert_eq(len, 4);
	cr_assert(memcmp(bytes, "Once", 4) == 0);
	bytes = engine_token_bytes(tokenizer, 378, 403, &len);
	cr_assert_eq(len, 5);
	cr_assert(memcmp(bytes, " Once", 5) == 0);

	engine_token_bytes(tokenizer, 378, ENGINE_TOKEN_BOS, &len);
	cr_assert_eq(len, 0, "BOS has %zu bytes of text", len);
	engine_token_bytes(tokenizer, 378, ENGINE_TOKEN_EOS, &len);
	cr_assert_eq(len, 0, "EOS has %zu bytes of text", len);
	engine_token_bytes(tokenizer, 378, TOK512_VOCAB, &len);
	cr_assert_eq(len, 0, "an id outside the vocabulary has text");

	/* Byte pieces <0xHH> are ids 3 to 258 and stand for byte HH. */
	bytes = engine_token_bytes(tokenizer, ENGINE_TOKEN_BOS, 3 + 0xE6, &len);
	cr_assert_eq(len, 1);
	cr_assert_eq((uint8_t)bytes[0], 0xE6);
	engine_tokenizer_close(tokenizer);
}


/* ---- Round trips -------------------------------------------------------- */

struct sample_text {
	const char *name;
	const char *bytes;
	size_t len; /* 0 means strlen(bytes) */
};

static const struct sample_text sample_texts[] = {
	{ "empty", "", 0 },
	{ "ascii", "Once upon a time, there was a little girl named Lily.", 0 },
	{ "leading space", " leading space", 0 },
	{ "two leading spaces", "  two leading spaces", 0 },
	{ "trailing space", "trailing space ", 0 },
	{ "only spaces", "   ", 0 },
	{ "accented", "héllo wörld, café naïve façade Ångström", 0 },
	{ "latin symbols", "ñ ü ß ø å € © ½ ¿¡", 0 },
	{ "cjk", "日本語のテキストと中文字符", 0 },
	{ "korean", "안녕하세요 세계", 0 },
	{ "greek and cyrillic", "Ωμέγα и Привет", 0 },
	{ "arabic and devanagari", "مرحبا नमस्ते", 0 },
	{ "emoji", "emoji 😀🎉 👍🏽 🇫🇷", 0 },
	{ "emoji first", "😀 starts the text", 0 },
	{ "control characters", "a\x01\x02\x1f b\ttab\nnewline\r\n\x7f end", 0 },
	{ "nul byte", "before\0after", 12 },
	{ "newline first", "\nnew paragraph", 0 },
	{ "digits and punctuation", "3.14159 <= x; {y: [1, 2]} #@!$%^&*()", 0 },
	{ "replacement character", "\xEF\xBF\xBD itself", 0 },
	{ "noncharacter", "\xEF\xBF\xBF and U+10FFFF \xF4\x8F\xBF\xBF", 0 },
};


static void check_sample_texts(const char *file, int32_t vocab_size)
{
	struct engine_tokenizer *tokenizer = open_tokenizer(file, vocab_size);

	for (size_t i = 0; i < sizeof(sample_texts) / sizeof(sample_texts[0]);
	     i++) {
		const struct sample_text *t = &sample_texts[i];

		assert_round_trip(tokenizer, t->name, t->bytes,
				  t->len != 0 ? t->len : strlen(t->bytes));
	}
	engine_tokenizer_close(tokenizer);
}


Test(round_trip, sample_texts_tok512, .timeout = TEST_TIMEOUT)
{
	check_sample_texts("tok512.bin", TOK512_VOCAB);
}


Test(round_trip, sample_texts_llama2, .timeout = TEST_TIMEOUT)
{
	check_sample_texts("tokenizer.bin", LLAMA2_VOCAB);
}


/* splitmix64 step, for reproducible random text. */
static uint64_t next_random(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}


/* Appends the UTF-8 form of code point cp (not a surrogate) to out. */
static size_t put_code_point(char *out, uint32_t cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}


/*
 * Fills out with up to 40 random code points drawn from ASCII, Latin,
 * CJK, emoji and the whole Unicode range (surrogates skipped), and
 * returns the byte count.
 */
static size_t random_utf8(char *out, uint64_t *state)
{
	static const uint32_t ranges[][2] = {
		{ 0x00, 0x7F },        { 0x20, 0x7E },      { 0xA0, 0x24F },
		{ 0x370, 0x4FF },      { 0x4E00, 0x9FFF },  { 0x1F300, 0x1FAFF },
		{ 0x80, 0x10FFFF },
	};
	size_t n_chars = next_random(state) % 41;
	size_t len = 0;

	for (size_t i = 0; i < n_chars; i++) {
		const uint32_t *range =
			ranges[next_random(state) % (sizeof(ranges) /
						     sizeof(ranges[0]))];
		uint32_t cp = range[0] + (uint32_t)(next_random(state) %
						    (range[1] - range[0] + 1));

		if (cp >= 0xD800 && cp <= 0xDFFF)
			cp = 0xFFFD;
		len += put_code_point(out + len, cp);
	}
	return len;
}


static void check_random_texts(const char *file, int32_t vocab_size)
{
	struct engine_tokenizer *tokenizer = open_tokenizer(file, vocab_size);
	uint64_t state = 20240611;
	char text[41 * 4];

	for (int i = 0; i < 300; i++) {
		size_t len = random_utf8(text, &state);
		char name[32];

		snprintf(name, sizeof(name), "random text %d", i);
		assert_round_trip(tokenizer, name, text, len);
	}
	engine_tokenizer_close(tokenizer);
}


Test(round_trip, random_utf8_tok512, .timeout = TEST_TIMEOUT)
{
	check_random_texts("tok512.bin", TOK512_VOCAB);
}


Test(round_trip, random_utf8_llama2, .timeout = TEST_TIMEOUT)
{
	check_random_texts("tokenizer.bin", LLAMA2_VOCAB);
}


/* ---- Streaming and invalid input ---------------------------------------- */

static void check_streaming(const char *file, int32_t vocab_size)
{
	struct engine_tokenizer *tokenizer = open_tokenizer(file, vocab_size);
	const char *text = "café 日本 😀 naïve über 👍🏽 €5";
	size_t n_ids, n_multibyte_pieces = 0;
	int32_t *ids = encode(tokenizer, text, strlen(text), &n_ids);

	/* The test only means something if characters are split over ids. */
	for (size_t i = 1; i < n_ids; i++) {
		size_t len;
		const char *bytes = engine_token_bytes(tokenizer, ids[i - 1],
						       ids[i], &len);

		if (len == 1 && (uint8_t)bytes[0] >= 0x80)
			n_multibyte_pieces++;
	}
	cr_assert_geq(n_multibyte_pieces, 4,
		      "%s encodes the text with only %zu byte-fallback pieces",
		      file, n_multibyte_pieces);

	struct text decoded = decode(tokenizer, ids, n_ids, true);

	cr_assert_str_eq(decoded.bytes, text);
	free(decoded.bytes);
	free(ids);
	engine_tokenizer_close(tokenizer);
}


Test(detokenizer, streams_whole_characters_tok512, .timeout = TEST_TIMEOUT)
{
	check_streaming("tok512.bin", TOK512_VOCAB);
}


Test(detokenizer, streams_whole_characters_llama2, .timeout = TEST_TIMEOUT)
{
	check_streaming("tokenizer.bin", LLAMA2_VOCAB);
}


/*
 * Invalid UTF-8 and its expected decoding. Each maximal invalid subpart
 * becomes one U+FFFD: the longest start of a well-formed sequence that
 * breaks off, or else a single byte, so a surrogate's three bytes give
 * three replacements.
 */
static const struct {
	const char *name;
	const char *input;
	const char *expected;
} invalid_texts[] = {
	{ "lone 0xFF", "\xFF", "\xEF\xBF\xBD" },
	{ "stray continuation", "abc\x80" "def", "abc\xEF\xBF\xBD" "def" },
	{ "lead without continuation", "\xC3(", "\xEF\xBF\xBD(" },
	{ "truncated at end", "x\xE2\x82", "x\xEF\xBF\xBD" },
	{ "truncated four-byte", "\xF0\x9F\x98!", "\xEF\xBF\xBD!" },
	{ "surrogate", "\xED\xA0\x80",
	  "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" },
	{ "overlong slash", "\xC0\xAF", "\xEF\xBF\xBD\xEF\xBF\xBD" },
	{ "above U+10FFFF", "\xF4\x90\x80\x80",
	  "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD" },
	{ "between valid characters", "é\xFFé", "é\xEF\xBF\xBDé" },
	{ "two lead bytes", "\xE6\xE6\x97\xA5", "\xEF\xBF\xBD日" },
};


static void check_invalid_texts(const char *file, int32_t vocab_size)
{
	struct engine_tokenizer *tokenizer = open_tokenizer(file, vocab_size);

	for (size_t i = 0; i < sizeof(invalid_texts) / sizeof(invalid_texts[0]);
	     i++) {
		const char *input = invalid_texts[i].input;
		size_t n_ids;
		int32_t *ids = encode(tokenizer, input, strlen(input), &n_ids);
		struct text decoded = decode(tokenizer, ids, n_ids, true);

		if (strcmp(decoded.bytes, invalid_texts[i].expected) != 0) {
			char *got = escape(decoded.bytes, decoded.len);
			char *want = escape(invalid_texts[i].expected,
					    strlen(invalid_texts[i].expected));

			cr_assert_fail("%s, %s: decodes to \"%s\", expected \"%s\"",
				file, invalid_texts[i].name, got, want);
		}
		free(ids);
		free(decoded.bytes);
	}
	engine_tokenizer_close(tokenizer);
}


Test(invalid_utf8, decodes_to_replacement_tok512, .timeout = TEST_TIMEOUT)
{
	check_invalid_texts("tok512.bin", TOK512_VOCAB);
}


Test(invalid_utf8, decodes_to_replacement_llama2, .timeout = TEST_TIMEOUT)
{
	check_invalid_texts("tokenizer.bin", LLAMA2_VOCAB);
}


Test(invalid_utf8, encodes_as_byte_pieces, .timeout = TEST_TIMEOUT)
{
	struct engine_tokenizer *tokenizer = open_tokenizer("tok512.bin",
							    TOK512_VOCAB);
	size_t n_ids, len;
	int32_t *ids = encode(tokenizer, "a\xFF\xC3", 3, &n_ids);
	const char *first, *second;

	cr_assert_geq(n_ids, 3);
	first = engine_token_bytes(tokenizer, ids[n_ids - 3], ids[n_ids - 2],
				   &len);
	cr_assert_eq(len, 1);
	cr_assert_eq((uint8_t)first[0], 0xFF, "second to last id %d is not "
		     "the byte piece of 0xFF", ids[n_ids - 2]);
	second = engine_token_bytes(tokenizer, ids[n_ids - 2], ids[n_ids - 1],
				    &len);
	cr_assert_eq(len, 1);
	cr_assert_eq((uint8_t)second[0], 0xC3, "last id %d is not the byte "
		     "piece of 0xC3", ids[n_ids - 1]);
	free(ids);
	engine_tokenizer_close(tokenizer);
}


/* ---- Buffer sizes ------------------------------------------------------- */

Test(tokenize, reports_needed_count, .timeout = TEST_TIMEOUT)
{
	struct engine_tokenizer *tokenizer = open_tokenizer("tok512.bin",
							    TOK512_VOCAB);
	const char *text = "Once upon a time";
	const int32_t sentinel = -77;
	int32_t ids[8];
	size_t n_ids = 0;
	int rc;

	for (size_t max_ids = 0; max_ids < 5; max_ids++) {
		for (size_t i = 0; i < 8; i++)
			ids[i] = sentinel;
		n_ids = 0;
		rc = engine_tokenize(tokenizer, text, strlen(text), true, ids,
				     max_ids, &n_ids);
		cr_assert_eq(rc, -ENOBUFS, "max_ids %zu: returned %d", max_ids,
			     rc);
		cr_assert_eq(n_ids, 5, "max_ids %zu: needed count %zu, "
			     "expected 5", max_ids, n_ids);
		for (size_t i = max_ids; i < 8; i++)
			cr_assert_eq(ids[i], sentinel, "max_ids %zu: id %zu "
				     "written", max_ids, i);
	}

	rc = engine_tokenize(tokenizer, text, strlen(text), true, ids, 5,
			     &n_ids);
	cr_assert_eq(rc, 0, "an exact fit returned %d", rc);
	cr_assert_eq(n_ids, 5);
	cr_assert_eq(ids[5], sentinel);
	engine_tokenizer_close(tokenizer);
}
