// CUDA kernels for the onnx_snn custom-op domain, plus the library's RegisterCustomOps.
//
// libonnx_snn_kernels_cuda.so = the CPU kernels of onnx_snn_kernels.cc (unchanged) + CUDA kernels
// for the same five ops (IFNeuron, IFNeuronSeq, IFNeuronSeqConst, IFNeuronSeqAvgPool,
// IFNeuronSeqConstAvgPool), types float, double, float16, registered for "CUDAExecutionProvider",
// all in ONE onnx_snn domain (onnxruntime takes every op of a registered domain from it, so the
// library must carry the CPU kernels too). Semantics: see the header of onnx_snn_kernels.cc.
//
// This file is compiled twice (scripts/build_kernels_cuda.sh):
//  - by g++ with -x c++ -DONNX_SNN_CUDA_HOST: includes onnx_snn_kernels.cc (its RegisterCustomOps
//    renamed), defines the CUDA custom ops (host side: shapes, outputs, launches through the
//    functions declared below) and the exported RegisterCustomOps;
//  - by nvcc without it: the device kernels and their launchers only (no onnxruntime headers).
//
// Arithmetic: the same IEEE operations in the same order as the CPU kernels and numpy, each
// rounded explicitly (__fadd_rn, __fmul_rn, ...; the build also passes -fmad=false). float16 is
// computed in float and rounded to half after each operation with the CPU file's bit-exact
// conversions (numpy's), not the hardware ones. The GPU's NaN results are canonical NaNs (the
// CPU's keep an operand's payload); non-NaN results are bit-identical.
//
// Launch: everything runs on onnxruntime's compute stream, no synchronization and no allocation
// (CUDA-graph capturable). Counts are integer sums (exact, order-independent: deterministic).
//  - IFNeuron/IFNeuronSeq/IFNeuronSeqConst: one thread per neuron runs the K steps with its
//    potential in a register; then one block per Count row (t*N + n) sums the row's spikes.
//  - *AvgPool: one thread per pooling window (its kh*kw <= 16 potentials in registers; larger
//    windows step in V_next in place) or per cropped neuron (no window covers it), K steps;
//    per-step counts are warp-reduced into shared memory, then added into Count: directly where
//    one block covers a sample, else (float/double) as integers into Count's own storage viewed
//    as int32/int64 (zeroed first), converted in place afterwards. float16's Count has no room
//    for an integer, so float16 pools run one block per sample
//    (512 threads).

#include <cstdint>
#include <type_traits>

namespace onnx_snn_cuda {

enum DType { kF32 = 0, kF64 = 1, kF16 = 2 };

struct SeqParams {
  const void* x;
  const void* v;
  void* s;
  void* v_next;
  void* count;  // nullptr: no Count (IFNeuron)
  int64_t m;    // neurons
  int64_t k;    // steps
  int64_t x_stride;
  int64_t n;  // samples
  int64_t d;  // neurons per sample
  double th;  // already rounded to the element type
  double vr;
};

struct PoolParams {
  const void* x;
  const void* v;
  void* p;
  void* v_next;
  void* count;
  int64_t k, x_stride, n, c, h, w, kh, kw, ho, wo;
  double th;
  double vr;
  double window;  // kh*kw as T (float16: rounded to half)
};

// Return nullptr, or a static error string.
const char* LaunchSeq(int dtype, int mode, const SeqParams& p, void* stream);
const char* LaunchPool(int dtype, int mode, const PoolParams& p, void* stream);

}  // namespace onnx_snn_cuda

#ifdef ONNX_SNN_CUDA_HOST
// ================================ host part (g++) ==============================================

#define RegisterCustomOps onnx_snn_RegisterCpuCustomOps
#include "onnx_snn_kernels.cc"
#undef RegisterCustomOps

namespace {

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr int kValue = onnx_snn_cuda::kF32;
  static double ToDouble(float f) { return f; }
};
template <>
struct DTypeOf<double> {
  static constexpr int kValue = onnx_snn_cuda::kF64;
  static double ToDouble(double f) { return f; }
};
template <>
struct DTypeOf<Half> {
  static constexpr int kValue = onnx_snn_cuda::kF16;
  static double ToDouble(Half h) { return HalfToFloat(h); }
};

