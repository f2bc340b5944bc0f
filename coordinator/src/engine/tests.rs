//! Engine tests: unit tests on emitted actions, and a property test that drives the engine
//! against simulated participants, a lossy network, a log that loses what was not yet
//! durable, and crashes with replay, checking the protocol's invariants.

use super::*;
use proptest::prelude::*;

fn id(n: u8) -> TxnId {
    let mut bytes = [n; 16];
    bytes[6] = 0x70;
    TxnId::from_bytes(bytes)
}

fn config() -> EngineConfig {
    EngineConfig {
        prepare_timeout_ms: 1_000,
        default_txn_timeout_ms: 10_000,
        ..EngineConfig::default()
    }
}

fn begin_with(engine: &mut Engine, txn: TxnId, participants: &[&str]) {
    engine.handle(
        0,
        Input::Begin {
            txn,
            timeout_ms: 0,
            req: ReqId(1),
        },
    );
    for (i, p) in participants.iter().enumerate() {
        let actions = engine.handle(
            0,
            Input::Enlist {
                txn,
                participant: p.to_string(),
                incarnation: 7,
                endpoint: format!("http://127.0.0.1:{}", 1000 + i),
                req: ReqId(2),
            },
        );
        assert!(
            matches!(
                &actions[..],
                [Action::Reply {
                    reply: Reply::Enlisted { .. },
                    ..
                }]
            ),
            "{actions:?}"
        );
    }
}

fn vote(engine: &mut Engine, txn: TxnId, p: &str, vote: VoteResult) -> Vec<Action> {
    engine.handle(
        5,
        Input::Vote {
            txn,
            participant: p.into(),
            vote,
        },
    )
}

fn sends(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendPrepare { participant, .. } => Some(format!("prepare:{participant}")),
            Action::SendCommit { participant, .. } => Some(format!("commit:{participant}")),
            Action::SendAbort { participant, .. } => Some(format!("abort:{participant}")),
            Action::SendCommitOnePhase { participant, .. } => Some(format!("1pc:{participant}")),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<Reply> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { reply, .. } => Some(reply.clone()),
            _ => None,
        })
        .collect()
}

fn appends(actions: &[Action]) -> Vec<(LogRecord, Option<Durable>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Append { record, force } => Some((record.clone(), force.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn commit_is_forced_before_any_commit_message_or_reply() {
    let mut e = Engine::new(config(), 3);
    let t = id(1);
    begin_with(&mut e, t, &["a", "b"]);
    let actions = e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    assert_eq!(sends(&actions), ["prepare:a", "prepare:b"]);
    assert!(
        appends(&actions).is_empty(),
        "nothing is logged before the decision"
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::SendPrepare {
            epoch: 3,
            incarnation: 7,
            ..
        }
    )));

    assert!(vote(&mut e, t, "a", VoteResult::Yes).is_empty());
    let actions = vote(&mut e, t, "b", VoteResult::Yes);
    assert!(
        sends(&actions).is_empty(),
        "no Commit before the decision is durable"
    );
    assert!(
        replies(&actions).is_empty(),
        "no reply before the decision is durable"
    );
    let logged = appends(&actions);
    assert!(
        matches!(&logged[..], [(LogRecord::Decision { decision: Decision::Commit, participants, .. }, Some(Durable::CommitDecision))] if participants.len() == 2),
        "{logged:?}"
    );
    assert_eq!(e.outcome(&t, true), Outcome::InProgress);

    let actions = e.handle(
        6,
        Input::Durable {
            txn: t,
            what: Durable::CommitDecision,
        },
    );
    assert_eq!(sends(&actions), ["commit:a", "commit:b"]);
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Outcome {
            outcome: Outcome::Committed,
            ..
        }]
    ));
    assert_eq!(e.outcome(&t, true), Outcome::Committed);

    assert!(
        appends(&e.handle(
            7,
            Input::Ack {
                txn: t,
                participant: "a".into(),
                result: Ok(())
            }
        ))
        .is_empty()
    );
    let actions = e.handle(
        8,
        Input::Ack {
            txn: t,
            participant: "b".into(),
            result: Ok(()),
        },
    );
    assert!(matches!(
        &appends(&actions)[..],
        [(LogRecord::End { .. }, None)]
    ));
    assert_eq!(e.in_flight(), 0);
    // Forgotten, but the recent outcome still answers clients.
    assert_eq!(e.outcome(&t, false), Outcome::Committed);
}

