/* The locally connected layer's three products on a CPU, as C kernels that XLA calls through its
 * FFI (uspsjax/kernels.py compiles this file for the machine at hand and registers them).
 *
 * Each is a product per position g, C[g] = A[g] . B[g], B and C row-major, A read through two
 * strides, so that one routine serves the forward (patches . kernel), the kernel gradient
 * (patches^T . g) and the patch gradient (kernel . g^T, written batch-innermost). Leading axes
 * (positions, a population's members) are all positions to it.
 *
 * Each position is computed by one thread, in one fixed order, whatever the number of threads,
 * positions or members: results are the same bit for bit on the same machine and build. A
 * position's weights are used by only a few rows, so a product waits on their first read from
 * memory; the next position's are prefetched while the current one is computed
 * (results/bench/NOTES.md §29).
 */
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "xla/ffi/api/c_api.h"

#ifdef __AVX512F__
#define VW 16    /* floats in a vector register */
#define ACC 24   /* accumulator registers a tile may use (of 32) */
#define WIDEST 4 /* vectors of B a tile may hold beside them */
#else
#define VW 8
#define ACC 12 /* of 16 */
#define WIDEST 2
#endif
#define MAX_ROWS 12
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));

/* One product: C[g] (m x n) = A[g] (m x k) . B[g] (k x n) for g < groups, A[i, j] at
 * a[i * a_row + j * a_step]; B[g] given transposed, (n x k), where `transpose_b`. The next
 * position's A (`prefetch_a`) or B, the weights, is prefetched. */
typedef struct {
  const float *a, *b;
  float *c;
  int64_t groups, m, k, n, a_row, a_step;
  int transpose_b, prefetch_a;
} product;

/* rows x nv vectors of C from A's rows at `a` and B's columns at `b`; `pf` names `pf_lines`
 * cache lines to fetch into L2 while this tile runs. */
static inline __attribute__((always_inline)) void tile(
    int rows, int nv, const float *a, int64_t a_row, int64_t a_step, const float *b, int64_t ldb,
    float *c, int64_t ldc, int64_t k, const char *pf, int64_t pf_lines) {
  vf acc[MAX_ROWS][WIDEST];
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < nv; v++) acc[r][v] = (vf){0};
  for (int64_t j = 0; j < k; j++) {
    if (pf) __builtin_prefetch(pf + 64 * ((j * pf_lines) / k), 0, 2);
    vf bv[WIDEST];
    for (int v = 0; v < nv; v++) bv[v] = *(const vf *)(b + j * ldb + v * VW);
    for (int r = 0; r < rows; r++) {
      const float s = a[r * a_row + j * a_step];
      for (int v = 0; v < nv; v++) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < nv; v++) *(vf *)(c + r * ldc + v * VW) = acc[r][v];
}

/* The tile for each row count and vector count, compiled with both fixed. */
typedef void tile_fn(const float *, int64_t, int64_t, const float *, int64_t, float *, int64_t,
                     int64_t, const char *, int64_t);
#define TILE(R, NV)                                                                             \
  static void tile_##R##_##NV(const float *a, int64_t ar, int64_t as, const float *b,          \
                              int64_t ldb, float *c, int64_t ldc, int64_t k, const char *pf,   \
                              int64_t pl) {                                                     \
    tile(R, NV, a, ar, as, b, ldb, c, ldc, k, pf, pl);                                          \
  }
#define TILES(NV)                                                                               \
  TILE(1, NV) TILE(2, NV) TILE(3, NV) TILE(4, NV) TILE(5, NV) TILE(6, NV) TILE(7, NV)          \
  TILE(8, NV) TILE(9, NV) TILE(10, NV) TILE(11, NV) TILE(12, NV)