template <typename T>
struct CudaNeuronKernel {
  NeuronKernel<T> cfg;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    const OrtApi& api = Ort::GetApi();
    const OpKind kind = cfg.kind;
    const char* op = OpName(kind);
    try {
      Ort::KernelContext ctx(context);
      void* stream = ctx.GetGPUComputeStream();
      Ort::ConstValue x_val = ctx.GetInput(0);
      Ort::ConstValue v_val = ctx.GetInput(1);
      const std::vector<int64_t> xs = x_val.GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t> vs = v_val.GetTensorTypeAndShapeInfo().GetShape();
      const int64_t m = Product(vs);
      const char* err = nullptr;
      if (IsPool(kind)) {
        int64_t k = 0, x_stride = 0;
        if (OrtStatus* st = PoolShapes(api, kind, op, ctx, xs, vs, m, &k, &x_stride)) return st;
        onnx_snn_cuda::PoolParams p{};
        p.n = vs[0];
        p.c = vs[1];
        p.h = vs[2];
        p.w = vs[3];
        p.kh = cfg.kh;
        p.kw = cfg.kw;
        p.ho = p.h / p.kh;
        p.wo = p.w / p.kw;
        p.k = k;
        p.x_stride = x_stride;
        Ort::UnownedValue p_val = ctx.GetOutput(0, {k * p.n, p.c, p.ho, p.wo});
        Ort::UnownedValue vn_val = ctx.GetOutput(1, vs);
        Ort::UnownedValue count_val = ctx.GetOutput(2, {k * p.n});
        p.x = x_val.GetTensorRawData();
        p.v = v_val.GetTensorRawData();
        p.p = p_val.GetTensorMutableRawData();
        p.v_next = vn_val.GetTensorMutableRawData();
        p.count = count_val.GetTensorMutableRawData();
        p.th = DTypeOf<T>::ToDouble(cfg.th);
        p.vr = DTypeOf<T>::ToDouble(cfg.vr);
        const int64_t window = p.kh * p.kw;
        p.window = DTypeOf<T>::ToDouble(TypeTraits<T>::FromFloat(static_cast<float>(window)));
        if (std::is_same<T, double>::value) p.window = static_cast<double>(window);
        err = onnx_snn_cuda::LaunchPool(DTypeOf<T>::kValue, static_cast<int>(cfg.reset_mode), p, stream);
      } else {
        std::vector<int64_t> s_shape = xs;
        int64_t k = 1, x_stride = 0;
        if (OrtStatus* st = SequenceShapes(api, kind, op, ctx, xs, vs, m, &k, &x_stride, &s_shape)) return st;
        Ort::UnownedValue s_val = ctx.GetOutput(0, s_shape);
        Ort::UnownedValue vn_val = ctx.GetOutput(1, vs);
        const int64_t n = vs.empty() ? 1 : vs[0];
        onnx_snn_cuda::SeqParams p{};
        p.count = nullptr;
        if (kind != OpKind::kStep) p.count = ctx.GetOutput(2, {k * n}).GetTensorMutableRawData();
        p.x = x_val.GetTensorRawData();
        p.v = v_val.GetTensorRawData();
        p.s = s_val.GetTensorMutableRawData();
        p.v_next = vn_val.GetTensorMutableRawData();
        p.m = m;
        p.k = k;
        p.x_stride = x_stride;
        p.n = n;
        p.d = n ? m / n : 0;
        p.th = DTypeOf<T>::ToDouble(cfg.th);
        p.vr = DTypeOf<T>::ToDouble(cfg.vr);
        err = onnx_snn_cuda::LaunchSeq(DTypeOf<T>::kValue, static_cast<int>(cfg.reset_mode), p, stream);
      }
      if (err != nullptr) return MakeStatus(api, ORT_RUNTIME_EXCEPTION, std::string(op) + " (CUDA): " + err);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return MakeStatus(api, e.GetOrtErrorCode(), std::string(op) + " (CUDA): " + e.what());
    } catch (const std::exception& e) {
      return MakeStatus(api, ORT_RUNTIME_EXCEPTION, std::string(op) + " (CUDA): " + e.what());
    }
  }
};

