// The few pieces of ONNX Runtime's C ABI this library uses, declared by this project: no registry ships ORT's
// headers. The OrtApi table is append-only, so each function is reached by its fixed slot number (checked against
// ORT's own static_asserts, e.g. ReleaseCustomOpDomain == 101). OrtCustomOp is declared up to the members of struct
// version 16 (KernelComputeV2, which returns a status instead of throwing across the C ABI); we claim version 16
// and fill every member up to there (docs/tvm-and-ort-notes.md N10: the version must describe the struct actually
// filled).
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
typedef OrtStatus* OrtStatusPtr;

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6 };
enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
};
enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };
enum OrtMemType { OrtMemTypeDefault = 0 };

struct OrtApi;  // an array of function pointers; see ort_fn below
struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
};

struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);            // version >= 13
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);                            // version >= 14
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatusPtr (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                 void** kernel);                                     // version >= 16
  OrtStatusPtr (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
};
}  // extern "C"

// OrtApi slots used (0-based positions in the function table), by the op library and by the test driver
// targets/runner/aqlm_ort_run.cc. The ones only the driver uses were counted from ORT's onnxruntime_c_api.h and agree
// with the statically checked ones around them.
namespace ort_slot {
constexpr int CreateStatus = 0;
constexpr int GetErrorMessage = 2;
constexpr int CreateEnv = 3;
constexpr int CreateSession = 7;
constexpr int Run = 9;
constexpr int CreateSessionOptions = 10;
constexpr int SetIntraOpNumThreads = 24;
constexpr int CreateCustomOpDomain = 26;
constexpr int CustomOpDomain_Add = 27;
constexpr int AddCustomOpDomain = 28;
constexpr int RegisterCustomOpsLibrary = 29;
constexpr int CreateTensorWithDataAsOrtValue = 49;
constexpr int GetTensorMutableData = 51;
constexpr int GetTensorElementType = 60;
constexpr int GetDimensionsCount = 61;
constexpr int GetDimensions = 62;
constexpr int GetTensorTypeAndShape = 65;
constexpr int CreateCpuMemoryInfo = 69;
constexpr int KernelInfoGetAttribute_float = 85;
constexpr int KernelInfoGetAttribute_int64 = 86;
constexpr int KernelContext_GetInputCount = 88;
constexpr int KernelContext_GetInput = 90;
constexpr int KernelContext_GetOutput = 91;
constexpr int ReleaseStatus = 93;
constexpr int ReleaseTensorTypeAndShapeInfo = 99;
constexpr int KernelInfoGetConstantInput_tensor = 249;  // API 15 (ORT 1.15)
}  // namespace ort_slot

template <typename Fn>
inline Fn ort_fn(const OrtApi* api, int slot) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[slot]);
}
