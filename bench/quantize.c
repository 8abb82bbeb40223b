/*
 * slab-quantize: converts a llama2.c float32 checkpoint into a quantized
 * checkpoint (the format engine.h describes) that engine_model_open() loads
 * like the original.
 *
 * Each matrix whose rows are a multiple of 32 weights long gets the chosen
 * type. The other matrices, the RMSNorm weights and the token embedding
 * stay float32. The embedding stays float32 because a step only copies one of
 * its rows per token, so its size costs no memory traffic, and a float32
 * row keeps the first layer's input exact. The classifier is stored as its
 * own tensor even when the model shares it with the embedding, because its
 * product reads every row for every step; it is Q8_0 by default, also for
 * --type q4_0, since the logits are the most sensitive product.
 */
#include "worker/engine.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


struct output {
	FILE *file;
	const char *path;     /* the final name */
	char *temporary_path; /* written first, renamed at the end */
	uint64_t position;
};


static void usage(FILE *out)
{
	fprintf(out,
		"Usage: slab-quantize IN OUT --type q8_0|q4_0 [options]\n"
		"\n"
		"Converts the llama2.c float32 checkpoint IN into the quantized\n"
		"checkpoint OUT. Matrices whose rows are not a multiple of 32\n"
		"weights, the RMSNorm weights and the token embedding stay float32.\n"
		"\n"
		"  --type TYPE             weight type of the matrices: q8_0 or q4_0\n"
		"                          (required)\n"
		"  --classifier-type TYPE  weight type of the classifier: f32, q8_0\n"
		"                          or q4_0 (default q8_0)\n"
		"  --help                  print this help and exit\n");
}


static int parse_type(const char *option, const char *value, bool allow_f32,
		      enum engine_weight_type *type)
{
	if (allow_f32 && strcmp(value, "f32") == 0)
		*type = ENGINE_WEIGHT_F32;
	else if (strcmp(value, "q8_0") == 0)
		*type = ENGINE_WEIGHT_Q8_0;
	else if (strcmp(value, "q4_0") == 0)
		*type = ENGINE_WEIGHT_Q4_0;
	else {
		fprintf(stderr, "slab-quantize: invalid value '%s' for %s: "
			"expected %sq8_0 or q4_0\n", value, option,
			allow_f32 ? "f32, " : "");
		return -1;
	}
	return 0;
}


static uint64_t align_up(uint64_t value)
{
	return (value + ENGINE_QUANT_ALIGN - 1) / ENGINE_QUANT_ALIGN *
	       ENGINE_QUANT_ALIGN;
}


/* Fills the tensor table: the type of each tensor and where it goes. */
static void plan_tensors(const struct engine_shape *shape,
			 enum engine_weight_type type,
			 enum engine_weight_type classifier_type,
			 struct engine_quant_header *header)
{
	uint64_t offset = align_up(sizeof(*header));

	for (int id = 0; id < ENGINE_TENSOR_COUNT; id++) {
		struct engine_tensor_dims dims = engine_tensor_dims(shape, id);
		struct engine_quant_tensor *entry = &header->tensors[id];
		enum engine_weight_type chosen = ENGINE_WEIGHT_F32;

		if (engine_tensor_is_matrix(id) &&
		    dims.cols % ENGINE_QUANT_BLOCK == 0)
			chosen = id == ENGINE_TENSOR_CLASSIFIER ? classifier_type
								: type;
		entry->type = chosen;
		entry->offset = offset;
		entry->size = dims.matrices *
			      engine_matrix_bytes(chosen, dims.rows, dims.cols);
		offset = align_up(offset + entry->size);
	}
}


static int write_bytes(struct output *out, const void *bytes, size_t len)
{
	if (fwrite(bytes, 1, len, out->file) != len) {
		fprintf(stderr, "slab-quantize: %s: write failed: %s\n",
			out->temporary_path, strerror(errno));
		return -1;
	}
	out->position += len;
	return 0;
}


/* Writes zeros up to offset. */
static int pad_to(struct output *out, uint64_t offset)
{
	static const char zeros[ENGINE_QUANT_ALIGN];

	while (out->position < offset) {
		uint64_t gap = offset - out->position;
		size_t len = gap < sizeof(zeros) ? (size_t)gap : sizeof(zeros);

		if (write_bytes(out, zeros, len) < 0)
			return -1;
	}
	return 0;
}


/*
 * Writes one tensor of the source model in the type its entry names. A
 * quantized matrix is written one group of 16 rows at a time: the rows are
 * quantized into blocks, then packed into group.
 */
static int write_tensor(struct output *out, const struct engine_model *model,
			enum engine_tensor_id id,
			const struct engine_quant_tensor *entry, void *blocks,
			void *group)
{
	struct engine_tensor_view source = engine_model_tensor(model, id);
	uint64_t cols = source.dims.cols;
	uint64_t rows = source.dims.rows;
	const float *x = source.data;

	if (pad_to(out, entry->offset) < 0)
		return -1;
	if (entry->type == ENGINE_WEIGHT_F32)
		return write_bytes(out, x,
				   (size_t)(source.dims.matrices * rows * cols *
					    sizeof(float)));

	for (uint64_t m = 0; m < source.dims.matrices; m++) {
		for (uint64_t row = 0; row < rows; row += ENGINE_QUANT_GROUP) {
			const float *first = x + (m * rows + row) * cols;
			uint64_t n_rows = rows - row < ENGINE_QUANT_GROUP
						  ? rows - row
						  : ENGINE_QUANT_GROUP;
			size_t n = (size_t)(n_rows * cols);
			int rc = entry->type == ENGINE_WEIGHT_Q8_0
					 ? engine_quantize_q8_0(blocks, first, n)
					 : engine_quantize_q4_0(blocks, first, n);

			if (rc < 0) {
				fprintf(stderr,
					"slab-quantize: tensor %s, matrix %llu, "
					"rows %llu to %llu: a weight is not "
					"finite or a block scale exceeds the "
					"float16 range; this checkpoint cannot "
					"be quantized to %s\n",
					engine_tensor_name(id),
					(unsigned long long)m,
					(unsigned long long)row,
					(unsigned long long)(row + n_rows - 1),
					engine_weight_type_name(entry->type));
				return -1;
			}
			engine_pack_group(entry->type, group, blocks,
					  (int)n_rows, (int)cols);
			if (write_bytes(out, group,
					(size_t)engine_matrix_bytes(entry->type,
								    n_rows,
								    cols)) < 0)
				return -1;
		}
	}
	return 0;
}