template <typename T>
struct CudaNeuronOp : Ort::CustomOpBase<CudaNeuronOp<T>, CudaNeuronKernel<T>, /*WithStatus=*/true>,
                  NeuronSignature<T> {
  explicit CudaNeuronOp(OpKind k) : NeuronSignature<T>(k) {}
  ONNX_SNN_USE_NEURON_SIGNATURE

  // Attributes are parsed and checked by the CPU op (same errors).
  OrtStatus* CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** op_kernel) const {
    NeuronOp<T> cpu(this->kind);
    void* raw = nullptr;
    OrtStatus* st = cpu.CreateKernelV2(api, info, &raw);
    if (st != nullptr) return st;
    auto* cpu_kernel = static_cast<NeuronKernel<T>*>(raw);
    auto* kernel = new (std::nothrow) CudaNeuronKernel<T>{*cpu_kernel};
    delete cpu_kernel;
    if (kernel == nullptr) return MakeStatus(api, ORT_FAIL, std::string(OpName(this->kind)) + ": out of memory");
    *op_kernel = kernel;
    return nullptr;
  }

  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
};

const CudaNeuronOp<float> kCudaStepF(OpKind::kStep), kCudaSeqF(OpKind::kSeq), kCudaSeqConstF(OpKind::kSeqConst),
    kCudaSeqPoolF(OpKind::kSeqPool), kCudaSeqConstPoolF(OpKind::kSeqConstPool);
const CudaNeuronOp<double> kCudaStepD(OpKind::kStep), kCudaSeqD(OpKind::kSeq), kCudaSeqConstD(OpKind::kSeqConst),
    kCudaSeqPoolD(OpKind::kSeqPool), kCudaSeqConstPoolD(OpKind::kSeqConstPool);
const CudaNeuronOp<Half> kCudaStepH(OpKind::kStep), kCudaSeqH(OpKind::kSeq), kCudaSeqConstH(OpKind::kSeqConst),
    kCudaSeqPoolH(OpKind::kSeqPool), kCudaSeqConstPoolH(OpKind::kSeqConstPool);

}  // namespace

ONNX_SNN_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  return RegisterDomain(options, api_base, "libonnx_snn_kernels_cuda",
                        {&kCudaStepF, &kCudaSeqF, &kCudaSeqConstF, &kCudaSeqPoolF, &kCudaSeqConstPoolF, &kCudaStepD,
                         &kCudaSeqD, &kCudaSeqConstD, &kCudaSeqPoolD, &kCudaSeqConstPoolD, &kCudaStepH, &kCudaSeqH,
                         &kCudaSeqConstH, &kCudaSeqPoolH, &kCudaSeqConstPoolH});
}

#else  // !ONNX_SNN_CUDA_HOST
// ================================ device part (nvcc) ===========================================

#include <cuda_runtime.h>

namespace onnx_snn_cuda {
namespace {

constexpr int kThreads = 256;

// numpy's float16 conversions (copies of onnx_snn_kernels.cc's HalfToFloat / FloatToHalf).
__device__ __forceinline__ float H2F(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    uint32_t e = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return __uint_as_float(bits);
}

__device__ __forceinline__ uint16_t F2H(float f) {
  const uint32_t x = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) {
    if (a == 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u);
    uint16_t payload = static_cast<uint16_t>((a >> 13) & 0x3ffu);
    if (payload == 0) payload = 1;
    return static_cast<uint16_t>(sign | 0x7c00u | payload);
  }
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a >= 0x38800000u) {
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
  }
  if (a < 0x33000000u) return sign;
  const uint32_t exp = a >> 23;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exp;
  const uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t mm = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | mm);
}

// Element type traits: storage S, compute type C, one step, spike test, count value.
template <int kDType>
struct Elem;

template <>
struct Elem<kF32> {
  typedef float S;
  typedef float C;
  __device__ static C Th(double t) { return static_cast<float>(t); }
  template <int kMode>
  __device__ static S Step(S v, S x, C th, C vr, bool* spike) {
    const float v1 = __fadd_rn(v, x);
    const bool ge = v1 >= th;
    const float sp = ge ? 1.0f : 0.0f;
    *spike = ge;
    if (kMode == 0) return __fsub_rn(v1, __fmul_rn(sp, th));
    return __fadd_rn(__fmul_rn(__fsub_rn(1.0f, sp), v1), __fmul_rn(sp, vr));
  }
  __device__ static S Spike(bool s) { return s ? 1.0f : 0.0f; }
  __device__ static bool IsSpike(S s) { return s != 0.0f; }
  __device__ static S Count(long long c) { return __ll2float_rn(c); }
  __device__ static S Quot(uint32_t c, double window) { return __fdiv_rn(static_cast<float>(c), static_cast<float>(window)); }
};

