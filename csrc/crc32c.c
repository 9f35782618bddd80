/* CRC-32C (Castagnoli), the frame checksum of the datapath.
 *
 * The value is the standard CRC-32C of the bytes (reflected polynomial 0x82F63B78, initial value
 * and final xor 0xFFFFFFFF, chained by passing the previous result back in), whichever path runs:
 *
 *   soft   slicing-by-8 tables; any CPU.
 *   hw1    one stream of the SSE4.2 crc32 instruction. The instruction has a latency of 3 cycles
 *          but can start one per cycle, so a single dependent chain uses a third of the unit.
 *   hw3    three independent crc32 chains over three adjacent blocks of a chunk, which keeps the
 *          unit busy; the three partial CRCs are then joined (see "Joining streams").
 *   hybrid on CPUs with VPCLMULQDQ: each chunk's first part is folded with carry-less multiplies
 *          (see "Folding") while three crc32 chains run over the rest. The two use different
 *          execution units, so together they go about 1.5x as fast as hw3 (about 33 vs 22 GB/s on
 *          the Zen 3 this was tuned on). Shorter tails go through hw3.
 *
 * Joining streams. Work in GF(2)[x] modulo P. In the reflected bit order a 32-bit CRC state c is
 * the polynomial with bit i the coefficient of x^(31-i), and one crc32q step with state c and
 * 64-bit data d (bit i <-> x^(63-i)) gives (c*x^64 + d*x^32) mod P. Hence running over n bytes
 * from state c gives c*x^(8n) + (the same run from state 0): a chunk A|B|C of three blocks of L
 * bytes has CRC  crc(A)*x^(16L) + crc_0(B)*x^(8L) + crc_0(C)  (mod P), where crc_0 starts at 0.
 * "Multiply a state by x^(8n) mod P" is the only new operation. Two ways are used:
 *   - PCLMUL: a carry-less product of two reflected 32-bit values u, k read as a 64-bit reflected
 *     value is u*k*x; feeding that as data to crc32q from state 0 multiplies by x^32 and reduces,
 *     so with k = x^(8n-33) mod P the result is u*x^(8n) mod P.
 *   - tables: the map is linear in u, so four 256-entry tables (one per byte of u) give it with
 *     four lookups; used where the CPU lacks PCLMUL.
 * All constants are computed at start-up from the polynomial (gf_mul / gf_xpow below).
 *
 * Folding. Read 16 message bytes as a 128-bit value A (bit m <-> x^(127-m)), split into halves
 * u (first 8 bytes, weight x^64) and v. Moving A forward over D bytes, A*x^(8D), is congruent to
 * u*(x^(8D+64) mod P) + v*(x^(8D) mod P), a value of fewer than 128 bits, so it can be xored into
 * the 16 bytes found D bytes later. With the same reading of a carry-less product as above, a
 * 64-bit half times the reflected 32-bit constant x^(e-33) mod P lands on half*x^e, so the fold is
 * two PCLMULs and an xor. Eight such 16-byte lanes (four 256-bit registers) each fold over 128
 * bytes per step; at the end every lane is folded onto the last one and the 16 bytes left are
 * run through crc32 from state 0: the state they give is that of the whole folded region, since a
 * CRC state depends only on the message modulo P. The initial CRC state is xored into the first
 * four bytes, which is what the crc32 instruction does with its state.
 */
#include "native.h"

#include <string.h>

#define POLY 0x82F63B78u /* reflected Castagnoli polynomial */

static uint32_t table[8][256];
static int have_sse42, have_pclmul, have_vpclmul;

/* Block lengths (bytes per stream) of the three-stream path, longest first. Long blocks make
 * the joining cost negligible; the shorter ones keep mid-size buffers (a few hundred bytes to a
 * few KiB, e.g. frame headers with small payloads) on the fast path. */
