//! `ratify bench`: how fast Ratify commits, always beside ceilings measured in the same
//! run on the same machine: the raw unary gRPC echo rate (an echo server in a separate
//! process, same tonic settings) at the same concurrency, and the raw fdatasync rate of
//! the data directory. Figures on a noisy machine compare as ratios.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use prost::Message;
use ratify_proto::v1;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use serde_json::{Value, json};

use crate::client::{self, CliError, CliResult, exit};
use crate::output::table;
use crate::proc::Proc;
use crate::stack::{
    LocalStack, StackConfig, participant_name, shared_machine_worker_threads, worker_threads_args,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One-shot transactions: payloads ride on the prepares (1 client RPC each).
    Execute,
    /// Begin, stage on each participant, commit.
    Interactive,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How long to drive load at each concurrency (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Sled participants in the stack the bench starts.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub participants: u16,
    /// Bytes written per participant per transaction.
    #[arg(long, default_value_t = 16)]
    pub payload_bytes: usize,
    #[arg(long, value_enum, default_value_t = Mode::Execute)]
    pub mode: Mode,
    /// Bench a running stack at this coordinator instead of starting one (its
    /// participants must be registered as p1..pN).
    #[arg(long)]
    pub target: Option<String>,
    /// Run concurrency 1, 4, 16, 64 and 256 and print a table.
    #[arg(long)]
    pub sweep: bool,
    /// Measure each concurrency this many times (workload and echo ceiling each time)
    /// and report the run with the median ratio, beside the range over all runs: on a
    /// shared machine one run's ratio can move by 15%.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=25))]
    pub runs: u32,
    /// With --sweep: write a throughput/latency plot (SVG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Transactions held in flight to measure the coordinator's memory per transaction
    /// (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub memory_probe: u32,
    /// The last line of output is one JSON object with every figure.
    #[arg(long)]
    pub json: bool,
    /// Async worker threads of each process of the stack the bench starts, and of its
    /// echo server (default: the machine's cores divided among the stack's processes, at
    /// least one; with --target, the echo server's default is one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=ratify_coordinator::daemon::MAX_WORKER_THREADS as i64))]
    pub worker_threads: Option<u16>,
    /// The `ratify` binary to run the stack with (default: this one).
    #[arg(long, hide = true)]
    pub exe: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        _ => return Err(format!("bad duration unit in {text:?} (use ms, s or m)")),
    };
    if !(0.05..=3600.0).contains(&seconds) {
        return Err("duration must be between 50ms and 1h".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Serves the Echo service (the gRPC ceiling) until killed.
pub async fn serve_echo(listen: &str) -> CliResult<u8> {
    #[derive(Debug)]
    struct EchoService;
    #[tonic::async_trait]
    impl v1::echo_server::Echo for EchoService {
        async fn echo(
            &self,
            request: tonic::Request<v1::EchoMessage>,
        ) -> Result<tonic::Response<v1::EchoMessage>, tonic::Status> {
            Ok(tonic::Response::new(request.into_inner()))
        }
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    println!("ratify echo listening on {local}");
    // The same server settings as the coordinator and participants.
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(1024))
        .concurrency_limit_per_connection(1024)
        .tcp_nodelay(true)
        .add_service(v1::echo_server::EchoServer::new(EchoService))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    Ok(exit::OK)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// The raw fdatasync rate and median latency of small appends in `dir`.
fn fsync_ceiling(dir: &std::path::Path, seconds: f64) -> (f64, f64) {
    let path = dir.join("fsync-probe");
    let Ok(mut file) = std::fs::File::create(&path) else {
        return (0.0, 0.0);
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        if file
            .write_all(&[0u8; 128])
            .and_then(|()| file.sync_data())
            .is_err()
        {
            break;
        }
        latencies.push(t.elapsed().as_micros() as u64);
    }
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    latencies.sort_unstable();
    (rate, percentile(&latencies, 0.5))
}

/// Echo round-trip latencies (µs) at `concurrency` callers for `duration`, one channel
/// (like the bench clients, which share one channel to the coordinator), and the seconds
/// they took.
async fn echo_ceiling(
    endpoint: &str,
    concurrency: u32,
    payload: usize,
    duration: Duration,
) -> CliResult<(Vec<u64>, f64)> {
    let channel = client::channel(endpoint).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (channel, stop) = (channel.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = v1::echo_client::EchoClient::new(channel);
            let mut latencies = Vec::new();
            let message = v1::EchoMessage {
                payload: vec![7u8; payload].into(),
            };
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if client.echo(message.clone()).await.is_err() {
                    break;
                }
                latencies.push(t.elapsed().as_micros() as u64);
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    Ok((all, started.elapsed().as_secs_f64()))
}

/// CPU seconds used so far by a process (utime + stime).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/<pid>/status` memory field in bytes (VmHWM: peak RSS; VmRSS: now).
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Default)]
struct Counters {
    coordinator: v1::CoordinatorStats,
    participants: Vec<v1::ParticipantStats>,
}

async fn counters(coordinator: &str, participants: &[String]) -> CliResult<Counters> {
    let mut admin = client::admin(coordinator).await?;
    let mut out = Counters {
        coordinator: admin.get_stats(v1::GetStatsRequest {}).await?.into_inner(),
        participants: Vec::new(),
    };
    for p in participants {
        let mut c = client::participant(p).await?;
        out.participants.push(
            c.get_stats(v1::ParticipantStatsRequest {})
                .await?
                .into_inner(),
        );
    }
    Ok(out)
}

struct Target {
    coordinator: String,
    participants: Vec<String>,
    names: Vec<String>,
    pids: Vec<(String, u32)>,
}

struct RunResult {
    committed: u64,
    aborted: u64,
    errors: u64,
    client_rpcs: u64,
    elapsed: f64,
    latencies: Vec<u64>,
}

async fn drive(
    target: &Target,
    args: &BenchArgs,
    concurrency: u32,
    duration: Duration,
) -> CliResult<RunResult> {
    let channel = client::channel(&target.coordinator).await?;
    let participant_channels: Vec<_> = {
        let mut v = Vec::new();
        for p in &target.participants {
            v.push(client::channel(p).await?);
        }
        v
    };
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let client_rpcs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client_index in 0..concurrency {
        let (channel, stop, measuring, client_rpcs) = (
            channel.clone(),
            stop.clone(),
            measuring.clone(),
            client_rpcs.clone(),
        );
        let participant_channels = participant_channels.clone();
        let names = target.names.clone();
        let mode = args.mode;
        let value = vec![b'x'; args.payload_bytes];
        tasks.push(tokio::spawn(async move {
            let mut coordinator = v1::coordinator_client::CoordinatorClient::new(channel);
            let mut kvs: Vec<_> = participant_channels
                .into_iter()
                .map(v1::kv_client::KvClient::new)
                .collect();
            let (mut committed, mut aborted, mut errors) = (0u64, 0u64, 0u64);
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // Each client writes its own keys: no conflicts, so the figures measure
                // the protocol, not contention.
                let key = format!("bench-{client_index}-{}", i % 64);
                let op = v1::KvOp {
                    op: Some(v1::kv_op::Op::Put(v1::Put {
                        key: key.into_bytes().into(),
                        value: value.clone().into(),
                    })),
                };
                let t = Instant::now();
                let (outcome, rpcs) = match mode {
                    Mode::Execute => {
                        let branches = names
                            .iter()
                            .map(|n| v1::ExecuteBranch {
                                participant: n.clone(),
                                payload: v1::KvOps {
                                    ops: vec![op.clone()],
                                }
                                .encode_to_vec()
                                .into(),
                            })
                            .collect();
                        let r = coordinator
                            .execute(v1::ExecuteRequest {
                                branches,
                                timeout_ms: 0,
                                wait_for_phase2: false,
                            })
                            .await;
                        (r.map(|r| r.into_inner().outcome()), 1)
                    }
                    Mode::Interactive => {
                        let mut rpcs = 1;
                        let outcome = async {
                            let txn = coordinator
                                .begin(v1::BeginRequest { timeout_ms: 0 })
                                .await?
                                .into_inner()
                                .txn_id;
                            for kv in kvs.iter_mut() {
                                rpcs += 1;
                                kv.stage(v1::StageRequest {
                                    txn_id: txn.clone(),
                                    ops: vec![op.clone()],
                                })
                                .await?;
                            }
                            rpcs += 1;
                            Ok::<_, tonic::Status>(
                                coordinator
                                    .commit(v1::CommitTxnRequest {
                                        txn_id: txn,
                                        wait_for_phase2: false,
                                    })
                                    .await?
                                    .into_inner()
                                    .outcome(),
                            )
                        }
                        .await;
                        (outcome, rpcs)
                    }
                };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                client_rpcs.fetch_add(rpcs, Ordering::Relaxed);
                match outcome {
                    Ok(v1::Outcome::Committed) => {
                        committed += 1;
                        latencies.push(t.elapsed().as_micros() as u64);
                    }
                    Ok(_) => aborted += 1,
                    Err(_) => errors += 1,
                }
            }
            (committed, aborted, errors, latencies)
        }));
    }
    // A short warm-up (connections, allocator) that is not counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut result = RunResult {
        committed: 0,
        aborted: 0,
        errors: 0,
        client_rpcs: 0,
        elapsed,
        latencies: Vec::new(),
    };
    for t in tasks {
        let (c, a, e, l) = t
            .await
            .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
        result.committed += c;
        result.aborted += a;
        result.errors += e;
        result.latencies.extend(l);
    }
    result.client_rpcs = client_rpcs.load(Ordering::Relaxed);
    result.latencies.sort_unstable();
    Ok(result)
}

async fn measure(
    target: &Target,
    args: &BenchArgs,
    echo: &str,
    concurrency: u32,
    fsync: (f64, f64),
) -> CliResult<Value> {
    // Half the echo ceiling before the workload and half after, so that a machine whose
    // speed drifts during the run (a shared VM) is compared with its average.
    let echo_half =
        (args.duration / 4).clamp(Duration::from_millis(100), Duration::from_millis(1500));
    let (mut echo_latencies, mut echo_seconds) =
        echo_ceiling(echo, concurrency, args.payload_bytes, echo_half).await?;
    let cpu_before: Vec<f64> = target.pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let self_cpu_before = cpu_seconds(std::process::id());
    let before = counters(&target.coordinator, &target.participants).await?;
    let run = drive(target, args, concurrency, args.duration).await?;
    let after = counters(&target.coordinator, &target.participants).await?;
    let cpu_after: Vec<f64> = target.pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let self_cpu = cpu_seconds(std::process::id()) - self_cpu_before;
    let (more, seconds) = echo_ceiling(echo, concurrency, args.payload_bytes, echo_half).await?;
    echo_latencies.extend(more);
    echo_seconds += seconds;
    let echo_rate = echo_latencies.len() as f64 / echo_seconds;
    echo_latencies.sort_unstable();
    let echo_p50 = percentile(&echo_latencies, 0.5);

    let txns = (run.committed + run.aborted).max(1) as f64;
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
    let (c0, c1) = (&before.coordinator, &after.coordinator);
    let participant_rpcs = d(c1.participant_rpcs, c0.participant_rpcs);
    // Interactive branches enlist themselves: one participant->coordinator RPC each.
    let enlists = if args.mode == Mode::Interactive {
        txns * target.names.len() as f64
    } else {
        0.0
    };
    // The counters cover the measured window and its edges; the RPC mix per transaction
    // does not change across the window, so the ratio is sound.
    let window_scale = txns / d(c1.committed + c1.aborted, c0.committed + c0.aborted).max(1.0);
    let branch_messages = d(c1.participant_branches, c0.participant_branches);
    // The protocol's unary RPCs per transaction: what it would send with one RPC per
    // message (each Prepare, Commit, Abort to each participant is one). Batching carries
    // several of them in one wire RPC, which is how the ratio can pass 1.0.
    let rpcs_per_txn = (run.client_rpcs as f64 + enlists + branch_messages * window_scale) / txns;
    // The RPCs actually sent after batching.
    let wire_rpcs_per_txn =
        (run.client_rpcs as f64 + enlists + participant_rpcs * window_scale) / txns;
    let committed_per_s = run.committed as f64 / run.elapsed;
    let ratio = committed_per_s / (echo_rate / rpcs_per_txn);
    let wire_ratio = committed_per_s / (echo_rate / wire_rpcs_per_txn);
    let flushes: f64 = after
        .participants
        .iter()
        .zip(&before.participants)
        .map(|(a, b)| d(a.flushes, b.flushes))
        .sum();
    let waiters: f64 = after
        .participants
        .iter()
        .zip(&before.participants)
        .map(|(a, b)| d(a.flush_waiters, b.flush_waiters))
        .sum();
    let server_cpu: f64 = cpu_after.iter().zip(&cpu_before).map(|(a, b)| a - b).sum();
    let model_p50 = 3.0 * echo_p50 + 2.0 * fsync.1;
    let p50 = percentile(&run.latencies, 0.5);
    Ok(json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "concurrency": concurrency,
        "participants": target.names.len(),
        "payload_bytes": args.payload_bytes,
        "duration_s": run.elapsed,
        "committed_per_s": committed_per_s,
        "aborted_per_s": run.aborted as f64 / run.elapsed,
        "errors": run.errors,
        "p50_ms": p50,
        "p99_ms": percentile(&run.latencies, 0.99),
        "p999_ms": percentile(&run.latencies, 0.999),
        "rpcs_per_txn": rpcs_per_txn,
        "wire_rpcs_per_txn": wire_rpcs_per_txn,
        "echo_rpc_per_s": echo_rate,
        "echo_p50_ms": echo_p50,
        "fsync_per_s": fsync.0,
        "fsync_p50_ms": fsync.1,
        "ratio": ratio,
        "wire_ratio": wire_ratio,
        "model_p50_ms": model_p50,
        "p50_over_model": if model_p50 > 0.0 { p50 / model_p50 } else { 0.0 },
        "coordinator_batch_records": d(c1.log_records, c0.log_records) / d(c1.log_batches, c0.log_batches).max(1.0),
        "coordinator_fsyncs_per_s": d(c1.log_fsyncs, c0.log_fsyncs) / run.elapsed,
        "participant_branches_per_rpc": d(c1.participant_branches, c0.participant_branches) / participant_rpcs.max(1.0),
        "participant_flush_batch": waiters / flushes.max(1.0),
        "participant_flushes_per_s": flushes / run.elapsed,
        "server_cpu_s_per_txn": server_cpu / txns,
        "cpu_s_per_txn_by_process": target
            .pids
            .iter()
            .zip(cpu_after.iter().zip(&cpu_before))
            .map(|((name, _), (a, b))| (name.clone(), json!((a - b) / txns)))
            .collect::<serde_json::Map<_, _>>(),
        "bench_cpu_s_per_txn": self_cpu / txns,
    }))
}

