//! The tokio driver of the engine. One task owns the [`Engine`] and feeds it inputs; it
//! performs the actions that come out: RPCs (batched per participant), log appends,
//! timers and replies. Results come back to the same task as inputs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::participant_client::ParticipantClient;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::transport::Channel;
use tracing::{debug, error, info, warn};

use crate::engine::{
    Action, Durable, Engine, EngineConfig, Input, Millis, OnePhaseResult, Reply, ReqId, VoteResult,
};
use crate::log::{DecisionLog, LogError, LogRecord};
use crate::prepare_link::PrepareLink;
use crate::registry::Registry;

/// Settings of the driver.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub engine: EngineConfig,
    /// Deadline of one Prepare RPC.
    pub prepare_rpc_timeout: Duration,
    /// Deadline of one Commit/Abort/CommitOnePhase RPC.
    pub phase2_rpc_timeout: Duration,
    /// Most branches in one batched RPC to a participant.
    pub max_batch: usize,
    /// Batches in flight to one participant at once, per lane (prepares, which carry
    /// what decisions are queued, and decisions alone, whose batch is a Commit and an
    /// Abort RPC when it holds both), when some
    /// of them are stalled (see `stalled_rpc_after`). Normally only one is: the next
    /// batch gathers while it is on the wire.
    pub max_rpcs_in_flight: usize,
    /// How long a batched RPC may be outstanding before the next batch of the same
    /// kind goes out beside it instead of waiting for it.
    pub stalled_rpc_after: Duration,
    /// How long a decision for a participant waits for a Prepare to that participant to
    /// ride on before it goes out in a Commit or Abort of its own. Under load a Prepare
    /// is always about to leave, so phase two costs no RPC of its own; a lone client's
    /// next transaction follows its decision within a round trip. The cost: while no
    /// Prepare comes, a branch stays prepared (its locks held) this much longer.
    pub decision_linger: Duration,
    /// Opens the channels to participants.
    pub dialer: ratify_proto::dial::Dialer,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            prepare_rpc_timeout: Duration::from_secs(5),
            phase2_rpc_timeout: Duration::from_secs(5),
            max_batch: 256,
            max_rpcs_in_flight: 4,
            stalled_rpc_after: Duration::from_millis(20),
            decision_linger: Duration::from_millis(1),
            dialer: ratify_proto::dial::Dialer::tcp(),
        }
    }
}

type Query = Box<dyn FnOnce(&Engine) + Send>;

enum Command {
    Request(Input, ReqId, oneshot::Sender<Reply>),
    Event(Input),
    /// Several events at once: the votes or acknowledgements of one batched RPC, the
    /// records of one forced append.
    Events(Vec<Input>),
    Query(Query),
}

/// The clock the engine sees: monotonic, aligned with Unix time at start.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// tokio's clock (the same as std's, except under a simulation's paused clock).
    start: tokio::time::Instant,
    start_unix_ms: u64,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            start_unix_ms: unix_ms(),
        }
    }

    fn now(&self) -> Millis {
        self.start_unix_ms + self.start.elapsed().as_millis() as u64
    }

    fn instant(&self, at: Millis) -> tokio::time::Instant {
        let offset = at.saturating_sub(self.start_unix_ms);
        self.start + Duration::from_millis(offset)
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counters of the driver (for the Admin GetStats RPC and `ratify bench`).
#[derive(Debug, Default)]
pub struct Counters {
    /// RPCs sent to participants (a batched RPC counts once) and the branches they carried.
    pub participant_rpcs: AtomicU64,
    pub participant_branches: AtomicU64,
    pub committed: AtomicU64,
    pub aborted: AtomicU64,
}

/// A cheap handle to the running coordinator.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    next_req: Arc<AtomicU64>,
    pub registry: Arc<Registry>,
    epoch: u64,
    pub counters: Arc<Counters>,
    log_stats: Arc<dyn Fn() -> crate::log::LogStats + Send + Sync>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Handle {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn log_stats(&self) -> crate::log::LogStats {
        (self.log_stats)()
    }

    /// Sends a client request and waits for its reply.
    pub async fn request(&self, make: impl FnOnce(ReqId) -> Input) -> Option<Reply> {
        let req = ReqId(self.next_req.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(make(req), req, tx))
            .ok()?;
        rx.await.ok()
    }

    /// Runs a read-only query against the engine.
    pub async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Query(Box::new(move |engine| {
                let _ = tx.send(f(engine));
            })))
            .ok()?;
        rx.await.ok()
    }
}

struct PrepareItem {
    txn: TxnId,
    epoch: u64,
    incarnation: u64,
    payload: Bytes,
}

struct DecisionItem {
    txn: TxnId,
    epoch: u64,
    commit: bool,
}

/// Decisions waiting to go to one participant: taken by the next Prepare to it, or
/// after `decision_linger` by the decision lane. Urgent ones are the lane's alone, at once.
#[derive(Default)]
struct DecisionQueue {
    items: std::sync::Mutex<QueuedDecisions>,
    /// Rung when the queue goes from empty to not empty, and when a take leaves some.
    ready: tokio::sync::Notify,
    /// Rung when an urgent decision comes, so the lane stops lingering.
    hurry: tokio::sync::Notify,
    /// Rung when a Prepare took everything, so the lane stops lingering.
    emptied: tokio::sync::Notify,
    /// Set when the participant's `Outbound` is replaced (it moved to a new endpoint):
    /// the lane sends what is left and ends.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct QueuedDecisions {
    riding: std::collections::VecDeque<DecisionItem>,
    urgent: std::collections::VecDeque<DecisionItem>,
}

