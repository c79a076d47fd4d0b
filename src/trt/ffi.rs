//! The cxx bridge to cpp/: plain data in, plain data out, and a Rust observer that receives TensorRT's log and
//! builder progress. The C++ side holds every TensorRT object; nothing TensorRT-typed crosses the boundary.

#[cxx::bridge(namespace = "trtdiff")]
pub(crate) mod bridge {
    /// min/opt/max dimensions of one dynamic network input.
    struct ProfileSpec {
        name: String,
        min: Vec<i64>,
        opt: Vec<i64>,
        max: Vec<i64>,
    }

    /// Weights handed to the parser from memory (mapped external data), so it does not read and copy them.
    struct WeightRef {
        name: String,
        ptr: usize,
        len: usize,
    }

    /// Host weights for a refit: `count` elements of `dtype` ("float32", "float16", "bfloat16", ...) at `ptr`.
    struct RefitWeight {
        name: String,
        dtype: String,
        ptr: usize,
        count: i64,
    }

    struct BuildSpec {
        /// "rtx" or "trt11".
        flavor: String,
        /// Addresses of `createInferBuilder_INTERNAL` and `createNvOnnxParser_INTERNAL` in the loaded libraries.
        create_builder: usize,
        create_parser: usize,
        onnx_path: String,
        /// The serialized model (the mapped .onnx file).
        model_ptr: usize,
        model_len: usize,
        weights: Vec<WeightRef>,
        plan_path: String,
        profiles: Vec<ProfileSpec>,
        /// Builder optimization level; negative keeps TensorRT's default.
        opt_level: i32,
        /// Workspace memory-pool limit in bytes; 0 keeps TensorRT's default.
        workspace_bytes: u64,
        refit: bool,
        weight_streaming: bool,
        /// TensorRT-RTX compute-capability targets ("sm86", "sm120", ...).
        targets: Vec<String>,
        use_timing_cache: bool,
        timing_cache_in: Vec<u8>,
    }

    struct TensorInfo {
        name: String,
        is_input: bool,
        dtype: String,
        dims: Vec<i64>,
    }

    struct ParseIssue {
        node: i32,
        node_name: String,
        op: String,
        desc: String,
        code: i32,
    }

    struct BuildReport {
        ok: bool,
        error: String,
        parse_issues: Vec<ParseIssue>,
        io: Vec<TensorInfo>,
        num_layers: i32,
        plan_bytes: u64,
        timing_cache: Vec<u8>,
        parse_seconds: f64,
        build_seconds: f64,
        /// Everything inside the C++ call: builder creation, parse, build, plan streaming.
        total_seconds: f64,
        header_version: i32,
    }

    extern "Rust" {
        /// TensorRT's log outside a build (runtime), mapped onto `tracing`.
        fn runtime_log(severity: i32, msg: &str);
        type BuildObserver;
        fn log(self: &BuildObserver, severity: i32, msg: &str);
        fn phase_start(self: &BuildObserver, parent: &str, phase: &str, steps: i32);
        fn step_complete(self: &BuildObserver, phase: &str, step: i32) -> bool;
        fn phase_finish(self: &BuildObserver, phase: &str);
        fn plan_chunk(self: &BuildObserver, data: &[u8]);
    }

    unsafe extern "C++" {
        include!("trt-diff/include/trtdiff/bridge.h");
        fn build_engine(spec: &BuildSpec, observer: &BuildObserver) -> BuildReport;
        fn compiled_flavors() -> Vec<String>;
        fn header_version(flavor: &str) -> i32;

        /// A deserialized engine and its execution contexts, addressed by index (both flavours implement it).
        type RuntimeEngine;
        /// Deserializes `plan` with the flavour's runtime; errors carry TensorRT's own message.
        unsafe fn runtime_open(
            flavor: &str,
            create_runtime: usize,
            create_refitter: usize,
            plan: *const u8,
            len: usize,
        ) -> Result<UniquePtr<RuntimeEngine>>;
        fn io_count(self: &RuntimeEngine) -> i32;
        fn io_name(self: &RuntimeEngine, index: i32) -> String;
        fn io_is_input(self: &RuntimeEngine, index: i32) -> bool;
        fn io_dtype(self: &RuntimeEngine, index: i32) -> String;
        /// Engine-level dimensions (-1 where dynamic).
        fn io_dims(self: &RuntimeEngine, index: i32) -> Vec<i64>;
        fn profile_count(self: &RuntimeEngine) -> i32;
        /// An input's dimensions in an optimization profile; `which`: 0 min, 1 opt, 2 max.
        fn profile_dims(self: &RuntimeEngine, name: &str, profile: i32, which: i32) -> Vec<i64>;
        /// Device memory one execution context needs (for user-managed context memory).
        fn device_memory_size(self: &RuntimeEngine) -> i64;
        fn streamable_weights_size(self: &RuntimeEngine) -> i64;
        fn set_weight_streaming_budget(self: Pin<&mut RuntimeEngine>, bytes: i64) -> bool;
        fn refittable(self: &RuntimeEngine) -> bool;
        /// A new execution context; returns its index. `user_memory`: the caller supplies its device memory;
        /// `graph`: TensorRT-RTX captures and replays CUDA graphs itself (ignored by TensorRT 11).
        fn create_context(
            self: Pin<&mut RuntimeEngine>,
            user_memory: bool,
            graph: bool,
        ) -> Result<i32>;
        fn set_profile(
            self: Pin<&mut RuntimeEngine>,
            ctx: i32,
            profile: i32,
            stream: u64,
        ) -> Result<bool>;
        fn set_input_shape(
            self: Pin<&mut RuntimeEngine>,
            ctx: i32,
            name: &str,
            dims: &[i64],
        ) -> Result<bool>;
        /// Dimensions in a context, after input shapes are set.
        fn context_dims(self: &RuntimeEngine, ctx: i32, name: &str) -> Result<Vec<i64>>;
        fn set_address(
            self: Pin<&mut RuntimeEngine>,
            ctx: i32,
            name: &str,
            device_ptr: u64,
        ) -> Result<bool>;
        fn set_device_memory(
            self: Pin<&mut RuntimeEngine>,
            ctx: i32,
            device_ptr: u64,
            size: i64,
        ) -> Result<()>;
        fn enqueue(self: Pin<&mut RuntimeEngine>, ctx: i32, stream: u64) -> Result<bool>;
        /// Names of the weights a refittable engine can take.
        fn refittable_weights(self: Pin<&mut RuntimeEngine>) -> Result<Vec<String>>;
        /// Sets the named weights (host memory) and refits the engine on `stream`.
        fn refit(self: Pin<&mut RuntimeEngine>, weights: &[RefitWeight], stream: u64)
        -> Result<()>;
    }
}

pub(crate) use super::observer::{BuildObserver, runtime_log};
