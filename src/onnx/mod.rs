//! ONNX: protobuf messages, a graph builder for models, reading files made elsewhere, writing with external data,
//! and the summary `inspect` prints.
pub mod attention_fusion;
pub mod builder;
pub mod cpu_pass;
pub mod dequantize;
pub mod dtype;
pub mod elementwise_fusion;
pub mod model;
pub mod proto;
pub mod save;
pub mod summary;

pub use builder::{Attr, Dim, GraphBuilder, Value};
pub use dtype::DataType;
pub use model::OnnxFile;
pub use save::{SaveOptions, save, save_streamed};
