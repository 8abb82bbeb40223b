/*
 * The inference engine: loads a Llama-family checkpoint and its tokenizer,
 * runs prefill and decode steps over a paged KV cache that lives in memory
 * the caller provides, and samples the next token.
 *
 * Every function returns 0 (or a count) on success and a negative errno value
 * on failure; functions that take a `struct engine_error` fill it with a
 * sentence naming the file, field, value and what was expected. Nothing here
 * logs.
 *
 * Determinism: every floating-point reduction (dot products, RMSNorm,
 * softmax, attention sums) runs in an order fixed by the model shape alone,
 * so logits are bitwise identical whatever the batch composition, the thread
 * count, or whether a position is computed in prefill or in decode.
 */
#ifndef SLAB_ENGINE_H
#define SLAB_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ENGINE_TOKEN_BOS 1
#define ENGINE_TOKEN_EOS 2

/* Upper bounds a checkpoint header must respect to be loaded. */
#define ENGINE_MAX_DIM 16384
#define ENGINE_MAX_HIDDEN_DIM 65536
#define ENGINE_MAX_LAYERS 256
#define ENGINE_MAX_HEADS 256
#define ENGINE_MAX_VOCAB 1048576
#define ENGINE_MAX_SEQ_LEN 1048576

struct engine_error {
	char message[512];
};

/* Model hyperparameters as read from a checkpoint header. */
struct engine_shape {
	int32_t dim;
	int32_t hidden_dim;
	int32_t n_layers;
	int32_t n_heads;
	int32_t n_kv_heads;
	int32_t vocab_size;
	int32_t seq_len;
	bool shared_classifier; /* classifier reuses the token embedding table */
};

static inline int32_t engine_head_size(const struct engine_shape *shape)
{
	return shape->dim / shape->n_heads;
}

static inline int32_t engine_kv_dim(const struct engine_shape *shape)
{
	return engine_head_size(shape) * shape->n_kv_heads;
}

/* ---- Model weights ---------------------------------------------------- */

/*
 * Weight type of a tensor. Float32 is the checkpoint format; the quantized
 * types keep blocks of 32 weights with one float16 scale.
 */
enum engine_weight_type {
	ENGINE_WEIGHT_F32 = 0,
	ENGINE_WEIGHT_Q8_0 = 1,
	ENGINE_WEIGHT_Q4_0 = 2,
};

/* Name of a weight type: "f32", "q8_0" or "q4_0" ("unknown" otherwise). */
const char *engine_weight_type_name(enum engine_weight_type type);

/*
 * The tensors of a model, in the order a llama2.c checkpoint stores them.
 * Each tensor is `matrices` matrices of (rows, cols) stored back to back:
 * one per layer for the layer tensors, one for the others.
 */
enum engine_tensor_id {
	ENGINE_TENSOR_TOKEN_EMBEDDING = 0, /* (vocab_size, dim) */
	ENGINE_TENSOR_RMS_ATT,             /* (layer, dim) */
	ENGINE_TENSOR_WQ,                  /* (layer, dim, dim) */
	ENGINE_TENSOR_WK,                  /* (layer, kv_dim, dim) */
	ENGINE_TENSOR_WV,                  /* (layer, kv_dim, dim) */
	ENGINE_TENSOR_WO,                  /* (layer, dim, dim) */
	ENGINE_TENSOR_RMS_FFN,             /* (layer, dim) */
	ENGINE_TENSOR_W1,                  /* (layer, hidden_dim, dim) */
	ENGINE_TENSOR_W2,                  /* (layer, dim, hidden_dim) */
	ENGINE_TENSOR_W3,                  /* (layer, hidden_dim, dim) */
	ENGINE_TENSOR_RMS_FINAL,           /* (dim) */
	ENGINE_TENSOR_CLASSIFIER,          /* (vocab_size, dim) */
	ENGINE_TENSOR_COUNT,
};

struct engine_tensor_dims {
	uint64_t matrices;
	uint64_t rows;
	uint64_t cols; /* the dot-product axis; quantized blocks run along it */
};

/* Dimensions of tensor id in a model of this shape. */
struct engine_tensor_dims engine_tensor_dims(const struct engine_shape *shape,
					     enum engine_tensor_id id);

/* Name of a tensor as error messages print it, such as "wq". */
const char *engine_tensor_name(enum engine_tensor_id id);