impl QueuedDecisions {
    fn is_empty(&self) -> bool {
        self.riding.is_empty() && self.urgent.is_empty()
    }
}

impl DecisionQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueuedDecisions> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, item: DecisionItem, urgent: bool) {
        let mut items = self.lock();
        let was_empty = items.is_empty();
        if urgent {
            items.urgent.push_back(item);
        } else {
            items.riding.push_back(item);
        }
        if was_empty {
            // The lane wakes, sees the urgent one (if this is) and does not linger.
            self.ready.notify_one();
        } else if urgent {
            // The lane may be lingering for what is queued already.
            self.hurry.notify_one();
        }
    }

    /// For a Prepare that is leaving: up to `max` of the oldest decisions that may ride.
    fn take_riding(&self, max: usize) -> Vec<DecisionItem> {
        let mut items = self.lock();
        let n = items.riding.len().min(max);
        let taken: Vec<DecisionItem> = items.riding.drain(..n).collect();
        if items.is_empty() {
            self.emptied.notify_waiters();
        } else {
            self.ready.notify_one();
        }
        taken
    }

    /// For the lane: up to `max` decisions, urgent ones first.
    fn take_any(&self, max: usize) -> Vec<DecisionItem> {
        let mut items = self.lock();
        let urgent = items.urgent.len().min(max);
        let mut taken: Vec<DecisionItem> = items.urgent.drain(..urgent).collect();
        let riding = items.riding.len().min(max - taken.len());
        taken.extend(items.riding.drain(..riding));
        if !items.is_empty() {
            self.ready.notify_one();
        }
        taken
    }

    fn has_urgent(&self) -> bool {
        !self.lock().urgent.is_empty()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Batching senders to one participant (at one endpoint).
struct Outbound {
    endpoint: String,
    channel: Option<Channel>,
    prepare: mpsc::UnboundedSender<PrepareItem>,
    decisions: Arc<DecisionQueue>,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // The prepare lane ends by itself once its sender is gone; the decision lane is
        // told, so that it sends what is still queued (every decision taken gets an
        // acknowledgement or an error, which the engine retries) and ends.
        self.decisions.close();
    }
}

struct Driver<L> {
    engine: Engine,
    log: Arc<L>,
    clock: Clock,
    config: RuntimeConfig,
    pending: HashMap<ReqId, oneshot::Sender<Reply>>,
    outbound: HashMap<String, Outbound>,
    events: mpsc::UnboundedSender<Command>,
    registry: Arc<Registry>,
    counters: Arc<Counters>,
    /// Armed timers by (deadline, arming order).
    timers: std::collections::BTreeMap<(Millis, u64), (TxnId, crate::engine::Timer)>,
    timer_seq: u64,
    /// Records to force, gathered while the driver works through what is queued and
    /// appended together when it is done (one append per pass).
    to_force: Vec<(LogRecord, Durable)>,
    /// Appends on their way to disk, each with what to tell the engine once it is
    /// durable. The driver polls them itself: the log's answer wakes the driver directly,
    /// with no task in between.
    appends: FuturesUnordered<PendingAppend>,
}

/// An append under way and the transactions whose records it carries.
type PendingAppend = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Result<(), LogError>, Vec<(TxnId, Durable)>)> + Send>,
>;

