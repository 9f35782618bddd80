/* resilient_moe._native: the datapath's native pieces (frame checksum and codec, shared-memory
 * rings, the poller's wait). Built by the package's normal install (setup.py); nothing is compiled
 * at run time.
 *
 * The frame codec here mirrors the byte layout documented in resilient_moe/datapath/frames.py
 * (the one reference); it exists so that the hot path (pack + copy + checksum, check + view) runs
 * without Python-level struct work. tests/test_frames.py checks that both agree byte for byte. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "native.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "frames are little-endian and this codec writes them with plain stores"
#endif

/* ---------------------------------------------------------------- frame codec (see frames.py) */

static const char MAGIC[4] = {'R', 'M', 'O', 'E'};
#define FRAME_VERSION 2 /* 2: DISPATCH carries a row per token and its expert list (frames.py) */
#define MAX_KIND 9     /* FrameKind: 1..9 */
#define FLAGS_MASK 3u  /* FrameFlags: REPLAY | ERROR */
#define NUM_DTYPES 7   /* DType: 0..6 */
#define MAX_PAYLOAD (1ull << 31)
static const uint8_t dtype_size[NUM_DTYPES] = {0, 4, 2, 2, 4, 8, 1};
static const char *const dtype_name[NUM_DTYPES] = {"none", "float32", "bfloat16", "float16",
                                                    "int32", "int64", "uint8"};

static inline size_t tensor_offset(size_t aux_len) {
    return (RMOE_FRAME_HEADER + aux_len + RMOE_FRAME_ALIGN - 1) / RMOE_FRAME_ALIGN * RMOE_FRAME_ALIGN;
}

size_t rmoe_frame_size(size_t aux_len, size_t data_len, int has_tensor) {
    return has_tensor ? tensor_offset(aux_len) + data_len : RMOE_FRAME_HEADER + aux_len;
}

#define PUT(off, type, val)                 \
    do {                                    \
        type v_ = (type)(val);              \
        memcpy(dst + (off), &v_, sizeof v_); \
    } while (0)
#define GET(off, type, out) memcpy(&(out), buf + (off), sizeof(type))

static void write_header(uint8_t *dst, const rmoe_frame_fields *f) {
    memset(dst, 0, RMOE_FRAME_HEADER);
    memcpy(dst, MAGIC, 4);
    PUT(4, uint16_t, FRAME_VERSION);
    PUT(6, uint8_t, f->kind);
    PUT(7, uint8_t, f->flags);
    PUT(8, uint32_t, f->sender);
    PUT(16, uint64_t, f->incarnation);
    PUT(24, uint64_t, f->epoch);
    PUT(32, uint64_t, f->step);
    PUT(40, uint64_t, f->seq);
    PUT(48, uint16_t, f->layer);
    PUT(50, uint16_t, f->micro_batch);
    PUT(52, uint8_t, f->dtype);
    PUT(53, uint8_t, f->ndim);
    for (int i = 0; i < RMOE_FRAME_MAX_DIMS; i++) PUT(56 + 4 * i, uint32_t, i < f->ndim ? f->shape[i] : 0);
    PUT(72, uint32_t, f->aux_len);
    PUT(76, uint32_t, f->payload_len);
}

/* The tensor is copied in pieces small enough that the CRC reads each one back from L1. */
#define COPY_PIECE 16384

void rmoe_frame_write(uint8_t *dst, rmoe_frame_fields *f, const void *aux, size_t aux_len, const void *data,
                      size_t data_len, int has_tensor, _Atomic uint64_t *progress) {
    size_t size = rmoe_frame_size(aux_len, data_len, has_tensor);
    f->aux_len = (uint32_t)aux_len;
    f->payload_len = (uint32_t)(size - RMOE_FRAME_HEADER);
    write_header(dst, f);
    if (aux_len) memcpy(dst + RMOE_FRAME_HEADER, aux, aux_len);
    size_t off = has_tensor ? tensor_offset(aux_len) : size;
    if (has_tensor) memset(dst + RMOE_FRAME_HEADER + aux_len, 0, off - RMOE_FRAME_HEADER - aux_len);
    uint32_t crc = rmoe_crc32c(0, dst, off);
    if (progress) atomic_store_explicit(progress, off, memory_order_release);
    for (size_t at = 0; at < data_len; at += COPY_PIECE) {
        size_t len = data_len - at < COPY_PIECE ? data_len - at : COPY_PIECE;
        memcpy(dst + off + at, (const uint8_t *)data + at, len);
        crc = rmoe_crc32c(crc, dst + off + at, len);
        if (progress) atomic_store_explicit(progress, off + at + len, memory_order_release);
    }
    f->checksum = crc;
    PUT(RMOE_FRAME_CHECKSUM_OFFSET, uint32_t, f->checksum);
}