/// The run with the median ratio, with the range of the noisiest figures over all runs
/// (`<field>_min`, `<field>_max`) and the number of runs.
fn median_run(mut runs: Vec<Value>) -> Value {
    let value = |run: &Value, field: &str| run[field].as_f64().unwrap_or(0.0);
    runs.sort_by(|a, b| value(a, "ratio").total_cmp(&value(b, "ratio")));
    let mut row = runs[(runs.len() - 1) / 2].clone();
    for field in ["ratio", "committed_per_s", "p50_over_model", "p99_ms"] {
        let (min, max) = runs
            .iter()
            .map(|r| value(r, field))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        row[format!("{field}_min")] = json!(min);
        row[format!("{field}_max")] = json!(max);
    }
    row["runs"] = json!(runs.len());
    row
}

/// Begins `n` transactions over 32 callers and returns them still in flight.
async fn begin_many(
    channel: &tonic::transport::Channel,
    n: u32,
) -> CliResult<Vec<(CoordinatorClient<tonic::transport::Channel>, Vec<Bytes>)>> {
    let per_task = n.div_ceil(32);
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let mut c = CoordinatorClient::new(channel.clone());
        let count = per_task.min(n.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let begun = c
                    .begin(v1::BeginRequest {
                        timeout_ms: 600_000,
                    })
                    .await?;
                ids.push(begun.into_inner().txn_id);
            }
            Ok::<_, tonic::Status>((c, ids))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(
            t.await
                .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?
                .map_err(|e| CliError::new(exit::ERROR, format!("memory probe: {e}")))?,
        );
    }
    Ok(held)
}

