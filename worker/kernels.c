/*
 * Compute kernels of the forward pass, with AVX-512, AVX2 and scalar paths
 * chosen once at start-up (SLAB_ISA=scalar|avx2|avx512 forces one).
 *
 * Determinism rule: every path computes each dot product as 16 interleaved
 * fused multiply-add chains reduced by one fixed tree, and element-wise
 * operations as separate multiplies and adds, so the paths agree bit for
 * bit and no result depends on how rows or tokens are tiled.
 */
#include "worker/engine_internal.h"
#include "worker/simd.h"

#include <assert.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

/* Distance of software prefetches in a weight row, in bytes. */
#define PREFETCH_BYTES 512

/* The same for prefill tiles, whose rows come from the L2 cache. */
#define PREFILL_PREFETCH_BYTES 256

enum isa {
	ISA_SCALAR,
	ISA_AVX2,
	ISA_AVX512,
};

static enum isa selected_isa = ISA_SCALAR;


__attribute__((constructor)) static void select_isa(void)
{
	const char *forced = getenv("SLAB_ISA");
	bool has_avx512, has_avx2;

	__builtin_cpu_init();
	has_avx512 = __builtin_cpu_supports("avx512f") &&
		     __builtin_cpu_supports("avx512dq");
	has_avx2 = __builtin_cpu_supports("avx2") &&
		   __builtin_cpu_supports("fma");

	if (forced != NULL && strcmp(forced, "scalar") == 0)
		selected_isa = ISA_SCALAR;
	else if (forced != NULL && strcmp(forced, "avx2") == 0 && has_avx2)
		selected_isa = ISA_AVX2;
	else if (has_avx512)
		selected_isa = ISA_AVX512;
	else if (has_avx2)
		selected_isa = ISA_AVX2;
	else
		selected_isa = ISA_SCALAR;
}


const char *kernel_isa(void)
{
	switch (selected_isa) {
	case ISA_AVX512:
		return "avx512";
	case ISA_AVX2:
		return "avx2";
	default:
		return "scalar";
	}
}


const char *engine_kernel_isa(void)
{
	return kernel_isa();
}


/* ---- Scalar path --------------------------------------------------------- */

/* Reduces 16 partial sums by the fixed tree. */
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


static float dot_scalar(const float *a, const float *b, int n)
{
	float acc[LANES] = {0};

	for (int k = 0; k < n; k++)
		acc[k % LANES] = fmaf(a[k], b[k], acc[k % LANES]);
	return reduce_lanes(acc);
}


static void matmul_scalar(float *out, int out_stride, const float *x,
			  int n_tokens, const float *w, int n, int row_begin,
			  int row_end)
{
	for (int i = row_begin; i < row_end; i++)
		for (int t = 0; t < n_tokens; t++)
			out[(size_t)t * out_stride + i] =
				dot_scalar(w + (size_t)i * n,
					   x + (size_t)t * n, n);
}


/* ---- AVX2 path: 16 lanes as two 8-wide registers ----------------------- */

__attribute__((target("avx2,fma"))) static inline float
reduce_avx2(__m256 lo, __m256 hi)
{
	__m256 r8 = _mm256_add_ps(lo, hi);
	__m128 r4 = _mm_add_ps(_mm256_castps256_ps128(r8),
			       _mm256_extractf128_ps(r8, 1));
	__m128 r2 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
	__m128 r1 = _mm_add_ss(r2, _mm_shuffle_ps(r2, r2, 1));

	return _mm_cvtss_f32(r1);
}


__attribute__((target("avx2,fma"))) static inline __m256i
tail_mask_avx2(int count)
{
	const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);

	return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
}


/*
 * Computes an R x T tile of dot products (R rows of w against T tokens of
 * x). Called with constant R and T. The unroll pragmas keep the
 * accumulators in registers, as in tile_avx512.
 */
