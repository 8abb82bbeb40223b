/*
 * SIMD helpers shared by the kernels of worker/, for the AVX-512 paths.
 */
#ifndef SLAB_WORKER_SIMD_H
#define SLAB_WORKER_SIMD_H

#include <immintrin.h>

/* Mask of the first left lanes of 16: none when left <= 0, all from 16. */
static inline __mmask16 lanes_mask(int left)
{
	if (left <= 0)
		return 0;
	return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/*
 * Reduces a 16-lane sum by the tree of kernel_dot: lanes (j, j + 8), then
 * (j, j + 4), (j, j + 2) and (j, j + 1).
 */
__attribute__((target("avx512f,avx512dq"))) static inline float
reduce_avx512(__m512 acc)
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
 * Reduces four 16-lane sums by the tree of kernel_dot, all four at once:
 * each step adds the same pairs of lanes as for one sum, after shuffles
 * that bring the pairs of all four into one register. Returns the four
 * results in order.
 */
__attribute__((target("avx512f,avx512dq"))) static inline __m128
reduce_four_avx512(__m512 a, __m512 b, __m512 c, __m512 d)
{
	/* Lanes j and j + 8: a and b in one register, c and d in another. */
	__m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44),
				  _mm512_shuffle_f32x4(a, b, 0xee));
	__m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44),
				  _mm512_shuffle_f32x4(c, d, 0xee));
	/* Lanes j and j + 4: sum i in 128-bit part i. */
	__m512 r4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88),
				  _mm512_shuffle_f32x4(ab, cd, 0xdd));
	/* Lanes j and j + 2, then j and j + 1, within each part. */
	__m512 r2 = _mm512_add_ps(r4, _mm512_shuffle_ps(r4, r4, 0x4e));
	__m512 r1 = _mm512_add_ps(r2, _mm512_shuffle_ps(r2, r2, 0xb1));

	/* Lanes 0, 4, 8 and 12 hold the results; compressing into a register
	 * is much faster than into memory on AMD processors. */
	return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, r1));
}

#endif
