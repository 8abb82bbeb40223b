/*
 * Quantized weights: the Q8_0 and Q4_0 block formats, the tensor table of
 * a model, and loading of quantized checkpoints. A quantized checkpoint is
 * mapped read-only like a llama2.c one, and its header is checked against
 * the file size before any weight is touched. Every tensor must have the
 * size its type and the shape imply and start 64-byte aligned after the one
 * before it. The file must end where the last tensor ends.
 */
#include "worker/engine_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Largest finite float16 value. */
#define FLOAT16_MAX 65504.0f


const char *engine_weight_type_name(enum engine_weight_type type)
{
	switch (type) {
	case ENGINE_WEIGHT_F32:
		return "f32";
	case ENGINE_WEIGHT_Q8_0:
		return "q8_0";
	case ENGINE_WEIGHT_Q4_0:
		return "q4_0";
	}
	return "unknown";
}


static const char *const tensor_names[ENGINE_TENSOR_COUNT] = {
	[ENGINE_TENSOR_TOKEN_EMBEDDING] = "token_embedding",
	[ENGINE_TENSOR_RMS_ATT] = "rms_att",
	[ENGINE_TENSOR_WQ] = "wq",
	[ENGINE_TENSOR_WK] = "wk",
	[ENGINE_TENSOR_WV] = "wv",
	[ENGINE_TENSOR_WO] = "wo",
	[ENGINE_TENSOR_RMS_FFN] = "rms_ffn",
	[ENGINE_TENSOR_W1] = "w1",
	[ENGINE_TENSOR_W2] = "w2",
	[ENGINE_TENSOR_W3] = "w3",
	[ENGINE_TENSOR_RMS_FINAL] = "rms_final",
	[ENGINE_TENSOR_CLASSIFIER] = "classifier",
};


const char *engine_tensor_name(enum engine_tensor_id id)
{
	if ((unsigned)id >= ENGINE_TENSOR_COUNT)
		return "unknown";
	return tensor_names[id];
}


bool engine_tensor_is_matrix(enum engine_tensor_id id)
{
	switch (id) {
	case ENGINE_TENSOR_WQ:
	case ENGINE_TENSOR_WK:
	case ENGINE_TENSOR_WV:
	case ENGINE_TENSOR_WO:
	case ENGINE_TENSOR_W1:
	case ENGINE_TENSOR_W2:
	case ENGINE_TENSOR_W3:
	case ENGINE_TENSOR_CLASSIFIER:
		return true;
	default:
		return false;
	}
}


struct engine_tensor_dims engine_tensor_dims(const struct engine_shape *s,
					     enum engine_tensor_id id)
{
	uint64_t dim = (uint64_t)s->dim;
	uint64_t hidden = (uint64_t)s->hidden_dim;
	uint64_t layers = (uint64_t)s->n_layers;
	uint64_t kv_dim = (uint64_t)engine_kv_dim(s);
	uint64_t vocab = (uint64_t)s->vocab_size;

	switch (id) {
	case ENGINE_TENSOR_TOKEN_EMBEDDING:
	case ENGINE_TENSOR_CLASSIFIER:
		return (struct engine_tensor_dims){ 1, vocab, dim };
	case ENGINE_TENSOR_RMS_ATT:
	case ENGINE_TENSOR_RMS_FFN:
		return (struct engine_tensor_dims){ layers, 1, dim };
	case ENGINE_TENSOR_WQ:
	case ENGINE_TENSOR_WO:
		return (struct engine_tensor_dims){ layers, dim, dim };
	case ENGINE_TENSOR_WK:
	case ENGINE_TENSOR_WV:
		return (struct engine_tensor_dims){ layers, kv_dim, dim };
	case ENGINE_TENSOR_W1:
	case ENGINE_TENSOR_W3:
		return (struct engine_tensor_dims){ layers, hidden, dim };
	case ENGINE_TENSOR_W2:
		return (struct engine_tensor_dims){ layers, dim, hidden };
	case ENGINE_TENSOR_RMS_FINAL:
		return (struct engine_tensor_dims){ 1, 1, dim };
	default:
		return (struct engine_tensor_dims){ 0, 0, 0 };
	}
}


uint64_t engine_weight_bytes(enum engine_weight_type type, uint64_t n)
{
	switch (type) {
	case ENGINE_WEIGHT_F32:
		return n * sizeof(float);
	case ENGINE_WEIGHT_Q8_0:
		return n / ENGINE_QUANT_BLOCK * sizeof(struct engine_block_q8_0);
	case ENGINE_WEIGHT_Q4_0:
		return n / ENGINE_QUANT_BLOCK * sizeof(struct engine_block_q4_0);
	}
	return 0;
}


