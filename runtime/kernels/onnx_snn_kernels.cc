// Native onnxruntime CPU kernels for the onnx_snn custom-op domain (opset 1):
//
//   IFNeuron(X, V) -> (S, V_next)                         one timestep
//   IFNeuronSeq(X, V) -> (S, V_next, Count)               K timesteps, X and S [K*N, ...] time-major
//   IFNeuronSeqConst(X, V, Steps) -> (S, V_next, Count)   K = len(Steps) steps of the same X [N, ...]
//   IFNeuronSeqAvgPool(X, V) -> (P, V_next, Count)        IFNeuronSeq, then AveragePool of S
//   IFNeuronSeqConstAvgPool(X, V, Steps) -> (P, V_next, Count)   IFNeuronSeqConst, then the pool
//
// Once this library is registered, onnxruntime runs every op of the domain with it (no model-local
// function body is used), so every op the converter emits has a kernel here, for each type.
//
// Attributes: threshold (float, 1.0), reset_mode (int, 0 = subtract, 1 = hard reset), v_reset
// (float, 0.0). Per element, in the tensor's type T (th = T(threshold), vr = T(v_reset)):
//
//   v1 = v + x;  s = (v1 >= th) ? 1 : 0;
//   reset_mode 0: v_next = v1 - s * th
//   reset_mode 1: v_next = (1 - s) * v1 + s * vr
//
// written literally, so that results, NaN and infinities included, are those of numpy doing the
// same formula (onnx_snn/ops/if_neuron.py, if_neuron_seq.py). Only the sign and payload of a NaN
// made from two NaNs may differ: numpy's own add returns either operand's (its SIMD and scalar
// loops differ). Build with scripts/build_kernels.sh: no -ffast-math, no FMA contraction.
//
// Count [K*N]: the spikes of each row (sample n at step t is row t*N + n), over all its neurons,
// as T (float16: rounded once, exact up to 2048; see CountValue).
//
// The pooled ops (onnx_snn/ops/if_neuron_pool.py) take [N, C, H, W] (rank 4) and the extra
// attribute kernel_shape [kh, kw] (required, 2 positive ints): window = stride, no padding,
// floor. P is [K*N, C, H/kh, W/kw], each value the window's spike count divided by kh*kw in T
// (a division, as onnxruntime's AveragePool; float16: float division rounded once to half, as
// numpy's); the sums are small integers, exact in any order. Count covers all C*H*W neurons,
// the cropped ones included. The full-size spikes S are never written.
//
// Element types: float and double (16-byte vectors: SSE2 on x86_64), and float16 (computed in
// float and rounded to half after each operation, as numpy does; F16C vectors where the CPU has
// them). Each op name is registered once per element type.
//
// Load from Python: SessionOptions.register_custom_ops_library(".../libonnx_snn_kernels.so").
// The library does not link libonnxruntime: every call goes through the OrtApi table handed to
// RegisterCustomOps. It is compiled against the 1.21 headers and asks for API version 21, which
// any onnxruntime >= 1.21 provides.
//
// Work split, all on onnxruntime's intra-op thread pool (KernelContext_ParallelFor; serial below
// kSerialWork element-steps):
// - IFNeuron*, IFNeuronSeq*: the M = N * d1 * ... neurons are cut into blocks (see BlockSize). A
//   block runs all K steps (time outer, neurons inner) over its slice of V_next, which stays in
//   cache, while the currents and spikes stream through once. Count: blocks hold whole samples
//   where a sample fits in a block, and write its counts; the Stepper counts in registers
//   (StepCount) or, for samples under kCountInStepMin neurons, CountRows re-reads the spikes just
//   written. Larger samples are split across blocks, whose per-sample pieces go to scratch slots
//   summed afterwards in block order (deterministic for any thread count).
// - *AvgPool: a unit of work is a run of whole (n, c) planes (or, for a plane larger than a unit,
//   a band of rows of one plane, a multiple of kh rows; see PoolUnitSize). A unit runs all K
//   steps over its V_next slice; each step goes through the unit in chunks of planes of about
//   kPoolChunk neurons: the same Stepper writes the chunk's spikes to a per-thread scratch (L1),
//   which is pooled straight into P[t*N + n, c] and counted, per plane, into a scratch slot per
//   (step, plane, band); Count[t*N + n] then adds sample n's slots in (c, band) order.

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(ONNX_SNN_NO_F16C)
#include <immintrin.h>
#define ONNX_SNN_F16C 1
#endif

#define ONNX_SNN_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr const char* kDomain = "onnx_snn";

// Block size (neurons per unit of work handed to the thread pool), chosen per call:
// M / kTargetBlocks rounded up to a multiple of 64, clamped to [kMinBlock, kMaxBlockBytes /
// sizeof(T)]. Long blocks matter: a block reads its currents and writes its spikes in runs of
// B contiguous elements per step (rows t*M apart), and short runs defeat the hardware
// prefetcher. On a 2-core EPYC (IFNeuronSeq, K=10, M=2.16M float, 1 thread) blocks of 1K, 4K,
// 16K, 64K and 128K floats took 1.37, 1.01, 0.83, 0.76 and 0.71 ms per step. The cap keeps a
// block's potentials (its V_next slice, re-read every step) within L2; the target count leaves
// the thread pool enough blocks to balance.
#ifndef ONNX_SNN_MIN_BLOCK
#define ONNX_SNN_MIN_BLOCK 4096
#endif
#ifndef ONNX_SNN_MAX_BLOCK_BYTES
#define ONNX_SNN_MAX_BLOCK_BYTES (256 * 1024)
#endif
#ifndef ONNX_SNN_TARGET_BLOCKS
#define ONNX_SNN_TARGET_BLOCKS 16
#endif
constexpr int64_t kMinBlock = ONNX_SNN_MIN_BLOCK;
constexpr int64_t kMaxBlockBytes = ONNX_SNN_MAX_BLOCK_BYTES;
constexpr int64_t kTargetBlocks = ONNX_SNN_TARGET_BLOCKS;
// Below this many element-steps (K * M) in all, the thread pool is not worth waking.
constexpr int64_t kSerialWork = 1 << 15;

template <typename T>
int64_t BlockSize(int64_t m) {
  constexpr int64_t max_block = kMaxBlockBytes / static_cast<int64_t>(sizeof(T));
  int64_t b = (m + kTargetBlocks - 1) / kTargetBlocks;
  b = (b + 63) / 64 * 64;
  return b < kMinBlock ? kMinBlock : (b > max_block ? max_block : b);
}

enum class OpKind { kStep, kSeq, kSeqConst, kSeqPool, kSeqConstPool };

const char* OpName(OpKind kind) {
  switch (kind) {
    case OpKind::kStep:
      return "IFNeuron";
    case OpKind::kSeq:
      return "IFNeuronSeq";
    case OpKind::kSeqConst:
      return "IFNeuronSeqConst";
    case OpKind::kSeqPool:
      return "IFNeuronSeqAvgPool";
    default:
      return "IFNeuronSeqConstAvgPool";
  }
}

bool IsPool(OpKind kind) { return kind == OpKind::kSeqPool || kind == OpKind::kSeqConstPool; }
bool HasSteps(OpKind kind) { return kind == OpKind::kSeqConst || kind == OpKind::kSeqConstPool; }

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t p = 1;
  for (int64_t d : shape) p *= d;
  return p;
}

// ---- float16 ---------------------------------------------------------------------------------