template <>
struct Elem<kF64> {
  typedef double S;
  typedef double C;
  __device__ static C Th(double t) { return t; }
  template <int kMode>
  __device__ static S Step(S v, S x, C th, C vr, bool* spike) {
    const double v1 = __dadd_rn(v, x);
    const bool ge = v1 >= th;
    const double sp = ge ? 1.0 : 0.0;
    *spike = ge;
    if (kMode == 0) return __dsub_rn(v1, __dmul_rn(sp, th));
    return __dadd_rn(__dmul_rn(__dsub_rn(1.0, sp), v1), __dmul_rn(sp, vr));
  }
  __device__ static S Spike(bool s) { return s ? 1.0 : 0.0; }
  __device__ static bool IsSpike(S s) { return s != 0.0; }
  __device__ static S Count(long long c) { return __ll2double_rn(c); }
  __device__ static S Quot(uint32_t c, double window) { return __ddiv_rn(static_cast<double>(c), window); }
};

template <>
struct Elem<kF16> {
  typedef uint16_t S;
  typedef float C;
  __device__ static C Th(double t) { return static_cast<float>(t); }
  template <int kMode>
  __device__ static S Step(S v, S x, C th, C vr, bool* spike) {
    const float v1 = H2F(F2H(__fadd_rn(H2F(v), H2F(x))));
    const bool ge = v1 >= th;
    const float sp = ge ? 1.0f : 0.0f;
    *spike = ge;
    float vn;
    if (kMode == 0) {
      vn = __fsub_rn(v1, __fmul_rn(sp, th));
    } else {
      vn = __fadd_rn(__fmul_rn(__fsub_rn(1.0f, sp), v1), __fmul_rn(sp, vr));
    }
    return F2H(vn);
  }
  __device__ static S Spike(bool s) { return s ? 0x3c00u : 0u; }
  __device__ static bool IsSpike(S s) { return s != 0; }
  __device__ static S Count(long long c) { return F2H(__ll2float_rn(c)); }
  __device__ static S Quot(uint32_t c, double window) {
    return F2H(__fdiv_rn(static_cast<float>(c), static_cast<float>(window)));
  }
};

// ---- IFNeuron / IFNeuronSeq / IFNeuronSeqConst -------------------------------------------------

template <int kDType, int kMode>
__global__ void SeqKernel(const typename Elem<kDType>::S* __restrict__ x, const typename Elem<kDType>::S* __restrict__ v,
                          typename Elem<kDType>::S* __restrict__ s, typename Elem<kDType>::S* __restrict__ v_next,
                          int64_t m, int64_t k, int64_t x_stride, double thd, double vrd) {
  typedef Elem<kDType> E;
  const typename E::C th = E::Th(thd), vr = E::Th(vrd);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    typename E::S pot = v[i];
    const typename E::S* xi = x + i;
    typename E::S* si = s + i;
    for (int64_t t = 0; t < k; ++t) {
      bool sp;
      pot = E::template Step<kMode>(pot, xi[t * x_stride], th, vr, &sp);
      si[t * m] = E::Spike(sp);
    }
    v_next[i] = pot;
  }
}

// count[r] = spikes of s[r*d .. r*d + d), one block per row (grid-stride over rows).
template <int kDType>
__global__ void CountRowsKernel(const typename Elem<kDType>::S* __restrict__ s, int64_t rows, int64_t d,
                                typename Elem<kDType>::S* __restrict__ count) {
  typedef Elem<kDType> E;
  __shared__ unsigned long long warp_sums[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const typename E::S* row = s + r * d;
    unsigned long long c = 0;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) c += E::IsSpike(row[i]) ? 1u : 0u;
    for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      count[r] = E::Count(static_cast<long long>(total));
    }
    __syncthreads();
  }
}