__attribute__((target("avx2,fma"), always_inline)) static inline void
tile_avx2(float *out, int out_stride, const float *x, const float *w, int n,
	  int R, int T)
{
	__m256 lo[2][2], hi[2][2];
	int k = 0;

#pragma GCC unroll 2
	for (int r = 0; r < R; r++)
#pragma GCC unroll 2
		for (int t = 0; t < T; t++)
			lo[r][t] = hi[r][t] = _mm256_setzero_ps();

	for (; k + LANES <= n; k += LANES) {
		__m256 xl[2], xh[2];

#pragma GCC unroll 2
		for (int t = 0; t < T; t++) {
			xl[t] = _mm256_loadu_ps(x + (size_t)t * n + k);
			xh[t] = _mm256_loadu_ps(x + (size_t)t * n + k + 8);
		}
#pragma GCC unroll 2
		for (int r = 0; r < R; r++) {
			__m256 wl = _mm256_loadu_ps(w + (size_t)r * n + k);
			__m256 wh = _mm256_loadu_ps(w + (size_t)r * n + k + 8);

#pragma GCC unroll 2
			for (int t = 0; t < T; t++) {
				lo[r][t] = _mm256_fmadd_ps(wl, xl[t], lo[r][t]);
				hi[r][t] = _mm256_fmadd_ps(wh, xh[t], hi[r][t]);
			}
		}
	}
	if (k < n) {
		int rest = n - k;
		__m256i mask_lo = tail_mask_avx2(rest);
		__m256i mask_hi = tail_mask_avx2(rest - 8);

#pragma GCC unroll 2
		for (int r = 0; r < R; r++) {
			const float *wr = w + (size_t)r * n + k;
			__m256 wl = _mm256_maskload_ps(wr, mask_lo);
			__m256 wh = _mm256_maskload_ps(wr + 8, mask_hi);

#pragma GCC unroll 2
			for (int t = 0; t < T; t++) {
				const float *xt = x + (size_t)t * n + k;
				__m256 xl = _mm256_maskload_ps(xt, mask_lo);
				__m256 xh = _mm256_maskload_ps(xt + 8, mask_hi);

				lo[r][t] = _mm256_fmadd_ps(wl, xl, lo[r][t]);
				hi[r][t] = _mm256_fmadd_ps(wh, xh, hi[r][t]);
			}
		}
	}

#pragma GCC unroll 2
	for (int r = 0; r < R; r++)
#pragma GCC unroll 2
		for (int t = 0; t < T; t++)
			out[(size_t)t * out_stride + r] =
				reduce_avx2(lo[r][t], hi[r][t]);
}


__attribute__((target("avx2,fma"))) static float
dot_avx2(const float *a, const float *b, int n)
{
	float out;

	tile_avx2(&out, 1, b, a, n, 1, 1);
	return out;
}


__attribute__((target("avx2,fma"))) static void
matmul_avx2(float *out, int out_stride, const float *x, int n_tokens,
	    const float *w, int n, int row_begin, int row_end)
{
	int i = row_begin;

	for (; i + 2 <= row_end; i += 2) {
		const float *wi = w + (size_t)i * n;
		int t = 0;

		for (; t + 2 <= n_tokens; t += 2)
			tile_avx2(out + (size_t)t * out_stride + i, out_stride,
				  x + (size_t)t * n, wi, n, 2, 2);
		for (; t < n_tokens; t++)
			tile_avx2(out + (size_t)t * out_stride + i, out_stride,
				  x + (size_t)t * n, wi, n, 2, 1);
	}
	for (; i < row_end; i++) {
		const float *wi = w + (size_t)i * n;

		for (int t = 0; t < n_tokens; t++)
			tile_avx2(out + (size_t)t * out_stride + i, out_stride,
				  x + (size_t)t * n, wi, n, 1, 1);
	}
}


/* ---- AVX-512 path: 16 lanes in one register ----------------------------- */

/*
 * Computes an R x T tile of dot products (R rows of w against T tokens of
 * x) over elements [k_begin, k_end) of each row, with R at most 8 and T at
 * most 6. k_begin and k_end are multiples of LANES, except that k_end may
 * be n. A tile that starts after 0 continues from the 16-lane partial sums
 * in partial (R, 6). A tile that ends before n stores its partial sums
 * there, and one that ends at n writes the reduced dot products to out.
 * Each lane still takes its elements in order, so the split does not
 * change the result.
 *
 * Called with constant R and T. GCC 12 at -O2 does not unroll the loops
 * over them by itself, and then the accumulators stay in a stack array
 * where every fused multiply-add waits on a store and a load. The pragmas
 * ask for full unrolling.
 */