/*
 * True for the tensors a matrix product reads (wq ... w3 and the
 * classifier). Only these may be quantized; the token embedding and the
 * RMSNorm weights are always float32.
 */
bool engine_tensor_is_matrix(enum engine_tensor_id id);

/* ---- Quantized checkpoints ---------------------------------------------- */

/* Weights per quantization block, along the cols axis of a matrix. */
#define ENGINE_QUANT_BLOCK 32

/* 32 weights w[i] = d * qs[i]. The layout GGUF uses for Q8_0. */
struct engine_block_q8_0 {
	_Float16 d;
	int8_t qs[ENGINE_QUANT_BLOCK];
};

/*
 * 32 weights: byte j contains weight j in its low nibble and weight j + 16 in
 * its high nibble, each stored as q + 8, and w = d * q with q in [-8, 7].
 * The layout GGUF uses for Q4_0.
 */
struct engine_block_q4_0 {
	_Float16 d;
	uint8_t qs[ENGINE_QUANT_BLOCK / 2];
};

_Static_assert(sizeof(struct engine_block_q8_0) == 34, "Q8_0 block size");
_Static_assert(sizeof(struct engine_block_q4_0) == 18, "Q4_0 block size");

/*
 * In a quantized checkpoint a matrix is stored packed for the matrix
 * product: its rows go in groups of 16, the last group filled up with rows
 * of zeros, and each group is its blocks in order along the row, block b
 * of all 16 rows together. A group block has the 16 scales, then the codes
 * in runs of 4 consecutive weights per row, one run of each row after the
 * other. A vector register thus contains one run of 4 codes for each of 16
 * rows, and a dot product of 4 bytes per lane yields 16 outputs at once.
 */
#define ENGINE_QUANT_GROUP 16

/*
 * Block b of 16 rows in Q8_0. qs[j][r][i] is weight 4 j + i of row r,
 * stored as q + 128 (an unsigned byte).
 */
struct engine_group_q8_0 {
	_Float16 d[ENGINE_QUANT_GROUP];
	uint8_t qs[ENGINE_QUANT_BLOCK / 4][ENGINE_QUANT_GROUP][4];
};

/*
 * Block b of 16 rows in Q4_0. qs[m][r][i] has weight 4 m + i of row r in
 * its low nibble and weight 4 m + 16 + i in its high nibble, each as q + 8.
 * These are the bytes of the row's engine_block_q4_0, in runs of 4.
 */
struct engine_group_q4_0 {
	_Float16 d[ENGINE_QUANT_GROUP];
	uint8_t qs[ENGINE_QUANT_BLOCK / 8][ENGINE_QUANT_GROUP][4];
};

_Static_assert(sizeof(struct engine_group_q8_0) == 16 * 34,
	       "Q8_0 group block size");
_Static_assert(sizeof(struct engine_group_q4_0) == 16 * 18,
	       "Q4_0 group block size");

/*
 * A quantized checkpoint (written by slab-quantize) is this header, then
 * the tensors at the offsets it lists, each 64-byte aligned and in the
 * order of enum engine_tensor_id, the file ending where the last one ends.
 * Quantized matrices are packed in groups of 16 rows as described above.
 * All fields are little-endian. The RoPE tables of the llama2.c format are
 * not kept, and the classifier is always stored, even when the model
 * shares it with the token embedding (shared_classifier records that).
 */
#define ENGINE_QUANT_MAGIC 0x57514c53u /* "SLQW" as the first 4 bytes */
#define ENGINE_QUANT_VERSION 2
#define ENGINE_QUANT_ALIGN 64

struct engine_quant_tensor {
	uint32_t type;     /* enum engine_weight_type */
	uint32_t reserved; /* 0 */
	uint64_t offset;   /* bytes from the start of the file */
	uint64_t size;     /* bytes */
};

struct engine_quant_header {
	uint32_t magic;             /* ENGINE_QUANT_MAGIC */
	uint32_t version;           /* ENGINE_QUANT_VERSION */
	uint32_t weight_type;       /* type the matrices were quantized to */
	int32_t dim;
	int32_t hidden_dim;
	int32_t n_layers;
	int32_t n_heads;
	int32_t n_kv_heads;
	int32_t vocab_size;         /* positive */
	int32_t seq_len;
	uint32_t shared_classifier; /* 1 when the source shared it, else 0 */
	uint32_t n_tensors;         /* ENGINE_TENSOR_COUNT */
	struct engine_quant_tensor tensors[ENGINE_TENSOR_COUNT];
};

