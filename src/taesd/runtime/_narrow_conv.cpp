// Direct 3x3 convolution (stride 1, zero padding 1) with few output channels: the decoder's last
// conv, 64 -> 3 (RGB). oneDNN blocks its outputs by 16 and runs it at a few % of the vector peak
// (512² decode, 2 threads, AMD Zen 4: 26 ms in fp32, 14 ms in bf16); here each output pixel is a
// dot product over 9 taps x Ci input channels, vectorised over the input channels, 8 pixels (AVX2: 3) x
// up to 3 output channels at a time in 24 (9) accumulators (each weight load serves them all; interior pixels
// without bounds checks): 2.6x oneDNN in fp32, 3.2x in bf16 there. NHWC activations, fp32 or bf16
// (vdpbf16ps: pairs of input channels per step, fp32 sums). Per output pixel the sum order is fixed (taps, channel
// chunks, one reduction), so a tile of a map gives the same bits as the map.
#include <immintrin.h>
#include <pthread.h>
#include <atomic>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define TAESD_BF16 1
#else
#define TAESD_BF16 0
#endif

namespace {

// Output pixels per step: P x CG accumulators + CG weights + 1 input must fit the vector registers,
// 28 of AVX-512's 32; AVX2 has 16, so 13 there (8 pixels spilled: 512² fp32, 2-core Zen 3, 17-19 ms
// against 9-13 ms with 3; 2, 4 and 5 pixels measured in between). Each pixel's sums are the same.
#ifdef __AVX512F__
constexpr int P = 8;
#else
constexpr int P = 3;
#endif
constexpr int CG = 3;   // output channels per step

struct Job {
  const void *x, *w;
  const float* bias;
  void* y;
  int N, H, W, Ci, Co, bf16;
  std::atomic<long> next;   // the next output row (over the batch)
};

#ifdef __AVX512F__
typedef __m512 acc_t;
constexpr int LANES = 16;   // fp32 input channels per accumulator step
static inline acc_t zero() { return _mm512_setzero_ps(); }
static inline float total(acc_t a) { return _mm512_reduce_add_ps(a); }
typedef __m512 val_t;       // one step's input or weight values (16 fp32 or 32 bf16)
static inline val_t load(const void* p) { return _mm512_loadu_ps(p); }
// acc += x * w: 16 fp32 channels, or 32 bf16 channels as 16 pairs
template <bool BF> static inline acc_t step(acc_t acc, val_t x, val_t w) {
#if TAESD_BF16
  if constexpr (BF) return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
#endif
  return _mm512_fmadd_ps(x, w, acc);
}
#else
typedef __m256 acc_t;
constexpr int LANES = 8;
static inline acc_t zero() { return _mm256_setzero_ps(); }
static inline float total(acc_t a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
typedef __m256 val_t;
static inline val_t load(const void* p) { return _mm256_loadu_ps((const float*)p); }
template <bool BF> static inline acc_t step(acc_t acc, val_t x, val_t w) { return _mm256_fmadd_ps(x, w, acc); }
#endif

static inline void store(void* y, long i, float v, bool bf16) {
  if (bf16) {   // round to nearest even, as the other kernels' bf16 outputs
    uint32_t u;
    __builtin_memcpy(&u, &v, 4);
    u += 0x7fff + ((u >> 16) & 1);
    ((uint16_t*)y)[i] = (uint16_t)(u >> 16);
  } else {
    ((float*)y)[i] = v;
  }
}

// NC output channels from c0 for up to P pixels from ox of output row oy: the weights of a step
// loaded once for all P pixels (P x NC accumulators + NC weights + 1 input in registers).
// INNER: all P pixels and their left/right neighbours lie inside the row (no per-pixel checks).
template <bool BF, int NC, bool INNER>
static inline void group(const Job* job, const char* x, long yrow, int oy, int ox, int c0) {
  const int H = job->H, W = job->W, Ci = job->Ci;
  constexpr int es = BF ? 2 : 4;                    // bytes per value
  constexpr int chunk = BF ? 2 * LANES : LANES;     // channels per accumulator step
  const int np = W - ox < P ? W - ox : P;
  const char* w = (const char*)job->w + (long)c0 * 9 * Ci * es;
  acc_t acc[P][NC];
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < NC; ++c) acc[p][c] = zero();
  for (int ky = 0; ky < 3; ++ky) {
    const int iy = oy + ky - 1;
    if (iy < 0 || iy >= H) continue;                // zero padding: the tap adds nothing
    for (int kx = 0; kx < 3; ++kx) {
      for (int k = 0; k < Ci; k += chunk) {
        val_t wv[NC];
        for (int c = 0; c < NC; ++c) wv[c] = load(w + ((long)(c * 9 + ky * 3 + kx) * Ci + k) * es);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          const int ix = ox + p + kx - 1;
          if (!INNER && (p >= np || ix < 0 || ix >= W)) continue;
          val_t xv = load(x + (((long)iy * W + ix) * Ci + k) * es);
          for (int c = 0; c < NC; ++c) acc[p][c] = step<BF>(acc[p][c], xv, wv[c]);
        }
      }
    }
  }
  for (int p = 0; p < np; ++p)
    for (int c = 0; c < NC; ++c) {
      float v = total(acc[p][c]) + (job->bias ? job->bias[c0 + c] : 0.0f);
      store(job->y, (yrow + ox + p) * job->Co + c0 + c, v, BF);
    }
}

