/* Shared-memory rings: the same-host transport of the datapath.
 *
 * A link's segment is one memfd holding two rings, one per direction, each a control page followed
 * by `capacity` data bytes. The memfd travels to the peer over the link's Unix socket (SCM_RIGHTS),
 * so no name exists in /dev/shm and the memory goes away with the last process mapping it, even
 * after SIGKILL. The creator seals its size so the peer can never shrink it under a live mapping.
 *
 * Each ring has one producer and one consumer (SPSC). Positions are byte counts that only grow
 * (`head`: published by the producer, `tail`: freed by the consumer); the offset in the data area is
 * position % capacity. A message is a record: a 64-byte record header (type, length) and the bytes,
 * padded to 64, so every message starts 64-byte aligned and, with the frame layout of frames.py,
 * so does every tensor. A message never wraps: when the space to the end is too small the producer
 * writes a PAD record there and starts at 0, which is why a message may take at most half the ring.
 *
 * Wake-up. A consumer that finds its rings empty spins briefly, then sleeps in epoll_wait on its
 * process's doorbell eventfd (the peer holds a copy). Before sleeping it sets `consumer_sleeping`
 * on each ring and looks at the rings again; a producer stores `head` and then loads the flag, both
 * sequentially consistent. Either the consumer sees the new head or the producer sees the flag
 * (Dekker), so no message is left unseen while the consumer sleeps; the producer clears the flag
 * with an exchange, so a burst of messages costs one eventfd write. A producer facing a full ring
 * does the mirror image with `producer_waiting`, and the consumer's release() answers with a byte on
 * the link's control socket, the same socket that reports a dead peer: a blocked producer wakes on
 * space or on peer death, whichever comes first.
 *
 * Cut-through. A big frame is published in pieces as it is copied in: the producer names the
 * record it is writing (`partial_at`) and how many of its bytes are final (`partial_done`). A
 * consumer spinning in wait() checksums those bytes meanwhile, so its check overlaps the copy and
 * only the last piece is left when the record is committed. This is only a head start on the
 * CRC: the frame is still returned, and its header checked, once it is committed.
 *
 * Nothing read from the shared pages is trusted: record lengths and positions are checked against
 * the capacity before use, and a ring that breaks the rules raises RingCorrupt.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define RING_MAGIC 0x474e4952454f4d52ull /* "RMOERING" */
#define RING_VERSION 1u
#define CTRL_SIZE 4096u
#define REC_HDR 64u
#define REC_DATA 0x41544144u /* "DATA" */
#define REC_PAD 0x44444150u  /* "PADD" */
#define MIN_CAPACITY (64u * 1024u)
#define MAX_CAPACITY (1ull << 36)
#define MAX_RINGS 4096
#define MAX_EVENTS 256
#define BIG_COPY (256u * 1024u) /* copies at least this big run without the GIL */
#define CUT_THROUGH (32u * 1024u) /* frames at least this big are published piece by piece */
#define NO_PARTIAL UINT64_MAX

struct ring_ctrl {
    uint64_t magic;
    uint32_t version, reserved;
    uint64_t capacity;
    char pad0[40];
    _Atomic uint64_t head; /* producer: bytes ever published */
    char pad1[56];
    _Atomic uint64_t tail; /* consumer: bytes ever freed */
    char pad2[56];
    _Atomic uint32_t consumer_sleeping; /* set by the consumer before it sleeps */
    char pad3[60];
    _Atomic uint32_t producer_waiting; /* set by a producer blocked on a full ring */
    char pad4[60];
    _Atomic uint64_t partial_at;   /* producer: position of the record being written, or NO_PARTIAL */
    _Atomic uint64_t partial_done; /* producer: bytes of its message that are final */
    char pad5[48];
};
_Static_assert(offsetof(struct ring_ctrl, head) == 64, "head owns cache line 1");
_Static_assert(offsetof(struct ring_ctrl, tail) == 128, "tail owns cache line 2");
_Static_assert(offsetof(struct ring_ctrl, consumer_sleeping) == 192, "flag owns cache line 3");
_Static_assert(offsetof(struct ring_ctrl, producer_waiting) == 256, "flag owns cache line 4");
_Static_assert(offsetof(struct ring_ctrl, partial_at) == 320, "cut-through state owns cache line 5");
_Static_assert(sizeof(struct ring_ctrl) <= CTRL_SIZE, "control block fits its page");

struct rec_hdr {
    uint32_t type, len;
};

static PyObject *RingCorrupt, *MessageTooLarge;