__attribute__((target("avx512f,avx512dq,fma"), always_inline)) static inline void
tile_avx512(float *out, int out_stride, __m512 *partial, const float *x,
	    const float *w, int n, int k_begin, int k_end, int R, int T)
{
	__m512 acc[8][6];
	int k = k_begin;

#pragma GCC unroll 8
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
			acc[r][t] = k_begin == 0 ? _mm512_setzero_ps()
						 : partial[r * 6 + t];

	for (; k + LANES <= k_end; k += LANES) {
		__m512 xv[6];

#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
			xv[t] = _mm512_loadu_ps(x + (size_t)t * n + k);
#pragma GCC unroll 8
		for (int r = 0; r < R; r++) {
			__m512 wv = _mm512_loadu_ps(w + (size_t)r * n + k);

			/*
			 * Decode streams each weight once, and a prefill tile
			 * reads its rows from L2: both fetch ahead.
			 */
			_mm_prefetch((const char *)(w + (size_t)r * n + k) +
					     (T == 1 ? PREFETCH_BYTES
						     : PREFILL_PREFETCH_BYTES),
				     _MM_HINT_T0);
#pragma GCC unroll 6
			for (int t = 0; t < T; t++)
				acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
		}
	}
	if (k_end < n) {
#pragma GCC unroll 8
		for (int r = 0; r < R; r++)
#pragma GCC unroll 6
			for (int t = 0; t < T; t++)
				partial[r * 6 + t] = acc[r][t];
		return;
	}
	if (k < n) {
		__mmask16 mask = lanes_mask(n - k);
		__m512 xv[6];

#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
			xv[t] = _mm512_maskz_loadu_ps(mask, x + (size_t)t * n + k);
#pragma GCC unroll 8
		for (int r = 0; r < R; r++) {
			__m512 wv = _mm512_maskz_loadu_ps(mask,
							  w + (size_t)r * n + k);

#pragma GCC unroll 6
			for (int t = 0; t < T; t++)
				acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
		}
	}

	if (R % 4 == 0) {
#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
#pragma GCC unroll 2
			for (int r = 0; r < R; r += 4)
				_mm_storeu_ps(out + (size_t)t * out_stride + r,
					      reduce_four_avx512(acc[r][t], acc[r + 1][t],
								 acc[r + 2][t],
								 acc[r + 3][t]));
		return;
	}
#pragma GCC unroll 8
	for (int r = 0; r < R; r++)
#pragma GCC unroll 6
		for (int t = 0; t < T; t++)
			out[(size_t)t * out_stride + r] = reduce_avx512(acc[r][t]);
}


__attribute__((target("avx512f,avx512dq,fma"))) static float
dot_avx512(const float *a, const float *b, int n)
{
	float out;

	tile_avx512(&out, 1, NULL, b, a, n, 0, n, 1, 1);
	return out;
}


/*
 * Runs the tiles of one group of tokens over elements [k_begin, k_end).
 * A single token takes 8 rows at a time, because decode streams weights
 * and more rows in flight read them faster. Other groups take 4 rows at a
 * time. The leftover rows go one by one. Prefill takes tokens 6 at a time,
 * the most whose 4 x 6 accumulators still fit the 32 vector registers with
 * the token rows. Row i keeps its partial sums at
 * partial[(i - block_begin) * 6].
 */
#define MATMUL_AVX512_TOKENS(T)                                               \
	do {                                                                  \
		int i = block_begin;                                          \
		for (; T == 1 && i + 8 <= block_end; i += 8)                  \
			tile_avx512(o + i, out_stride,                        \
				    partial + (i - block_begin) * 6, xt,      \
				    w + (size_t)i * n, n, k_begin, k_end, 8,  \
				    T);                                       \
		for (; i + 4 <= block_end; i += 4)                            \
			tile_avx512(o + i, out_stride,                        \
				    partial + (i - block_begin) * 6, xt,      \
				    w + (size_t)i * n, n, k_begin, k_end, 4,  \
				    T);                                       \
		for (; i < block_end; i++)                                    \
			tile_avx512(o + i, out_stride,                        \
				    partial + (i - block_begin) * 6, xt,      \
				    w + (size_t)i * n, n, k_begin, k_end, 1,  \
				    T);                                       \
	} while (0)

/*
 * Rows are taken in blocks of about ROW_BLOCK_BYTES of weights, and every
 * token runs through one block before the next: with many tokens (prefill)
 * each weight is then read from memory once, not once per group of tokens.
 */
#define ROW_BLOCK_BYTES (192 * 1024)