uint32_t rmoe_frame_crc(uint32_t crc, const uint8_t *frame, size_t from, size_t to) {
    static const uint8_t zero[4] = {0};
    const size_t field = RMOE_FRAME_CHECKSUM_OFFSET, field_end = field + 4;
    if (from < field && from < to) {
        size_t end = to < field ? to : field;
        crc = rmoe_crc32c(crc, frame + from, end - from);
        from = end;
    }
    if (from < field_end && from < to) {
        size_t end = to < field_end ? to : field_end;
        crc = rmoe_crc32c(crc, zero, end - from);
        from = end;
    }
    if (from < to) crc = rmoe_crc32c(crc, frame + from, to - from);
    return crc;
}

const char *rmoe_frame_check_header(const uint8_t *buf, size_t len, rmoe_frame_fields *f, char *msg,
                                    size_t msg_len) {
    if (len < RMOE_FRAME_HEADER) {
        snprintf(msg, msg_len, "truncated frame: %zu bytes, a header needs %d", len, RMOE_FRAME_HEADER);
        return msg;
    }
    if (memcmp(buf, MAGIC, 4) != 0) {
        snprintf(msg, msg_len, "bad magic %02x%02x%02x%02x (expected b'RMOE')", buf[0], buf[1], buf[2], buf[3]);
        return msg;
    }
    uint16_t version;
    GET(4, uint16_t, version);
    if (version != FRAME_VERSION) {
        snprintf(msg, msg_len, "unsupported frame version %u (this build speaks %d)", version, FRAME_VERSION);
        return msg;
    }
    f->kind = buf[6];
    f->flags = buf[7];
    f->dtype = buf[52];
    f->ndim = buf[53];
    if (f->kind < 1 || f->kind > MAX_KIND) {
        snprintf(msg, msg_len, "bad frame field: %u is not a valid FrameKind", f->kind);
        return msg;
    }
    if (f->dtype >= NUM_DTYPES) {
        snprintf(msg, msg_len, "bad frame field: %u is not a valid DType", f->dtype);
        return msg;
    }
    if (f->flags & ~FLAGS_MASK) {
        snprintf(msg, msg_len, "unknown frame flags %#x", f->flags);
        return msg;
    }
    if (f->ndim > RMOE_FRAME_MAX_DIMS) {
        snprintf(msg, msg_len, "frame has %u dims (at most %d)", f->ndim, RMOE_FRAME_MAX_DIMS);
        return msg;
    }
    GET(8, uint32_t, f->sender);
    GET(16, uint64_t, f->incarnation);
    GET(24, uint64_t, f->epoch);
    GET(32, uint64_t, f->step);
    GET(40, uint64_t, f->seq);
    GET(48, uint16_t, f->layer);
    GET(50, uint16_t, f->micro_batch);
    for (int i = 0; i < RMOE_FRAME_MAX_DIMS; i++) GET(56 + 4 * i, uint32_t, f->shape[i]);
    GET(72, uint32_t, f->aux_len);
    GET(76, uint32_t, f->payload_len);
    GET(RMOE_FRAME_CHECKSUM_OFFSET, uint32_t, f->checksum);
    if (f->payload_len > MAX_PAYLOAD || f->aux_len > f->payload_len || f->aux_len % 4) {
        snprintf(msg, msg_len, "inconsistent lengths: aux %u, payload %u", f->aux_len, f->payload_len);
        return msg;
    }
    if (f->dtype == 0 && (f->ndim != 0 || f->payload_len != f->aux_len)) {
        snprintf(msg, msg_len, "frame without a tensor has %u dims and %u payload bytes beyond aux", f->ndim,
                 f->payload_len - f->aux_len);
        return msg;
    }
    return NULL;
}

