// Dispatch from the cxx bridge to the flavour compiled for it.
#include "trt-diff/include/trtdiff/bridge.h"
#include "trt-diff/src/trt/ffi.rs.h"

#include <stdexcept>
#include <string>

namespace trtdiff {

BuildReport build_engine(const BuildSpec& spec, const BuildObserver& observer) {
  std::string flavor(spec.flavor);
  if (flavor == "rtx") return build_engine_rtx(spec, observer);
  if (flavor == "trt11") return build_engine_trt11(spec, observer);
  BuildReport r{};
  r.ok = false;
  r.error = rust::String("unknown TensorRT flavour");
  return r;
}

rust::Vec<rust::String> compiled_flavors() {
  rust::Vec<rust::String> v;
  if (have_rtx()) v.push_back(rust::String("rtx"));
  if (have_trt11()) v.push_back(rust::String("trt11"));
  return v;
}

std::unique_ptr<RuntimeEngine> runtime_open(rust::Str flavor, size_t create_runtime, size_t create_refitter,
                                            const uint8_t* plan, size_t len) {
  std::string f(flavor);
  if (f == "rtx") return runtime_open_rtx(create_runtime, create_refitter, plan, len);
  if (f == "trt11") return runtime_open_trt11(create_runtime, create_refitter, plan, len);
  throw std::runtime_error("unknown TensorRT flavour '" + f + "'");
}

int32_t header_version(rust::Str flavor) {
  std::string f(flavor);
  if (f == "rtx") return header_version_rtx();
  if (f == "trt11") return header_version_trt11();
  return 0;
}

}  // namespace trtdiff