int GridFor(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = int64_t{1} << 30;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

template <int kDType, int kMode>
void SeqTyped(const SeqParams& p, cudaStream_t stream) {
  typedef typename Elem<kDType>::S S;
  if (p.m > 0) {
    SeqKernel<kDType, kMode><<<GridFor(p.m, kThreads), kThreads, 0, stream>>>(
        static_cast<const S*>(p.x), static_cast<const S*>(p.v), static_cast<S*>(p.s), static_cast<S*>(p.v_next), p.m,
        p.k, p.x_stride, p.th, p.vr);
  }
  const int64_t rows = p.k * p.n;
  if (p.count != nullptr && rows > 0) {
    if (p.d == 0) {
      cudaMemsetAsync(p.count, 0, static_cast<size_t>(rows) * sizeof(S), stream);  // +0 in every type
    } else {
      const int grid = static_cast<int>(rows < (int64_t{1} << 30) ? rows : (int64_t{1} << 30));
      CountRowsKernel<kDType><<<grid, kThreads, 0, stream>>>(static_cast<const S*>(p.s), rows, p.d,
                                                             static_cast<S*>(p.count));
    }
  }
}

// ---- IFNeuronSeqAvgPool / IFNeuronSeqConstAvgPool ---------------------------------------------

constexpr int kMaxWindowRegs = 16;
constexpr int kPoolThreads = 256;
constexpr int kPoolThreadsOneBlock = 512;  // <= kPoolMaxThreads (registers: up to ~70 per thread)
constexpr int kPoolMaxThreads = 512;

// Work items of a sample: first C*ho*wo windows, then C*cr cropped neurons (cr per plane: rows
// below ho*kh, or columns right of wo*kw). Per item: K steps; per step its spikes are summed
// per warp and added into the block's shared per-step counters (cnt[t]).
// kRegs: window potentials held in registers (kh*kw <= kRegs), else 0: stepped in V_next in place.
template <int kDType, int kMode, int kRegs>
__device__ void PoolItem(const PoolParams& p, int64_t n, int64_t item, bool active, unsigned* cnt) {
  typedef Elem<kDType> E;
  typedef typename E::S S;
  const typename E::C th = E::Th(p.th), vr = E::Th(p.vr);
  const S* x = static_cast<const S*>(p.x);
  const S* v = static_cast<const S*>(p.v);
  S* vn = static_cast<S*>(p.v_next);
  S* out = static_cast<S*>(p.p);
  const int64_t hw = p.h * p.w;
  const int64_t chw = p.c * hw;
  const int64_t windows = p.c * p.ho * p.wo;
  const int64_t m = p.n * chw;
  const bool is_window = active && item < windows;
  int64_t base = 0;  // offset within the sample of the item's first neuron
  int64_t pidx = 0;  // the window's index in a P row
  int kk = 1;
  if (active) {
    if (is_window) {
      const int64_t plane = item / (p.ho * p.wo);
      const int64_t q = item - plane * (p.ho * p.wo);
      const int64_t io = q / p.wo, jo = q - io * p.wo;
      base = plane * hw + io * p.kh * p.w + jo * p.kw;
      pidx = item;
      kk = static_cast<int>(p.kh * p.kw);
    } else {
      const int64_t cr = hw - p.ho * p.kh * p.wo * p.kw;
      const int64_t j0 = item - windows;
      const int64_t plane = j0 / cr;
      const int64_t j = j0 - plane * cr;
      const int64_t right = p.w - p.wo * p.kw;  // columns right of the windows
      const int64_t top = p.ho * p.kh * right;  // cropped neurons in rows covered by windows
      int64_t row, col;
      if (j < top) {
        row = j / right;
        col = p.wo * p.kw + (j - row * right);
      } else {
        row = p.ho * p.kh + (j - top) / p.w;
        col = (j - top) % p.w;
      }
      base = plane * hw + row * p.w + col;
    }
  }
  const int64_t sample_off = n * chw;
  const int lane = threadIdx.x & 31;
  const int kw = static_cast<int>(p.kw);
  const int64_t prow = p.c * p.ho * p.wo;
  if (kRegs > 0) {
    S pot[kRegs > 0 ? kRegs : 1];
#pragma unroll
    for (int e = 0; e < (kRegs > 0 ? kRegs : 1); ++e) {
      if (active && e < kk) {
        const int64_t off = is_window ? base + (e / kw) * p.w + (e % kw) : base;
        pot[e] = v[sample_off + off];
      }
    }
    for (int64_t t = 0; t < p.k; ++t) {
      unsigned c = 0;
      if (active) {
        const S* xt = x + t * p.x_stride + sample_off;
#pragma unroll
        for (int e = 0; e < (kRegs > 0 ? kRegs : 1); ++e) {
          if (e < kk) {
            const int64_t off = is_window ? base + (e / kw) * p.w + (e % kw) : base;
            bool sp;
            pot[e] = E::template Step<kMode>(pot[e], xt[off], th, vr, &sp);
            c += sp ? 1u : 0u;
          }
        }
        if (is_window) out[(t * p.n + n) * prow + pidx] = E::Quot(c, p.window);
      }
      c = __reduce_add_sync(0xffffffffu, c);
      if (lane == 0 && c != 0) atomicAdd(&cnt[t], c);
    }
    if (active) {
#pragma unroll
      for (int e = 0; e < (kRegs > 0 ? kRegs : 1); ++e) {
        if (e < kk) {
          const int64_t off = is_window ? base + (e / kw) * p.w + (e % kw) : base;
          vn[sample_off + off] = pot[e];
        }
      }
    }
  } else {
    for (int64_t t = 0; t < p.k; ++t) {
      unsigned c = 0;
      if (active) {
        const S* src = t == 0 ? v : vn;
        const S* xt = x + t * p.x_stride + sample_off;
        for (int e = 0; e < kk; ++e) {
          const int64_t off = is_window ? base + (e / kw) * p.w + (e % kw) : base;
          bool sp;
          vn[sample_off + off] = E::template Step<kMode>(src[sample_off + off], xt[off], th, vr, &sp);
          c += sp ? 1u : 0u;
        }
        if (is_window) out[(t * p.n + n) * prow + pidx] = E::Quot(c, p.window);
      }
      c = __reduce_add_sync(0xffffffffu, c);
      if (lane == 0 && c != 0) atomicAdd(&cnt[t], c);
    }
    if (active && p.k == 0) {
      for (int e = 0; e < kk; ++e) {
        const int64_t off = is_window ? base + (e / kw) * p.w + (e % kw) : base;
        vn[sample_off + off] = v[sample_off + off];
      }
    }
  }
  (void)m;
}

// Accumulating into Count's storage viewed as integers (float: int32, double: int64).
template <int kDType>
struct CountInt;
template <>
struct CountInt<kF32> {
  typedef unsigned int I;
  __device__ static void Add(void* count, int64_t r, unsigned c) { atomicAdd(static_cast<I*>(count) + r, c); }
};
template <>
struct CountInt<kF64> {
  typedef unsigned long long I;
  __device__ static void Add(void* count, int64_t r, unsigned c) {
    atomicAdd(static_cast<I*>(count) + r, static_cast<unsigned long long>(c));
  }
};
template <>
struct CountInt<kF16> {  // never used (float16 pools run one block per sample)
  typedef unsigned short I;
  __device__ static void Add(void*, int64_t, unsigned) {}
};

// grid: (blocks per sample, samples (grid-stride)); dynamic shared memory: K unsigned counters.
// direct: one block covers a sample's items (gridDim.x == 1): it writes Count itself.
template <int kDType, int kMode, int kRegs>
__global__ void __launch_bounds__(kPoolMaxThreads) PoolKernel(PoolParams p, int64_t items, bool direct) {
  typedef Elem<kDType> E;
  extern __shared__ unsigned cnt[];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t rounded = (items + stride - 1) / stride * stride;  // whole warps loop together
  for (int64_t n = blockIdx.y; n < p.n; n += gridDim.y) {
    for (int64_t t = threadIdx.x; t < p.k; t += blockDim.x) cnt[t] = 0;
    __syncthreads();
    for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < rounded; item += stride) {
      PoolItem<kDType, kMode, kRegs>(p, n, item, item < items, cnt);
    }
    __syncthreads();
    for (int64_t t = threadIdx.x; t < p.k; t += blockDim.x) {
      if (direct) {
        static_cast<typename E::S*>(p.count)[t * p.n + n] = E::Count(cnt[t]);
      } else if (cnt[t] != 0) {
        CountInt<kDType>::Add(p.count, t * p.n + n, cnt[t]);
      }
    }
    __syncthreads();
  }
}