/// Replays the log, recovers unfinished transactions, and starts the driver task.
/// Nothing is served before this returns, so GetOutcome never answers from a partial
/// replay.
pub async fn start<L: DecisionLog>(
    log: Arc<L>,
    registry: Arc<Registry>,
    config: RuntimeConfig,
) -> Handle {
    let clock = Clock::new();
    let epoch = log.epoch();
    let records = log.take_recovered();
    for record in &records {
        if let LogRecord::Decision { participants, .. } = record {
            for p in participants {
                registry.learn(&p.name, &p.endpoint);
            }
        }
    }
    let started = Instant::now();
    let replayed = records.len();
    let mut engine = Engine::new(config.engine.clone(), epoch);
    let actions = engine.recover(clock.now(), records);
    let (commands, receiver) = mpsc::unbounded_channel();
    let mut driver = Driver {
        engine,
        log,
        clock,
        config,
        pending: HashMap::new(),
        outbound: HashMap::new(),
        events: commands.clone(),
        registry: registry.clone(),
        counters: Arc::new(Counters::default()),
        timers: std::collections::BTreeMap::new(),
        timer_seq: 0,
        to_force: Vec::new(),
        appends: FuturesUnordered::new(),
    };
    let counters = driver.counters.clone();
    let stats_log = driver.log.clone();
    crash_point!("coordinator::recovery");
    driver.perform(actions);
    driver.force_gathered();
    info!(
        epoch,
        replayed,
        recovered = driver.engine.in_flight(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovery done"
    );
    tokio::spawn(driver.run(receiver));
    Handle {
        commands,
        next_req: Arc::new(AtomicU64::new(1)),
        registry,
        epoch,
        counters,
        log_stats: Arc::new(move || stats_log.stats()),
    }
}

impl<L: DecisionLog> Driver<L> {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Command>) {
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            let next_timer = self
                .timers
                .keys()
                .next()
                .map(|(at, _)| self.clock.instant(*at));
            let timer = async move {
                match next_timer {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = timer => self.fire_due_timers(),
                command = receiver.recv() => {
                    let Some(command) = command else { return };
                    self.command(command);
                    // Drain what is already queued before yielding (fewer wake-ups).
                    for _ in 0..1024 {
                        match receiver.try_recv() {
                            Ok(command) => self.command(command),
                            Err(_) => break,
                        }
                    }
                }
                Some((result, done)) = self.appends.next(), if !self.appends.is_empty() => {
                    self.durable(result, done);
                }
                _ = gauges.tick() => self.report_gauges(),
            }
            self.force_gathered();
        }
    }

    /// Appends the records gathered by [`Self::perform`] as one forced append. Each
    /// transaction's Durable input goes back to the engine only once the append returned,
    /// that is once its record is fsynced (or Raft-committed): a COMMIT decision is
    /// answered to the client, and sent to participants, only after that.
    fn force_gathered(&mut self) {
        if self.to_force.is_empty() {
            return;
        }
        let (records, done): (Vec<LogRecord>, Vec<(TxnId, Durable)>) = self
            .to_force
            .drain(..)
            .map(|(record, what)| {
                let txn = record.txn();
                (record, (txn, what))
            })
            .unzip();
        let append = self.log.append(records);
        self.appends
            .push(Box::pin(async move { (append.await, done) }));
    }

    /// An append returned: its records are durable (fsynced, or Raft-committed), so the
    /// engine may now act on them. A failed append stops the process: a restart recovers
    /// from what is durable.
    fn durable(&mut self, result: Result<(), LogError>, done: Vec<(TxnId, Durable)>) {
        if let Err(e) = result {
            fatal(&e.to_string());
        }
        for (txn, what) in done {
            if what == Durable::CommitDecision {
                crash_point!("coordinator::decision_durable");
            }
            self.event(Input::Durable { txn, what });
        }
    }

    /// Feeds every timer that is due. One ordered map instead of a task per timer: a
    /// transaction arms two (lifetime, prepare deadline), most of which fire long after it
    /// finished and are then ignored by the engine.
    fn fire_due_timers(&mut self) {
        let now = self.clock.now();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (txn, timer) = entry.remove();
            self.feed(Input::Timer { txn, timer });
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Request(input, req, reply) => {
                self.pending.insert(req, reply);
                self.feed(input);
            }
            Command::Event(input) => self.event(input),
            Command::Events(inputs) => {
                for input in inputs {
                    self.event(input);
                }
            }
            Command::Query(query) => query(&self.engine),
        }
    }

    fn event(&mut self, input: Input) {
        if let Input::Ack { result: Ok(()), .. } = &input {
            // Crash point: phase 2 reached one participant (C6).
            crash_point!("coordinator::phase2_acknowledged");
        }
        self.feed(input)
    }

    fn feed(&mut self, input: Input) {
        let actions = self.engine.handle(self.clock.now(), input);
        self.perform(actions);
    }

    fn report_gauges(&self) {
        let now = self.clock.now();
        let mut in_doubt = 0u64;
        let mut oldest = 0u64;
        for t in self.engine.txns() {
            if t.in_doubt() {
                in_doubt += 1;
                oldest = oldest.max(now.saturating_sub(t.started_at));
            }
        }
        metrics::gauge!("ratify_in_doubt").set(in_doubt as f64);
        metrics::gauge!("ratify_oldest_in_doubt_seconds").set(oldest as f64 / 1000.0);
        metrics::gauge!("ratify_in_flight").set(self.engine.in_flight() as f64);
        let stats = self.log.stats();
        metrics::gauge!("ratify_wal_fsyncs").set(stats.fsyncs as f64);
        metrics::gauge!("ratify_wal_batches").set(stats.batches as f64);
        metrics::gauge!("ratify_wal_records").set(stats.records as f64);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendPrepare {
                    txn,
                    participant,
                    endpoint,
                    epoch,
                    incarnation,
                    payload,
                } => {
                    let out = self.outbound(&participant, &endpoint);
                    let _ = out.prepare.send(PrepareItem {
                        txn,
                        epoch,
                        incarnation,
                        payload,
                    });
                }
                Action::SendCommit {
                    txn,
                    participant,
                    endpoint,
                    epoch,
                    urgent,
                } => {
                    let out = self.outbound(&participant, &endpoint);
                    let item = DecisionItem {
                        txn,
                        epoch,
                        commit: true,
                    };
                    out.decisions.push(item, urgent);
                }
                Action::SendAbort {
                    txn,
                    participant,
                    endpoint,
                    epoch,
                    urgent,
                } => {
                    let out = self.outbound(&participant, &endpoint);
                    let item = DecisionItem {
                        txn,
                        epoch,
                        commit: false,
                    };
                    out.decisions.push(item, urgent);
                }
                Action::SendCommitOnePhase {
                    txn,
                    participant,
                    endpoint,
                    epoch,
                    incarnation,
                    payload,
                } => {
                    let channel = self.outbound(&participant, &endpoint).channel.clone();
                    let events = self.events.clone();
                    self.counters
                        .participant_rpcs
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .participant_branches
                        .fetch_add(1, Ordering::Relaxed);
                    let timeout = self.config.phase2_rpc_timeout;
                    tokio::spawn(async move {
                        let result = match channel {
                            None => OnePhaseResult::Failed {
                                error: format!("invalid endpoint {endpoint}"),
                            },
                            Some(channel) => {
                                let request = v1::CommitOnePhaseRequest {
                                    txn_id: txn.to_vec().into(),
                                    epoch,
                                    payload,
                                    incarnation,
                                };
                                let mut client = ParticipantClient::new(channel);
                                match tokio::time::timeout(
                                    timeout,
                                    client.commit_one_phase(request),
                                )
                                .await
                                {
                                    Ok(Ok(r)) => {
                                        let r = r.into_inner();
                                        if r.committed {
                                            OnePhaseResult::Committed
                                        } else {
                                            OnePhaseResult::Aborted { reason: r.reason }
                                        }
                                    }
                                    // A refusal is the participant's answer: it did not commit.
                                    Ok(Err(status)) if refused_for_good(&status) => {
                                        OnePhaseResult::Aborted {
                                            reason: format!(
                                                "{}: {}",
                                                status.code(),
                                                status.message()
                                            ),
                                        }
                                    }
                                    Ok(Err(status)) => OnePhaseResult::Failed {
                                        error: format!("{}: {}", status.code(), status.message()),
                                    },
                                    Err(_) => OnePhaseResult::Failed {
                                        error: "CommitOnePhase timed out".into(),
                                    },
                                }
                            }
                        };
                        let _ = events.send(Command::Event(Input::OnePhase {
                            txn,
                            participant,
                            result,
                        }));
                    });
                }
                Action::Append {
                    record,
                    force: None,
                } => {
                    if let LogRecord::End { .. } = record {
                        // Crash point: every participant acknowledged, END not written (C7).
                        crash_point!("coordinator::before_end");
                    }
                    if let Err(e) = self.log.append_unforced(vec![record]) {
                        fatal(&e.to_string());
                    }
                }
                Action::Append {
                    record,
                    force: Some(what),
                } => {
                    if what == Durable::CommitDecision {
                        // Crash point: every vote is YES, the decision not yet logged (C3).
                        crash_point!("coordinator::decision_reached");
                    }
                    self.to_force.push((record, what));
                }
                Action::Reply { req, reply } => {
                    if let Some(tx) = self.pending.remove(&req) {
                        let _ = tx.send(reply);
                    }
                }
                Action::ArmTimer { txn, timer, at } => {
                    self.timer_seq += 1;
                    self.timers.insert((at, self.timer_seq), (txn, timer));
                }
                Action::Finished {
                    txn,
                    outcome,
                    started_at,
                } => {
                    let label = match outcome {
                        crate::engine::Outcome::Committed => {
                            self.counters.committed.fetch_add(1, Ordering::Relaxed);
                            "committed"
                        }
                        _ => {
                            self.counters.aborted.fetch_add(1, Ordering::Relaxed);
                            "aborted"
                        }
                    };
                    metrics::counter!("ratify_decisions_total", "outcome" => label).increment(1);
                    let seconds = self.clock.now().saturating_sub(started_at) as f64 / 1000.0;
                    metrics::histogram!("ratify_txn_seconds", "outcome" => label).record(seconds);
                    debug!(%txn, outcome = label, "transaction finished");
                }
            }
        }
    }

    fn outbound(&mut self, participant: &str, endpoint: &str) -> &Outbound {
        // The registry has the latest address (a participant that restarted elsewhere
        // registers again); the one captured at enlistment is the fallback.
        let current = self.registry.endpoint(participant);
        let endpoint = current.as_deref().unwrap_or(endpoint);
        let stale = self
            .outbound
            .get(participant)
            .is_some_and(|o| o.endpoint != endpoint);
        if stale || !self.outbound.contains_key(participant) {
            let out = spawn_outbound(
                participant.to_string(),
                endpoint.to_string(),
                self.events.clone(),
                &self.config,
                self.counters.clone(),
            );
            self.outbound.insert(participant.to_string(), out);
        }
        &self.outbound[participant]
    }
}

