/*
 * Matrix products of quantized weights (Q8_0, Q4_0) and activations
 * quantized per block of 32 to int8, with AVX-512 VNNI, AVX2 and scalar
 * paths chosen once at start-up (SLAB_ISA=scalar|avx2 forces one, as for
 * the float32 kernels).
 *
 * Determinism rule, stated in full in engine_internal.h: each dot product
 * runs over pairs of blocks in 16 float lanes. Lane j takes the exact
 * integer sum of four products of block 2m + j / 8 and adds it, times the
 * product of the two block scales, with one fused multiply-add. The lanes
 * are then reduced by the fixed tree of kernel_dot. Integer sums are exact
 * on every path, so the paths agree bit for bit and no result depends on
 * how rows or tokens are tiled.
 */
#include "worker/engine_internal.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
#define QK ENGINE_QUANT_BLOCK

/* Rows per cache block of a prefill, as in kernels.c. */
#define ROW_BLOCK_BYTES (192 * 1024)

/*
 * Distance ahead of the current block at which each row is prefetched.
 * Rows are stored back to back, so the prefetches of a tile together run
 * this far ahead in the weights, reaching into later tiles when a row is
 * short. Measured single-thread on a 2-core AVX-512 AMD EPYC, Q8_0 with
 * 768-wide rows streamed 21 GB/s at 512 bytes and 30 GB/s at 8 KB.
 */
#define PREFETCH_BYTES 8192

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


static void quantize_row_scalar(int8_t *xq, float *xd, const float *x, int n)
{
	for (int b = 0; b < n / QK; b++) {
		const float *v = x + (size_t)b * QK;
		float amax = 0.0f;

		/* NaN compares false, so it never becomes the maximum. */
		for (int i = 0; i < QK; i++)
			amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;

		float d = amax / 127.0f;
		float id = d != 0.0f ? 1.0f / d : 0.0f;

		xd[b] = d;
		for (int i = 0; i < QK; i++)
			xq[(size_t)b * QK + i] = (int8_t)clamp_round(v[i] * id);
	}
}


/* ---- Scalar path --------------------------------------------------------- */

static float reduce_lanes(const float *acc)
{
	float r8[8], r4[4], r2[2];

	for (int j = 0; j < 8; j++)
		r8[j] = acc[j] + acc[j + 8];
	for (int j = 0; j < 4; j++)
		r4[j] = r8[j] + r8[j + 4];
	for (int j = 0; j < 2; j++)
		r2[j] = r4[j] + r4[j + 2];
	return r2[0] + r2[1];
}


/* Unpacks block b of a row into 32 int8 weights and returns its scale. */
static float unpack_block(const void *w, enum engine_weight_type type, int b,
			  int8_t *q)
{
	if (type == ENGINE_WEIGHT_Q8_0) {
		const struct engine_block_q8_0 *block =
			(const struct engine_block_q8_0 *)w + b;

		memcpy(q, block->qs, QK);
		return (float)block->d;
	}

	const struct engine_block_q4_0 *block =
		(const struct engine_block_q4_0 *)w + b;

	for (int j = 0; j < QK / 2; j++) {
		q[j] = (int8_t)((block->qs[j] & 15) - 8);
		q[j + QK / 2] = (int8_t)((block->qs[j] >> 4) - 8);
	}
	return (float)block->d;
}


static float dot_quant_scalar(const void *w, enum engine_weight_type type,
			      const int8_t *xq, const float *xd, int n)
{
	float acc[LANES] = { 0 };
	int nb = n / QK;

	for (int pair = 0; pair < nb; pair += 2) {
		for (int half = 0; half < 2; half++) {
			int b = pair + half;
			int32_t sums[8] = { 0 };
			float scale = 0.0f;

			if (b < nb) {
				int8_t q[QK];
				float dw = unpack_block(w, type, b, q);

				scale = dw * xd[b];
				for (int i = 0; i < QK; i++)
					sums[i / 4] += q[i] *
						       xq[(size_t)b * QK + i];
			}
			for (int j = 0; j < 8; j++)
				acc[half * 8 + j] = fmaf(scale, (float)sums[j],
							 acc[half * 8 + j]);
		}
	}
	return reduce_lanes(acc);
}