// IEEE binary16 stored as its bits. Conversions as numpy's (npy_half): exact widening (a NaN
// keeps its sign and payload), narrowing with round-to-nearest-even, overflow to inf, a NaN
// keeping its sign and top 10 payload bits (made non-zero if they are all zero).
struct Half {
  uint16_t bits;
};

inline float HalfToFloat(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf or NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal: value mant * 2^-24; normalize it.
    uint32_t e = 113u;  // exponent field of 2^-14
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline Half FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {  // inf or NaN
    if (a == 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};
    uint16_t payload = static_cast<uint16_t>((a >> 13) & 0x3ffu);
    if (payload == 0) payload = 1;  // stay a NaN
    return Half{static_cast<uint16_t>(sign | 0x7c00u | payload)};
  }
  if (a >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a >= 0x38800000u) {
    // Normal half (>= 2^-14): drop 13 mantissa bits, round to nearest even. A carry out of the
    // mantissa bumps the exponent, which is the right result (up to 65504 by the check above).
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return Half{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
  }
  if (a < 0x33000000u) return Half{sign};  // < 2^-25: rounds to zero (2^-25 itself ties to 0)
  // Subnormal half: value = m * 2^-24 with m = round(a_value * 2^24), ties to even.
  const uint32_t exp = a >> 23;               // 102 .. 112
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // 24-bit significand
  const uint32_t shift = 126u - exp;          // value = mant * 2^(exp - 150) -> mant >> (126 - exp) units of 2^-24
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t m = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return Half{static_cast<uint16_t>(sign | m)};  // m == 0x400 carries into the smallest normal
}

// ---- the arithmetic --------------------------------------------------------------------------

template <typename T>
struct BlockArgs {
  const T* x;        // input currents
  const T* v;        // potentials before the first step, M elements
  T* s;              // spikes, K * M elements
  T* v_next;         // potentials after the last step, M elements
  int64_t m;         // neurons (elements of V)
  int64_t k;         // timesteps
  int64_t x_stride;  // elements between the currents of consecutive steps: M, or 0 (constant X)
  int64_t block;     // neurons per block
  T th;
  T vr;
  // The Count output (IFNeuronSeq, IFNeuronSeqConst: K * N spike counts), or nullptr (IFNeuron).
  // Where a sample fits in a block, blocks hold whole samples and write count directly. Else
  // (samples larger than a block) block b puts its count of step t and sample r in the scratch
  // slot slots[t * count_slots + r + b] (consecutive blocks share at most one sample, so slots
  // never collide), and Runner::Run adds them up.
  T* count;
  int64_t* slots;       // nullptr when blocks hold whole samples
  int64_t n;            // samples (N)
  int64_t d;            // neurons per sample (M / N)
  int64_t count_slots;  // N + blocks
};

// 16-byte vectors (SSE2, which every x86_64 has) through GCC's vector extensions. g++ does not
// auto-vectorize the scalar loop: under the default -ftrapping-math it will not if-convert the
// (signalling) comparison, and -fno-trapping-math is a -ffast-math flag this build avoids. The
// vector code does per lane exactly what the scalar code does (the same IEEE operations in the
// same order; `v1 >= th` is false for NaN in both), so results are bit-identical.
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t Mask __attribute__((vector_size(16)));
};
template <>
struct VecOf<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t Mask __attribute__((vector_size(16)));
};

template <typename V, typename T>
inline V Broadcast(T value) {
  V out;
  for (size_t i = 0; i < sizeof(V) / sizeof(T); ++i) out[i] = value;
  return out;
}

// One timestep for len neurons: potentials from v_in, currents from x; writes the spikes to s
// and the new potentials to v_out (which may be v_in: each element is read before it is written).
// StepCount does the same and returns the number of spikes, counted from the comparison masks
// while they are in registers (one integer addition per vector; the arithmetic is Step's).
template <typename T, int kMode>
struct Stepper {
  static void Step(const T* v_in, const T* x, T* s, T* v_out, int64_t len, T th, T vr) {
    Run<false>(v_in, x, s, v_out, len, th, vr);
  }
  static uint64_t StepCount(const T* v_in, const T* x, T* s, T* v_out, int64_t len, T th, T vr) {
    return Run<true>(v_in, x, s, v_out, len, th, vr);
  }

  template <bool kCount>
  static uint64_t Run(const T* v_in, const T* x, T* s, T* v_out, int64_t len, T th, T vr) {
    using V = typename VecOf<T>::V;
    using Mask = typename VecOf<T>::Mask;
    constexpr int64_t kW = sizeof(V) / sizeof(T);
    const V thv = Broadcast<V>(th);
    const V vrv = Broadcast<V>(vr);
    const V onev = Broadcast<V>(T(1));
    Mask spikes = {};  // per lane, minus the spikes (a true comparison lane is -1)
    int64_t i = 0;
    for (; i + kW <= len; i += kW) {
      V vv, xv;
      std::memcpy(&vv, v_in + i, sizeof(V));
      std::memcpy(&xv, x + i, sizeof(V));
      const V v1 = vv + xv;
      const Mask ge = (Mask)(v1 >= thv);
      const V sv = (V)(ge & (Mask)onev);  // all-ones lanes where v1 >= th -> 1.0
      if (kCount) spikes += ge;
      V vn;
      if (kMode == 0) {
        vn = v1 - sv * thv;
      } else {
        vn = (onev - sv) * v1 + sv * vrv;
      }
      std::memcpy(v_out + i, &vn, sizeof(V));
      std::memcpy(s + i, &sv, sizeof(V));
    }
    uint64_t count = 0;
    if (kCount) {
      for (int64_t l = 0; l < kW; ++l) count += static_cast<uint64_t>(-static_cast<int64_t>(spikes[l]));
    }
    for (; i < len; ++i) {  // the same arithmetic, one element
      const T v1 = v_in[i] + x[i];
      const T sp = (v1 >= th) ? T(1) : T(0);
      if (kMode == 0) {
        v_out[i] = v1 - sp * th;
      } else {
        v_out[i] = (T(1) - sp) * v1 + sp * vr;
      }
      s[i] = sp;
      if (kCount) count += (v1 >= th) ? 1u : 0u;
    }
    return count;
  }
};

// float16: every operation in float, rounded to half, as numpy computes float16 arithmetic.
// The products with s (0 or 1) and 1 - s are exact in half, so only the sum v + x and the final
// potential need rounding. Where the CPU has F16C (checked at run time; the build targets plain
// x86_64), 8 elements at a time with the hardware conversions: they round to nearest even like
// numpy's, and differ from it only in quieting a signalling NaN, which the float addition that
// follows does anyway. Elsewhere, and for the last len % 8 elements, FloatToHalf/HalfToFloat.
#ifdef ONNX_SNN_F16C
bool HasF16C() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