const char *rmoe_frame_check(const uint8_t *buf, size_t len, rmoe_frame_fields *f, uint32_t crc, size_t crc_done,
                             char *msg, size_t msg_len) {
    const char *err = rmoe_frame_check_header(buf, len, f, msg, msg_len);
    if (err) return err;
    size_t size = RMOE_FRAME_HEADER + (size_t)f->payload_len;
    if (len != size) {
        snprintf(msg, msg_len, "frame length %zu does not match its header (%zu)", len, size);
        return msg;
    }
    if (crc_done > size) crc = 0, crc_done = 0;
    crc = rmoe_frame_crc(crc, buf, crc_done, size);
    if (crc != f->checksum) {
        snprintf(msg, msg_len, "checksum mismatch (header says %#010x, payload gives %#010x)", f->checksum, crc);
        return msg;
    }
    if (f->dtype != 0) {
        size_t off = tensor_offset(f->aux_len);
        uint64_t count = 1;
        int overflow = 0;
        for (int i = 0; i < f->ndim; i++) overflow |= __builtin_mul_overflow(count, (uint64_t)f->shape[i], &count);
        uint64_t nbytes = 0;
        overflow |= __builtin_mul_overflow(count, (uint64_t)dtype_size[f->dtype], &nbytes);
        if (overflow || off + nbytes != size) {
            char dims[64];
            size_t at = 0;
            dims[0] = 0;
            for (int i = 0; i < f->ndim && at < sizeof dims; i++)
                at += (size_t)snprintf(dims + at, sizeof dims - at, i ? ", %u" : "%u", f->shape[i]);
            snprintf(msg, msg_len, "tensor of shape [%s] and dtype %s needs %llu bytes at offset %zu, frame has %zd",
                     dims, dtype_name[f->dtype], (unsigned long long)nbytes, off, (ssize_t)size - (ssize_t)off);
            return msg;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------------- Python glue shared with shmring.c */

int rmoe_span_get(PyObject *obj, PyObject *len_obj, rmoe_span *span) {
    span->ptr = NULL;
    span->len = 0;
    span->held = 0;
    if (obj == Py_None) return 0;
    if (PyLong_Check(obj)) {
        /* A raw address (torch's Tensor.data_ptr()); the caller keeps its owner alive for the call. */
        span->ptr = PyLong_AsVoidPtr(obj);
        if (PyErr_Occurred()) return -1;
        Py_ssize_t n = PyLong_AsSsize_t(len_obj);
        if (n < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a data length must be >= 0");
            return -1;
        }
        if (n && !span->ptr) {
            PyErr_SetString(PyExc_ValueError, "null data pointer");
            return -1;
        }
        span->len = (size_t)n;
        return 0;
    }
    if (PyObject_GetBuffer(obj, &span->view, PyBUF_SIMPLE) < 0) return -1;
    span->held = 1;
    span->ptr = span->view.buf;
    span->len = (size_t)span->view.len;
    return 0;
}

void rmoe_span_release(rmoe_span *span) {
    if (span->held) PyBuffer_Release(&span->view);
    span->held = 0;
}

static int get_uint(PyObject *o, unsigned long long max, const char *name, unsigned long long *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "frame field %s=%R is not an unsigned integer up to %llu", name, o, max);
        return -1;
    }
    if (v > max) {
        PyErr_Format(PyExc_ValueError, "frame field %s=%llu exceeds %llu", name, v, max);
        return -1;
    }
    *out = v;
    return 0;
}

int rmoe_fields_from_args(PyObject *const *args, rmoe_frame_fields *f) {
    static const char *names[] = {"kind", "flags", "sender", "incarnation", "epoch", "step",
                                  "seq", "layer", "micro_batch", "dtype"};
    static const unsigned long long max[] = {255, 255, UINT32_MAX, UINT64_MAX, UINT64_MAX, UINT64_MAX,
                                             UINT64_MAX, UINT16_MAX, UINT16_MAX, NUM_DTYPES - 1};
    unsigned long long v[10];
    for (int i = 0; i < 10; i++)
        if (get_uint(args[i], max[i], names[i], &v[i]) < 0) return -1;
    memset(f, 0, sizeof *f);
    f->kind = (uint8_t)v[0];
    f->flags = (uint8_t)v[1];
    f->sender = (uint32_t)v[2];
    f->incarnation = v[3];
    f->epoch = v[4];
    f->step = v[5];
    f->seq = v[6];
    f->layer = (uint16_t)v[7];
    f->micro_batch = (uint16_t)v[8];
    f->dtype = (uint8_t)v[9];
    PyObject *shape = args[10];
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) > RMOE_FRAME_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "frame shape must be a tuple of at most %d dims, got %R",
                     RMOE_FRAME_MAX_DIMS, shape);
        return -1;
    }
    f->ndim = (uint8_t)PyTuple_GET_SIZE(shape);
    for (int i = 0; i < f->ndim; i++) {
        unsigned long long d;
        if (get_uint(PyTuple_GET_ITEM(shape, i), UINT32_MAX, "shape", &d) < 0) return -1;
        f->shape[i] = (uint32_t)d;
    }
    return 0;
}

