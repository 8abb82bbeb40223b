/*
 * Checkpoint loading: maps a llama2.c checkpoint read-only, so every process
 * that loads the same file shares one copy in the page cache, and checks the
 * header against the file size before any weight is touched. A file that
 * starts with ENGINE_QUANT_MAGIC is a quantized checkpoint, loaded by
 * quant.c. No llama2.c checkpoint starts that way, because its first field,
 * dim, is at most ENGINE_MAX_DIM.
 *
 * File layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
 * vocab_size, seq_len), then float32 tensors in this order: token embedding,
 * rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, two unused RoPE
 * tables of (seq_len, head_size / 2) each, and the classifier when
 * vocab_size is negative in the header.
 */
#include "worker/engine_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEADER_BYTES (7 * sizeof(int32_t))


int engine_fail(struct engine_error *err, const char *format, ...)
{
	if (err != NULL) {
		va_list args;

		va_start(args, format);
		vsnprintf(err->message, sizeof(err->message), format, args);
		va_end(args);
	}
	return -EINVAL;
}


uint64_t engine_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}


uint64_t engine_checkpoint_bytes(const struct engine_shape *s)
{
	uint64_t dim = (uint64_t)s->dim;
	uint64_t hidden = (uint64_t)s->hidden_dim;
	uint64_t layers = (uint64_t)s->n_layers;
	uint64_t kv_dim = (uint64_t)engine_kv_dim(s);
	uint64_t head_size = (uint64_t)engine_head_size(s);
	uint64_t vocab = (uint64_t)s->vocab_size;
	uint64_t floats = 0;

	floats += vocab * dim;                        /* token embedding */
	floats += layers * dim;                       /* rms_att */
	floats += layers * dim * dim;                 /* wq */
	floats += 2 * layers * kv_dim * dim;          /* wk, wv */
	floats += layers * dim * dim;                 /* wo */
	floats += layers * dim;                       /* rms_ffn */
	floats += 3 * layers * hidden * dim;          /* w1, w2, w3 */
	floats += dim;                                /* rms_final */
	floats += (uint64_t)s->seq_len * head_size;   /* RoPE tables, unused */
	if (!s->shared_classifier)
		floats += vocab * dim;                /* classifier */
	return floats * sizeof(float);
}


static int check_range(const char *path, const char *field, int32_t value,
		       int32_t max, struct engine_error *err)
{
	if (value <= 0 || value > max)
		return engine_fail(err,
				   "%s: header field %s is %d, expected a value "
				   "from 1 to %d; the file is not a llama2.c "
				   "checkpoint or is corrupt",
				   path, field, (int)value, (int)max);
	return 0;
}


int engine_shape_check_fields(const char *path, const struct engine_shape *s,
			      struct engine_error *err)
{
	int rc;

	if ((rc = check_range(path, "dim", s->dim, ENGINE_MAX_DIM, err)) ||
	    (rc = check_range(path, "hidden_dim", s->hidden_dim,
			      ENGINE_MAX_HIDDEN_DIM, err)) ||
	    (rc = check_range(path, "n_layers", s->n_layers,
			      ENGINE_MAX_LAYERS, err)) ||
	    (rc = check_range(path, "n_heads", s->n_heads, ENGINE_MAX_HEADS,
			      err)) ||
	    (rc = check_range(path, "n_kv_heads", s->n_kv_heads,
			      ENGINE_MAX_HEADS, err)) ||
	    (rc = check_range(path, "vocab_size", s->vocab_size,
			      ENGINE_MAX_VOCAB, err)) ||
	    (rc = check_range(path, "seq_len", s->seq_len, ENGINE_MAX_SEQ_LEN,
			      err)))
		return rc;

