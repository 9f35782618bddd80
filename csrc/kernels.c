/* resilient_moe._kernels: CPU matrix kernels whose results do not depend on the batch.
 *
 * linear computes y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) in float32, with w packed once at load
 * time into panels of 16 output columns: packed[N16 / 16][K][16] (N16 = N rounded up to 16, the
 * padding columns zero). See pack().
 *
 * Why not MKL, for two reasons measured on the target machines:
 *  1. Speed. Decode multiplies a few rows (the tokens routed to one expert) by large weights. MKL's
 *     small-M path reaches about a third of this core's FMA peak; a 6x16 register tile over packed
 *     panels reaches most of it, and streams each weight byte from memory once.
 *  2. Batch invariance. MKL picks kernels by shape, so a row's result changes with how many rows
 *     share the call. Here every output element is one fused-multiply-add chain
 *         s = 0; for k = 0 .. K-1: s = fma(x[m, k], w[n, k], s);  y[m, n] = s (+ bias[n])
 *     whatever M, N or tiling, and the portable path (fmaf, the same single rounding) follows the
 *     same chain, so every machine gives the same bits for a row, alone or in any batch.
 *
 * linear_group runs several such products in one call (a layer's experts, each on its own rows), so
 * threads share the whole layer's work instead of one small product at a time.
 *
 * paged_attention: causal attention of each query row over its sequence's keys, read in place from
 * the paged KV cache through the block table, with the same fixed-order guarantee (see its section).
 *
 * fma_peak and copy_bandwidth measure what this process can reach (the roofline in benchmarks).
 *
 * Releases the GIL while computing; a process that owns several cores splits big jobs over threads
 * (set_threads, below) without changing any result.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdlib.h>
#include <time.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PANEL 16 /* output columns per packed panel */
#define M_TILE 6 /* input rows per register tile: 6 rows x 2 vectors = 12 accumulators */

/* ---- portable path -------------------------------------------------------------------------- */

static void linear_portable(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
                            int64_t ldy, int64_t M, int64_t N, int64_t K) {
    for (int64_t p = 0; p * PANEL < N; p++) {
        const float *panel = packed + p * K * PANEL;
        int64_t n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < cols; c++) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; k++) s = fmaf(x[m * ldx + k], panel[k * PANEL + c], s);
                y[m * ldy + n0 + c] = bias ? s + bias[n0 + c] : s;
            }
    }
}

/* ---- AVX2 + FMA path ------------------------------------------------------------------------ */

#if defined(__x86_64__)
/* Stores one row's 16 results (plus bias), clipped to the panel's real columns. */
__attribute__((target("avx2,fma"), always_inline)) static inline void store_row(float *out, __m256 lo, __m256 hi,
                                                                               const float *bias, int64_t cols) {
    if (cols == PANEL) {
        if (bias) {
            lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
            hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
        }
        _mm256_storeu_ps(out, lo);
        _mm256_storeu_ps(out + 8, hi);
        return;
    }
    float tmp[PANEL];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    for (int64_t c = 0; c < cols; c++) out[c] = bias ? tmp[c] + bias[c] : tmp[c];
}

/* `rows` (1..6, a literal at every call site) rows of x against one panel. The twelve accumulators
 * are named variables, not an array, so the compiler keeps them in registers. */
#define ROW_FMA(r, lo, hi)                                               \
    if (rows > r) {                                                      \
        __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);                \
        lo = _mm256_fmadd_ps(xv, b0, lo);                                \
        hi = _mm256_fmadd_ps(xv, b1, hi);                                \
    }
#define ROW_STORE(r, lo, hi) \
    if (rows > r) store_row(y + r * ldy + n0, lo, hi, bias ? bias + n0 : NULL, cols);

__attribute__((target("avx2,fma"), always_inline)) static inline void tile(const float *x, int64_t ldx, const int rows,
                                                                          const float *panel, int64_t K,
                                                                          const float *bias, int64_t n0, int64_t cols,
                                                                          float *y, int64_t ldy, const float *pf,
                                                                          int64_t pf_every) {
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0;
    __m256 l3 = l0, h3 = l0, l4 = l0, h4 = l0, l5 = l0, h5 = l0;
    int64_t countdown = pf_every;
    for (int64_t k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(panel + k * PANEL), b1 = _mm256_loadu_ps(panel + k * PANEL + 8);
        /* Every row tile pulls its share of the next panel toward the cache (one line every pf_every
         * steps), so memory stays busy while tiles that only re-read this panel compute. */
        if (pf && --countdown == 0) {
            _mm_prefetch((const char *)pf, _MM_HINT_T0);
            pf += PANEL;
            countdown = pf_every;
        }
        ROW_FMA(0, l0, h0)
        ROW_FMA(1, l1, h1)
        ROW_FMA(2, l2, h2)
        ROW_FMA(3, l3, h3)
        ROW_FMA(4, l4, h4)
        ROW_FMA(5, l5, h5)
    }
    ROW_STORE(0, l0, h0)
    ROW_STORE(1, l1, h1)
    ROW_STORE(2, l2, h2)
    ROW_STORE(3, l3, h3)
    ROW_STORE(4, l4, h4)
    ROW_STORE(5, l5, h5)
}