/*
 * With several tokens, rows longer than K_BLOCK floats are split into
 * pieces of K_BLOCK. Each group of tokens runs through every row of the
 * block on one piece before the next, so its 6 token rows (24 KiB) stay in
 * the L1 data cache. Timed on the 768 x 2048 product with 227 tokens on two
 * Zen 5 cores (48 KiB L1 each), 1024 was 3% faster than 512 and 7% faster
 * than 256.
 *
 * NOTE: the rows in tests/test_kernels.c are at most 100 floats long, so
 * the test suite does not run the split path.
 */
#define K_BLOCK 1024
#define MAX_BLOCK_ROWS (ROW_BLOCK_BYTES / (K_BLOCK * sizeof(float)))

_Static_assert(MAX_BLOCK_ROWS >= 4,
	       "partial holds the smallest row block of a split product");

/* Runs tokens [t, t + T) through the rows of the block, piece by piece. */
#define MATMUL_AVX512_GROUP(T)                                                \
	do {                                                                  \
		float *o = out + (size_t)t * out_stride;                      \
		const float *xt = x + (size_t)t * n;                          \
		for (int k_begin = 0; k_begin < n; k_begin += k_step) {       \
			int k_end = n - k_begin > k_step ? k_begin + k_step   \
							 : n;                 \
			MATMUL_AVX512_TOKENS(T);                              \
		}                                                             \
	} while (0)

__attribute__((target("avx512f,avx512dq,fma"))) static void
matmul_avx512(float *out, int out_stride, const float *x, int n_tokens,
	      const float *w, int n, int row_begin, int row_end)
{
	__m512 partial[MAX_BLOCK_ROWS * 6]; /* (block_rows, 6) 16-lane sums */
	int block_rows = (int)(ROW_BLOCK_BYTES / ((size_t)n * sizeof(float)));
	int k_step = n_tokens > 1 && n > K_BLOCK ? K_BLOCK : n;

	block_rows = block_rows < 4 ? 4 : block_rows & ~3;
	assert(k_step == n || block_rows <= (int)MAX_BLOCK_ROWS);
	for (int block_begin = row_begin; block_begin < row_end;
	     block_begin += block_rows) {
		int block_end = block_begin + block_rows < row_end
					? block_begin + block_rows
					: row_end;
		int t = 0;

		for (; t + 6 <= n_tokens; t += 6)
			MATMUL_AVX512_GROUP(6);

		/* The last 1 to 5 tokens take one narrower tile. */
		switch (n_tokens - t) {
		case 5:
			MATMUL_AVX512_GROUP(5);
			break;
		case 4:
			MATMUL_AVX512_GROUP(4);
			break;
		case 3:
			MATMUL_AVX512_GROUP(3);
			break;
		case 2:
			MATMUL_AVX512_GROUP(2);
			break;
		case 1:
			MATMUL_AVX512_GROUP(1);
			break;
		default:
			break;
		}
	}
}


/* ---- Dispatch and element-wise kernels ---------------------------------- */

float kernel_dot(const float *a, const float *b, int n)
{
	switch (selected_isa) {
	case ISA_AVX512:
		return dot_avx512(a, b, n);
	case ISA_AVX2:
		return dot_avx2(a, b, n);
	default:
		return dot_scalar(a, b, n);
	}
}


void kernel_matmul(float *out, int out_stride, const float *x, int n_tokens,
		   const float *w, int n, int row_begin, int row_end)
{
	switch (selected_isa) {
	case ISA_AVX512:
		matmul_avx512(out, out_stride, x, n_tokens, w, n, row_begin,
			      row_end);
		break;
	case ISA_AVX2:
		matmul_avx2(out, out_stride, x, n_tokens, w, n, row_begin,
			    row_end);
		break;
	default:
		matmul_scalar(out, out_stride, x, n_tokens, w, n, row_begin,
			      row_end);
		break;
	}
}


void kernel_rmsnorm(float *out, const float *x, const float *weight, int n)
{
	float ss = kernel_dot(x, x, n);

	ss /= (float)n;
	ss += 1e-5f;
	ss = 1.0f / sqrtf(ss);
	for (int j = 0; j < n; j++)
		out[j] = weight[j] * (ss * x[j]);
}