/* Writes the whole quantized checkpoint to out. */
static int write_checkpoint(struct output *out,
			    const struct engine_model *model,
			    const struct engine_quant_header *header)
{
	const struct engine_shape *shape = engine_model_shape(model);
	size_t widest = (size_t)(shape->dim > shape->hidden_dim
					 ? shape->dim
					 : shape->hidden_dim);
	/* 16 rows of float32 take more bytes than 16 rows of either type. */
	void *blocks = malloc(ENGINE_QUANT_GROUP * widest * sizeof(float));
	void *group = malloc(ENGINE_QUANT_GROUP * widest * sizeof(float));
	int rc = -1;

	if (blocks == NULL || group == NULL) {
		fprintf(stderr, "slab-quantize: out of memory\n");
		return -1;
	}
	if (write_bytes(out, header, sizeof(*header)) < 0)
		goto out;
	for (int id = 0; id < ENGINE_TENSOR_COUNT; id++)
		if (write_tensor(out, model, id, &header->tensors[id], blocks,
				 group) < 0)
			goto out;
	rc = 0;
out:
	free(blocks);
	free(group);
	return rc;
}


int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "type", required_argument, NULL, 't' },
		{ "classifier-type", required_argument, NULL, 'c' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	enum engine_weight_type type = ENGINE_WEIGHT_F32;
	enum engine_weight_type classifier_type = ENGINE_WEIGHT_Q8_0;
	struct engine_quant_header header = { 0 };
	struct engine_model *model = NULL;
	struct engine_error err = { .message = "" };
	struct output out = { 0 };
	bool have_type = false;
	int c, rc;

	while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (c) {
		case 't':
			if (parse_type("--type", optarg, false, &type) < 0)
				return 2;
			have_type = true;
			break;
		case 'c':
			if (parse_type("--classifier-type", optarg, true,
				       &classifier_type) < 0)
				return 2;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (argc - optind != 2 || !have_type) {
		fprintf(stderr, "slab-quantize: expected IN, OUT and --type\n");
		usage(stderr);
		return 2;
	}
	const char *in_path = argv[optind];

	out.path = argv[optind + 1];

	rc = engine_model_open(in_path, &model, &err);
	if (rc < 0) {
		fprintf(stderr, "slab-quantize: %s\n", err.message);
		return 1;
	}
	if (engine_model_weight_type(model) != ENGINE_WEIGHT_F32) {
		fprintf(stderr, "slab-quantize: %s: already quantized to %s; "
			"expected a llama2.c float32 checkpoint\n", in_path,
			engine_weight_type_name(engine_model_weight_type(model)));
		engine_model_close(model);
		return 1;
	}

	const struct engine_shape *shape = engine_model_shape(model);

	header = (struct engine_quant_header){
		.magic = ENGINE_QUANT_MAGIC,
		.version = ENGINE_QUANT_VERSION,
		.weight_type = type,
		.dim = shape->dim,
		.hidden_dim = shape->hidden_dim,
		.n_layers = shape->n_layers,
		.n_heads = shape->n_heads,
		.n_kv_heads = shape->n_kv_heads,
		.vocab_size = shape->vocab_size,
		.seq_len = shape->seq_len,
		.shared_classifier = shape->shared_classifier ? 1 : 0,
		.n_tensors = ENGINE_TENSOR_COUNT,
	};
	plan_tensors(shape, type, classifier_type, &header);

	rc = 1;
	if (asprintf(&out.temporary_path, "%s.tmp", out.path) < 0) {
		fprintf(stderr, "slab-quantize: out of memory\n");
		goto err_close_model;
	}
	out.file = fopen(out.temporary_path, "wb");
	if (out.file == NULL) {
		fprintf(stderr, "slab-quantize: cannot create %s: %s\n",
			out.temporary_path, strerror(errno));
		goto err_free_path;
	}
	if (write_checkpoint(&out, model, &header) < 0) {
		fclose(out.file);
		goto err_remove;
	}
	if (fclose(out.file) != 0) {
		fprintf(stderr, "slab-quantize: %s: write failed: %s\n",
			out.temporary_path, strerror(errno));
		goto err_remove;
	}
	if (rename(out.temporary_path, out.path) < 0) {
		fprintf(stderr, "slab-quantize: cannot rename %s to %s: %s\n",
			out.temporary_path, out.path, strerror(errno));
		goto err_remove;
	}

	for (int id = 0; id < ENGINE_TENSOR_COUNT; id++)
		fprintf(stderr, "%-16s %-5s %12llu bytes\n",
			engine_tensor_name(id),
			engine_weight_type_name(header.tensors[id].type),
			(unsigned long long)header.tensors[id].size);
	fprintf(stderr, "%s: %llu bytes\n", out.path,
		(unsigned long long)out.position);
	free(out.temporary_path);
	engine_model_close(model);
	return 0;

err_remove:
	unlink(out.temporary_path);
err_free_path:
	free(out.temporary_path);
err_close_model:
	engine_model_close(model);
	return rc;
}