_Static_assert(sizeof(struct engine_quant_header) == 48 + 24 * 12,
	       "quantized checkpoint header size");

/*
 * Bytes that n weights take in this type; n must be a multiple of
 * ENGINE_QUANT_BLOCK for the quantized types. Returns 0 for an unknown type.
 */
uint64_t engine_weight_bytes(enum engine_weight_type type, uint64_t n);

/*
 * Bytes that a matrix of rows x cols weights takes in this type, packed in
 * groups of 16 rows for the quantized types (cols a multiple of
 * ENGINE_QUANT_BLOCK). Returns 0 for an unknown type.
 */
uint64_t engine_matrix_bytes(enum engine_weight_type type, uint64_t rows,
			     uint64_t cols);

/*
 * Packs rows (1 to 16) quantized rows of cols weights, given back to back
 * as blocks of type, into cols / 32 group blocks at out. Missing rows of
 * the group are zeros with scale 0.
 */
void engine_pack_group(enum engine_weight_type type, void *out,
		       const void *blocks, int rows, int cols);

/*
 * Quantizes n floats (a multiple of ENGINE_QUANT_BLOCK) into n / 32 blocks.
 * Q8_0 takes d = max |x| / 127 and q = round(x / d); Q4_0 takes the value m
 * of largest magnitude, d = m / -8 and q = min(15, trunc(x / d + 8.5)) - 8.
 * Both return -ERANGE when a scale does not fit in float16, else 0.
 */
int engine_quantize_q8_0(struct engine_block_q8_0 *out, const float *x,
			 size_t n);
int engine_quantize_q4_0(struct engine_block_q4_0 *out, const float *x,
			 size_t n);

/* Writes the n weights that n / 32 blocks of type stand for. */
void engine_dequantize(enum engine_weight_type type, float *out,
		       const void *blocks, size_t n);

struct engine_model;

/*
 * Maps a checkpoint read-only and validates its header and size: a
 * llama2.c float32 checkpoint, or a quantized checkpoint, recognized by
 * its first four bytes. On success *out owns the mapping; release it with
 * engine_model_close(). Returns -ENOENT, -EACCES (the open error), -EINVAL
 * for a malformed header or a size that disagrees with it, with err naming
 * the file and the field.
 */
int engine_model_open(const char *path, struct engine_model **out,
		      struct engine_error *err);
void engine_model_close(struct engine_model *model);
const struct engine_shape *engine_model_shape(const struct engine_model *model);

/*
 * Weight type of the model's file: ENGINE_WEIGHT_F32 for a llama2.c
 * checkpoint, the type its matrices were quantized to otherwise.
 */
enum engine_weight_type engine_model_weight_type(const struct engine_model *model);

/* A tensor of a loaded model, pointing into its read-only mapping. */
struct engine_tensor_view {
	const void *data;
	enum engine_weight_type type;
	struct engine_tensor_dims dims;
};

/*
 * Returns tensor id of a loaded model. A llama2.c checkpoint with a shared
 * classifier returns the token embedding for ENGINE_TENSOR_CLASSIFIER.
 */
struct engine_tensor_view engine_model_tensor(const struct engine_model *model,
					      enum engine_tensor_id id);

/*
 * Validates a header and the file size it implies. Exposed for the tools
 * that write checkpoints. Returns 0 or -EINVAL with err filled.
 */
int engine_shape_check(const char *path, const struct engine_shape *shape,
		       uint64_t file_size, struct engine_error *err);

/* Size in bytes of the float32 weights after a checkpoint header of this shape. */
uint64_t engine_checkpoint_bytes(const struct engine_shape *shape);

/* ---- Tokenizer ---------------------------------------------------------- */

struct engine_tokenizer;

/*
 * Loads a tokenizer file in the llama2.c format for a model of vocab_size
 * pieces. Fails with -EINVAL when the file has a different number of
 * pieces, a piece is malformed, or the file is truncated.
 */
int engine_tokenizer_open(const char *path, int32_t vocab_size,
			  struct engine_tokenizer **out,
			  struct engine_error *err);