static void matmul_quant_scalar(float *out, int out_stride, const int8_t *xq,
				const float *xd, int n_tokens, const void *w,
				enum engine_weight_type type, int n,
				int row_begin, int row_end)
{
	size_t row_bytes = (size_t)engine_weight_bytes(type, (uint64_t)n);

	for (int i = row_begin; i < row_end; i++)
		for (int t = 0; t < n_tokens; t++)
			out[(size_t)t * out_stride + i] = dot_quant_scalar(
				(const char *)w + (size_t)i * row_bytes, type,
				xq + (size_t)t * n, xd + (size_t)t * (n / QK),
				n);
}


/* ---- Shared by the SIMD paths ------------------------------------------- */

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 \
	__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")))

/* Unpacks the 32 stored codes (q + 8, in [0, 15]) of a Q4_0 block, in order. */
TARGET_AVX2 static inline __m256i unpack_q4_0_codes(const struct engine_block_q4_0 *b)
{
	const __m128i low_nibbles = _mm_set1_epi8(15);
	__m128i raw = _mm_loadu_si128((const __m128i *)b->qs);
	__m128i lo = _mm_and_si128(raw, low_nibbles);
	__m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_nibbles);

	return _mm256_set_m128i(hi, lo);
}


/* Unpacks one Q4_0 block into 32 int8 weights in [-8, 7], in order. */
TARGET_AVX2 static inline __m256i unpack_q4_0(const struct engine_block_q4_0 *b)
{
	return _mm256_sub_epi8(unpack_q4_0_codes(b), _mm256_set1_epi8(8));
}


/* Returns block b of a row as 32 int8 weights and stores its scale. */
TARGET_AVX2 static inline __m256i load_block(const void *w,
					     enum engine_weight_type type,
					     int b, float *d)
{
	if (type == ENGINE_WEIGHT_Q8_0) {
		const struct engine_block_q8_0 *block =
			(const struct engine_block_q8_0 *)w + b;

		*d = (float)block->d;
		return _mm256_loadu_si256((const __m256i *)block->qs);
	}

	const struct engine_block_q4_0 *block =
		(const struct engine_block_q4_0 *)w + b;

	*d = (float)block->d;
	return unpack_q4_0(block);
}


/* ---- AVX2 path: lanes 0-7 and 8-15 in two registers, maddubs ------------ */

TARGET_AVX2 static inline float reduce_avx2(__m256 lo, __m256 hi)
{
	__m256 r8 = _mm256_add_ps(lo, hi);
	__m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8),
			       _mm256_extractf128_ps(r8, 1));
	__m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
	__m128 r1 = _mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1));

	return _mm_cvtss_f32(r1);
}


/*
 * Computes an R x T tile of quantized dot products. Products of one block
 * are summed exactly: maddubs multiplies |w| (at most 128) by x with the
 * sign of w (at most 127 in magnitude) and adds pairs without reaching the
 * int16 limit, and madd adds those pairs into int32 lanes of 4 bytes.
 */