uint64_t engine_matrix_bytes(enum engine_weight_type type, uint64_t rows,
			     uint64_t cols)
{
	uint64_t groups = (rows + ENGINE_QUANT_GROUP - 1) / ENGINE_QUANT_GROUP;

	switch (type) {
	case ENGINE_WEIGHT_F32:
		return rows * cols * sizeof(float);
	case ENGINE_WEIGHT_Q8_0:
		return groups * (cols / ENGINE_QUANT_BLOCK) *
		       sizeof(struct engine_group_q8_0);
	case ENGINE_WEIGHT_Q4_0:
		return groups * (cols / ENGINE_QUANT_BLOCK) *
		       sizeof(struct engine_group_q4_0);
	}
	return 0;
}


void engine_pack_group(enum engine_weight_type type, void *out,
		       const void *blocks, int rows, int cols)
{
	int nb = cols / ENGINE_QUANT_BLOCK;

	for (int b = 0; b < nb; b++) {
		if (type == ENGINE_WEIGHT_Q8_0) {
			struct engine_group_q8_0 *g =
				(struct engine_group_q8_0 *)out + b;

			memset(g, 0, sizeof(*g));
			memset(g->qs, 128, sizeof(g->qs));
			for (int r = 0; r < rows; r++) {
				const struct engine_block_q8_0 *src =
					(const struct engine_block_q8_0 *)blocks +
					(size_t)r * nb + b;

				g->d[r] = src->d;
				for (int k = 0; k < ENGINE_QUANT_BLOCK; k++)
					g->qs[k / 4][r][k % 4] =
						(uint8_t)(src->qs[k] + 128);
			}
		} else {
			struct engine_group_q4_0 *g =
				(struct engine_group_q4_0 *)out + b;

			/* Code 8 is weight 0. */
			memset(g, 0, sizeof(*g));
			memset(g->qs, 0x88, sizeof(g->qs));
			for (int r = 0; r < rows; r++) {
				const struct engine_block_q4_0 *src =
					(const struct engine_block_q4_0 *)blocks +
					(size_t)r * nb + b;

				g->d[r] = src->d;
				for (int k = 0; k < ENGINE_QUANT_BLOCK / 2; k++)
					g->qs[k / 4][r][k % 4] = src->qs[k];
			}
		}
	}
}


/* ---- Block quantization ------------------------------------------------- */

static bool all_finite(const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!isfinite(x[i]))
			return false;
	return true;
}


int engine_quantize_q8_0(struct engine_block_q8_0 *out, const float *x,
			 size_t n)
{
	if (!all_finite(x, n))
		return -ERANGE;
	for (size_t b = 0; b < n / ENGINE_QUANT_BLOCK; b++) {
		const float *v = x + b * ENGINE_QUANT_BLOCK;
		float amax = 0.0f;

		for (int i = 0; i < ENGINE_QUANT_BLOCK; i++)
			amax = fmaxf(amax, fabsf(v[i]));

		float d = amax / 127.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;

		if (d > FLOAT16_MAX)
			return -ERANGE;
		out[b].d = (_Float16)d;
		for (int i = 0; i < ENGINE_QUANT_BLOCK; i++)
			out[b].qs[i] = (int8_t)roundf(v[i] * id);
	}
	return 0;
}


int engine_quantize_q4_0(struct engine_block_q4_0 *out, const float *x,
			 size_t n)
{
	const int half = ENGINE_QUANT_BLOCK / 2;

	if (!all_finite(x, n))
		return -ERANGE;
	for (size_t b = 0; b < n / ENGINE_QUANT_BLOCK; b++) {
		const float *v = x + b * ENGINE_QUANT_BLOCK;
		float amax = 0.0f, max = 0.0f;

		/* The value of largest magnitude keeps its sign, so it maps to -8. */
		for (int i = 0; i < ENGINE_QUANT_BLOCK; i++) {
			if (fabsf(v[i]) > amax) {
				amax = fabsf(v[i]);
				max = v[i];
			}
		}

		float d = max / -8.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;

		if (fabsf(d) > FLOAT16_MAX)
			return -ERANGE;
		out[b].d = (_Float16)d;
		for (int j = 0; j < half; j++) {
			int lo = (int)(v[j] * id + 8.5f);
			int hi = (int)(v[j + half] * id + 8.5f);

			lo = lo > 15 ? 15 : lo;
			hi = hi > 15 ? 15 : hi;
			out[b].qs[j] = (uint8_t)(lo | (hi << 4));
		}
	}
	return 0;
}