/// Aborts what [`begin_many`] began.
async fn abort_all(
    held: Vec<(CoordinatorClient<tonic::transport::Channel>, Vec<Bytes>)>,
) -> CliResult<()> {
    let mut aborts = Vec::new();
    for (mut c, ids) in held {
        aborts.push(tokio::spawn(async move {
            for txn_id in ids {
                c.abort(v1::AbortTxnRequest {
                    txn_id,
                    reason: "bench memory probe".into(),
                })
                .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for a in aborts {
        a.await
            .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?
            .map_err(|e| CliError::new(exit::ERROR, format!("memory probe: {e}")))?;
    }
    Ok(())
}

/// The coordinator's resident memory with `n` transactions in flight, and its growth per
/// transaction. Runs before any workload, after a warm-up round (a tenth of `n` begun
/// and aborted) has touched the threads and allocator arenas the first transactions
/// would otherwise be charged for; the transactions are aborted afterwards, out of the
/// workload's way.
async fn memory_probe(target: &Target, n: u32) -> CliResult<(u64, f64)> {
    let Some((_, pid)) = target
        .pids
        .iter()
        .find(|(name, _)| name == "coordinator")
        .cloned()
    else {
        return Ok((0, 0.0));
    };
    let channel = client::channel(&target.coordinator).await?;
    abort_all(begin_many(&channel, (n / 10).max(1)).await?).await?;
    let before = memory(pid, "VmRSS");
    let held = begin_many(&channel, n).await?;
    let after = memory(pid, "VmRSS");
    abort_all(held).await?;
    Ok((
        after,
        after.saturating_sub(before) as f64 / f64::from(n.max(1)),
    ))
}

fn svg_plot(rows: &[Value]) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let xs: Vec<f64> = rows
        .iter()
        .map(|r| r["concurrency"].as_f64().unwrap_or(1.0).log2())
        .collect();
    let tput: Vec<f64> = rows
        .iter()
        .map(|r| r["committed_per_s"].as_f64().unwrap_or(0.0))
        .collect();
    let p99: Vec<f64> = rows
        .iter()
        .map(|r| r["p99_ms"].as_f64().unwrap_or(0.0))
        .collect();
    let xmax = xs.iter().cloned().fold(1.0, f64::max);
    let tmax = tput.iter().cloned().fold(1.0, f64::max) * 1.1;
    let lmax = p99.iter().cloned().fold(1.0, f64::max) * 1.1;
    let px = |x: f64| pad + x / xmax * (w - 2.0 * pad);
    let py = |y: f64, max: f64| h - pad - y / max * (h - 2.0 * pad);
    let line = |ys: &[f64], max: f64| {
        xs.iter()
            .zip(ys)
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y, max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <line x1='{pad}' y1='{b}' x2='{r}' y2='{b}' stroke='black'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{b}' stroke='black'/>\
         <line x1='{r}' y1='{pad}' x2='{r}' y2='{b}' stroke='black'/>\
         <text x='{cx}' y='{t}' text-anchor='middle'>clients (log scale)</text>\
         <text x='10' y='30' fill='#1f77b4'>committed/s (max {tmax:.0})</text>\
         <text x='{rr}' y='30' text-anchor='end' fill='#d62728'>p99 ms (max {lmax:.1})</text>\
         <polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{tp}'/>\
         <polyline fill='none' stroke='#d62728' stroke-width='2' stroke-dasharray='5,3' points='{lp}'/>",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        t = h - 12.0,
        rr = w - 10.0,
        tp = line(&tput, tmax),
        lp = line(&p99, lmax),
    );
    for (x, row) in xs.iter().zip(rows) {
        svg.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{}</text>",
            px(*x),
            h - pad + 16.0,
            row["concurrency"]
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

pub async fn run(args: BenchArgs) -> CliResult<u8> {
    let dir = tempfile::Builder::new()
        .prefix("ratify-bench-")
        .tempdir()
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    let exe = match &args.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().map_err(|e| CliError::new(exit::ERROR, e.to_string()))?,
    };
    // The echo server runs with the workers of each process of the stack, so that the
    // ceiling is measured with the same settings as what it is compared with.
    let worker_threads = args.worker_threads.map(usize::from).or_else(|| {
        args.target
            .is_none()
            .then(|| shared_machine_worker_threads(usize::from(args.participants) + 1))
    });
    let mut stack = None;
    let target = match &args.target {
        Some(coordinator) => {
            let names: Vec<String> = (0..usize::from(args.participants))
                .map(participant_name)
                .collect();
            let mut participants = Vec::new();
            for n in &names {
                participants.push(client::participant_endpoint(coordinator, n).await?);
            }
            Target {
                coordinator: coordinator.clone(),
                participants,
                names,
                pids: Vec::new(),
            }
        }
        None => {
            let s = LocalStack::start(&StackConfig {
                exe: Some(exe.clone()),
                dir: dir.path().to_path_buf(),
                participants: usize::from(args.participants),
                coordinator_port: 0,
                participant_ports: Vec::new(),
                prepare_timeout_ms: 5_000,
                termination_deadline_ms: 10_000,
                participant_env: Vec::new(),
                stores: Vec::new(),
                worker_threads,
            })
            .map_err(|e| CliError::new(exit::ERROR, e))?;
            s.wait_registered(Duration::from_secs(30))
                .await
                .map_err(|e| CliError::new(exit::UNAVAILABLE, e))?;
            let mut pids = vec![(
                "coordinator".to_string(),
                s.coordinator.pid().map(|p| p.as_raw() as u32).unwrap_or(0),
            )];
            for (n, p) in s.names.iter().zip(&s.participants) {
                pids.push((n.clone(), p.pid().map(|p| p.as_raw() as u32).unwrap_or(0)));
            }
            let t = Target {
                coordinator: s.coordinator.endpoint(),
                participants: s.endpoints(),
                names: s.names.clone(),
                pids,
            };
            stack = Some(s);
            t
        }
    };
    let echo = Proc::try_start(
        "echo",
        exe,
        std::iter::once("echo-server".to_string())
            .chain(worker_threads_args(worker_threads))
            .collect(),
        "127.0.0.1:0",
        &[],
        dir.path().join("echo.log"),
    )
    .map_err(|e| CliError::new(exit::ERROR, e))?;
    let fsync = fsync_ceiling(dir.path(), 1.0);
    eprintln!(
        "ceilings: fdatasync {:.0}/s (p50 {:.3} ms) in {}; worker threads per server \
         process: {}",
        fsync.0,
        fsync.1,
        dir.path().display(),
        worker_threads.map_or("one per core".to_string(), |n| n.to_string())
    );

    let (rss_probe, bytes_per_txn) = if args.memory_probe > 0 && !target.pids.is_empty() {
        memory_probe(&target, args.memory_probe).await?
    } else {
        (0, 0.0)
    };
    let levels: Vec<u32> = if args.sweep {
        vec![1, 4, 16, 64, 256]
    } else {
        vec![args.concurrency]
    };
    let mut rows = Vec::new();
    for c in levels {
        eprintln!(
            "running {c} clients for {:.1}s ...",
            args.duration.as_secs_f64()
        );
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            runs.push(measure(&target, &args, &echo.endpoint(), c, fsync).await?);
        }
        let mut row = median_run(runs);
        row["worker_threads"] = json!(worker_threads);
        rows.push(row);
    }
    let peak_rss: Value = target
        .pids
        .iter()
        .map(|(n, p)| (n.clone(), json!(memory(*p, "VmHWM"))))
        .collect::<serde_json::Map<_, _>>()
        .into();

    let fmt = |v: &Value, k: &str, d: usize| format!("{:.*}", d, v[k].as_f64().unwrap_or(0.0));
    // With --runs > 1: the median run's figure and the range over all runs.
    let with_range = |v: &Value, k: &str, d: usize| {
        let (lo, hi) = (&v[format!("{k}_min")], &v[format!("{k}_max")]);
        match (lo.as_f64(), hi.as_f64()) {
            (Some(lo), Some(hi)) if v["runs"].as_u64().unwrap_or(1) > 1 => {
                format!("{} [{lo:.d$}–{hi:.d$}]", fmt(v, k, d))
            }
            _ => fmt(v, k, d),
        }
    };
    let headers = [
        "clients",
        "committed/s",
        "aborted/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "rpcs/txn",
        "wire rpcs/txn",
        "echo rpc/s",
        "ratio",
        "wire ratio",
        "p50/model",
        "log batch",
        "fsyncs/s",
        "flush batch",
        "cpu ms/txn",
    ];
    let table_rows = rows
        .iter()
        .map(|r| {
            vec![
                r["concurrency"].to_string(),
                fmt(r, "committed_per_s", 0),
                fmt(r, "aborted_per_s", 0),
                fmt(r, "p50_ms", 2),
                with_range(r, "p99_ms", 2),
                fmt(r, "p999_ms", 2),
                fmt(r, "rpcs_per_txn", 2),
                fmt(r, "wire_rpcs_per_txn", 2),
                fmt(r, "echo_rpc_per_s", 0),
                with_range(r, "ratio", 2),
                fmt(r, "wire_ratio", 2),
                format!(
                    "{} ({:.2} ms)",
                    with_range(r, "p50_over_model", 2),
                    r["model_p50_ms"].as_f64().unwrap_or(0.0)
                ),
                fmt(r, "coordinator_batch_records", 1),
                fmt(r, "coordinator_fsyncs_per_s", 0),
                fmt(r, "participant_flush_batch", 1),
                format!(
                    "{:.3}",
                    r["server_cpu_s_per_txn"].as_f64().unwrap_or(0.0) * 1000.0
                ),
            ]
        })
        .collect();
    println!("{}", table(&headers, table_rows));
    println!(
        "fdatasync {:.0}/s (p50 {:.3} ms); model p50 = 3 echo round trips + 2 fdatasyncs at that concurrency; ratio = committed/s / (echo RPC/s / protocol RPCs per txn), wire ratio uses the batches sent (RPCs, or messages on a Prepare stream); peak RSS {}; coordinator RSS with {} in flight: {} MiB ({:.0} bytes per transaction)",
        fsync.0,
        fsync.1,
        peak_rss,
        args.memory_probe,
        rss_probe / (1 << 20),
        bytes_per_txn
    );
    if args.runs > 1 {
        println!(
            "each row is the run with the median ratio of {} runs; [min–max] over all of them",
            args.runs
        );
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg_plot(&rows))
            .map_err(|e| CliError::new(exit::ERROR, format!("writing {}: {e}", path.display())))?;
        eprintln!("plot written to {}", path.display());
    }
    if args.json {
        let mut last = rows.last().cloned().unwrap_or(Value::Null);
        last["peak_rss_bytes"] = peak_rss;
        last["memory_probe_in_flight"] = json!(args.memory_probe);
        last["coordinator_rss_bytes_at_probe"] = json!(rss_probe);
        last["coordinator_bytes_per_txn_in_flight"] = json!(bytes_per_txn);
        if rows.len() > 1 {
            last["sweep"] = json!(rows);
        }
        println!("{}", serde_json::to_string(&last).unwrap_or_default());
    }
    drop(echo);
    if let Some(mut s) = stack {
        s.stop();
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_is_reported_with_the_range_of_all_runs() {
        let run = |ratio: f64, p99: f64| json!({"ratio": ratio, "p99_ms": p99, "committed_per_s": 1.0, "p50_over_model": 2.0});
        let row = median_run(vec![run(0.9, 10.0), run(0.5, 30.0), run(0.7, 20.0)]);
        assert_eq!(row["ratio"], 0.7);
        assert_eq!(row["p99_ms"], 20.0, "the figures of one run, not a mix");
        assert_eq!(
            (row["ratio_min"].as_f64(), row["ratio_max"].as_f64()),
            (Some(0.5), Some(0.9))
        );
        assert_eq!(
            (row["p99_ms_min"].as_f64(), row["p99_ms_max"].as_f64()),
            (Some(10.0), Some(30.0))
        );
        assert_eq!(row["runs"], 3);
        // An even count reports the lower of the two middle runs.
        let row = median_run(vec![run(0.9, 10.0), run(0.5, 30.0)]);
        assert_eq!(row["ratio"], 0.5);
    }
}
