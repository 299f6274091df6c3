//! A cut's lifecycle as pure logic: one state ([`CutPhase`]), the events that move it
//! ([`CutEvent`]) and one transition function ([`on`]). The journal stage, the published
//! [`NodePhase`] and whether anything may still be frozen are all derived from the phase, never
//! kept beside it.
//!
//! The safety rules it encodes:
//! - Nothing is frozen before the intent is journaled (`Planned` → `Freezing` only on
//!   [`CutEvent::IntentJournaled`]).
//! - A cut that ends while freeze calls are still in flight stays "may be frozen" until every call
//!   has returned: [`CutEvent::AllThawed`] is illegal while `freezes_in_flight`.
//! - A phase is published only once it is durably journaled: the end of a cut passes through
//!   `Settling` (thawed, not yet journaled) and becomes final only on [`CutEvent::EndJournaled`].
//! - An abort wins over a release that is not durable yet, and turns a released cut into an
//!   aborted one (its snapshots are deleted); nothing resurrects an aborted or failed cut.
//!
//! `on` is deterministic and total: every (phase, event) pair either gives the next phase or
//! [`Illegal`]. The engine applies each event under the cut's lock and acts on the new phase.

use crate::api::NodePhase;

use crate::agent::journal::Stage;

/// How a cut ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Thawed; the snapshots are kept.
    Released,
    /// Thawed; the snapshots are deleted (asked, timed out, shut down, or deleted while held).
    Aborted,
    /// Thawed; the cut could not be made and nothing is kept.
    Failed,
}

impl Outcome {
    /// The final phase this outcome reaches once journaled.
    pub fn phase(self) -> CutPhase {
        match self {
            Outcome::Released => CutPhase::Released,
            Outcome::Aborted => CutPhase::Aborted,
            Outcome::Failed => CutPhase::Failed,
        }
    }

    /// Whether the cut's snapshots are kept.
    pub fn keeps_snapshots(self) -> bool {
        self == Outcome::Released
    }
}

/// Where a cut stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CutPhase {
    /// Volumes resolved and snapshots planned, superblocks reserved; nothing journaled as frozen
    /// and nothing frozen.
    Planned,
    /// The intent is journaled; freeze calls may be in flight.
    Freezing,
    /// Every freeze call has returned; snapshots are being cut under the freeze.
    Cutting,
    /// The snapshots are cut and the freeze is held until release, abort or the deadline.
    Held,
    /// The cut is over and its filesystems are being thawed. `freezes_in_flight`: some FIFREEZE
    /// calls have not returned yet (each thaws at once when it does).
    Thawing {
        outcome: Outcome,
        freezes_in_flight: bool,
    },
    /// Everything is thawed, but the end is not durably journaled yet (written, or retried after a
    /// failed write). Nothing new is published in this phase.
    Settling { outcome: Outcome },
    /// Thawed, snapshots kept, journaled.
    Released,
    /// Thawed, snapshots deleted (or being deleted), journaled.
    Aborted,
    /// Thawed, nothing kept, journaled.
    Failed,
    /// The NodeSnapshot is gone: its snapshots are being deleted (unless `keep`), retried until
    /// every delete succeeded.
    Deleting { keep: bool },
    /// Everything is cleaned up and the journal entry removed.
    Forgotten,
}

/// What happens to a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CutEvent {
    /// The intent (what may be frozen, which snapshots may be made) is durably journaled.
    IntentJournaled,
    /// The cut cannot go on: a refusal before freezing, a freeze or a snapshot that failed.
    Fail,
    /// Every FIFREEZE call of the cut has returned (frozen or not).
    FreezesReturned,
    /// Every planned snapshot is cut.
    SnapshotsCut,
    /// Thaw and keep the snapshots (the controller's Release, or `releaseAfterCut`).
    Release,
    /// Thaw and delete the snapshots (the controller's Abort, the watchdog, shutdown, or the
    /// NodeSnapshot deleted while held).
    Abort,
    /// Every filesystem the cut froze is thawed (each FITHAW returned).
    AllThawed,
    /// The end of the cut is durably journaled.
    EndJournaled,
    /// The NodeSnapshot is being deleted; `retain` keeps the snapshots of a released cut.
    Finalize { retain: bool },
    /// Every snapshot to delete is gone and the journal entry is removed.
    Deleted,
}

