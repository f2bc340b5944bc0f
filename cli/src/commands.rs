//! The client and operator verbs.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::{Args, Subcommand};
use prost::Message;
use ratify_proto::TxnId;
use ratify_proto::v1;
use serde_json::json;

use crate::client::{self, CliError, CliResult, exit, parse_txn};
use crate::output::{Format, age, table, unix_ms};

/// Where to print and whom to ask.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub coordinator: String,
    pub output: Format,
}

impl Ctx {
    fn print(&self, value: serde_json::Value, table_text: impl FnOnce() -> String) {
        match self.output {
            Format::Json => println!("{}", crate::output::json(&value)),
            Format::Table => println!("{}", table_text()),
        }
    }
}

pub fn outcome_name(outcome: v1::Outcome) -> &'static str {
    match outcome {
        v1::Outcome::Committed => "COMMITTED",
        v1::Outcome::Aborted => "ABORTED",
        v1::Outcome::InProgress => "IN_PROGRESS",
        v1::Outcome::Unknown => "UNKNOWN",
        v1::Outcome::Unspecified => "UNSPECIFIED",
    }
}

fn state_name(state: v1::TxnState) -> &'static str {
    match state {
        v1::TxnState::Active => "active",
        v1::TxnState::Preparing => "preparing",
        v1::TxnState::Deciding => "deciding",
        v1::TxnState::Committed => "committed (phase 2)",
        v1::TxnState::Aborted => "aborted (phase 2)",
        v1::TxnState::Unspecified => "unknown",
    }
}

