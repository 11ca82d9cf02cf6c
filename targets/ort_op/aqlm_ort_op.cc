// ONNX Runtime custom-op library for aqlm.AqlmMatMul, aqlm.DenseMatMul and aqlm.GroupQueryAttention (domain "aqlm",
// version 1; spec: docs/aqlm-onnx-op.md).
//
// Written against ORT's C ABI only (ort_min_abi.h), so it loads into any ORT >= 1.16 through
// SessionOptions.register_custom_ops_library. The arithmetic is not here: each call runs the TVM-compiled kernel
// of kernels/ for the layer's shape (aqlm_gemv_OxI_bN for N <= 8 tokens, else aqlm_gemm_OxI), from the kernel
// library that sits next to this file in the artifact folder (or $AQLM_KERNEL_LIBRARY), through the TVM runtime.
// Bad input (dtype, rank, shape, attribute) is returned as an ORT error status naming the node and the input.
// Threads: the TVM pool has $AQLM_NUM_THREADS threads (default: all cores); keep ORT's own pool at 1.
#include "ort_min_abi.h"

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#ifndef AQLM_KERNEL_LIBRARY
#define AQLM_KERNEL_LIBRARY "kernels_x86.so"
#endif

extern "C" OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base);

namespace {

const OrtApi* g_api = nullptr;
std::mutex g_mutex;
std::unique_ptr<tvm::ffi::Module> g_module;
std::string g_module_error;

OrtStatus* op_error(const char* op, OrtErrorCode code, const std::string& msg) {
  using Fn = OrtStatus* (*)(OrtErrorCode, const char*);
  return ort_fn<Fn>(g_api, ort_slot::CreateStatus)(code, (std::string(op) + ": " + msg).c_str());
}

OrtStatus* make_error(OrtErrorCode code, const std::string& msg) {
  return op_error("AqlmMatMul", code, msg);
}

#define ORT_TRY(expr)                     \
  do {                                    \
    OrtStatus* _status = (expr);          \
    if (_status != nullptr) return _status; \
  } while (0)

std::string kernel_library_path() {
  if (const char* env = std::getenv("AQLM_KERNEL_LIBRARY")) return env;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&RegisterCustomOps), &info) && info.dli_fname) {
    std::string self = info.dli_fname;
    size_t slash = self.rfind('/');
    return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/" + AQLM_KERNEL_LIBRARY;
  }
  return AQLM_KERNEL_LIBRARY;
}

// Load the kernel library once per process.
const tvm::ffi::Module* kernel_module(std::string* error) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_module) return g_module.get();
  if (!g_module_error.empty()) {
    *error = g_module_error;
    return nullptr;
  }
  // AQLM_NUM_THREADS (the op's own setting, what OrtDecoder(threads=) sets) wins over a TVM_NUM_THREADS set for
  // other TVM code in the process
  if (const char* n = std::getenv("AQLM_NUM_THREADS")) setenv("TVM_NUM_THREADS", n, 1);
  std::string path = kernel_library_path();
  try {
    g_module = std::make_unique<tvm::ffi::Module>(tvm::ffi::Module::LoadFromFile(path));
  } catch (const std::exception& e) {
    g_module_error = "cannot load the kernel library " + path + ": " + e.what();
    *error = g_module_error;
    return nullptr;
  }
  return g_module.get();
}

uint16_t half_bits(const void* p, size_t i) { return static_cast<const uint16_t*>(p)[i]; }

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

OrtStatus* describe(const OrtValue* value, TensorView* out) {
  using GetTS = OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
  using GetType = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, ONNXTensorElementDataType*);
  using GetCount = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*);
  using GetDims = OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
  using Release = void (*)(OrtTensorTypeAndShapeInfo*);
  using GetData = OrtStatus* (*)(OrtValue*, void**);
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ORT_TRY(ort_fn<GetTS>(g_api, ort_slot::GetTensorTypeAndShape)(value, &info));
  size_t ndim = 0;
  OrtStatus* st = ort_fn<GetType>(g_api, ort_slot::GetTensorElementType)(info, &out->type);
  if (!st) st = ort_fn<GetCount>(g_api, ort_slot::GetDimensionsCount)(info, &ndim);
  if (!st) {
    out->shape.resize(ndim);
    st = ort_fn<GetDims>(g_api, ort_slot::GetDimensions)(info, out->shape.data(), ndim);
  }
  ort_fn<Release>(g_api, ort_slot::ReleaseTensorTypeAndShapeInfo)(info);
  if (st) return st;
  out->value = value;
  return ort_fn<GetData>(g_api, ort_slot::GetTensorMutableData)(const_cast<OrtValue*>(value), &out->data);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    default: return "another type";
  }
}

// 64-byte aligned scratch: the generated kernels assume aligned data (docs/tvm-and-ort-notes.md N6).
struct Aligned {
  void* ptr = nullptr;
  size_t bytes = 0;
  void* get(size_t n) {
    if (n > bytes) {
      std::free(ptr);
      bytes = (n + 63) / 64 * 64;
      ptr = std::aligned_alloc(64, bytes);
      if (ptr == nullptr) {
        bytes = 0;
        throw std::bad_alloc();  // an ORT error status from the compute wrappers, not a null write
      }
    }
    return ptr;
  }
  ~Aligned() { std::free(ptr); }
};

struct Kernel {
  int64_t M = 0, B = 0, g = 0;
  Aligned scales, bias;  // fp32 copies, 64-byte aligned like every array the kernels read
  std::vector<unsigned char> scales_src;  // the scales these fp32 values came from (skip reconverting if unchanged)
  Aligned x_copy, codes_copy, cb_copy, y_copy;
  // Row-tiled copy of the codes for kernels whose symbol ends in "_rt64" (kernel_abi.py ROW_TILED_SUFFIX), made
  // once: codes are initializers, constant at a fixed address for the session; the address, size and a sample of
  // the bytes say whether the copy is still the one of these codes.
  Aligned codes_tiled;
  const void* tiled_src = nullptr;
  size_t tiled_bytes = 0;
  uint64_t tiled_sample = 0;
  std::map<std::string, tvm::ffi::Function> functions;
  std::map<std::string, bool> row_tiled;  // symbol → whether it is the _rt64 variant
  std::map<std::string, std::string> library_name;  // symbol → the library function's own name (suffixes included)
  // Inputs 1..5 that are constant initializers (ORT's KernelInfoGetConstantInput_tensor, asked once at kernel
  // creation): they cannot change for the session's lifetime. When codes, codebooks and scales are (and bias and
  // partitions, where present), the first complete call keeps what it prepared (`ready`) and every later call reads
  // only x and looks its kernel up by token count: no string, map or fingerprint work per call. A decode step of
  // SmolLM2 makes 120 of these calls; the checks of the general path were ≈ 2 µs each.
  bool constant[6] = {};
  std::atomic<bool> ready{false};  // read before the lock (compute), set under it
  int64_t I = 0, O = 0, P = 1;
  const void* codes_src = nullptr;  // ORT's codes (for the row-tiled copy)
  void* codes_plain = nullptr;      // the codes as the plain kernels read them (ORT's, or an aligned copy)
  void* cb_ptr = nullptr;           // the codebooks, aligned
  struct Resolved {
    tvm::ffi::Function f;
    bool tiled = false;
    std::string symbol;
    bool prepared = false;  // f is the `_prep` variant: its codebooks argument is `cb_prepared`
  };
  // The codebooks in the LUT kernel's integer form (kernels/gemv_lut_vbmi.py `prepared_codebooks`), computed once
  // from constant codebooks for the library's `_prep` kernels; empty until a resolved kernel needs it.
  Aligned cb_prepared;
  int64_t cb_prepared_count = 0;
  // by token count: [N] for N = 1..8 (the GEMVs), [0] for any other N (the GEMM); resolved on first use
  std::unique_ptr<Resolved> by_tokens[9];
  // ORT may run one session from many threads at once, and every call of this node shares the state above (the
  // scratch buffers, the converted scales, the function map): one call at a time per node.
  std::mutex mu;
};