TARGET_AVX2 __attribute__((always_inline)) static inline void
tile_quant_avx2(float *out, int out_stride, const int8_t *xq, const float *xd,
		const char *w, size_t row_bytes, enum engine_weight_type type,
		int n, int R, int T)
{
	const __m256i ones = _mm256_set1_epi16(1);
	const int nb = n / QK;
	__m256 acc[2][2][2];

	for (int r = 0; r < R; r++)
		for (int t = 0; t < T; t++)
			acc[r][t][0] = acc[r][t][1] = _mm256_setzero_ps();

	for (int b = 0; b < nb; b++) {
		int half = b & 1;
		__m256i x[2];

		for (int t = 0; t < T; t++)
			x[t] = _mm256_loadu_si256(
				(const __m256i *)(xq + (size_t)t * n +
						  (size_t)b * QK));
		for (int r = 0; r < R; r++) {
			float dw;
			__m256i q = load_block(w + (size_t)r * row_bytes, type,
					       b, &dw);
			__m256i magnitude = _mm256_sign_epi8(q, q);

			for (int t = 0; t < T; t++) {
				__m256i signed_x = _mm256_sign_epi8(x[t], q);
				__m256i sums = _mm256_madd_epi16(
					_mm256_maddubs_epi16(magnitude,
							     signed_x),
					ones);
				__m256 scale = _mm256_set1_ps(
					dw * xd[(size_t)t * nb + b]);

				acc[r][t][half] = _mm256_fmadd_ps(
					scale, _mm256_cvtepi32_ps(sums),
					acc[r][t][half]);
			}
		}
	}

	for (int r = 0; r < R; r++)
		for (int t = 0; t < T; t++)
			out[(size_t)t * out_stride + r] =
				reduce_avx2(acc[r][t][0], acc[r][t][1]);
}


TARGET_AVX2 static void
matmul_quant_avx2(float *out, int out_stride, const int8_t *xq,
		  const float *xd, int n_tokens, const void *w,
		  enum engine_weight_type type, int n, int row_begin,
		  int row_end)
{
	size_t row_bytes = (size_t)engine_weight_bytes(type, (uint64_t)n);
	size_t x_scales = (size_t)(n / QK);
	int i = row_begin;

	for (; i + 2 <= row_end; i += 2) {
		const char *wi = (const char *)w + (size_t)i * row_bytes;
		int t = 0;

		for (; t + 2 <= n_tokens; t += 2)
			tile_quant_avx2(out + (size_t)t * out_stride + i,
					out_stride, xq + (size_t)t * n,
					xd + (size_t)t * x_scales, wi,
					row_bytes, type, n, 2, 2);
		for (; t < n_tokens; t++)
			tile_quant_avx2(out + (size_t)t * out_stride + i,
					out_stride, xq + (size_t)t * n,
					xd + (size_t)t * x_scales, wi,
					row_bytes, type, n, 2, 1);
	}
	for (; i < row_end; i++) {
		const char *wi = (const char *)w + (size_t)i * row_bytes;

		for (int t = 0; t < n_tokens; t++)
			tile_quant_avx2(out + (size_t)t * out_stride + i,
					out_stride, xq + (size_t)t * n,
					xd + (size_t)t * x_scales, wi,
					row_bytes, type, n, 1, 1);
	}
}


/* ---- AVX-512 VNNI path: 16 lanes, two blocks per register --------------- */

TARGET_AVX512 static inline float reduce_avx512(__m512 acc)
{
	__m256 r8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
				  _mm512_extractf32x8_ps(acc, 1));
	__m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8),
			       _mm256_extractf128_ps(r8, 1));
	__m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
	__m128 r1 = _mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1));

	return _mm_cvtss_f32(r1);
}


/*
 * Returns block b of a row as 32 unsigned bytes w + bias and stores its
 * scale: bias 128 for Q8_0 (w xor 0x80), and 8 for Q4_0, whose stored codes
 * already are w + 8.
 */
TARGET_AVX2 static inline __m256i load_block_biased(const void *w,
						    enum engine_weight_type type,
						    int b, float *d)
{
	if (type == ENGINE_WEIGHT_Q8_0) {
		const struct engine_block_q8_0 *block =
			(const struct engine_block_q8_0 *)w + b;

		*d = (float)block->d;
		return _mm256_xor_si256(
			_mm256_loadu_si256((const __m256i *)block->qs),
			_mm256_set1_epi8((char)0x80));
	}

	const struct engine_block_q4_0 *block =
		(const struct engine_block_q4_0 *)w + b;

	*d = (float)block->d;
	return unpack_q4_0_codes(block);
}


/* Returns the float16 bits of the scale of block b of a row. */
static inline uint16_t block_scale_bits(const void *w,
					enum engine_weight_type type, int b)
{
	uint16_t bits;