#[derive(Debug, Subcommand)]
pub enum TxnCmd {
    /// Start a transaction; prints its id.
    Begin {
        /// Abort it if undecided after this long (ms; 0 = the coordinator's default).
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
    },
    /// Commit a transaction (two-phase commit over its participants).
    Commit {
        id: String,
        /// Answer only once every participant acknowledged.
        #[arg(long)]
        wait_phase2: bool,
    },
    /// Abort a transaction.
    Abort {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The outcome of a transaction.
    Status { id: String },
    /// A transaction's state, participants and timeline.
    Show { id: String },
    /// Force the outcome of an in-doubt transaction (logged with who and why).
    Resolve(ResolveArgs),
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    pub id: String,
    #[arg(long, conflicts_with = "abort", required_unless_present = "abort")]
    pub commit: bool,
    #[arg(long)]
    pub abort: bool,
    /// Why (recorded in the coordinator's log).
    #[arg(long)]
    pub reason: String,
    /// Who (default: $USER).
    #[arg(long)]
    pub actor: Option<String>,
    /// Print the plan and the evidence, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

pub async fn txn(ctx: &Ctx, cmd: TxnCmd) -> CliResult<u8> {
    let mut c = client::coordinator(&ctx.coordinator).await?;
    match cmd {
        TxnCmd::Begin { timeout_ms } => {
            let r = c.begin(v1::BeginRequest { timeout_ms }).await?.into_inner();
            ctx.print(json!({ "txn_id": r.txn_id_text }), || r.txn_id_text.clone());
            Ok(exit::OK)
        }
        TxnCmd::Commit { id, wait_phase2 } => {
            let txn = parse_txn(&id)?;
            let r = c
                .commit(v1::CommitTxnRequest {
                    txn_id: txn.to_vec().into(),
                    wait_for_phase2: wait_phase2,
                })
                .await?
                .into_inner();
            print_outcome(ctx, txn, r.outcome(), &r.reason);
            Ok(if r.outcome() == v1::Outcome::Aborted {
                exit::ABORTED
            } else {
                exit::OK
            })
        }
        TxnCmd::Abort { id, reason } => {
            let txn = parse_txn(&id)?;
            let r = c
                .abort(v1::AbortTxnRequest {
                    txn_id: txn.to_vec().into(),
                    reason,
                })
                .await?
                .into_inner();
            print_outcome(ctx, txn, r.outcome(), "");
            Ok(exit::OK)
        }
        TxnCmd::Status { id } => {
            let txn = parse_txn(&id)?;
            let r = c
                .get_outcome(v1::GetOutcomeRequest {
                    txn_id: txn.to_vec().into(),
                    participant: String::new(),
                })
                .await?
                .into_inner();
            print_outcome(ctx, txn, r.outcome(), "");
            Ok(exit::OK)
        }
        TxnCmd::Show { id } => show(ctx, parse_txn(&id)?).await,
        TxnCmd::Resolve(args) => resolve(ctx, args).await,
    }
}

fn print_outcome(ctx: &Ctx, txn: TxnId, outcome: v1::Outcome, reason: &str) {
    ctx.print(
        json!({ "txn_id": txn.to_string(), "outcome": outcome_name(outcome), "reason": reason }),
        || {
            if reason.is_empty() {
                format!("{txn} {}", outcome_name(outcome))
            } else {
                format!("{txn} {} ({reason})", outcome_name(outcome))
            }
        },
    );
}

fn summary_json(s: &v1::TxnSummary) -> serde_json::Value {
    json!({
        "txn_id": s.txn_id_text,
        "state": state_name(s.state()),
        "age_ms": s.age_ms,
        "pending": s.pending,
        "last_error": s.last_error,
        "participants": s.participants.iter().map(|p| json!({
            "name": p.participant, "state": p.state, "attempts": p.attempts, "last_error": p.last_error,
        })).collect::<Vec<_>>(),
    })
}

async fn show(ctx: &Ctx, txn: TxnId) -> CliResult<u8> {
    let mut admin = client::admin(&ctx.coordinator).await?;
    let detail = admin
        .get_transaction(v1::GetTransactionRequest {
            txn_id: txn.to_vec().into(),
        })
        .await?
        .into_inner();
    let outcome = outcome_name(detail.outcome());
    let mut value = detail.summary.as_ref().map(summary_json).unwrap_or_else(|| {
        json!({ "txn_id": txn.to_string(), "state": "finished", "participants": [], "pending": [], "last_error": "", "age_ms": null })
    });
    value["outcome"] = json!(outcome);
    value["timeline"] = json!(
        detail
            .timeline
            .iter()
            .map(|e| json!({ "at_unix_ms": e.at_unix_ms, "event": e.event }))
            .collect::<Vec<_>>()
    );
    ctx.print(value, || {
        let mut out = format!("transaction {txn}\noutcome: {outcome}\n");
        match &detail.summary {
            Some(s) => {
                out.push_str(&format!(
                    "state: {}, age {}\n",
                    state_name(s.state()),
                    age(s.age_ms)
                ));
                out.push_str(&table(
                    &["participant", "state", "attempts", "last error"],
                    s.participants
                        .iter()
                        .map(|p| {
                            vec![
                                p.participant.clone(),
                                p.state.clone(),
                                p.attempts.to_string(),
                                p.last_error.clone(),
                            ]
                        })
                        .collect(),
                ));
                out.push('\n');
            }
            None => out.push_str("finished: the coordinator keeps only its outcome\n"),
        }
        if !detail.timeline.is_empty() {
            let first = detail.timeline[0].at_unix_ms;
            out.push_str(&table(
                &["+ms", "event"],
                detail
                    .timeline
                    .iter()
                    .map(|e| {
                        vec![
                            format!("+{}", e.at_unix_ms.saturating_sub(first)),
                            e.event.clone(),
                        ]
                    })
                    .collect(),
            ));
        }
        out
    });
    Ok(exit::OK)
}

/// What a participant holds of a branch, as evidence for a resolution.
async fn participant_holds(endpoint: &str, txn: TxnId) -> String {
    let Ok(mut p) = client::participant(endpoint).await else {
        return "unreachable".into();
    };
    match p
        .list_in_doubt(v1::ListInDoubtRequest { limit: 100_000 })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            if r.branches
                .iter()
                .any(|b| b.txn_id.as_ref() == txn.as_bytes())
            {
                "prepared (holding locks)".into()
            } else {
                "not prepared (committed, aborted, or never prepared)".into()
            }
        }
        Err(status) => format!("error: {}", status.message()),
    }
}