void engine_dequantize(enum engine_weight_type type, float *out,
		       const void *blocks, size_t n)
{
	const int half = ENGINE_QUANT_BLOCK / 2;

	for (size_t b = 0; b < n / ENGINE_QUANT_BLOCK; b++) {
		float *o = out + b * ENGINE_QUANT_BLOCK;

		if (type == ENGINE_WEIGHT_Q8_0) {
			const struct engine_block_q8_0 *q =
				(const struct engine_block_q8_0 *)blocks + b;

			for (int i = 0; i < ENGINE_QUANT_BLOCK; i++)
				o[i] = (float)q->d * (float)q->qs[i];
		} else if (type == ENGINE_WEIGHT_Q4_0) {
			const struct engine_block_q4_0 *q =
				(const struct engine_block_q4_0 *)blocks + b;

			for (int j = 0; j < half; j++) {
				o[j] = (float)q->d * (float)((q->qs[j] & 15) - 8);
				o[j + half] = (float)q->d *
					      (float)((q->qs[j] >> 4) - 8);
			}
		} else {
			memcpy(o, (const float *)blocks + b * ENGINE_QUANT_BLOCK,
			       ENGINE_QUANT_BLOCK * sizeof(float));
		}
	}
}


/* ---- Quantized checkpoints ---------------------------------------------- */

/* Checks one entry of the tensor table; *end is where the previous ended. */
static int check_tensor(const char *path, const struct engine_shape *shape,
			const struct engine_quant_tensor *entry,
			enum engine_tensor_id id, uint64_t file_size,
			uint64_t *end, struct engine_error *err)
{
	const char *name = engine_tensor_name(id);
	struct engine_tensor_dims dims = engine_tensor_dims(shape, id);
	uint64_t expected;

	if (entry->type > ENGINE_WEIGHT_Q4_0)
		return engine_fail(err,
				   "%s: tensor %s has weight type %u, expected "
				   "0 (f32), 1 (q8_0) or 2 (q4_0)",
				   path, name, entry->type);
	if (entry->type != ENGINE_WEIGHT_F32 && !engine_tensor_is_matrix(id))
		return engine_fail(err,
				   "%s: tensor %s has weight type %s, expected "
				   "f32: only matrices may be quantized",
				   path, name,
				   engine_weight_type_name(entry->type));
	if (entry->type != ENGINE_WEIGHT_F32 &&
	    dims.cols % ENGINE_QUANT_BLOCK != 0)
		return engine_fail(err,
				   "%s: tensor %s has weight type %s, but its "
				   "rows of %llu weights are not a multiple of "
				   "%d; expected f32",
				   path, name,
				   engine_weight_type_name(entry->type),
				   (unsigned long long)dims.cols,
				   ENGINE_QUANT_BLOCK);
	if (entry->reserved != 0)
		return engine_fail(err,
				   "%s: tensor %s has reserved field %u, "
				   "expected 0",
				   path, name, entry->reserved);

	expected = dims.matrices *
		   engine_matrix_bytes(entry->type, dims.rows, dims.cols);
	if (entry->size != expected)
		return engine_fail(err,
				   "%s: tensor %s is %llu bytes, expected %llu "
				   "bytes for %llu x %llu x %llu weights of "
				   "type %s",
				   path, name, (unsigned long long)entry->size,
				   (unsigned long long)expected,
				   (unsigned long long)dims.matrices,
				   (unsigned long long)dims.rows,
				   (unsigned long long)dims.cols,
				   engine_weight_type_name(entry->type));
	if (entry->offset % ENGINE_QUANT_ALIGN != 0 || entry->offset < *end ||
	    entry->offset > file_size || entry->size > file_size - entry->offset)
		return engine_fail(err,
				   "%s: tensor %s has offset %llu and size %llu "
				   "in a file of %llu bytes; expected a "
				   "multiple of %d from %llu, where the tensor "
				   "before it ends, and the tensor inside the "
				   "file",
				   path, name, (unsigned long long)entry->offset,
				   (unsigned long long)entry->size,
				   (unsigned long long)file_size,
				   ENGINE_QUANT_ALIGN, (unsigned long long)*end);
	*end = entry->offset + entry->size;
	return 0;
}


