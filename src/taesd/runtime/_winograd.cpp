// Winograd F(m x m, 3x3) convolution for TAESD's 3x3, stride 1, zero-padding 1 layers.
// fp32, NHWC (channels_last) activations. Built at first use by taesd/winograd.py with the
// machine's compiler (no PyTorch headers: a plain C ABI called through ctypes).
//
// Per block of TB output tiles (tiles are numbered over the whole batch, so only the last block
// is partial): transform the (m+2)^2 input patches of all channels (B^T d B), one small GEMM per
// transform point against the pre-transformed weights U (A2 x Ci x Co), then the output transform
// (A^T M A) with bias, optional residual add and ReLU fused, written straight into the output.
// Everything a block touches (~250 KB) stays in L2; U streams from L2/L3.
//
// F(4x4,3x3) does 36 instead of 144 multiply-adds per 4x4 output tile and channel pair (4x fewer);
// F(2x2,3x3) 16 instead of 36 (2.25x). Transform matrices: Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks" (2015).
#include <immintrin.h>
#include <pthread.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512F__)
#define TAESD_BF16 1   // bf16 activations and a bf16 dot-product GEMM (vdpbf16ps), fp32 sums
#else
#define TAESD_BF16 0
#endif

typedef __m256 v8;  // 8 channels; GCC/Clang allow +, -, * (also with a float scalar) on it

namespace {

constexpr int TB = 12;   // tiles per block (GEMM rows): two 6-row micro-kernel passes
constexpr int MR = 6;    // micro-kernel rows (tiles) x 16 columns (output channels)

#ifdef __AVX512F__
int g_width = 512;       // the GEMM's vector width in bits: 512, or 256 (taesd_winograd_width)
#else
int g_width = 256;
#endif

template <int M> struct Wino;

// The 1-D transforms, on any vector of channels (v8, or v16 where the build has AVX-512): GCC and
// Clang allow +, -, and * by a float scalar on both.
template <> struct Wino<2> {
  static constexpr int A = 4;
  template <class V> static inline void in1d(const V* d, int s, V* v, int t) {   // v = B^T d
    V d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
    v[0] = d0 - d2; v[t] = d1 + d2; v[2 * t] = d2 - d1; v[3 * t] = d1 - d3;
  }
  template <class V> static inline void out1d(const V* m, int s, V* y, int t) {  // y = A^T m
    V m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s];
    y[0] = m0 + m1 + m2; y[t] = m1 - m2 - m3;
  }
};

template <> struct Wino<4> {
  static constexpr int A = 6;
  template <class V> static inline void in1d(const V* d, int s, V* v, int t) {
    V d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
    V a = d4 - 4.0f * d2, b = d3 - 4.0f * d1;     // shared terms of rows 1, 2
    V c = d4 - d2, e = 2.0f * (d3 - d1);          // rows 3, 4
    v[0] = 4.0f * d0 - 5.0f * d2 + d4;
    v[t] = a + b; v[2 * t] = a - b;
    v[3 * t] = c + e; v[4 * t] = c - e;
    v[5 * t] = 4.0f * d1 - 5.0f * d3 + d5;
  }
  template <class V> static inline void out1d(const V* m, int s, V* y, int t) {
    V m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
    V p12 = m1 + m2, q12 = m1 - m2, p34 = m3 + m4, q34 = m3 - m4;
    y[0] = m0 + p12 + p34; y[t] = q12 + 2.0f * q34;
    y[2 * t] = p12 + 4.0f * p34; y[3 * t] = q12 + 8.0f * q34 + m5;
  }
};

// 8 channels of an activation, in fp32 whatever the storage: bf16 is the top half of an fp32.
template <bool BF> static inline v8 load8(const void* p, long i) {
  if constexpr (BF) {
    __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps((const float*)p + i);
  }
}

template <bool BF> static inline void store8(void* p, long i, v8 v) {
#if TAESD_BF16
  if constexpr (BF) {
    __m128bh b = _mm256_cvtneps_pbh(v);   // round to nearest even
    _mm_storeu_si128((__m128i*)((uint16_t*)p + i), (__m128i)b);
    return;
  }
#endif
  _mm256_storeu_ps((float*)p + i, v);
}

// The same on 16 channels (AVX-512 builds): the transforms touch every activation once per tile
// point, and at 8 channels a step they took ~30% of a 64-channel layer.
#ifdef __AVX512F__
typedef __m512 v16;
template <bool BF> static inline v16 load16(const void* p, long i) {
  if constexpr (BF) {
    __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps((const float*)p + i);
  }
}

template <bool BF> static inline void store16(void* p, long i, v16 v) {
#if TAESD_BF16
  if constexpr (BF) {
    __m256bh b = _mm512_cvtneps_pbh(v);
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), (__m256i)b);
    return;
  }
