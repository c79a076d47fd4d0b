//! `trt-diff serve --engine NAME.plan`: the HTTP server (see `server`).
use crate::cli::ServeArgs;
use anyhow::Result;

pub fn run(a: ServeArgs) -> Result<()> {
    // Bad limits are reported before any file is read.
    a.opts.check()?;
    let engine = super::open_engine_file(&a.engine)?;
    crate::server::serve(&engine, a.engine.backend, &a.host, a.port, &a.opts)
}