// A cheap fingerprint of a code tensor, checked on every call: 64 words of 8 bytes at evenly spaced places
// (FNV-1a over whole words; tens of nanoseconds, not a pass over the codes).
uint64_t sample_bytes(const unsigned char* p, size_t n) {
  uint64_t h = 1469598103934665603ull;
  if (n < 8) {
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
  for (size_t i = 0; i < 64; ++i) {
    uint64_t w;
    std::memcpy(&w, p + (n - 8) * i / 63, 8);
    h = (h ^ w) * 1099511628211ull;
  }
  return h;
}

// codes[O, J, M] → [O/64, J, M, 64] (the 64 rows of a tile innermost): kernels/gemv_lut_vbmi.py `to_row_tiled`.
// `constant`: src is a constant initializer (Kernel::constant), so its address and size say it all.
void* row_tiled_codes(Kernel* k, const void* src, int64_t O, int64_t J, int64_t M, size_t code_bytes,
                      bool constant) {
  const size_t bytes = O * J * M * code_bytes;
  if (constant && k->tiled_src == src && k->tiled_bytes == bytes) return k->codes_tiled.ptr;
  const uint64_t sample = sample_bytes(static_cast<const unsigned char*>(src), bytes);
  if (k->tiled_src == src && k->tiled_bytes == bytes && k->tiled_sample == sample) return k->codes_tiled.ptr;
  auto* dst = static_cast<unsigned char*>(k->codes_tiled.get(bytes));
  const auto* in = static_cast<const unsigned char*>(src);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t j = 0; j < J; ++j)
      for (int64_t m = 0; m < M; ++m)
        std::memcpy(dst + ((((o / 64) * J + j) * M + m) * 64 + o % 64) * code_bytes,
                    in + ((o * J + j) * M + m) * code_bytes, code_bytes);
  k->tiled_src = src;
  k->tiled_bytes = bytes;
  k->tiled_sample = sample;
  return dst;
}

DLTensor dl(void* data, DLDataType dtype, std::vector<int64_t>& shape) {
  DLTensor t;
  t.data = data;
  t.device = DLDevice{kDLCPU, 0};
  t.ndim = static_cast<int>(shape.size());
  t.dtype = dtype;
  t.shape = shape.data();
  t.strides = nullptr;
  t.byte_offset = 0;
  return t;
}

void* aligned_or_copy(void* data, size_t bytes, Aligned& scratch) {
  if (reinterpret_cast<uintptr_t>(data) % 64 == 0) return data;
  void* dst = scratch.get(bytes);
  std::memcpy(dst, data, bytes);
  return dst;
}

// The call's inputs: `min_in` required ones, up to `max_in` in all (the rest optional, possibly absent).
OrtStatus* read_inputs(OrtKernelContext* ctx, const char* op, size_t min_in, size_t max_in, TensorView* t,
                       bool* present) {
  using InCount = OrtStatus* (*)(const OrtKernelContext*, size_t*);
  using GetIn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  size_t n_in = 0;
  ORT_TRY(ort_fn<InCount>(g_api, ort_slot::KernelContext_GetInputCount)(ctx, &n_in));
  if (n_in < min_in || n_in > max_in)
    return op_error(op, ORT_INVALID_ARGUMENT, "expected " + std::to_string(min_in) + " to " + std::to_string(max_in) +
                    " inputs, found " + std::to_string(n_in));
  for (size_t i = 0; i < max_in; ++i) present[i] = false;
  for (size_t i = 0; i < n_in; ++i) {
    const OrtValue* v = nullptr;
    ORT_TRY(ort_fn<GetIn>(g_api, ort_slot::KernelContext_GetInput)(ctx, i, &v));
    if (v == nullptr) {
      if (i >= min_in) continue;  // an omitted optional input
      return op_error(op, ORT_INVALID_ARGUMENT, "input " + std::to_string(i) + " is missing");
    }
    ORT_TRY(describe(v, &t[i]));
    present[i] = true;
  }
  return nullptr;
}

// Output 0 shaped like x with its last dimension `out`.
OrtStatus* output_like(OrtKernelContext* ctx, const TensorView& x, int64_t out, TensorView* y) {
  using GetOut = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  std::vector<int64_t> shape = x.shape;
  shape.back() = out;
  OrtValue* value = nullptr;
  ORT_TRY(ort_fn<GetOut>(g_api, ort_slot::KernelContext_GetOutput)(ctx, 0, shape.data(), shape.size(), &value));
  return describe(value, y);
}

// Run a kernel of the library on packed arguments; an exception becomes an ORT error naming the symbol.
OrtStatus* call_packed(const char* op, const tvm::ffi::Function& f, const std::string& symbol,
                       std::vector<tvm::ffi::AnyView>& packed) {
  try {
    tvm::ffi::Any result;
    f.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &result);
  } catch (const std::exception& e) {
    return op_error(op, ORT_RUNTIME_EXCEPTION, symbol + ": " + e.what());
  }
  return nullptr;
}

// The same on DLTensor arguments only.
OrtStatus* call_kernel(const char* op, const tvm::ffi::Function& f, const std::string& symbol,
                       std::vector<DLTensor>& args) {
  std::vector<tvm::ffi::AnyView> packed;
  for (auto& a : args) packed.emplace_back(&a);
  return call_packed(op, f, symbol, packed);
}

// kernels/gemv_lut_vbmi.py `prepared_codebooks` in C++ (keep the two in step): fp16 codebooks [P*M, K, g] → int32
// [P*M*g/2*K + 2P]: the int16 pairs cq[pm, tp, k] = (round(C[pm,k,2tp]·s), round(C[pm,k,2tp+1]·s)) with
// s = 32767 / max|C| of the partition (fp32, rounded half to even), then per partition max|C| and the largest
// squared norm of its quantized codewords, as fp32 bits.
void prepare_codebooks(const void* cb, int64_t P, int64_t M, int64_t K, int64_t g, int32_t* out) {
  const int64_t pairs = g / 2, ncq = P * M * pairs * K;
  for (int64_t p = 0; p < P; ++p) {
    float cabs = 1e-30f;
    for (int64_t i = p * M * K * g; i < (p + 1) * M * K * g; ++i) cabs = std::max(cabs, std::fabs(half_to_float(half_bits(cb, i))));
    const float cinv = 32767.0f / cabs;
    int64_t norm_max = 0;
    for (int64_t pm = p * M; pm < (p + 1) * M; ++pm)
      for (int64_t k = 0; k < K; ++k) {
        int64_t norm = 0;
        for (int64_t tp = 0; tp < pairs; ++tp) {
          const int64_t base = (pm * K + k) * g + 2 * tp;
          const int32_t lo = static_cast<int32_t>(std::nearbyint(half_to_float(half_bits(cb, base)) * cinv));
          const int32_t hi = static_cast<int32_t>(std::nearbyint(half_to_float(half_bits(cb, base + 1)) * cinv));
          out[(pm * pairs + tp) * K + k] = static_cast<int32_t>((uint32_t(lo) & 0xFFFFu) | ((uint32_t(hi) & 0xFFFFu) << 16));
          norm += int64_t(lo) * lo + int64_t(hi) * hi;
        }
        norm_max = std::max(norm_max, norm);
      }
    const float stats[2] = {cabs, std::max(static_cast<float>(norm_max), 1e-30f)};
    std::memcpy(out + ncq + 2 * p, stats, sizeof(stats));
  }
}

