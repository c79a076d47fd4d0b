//! `trt-diff serve --engine NAME.plan`: the HTTP server (see `server`).
use crate::cli::ServeArgs;
use anyhow::Result;

pub fn run(a: ServeArgs) -> Result<()> {
    let engine = super::open_engine_file(&a.engine)?;
    crate::server::serve(&engine, a.engine.backend, &a.host, a.port)
}