// Returns the elements done (a multiple of 8); adds their spikes to *count when kCount (summed
// per lane in float, exact below 2^24 per lane: flushed every 2^20 vectors).
template <int kMode, bool kCount>
__attribute__((target("avx,f16c"))) int64_t StepHalfF16C(const Half* v_in, const Half* x, Half* s, Half* v_out,
                                                          int64_t len, float th, float vr, uint64_t* count) {
  const __m256 thv = _mm256_set1_ps(th);
  const __m256 vrv = _mm256_set1_ps(vr);
  const __m256 onev = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  while (i + 8 <= len) {
    __m256 spikes = _mm256_setzero_ps();
    const int64_t stop = std::min(len, i + (int64_t{8} << 20));
    for (; i + 8 <= stop; i += 8) {
      const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v_in + i)));
      const __m256 xv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
      const __m256 v1 = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_add_ps(vv, xv), _MM_FROUND_TO_NEAREST_INT));
      const __m256 sv = _mm256_and_ps(_mm256_cmp_ps(v1, thv, _CMP_GE_OS), onev);
      if (kCount) spikes = _mm256_add_ps(spikes, sv);
      __m256 vn;
      if (kMode == 0) {
        vn = _mm256_sub_ps(v1, _mm256_mul_ps(sv, thv));
      } else {
        vn = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(onev, sv), v1), _mm256_mul_ps(sv, vrv));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(v_out + i), _mm256_cvtps_ph(vn, _MM_FROUND_TO_NEAREST_INT));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(s + i), _mm256_cvtps_ph(sv, _MM_FROUND_TO_NEAREST_INT));
    }
    if (kCount) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, spikes);
      for (float f : lanes) *count += static_cast<uint64_t>(f);
    }
  }
  return i;
}
#endif

template <int kMode>
struct Stepper<Half, kMode> {
  static void Step(const Half* v_in, const Half* x, Half* s, Half* v_out, int64_t len, Half th, Half vr) {
    Run<false>(v_in, x, s, v_out, len, th, vr);
  }
  static uint64_t StepCount(const Half* v_in, const Half* x, Half* s, Half* v_out, int64_t len, Half th, Half vr) {
    return Run<true>(v_in, x, s, v_out, len, th, vr);
  }

  template <bool kCount>
  static uint64_t Run(const Half* v_in, const Half* x, Half* s, Half* v_out, int64_t len, Half th_h, Half vr_h) {
    const float th = HalfToFloat(th_h);
    const float vr = HalfToFloat(vr_h);
    uint64_t count = 0;
    int64_t i = 0;
#ifdef ONNX_SNN_F16C
    if (HasF16C()) i = StepHalfF16C<kMode, kCount>(v_in, x, s, v_out, len, th, vr, &count);
#endif
    for (; i < len; ++i) {
      const float v1 = HalfToFloat(FloatToHalf(HalfToFloat(v_in[i]) + HalfToFloat(x[i])));
      const float sp = (v1 >= th) ? 1.0f : 0.0f;
      float vn;
      if (kMode == 0) {
        vn = v1 - sp * th;
      } else {
        vn = (1.0f - sp) * v1 + sp * vr;
      }
      v_out[i] = FloatToHalf(vn);
      s[i] = FloatToHalf(sp);
      if (kCount) count += (v1 >= th) ? 1u : 0u;
    }
    return count;
  }
};

// ---- spike counts ----------------------------------------------------------------------------

// Spikes are +0 or exactly 1 in every type, so a spike's value is one bit of its representation:
// 1.0 is 0x3f800000 (float), 0x3ff0000000000000 (double), 0x3c00 (half), whose top three bits
// are 001. Counts of spikes read back from memory (CountSpikes, CountRows) and the float16 pool
// add these bits as integers: exact, vectorizable, and the numbers the T sums give.
template <typename T>
struct SpikeBits;
template <>
struct SpikeBits<float> {
  typedef uint32_t U;
  static constexpr int kShift = 29;
};
template <>
struct SpikeBits<double> {
  typedef uint64_t U;
  static constexpr int kShift = 61;
};
template <>
struct SpikeBits<Half> {
  typedef uint16_t U;
  static constexpr int kShift = 13;
};

template <typename T>
inline uint32_t SpikeAt(const T* s, int64_t i) {
  typename SpikeBits<T>::U u;
  std::memcpy(&u, s + i, sizeof(u));
  return static_cast<uint32_t>(u >> SpikeBits<T>::kShift);
}

// Spikes among s[0 .. len).
template <typename T>
uint64_t CountSpikes(const T* s, int64_t len) {
  uint64_t total = 0;
  for (int64_t i0 = 0; i0 < len; i0 += (int64_t{1} << 30)) {
    const int64_t i1 = std::min(len, i0 + (int64_t{1} << 30));
    uint32_t c = 0;  // 32-bit lanes when vectorized
    for (int64_t i = i0; i < i1; ++i) c += SpikeAt(s, i);
    total += c;
  }
  return total;
}

// A spike count as T. float16: the exact count rounded to half once, so exact up to 2048 spikes
// and the nearest half above. numpy's float16 sum (the reference's) also rounds partial sums on
// long rows: above 2048 it can differ from this by a few units in the last place.
template <typename T>
T CountValue(int64_t c) {
  return static_cast<T>(c);
}
template <>
Half CountValue<Half>(int64_t c) {
  return FloatToHalf(static_cast<float>(c));
}

// out[r] = the spike count of s[r*d .. r*d+d) as T, r < rows: small rows (samples), one pass.
template <typename T>
void CountRows(const T* s, int64_t rows, int64_t d, T* out) {
  for (int64_t r = 0; r < rows; ++r, s += d) {
    uint32_t c = 0;
    for (int64_t i = 0; i < d; ++i) c += SpikeAt(s, i);
    out[r] = CountValue<T>(c);
  }
}

// Per-thread scratch, kept between calls (grows, never shrinks); one buffer per tag (the calling
// thread holds the counts in buffer 0 while it may also run units, which use buffer 1).
template <int kTag>
void* ThreadScratch(size_t bytes) {
  thread_local std::vector<uint64_t> buf;
  const size_t words = (bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t);
  if (buf.size() < words) buf.resize(words);
  return buf.data();
}

// Below this many neurons per sample, a block steps all its samples in one Stepper run and then
// counts each sample from the spikes just written (still in L1/L2, CountRows), instead of one
// StepCount per sample: short Stepper runs spend their time in set-up and scalar tails.
#ifndef ONNX_SNN_COUNT_IN_STEP_MIN
#define ONNX_SNN_COUNT_IN_STEP_MIN 16
#endif
constexpr int64_t kCountInStepMin = ONNX_SNN_COUNT_IN_STEP_MIN;

// All K steps for neurons [begin, begin + len), block number b. The block's slice of V_next is
// its working array: step 0 reads V and writes V_next, later steps update V_next in place, so
// the block's potentials stay in cache (L1/L2) for all K steps while the currents and spikes
// stream through. With a Count, each step is cut at the samples' boundaries and each piece's
// spikes counted by StepCount (in registers), or, for small samples, from the spikes just
// written (CountRows).
template <typename T, int kMode>
void RunBlock(const BlockArgs<T>& a, int64_t b, int64_t begin, int64_t len) {
  T* v = a.v_next + begin;
  if (a.k == 0) {
    std::memcpy(v, a.v + begin, static_cast<size_t>(len) * sizeof(T));
    return;
  }
  const bool in_step = a.d >= kCountInStepMin;
  const int64_t first = a.count != nullptr ? begin / a.d : 0;  // sample of the block's first neuron
  for (int64_t t = 0; t < a.k; ++t) {
    const T* v_in = t == 0 ? a.v + begin : v;
    const T* x = a.x + t * a.x_stride + begin;
    T* s = a.s + t * a.m + begin;
    if (a.count == nullptr) {
      Stepper<T, kMode>::Step(v_in, x, s, v, len, a.th, a.vr);
      continue;
    }
    if (!in_step) {
      Stepper<T, kMode>::Step(v_in, x, s, v, len, a.th, a.vr);
      if (a.slots == nullptr) {  // small samples, whole ones in the block (d < kCountInStepMin <= block)
        CountRows(s, len / a.d, a.d, a.count + t * a.n + first);
        continue;
      }
    }
    int64_t pos = 0;
    int64_t end = (first + 1) * a.d - begin;  // end of the first sample, relative to begin
    for (int64_t r = first; pos < len; ++r, end += a.d) {
      const int64_t stop = std::min(len, end);
      const uint64_t c =
          in_step ? Stepper<T, kMode>::StepCount(v_in + pos, x + pos, s + pos, v + pos, stop - pos, a.th, a.vr)
                  : CountSpikes(s + pos, stop - pos);
      if (a.slots == nullptr) {
        a.count[t * a.n + r] = CountValue<T>(static_cast<int64_t>(c));
      } else {
        a.slots[t * a.count_slots + r + b] = static_cast<int64_t>(c);
      }
      pos = stop;
    }
  }
}

