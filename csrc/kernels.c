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
 * Releases the GIL while computing; a process that owns several cores splits big products over
 * threads by output columns (set_threads, below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
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
                                                                          float *y, int64_t ldy, int prefetch) {
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0;
    __m256 l3 = l0, h3 = l0, l4 = l0, h4 = l0, l5 = l0, h5 = l0;
    for (int64_t k = 0; k < K; k++) {
        __m256 b0 = _mm256_loadu_ps(panel + k * PANEL), b1 = _mm256_loadu_ps(panel + k * PANEL + 8);
        /* The first row tile pulls the next panel toward the cache while this one computes. */
        if (prefetch) _mm_prefetch((const char *)(panel + (K + k) * PANEL), _MM_HINT_T0);
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
        for (int64_t t = 0; t < tiles; t++) {
            int rows = (int)(M / tiles + (t < M % tiles));
            int fetch = (p + 1) * PANEL < N && t == 0;
            const float *xt = x + m0 * ldx;
            float *yt = y + m0 * ldy;
            switch (rows) {
            case 1: tile(xt, ldx, 1, panel, K, bias, n0, cols, yt, ldy, fetch); break;
            case 2: tile(xt, ldx, 2, panel, K, bias, n0, cols, yt, ldy, fetch); break;
            case 3: tile(xt, ldx, 3, panel, K, bias, n0, cols, yt, ldy, fetch); break;
            case 4: tile(xt, ldx, 4, panel, K, bias, n0, cols, yt, ldy, fetch); break;
            case 5: tile(xt, ldx, 5, panel, K, bias, n0, cols, yt, ldy, fetch); break;
            default: tile(xt, ldx, 6, panel, K, bias, n0, cols, yt, ldy, fetch); break;
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
 * A process that owns several cores splits a product by output columns, never by K: every output
 * element is still one thread's single fma chain over K, so the bits do not depend on the thread
 * count either. The split is dynamic: threads (the caller too) take chunks of panels from a shared
 * counter until none is left, and the call returns once every chunk is done. A helper the scheduler
 * does not run (a busy machine) takes no chunk and the others do its share, so a product is never
 * slower than on one thread by more than the chunk a stalled helper holds. The counter carries the
 * job's generation in its high bits, so a helper that wakes late can never take a chunk of the next
 * job with the previous job's arguments. */
#define MAX_THREADS 64
#define PARALLEL_MIN_FLOPS (1 << 22) /* smaller products are not worth waking anyone */

static struct {
    pthread_mutex_t mu;
    pthread_cond_t start;
    int threads; /* helpers running (the caller makes one more) */
    uint32_t generation;
    const float *x, *packed, *bias;
    float *y;
    int64_t ldx, ldy, M, N, K, chunks, panels_per_chunk;
    _Atomic uint64_t next;  /* (generation << 32) | next chunk */
    _Atomic int64_t done;   /* chunks finished of the current job */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .start = PTHREAD_COND_INITIALIZER};

static void run_chunks(uint32_t generation) {
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        if ((uint32_t)(v >> 32) != generation || (int64_t)(v & 0xffffffffu) >= pool.chunks) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        int64_t n0 = (int64_t)(v & 0xffffffffu) * pool.panels_per_chunk * PANEL;
        linear_columns(pool.x, pool.ldx, pool.packed, pool.bias, pool.y, pool.ldy, pool.M, pool.N, pool.K, n0,
                       n0 + pool.panels_per_chunk * PANEL);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *helper(void *arg) {
    uint32_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool.mu);
        while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = pool.generation;
        pthread_mutex_unlock(&pool.mu);
        run_chunks(seen);
    }
    return NULL;
}

static void linear_threaded(const float *x, int64_t ldx, const float *packed, const float *bias, float *y,
                            int64_t ldy, int64_t M, int64_t N, int64_t K) {
    int64_t panels = (N + PANEL - 1) / PANEL;
    int64_t per = panels / (4 * (pool.threads + 1));  /* ~4 chunks per thread: slack for stragglers */
    pthread_mutex_lock(&pool.mu);
    pool.x = x; pool.ldx = ldx; pool.packed = packed; pool.bias = bias; pool.y = y; pool.ldy = ldy;
    pool.M = M; pool.N = N; pool.K = K;
    pool.panels_per_chunk = per > 0 ? per : 1;
    pool.chunks = (panels + pool.panels_per_chunk - 1) / pool.panels_per_chunk;
    uint32_t generation = ++pool.generation;
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, (uint64_t)generation << 32);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    run_chunks(generation);
    while (atomic_load(&pool.done) < pool.chunks) sched_yield();  /* only chunks already taken are left */
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be between 1 and %d, got %ld", MAX_THREADS, n);
        return NULL;
    }
    pthread_mutex_lock(&pool.mu);
    while (pool.threads < n - 1) {  /* helpers are started once and kept; fewer are never needed again */
        pthread_t t;
        if (pthread_create(&t, NULL, helper, NULL) != 0) break;
        pthread_detach(t);
        pool.threads++;
    }
    pthread_mutex_unlock(&pool.mu);
    Py_RETURN_NONE;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    unsigned long long xp, pp, bp, yp;
    long long M, N, K, ldx, ldy;
    if (!PyArg_ParseTuple(args, "KKKKLLLLL", &xp, &pp, &bp, &yp, &M, &N, &K, &ldx, &ldy)) return NULL;
    if (M < 0 || N < 0 || K < 0 || ldx < K || ldy < N) {
        PyErr_SetString(PyExc_ValueError, "linear: inconsistent sizes or strides");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)xp, *packed = (const float *)(uintptr_t)pp;
    const float *bias = bp ? (const float *)(uintptr_t)bp : NULL;
    float *y = (float *)(uintptr_t)yp;
    Py_BEGIN_ALLOW_THREADS
    if (pool.threads > 0 && 2 * M * N * K >= PARALLEL_MIN_FLOPS && N > PANEL)
        linear_threaded(x, ldx, packed, bias, y, ldy, M, N, K);
    else
        linear_columns(x, ldx, packed, bias, y, ldy, M, N, K, 0, N);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