async fn resolve(ctx: &Ctx, args: ResolveArgs) -> CliResult<u8> {
    let txn = parse_txn(&args.id)?;
    let wanted = if args.commit {
        v1::Outcome::Committed
    } else {
        v1::Outcome::Aborted
    };
    if args.reason.trim().is_empty() {
        return Err(CliError::new(exit::USAGE, "--reason must say why"));
    }
    let actor = args
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".into());
    let mut admin = client::admin(&ctx.coordinator).await?;
    let detail = match admin
        .get_transaction(v1::GetTransactionRequest {
            txn_id: txn.to_vec().into(),
        })
        .await
    {
        Ok(d) => d.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => {
            return Err(CliError::new(
                exit::NOT_FOUND,
                format!(
                    "the coordinator has no record of {txn}: it is presumed ABORTED. Participants \
                     holding it prepared hear ABORTED when they ask (termination protocol); nothing to resolve here."
                ),
            ));
        }
        Err(status) => return Err(status.into()),
    };
    let logged = detail.outcome();
    let Some(summary) = detail.summary.clone() else {
        return Err(CliError::new(
            exit::REFUSED,
            format!(
                "{txn} already finished as {}; nothing to resolve",
                outcome_name(logged)
            ),
        ));
    };
    // Evidence: the coordinator's view and each participant's.
    let mut evidence = Vec::new();
    let participants = admin
        .list_participants(v1::ListParticipantsRequest {})
        .await?
        .into_inner()
        .participants;
    for p in &summary.participants {
        let endpoint = participants
            .iter()
            .find(|r| r.name == p.participant)
            .map(|r| r.endpoint.clone());
        let holds = match &endpoint {
            Some(e) => participant_holds(e, txn).await,
            None => "not in the registry".into(),
        };
        let action = if args.commit { "Commit" } else { "Abort" };
        evidence.push(json!({
            "participant": p.participant,
            "coordinator_view": p.state,
            "participant_view": holds,
            "will_send": if p.state == "acknowledged" || p.state == "no" || p.state == "read-only" { "nothing".to_string() } else { action.to_string() },
        }));
    }
    let contradicts = matches!(
        (logged, wanted),
        (v1::Outcome::Committed, v1::Outcome::Aborted)
            | (v1::Outcome::Aborted, v1::Outcome::Committed)
    );
    let plan = json!({
        "txn_id": txn.to_string(),
        "decision": outcome_name(wanted),
        "logged_outcome": outcome_name(logged),
        "state": state_name(summary.state()),
        "actor": actor,
        "reason": args.reason,
        "participants": evidence,
        "dry_run": args.dry_run,
    });
    if ctx.output == Format::Table || args.dry_run {
        ctx.print(plan.clone(), || {
            let mut out = format!(
                "resolve {txn} as {}\n  coordinator: state {}, logged outcome {}\n  first: log the resolution (actor {actor:?}, reason {:?}); then:\n",
                outcome_name(wanted),
                state_name(summary.state()),
                outcome_name(logged),
                args.reason
            );
            out.push_str(&table(
                &["participant", "coordinator view", "participant view", "will send"],
                plan["participants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        ["participant", "coordinator_view", "participant_view", "will_send"]
                            .iter()
                            .map(|k| e[*k].as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .collect(),
            ));
            out
        });
    }
    if contradicts {
        return Err(CliError::new(
            exit::REFUSED,
            format!(
                "refused: {txn} has a logged {} decision; forcing {} would contradict it",
                outcome_name(logged),
                outcome_name(wanted)
            ),
        ));
    }
    if args.dry_run {
        return Ok(exit::OK);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::new(
                exit::USAGE,
                "not a terminal: pass --yes to confirm, or --dry-run",
            ));
        }
        eprint!("Proceed? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(CliError::new(
                exit::REFUSED,
                "not confirmed; nothing changed",
            ));
        }
    }
    let r = admin
        .resolve(v1::ResolveRequest {
            txn_id: txn.to_vec().into(),
            decision: wanted as i32,
            reason: args.reason.clone(),
            actor,
        })
        .await?
        .into_inner();
    ctx.print(
        json!({ "txn_id": txn.to_string(), "outcome": outcome_name(r.outcome()), "message": r.message }),
        || format!("{txn} {}: {}", outcome_name(r.outcome()), r.message),
    );
    Ok(exit::OK)
}

#[derive(Debug, Subcommand)]
pub enum KvCmd {
    /// Read a key's committed value.
    Get {
        key: String,
        #[arg(long)]
        participant: String,
    },
    /// Write a value (in a one-shot transaction, or staged under --txn).
    Put {
        key: String,
        value: String,
        #[arg(long)]
        participant: String,
        #[arg(long)]
        txn: Option<String>,
    },
    /// Delete a key.
    Delete {
        key: String,
        #[arg(long)]
        participant: String,
        #[arg(long)]
        txn: Option<String>,
    },
    /// Add DELTA to a decimal integer value; with --min the transaction aborts if the
    /// result would fall below it.
    Add {
        key: String,
        #[arg(allow_negative_numbers = true)]
        delta: i64,
        #[arg(long, allow_negative_numbers = true)]
        min: Option<i64>,
        #[arg(long)]
        participant: String,
        #[arg(long)]
        txn: Option<String>,
    },
}