	if (type == ENGINE_WEIGHT_Q8_0)
		memcpy(&bits, &((const struct engine_block_q8_0 *)w + b)->d,
		       sizeof(bits));
	else
		memcpy(&bits, &((const struct engine_block_q4_0 *)w + b)->d,
		       sizeof(bits));
	return bits;
}


/*
 * Returns the blocks b and b + 1 of a row as 64 unsigned bytes w + bias, as
 * load_block_biased does for one block. For Q4_0 the two blocks' packed
 * bytes share one register: the low nibbles of both and the high nibbles of
 * both, then a shuffle of 128-bit parts puts them in block order.
 */
TARGET_AVX512 static inline __m512i load_pair_biased(const void *w,
						     enum engine_weight_type type,
						     int b)
{
	if (type == ENGINE_WEIGHT_Q8_0) {
		const struct engine_block_q8_0 *block =
			(const struct engine_block_q8_0 *)w + b;
		__m512i q = _mm512_inserti64x4(
			_mm512_castsi256_si512(_mm256_loadu_si256(
				(const __m256i *)block[0].qs)),
			_mm256_loadu_si256((const __m256i *)block[1].qs), 1);

		return _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
	}

	const struct engine_block_q4_0 *block =
		(const struct engine_block_q4_0 *)w + b;
	__m256i packed = _mm256_inserti128_si256(
		_mm256_castsi128_si256(
			_mm_loadu_si128((const __m128i *)block[0].qs)),
		_mm_loadu_si128((const __m128i *)block[1].qs), 1);
	/* 128-bit parts: low nibbles of b, of b + 1, high of b, of b + 1. */
	__m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(packed),
					     _mm256_srli_epi16(packed, 4), 1);

	nibbles = _mm512_shuffle_i64x2(nibbles, nibbles,
				       _MM_SHUFFLE(3, 1, 2, 0));
	return _mm512_and_si512(nibbles, _mm512_set1_epi8(15));
}


/*
 * Adds the block pair (b, b + 1) of R rows and T tokens to acc. The second
 * block is absent (zeros with scale 0) when pair is false. vpdpbusd
 * multiplies unsigned by signed bytes, so the weights go in as w + bias and
 * the activations as they are. The accumulator starts at -bias times each
 * lane's sum of activations, which leaves the exact sum of w x (at most
 * 4 * 255 * 127 in magnitude before the correction).
 *
 * One instruction converts the float16 scales of the R rows, in the order
 * (row 0, b), (row 0, b + 1), (row 1, b) and so on. They are multiplied by
 * the activation scales and then spread to the lanes of each row by a
 * permutation. Each product is the same float as one row at a time gives.
 */
TARGET_AVX512 __attribute__((always_inline)) static inline void
pair_step_avx512(__m512 acc[4][4], const int8_t *xq, const float *xd,
		 const char *w, size_t row_bytes, enum engine_weight_type type,
		 int n, int b, bool pair, int R, int T)
{
	const __m512i ones = _mm512_set1_epi8(1);
	const int bias_shift = type == ENGINE_WEIGHT_Q8_0 ? 7 : 3;
	const int nb = n / QK;
	__m512i x[4], correction[4];
	__m256 dx[4];

#pragma GCC unroll 4
	for (int t = 0; t < T; t++) {
		const int8_t *xt = xq + (size_t)t * n + (size_t)b * QK;
		const float *dt = xd + (size_t)t * nb + b;
		__m512i sums;
		__m128 dx_pair;

		x[t] = pair ? _mm512_loadu_si512(xt)
			    : _mm512_zextsi256_si512(
				      _mm256_loadu_si256((const __m256i *)xt));
		sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, x[t]);
		correction[t] = _mm512_sub_epi32(
			_mm512_setzero_si512(),
			_mm512_slli_epi32(sums, bias_shift));
		/* dx is (dt[0], dt[1]) four times, with 0 for an absent dt[1]. */
		dx_pair = pair ? _mm_castsi128_ps(
					 _mm_loadl_epi64((const __m128i *)dt))
			       : _mm_load_ss(dt);
		dx[t] = _mm256_castpd_ps(
			_mm256_broadcastsd_pd(_mm_castps_pd(dx_pair)));
	}

	__m128i scale_bits = _mm_setzero_si128();

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		const char *wr = w + (size_t)r * row_bytes;

		scale_bits = _mm_insert_epi16(scale_bits,
					      block_scale_bits(wr, type, b),
					      2 * r);
		if (pair)
			scale_bits = _mm_insert_epi16(
				scale_bits, block_scale_bits(wr, type, b + 1),
				2 * r + 1);
	}

	__m256 dw = _mm256_cvtph_ps(scale_bits);
	__m256 scales[4];

