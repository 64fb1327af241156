/* Weight-only matmuls for CPU decode: y[M, N] = x[M, K] @ W.T with fp32 activations and 4- or 8-bit weights.
 *
 * Every grid lowbit stores is written here as W[n, k] = s[n, g] * c[n, k] + b[n, g], g = k / G, with unsigned
 * 4-bit codes (0..15) or signed 8-bit codes, fp32 scale s and offset b (for symmetric grids b = -centre * s is
 * not stored). No dequantized weight is ever written to memory: each packed byte is read once per call,
 * which is what a memory-bound decode step needs; the weights are rebuilt in registers.
 *
 * 4-bit layout (lowbit.kernels.cpu_wq._pack_c): per row, per 32 columns j0..j0+31, 16 bytes; byte t holds
 * column j0+t in its low nibble and column j0+16+t in its high nibble, so one 16-byte load unpacks into two
 * 16-lane vectors that line up with x[j0:j0+16] and x[j0+16:j0+32].
 * Threads split the output features (OpenMP, the caller's thread count); each thread prefetches PF_BYTES
 * ahead, since a decode step's rows are too short for the hardware prefetcher to ramp up. Requirements
 * checked by the caller: K % 32 == 0, G % 32 == 0, K % G == 0. Returns 0.
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef PF_BYTES
#define PF_BYTES 4096
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
static inline float hsum256(__m256 a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
}
#endif
#define MT 4  /* activation rows handled together: each unpacked weight vector feeds up to MT FMAs */

/* one output feature n, rows m0..m0+mt-1. Each group's weights are rebuilt in registers as fl(s*c + b) -- the
 * reference dequantization's own value, exactly -- and multiplied into x, so the result differs from a float
 * GEMV on the dequantized weight only in summation order (no s*(c.x) + b*sum(x) split, whose two large terms
 * cancel for centred grids). AVX-512: the 16 possible values of a group sit in one register and the codes
 * index it (vpermps), so a 4-bit weight costs half a shuffle and one FMA. */
static inline __attribute__((always_inline)) void q4_row(const float *x, int mt, int K, const uint8_t *p,
                                                         const float *s, const float *b, float centre, int G,
                                                         int ng, float *out) {
#if defined(__AVX512F__)
    __m512 acc[MT], acc2[MT];  /* two FMA chains per row: one chain would wait on the FMA latency */
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int m = 0; m < mt; m++) acc[m] = acc2[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        _mm_prefetch((const char *)(s + g) + PF_BYTES / 4, _MM_HINT_T0);
        if (b) _mm_prefetch((const char *)(b + g) + PF_BYTES / 4, _MM_HINT_T0);
        __m512 lut = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[g]), _mm512_set1_ps(b ? b[g] : -centre * s[g]));
        for (int j0 = g * G; j0 < (g + 1) * G; j0 += 32) {
            _mm_prefetch((const char *)(p + j0 / 2) + PF_BYTES, _MM_HINT_T0);
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + j0 / 2)));
            __m512 lo = _mm512_permutexvar_ps(v, lut);                    /* uses the index's low 4 bits */
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
            for (int m = 0; m < mt; m++) {
                const float *xm = x + (size_t)m * K + j0;
                acc[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), acc[m]);
                acc2[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), acc2[m]);
            }
        }
    }
    for (int m = 0; m < mt; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m], acc2[m]));
#elif defined(__AVX2__)
    __m256 acc[MT], acc2[MT];
    const __m256i mask = _mm256_set1_epi32(15);
    for (int m = 0; m < mt; m++) acc[m] = acc2[m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256 vs = _mm256_set1_ps(s[g]), vb = _mm256_set1_ps(b ? b[g] : -centre * s[g]);
        for (int j0 = g * G; j0 < (g + 1) * G; j0 += 32)
            for (int h = 0; h < 16; h += 8) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + j0 / 2 + h)));
                __m256 lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), vs, vb);
                __m256 hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), vs, vb);
                for (int m = 0; m < mt; m++) {
                    const float *xm = x + (size_t)m * K + j0 + h;
                    acc[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xm), acc[m]);
                    acc2[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xm + 16), acc2[m]);
                }
            }
    }
    for (int m = 0; m < mt; m++) out[m] = hsum256(_mm256_add_ps(acc[m], acc2[m]));
#else
    for (int m = 0; m < mt; m++) {
        float acc = 0.f;
        const float *xm = x + (size_t)m * K;
        for (int g = 0; g < ng; g++) {
            float bg = b ? b[g] : -centre * s[g];
            for (int j0 = g * G; j0 < (g + 1) * G; j0 += 32)
                for (int t = 0; t < 16; t++) {
                    uint8_t v = p[j0 / 2 + t];
                    acc += fmaf((float)(v & 15), s[g], bg) * xm[j0 + t] + fmaf((float)(v >> 4), s[g], bg) * xm[j0 + 16 + t];
                }
        }
        out[m] = acc;
    }
#endif
}

/* 8-bit codes: without an offset, c.x is summed per group and scaled once (exact codes, no cancellation);
 * with one, the weight is rebuilt as fl(s*c + b) as above. */
