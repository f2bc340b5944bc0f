//! The branch state machine: what a participant does with each protocol message, given
//! what it already knows about the branch. Pure: no I/O, no tokio, no clock.
//!
//! A branch is one transaction's part on this participant. Its life:
//!
//! ```text
//!   (unknown) --prepare--> [store prepares] --YES--> Prepared --commit--> Committed
//!       |                        |    \                  \
//!       |                        |     NO --> Aborted     abort --> Aborted
//!       |                        READ_ONLY --> ReadOnly
//!       +--abort (null compensation)--> Aborted
//! ```
//!
//! Finished branches leave a tombstone (Committed, Aborted, ReadOnly) so late and
//! duplicate messages get the answer the first one got. The store executes the
//! transitions that touch data; this module decides which transitions are allowed.

use crate::store::{BranchMeta, PayloadDigest};

/// What a participant knows about a branch, durably (the store persists prepared branches
/// and tombstones; the runtime rebuilds these states from them on restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    /// Voted YES; holds locks until a decision arrives.
    Prepared {
        epoch: u64,
        digest: PayloadDigest,
    },
    Committed {
        digest: PayloadDigest,
    },
    Aborted {
        digest: Option<PayloadDigest>,
    },
    ReadOnly {
        digest: PayloadDigest,
    },
}

/// A vote as the protocol carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No { reason: String },
    ReadOnly,
}

/// Why a message is refused (each maps to a gRPC status code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The message does not fit the branch's state (FAILED_PRECONDITION).
    FailedPrecondition(String),
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::FailedPrecondition(m) => m,
        }
    }
}

/// The next step for a Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrepareStep {
    /// Unknown branch: let the store evaluate, lock and persist it.
    Execute,
    /// Already answered: repeat the first answer.
    Answer(Vote),
    Refuse(Refusal),
}

/// The next step for a Commit or an Abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionStep {
    /// Let the store apply (commit) or discard (abort) the branch.
    Execute,
    /// Already in that outcome (or nothing to do): acknowledge.
    Acknowledge,
    Refuse(Refusal),
}

pub fn on_prepare(state: Option<&BranchState>, meta: &BranchMeta) -> PrepareStep {
    let same = |digest: &PayloadDigest| *digest == meta.digest;
    let mismatch = || {
        PrepareStep::Refuse(Refusal::FailedPrecondition(format!(
            "branch {} was prepared with a different payload",
            meta.txn_id
        )))
    };
    match state {
        None => PrepareStep::Execute,
        Some(BranchState::Prepared { digest, .. }) | Some(BranchState::Committed { digest }) => {
            if same(digest) {
                PrepareStep::Answer(Vote::Yes)
            } else {
                mismatch()
            }
        }
        Some(BranchState::ReadOnly { digest }) => {
            if same(digest) {
                PrepareStep::Answer(Vote::ReadOnly)
            } else {
                mismatch()
            }
        }
        // A prepare after an abort (or after a NO vote) is refused: the branch's staged
        // work is gone and the coordinator must not count this as a YES.
        Some(BranchState::Aborted { .. }) => PrepareStep::Refuse(Refusal::FailedPrecondition(
            format!("branch {} is already aborted", meta.txn_id),
        )),
    }
}

pub fn on_commit(state: Option<&BranchState>, epoch: u64) -> DecisionStep {
    match state {
        None => DecisionStep::Refuse(Refusal::FailedPrecondition(
            "no prepared branch for this transaction".into(),
        )),
        Some(BranchState::Prepared {
            epoch: prepared_epoch,
            ..
        }) => {
            if epoch < *prepared_epoch {
                DecisionStep::Refuse(stale_epoch(epoch, *prepared_epoch))
            } else {
                DecisionStep::Execute
            }
        }
        Some(BranchState::Committed { .. }) | Some(BranchState::ReadOnly { .. }) => {
            DecisionStep::Acknowledge
        }
        Some(BranchState::Aborted { .. }) => DecisionStep::Refuse(Refusal::FailedPrecondition(
            "branch is aborted; it cannot commit".into(),
        )),
    }
}

