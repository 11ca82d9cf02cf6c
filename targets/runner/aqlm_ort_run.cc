// aqlm_ort_run: run an ONNX model through ONNX Runtime's C API with the AQLM op library registered, on one input
// tensor read from a file, and write the first output. Used to check the cross-compiled (arm64) ORT op library under
// qemu-user, where no Python with onnxruntime exists; linked against libonnxruntime from ORT's own wheel.
//
// usage: aqlm_ort_run MODEL.onnx OP_LIBRARY.so INPUT_NAME OUTPUT_NAME IN_FILE OUT_FILE
// IN_FILE: int32 ndim, int64 shape[ndim], float32 data. OUT_FILE: int32 ndim, int64 shape[ndim], float32 data.
// Exit status 1 with ORT's message on stderr when ORT (or the op) reports an error.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../ort_op/ort_min_abi.h"

extern "C" const OrtApiBase* OrtGetApiBase(void);

struct OrtEnv;
struct OrtSession;
struct OrtRunOptions;
struct OrtMemoryInfo;

static const OrtApi* api = nullptr;

static void check(OrtStatus* st, const char* what) {
  if (st == nullptr) return;
  using GetMsg = const char* (*)(const OrtStatus*);
  fprintf(stderr, "aqlm_ort_run: %s: %s\n", what, ort_fn<GetMsg>(api, ort_slot::GetErrorMessage)(st));
  exit(1);
}

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: aqlm_ort_run MODEL.onnx OP_LIBRARY.so INPUT_NAME OUTPUT_NAME IN_FILE OUT_FILE\n");
    return 2;
  }
  api = OrtGetApiBase()->GetApi(16);
  if (!api) { fprintf(stderr, "aqlm_ort_run: ORT does not offer API version 16\n"); return 2; }
  FILE* in = fopen(argv[5], "rb");
  int32_t ndim = 0;
  if (!in || fread(&ndim, 4, 1, in) != 1 || ndim < 1 || ndim > 8) { fprintf(stderr, "aqlm_ort_run: bad input file\n"); return 2; }
  std::vector<int64_t> shape(ndim);
  if (fread(shape.data(), 8, ndim, in) != static_cast<size_t>(ndim)) { fprintf(stderr, "aqlm_ort_run: bad shape\n"); return 2; }
  size_t n = 1;
  for (int64_t s : shape) n *= static_cast<size_t>(s);
  std::vector<float> x(n);
  if (fread(x.data(), 4, n, in) != n) { fprintf(stderr, "aqlm_ort_run: short input data\n"); return 2; }
  fclose(in);

  OrtEnv* env = nullptr;
  check(ort_fn<OrtStatus* (*)(int, const char*, OrtEnv**)>(api, ort_slot::CreateEnv)(3, "aqlm_ort_run", &env), "CreateEnv");
  OrtSessionOptions* so = nullptr;
  check(ort_fn<OrtStatus* (*)(OrtSessionOptions**)>(api, ort_slot::CreateSessionOptions)(&so), "CreateSessionOptions");
  check(ort_fn<OrtStatus* (*)(OrtSessionOptions*, int)>(api, ort_slot::SetIntraOpNumThreads)(so, 1), "SetIntraOpNumThreads");
  void* handle = nullptr;
  check(ort_fn<OrtStatus* (*)(OrtSessionOptions*, const char*, void**)>(api, ort_slot::RegisterCustomOpsLibrary)(so, argv[2], &handle),
        "RegisterCustomOpsLibrary");
  OrtSession* session = nullptr;
  check(ort_fn<OrtStatus* (*)(OrtEnv*, const char*, const OrtSessionOptions*, OrtSession**)>(api, ort_slot::CreateSession)(
            env, argv[1], so, &session), "CreateSession");
  OrtMemoryInfo* mem = nullptr;
  check(ort_fn<OrtStatus* (*)(int, int, OrtMemoryInfo**)>(api, ort_slot::CreateCpuMemoryInfo)(0 /* device allocator */, 0, &mem),
        "CreateCpuMemoryInfo");
  OrtValue* input = nullptr;
  check(ort_fn<OrtStatus* (*)(const OrtMemoryInfo*, void*, size_t, const int64_t*, size_t, int, OrtValue**)>(
            api, ort_slot::CreateTensorWithDataAsOrtValue)(mem, x.data(), n * 4, shape.data(), shape.size(),
                                                           ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input), "CreateTensor");
  const char* in_names[] = {argv[3]};
  const char* out_names[] = {argv[4]};
  OrtValue* output = nullptr;
  check(ort_fn<OrtStatus* (*)(OrtSession*, const OrtRunOptions*, const char* const*, const OrtValue* const*, size_t,
                              const char* const*, size_t, OrtValue**)>(api, ort_slot::Run)(
            session, nullptr, in_names, &input, 1, out_names, 1, &output), "Run");
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(ort_fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(api, ort_slot::GetTensorTypeAndShape)(output, &info),
        "GetTensorTypeAndShape");
  size_t out_ndim = 0;
  check(ort_fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(api, ort_slot::GetDimensionsCount)(info, &out_ndim),
        "GetDimensionsCount");
  std::vector<int64_t> out_shape(out_ndim);
  check(ort_fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(api, ort_slot::GetDimensions)(
            info, out_shape.data(), out_ndim), "GetDimensions");
  void* data = nullptr;
  check(ort_fn<OrtStatus* (*)(OrtValue*, void**)>(api, ort_slot::GetTensorMutableData)(output, &data), "GetTensorMutableData");
  size_t m = 1;
  for (int64_t s : out_shape) m *= static_cast<size_t>(s);
  FILE* out = fopen(argv[6], "wb");
  int32_t od = static_cast<int32_t>(out_ndim);
  if (!out || fwrite(&od, 4, 1, out) != 1 || fwrite(out_shape.data(), 8, out_ndim, out) != out_ndim ||
      fwrite(data, 4, m, out) != m) {
    fprintf(stderr, "aqlm_ort_run: cannot write %s\n", argv[6]);
    return 2;
  }
  fclose(out);
  return 0;  // the process exits: ORT objects are not released one by one
}
