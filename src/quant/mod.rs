//! Number formats and the Q/DQ patterns TensorRT reads.
pub mod minifloat;
pub mod nvfp4;
pub mod policy;
pub mod qdq;
