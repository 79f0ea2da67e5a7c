// 3x3, stride 1, zero-padding 1 convolution on AMX tiles (Intel Sapphire Rapids and later), bf16
// activations in NHWC (channels_last), fp32 sums; bias, residual add and ReLU fused; optionally
// reading the input nearest-upsampled 2x (the decoder's Upsample + conv, the big map never made).
// Built at first use by taesd/runtime/amx.py (plain C ABI, called through ctypes).
//
// Each thread takes bands of output rows. For each output row it keeps the three input rows it
// reads in a ring of zero-padded rows (one new row copied per output row), then per 32 output
// pixels and 32 output channels runs 9 taps x Ci/32 steps of four tile products (2 pixel tiles x
// 2 channel tiles, TDPBF16PS), each A tile read straight from the padded rows with the row stride
// of one pixel, the next step's tiles loaded as soon as the products free them (tiles are not
// renamed: a load waits for the last product that reads its tile). Each block's bias, residual,
// ReLU and bf16 rounding run between the next block's products. Per output pixel the sum order is
// fixed (taps, then input channels), whatever the map size, band or thread: a tile of a bigger map
// gives the same bits (seam-exact tiling). A chain (taesd_amx_chain) runs several such convs in one
// pass, the maps between them kept as rings of rows; the network's first conv (from RGB, its 3x3
// patches gathered into one tile row: im2col) and last conv (to at most 16 channels: one B tile,
// 64 pixels a step) run as its first and last stages.
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <atomic>
#include <cmath>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int PX = 16;     // pixels per A tile (its rows)
constexpr int KC = 32;     // input channels per A tile (64 bytes of bf16)
constexpr int BAND = 8;    // output rows per unit of work