#endif
  _mm512_storeu_ps((float*)p + i, v);
}
#endif

// Loads, stores and the few intrinsics the transforms need, chosen by the number of lanes L.
template <int L> struct Vec;
template <> struct Vec<8> {
  typedef v8 T;
  template <bool BF> static inline v8 load(const void* p, long i) { return load8<BF>(p, i); }
  template <bool BF> static inline void store(void* p, long i, v8 v) { store8<BF>(p, i, v); }
  static inline v8 loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline v8 zero() { return _mm256_setzero_ps(); }
  static inline v8 max(v8 a, v8 b) { return _mm256_max_ps(a, b); }
};
#ifdef __AVX512F__
template <> struct Vec<16> {
  typedef v16 T;
  template <bool BF> static inline v16 load(const void* p, long i) { return load16<BF>(p, i); }
  template <bool BF> static inline void store(void* p, long i, v16 v) { store16<BF>(p, i, v); }
  static inline v16 loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline v16 zero() { return _mm512_setzero_ps(); }
  static inline v16 max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
};
#endif

struct Job {
  const void *x, *U, *res;   // float, or bf16 (uint16_t) on the bf16 path
  const float* bias;
  void* y;
  int N, H, W, Ci, Co, relu, TH, TW, up;  // up: the input is H/2 x W/2, read nearest-upsampled
  long ntiles, nblocks;
  std::atomic<long> next;
};

#ifdef __AVX512F__
// AVX-512 (when the build targets it): 6 rows x 64 output channels per pass in 24 zmm accumulators,
// 4 weight loads + 6 broadcasts per 24 FMAs (AVX2: 8 per 12 half-width FMAs). Co % 64 == 0.
static inline void gemm512(const float* V, const float* U, float* C, int Ci, int Co) {
  for (int r = 0; r < TB; r += MR) {
    const float* Vr = V + r * Ci;
    for (int o = 0; o < Co; o += 64) {
      __m512 acc[MR][4];
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
      const float* Uo = U + o;
      for (int k = 0; k < Ci; ++k) {
        const float* u = Uo + k * Co;
        __m512 u0 = _mm512_loadu_ps(u), u1 = _mm512_loadu_ps(u + 16), u2 = _mm512_loadu_ps(u + 32),
               u3 = _mm512_loadu_ps(u + 48);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          __m512 a = _mm512_set1_ps(Vr[i * Ci + k]);
          acc[i][0] = _mm512_fmadd_ps(a, u0, acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(a, u1, acc[i][1]);
          acc[i][2] = _mm512_fmadd_ps(a, u2, acc[i][2]);
          acc[i][3] = _mm512_fmadd_ps(a, u3, acc[i][3]);
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(C + (r + i) * Co + o + 16 * q, acc[i][q]);
    }
  }
}
#endif

#if TAESD_BF16
// bf16 GEMM: V[TB x Ci] bf16, U as [Ci/2][Co][2] bf16 (pairs of input channels side by side, what
// vdpbf16ps multiplies and adds in one step), C fp32. 6 rows x 64 output channels per pass.
static inline void gemm_bf16(const uint16_t* V, const uint16_t* U, float* C, int Ci, int Co) {
  for (int r = 0; r < TB; r += MR) {
    const uint16_t* Vr = V + r * Ci;
    for (int o = 0; o < Co; o += 64) {
      __m512 acc[MR][4];
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
      for (int k2 = 0; k2 < Ci / 2; ++k2) {
        const uint32_t* u = (const uint32_t*)U + (long)k2 * Co + o;
        __m512bh u0 = (__m512bh)_mm512_loadu_si512(u), u1 = (__m512bh)_mm512_loadu_si512(u + 16),
                 u2 = (__m512bh)_mm512_loadu_si512(u + 32), u3 = (__m512bh)_mm512_loadu_si512(u + 48);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          uint32_t pair;
          memcpy(&pair, Vr + i * Ci + 2 * k2, 4);
          __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, u0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, u1);
          acc[i][2] = _mm512_dpbf16_ps(acc[i][2], a, u2);
          acc[i][3] = _mm512_dpbf16_ps(acc[i][3], a, u3);
        }
      }
      for (int i = 0; i < MR; ++i)
        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(C + (r + i) * Co + o + 16 * q, acc[i][q]);
    }
  }
}
#endif

