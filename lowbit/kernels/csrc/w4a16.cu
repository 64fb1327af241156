// W4A16 GEMM for decode-sized batches (M <= 32 per launch) on tensor cores: y[M, N] = x[M, K] @ W[N, K]^T.
//
// Why it is fast (the ideas of Marlin, written for this layout):
//  * the weight is the MMA's A operand (16 output features x 16 k) and x the B operand (16 k x 8 batch
//    rows), so a batch of 1..32 rows costs one to four m16n8k16 MMAs per 256 codes;
//  * the codes are stored pre-permuted (lowbit/kernels/w4a16.py:marlin_repack) so that each lane's
//    16-byte piece of a 64-k chunk is exactly its A fragments for four MMA k-steps of its 16-row block,
//    and one 32-bit word holds the eight codes of one step;
//  * a code becomes a bf16 (or fp16) with one LOP3: (word >> 4j) & 0x000F000F | 0x43004300 is the
//    pair (128 + c_lo, 128 + c_hi), exact. The MMA multiplies these biased codes by x; the scale,
//    the offset and the bias of 128 are applied once per group in fp32:
//        sum_k x (c s + o) = s * sum_k x (128 + c) + (o - 128 s) * sum_k x,
//    with sum_k x from one extra MMA against a fragment of ones;
//  * a block of 8 warps owns 256 output features (32 per warp) and walks its K range in stages of two
//    64-k chunks through an S-stage cp.async pipeline in shared memory: per stage the warps' codes
//    (16 KB), the x chunks (shared by all warps, rows padded to 272 bytes so fragment reads hit
//    distinct banks) and the group scales. The bytes in flight are S - 1 stages per block, not registers;
//  * when N alone gives too few blocks, K is split across blocks; the partials go through a workspace
//    and the last block to arrive adds them in a fixed order, so results do not depend on timing.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 8;                 // warps per block, each owns R 16-row blocks
constexpr int R = 2;                     // 16-row blocks per warp
constexpr int ROWS_B = WARPS * R * 16;   // output features per block (256)
constexpr int XPITCH = 17;               // uint4 per x row in shared memory (2 x 64 k + 16 bytes of padding)

template <bool BF16>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// (a & B) | C in one LOP3 (the compiler splits the C++ form into two instructions here).
template <uint32_t B, uint32_t C>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(B), "n"(C));
  return d;
}

// Keeps a value computed once in a register: without it the compiler recomputes addresses inside the
// loop (to save registers it does not need), and the loop is bound by instruction issue.
template <typename T>
__device__ __forceinline__ void pin(T& v) {
  asm volatile("" : "+r"(v));
}

// 16 bytes global -> shared, asynchronously; with pred false the destination is zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t s, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <bool BF16>
__device__ __forceinline__ uint16_t to_half_bits(float v) {
  if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16(v));
  else return __half_as_ushort(__float2half(v));
}

// Shared memory per stage (two 64-k chunks), in uint4: codes of the block's warps, the x chunks, the
// group scales of each chunk.
template <int NT>
struct Stage {
  static constexpr int W = WARPS * R * 2 * 32;     // [warp][i][chunk][lane]
  static constexpr int X = 8 * NT * XPITCH;        // [row][chunk * 8 + piece], row pitch 17 (272 bytes)
  static constexpr int SC = WARPS * R * 2 * 4;     // [warp][i][chunk][piece]
  static constexpr int SIZE = W + X + SC;
};