#define NBLOCK 4
static const size_t block_len[NBLOCK] = {4096, 1024, 256, 64};
static uint64_t shift_k[NBLOCK][2];        /* [i][0]: x^(8L-33), [i][1]: x^(16L-33), reflected */
static uint32_t shift_tab[NBLOCK][2][4][256]; /* same shifts as byte tables */

/* Hybrid chunk: FOLD_STEPS steps, each folding 128 bytes and running STREAM_QWORDS qwords on each
 * of three crc32 chains (tuned so that neither unit waits for the other). */
#define FOLD_STEPS 16
#define STREAM_QWORDS 4
#define STREAM_LEN (FOLD_STEPS * STREAM_QWORDS * 8)
#define HYBRID_CHUNK (FOLD_STEPS * 128 + 3 * STREAM_LEN)
static uint64_t fold_k[8][2];  /* [i]: lane moved over 16*i bytes: x^(8D+64-33), x^(8D-33) */
static uint64_t stream_k[3];   /* joins the chains: x^(8*STREAM_LEN*j - 33), j = 1..3 */

/* a*b mod P, both reflected (bit 31 is x^0). */
static uint32_t gf_mul(uint32_t a, uint32_t b) {
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i)) prod ^= b; /* coefficient of x^i in a */
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1; /* b *= x */
    }
    return prod;
}

/* x^e mod P, reflected, by square-and-multiply. */
static uint32_t gf_xpow(uint64_t e) {
    uint32_t result = 0x80000000u, base = 0x40000000u; /* 1 and x */
    while (e) {
        if (e & 1) result = gf_mul(result, base);
        base = gf_mul(base, base);
        e >>= 1;
    }
    return result;
}

void rmoe_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    for (int b = 0; b < NBLOCK; b++) {
        for (int s = 0; s < 2; s++) {
            uint64_t bits = 8 * block_len[b] * (uint64_t)(s + 1);
            shift_k[b][s] = gf_xpow(bits - 33);
            uint32_t xn = gf_xpow(bits);
            for (int byte = 0; byte < 4; byte++)
                for (uint32_t v = 0; v < 256; v++) shift_tab[b][s][byte][v] = gf_mul(v << (8 * byte), xn);
        }
    }
    for (int i = 1; i < 8; i++) {
        fold_k[i][0] = gf_xpow(8 * 16 * (uint64_t)i + 64 - 33);
        fold_k[i][1] = gf_xpow(8 * 16 * (uint64_t)i - 33);
    }
    for (int j = 0; j < 3; j++) stream_k[j] = gf_xpow(8 * (uint64_t)STREAM_LEN * (j + 1) - 33);
    /* fold_k[0] is unused as a lane constant; the step constant (128 bytes) lives there. */
    fold_k[0][0] = gf_xpow(8 * 128 + 64 - 33);
    fold_k[0][1] = gf_xpow(8 * 128 - 33);
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
    have_pclmul = __builtin_cpu_supports("pclmul");
    have_vpclmul = have_pclmul && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
#endif
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xFF] ^ table[6][(v >> 8) & 0xFF] ^ table[5][(v >> 16) & 0xFF] ^
              table[4][(v >> 24) & 0xFF] ^ table[3][(v >> 32) & 0xFF] ^ table[2][(v >> 40) & 0xFF] ^
              table[1][(v >> 48) & 0xFF] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

static inline uint32_t shift_by_table(const uint32_t tab[4][256], uint32_t c) {
    return tab[0][c & 0xFF] ^ tab[1][(c >> 8) & 0xFF] ^ tab[2][(c >> 16) & 0xFF] ^ tab[3][c >> 24];
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("sse4.2"))) static uint32_t crc_hw1(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

/* u * x^(8n) mod P given k = x^(8n-33): see the header comment. */
__attribute__((target("sse4.2,pclmul"))) static inline uint32_t shift_by_clmul(uint32_t u, uint64_t k) {
    __m128i prod = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)u), _mm_cvtsi64_si128((long long)k), 0);
    return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(prod));
}

