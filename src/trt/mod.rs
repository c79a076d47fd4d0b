//! TensorRT: the cxx bridge, library discovery (dlopen), the engine builder and optimization-profile shapes.
pub mod builder;
pub mod discovery;
mod ffi;
mod observer;
pub mod runtime;
pub mod shapes;

pub use builder::{BuildOptions, BuildOutcome, build_engine, compiled_flavors};
pub use discovery::{Flavor, Loaded, TrtChoice};