#pragma GCC unroll 4
	for (int t = 0; t < T; t++)
		scales[t] = _mm256_mul_ps(dw, dx[t]);

#pragma GCC unroll 4
	for (int r = 0; r < R; r++) {
		const char *wr = w + (size_t)r * row_bytes;
		/* Lanes 0-7 take scale 2r (block b), lanes 8-15 scale 2r + 1. */
		const __m512i spread = _mm512_set_epi32(
			2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1,
			2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r, 2 * r, 2 * r,
			2 * r, 2 * r, 2 * r, 2 * r, 2 * r);
		__m512i q;

		_mm_prefetch(wr + (size_t)b * (row_bytes / nb) + PREFETCH_BYTES,
			     _MM_HINT_T0);
		if (pair)
			q = load_pair_biased(wr, type, b);
		else
			q = _mm512_zextsi256_si512(
				load_block_biased(wr, type, b, &(float){ 0 }));

#pragma GCC unroll 4
		for (int t = 0; t < T; t++) {
			__m512i sums = _mm512_dpbusd_epi32(correction[t], q,
							   x[t]);
			__m512 scale = _mm512_permutexvar_ps(
				spread, _mm512_castps256_ps512(scales[t]));

			acc[r][t] = _mm512_fmadd_ps(scale,
						    _mm512_cvtepi32_ps(sums),
						    acc[r][t]);
		}
	}
}


/*
 * Computes an R x T tile of quantized dot products. Called with constant
 * R, T and type so that the accumulators stay in registers.
 */
TARGET_AVX512 __attribute__((always_inline)) static inline void
tile_quant_avx512(float *out, int out_stride, const int8_t *xq,
		  const float *xd, const char *w, size_t row_bytes,
		  enum engine_weight_type type, int n, int R, int T)
{
	const int nb = n / QK;
	__m512 acc[4][4];
	int b = 0;

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			acc[r][t] = _mm512_setzero_ps();

	for (; b + 2 <= nb; b += 2)
		pair_step_avx512(acc, xq, xd, w, row_bytes, type, n, b, true,
				 R, T);
	if (b < nb)
		pair_step_avx512(acc, xq, xd, w, row_bytes, type, n, b, false,
				 R, T);

#pragma GCC unroll 4
	for (int r = 0; r < R; r++)
#pragma GCC unroll 4
		for (int t = 0; t < T; t++)
			out[(size_t)t * out_stride + r] = reduce_avx512(acc[r][t]);
}


/* Runs the 4-row tiles of one group of tokens, then the leftover rows. */
#define MATMUL_QUANT_AVX512_TOKENS(T)                                         \
	do {                                                                  \
		int i = block_begin;                                          \
		for (; i + 4 <= block_end; i += 4)                            \
			tile_quant_avx512(o + i, out_stride, xt, dt,          \
					  wb + (size_t)i * row_bytes,         \
					  row_bytes, type, n, 4, T);          \
		for (; i < block_end; i++)                                    \
			tile_quant_avx512(o + i, out_stride, xt, dt,          \
					  wb + (size_t)i * row_bytes,         \
					  row_bytes, type, n, 1, T);          \
	} while (0)

/*
 * Rows are taken in blocks of about ROW_BLOCK_BYTES of weights and every
 * token runs through one block before the next, as in the float32 kernel.
 * Inlined once per weight type, so that the type is a constant.
 */
