//! Execution backends. For now: locating the ONNX Runtime library that the CPU backend loads.
pub mod ort_lib;