void engine_tokenizer_close(struct engine_tokenizer *tokenizer);
int32_t engine_tokenizer_vocab_size(const struct engine_tokenizer *tokenizer);

/*
 * Encodes len bytes of text into token ids, BOS first when add_bos is set.
 * Bytes with no piece of their own become byte-fallback tokens. Writes at
 * most max_ids ids and stores the full count in *n_ids. Returns 0, or
 * -ENOBUFS when max_ids was too small (*n_ids is then the count needed).
 */
int engine_tokenize(const struct engine_tokenizer *tokenizer, const char *text,
		    size_t len, bool add_bos, int32_t *ids, size_t max_ids,
		    size_t *n_ids);

/*
 * Returns the bytes token id stands for, given the token before it, and
 * stores their count in *len. The leading space of the first piece after BOS
 * is dropped and byte pieces `<0xHH>` become the byte itself. The bytes are
 * not terminated and may be part of a UTF-8 character.
 */
const char *engine_token_bytes(const struct engine_tokenizer *tokenizer,
			       int32_t previous, int32_t id, size_t *len);

/*
 * Streaming detokenizer: turns token ids into text that never ends with half
 * of a multi-byte UTF-8 character. Invalid UTF-8 sequences come out as
 * U+FFFD.
 */
struct engine_detokenizer {
	uint8_t pending[4];
	uint8_t n_pending;
	int32_t previous;
};

void engine_detokenizer_init(struct engine_detokenizer *detokenizer,
			     int32_t previous);

/*
 * Appends the text of id to out (capacity at least 64 bytes plus the
 * longest piece) and returns the number of bytes written.
 */
size_t engine_detokenize(const struct engine_tokenizer *tokenizer,
			 struct engine_detokenizer *detokenizer, int32_t id,
			 char *out, size_t capacity);

/* Writes what is still pending (as U+FFFD) at the end of a stream. */
size_t engine_detokenize_flush(struct engine_detokenizer *detokenizer,
			       char *out, size_t capacity);

/* ---- KV cache layout ----------------------------------------------------- */

enum engine_kv_type {
	ENGINE_KV_F32 = 0,
	ENGINE_KV_F16 = 1,
};

/*
 * One KV block holds block_tokens positions of K and V for every layer and
 * KV head, laid out as (n_layers, 2, block_tokens, kv_dim) elements of the
 * KV type: the K rows of a layer, then its V rows.
 */
uint64_t engine_kv_block_bytes(const struct engine_shape *shape,
			       uint32_t block_tokens, enum engine_kv_type type);

/* KV memory shared by all sessions: an array of equal blocks. */
struct engine_kv {
	void *base;
	uint32_t n_blocks;     /* block indices must be below this */
	uint32_t block_tokens;
	uint64_t block_stride; /* bytes from one block to the next; 0 means
				  engine_kv_block_bytes() */
	enum engine_kv_type type;
};

/* ---- Forward pass ------------------------------------------------------ */

struct engine_options {
	int threads;          /* rows of each matrix product split among these */
	int max_batch;        /* sessions per step */
	int max_step_tokens;  /* tokens per step, summed over its sessions */
	int max_context;      /* positions per session; 0 means the model's */
};

/*
 * One session's part of a step: positions [start, start + n) with their
 * tokens, and the block table covering at least positions [0, start + n).
 * When logits is not NULL, the logits of the last position (vocab_size
 * floats) are written there.
 */
struct engine_sequence {
	const int32_t *tokens;
	int32_t n;
	int32_t start;
	const int32_t *blocks;
	int32_t n_blocks;
	float *logits;
};

/* Counters over the engine's lifetime. A step with any sequence of more than
 * one token counts as prefill; its time and all its tokens go there. */
struct engine_metrics {
	uint64_t prefill_tokens;
	uint64_t prefill_ns;
	uint64_t decode_tokens;
	uint64_t decode_ns;
	uint64_t steps;
	uint64_t last_step_tokens;
	uint64_t last_step_ns;
};

struct engine;

/*
 * Creates an engine for a loaded model, allocating every scratch buffer for
 * the maximum step size and context now, and starting its worker threads.
 * The model must outlive the engine.
 */
int engine_create(const struct engine_model *model,
		  const struct engine_options *options, struct engine **out,
		  struct engine_error *err);