/* Three streams per chunk; use_clmul picks how the partial CRCs are joined. */
__attribute__((target("sse4.2,pclmul"))) static uint32_t crc_hw3(uint32_t crc, const uint8_t *p, size_t n,
                                                                 int use_clmul) {
    for (int b = 0; b < NBLOCK; b++) {
        const size_t len = block_len[b];
        while (n >= 3 * len) {
            uint64_t c0 = crc, c1 = 0, c2 = 0;
            const uint8_t *p0 = p, *p1 = p + len, *p2 = p + 2 * len;
            for (size_t i = 0; i < len; i += 8) {
                uint64_t v0, v1, v2;
                memcpy(&v0, p0 + i, 8);
                memcpy(&v1, p1 + i, 8);
                memcpy(&v2, p2 + i, 8);
                c0 = _mm_crc32_u64(c0, v0);
                c1 = _mm_crc32_u64(c1, v1);
                c2 = _mm_crc32_u64(c2, v2);
            }
            uint32_t a, m;
            if (use_clmul) {
                a = shift_by_clmul((uint32_t)c0, shift_k[b][1]);
                m = shift_by_clmul((uint32_t)c1, shift_k[b][0]);
            } else {
                a = shift_by_table(shift_tab[b][1], (uint32_t)c0);
                m = shift_by_table(shift_tab[b][0], (uint32_t)c1);
            }
            crc = a ^ m ^ (uint32_t)c2;
            p += 3 * len;
            n -= 3 * len;
        }
    }
    return crc_hw1(crc, p, n);
}

__attribute__((target("sse4.2,pclmul"))) static inline __m128i fold16(__m128i lane, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(lane, k, 0x00), _mm_clmulepi64_si128(lane, k, 0x11));
}

__attribute__((target("sse4.2,pclmul,avx2,vpclmulqdq"))) static inline __m256i fold32(__m256i lanes, __m256i k) {
    return _mm256_xor_si256(_mm256_clmulepi64_epi128(lanes, k, 0x00), _mm256_clmulepi64_epi128(lanes, k, 0x11));
}