#[test]
fn a_no_vote_aborts_unforced_and_only_possible_holders_get_abort() {
    let mut e = Engine::new(config(), 1);
    let t = id(2);
    begin_with(&mut e, t, &["a", "b", "c"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    let actions = vote(
        &mut e,
        t,
        "b",
        VoteResult::No {
            reason: "conflict".into(),
        },
    );
    let logged = appends(&actions);
    assert!(
        matches!(
            &logged[..],
            [(
                LogRecord::Decision {
                    decision: Decision::Abort,
                    ..
                },
                None
            )]
        ),
        "{logged:?}"
    );
    assert!(
        matches!(&replies(&actions)[..], [Reply::Outcome { outcome: Outcome::Aborted, reason, .. }] if reason.contains("conflict"))
    );
    // a voted YES, c has not answered (it may yet prepare); b voted NO and needs nothing.
    assert_eq!(sends(&actions), ["abort:a", "abort:c"]);
    // c's late YES does not resend (its Abort is already on the way).
    assert!(sends(&vote(&mut e, t, "c", VoteResult::Yes)).is_empty());
}

#[test]
fn a_prepare_timeout_aborts() {
    let mut e = Engine::new(config(), 1);
    let t = id(3);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    let actions = e.handle(
        1_001,
        Input::Timer {
            txn: t,
            timer: Timer::PrepareDeadline,
        },
    );
    assert!(
        matches!(&replies(&actions)[..], [Reply::Outcome { outcome: Outcome::Aborted, reason, .. }] if reason.contains("timed out waiting for b"))
    );
    assert_eq!(sends(&actions), ["abort:a", "abort:b"]);
}

#[test]
fn read_only_voters_get_no_phase_two_and_all_read_only_logs_nothing() {
    let mut e = Engine::new(config(), 1);
    let t = id(4);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::ReadOnly);
    let actions = vote(&mut e, t, "b", VoteResult::Yes);
    assert!(
        matches!(&appends(&actions)[..], [(LogRecord::Decision { participants, .. }, Some(_))] if participants.len() == 1 && participants[0].name == "b")
    );
    let actions = e.handle(
        6,
        Input::Durable {
            txn: t,
            what: Durable::CommitDecision,
        },
    );
    assert_eq!(sends(&actions), ["commit:b"]);

    let t = id(5);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::ReadOnly);
    let actions = vote(&mut e, t, "b", VoteResult::ReadOnly);
    assert!(appends(&actions).is_empty());
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Outcome {
            outcome: Outcome::Committed,
            ..
        }]
    ));
}

#[test]
fn one_participant_commits_in_one_phase_without_a_record() {
    let mut e = Engine::new(config(), 1);
    let t = id(6);
    begin_with(&mut e, t, &["solo"]);
    let actions = e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    assert_eq!(sends(&actions), ["1pc:solo"]);
    assert!(appends(&actions).is_empty());
    // A lost answer is retried, never guessed.
    let actions = e.handle(
        2,
        Input::OnePhase {
            txn: t,
            participant: "solo".into(),
            result: OnePhaseResult::Failed {
                error: "down".into(),
            },
        },
    );
    assert!(replies(&actions).is_empty());
    let at = actions
        .iter()
        .find_map(|a| match a {
            Action::ArmTimer {
                at,
                timer: Timer::Retry { .. },
                ..
            } => Some(*at),
            _ => None,
        })
        .unwrap();
    let actions = e.handle(
        at,
        Input::Timer {
            txn: t,
            timer: Timer::Retry {
                participant: "solo".into(),
            },
        },
    );
    assert_eq!(sends(&actions), ["1pc:solo"]);
    let actions = e.handle(
        at + 1,
        Input::OnePhase {
            txn: t,
            participant: "solo".into(),
            result: OnePhaseResult::Committed,
        },
    );
    assert!(appends(&actions).is_empty());
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Outcome {
            outcome: Outcome::Committed,
            ..
        }]
    ));
}