/* ---- Exponential, softmax and SwiGLU ------------------------------------
 *
 * The exponential is computed by the kernels themselves, so that the
 * AVX-512 and scalar paths take the same steps: n = x * log2(e) rounded to
 * nearest even, r = x - n ln 2 in two fused multiply-adds, a degree-7
 * polynomial of r (the coefficients of the Cephes library's expf, about
 * 1 ulp), and n added to the exponent field. Below -86 the result is 0,
 * above 88 it is infinity, and NaN stays NaN.
 */

#define EXP_LOW -86.0f
#define EXP_HIGH 88.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f

static const float exp_poly[6] = {
	1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
	4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f,
};


static float exp_scalar(float x)
{
	if (x != x)
		return x;
	if (x < EXP_LOW)
		return 0.0f;
	if (x > EXP_HIGH)
		return INFINITY;

	float n = nearbyintf(x * EXP_LOG2E);
	float r = fmaf(-n, EXP_LN2_HI, x);
	float p = exp_poly[0];
	uint32_t bits;
	float y;

	r = fmaf(-n, EXP_LN2_LO, r);
	for (int i = 1; i < 6; i++)
		p = fmaf(p, r, exp_poly[i]);
	y = fmaf(p, r * r, r) + 1.0f;
	memcpy(&bits, &y, sizeof(bits));
	bits += (uint32_t)(int32_t)n << 23;
	memcpy(&y, &bits, sizeof(y));
	return y;
}


__attribute__((target("avx512f,avx512dq,fma"))) static inline __m512
exp_avx512(__m512 x)
{
	__m512 n = _mm512_roundscale_ps(
		_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
		_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
	__m512 p = _mm512_set1_ps(exp_poly[0]);
	__m512 y;
	__m512i bits;

	r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
	for (int i = 1; i < 6; i++)
		p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_poly[i]));
	y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
			  _mm512_set1_ps(1.0f));
	bits = _mm512_add_epi32(_mm512_castps_si512(y),
				_mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
	y = _mm512_castsi512_ps(bits);
	y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LOW),
						     _CMP_LT_OQ),
			       _mm512_setzero_ps());
	y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_HIGH),
						     _CMP_GT_OQ),
			       _mm512_set1_ps(INFINITY));
	return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}


/*
 * Returns the largest of x (n), starting from x[0]. max_ps returns its
 * second operand when either is NaN, so NaN values after x[0] are left out.
 */
__attribute__((target("avx512f,avx512dq"))) static float
max_avx512(const float *x, int n)
{
	__m512 max = _mm512_set1_ps(x[0]);

	for (int i = 0; i < n; i += LANES) {
		__mmask16 mask = lanes_mask(n - i);

		max = _mm512_mask_max_ps(max, mask,
					 _mm512_maskz_loadu_ps(mask, x + i), max);
	}
	return _mm512_reduce_max_ps(max);
}


/*
 * Softmax: the maximum, then exp(x - max) summed in 16 lanes (element i in
 * lane i % 16) reduced by the tree of kernel_dot, then a division by the sum.
 */
static void softmax_scalar(float *x, int n)
{
	float max = x[0];
	float lanes[LANES] = { 0 };
	float sum;

	for (int i = 1; i < n; i++)
		if (x[i] > max)
			max = x[i];
	for (int i = 0; i < n; i++) {
		x[i] = exp_scalar(x[i] - max);
		lanes[i % LANES] += x[i];
	}
	sum = reduce_lanes(lanes);
	for (int i = 0; i < n; i++)
		x[i] /= sum;
}


__attribute__((target("avx512f,avx512dq,fma"))) static void
softmax_avx512(float *x, int n)
{
	__m512 max = _mm512_set1_ps(max_avx512(x, n));
	__m512 lanes = _mm512_setzero_ps();
	__m512 sum;

	for (int i = 0; i < n; i += LANES) {
		__mmask16 mask = lanes_mask(n - i);
		__m512 e = exp_avx512(_mm512_sub_ps(
			_mm512_maskz_loadu_ps(mask, x + i), max));

		_mm512_mask_storeu_ps(x + i, mask, e);
		lanes = _mm512_mask_add_ps(lanes, mask, lanes, e);
	}
	sum = _mm512_set1_ps(reduce_avx512(lanes));
	for (int i = 0; i < n; i += LANES) {
		__mmask16 mask = lanes_mask(n - i);

		_mm512_mask_storeu_ps(x + i, mask,
				      _mm512_div_ps(_mm512_maskz_loadu_ps(mask, x + i),
						    sum));
	}
}