template <typename T, int kMode>
struct Runner {
  static void Block(void* data, size_t block) {
    const auto& a = *static_cast<const BlockArgs<T>*>(data);
    const int64_t begin = static_cast<int64_t>(block) * a.block;
    const int64_t len = (a.m - begin < a.block) ? a.m - begin : a.block;
    RunBlock<T, kMode>(a, static_cast<int64_t>(block), begin, len);
  }

  // count: the Count output (K * n values), or nullptr.
  static void Run(Ort::KernelContext& ctx, BlockArgs<T>& a, int64_t n, T* count) {
    a.block = BlockSize<T>(a.m);
    a.count = nullptr;
    a.slots = nullptr;
    a.n = n;
    if (count != nullptr) {
      if (a.m == 0 || a.k == 0) {  // no neurons: every count is 0 (no steps: there is none)
        for (int64_t r = 0; r < a.k * n; ++r) count[r] = CountValue<T>(0);
      } else {
        a.count = count;
        a.d = a.m / n;
        if (a.d <= a.block) {
          a.block = a.block / a.d * a.d;  // whole samples per block
        } else {
          a.count_slots = n + (a.m + a.block - 1) / a.block;
          a.slots = static_cast<int64_t*>(
              ThreadScratch<0>(static_cast<size_t>(a.k * a.count_slots + n) * sizeof(int64_t)));
        }
      }
    }
    const int64_t blocks = (a.m + a.block - 1) / a.block;
    if (blocks == 0) return;
    const int64_t work = a.m * (a.k > 0 ? a.k : 1);
    if (blocks == 1 || work <= kSerialWork) {
      for (int64_t b = 0; b < blocks; ++b) Block(&a, static_cast<size_t>(b));
    } else {
      ctx.ParallelFor(&Block, static_cast<size_t>(blocks), 0, &a);
    }
    if (a.slots == nullptr) return;
    // Count[t*N + r]: sample r's pieces, added block by block (a fixed order).
    int64_t* total = a.slots + a.k * a.count_slots;
    for (int64_t t = 0; t < a.k; ++t) {
      std::fill(total, total + n, int64_t{0});
      const int64_t* slots = a.slots + t * a.count_slots;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t begin = b * a.block;
        const int64_t end = std::min(a.m, begin + a.block);
        for (int64_t r = begin / a.d; r <= (end - 1) / a.d; ++r) total[r] += slots[r + b];
      }
      for (int64_t r = 0; r < n; ++r) count[t * n + r] = CountValue<T>(total[r]);
    }
  }
};

// ---- the fused neuron + AveragePool ----------------------------------------------------------

// AveragePool of `rows` output rows: s holds rows * kh input rows of w spikes; window j of output
// row i covers input rows i*kh .. i*kh+kh-1, columns j*kw .. j*kw+kw-1 (columns from wo*kw on are
// cropped). The window's kh rows are first added column by column into acc (wo*kw counters of
// scratch; contiguous, so the loops vectorize), then each run of kw columns gives the window's
// count c, and the output is quot[c] = c / (kh*kw) (see PoolQuotient).
template <typename T>
void PoolRows(const T* s, int64_t rows, int64_t w, int64_t wo, int64_t kh, int64_t kw, const T* quot, T* p,
              uint32_t* acc) {
  const int64_t wc = wo * kw;
  for (int64_t i = 0; i < rows; ++i) {
    const T* band = s + i * kh * w;
    for (int64_t c = 0; c < wc; ++c) acc[c] = SpikeAt(band, c);
    for (int64_t r = 1; r < kh; ++r) {
      const T* row = band + r * w;
      for (int64_t c = 0; c < wc; ++c) acc[c] += SpikeAt(row, c);
    }
    T* out = p + i * wo;
    if (kw == 2) {
      for (int64_t j = 0; j < wo; ++j) out[j] = quot[acc[2 * j] + acc[2 * j + 1]];
    } else if (kw == 1) {
      for (int64_t j = 0; j < wo; ++j) out[j] = quot[acc[j]];
    } else {
      for (int64_t j = 0; j < wo; ++j) {
        uint32_t a = 0;
        for (int64_t c = 0; c < kw; ++c) a += acc[j * kw + c];
        out[j] = quot[a];
      }
    }
  }
}

// One plane (or band) of spikes, `rows` input rows of w, with `rows_out` output rows: pools it
// into p (rows_out * wo values) and returns its spike count, cropped rows and columns included.
// float and double: in T, 16-byte vectors for the 2x2 window (the sample CNN's), where each
// group of kW outputs takes two rows of 2*kW spikes: the rows added, then the even and odd
// columns, then divided by 4. The window sums are small integers, exact in T in any order, so
// this is the reference's row-major sum; the division is the reference's. Other windows: the kh
// rows added column by column (vectorized by the compiler), then runs of kw columns, one
// division per output. The count: the window sums, added up in T per output row (exact while a
// row of windows, kh * w neurons, holds under 2^24 spikes), plus the cropped spikes.
template <typename T>
struct PoolPlaneOp {
  static int64_t Run(const T* s, int64_t rows, int64_t rows_out, int64_t w, int64_t wo, int64_t kh, int64_t kw,
                     const T* /*quot*/, T* p, uint32_t* scratch) {
    using V = typename VecOf<T>::V;
    using Mask = typename VecOf<T>::Mask;
    constexpr int64_t kW = sizeof(V) / sizeof(T);
    const T den = static_cast<T>(kh * kw);
    const int64_t wc = wo * kw;
    int64_t count = 0;
    if (kh == 2 && kw == 2) {
      const V denv = Broadcast<V>(den);
      Mask even, odd;
      for (int64_t l = 0; l < kW; ++l) {
        even[l] = 2 * l;
        odd[l] = 2 * l + 1;
      }
      for (int64_t i = 0; i < rows_out; ++i) {
        const T* r0 = s + 2 * i * w;
        const T* r1 = r0 + w;
        T* out = p + i * wo;
        T sum = T(0);
        int64_t j = 0;
        if (wo >= kW) {
          V sumv = Broadcast<V>(T(0));
          for (; j + kW <= wo; j += kW) {
            V a0, a1, b0, b1;
            std::memcpy(&a0, r0 + 2 * j, sizeof(V));
            std::memcpy(&a1, r0 + 2 * j + kW, sizeof(V));
            std::memcpy(&b0, r1 + 2 * j, sizeof(V));
            std::memcpy(&b1, r1 + 2 * j + kW, sizeof(V));
            const V c0 = a0 + b0;
            const V c1 = a1 + b1;
            const V win = __builtin_shuffle(c0, c1, even) + __builtin_shuffle(c0, c1, odd);
            sumv += win;
            const V q = win / denv;
            std::memcpy(out + j, &q, sizeof(V));
          }
          for (int64_t l = 0; l < kW; ++l) sum += sumv[l];
        }
        for (; j < wo; ++j) {
          const T win = r0[2 * j] + r0[2 * j + 1] + r1[2 * j] + r1[2 * j + 1];
          sum += win;
          out[j] = win / den;
        }
        count += static_cast<int64_t>(sum);
      }
    } else {
      T* acc = reinterpret_cast<T*>(scratch);
      for (int64_t i = 0; i < rows_out; ++i) {
        const T* band = s + i * kh * w;
        for (int64_t c = 0; c < wc; ++c) acc[c] = band[c];
        for (int64_t r = 1; r < kh; ++r) {
          const T* row = band + r * w;
          for (int64_t c = 0; c < wc; ++c) acc[c] += row[c];
        }
        T* out = p + i * wo;
        T sum = T(0);
        for (int64_t j = 0; j < wo; ++j) {
          T win = acc[j * kw];
          for (int64_t c = 1; c < kw; ++c) win += acc[j * kw + c];
          sum += win;
          out[j] = win / den;
        }
        count += static_cast<int64_t>(sum);
      }
    }
    if (wc < w) {
      for (int64_t r = 0; r < rows_out * kh; ++r) count += CountSpikes(s + r * w + wc, w - wc);
    }
    count += CountSpikes(s + rows_out * kh * w, (rows - rows_out * kh) * w);
    return count;
  }
};