// The fast path of a node whose parameters are constant initializers (Kernel::ready): x, the output, the call.
// `handled` false: a token count this node has not run yet, for the general path to resolve (nothing done).
OrtStatus* compute_prepared(Kernel* k, OrtKernelContext* ctx, bool* handled) {
  *handled = true;
  using GetIn = OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**);
  const OrtValue* xv = nullptr;
  ORT_TRY(ort_fn<GetIn>(g_api, ort_slot::KernelContext_GetInput)(ctx, 0, &xv));
  if (xv == nullptr) return make_error(ORT_INVALID_ARGUMENT, "input 0 is missing");
  TensorView x;
  ORT_TRY(describe(xv, &x));
  std::lock_guard<std::mutex> lock(k->mu);  // the node's state below is written by the general path under it
  const int64_t I = k->I, O = k->O;
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.empty() || x.shape.back() != I)
    return make_error(ORT_INVALID_ARGUMENT, std::string("x: expected float32 [..., ") + std::to_string(I) + "], found " +
                      type_name(x.type) + " " + shape_str(x.shape));
  const int64_t N = x.numel() / I;
  const size_t slot = N <= 8 ? static_cast<size_t>(N) : 0;
  if (N > 0 && !k->by_tokens[slot]) {
    *handled = false;
    return nullptr;
  }
  TensorView y;
  ORT_TRY(output_like(ctx, x, O, &y));
  if (N == 0) return nullptr;
  const Kernel::Resolved& r = *k->by_tokens[slot];
  const int64_t J = I / k->g, K = int64_t(1) << k->B;
  const size_t code_bytes = k->B <= 8 ? 1 : 2;
  const int64_t P = k->P;
  std::vector<int64_t> x_shape{N, I}, codes_shape{O, J, k->M}, cb_shape{P * k->M, K, k->g}, o_shape{O}, yk_shape{N, O},
      prep_shape{k->cb_prepared_count};
  void* y_ptr = reinterpret_cast<uintptr_t>(y.data) % 64 == 0 ? y.data : k->y_copy.get(N * O * 4);
  void* codes = r.tiled ? row_tiled_codes(k, k->codes_src, O, J, k->M, code_bytes, true) : k->codes_plain;
  DLTensor args[6] = {
      dl(aligned_or_copy(x.data, N * I * 4, k->x_copy), DLDataType{kDLFloat, 32, 1}, x_shape),
      dl(codes, DLDataType{kDLInt, uint8_t(8 * code_bytes), 1}, codes_shape),
      r.prepared ? dl(k->cb_prepared.ptr, DLDataType{kDLInt, 32, 1}, prep_shape)
                 : dl(k->cb_ptr, DLDataType{kDLFloat, 16, 1}, cb_shape),
      dl(k->scales.ptr, DLDataType{kDLFloat, 32, 1}, o_shape),
      dl(k->bias.ptr, DLDataType{kDLFloat, 32, 1}, o_shape),
      dl(y_ptr, DLDataType{kDLFloat, 32, 1}, yk_shape)};
  tvm::ffi::AnyView packed[6] = {&args[0], &args[1], &args[2], &args[3], &args[4], &args[5]};
  try {
    tvm::ffi::Any result;
    r.f.CallPacked(packed, 6, &result);
  } catch (const std::exception& e) {
    return op_error("AqlmMatMul", ORT_RUNTIME_EXCEPTION, r.symbol + ": " + e.what());
  }
  if (y_ptr != y.data) std::memcpy(y.data, y_ptr, N * O * 4);
  return nullptr;
}