__attribute__((target("avx2,fma"))) static void linear_avx2_rows(const float *x, int64_t ldx, const float *packed,
                                                                 const float *bias, float *y, int64_t ldy, int64_t M,
                                                                 int64_t N, int64_t K) {
    /* Panel-major: a panel (K x 16 floats, 32 KiB for K = 512) stays in L1/L2 while every row sweeps it. */
    for (int64_t p = 0; p * PANEL < N; p++) {
        const float *panel = packed + p * K * PANEL;
        int64_t n0 = p * PANEL, cols = N - n0 < PANEL ? N - n0 : PANEL;
        /* Balanced row tiles (8 rows -> 4 + 4, not 6 + 2): a thin tile wastes the panel loads. */
        int64_t tiles = (M + M_TILE - 1) / M_TILE, m0 = 0;
        /* Lines of the next panel for each tile to prefetch: all of them, spread evenly over the tiles. */
        const float *next = (p + 1) * PANEL < N ? panel + K * PANEL : NULL;
        int64_t share = (K + tiles - 1) / tiles;
        for (int64_t t = 0; t < tiles; t++) {
            int rows = (int)(M / tiles + (t < M % tiles));
            const float *xt = x + m0 * ldx;
            float *yt = y + m0 * ldy;
            const float *pf = next && t * share < K ? next + t * share * PANEL : NULL;
            int64_t every = tiles;
            switch (rows) {
            case 1: tile(xt, ldx, 1, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            case 2: tile(xt, ldx, 2, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            case 3: tile(xt, ldx, 3, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            case 4: tile(xt, ldx, 4, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            case 5: tile(xt, ldx, 5, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            default: tile(xt, ldx, 6, panel, K, bias, n0, cols, yt, ldy, pf, every); break;
            }
            m0 += rows;
        }
    }
}

/* Many rows (a prompt chunk) are taken M_BLOCK at a time, so the block's rows stay in cache while
 * every panel sweeps them, instead of streaming all M rows from memory once per panel. Blocking over
 * rows changes no output element's reduction (it runs over K alone), so results stay batch-invariant. */
#define M_BLOCK 192
__attribute__((target("avx2,fma"))) static void linear_avx2(const float *x, int64_t ldx, const float *packed,
                                                            const float *bias, float *y, int64_t ldy, int64_t M,
                                                            int64_t N, int64_t K) {
    for (int64_t m0 = 0; m0 < M; m0 += M_BLOCK) {
        int64_t rows = M - m0 < M_BLOCK ? M - m0 : M_BLOCK;
        linear_avx2_rows(x + m0 * ldx, ldx, packed, bias, y + m0 * ldy, ldy, rows, N, K);
    }
}
#endif

static int have_avx2_fma;

/* Output columns [n0, n1) (whole panels) of every row, on the best path this CPU has. */
static void linear_columns(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const float *p = packed + (n0 / PANEL) * K * PANEL;
    const float *b = bias ? bias + n0 : NULL;
    int64_t cols = (n1 < N ? n1 : N) - n0;
#if defined(__x86_64__)
    if (have_avx2_fma) {
        linear_avx2(x, ldx, p, b, y + n0, ldy, M, cols, K);
        return;
    }
#endif
    linear_portable(x, ldx, p, b, y + n0, ldy, M, cols, K);
}

/* ---- threads ---------------------------------------------------------------------------------
 *
 * One pool runs every parallel kernel here as a list of independent chunks. A product is split by
 * output columns, never by K, and attention by (row, kv head), never inside one row's softmax: every
 * output element is still one thread's fixed reduction, so the bits do not depend on the thread
 * count either. The split is dynamic: threads (the caller too) take chunks from a shared counter
 * until none is left, and the call returns once every chunk is done. A helper the scheduler does not
 * run (a busy machine) takes no chunk and the others do its share, so a job is never slower than on
 * one thread by more than the chunk a stalled helper holds. The counter carries the job's generation
 * in its high bits, and a helper copies the job under the lock when it wakes, so a helper that wakes
 * late can never run a chunk of the next job with the previous job's arguments. Helpers spin briefly
 * before they sleep: a decode step issues a job every few hundred microseconds, and a futex wake-up
 * per job would cost more than the split gains; the caller too, before it sleeps on the job's last
 * chunk (see parallel_for). */
#define MAX_THREADS 64
#define PARALLEL_MIN_FLOPS (1 << 21) /* smaller products are not worth waking anyone */
#define SPIN_ROUNDS 2000             /* ~tens of microseconds of polling before a thread sleeps */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

typedef void (*chunk_fn)(const void *ctx, int64_t chunk);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t start;
    pthread_cond_t finished; /* the last chunk of a job is done (a sleeping caller waits on it) */
    _Atomic int caller_waits;
    int threads; /* helpers running (the caller makes one more) */
    _Atomic uint32_t generation;
    chunk_fn fn;
    const void *ctx;
    int64_t chunks;
    _Atomic uint64_t next; /* (generation << 32) | next chunk */
    _Atomic int64_t done;  /* chunks finished of the current job */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .start = PTHREAD_COND_INITIALIZER, .finished = PTHREAD_COND_INITIALIZER};

static void run_chunks(uint32_t generation, chunk_fn fn, const void *ctx, int64_t chunks) {
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        if ((uint32_t)(v >> 32) != generation || (int64_t)(v & 0xffffffffu) >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        fn(ctx, (int64_t)(v & 0xffffffffu));
        /* The last chunk wakes a caller that went to sleep (seq_cst: either it sees this count, or this
         * sees its flag and the signal waits for its cond_wait under the lock). */
        if (atomic_fetch_add(&pool.done, 1) + 1 == chunks && atomic_load(&pool.caller_waits)) {
            pthread_mutex_lock(&pool.mu);
            pthread_cond_broadcast(&pool.finished);
            pthread_mutex_unlock(&pool.mu);
        }
    }
}

static void *helper(void *arg) {
    uint32_t seen = 0;
    for (;;) {
        for (int i = 0; i < SPIN_ROUNDS && atomic_load(&pool.generation) == seen; i++) {
#if defined(__x86_64__)
            _mm_pause();
#endif
        }
        pthread_mutex_lock(&pool.mu);
        while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = atomic_load(&pool.generation);
        chunk_fn fn = pool.fn;
        const void *ctx = pool.ctx;
        int64_t chunks = pool.chunks;
        pthread_mutex_unlock(&pool.mu);
        run_chunks(seen, fn, ctx, chunks);
    }
    return NULL;
}

/* fn(ctx, c) for c in [0, chunks), on the pool when it has helpers and there is more than one chunk. */
/* Threads must never make a process slower than one thread. On a machine where another process takes
 * a core, our threads share the one left: the helper (spinning, or holding a chunk when preempted)
 * takes time slices from the caller, and a job waits for slices of milliseconds (a decode step runs
 * dozens of jobs). A job that took more than STALL_RATIO times the CPU time the caller spent on it is
 * a stall: the caller was off its core or waiting. When STALL_LIMIT of the last STALL_WINDOW jobs
 * stalled, the next SERIAL_JOBS jobs run on the caller alone, then threads are tried again. Either way
 * every result is the same (the split never changes a reduction). */
#define STALL_WINDOW 32
#define STALL_LIMIT 8
#define SERIAL_JOBS 512
#define STALL_RATIO 1.6

static struct {
    int jobs, stalls; /* in the current window */
    int serial_left;  /* jobs still to run serially */
    int64_t serial_spells; /* times threads were given up (threads_stalled() reports it) */
} contention;

static void note_job(double wall_s, double cpu_s) {
    contention.stalls += wall_s > STALL_RATIO * cpu_s;
    if (++contention.jobs < STALL_WINDOW) return;
    if (contention.stalls >= STALL_LIMIT) {
        contention.serial_left = SERIAL_JOBS;
        contention.serial_spells++;
    }
    contention.jobs = contention.stalls = 0;
}

static void parallel_for(chunk_fn fn, const void *ctx, int64_t chunks) {
    if (pool.threads == 0 || chunks <= 1 || contention.serial_left > 0) {
        if (contention.serial_left > 0) contention.serial_left--;
        for (int64_t c = 0; c < chunks; c++) fn(ctx, c);
        return;
    }
    double began = now_s(), cpu_began = thread_cpu_s();
    pthread_mutex_lock(&pool.mu);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.chunks = chunks;
    uint32_t generation = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, (uint64_t)generation << 32);
    atomic_store(&pool.generation, generation);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    run_chunks(generation, fn, ctx, chunks);
    /* Only chunks already taken are left. A helper that holds one may have lost its core to another
     * process: after a short spin the caller sleeps until the last chunk is done, so that its core goes
     * idle and the scheduler moves the stalled helper onto it at once (spinning or yielding here kept
     * the core busy, and the helper queued behind the other process: two threads ran slower than one). */
    for (int spins = 0; spins < SPIN_ROUNDS && atomic_load(&pool.done) < chunks; spins++) {
#if defined(__x86_64__)
        _mm_pause();
#endif
    }
    if (atomic_load(&pool.done) < chunks) {
        pthread_mutex_lock(&pool.mu);
        atomic_store(&pool.caller_waits, 1);
        while (atomic_load(&pool.done) < chunks) pthread_cond_wait(&pool.finished, &pool.mu);
        atomic_store(&pool.caller_waits, 0);
        pthread_mutex_unlock(&pool.mu);
    }
    note_job(now_s() - began, thread_cpu_s() - cpu_began);
}

/* ---- products: one, or a group sharing one call -------------------------------------------- */

typedef struct {
    const float *x, *packed, *bias;
    float *y;
    int64_t M, N, K, ldx, ldy;
} product;

typedef struct {
    const product *jobs;
    const int64_t *first_chunk; /* [jobs + 1]: chunks of job j are [first_chunk[j], first_chunk[j + 1]) */
    const int64_t *panels_per_chunk;
    int64_t njobs;
} product_group;

static void product_chunk(const void *ctx, int64_t chunk) {
    const product_group *g = ctx;
    int64_t lo = 0, hi = g->njobs - 1; /* the job holding this chunk: binary search over first_chunk */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (g->first_chunk[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    const product *p = &g->jobs[lo];
    int64_t n0 = (chunk - g->first_chunk[lo]) * g->panels_per_chunk[lo] * PANEL;
    linear_columns(p->x, p->ldx, p->packed, p->bias, p->y, p->ldy, p->M, p->N, p->K, n0,
                   n0 + g->panels_per_chunk[lo] * PANEL);
}

/* Runs every product of `jobs`, splitting each by panels into about four chunks per thread overall
 * (slack for stragglers), proportionally to its share of the group's flops. */
static void run_products(const product *jobs, int64_t njobs) {
    int64_t first[njobs + 1], per[njobs];
    double flops = 0;
    for (int64_t j = 0; j < njobs; j++) flops += 2.0 * jobs[j].M * jobs[j].N * jobs[j].K;
    int threads = flops >= PARALLEL_MIN_FLOPS ? pool.threads + 1 : 1;
    first[0] = 0;
    for (int64_t j = 0; j < njobs; j++) {
        int64_t panels = (jobs[j].N + PANEL - 1) / PANEL;
        double share = flops > 0 ? 2.0 * jobs[j].M * jobs[j].N * jobs[j].K / flops : 1.0;
        int64_t want = threads == 1 ? 1 : (int64_t)(4 * threads * share + 0.999);
        if (want < 1) want = 1;
        if (want > panels) want = panels > 0 ? panels : 1;
        per[j] = panels > 0 ? (panels + want - 1) / want : 1;
        first[j + 1] = first[j] + (panels > 0 ? (panels + per[j] - 1) / per[j] : 0);
    }
    product_group g = {jobs, first, per, njobs};
    if (threads == 1) {
        for (int64_t c = 0; c < first[njobs]; c++) product_chunk(&g, c);
        return;
    }
    parallel_for(product_chunk, &g, first[njobs]);
}

/* ---- paged attention -------------------------------------------------------------------------
 *
 * Each query row attends over its own sequence's keys, read in place from the paged cache through
 * the sequence's block table: key j of a sequence lives in slot blocks[start[seq] + j / bs] * bs +
 * j % bs. Nothing is padded, so a step costs the sum of its rows' visible keys, not rows x longest.
 *
 * One work item is (row, kv head): its R query heads share each key and value load. Its reduction is
 * fixed by the row alone:
 *   s_j = (q . k_j) * scale     the dot over 8 lanes (lane l sums elements l, l + 8, ... as one fma
 *                               chain), the lanes added as a fixed tree, then the tail elements
 *   m = max(sink, s_lo .. s_pos); p_j = exp(s_j - m) (exp_portable: one polynomial, the same bits
 *                               on every path); sum = p_lo + ... over 8 lanes as the dot, + exp(sink - m)
 *   o = (fma chain over j of p_j * v_j) / sum
 * for keys lo = max(0, pos - window + 1) .. pos. No split over keys: a row's result is the same alone,
 * in any batch, in a prefill, a chunk of one, or a decode step. The portable path computes the same
 * operations in the same order (the 8 lanes emulated), so every machine gives the same bits. */

typedef struct {
    const float *q, *k, *v, *sinks;
    float *o;
    const int64_t *blocks, *start, *row_seq, *positions;
    int64_t q_t, q_h, k_g, k_s, v_g, v_s, o_t, o_h;
    int64_t H, G, D, DV, block_size, window;
    float scale;
} attention_job;

static inline float hsum8_portable(const float l[8]) {
    float a = l[0] + l[4], b = l[1] + l[5], c = l[2] + l[6], d = l[3] + l[7];
    return (a + c) + (b + d);
}

static float dot_portable(const float *a, const float *b, int64_t n) {
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; l++) lanes[l] = fmaf(a[c + l], b[c + l], lanes[l]);
    float s = hsum8_portable(lanes);
    for (; c < n; c++) s = fmaf(a[c], b[c], s);
    return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"), always_inline)) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* l0+l4 .. l3+l7 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                      /* (a+c), (b+d) */
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* Four keys' dots with one query at once (four independent chains), each as dot_portable. */
__attribute__((target("avx2,fma"))) static void dot4_avx2(const float *q, const float *k0, const float *k1,
                                                          const float *k2, const float *k3, int64_t n, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 qv = _mm256_loadu_ps(q + c);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + c), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + c), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + c), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + c), a3);
    }
    float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
    for (; c < n; c++) {
        s0 = fmaf(q[c], k0[c], s0);
        s1 = fmaf(q[c], k1[c], s1);
        s2 = fmaf(q[c], k2[c], s2);
        s3 = fmaf(q[c], k3[c], s3);
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), acc);
    float s = hsum8(acc);
    for (; c < n; c++) s = fmaf(a[c], b[c], s);
    return s;
}