typedef struct {
    PyObject_HEAD
    uint8_t *base;
    size_t map_len;
    struct ring_ctrl *ctrl;
    uint8_t *data;
    uint64_t cap;
    int producer;
    int notify_fd; /* producer: consumer's doorbell eventfd; consumer: link control socket (not owned) */
    int closed;
    /* producer's private state */
    uint64_t head, tail_seen, res_at;
    size_t res_len, want;
    int reserved;
    /* consumer's private state */
    uint64_t rd, head_seen, released, last_at, last_rec;
    uint64_t pre_at, pre_done; /* cut-through: record position and bytes checksummed ahead */
    uint32_t pre_crc;
    /* the window the next buffer export covers (see ring_getbuffer) */
    Py_ssize_t exp_off, exp_len;
    unsigned long long doorbells, tokens, ahead;
} Ring;

static inline uint64_t round64(uint64_t n) { return (n + 63) & ~(uint64_t)63; }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t max_message(const Ring *r) { return r->cap / 2 - REC_HDR; }

/* ------------------------------------------------------------------ producer */

/* Room for an n-byte message now? Sets *skip to the PAD the message needs first. */
static int ring_room(Ring *r, size_t n, uint64_t *skip) {
    uint64_t rec = REC_HDR + round64(n);
    uint64_t pos = r->head % r->cap;
    if (pos >= r->cap / 2 && rec <= pos &&
        (r->tail_seen == r->head ||
         (r->tail_seen = atomic_load_explicit(&r->ctrl->tail, memory_order_acquire)) == r->head)) {
        /* The ring is empty: start over at offset 0 (a PAD covers the rest). Request/reply traffic
         * then reuses cache-warm bytes instead of streaming through the whole ring. Only from the
         * second half: until the consumer reads past the PAD, the space in front of the producer is
         * `pos`, and it must stay at least half the ring (what one message may take) so that two
         * peers each sending a burst can never both find their rings full. */
        *skip = r->cap - pos;
        return 1;
    }
    *skip = r->cap - pos < rec ? r->cap - pos : 0;
    uint64_t end = r->head + *skip + rec;
    if (end - r->tail_seen <= r->cap) return 1;
    r->tail_seen = atomic_load_explicit(&r->ctrl->tail, memory_order_acquire);
    return end - r->tail_seen <= r->cap;
}

static uint8_t *ring_reserve(Ring *r, size_t n) {
    uint64_t skip;
    if (!ring_room(r, n, &skip)) return NULL;
    if (skip) {
        struct rec_hdr pad = {REC_PAD, (uint32_t)(skip - REC_HDR)};
        memcpy(r->data + r->head % r->cap, &pad, sizeof pad);
    }
    r->res_at = r->head + skip;
    r->res_len = n;
    r->reserved = 1;
    return r->data + r->res_at % r->cap + REC_HDR;
}

static void ring_commit(Ring *r, size_t n) {
    struct rec_hdr h = {REC_DATA, (uint32_t)n};
    memcpy(r->data + r->res_at % r->cap, &h, sizeof h);
    r->head = r->res_at + REC_HDR + round64(n);
    r->reserved = 0;
    atomic_store_explicit(&r->ctrl->head, r->head, memory_order_seq_cst);
    if (atomic_load_explicit(&r->ctrl->consumer_sleeping, memory_order_seq_cst) &&
        atomic_exchange_explicit(&r->ctrl->consumer_sleeping, 0, memory_order_seq_cst)) {
        uint64_t one = 1;
        if (write(r->notify_fd, &one, sizeof one) == sizeof one) r->doorbells++;
    }
}

/* ------------------------------------------------------------------ consumer */

/* 1: the message (msg, len) is returned and the read cursor advanced; 0: empty; -1: RingCorrupt set. */
static int ring_next(Ring *r, uint8_t **msg, size_t *len) {
    for (int hop = 0; hop < 2; hop++) {
        if (r->rd == r->head_seen) {
            r->head_seen = atomic_load_explicit(&r->ctrl->head, memory_order_acquire);
            if (r->rd == r->head_seen) return 0;
        }
        uint64_t avail = r->head_seen - r->rd;
        if (avail > r->cap) {
            PyErr_Format(RingCorrupt, "ring head is %llu bytes ahead of the reader (capacity %llu)",
                         (unsigned long long)avail, (unsigned long long)r->cap);
            return -1;
        }
        uint64_t pos = r->rd % r->cap;
        struct rec_hdr h;
        memcpy(&h, r->data + pos, sizeof h);
        if (h.type == REC_PAD && hop == 0 && pos != 0 && h.len == r->cap - pos - REC_HDR && avail > r->cap - pos) {
            r->rd += r->cap - pos;
            continue;
        }
        uint64_t rec = REC_HDR + round64(h.len);
        if (h.type != REC_DATA || rec > r->cap - pos || rec > avail) {
            PyErr_Format(RingCorrupt, "bad ring record at offset %llu (type %#x, length %u, %llu bytes published)",
                         (unsigned long long)pos, h.type, h.len, (unsigned long long)avail);
            return -1;
        }
        *msg = r->data + pos + REC_HDR;
        *len = h.len;
        r->last_at = pos + REC_HDR;
        r->last_rec = r->rd;
        r->rd += rec;
        return 1;
    }
    PyErr_SetString(RingCorrupt, "ring record after a PAD record is a PAD record");
    return -1;
}