/// A refusal the participant will repeat however often it is asked.
fn refused_for_good(status: &tonic::Status) -> bool {
    is_refusal(status.code())
}

fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::ResourceExhausted
    )
}

fn fatal(message: &str) -> ! {
    // The log can no longer promise durability. Stopping is the only safe move: a restart
    // replays what is durable and presumed abort covers the rest.
    error!(%message, "fatal decision-log failure; stopping");
    eprintln!("ratify-coordinator: fatal: {message}");
    std::process::exit(70)
}

fn spawn_outbound(
    participant: String,
    endpoint: String,
    events: mpsc::UnboundedSender<Command>,
    config: &RuntimeConfig,
    counters: Arc<Counters>,
) -> Outbound {
    let channel = config.dialer.dial(&endpoint);
    if channel.is_none() {
        warn!(%participant, %endpoint, "invalid participant endpoint; its messages fail");
    }
    let (prepare, prepare_rx) = mpsc::unbounded_channel::<PrepareItem>();
    let decisions = Arc::new(DecisionQueue::default());
    // Cleared when the participant answers a Prepare without a word on the decisions it
    // carried (a participant built before Prepare carried them): from then on its
    // decisions go alone, and those it ignored are sent again by the engine's retry.
    let decisions_ride = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let max_batch = config.max_batch;
    let pacing = Pacing {
        max_in_flight: config.max_rpcs_in_flight,
        stalled_after: config.stalled_rpc_after,
    };

    {
        let link = channel
            .clone()
            .map(|channel| Arc::new(PrepareLink::new(participant.clone(), channel)));
        let (events, participant) = (events.clone(), participant.clone());
        let (decisions, counters_here) = (decisions.clone(), counters.clone());
        let decisions_ride = decisions_ride.clone();
        let timeout = config.prepare_rpc_timeout;
        tokio::spawn(batch_loop(
            counters.clone(),
            prepare_rx,
            max_batch,
            pacing,
            move |batch: Vec<PrepareItem>| {
                let (link, events, participant) =
                    (link.clone(), events.clone(), participant.clone());
                // Phase two of earlier transactions rides along: no RPC of its own.
                let carried = if decisions_ride.load(Ordering::Relaxed) {
                    decisions.take_riding(max_batch)
                } else {
                    Vec::new()
                };
                let (commits, aborts): (Vec<DecisionItem>, Vec<DecisionItem>) =
                    carried.into_iter().partition(|d| d.commit);
                let decisions_ride = decisions_ride.clone();
                counters_here
                    .participant_branches
                    .fetch_add((commits.len() + aborts.len()) as u64, Ordering::Relaxed);
                async move {
                    let txns: Vec<TxnId> = batch.iter().map(|i| i.txn).collect();
                    let request = v1::PrepareRequest {
                        branches: batch
                            .into_iter()
                            .map(|i| v1::PrepareBranch {
                                txn_id: i.txn.to_vec().into(),
                                epoch: i.epoch,
                                payload: i.payload,
                                incarnation: i.incarnation,
                            })
                            .collect(),
                        commits: decision_branches(&commits),
                        aborts: decision_branches(&aborts),
                    };
                    let answer = match link {
                        None => Err("invalid endpoint".to_string()),
                        Some(link) => {
                            match tokio::time::timeout(timeout, link.prepare(request)).await {
                                Ok(Ok(r)) => Ok(r),
                                Ok(Err(status)) => {
                                    Err(format!("{}: {}", status.code(), status.message()))
                                }
                                Err(_) => Err("Prepare timed out".to_string()),
                            }
                        }
                    };
                    let answer = answer.as_ref().map_err(String::as_str);
                    if let Ok(r) = answer
                        && !(commits.is_empty() && aborts.is_empty())
                        && r.commit_results.is_empty()
                        && r.abort_results.is_empty()
                        && decisions_ride.swap(false, Ordering::Relaxed)
                    {
                        warn!(
                            %participant,
                            "the participant ignores decisions carried by Prepare; \
                             sending them in Commit and Abort RPCs of their own"
                        );
                    }
                    let mut inputs = ack_inputs(
                        &participant,
                        &commits,
                        answer.map(|r| r.commit_results.as_slice()),
                    );
                    inputs.extend(ack_inputs(
                        &participant,
                        &aborts,
                        answer.map(|r| r.abort_results.as_slice()),
                    ));
                    inputs.extend(vote_inputs(
                        &participant,
                        txns,
                        answer.map(|r| r.results.as_slice()),
                    ));
                    let _ = events.send(Command::Events(inputs));
                }
            },
        ));
    }
    {
        let (channel, events, participant) = (channel.clone(), events.clone(), participant.clone());
        let timeout = config.phase2_rpc_timeout;
        tokio::spawn(decision_lane(
            counters,
            decisions.clone(),
            config.decision_linger,
            max_batch,
            pacing,
            move |batch: Vec<DecisionItem>| {
                let (channel, events, participant) =
                    (channel.clone(), events.clone(), participant.clone());
                async move {
                    let (commits, aborts): (Vec<DecisionItem>, Vec<DecisionItem>) =
                        batch.into_iter().partition(|d| d.commit);
                    let (commit_answer, abort_answer) = tokio::join!(
                        send_decisions(channel.clone(), timeout, &commits, true),
                        send_decisions(channel, timeout, &aborts, false),
                    );
                    let mut inputs = ack_inputs(
                        &participant,
                        &commits,
                        commit_answer.as_deref().map_err(String::as_str),
                    );
                    inputs.extend(ack_inputs(
                        &participant,
                        &aborts,
                        abort_answer.as_deref().map_err(String::as_str),
                    ));
                    let _ = events.send(Command::Events(inputs));
                }
            },
        ));
    }
    Outbound {
        endpoint,
        channel,
        prepare,
        decisions,
    }
}

