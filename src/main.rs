fn main() -> std::process::ExitCode {
    trt_diff::cli::main()
}