pub async fn kv(ctx: &Ctx, cmd: KvCmd) -> CliResult<u8> {
    let (op, participant, txn) = match cmd {
        KvCmd::Get { key, participant } => {
            let endpoint = client::participant_endpoint(&ctx.coordinator, &participant).await?;
            let mut kv = client::kv(&endpoint).await?;
            let r = kv
                .get(v1::GetRequest {
                    key: key.clone().into_bytes().into(),
                })
                .await?
                .into_inner();
            let value = String::from_utf8_lossy(&r.value).into_owned();
            ctx.print(
                json!({ "participant": participant, "key": key, "found": r.found, "value": if r.found { json!(value) } else { json!(null) }, "version": r.version }),
                || {
                    if r.found {
                        format!("{key} = {value} (version {})", r.version)
                    } else {
                        format!("{key} not found (version {})", r.version)
                    }
                },
            );
            return Ok(if r.found { exit::OK } else { exit::NOT_FOUND });
        }
        KvCmd::Put {
            key,
            value,
            participant,
            txn,
        } => (
            v1::kv_op::Op::Put(v1::Put {
                key: key.into_bytes().into(),
                value: value.into_bytes().into(),
            }),
            participant,
            txn,
        ),
        KvCmd::Delete {
            key,
            participant,
            txn,
        } => (
            v1::kv_op::Op::Delete(v1::Delete {
                key: key.into_bytes().into(),
            }),
            participant,
            txn,
        ),
        KvCmd::Add {
            key,
            delta,
            min,
            participant,
            txn,
        } => (
            v1::kv_op::Op::Add(v1::Add {
                key: key.into_bytes().into(),
                delta,
                min,
            }),
            participant,
            txn,
        ),
    };
    let op = v1::KvOp { op: Some(op) };
    match txn {
        Some(id) => {
            let txn = parse_txn(&id)?;
            let endpoint = client::participant_endpoint(&ctx.coordinator, &participant).await?;
            let mut kv = client::kv(&endpoint).await?;
            let r = kv
                .stage(v1::StageRequest {
                    txn_id: txn.to_vec().into(),
                    ops: vec![op],
                })
                .await?
                .into_inner();
            ctx.print(
                json!({ "txn_id": txn.to_string(), "staged": r.staged }),
                || {
                    format!(
                        "staged in {txn} on {participant} ({} operations so far)",
                        r.staged
                    )
                },
            );
            Ok(exit::OK)
        }
        None => {
            let mut c = client::coordinator(&ctx.coordinator).await?;
            let r = c
                .execute(v1::ExecuteRequest {
                    branches: vec![v1::ExecuteBranch {
                        participant,
                        payload: v1::KvOps { ops: vec![op] }.encode_to_vec().into(),
                    }],
                    timeout_ms: 0,
                    wait_for_phase2: false,
                })
                .await?
                .into_inner();
            let txn = TxnId::try_from(&r.txn_id)
                .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
            print_outcome(ctx, txn, r.outcome(), &r.reason);
            Ok(if r.outcome() == v1::Outcome::Aborted {
                exit::ABORTED
            } else {
                exit::OK
            })
        }
    }
}