/// An event that cannot happen in a phase (a bug in the caller, reported instead of acted on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event {event:?} is not allowed in phase {phase:?}")]
pub struct Illegal {
    pub phase: CutPhase,
    pub event: CutEvent,
}

/// The transition function: the phase after `event` in `phase`.
pub fn on(phase: CutPhase, event: CutEvent) -> Result<CutPhase, Illegal> {
    use CutEvent as E;
    use CutPhase as P;
    let illegal = Err(Illegal { phase, event });
    let thawing = |outcome, freezes_in_flight| P::Thawing {
        outcome,
        freezes_in_flight,
    };
    Ok(match (phase, event) {
        (P::Planned, E::IntentJournaled) => P::Freezing,
        // Nothing was frozen yet: straight to recording the end.
        (P::Planned, E::Fail) => P::Settling {
            outcome: Outcome::Failed,
        },
        (P::Planned, E::Abort) => P::Settling {
            outcome: Outcome::Aborted,
        },

        (P::Freezing, E::FreezesReturned) => P::Cutting,
        (P::Freezing, E::Fail) => thawing(Outcome::Failed, true),
        (P::Freezing, E::Abort) => thawing(Outcome::Aborted, true),

        (P::Cutting, E::SnapshotsCut) => P::Held,
        (P::Cutting, E::Fail) => thawing(Outcome::Failed, false),
        (P::Cutting, E::Abort) => thawing(Outcome::Aborted, false),

        (P::Held, E::Release) => thawing(Outcome::Released, false),
        (P::Held, E::Abort) => thawing(Outcome::Aborted, false),

        (
            P::Thawing {
                outcome,
                freezes_in_flight: true,
            },
            E::FreezesReturned,
        ) => thawing(outcome, false),
        // The journal may say "thawed" only once no freeze call can still freeze something.
        (
            P::Thawing {
                freezes_in_flight: true,
                ..
            },
            E::AllThawed,
        ) => return illegal,
        (
            P::Thawing {
                outcome,
                freezes_in_flight: false,
            },
            E::AllThawed,
        ) => P::Settling { outcome },
        // An abort wins over a release that is not durable yet.
        (
            P::Thawing {
                outcome: Outcome::Released,
                freezes_in_flight,
            },
            E::Abort,
        ) => thawing(Outcome::Aborted, freezes_in_flight),
        // The first end decided stays (a late failure or a second abort changes nothing).
        (
            P::Thawing {
                outcome: Outcome::Aborted | Outcome::Failed,
                ..
            },
            E::Abort | E::Fail | E::Release,
        ) => phase,
        (
            P::Thawing {
                outcome: Outcome::Released,
                ..
            },
            E::Release,
        ) => phase,

        (P::Settling { outcome }, E::EndJournaled) => outcome.phase(),
        (
            P::Settling {
                outcome: Outcome::Released,
            },
            E::Abort,
        ) => P::Settling {
            outcome: Outcome::Aborted,
        },
        (
            P::Settling {
                outcome: Outcome::Aborted | Outcome::Failed,
            },
            E::Abort | E::Fail | E::Release,
        ) => phase,
        (
            P::Settling {
                outcome: Outcome::Released,
            },
            E::Release,
        ) => phase,

        // A released cut can still be aborted (another node failed after the release): its
        // snapshots are deleted and that end is journaled again.
        (P::Released, E::Abort) => P::Settling {
            outcome: Outcome::Aborted,
        },
        (P::Released, E::Release) => phase,
        (P::Aborted | P::Failed, E::Abort | E::Release | E::Fail) => phase,

        (P::Released, E::Finalize { retain }) => P::Deleting { keep: retain },
        (P::Aborted | P::Failed, E::Finalize { .. }) => P::Deleting { keep: false },
        // A retry of the deletion (the last one failed somewhere).
        (P::Deleting { keep }, E::Finalize { .. }) => P::Deleting { keep },
        (P::Deleting { .. }, E::Deleted) => P::Forgotten,
        (P::Deleting { .. }, E::Abort | E::Release | E::Fail) => phase,
        (P::Forgotten, E::Finalize { .. } | E::Deleted) => P::Forgotten,

        _ => return illegal,
    })
}