// float16: the spikes' bits as integers (PoolRows), each window's count looked up in quot.
template <>
struct PoolPlaneOp<Half> {
  static int64_t Run(const Half* s, int64_t rows, int64_t rows_out, int64_t w, int64_t wo, int64_t kh, int64_t kw,
                     const Half* quot, Half* p, uint32_t* scratch) {
    PoolRows(s, rows_out, w, wo, kh, kw, quot, p, scratch);
    return CountSpikes(s, rows * w);
  }
};

// c / (kh*kw) as the reference computes it: the window sum (the integer c, exact) divided by the
// window size in T; float16 as numpy's half division: both operands widened to float, a float
// division, one rounding to half (the divisor is np.float16(kh*kw), exact up to 2048).
template <typename T>
T PoolQuotient(int64_t c, int64_t size) {
  return static_cast<T>(c) / static_cast<T>(size);
}
template <>
Half PoolQuotient<Half>(int64_t c, int64_t size) {
  return FloatToHalf(static_cast<float>(c) / HalfToFloat(FloatToHalf(static_cast<float>(size))));
}

// Work unit of the fused ops (elements of V per unit), chosen per call like BlockSize: M /
// kPoolTargetUnits rounded up to a multiple of 64, clamped to [kPoolMinUnit, kPoolMaxUnitBytes /
// sizeof(T)]. A unit is a run of whole (n, c) planes (as many as fit, at least one), or, for a
// plane larger than that, a band of rows of one plane (a multiple of kh rows; the last band also
// takes the H % kh rows no window covers). Its potentials, currents (constant X) and spike
// scratch stay in L1/L2 for all K steps.
#ifndef ONNX_SNN_POOL_MIN_UNIT
#define ONNX_SNN_POOL_MIN_UNIT 1024
#endif
#ifndef ONNX_SNN_POOL_MAX_UNIT_BYTES
#define ONNX_SNN_POOL_MAX_UNIT_BYTES (256 * 1024)
#endif
#ifndef ONNX_SNN_POOL_TARGET_UNITS
#define ONNX_SNN_POOL_TARGET_UNITS 16
#endif
constexpr int64_t kPoolMinUnit = ONNX_SNN_POOL_MIN_UNIT;
constexpr int64_t kPoolMaxUnitBytes = ONNX_SNN_POOL_MAX_UNIT_BYTES;
constexpr int64_t kPoolTargetUnits = ONNX_SNN_POOL_TARGET_UNITS;
#ifndef ONNX_SNN_POOL_CHUNK
#define ONNX_SNN_POOL_CHUNK 2048
#endif
constexpr int64_t kPoolChunk = ONNX_SNN_POOL_CHUNK;

template <typename T>
int64_t PoolUnitSize(int64_t m) {
  constexpr int64_t max_unit = kPoolMaxUnitBytes / static_cast<int64_t>(sizeof(T));
  int64_t b = (m + kPoolTargetUnits - 1) / kPoolTargetUnits;
  b = (b + 63) / 64 * 64;
  return b < kPoolMinUnit ? kPoolMinUnit : (b > max_unit ? max_unit : b);
}

template <typename T>
struct PoolArgs {
  const T* x;         // input currents
  const T* v;         // potentials before the first step, planes * hw elements
  T* p;               // pooled spikes, K * planes * ho * wo
  T* v_next;          // potentials after the last step
  int64_t* counts;    // spikes per (step, slot): K * slots; slot = plane * bands + band
  const T* quot;      // quot[c] = c / (kh*kw), c = 0 .. kh*kw
  int64_t k;          // timesteps (> 0)
  int64_t x_stride;   // elements between the currents of consecutive steps: planes * hw, or 0
  int64_t planes;     // N * C
  int64_t h, w, hw, kh, kw, ho, wo;
  int64_t ppu;        // planes per unit (bands == 1)
  int64_t bands;      // row bands per plane (1: units are runs of whole planes)
  int64_t band_rows;  // rows per band (bands > 1), a multiple of kh
  int64_t slots;      // planes * bands
  int64_t units;
  T th;
  T vr;
};