// grid (ceil(N / 256), split), 256 threads, S * Stage::SIZE * 16 bytes of dynamic shared memory.
// x: [M, 64 Kc] (Kc even); qw: uint4 [N/16][Kc][32]; so: half2 [N/16][G][16] = (scale, offset);
// y: [M, N]; when split > 1, ws: fp32 [ceil(N/256)][split][256][M] and locks: int32 [ceil(N/256)], zero.
template <bool BF16, int NT, int S>
__global__ void __launch_bounds__(WARPS * 32, NT == 4 ? 1 : 2) w4a16_kernel(
    const uint16_t* __restrict__ x, const uint4* __restrict__ qw, const __half2* __restrict__ so,
    uint16_t* __restrict__ y, float* __restrict__ ws, int* __restrict__ locks, int M, int N, int Kc, int G,
    int gchunks, int stages_per_split) {
  constexpr uint32_t MAGIC = BF16 ? 0x43004300u : 0x64006400u;  // 128.0 / 1024.0 in both halves
  constexpr float BIAS = BF16 ? 128.f : 1024.f;
  constexpr uint32_t ONES = BF16 ? 0x3F803F80u : 0x3C003C00u;
  using St = Stage<NT>;
  extern __shared__ uint4 smem[];
  __shared__ int is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rg = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int c_begin = 2 * sp * stages_per_split;
  const int n_stages = max(0, min(Kc, c_begin + 2 * stages_per_split) - c_begin) / 2;
  const int rb0 = (rg * WARPS + warp) * R;   // this warp's first 16-row block
  const bool active = rb0 * 16 < N;          // N % 32 == 0: both row blocks or neither
  const int Kp = Kc * 64;

  // Copy sources and destinations (32-bit shared addresses), advanced stage by stage: the loop is
  // issue-bound, so no index arithmetic is redone per stage.
  const uint4* wsrc[R];
#pragma unroll
  for (int i = 0; i < R; ++i) wsrc[i] = qw + ((size_t)(rb0 + i) * Kc + c_begin) * 32 + lane;
  const uint32_t sbase = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t wdst = sbase + ((warp * R) * 2 * 32 + lane) * 16;
  const bool xcopy = tid < 8 * NT * 8;  // x rows 0 .. 8 NT - 1, eight 16-byte pieces per chunk each
  const int xr = tid >> 3, xpiece = tid & 7;
  const bool xok = xcopy && xr < M;     // rows >= M are zero-filled
  const uint16_t* xsrc = x + (size_t)(xok ? xr : 0) * Kp + (size_t)c_begin * 64 + xpiece * 8;
  const uint32_t xdst = sbase + (St::W + xr * XPITCH + xpiece) * 16;
  const bool scopy = active && lane < R * 4;  // 16 (scale, offset) pairs = 4 x 16 bytes per row block
  const int si = (lane >> 2) % R, spiece = lane & 3;
  int igrp = c_begin / gchunks, iin = c_begin - igrp * gchunks;
  const uint4* ssrc = reinterpret_cast<const uint4*>(so + ((size_t)(rb0 + si) * G + igrp) * 16) + spiece;
  const uint32_t sdst = sbase + (St::W + St::X + ((warp * R + si) * 2) * 4 + spiece) * 16;
  uint32_t ioff = 0;  // the next stage's byte offset
  uint32_t wd = wdst, xd = xdst, sd = sdst;
  int flags = (active ? 1 : 0) | (xcopy ? 2 : 0) | (xok ? 4 : 0) | (scopy ? 8 : 0);
  pin(wd);
  pin(xd);
  pin(sd);
  pin(flags);

  auto issue = [&]() {  // the next stage (two chunks) into the next slot
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (flags & 1) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
          cp_async16(wd + ioff + (i * 2 + h) * 32 * 16, wsrc[i], true);
          wsrc[i] += 32;
        }
        if (flags & 8) cp_async16(sd + ioff + h * 4 * 16, ssrc, true);
      }
      if (flags & 2) cp_async16(xd + ioff + h * 8 * 16, (flags & 4) ? xsrc : x, flags & 4);
      xsrc += 64;
      if (++iin == gchunks) {
        iin = 0;
        ssrc += 4;  // next group: 16 half2
      }
    }
    ioff = ioff + St::SIZE * 16 == S * St::SIZE * 16 ? 0 : ioff + St::SIZE * 16;
  };

  float acc[R][NT][4], accg[R][NT][4], xs[NT][4];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = accg[i][j][q] = 0.f;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) xs[j][q] = 0.f;
  const uint32_t ones[4] = {ONES, ONES, ONES, ONES};

