//! Samplers and schedulers (RES4LYF, k-diffusion, ComfyUI, diffusers), as data driven by a few generic steppers.
pub mod buffer;
pub mod check;
pub mod comfy;
pub mod exprk;
pub mod hybrid;
pub mod kdiff;
pub mod model;
pub mod noise;
pub mod noise_mode;
pub mod noise_types;
pub mod phi;
pub mod registry;
pub mod report;
pub mod rk;
pub mod schedule;
pub mod stepper;
pub mod tableau;
mod tableau_data;
