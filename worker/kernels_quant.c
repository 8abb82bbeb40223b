/*
 * Matrix products of quantized weights (Q8_0, Q4_0), packed in groups of
 * 16 rows, and activations quantized per block of 32 to int8, with
 * AVX-512 VNNI, AVX2 and scalar paths chosen once at start-up
 * (SLAB_ISA=scalar|avx2 forces one, as for the float32 kernels).
 *
 * Determinism rule, stated in full in engine_internal.h: each output adds
 * its blocks in order, each as the exact integer sum of its 32 products
 * times the product of the two block scales, with one fused multiply-add.
 * A register contains 16 rows, one lane each, so the SIMD paths follow that
 * order lane by lane with no reduction across lanes. Integer sums are
 * exact on every path, so the paths agree bit for bit and no result
 * depends on how rows or tokens are tiled.
 */
#include "worker/engine_internal.h"

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define QK ENGINE_QUANT_BLOCK
#define GROUP ENGINE_QUANT_GROUP

/* Distance ahead in a group's stream at which Q4_0 decode prefetches. */
#define PREFETCH_BYTES 1024

/* Rows per cache block of a prefill, as in kernels.c. */
#define ROW_BLOCK_BYTES (192 * 1024)

enum quant_isa {
	QUANT_SCALAR,
	QUANT_AVX2,
	QUANT_AVX512_VNNI,
};

static enum quant_isa selected_quant_isa = QUANT_SCALAR;


__attribute__((constructor)) static void select_quant_isa(void)
{
	const char *forced = getenv("SLAB_ISA");
	bool has_vnni, has_avx2;

	__builtin_cpu_init();
	has_avx2 = __builtin_cpu_supports("avx2") &&
		   __builtin_cpu_supports("fma");
	has_vnni = has_avx2 && __builtin_cpu_supports("avx512f") &&
		   __builtin_cpu_supports("avx512bw") &&
		   __builtin_cpu_supports("avx512dq") &&
		   __builtin_cpu_supports("avx512vnni");

	if (forced != NULL && strcmp(forced, "scalar") == 0)
		selected_quant_isa = QUANT_SCALAR;
	else if (forced != NULL && strcmp(forced, "avx2") == 0 && has_avx2)
		selected_quant_isa = QUANT_AVX2;
	else if (has_vnni)
		selected_quant_isa = QUANT_AVX512_VNNI;
	else if (has_avx2)
		selected_quant_isa = QUANT_AVX2;
	else
		selected_quant_isa = QUANT_SCALAR;
}


const char *kernel_quant_isa(void)
{
	switch (selected_quant_isa) {
	case QUANT_AVX512_VNNI:
		return "avx512-vnni";
	case QUANT_AVX2:
		return "avx2";
	default:
		return "scalar";
	}
}


/*
 * Returns a code clamped to [-127, 127] and rounded to nearest even; NaN
 * becomes -127. The SIMD paths compute the same with max, min and a
 * conversion in the default rounding mode.
 */
static float clamp_round(float v)
{
	v = v > -127.0f ? v : -127.0f;
	v = v < 127.0f ? v : 127.0f;
	return nearbyintf(v);
}


static void quantize_row_scalar(int8_t *xq, float *xd, int32_t *xs,
				const float *x, int n)
{
	for (int b = 0; b < n / QK; b++) {
		const float *v = x + (size_t)b * QK;
		float amax = 0.0f;

		/* NaN compares false, so it never becomes the maximum. */
		for (int i = 0; i < QK; i++)
			amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;

		float d = amax / 127.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;

		int32_t sum = 0;

		xd[b] = d;
		for (int i = 0; i < QK; i++) {
			xq[(size_t)b * QK + i] = (int8_t)clamp_round(v[i] * id);
			sum += xq[(size_t)b * QK + i];
		}
		xs[b] = sum;
	}
}


/* ---- Packed group blocks ------------------------------------------------- */

