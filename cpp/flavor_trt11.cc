// TensorRT 11 flavour (see flavor_rtx.cc for why the namespaces are renamed).
#ifdef TRTD_TRT11_NVINFER
#define TRTD_FLAVOR_NAME trt11
#define TRTD_NVINFER_H TRTD_TRT11_NVINFER
#define TRTD_NVONNXPARSER_H TRTD_TRT11_NVONNXPARSER
#define TRTD_IS_RTX 0
#define nvinfer1 trtd_trt11_nvinfer1
#define nvonnxparser trtd_trt11_nvonnxparser
#include "flavor_impl.inc"
#else
#include "trt-diff/include/trtdiff/bridge.h"
#include "trt-diff/src/trt/ffi.rs.h"
#include <stdexcept>
namespace trtdiff {
bool have_trt11() { return false; }
int32_t header_version_trt11() { return 0; }
std::unique_ptr<RuntimeEngine> runtime_open_trt11(size_t, size_t, const uint8_t*, size_t) {
  throw std::runtime_error("this trt-diff binary was compiled without TensorRT 11 headers; rebuild it after scripts/setup.sh");
}
BuildReport build_engine_trt11(const BuildSpec&, const BuildObserver&) {
  BuildReport r{};
  r.ok = false;
  r.error = rust::String(
      "this trt-diff binary was compiled without TensorRT 11 headers; run scripts/setup.sh (or set "
      "TENSORRT_INCLUDE_DIR to a TensorRT 11 SDK) and rebuild");
  return r;
}
}  // namespace trtdiff
#endif