/* Chunk layout: [FOLD_STEPS * 128 bytes folded][chain 0][chain 1][chain 2], STREAM_LEN each. */
__attribute__((target("sse4.2,pclmul,avx2,vpclmulqdq"))) static uint32_t crc_hybrid(uint32_t crc, const uint8_t *p,
                                                                                    size_t n) {
    if (n < 2 * HYBRID_CHUNK) return crc_hw3(crc, p, n, 1); /* one chunk plus a long tail: hw3 is faster */
    const __m256i step_k = _mm256_broadcastsi128_si256(_mm_set_epi64x((long long)fold_k[0][1], (long long)fold_k[0][0]));
    while (n >= HYBRID_CHUNK) {
        const uint8_t *f = p, *q0 = p + FOLD_STEPS * 128, *q1 = q0 + STREAM_LEN, *q2 = q1 + STREAM_LEN;
        __m256i a0 = _mm256_loadu_si256((const __m256i *)f), a1 = _mm256_loadu_si256((const __m256i *)(f + 32));
        __m256i a2 = _mm256_loadu_si256((const __m256i *)(f + 64)), a3 = _mm256_loadu_si256((const __m256i *)(f + 96));
        a0 = _mm256_xor_si256(a0, _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)crc)));
        uint64_t c0 = 0, c1 = 0, c2 = 0;
        for (int step = 0;;) {
            for (int j = 0; j < STREAM_QWORDS; j++) {
                uint64_t v0, v1, v2;
                memcpy(&v0, q0 + 8 * j, 8);
                memcpy(&v1, q1 + 8 * j, 8);
                memcpy(&v2, q2 + 8 * j, 8);
                c0 = _mm_crc32_u64(c0, v0);
                c1 = _mm_crc32_u64(c1, v1);
                c2 = _mm_crc32_u64(c2, v2);
            }
            q0 += 8 * STREAM_QWORDS;
            q1 += 8 * STREAM_QWORDS;
            q2 += 8 * STREAM_QWORDS;
            if (++step == FOLD_STEPS) break;
            f += 128;
            a0 = _mm256_xor_si256(fold32(a0, step_k), _mm256_loadu_si256((const __m256i *)f));
            a1 = _mm256_xor_si256(fold32(a1, step_k), _mm256_loadu_si256((const __m256i *)(f + 32)));
            a2 = _mm256_xor_si256(fold32(a2, step_k), _mm256_loadu_si256((const __m256i *)(f + 64)));
            a3 = _mm256_xor_si256(fold32(a3, step_k), _mm256_loadu_si256((const __m256i *)(f + 96)));
        }
        /* Lanes in message order; lane i lies 16*(7-i) bytes before the last one. */
        __m128i lane[8] = {_mm256_castsi256_si128(a0), _mm256_extracti128_si256(a0, 1),
                           _mm256_castsi256_si128(a1), _mm256_extracti128_si256(a1, 1),
                           _mm256_castsi256_si128(a2), _mm256_extracti128_si256(a2, 1),
                           _mm256_castsi256_si128(a3), _mm256_extracti128_si256(a3, 1)};
        __m128i acc = lane[7];
        for (int i = 0; i < 7; i++)
            acc = _mm_xor_si128(acc, fold16(lane[i], _mm_set_epi64x((long long)fold_k[7 - i][1], (long long)fold_k[7 - i][0])));
        uint64_t folded = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(acc));
        folded = _mm_crc32_u64(folded, (uint64_t)_mm_extract_epi64(acc, 1));
        crc = shift_by_clmul((uint32_t)folded, stream_k[2]) ^ shift_by_clmul((uint32_t)c0, stream_k[1]) ^
              shift_by_clmul((uint32_t)c1, stream_k[0]) ^ (uint32_t)c2;
        p += HYBRID_CHUNK;
        n -= HYBRID_CHUNK;
    }
    return crc_hw3(crc, p, n, 1);
}
#endif

uint32_t rmoe_crc32c_with(int impl, uint32_t crc, const void *data, size_t n) {
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
#if defined(__x86_64__)
    if (impl == RMOE_CRC_AUTO)
        impl = have_vpclmul ? RMOE_CRC_HYBRID : have_pclmul ? RMOE_CRC_HW3_CLMUL : RMOE_CRC_HW3_TABLE;
    /* A path this CPU cannot run falls back to software (tests compare every path). */
    if (!have_sse42 || (impl == RMOE_CRC_HW3_CLMUL && !have_pclmul) || (impl == RMOE_CRC_HYBRID && !have_vpclmul))
        impl = RMOE_CRC_SOFT;
    switch (impl) {
        case RMOE_CRC_HYBRID: return ~crc_hybrid(crc, p, n);
        case RMOE_CRC_HW1: return ~crc_hw1(crc, p, n);
        case RMOE_CRC_HW3_TABLE: return ~crc_hw3(crc, p, n, 0);
        case RMOE_CRC_HW3_CLMUL: return ~crc_hw3(crc, p, n, 1);
        default: break;
    }
#endif
    return ~crc_soft(crc, p, n);
}

uint32_t rmoe_crc32c(uint32_t crc, const void *data, size_t n) {
    return rmoe_crc32c_with(RMOE_CRC_AUTO, crc, data, n);
}

const char *rmoe_crc32c_impl_name(void) {
#if defined(__x86_64__)
    if (have_sse42) return have_vpclmul ? "sse4.2+vpclmulqdq-hybrid" : have_pclmul ? "sse4.2-3way-pclmul" : "sse4.2-3way-table";
#endif
    return "software";
}
