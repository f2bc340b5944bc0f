//! The `ratify` binary against a real stack (itself, spawned as coordinator and
//! participants): client and operator verbs with their JSON output and exit codes,
//! `ratify dev` start and stop, and `ratify demo` with checks that can fail.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ratify_cli::stack::{LocalStack, StackConfig};
use serde_json::Value;

const RATIFY: &str = env!("CARGO_BIN_EXE_ratify");

fn stack(dir: &std::path::Path) -> LocalStack {
    LocalStack::start(&StackConfig {
        exe: Some(PathBuf::from(RATIFY)),
        dir: dir.to_path_buf(),
        participants: 2,
        coordinator_port: 0,
        participant_ports: Vec::new(),
        prepare_timeout_ms: 2_000,
        termination_deadline_ms: 500,
        participant_env: Vec::new(),
        stores: Vec::new(),
        worker_threads: None,
    })
    .expect("the stack starts")
}

/// Runs `ratify --coordinator URL --output json ARGS`; returns (exit code, parsed stdout).
fn ratify(coordinator: &str, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(RATIFY)
        .args(["--coordinator", coordinator, "--output", "json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running ratify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn client_and_operator_verbs_with_json_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut stack = stack(dir.path());
    stack
        .wait_registered(Duration::from_secs(20))
        .await
        .unwrap();
    let c = stack.coordinator.endpoint();

    // A one-shot write and a read.
    let (code, out, err) = ratify(&c, &["kv", "put", "alice", "100", "--participant", "p1"]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["outcome"], "COMMITTED");
    let (code, out, _) = ratify(&c, &["kv", "get", "alice", "--participant", "p1"]);
    assert_eq!(code, 0);
    assert_eq!(out["value"], "100");
    assert_eq!(out["version"], 1);
    let (code, out, _) = ratify(&c, &["kv", "get", "nobody", "--participant", "p1"]);
    assert_eq!((code, &out["found"]), (3, &Value::Bool(false)));

    // An interactive transaction over two participants.
    let (code, out, _) = ratify(&c, &["txn", "begin"]);
    assert_eq!(code, 0);
    let txn = out["txn_id"].as_str().unwrap().to_string();
    let (code, out, err) = ratify(
        &c,
        &[
            "kv",
            "add",
            "alice",
            "-40",
            "--min",
            "0",
            "--participant",
            "p1",
            "--txn",
            &txn,
        ],
    );
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out["staged"], 1);
    let (code, _, _) = ratify(
        &c,
        &[
            "kv",
            "put",
            "bob",
            "40",
            "--participant",
            "p2",
            "--txn",
            &txn,
        ],
    );
    assert_eq!(code, 0);
    let (code, out, _) = ratify(&c, &["txn", "commit", &txn, "--wait-phase2"]);
    assert_eq!((code, out["outcome"].as_str()), (0, Some("COMMITTED")));
    let (_, out, _) = ratify(&c, &["txn", "status", &txn]);
    assert_eq!(out["outcome"], "COMMITTED");
    let (code, out, _) = ratify(&c, &["txn", "show", &txn]);
    assert_eq!((code, out["outcome"].as_str()), (0, Some("COMMITTED")));
    assert_eq!(
        ratify(&c, &["kv", "get", "alice", "--participant", "p1"]).1["value"],
        "60"
    );
    assert_eq!(
        ratify(&c, &["kv", "get", "bob", "--participant", "p2"]).1["value"],
        "40"
    );

    // An overdraft aborts: exit code 7.
    let (code, out, _) = ratify(
        &c,
        &[
            "kv",
            "add",
            "alice",
            "-1000",
            "--min",
            "0",
            "--participant",
            "p1",
        ],
    );
    assert_eq!((code, out["outcome"].as_str()), (7, Some("ABORTED")));
    // Unknown transaction: 3. Malformed id: usage (2).
    let unknown = "01900000-0000-7000-8000-000000000001";
    assert_eq!(ratify(&c, &["txn", "commit", unknown]).0, 3);
    assert_eq!(ratify(&c, &["txn", "commit", "not-an-id"]).0, 2);

    // A live transaction, shown with its timeline, then resolved by an operator.
    let (_, out, _) = ratify(&c, &["txn", "begin"]);
    let live = out["txn_id"].as_str().unwrap().to_string();
    ratify(
        &c,
        &[
            "kv",
            "put",
            "carol",
            "1",
            "--participant",
            "p1",
            "--txn",
            &live,
        ],
    );
    let (code, out, _) = ratify(&c, &["txn", "show", &live]);
    assert_eq!(code, 0);
    assert_eq!(out["state"], "active");
    assert!(!out["timeline"].as_array().unwrap().is_empty());
    let (code, plan, _) = ratify(
        &c,
        &[
            "txn",
            "resolve",
            &live,
            "--abort",
            "--reason",
            "client gone",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["participants"][0]["participant"], "p1");
    assert_eq!(
        ratify(&c, &["txn", "show", &live]).1["state"],
        "active",
        "a dry run changes nothing"
    );
    let (code, _, err) = ratify(
        &c,
        &[
            "txn",
            "resolve",
            &live,
            "--abort",
            "--reason",
            "client gone",
        ],
    );
    assert_eq!(code, 2, "without a terminal, --yes is required: {err}");
    let (code, out, err) = ratify(
        &c,
        &[
            "txn",
            "resolve",
            &live,
            "--abort",
            "--reason",
            "client gone",
            "--yes",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["outcome"], "ABORTED");
    // Contradicting a logged decision is refused (4); a finished one has nothing to resolve.
    let (code, _, _) = ratify(
        &c,
        &[
            "txn", "resolve", &live, "--commit", "--reason", "oops", "--yes",
        ],
    );
    assert_eq!(code, 4);

    // Participants and their health.
    let (code, out, _) = ratify(&c, &["participants"]);
    assert_eq!(code, 0);
    let list = out["participants"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|p| p["health"] == "serving"), "{out}");

    // In doubt: nothing now; then p2 down while a transaction needs it.
    let (code, out, _) = ratify(&c, &["in-doubt", "--fail-if-any"]);
    assert_eq!((code, out["total"].as_u64()), (0, Some(0)), "{out}");
    let (_, out, _) = ratify(&c, &["txn", "begin"]);
    let stuck = out["txn_id"].as_str().unwrap().to_string();
    ratify(
        &c,
        &[
            "kv",
            "put",
            "dave",
            "1",
            "--participant",
            "p1",
            "--txn",
            &stuck,
        ],
    );
    ratify(
        &c,
        &[
            "kv",
            "put",
            "erin",
            "1",
            "--participant",
            "p2",
            "--txn",
            &stuck,
        ],
    );
    stack.participants[1].kill9();
    let (code, out, _) = ratify(&c, &["txn", "commit", &stuck]);
    assert_eq!(
        (code, out["outcome"].as_str()),
        (7, Some("ABORTED")),
        "{out}"
    );
    // p1 acknowledges the abort soon after the answer; p2, killed, cannot.
    let mut out = Value::Null;
    for _ in 0..200 {
        let (code, listed, _) = ratify(&c, &["in-doubt", "--fail-if-any"]);
        assert_eq!(
            code, 6,
            "the abort waits for p2's acknowledgement: {listed}"
        );
        out = listed;
        if out["transactions"][0]["pending"] == serde_json::json!(["p2"]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(out["transactions"][0]["txn_id"], stuck.as_str());
    assert_eq!(
        out["transactions"][0]["pending"],
        serde_json::json!(["p2"]),
        "only p2 owes its acknowledgement: {out}"
    );
    let (code, out, _) = ratify(&c, &["in-doubt", "--participant", "p1"]);
    assert_eq!(code, 0);
    assert_eq!(out["total"], 0, "p1 aborted its branch: {out}");
    stack.participants[1].restart(&[]);
    let mut drained = false;
    for _ in 0..200 {
        if ratify(&c, &["in-doubt", "--fail-if-any"]).0 == 0 {
            drained = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        drained,
        "the in-doubt list did not drain after p2 came back"
    );

    // Nothing answers: exit code 5.
    assert_eq!(ratify("http://127.0.0.1:9", &["txn", "begin"]).0, 5);
}

#[test]
fn dev_serves_a_transaction_and_stops_cleanly_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut dev = Command::new(RATIFY)
        .args(["dev", "--any-port", "--dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut coordinator = None;
    let stdout = dev.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("coordinator") {
            coordinator = Some(rest.trim().to_string());
        }
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }
    let c = coordinator.expect("dev printed the coordinator's endpoint");
    let (code, out, err) = ratify(&c, &["kv", "put", "k", "v", "--participant", "p2"]);
    assert_eq!(
        (code, out["outcome"].as_str()),
        (0, Some("COMMITTED")),
        "{err}"
    );
    let (_, out, _) = ratify(&c, &["participants"]);
    let endpoints: Vec<String> = out["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["endpoint"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(endpoints.len(), 2);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = dev.wait().unwrap();
    assert!(
        status.success(),
        "ratify dev exited with {status}: {rest:?}"
    );
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    // Every process it started is gone.
    for e in std::iter::once(&c).chain(&endpoints) {
        let addr = e.trim_start_matches("http://");
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still answers"
        );
    }
    assert!(data.join("coordinator").exists() && data.join("p1").exists());
}

fn demo(extra: &[&str]) -> (i32, Value, String) {
    let out = Command::new(RATIFY)
        .args([
            "demo",
            "--transfers",
            "200",
            "--concurrency",
            "8",
            "--seed",
            "11",
            "--json",
            "--exe",
            RATIFY,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), summary, stderr)
}

#[test]
fn the_demo_passes_its_checks_after_a_coordinator_crash() {
    let (code, summary, stderr) = demo(&[]);
    assert_eq!(code, 0, "{summary}\n{stderr}");
    assert_eq!(summary["passed"], true);
    assert_eq!(summary["transfers"], 200);
    assert_eq!(summary["coordinator_crashes"], 1);
    assert_eq!(summary["in_doubt_left"], 0);
    assert!(summary["committed"].as_u64().unwrap() > 0, "{summary}");
    assert!(stderr.contains("SIGKILL the coordinator"), "{stderr}");
}

#[test]
fn the_demo_reports_failure_when_a_participant_breaks_atomicity() {
    // p2 acknowledges one commit without applying it: the checks must catch it.
    let (code, summary, stderr) = demo(&[
        "--p2-failpoints",
        "participant::commit::drop_writes=1*return",
    ]);
    assert_eq!(code, 8, "{summary}\n{stderr}");
    assert_eq!(summary["passed"], false);
    let failed: Vec<&str> = summary["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(
        failed.contains(&"each transfer on both sides or neither"),
        "{failed:?}"
    );
}

#[test]
fn bench_reports_every_figure_beside_its_ceilings() {
    // A smoke test: the bench runs end to end and prints its JSON; no timing is asserted.
    let out = Command::new(RATIFY)
        .args([
            "bench",
            "--duration",
            "1s",
            "--concurrency",
            "4",
            "--memory-probe",
            "200",
            "--runs",
            "2",
            "--worker-threads",
            "1",
            "--json",
            "--exe",
            RATIFY,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for field in [
        "committed_per_s",
        "aborted_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "echo_rpc_per_s",
        "fsync_per_s",
        "rpcs_per_txn",
        "ratio",
        "coordinator_batch_records",
        "coordinator_fsyncs_per_s",
        "participant_flush_batch",
        "server_cpu_s_per_txn",
        "model_p50_ms",
        "coordinator_bytes_per_txn_in_flight",
    ] {
        assert!(last[field].is_number(), "{field} missing in {last}");
    }
    assert!(last["committed_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(last["runs"], 2);
    assert_eq!(last["worker_threads"], 1);
    let ratio = |field: &str| last[field].as_f64().unwrap();
    assert!(
        ratio("ratio_min") <= ratio("ratio") && ratio("ratio") <= ratio("ratio_max"),
        "{last}"
    );
    assert!(last["peak_rss_bytes"]["coordinator"].as_u64().unwrap() > 0);
}