/* Bytes of one group block: 16 scales and the codes of 16 rows. */
static inline size_t group_block_bytes(enum engine_weight_type type)
{
	return type == ENGINE_WEIGHT_Q8_0 ? sizeof(struct engine_group_q8_0)
					  : sizeof(struct engine_group_q4_0);
}


/* Bytes from the start of a group block to its codes. */
#define CODES_OFFSET (GROUP * sizeof(_Float16))

_Static_assert(offsetof(struct engine_group_q8_0, qs) == CODES_OFFSET &&
		       offsetof(struct engine_group_q4_0, qs) == CODES_OFFSET,
	       "group blocks start with their 16 scales");

/* Stored codes are q + bias: 128 for Q8_0, 8 for Q4_0. */
static inline int32_t code_bias(enum engine_weight_type type)
{
	return type == ENGINE_WEIGHT_Q8_0 ? 128 : 8;
}


/* ---- Scalar path --------------------------------------------------------- */

/* Stored code of weight k of row r in a group block. */
static int32_t stored_code(const void *block, enum engine_weight_type type,
			   int r, int k)
{
	if (type == ENGINE_WEIGHT_Q8_0)
		return ((const struct engine_group_q8_0 *)block)->qs[k / 4][r][k % 4];

	uint8_t byte = ((const struct engine_group_q4_0 *)block)
			       ->qs[(k % 16) / 4][r][k % 4];

	return k < 16 ? byte & 15 : byte >> 4;
}


static void matmul_quant_scalar(float *out, int out_stride, const int8_t *xq,
				const float *xd, const int32_t *xs,
				int n_tokens, const void *w,
				enum engine_weight_type type, int n,
				int row_begin, int row_end)
{
	const int nb = n / QK;
	const size_t block_bytes = group_block_bytes(type);
	const int32_t bias = code_bias(type);

	for (int first = row_begin; first < row_end; first += GROUP) {
		const char *group = (const char *)w +
				    (size_t)(first / GROUP) * nb * block_bytes;
		int rows = row_end - first < GROUP ? row_end - first : GROUP;

		for (int t = 0; t < n_tokens; t++) {
			const int8_t *x = xq + (size_t)t * n;
			float acc[GROUP] = { 0 };

			for (int b = 0; b < nb; b++) {
				const char *block = group + (size_t)b * block_bytes;
				_Float16 dw[GROUP];
				float dx = xd[(size_t)t * nb + b];

				memcpy(dw, block, sizeof(dw));
				for (int r = 0; r < rows; r++) {
					int32_t sum = -bias * xs[(size_t)t * nb + b];

					for (int k = 0; k < QK; k++)
						sum += stored_code(block, type, r, k) *
						       x[b * QK + k];
					acc[r] = fmaf((float)sum, (float)dw[r] * dx,
						      acc[r]);
				}
			}
			for (int r = 0; r < rows; r++)
				out[(size_t)t * out_stride + first + r] = acc[r];
		}
	}
}


/* ---- Shared by the SIMD paths ------------------------------------------- */

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 \
	__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")))

/* The 4 activation codes of run j of block b, as one int32. */
static inline int32_t activation_run(const int8_t *x, int b, int j)
{
	int32_t run;

	memcpy(&run, x + (size_t)b * QK + 4 * j, sizeof(run));
	return run;
}


/*
 * Groups of rows per cache block of a prefill: every token runs through
 * about ROW_BLOCK_BYTES of weights before the next block is read.
 */
static int groups_per_row_block(size_t group_bytes)
{
	size_t groups = ROW_BLOCK_BYTES / group_bytes;

	return groups < 4 ? 4 : (int)(groups & ~(size_t)3);
}


/* ---- AVX2 path: 8 rows per register, maddubs ----------------------------- */