#define ROW(NV)                                                                                 \
  {NULL, tile_1_##NV, tile_2_##NV, tile_3_##NV, tile_4_##NV, tile_5_##NV, tile_6_##NV,          \
   tile_7_##NV, tile_8_##NV, tile_9_##NV, tile_10_##NV, tile_11_##NV, tile_12_##NV}
TILES(1) TILES(2)
#if WIDEST >= 4
TILES(4)
static tile_fn *const TILE_TABLE[3][MAX_ROWS + 1] = {ROW(1), ROW(2), ROW(4)};
#else
static tile_fn *const TILE_TABLE[2][MAX_ROWS + 1] = {ROW(1), ROW(2)};
#endif

/* Position g of `p`; `scratch` holds k x n floats where B comes transposed. */
static void position(const product *p, int64_t g, float *scratch) {
  const int64_t m = p->m, k = p->k, n = p->n;
  const float *a = p->a + g * m * k, *b = p->b + g * k * n;
  float *c = p->c + g * m * n;
  if (p->transpose_b) { /* b holds (n, k) */
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = 0; j < k; j++) scratch[j * n + i] = b[i * k + j];
    b = scratch;
  }
  const int64_t vectors = n / VW;
  const int nv = (WIDEST >= 4 && vectors % 4 == 0) ? 4 : (vectors % 2 == 0 ? 2 : 1);
  const int width = nv * VW;
  const int rows = ACC / nv < MAX_ROWS ? ACC / nv : MAX_ROWS;
  const int64_t tiles = (n / width) * ((m + rows - 1) / rows);
  const int64_t weights = p->prefetch_a ? m * k : k * n; /* floats */
  const char *next = g + 1 < p->groups
      ? (const char *)((p->prefetch_a ? p->a : p->b) + (g + 1) * weights) : NULL;
  const int64_t pf_lines = (weights * 4 / 64 + tiles - 1) / tiles;
  tile_fn *const *table = TILE_TABLE[nv == 4 ? 2 : nv - 1];
  int64_t t = 0;
  for (int64_t j = 0; j < n; j += width)
    for (int64_t i = 0; i < m; i += rows, t++) {
      const int r = m - i < rows ? (int)(m - i) : rows;
      table[r](a + i * p->a_row, p->a_row, p->a_step, b + j, n, c + i * n + j, n, k,
               next ? next + t * pf_lines * 64 : NULL, pf_lines);
    }
}

/* A product shared by the threads of XLA's pool: each claims positions in turn. Held by the
 * caller and by every task scheduled; the last to let go frees it (a task may start after the
 * call has returned, finds nothing left to claim, and touches no buffer). */
typedef struct {
  product p;
  int64_t chunk;
  atomic_int_fast64_t next, done;
  atomic_int holders;
} job;

static void release(job *j) {
  if (atomic_fetch_sub(&j->holders, 1) == 1) free(j);
}

static void work(void *data) {
  job *j = data;
  float *scratch = j->p.transpose_b ? malloc(sizeof(float) * j->p.k * j->p.n) : NULL;
  for (;;) {
    const int64_t start = atomic_fetch_add(&j->next, j->chunk);
    if (start >= j->p.groups) break;
    const int64_t end = start + j->chunk < j->p.groups ? start + j->chunk : j->p.groups;
    for (int64_t g = start; g < end; g++) position(&j->p, g, scratch);
    atomic_fetch_add(&j->done, end - start);
  }
  free(scratch);
  release(j);
}

static void ignore(const XLA_FFI_Api *api, XLA_FFI_Error *err) {
  XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
  api->XLA_FFI_Error_Destroy(&destroy);
}

/* Runs `p` on the caller's thread and on as many of XLA's pool as are free. */
static void run(const XLA_FFI_Api *api, XLA_FFI_ExecutionContext *ctx, product p) {
  int64_t threads = 1;
  XLA_FFI_ThreadPool_NumThreads_Args count = {XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE,
                                              NULL, ctx, &threads};
  XLA_FFI_Error *err = api->XLA_FFI_ThreadPool_NumThreads(&count);
  if (err != NULL) ignore(api, err), threads = 1;
  job *j = malloc(sizeof(job));
  j->p = p;
  /* Chunks of a few positions, so that a thread that starts late still takes its share. */
  j->chunk = p.groups / (4 * (threads > 1 ? threads : 1));
  if (j->chunk < 1) j->chunk = 1;
  atomic_init(&j->next, 0);
  atomic_init(&j->done, 0);
  atomic_init(&j->holders, 2); /* the caller's turn at the work, and its wait below */
  for (int64_t t = 1; t < threads; t++) {
    atomic_fetch_add(&j->holders, 1);
    XLA_FFI_ThreadPool_Schedule_Args task = {XLA_FFI_ThreadPool_Schedule_Args_STRUCT_SIZE, NULL,
                                             ctx, work, j};
    if ((err = api->XLA_FFI_ThreadPool_Schedule(&task)) != NULL) {
      ignore(api, err);
      atomic_fetch_sub(&j->holders, 1);
      break;
    }
  }
  work(j);
  while (atomic_load(&j->done) < p.groups) sched_yield();
  release(j);
}

static XLA_FFI_Error *error(const XLA_FFI_Api *api, const char *message) {
  XLA_FFI_Error_Create_Args args = {XLA_FFI_Error_Create_Args_STRUCT_SIZE, NULL, message,
                                    XLA_FFI_Error_Code_INVALID_ARGUMENT};
  return api->XLA_FFI_Error_Create(&args);
}