/* out[c0 .. c0 + 8 * NV) = sum over keys j, in order, of p[j] * v_j (one fma chain per element, as
 * axpy_portable applied key by key), the NV accumulators held in registers across all keys. */
#define VALUES_BLOCK(NV)                                                                                  \
    __attribute__((target("avx2,fma"))) static void values_block##NV(const float *p, const float *vbase,   \
                                                                    const int64_t *slot, int64_t v_s,      \
                                                                    int64_t n, float *out) {               \
        __m256 acc[NV];                                                                                   \
        for (int i = 0; i < NV; i++) acc[i] = _mm256_setzero_ps();                                       \
        for (int64_t j = 0; j < n; j++) {                                                                 \
            const float *v = vbase + slot[j] * v_s;                                                       \
            __m256 pj = _mm256_set1_ps(p[j]);                                                             \
            for (int i = 0; i < NV; i++) acc[i] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * i), acc[i]); \
        }                                                                                                 \
        for (int i = 0; i < NV; i++) _mm256_storeu_ps(out + 8 * i, acc[i]);                               \
    }
VALUES_BLOCK(1)
VALUES_BLOCK(2)
VALUES_BLOCK(4)
VALUES_BLOCK(8)

__attribute__((target("avx2,fma"))) static void values_avx2(const float *p, const float *vbase, const int64_t *slot,
                                                            int64_t v_s, int64_t n, int64_t dv, float *out) {
    int64_t c = 0;
    for (; c + 64 <= dv; c += 64) values_block8(p, vbase + c, slot, v_s, n, out + c);
    for (; c + 32 <= dv; c += 32) values_block4(p, vbase + c, slot, v_s, n, out + c);
    for (; c + 16 <= dv; c += 16) values_block2(p, vbase + c, slot, v_s, n, out + c);
    for (; c + 8 <= dv; c += 8) values_block1(p, vbase + c, slot, v_s, n, out + c);
    for (; c < dv; c++) {
        float s = 0.0f;
        for (int64_t j = 0; j < n; j++) s = fmaf(p[j], vbase[slot[j] * v_s + c], s);
        out[c] = s;
    }
}
#endif

