// Declarations the cxx bridge (src/trt/ffi.rs) binds to. Nothing here includes a TensorRT header:
// each flavour lives in its own translation unit (cpp/flavor_*.cc) with its own renamed namespace.
#pragma once
#include "rust/cxx.h"
#include <cstdint>

namespace trtdiff {
struct BuildSpec;
struct BuildReport;
struct BuildObserver;

// Builds a serialized engine from an ONNX file with the flavour named in spec.flavor.
BuildReport build_engine(const BuildSpec& spec, const BuildObserver& observer);
// Flavours this binary was compiled with, e.g. ["rtx", "trt11"], with the header versions used.
rust::Vec<rust::String> compiled_flavors();
int32_t header_version(rust::Str flavor);

// One per flavour, defined in cpp/flavor_impl.inc (compiled once per flavour).
BuildReport build_engine_rtx(const BuildSpec& spec, const BuildObserver& observer);
BuildReport build_engine_trt11(const BuildSpec& spec, const BuildObserver& observer);
bool have_rtx();
bool have_trt11();
int32_t header_version_rtx();
int32_t header_version_trt11();
}  // namespace trtdiff