pub fn on_abort(state: Option<&BranchState>, epoch: u64) -> DecisionStep {
    match state {
        // Null compensation: an abort for a branch never prepared here records a
        // tombstone (so a late prepare is refused) and succeeds.
        None => DecisionStep::Execute,
        Some(BranchState::Prepared {
            epoch: prepared_epoch,
            ..
        }) => {
            if epoch < *prepared_epoch {
                DecisionStep::Refuse(stale_epoch(epoch, *prepared_epoch))
            } else {
                DecisionStep::Execute
            }
        }
        Some(BranchState::Aborted { .. }) | Some(BranchState::ReadOnly { .. }) => {
            DecisionStep::Acknowledge
        }
        Some(BranchState::Committed { .. }) => DecisionStep::Refuse(Refusal::FailedPrecondition(
            "branch is committed; it cannot abort".into(),
        )),
    }
}

/// The next step for a one-phase commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhaseStep {
    Execute,
    /// Already finished: repeat the outcome (true: committed).
    Answer {
        committed: bool,
    },
    Refuse(Refusal),
}

pub fn on_commit_one_phase(state: Option<&BranchState>, meta: &BranchMeta) -> OnePhaseStep {
    match state {
        None => OnePhaseStep::Execute,
        Some(BranchState::Committed { digest }) | Some(BranchState::ReadOnly { digest })
            if *digest == meta.digest =>
        {
            OnePhaseStep::Answer { committed: true }
        }
        Some(BranchState::Aborted { .. }) => OnePhaseStep::Answer { committed: false },
        Some(BranchState::Prepared { .. }) => OnePhaseStep::Refuse(Refusal::FailedPrecondition(
            "branch is prepared for two-phase commit; it cannot commit in one phase".into(),
        )),
        Some(_) => OnePhaseStep::Refuse(Refusal::FailedPrecondition(format!(
            "branch {} was committed with a different payload",
            meta.txn_id
        ))),
    }
}

/// The state after a one-phase commit.
pub fn after_commit_one_phase(meta: &BranchMeta, committed: bool) -> BranchState {
    if committed {
        BranchState::Committed {
            digest: meta.digest,
        }
    } else {
        BranchState::Aborted {
            digest: Some(meta.digest),
        }
    }
}

/// The state after the store prepared a branch and voted.
pub fn after_prepare(meta: &BranchMeta, vote: &Vote) -> BranchState {
    match vote {
        Vote::Yes => BranchState::Prepared {
            epoch: meta.epoch,
            digest: meta.digest,
        },
        Vote::No { .. } => BranchState::Aborted {
            digest: Some(meta.digest),
        },
        Vote::ReadOnly => BranchState::ReadOnly {
            digest: meta.digest,
        },
    }
}

/// The state after the store applied a commit. Only a prepared branch can get here.
pub fn after_commit(state: Option<&BranchState>) -> BranchState {
    match state {
        Some(BranchState::Prepared { digest, .. }) => BranchState::Committed { digest: *digest },
        other => panic!("invariant violated: commit applied to a branch in state {other:?}"),
    }
}

/// The state after the store discarded a branch.
pub fn after_abort(state: Option<&BranchState>) -> BranchState {
    match state {
        None => BranchState::Aborted { digest: None },
        Some(BranchState::Prepared { digest, .. }) => BranchState::Aborted {
            digest: Some(*digest),
        },
        other => panic!("invariant violated: abort applied to a branch in state {other:?}"),
    }
}