#[test]
fn phase_two_failures_retry_with_growing_capped_backoff() {
    let mut e = Engine::new(
        EngineConfig {
            retry_initial_ms: 100,
            retry_max_ms: 1_000,
            ..config()
        },
        1,
    );
    let t = id(7);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    vote(&mut e, t, "b", VoteResult::Yes);
    e.handle(
        6,
        Input::Durable {
            txn: t,
            what: Durable::CommitDecision,
        },
    );
    e.handle(
        7,
        Input::Ack {
            txn: t,
            participant: "a".into(),
            result: Ok(()),
        },
    );
    let mut now = 10;
    let mut delays = Vec::new();
    for _ in 0..8 {
        let actions = e.handle(
            now,
            Input::Ack {
                txn: t,
                participant: "b".into(),
                result: Err("unavailable".into()),
            },
        );
        let at = actions
            .iter()
            .find_map(|a| match a {
                Action::ArmTimer { at, .. } => Some(*at),
                _ => None,
            })
            .expect("a retry timer");
        delays.push(at - now);
        now = at;
        let actions = e.handle(
            now,
            Input::Timer {
                txn: t,
                timer: Timer::Retry {
                    participant: "b".into(),
                },
            },
        );
        assert_eq!(sends(&actions), ["commit:b"]);
    }
    assert!(delays.iter().all(|d| *d <= 1_000), "{delays:?}");
    assert!(delays[6] >= 500, "backoff must grow to its cap: {delays:?}");
    let summary = e.txn(&t).unwrap();
    assert_eq!(summary.pending(), ["b"]);
    assert!(summary.branches[1].last_error.contains("unavailable"));
}

#[test]
fn recovery_redrives_commits_and_aborts_undecided_by_presumption() {
    let p = |n: &str| LogParticipant {
        name: n.into(),
        incarnation: 1,
        endpoint: "http://127.0.0.1:1".into(),
    };
    let records = vec![
        LogRecord::Decision {
            txn: id(10),
            decision: Decision::Commit,
            participants: vec![p("a"), p("b")],
            at_unix_ms: 2,
            actor: String::new(),
            reason: String::new(),
            epoch: 1,
        },
        LogRecord::Decision {
            txn: id(11),
            decision: Decision::Abort,
            participants: vec![p("a"), p("c")],
            at_unix_ms: 3,
            actor: String::new(),
            reason: "no".into(),
            epoch: 1,
        },
        LogRecord::Decision {
            txn: id(12),
            decision: Decision::Commit,
            participants: vec![p("a")],
            at_unix_ms: 4,
            actor: String::new(),
            reason: String::new(),
            epoch: 1,
        },
        LogRecord::End { txn: id(12) },
    ];
    let mut e = Engine::new(config(), 2);
    let actions = e.recover(100, records);
    let mut s = sends(&actions);
    s.sort();
    assert_eq!(s, ["abort:a", "abort:c", "commit:a", "commit:b"]);
    assert!(
        actions
            .iter()
            .all(|a| !matches!(a, Action::SendCommit { epoch, .. } if *epoch != 2))
    );
    assert_eq!(e.outcome(&id(10), true), Outcome::Committed);
    assert_eq!(e.outcome(&id(11), true), Outcome::Aborted);
    assert_eq!(e.outcome(&id(12), false), Outcome::Committed);
    assert_eq!(
        e.outcome(&id(13), true),
        Outcome::Aborted,
        "no record: presumed abort for participants"
    );
    assert_eq!(
        e.outcome(&id(13), false),
        Outcome::Unknown,
        "no record: unknown for clients"
    );
}