/* exp for softmax weights, the same bits on both paths: Cephes' expf polynomial (within 2 ulp of
 * expf), every step a correctly rounded operation done alike by the vector and the scalar code:
 * x = max(x, -87.3); n = nearest(x * log2 e); r = x - n ln2 (two fmas); y = 1 + r + r^2 P(r); y * 2^n. */
#define EXP_LO -87.3f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define P0 1.9875691500e-4f
#define P1 1.3981999507e-3f
#define P2 8.3334519073e-3f
#define P3 4.1665795894e-2f
#define P4 1.6666665459e-1f
#define P5 5.0000001201e-1f

static float exp_portable(float x) {
    x = x > EXP_LO ? x : EXP_LO;
    float n = nearbyintf(x * LOG2E);
    float r = fmaf(n, -LN2_HI, x);
    r = fmaf(n, -LN2_LO, r);
    float p = P0;
    p = fmaf(p, r, P1);
    p = fmaf(p, r, P2);
    p = fmaf(p, r, P3);
    p = fmaf(p, r, P4);
    p = fmaf(p, r, P5);
    float y = fmaf(p, r * r, r) + 1.0f;
    union { uint32_t u; float f; } scale = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return y * scale.f;
}

/* Softmax weights of one head's scores s[0..n) in place (exp(s - m)); returns their sum plus `sink`
 * (0 or exp(sink logit - m)), added as: 8 lanes (lane l sums j = l, l + 8, ...), the fixed tree, the
 * tail in order, then the sink. */