static inline __attribute__((always_inline)) void q8_row(const float *x, int mt, int K, const int8_t *c,
                                                         const float *s, const float *b, int G, int ng,
                                                         float *out) {
#if defined(__AVX512F__)
    __m512 acc[MT];
    for (int m = 0; m < mt; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        _mm_prefetch((const char *)(s + g) + PF_BYTES / 4, _MM_HINT_T0);
        if (b) _mm_prefetch((const char *)(b + g) + PF_BYTES / 4, _MM_HINT_T0);
        __m512 vs = _mm512_set1_ps(s[g]), vb = _mm512_set1_ps(b ? b[g] : 0.f), ga[MT], gb[MT];
        for (int m = 0; m < mt; m++) ga[m] = gb[m] = _mm512_setzero_ps();
        for (int j0 = g * G; j0 < (g + 1) * G; j0 += 32) {  /* two FMA chains: even and odd 16 columns */
            _mm_prefetch((const char *)(c + j0) + PF_BYTES, _MM_HINT_T0);
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + j0))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + j0 + 16))));
            if (b) {
                w0 = _mm512_fmadd_ps(w0, vs, vb);
                w1 = _mm512_fmadd_ps(w1, vs, vb);
            }
            for (int m = 0; m < mt; m++) {
                ga[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (size_t)m * K + j0), ga[m]);
                gb[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (size_t)m * K + j0 + 16), gb[m]);
            }
        }
        for (int m = 0; m < mt; m++) {
            ga[m] = _mm512_add_ps(ga[m], gb[m]);
            acc[m] = b ? _mm512_add_ps(acc[m], ga[m]) : _mm512_fmadd_ps(ga[m], vs, acc[m]);
        }
    }
    for (int m = 0; m < mt; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
#elif defined(__AVX2__)
    __m256 acc[MT];
    for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m256 vs = _mm256_set1_ps(s[g]), vb = _mm256_set1_ps(b ? b[g] : 0.f), ga[MT];
        for (int m = 0; m < mt; m++) ga[m] = _mm256_setzero_ps();
        for (int j0 = g * G; j0 < (g + 1) * G; j0 += 8) {
            __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(c + j0))));
            if (b) w = _mm256_fmadd_ps(w, vs, vb);
            for (int m = 0; m < mt; m++)
                ga[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (size_t)m * K + j0), ga[m]);
        }
        for (int m = 0; m < mt; m++) acc[m] = b ? _mm256_add_ps(acc[m], ga[m]) : _mm256_fmadd_ps(ga[m], vs, acc[m]);
    }
    for (int m = 0; m < mt; m++) out[m] = hsum256(acc[m]);
#else
    for (int m = 0; m < mt; m++) {
        float acc = 0.f;
        const float *xm = x + (size_t)m * K;
        for (int g = 0; g < ng; g++) {
            float ga = 0.f;
            for (int j = g * G; j < (g + 1) * G; j++) ga += (b ? fmaf((float)c[j], s[g], b[g]) : (float)c[j]) * xm[j];
            acc += b ? ga : s[g] * ga;
        }
        out[m] = acc;
    }
#endif
}

/* bits 4: w is uint8 [N, K/2] in the layout above; bits 8: int8 [N, K]. s, b: fp32 [N, K/G]; b NULL means
 * b = -centre * s (symmetric grids stored with a shifted code: one stream fewer to read). */
int lowbit_cpu_wq(int bits, const float *x, int M, int K, const void *w, const float *s, const float *b,
                  float centre, int N, int G, float *y, int nthreads) {
    int ng = K / G;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n = 0; n < N; n++) {
        const float *sn = s + (size_t)n * ng, *bn = b ? b + (size_t)n * ng : NULL;
        for (int m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? M - m0 : MT;
            float out[MT];
            const float *xm = x + (size_t)m0 * K;
            /* constant row counts, so the inlined loops over rows unroll and the accumulators stay in registers */
            if (bits == 4) {
                const uint8_t *wn = (const uint8_t *)w + (size_t)n * (K / 2);
                switch (mt) {
                    case 1: q4_row(xm, 1, K, wn, sn, bn, centre, G, ng, out); break;
                    case 2: q4_row(xm, 2, K, wn, sn, bn, centre, G, ng, out); break;
                    case 3: q4_row(xm, 3, K, wn, sn, bn, centre, G, ng, out); break;
                    default: q4_row(xm, 4, K, wn, sn, bn, centre, G, ng, out);
                }
            } else {
                const int8_t *wn = (const int8_t *)w + (size_t)n * K;
                switch (mt) {
                    case 1: q8_row(xm, 1, K, wn, sn, bn, G, ng, out); break;
                    case 2: q8_row(xm, 2, K, wn, sn, bn, G, ng, out); break;
                    case 3: q8_row(xm, 3, K, wn, sn, bn, G, ng, out); break;
                    default: q8_row(xm, 4, K, wn, sn, bn, G, ng, out);
                }
            }
            for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * N + n] = out[m];
        }
    }
    return 0;
}