/*
 * Computes one group of rows for T tokens, rows 0-7 and 8-15 in two
 * registers. Products of one run are summed exactly: for Q8_0, maddubs
 * multiplies |w| (at most 128) by x with the sign of w (at most 127 in
 * magnitude), and for Q4_0 the code (at most 15) by x; pairs stay below
 * the int16 limit and madd adds them into int32 lanes of 4 bytes. Stores
 * the first rows (1 to 16) outputs of each token.
 */
TARGET_AVX2 __attribute__((always_inline)) static inline void
tile_quant_avx2(float *out, int out_stride, const int8_t *xq, const float *xd,
		const int32_t *xs, const char *group,
		enum engine_weight_type type, int n, int rows, int T)
{
	const __m256i ones = _mm256_set1_epi16(1);
	const __m256i low_nibbles = _mm256_set1_epi8(15);
	const int nb = n / QK;
	const size_t block_bytes = group_block_bytes(type);
	__m256 acc[2][2];

	for (int h = 0; h < 2; h++)
		for (int t = 0; t < T; t++)
			acc[h][t] = _mm256_setzero_ps();

	for (int b = 0; b < nb; b++) {
		const char *block = group + (size_t)b * block_bytes;
		const char *codes = block + CODES_OFFSET;
		__m256i sums[2][2];

		for (int t = 0; t < T; t++) {
			/* Q8_0 goes in as signed weights, Q4_0 as codes. */
			__m256i start = type == ENGINE_WEIGHT_Q8_0
						? _mm256_setzero_si256()
						: _mm256_set1_epi32(
							  -8 * xs[(size_t)t * nb + b]);

			sums[0][t] = sums[1][t] = start;
		}
		if (type == ENGINE_WEIGHT_Q8_0) {
			for (int j = 0; j < QK / 4; j++)
				for (int h = 0; h < 2; h++) {
					__m256i q = _mm256_xor_si256(
						_mm256_loadu_si256(
							(const __m256i *)(codes + 64 * j +
									  32 * h)),
						_mm256_set1_epi8((char)0x80));
					__m256i magnitude = _mm256_sign_epi8(q, q);

					for (int t = 0; t < T; t++) {
						__m256i x = _mm256_set1_epi32(
							activation_run(
								xq + (size_t)t * n,
								b, j));
						__m256i products = _mm256_madd_epi16(
							_mm256_maddubs_epi16(
								magnitude,
								_mm256_sign_epi8(x, q)),
							ones);

						sums[h][t] = _mm256_add_epi32(
							sums[h][t], products);
					}
				}
		} else {
			for (int m = 0; m < QK / 8; m++)
				for (int h = 0; h < 2; h++) {
					__m256i packed = _mm256_loadu_si256(
						(const __m256i *)(codes + 64 * m +
								  32 * h));
					__m256i lo = _mm256_and_si256(packed,
								      low_nibbles);
					__m256i hi = _mm256_and_si256(
						_mm256_srli_epi16(packed, 4),
						low_nibbles);

					for (int t = 0; t < T; t++) {
						const int8_t *x = xq + (size_t)t * n;
						__m256i products = _mm256_add_epi32(
							_mm256_madd_epi16(
								_mm256_maddubs_epi16(
									lo,
									_mm256_set1_epi32(
										activation_run(
											x, b,
											m))),
								ones),
							_mm256_madd_epi16(
								_mm256_maddubs_epi16(
									hi,
									_mm256_set1_epi32(
										activation_run(
											x, b,
											m + 4))),
								ones));

						sums[h][t] = _mm256_add_epi32(
							sums[h][t], products);
					}
				}
		}

		for (int h = 0; h < 2; h++) {
			__m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(
				(const __m128i *)(block + 16 * h)));

			for (int t = 0; t < T; t++) {
				__m256 scale = _mm256_mul_ps(
					dw, _mm256_set1_ps(xd[(size_t)t * nb + b]));

				acc[h][t] = _mm256_fmadd_ps(
					_mm256_cvtepi32_ps(sums[h][t]), scale,
					acc[h][t]);
			}
		}
	}

	for (int t = 0; t < T; t++) {
		float *o = out + (size_t)t * out_stride;

		if (rows >= GROUP) {
			_mm256_storeu_ps(o, acc[0][t]);
			_mm256_storeu_ps(o + 8, acc[1][t]);
		} else {
			float all[GROUP];

			_mm256_storeu_ps(all, acc[0][t]);
			_mm256_storeu_ps(all + 8, acc[1][t]);
			memcpy(o, all, (size_t)rows * sizeof(float));
		}
	}
}


