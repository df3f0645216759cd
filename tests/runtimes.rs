//! The python3 and nodejs runtimes' own test suites (runtimes/*), run as part of
//! `cargo test`: each starts the real runtime server on fixture handlers and calls it over
//! HTTP. They need `python3` and `node` on the PATH, as the local driver does.

use std::process::Command;

fn run_suite(program: &str, args: &[&str]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` (the local runtimes need it on the PATH): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
}

#[test]
fn python3_runtime_suite_passes() {
    run_suite(
        "python3",
        &[
            "-B",
            "-m",
            "unittest",
            "discover",
            "-s",
            "runtimes/python3",
            "-p",
            "test_*.py",
        ],
    );
}

#[test]
fn nodejs_runtime_suite_passes() {
    run_suite("node", &["--test", "runtimes/nodejs/test/"]);
}
