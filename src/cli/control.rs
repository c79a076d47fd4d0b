//! ControlNet-Union options of `generate`.
use clap::Args;

/// The control type of each `--control` image for ControlNet-Union bundles.
#[derive(Args, Debug, Clone, Default)]
pub struct ControlModeArgs {
    /// ControlNet-Union: the control type per --control (one value: all), an index or a name. FLUX.1-dev
    /// Union (InstantX, Shakker-Labs): canny=0, tile=1, depth=2, blur=3, pose=4, gray=5, lq=6.
    #[arg(long, value_name = "MODE")]
    pub control_mode: Vec<crate::pipelines::image::ControlMode>,
}