#[test]
fn client_commands_in_the_wrong_state_are_refused_and_duplicates_answer_the_outcome() {
    let mut e = Engine::new(config(), 1);
    let t = id(20);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Abort {
            txn: t,
            reason: String::new(),
            req: ReqId(3),
        },
    );
    let actions = e.handle(
        2,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(4),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::FailedPrecondition(_))]
    ));

    let t = id(21);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    let actions = e.handle(
        1,
        Input::Enlist {
            txn: t,
            participant: "c".into(),
            incarnation: 1,
            endpoint: "http://x:1".into(),
            req: ReqId(10),
        },
    );
    assert!(
        matches!(
            &replies(&actions)[..],
            [Reply::Refused(Refusal::FailedPrecondition(_))]
        ),
        "enlist after prepare"
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    vote(&mut e, t, "b", VoteResult::Yes);
    e.handle(
        6,
        Input::Durable {
            txn: t,
            what: Durable::CommitDecision,
        },
    );
    let actions = e.handle(
        7,
        Input::Abort {
            txn: t,
            reason: String::new(),
            req: ReqId(11),
        },
    );
    assert!(
        matches!(&replies(&actions)[..], [Reply::Refused(Refusal::FailedPrecondition(m))] if m.contains("committed"))
    );
    let actions = e.handle(
        7,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(12),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Outcome {
            outcome: Outcome::Committed,
            ..
        }]
    ));

    let actions = e.handle(
        8,
        Input::Commit {
            txn: id(99),
            wait_for_phase2: false,
            req: ReqId(13),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::NotFound(_))]
    ));
}

#[test]
fn limits_are_enforced_without_state_change() {
    let mut e = Engine::new(
        EngineConfig {
            max_participants: 2,
            max_in_flight: 1,
            ..config()
        },
        1,
    );
    let t = id(30);
    begin_with(&mut e, t, &["a", "b"]);
    let actions = e.handle(
        1,
        Input::Enlist {
            txn: t,
            participant: "c".into(),
            incarnation: 1,
            endpoint: "http://x:1".into(),
            req: ReqId(5),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::ResourceExhausted(_))]
    ));
    assert_eq!(e.txn(&t).unwrap().branches.len(), 2);
    let actions = e.handle(
        1,
        Input::Begin {
            txn: id(31),
            timeout_ms: 0,
            req: ReqId(6),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::ResourceExhausted(_))]
    ));
    assert!(e.txn(&id(31)).is_none());
    let mut e = Engine::new(config(), 1);
    let actions = e.handle(
        1,
        Input::Begin {
            txn: id(32),
            timeout_ms: u64::MAX,
            req: ReqId(6),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::InvalidArgument(_))]
    ));
}

#[test]
fn resolution_is_logged_before_it_acts_and_never_contradicts_a_decision() {
    let mut e = Engine::new(config(), 1);
    let t = id(40);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    // Undecided: forcing commit is refused (b has not voted YES).
    let actions = e.handle(
        2,
        Input::Resolve {
            txn: t,
            decision: Decision::Commit,
            actor: "ops".into(),
            reason: "r".into(),
            req: ReqId(20),
        },
    );
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Refused(Refusal::FailedPrecondition(_))]
    ));
    // Forcing abort: forced record first, nothing sent until it is durable.
    let actions = e.handle(
        3,
        Input::Resolve {
            txn: t,
            decision: Decision::Abort,
            actor: "ops".into(),
            reason: "stuck".into(),
            req: ReqId(21),
        },
    );
    assert!(
        matches!(&appends(&actions)[..], [(LogRecord::Decision { decision: Decision::Abort, actor, .. }, Some(Durable::Resolution { .. }))] if actor == "ops")
    );
    assert!(sends(&actions).is_empty());
    let actions = e.handle(
        4,
        Input::Durable {
            txn: t,
            what: Durable::Resolution { req: ReqId(21) },
        },
    );
    assert_eq!(sends(&actions), ["abort:a", "abort:b"]);
    assert!(matches!(
        &replies(&actions)[..],
        [Reply::Resolved {
            outcome: Outcome::Aborted,
            ..
        }]
    ));
    // Contradicting the logged abort is refused.
    let actions = e.handle(
        5,
        Input::Resolve {
            txn: t,
            decision: Decision::Commit,
            actor: "ops".into(),
            reason: "r".into(),
            req: ReqId(22),
        },
    );
    assert!(
        matches!(&replies(&actions)[..], [Reply::Refused(Refusal::FailedPrecondition(m))] if m.contains("contradict"))
    );
}

// --- Simulation against invariants ----------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Yes,
    No,
    ReadOnly,
}