void kernel_softmax(float *x, int n)
{
	if (selected_isa == ISA_AVX512)
		softmax_avx512(x, n);
	else
		softmax_scalar(x, n);
}


__attribute__((target("avx512f,avx512dq"))) static int32_t
argmax_avx512(const float *x, int32_t n)
{
	__m512 top = _mm512_set1_ps(max_avx512(x, n));

	for (int32_t i = 0; i < n; i += LANES) {
		__mmask16 mask = lanes_mask(n - i);
		__mmask16 equal = _mm512_mask_cmp_ps_mask(
			mask, _mm512_maskz_loadu_ps(mask, x + i), top, _CMP_EQ_OQ);

		if (equal != 0)
			return i + __builtin_ctz(equal);
	}
	return 0;
}


int32_t kernel_argmax(const float *x, int32_t n)
{
	int32_t best = 0;

	/* A NaN first value stays the best, as the comparisons below keep it. */
	if (selected_isa == ISA_AVX512 && x[0] == x[0])
		return argmax_avx512(x, n);
	for (int32_t i = 1; i < n; i++)
		if (x[i] > x[best])
			best = i;
	return best;
}


void kernel_rope(float *x, int n_heads, int head_size, const float *cos_sin)
{
	for (int h = 0; h < n_heads; h++) {
		float *v = x + (size_t)h * head_size;

		for (int i = 0; i < head_size / 2; i++) {
			float fcr = cos_sin[2 * i];
			float fci = cos_sin[2 * i + 1];
			float v0 = v[2 * i];
			float v1 = v[2 * i + 1];

			v[2 * i] = v0 * fcr - v1 * fci;
			v[2 * i + 1] = v0 * fci + v1 * fcr;
		}
	}
}


void kernel_rope_inverse(float *x, int n_heads, int head_size,
			 const float *cos_sin)
{
	for (int h = 0; h < n_heads; h++) {
		float *v = x + (size_t)h * head_size;

		for (int i = 0; i < head_size / 2; i++) {
			float fcr = cos_sin[2 * i];
			float fci = cos_sin[2 * i + 1];
			float v0 = v[2 * i];
			float v1 = v[2 * i + 1];

			v[2 * i] = v0 * fcr + v1 * fci;
			v[2 * i + 1] = v1 * fcr - v0 * fci;
		}
	}
}


/* A separate multiply and add per element, as in the scalar loop. */
__attribute__((target("avx512f"))) static void
axpy_avx512(float *out, float a, const float *v, int n)
{
	__m512 scale = _mm512_set1_ps(a);
	int i = 0;

	for (; i + LANES <= n; i += LANES) {
		__m512 product = _mm512_mul_ps(scale, _mm512_loadu_ps(v + i));

		_mm512_storeu_ps(out + i,
				 _mm512_add_ps(_mm512_loadu_ps(out + i), product));
	}
	for (; i < n; i++)
		out[i] += a * v[i];
}


void kernel_axpy(float *out, float a, const float *v, int n)
{
	if (selected_isa == ISA_AVX512) {
		axpy_avx512(out, a, v, n);
		return;
	}
	for (int i = 0; i < n; i++)
		out[i] += a * v[i];
}


__attribute__((target("avx512f,avx512dq,fma"))) static void
swiglu_avx512(float *out, const float *gate, const float *up, int n)
{
	const __m512 unit = _mm512_set1_ps(1.0f);

	for (int i = 0; i < n; i += LANES) {
		__mmask16 mask = lanes_mask(n - i);
		__m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
		__m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
		/* silu(g) = g * (1 / (1 + exp(-g))), as the scalar path does. */
		__m512 silu = _mm512_mul_ps(g, _mm512_div_ps(unit,
							     _mm512_add_ps(unit, e)));

		_mm512_mask_storeu_ps(out + i, mask,
				      _mm512_mul_ps(silu,
						    _mm512_maskz_loadu_ps(mask, up + i)));
	}
}


void kernel_swiglu(float *out, const float *gate, const float *up, int n)
{
	if (selected_isa == ISA_AVX512) {
		swiglu_avx512(out, gate, up, n);
		return;
	}
	for (int i = 0; i < n; i++) {
		float g = gate[i];

		out[i] = g * (1.0f / (1.0f + exp_scalar(-g))) * up[i];
	}
}
