//! A short run of the chaos runner (the `chaos` binary of this crate): the bank workload
//! under random kills, pauses, cuts and delays must end with no violation and nothing in
//! doubt. And the runner must notice a broken participant, so a clean result means
//! something. Longer runs: see README.md.

use std::process::Command;

fn run_chaos(args: &[&str]) -> (std::process::ExitStatus, serde_json::Value, String) {
    // The runner keeps its data directory after a violation: keep it in ours.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(args)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("running the chaos runner");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stdout.lines().last().unwrap_or_default();
    let summary: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("the last line is not the JSON summary ({e}):\n{stdout}\n{stderr}")
    });
    (out.status, summary, format!("{stdout}\n{stderr}"))
}

#[test]
fn a_short_chaos_run_keeps_every_invariant() {
    for seed in ["1", "2"] {
        let (status, summary, output) = run_chaos(&[
            "--duration",
            "25s",
            "--fault-interval",
            "1s",
            "--seed",
            seed,
        ]);
        assert!(status.success(), "seed {seed}:\n{output}");
        assert_eq!(summary["seed"], seed.parse::<u64>().unwrap());
        assert_eq!(summary["violations"], 0, "{output}");
        assert_eq!(summary["in_doubt_after_heal"], 0, "{output}");
        assert!(summary["faults"].as_u64().unwrap() >= 5, "{output}");
        assert!(summary["committed"].as_u64().unwrap() > 0, "{output}");
    }
}

#[test]
fn the_chaos_runner_catches_a_participant_that_loses_writes() {
    let (status, summary, output) = run_chaos(&[
        "--duration",
        "5s",
        "--seed",
        "3",
        "--p2-failpoints",
        "participant::commit::drop_writes=10%return",
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(summary["violations"].as_u64().unwrap() > 0, "{output}");
    assert!(output.contains("VIOLATION"), "{output}");
}
