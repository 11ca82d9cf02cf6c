// aqlm_run: load a TVM-compiled kernel library and call one function on tensors read from a file.
// Used to run cross-compiled (arm64) kernels under qemu-user, where no Python with TVM exists.
// Input file: int32 count; per tensor: int32 dtype_code, int32 bits, int32 ndim, int64 shape[ndim], raw data.
// The last tensor is the output: its data is not read from the file; it is written to OUT_FILE.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static bool read_exact(FILE* f, void* dst, size_t n) { return fread(dst, 1, n, f) == n; }

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: aqlm_run LIB.so FUNCTION IN_FILE OUT_FILE\n");
    return 2;
  }
  setenv("TVM_NUM_THREADS", "1", 0);
  FILE* in = fopen(argv[3], "rb");
  if (!in) { fprintf(stderr, "aqlm_run: cannot open %s\n", argv[3]); return 2; }
  int32_t count = 0;
  if (!read_exact(in, &count, 4) || count < 1 || count > 16) { fprintf(stderr, "aqlm_run: bad header\n"); return 2; }
  std::vector<DLTensor> tensors(count);
  std::vector<std::vector<int64_t>> shapes(count);
  std::vector<void*> buffers(count);
  for (int i = 0; i < count; ++i) {
    int32_t code, bits, ndim;
    if (!read_exact(in, &code, 4) || !read_exact(in, &bits, 4) || !read_exact(in, &ndim, 4) || ndim < 0 || ndim > 8) {
      fprintf(stderr, "aqlm_run: bad tensor header %d\n", i); return 2;
    }
    shapes[i].resize(ndim);
    if (ndim && !read_exact(in, shapes[i].data(), 8 * ndim)) { fprintf(stderr, "aqlm_run: bad shape %d\n", i); return 2; }
    size_t n = bits / 8;
    for (int64_t s : shapes[i]) n *= s;
    size_t padded = (n + 63) / 64 * 64 + 64;
    buffers[i] = aligned_alloc(64, padded);  // generated code assumes 64-byte alignment (docs/tvm-and-ort-notes.md N6)
    memset(buffers[i], 0, padded);
    if (i + 1 < count && !read_exact(in, buffers[i], n)) { fprintf(stderr, "aqlm_run: short data %d\n", i); return 2; }
    DLTensor& t = tensors[i];
    t.data = buffers[i];
    t.device = DLDevice{kDLCPU, 0};
    t.ndim = ndim;
    t.dtype = DLDataType{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
    t.shape = shapes[i].data();
    t.strides = nullptr;
    t.byte_offset = 0;
  }
  fclose(in);
  try {
    tvm::ffi::Module mod = tvm::ffi::Module::LoadFromFile(argv[1]);
    auto func = mod->GetFunction(argv[2]);
    if (!func.has_value()) { fprintf(stderr, "aqlm_run: %s has no function %s\n", argv[1], argv[2]); return 2; }
    std::vector<tvm::ffi::AnyView> args;
    for (auto& t : tensors) args.emplace_back(&t);
    tvm::ffi::Any result;
    func.value().CallPacked(args.data(), count, &result);
  } catch (const std::exception& e) {
    fprintf(stderr, "aqlm_run: %s\n", e.what());
    return 1;
  }
  DLTensor& out = tensors[count - 1];
  size_t n = out.dtype.bits / 8;
  for (int d = 0; d < out.ndim; ++d) n *= out.shape[d];
  FILE* o = fopen(argv[4], "wb");
  if (!o || fwrite(out.data, 1, n, o) != n) { fprintf(stderr, "aqlm_run: cannot write %s\n", argv[4]); return 2; }
  fclose(o);
  return 0;
}