#[derive(Debug, Clone)]
enum Step {
    Deliver(usize),
    Fail(usize),
    Duplicate(usize),
    FireTimer(usize),
    MakeDurable(usize),
    Crash { keep_extra: usize },
    ClientCommit,
    ClientAbort,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => any::<usize>().prop_map(Step::Deliver),
        2 => any::<usize>().prop_map(Step::Fail),
        1 => any::<usize>().prop_map(Step::Duplicate),
        2 => any::<usize>().prop_map(Step::FireTimer),
        3 => any::<usize>().prop_map(Step::MakeDurable),
        1 => (0usize..4).prop_map(|keep_extra| Step::Crash { keep_extra }),
        1 => Just(Step::ClientCommit),
        1 => Just(Step::ClientAbort),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum Msg {
    Prepare(String),
    Commit(String),
    Abort(String),
    OnePhase(String),
}

#[derive(Debug, Default, Clone)]
struct Participant {
    prepared: bool,
    committed: bool,
    aborted: bool,
}

struct Sim {
    engine: Engine,
    txn: TxnId,
    now: Millis,
    epoch: u64,
    log: Vec<LogRecord>,
    durable_upto: usize,
    pending_durable: Vec<(Durable, usize)>,
    network: Vec<Msg>,
    timers: Vec<(Timer, Millis)>,
    plans: BTreeMap<String, Plan>,
    participants: BTreeMap<String, Participant>,
    client_heard: Option<Outcome>,
    next_req: u64,
}

impl Sim {
    fn durable_commit(&self) -> bool {
        self.log[..self.durable_upto].iter().any(|r| {
            matches!(
                r,
                LogRecord::Decision {
                    decision: Decision::Commit,
                    ..
                }
            )
        })
    }

    fn apply(&mut self, actions: Vec<Action>) -> Result<(), TestCaseError> {
        for action in actions {
            match action {
                Action::SendPrepare { participant, .. } => {
                    self.network.push(Msg::Prepare(participant))
                }
                Action::SendCommit { participant, .. } => {
                    prop_assert!(
                        self.durable_commit(),
                        "Commit sent before the COMMIT decision was durable"
                    );
                    self.network.push(Msg::Commit(participant));
                }
                Action::SendAbort { participant, .. } => self.network.push(Msg::Abort(participant)),
                Action::SendCommitOnePhase { participant, .. } => {
                    self.network.push(Msg::OnePhase(participant))
                }
                Action::Append { record, force } => {
                    self.log.push(record);
                    if let Some(what) = force {
                        self.pending_durable.push((what, self.log.len()));
                    }
                }
                Action::Reply { reply, .. } => {
                    if let Reply::Outcome { outcome, .. } = reply {
                        if outcome == Outcome::Committed
                            && self.plans.len() > 1
                            && self.plans.values().any(|p| *p == Plan::Yes)
                        {
                            prop_assert!(
                                self.durable_commit(),
                                "COMMITTED answered before the decision was durable"
                            );
                        }
                        if matches!(outcome, Outcome::Committed | Outcome::Aborted) {
                            if let Some(previous) = self.client_heard {
                                prop_assert_eq!(previous, outcome, "the client heard two outcomes");
                            }
                            self.client_heard = Some(outcome);
                        }
                    }
                }
                Action::ArmTimer { timer, at, .. } => self.timers.push((timer, at)),
                Action::Finished { .. } => {}
            }
        }
        Ok(())
    }

    fn feed(&mut self, input: Input) -> Result<(), TestCaseError> {
        self.now += 1;
        let actions = self.engine.handle(self.now, input);
        self.apply(actions)
    }

    fn req(&mut self) -> ReqId {
        self.next_req += 1;
        ReqId(self.next_req)
    }