static inline int ring_pending(const Ring *r) {
    return atomic_load_explicit(&r->ctrl->head, memory_order_acquire) != r->rd;
}

/* Cut-through: checksum what the producer has finished of the record after the last one read.
 * Called while the consumer waits and its ring holds no complete message. */
static void ring_preverify(Ring *r) {
    uint64_t at = atomic_load_explicit(&r->ctrl->partial_at, memory_order_acquire);
    if (at == NO_PARTIAL) return;
    uint64_t pos = r->rd % r->cap;
    if (at != r->rd && !(pos != 0 && at == r->rd + (r->cap - pos))) return; /* not the next record */
    uint64_t done = atomic_load_explicit(&r->ctrl->partial_done, memory_order_acquire);
    if (atomic_load_explicit(&r->ctrl->partial_at, memory_order_acquire) != at) return; /* finished meanwhile */
    uint64_t room = r->cap - at % r->cap - REC_HDR;
    if (done > room) done = room;
    if (done > max_message(r)) done = max_message(r);
    if (r->pre_at != at) {
        r->pre_at = at;
        r->pre_done = 0;
        r->pre_crc = 0;
    }
    if (done > r->pre_done) {
        r->pre_crc = rmoe_frame_crc(r->pre_crc, r->data + at % r->cap + REC_HDR, r->pre_done, done);
        r->pre_done = done;
    }
}

static void ring_release(Ring *r) {
    if (r->rd == r->released) return;
    r->released = r->rd;
    atomic_store_explicit(&r->ctrl->tail, r->rd, memory_order_seq_cst);
    if (atomic_load_explicit(&r->ctrl->producer_waiting, memory_order_seq_cst) &&
        atomic_exchange_explicit(&r->ctrl->producer_waiting, 0, memory_order_seq_cst)) {
        char token = RMOE_CTL_SPACE;
        if (send(r->notify_fd, &token, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) r->tokens++;
    }
}

/* ------------------------------------------------------------------ Python type */

static int ring_check(Ring *r, int want_producer) {
    if (r->closed) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return -1;
    }
    if (r->producer != want_producer) {
        PyErr_SetString(PyExc_TypeError, want_producer ? "this end of the ring consumes" : "this end of the ring produces");
        return -1;
    }
    return 0;
}

/* A memoryview of [off, off + len) of the data area that keeps the ring (and its mapping) alive. */
static PyObject *ring_view(Ring *r, uint8_t *at, size_t len) {
    r->exp_off = at - r->data;
    r->exp_len = (Py_ssize_t)len;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)r);
    r->exp_len = -1;
    return mv;
}

static int ring_getbuffer(PyObject *o, Py_buffer *view, int flags) {
    Ring *r = (Ring *)o;
    if (r->exp_len < 0) {
        PyErr_SetString(PyExc_BufferError, "ShmRing exports views only through its methods");
        return -1;
    }
    return PyBuffer_FillInfo(view, o, r->data + r->exp_off, r->exp_len, 0, flags);
}

static PyBufferProcs ring_buffer_procs = {ring_getbuffer, NULL};

