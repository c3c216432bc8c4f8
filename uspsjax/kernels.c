/* The locally connected layer's patches and three products, a convolution's patches and
 * gradients, a dense layer's product and kernel gradient, and the optimizer's update of a large
 * parameter tensor on a CPU, as C kernels that XLA calls through its FFI (uspsjax/kernels.py
 * compiles this file for the machine at hand and registers them).
 *
 * Each product is one per position g, C[g] = A[g] . B[g], B and C row-major, A read through two
 * strides, so that one routine serves the LC's forward (patches . kernel), kernel gradient
 * (patches^T . g) and patch gradient (kernel . g^T, written batch-innermost), and a dense layer's
 * product and kernel gradient. Leading axes (positions, a population's members) are all positions
 * to it; where there are fewer positions than threads, C's rows are cut into bands of whole tiles,
 * one to a thread (§37). A position's weights are used by only a few rows, so a product waits on
 * their first read from memory; the next position's are prefetched while the current one is
 * computed (results/bench/NOTES.md §29). Its patches, the window's positions interleaved channel
 * by channel, are copied one position at a time (§33).
 *
 * A convolution's (the CNN's, §30) patches are rows copied whole; its input gradient is computed
 * one image at a time, the image's patch gradients in the core's cache and summed back onto its
 * pixels at once; its kernel gradient is a sum over every row of the batch.
 * A kernel gradient takes its sum in chunks whose operands stay in the core's L1 (§34).
 *
 * The update (SGD with momentum and weight decay) reads the gradient, the momentum trace and the
 * parameters once and writes the trace and the parameters once, where XLA makes two passes (§35).
 *
 * Each item of work (a position or a band of it, an image) is computed by one thread, and each
 * element's sum is taken in one fixed order, however the work is cut: results are the same bit for
 * bit on the same machine and build, whatever its thread count, and a population's members are
 * computed exactly as single calls.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
#ifndef L1D_BYTES
#define L1D_BYTES 32768 /* the core's L1 data cache, as the build is told it */
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));

/* One product: C[g] (m x n) = A[g] (m x k) . B[g] (k x n) for g < groups, A[i, j] at
 * a[i * a_row + j * a_step]; B[g] given transposed, (n x k), where `transpose_b`. The next
 * position's A (`prefetch_a`) or B, the weights, is prefetched. C's rows are cut into `bands`,
 * one item of work each; the sum over k is taken `depth` terms at a time (0: all). */
typedef struct {
  const float *a, *b;
  float *c;
  int64_t groups, m, k, n, a_row, a_step, bands, depth;
  int transpose_b, prefetch_a;
} product;

/* rows x nv vectors of C from A's rows at `a` and B's columns at `b`; `pf` names `pf_lines`
 * cache lines to fetch into L2 while this tile runs. */