// One unit, all K steps: step t integrates the unit's neurons into its V_next slice (as RunBlock,
// the same Stepper), with the spikes going to a per-thread scratch of the unit's size; then each
// plane (band) of the unit is pooled into P[t*N + n, c] and its spikes counted into its slot.
template <typename T, int kMode>
void RunPoolUnit(const PoolArgs<T>& a, int64_t u) {
  int64_t p0, np, r0, r1, slot0;
  if (a.bands == 1) {
    p0 = u * a.ppu;
    np = std::min(a.ppu, a.planes - p0);
    r0 = 0;
    r1 = a.h;
    slot0 = p0;
  } else {
    p0 = u / a.bands;
    const int64_t b = u % a.bands;
    np = 1;
    r0 = b * a.band_rows;
    r1 = (b == a.bands - 1) ? a.h : r0 + a.band_rows;
    slot0 = u;
  }
  const int64_t plane_len = (r1 - r0) * a.w;  // elements of one plane (band) of the unit
  const int64_t begin = p0 * a.hw + r0 * a.w;
  // Output rows i0 .. i1-1 (r0 is a multiple of kh; rows from ho*kh on are cropped).
  const int64_t i0 = r0 / a.kh;
  const int64_t i1 = std::min(r1, a.ho * a.kh) / a.kh;
  const int64_t pooled = a.ho * a.wo;

  // Each step runs the unit in chunks of about kPoolChunk neurons: whole planes, or, where a plane
  // (band) is larger, runs of its rows (a multiple of kh rows; the last run takes the remaining
  // rows). The Stepper writes a chunk's spikes to this thread's scratch, where they are still in
  // L1 when they are pooled and counted right after.
  const bool by_rows = plane_len > kPoolChunk;
  const int64_t chunk_planes = by_rows ? 1 : std::min(np, kPoolChunk / plane_len);
  const int64_t chunk_rows = by_rows ? std::max<int64_t>(1, kPoolChunk / a.w / a.kh) * a.kh : r1 - r0;
  const int64_t chunk_len = chunk_planes * std::min(chunk_rows, r1 - r0) * a.w;
  const size_t spike_bytes = (static_cast<size_t>(chunk_len) * sizeof(T) + 63) / 64 * 64;
  const size_t acc_bytes = static_cast<size_t>(a.wo * a.kw) * std::max(sizeof(T), sizeof(uint32_t));
  char* scratch = static_cast<char*>(ThreadScratch<1>(spike_bytes + acc_bytes));
  T* spikes = reinterpret_cast<T*>(scratch);
  uint32_t* acc = reinterpret_cast<uint32_t*>(scratch + spike_bytes);

  for (int64_t t = 0; t < a.k; ++t) {
    const T* v_in = (t == 0 ? a.v : a.v_next) + begin;
    const T* x = a.x + t * a.x_stride + begin;
    T* vn = a.v_next + begin;
    int64_t* cnt = a.counts + t * a.slots + slot0;
    T* out = a.p + (t * a.planes + p0) * pooled + i0 * a.wo;
    if (!by_rows) {
      for (int64_t q0 = 0; q0 < np; q0 += chunk_planes) {
        const int64_t nq = std::min(chunk_planes, np - q0);
        const int64_t off = q0 * plane_len;
        Stepper<T, kMode>::Step(v_in + off, x + off, spikes, vn + off, nq * plane_len, a.th, a.vr);
        for (int64_t q = 0; q < nq; ++q) {
          cnt[q0 + q] = PoolPlaneOp<T>::Run(spikes + q * plane_len, r1 - r0, i1 - i0, a.w, a.wo, a.kh, a.kw,
                                            a.quot, out + (q0 + q) * pooled, acc);
        }
      }
      continue;
    }
    for (int64_t q = 0; q < np; ++q) {
      int64_t c = 0;
      for (int64_t rr = r0, end = r1; rr < r1; rr = end) {  // rr: a multiple of kh
        end = std::min(r1, rr + chunk_rows);
        const int64_t off = q * plane_len + (rr - r0) * a.w;
        const int64_t rows_out = std::max<int64_t>(0, (std::min(end, i1 * a.kh) - rr) / a.kh);
        Stepper<T, kMode>::Step(v_in + off, x + off, spikes, vn + off, (end - rr) * a.w, a.th, a.vr);
        c += PoolPlaneOp<T>::Run(spikes, end - rr, rows_out, a.w, a.wo, a.kh, a.kw, a.quot,
                                 out + q * pooled + (rr / a.kh - i0) * a.wo, acc);
      }
      cnt[q] = c;
    }
  }
}

template <typename T, int kMode>
struct PoolRunner {
  static void Unit(void* data, size_t u) {
    RunPoolUnit<T, kMode>(*static_cast<const PoolArgs<T>*>(data), static_cast<int64_t>(u));
  }

  static void Run(Ort::KernelContext& ctx, PoolArgs<T>& a) {
    if (a.units == 1 || a.k * a.planes * a.hw <= kSerialWork) {
      for (int64_t u = 0; u < a.units; ++u) Unit(&a, static_cast<size_t>(u));
      return;
    }
    ctx.ParallelFor(&Unit, static_cast<size_t>(a.units), 0, &a);
  }
};

// ---- the kernel ------------------------------------------------------------------------------

template <typename T>
struct TypeTraits;
template <>
struct TypeTraits<float> {
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  static float FromFloat(float f) { return f; }
};
template <>
struct TypeTraits<double> {
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  static double FromFloat(float f) { return static_cast<double>(f); }
};
template <>
struct TypeTraits<Half> {
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  static Half FromFloat(float f) { return FloatToHalf(f); }
};

OrtStatus* MakeStatus(const OrtApi& api, OrtErrorCode code, const std::string& msg) {
  return api.CreateStatus(code, msg.c_str());
}

// Optional float attribute: true and *out set when the node has it (a float, or an int
// converted), false when it has neither (then the caller's default stands).
bool ReadFloatAttr(const OrtApi& api, const OrtKernelInfo* info, const char* name, float* out) {
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, out);
  if (st == nullptr) return true;
  api.ReleaseStatus(st);
  int64_t i = 0;
  st = api.KernelInfoGetAttribute_int64(info, name, &i);
  if (st == nullptr) {
    *out = static_cast<float>(i);
    return true;
  }
  api.ReleaseStatus(st);
  return false;
}

// Optional int attribute; *is_float is set (and *float_value) when the node has it as a float.
bool ReadIntAttr(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t* out, bool* is_float,
                 float* float_value) {
  *is_float = false;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, out);
  if (st == nullptr) return true;
  api.ReleaseStatus(st);
  st = api.KernelInfoGetAttribute_float(info, name, float_value);
  if (st == nullptr) {
    *is_float = true;
    return true;
  }
  api.ReleaseStatus(st);
  return false;
}

// The shapes of a pooled neuron op's call (rank 4), checked as the CPU and CUDA kernels both
// need: K and the distance between consecutive steps' currents (M, or 0 for a constant X).
inline OrtStatus* PoolShapes(const OrtApi& api, OpKind kind, const char* op, Ort::KernelContext& ctx,
                             const std::vector<int64_t>& xs, const std::vector<int64_t>& vs, int64_t m,
                             int64_t* k, int64_t* x_stride) {
  if (kind == OpKind::kSeqPool) {
    const bool shapes_ok =
        vs.size() == 4 && xs.size() == 4 && std::equal(xs.begin() + 1, xs.end(), vs.begin() + 1);
    const int64_t n = shapes_ok ? vs[0] : 0;
    if (!shapes_ok || (n == 0 && xs[0] != 0) || (n != 0 && xs[0] % n != 0)) {
      return MakeStatus(api, ORT_INVALID_ARGUMENT,
                        std::string(op) + ": X " + ShapeStr(xs) + " and V " + ShapeStr(vs) +
                            ": V must be [N, C, H, W] (rank 4) and X [K*N, C, H, W], K stacked batches of V");
    }
    *k = n ? xs[0] / n : 0;
    *x_stride = m;
  } else {
    const std::vector<int64_t> ks = ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape();
    if (vs.size() != 4 || xs != vs || ks.size() != 1) {
      return MakeStatus(api, ORT_INVALID_ARGUMENT,
                        std::string(op) + ": X " + ShapeStr(xs) + " and V " + ShapeStr(vs) +
                            " must both be [N, C, H, W] (rank 4) and Steps must be 1-D; got Steps " +
                            ShapeStr(ks));
    }
    *k = ks[0];
  }
  return nullptr;
}