static float softmax_portable(float *s, int64_t n, float m, float sink) {
    for (int64_t j = 0; j < n; j++) s[j] = exp_portable(s[j] - m);
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lanes[l] += s[j + l];
    float sum = hsum8_portable(lanes);
    for (; j < n; j++) sum += s[j];
    return sum + sink;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    __m256 p = _mm256_set1_ps(P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static float softmax_avx2(float *s, int64_t n, float m, float sink) {
    __m256 mv = _mm256_set1_ps(m), lanes = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 p = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, p);
        lanes = _mm256_add_ps(lanes, p);
    }
    float sum = hsum8(lanes);
    for (; j < n; j++) {
        s[j] = exp_portable(s[j] - m);
        sum += s[j];
    }
    return sum + sink;
}
#endif

static void axpy_portable(float p, const float *v, float *acc, int64_t n) {
    for (int64_t c = 0; c < n; c++) acc[c] = fmaf(p, v[c], acc[c]);
}

/* Per-thread scratch that grows to the largest item seen (scores [R, n] and accumulators [R, dv]). */
static __thread float *scratch;
static __thread int64_t scratch_len;

static float *scratch_for(int64_t floats) {
    if (floats > scratch_len) {
        free(scratch);
        scratch = malloc((size_t)floats * sizeof(float));
        scratch_len = scratch ? floats : 0;
    }
    return scratch;
}

static void attention_item(const void *ctx, int64_t item) {
    const attention_job *a = ctx;
    int64_t t = item / a->G, g = item % a->G, R = a->H / a->G;
    int64_t pos = a->positions[t], seq = a->row_seq[t], bs = a->block_size;
    int64_t lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
    int64_t n = pos + 1 - lo;
    const int64_t *table = a->blocks + a->start[seq];
    float *scores = scratch_for(R * n + R * a->DV + 2 * n);
    if (!scores) return; /* out of memory: the caller checks every row was written (see py_paged_attention) */
    float *acc = scores + R * n;
    int64_t *slot = (int64_t *)(acc + R * a->DV); /* cache slot of each visible key, block by block */
    for (int64_t j = 0, p = lo; p <= pos; p = (p / bs + 1) * bs) {
        int64_t base = table[p / bs] * bs, end = (p / bs + 1) * bs <= pos + 1 ? (p / bs + 1) * bs : pos + 1;
        for (int64_t o = p; o < end; o++) slot[j++] = base + o % bs;
    }
    const float *kbase = a->k + g * a->k_g, *vbase = a->v + g * a->v_g;
    const float *q = a->q + t * a->q_t + g * R * a->q_h;
    int vec = 0;
#if defined(__x86_64__)
    vec = have_avx2_fma;
#endif
    /* Step 1: scores, key-major so each key is read once for the R heads. */
    for (int64_t j = 0; j < n;) {
        int64_t left = n - j;
#if defined(__x86_64__)
        if (vec && left >= 4) {
            const float *kp[4];
            for (int i = 0; i < 4; i++) {
                kp[i] = kbase + slot[j + i] * a->k_s;
            }
            for (int64_t r = 0; r < R; r++) {
                float s4[4];
                dot4_avx2(q + r * a->q_h, kp[0], kp[1], kp[2], kp[3], a->D, s4);
                for (int i = 0; i < 4; i++) scores[r * n + j + i] = s4[i] * a->scale;
            }
            j += 4;
            continue;
        }
#endif
        (void)left;
        const float *kp = kbase + slot[j] * a->k_s;
        for (int64_t r = 0; r < R; r++) {
#if defined(__x86_64__)
            float s = vec ? dot_avx2(q + r * a->q_h, kp, a->D) : dot_portable(q + r * a->q_h, kp, a->D);
#else
            float s = dot_portable(q + r * a->q_h, kp, a->D);
#endif
            scores[r * n + j] = s * a->scale;
        }
        j++;
    }
    /* Step 2: softmax weights per head, summed in key order (a sink first: a logit with no value). */
    float inv[R];
    for (int64_t r = 0; r < R; r++) {
        float *s = scores + r * n;
        float m = a->sinks ? a->sinks[g * R + r] : -INFINITY;
        for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m; /* a maximum: the same in any order */
        float sink = a->sinks ? exp_portable(a->sinks[g * R + r] - m) : 0.0f;
#if defined(__x86_64__)
        inv[r] = vec ? softmax_avx2(s, n, m, sink) : softmax_portable(s, n, m, sink);
#else
        inv[r] = softmax_portable(s, n, m, sink);
#endif
        memset(acc + r * a->DV, 0, (size_t)a->DV * sizeof(float));
    }
    /* Step 3: values; one fma chain over keys, in key order, per output element. */
#if defined(__x86_64__)
    if (vec) {
        for (int64_t r = 0; r < R; r++) values_avx2(scores + r * n, vbase, slot, a->v_s, n, a->DV, acc + r * a->DV);
    } else
#endif
    for (int64_t j = 0; j < n; j++) {
        const float *vp = vbase + slot[j] * a->v_s;
        for (int64_t r = 0; r < R; r++) axpy_portable(scores[r * n + j], vp, acc + r * a->DV, a->DV);
    }
    for (int64_t r = 0; r < R; r++) {
        float *o = a->o + t * a->o_t + (g * R + r) * a->o_h;
        for (int64_t c = 0; c < a->DV; c++) o[c] = acc[r * a->DV + c] / inv[r];
    }
}

