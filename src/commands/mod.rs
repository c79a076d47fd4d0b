//! One module per subcommand, each turning parsed arguments into library calls and printing the result. Exit
//! codes: 0 success, 1 an error the user can act on (bad input, missing files, unsupported hardware: the message
//! says the fix), 2 an internal error (a bug: a panic caught here).
mod build;
mod convert;
mod doctor;
mod export;
mod generate;
mod inspect;
mod quantize;
mod run;
mod samplers;
mod serve;
mod tokenize;

pub use doctor::{Report as DoctorReport, report as doctor_report};
pub use run::{Difference, Latency, compare, load_inputs, timed_runs};

use crate::cli::{Cli, Command};
use anyhow::Result;
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info,tensorrt=warn",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("TRT_DIFF_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose > 0)
        .without_time()
        .try_init();
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    std::panic::set_hook(Box::new(|info| {
        // Not eprintln!: a closed stderr must not panic inside the hook (that aborts).
        let _ = writeln!(
            std::io::stderr(),
            "internal error (a bug in trt-diff; please report it with the command line): {info}"
        );
    }));
    // A closed stdout (`| head`) ends the command quietly instead of through that hook.
    crate::out::quiet_on_broken_pipe();
    // Interrupted commands remove their temporaries; the server shuts down gracefully instead.
    if !matches!(cli.command, Command::Serve(_)) {
        crate::fsutil::cleanup_on_signals();
    }
    match std::panic::catch_unwind(|| dispatch(cli.command)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // The reader of our output went away (`generate ... | head`): not an error of the command.
        Ok(Err(e)) if crate::out::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(2),
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Doctor { json, trt } => doctor::run(json, trt),
        Command::Build(a) => build::run(a),
        Command::Run(a) => run::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Export(a) => export::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Inspect {
            file,
            json,
            against,
        } => inspect::inspect(&file, json, against.as_deref()),
        Command::Quantize(a) => quantize::run(a),
        Command::Tokenize {
            vocab,
            text,
            decode,
            parse_special,
        } => tokenize::run(&vocab, &text, decode, parse_special),
        Command::Convert {
            format,
            input,
            tokenizer,
            out,
        } => convert::run(format, &input, &tokenizer, &out),
        Command::Samplers { cmd } => samplers::run(cmd),
    }
}

/// Opens `--engine` once, as every command that runs an engine does.
fn open_engine_file(a: &crate::cli::EngineArgs) -> Result<crate::manifest::EngineFile> {
    // A GGUF model file or a Hugging Face folder runs as it is: its bundle is built once into the user's cache.
    if crate::weights::gguf::looks_like_gguf(&a.engine)
        || crate::pipelines::model_cache::is_hf_folder(&a.engine)
    {
        let manifest = crate::pipelines::model_cache::bundle_for(&a.engine)?;
        return crate::manifest::EngineFile::open_with(&manifest, false);
    }
    crate::manifest::EngineFile::open_with(&a.engine, a.allow_external_paths)
}