// The shapes of a (non-pooled) neuron op's call, checked as the CPU and CUDA kernels both need:
// K, the distance between consecutive steps' currents (M, or 0 for a constant X) and S's shape
// (set by the caller to X's shape, K = 1 and stride 0 beforehand). Returns an error status naming
// the op and the shapes, or nullptr.
inline OrtStatus* SequenceShapes(const OrtApi& api, OpKind kind, const char* op, Ort::KernelContext& ctx,
                                 const std::vector<int64_t>& xs, const std::vector<int64_t>& vs, int64_t m,
                                 int64_t* k, int64_t* x_stride, std::vector<int64_t>* s_shape) {
  if (kind == OpKind::kStep) {
    if (xs != vs) {
      return MakeStatus(api, ORT_INVALID_ARGUMENT,
                        std::string(op) + ": X " + ShapeStr(xs) + " and V " + ShapeStr(vs) +
                            " must have the same shape");
    }
  } else if (kind == OpKind::kSeq) {
    const bool tails_match =
        !vs.empty() && xs.size() == vs.size() && std::equal(xs.begin() + 1, xs.end(), vs.begin() + 1);
    const int64_t n = vs.empty() ? 0 : vs[0];
    if (!tails_match || (n == 0 && xs[0] != 0) || (n != 0 && xs[0] % n != 0)) {
      return MakeStatus(api, ORT_INVALID_ARGUMENT,
                        std::string(op) + ": X " + ShapeStr(xs) + " is not K stacked batches of V " +
                            ShapeStr(vs) + " (X must be [K*N, ...] for V [N, ...])");
    }
    *k = n ? xs[0] / n : 0;
    *x_stride = m;
  } else {
    const std::vector<int64_t> ks = ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape();
    if (vs.empty() || xs != vs || ks.size() != 1) {
      return MakeStatus(api, ORT_INVALID_ARGUMENT,
                        std::string(op) + ": X " + ShapeStr(xs) + " and V " + ShapeStr(vs) +
                            " must have the same shape, of rank >= 1, and Steps must be 1-D; got Steps " +
                            ShapeStr(ks));
    }
    *k = ks[0];
    (*s_shape)[0] = *k * vs[0];
  }
  return nullptr;
}

template <typename T>
struct NeuronKernel {
  OpKind kind;
  int64_t reset_mode;
  T th;
  T vr;
  int64_t kh = 0;  // pooling window (fused ops)
  int64_t kw = 0;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    const OrtApi& api = Ort::GetApi();
    const char* op = OpName(kind);
    try {
      Ort::KernelContext ctx(context);
      if (IsPool(kind)) return ComputePool(ctx);
      Ort::ConstValue x_val = ctx.GetInput(0);
      Ort::ConstValue v_val = ctx.GetInput(1);
      const std::vector<int64_t> xs = x_val.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> vs = v_val.GetTensorTypeAndShapeInfo().GetShape();

      std::vector<int64_t> s_shape = xs;
      int64_t k = 1;
      int64_t x_stride = 0;
      const int64_t m = Product(vs);
      if (OrtStatus* st = SequenceShapes(api, kind, op, ctx, xs, vs, m, &k, &x_stride, &s_shape)) return st;

      Ort::UnownedValue s_val = ctx.GetOutput(0, s_shape);
      Ort::UnownedValue vn_val = ctx.GetOutput(1, vs);
      const int64_t n = vs.empty() ? 1 : vs[0];  // samples (a scalar V is one)
      T* count = nullptr;
      if (kind != OpKind::kStep) {
        count = static_cast<T*>(ctx.GetOutput(2, {k * n}).GetTensorMutableRawData());
      }
      BlockArgs<T> a;
      a.x = static_cast<const T*>(x_val.GetTensorRawData());
      a.v = static_cast<const T*>(v_val.GetTensorRawData());
      a.s = static_cast<T*>(s_val.GetTensorMutableRawData());
      a.v_next = static_cast<T*>(vn_val.GetTensorMutableRawData());
      a.m = m;
      a.k = k;
      a.x_stride = x_stride;
      a.block = 0;
      a.th = th;
      a.vr = vr;
      if (reset_mode == 0) {
        Runner<T, 0>::Run(ctx, a, n, count);
      } else {
        Runner<T, 1>::Run(ctx, a, n, count);
      }
      return nullptr;
    } catch (const Ort::Exception& e) {
      return MakeStatus(api, e.GetOrtErrorCode(), std::string(op) + ": " + e.what());
    } catch (const std::exception& e) {
      return MakeStatus(api, ORT_RUNTIME_EXCEPTION, std::string(op) + ": " + e.what());
    }
  }

  // IFNeuronSeqAvgPool / IFNeuronSeqConstAvgPool (exceptions go to ComputeV2's handlers).
  OrtStatus* ComputePool(Ort::KernelContext& ctx) {
    const OrtApi& api = Ort::GetApi();
    const char* op = OpName(kind);
    Ort::ConstValue x_val = ctx.GetInput(0);
    Ort::ConstValue v_val = ctx.GetInput(1);
    const std::vector<int64_t> xs = x_val.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> vs = v_val.GetTensorTypeAndShapeInfo().GetShape();
    int64_t k = 0;
    int64_t x_stride = 0;
    const int64_t m = Product(vs);
    if (OrtStatus* st = PoolShapes(api, kind, op, ctx, xs, vs, m, &k, &x_stride)) return st;
    const int64_t n = vs[0], c = vs[1], h = vs[2], w = vs[3];
    const int64_t ho = h / kh, wo = w / kw;
    Ort::UnownedValue p_val = ctx.GetOutput(0, {k * n, c, ho, wo});
    Ort::UnownedValue vn_val = ctx.GetOutput(1, vs);
    Ort::UnownedValue count_val = ctx.GetOutput(2, {k * n});
    const T* x = static_cast<const T*>(x_val.GetTensorRawData());
    const T* v = static_cast<const T*>(v_val.GetTensorRawData());
    T* v_next = static_cast<T*>(vn_val.GetTensorMutableRawData());
    T* count = static_cast<T*>(count_val.GetTensorMutableRawData());
    if (k == 0 || m == 0) {  // no steps (V_next = V), or no neurons (every count 0, P empty)
      if (m > 0) std::memcpy(v_next, v, static_cast<size_t>(m) * sizeof(T));
      for (int64_t r = 0; r < k * n; ++r) count[r] = CountValue<T>(0);
      return nullptr;
    }

    PoolArgs<T> a;
    a.x = x;
    a.v = v;
    a.p = static_cast<T*>(p_val.GetTensorMutableRawData());
    a.v_next = v_next;
    a.k = k;
    a.x_stride = x_stride;
    a.planes = n * c;
    a.h = h;
    a.w = w;
    a.hw = h * w;
    a.kh = kh;
    a.kw = kw;
    a.ho = ho;
    a.wo = wo;
    const int64_t unit = PoolUnitSize<T>(m);
    if (a.hw <= unit) {
      a.bands = 1;
      a.band_rows = h;
      a.ppu = std::max<int64_t>(1, unit / a.hw);
      a.units = (a.planes + a.ppu - 1) / a.ppu;
    } else {
      a.ppu = 1;
      a.band_rows = std::max<int64_t>(1, unit / w / kh) * kh;
      a.bands = ho > 0 ? (ho * kh + a.band_rows - 1) / a.band_rows : 1;
      a.units = a.planes * a.bands;
    }
    a.slots = a.planes * a.bands;
    a.th = th;
    a.vr = vr;

    // A window holds at most kh*kw <= h*w spikes when there is any window (ho, wo > 0); with none,
    // no quotient is read.
    const int64_t window = (ho > 0 && wo > 0) ? kh * kw : 0;
    std::vector<T> quot(static_cast<size_t>(window + 1));
    for (int64_t i = 0; i <= window; ++i) quot[static_cast<size_t>(i)] = PoolQuotient<T>(i, window);
    a.quot = quot.data();
    // The per-slot counts, on this (the calling) thread's scratch.
    a.counts = static_cast<int64_t*>(ThreadScratch<0>(static_cast<size_t>(k * a.slots) * sizeof(int64_t)));

    if (reset_mode == 0) {
      PoolRunner<T, 0>::Run(ctx, a);
    } else {
      PoolRunner<T, 1>::Run(ctx, a);
    }

    // Count[t*N + r] sums sample r's slots (its C planes, each plane's bands) in a fixed order.
    const int64_t per_sample = c * a.bands;
    for (int64_t t = 0; t < k; ++t) {
      const int64_t* cnt = a.counts + t * a.slots;
      for (int64_t r = 0; r < n; ++r) {
        int64_t total = 0;
        for (int64_t i = 0; i < per_sample; ++i) total += cnt[r * per_sample + i];
        count[t * n + r] = CountValue<T>(total);
      }
    }
    return nullptr;
  }
};

