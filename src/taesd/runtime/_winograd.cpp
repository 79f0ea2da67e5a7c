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

typedef __m256 v8;  // 8 channels; GCC/Clang allow +, -, * (also with a float scalar) on it

namespace {

constexpr int TB = 12;   // tiles per block (GEMM rows): two 6-row micro-kernel passes
constexpr int MR = 6;    // micro-kernel rows (tiles) x 16 columns (output channels)

template <int M> struct Wino;

template <> struct Wino<2> {
  static constexpr int A = 4;
  static inline void in1d(const v8* d, int s, v8* v, int t) {   // v = B^T d
    v8 d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s];
    v[0] = d0 - d2; v[t] = d1 + d2; v[2 * t] = d2 - d1; v[3 * t] = d1 - d3;
  }
  static inline void out1d(const v8* m, int s, v8* y, int t) {  // y = A^T m
    v8 m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s];
    y[0] = m0 + m1 + m2; y[t] = m1 - m2 - m3;
  }
};

template <> struct Wino<4> {
  static constexpr int A = 6;
  static inline void in1d(const v8* d, int s, v8* v, int t) {
    v8 d0 = d[0], d1 = d[s], d2 = d[2 * s], d3 = d[3 * s], d4 = d[4 * s], d5 = d[5 * s];
    v8 a = d4 - 4.0f * d2, b = d3 - 4.0f * d1;     // shared terms of rows 1, 2
    v8 c = d4 - d2, e = 2.0f * (d3 - d1);          // rows 3, 4
    v[0] = 4.0f * d0 - 5.0f * d2 + d4;
    v[t] = a + b; v[2 * t] = a - b;
    v[3 * t] = c + e; v[4 * t] = c - e;
    v[5 * t] = 4.0f * d1 - 5.0f * d3 + d5;
  }
  static inline void out1d(const v8* m, int s, v8* y, int t) {
    v8 m0 = m[0], m1 = m[s], m2 = m[2 * s], m3 = m[3 * s], m4 = m[4 * s], m5 = m[5 * s];
    v8 p12 = m1 + m2, q12 = m1 - m2, p34 = m3 + m4, q34 = m3 - m4;
    y[0] = m0 + p12 + p34; y[t] = q12 + 2.0f * q34;
    y[2 * t] = p12 + 4.0f * p34; y[3 * t] = q12 + 8.0f * q34 + m5;
  }
};

struct Job {
  const float *x, *U, *bias, *res;
  float* y;
  int N, H, W, Ci, Co, relu, TH, TW, up;  // up: the input is H/2 x W/2, read nearest-upsampled
  long ntiles, nblocks;
  std::atomic<long> next;
};