int rmoe_frame_layout(const rmoe_frame_fields *f, size_t aux_len, size_t data_len, size_t *size) {
    if (aux_len % 4) {
        PyErr_Format(PyExc_ValueError, "aux section of %zu bytes is not a whole number of int32", aux_len);
        return -1;
    }
    int has_tensor = f->dtype != 0;
    if (!has_tensor && (data_len || f->ndim)) {
        PyErr_SetString(PyExc_ValueError, "tensor bytes or a shape given with dtype NONE");
        return -1;
    }
    if (has_tensor) {
        uint64_t count = 1, nbytes = 0;
        int overflow = 0;
        for (int i = 0; i < f->ndim; i++) overflow |= __builtin_mul_overflow(count, (uint64_t)f->shape[i], &count);
        overflow |= __builtin_mul_overflow(count, (uint64_t)dtype_size[f->dtype], &nbytes);
        if (overflow || nbytes != data_len) {
            PyErr_Format(PyExc_ValueError, "tensor of %zu bytes does not match its shape and dtype %s", data_len,
                         dtype_name[f->dtype]);
            return -1;
        }
    }
    *size = rmoe_frame_size(aux_len, data_len, has_tensor);
    if (*size - RMOE_FRAME_HEADER > MAX_PAYLOAD) {
        PyErr_Format(PyExc_ValueError, "frame payload of %zu bytes exceeds the format's limit", *size);
        return -1;
    }
    return 0;
}

PyObject *rmoe_fields_tuple(const rmoe_frame_fields *f, PyObject *view) {
    PyObject *shape = PyTuple_New(f->ndim);
    if (!shape) return NULL;
    for (int i = 0; i < f->ndim; i++) {
        PyObject *d = PyLong_FromUnsignedLong(f->shape[i]);
        if (!d) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, d);
    }
    return Py_BuildValue("(iiIKKKKiiiNIIIO)", f->kind, f->flags, f->sender, (unsigned long long)f->incarnation,
                         (unsigned long long)f->epoch, (unsigned long long)f->step, (unsigned long long)f->seq,
                         f->layer, f->micro_batch, f->dtype, shape, f->aux_len, f->payload_len, f->checksum, view);
}

/* ---------------------------------------------------------------- module functions */

static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    Py_buffer view;
    unsigned int crc = 0;
    int impl = RMOE_CRC_AUTO;
    if (!PyArg_ParseTuple(args, "y*|Ii", &view, &crc, &impl)) return NULL;
    uint32_t out;
    if (view.len >= (1 << 16)) {
        Py_BEGIN_ALLOW_THREADS
        out = rmoe_crc32c_with(impl, crc, view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
    } else {
        out = rmoe_crc32c_with(impl, crc, view.buf, (size_t)view.len);
    }
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(out);
}

static PyObject *py_crc32c_impl(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(rmoe_crc32c_impl_name());
}