static int ring_init(PyObject *self, PyObject *args, PyObject *kwds) {
    Ring *r = (Ring *)self;
    static char *kwlist[] = {"fd", "index", "capacity", "producer", "notify_fd", NULL};
    int fd, index, producer, notify_fd;
    unsigned long long cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKpi", kwlist, &fd, &index, &cap, &producer, &notify_fd))
        return -1;
    if (r->base) {
        PyErr_SetString(PyExc_RuntimeError, "ShmRing is already initialised");
        return -1;
    }
    if (index < 0 || index > 1 || cap < MIN_CAPACITY || cap > MAX_CAPACITY || cap % CTRL_SIZE) {
        PyErr_Format(PyExc_ValueError, "bad ring geometry: index %d, capacity %llu (a multiple of %u from %u)", index,
                     cap, CTRL_SIZE, MIN_CAPACITY);
        return -1;
    }
    /* The peer created the memfd: check it is big enough and cannot shrink, or touching the
     * mapping later could SIGBUS this process. */
    struct stat st;
    uint64_t stride = CTRL_SIZE + cap;
    if (fstat(fd, &st) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    if ((uint64_t)st.st_size < 2 * stride || seals < 0 || !(seals & F_SEAL_SHRINK)) {
        PyErr_Format(RingCorrupt, "shared segment of %lld bytes (need %llu) with seals %#x is not usable",
                     (long long)st.st_size, (unsigned long long)(2 * stride), seals);
        return -1;
    }
    void *base = mmap(NULL, stride, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, (off_t)(index * stride));
    if (base == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->base = base;
    r->map_len = stride;
    r->ctrl = base;
    r->data = (uint8_t *)base + CTRL_SIZE;
    if (r->ctrl->magic != RING_MAGIC || r->ctrl->version != RING_VERSION || r->ctrl->capacity != cap) {
        PyErr_SetString(RingCorrupt, "shared segment does not hold a ring of this version and capacity");
        return -1;
    }
    r->cap = cap;
    r->producer = producer;
    r->notify_fd = notify_fd;
    r->head = atomic_load(&r->ctrl->head);
    r->tail_seen = r->rd = r->head_seen = r->released = atomic_load(&r->ctrl->tail);
    r->pre_at = NO_PARTIAL;
    if (r->head - r->tail_seen > cap) {
        PyErr_SetString(RingCorrupt, "ring positions are inconsistent");
        return -1;
    }
    return 0;
}

static PyObject *ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Ring *r = (Ring *)type->tp_alloc(type, 0);
    if (r) {
        r->exp_len = -1;
        r->notify_fd = -1;
    }
    return (PyObject *)r;
}

static void ring_dealloc(PyObject *self) {
    Ring *r = (Ring *)self;
    /* Views hold a reference, so none is alive here: unmapping is safe. */
    if (r->base) munmap(r->base, r->map_len);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *ring_try_reserve(PyObject *self, PyObject *arg) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 1) < 0) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    if ((uint64_t)n > max_message(r)) {
        PyErr_Format(MessageTooLarge, "message of %zd bytes exceeds the ring's limit of %llu bytes (half its capacity)",
                     n, (unsigned long long)max_message(r));
        return NULL;
    }
    uint8_t *at = ring_reserve(r, (size_t)n);
    if (!at) Py_RETURN_NONE;
    return ring_view(r, at, (size_t)n);
}

static PyObject *ring_commit_py(PyObject *self, PyObject *arg) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 1) < 0) return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (!r->reserved || n < 0 || (size_t)n > r->res_len) {
        PyErr_Format(PyExc_ValueError, "commit(%zd) needs a reservation of at least that size", n);
        return NULL;
    }
    ring_commit(r, (size_t)n);
    Py_RETURN_NONE;
}

static PyObject *ring_push(PyObject *self, PyObject *arg) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 1) < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *out = NULL;
    if ((uint64_t)view.len > max_message(r)) {
        PyErr_Format(MessageTooLarge, "message of %zd bytes exceeds the ring's limit of %llu bytes (half its capacity)",
                     view.len, (unsigned long long)max_message(r));
    } else {
        uint8_t *at = ring_reserve(r, (size_t)view.len);
        if (at) {
            memcpy(at, view.buf, (size_t)view.len);
            ring_commit(r, (size_t)view.len);
        }
        out = PyBool_FromLong(at != NULL);
    }
    PyBuffer_Release(&view);
    return out;
}

/* Encodes one frame straight into the ring (pack, copy in pieces, checksum) and publishes it.
 * Returns its size in bytes when sent, 0 no room (nothing written; r->want says how much is
 * needed), -1 error. */
static Py_ssize_t ring_put_frame(Ring *r, rmoe_frame_fields *f, rmoe_span *aux, rmoe_span *data) {
    size_t size;
    if (rmoe_frame_layout(f, aux->len, data->len, &size) < 0) return -1;
    if (size > max_message(r)) {
        PyErr_Format(MessageTooLarge, "frame of %zu bytes exceeds the link's limit of %llu bytes (half the ring)", size,
                     (unsigned long long)max_message(r));
        return -1;
    }
    uint8_t *dst = ring_reserve(r, size);
    if (!dst) {
        r->want = size;
        return 0;
    }
    _Atomic uint64_t *progress = NULL;
    if (size >= CUT_THROUGH) {
        progress = &r->ctrl->partial_done;
        atomic_store_explicit(progress, 0, memory_order_relaxed);
        atomic_store_explicit(&r->ctrl->partial_at, r->res_at, memory_order_release);
    }
    if (size >= BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        rmoe_frame_write(dst, f, aux->ptr, aux->len, data->ptr, data->len, f->dtype != 0, progress);
        Py_END_ALLOW_THREADS
    } else {
        rmoe_frame_write(dst, f, aux->ptr, aux->len, data->ptr, data->len, f->dtype != 0, progress);
    }
    if (progress) atomic_store_explicit(&r->ctrl->partial_at, NO_PARTIAL, memory_order_release);
    ring_commit(r, size);
    return (Py_ssize_t)size;
}

/* send_frame(kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape,
 *            aux, aux_len, data, data_len) -> int: packs, copies and checksums one frame straight
 * into the ring and publishes it (see frames.native_args); returns the frame's size, or 0 when the
 * ring has no room (nothing written; `want` says how much it needs). */