/* ---- what the process reaches: FMA peak and copy bandwidth (for the roofline in benchmarks) --- */

typedef struct {
    int64_t iterations;
    float sink;
} peak_arg;

#if defined(__x86_64__)
/* Twelve independent fma chains per thread hide the fma latency; two units retire two a cycle. */
__attribute__((target("avx2,fma"))) static void *fma_loop(void *p) {
    peak_arg *arg = p;
    /* Distinct starting values: twelve equal chains would be folded into one by the compiler. */
    __m256 a0 = _mm256_set1_ps(1.00f), a1 = _mm256_set1_ps(1.01f), a2 = _mm256_set1_ps(1.02f);
    __m256 a3 = _mm256_set1_ps(1.03f), a4 = _mm256_set1_ps(1.04f), a5 = _mm256_set1_ps(1.05f);
    __m256 a6 = _mm256_set1_ps(1.06f), a7 = _mm256_set1_ps(1.07f), a8 = _mm256_set1_ps(1.08f);
    __m256 a9 = _mm256_set1_ps(1.09f), a10 = _mm256_set1_ps(1.10f), a11 = _mm256_set1_ps(1.11f);
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
    for (int64_t i = 0; i < arg->iterations; i++) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    arg->sink = hsum8(s); /* keeps the loop alive */
    return NULL;
}
#endif

typedef struct {
    const char *src;
    char *dst;
    size_t bytes;
    int repeats;
    pthread_barrier_t *barrier;
    double *best; /* written by thread 0 */
    int read_only;
    float sum; /* keeps the read stream alive */
} copy_arg;

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) static float read_stream_avx2(const float *p, size_t n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
        b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
}
#endif

/* A read-only stream, as a weight matrix is read: four independent sums keep the loads in flight. */
static float read_stream(const float *p, size_t n) {
#if defined(__x86_64__)
    if (have_avx2_fma) return read_stream_avx2(p, n);
#endif
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= n; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
    return (s0 + s1) + (s2 + s3);
}

static void *copy_loop(void *p) {
    copy_arg *arg = p;
    for (int r = 0; r < arg->repeats; r++) {
        pthread_barrier_wait(arg->barrier);
        double t0 = now_s();
        if (arg->read_only)
            arg->sum += read_stream((const float *)arg->src, arg->bytes / sizeof(float));
        else
            memcpy(arg->dst, arg->src, arg->bytes);
        pthread_barrier_wait(arg->barrier);
        double dt = now_s() - t0;
        if (arg->best && dt < *arg->best) *arg->best = dt;
    }
    return NULL;
}
static _Atomic int attention_failed; /* an item found no scratch memory */

static void attention_chunk(const void *ctx, int64_t item) {
    const attention_job *a = ctx;
    int64_t t = item / a->G, seq_keys = a->positions[t] + 1;
    if (!scratch_for((a->H / a->G) * (seq_keys + a->DV) + 2 * seq_keys)) {
        atomic_store(&attention_failed, 1);
        return;
    }
    attention_item(ctx, item);
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be between 1 and %d, got %ld", MAX_THREADS, n);
        return NULL;
    }
    pthread_mutex_lock(&pool.mu);
    while (pool.threads < n - 1) { /* helpers are started once and kept; fewer are never needed again */
        pthread_t t;
        if (pthread_create(&t, NULL, helper, NULL) != 0) break;
        pthread_detach(t);
        pool.threads++;
    }
    pthread_mutex_unlock(&pool.mu);
    Py_RETURN_NONE;
}

