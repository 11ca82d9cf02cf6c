// aqlm_vm_run: the whole-model TVM artifact (Relax VM library + params) as a logits server on stdin/stdout.
// Used to run a cross-compiled (arm64) model under qemu-user, where no Python with TVM exists: the Python side
// (aqlm_compile.runtime.emulated) keeps the tokenizer and the sampling loop and asks this program for logits.
//
// usage: aqlm_vm_run MODEL.so PARAMS.bin NUM_LAYERS NUM_KV_HEADS HEAD_DIM [KV_CACHE]
// KV_CACHE: the manifest's tvm.kv_cache — "concat" (default: the functions return the present K/V) or "in_place"
// (they take the past length and preallocated caches [1, H, C, D], write their rows in place, return the logits;
// the caches here grow before a call that would not fit: targets/relax.py SIGNATURES).
// Requests (stdin, little-endian): int32 n, then n int64 token ids. n > 0: run them (`prefill` for the first
// request after a reset or for several tokens, `decode` for one more token), the KV cache stays here. n == 0:
// reset the cache. n == -1: exit.
// Replies (stdout): int32 vocab then vocab float32 logits of the last position; on error int32 -1, int32 length,
// the message.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <optional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct AlignedAlloc {  // generated code assumes 64-byte aligned arrays (docs/tvm-and-ort-notes.md N6)
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64 + 64;
    t->data = aligned_alloc(64, n);
    memset(t->data, 0, n);
  }
  void FreeData(DLTensor* t) { free(t->data); }
};

static ffi::Tensor empty(std::vector<int64_t> shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

static bool read_exact(void* dst, size_t n) { return fread(dst, 1, n, stdin) == n; }

static void reply_error(const std::string& msg) {
  int32_t head[2] = {-1, static_cast<int32_t>(msg.size())};
  fwrite(head, 4, 2, stdout);
  fwrite(msg.data(), 1, msg.size(), stdout);
  fflush(stdout);
}

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    fprintf(stderr, "usage: aqlm_vm_run MODEL.so PARAMS.bin NUM_LAYERS NUM_KV_HEADS HEAD_DIM [concat|in_place]\n");
    return 2;
  }
  const std::string kv_form = argc == 7 ? argv[6] : "concat";
  if (kv_form != "concat" && kv_form != "in_place") {
    fprintf(stderr, "aqlm_vm_run: KV_CACHE: expected concat or in_place, found %s\n", kv_form.c_str());
    return 2;
  }
  const bool in_place = kv_form == "in_place";
  setenv("TVM_NUM_THREADS", "1", 0);
  const int layers = atoi(argv[3]), heads = atoi(argv[4]), head_dim = atoi(argv[5]);
  if (layers < 1 || heads < 1 || head_dim < 1) { fprintf(stderr, "aqlm_vm_run: bad model dimensions\n"); return 2; }
  const DLDataType f32{kDLFloat, 32, 1}, i64{kDLInt, 64, 1};
  std::optional<ffi::Module> vm;
  std::vector<ffi::Tensor> params;
  try {
    ffi::Module exec = ffi::Module::LoadFromFile(argv[1]);
    vm = exec->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    // CPU device 0, pooled allocator (what tvm.runtime.vm.VirtualMachine does for tvm.cpu())
    (*vm)->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    auto load = ffi::Function::GetGlobal("runtime.LoadParamsFromFile");
    if (!load.has_value()) { fprintf(stderr, "aqlm_vm_run: runtime.LoadParamsFromFile is not registered\n"); return 2; }
    auto dict = load.value()(ffi::String(argv[2])).cast<ffi::Map<ffi::String, ffi::Tensor>>();
    std::vector<std::string> names;
    for (const auto& kv : dict) names.push_back(std::string(kv.first));
    std::sort(names.begin(), names.end());  // p00000, p00001, ...: the order the functions take them
    for (const auto& n : names) params.push_back(dict.at(ffi::String(n)));
  } catch (const std::exception& e) {
    fprintf(stderr, "aqlm_vm_run: loading %s / %s: %s\n", argv[1], argv[2], e.what());
    return 1;
  }
  ffi::Function prefill = (*vm)->GetFunction("prefill").value(), decode = (*vm)->GetFunction("decode").value();
  std::vector<ffi::Tensor> past;
  int64_t length = 0, capacity = 0;
  auto reset = [&]() {
    if (!in_place) past.assign(2 * layers, empty({1, heads, 0, head_dim}, f32));
    length = 0;
  };
  // in place: room for `needed` rows, the first `length` kept (capacity at least doubled, so growth is rare)
  auto reserve = [&](int64_t needed) {
    if (needed <= capacity) return;
    int64_t grown = std::max<int64_t>({needed, 2 * capacity, 256});
    std::vector<ffi::Tensor> next;
    for (int i = 0; i < 2 * layers; ++i) {
      next.push_back(empty({1, heads, grown, head_dim}, f32));
      for (int64_t h = 0; h < heads && length > 0; ++h) {  // rows [h, 0, length) of each head
        const size_t row = static_cast<size_t>(head_dim) * 4;
        memcpy(static_cast<char*>(next.back().data_ptr()) + h * grown * row,
               static_cast<char*>(past[i].data_ptr()) + h * capacity * row, length * row);
      }
    }
    past.swap(next);
    capacity = grown;
  };
  reset();
  while (true) {
    int32_t n = 0;
    if (!read_exact(&n, 4) || n == -1) break;
    if (n == 0) { reset(); continue; }
    if (n < 0 || n > (1 << 20)) { reply_error("bad request size " + std::to_string(n)); break; }
    ffi::Tensor ids = empty({1, n}, i64), mask = empty({1, length + n}, i64);
    if (!read_exact(ids.data_ptr(), 8 * static_cast<size_t>(n))) break;
    for (int64_t i = 0; i < length + n; ++i) static_cast<int64_t*>(mask.data_ptr())[i] = 1;
    try {
      if (in_place) reserve(length + n);
      ffi::Shape past_length({length});
      std::vector<ffi::AnyView> args{ids, mask};
      if (in_place) args.emplace_back(past_length);
      for (auto& t : past) args.emplace_back(t);
      for (auto& t : params) args.emplace_back(t);
      ffi::Any ret;
      (n == 1 && length > 0 ? decode : prefill).CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
      ffi::Tensor logits;
      if (in_place) {
        logits = ret.cast<ffi::Tensor>();
      } else {
        auto out = ret.cast<ffi::Array<ffi::Any>>();
        if (static_cast<int>(out.size()) != 1 + 2 * layers) {
          reply_error("the model returned " + std::to_string(out.size()) + " values, expected " +
                      std::to_string(1 + 2 * layers));
          continue;
        }
        logits = out[0].cast<ffi::Tensor>();
        for (int i = 0; i < 2 * layers; ++i) past[i] = out[1 + i].cast<ffi::Tensor>();
      }
      length += n;
      const DLTensor* lt = logits.GetDLTensorPtr();
      int32_t vocab = static_cast<int32_t>(lt->shape[lt->ndim - 1]);
      fwrite(&vocab, 4, 1, stdout);
      fwrite(static_cast<char*>(lt->data) + lt->byte_offset, 4, vocab, stdout);
      fflush(stdout);
    } catch (const std::exception& e) {
      reply_error(e.what());
    }
  }
  return 0;
}