/* frame_prefix(kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape,
 *              aux, aux_len, data, data_len) -> bytes: header + aux + padding, sealed with the
 * checksum of the whole frame (data included). With the data sent after it (sendmsg), that is the
 * frame's byte stream without copying the tensor. */
static PyObject *py_frame_prefix(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 15) {
        PyErr_SetString(PyExc_TypeError, "frame_prefix takes 15 arguments");
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
    PyObject *out = NULL;
    size_t size;
    if (rmoe_frame_layout(&f, aux.len, data.len, &size) == 0) {
        size_t prefix = size - data.len;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)prefix);
        if (out) {
            uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
            /* The header is sealed as if the data followed it in place: checksum the prefix, then
             * chain over the data where it lies. */
            int has_tensor = f.dtype != 0;
            f.aux_len = (uint32_t)aux.len;
            f.payload_len = (uint32_t)(size - RMOE_FRAME_HEADER);
            write_header(dst, &f);
            if (aux.len) memcpy(dst + RMOE_FRAME_HEADER, aux.ptr, aux.len);
            if (has_tensor) memset(dst + RMOE_FRAME_HEADER + aux.len, 0, prefix - RMOE_FRAME_HEADER - aux.len);
            uint32_t crc = rmoe_crc32c(0, dst, prefix);
            if (data.len >= (1 << 18)) {
                Py_BEGIN_ALLOW_THREADS
                crc = rmoe_crc32c(crc, data.ptr, data.len);
                Py_END_ALLOW_THREADS
            } else if (data.len) {
                crc = rmoe_crc32c(crc, data.ptr, data.len);
            }
            memcpy(dst + RMOE_FRAME_CHECKSUM_OFFSET, &crc, 4);
        }
    }
    rmoe_span_release(&aux);
    rmoe_span_release(&data);
    return out;
}

/* frame_header(buf) -> int | str: checks the fixed header at the start of buf (at least 128 bytes)
 * and returns the whole frame's size, or a message naming the failed check. */
static PyObject *py_frame_header(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    rmoe_frame_fields f;
    char msg[256];
    const char *err = rmoe_frame_check_header(view.buf, (size_t)view.len, &f, msg, sizeof msg);
    PyBuffer_Release(&view);
    if (err) return PyUnicode_FromString(err);
    return PyLong_FromSize_t(RMOE_FRAME_HEADER + (size_t)f.payload_len);
}

/* frame_parse(buf) -> tuple | str: checks a whole frame (every field, lengths, checksum). Returns
 * (kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux_len,
 * payload_len, checksum, buf) or a message naming the failed check. */
static PyObject *py_frame_parse(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    rmoe_frame_fields f;
    char msg[256];
    const char *err;
    if (view.len >= (1 << 18)) {
        Py_BEGIN_ALLOW_THREADS
        err = rmoe_frame_check(view.buf, (size_t)view.len, &f, 0, 0, msg, sizeof msg);
        Py_END_ALLOW_THREADS
    } else {
        err = rmoe_frame_check(view.buf, (size_t)view.len, &f, 0, 0, msg, sizeof msg);
    }
    PyBuffer_Release(&view);
    if (err) return PyUnicode_FromString(err);
    return rmoe_fields_tuple(&f, arg);
}

/* drain_control(fd) -> int: reads every pending message on a link's control socket without
 * blocking; returns CONTROL_* bits (peer gone, goodbye received, space token received). */
static PyObject *py_drain_control(PyObject *self, PyObject *arg) {
    int fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    int state = 0;
    for (int i = 0; i < 256; i++) {
        char buf[64];
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) {
            for (ssize_t k = 0; k < n; k++) state |= buf[k] == RMOE_CTL_GOODBYE ? 2 : buf[k] == RMOE_CTL_SPACE ? 4 : 0;
            continue;
        }
        if (n == 0) state |= 1;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) state |= 1;
        break;
    }
    return PyLong_FromLong(state);
}

/* ---------------------------------------------------------------- Buffer: aligned or borrowed bytes */

typedef struct {
    PyObject_HEAD
    void *ptr;
    Py_ssize_t len;
    PyObject *owner; /* keeps borrowed memory alive; NULL when ptr is ours */
} BufferObject;