fn decision_branches(items: &[DecisionItem]) -> Vec<v1::DecisionBranch> {
    items
        .iter()
        .map(|i| v1::DecisionBranch {
            txn_id: i.txn.to_vec().into(),
            epoch: i.epoch,
        })
        .collect()
}

/// Sends one Commit (or Abort) RPC with `items`; none when there are none.
async fn send_decisions(
    channel: Option<Channel>,
    timeout: Duration,
    items: &[DecisionItem],
    commit: bool,
) -> Result<Vec<v1::AckResult>, String> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let branches = decision_branches(items);
    let Some(channel) = channel else {
        return Err("invalid endpoint".to_string());
    };
    let mut client = ParticipantClient::new(channel);
    let call = async {
        if commit {
            client
                .commit(v1::CommitRequest { branches })
                .await
                .map(|r| r.into_inner().results)
        } else {
            client
                .abort(v1::AbortRequest { branches })
                .await
                .map(|r| r.into_inner().results)
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(results)) => Ok(results),
        Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
        Err(_) => Err(format!(
            "{} timed out",
            if commit { "Commit" } else { "Abort" }
        )),
    }
}

/// The engine's inputs for the votes of one Prepare RPC: one per branch sent, whatever
/// the participant answered (a branch its answer leaves out failed).
fn vote_inputs(
    participant: &str,
    txns: Vec<TxnId>,
    answer: Result<&[v1::PrepareResult], &str>,
) -> Vec<Input> {
    let mut votes: HashMap<TxnId, VoteResult> = HashMap::new();
    if let Ok(results) = answer {
        for r in results {
            let Ok(txn) = TxnId::try_from(&r.txn_id) else {
                continue;
            };
            let vote = match (v1::Vote::try_from(r.vote), &r.error) {
                // A refusal the participant made before touching its store is a NO; any
                // other error leaves the branch's state unknown (it may have prepared),
                // so it still gets an Abort.
                (_, Some(e)) if is_refusal(tonic::Code::from_i32(e.code)) => VoteResult::No {
                    reason: format!("refused ({}): {}", tonic::Code::from_i32(e.code), e.message),
                },
                (_, Some(e)) => VoteResult::Failed {
                    error: format!("{}: {}", tonic::Code::from_i32(e.code), e.message),
                },
                (Ok(v1::Vote::Yes), None) => VoteResult::Yes,
                (Ok(v1::Vote::ReadOnly), None) => VoteResult::ReadOnly,
                (Ok(v1::Vote::No), None) => VoteResult::No {
                    reason: r.reason.clone(),
                },
                _ => VoteResult::Failed {
                    error: format!("unknown vote {}", r.vote),
                },
            };
            votes.insert(txn, vote);
        }
    }
    let mut inputs = Vec::with_capacity(txns.len());
    for txn in txns {
        let vote = votes.remove(&txn).unwrap_or_else(|| VoteResult::Failed {
            error: match answer {
                Err(e) => e.to_string(),
                Ok(_) => "the participant's answer left this branch out".into(),
            },
        });
        // Crash point: a vote is in, maybe not all of them (C2/C3).
        crash_point!("coordinator::vote_received");
        inputs.push(Input::Vote {
            txn,
            participant: participant.to_string(),
            vote,
        });
    }
    inputs
}