// C[TB x Co] = V[TB x Ci] * U[Ci x Co], rows MR at a time, 16 output channels at a time.
static inline void gemm(const float* V, const float* U, float* C, int Ci, int Co) {
#ifdef __AVX512F__
  if (Co % 64 == 0 && g_width == 512) return gemm512(V, U, C, Ci, Co);
#endif
  for (int r = 0; r < TB; r += MR) {
    const float* Vr = V + r * Ci;
    for (int o = 0; o < Co; o += 16) {
      v8 acc[MR][2];
      for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      const float* Uo = U + o;
      for (int k = 0; k < Ci; ++k) {
        v8 u0 = _mm256_loadu_ps(Uo + k * Co), u1 = _mm256_loadu_ps(Uo + k * Co + 8);
#pragma GCC unroll 6
        for (int i = 0; i < MR; ++i) {
          v8 a = _mm256_broadcast_ss(Vr + i * Ci + k);
          acc[i][0] = _mm256_fmadd_ps(a, u0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, u1, acc[i][1]);
        }
      }
      for (int i = 0; i < MR; ++i) {
        _mm256_storeu_ps(C + (r + i) * Co + o, acc[i][0]);
        _mm256_storeu_ps(C + (r + i) * Co + o + 8, acc[i][1]);
      }
    }
  }
}

// 1. input transform of the tiles t0 .. t0+TB-1: V[p][ti][c] = (B^T d B)[p], L channels a step.
template <int M, bool BF, int L>
static inline void input_tiles(const Job* job, long t0, void* V) {
  constexpr int A = Wino<M>::A, A2 = A * A;
  typedef typename Vec<L>::T VT;
  const int Ci = job->Ci, H = job->H, W = job->W, up = job->up, Ws = W >> up;  // Ws: stored width
  const long per_image = (long)job->TH * job->TW;
  VT d[A2], t1[A2], mm[A2];
  const VT zero = Vec<L>::zero();
  for (int ti = 0; ti < TB; ++ti) {
    long t = t0 + ti;
    if (t >= job->ntiles) {   // padding rows of the last block
      for (int p = 0; p < A2; ++p) memset((char*)V + (p * TB + ti) * Ci * (BF ? 2 : 4), 0, (BF ? 2 : 4) * Ci);
      continue;
    }
    long n = t / per_image, rc = t % per_image;
    int oy = (int)(rc / job->TW) * M - 1, ox = (int)(rc % job->TW) * M - 1;
    const long xn = n * ((long)H >> up) * Ws * Ci;
    for (int c = 0; c < Ci; c += L) {
      for (int i = 0; i < A; ++i) {
        int yy = oy + i;
        for (int j = 0; j < A; ++j) {
          int xx = ox + j;
          d[i * A + j] = (yy >= 0 && yy < H && xx >= 0 && xx < W)
              ? Vec<L>::template load<BF>(job->x, xn + ((long)(yy >> up) * Ws + (xx >> up)) * Ci + c) : zero;
        }
      }
      for (int j = 0; j < A; ++j) Wino<M>::in1d(d + j, A, t1 + j, A);      // columns: B^T d
      for (int i = 0; i < A; ++i) Wino<M>::in1d(t1 + i * A, 1, mm + i * A, 1);  // rows: (.) B
      for (int p = 0; p < A2; ++p) Vec<L>::template store<BF>(V, (p * TB + ti) * Ci + c, mm[p]);
    }
  }
}

// 3. output transform of the same tiles, with bias, residual and ReLU, into y.
template <int M, bool BF, int L>
static inline void output_tiles(const Job* job, long t0, const float* Mb) {
  constexpr int A = Wino<M>::A, A2 = A * A;
  typedef typename Vec<L>::T VT;
  const int Co = job->Co, H = job->H, W = job->W;
  const long per_image = (long)job->TH * job->TW;
  VT mm[A2], s[M * A], yv[M * M];
  const VT zero = Vec<L>::zero();
  for (int ti = 0; ti < TB; ++ti) {
    long t = t0 + ti;
    if (t >= job->ntiles) break;
    long n = t / per_image, rc = t % per_image;
    int oy = (int)(rc / job->TW) * M, ox = (int)(rc % job->TW) * M;
    const long yn = n * (long)H * W * Co;   // this image's offset in y and res
    for (int c = 0; c < Co; c += L) {
      for (int p = 0; p < A2; ++p) mm[p] = Vec<L>::loadf(Mb + (p * TB + ti) * Co + c);
      for (int j = 0; j < A; ++j) Wino<M>::out1d(mm + j, A, s + j, A);      // A^T m (rows)
      for (int a = 0; a < M; ++a) Wino<M>::out1d(s + a * A, 1, yv + a * M, 1);  // (.) A
      VT b = job->bias ? Vec<L>::loadf(job->bias + c) : zero;
      for (int a = 0; a < M; ++a) {
        int yy = oy + a;
        if (yy >= H) break;
        for (int bq = 0; bq < M; ++bq) {
          int xx = ox + bq;
          if (xx >= W) break;
          long off = yn + ((long)yy * W + xx) * Co + c;
          VT r = yv[a * M + bq] + b;
          if (job->res) r = r + Vec<L>::template load<BF>(job->res, off);
          if (job->relu) r = Vec<L>::max(r, zero);
          Vec<L>::template store<BF>(job->y, off, r);
        }
      }
    }
  }
}