	if (s->dim % s->n_heads != 0)
		return engine_fail(err,
				   "%s: dim %d is not divisible by n_heads %d; "
				   "expected dim to be a multiple of n_heads",
				   path, (int)s->dim, (int)s->n_heads);
	if (s->n_heads % s->n_kv_heads != 0)
		return engine_fail(err,
				   "%s: n_heads %d is not divisible by "
				   "n_kv_heads %d; expected n_heads to be a "
				   "multiple of n_kv_heads",
				   path, (int)s->n_heads, (int)s->n_kv_heads);
	if (engine_head_size(s) % 2 != 0)
		return engine_fail(err,
				   "%s: head size dim / n_heads = %d is odd; "
				   "expected an even head size for rotary "
				   "embeddings",
				   path, (int)engine_head_size(s));
	return 0;
}


int engine_shape_check(const char *path, const struct engine_shape *s,
		       uint64_t file_size, struct engine_error *err)
{
	int rc = engine_shape_check_fields(path, s, err);

	if (rc < 0)
		return rc;

	uint64_t expected = HEADER_BYTES + engine_checkpoint_bytes(s);

	if (file_size != expected)
		return engine_fail(err,
				   "%s: file size is %llu bytes, expected %llu "
				   "bytes for the shape in its header (dim %d, "
				   "hidden_dim %d, n_layers %d, n_heads %d, "
				   "n_kv_heads %d, vocab_size %d, seq_len %d, "
				   "%s classifier); the file is %s",
				   path, (unsigned long long)file_size,
				   (unsigned long long)expected, (int)s->dim,
				   (int)s->hidden_dim, (int)s->n_layers,
				   (int)s->n_heads, (int)s->n_kv_heads,
				   (int)s->vocab_size, (int)s->seq_len,
				   s->shared_classifier ? "shared" : "separate",
				   file_size < expected ? "truncated"
							: "longer than its shape");
	return 0;
}


/* Points each weight view at its place in the mapping. */
static void map_weights(struct engine_model *model)
{
	const struct engine_shape *s = &model->shape;
	struct engine_weights *w = &model->weights;
	size_t dim = (size_t)s->dim;
	size_t hidden = (size_t)s->hidden_dim;
	size_t layers = (size_t)s->n_layers;
	size_t kv_dim = (size_t)engine_kv_dim(s);
	size_t head_size = (size_t)engine_head_size(s);
	const float *p = (const float *)((const char *)model->map + HEADER_BYTES);

	model->file_type = ENGINE_WEIGHT_F32;
	w->token_embedding = p;
	p += (size_t)s->vocab_size * dim;
	w->rms_att = p;
	p += layers * dim;
	w->wq = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * dim * dim;
	w->wk = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * kv_dim * dim;
	w->wv = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * kv_dim * dim;
	w->wo = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * dim * dim;
	w->rms_ffn = p;
	p += layers * dim;
	w->w1 = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * hidden * dim;
	w->w2 = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * dim * hidden;
	w->w3 = (struct engine_tensor){ p, ENGINE_WEIGHT_F32 };
	p += layers * hidden * dim;
	w->rms_final = p;
	p += dim;
	p += (size_t)s->seq_len * head_size; /* RoPE tables, computed instead */
	w->classifier = (struct engine_tensor){
		s->shared_classifier ? w->token_embedding : p, ENGINE_WEIGHT_F32
	};
}