static PyObject *py_threads(PyObject *self, PyObject *unused) { return PyLong_FromLong(pool.threads + 1); }

static PyObject *py_serial_spells(PyObject *self, PyObject *unused) {
    return PyLong_FromLongLong(contention.serial_spells);
}

static int check_product(const product *p) {
    if (p->M < 0 || p->N < 0 || p->K < 0 || p->ldx < p->K || p->ldy < p->N || !p->x || !p->packed || !p->y) {
        PyErr_SetString(PyExc_ValueError, "linear: inconsistent sizes, strides or pointers");
        return 0;
    }
    return 1;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long xp, pp, bp, yp;
    long long M, N, K, ldx, ldy;
    if (!PyArg_ParseTuple(args, "KKKKLLLLL", &xp, &pp, &bp, &yp, &M, &N, &K, &ldx, &ldy)) return NULL;
    product p = {(const float *)(uintptr_t)xp, (const float *)(uintptr_t)pp,
                 bp ? (const float *)(uintptr_t)bp : NULL, (float *)(uintptr_t)yp, M, N, K, ldx, ldy};
    if (!check_product(&p)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_products(&p, 1);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_linear_group(PyObject *self, PyObject *args) {
    unsigned long long table;
    long long njobs;
    if (!PyArg_ParseTuple(args, "KL", &table, &njobs)) return NULL;
    if (njobs < 0 || njobs > 1 << 20 || (njobs && !table)) {
        PyErr_SetString(PyExc_ValueError, "linear_group: bad job table");
        return NULL;
    }
    if (njobs == 0) Py_RETURN_NONE;
    const int64_t *rows = (const int64_t *)(uintptr_t)table; /* [njobs, 9] int64 */
    product *jobs = malloc((size_t)njobs * sizeof(product));
    if (!jobs) return PyErr_NoMemory();
    for (int64_t j = 0; j < njobs; j++) {
        const int64_t *r = rows + 9 * j;
        jobs[j] = (product){(const float *)(uintptr_t)r[0], (const float *)(uintptr_t)r[1],
                            r[2] ? (const float *)(uintptr_t)r[2] : NULL, (float *)(uintptr_t)r[3],
                            r[4], r[5], r[6], r[7], r[8]};
        if (!check_product(&jobs[j])) {
            free(jobs);
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    run_products(jobs, njobs);
    Py_END_ALLOW_THREADS
    free(jobs);
    Py_RETURN_NONE;
}

static PyObject *py_paged_attention(PyObject *self, PyObject *args) {
    unsigned long long qp, kp, vp, op, bp, sp, rp, pp, sinkp;
    long long T, H, G, D, DV, q_t, q_h, k_g, k_s, v_g, v_s, o_t, o_h, bs, window;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKLLLLLLLLLLLLLLLd", &qp, &kp, &vp, &op, &bp, &sp, &rp, &pp, &sinkp, &T, &H,
                          &G, &D, &DV, &q_t, &q_h, &k_g, &k_s, &v_g, &v_s, &o_t, &o_h, &bs, &window, &scale))
        return NULL;
    if (T < 0 || G <= 0 || H <= 0 || H % G || D <= 0 || DV <= 0 || bs <= 0 || window < 0 ||
        (T && (!qp || !kp || !vp || !op || !bp || !sp || !rp || !pp))) {
        PyErr_SetString(PyExc_ValueError, "paged_attention: inconsistent sizes or pointers");
        return NULL;
    }
    attention_job a = {
        (const float *)(uintptr_t)qp, (const float *)(uintptr_t)kp, (const float *)(uintptr_t)vp,
        sinkp ? (const float *)(uintptr_t)sinkp : NULL, (float *)(uintptr_t)op,
        (const int64_t *)(uintptr_t)bp, (const int64_t *)(uintptr_t)sp, (const int64_t *)(uintptr_t)rp,
        (const int64_t *)(uintptr_t)pp, q_t, q_h, k_g, k_s, v_g, v_s, o_t, o_h, H, G, D, DV, bs, window,
        (float)scale,
    };
    atomic_store(&attention_failed, 0);
    Py_BEGIN_ALLOW_THREADS
    double flops = 0;
    for (int64_t t = 0; t < T; t++) {
        int64_t keys = a.positions[t] + 1;
        if (window > 0 && keys > window) keys = window;
        flops += 2.0 * (double)keys * (double)H * (double)(D + DV);
    }
    if (pool.threads > 0 && flops >= PARALLEL_MIN_FLOPS)
        parallel_for(attention_chunk, &a, T * G);
    else
        for (int64_t i = 0; i < T * G; i++) attention_chunk(&a, i);
    Py_END_ALLOW_THREADS
    if (atomic_load(&attention_failed)) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_fma_peak(PyObject *self, PyObject *args) {
    int threads;
    long long iterations;
    if (!PyArg_ParseTuple(args, "iL", &threads, &iterations)) return NULL;
    if (threads < 1 || threads > MAX_THREADS || iterations < 1) {
        PyErr_SetString(PyExc_ValueError, "fma_peak: threads in [1, 64] and iterations >= 1");
        return NULL;
    }
#if defined(__x86_64__)
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
        PyErr_SetString(PyExc_RuntimeError, "fma_peak needs AVX2 and FMA");
        return NULL;
    }
    pthread_t ids[MAX_THREADS];
    peak_arg arg[MAX_THREADS];
    double t0 = 0, dt = 0;
    int started = 0;
    Py_BEGIN_ALLOW_THREADS
    t0 = now_s();
    for (int i = 0; i < threads; i++) {
        arg[i].iterations = iterations;
        if (pthread_create(&ids[i], NULL, fma_loop, &arg[i]) == 0) started++;
        else break;
    }
    for (int i = 0; i < started; i++) pthread_join(ids[i], NULL);
    dt = now_s() - t0;
    Py_END_ALLOW_THREADS
    if (started < threads) {
        PyErr_SetString(PyExc_RuntimeError, "fma_peak: could not start its threads");
        return NULL;
    }
    return PyFloat_FromDouble((double)threads * (double)iterations * 12 * 8 * 2 / dt);
#else
    PyErr_SetString(PyExc_RuntimeError, "fma_peak is measured on x86-64 only");
    return NULL;
#endif
}

static PyObject *py_copy_bandwidth(PyObject *self, PyObject *args) {
    int threads, repeats, read_only = 0;
    long long bytes;
    if (!PyArg_ParseTuple(args, "Lii|p", &bytes, &repeats, &threads, &read_only)) return NULL;
    if (threads < 1 || threads > MAX_THREADS || repeats < 1 || bytes < 4096 * threads) {
        PyErr_SetString(PyExc_ValueError, "copy_bandwidth: bytes >= 4096 per thread, repeats >= 1, threads in [1, 64]");
        return NULL;
    }
    char *src = malloc((size_t)bytes), *dst = malloc((size_t)bytes);
    if (!src || !dst) {
        free(src);
        free(dst);
        return PyErr_NoMemory();
    }
    double best = 1e30;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    memset(src, 1, (size_t)bytes); /* touch every page first: untouched pages would read as one zero page */
    memset(dst, 2, (size_t)bytes);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    pthread_t ids[MAX_THREADS];
    copy_arg arg[MAX_THREADS];
    size_t share = ((size_t)bytes / threads) & ~(size_t)63;
    for (int i = 0; i < threads; i++)
        arg[i] = (copy_arg){src + i * share, dst + i * share, share, repeats, &barrier, i == 0 ? &best : NULL,
                            read_only, 0.0f};
    int started = 1;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&ids[i], NULL, copy_loop, &arg[i]) != 0) { ok = 0; break; }
        started++;
    }
    if (ok) copy_loop(&arg[0]);
    for (int i = 1; i < started; i++) pthread_join(ids[i], NULL);
    pthread_barrier_destroy(&barrier);
    (void)share;
    Py_END_ALLOW_THREADS
    free(src);
    free(dst);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "copy_bandwidth: could not start its threads");
        return NULL;
    }
    /* STREAM's convention: a copy moves its bytes twice (read, then write); a read stream once. */
    return PyFloat_FromDouble((read_only ? 1.0 : 2.0) * (double)(((size_t)bytes / threads) & ~(size_t)63) * threads / best);
}