impl CutPhase {
    /// Whether a filesystem of the cut may still be frozen (the watchdog is needed, and a crash
    /// must be recovered by thawing).
    pub fn may_be_frozen(self) -> bool {
        matches!(
            self,
            CutPhase::Freezing | CutPhase::Cutting | CutPhase::Held | CutPhase::Thawing { .. }
        )
    }

    /// Whether a FIFREEZE may be issued, or a returned freeze kept: only while freezing. A freeze
    /// that returns in any later phase belongs to an abandoned cut and is thawed at once.
    pub fn accepts_freezes(self) -> bool {
        self == CutPhase::Freezing
    }

    /// Whether the cut has been decided to end (the watchdog can stop waiting once it is also
    /// thawed: `is_over() && !may_be_frozen()`).
    pub fn is_over(self) -> bool {
        matches!(
            self,
            CutPhase::Thawing { .. }
                | CutPhase::Settling { .. }
                | CutPhase::Released
                | CutPhase::Aborted
                | CutPhase::Failed
                | CutPhase::Deleting { .. }
                | CutPhase::Forgotten
        )
    }

    /// How the cut ends, once decided.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            CutPhase::Thawing { outcome, .. } | CutPhase::Settling { outcome } => Some(outcome),
            CutPhase::Released => Some(Outcome::Released),
            CutPhase::Aborted => Some(Outcome::Aborted),
            CutPhase::Failed => Some(Outcome::Failed),
            _ => None,
        }
    }

    /// The journal stage a write in this phase records, if a write in this phase records one.
    /// Every phase that may be frozen records a "may be frozen" stage, so a crash is recovered by
    /// thawing; `Settling` records its outcome (that write is what makes the end final).
    pub fn journal_stage(self) -> Option<Stage> {
        match self {
            CutPhase::Planned | CutPhase::Deleting { .. } | CutPhase::Forgotten => None,
            CutPhase::Freezing | CutPhase::Cutting | CutPhase::Thawing { .. } => {
                Some(Stage::Freezing)
            }
            CutPhase::Held => Some(Stage::Held),
            CutPhase::Settling { outcome } => Some(outcome.stage()),
            CutPhase::Released => Some(Stage::Released),
            CutPhase::Aborted => Some(Stage::Aborted),
            CutPhase::Failed => Some(Stage::Failed),
        }
    }

    /// The NodeSnapshot phase to publish once this phase is journaled; `None` for the phases in
    /// between, which keep publishing what was published before.
    pub fn published(self) -> Option<NodePhase> {
        match self {
            CutPhase::Planned | CutPhase::Freezing | CutPhase::Cutting => Some(NodePhase::Pending),
            CutPhase::Held => Some(NodePhase::Cut),
            CutPhase::Released => Some(NodePhase::Released),
            CutPhase::Aborted => Some(NodePhase::Aborted),
            CutPhase::Failed => Some(NodePhase::Failed),
            CutPhase::Thawing { .. }
            | CutPhase::Settling { .. }
            | CutPhase::Deleting { .. }
            | CutPhase::Forgotten => None,
        }
    }
}

/// The phase a cut is in when an agent starts and finds its journaled `stage`: a cut that may have
/// been frozen is aborted (thawed, its snapshots deleted), since no process holds its freeze any
/// more and no freeze call of the dead process can still be in flight.
pub fn recovered(stage: Stage) -> CutPhase {
    match stage {
        Stage::Freezing | Stage::Held => CutPhase::Thawing {
            outcome: Outcome::Aborted,
            freezes_in_flight: false,
        },
        Stage::Released => CutPhase::Released,
        Stage::Aborted => CutPhase::Aborted,
        Stage::Failed => CutPhase::Failed,
    }
}

