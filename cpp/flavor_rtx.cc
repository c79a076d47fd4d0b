// TensorRT-RTX 1.x flavour. nvinfer1/nvonnxparser are renamed so the inline functions of this header set can
// never be merged with those of the TensorRT 11 flavour (same names, different class layouts).
#ifdef TRTD_RTX_NVINFER
#define TRTD_FLAVOR_NAME rtx
#define TRTD_NVINFER_H TRTD_RTX_NVINFER
#define TRTD_NVONNXPARSER_H TRTD_RTX_NVONNXPARSER
#define TRTD_IS_RTX 1
#define nvinfer1 trtd_rtx_nvinfer1
#define nvonnxparser trtd_rtx_nvonnxparser
#include "flavor_impl.inc"
#else
#include "trt-diff/include/trtdiff/bridge.h"
#include "trt-diff/src/trt/ffi.rs.h"
#include <stdexcept>
namespace trtdiff {
bool have_rtx() { return false; }
int32_t header_version_rtx() { return 0; }
std::unique_ptr<RuntimeEngine> runtime_open_rtx(size_t, size_t, const uint8_t*, size_t) {
  throw std::runtime_error("this trt-diff binary was compiled without TensorRT-RTX headers; rebuild it after scripts/setup.sh");
}
BuildReport build_engine_rtx(const BuildSpec&, const BuildObserver&) {
  BuildReport r{};
  r.ok = false;
  r.error = rust::String(
      "this trt-diff binary was compiled without TensorRT-RTX headers; run scripts/setup.sh (or set "
      "TENSORRT_INCLUDE_DIR to a TensorRT-RTX SDK) and rebuild");
  return r;
}
}  // namespace trtdiff
#endif