/* Checks everything in the header except the tensor table. */
static int check_quant_header(const char *path,
			      const struct engine_quant_header *h,
			      struct engine_shape *shape,
			      struct engine_error *err)
{
	if (h->magic != ENGINE_QUANT_MAGIC)
		return engine_fail(err,
				   "%s: magic is 0x%08x, expected 0x%08x for a "
				   "quantized checkpoint",
				   path, h->magic, ENGINE_QUANT_MAGIC);
	if (h->version != ENGINE_QUANT_VERSION)
		return engine_fail(err,
				   "%s: quantized checkpoint version is %u, "
				   "expected %d; convert the model again with "
				   "this slab-quantize",
				   path, h->version, ENGINE_QUANT_VERSION);
	if (h->weight_type != ENGINE_WEIGHT_Q8_0 &&
	    h->weight_type != ENGINE_WEIGHT_Q4_0)
		return engine_fail(err,
				   "%s: header field weight_type is %u, "
				   "expected 1 (q8_0) or 2 (q4_0)",
				   path, h->weight_type);
	if (h->shared_classifier > 1)
		return engine_fail(err,
				   "%s: header field shared_classifier is %u, "
				   "expected 0 or 1",
				   path, h->shared_classifier);
	if (h->n_tensors != ENGINE_TENSOR_COUNT)
		return engine_fail(err,
				   "%s: header field n_tensors is %u, expected "
				   "%d",
				   path, h->n_tensors, ENGINE_TENSOR_COUNT);

	*shape = (struct engine_shape){
		.dim = h->dim,
		.hidden_dim = h->hidden_dim,
		.n_layers = h->n_layers,
		.n_heads = h->n_heads,
		.n_kv_heads = h->n_kv_heads,
		.vocab_size = h->vocab_size,
		.seq_len = h->seq_len,
		.shared_classifier = h->shared_classifier != 0,
	};
	return engine_shape_check_fields(path, shape, err);
}


static struct engine_tensor tensor_at(const struct engine_model *model,
				      const struct engine_quant_header *h,
				      enum engine_tensor_id id)
{
	return (struct engine_tensor){
		.data = (const char *)model->map + h->tensors[id].offset,
		.type = (enum engine_weight_type)h->tensors[id].type,
	};
}


int engine_quant_open(const char *path, int fd, uint64_t file_size,
		      struct engine_model *model, struct engine_error *err)
{
	struct engine_quant_header h;
	struct engine_weights *w = &model->weights;
	uint64_t end = sizeof(h);
	int rc;

	if (file_size < sizeof(h))
		return engine_fail(err,
				   "%s: file is %llu bytes, shorter than the "
				   "%zu-byte quantized checkpoint header; the "
				   "file is truncated",
				   path, (unsigned long long)file_size,
				   sizeof(h));
	if (pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
		return engine_fail(err, "%s: cannot read the quantized "
				   "checkpoint header", path);
	rc = check_quant_header(path, &h, &model->shape, err);
	if (rc < 0)
		return rc;
	for (int id = 0; id < ENGINE_TENSOR_COUNT; id++) {
		rc = check_tensor(path, &model->shape, &h.tensors[id], id,
				  file_size, &end, err);
		if (rc < 0)
			return rc;
	}
	if (file_size != end)
		return engine_fail(err,
				   "%s: file size is %llu bytes, expected %llu "
				   "bytes, where its last tensor ends; the file "
				   "is longer than its header says",
				   path, (unsigned long long)file_size,
				   (unsigned long long)end);

	model->map_size = (size_t)file_size;
	/*
	 * MAP_POPULATE maps every page now, so that the first steps do not
	 * stop on a page fault for each 4 KiB of weights.
	 */
	model->map = mmap(NULL, model->map_size, PROT_READ,
			  MAP_SHARED | MAP_POPULATE, fd, 0);
	if (model->map == MAP_FAILED) {
		rc = -errno;
		snprintf(err->message, sizeof(err->message),
			 "%s: mmap of %zu bytes failed: %s", path,
			 model->map_size, strerror(errno));
		return rc;
	}

	model->file_type = (enum engine_weight_type)h.weight_type;
	w->token_embedding =
		tensor_at(model, &h, ENGINE_TENSOR_TOKEN_EMBEDDING).data;
	w->rms_att = tensor_at(model, &h, ENGINE_TENSOR_RMS_ATT).data;
	w->wq = tensor_at(model, &h, ENGINE_TENSOR_WQ);
	w->wk = tensor_at(model, &h, ENGINE_TENSOR_WK);
	w->wv = tensor_at(model, &h, ENGINE_TENSOR_WV);
	w->wo = tensor_at(model, &h, ENGINE_TENSOR_WO);
	w->rms_ffn = tensor_at(model, &h, ENGINE_TENSOR_RMS_FFN).data;
	w->w1 = tensor_at(model, &h, ENGINE_TENSOR_W1);
	w->w2 = tensor_at(model, &h, ENGINE_TENSOR_W2);
	w->w3 = tensor_at(model, &h, ENGINE_TENSOR_W3);
	w->rms_final = tensor_at(model, &h, ENGINE_TENSOR_RMS_FINAL).data;
	w->classifier = tensor_at(model, &h, ENGINE_TENSOR_CLASSIFIER);
	return 0;
}