TARGET_AVX2 static void
matmul_quant_avx2(float *out, int out_stride, const int8_t *xq,
		  const float *xd, const int32_t *xs, int n_tokens,
		  const void *w, enum engine_weight_type type, int n,
		  int row_begin, int row_end)
{
	const int nb = n / QK;
	const size_t group_bytes = (size_t)nb * group_block_bytes(type);

	for (int first = row_begin; first < row_end; first += GROUP) {
		const char *group = (const char *)w +
				    (size_t)(first / GROUP) * group_bytes;
		int rows = row_end - first;
		int t = 0;

		for (; t + 2 <= n_tokens; t += 2)
			tile_quant_avx2(out + (size_t)t * out_stride + first,
					out_stride, xq + (size_t)t * n,
					xd + (size_t)t * nb, xs + (size_t)t * nb,
					group, type, n, rows, 2);
		for (; t < n_tokens; t++)
			tile_quant_avx2(out + (size_t)t * out_stride + first,
					out_stride, xq + (size_t)t * n,
					xd + (size_t)t * nb, xs + (size_t)t * nb,
					group, type, n, rows, 1);
	}
}


/* ---- AVX-512 VNNI path: 16 rows per register, vpdpbusd ------------------- */

/*
 * Computes G groups of rows for T tokens. vpdpbusd multiplies the stored
 * codes (unsigned, q + bias) by the activations (signed) and adds each
 * run of 4 into an int32 lane. Each lane starts at -bias times the block's
 * sum of activation codes, so it ends at the exact sum of q x. Stores the first rows
 * outputs of each token (all 16 G when rows is at least that).
 */