template <int kDType>
__global__ void CountFromIntKernel(void* count, int64_t rows) {
  typedef Elem<kDType> E;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const typename CountInt<kDType>::I c = static_cast<typename CountInt<kDType>::I*>(count)[r];
    static_cast<typename E::S*>(count)[r] = E::Count(static_cast<long long>(c));
  }
}

template <int kDType, int kMode>
const char* PoolTyped(const PoolParams& p, cudaStream_t stream) {
  typedef typename Elem<kDType>::S S;
  const int64_t hw = p.h * p.w;
  const int64_t m = p.n * p.c * hw;
  const int64_t rows = p.k * p.n;
  if (m == 0 || p.k == 0) {
    if (m > 0) cudaMemcpyAsync(p.v_next, p.v, static_cast<size_t>(m) * sizeof(S), cudaMemcpyDeviceToDevice, stream);
    if (rows > 0) cudaMemsetAsync(p.count, 0, static_cast<size_t>(rows) * sizeof(S), stream);
    return nullptr;
  }
  const size_t smem = static_cast<size_t>(p.k) * sizeof(unsigned);
  if (smem > 48 * 1024) return "the pooled ops support at most 12288 steps";
  if (p.c * hw >= (int64_t{1} << 31)) return "more than 2^31 neurons per sample";
  const int64_t items = p.c * p.ho * p.wo + p.c * (hw - p.ho * p.kh * p.wo * p.kw);
  const bool one_block = kDType == kF16;  // float16: Count has no room for an integer accumulator
  const int threads = one_block ? kPoolThreadsOneBlock : kPoolThreads;
  int64_t bx = one_block ? 1 : (items + threads - 1) / threads;
  if (bx > (int64_t{1} << 30)) bx = int64_t{1} << 30;
  const bool direct = bx == 1;
  const unsigned gy = static_cast<unsigned>(p.n < 65535 ? p.n : 65535);
  if (!direct) cudaMemsetAsync(p.count, 0, static_cast<size_t>(rows) * sizeof(S), stream);
  const dim3 grid(static_cast<unsigned>(bx), gy);
  if (p.kh * p.kw <= 4) {
    PoolKernel<kDType, kMode, 4><<<grid, threads, smem, stream>>>(p, items, direct);
  } else if (p.kh * p.kw <= kMaxWindowRegs) {
    PoolKernel<kDType, kMode, kMaxWindowRegs><<<grid, threads, smem, stream>>>(p, items, direct);
  } else {
    PoolKernel<kDType, kMode, 0><<<grid, threads, smem, stream>>>(p, items, direct);
  }
  if (!direct) CountFromIntKernel<kDType><<<GridFor(rows, kThreads), kThreads, 0, stream>>>(p.count, rows);
  return nullptr;
}