void engine_destroy(struct engine *engine);
const struct engine_options *engine_get_options(const struct engine *engine);

/*
 * Runs one step over n_sequences sessions sharing one pass over the weights.
 * Returns 0, or -EINVAL (with err filled) when a sequence exceeds the
 * options, names a position outside its block table, or a token outside the
 * vocabulary. Nothing is written to the KV cache when it fails.
 */
int engine_step(struct engine *engine, const struct engine_kv *kv,
		const struct engine_sequence *sequences, int n_sequences,
		struct engine_error *err);

/* Threads the engine runs a step on (engine_options.threads). */
int engine_thread_count(const struct engine *engine);

/*
 * Runs task(arg, ith, nth) on each of the engine's nth threads,
 * ith = 0 .. nth - 1, and returns when every call has returned. Work
 * between steps, such as sampling, shares the step's threads this way.
 */
void engine_run_on_threads(struct engine *engine,
			   void (*task)(void *arg, int ith, int nth),
			   void *arg);

/* engine_step() for one session and n tokens at positions start... */
int engine_prefill(struct engine *engine, const struct engine_kv *kv,
		   const int32_t *blocks, int32_t n_blocks,
		   const int32_t *tokens, int32_t n, int32_t start,
		   float *logits, struct engine_error *err);

/* engine_step() for one session and one token at position pos. */
int engine_decode(struct engine *engine, const struct engine_kv *kv,
		  const int32_t *blocks, int32_t n_blocks, int32_t token,
		  int32_t pos, float *logits, struct engine_error *err);

void engine_get_metrics(const struct engine *engine,
			struct engine_metrics *metrics);

/*
 * Context shift: copies positions [0, n_keep) and
 * [n_keep + n_discard, length) of a session from the source blocks into the
 * target blocks, the second range moved down by n_discard positions with
 * its keys rotated to their new positions. The source blocks are only read,
 * so a shift that fails half-way can run again. Returns 0 or -EINVAL.
 */
int engine_kv_shift(struct engine *engine, const struct engine_kv *kv,
		    const int32_t *source_blocks, int32_t n_source,
		    const int32_t *target_blocks, int32_t n_target,
		    int32_t n_keep, int32_t n_discard, int32_t length,
		    struct engine_error *err);

/* ---- Sampling ---------------------------------------------------------- */

/*
 * Sampling settings. The stages run in this order: repetition penalty over
 * the given history, temperature, top-k, softmax, top-p, min-p, then one draw.
 * Temperature 0 is greedy (argmax after the repetition penalty).
 */
struct engine_sampling {
	float temperature;        /* 0 = greedy */
	int32_t top_k;            /* 0 = off */
	float top_p;              /* 1 = off, in (0, 1] */
	float min_p;              /* 0 = off, in [0, 1] */
	float repetition_penalty; /* 1 = off, > 0 */
	uint64_t seed;
};

/* Default settings: greedy, every filter off. */
void engine_sampling_defaults(struct engine_sampling *sampling);

/*
 * Returns a uniform float in [0, 1) drawn from a counter-based generator
 * keyed by (seed, position): the same pair always gives the same number.
 */
float engine_random(uint64_t seed, uint64_t position);

/* Tokens before the sampled one that the repetition penalty looks at. */
#define ENGINE_PENALTY_WINDOW 64

struct engine_sampler;

int engine_sampler_create(int32_t vocab_size, struct engine_sampler **out);
void engine_sampler_destroy(struct engine_sampler *sampler);

/*
 * Chooses the token for position `position` from logits (vocab_size floats,
 * modified in place). history holds the n_history previous tokens the
 * repetition penalty applies to.
 */
int32_t engine_sample(struct engine_sampler *sampler,
		      const struct engine_sampling *sampling, float *logits,
		      const int32_t *history, size_t n_history,
		      uint64_t position);

/* True for the tokens that end a generation (BOS and EOS). */
static inline bool engine_is_end_token(int32_t id)
{
	return id == ENGINE_TOKEN_BOS || id == ENGINE_TOKEN_EOS;
}

/* Name of the kernel instruction set in use: "avx512", "avx2" or "scalar". */
const char *engine_kernel_isa(void);

/* ---- Monotonic clock ---------------------------------------------------- */

uint64_t engine_now_ns(void);

#endif