    fn deliver(&mut self, index: usize, fail: bool, duplicate: bool) -> Result<(), TestCaseError> {
        if self.network.is_empty() {
            return Ok(());
        }
        let i = index % self.network.len();
        let msg = if duplicate {
            self.network[i].clone()
        } else {
            self.network.remove(i)
        };
        let txn = self.txn;
        match msg {
            Msg::Prepare(p) => {
                let vote = if fail {
                    VoteResult::Failed {
                        error: "lost".into(),
                    }
                } else {
                    let state = self.participants.entry(p.clone()).or_default();
                    if state.aborted {
                        VoteResult::No {
                            reason: "already aborted".into(),
                        }
                    } else {
                        match self.plans[&p] {
                            Plan::Yes => {
                                state.prepared = true;
                                VoteResult::Yes
                            }
                            Plan::No => {
                                state.aborted = true;
                                VoteResult::No {
                                    reason: "planned".into(),
                                }
                            }
                            Plan::ReadOnly => VoteResult::ReadOnly,
                        }
                    }
                };
                self.feed(Input::Vote {
                    txn,
                    participant: p,
                    vote,
                })
            }
            Msg::Commit(p) | Msg::Abort(p) if fail => self.feed(Input::Ack {
                txn,
                participant: p,
                result: Err("lost".into()),
            }),
            Msg::Commit(p) => {
                let state = self.participants.entry(p.clone()).or_default();
                prop_assert!(state.prepared, "Commit reached {p}, which never prepared");
                prop_assert!(!state.aborted, "{p} aborted and then got Commit");
                state.committed = true;
                self.feed(Input::Ack {
                    txn,
                    participant: p,
                    result: Ok(()),
                })
            }
            Msg::Abort(p) => {
                let state = self.participants.entry(p.clone()).or_default();
                prop_assert!(!state.committed, "{p} committed and then got Abort");
                state.aborted = true;
                state.prepared = false;
                self.feed(Input::Ack {
                    txn,
                    participant: p,
                    result: Ok(()),
                })
            }
            Msg::OnePhase(p) => {
                let result = if fail {
                    OnePhaseResult::Failed {
                        error: "lost".into(),
                    }
                } else {
                    let plan = self.plans[&p];
                    let state = self.participants.entry(p.clone()).or_default();
                    if state.committed {
                        OnePhaseResult::Committed
                    } else if state.aborted || plan == Plan::No {
                        state.aborted = true;
                        OnePhaseResult::Aborted {
                            reason: "planned".into(),
                        }
                    } else {
                        state.prepared = true;
                        state.committed = true;
                        OnePhaseResult::Committed
                    }
                };
                self.feed(Input::OnePhase {
                    txn,
                    participant: p,
                    result,
                })
            }
        }
    }

    fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Deliver(i) => self.deliver(i, false, false),
            Step::Fail(i) => self.deliver(i, true, false),
            Step::Duplicate(i) => self.deliver(i, false, true),
            Step::FireTimer(i) => {
                if self.timers.is_empty() {
                    return Ok(());
                }
                let (timer, at) = self.timers.remove(i % self.timers.len());
                self.now = self.now.max(at);
                self.feed(Input::Timer {
                    txn: self.txn,
                    timer,
                })
            }
            Step::MakeDurable(i) => {
                if self.pending_durable.is_empty() {
                    return Ok(());
                }
                let (what, upto) = self.pending_durable.remove(i % self.pending_durable.len());
                self.durable_upto = self.durable_upto.max(upto);
                self.feed(Input::Durable {
                    txn: self.txn,
                    what,
                })
            }
            Step::Crash { keep_extra } => {
                // What reached the disk: everything fsynced, plus perhaps some of what was
                // written after (a write can land without its fsync having returned).
                let keep = (self.durable_upto + keep_extra).min(self.log.len());
                self.log.truncate(keep);
                self.durable_upto = keep;
                self.pending_durable.clear();
                self.timers.clear();
                self.epoch += 1;
                self.engine = Engine::new(config(), self.epoch);
                // The client's connection broke: it heard nothing more.
                let actions = self.engine.recover(self.now, self.log.clone());
                self.apply(actions)
            }
            Step::ClientCommit => {
                let req = self.req();
                self.feed(Input::Commit {
                    txn: self.txn,
                    wait_for_phase2: false,
                    req,
                })
            }
            Step::ClientAbort => {
                let req = self.req();
                self.feed(Input::Abort {
                    txn: self.txn,
                    reason: String::new(),
                    req,
                })
            }
        }
    }

    /// The participants' termination protocol: a branch still prepared asks GetOutcome and
    /// applies a decided answer. Returns whether anything changed.
    fn terminate(&mut self) -> Result<bool, TestCaseError> {
        let mut changed = false;
        for (name, p) in self.participants.iter_mut() {
            if p.prepared && !p.committed && !p.aborted {
                match self.engine.outcome(&self.txn, true) {
                    Outcome::Committed => {
                        p.committed = true;
                        changed = true;
                    }
                    Outcome::Aborted => {
                        p.aborted = true;
                        p.prepared = false;
                        changed = true;
                    }
                    other => prop_assert!(
                        other == Outcome::InProgress,
                        "{name} asked and heard {other:?}"
                    ),
                }
            }
        }
        Ok(changed)
    }

    /// Faults stop: everything is delivered and made durable, timers fire, until quiet.
    fn heal(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..500 {
            if let Some((what, upto)) = self.pending_durable.pop() {
                self.durable_upto = self.durable_upto.max(upto);
                self.feed(Input::Durable {
                    txn: self.txn,
                    what,
                })?;
            } else if !self.network.is_empty() {
                self.deliver(0, false, false)?;
            } else if !self.timers.is_empty() {
                self.step(Step::FireTimer(0))?;
            } else if !self.terminate()? {
                return Ok(());
            }
        }
        prop_assert!(false, "the system did not quiesce");
        Ok(())
    }
}

fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![5 => Just(Plan::Yes), 1 => Just(Plan::No), 1 => Just(Plan::ReadOnly)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_protocol_holds_under_loss_duplication_timeouts_and_crashes(
        plans in prop::collection::vec(plan(), 1..5),
        steps in prop::collection::vec(step(), 0..60),
        one_shot in any::<bool>(),
    ) {
        let txn = id(1);
        let plans: BTreeMap<String, Plan> = plans.into_iter().enumerate().map(|(i, p)| (format!("p{i}"), p)).collect();
        let mut sim = Sim {
            engine: Engine::new(config(), 1),
            txn,
            now: 0,
            epoch: 1,
            log: Vec::new(),
            durable_upto: 0,
            pending_durable: Vec::new(),
            network: Vec::new(),
            timers: Vec::new(),
            plans: plans.clone(),
            participants: BTreeMap::new(),
            client_heard: None,
            next_req: 100,
        };
        if one_shot {
            let branches = plans.keys().map(|p| ExecuteBranch { participant: p.clone(), endpoint: "http://h:1".into(), payload: Bytes::new() }).collect();
            sim.feed(Input::Execute { txn, branches, timeout_ms: 0, wait_for_phase2: false, req: ReqId(1) })?;
        } else {
            sim.feed(Input::Begin { txn, timeout_ms: 0, req: ReqId(1) })?;
            for p in plans.keys() {
                sim.feed(Input::Enlist { txn, participant: p.clone(), incarnation: 1, endpoint: "http://h:1".into(), req: ReqId(2) })?;
            }
            sim.feed(Input::Commit { txn, wait_for_phase2: false, req: ReqId(3) })?;
        }
        for s in steps {
            sim.step(s)?;
        }
        sim.heal()?;

        // Atomicity: everyone that applied an outcome applied the same one.
        let committed = sim.participants.values().filter(|p| p.committed).count();
        let aborted_holders = sim.participants.iter().filter(|(n, p)| p.aborted && sim.plans[*n] == Plan::Yes).count();
        prop_assert!(committed == 0 || aborted_holders == 0, "mixed outcome: {:?}", sim.participants);
        // Liveness after healing: nobody is left prepared, and the coordinator holds nothing.
        for (name, p) in &sim.participants {
            prop_assert!(!p.prepared || p.committed, "{name} left in doubt: {p:?}");
        }
        prop_assert_eq!(sim.engine.in_flight(), 0, "the coordinator still holds the transaction");
        // The client's answer matches what the participants did.
        match sim.client_heard {
            Some(Outcome::Committed) => {
                let yes: Vec<&String> = sim.plans.iter().filter(|(_, p)| **p == Plan::Yes).map(|(n, _)| n).collect();
                for n in yes {
                    prop_assert!(sim.participants.get(n).is_some_and(|p| p.committed), "client heard COMMITTED but {n} did not commit");
                }
            }
            Some(Outcome::Aborted) => prop_assert_eq!(committed, 0, "client heard ABORTED but a participant committed"),
            _ => {}
        }
        // Every decision record of the transaction agrees.
        let decisions: Vec<Decision> = sim.log.iter().filter_map(|r| match r { LogRecord::Decision { decision, .. } => Some(*decision), _ => None }).collect();
        prop_assert!(decisions.windows(2).all(|w| w[0] == w[1]), "decisions changed: {decisions:?}");
    }
}