const char* LastError() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* LaunchSeq(int dtype, int mode, const SeqParams& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dtype * 2 + mode) {
    case kF32 * 2 + 0: SeqTyped<kF32, 0>(p, stream); break;
    case kF32 * 2 + 1: SeqTyped<kF32, 1>(p, stream); break;
    case kF64 * 2 + 0: SeqTyped<kF64, 0>(p, stream); break;
    case kF64 * 2 + 1: SeqTyped<kF64, 1>(p, stream); break;
    case kF16 * 2 + 0: SeqTyped<kF16, 0>(p, stream); break;
    case kF16 * 2 + 1: SeqTyped<kF16, 1>(p, stream); break;
    default: return "unsupported element type or reset_mode";
  }
  return LastError();
}

const char* LaunchPool(int dtype, int mode, const PoolParams& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const char* err = nullptr;
  switch (dtype * 2 + mode) {
    case kF32 * 2 + 0: err = PoolTyped<kF32, 0>(p, stream); break;
    case kF32 * 2 + 1: err = PoolTyped<kF32, 1>(p, stream); break;
    case kF64 * 2 + 0: err = PoolTyped<kF64, 0>(p, stream); break;
    case kF64 * 2 + 1: err = PoolTyped<kF64, 1>(p, stream); break;
    case kF16 * 2 + 0: err = PoolTyped<kF16, 0>(p, stream); break;
    case kF16 * 2 + 1: err = PoolTyped<kF16, 1>(p, stream); break;
    default: return "unsupported element type or reset_mode";
  }
  if (err != nullptr) return err;
  return LastError();
}

}  // namespace onnx_snn_cuda

#endif  // ONNX_SNN_CUDA_HOST
