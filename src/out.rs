//! Printing to stdout that ends quietly when the reader goes away (`trt-diff inspect X | head -1`): a closed
//! pipe is not an error of ours, so the process exits with status 0 instead of panicking in `println!`.
use std::io::Write;

/// Writes formatted text to stdout; on a closed pipe (EPIPE) exits quietly, on another error reports it and
/// exits with status 1.
pub fn write_fmt(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        exit_on_write_error(&e);
    }
}

/// Flushes stdout, with the same handling of a closed pipe as [`write_fmt`].
pub fn flush() {
    if let Err(e) = std::io::stdout().lock().flush() {
        exit_on_write_error(&e);
    }
}

/// What a failed write to stdout means for the process: quiet exit on a closed pipe, an error otherwise.
pub fn exit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// Whether a panic message is std's "failed printing to stdout: Broken pipe" (or to stderr).
pub fn is_broken_pipe_panic(msg: &str) -> bool {
    (msg.contains("failed printing to stdout") || msg.contains("failed printing to stderr"))
        && msg.contains("Broken pipe")
}

/// Whether an error comes from writing to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Installs (once) a panic hook under which any `println!`/`print!` left in the program that hits a closed pipe
/// ends the process quietly (status 0) instead of printing a panic; other panics go to the previous hook.
pub fn quiet_on_broken_pipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if is_broken_pipe_panic(msg) {
                std::process::exit(0);
            }
            previous(info);
        }));
    });
}

/// `println!` for output that may go to a closed pipe (see the module docs).
#[macro_export]
macro_rules! outln {
    () => { $crate::out::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` for output that may go to a closed pipe (see the module docs).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::write_fmt(format_args!($($arg)*)) };
}