// What every neuron op declares, on the CPU and on CUDA alike: its name, and its inputs and
// outputs by kind and element type.
template <typename T>
struct NeuronSignature {
  explicit NeuronSignature(OpKind k) : kind(k) {}
  const char* GetName() const { return OpName(kind); }
  size_t GetInputTypeCount() const { return HasSteps(kind) ? 3 : 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : TypeTraits<T>::kType;
  }
  size_t GetOutputTypeCount() const { return kind == OpKind::kStep ? 2 : 3; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return TypeTraits<T>::kType; }

  OpKind kind;
};

// In an op class deriving from CustomOpBase and NeuronSignature<T>: OrtCustomOp (a base of
// CustomOpBase) has function-pointer fields of these names, so name ours.
#define ONNX_SNN_USE_NEURON_SIGNATURE                \
  using NeuronSignature<T>::GetName;                 \
  using NeuronSignature<T>::GetInputTypeCount;       \
  using NeuronSignature<T>::GetInputType;            \
  using NeuronSignature<T>::GetOutputTypeCount;      \
  using NeuronSignature<T>::GetOutputType;

template <typename T>
struct NeuronOp : Ort::CustomOpBase<NeuronOp<T>, NeuronKernel<T>, /*WithStatus=*/true>,
                  NeuronSignature<T> {
  explicit NeuronOp(OpKind k) : NeuronSignature<T>(k) {}
  ONNX_SNN_USE_NEURON_SIGNATURE

  // Runs when a session is created (kernel creation), so bad attributes fail the session.
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const {
    const char* op = OpName(this->kind);
    float threshold = 1.0f;
    float v_reset = 0.0f;
    int64_t reset_mode = 0;
    ReadFloatAttr(api, info, "threshold", &threshold);
    ReadFloatAttr(api, info, "v_reset", &v_reset);
    bool mode_is_float = false;
    float mode_float = 0.0f;
    ReadIntAttr(api, info, "reset_mode", &reset_mode, &mode_is_float, &mode_float);
    if (mode_is_float) {
      std::ostringstream os;
      os << op << ": attribute reset_mode must be an int (0 = subtract, 1 = hard reset), got the float "
         << mode_float;
      return MakeStatus(api, ORT_INVALID_ARGUMENT, os.str());
    }
    if (reset_mode != 0 && reset_mode != 1) {
      std::ostringstream os;
      os << op << ": attribute reset_mode must be 0 (subtract) or 1 (hard reset), got " << reset_mode;
      return MakeStatus(api, ORT_INVALID_ARGUMENT, os.str());
    }
    if (!std::isfinite(threshold) || !(threshold > 0.0f)) {
      std::ostringstream os;
      os.precision(9);
      os << op << ": attribute threshold must be a finite number > 0, got " << threshold;
      return MakeStatus(api, ORT_INVALID_ARGUMENT, os.str());
    }
    std::vector<int64_t> kernel_shape;
    if (IsPool(this->kind)) {
      size_t size = 0;
      OrtStatus* st = api.KernelInfoGetAttributeArray_int64(info, "kernel_shape", nullptr, &size);
      if (st != nullptr) {
        api.ReleaseStatus(st);
        return MakeStatus(api, ORT_INVALID_ARGUMENT,
                          std::string(op) +
                              ": attribute kernel_shape (ints [kh, kw], the pooling window and stride) is required");
      }
      kernel_shape.resize(size);
      if (size > 0) {
        st = api.KernelInfoGetAttributeArray_int64(info, "kernel_shape", kernel_shape.data(), &size);
        if (st != nullptr) return st;
      }
      if (kernel_shape.size() != 2 || kernel_shape[0] <= 0 || kernel_shape[1] <= 0) {
        return MakeStatus(api, ORT_INVALID_ARGUMENT,
                          std::string(op) + ": attribute kernel_shape must be 2 positive ints [kh, kw], got " +
                              ShapeStr(kernel_shape));
      }
    }
    auto* kernel = new (std::nothrow)
        NeuronKernel<T>{this->kind, reset_mode, TypeTraits<T>::FromFloat(threshold), TypeTraits<T>::FromFloat(v_reset)};
    if (kernel == nullptr) return MakeStatus(api, ORT_FAIL, std::string(op) + ": out of memory");
    if (IsPool(this->kind)) {
      kernel->kh = kernel_shape[0];
      kernel->kw = kernel_shape[1];
    }
    *op_kernel = kernel;
    return nullptr;
  }

  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
};

const NeuronOp<float> kStepF(OpKind::kStep), kSeqF(OpKind::kSeq), kSeqConstF(OpKind::kSeqConst),
    kSeqPoolF(OpKind::kSeqPool), kSeqConstPoolF(OpKind::kSeqConstPool);
const NeuronOp<double> kStepD(OpKind::kStep), kSeqD(OpKind::kSeq), kSeqConstD(OpKind::kSeqConst),
    kSeqPoolD(OpKind::kSeqPool), kSeqConstPoolD(OpKind::kSeqConstPool);
const NeuronOp<Half> kStepH(OpKind::kStep), kSeqH(OpKind::kSeq), kSeqConstH(OpKind::kSeqConst),
    kSeqPoolH(OpKind::kSeqPool), kSeqConstPoolH(OpKind::kSeqConstPool);

// Every RegisterCustomOps call (one per SessionOptions) makes a domain that sessions refer to;
// they are kept for the life of the process (never destroyed, so no static destructor can free
// one under a live session when the library is unloaded).
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain>& Domains() {
  static auto* domains = new std::vector<Ort::CustomOpDomain>();
  return *domains;
}

// Registers one onnx_snn domain holding the CPU ops and ``extra`` (the CUDA library's CUDA ops).
// ``library`` names the library in the error for a too old onnxruntime.
inline OrtStatus* RegisterDomain(OrtSessionOptions* options, const OrtApiBase* api_base, const char* library,
                                 std::initializer_list<const OrtCustomOp*> extra) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    const std::string msg = std::string(library) + " needs onnxruntime API version " +
                            std::to_string(ORT_API_VERSION) + " (onnxruntime >= 1." +
                            std::to_string(ORT_API_VERSION) + "); this onnxruntime is " +
                            api_base->GetVersionString();
    return api1 ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{kDomain};
    for (const OrtCustomOp* op : std::initializer_list<const OrtCustomOp*>{
             &kStepF, &kSeqF, &kSeqConstF, &kSeqPoolF, &kSeqConstPoolF, &kStepD, &kSeqD, &kSeqConstD,
             &kSeqPoolD, &kSeqConstPoolD, &kStepH, &kSeqH, &kSeqConstH, &kSeqPoolH, &kSeqConstPoolH}) {
      domain.Add(op);
    }
    for (const OrtCustomOp* op : extra) domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    Domains().push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

}  // namespace

ONNX_SNN_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return RegisterDomain(options, api_base, "libonnx_snn_kernels", {});
}