template <int M, bool BF>
static void run_blocks(Job* job) {
  constexpr int A = Wino<M>::A, A2 = A * A;
  const int Ci = job->Ci, Co = job->Co;
  // V holds the transformed input: fp32, or bf16 for the bf16 GEMM (half the bytes, same index)
  float* V = (float*)aligned_alloc(64, sizeof(float) * A2 * TB * Ci);
  float* Mb = (float*)aligned_alloc(64, sizeof(float) * A2 * TB * Co);
#ifdef __AVX512F__
  const bool wide_in = g_width == 512 && Ci % 16 == 0, wide_out = g_width == 512 && Co % 16 == 0;
#endif
  for (long blk; (blk = job->next.fetch_add(1)) < job->nblocks;) {
    const long t0 = blk * TB;
#ifdef __AVX512F__
    if (wide_in) input_tiles<M, BF, 16>(job, t0, V); else
#endif
    input_tiles<M, BF, 8>(job, t0, V);
    // 2. one GEMM per transform point
    for (int p = 0; p < A2; ++p) {
#if TAESD_BF16
      if constexpr (BF) {
        gemm_bf16((const uint16_t*)V + p * TB * Ci, (const uint16_t*)job->U + (long)p * Ci * Co,
                  Mb + p * TB * Co, Ci, Co);
        continue;
      }
#endif
      gemm(V + p * TB * Ci, (const float*)job->U + (long)p * Ci * Co, Mb + p * TB * Co, Ci, Co);
    }
#ifdef __AVX512F__
    if (wide_out) output_tiles<M, BF, 16>(job, t0, Mb); else
#endif
    output_tiles<M, BF, 8>(job, t0, Mb);
  }
  free(V);
  free(Mb);
}

template <int M, bool BF>
static void* worker(void* arg) {
  run_blocks<M, BF>((Job*)arg);
  return nullptr;
}

}  // namespace

extern "C" {

// 1 where this build runs bf16 activations (AVX-512-BF16), else 0.
int taesd_winograd_has_bf16() { return TAESD_BF16; }

// Choose the GEMM's vector width (512 where the build has AVX-512, else 256); returns the width
// now in use. 0 only asks.
int taesd_winograd_width(int bits) {
#ifdef __AVX512F__
  if (bits == 256 || bits == 512) g_width = bits;
#else
  (void)bits;
#endif
  return g_width;
}

// y[N,H,W,Co] = act(conv3x3(x) + bias + res), all NHWC fp32 contiguous; x is [N,H,W,Ci], or
// [N,H/2,W/2,Ci] read nearest-upsampled 2x when up == 1 (the upsampled map is never made). U is
// the transformed weight [(m+2)^2][Ci][Co]. Ci % 8 == 0, Co % 16 == 0. Returns 0 on success.
// bf16 == 1: x, res and y are bf16, U is [(m+2)^2][Ci/2][Co][2] bf16, Co % 64 == 0 (returns 3
// where the build has no AVX-512-BF16); bias stays fp32.
int taesd_winograd_conv(const void* x, int N, int H, int W, int Ci, const void* U, int Co,
                        const float* bias, const void* res, int relu, void* y, int m,
                        int threads, int up, int bf16) {
  if ((m != 2 && m != 4) || Ci % 8 || Co % 16 || N < 1 || H < 1 || W < 1) return 1;
  if (bf16 && (!TAESD_BF16 || Co % 64)) return 3;
  if ((up != 0 && up != 1) || (up && (H % 2 || W % 2))) return 2;
  Job job;
  job.up = up;
  job.x = x; job.U = U; job.bias = bias; job.res = res; job.y = y;
  job.N = N; job.H = H; job.W = W; job.Ci = Ci; job.Co = Co; job.relu = relu;
  job.TH = (H + m - 1) / m; job.TW = (W + m - 1) / m;
  job.ntiles = (long)N * job.TH * job.TW;
  job.nblocks = (job.ntiles + TB - 1) / TB;
  job.next.store(0);
  void* (*fn)(void*) = m == 4 ? worker<4, false> : worker<2, false>;
#if TAESD_BF16
  if (bf16) fn = m == 4 ? worker<4, true> : worker<2, true>;
#endif
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > job.nblocks) threads = (int)job.nblocks;
#ifdef _OPENMP
  // PyTorch's own OpenMP threads (the process's libgomp): its workers would otherwise spin beside ours.
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