TARGET_AVX512 __attribute__((always_inline)) static inline void
tile_quant_avx512(float *out, int out_stride, const int8_t *xq,
		  const float *xd, const int32_t *xs, const char *w,
		  size_t group_bytes, enum engine_weight_type type, int n,
		  int rows, int G, int T)
{
	const __m512i low_nibbles = _mm512_set1_epi8(15);
	const int nb = n / QK;
	const size_t block_bytes = group_block_bytes(type);
	const int32_t bias = code_bias(type);
	__m512 acc[8][6];

#pragma GCC unroll 8
	for (int g = 0; g < G; g++)
#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
			acc[g][t] = _mm512_setzero_ps();

	for (int b = 0; b < nb; b++) {
		const char *block[8];
		__m512i sums[8][6];

#pragma GCC unroll 8
		for (int g = 0; g < G; g++) {
			block[g] = w + (size_t)g * group_bytes +
				   (size_t)b * block_bytes;
			/*
			 * Decode streams each group once. Fetching Q4_0 ahead
			 * measured faster; for Q8_0, with twice the lines per
			 * block, the extra instructions cost more than they gave.
			 */
			if (T == 1 && type == ENGINE_WEIGHT_Q4_0)
				for (size_t line = 0; line < block_bytes; line += 64)
					_mm_prefetch(block[g] + PREFETCH_BYTES + line,
						     _MM_HINT_T0);
		}
#pragma GCC unroll 6
		for (int t = 0; t < T; t++) {
			__m512i start = _mm512_set1_epi32(
				-bias * xs[(size_t)t * nb + b]);

#pragma GCC unroll 8
			for (int g = 0; g < G; g++)
				sums[g][t] = start;
		}

		if (type == ENGINE_WEIGHT_Q8_0) {
#pragma GCC unroll 8
			for (int j = 0; j < QK / 4; j++) {
				__m512i q[8];

#pragma GCC unroll 8
				for (int g = 0; g < G; g++)
					q[g] = _mm512_loadu_si512(
						block[g] + CODES_OFFSET + 64 * j);
#pragma GCC unroll 6
				for (int t = 0; t < T; t++) {
					__m512i x = _mm512_set1_epi32(activation_run(
						xq + (size_t)t * n, b, j));

#pragma GCC unroll 8
					for (int g = 0; g < G; g++)
						sums[g][t] = _mm512_dpbusd_epi32(
							sums[g][t], q[g], x);
				}
			}
		} else {
#pragma GCC unroll 4
			for (int m = 0; m < QK / 8; m++) {
				__m512i lo[8], hi[8];

#pragma GCC unroll 8
				for (int g = 0; g < G; g++) {
					__m512i packed = _mm512_loadu_si512(
						block[g] + CODES_OFFSET + 64 * m);

					lo[g] = _mm512_and_si512(packed, low_nibbles);
					hi[g] = _mm512_and_si512(
						_mm512_srli_epi16(packed, 4),
						low_nibbles);
				}
#pragma GCC unroll 6
				for (int t = 0; t < T; t++) {
					const int8_t *x = xq + (size_t)t * n;
					__m512i x_lo = _mm512_set1_epi32(
						activation_run(x, b, m));
					__m512i x_hi = _mm512_set1_epi32(
						activation_run(x, b, m + 4));

#pragma GCC unroll 8
					for (int g = 0; g < G; g++) {
						sums[g][t] = _mm512_dpbusd_epi32(
							sums[g][t], lo[g], x_lo);
						sums[g][t] = _mm512_dpbusd_epi32(
							sums[g][t], hi[g], x_hi);
					}
				}
			}
		}

		__m512 dw[8];

#pragma GCC unroll 8
		for (int g = 0; g < G; g++)
			dw[g] = _mm512_cvtph_ps(_mm256_loadu_si256(
				(const __m256i *)block[g]));
#pragma GCC unroll 6
		for (int t = 0; t < T; t++) {
			__m512 dx = _mm512_set1_ps(xd[(size_t)t * nb + b]);

#pragma GCC unroll 8
			for (int g = 0; g < G; g++)
				acc[g][t] = _mm512_fmadd_ps(
					_mm512_cvtepi32_ps(sums[g][t]),
					_mm512_mul_ps(dw[g], dx), acc[g][t]);
		}
	}

#pragma GCC unroll 6
	for (int t = 0; t < T; t++)
#pragma GCC unroll 8
		for (int g = 0; g < G; g++) {
			float *o = out + (size_t)t * out_stride + GROUP * g;
			int left = rows - GROUP * g;

			if (left >= GROUP)
				_mm512_storeu_ps(o, acc[g][t]);
			else
				_mm512_mask_storeu_ps(
					o, (__mmask16)((1u << left) - 1),
					acc[g][t]);
		}
}


/*
 * Runs tiles of G groups over the rows [first, end) of one row block for
 * T tokens, then single groups for what is left.
 */
#define MATMUL_QUANT_AVX512_TILES(G, T)                                       \
	do {                                                                  \
		int r = first;                                                \
		for (; r + (G) * GROUP <= end; r += (G) * GROUP)              \
			tile_quant_avx512(o + r, out_stride, xt, dt, st,      \
					  wb + (size_t)(r / GROUP) * group_bytes, \
					  group_bytes, type, n, end - r, G, T); \
		for (; r < end; r += GROUP)                                   \
			tile_quant_avx512(o + r, out_stride, xt, dt, st,      \
					  wb + (size_t)(r / GROUP) * group_bytes, \
					  group_bytes, type, n, end - r, 1, T); \
	} while (0)

