/* Shared declarations of the resilient_moe._native extension module. */
#ifndef RMOE_NATIVE_H
#define RMOE_NATIVE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* crc32c.c */
enum { RMOE_CRC_AUTO = 0, RMOE_CRC_SOFT = 1, RMOE_CRC_HW1 = 2, RMOE_CRC_HW3_TABLE = 3, RMOE_CRC_HW3_CLMUL = 4,
       RMOE_CRC_HYBRID = 5 };
void rmoe_crc32c_init(void);
uint32_t rmoe_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t rmoe_crc32c_with(int impl, uint32_t crc, const void *data, size_t n); /* tests pick a path */
const char *rmoe_crc32c_impl_name(void);

/* Frame codec (shmring.c). Mirrors the byte layout documented in resilient_moe/datapath/frames.py,
 * which stays the reference; tests/test_frames.py checks that both produce and accept the same bytes. */
#define RMOE_FRAME_HEADER 128
#define RMOE_FRAME_ALIGN 64
#define RMOE_FRAME_MAX_DIMS 4
#define RMOE_FRAME_CHECKSUM_OFFSET 80

typedef struct {
    uint8_t kind, flags, dtype, ndim;
    uint32_t sender;
    uint64_t incarnation, epoch, step, seq;
    uint16_t layer, micro_batch;
    uint32_t shape[RMOE_FRAME_MAX_DIMS];
    uint32_t aux_len, payload_len, checksum;
} rmoe_frame_fields;

/* Bytes of a whole frame with `aux_len` aux bytes and, when has_tensor, `data_len` tensor bytes. */
size_t rmoe_frame_size(size_t aux_len, size_t data_len, int has_tensor);
/* Writes header, aux, padding and tensor bytes to dst (rmoe_frame_size bytes) and seals the checksum.
 * f->aux_len / payload_len / checksum are set here. With `progress`, the count of bytes written
 * so far is published there (release) as the tensor is copied, so a reader may check them early. */
void rmoe_frame_write(uint8_t *dst, rmoe_frame_fields *f, const void *aux, size_t aux_len, const void *data,
                      size_t data_len, int has_tensor, _Atomic uint64_t *progress);
/* CRC-32C of frame bytes [from, to) chained from crc, the checksum field read as zero. */
uint32_t rmoe_frame_crc(uint32_t crc, const uint8_t *frame, size_t from, size_t to);
/* Checks the fixed header only (enough to know the frame's size), or a whole frame of `len` bytes
 * (fields, lengths, checksum). Return NULL and fill *f when good, else msg, filled with a message
 * naming the failed check. `crc_done` bytes of the frame were already checksummed into `crc`
 * (rmoe_frame_crc), so only the rest is read here. */
const char *rmoe_frame_check_header(const uint8_t *buf, size_t len, rmoe_frame_fields *f, char *msg,
                                    size_t msg_len);
const char *rmoe_frame_check(const uint8_t *buf, size_t len, rmoe_frame_fields *f, uint32_t crc, size_t crc_done,
                             char *msg, size_t msg_len);

/* Bytes written on a shm link's control socket (besides EOF, which means the peer is gone). */
#define RMOE_CTL_GOODBYE 'G' /* orderly close */
#define RMOE_CTL_SPACE 'S'   /* the consumer freed ring space a blocked producer waits for */

#ifdef Py_PYTHON_H
/* Bytes to send: None, a bytes-like object, or an address (int) with a separate length. */
typedef struct {
    void *ptr;
    size_t len;
    int held;
    Py_buffer view;
} rmoe_span;
int rmoe_span_get(PyObject *obj, PyObject *len_obj, rmoe_span *span);
void rmoe_span_release(rmoe_span *span);
/* args[0..10]: kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape. */
int rmoe_fields_from_args(PyObject *const *args, rmoe_frame_fields *f);
/* Checks that aux/data lengths fit the fields; sets *size to the whole frame's size. */
int rmoe_frame_layout(const rmoe_frame_fields *f, size_t aux_len, size_t data_len, size_t *size);
/* (kind, flags, sender, incarnation, epoch, step, seq, layer, micro_batch, dtype, shape, aux_len,
 *  payload_len, checksum, view) */
PyObject *rmoe_fields_tuple(const rmoe_frame_fields *f, PyObject *view);
/* shmring.c: adds ShmRing, RingCorrupt, shm_segment, wait to the module. */
int rmoe_shmring_register(PyObject *module);
#endif

#endif