/// The engine's inputs for the acknowledgements of decisions sent in one RPC: one per
/// decision sent; one the answer leaves out failed, and the engine sends it again.
fn ack_inputs(
    participant: &str,
    items: &[DecisionItem],
    answer: Result<&[v1::AckResult], &str>,
) -> Vec<Input> {
    let mut acks: HashMap<TxnId, Result<(), String>> = HashMap::new();
    if let Ok(results) = answer {
        for r in results {
            let Ok(txn) = TxnId::try_from(&r.txn_id) else {
                continue;
            };
            acks.insert(
                txn,
                match &r.error {
                    None => Ok(()),
                    Some(e) => Err(format!("{}: {}", tonic::Code::from_i32(e.code), e.message)),
                },
            );
        }
    }
    items
        .iter()
        .map(|item| Input::Ack {
            txn: item.txn,
            participant: participant.to_string(),
            result: acks.remove(&item.txn).unwrap_or_else(|| {
                Err(match answer {
                    Err(e) => e.to_string(),
                    Ok(_) => "the participant's answer left this branch out".into(),
                })
            }),
        })
        .collect()
}

/// How [`batch_loop`] paces its RPCs.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    /// RPCs outstanding at once, at most (reached only while some are stalled).
    max_in_flight: usize,
    /// An RPC outstanding this long no longer holds the next batch back.
    stalled_after: Duration,
}

/// The two semaphores of one paced lane: RPCs in flight, and the turn of the RPC that
/// holds the next batch back.
struct Lane {
    in_flight: Arc<Semaphore>,
    next_turn: Arc<Semaphore>,
    pacing: Pacing,
}

