// Declarations the cxx bridge (src/trt/ffi.rs) binds to. Nothing here includes a TensorRT header:
// each flavour lives in its own translation unit (cpp/flavor_*.cc) with its own renamed namespace.
#pragma once
#include "rust/cxx.h"
#include <cstdint>
#include <memory>

namespace trtdiff {
struct RefitWeight;

// A deserialized engine and its execution contexts (addressed by index); each flavour derives its own
// (cpp/flavor_impl.inc). Methods that can fail for a reason TensorRT explains throw with that reason.
class RuntimeEngine {
 public:
  virtual ~RuntimeEngine() = default;
  virtual int32_t io_count() const = 0;
  virtual rust::String io_name(int32_t index) const = 0;
  virtual bool io_is_input(int32_t index) const = 0;
  virtual rust::String io_dtype(int32_t index) const = 0;
  virtual rust::Vec<int64_t> io_dims(int32_t index) const = 0;
  virtual int32_t profile_count() const = 0;
  // which: 0 min, 1 opt, 2 max.
  virtual rust::Vec<int64_t> profile_dims(rust::Str name, int32_t profile, int32_t which) const = 0;
  virtual int64_t device_memory_size() const = 0;
  virtual int64_t streamable_weights_size() const = 0;
  virtual bool set_weight_streaming_budget(int64_t bytes) = 0;
  virtual bool refittable() const = 0;
  virtual int32_t create_context(bool user_memory, bool graph) = 0;
  virtual bool set_profile(int32_t ctx, int32_t profile, uint64_t stream) = 0;
  virtual bool set_input_shape(int32_t ctx, rust::Str name, rust::Slice<const int64_t> dims) = 0;
  virtual rust::Vec<int64_t> context_dims(int32_t ctx, rust::Str name) const = 0;
  virtual bool set_address(int32_t ctx, rust::Str name, uint64_t device_ptr) = 0;
  virtual void set_device_memory(int32_t ctx, uint64_t device_ptr, int64_t size) = 0;
  virtual bool enqueue(int32_t ctx, uint64_t stream) = 0;
  virtual rust::Vec<rust::String> refittable_weights() = 0;
  virtual void refit(rust::Slice<const RefitWeight> weights, uint64_t stream) = 0;
};

std::unique_ptr<RuntimeEngine> runtime_open(rust::Str flavor, size_t create_runtime, size_t create_refitter,
                                            const uint8_t* plan, size_t len);
std::unique_ptr<RuntimeEngine> runtime_open_rtx(size_t create_runtime, size_t create_refitter, const uint8_t* plan,
                                                size_t len);
std::unique_ptr<RuntimeEngine> runtime_open_trt11(size_t create_runtime, size_t create_refitter, const uint8_t* plan,
                                                  size_t len);

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
