fn main() -> std::process::ExitCode {
    helpline::cli::main()
}