/* The metadata query XLA makes when a handler is registered: answers it and returns 1; 0 when
 * `frame` is a call. */
static int metadata(XLA_FFI_CallFrame *frame) {
  XLA_FFI_Extension_Base *ext = frame->extension_start;
  if (ext == NULL || ext->type != XLA_FFI_Extension_Metadata) return 0;
  XLA_FFI_Metadata *meta = ((XLA_FFI_Metadata_Extension *)ext)->metadata;
  meta->api_version = (XLA_FFI_Api_Version){XLA_FFI_Api_Version_STRUCT_SIZE, NULL,
                                            XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR};
  meta->traits = 0;
  return 1;
}

/* A float32 buffer's last two dimensions, and the product of the others into d[0]. */
static int dims(XLA_FFI_Buffer *buf, int64_t d[3]) {
  if (buf->dtype != XLA_FFI_DataType_F32 || buf->rank < 3) return 0;
  d[0] = 1;
  for (int64_t i = 0; i < buf->rank - 2; i++) d[0] *= buf->dims[i];
  d[1] = buf->dims[buf->rank - 2], d[2] = buf->dims[buf->rank - 1];
  return 1;
}

enum { FORWARD, KERNEL_GRAD, PATCH_GRAD };

/* One call of `kind`: the operands' shapes checked, the product run. */
static XLA_FFI_Error *call(XLA_FFI_CallFrame *frame, int kind) {
  if (metadata(frame)) return NULL;
  if (frame->args.size != 2 || frame->rets.size != 1 ||
      frame->args.types[0] != XLA_FFI_ArgType_BUFFER ||
      frame->args.types[1] != XLA_FFI_ArgType_BUFFER ||
      frame->rets.types[0] != XLA_FFI_RetType_BUFFER)
    return error(frame->api, "uspsjax kernels: two buffers in and one out expected");
  XLA_FFI_Buffer *x = frame->args.args[0], *y = frame->args.args[1], *out = frame->rets.rets[0];
  int64_t s[3][3];
  if (!dims(x, s[0]) || !dims(y, s[1]) || !dims(out, s[2]))
    return error(frame->api, "uspsjax kernels: float32 operands of rank 3 or more expected");
  product p = {x->data, y->data, out->data, s[0][0], 0, 0, 0, 0, 0, 0, 0};
  int ok = s[1][0] == s[0][0] && s[2][0] == s[0][0];
  if (kind == FORWARD) { /* patches (G, M, K) . kernel (G, K, N) -> (G, M, N) */
    ok = ok && s[1][1] == s[0][2] && s[2][1] == s[0][1] && s[2][2] == s[1][2];
    p.m = s[0][1], p.k = s[0][2], p.n = s[1][2], p.a_row = s[0][2], p.a_step = 1;
  } else if (kind == KERNEL_GRAD) { /* patches (G, M, K)^T . g (G, M, N) -> (G, K, N) */
    ok = ok && s[1][1] == s[0][1] && s[2][1] == s[0][2] && s[2][2] == s[1][2];
    p.m = s[0][2], p.k = s[0][1], p.n = s[1][2], p.a_row = 1, p.a_step = s[0][2];
    p.prefetch_a = 1;
  } else { /* kernel (G, K, N) . g (G, M, N)^T -> (G, K, M) */
    ok = ok && s[1][2] == s[0][2] && s[2][1] == s[0][1] && s[2][2] == s[1][1];
    p.m = s[0][1], p.k = s[0][2], p.n = s[1][1], p.a_row = s[0][2], p.a_step = 1;
    p.transpose_b = 1, p.prefetch_a = 1;
  }
  if (!ok || p.n % VW != 0)
    return error(frame->api, "uspsjax kernels: operand shapes do not fit the product");
  run(frame->api, frame->ctx, p);
  return NULL;
}

XLA_FFI_Error *uspsjax_lc_forward(XLA_FFI_CallFrame *f) { return call(f, FORWARD); }
XLA_FFI_Error *uspsjax_lc_kernel_grad(XLA_FFI_CallFrame *f) { return call(f, KERNEL_GRAD); }
XLA_FFI_Error *uspsjax_lc_patch_grad(XLA_FFI_CallFrame *f) { return call(f, PATCH_GRAD); }

/* Floats in a vector register of this build: the axis a product's result vectorizes over (its
 * last) must be a multiple of it. */
int uspsjax_vector_width(void) { return VW; }