OrtStatus* compute(Kernel* k, OrtKernelContext* ctx) {
  if (k->ready) {
    bool handled = false;
    OrtStatus* st = compute_prepared(k, ctx, &handled);
    if (handled) return st;
  }
  TensorView t[6];
  bool present[6];
  ORT_TRY(read_inputs(ctx, "AqlmMatMul", 4, 6, t, present));  // optional: bias, partitions
  TensorView &x = t[0], &codes = t[1], &cb = t[2], &sc = t[3];
  const int64_t K = int64_t(1) << k->B;
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.empty())
    return make_error(ORT_INVALID_ARGUMENT, std::string("x: expected float32 [..., in], found ") + type_name(x.type) + " " + shape_str(x.shape));
  const auto want_codes = k->B <= 8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
  if (codes.type != want_codes || codes.shape.size() != 3 || codes.shape[2] != k->M)
    return make_error(ORT_INVALID_ARGUMENT, std::string("codes: expected ") + type_name(want_codes) + " [out, in/" +
                      std::to_string(k->g) + ", " + std::to_string(k->M) + "], found " + type_name(codes.type) + " " + shape_str(codes.shape));
  const int64_t O = codes.shape[0], J = codes.shape[1], I = J * k->g;
  if (O < 1 || J < 1)
    return make_error(ORT_INVALID_ARGUMENT, "codes: expected at least one row and one input group, found " + shape_str(codes.shape));
  if (x.shape.back() != I)
    return make_error(ORT_INVALID_ARGUMENT, "x: last dimension " + std::to_string(x.shape.back()) + " does not match codes " +
                      shape_str(codes.shape) + " with in_group_size " + std::to_string(k->g) + " (in = " + std::to_string(I) + ")");
  // Row partitions of a fused layer (q/k/v, gate/up): partition p decodes with codebooks p*M .. p*M+M-1.
  std::vector<int64_t> parts;
  if (present[5]) {
    TensorView& pv = t[5];
    if (pv.type != 7 /* INT64 */ || pv.shape.size() != 1 || pv.numel() < 1)
      return make_error(ORT_INVALID_ARGUMENT, std::string("partitions: expected int64 [P], found ") + type_name(pv.type) + " " + shape_str(pv.shape));
    int64_t total = 0;
    for (int64_t i = 0; i < pv.numel(); ++i) {
      int64_t v = static_cast<const int64_t*>(pv.data)[i];
      if (v < 1) return make_error(ORT_INVALID_ARGUMENT, "partitions: sizes must be >= 1");
      parts.push_back(v);
      total += v;
    }
    if (total != O)
      return make_error(ORT_INVALID_ARGUMENT, "partitions: sizes add up to " + std::to_string(total) + ", codes have " + std::to_string(O) + " rows");
  }
  const int64_t P = parts.empty() ? 1 : static_cast<int64_t>(parts.size());
  std::string suffix;
  if (P > 1) {
    suffix = "_p";
    for (size_t i = 0; i < parts.size(); ++i) suffix += (i ? "-" : "") + std::to_string(parts[i]);
  }
  const std::vector<int64_t> cb_want{P * k->M, K, 1, k->g};
  if (cb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 || cb.shape != cb_want)
    return make_error(ORT_INVALID_ARGUMENT, std::string("codebooks: expected float16 ") + shape_str(cb_want) + ", found " + type_name(cb.type) + " " + shape_str(cb.shape));
  if ((sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) || sc.numel() != O)
    return make_error(ORT_INVALID_ARGUMENT, std::string("scales: expected float16/float32 [") + std::to_string(O) + ", 1, 1, 1], found " + type_name(sc.type) + " " + shape_str(sc.shape));
  bool has_bias = present[4] && t[4].numel() > 0;
  if (has_bias && (t[4].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t[4].numel() != O))
    return make_error(ORT_INVALID_ARGUMENT, std::string("bias: expected float32 [") + std::to_string(O) + "], found " + type_name(t[4].type) + " " + shape_str(t[4].shape));

  // Any code value is safe: every kernel reads a code as its storage type masked to 2^B - 1 (x mod 2^B, as the HF
  // format's readers do), so no value indexes outside the codebook.

  int64_t N = x.numel() / I;
  TensorView y;
  ORT_TRY(output_like(ctx, x, O, &y));
  if (N == 0) return nullptr;

  std::lock_guard<std::mutex> lock(k->mu);
  // Scales are initializers in practice: convert once, then only check (memcmp) that they did not change.
  const size_t sc_bytes = O * (sc.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 2);
  float* scales = static_cast<float*>(k->scales.get(O * sizeof(float)));
  if (k->scales_src.size() != sc_bytes || std::memcmp(k->scales_src.data(), sc.data, sc_bytes) != 0) {
    for (int64_t o = 0; o < O; ++o)
      scales[o] = sc.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? static_cast<const float*>(sc.data)[o] : half_to_float(half_bits(sc.data, o));
    k->scales_src.assign(static_cast<const unsigned char*>(sc.data), static_cast<const unsigned char*>(sc.data) + sc_bytes);
  }
  float* bias = static_cast<float*>(k->bias.get(O * sizeof(float)));
  if (has_bias) std::memcpy(bias, t[4].data, O * sizeof(float));
  else std::memset(bias, 0, O * sizeof(float));

  std::string error;
  const tvm::ffi::Module* mod = kernel_module(&error);
  if (!mod) return make_error(ORT_FAIL, error);
  std::string gemv = "aqlm_gemv_" + std::to_string(O) + "x" + std::to_string(I) + "_b" + std::to_string(N) + suffix;
  std::string gemm = "aqlm_gemm_" + std::to_string(O) + "x" + std::to_string(I) + suffix;
  std::string symbol = N <= 8 ? gemv : gemm;
  auto it = k->functions.find(symbol);
  if (it == k->functions.end()) {
    // the row-tiled variant first (the library has one or the other for a shape), then the GEMM for any N; for each,
    // first the name with this node's config (a layer whose config is not the artifact's: kernel_abi.config_suffix),
    // then the plain name (the artifact's config)
    const std::string own = "_c" + std::to_string(k->M) + "x" + std::to_string(k->B) + "g" + std::to_string(k->g);
    decltype((*mod)->GetFunction(gemv)) f;
    bool tiled = false;
    std::string found;  // the library's name for it
    for (const std::string& base : N <= 8 ? std::vector<std::string>{gemv, gemm} : std::vector<std::string>{gemm}) {
      for (const std::string& name : {base + own, base}) {
        if ((f = (*mod)->GetFunction(name + "_rt64")).has_value()) { tiled = true; found = name + "_rt64"; break; }
        if ((f = (*mod)->GetFunction(name)).has_value()) { found = name; break; }
      }
      if (f.has_value()) break;
    }
    if (!f.has_value())
      return make_error(ORT_FAIL, "the kernel library has no kernel for a " + std::to_string(I) + "->" + std::to_string(O) +
                        " layer with " + std::to_string(N) + " tokens (" + symbol + "): was it built from this checkpoint?");
    it = k->functions.emplace(symbol, f.value()).first;
    k->row_tiled[symbol] = tiled;
    k->library_name[symbol] = found;
  }

  const size_t code_bytes = k->B <= 8 ? 1 : 2;
  const bool tiled = k->row_tiled[symbol];
  std::vector<int64_t> x_shape{N, I}, codes_shape{O, J, k->M}, cb_shape{P * k->M, K, k->g}, o_shape{O}, yk_shape{N, O};
  void* y_ptr = reinterpret_cast<uintptr_t>(y.data) % 64 == 0 ? y.data : k->y_copy.get(N * O * 4);
  void* codes_ptr = tiled ? row_tiled_codes(k, codes.data, O, J, k->M, code_bytes, k->constant[1])
                          : aligned_or_copy(codes.data, O * J * k->M * code_bytes, k->codes_copy);
  void* cb_ptr = aligned_or_copy(cb.data, P * k->M * K * k->g * 2, k->cb_copy);
  std::vector<DLTensor> args = {
      dl(aligned_or_copy(x.data, N * I * 4, k->x_copy), DLDataType{kDLFloat, 32, 1}, x_shape),
      dl(codes_ptr, DLDataType{kDLInt, uint8_t(8 * code_bytes), 1}, codes_shape),
      dl(cb_ptr, DLDataType{kDLFloat, 16, 1}, cb_shape),
      dl(scales, DLDataType{kDLFloat, 32, 1}, o_shape),
      dl(bias, DLDataType{kDLFloat, 32, 1}, o_shape),
      dl(y_ptr, DLDataType{kDLFloat, 32, 1}, yk_shape)};
  ORT_TRY(call_kernel("AqlmMatMul", it->second, symbol, args));
  if (y_ptr != y.data) std::memcpy(y.data, y_ptr, N * O * 4);

  // Every parameter a constant initializer: keep what this call prepared for the fast path (compute_prepared).
  if (k->constant[1] && k->constant[2] && k->constant[3] && (!has_bias || k->constant[4]) &&
      (!present[5] || k->constant[5])) {
    const size_t slot = N <= 8 ? static_cast<size_t>(N) : 0;
    if (!k->by_tokens[slot]) {
      // the library's `_prep` variant of this kernel (the VBMI LUT GEMV) reads the codebooks prepared once, here
      const std::string prep = k->library_name[symbol] + "_prep";
      auto fp = (*mod)->GetFunction(prep);
      if (fp.has_value() && k->B == 8 && k->g % 2 == 0) {
        const int64_t count = P * k->M * K * k->g / 2 + 2 * P;
        if (k->cb_prepared_count != count) {
          prepare_codebooks(cb.data, P, k->M, K, k->g, static_cast<int32_t*>(k->cb_prepared.get(count * 4)));
          k->cb_prepared_count = count;
        }
        k->by_tokens[slot].reset(new Kernel::Resolved{fp.value(), tiled, prep, true});
      } else {
        k->by_tokens[slot].reset(new Kernel::Resolved{it->second, tiled, symbol});
      }
    }
    if (!tiled) k->codes_plain = codes_ptr;
    k->codes_src = codes.data;
    k->cb_ptr = cb_ptr;
    k->I = I;
    k->O = O;
    k->P = P;
    k->ready = true;
  }
  return nullptr;
}

// --- aqlm.DenseMatMul: a dense layer (the lm_head) in its stored form, fp16 rows or int8 rows with row scales ---
// The arithmetic is kernels/dense.py's, compiled into the kernel library as aqlm_dense_OxI_f16 / _i8
// (kernel_abi.dense_symbol), run on the TVM pool like every AqlmMatMul: ORT's own pool has one thread (N11).
struct DenseKernel {
  // weights and scales are initializers: an unaligned one is copied once (address, size and a sample of the bytes
  // say whether the copy is still the one of this tensor), not per call (57 MB for SmolLM2's fp16 head)
  struct Cached {
    Aligned copy;
    const void* src = nullptr;
    size_t bytes = 0;
    uint64_t sample = 0;
    void* get(void* data, size_t n) {
      if (reinterpret_cast<uintptr_t>(data) % 64 == 0) return data;
      const uint64_t h = sample_bytes(static_cast<const unsigned char*>(data), n);
      if (src != data || bytes != n || sample != h) {
        std::memcpy(copy.get(n), data, n);
        src = data;
        bytes = n;
        sample = h;
      }
      return copy.ptr;
    }
  };
  Cached weight, scales;
  Aligned x_copy, y_copy;
  std::map<std::string, tvm::ffi::Function> functions;
  std::mutex mu;
};

OrtStatus* dense_error(OrtErrorCode code, const std::string& msg) { return op_error("DenseMatMul", code, msg); }

