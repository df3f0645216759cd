fn main() -> std::process::ExitCode {
    dispatch::cli::main()
}
