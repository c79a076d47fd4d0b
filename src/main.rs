fn main() -> std::process::ExitCode {
    trt_diff::commands::main()
}