OrtStatus* dense_compute(DenseKernel* k, OrtKernelContext* ctx) {
  TensorView t[3];
  bool present[3];
  ORT_TRY(read_inputs(ctx, "DenseMatMul", 2, 3, t, present));  // optional: scales
  TensorView &x = t[0], &w = t[1], &sc = t[2];
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.empty())
    return dense_error(ORT_INVALID_ARGUMENT, std::string("x: expected float32 [..., in], found ") + type_name(x.type) + " " + shape_str(x.shape));
  const bool int8 = w.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if ((!int8 && w.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) || w.shape.size() != 2 || w.shape[0] < 1 || w.shape[1] < 1)
    return dense_error(ORT_INVALID_ARGUMENT, std::string("weight: expected float16 or int8 [out, in], found ") + type_name(w.type) + " " + shape_str(w.shape));
  const int64_t O = w.shape[0], I = w.shape[1];
  if (x.shape.back() != I)
    return dense_error(ORT_INVALID_ARGUMENT, "x: last dimension " + std::to_string(x.shape.back()) + " does not match weight " + shape_str(w.shape));
  const bool has_scales = present[2] && sc.numel() > 0;
  if (int8 != has_scales)
    return dense_error(ORT_INVALID_ARGUMENT, int8 ? "scales: int8 rows need float32 scales [" + std::to_string(O) + "]"
                                                  : std::string("scales: only int8 rows take scales (weight is float16)"));
  if (has_scales && (sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || sc.numel() != O))
    return dense_error(ORT_INVALID_ARGUMENT, std::string("scales: expected float32 [") + std::to_string(O) + "], found " + type_name(sc.type) + " " + shape_str(sc.shape));

  const int64_t N = x.numel() / I;
  TensorView y;
  ORT_TRY(output_like(ctx, x, O, &y));
  if (N == 0) return nullptr;

  std::lock_guard<std::mutex> lock(k->mu);
  std::string error;
  const tvm::ffi::Module* mod = kernel_module(&error);
  if (!mod) return dense_error(ORT_FAIL, error);
  const std::string symbol = "aqlm_dense_" + std::to_string(O) + "x" + std::to_string(I) + (int8 ? "_i8" : "_f16");
  auto it = k->functions.find(symbol);
  if (it == k->functions.end()) {
    auto f = (*mod)->GetFunction(symbol);
    if (!f.has_value())
      return dense_error(ORT_FAIL, "the kernel library has no kernel " + symbol + ": was it built from this checkpoint?");
    it = k->functions.emplace(symbol, f.value()).first;
  }
  std::vector<int64_t> x_shape{N, I}, w_shape{O, I}, s_shape{O}, yk_shape{N, O};
  void* y_ptr = reinterpret_cast<uintptr_t>(y.data) % 64 == 0 ? y.data : k->y_copy.get(N * O * 4);
  std::vector<DLTensor> args;
  args.push_back(dl(aligned_or_copy(x.data, N * I * 4, k->x_copy), DLDataType{kDLFloat, 32, 1}, x_shape));
  args.push_back(dl(k->weight.get(w.data, O * I * (int8 ? 1 : 2)),
                    int8 ? DLDataType{kDLInt, 8, 1} : DLDataType{kDLFloat, 16, 1}, w_shape));
  if (int8) args.push_back(dl(k->scales.get(sc.data, O * 4), DLDataType{kDLFloat, 32, 1}, s_shape));
  args.push_back(dl(y_ptr, DLDataType{kDLFloat, 32, 1}, yk_shape));
  ORT_TRY(call_kernel("DenseMatMul", it->second, symbol, args));
  if (y_ptr != y.data) std::memcpy(y.data, y_ptr, N * O * 4);
  return nullptr;
}