int engine_model_open(const char *path, struct engine_model **out,
		      struct engine_error *err)
{
	struct engine_model *model;
	int32_t header[7];
	struct stat st;
	int fd, rc;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = -errno;
		snprintf(err->message, sizeof(err->message),
			 "%s: cannot open the model file: %s; check the "
			 "--model path",
			 path, strerror(errno));
		return rc;
	}
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		snprintf(err->message, sizeof(err->message),
			 "%s: fstat failed: %s", path, strerror(errno));
		goto err_close;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = engine_fail(err, "%s: not a regular file; expected a "
				 "llama2.c checkpoint", path);
		goto err_close;
	}
	if ((uint64_t)st.st_size >= sizeof(uint32_t)) {
		uint32_t magic;

		if (pread(fd, &magic, sizeof(magic), 0) != sizeof(magic)) {
			rc = engine_fail(err, "%s: cannot read the checkpoint "
					 "header", path);
			goto err_close;
		}
		if (magic == ENGINE_QUANT_MAGIC) {
			model = calloc(1, sizeof(*model));
			if (model == NULL) {
				rc = -ENOMEM;
				goto err_close;
			}
			rc = engine_quant_open(path, fd, (uint64_t)st.st_size,
					       model, err);
			if (rc < 0)
				goto err_free;
			close(fd);
			*out = model;
			return 0;
		}
	}
	if ((uint64_t)st.st_size < HEADER_BYTES) {
		rc = engine_fail(err,
				 "%s: file is %lld bytes, shorter than the "
				 "%zu-byte checkpoint header",
				 path, (long long)st.st_size, HEADER_BYTES);
		goto err_close;
	}
	if (pread(fd, header, sizeof(header), 0) != (ssize_t)sizeof(header)) {
		rc = engine_fail(err, "%s: cannot read the checkpoint header",
				 path);
		goto err_close;
	}

	model = calloc(1, sizeof(*model));
	if (model == NULL) {
		rc = -ENOMEM;
		goto err_close;
	}
	model->shape = (struct engine_shape){
		.dim = header[0],
		.hidden_dim = header[1],
		.n_layers = header[2],
		.n_heads = header[3],
		.n_kv_heads = header[4],
		.vocab_size = header[5] < 0 && header[5] != INT32_MIN
				      ? -header[5]
				      : header[5],
		.seq_len = header[6],
		.shared_classifier = header[5] > 0,
	};
	rc = engine_shape_check(path, &model->shape, (uint64_t)st.st_size, err);
	if (rc < 0)
		goto err_free;

	model->map_size = (size_t)st.st_size;
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
		goto err_free;
	}
	close(fd);
	map_weights(model);
	*out = model;
	return 0;

err_free:
	free(model);
err_close:
	close(fd);
	return rc;
}


void engine_model_close(struct engine_model *model)
{
	if (model == NULL)
		return;
	munmap((void *)model->map, model->map_size);
	free(model);
}


const struct engine_shape *engine_model_shape(const struct engine_model *model)
{
	return &model->shape;
}


enum engine_weight_type engine_model_weight_type(const struct engine_model *model)
{
	return model->file_type;
}


struct engine_tensor_view engine_model_tensor(const struct engine_model *model,
					      enum engine_tensor_id id)
{
	const struct engine_weights *w = &model->weights;
	struct engine_tensor_view view = {
		.type = ENGINE_WEIGHT_F32,
		.dims = engine_tensor_dims(&model->shape, id),
	};
	const struct engine_tensor *tensor = NULL;

	switch (id) {
	case ENGINE_TENSOR_TOKEN_EMBEDDING:
		view.data = w->token_embedding;
		break;
	case ENGINE_TENSOR_RMS_ATT:
		view.data = w->rms_att;
		break;
	case ENGINE_TENSOR_RMS_FFN:
		view.data = w->rms_ffn;
		break;
	case ENGINE_TENSOR_RMS_FINAL:
		view.data = w->rms_final;
		break;
	case ENGINE_TENSOR_WQ: tensor = &w->wq; break;
	case ENGINE_TENSOR_WK: tensor = &w->wk; break;
	case ENGINE_TENSOR_WV: tensor = &w->wv; break;
	case ENGINE_TENSOR_WO: tensor = &w->wo; break;
	case ENGINE_TENSOR_W1: tensor = &w->w1; break;
	case ENGINE_TENSOR_W2: tensor = &w->w2; break;
	case ENGINE_TENSOR_W3: tensor = &w->w3; break;
	case ENGINE_TENSOR_CLASSIFIER: tensor = &w->classifier; break;
	default:
		break;
	}
	if (tensor != NULL) {
		view.data = tensor->data;
		view.type = tensor->type;
	}
	return view;
}


uint64_t engine_kv_block_bytes(const struct engine_shape *shape,
			       uint32_t block_tokens, enum engine_kv_type type)
{
	uint64_t element = type == ENGINE_KV_F16 ? 2 : 4;

	return (uint64_t)shape->n_layers * 2 * block_tokens *
	       (uint64_t)engine_kv_dim(shape) * element;
}