TARGET_AVX512 __attribute__((always_inline)) static inline void
matmul_quant_avx512_type(float *out, int out_stride, const int8_t *xq,
			 const float *xd, int n_tokens, const void *w,
			 enum engine_weight_type type, int n, int row_begin,
			 int row_end)
{
	size_t row_bytes = (size_t)engine_weight_bytes(type, (uint64_t)n);
	size_t x_scales = (size_t)(n / QK);
	const char *wb = w;
	int block_rows = (int)(ROW_BLOCK_BYTES / row_bytes);

	block_rows = block_rows < 4 ? 4 : block_rows & ~3;
	for (int block_begin = row_begin; block_begin < row_end;
	     block_begin += block_rows) {
		int block_end = block_begin + block_rows < row_end
					? block_begin + block_rows
					: row_end;
		int t = 0;

		for (; t + 4 <= n_tokens; t += 4) {
			float *o = out + (size_t)t * out_stride;
			const int8_t *xt = xq + (size_t)t * n;
			const float *dt = xd + (size_t)t * x_scales;

			MATMUL_QUANT_AVX512_TOKENS(4);
		}
		for (; t < n_tokens; t++) {
			float *o = out + (size_t)t * out_stride;
			const int8_t *xt = xq + (size_t)t * n;
			const float *dt = xd + (size_t)t * x_scales;

			MATMUL_QUANT_AVX512_TOKENS(1);
		}
	}
}


TARGET_AVX512 static void
matmul_quant_avx512(float *out, int out_stride, const int8_t *xq,
		    const float *xd, int n_tokens, const void *w,
		    enum engine_weight_type type, int n, int row_begin,
		    int row_end)
{
	if (type == ENGINE_WEIGHT_Q8_0)
		matmul_quant_avx512_type(out, out_stride, xq, xd, n_tokens, w,
					 ENGINE_WEIGHT_Q8_0, n, row_begin,
					 row_end);
	else
		matmul_quant_avx512_type(out, out_stride, xq, xd, n_tokens, w,
					 ENGINE_WEIGHT_Q4_0, n, row_begin,
					 row_end);
}


/* ---- Activation quantization on SIMD paths ------------------------------ */

TARGET_AVX2 static void quantize_row_avx2(int8_t *xq, float *xd,
					  const float *x, int n)
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
	}
}


TARGET_AVX512 static void quantize_row_avx512(int8_t *xq, float *xd,
					      const float *x, int n)
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
		_mm_storeu_si128((__m128i *)(xq + (size_t)b * QK),
				 _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(lo)));
		_mm_storeu_si128((__m128i *)(xq + (size_t)b * QK + 16),
				 _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(hi)));
	}
}


/* ---- Dispatch ------------------------------------------------------------ */

void kernel_matmul_quant(float *out, int out_stride, const int8_t *xq,
			 const float *xd, int n_tokens, const void *w,
			 enum engine_weight_type type, int n, int row_begin,
			 int row_end)
{
	switch (selected_quant_isa) {
	case QUANT_AVX512_VNNI:
		matmul_quant_avx512(out, out_stride, xq, xd, n_tokens, w, type,
				    n, row_begin, row_end);
		break;
	case QUANT_AVX2:
		matmul_quant_avx2(out, out_stride, xq, xd, n_tokens, w, type, n,
				  row_begin, row_end);
		break;
	default:
		matmul_quant_scalar(out, out_stride, xq, xd, n_tokens, w, type,
				    n, row_begin, row_end);
		break;
	}
}


void kernel_quantize_row(int8_t *xq, float *xd, const float *x, int n)
{
	switch (selected_quant_isa) {
	case QUANT_AVX512_VNNI:
		quantize_row_avx512(xq, xd, x, n);
		break;
	case QUANT_AVX2:
		quantize_row_avx2(xq, xd, x, n);
		break;
	default:
		quantize_row_scalar(xq, xd, x, n);
		break;
	}
}


float kernel_dot_quant(const void *w, enum engine_weight_type type,
		       const int8_t *xq, const float *xd, int n)
{
	float out;

	kernel_matmul_quant(&out, 1, xq, xd, 1, w, type, n, 0, 1);
	return out;
}