struct TileCfg {           // the LDTILECFG layout, palette 1
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct Job {
  const uint16_t* x;      // [N][Hv >> up][Wv >> up][Ci]
  const uint16_t* w;      // packed weights (amx.py pack_weight): [Co/32][9][Ci/32][2][16][16][2]
  const float* bias;      // [Co] or null
  const uint16_t* res;    // [N][H][W][Co] or null
  uint16_t* y;            // [N][H][W][Co]
  int N, H, W, Ci, Co, relu, up, groups;   // H, W: the output's size; groups: 32-pixel groups per row
  int Hv, Wv, stride;     // the map the conv reads (x, or x upsampled) and the conv's stride (1, 2)
  long bands, per_image;
  std::atomic<long> next;
};

static inline __m512 bf16x16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Row iy of the map the conv reads (padded: one zero pixel left, zeros right of Wv) into dst.
static void copy_row(const Job* job, int n, int iy, uint16_t* dst, long padded) {
  const int Ci = job->Ci, W = job->Wv, up = job->up;
  if (iy < 0 || iy >= job->Hv) { memset(dst, 0, 2 * padded); return; }
  memset(dst, 0, 2 * Ci);
  const uint16_t* src = job->x + ((long)n * (job->Hv >> up) + (iy >> up)) * (long)(W >> up) * Ci;
  if (!up) {
    memcpy(dst + Ci, src, 2L * W * Ci);
  } else {
    for (int x = 0; x < W; ++x) memcpy(dst + (long)(x + 1) * Ci, src + (long)(x >> 1) * Ci, 2 * Ci);
  }
  memset(dst + (long)(W + 1) * Ci, 0, 2 * (padded - (long)(W + 1) * Ci));
}

static void configure_tiles() {
  TileCfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// Input rows to bring into L2 while the tiles multiply: the next row a ring will copy from memory is
// prefetched a few lines per tap (measured: a lone 128² conv spent ~20% of its time in those copies
// from memory, the tile unit idle). Where to and how much is left.
struct Prefetch {
  const char* p = nullptr;
  long left = 0;
  void later(const void* at, long bytes) { p = (const char*)at; left = (bytes + 63) / 64; }
  void some(int lines) {
    for (; lines > 0 && left > 0; --lines, --left, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};
constexpr int PREFETCH_PER_TAP = 8;   // lines

// The finishing pass of one 32-pixel x 32-channel block of sums: S ([32 pixels][32], fp32) + bias
// + residual, ReLU, rounded to bf16 into out; pixels p0 .. p1 - 1 of its np.
struct Pending {
  const float* S;
  const float* bias;      // this block's 32 channels, or null
  const uint16_t* res;    // pixel 0, channel 0 of the block (stride Co), or null
  uint16_t* out;          // likewise
  int np;
};

static inline void finish(const Pending& b, int p0, int p1, int relu, int Co) {
  if (p1 > b.np) p1 = b.np;
  const __m512 b0 = b.bias ? _mm512_loadu_ps(b.bias) : _mm512_setzero_ps();
  const __m512 b1 = b.bias ? _mm512_loadu_ps(b.bias + 16) : _mm512_setzero_ps();
  for (int p = p0; p < p1; ++p) {
    __m512 v0 = _mm512_load_ps(b.S + p * 32), v1 = _mm512_load_ps(b.S + p * 32 + 16);
    if (b.bias) { v0 = _mm512_add_ps(v0, b0); v1 = _mm512_add_ps(v1, b1); }
    if (b.res) {
      v0 = _mm512_add_ps(v0, bf16x16(b.res + (long)p * Co));
      v1 = _mm512_add_ps(v1, bf16x16(b.res + (long)p * Co + 16));
    }
    if (relu) { v0 = _mm512_max_ps(v0, _mm512_setzero_ps()); v1 = _mm512_max_ps(v1, _mm512_setzero_ps()); }
    // both halves rounded to bf16 (round to nearest even, as _mm512_cvtneps_pbh) in one 64-byte store
    _mm512_storeu_si512(b.out + (long)p * Co, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
  }
}

// One output row of a 3x3 conv: rows[0..2] are the padded input rows it reads (above, at and below
// it, at stride sx). out: where pixel p's Co channels go (out + p * Co); res: the residual row or null.
// S: two 32 x 32 fp32 buffers (8 KB). Blocks of 32 pixels x 32 output channels; each block's
// finishing pass runs interleaved with the next block's tile products (in program order between
// them), so the vector units work while the tile unit multiplies.
static void conv_row(const uint16_t* const rows[3], const uint16_t* w, const float* bias,
                     const uint16_t* res, int relu, uint16_t* out, int W, int groups, int Ci, int Co,
                     float* S, int sx = 1, int taps = 9, Prefetch* pf = nullptr) {
  const int nk = Ci / KC;
  const long tap = (long)nk * 1024;                          // elements per tap of one channel pair-tile
  Pending prev{nullptr, nullptr, nullptr, nullptr, 0};
  int cur = 0;
  // Each pixel group runs all its output-channel halves while its input rows are in the L1 (the
  // weights streamed from L2 either way: see below). Measured against the halves outside the groups:
  // 3-8% faster in a stand-alone loop of the pattern at 256-2048 px, 1-2% on whole chains; same bits.
  for (int g = 0; g < groups; ++g) {
    for (int op = 0; op < Co / 32; ++op) {
      const int x0 = g * 32;
      const int np = W - x0 < 32 ? W - x0 : 32;   // the last group of a row may be partial
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      const uint16_t* wb = w + (long)op * taps * tap;
      // Software-pipelined: each step's tile products free their operand tiles in turn, and the
      // next step's loads go in as soon as their tile is free.
      const long ast = Ci * 2 * sx;
      // taps == 1: rows[0] holds each pixel's 3x3 patch as Ci values (im2col), read as a 1x1 conv
      auto A = [&](int t, int k) {
        return taps == 1 ? rows[0] + (long)x0 * Ci + k * KC
                         : rows[t / 3] + (long)(x0 * sx + t % 3) * Ci + k * KC;
      };
      // The weight tiles are loaded with the streaming hint (TILELOADDT1): they then leave the L1 to
      // the input rows, which the next taps read again (measured: 1-2% on whole chains at 512², 2
      // threads; the same values either way). The input rows with it instead: slower.
      {
        const uint16_t* a = A(0, 0);
        _tile_loadd(4, a, ast);
        _tile_loadd(5, a + PX * sx * Ci, ast);
        _tile_stream_loadd(6, wb, 64);
        _tile_stream_loadd(7, wb + 512, 64);
      }
      for (int t = 0; t < taps; ++t) {
        for (int k = 0; k < nk; ++k) {
          const bool last = t == taps - 1 && k == nk - 1;
          const int tn = k == nk - 1 ? t + 1 : t, kn = k == nk - 1 ? 0 : k + 1;
          const uint16_t* a = last ? nullptr : A(tn, kn);
          const uint16_t* b = wb + tn * tap + kn * 1024;
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (!last) _tile_stream_loadd(6, b, 64);
          _tile_dpbf16ps(1, 4, 7);
          if (!last) _tile_loadd(4, a, ast);
          _tile_dpbf16ps(3, 5, 7);
          if (!last) {
            _tile_loadd(5, a + PX * sx * Ci, ast);
            _tile_stream_loadd(7, b + 512, 64);
          }
        }
        if (prev.S) finish(prev, t * 4, t == taps - 1 ? 32 : t * 4 + 4, relu, Co);
        if (pf) pf->some(PREFETCH_PER_TAP);
      }
      float* s = S + cur * 1024;
      _tile_stored(0, s, 128);
      _tile_stored(1, s + 16, 128);
      _tile_stored(2, s + PX * 32, 128);
      _tile_stored(3, s + PX * 32 + 16, 128);
      const long off = (long)x0 * Co + op * 32;
      prev = Pending{s, bias ? bias + op * 32 : nullptr, res ? res + off : nullptr, out + off, np};
      cur ^= 1;
    }
  }
  if (prev.S) finish(prev, 0, 32, relu, Co);
}

// One output row of a 3x3 conv to Co <= 16 channels (a decoder's last conv, to RGB): one B tile of
// 16 output channels (the unused ones zero), four pixel tiles (64 pixels) a step, bias added and the
// first Co channels rounded to bf16 into out (pixel p at out + p * Co). The rows must hold 64-pixel
// groups. Per output pixel the sum order is fixed (taps, then input channels), as in conv_row.
static void conv_row_narrow(const uint16_t* const rows[3], const uint16_t* w, const float* bias,
                            uint16_t* out, int W, int Ci, int Co, float* S, Prefetch* pf = nullptr) {
  const int nk = Ci / KC;
  const long ast = Ci * 2;
  for (int x0 = 0; x0 < W; x0 += 64) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int t = 0; t < 9; ++t) {
      for (int k = 0; k < nk; ++k) {
        const uint16_t* a = rows[t / 3] + (long)(x0 + t % 3) * Ci + k * KC;
        _tile_loadd(6, w + (long)(t * nk + k) * 512, 64);
        _tile_loadd(4, a, ast);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, a + PX * Ci, ast);
        _tile_dpbf16ps(1, 5, 6);
        _tile_loadd(4, a + 2 * PX * Ci, ast);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(5, a + 3 * PX * Ci, ast);
        _tile_dpbf16ps(3, 5, 6);
      }
      if (pf) pf->some(PREFETCH_PER_TAP);
    }
    _tile_stored(0, S, 64);
    _tile_stored(1, S + PX * 16, 64);
    _tile_stored(2, S + 2 * PX * 16, 64);
    _tile_stored(3, S + 3 * PX * 16, 64);
    const int np = W - x0 < 64 ? W - x0 : 64;
    const __mmask16 m = (__mmask16)((1u << Co) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias) : _mm512_setzero_ps();
    for (int p = 0; p < np; ++p) {
      __m512 v = _mm512_add_ps(_mm512_load_ps(S + p * 16), b);
      _mm256_mask_storeu_epi16(out + (long)(x0 + p) * Co, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

static inline int slot(int row) { return ((row % 3) + 3) % 3; }

static void* worker(void* arg) {
  Job* job = (Job*)arg;
  configure_tiles();
  const int Ci = job->Ci, Co = job->Co, W = job->W, H = job->H, s = job->stride;
  const long padded = (long)(job->groups * 32 * s + 2) * Ci;    // elements per padded row
  uint16_t* ring = (uint16_t*)aligned_alloc(64, 2 * 3 * padded);
  float* S = (float*)aligned_alloc(64, sizeof(float) * 2048);
  Prefetch pf;
  for (long b; (b = job->next.fetch_add(1)) < job->bands;) {
    const int n = (int)(b / job->per_image), y0 = (int)(b % job->per_image) * BAND;
    const int y1 = y0 + BAND < H ? y0 + BAND : H;
    int next = s * y0 - 1;                     // the next row of the read map to bring into the ring
    for (int yy = y0; yy < y1; ++yy) {
      const int top = s * yy - 1;             // output row yy reads rows top .. top + 2
      for (; next <= top + 2; ++next) copy_row(job, n, next, ring + slot(next) * padded, padded);
      {   // the source rows the next output row will copy (up: the next distinct small row)
        const int up = job->up, hs = job->Hv >> up, src = ((next - 1) >> up) + 1;
        const int count = (src + s <= hs ? s : hs - src);
        const long bytes = 2L * (job->Wv >> up) * Ci;
        if (count > 0) pf.later(job->x + ((long)n * hs + src) * (job->Wv >> up) * Ci, count * bytes);
      }
      const uint16_t* rows[3] = {ring + slot(top) * padded, ring + slot(top + 1) * padded,
                                 ring + slot(top + 2) * padded};
      const long row = ((long)n * H + yy) * W * Co;
      conv_row(rows, job->w, job->bias, job->res ? job->res + row : nullptr, job->relu, job->y + row,
               W, job->groups, Ci, Co, S, s, 9, &pf);
    }
  }
  _tile_release();
  free(ring);
  free(S);
  return nullptr;
}

// The residual block relu(conv2(relu(conv1(relu(conv0(x))))) + x), C channels throughout, as one
// pass: per range of output rows each thread runs the three convs as a pipeline of 3-row rings, so
// the two intermediate maps never leave the cache (recomputing 4 + 2 rows at each range's edges).
// Each conv rounds its output to bf16 as the unfused kernels do: the same bits.
struct BlockJob {
  const uint16_t* x;
  const uint16_t* w[3];
  const float* b[3];
  uint16_t* y;
  int N, H, W, C, groups, parts;   // parts: row ranges per image
  long items;
  std::atomic<long> next;
};

static void* block_worker(void* arg) {
  BlockJob* job = (BlockJob*)arg;
  configure_tiles();
  const int C = job->C, W = job->W, H = job->H;
  const long padded = (long)(job->groups * 32 + 2) * C;
  uint16_t* ring = (uint16_t*)aligned_alloc(64, 2 * 9 * padded);   // 3 rings of 3 padded rows
  memset(ring, 0, 2 * 9 * padded);                                 // pads and tails stay zero
  uint16_t* r0 = ring, *r1 = ring + 3 * padded, *r2 = ring + 6 * padded;
  float* S = (float*)aligned_alloc(64, sizeof(float) * 2048);
  const long data = (long)W * C;            // the data part of a padded row (after one zero pixel)
  Prefetch pf;
  for (long it; (it = job->next.fetch_add(1)) < job->items;) {
    const int n = (int)(it / job->parts), part = (int)(it % job->parts);
    const int y0 = (int)((long)H * part / job->parts), y1 = (int)((long)H * (part + 1) / job->parts);
    if (y0 >= y1) continue;
    const uint16_t* xn = job->x + (long)n * H * data;
    auto load = [&](int row) {   // input row into ring 0 (zeros outside the map)
      uint16_t* d = r0 + slot(row) * padded + C;
      if (row < 0 || row >= H) memset(d, 0, 2 * data); else memcpy(d, xn + (long)row * data, 2 * data);
    };
    load(y0 - 3);
    load(y0 - 2);
    for (int t = y0 - 2; t <= y1 + 1; ++t) {
      load(t + 1);
      if (t + 2 >= 0 && t + 2 < H) pf.later(xn + (long)(t + 2) * data, 2 * data);
      uint16_t* d1 = r1 + slot(t) * padded + C;      // conv0 row t
      if (t < 0 || t >= H) {
        memset(d1, 0, 2 * data);
      } else {
        const uint16_t* rows[3] = {r0 + slot(t - 1) * padded, r0 + slot(t) * padded, r0 + slot(t + 1) * padded};
        conv_row(rows, job->w[0], job->b[0], nullptr, 1, d1, W, job->groups, C, C, S, 1, 9, &pf);
      }
      const int u = t - 1;                           // conv1 row u
      if (u >= y0 - 1) {
        uint16_t* d2 = r2 + slot(u) * padded + C;
        if (u < 0 || u >= H) {
          memset(d2, 0, 2 * data);
        } else {
          const uint16_t* rows[3] = {r1 + slot(u - 1) * padded, r1 + slot(u) * padded, r1 + slot(u + 1) * padded};
          conv_row(rows, job->w[1], job->b[1], nullptr, 1, d2, W, job->groups, C, C, S, 1, 9, &pf);
        }
      }
      const int v = t - 2;                           // conv2 row v: the block's output
      if (v >= y0 && v < y1) {
        const uint16_t* rows[3] = {r2 + slot(v - 1) * padded, r2 + slot(v) * padded, r2 + slot(v + 1) * padded};
        conv_row(rows, job->w[2], job->b[2], xn + (long)v * data, 1, job->y + ((long)n * H + v) * data,
                 W, job->groups, C, C, S, 1, 9, &pf);
      }
    }
  }
  _tile_release();
  free(ring);
  free(S);
  return nullptr;
}

// A chain of 3x3 convs run as one pass (a decoder stage: upsample + conv and its residual blocks;
// an encoder stage: its blocks and the stride-2 conv after them): per range of final output rows each
// thread keeps a ring of RING padded rows of every map but the last, and makes each row when a later
// row needs it (rows outside a map are zeros: the padding), so no map but the first and the last
// leaves the cache; each range recomputes the rows its neighbours also make at its edges. Each conv
// runs conv_row and rounds to bf16 as the one-layer calls do: the same bits.
constexpr int MAX_STAGES = 16;
// Rows kept per map: 3 (a conv reads rows r-1 .. r+1 of the map before it as it makes row r), 4 for
// a block's input (its skip reads row v when that map is made up to v + 3).
constexpr int RING = 3, SKIP_RING = 4;

struct Stage {
  const uint16_t* w;      // packed (amx.py pack_weight; pack_im2col_weight for an im2col stage)
  const float* bias;      // or null
  int stride, relu, res;  // res: the map whose row is added (a block's skip), -1 for none
  int im2col;             // stage 0 only: map 0 has C0 <= 3 channels; each output pixel's 3x3 x C0
                          // patch is gathered into KC values and multiplied as one 1x1 tap
  int narrow;             // the last stage only: Co <= 16 (conv_row_narrow; packed by pack_narrow_weight)
};

struct ChainJob {
  const uint16_t* x;      // map 0: [N][H0 >> up][W0 >> up][C0], rows x_row and images x_image elements apart
  long x_row, x_image;    // (a column strip of a wider map: its rows are that map's rows)
  uint16_t* y;            // map S's columns y_first .. y_first + y_count - 1: [N][H_S][y_count][C_S], rows
  long y_row, y_image;    // y_row and images y_image elements apart (a window of a wider map: a strip's
  int y_first, y_count;   // outputs that do not read its edges)
  int N, S, up, parts;
  Stage st[MAX_STAGES];
  int H[MAX_STAGES + 1], W[MAX_STAGES + 1], C[MAX_STAGES + 1];   // map 0 as read (upsampled)
  long items;
  std::atomic<long> next;
};

struct ChainState {
  const ChainJob* job;
  int n;
  uint16_t* ring[MAX_STAGES];
  long padded[MAX_STAGES];  // elements per padded row of map k
  int rows[MAX_STAGES];      // rows kept of map k (RING or SKIP_RING)
  int made[MAX_STAGES + 1];  // the next row of map k to make
  float* S;
  uint16_t* last;            // a row of map S when only a window of it goes to y, else null
  uint16_t* col;             // an im2col stage's row of patches: [groups * 32][KC], tails zero
  Prefetch pf;               // the next source row of map 0

  // Row r's patches: pixel x gets rows r-1 .. r+1, columns x-1 .. x+1, C0 channels each, as
  // (dy, dx, c) in its first 9 * C0 values (zeros outside the map; the rest stay zero): three masked
  // loads into one vector (each row's 3 * C0 values are contiguous in NHWC), one 64-byte store.
  void gather(int r) {
    const ChainJob* j = job;
    const int C = j->C[0], W = j->W[0], run = 3 * C;
    const uint16_t* src[3];
    for (int dy = 0; dy < 3; ++dy) {
      const int yy = r + dy - 1;
      src[dy] = yy < 0 || yy >= j->H[0] ? nullptr : input_row(yy);
    }
    const __mmask32 full = (1u << run) - 1;
    for (int x = 0; x < W; ++x) {
      __mmask32 m = full;
      if (x == 0) m &= ~((1u << C) - 1);          // column -1 is padding
      if (x == W - 1) m &= (1u << (2 * C)) - 1;    // column W is padding
      __m512i v = _mm512_setzero_si512();
      for (int dy = 0; dy < 3; ++dy)   // lanes dy * run .. read from the row's columns x-1 .. x+1
        if (src[dy]) v = _mm512_mask_loadu_epi16(v, m << (dy * run), src[dy] + (long)(x - 1) * C - dy * run);
      _mm512_store_si512(col + (long)x * KC, v);
    }
  }

  // Row r of the input as stored (before any upsampling).
  const uint16_t* input_row(int r) const { return job->x + n * job->x_image + r * job->x_row; }

  // Where row r of map k is made: its ring row, or (the last map) y's row or the window's scratch row.
  uint16_t* out_row(int k, int r) {
    if (k < job->S) return row(k, r) + job->C[k];
    return last ? last : job->y + n * job->y_image + r * job->y_row;
  }

  // The last map's row r made in the scratch row: its window to y.
  void done(int k, int r) {
    if (k == job->S && last)
      memcpy(job->y + n * job->y_image + r * job->y_row, last + (long)job->y_first * job->C[k],
             2L * job->y_count * job->C[k]);
  }

  uint16_t* row(int k, int r) { return ring[k] + (long)(((r % rows[k]) + rows[k]) % rows[k]) * padded[k]; }

  void need(int k, int r) { while (made[k] <= r) { make(k, made[k]); ++made[k]; } }

  void make(int k, int r) {
    const ChainJob* j = job;
    if (k == 0) {   // a row of the input (upsampled on the fly), zero outside it
      uint16_t* d = row(0, r);
      const int C = j->C[0], W = j->W[0], up = j->up;
      if (r < 0 || r >= j->H[0]) { memset(d, 0, 2 * padded[0]); return; }
      const uint16_t* src = input_row(r >> up);
      if (!up) memcpy(d + C, src, 2L * W * C);
      else for (int x = 0; x < W; ++x) memcpy(d + (long)(x + 1) * C, src + (long)(x >> 1) * C, 2 * C);
      if ((r >> up) + 1 < (j->H[0] >> up))   // the next distinct source row
        pf.later(input_row((r >> up) + 1), 2L * (W >> up) * C);
      return;
    }
    if (r < 0 || r >= j->H[k]) { memset(row(k, r) + j->C[k], 0, 2L * j->W[k] * j->C[k]); return; }
    const Stage& s = j->st[k - 1];
    if (s.im2col) {
      gather(r);
      if (r + 2 < j->H[0]) pf.later(input_row(r + 2), 2L * j->W[0] * j->C[0]);
      const uint16_t* rows[3] = {col, col, col};
      conv_row(rows, s.w, s.bias, nullptr, s.relu, out_row(k, r), j->W[k], (j->W[k] + 31) / 32, KC, j->C[k], S,
               1, 1, &pf);
      done(k, r);
      return;
    }
    need(k - 1, s.stride * r + 1);
    const uint16_t* rows[3] = {row(k - 1, s.stride * r - 1), row(k - 1, s.stride * r),
                               row(k - 1, s.stride * r + 1)};
    if (s.narrow) {   // the last stage
      conv_row_narrow(rows, s.w, s.bias, out_row(k, r), j->W[k], j->C[k - 1], j->C[k], S, &pf);
      done(k, r);
      return;
    }
    const uint16_t* res = nullptr;
    if (s.res >= 0) { need(s.res, r); res = row(s.res, r) + j->C[s.res]; }
    conv_row(rows, s.w, s.bias, res, s.relu, out_row(k, r), j->W[k], (j->W[k] + 31) / 32, j->C[k - 1], j->C[k],
             S, s.stride, 9, &pf);
    done(k, r);
  }
};

static void* chain_worker(void* arg) {
  ChainJob* job = (ChainJob*)arg;
  configure_tiles();
  ChainState st;
  st.job = job;
  long total = 0;
  for (int k = 0; k < job->S; ++k) st.rows[k] = RING;
  for (int k = 0; k < job->S; ++k)
    if (job->st[k].res >= 0) st.rows[job->st[k].res] = SKIP_RING;
  for (int k = 0; k < job->S; ++k) {   // map k is read by stage k: wide enough for its tile reads
    const int group = job->st[k].narrow ? 64 : 32;
    st.padded[k] = job->st[k].im2col ? 0
        : (long)(((job->W[k + 1] + group - 1) / group) * group * job->st[k].stride + 2) * job->C[k];
    total += st.rows[k] * st.padded[k];
  }
  const long col_elems = (long)((job->W[1] + 31) / 32) * 32 * KC;
  st.col = (uint16_t*)aligned_alloc(64, 2 * col_elems);
  memset(st.col, 0, 2 * col_elems);
  uint16_t* mem = (uint16_t*)aligned_alloc(64, ((2 * total + 63) / 64) * 64);
  memset(mem, 0, 2 * total);   // pads and tails stay zero
  for (long k = 0, off = 0; k < job->S; off += st.rows[k] * st.padded[k], ++k) st.ring[k] = mem + off;
  st.S = (float*)aligned_alloc(64, sizeof(float) * 2048);   // 2 x 32 x 32, or 64 x 16 (narrow)
  st.last = nullptr;
  if (job->y_count < job->W[job->S]) {   // every stage writes only the row's W pixels
    const long w = (long)job->W[job->S] * job->C[job->S];
    st.last = (uint16_t*)aligned_alloc(64, ((2 * w + 63) / 64) * 64);
  }
  const int H = job->H[job->S];
  for (long it; (it = job->next.fetch_add(1)) < job->items;) {
    st.n = (int)(it / job->parts);
    const int part = (int)(it % job->parts);
    const int y0 = (int)((long)H * part / job->parts), y1 = (int)((long)H * (part + 1) / job->parts);
    if (y0 >= y1) continue;
    st.made[job->S] = y0;
    for (int k = job->S - 1, lo = y0; k >= 0; --k) { lo = job->st[k].stride * lo - 1; st.made[k] = lo; }
    for (int k = 0; k < job->S; ++k)   // a skip's map may be needed below the conv chain's first row
      if (job->st[k].res >= 0 && st.made[job->st[k].res] > st.made[k + 1])
        st.made[job->st[k].res] = st.made[k + 1];
    st.need(job->S, y1 - 1);
  }
  _tile_release();
  free(mem);
  free(st.col);
  free(st.S);
  free(st.last);
  return nullptr;
}

// ---------------------------------------------------------------- the pool branch (taef2)
// y = x + W2 relu(GroupNorm(W1 x)): FLUX.2's pool branch of a residual block, 1x1 convs C -> Hd -> C
// without bias, GroupNorm over G groups of Hd / G channels and every pixel of the image. Two passes:
// the first runs W1 x on the tiles and sums each hidden channel and its square (double) per chunk of
// CHUNK pixels; the chunks are added in a fixed order (the same bits for any thread count), giving per
// channel scale a = gamma / sqrt(var + eps) and shift b = beta - mean * a. The second runs W1 x again,
// relu(a h + b) rounded to bf16 (the A tiles of W2), W2 on the tiles, + x, rounded once to bf16.
constexpr int CHUNK = 256;   // pixels per unit of work (and per partial sum)

struct PoolJob {
  const uint16_t* x;      // [N][P][C]
  uint16_t* y;            // [N][P][C]
  const uint16_t* w1;     // [C/32][Hd/16][16][16][2] (amx.py pack_1x1_weight)
  const uint16_t* w2;     // [Hd/32][C/16][16][16][2]
  double* part;           // [N * chunks][2][Hd]: sums and sums of squares per chunk (first pass)
  const float* scale;     // [N][Hd]: a, then b (second pass)
  int N, P, C, Hd, chunks, second;
  long items;
  std::atomic<long> next;
};

// h = W1 x for 16 pixels (A: rows of C bf16, stride C) into S [16][Hd] fp32.
static void pool_hidden(const PoolJob* j, const uint16_t* a, float* S) {
  const int nk = j->C / KC, nj = j->Hd / 16;
  for (int t = 0; t < nj; t += 4) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int k = 0; k < nk; ++k) {
      const uint16_t* b = j->w1 + ((long)k * nj + t) * 512;
      _tile_loadd(4, a + k * KC, 2 * j->C);
      _tile_loadd(5, b, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, b + 512, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, b + 1024, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, b + 1536, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, S + t * 16, 4 * j->Hd);
    _tile_stored(1, S + t * 16 + 16, 4 * j->Hd);
    _tile_stored(2, S + t * 16 + 32, 4 * j->Hd);
    _tile_stored(3, S + t * 16 + 48, 4 * j->Hd);
  }
}

static void* pool_worker(void* arg) {
  PoolJob* j = (PoolJob*)arg;
  configure_tiles();
  const int C = j->C, Hd = j->Hd;
  float* S = (float*)aligned_alloc(64, sizeof(float) * 16 * (Hd > C ? Hd : C));
  uint16_t* A = (uint16_t*)aligned_alloc(64, 2 * 16 * Hd);         // relu(a h + b), bf16
  uint16_t* edge = (uint16_t*)aligned_alloc(64, 2 * 16 * C);       // a partial block, zero-padded
  double* acc = (double*)aligned_alloc(64, sizeof(double) * 2 * Hd);
  for (long it; (it = j->next.fetch_add(1)) < j->items;) {
    const int n = (int)(it / j->chunks), p0 = (int)(it % j->chunks) * CHUNK;
    const int p1 = p0 + CHUNK < j->P ? p0 + CHUNK : j->P;
    const uint16_t* xn = j->x + (long)n * j->P * C;
    if (!j->second) memset(acc, 0, sizeof(double) * 2 * Hd);
    for (int p = p0; p < p1; p += 16) {
      const int np = p1 - p < 16 ? p1 - p : 16;
      const uint16_t* a = xn + (long)p * C;
      if (np < 16) {   // rows past the image are zero: h = 0 there (no bias), so the sums hold
        memset(edge, 0, 2 * 16 * C);
        memcpy(edge, a, 2L * np * C);
        a = edge;
      }
      pool_hidden(j, a, S);
      if (!j->second) {
        for (int c = 0; c < Hd; c += 16) {
          __m512 s = _mm512_setzero_ps(), q = _mm512_setzero_ps();
          for (int r = 0; r < 16; ++r) {
            const __m512 v = _mm512_load_ps(S + r * Hd + c);
            s = _mm512_add_ps(s, v);
            q = _mm512_fmadd_ps(v, v, q);
          }
          for (int h = 0; h < 2; ++h) {   // 16 pixels' sums in fp32, the chunk's in double
            const __m256 sh = h ? _mm512_extractf32x8_ps(s, 1) : _mm512_castps512_ps256(s);
            const __m256 qh = h ? _mm512_extractf32x8_ps(q, 1) : _mm512_castps512_ps256(q);
            _mm512_store_pd(acc + c + 8 * h, _mm512_add_pd(_mm512_load_pd(acc + c + 8 * h), _mm512_cvtps_pd(sh)));
            _mm512_store_pd(acc + Hd + c + 8 * h,
                            _mm512_add_pd(_mm512_load_pd(acc + Hd + c + 8 * h), _mm512_cvtps_pd(qh)));
          }
        }
        continue;
      }
      const float* ab = j->scale + (long)n * 2 * Hd;
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < Hd; c += 32) {
          __m512 v0 = _mm512_fmadd_ps(_mm512_load_ps(S + r * Hd + c), _mm512_loadu_ps(ab + c),
                                      _mm512_loadu_ps(ab + Hd + c));
          __m512 v1 = _mm512_fmadd_ps(_mm512_load_ps(S + r * Hd + c + 16), _mm512_loadu_ps(ab + c + 16),
                                      _mm512_loadu_ps(ab + Hd + c + 16));
          v0 = _mm512_max_ps(v0, _mm512_setzero_ps());
          v1 = _mm512_max_ps(v1, _mm512_setzero_ps());
          _mm512_store_si512(A + r * Hd + c, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
        }
      const int nk = Hd / KC, nc = C / 16;
      for (int t = 0; t < nc; t += 4) {   // C % 32 == 0: 2 or 4 output tiles at a time
        const int m = nc - t < 4 ? nc - t : 4;
        for (int u = 0; u < m; ++u) {
          if (u == 0) _tile_zero(0);
          if (u == 1) _tile_zero(1);
          if (u == 2) _tile_zero(2);
          if (u == 3) _tile_zero(3);
        }
        for (int k = 0; k < nk; ++k) {
          const uint16_t* b = j->w2 + ((long)k * nc + t) * 512;
          _tile_loadd(4, A + k * KC, 2 * Hd);
          _tile_loadd(5, b, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(6, b + 512, 64);
          _tile_dpbf16ps(1, 4, 6);
          if (m == 4) {
            _tile_loadd(7, b + 1024, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, b + 1536, 64);
            _tile_dpbf16ps(3, 4, 5);
          }
        }
        _tile_stored(0, S + t * 16, 4 * C);
        _tile_stored(1, S + t * 16 + 16, 4 * C);
        if (m == 4) {
          _tile_stored(2, S + t * 16 + 32, 4 * C);
          _tile_stored(3, S + t * 16 + 48, 4 * C);
        }
      }
      uint16_t* out = j->y + ((long)n * j->P + p) * C;
      for (int r = 0; r < np; ++r)
        for (int c = 0; c < C; c += 32) {
          const __m512 v0 = _mm512_add_ps(_mm512_load_ps(S + r * C + c), bf16x16(a + r * C + c));
          const __m512 v1 = _mm512_add_ps(_mm512_load_ps(S + r * C + c + 16), bf16x16(a + r * C + c + 16));
          _mm512_storeu_si512(out + (long)r * C + c, (__m512i)_mm512_cvtne2ps_pbh(v1, v0));
        }
    }
    if (!j->second) memcpy(j->part + it * 2 * Hd, acc, sizeof(double) * 2 * Hd);
  }
  _tile_release();
  free(S); free(A); free(edge); free(acc);
  return nullptr;
}

template <class J>
static void run_threads(void* (*fn)(void*), J* job, int threads, long items) {
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > items) threads = (int)items;
#ifdef _OPENMP
  // PyTorch's own OpenMP threads (the process's libgomp): its workers would otherwise spin beside ours.
#pragma omp parallel num_threads(threads)
  fn(job);
#else
  pthread_t tids[64];
  int started = 0;
  for (int i = 1; i < threads; ++i)
    if (pthread_create(&tids[started], nullptr, fn, job) == 0) ++started;
  fn(job);
  for (int i = 0; i < started; ++i) pthread_join(tids[i], nullptr);
#endif
}

}  // namespace

extern "C" {

// Ask Linux for the AMX tile state (once per process; 0 when granted).
int taesd_amx_permit() {
  return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
}

// The tile unit's rate on the calling core, for benchmarks/bench_amx.py's "% of peak": seconds for
// `steps` x four TDPBF16PS on tiles already loaded (no memory traffic); -1 without AMX.
double taesd_amx_peak(long steps) {
  if (taesd_amx_permit() != 0) return -1;
  configure_tiles();
  alignas(64) static uint16_t ones[1024];
  for (int i = 0; i < 1024; ++i) ones[i] = 0x3f80;   // bf16 1.0
  _tile_loadd(4, ones, 64); _tile_loadd(5, ones, 64); _tile_loadd(6, ones, 64); _tile_loadd(7, ones, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < steps; ++i) {
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) static float sink[256];
  _tile_stored(0, sink, 64);   // the products must happen
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return s;
}

// y = act(conv3x3(up ? upsample2x(x) : x, stride) + bias + res). Hv, Wv: the size of the map the conv
// reads (x's, or twice it with up); the output is (Hv - 1) / stride + 1 high (and as wide).
// Ci % 32 == 0, Co % 32 == 0. Returns 0, 1 (shapes), 2 (odd size with up) or 4 (no AMX).
int taesd_amx_conv3x3(const void* x, int N, int Hv, int Wv, int Ci, const void* w, int Co,
                      const float* bias, const void* res, int relu, void* y, int threads, int up,
                      int stride) {
  if (Ci % KC || Co % 32 || N < 1 || Hv < 1 || Wv < 1 || (stride != 1 && stride != 2)) return 1;
  if (up && (Hv % 2 || Wv % 2 || stride != 1)) return 2;
  const int H = (Hv - 1) / stride + 1, W = (Wv - 1) / stride + 1;
  if (taesd_amx_permit() != 0) return 4;
  Job job;
  job.x = (const uint16_t*)x; job.w = (const uint16_t*)w; job.bias = bias;
  job.res = (const uint16_t*)res; job.y = (uint16_t*)y;
  job.N = N; job.H = H; job.W = W; job.Ci = Ci; job.Co = Co; job.relu = relu; job.up = up;
  job.Hv = Hv; job.Wv = Wv; job.stride = stride;
  job.groups = (W + 31) / 32;
  job.per_image = (H + BAND - 1) / BAND;
  job.bands = (long)N * job.per_image;
  job.next.store(0);
  run_threads(worker, &job, threads, job.bands);
  return 0;
}

// y = relu(conv2(relu(conv1(relu(conv0(x))))) + x): TAESD's residual block with an identity skip,
// C -> C channels (C % 32 == 0), weights packed as for taesd_amx_conv3x3. Returns as it does.
int taesd_amx_block(const void* x, int N, int H, int W, int C, const void* w0, const float* b0,
                    const void* w1, const float* b1, const void* w2, const float* b2, void* y, int threads) {
  if (C % 32 || N < 1 || H < 1 || W < 1) return 1;
  if (taesd_amx_permit() != 0) return 4;
  BlockJob job;
  job.x = (const uint16_t*)x; job.y = (uint16_t*)y;
  job.w[0] = (const uint16_t*)w0; job.w[1] = (const uint16_t*)w1; job.w[2] = (const uint16_t*)w2;
  job.b[0] = b0; job.b[1] = b1; job.b[2] = b2;
  job.N = N; job.H = H; job.W = W; job.C = C; job.groups = (W + 31) / 32;
  // One row range per thread and image, of 16 rows at least: each range recomputes 6 rows at its edges.
  int parts = threads < 1 ? 1 : threads;
  if (parts > H / 16) parts = H / 16 > 1 ? H / 16 : 1;
  job.parts = parts;
  job.items = (long)N * job.parts;
  job.next.store(0);
  run_threads(block_worker, &job, threads, job.items);
  return 0;
}

// A chain of S 3x3 convs (see ChainJob): map 0 is x (H0 x W0 as read: twice x's size with up;
// with im2col, x has C[0] <= 3 channels and stage 0 gathers its patches, as a network's first conv;
// with narrow, the last stage goes to C[S] <= 16 channels, as a decoder's last conv),
// stage k reads map k and writes map k + 1 (C[k] -> C[k + 1] channels, stride[k], relu[k], bias[k] or
// null, res[k]: the map added before the ReLU or -1); the last map goes to y. Channels % 32 == 0;
// a skip's map has the stage's output size and channels. x_row, x_image: elements between x's rows
// and images (0: x is dense; more: x is a column strip of a wider map). y_count > 0: only the last
// map's columns y_first .. y_first + y_count - 1 go to y, its rows y_row and images y_image elements
// apart (a window of a wider map); 0: all of it, dense. Returns as taesd_amx_conv3x3 does.
int taesd_amx_chain(const void* x, void* y, int N, int H0, int W0, int up, int S, const int* C,
                    const void* const* w, const float* const* bias, const int* stride, const int* relu,
                    const int* res, int im2col, int narrow, int threads, long x_row, long x_image,
                    long y_row, long y_image, int y_first, int y_count) {
  if (S < 1 || S > MAX_STAGES || N < 1 || H0 < 1 || W0 < 1) return 1;
  if (up && (H0 % 2 || W0 % 2 || stride[0] != 1 || im2col)) return 2;
  if (im2col && (C[0] < 1 || 9 * C[0] > KC || stride[0] != 1)) return 1;
  if (taesd_amx_permit() != 0) return 4;
  ChainJob job;
  job.x = (const uint16_t*)x; job.y = (uint16_t*)y; job.N = N; job.S = S; job.up = up;
  job.H[0] = H0; job.W[0] = W0;
  {
    const long row = (long)(W0 >> up) * C[0], image = (long)(H0 >> up) * (x_row ? x_row : row);
    if ((x_row && x_row < row) || (x_image && N > 1 && x_image < image)) return 1;
    job.x_row = x_row ? x_row : row;
    job.x_image = x_image ? x_image : image;
  }
  if (narrow && (C[S] < 1 || C[S] > 16 || stride[S - 1] != 1 || res[S - 1] >= 0 || relu[S - 1]
                 || (S == 1 && (im2col || up)))) return 1;
  for (int k = 0; k <= S; ++k) {
    if ((C[k] % 32 || C[k] < 32) && !(k == 0 && im2col) && !(k == S && narrow)) return 1;
    job.C[k] = C[k];
  }
  for (int k = 0; k < S; ++k) {
    if (stride[k] != 1 && stride[k] != 2) return 1;
    job.st[k] = Stage{(const uint16_t*)w[k], bias[k], stride[k], relu[k], res[k], k == 0 ? im2col : 0,
                      k == S - 1 ? narrow : 0};
    job.H[k + 1] = (job.H[k] - 1) / stride[k] + 1;
    job.W[k + 1] = (job.W[k] - 1) / stride[k] + 1;
  }
  {
    const int Wl = job.W[S], Hl = job.H[S];
    if (y_count == 0) { y_first = 0; y_count = Wl; }
    const long row = (long)y_count * C[S];
    if (y_first < 0 || y_count < 1 || y_first + y_count > Wl || (y_row && y_row < row)
        || (y_image && N > 1 && y_image < Hl * (y_row ? y_row : row)))
      return 1;
    job.y_row = y_row ? y_row : row;
    job.y_image = y_image ? y_image : Hl * job.y_row;
    job.y_first = y_first;
    job.y_count = y_count;
  }
  for (int k = 0; k < S; ++k) {
    const int r = res[k];
    if (r >= 0 && (r > k || (r == 0 && im2col) || job.H[r] != job.H[k + 1] || job.W[r] != job.W[k + 1]
                   || C[r] != C[k + 1]))
      return 1;
  }
  // One row range per thread and image, of 16 final rows at least.
  int parts = threads < 1 ? 1 : threads;
  const int H = job.H[S];
  if (parts > H / 16) parts = H / 16 > 1 ? H / 16 : 1;
  job.parts = parts;
  job.items = (long)N * parts;
  job.next.store(0);
  run_threads(chain_worker, &job, threads, job.items);
  return 0;
}


// y = x + W2 relu(GroupNorm(W1 x)) (see PoolJob), x and y [N][P][C] bf16 (y may not be x), C % 32 == 0,
// Hd % 64 == 0, G groups dividing Hd; gamma, beta: [Hd] fp32. Returns as taesd_amx_conv3x3 does.
int taesd_amx_pool(const void* x, void* y, int N, int P, int C, int Hd, const void* w1, const void* w2,
                   const float* gamma, const float* beta, int G, double eps, int threads) {
  if (C % 32 || Hd % 64 || N < 1 || P < 1 || G < 1 || Hd % G) return 1;
  if (taesd_amx_permit() != 0) return 4;
  PoolJob job;
  job.x = (const uint16_t*)x; job.y = (uint16_t*)y; job.w1 = (const uint16_t*)w1;
  job.w2 = (const uint16_t*)w2; job.N = N; job.P = P; job.C = C; job.Hd = Hd;
  job.chunks = (P + CHUNK - 1) / CHUNK;
  job.items = (long)N * job.chunks;
  double* part = (double*)malloc(sizeof(double) * 2 * Hd * job.items);
  float* scale = (float*)malloc(sizeof(float) * 2 * Hd * N);
  if (!part || !scale) { free(part); free(scale); return 3; }
  job.part = part; job.scale = scale; job.second = 0;
  job.next.store(0);
  run_threads(pool_worker, &job, threads, job.items);
  const int cg = Hd / G;
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) {
      double s = 0, q = 0;
      for (int k = 0; k < job.chunks; ++k) {    // chunks in order: the same sum for any thread count
        const double* pk = part + ((long)n * job.chunks + k) * 2 * Hd;
        for (int c = g * cg; c < (g + 1) * cg; ++c) { s += pk[c]; q += pk[Hd + c]; }
      }
      const double count = (double)P * cg, mean = s / count;
      const double var = q / count - mean * mean;
      const double inv = 1.0 / sqrt((var > 0 ? var : 0) + eps);
      for (int c = g * cg; c < (g + 1) * cg; ++c) {
        const double a = gamma[c] * inv;
        scale[(long)n * 2 * Hd + c] = (float)a;
        scale[(long)n * 2 * Hd + Hd + c] = (float)(beta[c] - mean * a);
      }
    }
  job.second = 1;
  job.next.store(0);
  run_threads(pool_worker, &job, threads, job.items);
  free(part);
  free(scale);
  return 0;
}

}
