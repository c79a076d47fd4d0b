//! `trt-diff samplers list|sigmas|check`: the sampler catalogue, schedules, and a sampler's error and order on an
//! exact problem.
use crate::cli::{CheckArgs, SamplersCmd};
use anyhow::Result;

pub fn run(cmd: SamplersCmd) -> Result<()> {
    use crate::samplers::{check::CheckSpec, registry::SamplerOptions, report};
    match cmd {
        SamplersCmd::List => print!("{}", report::list_table()),
        SamplersCmd::Sigmas {
            scheduler,
            steps,
            model,
            sigma_min,
            sigma_max,
            denoise,
        } => {
            let s = report::sigmas(&scheduler, steps, &model, (sigma_min, sigma_max), denoise)?;
            for v in s {
                println!("{v}");
            }
        }
        SamplersCmd::Check(CheckArgs {
            sampler,
            steps,
            scheduler,
            sigma_min,
            sigma_max,
            to_zero,
            flow,
            elements,
            seed,
            eta,
            noise_mode,
            noise_anchor,
            implicit_steps,
            implicit_substeps,
            bongmath,
            res4lyf_implicit,
            implicit_type,
            implicit_type_substeps,
            eta_substep,
            noise_mode_substep,
            s_noise_substep,
            noise_swap,
            f32,
            init,
            dump,
        }) => {
            let spec = CheckSpec {
                sampler,
                scheduler,
                sigma_min,
                sigma_max,
                to_zero,
                flow,
                elements,
                seed,
                f32,
                opts: SamplerOptions {
                    eta,
                    noise_mode: crate::samplers::noise_mode::NoiseMode::parse(
                        noise_mode.as_deref().unwrap_or("none"),
                    )?,
                    noise_anchor,
                    implicit_steps,
                    implicit_substeps,
                    bongmath,
                    res4lyf_implicit,
                    implicit_type: crate::samplers::refine::ImplicitType::parse(&implicit_type)?,
                    implicit_type_substeps: crate::samplers::refine::ImplicitType::parse(
                        &implicit_type_substeps,
                    )?,
                    eta_substep,
                    noise_mode_substep,
                    s_noise_substep,
                    noise_swap,
                    ..Default::default()
                },
            };
            print!(
                "{}",
                report::check(&spec, &steps, init.as_deref(), dump.as_deref())?
            );
        }
    }
    Ok(())
}