fn stale_epoch(got: u64, prepared: u64) -> Refusal {
    Refusal::FailedPrecondition(format!(
        "stale coordinator epoch {got}: the branch was prepared under epoch {prepared}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ratify_proto::TxnId;

    fn meta(digest: u64, epoch: u64) -> BranchMeta {
        BranchMeta {
            txn_id: TxnId::from_bytes([7; 16]),
            epoch,
            digest: PayloadDigest(digest),
            incarnation: 0,
        }
    }

    #[test]
    fn prepare_after_abort_is_refused() {
        let aborted = BranchState::Aborted { digest: None };
        assert!(matches!(
            on_prepare(Some(&aborted), &meta(1, 1)),
            PrepareStep::Refuse(_)
        ));
    }

    #[test]
    fn abort_of_unknown_branch_executes_and_leaves_a_tombstone() {
        assert_eq!(on_abort(None, 1), DecisionStep::Execute);
        assert_eq!(after_abort(None), BranchState::Aborted { digest: None });
    }

    #[test]
    fn duplicate_prepare_answers_the_first_vote_and_a_new_payload_is_refused() {
        let m = meta(5, 2);
        let prepared = after_prepare(&m, &Vote::Yes);
        assert_eq!(
            on_prepare(Some(&prepared), &m),
            PrepareStep::Answer(Vote::Yes)
        );
        assert!(matches!(
            on_prepare(Some(&prepared), &meta(6, 2)),
            PrepareStep::Refuse(_)
        ));
        let read_only = after_prepare(&m, &Vote::ReadOnly);
        assert_eq!(
            on_prepare(Some(&read_only), &m),
            PrepareStep::Answer(Vote::ReadOnly)
        );
    }

    #[test]
    fn decisions_from_an_older_epoch_are_refused() {
        let prepared = after_prepare(&meta(1, 5), &Vote::Yes);
        assert!(matches!(
            on_commit(Some(&prepared), 4),
            DecisionStep::Refuse(_)
        ));
        assert!(matches!(
            on_abort(Some(&prepared), 4),
            DecisionStep::Refuse(_)
        ));
        assert_eq!(on_commit(Some(&prepared), 5), DecisionStep::Execute);
        assert_eq!(on_commit(Some(&prepared), 6), DecisionStep::Execute);
    }

    #[test]
    fn one_phase_commit_is_idempotent() {
        let m = meta(3, 1);
        assert_eq!(on_commit_one_phase(None, &m), OnePhaseStep::Execute);
        let done = after_commit_one_phase(&m, true);
        assert_eq!(
            on_commit_one_phase(Some(&done), &m),
            OnePhaseStep::Answer { committed: true }
        );
        assert!(matches!(
            on_commit_one_phase(Some(&done), &meta(4, 1)),
            OnePhaseStep::Refuse(_)
        ));
        let failed = after_commit_one_phase(&m, false);
        assert_eq!(
            on_commit_one_phase(Some(&failed), &m),
            OnePhaseStep::Answer { committed: false }
        );
    }

    #[test]
    fn commit_without_prepare_is_refused_and_creates_nothing() {
        assert!(matches!(on_commit(None, 1), DecisionStep::Refuse(_)));
    }

    // --- Random interleavings against a reference model -------------------------------

    #[derive(Debug, Clone)]
    enum Msg {
        Prepare {
            payload: u64,
            epoch: u64,
        },
        Commit {
            epoch: u64,
        },
        Abort {
            epoch: u64,
        },
        /// The process restarts: only durable state survives. Prepared branches and
        /// committed tombstones are forced; an abort tombstone may be lost (presumed
        /// abort makes that safe), which the model covers by `lose_abort`.
        Crash {
            lose_abort: bool,
        },
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (0u64..3, 1u64..4).prop_map(|(payload, epoch)| Msg::Prepare { payload, epoch }),
            (1u64..4).prop_map(|epoch| Msg::Commit { epoch }),
            (1u64..4).prop_map(|epoch| Msg::Abort { epoch }),
            any::<bool>().prop_map(|lose_abort| Msg::Crash { lose_abort }),
        ]
    }

    /// The model: a plain record of what happened, judged by the protocol's rules.
    #[derive(Debug, Default, Clone)]
    struct Model {
        first_prepare: Option<(u64, u64, StoreVote)>,
        committed: bool,
        aborted: bool,
        abort_durable: bool,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum StoreVote {
        Yes,
        No,
        ReadOnly,
    }

    fn store_vote(payload: u64) -> StoreVote {
        // The "store" votes by payload: deterministic so duplicates agree.
        match payload {
            0 => StoreVote::Yes,
            1 => StoreVote::No,
            _ => StoreVote::ReadOnly,
        }
    }

    proptest! {
        #[test]
        fn branch_machine_matches_the_reference_model(msgs in prop::collection::vec(msg(), 1..40)) {
            let mut state: Option<BranchState> = None;
            let mut model = Model::default();
            let mut applied_commits = 0;
            for m in msgs {
                match m {
                    Msg::Prepare { payload, epoch } => {
                        let meta = meta(payload, epoch);
                        let step = on_prepare(state.as_ref(), &meta);
                        match (&model.first_prepare, model.aborted && !model.committed) {
                            (_, true) if !matches!(model.first_prepare, Some((_, _, StoreVote::ReadOnly))) => {
                                prop_assert!(matches!(step, PrepareStep::Refuse(_)), "prepare after abort must be refused, got {step:?}");
                            }
                            (None, _) => {
                                prop_assert_eq!(&step, &PrepareStep::Execute);
                                let vote = store_vote(payload);
                                model.first_prepare = Some((payload, epoch, vote));
                                let v = match vote {
                                    StoreVote::Yes => Vote::Yes,
                                    StoreVote::No => { model.aborted = true; model.abort_durable = false; Vote::No { reason: "no".into() } }
                                    StoreVote::ReadOnly => Vote::ReadOnly,
                                };
                                state = Some(after_prepare(&meta, &v));
                            }
                            (Some((p, _, vote)), _) => {
                                if *p != payload {
                                    prop_assert!(matches!(step, PrepareStep::Refuse(_)));
                                } else {
                                    let expected = match vote {
                                        StoreVote::Yes => PrepareStep::Answer(Vote::Yes),
                                        StoreVote::ReadOnly => PrepareStep::Answer(Vote::ReadOnly),
                                        StoreVote::No => unreachable!("covered by the aborted arm"),
                                    };
                                    prop_assert_eq!(step, expected);
                                }
                            }
                        }
                    }
                    Msg::Commit { epoch } => {
                        let step = on_commit(state.as_ref(), epoch);
                        match model.first_prepare {
                            Some((_, prepared_epoch, StoreVote::Yes)) if !model.aborted => {
                                if model.committed {
                                    prop_assert_eq!(step, DecisionStep::Acknowledge);
                                } else if epoch < prepared_epoch {
                                    prop_assert!(matches!(step, DecisionStep::Refuse(_)));
                                } else {
                                    prop_assert_eq!(&step, &DecisionStep::Execute);
                                    state = Some(after_commit(state.as_ref()));
                                    model.committed = true;
                                    applied_commits += 1;
                                }
                            }
                            Some((_, _, StoreVote::ReadOnly)) => prop_assert_eq!(step, DecisionStep::Acknowledge),
                            _ => prop_assert!(matches!(step, DecisionStep::Refuse(_)), "commit must be refused, got {step:?}"),
                        }
                    }
                    Msg::Abort { epoch } => {
                        let step = on_abort(state.as_ref(), epoch);
                        if model.committed {
                            prop_assert!(matches!(step, DecisionStep::Refuse(_)));
                        } else if model.aborted || matches!(model.first_prepare, Some((_, _, StoreVote::ReadOnly))) {
                            prop_assert_eq!(step, DecisionStep::Acknowledge);
                        } else if let Some((_, prepared_epoch, StoreVote::Yes)) = model.first_prepare {
                            if epoch < prepared_epoch {
                                prop_assert!(matches!(step, DecisionStep::Refuse(_)));
                            } else {
                                prop_assert_eq!(&step, &DecisionStep::Execute);
                                state = Some(after_abort(state.as_ref()));
                                model.aborted = true;
                                model.abort_durable = false;
                            }
                        } else {
                            prop_assert_eq!(&step, &DecisionStep::Execute);
                            state = Some(after_abort(state.as_ref()));
                            model.aborted = true;
                            model.abort_durable = false;
                        }
                    }
                    Msg::Crash { lose_abort } => {
                        // An unforced abort tombstone may be lost: the branch returns to
                        // what was durable before it (prepared, or unknown).
                        if model.aborted && !model.abort_durable {
                            if lose_abort {
                                match model.first_prepare {
                                    Some((p, e, StoreVote::Yes)) => {
                                        state = Some(BranchState::Prepared { epoch: e, digest: PayloadDigest(p) });
                                        model.aborted = false;
                                    }
                                    _ => {
                                        state = None;
                                        model = Model::default();
                                    }
                                }
                            } else {
                                model.abort_durable = true;
                            }
                        }
                    }
                }
                prop_assert!(!(model.committed && model.aborted), "a branch committed and aborted");
                prop_assert!(applied_commits <= 1, "a commit was applied twice");
            }
        }
    }
}