static PyObject *ring_send_frame(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 1) < 0) return NULL;
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "send_frame takes 15 arguments");
        return NULL;
    }
    rmoe_frame_fields f;
    if (rmoe_fields_from_args(args, &f) < 0) return NULL;
    rmoe_span aux, data;
    if (rmoe_span_get(args[11], args[12], &aux) < 0) return NULL;
    if (rmoe_span_get(args[13], args[14], &data) < 0) {
        rmoe_span_release(&aux);
        return NULL;
    }
    Py_ssize_t rc = ring_put_frame(r, &f, &aux, &data);
    rmoe_span_release(&aux);
    rmoe_span_release(&data);
    return rc < 0 ? NULL : PyLong_FromSsize_t(rc);
}

/* wait_space(nbytes, sockfd, spin_us, timeout_s) -> int: blocks (GIL released) until a message of
 * nbytes fits (0), the control socket is readable, i.e. a space token or the peer's death (1), or
 * the timeout passes (2). */
static PyObject *ring_wait_space(PyObject *self, PyObject *args) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 1) < 0) return NULL;
    Py_ssize_t n;
    int sockfd;
    double spin_us, timeout_s;
    if (!PyArg_ParseTuple(args, "nidd", &n, &sockfd, &spin_us, &timeout_s)) return NULL;
    if (n < 0 || (uint64_t)n > max_message(r)) {
        PyErr_Format(MessageTooLarge, "message of %zd bytes can never fit this ring", n);
        return NULL;
    }
    uint64_t skip, start = now_ns();
    uint64_t spin_end = start + (uint64_t)(spin_us * 1e3), deadline = start + (uint64_t)(timeout_s * 1e9);
    int result = 2;
    Py_BEGIN_ALLOW_THREADS
    /* Bounded: the spin ends at spin_end, each sleep at the deadline. */
    for (uint64_t t = start;; t = now_ns()) {
        if (ring_room(r, (size_t)n, &skip)) {
            result = 0;
            break;
        }
        if (t >= deadline) break;
        if (t < spin_end) {
            for (int i = 0; i < 16; i++) cpu_relax();
            continue;
        }
        atomic_store_explicit(&r->ctrl->producer_waiting, 1, memory_order_seq_cst);
        if (ring_room(r, (size_t)n, &skip)) {
            atomic_store_explicit(&r->ctrl->producer_waiting, 0, memory_order_relaxed);
            result = 0;
            break;
        }
        /* At most 50 ms per sleep: another thread of this process may drain the token first. */
        uint64_t left = deadline - t;
        int ms = (int)((left + 999999) / 1000000);
        struct pollfd p = {sockfd, POLLIN, 0};
        int ready = poll(&p, 1, ms > 50 ? 50 : ms);
        atomic_store_explicit(&r->ctrl->producer_waiting, 0, memory_order_relaxed);
        if (ring_room(r, (size_t)n, &skip)) {
            result = 0;
            break;
        }
        if (ready > 0) {
            result = 1;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

static PyObject *ring_recv(PyObject *self, PyObject *noargs) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 0) < 0) return NULL;
    uint8_t *msg;
    size_t len;
    int got = ring_next(r, &msg, &len);
    if (got < 0) return NULL;
    if (!got) Py_RETURN_NONE;
    return ring_view(r, msg, len);
}

/* recv_frame() -> tuple | str | None: the next message checked as a frame (fields, lengths,
 * checksum). A tuple as frame_parse gives, whose last item is a view of the frame in the ring;
 * a str names why the frame was rejected (the message is consumed either way). */
static PyObject *ring_recv_frame(PyObject *self, PyObject *noargs) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 0) < 0) return NULL;
    uint8_t *msg;
    size_t len;
    int got = ring_next(r, &msg, &len);
    if (got < 0) return NULL;
    if (!got) Py_RETURN_NONE;
    rmoe_frame_fields f;
    char err_buf[256];
    const char *err;
    uint32_t crc = 0;
    size_t crc_done = 0;
    if (r->pre_at == r->last_rec && r->pre_done <= len) { /* checked ahead while it was written */
        crc = r->pre_crc;
        crc_done = r->pre_done;
        r->ahead += crc_done;
    }
    r->pre_at = NO_PARTIAL;
    if (len - crc_done >= BIG_COPY) {
        Py_BEGIN_ALLOW_THREADS
        err = rmoe_frame_check(msg, len, &f, crc, crc_done, err_buf, sizeof err_buf);
        Py_END_ALLOW_THREADS
    } else {
        err = rmoe_frame_check(msg, len, &f, crc, crc_done, err_buf, sizeof err_buf);
    }
    if (err) return PyUnicode_FromString(err);
    PyObject *view = ring_view(r, msg, len);
    if (!view) return NULL;
    PyObject *out = rmoe_fields_tuple(&f, view);
    Py_DECREF(view);
    return out;
}

static PyObject *ring_release_py(PyObject *self, PyObject *noargs) {
    Ring *r = (Ring *)self;
    if (ring_check(r, 0) < 0) return NULL;
    ring_release(r);
    Py_RETURN_NONE;
}