#[test]
fn a_resolution_racing_the_last_ack_is_answered_and_end_follows_it() {
    let mut e = Engine::new(config(), 1);
    let t = id(50);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    vote(&mut e, t, "a", VoteResult::Yes);
    vote(&mut e, t, "b", VoteResult::Yes);
    e.handle(
        6,
        Input::Durable {
            txn: t,
            what: Durable::CommitDecision,
        },
    );
    e.handle(
        7,
        Input::Ack {
            txn: t,
            participant: "a".into(),
            result: Ok(()),
        },
    );
    let actions = e.handle(
        8,
        Input::Resolve {
            txn: t,
            decision: Decision::Commit,
            actor: "ops".into(),
            reason: "nudge".into(),
            req: ReqId(30),
        },
    );
    assert!(matches!(
        &appends(&actions)[..],
        [(LogRecord::Decision { .. }, Some(Durable::Resolution { .. }))]
    ));
    // The last ack arrives before the resolution record is durable: no END yet.
    let actions = e.handle(
        9,
        Input::Ack {
            txn: t,
            participant: "b".into(),
            result: Ok(()),
        },
    );
    assert!(
        appends(&actions).is_empty(),
        "END must wait for the resolution record: {actions:?}"
    );
    let actions = e.handle(
        10,
        Input::Durable {
            txn: t,
            what: Durable::Resolution { req: ReqId(30) },
        },
    );
    assert!(
        matches!(&appends(&actions)[..], [(LogRecord::End { .. }, None)]),
        "{actions:?}"
    );
    assert!(
        matches!(
            &replies(&actions)[..],
            [Reply::Resolved {
                outcome: Outcome::Committed,
                ..
            }]
        ),
        "{actions:?}"
    );
    assert_eq!(e.in_flight(), 0);
}

/// Whether each decision message may wait for a Prepare to carry it: a first attempt
/// may, unless the client waits for phase two; a retry never does.
#[test]
fn decisions_are_urgent_when_retried_or_when_the_client_waits_for_phase_two() {
    fn urgency(actions: &[Action]) -> Vec<(String, bool)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendCommit {
                    participant,
                    urgent,
                    ..
                }
                | Action::SendAbort {
                    participant,
                    urgent,
                    ..
                } => Some((participant.clone(), *urgent)),
                _ => None,
            })
            .collect()
    }
    let mut e = Engine::new(config(), 1);
    for (t, wait_for_phase2) in [(id(40), false), (id(41), true)] {
        begin_with(&mut e, t, &["a", "b"]);
        e.handle(
            1,
            Input::Commit {
                txn: t,
                wait_for_phase2,
                req: ReqId(9),
            },
        );
        vote(&mut e, t, "a", VoteResult::Yes);
        vote(&mut e, t, "b", VoteResult::Yes);
        let actions = e.handle(
            6,
            Input::Durable {
                txn: t,
                what: Durable::CommitDecision,
            },
        );
        assert_eq!(
            urgency(&actions),
            [("a".into(), wait_for_phase2), ("b".into(), wait_for_phase2)]
        );
    }
    // The first attempt to `a` fails (say the Prepare that carried it timed out): the
    // retry goes alone.
    let t = id(40);
    let actions = e.handle(
        7,
        Input::Ack {
            txn: t,
            participant: "a".into(),
            result: Err("Prepare timed out".into()),
        },
    );
    let at = actions
        .iter()
        .find_map(|a| match a {
            Action::ArmTimer {
                timer: Timer::Retry { .. },
                at,
                ..
            } => Some(*at),
            _ => None,
        })
        .expect("a retry is armed");
    let actions = e.handle(
        at,
        Input::Timer {
            txn: t,
            timer: Timer::Retry {
                participant: "a".into(),
            },
        },
    );
    assert_eq!(urgency(&actions), [("a".into(), true)]);
    // An abort's first messages may ride too.
    let t = id(42);
    begin_with(&mut e, t, &["a", "b"]);
    e.handle(
        1,
        Input::Commit {
            txn: t,
            wait_for_phase2: false,
            req: ReqId(9),
        },
    );
    let no = VoteResult::No {
        reason: "conflict".into(),
    };
    let actions = vote(&mut e, t, "a", no);
    assert_eq!(urgency(&actions), [("b".into(), false)], "{actions:?}");
}