static int buffer_getbuffer(PyObject *o, Py_buffer *view, int flags) {
    BufferObject *b = (BufferObject *)o;
    return PyBuffer_FillInfo(view, o, b->ptr, b->len, 0, flags);
}

static void buffer_dealloc(PyObject *o) {
    BufferObject *b = (BufferObject *)o;
    if (b->owner) Py_DECREF(b->owner);
    else free(b->ptr);
    Py_TYPE(o)->tp_free(o);
}

static PyObject *buffer_len(PyObject *o, void *closure) { return PyLong_FromSsize_t(((BufferObject *)o)->len); }

static PyBufferProcs buffer_procs = {buffer_getbuffer, NULL};
static PyGetSetDef buffer_getset[] = {{"nbytes", buffer_len, NULL, "size in bytes", NULL}, {NULL}};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "resilient_moe._native.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = buffer_dealloc,
    .tp_as_buffer = &buffer_procs,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Writable bytes exported through the buffer protocol: 64-byte aligned memory of our own "
              "(alloc) or memory borrowed from an owner kept alive (wrap).",
    .tp_getset = buffer_getset,
};

static PyObject *py_alloc(PyObject *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "alloc size must be >= 0");
        return NULL;
    }
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (size_t)n : 64) != 0) return PyErr_NoMemory();
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (!b) {
        free(p);
        return NULL;
    }
    b->ptr = p;
    b->len = n;
    b->owner = NULL;
    return (PyObject *)b;
}

static PyObject *py_wrap(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "wrap(owner, address, nbytes)");
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (n < 0 || (n && !p)) {
        PyErr_SetString(PyExc_ValueError, "wrap needs a non-null address and a size >= 0");
        return NULL;
    }
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (!b) return NULL;
    b->ptr = p;
    b->len = n;
    Py_INCREF(args[0]);
    b->owner = args[0];
    return (PyObject *)b;
}

static PyMethodDef methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS,
     "crc32c(data, crc=0, impl=0) -> int: CRC-32C of a bytes-like object, chained from a previous value. "
     "impl picks a code path for tests (0 auto, 1 software, 2 one hardware stream, 3/4 three streams "
     "joined by tables/PCLMUL); every path gives the same value."},
    {"crc32c_impl", py_crc32c_impl, METH_NOARGS, "crc32c_impl() -> str: the path crc32c takes on this CPU."},
    {"frame_prefix", (PyCFunction)(void (*)(void))py_frame_prefix, METH_FASTCALL,
     "frame_prefix(kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux, "
     "aux_len, data, data_len) -> bytes: header + aux + padding of a frame whose tensor bytes follow, sealed "
     "with the whole frame's checksum. aux and data are None, a bytes-like object, or an address (int) with "
     "its length."},
    {"frame_header", py_frame_header, METH_O,
     "frame_header(buf) -> int | str: size of the frame whose header starts buf, or why the header is bad."},
    {"frame_parse", py_frame_parse, METH_O,
     "frame_parse(buf) -> tuple | str: header fields of the whole frame in buf (checksum verified) plus buf, "
     "or why it is rejected."},
    {"drain_control", py_drain_control, METH_O,
     "drain_control(fd) -> int: drain a link control socket; bit 1 peer gone, 2 goodbye, 4 space token."},
    {"alloc", py_alloc, METH_O, "alloc(n) -> Buffer: n uninitialised bytes, 64-byte aligned."},
    {"wrap", (PyCFunction)(void (*)(void))py_wrap, METH_FASTCALL,
     "wrap(owner, address, nbytes) -> Buffer: exports nbytes at address (e.g. a tensor's data_ptr()) and "
     "keeps owner alive while any view of it lives."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = "Native datapath pieces.", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__native(void) {
    rmoe_crc32c_init();
    if (PyType_Ready(&BufferType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&BufferType);
    if (PyModule_AddObject(m, "Buffer", (PyObject *)&BufferType) < 0 || rmoe_shmring_register(m) < 0 ||
        PyModule_AddIntConstant(m, "FRAME_HEADER", RMOE_FRAME_HEADER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