/*
 * Rows are taken in blocks of about ROW_BLOCK_BYTES of weights and every
 * token runs through one block before the next, as in the float32 kernel.
 * Inlined once per weight type, so that the type is a constant.
 */
TARGET_AVX512 __attribute__((always_inline)) static inline void
matmul_quant_avx512_type(float *out, int out_stride, const int8_t *xq,
			 const float *xd, const int32_t *xs, int n_tokens,
			 const void *w, enum engine_weight_type type, int n,
			 int row_begin, int row_end)
{
	const int nb = n / QK;
	const size_t group_bytes = (size_t)nb * group_block_bytes(type);
	const int block_rows = GROUP * groups_per_row_block(group_bytes);
	const char *wb = w;

	for (int first = row_begin; first < row_end; first += block_rows) {
		int end = first + block_rows < row_end ? first + block_rows
						       : row_end;
		int t = 0;

		for (; t + 6 <= n_tokens; t += 6) {
			float *o = out + (size_t)t * out_stride;
			const int8_t *xt = xq + (size_t)t * n;
			const float *dt = xd + (size_t)t * nb;
			const int32_t *st = xs + (size_t)t * nb;

			MATMUL_QUANT_AVX512_TILES(2, 6);
		}

		float *o = out + (size_t)t * out_stride;
		const int8_t *xt = xq + (size_t)t * n;
		const float *dt = xd + (size_t)t * nb;
		const int32_t *st = xs + (size_t)t * nb;

		switch (n_tokens - t) {
		case 5:
			MATMUL_QUANT_AVX512_TILES(2, 5);
			break;
		case 4:
			MATMUL_QUANT_AVX512_TILES(2, 4);
			break;
		case 3:
			MATMUL_QUANT_AVX512_TILES(2, 3);
			break;
		case 2:
			MATMUL_QUANT_AVX512_TILES(2, 2);
			break;
		case 1:
			MATMUL_QUANT_AVX512_TILES(8, 1);
			break;
		default:
			break;
		}
	}
}


TARGET_AVX512 static void
matmul_quant_avx512(float *out, int out_stride, const int8_t *xq,
		    const float *xd, const int32_t *xs, int n_tokens,
		    const void *w, enum engine_weight_type type, int n,
		    int row_begin, int row_end)
{
	if (type == ENGINE_WEIGHT_Q8_0)
		matmul_quant_avx512_type(out, out_stride, xq, xd, xs, n_tokens,
					 w, ENGINE_WEIGHT_Q8_0, n, row_begin,
					 row_end);
	else
		matmul_quant_avx512_type(out, out_stride, xq, xd, xs, n_tokens,
					 w, ENGINE_WEIGHT_Q4_0, n, row_begin,
					 row_end);
}


/* ---- Activation quantization on SIMD paths ------------------------------ */

TARGET_AVX2 static void quantize_row_avx2(int8_t *xq, float *xd,
					  int32_t *xs, const float *x, int n)
{
	const __m256 sign_mask = _mm256_set1_ps(-0.0f);
	const __m256 low = _mm256_set1_ps(-127.0f);
	const __m256 high = _mm256_set1_ps(127.0f);

	for (int b = 0; b < n / QK; b++) {
		const float *v = x + (size_t)b * QK;
		__m256 values[4], amax = _mm256_setzero_ps();

		/* max_ps returns its second operand when either is NaN. */
		for (int k = 0; k < 4; k++) {
			values[k] = _mm256_loadu_ps(v + 8 * k);
			amax = _mm256_max_ps(_mm256_andnot_ps(sign_mask,
							      values[k]),
					     amax);
		}

		__m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax),
				       _mm256_extractf128_ps(amax, 1));
		__m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
		__m128 m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
		float d = _mm_cvtss_f32(m1) / 127.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;
		__m256i codes[4];

		xd[b] = d;
		for (int k = 0; k < 4; k++) {
			__m256 scaled = _mm256_mul_ps(values[k],
						      _mm256_set1_ps(id));

			scaled = _mm256_min_ps(_mm256_max_ps(scaled, low), high);
			codes[k] = _mm256_cvtps_epi32(scaled);
		}

		/* Pack 32 int32 codes to int8, then undo the lane interleave. */
		__m256i words = _mm256_packs_epi32(codes[0], codes[1]);
		__m256i words2 = _mm256_packs_epi32(codes[2], codes[3]);
		__m256i bytes = _mm256_packs_epi16(words, words2);

		bytes = _mm256_permutevar8x32_epi32(
			bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
		_mm256_storeu_si256((__m256i *)(xq + (size_t)b * QK), bytes);

		__m256i sums = _mm256_add_epi32(
			_mm256_add_epi32(codes[0], codes[1]),
			_mm256_add_epi32(codes[2], codes[3]));
		__m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums),
					   _mm256_extracti128_si256(sums, 1));
		__m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));

		xs[b] = _mm_cvtsi128_si32(s2) + _mm_extract_epi32(s2, 1);
	}
}