static inline __attribute__((always_inline)) void tile(
    int rows, int nv, const float *a, int64_t a_row, int64_t a_step, const float *b, int64_t ldb,
    float *c, int64_t ldc, int64_t k, const char *pf, int64_t pf_lines, int add) {
  vf acc[MAX_ROWS][WIDEST];
  for (int r = 0; r < rows; r++)
    for (int v = 0; v < nv; v++) acc[r][v] = add ? *(vf *)(c + r * ldc + v * VW) : (vf){0};
  /* Line j * pf_lines / k of `pf` at step j, kept as a running remainder: a division in this
   * loop cost more than its multiply-adds with 8-float vectors (results/bench/NOTES.md §36). */
  int64_t pf_due = 0;
  for (int64_t j = 0; j < k; j++) {
    if (pf) {
      __builtin_prefetch(pf, 0, 2);
      for (pf_due += pf_lines; pf_due >= k; pf_due -= k) pf += 64;
    }
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
                     int64_t, const char *, int64_t, int);
#define TILE(R, NV)                                                                             \
  static void tile_##R##_##NV(const float *a, int64_t ar, int64_t as, const float *b,          \
                              int64_t ldb, float *c, int64_t ldc, int64_t k, const char *pf,   \
                              int64_t pl, int add) {                                            \
    tile(R, NV, a, ar, as, b, ldb, c, ldc, k, pf, pl, add);                                     \
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

/* The vectors of B across a tile, for a product n floats wide. */
static int tile_vectors(int64_t n) {
  const int64_t vectors = n / VW;
  return (WIDEST >= 4 && vectors % 4 == 0) ? 4 : (vectors % 2 == 0 ? 2 : 1);
}

/* The rows of C in one tile of a product n floats wide. */
static int tile_rows(int64_t n) {
  const int nv = tile_vectors(n);
  return ACC / nv < MAX_ROWS ? ACC / nv : MAX_ROWS;
}

/* The tiles down C's m rows, for a product n floats wide (the last may be partial). */
static int64_t row_tiles(int64_t m, int64_t n) { return (m + tile_rows(n) - 1) / tile_rows(n); }

/* The terms of a sum a tile takes at a time where A is read down its columns (a kernel
 * gradient: each term of a tile's rows one cache line of A, beside a row of B): the most, a power
 * of two, whose lines of A and rows of B fit the core's L1 data cache, so that the tiles beside
 * it find them there (the LC's kernel gradient at batch 1024, 1,024 terms, 1.5x faster in chunks
 * of 128 than in one pass, results/bench/NOTES.md §34). */
static int64_t l1_terms(int64_t n) {
  const int64_t bytes_per_term = 64 + 4 * VW * tile_vectors(n);
  int64_t terms = 16;
  while (2 * terms * bytes_per_term <= L1D_BYTES) terms *= 2;
  return terms;
}

/* C (m x n) = A (m x k) . B (k x n), A[i, j] at a[i * a_row + j * a_step], B and C row-major,
 * the sum over k in chunks of `depth` terms; `pf` (or NULL) names `pf_bytes` to fetch into L2
 * meanwhile. */
static void multiply(const float *a, int64_t a_row, int64_t a_step, const float *b, float *c,
                     int64_t m, int64_t k, int64_t n, int64_t depth, const char *pf,
                     int64_t pf_bytes) {
  const int nv = tile_vectors(n);
  const int width = nv * VW;
  const int rows = tile_rows(n);
  const int64_t tiles = (n / width) * row_tiles(m, n) * ((k + depth - 1) / depth);
  const int64_t pf_lines = (pf_bytes / 64 + tiles - 1) / tiles;
  tile_fn *const *table = TILE_TABLE[nv == 4 ? 2 : nv - 1];
  /* Each chunk's rows of A and B are read once from memory into the cache, then by every tile;
   * the sum's order stays that of one pass. */
  int64_t t = 0;
  for (int64_t d = 0; d < k; d += depth) {
    const int64_t terms = k - d < depth ? k - d : depth;
    for (int64_t j = 0; j < n; j += width)
      for (int64_t i = 0; i < m; i += rows, t++) {
        const int r = m - i < rows ? (int)(m - i) : rows;
        table[r](a + i * a_row + d * a_step, a_row, a_step, b + d * n + j, n, c + i * n + j, n,
                 terms, pf ? pf + t * pf_lines * 64 : NULL, pf_lines, d > 0);
      }
  }
}

/* Item i of the product at `args`: band i % bands of C's rows (whole tiles) at position
 * i / bands; `scratch` holds k x n floats where B comes transposed. */
static void position(const void *args, int64_t i, float *scratch) {
  const product *p = args;
  const int64_t g = i / p->bands, band = i % p->bands, k = p->k, n = p->n;
  const int64_t tiles = row_tiles(p->m, n), rows = tile_rows(n);
  const int64_t from = band * tiles / p->bands * rows, to = (band + 1) * tiles / p->bands * rows;
  const int64_t m = (to < p->m ? to : p->m) - from;
  const float *a = p->a + g * p->m * k + from * p->a_row, *b = p->b + g * k * n;
  float *c = p->c + g * p->m * n + from * n;
  if (p->transpose_b) { /* b holds (n, k) */
    for (int64_t r = 0; r < n; r++)
      for (int64_t j = 0; j < k; j++) scratch[j * n + r] = b[r * k + j];
    b = scratch;
  }
  const int64_t weights = p->prefetch_a ? p->m * k : k * n; /* floats */
  const char *next = g + 1 < p->groups && p->bands == 1
      ? (const char *)((p->prefetch_a ? p->a : p->b) + (g + 1) * weights) : NULL;
  multiply(a, p->a_row, p->a_step, b, c, m, k, n, p->depth ? p->depth : k, next,
           weights * 4);
}

/* Work shared by the threads of XLA's pool: `items` calls of `item(args, i, scratch)`, each
 * thread claiming a few items in turn, with `scratch` floats of its own. Held by the caller and
 * by every task scheduled; the last to let go frees it (a task may start after the call has
 * returned, finds nothing left to claim, and touches no buffer). */
typedef void item_fn(const void *args, int64_t i, float *scratch);
typedef struct {
  item_fn *item;
  int64_t items, chunk, scratch;
  atomic_int_fast64_t next, done;
  atomic_int holders;
  max_align_t args[]; /* the item's arguments, copied in */
} job;

static void release(job *j) {
  if (atomic_fetch_sub(&j->holders, 1) == 1) free(j);
}

static void work(void *data) {
  job *j = data;
  float *scratch = j->scratch ? malloc(sizeof(float) * j->scratch) : NULL;
  for (;;) {
    const int64_t start = atomic_fetch_add(&j->next, j->chunk);
    if (start >= j->items) break;
    const int64_t end = start + j->chunk < j->items ? start + j->chunk : j->items;
    for (int64_t i = start; i < end; i++) j->item(j->args, i, scratch);
    atomic_fetch_add(&j->done, end - start);
  }
  free(scratch);
  release(j);
}

static void ignore(const XLA_FFI_Api *api, XLA_FFI_Error *err) {
  XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, err};
  api->XLA_FFI_Error_Destroy(&destroy);
}