impl Outcome {
    /// The journal stage of this end.
    pub fn stage(self) -> Stage {
        match self {
            Outcome::Released => Stage::Released,
            Outcome::Aborted => Stage::Aborted,
            Outcome::Failed => Stage::Failed,
        }
    }
}

/// How consistent the cut's snapshots are with each other (typed, never parsed from a message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Consistency {
    /// Every volume was frozen while every snapshot was cut: crash-consistent as a group.
    AllFrozen,
    /// Some volume was not frozen: each snapshot is consistent on its own only.
    EachOnItsOwn,
}

impl Consistency {
    /// The phrase for the status message.
    pub fn describe(self) -> &'static str {
        match self {
            Consistency::AllFrozen => "every volume was frozen while the snapshots were cut",
            Consistency::EachOnItsOwn => {
                "not every volume was frozen: each snapshot is consistent on its own only"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CutEvent as E;
    use CutPhase as P;

    fn thawing(outcome: Outcome, freezes_in_flight: bool) -> CutPhase {
        P::Thawing {
            outcome,
            freezes_in_flight,
        }
    }

    fn run(events: &[CutEvent]) -> Result<CutPhase, Illegal> {
        events.iter().try_fold(P::Planned, |p, &e| on(p, e))
    }

    const ALL_EVENTS: [CutEvent; 11] = [
        E::IntentJournaled,
        E::Fail,
        E::FreezesReturned,
        E::SnapshotsCut,
        E::Release,
        E::Abort,
        E::AllThawed,
        E::EndJournaled,
        E::Finalize { retain: true },
        E::Finalize { retain: false },
        E::Deleted,
    ];

    fn all_phases() -> Vec<CutPhase> {
        let outcomes = [Outcome::Released, Outcome::Aborted, Outcome::Failed];
        let mut v = vec![
            P::Planned,
            P::Freezing,
            P::Cutting,
            P::Held,
            P::Released,
            P::Aborted,
            P::Failed,
            P::Deleting { keep: true },
            P::Deleting { keep: false },
            P::Forgotten,
        ];
        for o in outcomes {
            v.push(thawing(o, true));
            v.push(thawing(o, false));
            v.push(P::Settling { outcome: o });
        }
        v
    }

    #[test]
    fn the_happy_paths() {
        let table: &[(&[CutEvent], CutPhase)] = &[
            // Held, then released by the controller.
            (
                &[
                    E::IntentJournaled,
                    E::FreezesReturned,
                    E::SnapshotsCut,
                    E::Release,
                    E::AllThawed,
                    E::EndJournaled,
                ],
                P::Released,
            ),
            // Then the GroupSnapshot is deleted with Retain, then with Delete.
            (
                &[
                    E::IntentJournaled,
                    E::FreezesReturned,
                    E::SnapshotsCut,
                    E::Release,
                    E::AllThawed,
                    E::EndJournaled,
                    E::Finalize { retain: true },
                ],
                P::Deleting { keep: true },
            ),
            (
                &[
                    E::IntentJournaled,
                    E::FreezesReturned,
                    E::SnapshotsCut,
                    E::Release,
                    E::AllThawed,
                    E::EndJournaled,
                    E::Finalize { retain: false },
                    E::Deleted,
                ],
                P::Forgotten,
            ),
            // A refusal before anything is frozen.
            (&[E::Fail, E::EndJournaled], P::Failed),
            // A freeze failure under Required.
            (
                &[
                    E::IntentJournaled,
                    E::FreezesReturned,
                    E::Fail,
                    E::AllThawed,
                    E::EndJournaled,
                ],
                P::Failed,
            ),
        ];
        for (events, want) in table {
            assert_eq!(run(events), Ok(*want), "{events:?}");
        }
    }

    #[test]
    fn an_abort_while_a_freeze_is_in_flight_stays_frozen_until_it_returns() {
        let p = run(&[E::IntentJournaled, E::Abort]).unwrap();
        assert_eq!(p, thawing(Outcome::Aborted, true));
        assert!(p.may_be_frozen());
        assert!(!p.accepts_freezes(), "a late freeze is thawed at once");
        assert_eq!(p.journal_stage(), Some(Stage::Freezing));
        // Thawing what is frozen now does not make the cut thawed: a call is still in flight.
        assert_eq!(
            on(p, E::AllThawed),
            Err(Illegal {
                phase: p,
                event: E::AllThawed
            })
        );
        let p = on(p, E::FreezesReturned).unwrap();
        assert_eq!(p, thawing(Outcome::Aborted, false));
        let p = on(p, E::AllThawed).unwrap();
        assert!(!p.may_be_frozen());
        assert_eq!(p.journal_stage(), Some(Stage::Aborted));
        assert_eq!(on(p, E::EndJournaled), Ok(P::Aborted));
    }

    #[test]
    fn nothing_is_published_before_it_is_journaled() {
        // Released but the journal write failed: still Settling, nothing new to publish, retried.
        let p = run(&[
            E::IntentJournaled,
            E::FreezesReturned,
            E::SnapshotsCut,
            E::Release,
            E::AllThawed,
        ])
        .unwrap();
        assert_eq!(
            p,
            P::Settling {
                outcome: Outcome::Released
            }
        );
        assert_eq!(p.published(), None);
        assert!(!p.may_be_frozen());
        // The NodeSnapshot cannot be finalized before its end is durable.
        assert!(on(p, E::Finalize { retain: true }).is_err());
        assert_eq!(
            on(p, E::EndJournaled).map(CutPhase::published),
            Ok(Some(NodePhase::Released))
        );
    }

    #[test]
    fn abort_wins_over_a_release_and_nothing_resurrects_an_abort() {
        let table: &[(CutPhase, CutEvent, CutPhase)] = &[
            (
                thawing(Outcome::Released, false),
                E::Abort,
                thawing(Outcome::Aborted, false),
            ),
            (
                P::Settling {
                    outcome: Outcome::Released,
                },
                E::Abort,
                P::Settling {
                    outcome: Outcome::Aborted,
                },
            ),
            (
                P::Released,
                E::Abort,
                P::Settling {
                    outcome: Outcome::Aborted,
                },
            ),
            (P::Aborted, E::Release, P::Aborted),
            (P::Failed, E::Release, P::Failed),
            (P::Failed, E::Abort, P::Failed),
            (
                thawing(Outcome::Aborted, true),
                E::Release,
                thawing(Outcome::Aborted, true),
            ),
            (
                thawing(Outcome::Failed, false),
                E::Abort,
                thawing(Outcome::Failed, false),
            ),
            (
                P::Settling {
                    outcome: Outcome::Aborted,
                },
                E::Release,
                P::Settling {
                    outcome: Outcome::Aborted,
                },
            ),
        ];
        for &(from, event, want) in table {
            assert_eq!(on(from, event), Ok(want), "{from:?} + {event:?}");
        }
    }

    #[test]
    fn illegal_events_are_refused() {
        let table: &[(CutPhase, CutEvent)] = &[
            (P::Planned, E::FreezesReturned),
            (P::Planned, E::Release),
            (P::Freezing, E::Release),
            (P::Freezing, E::SnapshotsCut),
            (P::Cutting, E::Release),
            (P::Held, E::Finalize { retain: false }),
            (P::Held, E::AllThawed),
            (P::Freezing, E::Finalize { retain: true }),
            (P::Released, E::Fail),
            (thawing(Outcome::Released, false), E::Fail),
            (
                P::Settling {
                    outcome: Outcome::Released,
                },
                E::Fail,
            ),
            (P::Released, E::IntentJournaled),
            (P::Forgotten, E::Abort),
        ];
        for &(phase, event) in table {
            assert_eq!(
                on(phase, event),
                Err(Illegal { phase, event }),
                "{phase:?} + {event:?}"
            );
        }
    }

    #[test]
    fn retention_only_keeps_released_snapshots() {
        assert_eq!(
            on(P::Released, E::Finalize { retain: true }),
            Ok(P::Deleting { keep: true })
        );
        assert_eq!(
            on(P::Aborted, E::Finalize { retain: true }),
            Ok(P::Deleting { keep: false })
        );
        assert_eq!(
            on(P::Failed, E::Finalize { retain: true }),
            Ok(P::Deleting { keep: false })
        );
        assert_eq!(
            on(P::Deleting { keep: false }, E::Finalize { retain: true }),
            Ok(P::Deleting { keep: false }),
            "a retry keeps the first decision"
        );
    }

    /// Properties over every (phase, event) pair.
    #[test]
    fn invariants_hold_for_every_transition() {
        for from in all_phases() {
            for event in ALL_EVENTS {
                let Ok(to) = on(from, event) else { continue };
                // Deterministic.
                assert_eq!(on(from, event), Ok(to));
                // Leaving "may be frozen" happens only through AllThawed (or before any freeze).
                if from.may_be_frozen() && !to.may_be_frozen() {
                    assert_eq!(event, E::AllThawed, "{from:?} + {event:?} -> {to:?}");
                    assert!(
                        matches!(
                            from,
                            P::Thawing {
                                freezes_in_flight: false,
                                ..
                            }
                        ),
                        "{from:?}"
                    );
                }
                // Freezing starts only from a journaled intent.
                if to.may_be_frozen() && !from.may_be_frozen() {
                    assert_eq!((from, event), (P::Planned, E::IntentJournaled));
                }
                // A phase with something new to publish is entered only by a journal write, or
                // it was published already (idempotent events), or it says nothing is frozen yet.
                if let Some(new) = to.published()
                    && to != from
                    && new != NodePhase::Pending
                {
                    assert!(
                        matches!(event, E::EndJournaled | E::SnapshotsCut),
                        "{from:?} + {event:?} -> {to:?} publishes {new:?} without a journal write"
                    );
                }
                // Once over, a cut never goes back to holding a freeze.
                if from.is_over() {
                    assert!(to.is_over(), "{from:?} + {event:?} -> {to:?}");
                }
                // An aborted or failed cut never ends up keeping its snapshots.
                if matches!(from.outcome(), Some(Outcome::Aborted | Outcome::Failed)) {
                    assert_ne!(to.outcome(), Some(Outcome::Released));
                    assert_ne!(to, P::Deleting { keep: true });
                }
            }
        }
    }

    #[test]
    fn a_restart_aborts_what_may_have_been_frozen() {
        for stage in [Stage::Freezing, Stage::Held] {
            let p = recovered(stage);
            assert!(p.may_be_frozen());
            assert_eq!(
                on(p, E::AllThawed).and_then(|p| on(p, E::EndJournaled)),
                Ok(P::Aborted)
            );
        }
        assert_eq!(recovered(Stage::Released), P::Released);
        assert_eq!(recovered(Stage::Aborted), P::Aborted);
        assert_eq!(recovered(Stage::Failed), P::Failed);
        for p in all_phases() {
            if let Some(stage) = p.journal_stage() {
                assert_eq!(
                    recovered(stage).may_be_frozen(),
                    p.may_be_frozen(),
                    "{p:?}: a crash in it is recovered as frozen exactly when it may be frozen"
                );
            }
        }
    }

    #[test]
    fn derived_views_agree() {
        for p in all_phases() {
            assert_eq!(
                p.journal_stage().is_some_and(Stage::may_be_frozen),
                p.may_be_frozen(),
                "{p:?}"
            );
            if p.accepts_freezes() {
                assert!(p.may_be_frozen() && !p.is_over());
            }
        }
        assert_eq!(
            Outcome::Released.phase().published(),
            Some(NodePhase::Released)
        );
        assert_eq!(
            Outcome::Aborted.phase().published(),
            Some(NodePhase::Aborted)
        );
        assert_eq!(Outcome::Failed.phase().published(), Some(NodePhase::Failed));
    }
}