static PyObject *ring_pending_py(PyObject *self, PyObject *noargs) {
    Ring *r = (Ring *)self;
    if (r->closed || r->producer) Py_RETURN_FALSE;
    return PyBool_FromLong(ring_pending(r));
}

static PyObject *ring_close(PyObject *self, PyObject *noargs) {
    /* The mapping stays until the last view is gone (dealloc); the fds are the caller's. */
    ((Ring *)self)->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *ring_get_int(PyObject *self, void *which) {
    Ring *r = (Ring *)self;
    switch ((intptr_t)which) {
        case 0: return PyLong_FromUnsignedLongLong(r->cap);
        case 1: return PyLong_FromUnsignedLongLong(max_message(r));
        case 2: return PyBool_FromLong(r->closed);
        case 3: return PyLong_FromUnsignedLongLong(r->doorbells);
        case 4: return PyLong_FromUnsignedLongLong(r->tokens);
        case 5: return PyBool_FromLong(r->producer);
        case 7: return PyLong_FromUnsignedLongLong(r->last_at);
        case 8: return PyLong_FromSize_t(r->want);
        case 9: return PyLong_FromUnsignedLongLong(r->ahead);
        default:
            return PyLong_FromUnsignedLongLong(r->producer ? r->head - atomic_load(&r->ctrl->tail)
                                                           : atomic_load(&r->ctrl->head) - r->released);
    }
}

static PyMethodDef ring_methods[] = {
    {"try_reserve", ring_try_reserve, METH_O,
     "try_reserve(n) -> memoryview | None: a writable, 64-byte aligned, contiguous n-byte slot, or None when "
     "the ring is full. Fill it, then commit()."},
    {"commit", ring_commit_py, METH_O, "commit(n): publish the first n bytes of the reserved slot as one message."},
    {"push", ring_push, METH_O, "push(data) -> bool: copy one message in and publish it; False when full."},
    {"send_frame", (PyCFunction)(void (*)(void))ring_send_frame, METH_FASTCALL,
     "send_frame(kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux, "
     "aux_len, data, data_len) -> int: encode one frame (frames.py layout, checksum included) straight into "
     "the ring and publish it; its size in bytes, 0 when full."},
    {"wait_space", ring_wait_space, METH_VARARGS,
     "wait_space(nbytes, sockfd, spin_us, timeout_s) -> int: 0 room, 1 control socket readable, 2 timeout."},
    {"recv", ring_recv, METH_NOARGS,
     "recv() -> memoryview | None: zero-copy view of the next message (valid until release())."},
    {"recv_frame", ring_recv_frame, METH_NOARGS,
     "recv_frame() -> tuple | str | None: the next message checked as a frame; str names a rejection."},
    {"release", ring_release_py, METH_NOARGS, "release(): free every message returned so far."},
    {"pending", ring_pending_py, METH_NOARGS, "pending() -> bool: an unread message is waiting."},
    {"close", ring_close, METH_NOARGS, "close(): refuse further use; the mapping lives while views do."},
    {NULL},
};

static PyGetSetDef ring_getset[] = {
    {"capacity", ring_get_int, NULL, "data bytes of the ring", (void *)0},
    {"max_message", ring_get_int, NULL, "largest message (bytes) the ring takes", (void *)1},
    {"closed", ring_get_int, NULL, "close() was called", (void *)2},
    {"doorbells", ring_get_int, NULL, "eventfd writes this producer made", (void *)3},
    {"tokens", ring_get_int, NULL, "space tokens this consumer sent", (void *)4},
    {"producer", ring_get_int, NULL, "True at the producing end", (void *)5},
    {"used", ring_get_int, NULL, "bytes published and not yet freed", (void *)6},
    {"want", ring_get_int, NULL, "size of the last frame refused for lack of room", (void *)8},
    {"checked_ahead", ring_get_int, NULL, "bytes this consumer checksummed while they were being written", (void *)9},
    {"last_offset", ring_get_int, NULL,
     "where the last message recv() returned starts in the data area (the same offset means the same memory)",
     (void *)7},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "resilient_moe._native.ShmRing",
    .tp_basicsize = sizeof(Ring),
    .tp_dealloc = ring_dealloc,
    .tp_as_buffer = &ring_buffer_procs,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ShmRing(fd, index, capacity, producer, notify_fd): one end of a single-producer/single-consumer "
              "ring in a shared segment made by shm_segment(). notify_fd is the consumer's doorbell eventfd at "
              "the producing end, the link's control socket at the consuming end; the caller owns both fds.",
    .tp_methods = ring_methods,
    .tp_getset = ring_getset,
    .tp_init = ring_init,
    .tp_new = ring_new,
};

/* ------------------------------------------------------------------ module functions */

static PyObject *py_shm_segment(PyObject *self, PyObject *arg) {
    unsigned long long cap = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (cap < MIN_CAPACITY || cap > MAX_CAPACITY || cap % CTRL_SIZE) {
        PyErr_Format(PyExc_ValueError, "ring capacity %llu is not a multiple of %u between %u and %llu", cap,
                     CTRL_SIZE, MIN_CAPACITY, (unsigned long long)MAX_CAPACITY);
        return NULL;
    }
    uint64_t stride = CTRL_SIZE + cap;
    int fd = memfd_create("rmoe-link", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    if (ftruncate(fd, (off_t)(2 * stride)) < 0) goto fail;
    for (int i = 0; i < 2; i++) {
        void *p = mmap(NULL, CTRL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(i * stride));
        if (p == MAP_FAILED) goto fail;
        struct ring_ctrl *c = p;
        c->magic = RING_MAGIC;
        c->version = RING_VERSION;
        c->capacity = cap;
        c->partial_at = NO_PARTIAL;
        munmap(p, CTRL_SIZE);
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) goto fail;
    return PyLong_FromLong(fd);
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    close(fd);
    return NULL;
}

static int scan_rings(Ring **rings, int n) {
    int any = 0;
    for (int i = 0; i < n && !any; i++) any = ring_pending(rings[i]);
    return any;
}

/* scan_rings, and a head start on the checksum of frames still being written. */
static int scan_and_preverify(Ring **rings, int n) {
    int any = 0;
    for (int i = 0; i < n; i++) {
        if (ring_pending(rings[i])) any = 1;
        else if (!rings[i]->closed) ring_preverify(rings[i]);
    }
    return any;
}

/* Drops the doorbell from ev (draining its counter); returns how many events are left. */
static int drop_doorbell(struct epoll_event *ev, int nev, int doorbell) {
    int kept = 0;
    for (int i = 0; i < nev; i++) {
        if (ev[i].data.fd == doorbell) {
            uint64_t count;
            ssize_t got = read(doorbell, &count, sizeof count); /* EAGAIN: already drained */
            (void)got;
        } else {
            ev[kept++] = ev[i];
        }
    }
    return kept;
}

static void set_sleeping(Ring **rings, int n, uint32_t value) {
    for (int i = 0; i < n; i++)
        atomic_store_explicit(&rings[i]->ctrl->consumer_sleeping, value,
                              value ? memory_order_seq_cst : memory_order_relaxed);
}

/* wait(epfd, doorbell_fd, rings, spin_us, timeout_s, check_fds) -> (ready, events)
 *
 * The poller's wait: returns as soon as one of `rings` (consumer ends) holds a message or an fd of
 * the epoll set other than the doorbell is ready. It checks once (the epoll set only if no ring
 * is ready or check_fds is true: the syscall stays off the path of a frame already there), then
 * spins over the rings with the GIL released for at most spin_us (looking at the epoll set every
 * few microseconds, so sockets are not starved), then sleeps in epoll_wait until timeout_s (< 0:
 * no limit). `ready` lists the indices of rings with messages, `events` (fd, epoll mask) pairs. */
static PyObject *py_wait(PyObject *self, PyObject *args) {
    int epfd, doorbell;
    PyObject *tuple;
    double spin_us, timeout_s;
    int check_fds = 1;
    if (!PyArg_ParseTuple(args, "iiO!dd|p", &epfd, &doorbell, &PyTuple_Type, &tuple, &spin_us, &timeout_s, &check_fds))
        return NULL;
    Py_ssize_t nt = PyTuple_GET_SIZE(tuple);
    if (nt > MAX_RINGS) {
        PyErr_Format(PyExc_ValueError, "a poller waits on at most %d rings", MAX_RINGS);
        return NULL;
    }
    Ring *stack[64];
    Ring **rings = nt <= 64 ? stack : PyMem_Malloc(sizeof(Ring *) * (size_t)nt);
    if (!rings) return PyErr_NoMemory();
    int n = 0;
    for (Py_ssize_t i = 0; i < nt; i++) {
        PyObject *o = PyTuple_GET_ITEM(tuple, i);
        if (!PyObject_TypeCheck(o, &RingType) || ((Ring *)o)->producer) {
            PyErr_SetString(PyExc_TypeError, "wait() takes the consuming ends of rings");
            if (rings != stack) PyMem_Free(rings);
            return NULL;
        }
        rings[n++] = (Ring *)o; /* a closed ring stays mapped while the tuple holds it */
    }
    struct epoll_event ev[MAX_EVENTS];
    int nev, err = 0;
    uint64_t start = now_ns();
    uint64_t spin_end = start + (uint64_t)(spin_us > 0 ? spin_us * 1e3 : 0);
    int forever = timeout_s < 0;
    uint64_t deadline = forever ? UINT64_MAX : start + (uint64_t)(timeout_s * 1e9);

    /* Step 1: anything there now? */
    int any = scan_rings(rings, n);
    nev = 0;
    if (!any || check_fds) {
        nev = epoll_wait(epfd, ev, MAX_EVENTS, 0);
        if (nev < 0) err = errno, nev = 0;
        nev = drop_doorbell(ev, nev, doorbell);
    }
    if (!any && nev == 0 && !err && timeout_s != 0) {
        Py_BEGIN_ALLOW_THREADS
        /* Step 2: spin, bounded by spin_end; only when there are rings to watch. */
        uint64_t last_poll = start;
        for (uint64_t t = now_ns(); n > 0 && t < spin_end && t < deadline; t = now_ns()) {
            for (int k = 0; k < 8; k++) cpu_relax();
            if ((any = scan_and_preverify(rings, n))) break;
            if (t - last_poll > 4000) {
                last_poll = t;
                nev = epoll_wait(epfd, ev, MAX_EVENTS, 0);
                if (nev < 0) {
                    err = errno;
                    break;
                }
                if ((nev = drop_doorbell(ev, nev, doorbell)) > 0) break;
            }
        }
        /* Step 3: sleep, after asking the producers to ring the doorbell. Each pass ends at an
         * event, a message or the deadline; a doorbell alone (message already taken) re-arms. */
        while (!any && nev == 0 && !err) {
            uint64_t t = now_ns();
            if (t >= deadline) break;
            set_sleeping(rings, n, 1);
            if ((any = scan_rings(rings, n))) break;
            uint64_t ms = forever ? 0 : (deadline - t + 999999) / 1000000;
            nev = epoll_wait(epfd, ev, MAX_EVENTS, forever ? -1 : (int)(ms > 3600000 ? 3600000 : ms));
            if (nev < 0) {
                if (errno != EINTR) err = errno;
                nev = 0;
                break; /* EINTR: back to Python, a signal handler may need to run */
            }
            nev = drop_doorbell(ev, nev, doorbell);
            any = scan_rings(rings, n);
        }
        set_sleeping(rings, n, 0);
        Py_END_ALLOW_THREADS
    }
    if (err) {
        if (rings != stack) PyMem_Free(rings);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *ready = PyList_New(0), *events = PyList_New(0);
    for (int i = 0; ready && i < n; i++) {
        if (ring_pending(rings[i])) {
            PyObject *idx = PyLong_FromLong(i);
            if (!idx || PyList_Append(ready, idx) < 0) Py_CLEAR(ready);
            Py_XDECREF(idx);
        }
    }
    for (int i = 0; events && i < nev; i++) {
        PyObject *pair = Py_BuildValue("(iI)", ev[i].data.fd, ev[i].events);
        if (!pair || PyList_Append(events, pair) < 0) Py_CLEAR(events);
        Py_XDECREF(pair);
    }
    if (rings != stack) PyMem_Free(rings);
    if (!ready || !events) {
        Py_XDECREF(ready);
        Py_XDECREF(events);
        return NULL;
    }
    if (PyErr_CheckSignals() < 0) {
        Py_DECREF(ready);
        Py_DECREF(events);
        return NULL;
    }
    return Py_BuildValue("(NN)", ready, events);
}

static PyMethodDef functions[] = {
    {"shm_segment", py_shm_segment, METH_O,
     "shm_segment(capacity) -> fd: a sealed memfd holding two empty rings of capacity bytes each."},
    {"wait", py_wait, METH_VARARGS,
     "wait(epfd, doorbell_fd, rings, spin_us, timeout_s, check_fds=True) -> (ready ring indices, [(fd, events)])."},
    {NULL},
};

int rmoe_shmring_register(PyObject *m) {
    if (PyType_Ready(&RingType) < 0) return -1;
    RingCorrupt = PyErr_NewExceptionWithDoc("resilient_moe._native.RingCorrupt",
                                            "A shared ring broke its own rules (peer bug or corruption).",
                                            PyExc_RuntimeError, NULL);
    MessageTooLarge = PyErr_NewExceptionWithDoc("resilient_moe._native.MessageTooLarge",
                                                "A message can never fit the ring (more than half of it).",
                                                PyExc_ValueError, NULL);
    if (!RingCorrupt || !MessageTooLarge) return -1;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "ShmRing", (PyObject *)&RingType) < 0) return -1;
    Py_INCREF(RingCorrupt);
    if (PyModule_AddObject(m, "RingCorrupt", RingCorrupt) < 0) return -1;
    Py_INCREF(MessageTooLarge);
    if (PyModule_AddObject(m, "MessageTooLarge", MessageTooLarge) < 0) return -1;
    if (PyModule_AddIntConstant(m, "RING_RECORD_HEADER", REC_HDR) < 0) return -1;
    if (PyModule_AddIntConstant(m, "RING_MIN_CAPACITY", MIN_CAPACITY) < 0) return -1;
    return PyModule_AddFunctions(m, functions);
}