#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < n_stages) issue();
    cp_commit();  // one group per stage, empty or not, so wait_group counts stages
  }
  int cin = c_begin % gchunks, slot = 0;  // the computed chunk's place in its group, its stage
  for (int it = 0; it < n_stages; ++it) {
    cp_wait<S - 2>();
    __syncthreads();  // stage `it` is visible to all; stage it - 1 is free for reuse
    if (it + S - 1 < n_stages) issue();
    cp_commit();
    const uint4* st = smem + slot * St::SIZE;
    slot = slot + 1 == S ? 0 : slot + 1;
    if (!active) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint4 wv[R];
#pragma unroll
      for (int i = 0; i < R; ++i) wv[i] = st[((warp * R + i) * 2 + h) * 32 + lane];
      uint4 xv[NT][2];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4* xrow = st + St::W + (8 * j + g) * XPITCH + h * 8 + 2 * t;
        xv[j][0] = xrow[0];
        xv[j][1] = xrow[1];
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {  // four MMA k-steps of 16 per 64-k chunk
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const uint32_t w = reinterpret_cast<const uint32_t*>(&wv[i])[k];
          uint32_t a[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) a[q] = and_or<0x000F000Fu, MAGIC>(w >> (4 * q));
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[j][0]);
            mma<BF16>(accg[i][j], a, xw[2 * k], xw[2 * k + 1]);
          }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[j][0]);
          mma<BF16>(xs[j], ones, xw[2 * k], xw[2 * k + 1]);
        }
      }
      if (++cin == gchunks || (h == 1 && it + 1 == n_stages)) {  // end of a group, or of the range
        cin = 0;
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const __half2* sc = reinterpret_cast<const __half2*>(st + St::W + St::X + ((warp * R + i) * 2 + h) * 4);
          const float2 lo = __half22float2(sc[g]), hi = __half22float2(sc[g + 8]);
          const float oa = lo.y - BIAS * lo.x, ob = hi.y - BIAS * hi.x;  // o - 128 s, in fp32
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            acc[i][j][0] += lo.x * accg[i][j][0] + oa * xs[j][0];
            acc[i][j][1] += lo.x * accg[i][j][1] + oa * xs[j][1];
            acc[i][j][2] += hi.x * accg[i][j][2] + ob * xs[j][0];
            acc[i][j][3] += hi.x * accg[i][j][3] + ob * xs[j][1];
#pragma unroll
            for (int q = 0; q < 4; ++q) accg[i][j][q] = 0.f;
          }
        }
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) xs[j][q] = 0.f;
      }
    }
  }
  cp_wait<0>();

  // acc[i][j][q]: block feature lr = (warp R + i) 16 + g + 8 (q >= 2), batch row 8 j + 2 t + (q & 1);
  // straight to y without a split, else to this block's partial
  float* part = ws + ((size_t)rg * split + sp) * ROWS_B * M;
  if (active) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int lr = (warp * R + i) * 16 + g + (q >= 2 ? 8 : 0), m = 8 * j + 2 * t + (q & 1);
          if (m >= M) continue;
          if (split == 1) y[(size_t)m * N + rg * ROWS_B + lr] = to_half_bits<BF16>(acc[i][j][q]);
          else part[lr * M + m] = acc[i][j][q];
        }
  }
  if (split == 1) return;
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(locks + rg, 1) == split - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int e = tid; e < ROWS_B * M; e += WARPS * 32) {
    const int lr = e / M, m = e - lr * M, n = rg * ROWS_B + lr;
    if (n >= N) continue;
    float v = 0.f;
    for (int s2 = 0; s2 < split; ++s2) v += __ldcg(ws + ((size_t)rg * split + s2) * ROWS_B * M + e);
    y[(size_t)m * N + n] = to_half_bits<BF16>(v);
  }
  if (tid == 0) locks[rg] = 0;  // ready for the next launch
}

template <bool BF16, int NT, int S>
int launch(const void* x, const void* qw, const void* so, void* y, float* ws, int* locks, int M, int N, int Kc,
           int G, int gchunks, int split, cudaStream_t stream) {
  const int smem = S * Stage<NT>::SIZE * 16;
  static bool configured = false;  // per instantiation: allow more than 48 KB of dynamic shared memory
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(w4a16_kernel<BF16, NT, S>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return static_cast<int>(e);
    configured = true;
  }
  const int sps = (Kc / 2 + split - 1) / split;  // stages (two chunks) per split
  dim3 grid((N + ROWS_B - 1) / ROWS_B, split);
  w4a16_kernel<BF16, NT, S><<<grid, WARPS * 32, smem, stream>>>(
      static_cast<const uint16_t*>(x), static_cast<const uint4*>(qw), static_cast<const __half2*>(so),
      static_cast<uint16_t*>(y), ws, locks, M, N, Kc, G, gchunks, sps);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// C entry point (ctypes): returns a cudaError_t, 0 on success; -1 for an M the kernel does not take.
extern "C" int lowbit_w4a16(const void* x, const void* qw, const void* so, void* y, float* ws, int* locks, int M,
                            int N, int Kc, int G, int gchunks, int split, int bf16, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (M <= 8) return bf16 ? launch<true, 1, 4>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s)
                          : launch<false, 1, 4>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s);
  if (M <= 16) return bf16 ? launch<true, 2, 4>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s)
                           : launch<false, 2, 4>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s);
  if (M <= 32) return bf16 ? launch<true, 4, 3>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s)
                           : launch<false, 4, 3>(x, qw, so, y, ws, locks, M, N, Kc, G, gchunks, split, s);
  return -1;
}

// The workspace floats a launch with this (M, N, split) needs (0 without a split).
extern "C" long long lowbit_w4a16_workspace(int M, int N, int split) {
  return split > 1 ? (long long)((N + ROWS_B - 1) / ROWS_B) * split * ROWS_B * M : 0;
}
