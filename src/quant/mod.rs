//! Number formats and the Q/DQ patterns TensorRT reads.
pub mod auto;
pub mod bnb;
pub mod checkpoint;
pub mod comfy;
pub mod elem;
pub mod fp8;
pub mod inspect;
pub mod int;
pub mod minifloat;
pub mod nvfp4;
#[cfg(target_arch = "x86_64")]
mod nvfp4_avx2;
pub mod policy;
mod precision;
pub mod smooth;

pub use precision::{LinearPrecision, Precision};