// C[TB x Co] = V[TB x Ci] * U[Ci x Co], rows MR at a time, 16 output channels at a time.
static inline void gemm(const float* V, const float* U, float* C, int Ci, int Co) {
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

template <int M>
static void run_blocks(Job* job) {
  constexpr int A = Wino<M>::A, A2 = A * A;
  const int Ci = job->Ci, Co = job->Co, H = job->H, W = job->W;
  const long per_image = (long)job->TH * job->TW;
  float* V = (float*)aligned_alloc(64, sizeof(float) * A2 * TB * Ci);
  float* Mb = (float*)aligned_alloc(64, sizeof(float) * A2 * TB * Co);
  v8 d[A2], t1[A2], mm[A2], s[M * A], yv[M * M];
  const v8 zero = _mm256_setzero_ps();
  for (long blk; (blk = job->next.fetch_add(1)) < job->nblocks;) {
    const long t0 = blk * TB;
    // 1. input transform
    for (int ti = 0; ti < TB; ++ti) {
      long t = t0 + ti;
      if (t >= job->ntiles) {   // padding rows of the last block
        for (int p = 0; p < A2; ++p) memset(V + (p * TB + ti) * Ci, 0, sizeof(float) * Ci);
        continue;
      }
      long n = t / per_image, rc = t % per_image;
      int oy = (int)(rc / job->TW) * M - 1, ox = (int)(rc % job->TW) * M - 1;
      const int up = job->up, Ws = W >> up;   // the stored input's width
      const float* xn = job->x + n * ((long)H >> up) * Ws * Ci;
      for (int c = 0; c < Ci; c += 8) {
        for (int i = 0; i < A; ++i) {
          int yy = oy + i;
          for (int j = 0; j < A; ++j) {
            int xx = ox + j;
            d[i * A + j] = (yy >= 0 && yy < H && xx >= 0 && xx < W)
                               ? _mm256_loadu_ps(xn + ((long)(yy >> up) * Ws + (xx >> up)) * Ci + c) : zero;
          }
        }
        for (int j = 0; j < A; ++j) Wino<M>::in1d(d + j, A, t1 + j, A);      // columns: B^T d
        for (int i = 0; i < A; ++i) Wino<M>::in1d(t1 + i * A, 1, mm + i * A, 1);  // rows: (.) B
        for (int p = 0; p < A2; ++p) _mm256_storeu_ps(V + (p * TB + ti) * Ci + c, mm[p]);
      }
    }
    // 2. one GEMM per transform point
    for (int p = 0; p < A2; ++p)
      gemm(V + p * TB * Ci, job->U + (long)p * Ci * Co, Mb + p * TB * Co, Ci, Co);
    // 3. output transform + bias + residual + ReLU
    for (int ti = 0; ti < TB; ++ti) {
      long t = t0 + ti;
      if (t >= job->ntiles) break;
      long n = t / per_image, rc = t % per_image;
      int oy = (int)(rc / job->TW) * M, ox = (int)(rc % job->TW) * M;
      float* yn = job->y + n * (long)H * W * Co;
      const float* rn = job->res ? job->res + n * (long)H * W * Co : nullptr;
      for (int c = 0; c < Co; c += 8) {
        for (int p = 0; p < A2; ++p) mm[p] = _mm256_loadu_ps(Mb + (p * TB + ti) * Co + c);
        for (int j = 0; j < A; ++j) Wino<M>::out1d(mm + j, A, s + j, A);      // A^T m (rows)
        for (int a = 0; a < M; ++a) Wino<M>::out1d(s + a * A, 1, yv + a * M, 1);  // (.) A
        v8 b = job->bias ? _mm256_loadu_ps(job->bias + c) : zero;
        for (int a = 0; a < M; ++a) {
          int yy = oy + a;
          if (yy >= H) break;
          for (int bq = 0; bq < M; ++bq) {
            int xx = ox + bq;
            if (xx >= W) break;
            long off = ((long)yy * W + xx) * Co + c;
            v8 r = yv[a * M + bq] + b;
            if (rn) r = r + _mm256_loadu_ps(rn + off);
            if (job->relu) r = _mm256_max_ps(r, zero);
            _mm256_storeu_ps(yn + off, r);
          }
        }
      }
    }
  }
  free(V);
  free(Mb);
}

template <int M>
static void* worker(void* arg) {
  run_blocks<M>((Job*)arg);
  return nullptr;
}

}  // namespace

extern "C" {

// y[N,H,W,Co] = act(conv3x3(x) + bias + res), all NHWC fp32 contiguous; x is [N,H,W,Ci], or
// [N,H/2,W/2,Ci] read nearest-upsampled 2x when up == 1 (the upsampled map is never made). U is
// the transformed weight [(m+2)^2][Ci][Co]. Ci % 8 == 0, Co % 16 == 0. Returns 0 on success.
int taesd_winograd_conv(const float* x, int N, int H, int W, int Ci, const float* U, int Co,
                        const float* bias, const float* res, int relu, float* y, int m,
                        int threads, int up) {
  if ((m != 2 && m != 4) || Ci % 8 || Co % 16 || N < 1 || H < 1 || W < 1) return 1;
  if ((up != 0 && up != 1) || (up && (H % 2 || W % 2))) return 2;
  Job job;
  job.up = up;
  job.x = x; job.U = U; job.bias = bias; job.res = res; job.y = y;
  job.N = N; job.H = H; job.W = W; job.Ci = Ci; job.Co = Co; job.relu = relu;
  job.TH = (H + m - 1) / m; job.TW = (W + m - 1) / m;
  job.ntiles = (long)N * job.TH * job.TW;
  job.nblocks = (job.ntiles + TB - 1) / TB;
  job.next.store(0);
  void* (*fn)(void*) = m == 4 ? worker<4> : worker<2>;
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > job.nblocks) threads = (int)job.nblocks;
  pthread_t tids[64];
  int started = 0;
  for (int i = 1; i < threads; ++i)
    if (pthread_create(&tids[started], nullptr, fn, &job) == 0) ++started;
  fn(&job);
  for (int i = 0; i < started; ++i) pthread_join(tids[i], nullptr);
  return 0;
}

}