impl Lane {
    fn new(pacing: Pacing) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(pacing.max_in_flight.max(1))),
            next_turn: Arc::new(Semaphore::new(1)),
            pacing,
        }
    }

    /// Waits until the lane may send its next RPC; `None` once it is closed.
    async fn ready(&self) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let slot = self.in_flight.clone().acquire_owned().await.ok()?;
        let turn = self.next_turn.clone().acquire_owned().await.ok()?;
        Some((slot, turn))
    }

    /// Runs `rpc` on a task of its own, holding the next batch back until it is answered
    /// or stalled.
    fn dispatch(
        &self,
        rpc: impl std::future::Future<Output = ()> + Send + 'static,
        (slot, turn): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let stalled_after = self.pacing.stalled_after;
        tokio::spawn(async move {
            let mut rpc = std::pin::pin!(rpc);
            tokio::select! {
                // Biased, so a reply and the stall timer ready on the same tick always
                // resolve the same way (the simulation replays seeds exactly).
                biased;
                () = &mut rpc => {}
                () = tokio::time::sleep(stalled_after) => {
                    drop(turn);
                    rpc.await;
                }
            }
            drop(slot);
        });
    }
}

/// Sends whatever has queued up as one RPC. One RPC is outstanding at a time: while it
/// is on the wire the next batch gathers (group commit on the wire), so under load each
/// RPC carries many branches and the cost per branch falls (measured with `ratify bench`:
/// a fifth less CPU per transaction at 16 to 256 clients than with 4 RPCs always in
/// flight). An RPC outstanding past `stalled_after` (a participant slow to answer, a
/// PostgreSQL prepare waiting on a row lock) stops holding the next batch back, up to
/// `max_in_flight` RPCs, so one slow batch does not stall every branch behind it.
async fn batch_loop<T, F, Fut>(
    counters: Arc<Counters>,
    mut receiver: mpsc::UnboundedReceiver<T>,
    max_batch: usize,
    pacing: Pacing,
    send: F,
) where
    T: Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let lane = Lane::new(pacing);
    while let Some(first) = receiver.recv().await {
        let Some(permits) = lane.ready().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        counters.participant_rpcs.fetch_add(1, Ordering::Relaxed);
        counters
            .participant_branches
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        lane.dispatch(send(batch), permits);
    }
}