// One output row (over the batch): pixels P at a time, output channels CG at a time.
template <bool BF>
static void row(const Job* job, long r) {
  const int H = job->H, W = job->W, Ci = job->Ci, Co = job->Co;
  const long n = r / H;
  const int oy = (int)(r % H);
  const char* x = (const char*)job->x + n * (long)H * W * Ci * (BF ? 2 : 4);
  const long yrow = r * W;   // the row's first pixel in y
  for (int ox = 0; ox < W; ox += P) {
    const bool inner = ox >= 1 && ox + P < W;
    for (int c0 = 0; c0 < Co; c0 += CG) {
      switch ((Co - c0 < CG ? Co - c0 : CG) + (inner ? 0 : CG)) {
        case 1: group<BF, 1, true>(job, x, yrow, oy, ox, c0); break;
        case 2: group<BF, 2, true>(job, x, yrow, oy, ox, c0); break;
        case 3: group<BF, 3, true>(job, x, yrow, oy, ox, c0); break;
        case 4: group<BF, 1, false>(job, x, yrow, oy, ox, c0); break;
        case 5: group<BF, 2, false>(job, x, yrow, oy, ox, c0); break;
        default: group<BF, 3, false>(job, x, yrow, oy, ox, c0); break;
      }
    }
  }
}

template <bool BF>
static void* worker(void* arg) {
  Job* job = (Job*)arg;
  const long rows = (long)job->N * job->H;
  for (long r; (r = job->next.fetch_add(1)) < rows;) row<BF>(job, r);
  return nullptr;
}

}  // namespace

extern "C" {

// 1 where this build runs bf16 activations (AVX-512-BF16), else 0.
int taesd_narrow_has_bf16() { return TAESD_BF16; }

// y[N,H,W,Co] = conv3x3(x) + bias; x [N,H,W,Ci] and y NHWC contiguous, fp32, or bf16 when bf16 == 1
// (w then bf16 too); w is [Co][3][3][Ci]; bias fp32 or null. Ci % 16 == 0 (fp32) or % 32 (bf16).
// Returns 0 on success.
int taesd_narrow_conv3x3(const void* x, int N, int H, int W, int Ci, const void* w, int Co,
                         const float* bias, void* y, int threads, int bf16) {
  if (N < 1 || H < 1 || W < 1 || Co < 1 || Ci % (bf16 ? 2 * LANES : LANES)) return 1;
  if (bf16 && !TAESD_BF16) return 3;
  Job job;
  job.x = x; job.w = w; job.bias = bias; job.y = y;
  job.N = N; job.H = H; job.W = W; job.Ci = Ci; job.Co = Co; job.bf16 = bf16;
  job.next.store(0);
  void* (*fn)(void*) = bf16 ? worker<true> : worker<false>;
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > (long)N * H) threads = (int)((long)N * H);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  fn(&job);
#else
  pthread_t tids[64];
  int started = 0;
  for (int i = 1; i < threads; ++i)
    if (pthread_create(&tids[started], nullptr, fn, &job) == 0) ++started;
  fn(&job);
  for (int i = 0; i < started; ++i) pthread_join(tids[i], nullptr);
#endif
  return 0;
}

}
