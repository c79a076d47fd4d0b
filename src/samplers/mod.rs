//! Samplers and schedulers (RES4LYF, k-diffusion, ComfyUI, diffusers), as data driven by a few generic steppers.