/// Sends the decisions no Prepare took within `linger` of being queued, paced like
/// [`batch_loop`]: one Commit and one Abort RPC (each only if it has entries) per batch.
/// Once the queue is closed it sends what is left (after the linger under way, if any)
/// and ends.
async fn decision_lane<F, Fut>(
    counters: Arc<Counters>,
    queue: Arc<DecisionQueue>,
    linger: Duration,
    max_batch: usize,
    pacing: Pacing,
    send: F,
) where
    F: Fn(Vec<DecisionItem>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let lane = Lane::new(pacing);
    loop {
        if queue.is_closed() {
            if queue.lock().is_empty() {
                return;
            }
        } else {
            queue.ready.notified().await;
            if !linger.is_zero() && !queue.is_closed() && !queue.has_urgent() {
                let emptied = queue.emptied.notified();
                tokio::select! {
                    biased;
                    () = emptied => continue,
                    () = queue.hurry.notified() => {}
                    () = tokio::time::sleep(linger) => {}
                }
            }
        }
        let Some(permits) = lane.ready().await else {
            return;
        };
        let batch = queue.take_any(max_batch);
        if batch.is_empty() {
            continue;
        }
        let kinds =
            u64::from(batch.iter().any(|d| d.commit)) + u64::from(batch.iter().any(|d| !d.commit));
        counters
            .participant_rpcs
            .fetch_add(kinds, Ordering::Relaxed);
        counters
            .participant_branches
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        lane.dispatch(send(batch), permits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `batch_loop` whose RPCs record their batch and stay outstanding until the test
    /// answers them (one permit of `answers` answers the oldest waiting RPC).
    struct Harness {
        items: mpsc::UnboundedSender<u32>,
        sent: Arc<std::sync::Mutex<Vec<Vec<u32>>>>,
        answers: Arc<Semaphore>,
    }

    impl Harness {
        fn start(max_in_flight: usize) -> Self {
            let (items, receiver) = mpsc::unbounded_channel();
            let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
            let answers = Arc::new(Semaphore::new(0));
            let (log, gate) = (sent.clone(), answers.clone());
            tokio::spawn(batch_loop(
                Arc::new(Counters::default()),
                receiver,
                256,
                Pacing {
                    max_in_flight,
                    stalled_after: Duration::from_millis(20),
                },
                move |batch: Vec<u32>| {
                    let (log, gate) = (log.clone(), gate.clone());
                    async move {
                        log.lock().unwrap().push(batch);
                        gate.acquire().await.unwrap().forget();
                    }
                },
            ));
            Self {
                items,
                sent,
                answers,
            }
        }

        fn sent(&self) -> Vec<Vec<u32>> {
            self.sent.lock().unwrap().clone()
        }
    }

    /// Lets every spawned task run as far as it can; the clock is paused, so sleeping
    /// moves it only as far as asked.
    async fn settle(for_: Duration) {
        tokio::time::sleep(for_).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_rpc_is_outstanding_while_the_next_batch_gathers() {
        let h = Harness::start(4);
        h.items.send(1).unwrap();
        settle(Duration::from_millis(1)).await;
        assert_eq!(h.sent(), vec![vec![1]]);
        for item in [2, 3, 4] {
            h.items.send(item).unwrap();
        }
        settle(Duration::from_millis(5)).await;
        assert_eq!(
            h.sent(),
            vec![vec![1]],
            "the second batch waits for the first"
        );
        h.answers.add_permits(1);
        settle(Duration::from_millis(1)).await;
        assert_eq!(h.sent(), vec![vec![1], vec![2, 3, 4]]);
    }

    /// The batches a lane sent, each as its transactions.
    type SentBatches = Arc<std::sync::Mutex<Vec<Vec<TxnId>>>>;

    /// A `decision_lane` over a queue, recording the batches it sends (answered at once).
    fn decision_lane_harness(linger: Duration) -> (Arc<DecisionQueue>, SentBatches) {
        let queue = Arc::new(DecisionQueue::default());
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = sent.clone();
        tokio::spawn(decision_lane(
            Arc::new(Counters::default()),
            queue.clone(),
            linger,
            256,
            Pacing {
                max_in_flight: 4,
                stalled_after: Duration::from_millis(20),
            },
            move |batch: Vec<DecisionItem>| {
                log.lock()
                    .unwrap()
                    .push(batch.iter().map(|d| d.txn).collect());
                async {}
            },
        ));
        (queue, sent)
    }

    fn decision(txn: TxnId) -> DecisionItem {
        DecisionItem {
            txn,
            epoch: 1,
            commit: true,
        }
    }

    // Timers tick in whole milliseconds, hence a 10 ms linger in these tests.

    #[tokio::test(start_paused = true)]
    async fn a_decision_no_prepare_takes_goes_alone_once_the_linger_is_over() {
        let (queue, sent) = decision_lane_harness(Duration::from_millis(10));
        let (a, b) = (TxnId::generate(), TxnId::generate());
        queue.push(decision(a), false);
        settle(Duration::from_millis(5)).await;
        queue.push(decision(b), false);
        assert!(sent.lock().unwrap().is_empty(), "still lingering");
        settle(Duration::from_millis(7)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![a, b]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_decision_a_prepare_takes_is_not_sent_again_alone() {
        let (queue, sent) = decision_lane_harness(Duration::from_millis(10));
        let a = TxnId::generate();
        queue.push(decision(a), false);
        settle(Duration::from_millis(3)).await;
        // What the prepare lane does when a Prepare leaves.
        let carried: Vec<TxnId> = queue.take_riding(256).iter().map(|d| d.txn).collect();
        assert_eq!(carried, vec![a]);
        // The lane stops lingering for `a`, so the next decision lingers in full rather
        // than leaving when `a`'s linger would have ended.
        settle(Duration::from_millis(2)).await;
        let b = TxnId::generate();
        queue.push(decision(b), false);
        settle(Duration::from_millis(7)).await;
        assert!(
            sent.lock().unwrap().is_empty(),
            "{:?}",
            sent.lock().unwrap()
        );
        settle(Duration::from_millis(5)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![b]], "`a` never goes alone");
    }

    #[tokio::test(start_paused = true)]
    async fn an_urgent_decision_goes_at_once_and_never_rides() {
        let (queue, sent) = decision_lane_harness(Duration::from_millis(10));
        let (a, u, v) = (TxnId::generate(), TxnId::generate(), TxnId::generate());
        queue.push(decision(a), false);
        settle(Duration::from_millis(2)).await;
        // A retry comes while `a` lingers: both leave at once, the urgent one first.
        queue.push(decision(u), true);
        settle(Duration::from_millis(1)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![u, a]]);
        // A Prepare leaving takes none of the urgent ones.
        queue.push(decision(v), true);
        assert!(queue.take_riding(256).is_empty());
        settle(Duration::from_millis(1)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![u, a], vec![v]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_lane_sends_what_is_left_and_ends() {
        let (queue, sent) = decision_lane_harness(Duration::from_millis(10));
        let (a, b) = (TxnId::generate(), TxnId::generate());
        queue.push(decision(a), false);
        queue.push(decision(b), false);
        settle(Duration::from_millis(1)).await;
        queue.close();
        settle(Duration::from_millis(12)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![a, b]]);
        assert_eq!(
            Arc::strong_count(&queue),
            1,
            "the lane ended and let go of the queue"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_linger_a_decision_goes_at_once() {
        let (queue, sent) = decision_lane_harness(Duration::ZERO);
        let a = TxnId::generate();
        queue.push(decision(a), false);
        settle(Duration::from_micros(1)).await;
        assert_eq!(*sent.lock().unwrap(), vec![vec![a]]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_rpc_stops_holding_the_next_batch_back_up_to_the_cap() {
        let h = Harness::start(2);
        h.items.send(1).unwrap();
        settle(Duration::from_millis(1)).await;
        h.items.send(2).unwrap();
        settle(Duration::from_millis(15)).await;
        assert_eq!(h.sent(), vec![vec![1]], "not yet stalled");
        settle(Duration::from_millis(10)).await;
        assert_eq!(h.sent(), vec![vec![1], vec![2]], "the first is stalled");
        h.items.send(3).unwrap();
        settle(Duration::from_millis(100)).await;
        assert_eq!(h.sent().len(), 2, "two stalled RPCs fill the cap of two");
        h.answers.add_permits(1);
        settle(Duration::from_millis(1)).await;
        assert_eq!(h.sent(), vec![vec![1], vec![2], vec![3]]);
    }
}