/* The threads of XLA's pool (at least 1). */
static int64_t pool_threads(const XLA_FFI_Api *api, XLA_FFI_ExecutionContext *ctx) {
  int64_t threads = 1;
  XLA_FFI_ThreadPool_NumThreads_Args count = {XLA_FFI_ThreadPool_NumThreads_Args_STRUCT_SIZE,
                                              NULL, ctx, &threads};
  XLA_FFI_Error *err = api->XLA_FFI_ThreadPool_NumThreads(&count);
  if (err != NULL) ignore(api, err), threads = 1;
  return threads > 1 ? threads : 1;
}

/* Runs `items` calls of `item` on the caller's thread and on as many of XLA's pool as are
 * free; `args` (`size` bytes) is copied for them. */
static void run(const XLA_FFI_Api *api, XLA_FFI_ExecutionContext *ctx, item_fn *item,
                const void *args, size_t size, int64_t items, int64_t scratch) {
  const int64_t threads = pool_threads(api, ctx);
  XLA_FFI_Error *err;
  job *j = malloc(sizeof(job) + size);
  j->item = item, j->items = items, j->scratch = scratch;
  memcpy(j->args, args, size);
  /* Chunks of a few items, so that a thread that starts late still takes its share. */
  j->chunk = items / (4 * threads);
  if (j->chunk < 1) j->chunk = 1;
  atomic_init(&j->next, 0);
  atomic_init(&j->done, 0);
  atomic_init(&j->holders, 2); /* the caller's turn at the work, and its wait below */
  for (int64_t t = 1; t < threads && t < items; t++) {
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
  while (atomic_load(&j->done) < items) sched_yield();
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

/* A float32 buffer's last two dimensions, and the product of the others (1 for none) into d[0]. */
static int dims(XLA_FFI_Buffer *buf, int64_t d[3]) {
  if (buf->dtype != XLA_FFI_DataType_F32 || buf->rank < 2) return 0;
  d[0] = 1;
  for (int64_t i = 0; i < buf->rank - 2; i++) d[0] *= buf->dims[i];
  d[1] = buf->dims[buf->rank - 2], d[2] = buf->dims[buf->rank - 1];
  return 1;
}

enum { FORWARD, KERNEL_GRAD, PATCH_GRAD, SUMMED_GRAD };

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
    return error(frame->api, "uspsjax kernels: float32 operands of rank 2 or more expected");
  product p = {x->data, y->data, out->data, s[0][0], 0, 0, 0, 0, 0, 1, 0, 0, 0};
  int ok = s[1][0] == s[0][0] && s[2][0] == s[0][0];
  if (kind == FORWARD) { /* patches (G, M, K) . kernel (G, K, N) -> (G, M, N) */
    ok = ok && s[1][1] == s[0][2] && s[2][1] == s[0][1] && s[2][2] == s[1][2];
    p.m = s[0][1], p.k = s[0][2], p.n = s[1][2], p.a_row = s[0][2], p.a_step = 1;
  } else if (kind == KERNEL_GRAD || kind == SUMMED_GRAD) {
    /* patches (G, M, K)^T . g (G, M, N) -> (G, K, N); summed: the weights of a layer that all
     * rows share (a convolution's, a dense layer's) */
    ok = ok && s[1][1] == s[0][1] && s[2][1] == s[0][2] && s[2][2] == s[1][2];
    p.m = s[0][2], p.k = s[0][1], p.n = s[1][2], p.a_row = 1, p.a_step = s[0][2];
    p.prefetch_a = kind == KERNEL_GRAD;
    p.depth = l1_terms(p.n);
  } else { /* kernel (G, K, N) . g (G, M, N)^T -> (G, K, M) */
    ok = ok && s[1][2] == s[0][2] && s[2][1] == s[0][1] && s[2][2] == s[1][1];
    p.m = s[0][1], p.k = s[0][2], p.n = s[1][1], p.a_row = s[0][2], p.a_step = 1;
    p.transpose_b = 1, p.prefetch_a = 1;
  }
  if (!ok || p.n % VW != 0)
    return error(frame->api, "uspsjax kernels: operand shapes do not fit the product");
  /* C's rows in bands where there are fewer positions than threads (a dense layer's, a
   * convolution's product), so that every thread has one at least. (A sum over the rows cut in a
   * part per thread instead cost a buffer for the parts, and a pass to add them.) */
  const int64_t threads = pool_threads(frame->api, frame->ctx);
  p.bands = (threads + p.groups - 1) / p.groups;
  if (p.bands > row_tiles(p.m, p.n)) p.bands = row_tiles(p.m, p.n);
  run(frame->api, frame->ctx, position, &p, sizeof p, p.groups * p.bands,
      p.transpose_b ? p.k * p.n : 0);
  return NULL;
}

/* A window over images (G, H, W, C): its valid, stride-1 patches for a (KH, KW) window, one row
 * per output pixel, (G, OH, OW, KH * KW * C), a pure copy, offsets row-major and channels
 * innermost (a convolution's), or where `channel_major` entry c * KH * KW + offset (the LC's
 * layout: positions as H, the batch as W, KW = 1), one output row of pixels per item; and a
 * convolution's input gradient from the output gradient (G, OH, OW, F) and the kernel
 * transposed (F, KH * KW * C), one per `images_per_weights` images, the patch gradients summed
 * back onto the pixels in row-major order of offsets, as `models._patch_rows_transpose` adds
 * them, one image per item. */
typedef struct {
  const float *in, *weights;
  float *out;
  int64_t h, w, c, kh, kw, f, images_per_weights;
  int channel_major;
} window;

static void patches(const void *args, int64_t i, float *scratch) {
  const window *p = args;
  const int64_t oh = p->h - p->kh + 1, ow = p->w - p->kw + 1, c = p->c, size = p->kh * p->kw;
  const int64_t g = i / oh, oy = i % oh;
  const float *x = p->in + (g * p->h + oy) * p->w * c;
  float *o = p->out + i * ow * size * c;
  for (int64_t ox = 0; ox < ow; ox++, o += size * c)
    for (int64_t dy = 0; dy < p->kh; dy++) {
      const float *row = x + (dy * p->w + ox) * c;
      if (!p->channel_major) {
        memcpy(o + dy * p->kw * c, row, sizeof(float) * p->kw * c);
      } else if (p->kh == 3 && p->kw == 1) { /* the study's LC window, interleaved in vectors */
        const float *s0 = x + ox * c, *s1 = s0 + p->w * c, *s2 = s1 + p->w * c;
        for (int64_t ch = 0; ch < c; ch++)
          o[3 * ch] = s0[ch], o[3 * ch + 1] = s1[ch], o[3 * ch + 2] = s2[ch];
        break;
      } else {
        for (int64_t dx = 0; dx < p->kw; dx++)
          for (int64_t ch = 0; ch < c; ch++) o[ch * size + dy * p->kw + dx] = row[dx * c + ch];
      }
    }
  (void)scratch;
}

/* Patch gradients (OH, OW, KH * KW, C) at `d` summed back onto the image's pixels at `o`. */
static void sum_back(const window *p, const float *d, float *o) {
  const int64_t oh = p->h - p->kh + 1, ow = p->w - p->kw + 1, c = p->c;
  for (int64_t y = 0; y < p->h; y++)
    for (int64_t x = 0; x < p->w; x++, o += c) {
      for (int64_t i = 0; i < c; i++) o[i] = 0;
      for (int64_t dy = 0; dy < p->kh; dy++)
        for (int64_t dx = 0; dx < p->kw; dx++) {
          const int64_t oy = y - dy, ox = x - dx;
          if (oy < 0 || oy >= oh || ox < 0 || ox >= ow) continue;
          const float *s = d + ((oy * ow + ox) * p->kh * p->kw + dy * p->kw + dx) * c;
          for (int64_t i = 0; i < c; i++) o[i] += s[i];
        }
    }
}

/* A convolution's input gradient for image g: its patch gradients, output gradient (OH * OW, F)
 * at `in` times the kernel transposed (F, KH * KW * C) at `weights`, into `scratch`, and summed
 * back onto its pixels: one image's patch gradients at a time, in the core's cache. */
static void input_grad(const void *args, int64_t g, float *scratch) {
  const window *p = args;
  const int64_t pixels = (p->h - p->kh + 1) * (p->w - p->kw + 1), n = p->kh * p->kw * p->c;
  multiply(p->in + g * pixels * p->f, p->f, 1, p->weights + g / p->images_per_weights * p->f * n,
           scratch, pixels, p->f, n, p->f, NULL, 0);
  sum_back(p, scratch, p->out + g * p->h * p->w * p->c);
}

/* One call of the patches (`grad` 0: images (G, H, W, C) in, patches (G, OH, OW, KH * KW * C)
 * out, channel-major where `channel_major`) or of the input gradient (1: output gradient (G, OH,
 * OW, F) and the kernel transposed (G', F, KH * KW * C) in, G' a prefix of G's axes, images
 * out), the window read from the shapes. */
static XLA_FFI_Error *window_call(XLA_FFI_CallFrame *frame, int grad, int channel_major) {
  if (metadata(frame)) return NULL;
  int ok = frame->args.size == 1 + grad && frame->rets.size == 1 &&
           frame->rets.types[0] == XLA_FFI_RetType_BUFFER;
  for (int64_t i = 0; ok && i < frame->args.size; i++)
    ok = frame->args.types[i] == XLA_FFI_ArgType_BUFFER;
  if (!ok) return error(frame->api, "uspsjax kernels: buffers expected, one out");
  XLA_FFI_Buffer *in = frame->args.args[0], *out = frame->rets.rets[0];
  XLA_FFI_Buffer *weights = grad ? frame->args.args[1] : NULL;
  XLA_FFI_Buffer *images = grad ? out : in, *rows = grad ? in : out;
  if (images->dtype != XLA_FFI_DataType_F32 || rows->dtype != XLA_FFI_DataType_F32 ||
      images->rank < 3 || rows->rank != images->rank ||
      (grad && (weights->dtype != XLA_FFI_DataType_F32 || weights->rank < 2 ||
                weights->rank > images->rank - 1)))
    return error(frame->api, "uspsjax kernels: float32 images and patches of one rank expected");
  const int64_t r = images->rank, *a = images->dims, *b = rows->dims;
  int64_t groups = 1;
  for (int64_t i = 0; i < r - 3; i++) groups *= a[i], ok = ok && a[i] == b[i];
  window p = {in->data, grad ? weights->data : NULL, out->data, a[r - 3], a[r - 2], a[r - 1],
              a[r - 3] - b[r - 3] + 1, a[r - 2] - b[r - 2] + 1, b[r - 1], groups, channel_major};
  ok = ok && p.kh >= 1 && p.kw >= 1 && p.kh <= p.h && p.kw <= p.w;
  if (grad) { /* one kernel per leading index it has (a population's members) */
    const int64_t wr = weights->rank, *d = weights->dims;
    for (int64_t i = 0; i < wr - 2; i++) p.images_per_weights /= d[i], ok = ok && d[i] == a[i];
    ok = ok && d[wr - 2] == p.f && d[wr - 1] == p.kh * p.kw * p.c && d[wr - 1] % VW == 0;
  }
  else
    ok = ok && p.f == p.kh * p.kw * p.c;
  if (!ok) return error(frame->api, "uspsjax kernels: patch shapes do not fit the images");
  const int64_t scratch = grad ? (p.h - p.kh + 1) * (p.w - p.kw + 1) * p.kh * p.kw * p.c : 0;
  if (grad) run(frame->api, frame->ctx, input_grad, &p, sizeof p, groups, scratch);
  else run(frame->api, frame->ctx, patches, &p, sizeof p, groups * (p.h - p.kh + 1), 0);
  return NULL;
}

/* SGD with momentum and weight decay on one parameter tensor, in one pass: per member
 * (`hyper` = learning rate, momentum, weight decay, active), trace' = (g + decay * p) +
 * momentum * trace and p' = p - rate * trace', as optax computes them; where not active both stay
 * as they are. The outputs may be the trace's and the parameters' own buffers. A chunk of a
 * member's tensor per item. */
typedef struct {
  const float *g, *trace, *p, *hyper;
  float *trace_out, *p_out;
  int64_t size, chunks;
} sgd;

#define SGD_CHUNK 16384 /* floats of a tensor updated per item */

static void sgd_chunk(const void *args, int64_t item, float *scratch) {
  const sgd *s = args;
  const int64_t member = item / s->chunks, from = member * s->size + item % s->chunks * SGD_CHUNK;
  const int64_t to = from + SGD_CHUNK < (member + 1) * s->size ? from + SGD_CHUNK
                                                              : (member + 1) * s->size;
  const float *h = s->hyper + 4 * member, rate = h[0], momentum = h[1], decay = h[2];
  if (h[3] == 0) { /* frozen */
    if (s->trace_out != s->trace) memcpy(s->trace_out + from, s->trace + from, 4 * (to - from));
    if (s->p_out != s->p) memcpy(s->p_out + from, s->p + from, 4 * (to - from));
    return;
  }
  for (int64_t i = from; i < to; i++) {
    const float t = (s->g[i] + decay * s->p[i]) + momentum * s->trace[i];
    s->trace_out[i] = t;
    s->p_out[i] = s->p[i] - rate * t;
  }
  (void)scratch;
}

/* One call of the update: gradient, trace, parameters (G, ...) and `hyper` (G, 4) in, G
 * members; the trace and the parameters out. */
static XLA_FFI_Error *sgd_call(XLA_FFI_CallFrame *frame) {
  if (metadata(frame)) return NULL;
  int ok = frame->args.size == 4 && frame->rets.size == 2;
  for (int64_t i = 0; ok && i < 4; i++)
    ok = frame->args.types[i] == XLA_FFI_ArgType_BUFFER &&
         ((XLA_FFI_Buffer *)frame->args.args[i])->dtype == XLA_FFI_DataType_F32;
  for (int64_t i = 0; ok && i < 2; i++)
    ok = frame->rets.types[i] == XLA_FFI_RetType_BUFFER &&
         ((XLA_FFI_Buffer *)frame->rets.rets[i])->dtype == XLA_FFI_DataType_F32;
  if (!ok) return error(frame->api, "uspsjax kernels: four float32 buffers in and two out");
  XLA_FFI_Buffer **in = (XLA_FFI_Buffer **)frame->args.args;
  XLA_FFI_Buffer **out = (XLA_FFI_Buffer **)frame->rets.rets;
  int64_t sizes[6];
  for (int64_t b = 0; b < 6; b++) {
    XLA_FFI_Buffer *buf = b < 4 ? in[b] : out[b - 4];
    sizes[b] = 1;
    for (int64_t i = 0; i < buf->rank; i++) sizes[b] *= buf->dims[i];
  }
  const int64_t members = sizes[3] / 4;
  ok = members >= 1 && sizes[3] == 4 * members && sizes[0] % members == 0;
  for (int64_t b = 1; ok && b < 6; b++) ok = b == 3 || sizes[b] == sizes[0];
  if (!ok) return error(frame->api, "uspsjax kernels: update shapes do not fit");
  sgd s = {in[0]->data, in[1]->data, in[2]->data, in[3]->data, out[0]->data, out[1]->data,
           sizes[0] / members, 0};
  s.chunks = (s.size + SGD_CHUNK - 1) / SGD_CHUNK;
  run(frame->api, frame->ctx, sgd_chunk, &s, sizeof s, members * s.chunks, 0);
  return NULL;
}

XLA_FFI_Error *uspsjax_sgd_update(XLA_FFI_CallFrame *f) { return sgd_call(f); }
XLA_FFI_Error *uspsjax_product(XLA_FFI_CallFrame *f) { return call(f, FORWARD); }
XLA_FFI_Error *uspsjax_lc_kernel_grad(XLA_FFI_CallFrame *f) { return call(f, KERNEL_GRAD); }
XLA_FFI_Error *uspsjax_lc_patch_grad(XLA_FFI_CallFrame *f) { return call(f, PATCH_GRAD); }
XLA_FFI_Error *uspsjax_summed_kernel_grad(XLA_FFI_CallFrame *f) { return call(f, SUMMED_GRAD); }

/* Floats in a vector register of this build: the axis a product's result vectorizes over (its
 * last) must be a multiple of it. */
int uspsjax_vector_width(void) { return VW; }
XLA_FFI_Error *uspsjax_patches(XLA_FFI_CallFrame *f) { return window_call(f, 0, 0); }
XLA_FFI_Error *uspsjax_lc_patches(XLA_FFI_CallFrame *f) { return window_call(f, 0, 1); }
XLA_FFI_Error *uspsjax_conv_input_grad(XLA_FFI_CallFrame *f) { return window_call(f, 1, 0); }