TARGET_AVX512 static void quantize_row_avx512(int8_t *xq, float *xd,
					      int32_t *xs, const float *x,
					      int n)
{
	const __m512 low = _mm512_set1_ps(-127.0f);
	const __m512 high = _mm512_set1_ps(127.0f);

	for (int b = 0; b < n / QK; b++) {
		const float *v = x + (size_t)b * QK;
		__m512 lo = _mm512_loadu_ps(v);
		__m512 hi = _mm512_loadu_ps(v + 16);

		/* max_ps returns its second operand when either is NaN. */
		__m512 amax = _mm512_max_ps(_mm512_abs_ps(lo),
					    _mm512_setzero_ps());

		amax = _mm512_max_ps(_mm512_abs_ps(hi), amax);

		float d = _mm512_reduce_max_ps(amax) / 127.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;
		__m512 scale = _mm512_set1_ps(id);

		xd[b] = d;
		lo = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(lo, scale), low),
				   high);
		hi = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(hi, scale), low),
				   high);
		__m512i codes_lo = _mm512_cvtps_epi32(lo);
		__m512i codes_hi = _mm512_cvtps_epi32(hi);

		_mm_storeu_si128((__m128i *)(xq + (size_t)b * QK),
				 _mm512_cvtsepi32_epi8(codes_lo));
		_mm_storeu_si128((__m128i *)(xq + (size_t)b * QK + 16),
				 _mm512_cvtsepi32_epi8(codes_hi));
		xs[b] = _mm512_reduce_add_epi32(
			_mm512_add_epi32(codes_lo, codes_hi));
	}
}


/* ---- Dispatch ------------------------------------------------------------ */

void kernel_matmul_quant(float *out, int out_stride, const int8_t *xq,
			 const float *xd, const int32_t *xs, int n_tokens,
			 const void *w, enum engine_weight_type type, int n,
			 int row_begin, int row_end)
{
	switch (selected_quant_isa) {
	case QUANT_AVX512_VNNI:
		matmul_quant_avx512(out, out_stride, xq, xd, xs, n_tokens, w,
				    type, n, row_begin, row_end);
		break;
	case QUANT_AVX2:
		matmul_quant_avx2(out, out_stride, xq, xd, xs, n_tokens, w,
				  type, n, row_begin, row_end);
		break;
	default:
		matmul_quant_scalar(out, out_stride, xq, xd, xs, n_tokens, w,
				    type, n, row_begin, row_end);
		break;
	}
}


void kernel_quantize_row(int8_t *xq, float *xd, int32_t *xs, const float *x,
			 int n)
{
	switch (selected_quant_isa) {
	case QUANT_AVX512_VNNI:
		quantize_row_avx512(xq, xd, xs, x, n);
		break;
	case QUANT_AVX2:
		quantize_row_avx2(xq, xd, xs, x, n);
		break;
	default:
		quantize_row_scalar(xq, xd, xs, x, n);
		break;
	}
}