// --- the OrtCustomOp callbacks ---------------------------------------------------------------------------------
OrtStatusPtr create_kernel_v2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  using GetAttr = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
  auto k = std::make_unique<Kernel>();
  int64_t og = 1;
  ORT_TRY(ort_fn<GetAttr>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "num_codebooks", &k->M));
  ORT_TRY(ort_fn<GetAttr>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "nbits_per_codebook", &k->B));
  ORT_TRY(ort_fn<GetAttr>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "in_group_size", &k->g));
  ORT_TRY(ort_fn<GetAttr>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "out_group_size", &og));
  if (k->M < 1 || k->B < 1 || k->B > 16 || k->g < 1 || og != 1)
    return make_error(ORT_INVALID_ARGUMENT, "attributes: expected num_codebooks >= 1, nbits_per_codebook 1..16, "
                      "in_group_size >= 1, out_group_size 1; found " + std::to_string(k->M) + ", " +
                      std::to_string(k->B) + ", " + std::to_string(k->g) + ", " + std::to_string(og));
  // Which parameters are constant initializers. A failed query (an input ORT cannot answer for) means "no": that
  // input keeps the general path's checks on every call.
  using GetConst = OrtStatus* (*)(const OrtKernelInfo*, size_t, int*, const OrtValue**);
  using Release = void (*)(OrtStatus*);
  for (size_t i = 1; i < 6; ++i) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* st = ort_fn<GetConst>(g_api, ort_slot::KernelInfoGetConstantInput_tensor)(info, i, &is_constant, &value)) {
      ort_fn<Release>(g_api, ort_slot::ReleaseStatus)(st);
      is_constant = 0;
    }
    k->constant[i] = is_constant != 0 && value != nullptr;
  }
  *out = k.release();
  return nullptr;
}
// KernelComputeV2 / KernelDestroy of an op whose state is K: an exception (a failed allocation) becomes an ORT error
template <class K, OrtStatus* (*Compute)(K*, OrtKernelContext*), OrtStatus* (*Error)(OrtErrorCode, const std::string&)>
OrtStatusPtr guarded_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    return Compute(static_cast<K*>(kernel), ctx);
  } catch (const std::exception& e) {
    return Error(ORT_RUNTIME_EXCEPTION, e.what());
  }
}
template <class K>
void destroy_state(void* kernel) { delete static_cast<K*>(kernel); }
OrtStatusPtr compute_v2(void* kernel, OrtKernelContext* ctx) {
  return guarded_compute<Kernel, compute, make_error>(kernel, ctx);
}
void* create_kernel_v1(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*) { return nullptr; }  // unused (v2)
void compute_v1(void*, OrtKernelContext*) {}                                                          // unused (v2)
void destroy(void* kernel) { destroy_state<Kernel>(kernel); }
const char* name(const OrtCustomOp*) { return "AqlmMatMul"; }
const char* provider(const OrtCustomOp*) { return nullptr; }  // CPU
ONNXTensorElementDataType input_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
size_t input_count(const OrtCustomOp*) { return 6; }
ONNXTensorElementDataType output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic input_char(const OrtCustomOp*, size_t i) {
  return i >= 4 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic output_char(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType mem_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int zero(const OrtCustomOp*) { return 0; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = 16;
  op.CreateKernel = create_kernel_v1;
  op.GetName = name;
  op.GetExecutionProviderType = provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelCompute = compute_v1;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = input_char;
  op.GetOutputCharacteristic = output_char;
  op.GetInputMemoryType = mem_type;
  op.GetVariadicInputMinArity = zero;
  op.GetVariadicInputHomogeneity = zero;
  op.GetVariadicOutputMinArity = zero;
  op.GetVariadicOutputHomogeneity = zero;
  op.CreateKernelV2 = create_kernel_v2;
  op.KernelComputeV2 = compute_v2;
  return op;
}

OrtCustomOp g_op = make_op();

OrtStatusPtr dense_create_kernel_v2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** out) {
  *out = new DenseKernel();
  return nullptr;
}
const char* dense_name(const OrtCustomOp*) { return "DenseMatMul"; }
size_t dense_input_count(const OrtCustomOp*) { return 3; }
OrtCustomOpInputOutputCharacteristic dense_input_char(const OrtCustomOp*, size_t i) {
  return i >= 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

// Another op of the library: AqlmMatMul's callback table with its own name, inputs, kernel state and compute.
using NameFn = const char* (*)(const OrtCustomOp*);
using CountFn = size_t (*)(const OrtCustomOp*);
using CharFn = OrtCustomOpInputOutputCharacteristic (*)(const OrtCustomOp*, size_t);
using CreateFn = OrtStatusPtr (*)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
using ComputeFn = OrtStatusPtr (*)(void*, OrtKernelContext*);
OrtCustomOp derived_op(NameFn name_fn, CountFn inputs, CharFn input_char_fn, CountFn outputs, void (*destroy_fn)(void*),
                       CreateFn create, ComputeFn compute_fn) {
  OrtCustomOp op = make_op();
  op.GetName = name_fn;
  op.GetInputTypeCount = inputs;
  op.GetInputCharacteristic = input_char_fn;
  op.GetOutputTypeCount = outputs;
  op.KernelDestroy = destroy_fn;
  op.CreateKernelV2 = create;
  op.KernelComputeV2 = compute_fn;
  return op;
}

OrtCustomOp g_dense_op = derived_op(dense_name, dense_input_count, dense_input_char, output_count,
                                    destroy_state<DenseKernel>, dense_create_kernel_v2,
                                    guarded_compute<DenseKernel, dense_compute, dense_error>);

// --- aqlm.GroupQueryAttention: ONNX Runtime's GroupQueryAttention (do_rotary, half-split) on our TVM kernels ---
// passes/aqlm_attention_for_ort.py writes it; the semantics are those of ORT's contrib op for batch 1 without
// padding (docs/aqlm-onnx-op.md): positions P … P+S-1 (P = total_sequence_length − S) rotate q and k with rows of
// the cos/sin tables, k and v go into the present cache at rows P … P+S-1, and query i attends keys 0 … P+i.
// present_key/value are [1, G, max(capacity of past, P+S), D]: when the caller binds each past input and its
// present output to one buffer of a larger capacity (runtime/ort.py), the rows are appended in place; otherwise the
// P past rows are copied first. The arithmetic is kernels/attention.py's (`rope_kv_append`, then
// `decode_attention` for one query or `causal_attention` for a prompt), compiled into the kernel library under
// kernel_abi.attention_symbols names. docs/tvm-and-ort-notes.md N33.
struct AttentionKernel {
  int64_t H = 0, G = 0;
  float scale = 0.f;  // as the attribute says; 0: 1/sqrt(D)
  Aligned q_copy, k_copy, v_copy, cos_copy, sin_copy, q_rot, y_copy, kc_copy, vc_copy;
  std::map<std::string, tvm::ffi::Function> functions;
  std::mutex mu;
};

OrtStatus* attention_error(OrtErrorCode code, const std::string& msg) {
  return op_error("GroupQueryAttention", code, msg);
}

// The fp32 bits of the softmax scale, as the kernels' names carry them (kernel_abi.attention_symbols).
std::string scale_bits(float scale) {
  uint32_t bits;
  std::memcpy(&bits, &scale, 4);
  char buf[9];
  std::snprintf(buf, sizeof(buf), "%08x", bits);
  return buf;
}

OrtStatus* attention_function(AttentionKernel* k, const std::string& symbol, tvm::ffi::Function* out) {
  auto it = k->functions.find(symbol);
  if (it == k->functions.end()) {
    std::string error;
    const tvm::ffi::Module* mod = kernel_module(&error);
    if (!mod) return attention_error(ORT_FAIL, error);
    auto f = (*mod)->GetFunction(symbol);
    if (!f.has_value())
      return attention_error(ORT_FAIL, "the kernel library has no kernel " + symbol + ": was it built with "
                             "--ort-attention aqlm from this checkpoint?");
    it = k->functions.emplace(symbol, f.value()).first;
  }
  *out = it->second;
  return nullptr;
}

OrtStatus* attention_output(OrtKernelContext* ctx, size_t index, std::vector<int64_t> shape, TensorView* out) {
  using GetOut = OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
  OrtValue* value = nullptr;
  ORT_TRY(ort_fn<GetOut>(g_api, ort_slot::KernelContext_GetOutput)(ctx, index, shape.data(), shape.size(), &value));
  return describe(value, out);
}

int64_t scalar_int32(const TensorView& t) { return static_cast<const int32_t*>(t.data)[0]; }

OrtStatus* attention_compute(AttentionKernel* k, OrtKernelContext* ctx) {
  TensorView t[9];
  bool present[9];
  ORT_TRY(read_inputs(ctx, "GroupQueryAttention", 1, 9, t, present));
  TensorView &q = t[0], &kin = t[1], &vin = t[2], &pk = t[3], &pv = t[4], &sl = t[5], &tot = t[6], &cs = t[7],
             &sn = t[8];
  const char* names[9] = {"query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                          "cos_cache", "sin_cache"};
  for (int i = 3; i < 9; ++i)
    if (!present[i]) return attention_error(ORT_INVALID_ARGUMENT, std::string(names[i]) + ": missing");
  // key and value omitted: q, k and v packed in the query, [1, S, (H + 2·H_kv)·D] (ORT's packed-QKV form;
  // passes/pack_qkv_for_gqa.py writes it for the fused q/k/v layer)
  if (present[1] != present[2])
    return attention_error(ORT_INVALID_ARGUMENT, "key/value: give both, or neither with q, k and v packed in the query");
  const bool packed = !present[1];
  for (int i : {0, 1, 2, 3, 4, 7, 8})
    if (present[i] && t[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return attention_error(ORT_INVALID_ARGUMENT, std::string(names[i]) + ": expected float32, found " + type_name(t[i].type));
  for (int i : {5, 6})
    if (t[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || t[i].numel() != 1)
      return attention_error(ORT_INVALID_ARGUMENT, std::string(names[i]) + ": expected one int32 (batch 1), found " +
                             shape_str(t[i].shape));
  const int64_t H = k->H, G = k->G, heads_in_q = packed ? H + 2 * G : H;
  if (q.shape.size() != 3 || q.shape[0] != 1 || q.shape[2] % heads_in_q != 0)
    return attention_error(ORT_INVALID_ARGUMENT, "query: expected [1, S, " +
                           (packed ? "(" + std::to_string(H) + " + 2·" + std::to_string(G) + ")" : std::to_string(H)) +
                           "·D], found " + shape_str(q.shape));
  const int64_t S = q.shape[1], D = q.shape[2] / heads_in_q;
  if (D < 2 || D % 2)
    return attention_error(ORT_INVALID_ARGUMENT, "query: head size " + std::to_string(D) + ", expected an even one");
  const std::vector<int64_t> kv_want{1, S, G * D};
  if (!packed && (kin.shape != kv_want || vin.shape != kv_want))
    return attention_error(ORT_INVALID_ARGUMENT, "key/value: expected " + shape_str(kv_want) + " each, found " +
                           shape_str(kin.shape) + " and " + shape_str(vin.shape));
  if (pk.shape.size() != 4 || pk.shape[0] != 1 || pk.shape[1] != G || pk.shape[3] != D || pv.shape != pk.shape)
    return attention_error(ORT_INVALID_ARGUMENT, "past_key/past_value: expected [1, " + std::to_string(G) + ", P, " +
                           std::to_string(D) + "] each, found " + shape_str(pk.shape) + " and " + shape_str(pv.shape));
  if (cs.shape.size() != 2 || cs.shape[1] != D / 2 || sn.shape != cs.shape)
    return attention_error(ORT_INVALID_ARGUMENT, "cos_cache/sin_cache: expected [max_positions, " + std::to_string(D / 2) +
                           "] each, found " + shape_str(cs.shape) + " and " + shape_str(sn.shape));
  const int64_t total = scalar_int32(tot), cap = pk.shape[2], M = cs.shape[0], P = total - S;
  if (scalar_int32(sl) != total - 1)
    return attention_error(ORT_INVALID_ARGUMENT, "seqlens_k: expected total_sequence_length - 1 = " +
                           std::to_string(total - 1) + " (batch 1, no padding), found " + std::to_string(scalar_int32(sl)));
  if (P < 0 || P > cap)
    return attention_error(ORT_INVALID_ARGUMENT, "total_sequence_length " + std::to_string(total) + ": expected the " +
                           std::to_string(S) + " new tokens after at most the " + std::to_string(cap) + " rows of past_key");
  if (total > M)
    return attention_error(ORT_INVALID_ARGUMENT, std::to_string(total) + " positions, the rotary tables have " + std::to_string(M));

  const int64_t C = cap > total ? cap : total;  // the present cache's rows
  TensorView y, ck, cv;
  ORT_TRY(attention_output(ctx, 0, {1, S, H * D}, &y));
  ORT_TRY(attention_output(ctx, 1, {1, G, C, D}, &ck));
  ORT_TRY(attention_output(ctx, 2, {1, G, C, D}, &cv));

  std::lock_guard<std::mutex> lock(k->mu);
  // not one buffer with the past: the cached rows first
  for (auto [src, dst] : {std::make_pair(&pk, &ck), std::make_pair(&pv, &cv)}) {
    if (dst->data == src->data || P == 0) continue;
    for (int64_t g = 0; g < G; ++g)
      std::memcpy(static_cast<float*>(dst->data) + g * C * D, static_cast<const float*>(src->data) + g * cap * D, P * D * 4);
  }
  if (S == 0) return nullptr;

  const float scale = k->scale != 0.f ? k->scale : 1.f / std::sqrt(static_cast<float>(D));
  const std::string shape = std::to_string(H) + "x" + std::to_string(G) + "x" + std::to_string(D);
  const std::string rope_symbol = "aqlm_rope_kv_append_" + shape;
  const std::string attn_symbol = std::string(S == 1 ? "aqlm_attention_decode_" : "aqlm_attention_prompt_") + shape +
                                  "_s" + scale_bits(scale);
  tvm::ffi::Function rope, attn;
  ORT_TRY(attention_function(k, rope_symbol, &rope));
  ORT_TRY(attention_function(k, attn_symbol, &attn));

  // The kernels assume 64-byte-aligned arrays (N6): ORT's own are; a caller's unaligned cache goes through a copy.
  const size_t cache_bytes = G * C * D * 4;
  float* kc = static_cast<float*>(ck.data);
  float* vc = static_cast<float*>(cv.data);
  const bool kc_moved = reinterpret_cast<uintptr_t>(kc) % 64 != 0, vc_moved = reinterpret_cast<uintptr_t>(vc) % 64 != 0;
  if (kc_moved) kc = static_cast<float*>(std::memcpy(k->kc_copy.get(cache_bytes), ck.data, cache_bytes));
  if (vc_moved) vc = static_cast<float*>(std::memcpy(k->vc_copy.get(cache_bytes), cv.data, cache_bytes));
  float* qr = static_cast<float*>(k->q_rot.get(S * H * D * 4));
  void* y_ptr = reinterpret_cast<uintptr_t>(y.data) % 64 == 0 ? y.data : k->y_copy.get(S * H * D * 4);

  const DLDataType f32{kDLFloat, 32, 1};
  // the tables' rows of positions P … P+S-1 only (the whole table of SmolLM2 is 1 MB)
  std::vector<int64_t> q_shape{1, S, H * D}, kv_shape{1, S, G * D}, table_shape{S, D / 2}, cache_shape{1, G, C, D};
  float* cos_rows = static_cast<float*>(cs.data) + P * (D / 2);
  float* sin_rows = static_cast<float*>(sn.data) + P * (D / 2);
  void *q_in = q.data, *k_in = packed ? nullptr : kin.data, *v_in = packed ? nullptr : vin.data;
  if (packed) {
    float* row = static_cast<float*>(q.data);
    if (S == 1) {  // one token: q, k and v are consecutive runs of the row, read in place where aligned
      q_in = row;
      k_in = row + H * D;
      v_in = row + (H + G) * D;
    } else {  // a prompt: token-interleaved, so into compact scratch (the kernels read compact arrays)
      float* qs = static_cast<float*>(k->q_copy.get(S * H * D * 4));
      float* ks = static_cast<float*>(k->k_copy.get(S * G * D * 4));
      float* vs = static_cast<float*>(k->v_copy.get(S * G * D * 4));
      for (int64_t s = 0; s < S; ++s, row += (H + 2 * G) * D) {
        std::memcpy(qs + s * H * D, row, H * D * 4);
        std::memcpy(ks + s * G * D, row + H * D, G * D * 4);
        std::memcpy(vs + s * G * D, row + (H + G) * D, G * D * 4);
      }
      q_in = qs;
      k_in = ks;
      v_in = vs;
    }
  }
  DLTensor a_q = dl(aligned_or_copy(q_in, S * H * D * 4, k->q_copy), f32, q_shape);
  DLTensor a_k = dl(aligned_or_copy(k_in, S * G * D * 4, k->k_copy), f32, kv_shape);
  DLTensor a_v = dl(aligned_or_copy(v_in, S * G * D * 4, k->v_copy), f32, kv_shape);
  DLTensor a_cos = dl(aligned_or_copy(cos_rows, S * D / 2 * 4, k->cos_copy), f32, table_shape);
  DLTensor a_sin = dl(aligned_or_copy(sin_rows, S * D / 2 * 4, k->sin_copy), f32, table_shape);
  DLTensor a_qr = dl(qr, f32, q_shape);
  DLTensor a_kc = dl(kc, f32, cache_shape), a_vc = dl(vc, f32, cache_shape);
  std::vector<tvm::ffi::AnyView> rope_args{&a_q, &a_k, &a_v, &a_cos, &a_sin, &a_qr, &a_kc, &a_vc, P};
  ORT_TRY(call_packed("GroupQueryAttention", rope, rope_symbol, rope_args));

  // q and out as [1, H, S, D] over token-major memory ([1, S, H·D]): strides (S·H·D, D, H·D, 1); one query is
  // the same memory either way (the decode kernel's compact [1, H, 1, D])
  std::vector<int64_t> qo_shape{1, H, S, D}, qo_strides{S * H * D, D, H * D, 1};
  DLTensor a_qh = dl(qr, f32, qo_shape), a_y = dl(y_ptr, f32, qo_shape);
  if (S > 1) a_qh.strides = a_y.strides = qo_strides.data();
  std::vector<tvm::ffi::AnyView> attn_args{&a_qh, &a_kc, &a_vc, &a_y, total};
  ORT_TRY(call_packed("GroupQueryAttention", attn, attn_symbol, attn_args));

  if (y_ptr != y.data) std::memcpy(y.data, y_ptr, S * H * D * 4);
  if (kc_moved) std::memcpy(ck.data, kc, cache_bytes);
  if (vc_moved) std::memcpy(cv.data, vc, cache_bytes);
  return nullptr;
}

OrtStatusPtr attention_create_kernel_v2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  using GetInt = OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*);
  using GetFloat = OrtStatus* (*)(const OrtKernelInfo*, const char*, float*);
  using Release = void (*)(OrtStatus*);
  auto k = std::make_unique<AttentionKernel>();
  ORT_TRY(ort_fn<GetInt>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "num_heads", &k->H));
  ORT_TRY(ort_fn<GetInt>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, "kv_num_heads", &k->G));
  // optional attributes: an absent one is an error status, which means the default
  auto optional_int = [&](const char* name, int64_t fallback) {
    int64_t v = fallback;
    if (OrtStatus* st = ort_fn<GetInt>(g_api, ort_slot::KernelInfoGetAttribute_int64)(info, name, &v)) {
      ort_fn<Release>(g_api, ort_slot::ReleaseStatus)(st);
      v = fallback;
    }
    return v;
  };
  if (OrtStatus* st = ort_fn<GetFloat>(g_api, ort_slot::KernelInfoGetAttribute_float)(info, "scale", &k->scale)) {
    ort_fn<Release>(g_api, ort_slot::ReleaseStatus)(st);
    k->scale = 0.f;
  }
  const int64_t do_rotary = optional_int("do_rotary", 0), interleaved = optional_int("rotary_interleaved", 0);
  if (k->H < 1 || k->G < 1 || k->H % k->G)
    return attention_error(ORT_INVALID_ARGUMENT, "attributes: expected num_heads a multiple of kv_num_heads >= 1, found " +
                           std::to_string(k->H) + " and " + std::to_string(k->G));
  if (do_rotary != 1 || interleaved != 0)
    return attention_error(ORT_INVALID_ARGUMENT, "attributes: this op computes do_rotary=1 with rotary_interleaved=0 "
                           "only, found " + std::to_string(do_rotary) + " and " + std::to_string(interleaved));
  *out = k.release();
  return nullptr;
}
const char* attention_name(const OrtCustomOp*) { return "GroupQueryAttention"; }
size_t attention_input_count(const OrtCustomOp*) { return 9; }
size_t attention_output_count(const OrtCustomOp*) { return 3; }
OrtCustomOpInputOutputCharacteristic attention_input_char(const OrtCustomOp*, size_t i) {
  return i == 1 || i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // packed q/k/v: key, value omitted
}

OrtCustomOp g_attention_op = derived_op(attention_name, attention_input_count, attention_input_char,
                                        attention_output_count, destroy_state<AttentionKernel>,
                                        attention_create_kernel_v2,
                                        guarded_compute<AttentionKernel, attention_compute, attention_error>);

// --- aqlm.SiluMulHalves: the gated MLP over a fused gate/up output, y = silu(x[..., :F]) · x[..., F:] ---
// passes/silu_mul_halves_for_ort.py writes it; the arithmetic is kernels/elementwise.py `silu_mul_halves`, compiled
// into the kernel library per half width F (kernel_abi.silu_mul_halves_symbols): one row on the calling thread, any
// row count on the TVM pool. docs/aqlm-onnx-op.md.
struct SiluMulKernel {
  int64_t half = 0;  // the F whose kernels `one` and `any` are
  tvm::ffi::Function one, any;
  Aligned x_copy, y_copy;
  std::mutex mu;
};

OrtStatus* silu_mul_error(OrtErrorCode code, const std::string& msg) { return op_error("SiluMulHalves", code, msg); }

OrtStatus* silu_mul_compute(SiluMulKernel* k, OrtKernelContext* ctx) {
  TensorView x;
  bool present = false;
  ORT_TRY(read_inputs(ctx, "SiluMulHalves", 1, 1, &x, &present));
  if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || x.shape.empty() || x.shape.back() < 2 || x.shape.back() % 2)
    return silu_mul_error(ORT_INVALID_ARGUMENT, std::string("x: expected float32 [..., 2·F], found ") + type_name(x.type) +
                          " " + shape_str(x.shape));
  const int64_t F = x.shape.back() / 2, rows = x.numel() / (2 * F);
  TensorView y;
  ORT_TRY(output_like(ctx, x, F, &y));
  if (rows == 0) return nullptr;
  std::lock_guard<std::mutex> lock(k->mu);
  if (k->half != F) {
    std::string error;
    const tvm::ffi::Module* mod = kernel_module(&error);
    if (!mod) return silu_mul_error(ORT_FAIL, error);
    const std::string one = "aqlm_silu_mul_halves_" + std::to_string(F) + "_r1", any = "aqlm_silu_mul_halves_" + std::to_string(F);
    auto f_one = (*mod)->GetFunction(one), f_any = (*mod)->GetFunction(any);
    if (!f_one.has_value() || !f_any.has_value())
      return silu_mul_error(ORT_FAIL, "the kernel library has no kernel " + (f_one.has_value() ? any : one) +
                            ": was it built from this checkpoint?");
    k->one = f_one.value();
    k->any = f_any.value();
    k->half = F;
  }
  const DLDataType f32{kDLFloat, 32, 1};
  std::vector<int64_t> x_shape{rows, 2 * F}, y_shape{rows, F};
  void* y_ptr = reinterpret_cast<uintptr_t>(y.data) % 64 == 0 ? y.data : k->y_copy.get(rows * F * 4);
  DLTensor a_x = dl(aligned_or_copy(x.data, rows * 2 * F * 4, k->x_copy), f32, x_shape), a_y = dl(y_ptr, f32, y_shape);
  // the fused tensor twice: gate and up halves of one array (kernels/elementwise.py, docs N22)
  std::vector<tvm::ffi::AnyView> args{&a_x, &a_x, &a_y};
  ORT_TRY(call_packed("SiluMulHalves", rows == 1 ? k->one : k->any, rows == 1 ? "silu_mul_halves (one row)" : "silu_mul_halves", args));
  if (y_ptr != y.data) std::memcpy(y.data, y_ptr, rows * F * 4);
  return nullptr;
}

OrtStatusPtr silu_mul_create_kernel_v2(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** out) {
  *out = new SiluMulKernel();
  return nullptr;
}
const char* silu_mul_name(const OrtCustomOp*) { return "SiluMulHalves"; }
size_t one_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }

OrtCustomOp g_silu_mul_op = derived_op(silu_mul_name, one_count, required, one_count, destroy_state<SiluMulKernel>,
                                       silu_mul_create_kernel_v2,
                                       guarded_compute<SiluMulKernel, silu_mul_compute, silu_mul_error>);

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* api_base) {
  g_api = api_base->GetApi(16);
  if (g_api == nullptr) {  // an ORT older than 1.16: report it through the version-1 table
    g_api = api_base->GetApi(1);
    return make_error(ORT_FAIL, std::string("needs ONNX Runtime >= 1.16 (C API 16), this is ") +
                      api_base->GetVersionString());
  }
  using CreateDomain = OrtStatus* (*)(const char*, OrtCustomOpDomain**);
  using DomainAdd = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
  using AddDomain = OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*);
  OrtCustomOpDomain* domain = nullptr;
  ORT_TRY(ort_fn<CreateDomain>(g_api, ort_slot::CreateCustomOpDomain)("aqlm", &domain));
  ORT_TRY(ort_fn<DomainAdd>(g_api, ort_slot::CustomOpDomain_Add)(domain, &g_op));
  ORT_TRY(ort_fn<DomainAdd>(g_api, ort_slot::CustomOpDomain_Add)(domain, &g_dense_op));
  ORT_TRY(ort_fn<DomainAdd>(g_api, ort_slot::CustomOpDomain_Add)(domain, &g_attention_op));
  ORT_TRY(ort_fn<DomainAdd>(g_api, ort_slot::CustomOpDomain_Add)(domain, &g_silu_mul_op));
  // The domain must outlive every session using it: it is intentionally never released.
  return ort_fn<AddDomain>(g_api, ort_slot::AddCustomOpDomain)(options, domain);
}