pub async fn in_doubt(ctx: &Ctx, participant: Option<String>, fail_if_any: bool) -> CliResult<u8> {
    let count = match participant {
        None => {
            let mut admin = client::admin(&ctx.coordinator).await?;
            let r = admin
                .list_transactions(v1::ListTransactionsRequest {
                    in_doubt_only: true,
                    limit: 10_000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            ctx.print(
                json!({
                    "coordinator": ctx.coordinator,
                    "total": r.total,
                    "transactions": r.transactions.iter().map(summary_json).collect::<Vec<_>>(),
                }),
                || {
                    if r.transactions.is_empty() {
                        return format!(
                            "nothing in doubt on the coordinator at {}",
                            ctx.coordinator
                        );
                    }
                    table(
                        &["transaction", "state", "age", "pending", "last error"],
                        r.transactions
                            .iter()
                            .map(|t| {
                                vec![
                                    t.txn_id_text.clone(),
                                    state_name(t.state()).into(),
                                    age(t.age_ms),
                                    t.pending.join(", "),
                                    t.last_error.clone(),
                                ]
                            })
                            .collect(),
                    ) + &format!("\n{} in doubt", r.total)
                },
            );
            r.total
        }
        Some(p) => {
            let endpoint = client::participant_endpoint(&ctx.coordinator, &p).await?;
            let mut participant = client::participant(&endpoint).await?;
            let r = participant
                .list_in_doubt(v1::ListInDoubtRequest { limit: 10_000 })
                .await?
                .into_inner();
            // What the coordinator will answer each branch (presumed abort included).
            let mut coordinator = client::coordinator(&ctx.coordinator).await.ok();
            let mut says = Vec::new();
            for b in &r.branches {
                let answer = match coordinator.as_mut() {
                    Some(c) => match c
                        .get_outcome(v1::GetOutcomeRequest {
                            txn_id: b.txn_id.clone(),
                            participant: p.clone(),
                        })
                        .await
                    {
                        Ok(o) => outcome_name(o.into_inner().outcome()).to_string(),
                        Err(s) => format!("error: {}", s.message()),
                    },
                    None => "coordinator unreachable".into(),
                };
                says.push(answer);
            }
            let now = unix_ms();
            let rows: Vec<serde_json::Value> = r
                .branches
                .iter()
                .zip(&says)
                .map(|(b, s)| {
                    json!({
                        "txn_id": TxnId::try_from(&b.txn_id).map(|t| t.to_string()).unwrap_or_default(),
                        "epoch": b.epoch,
                        "prepared_at_unix_ms": b.prepared_at_unix_ms,
                        "age_ms": now.saturating_sub(b.prepared_at_unix_ms),
                        "inquiries": b.inquiries,
                        "last_inquiry": b.last_inquiry,
                        "coordinator_says": s,
                    })
                })
                .collect();
            ctx.print(
                json!({ "participant": endpoint, "total": r.total, "branches": rows }),
                || {
                    if rows.is_empty() {
                        return format!("nothing in doubt on the participant at {endpoint}");
                    }
                    table(
                        &[
                            "transaction",
                            "prepared for",
                            "epoch",
                            "asked",
                            "last answer",
                            "coordinator says",
                        ],
                        rows.iter()
                            .map(|b| {
                                vec![
                                    b["txn_id"].as_str().unwrap_or_default().into(),
                                    age(b["age_ms"].as_u64().unwrap_or(0)),
                                    b["epoch"].to_string(),
                                    b["inquiries"].to_string(),
                                    b["last_inquiry"].as_str().unwrap_or_default().into(),
                                    b["coordinator_says"].as_str().unwrap_or_default().into(),
                                ]
                            })
                            .collect(),
                    ) + &format!("\n{} prepared", r.total)
                },
            );
            r.total
        }
    };
    Ok(if fail_if_any && count > 0 {
        exit::IN_DOUBT
    } else {
        exit::OK
    })
}

pub async fn participants(ctx: &Ctx) -> CliResult<u8> {
    let mut admin = client::admin(&ctx.coordinator).await?;
    let list = admin
        .list_participants(v1::ListParticipantsRequest {})
        .await?
        .into_inner()
        .participants;
    let mut rows = Vec::new();
    for p in &list {
        let (health, in_doubt) = match tokio::time::timeout(
            Duration::from_secs(3),
            client::channel(&p.endpoint),
        )
        .await
        {
            Ok(Ok(channel)) => {
                let mut health =
                    tonic_health::pb::health_client::HealthClient::new(channel.clone());
                let status = match health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) => match r.into_inner().status() {
                        tonic_health::pb::health_check_response::ServingStatus::Serving => {
                            "serving".to_string()
                        }
                        other => format!("{other:?}").to_lowercase(),
                    },
                    Err(s) => format!("error: {}", s.message()),
                };
                let mut participant =
                    ratify_proto::v1::participant_client::ParticipantClient::new(channel);
                let in_doubt = participant
                    .list_in_doubt(v1::ListInDoubtRequest { limit: 1 })
                    .await
                    .map(|r| json!(r.into_inner().total))
                    .unwrap_or(json!(null));
                (status, in_doubt)
            }
            _ => ("unreachable".to_string(), json!(null)),
        };
        rows.push(json!({ "name": p.name, "endpoint": p.endpoint, "source": p.source, "health": health, "in_doubt": in_doubt }));
    }
    ctx.print(json!({ "participants": rows }), || {
        if rows.is_empty() {
            return "no participants registered".into();
        }
        table(
            &["name", "endpoint", "source", "health", "in doubt"],
            rows.iter()
                .map(|r| {
                    vec![
                        r["name"].as_str().unwrap_or_default().into(),
                        r["endpoint"].as_str().unwrap_or_default().into(),
                        r["source"].as_str().unwrap_or_default().into(),
                        r["health"].as_str().unwrap_or_default().into(),
                        r["in_doubt"].to_string(),
                    ]
                })
                .collect(),
        )
    });
    Ok(exit::OK)
}