static PyObject *py_set_portable(PyObject *self, PyObject *arg) {
    /* Tests force the portable path to check that both paths give identical bits. */
    int portable = PyObject_IsTrue(arg);
    if (portable < 0) return NULL;
#if defined(__x86_64__)
    have_avx2_fma = portable ? 0 : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
#endif
    Py_RETURN_NONE;
}

static PyObject *py_vector_path(PyObject *self, PyObject *unused) { return PyBool_FromLong(have_avx2_fma); }

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS,
     "linear(x_ptr, packed_ptr, bias_ptr_or_0, y_ptr, M, N, K, ldx, ldy): y = x @ w.T (+ bias), w packed in "
     "16-column panels [N16/16, K, 16]; batch-invariant float32."},
    {"linear_group", py_linear_group, METH_VARARGS,
     "linear_group(table_ptr, n): the n products of an int64 table [n, 9] of rows (x_ptr, packed_ptr, "
     "bias_ptr_or_0, y_ptr, M, N, K, ldx, ldy), each as linear(); threads share all of them."},
    {"paged_attention", py_paged_attention, METH_VARARGS,
     "paged_attention(q, k, v, o, blocks, start, row_seq, positions, sinks_or_0 (pointers), T, H, G, D, DV, "
     "q_t, q_h, k_g, k_s, v_g, v_s, o_t, o_h (strides in floats), block_size, window (0: none), scale): "
     "float32, batch-invariant; int64 blocks/start/row_seq/positions."},
    {"fma_peak", py_fma_peak, METH_VARARGS, "fma_peak(threads, iterations) -> float32 FLOP/s reached."},
    {"copy_bandwidth", py_copy_bandwidth, METH_VARARGS,
     "copy_bandwidth(bytes, repeats, threads, read_only=False) -> bytes/s of a memcpy, read + write counted "
     "(STREAM copy), or of a read-only stream (as weights are read)."},
    {"threads", py_threads, METH_NOARGS, "threads() -> int: threads jobs run on (helpers + the caller)."},
    {"serial_spells", py_serial_spells, METH_NOARGS,
     "serial_spells() -> int: times jobs went back to one thread because helpers kept stalling."},
    {"set_portable", py_set_portable, METH_O, "set_portable(flag): force (or stop forcing) the portable path."},
    {"set_threads", py_set_threads, METH_O,
     "set_threads(n): compute big products on n threads, split by output columns (results unchanged)."},
    {"vector_path", py_vector_path, METH_NOARGS, "vector_path() -> bool: whether the AVX2+FMA path is in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Batch-invariant CPU kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
