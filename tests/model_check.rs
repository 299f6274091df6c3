//! The freeze barrier (controller) and the agents' cuts with their watchdogs, model-checked with
//! stateright over every interleaving of: node reports reaching the controller late (through a
//! per-node cache that lags the API server), releases and aborts (also overwritten by a stale
//! decision), agents releasing themselves on what their own lagging sibling watches saw, the controller's deadline and give-up, watchdog firings, agent crashes and restarts
//! (the journal, the kernel's freezes and the snapshot objects survive, the process's memory does
//! not; a FIFREEZE in flight completes in the kernel), FIFREEZE calls in flight while the cut ends,
//! failing freezes, snapshot creates that fail (cleanly or leaving an object behind), refused
//! plans, and GroupSnapshot deletion with Delete and Retain at any moment, over two generations of
//! a GroupSnapshot with the same name (so a reused name meets a retained snapshot), and a central
//! snapshot (one cluster-side call over members frozen on every node) that the controller takes
//! once every node holds, or fails to take.
//!
//! Every controller decision is `barrier::next_step`, every self-release
//! `barrier::every_node_has_cut`, every agent phase change is
//! `lifecycle::on`, a restart is `lifecycle::recovered`, and the derived views (`accepts_freezes`,
//! `may_be_frozen`, `journal_stage`, `published`, `keeps_snapshots`) are the crate's own. The
//! model supplies only the environment: messages, the kernel's filesystems and snapshot objects,
//! the host's journal, crashes, and a discrete clock. The rules under test are a [`Rules`] value
//! (the real ones by default); the `mutant_*` tests pass broken rules into the same model and
//! assert that the checker finds the counterexample.
//!
//! Where the model is harsher than the design: every generation names a volume's snapshot the
//! same, so a name collision is always possible and identity (the owner recorded on the object)
//! must be checked rather than assumed; the controller's clock is free (its deadline and give-up
//! may pass at any moment, taken where they change the barrier's answer).
//!
//! Where it merges steps (a crash or another node's step in between would change nothing the
//! properties see): an agent's status write follows its journal write at once (a crash in between
//! is recovered by republishing the journal); a thaw happens under the cut's lock with the decision
//! to end it; void snapshots are deleted just before the end is journaled; a finalized cut deletes,
//! drops its journal entry and its finalizer in one step; the controller's cleanup follows the
//! user's delete. A failing delete or journal write is the step not happening yet (retried).

use std::time::Instant;

use stateright::{Checker, Model, Property};
use tandem::agent::cut::lifecycle::{self, CutEvent, CutPhase, Illegal};
use tandem::agent::journal::Stage;
use tandem::api::{NodeAction, NodePhase};
use tandem::controller::barrier::{self, Central, NodeView, ReleaseConstraints, ReleasePlan, Step};

/// The rules under test. The pure functions are the crate's; the flags stand for engine and
/// backend rules that are not pure functions in the crate (yet), modelled as the design states
/// them (where today's code differs, the flag's comment says so).
#[derive(Clone, Copy)]
struct Rules {
    next_step: fn(&[NodeView], &Central, bool, bool) -> Step,
    on: fn(CutPhase, CutEvent) -> Result<CutPhase, Illegal>,
    recovered: fn(Stage) -> CutPhase,
    /// The watchdog aborts a cut that may still be frozen when its deadline comes.
    watchdog_fires: bool,
    /// A snapshot create that finds an object of that name takes it as its own (the old bug).
    adopts_existing_name: bool,
    /// A delete removes an object only if it carries this cut's identity.
    delete_checks_identity: bool,
    /// A NodeSnapshot being deleted whose action is Abort is aborted before it is finalized, so
    /// a Retain policy never keeps the snapshots of a cut the controller aborted. (Today's
    /// `watch::reconcile` finalizes without looking at the action: see
    /// `finalizing_without_the_pending_abort_keeps_a_failed_cut`.)
    aborts_before_finalizing: bool,
    /// A filesystem is registered for thawing the moment its own FIFREEZE returns (not once
    /// every sibling's has).
    registers_each_freeze_at_once: bool,
    /// An agent holding its cut releases itself when what it saw of every node says so
    /// (`spec.groupNodes`).
    may_release_itself: fn(&[NodeView]) -> bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            next_step: barrier::next_step,
            on: lifecycle::on,
            recovered: lifecycle::recovered,
            watchdog_fires: true,
            adopts_existing_name: false,
            delete_checks_identity: true,
            aborts_before_finalizing: true,
            registers_each_freeze_at_once: true,
            may_release_itself: barrier::every_node_has_cut,
        }
    }
}

/// How big the world is.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    nodes: usize,
    volumes: usize,
    generations: u8,
    crashes: u8,
    /// Ticks from arming the watchdog (before the first freeze) to its deadline.
    watchdog_ticks: u8,
    /// Also a refused plan and a create that fails cleanly (besides a failing freeze and a
    /// create that fails leaving its object behind).
    all_failures: bool,
    /// Agents across nodes also release themselves on what their sibling watches saw
    /// (`spec.groupNodes`; without it every release is the controller's, as with quiesce holds).
    siblings: bool,
    /// The group also has members the nodes freeze and the controller cuts in one cluster-side
    /// call (an RBD group snapshot): every node's volumes stand for its local and its central
    /// members alike (one freeze, one watchdog), and the central call may fail.
    central: bool,
}

/// Two nodes, two generations of the same name (a reused name meets a retained snapshot), one
/// crash, every kind of failure; the controller releases.
const TWO_GENERATIONS: Bounds = Bounds {
    nodes: 2,
    volumes: 1,
    generations: 2,
    crashes: 1,
    watchdog_ticks: 1,
    all_failures: true,
    siblings: false,
    central: false,
};

/// Two volumes per node (one freeze returns while its sibling's is still in flight), one crash.
const TWO_VOLUMES: Bounds = Bounds {
    nodes: 2,
    volumes: 2,
    generations: 1,
    crashes: 1,
    watchdog_ticks: 1,
    all_failures: false,
    // (A self-release meets a held cut, whose freezes have all returned: what two volumes add
    // is the engine's, checked here with the controller's release.)
    siblings: false,
    central: false,
};

/// One node (it releases on its own after its cut), two volumes, two generations, one crash.
const ONE_NODE: Bounds = Bounds {
    nodes: 1,
    volumes: 2,
    generations: 2,
    crashes: 1,
    watchdog_ticks: 1,
    all_failures: true,
    siblings: false,
    central: false,
};

/// Two nodes whose agents release themselves on their sibling watches (or the controller
/// does, whichever comes first), one crash, a failing freeze and a create that fails leaving its
/// object behind. (A second generation adds nothing here: a watch stops when its NodeSnapshot is
/// deleted, and a new generation starts only once all are gone. A refused plan or a create that
/// fails cleanly fails the node before it holds anything, as a failing freeze does.)
const SIBLINGS: Bounds = Bounds {
    generations: 1,
    siblings: true,
    all_failures: false,
    ..TWO_GENERATIONS
};

/// Two nodes whose group has central members (the controller cuts them once both nodes hold),
/// one crash, a failing freeze, a create that fails leaving its object behind, and a failing
/// central call. (One generation: the central snapshot is named after its GroupSnapshot's uid, so
/// generations never share one; a refused plan or a create that fails cleanly fails a node
/// before anything is frozen, as a failing freeze does.)
const CENTRAL: Bounds = Bounds {
    generations: 1,
    all_failures: false,
    central: true,
    ..TWO_GENERATIONS
};

/// One node with central members: it must not release itself after its own cut.
const CENTRAL_ONE_NODE: Bounds = Bounds {
    nodes: 1,
    volumes: 1,
    generations: 1,
    all_failures: false,
    central: true,
    ..TWO_GENERATIONS
};

/// The smallest world that still has every kind of step (for the mutants).
const ONE_GENERATION: Bounds = Bounds {
    generations: 1,
    ..TWO_GENERATIONS
};

struct Tandem {
    rules: Rules,
    bounds: Bounds,
    /// Check only this property (a mutant's run stops as soon as it is found).
    only: Option<&'static str>,
}

/// A filesystem as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fs {
    Thawed,
    /// A FIFREEZE call has not returned yet.
    FreezeInFlight,
    Frozen,
}

/// A snapshot object in a backend (an LV, a clone file, a subvolume), under the volume's
/// snapshot name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SnapshotObject {
    /// The generation (NodeSnapshot uid) of the cut that created it.
    owner: u8,
    /// Its filesystem was frozen by that cut when it was created.
    cut_while_frozen: bool,
    /// Released, then its GroupSnapshot was deleted with Retain (ghost: it must stay).
    retained: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Watchdog {
    Unarmed,
    /// `ticks_left` until the deadline; `woken`: the thread has run at the deadline.
    Armed {
        ticks_left: u8,
        woken: bool,
    },
    /// The deadline tick has passed.
    Expired,
}

/// The agent's in-memory cut (lost in a crash).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Cut {
    generation: u8,
    phase: CutPhase,
    watchdog: Watchdog,
    freezes_issued: bool,
    made: Vec<bool>,
}

/// The journal on the host disk (survives a crash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct JournalEntry {
    generation: u8,
    stage: Stage,
}

/// The NodeSnapshot as stored by the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct NodeSnapshot {
    action: NodeAction,
    phase: NodePhase,
    retain: bool,
    deleting: bool,
}

/// What an agent's sibling watch last saw of one node's NodeSnapshot. (Its generation and
/// deletion need no field: a watch runs only while its own NodeSnapshot is not being deleted, a
/// deletion marks every node's at once, and a new generation starts only once all are gone, so
/// whatever a watch saw is of its own generation and of objects not being deleted.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Seen {
    action: NodeAction,
    phase: NodePhase,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    api: Option<NodeSnapshot>,
    /// The controller's cache of `api` (lags behind it).
    cache: Option<(NodeAction, NodePhase)>,
    /// The agent's sibling watch, by node (lags behind each `api`; lost in a crash; running only
    /// while this node's NodeSnapshot asks to prepare or cut).
    seen: Vec<Option<Seen>>,
    fs: Vec<Fs>,
    store: Vec<Option<SnapshotObject>>,
    journal: Option<JournalEntry>,
    up: bool,
    cut: Option<Cut>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum GroupPhase {
    Cutting,
    Releasing,
    Ready,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GroupSnapshot {
    retain: bool,
    phase: GroupPhase,
    deadline_passed: bool,
    give_up: bool,
    deleting: bool,
    /// Ghost: at some instant every member filesystem was frozen.
    frozen_together: bool,
    /// The central call failed (recorded in the GroupSnapshot's status).
    central_failed: bool,
}

/// The central snapshot in the storage cluster (named after its GroupSnapshot: survives every
/// crash, as the cluster does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CentralSnapshot {
    owner: u8,
    /// Ghost: every member filesystem was frozen when it was taken.
    cut_while_frozen: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    generation: u8,
    group: Option<GroupSnapshot>,
    nodes: Vec<Node>,
    central: Option<CentralSnapshot>,
    crashes_left: u8,
    /// Ghost: the controller declared Ready without one common cut.
    ready_without_one_cut: bool,
    /// Ghost: a retained snapshot was deleted.
    retained_deleted: bool,
    /// Ghost: a snapshot was kept (Retain) from a GroupSnapshot that never became Ready.
    kept_from_unready: bool,
    /// Ghost: the engine sent an event the lifecycle refused where it must not.
    unexpected_illegal: Option<(CutPhase, CutEvent)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CreateResult {
    Made,
    Failed,
    /// The create reported an error but left an object behind.
    FailedLeavingObject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    CreateGroupSnapshot {
        retain: bool,
    },
    DeleteGroupSnapshot,
    CacheSync(usize),
    /// Node `node`'s sibling watch catches up with node `of`'s NodeSnapshot.
    SiblingSync {
        node: usize,
        of: usize,
    },
    /// The agent releases its held cut on what its sibling watch saw.
    ReleaseItself(usize),
    ControllerDecides,
    /// The controller's central call fails (an image locked exclusively): nothing is left of it.
    CentralCallFails,
    ControllerDeadline,
    ControllerGivesUp,
    GroupSnapshotGone,
    Observe(usize),
    /// The agent's Prepare finds a volume it cannot cut: Failed, nothing frozen anywhere.
    PrepareRefused(usize),
    Begin {
        node: usize,
        ok: bool,
    },
    IssueFreezes(usize),
    FreezeReturns {
        node: usize,
        volume: usize,
        ok: bool,
    },
    CreateSnapshot {
        node: usize,
        volume: usize,
        result: CreateResult,
    },
    JournalHeld(usize),
    DeleteVoid(usize),
    JournalEnd(usize),
    FinishDeletion(usize),
    RemoveFinalizer(usize),
    WatchdogWakes(usize),
    Tick,
    Crash(usize),
    Restart(usize),
}

fn node_name(n: usize) -> String {
    format!("node-{n}")
}

impl Tandem {
    fn new(rules: Rules, bounds: Bounds) -> Self {
        Tandem {
            rules,
            bounds,
            only: None,
        }
    }

    fn deletable(&self, node: &Node, generation: u8, v: usize) -> bool {
        node.store[v].is_some_and(|o| !self.rules.delete_checks_identity || o.owner == generation)
    }

    /// Deletes the cut's snapshot objects (by its planned names, checking identity).
    fn delete_own(&self, w: &mut World, n: usize, generation: u8) {
        for v in 0..self.bounds.volumes {
            if self.deletable(&w.nodes[n], generation, v) {
                if w.nodes[n].store[v].is_some_and(|o| o.retained) {
                    w.retained_deleted = true;
                }
                w.nodes[n].store[v] = None;
            }
        }
    }

    /// Applies `event` to node `n`'s cut through the lifecycle. A refusal of an event the
    /// lifecycle may refuse by its rules is ignored; any other refusal is a finding.
    fn event(&self, w: &mut World, n: usize, event: CutEvent) {
        let refusable = may_be_refused(event);
        let Some(cut) = w.nodes[n].cut.as_mut() else {
            return;
        };
        match (self.rules.on)(cut.phase, event) {
            Ok(next) => cut.phase = next,
            Err(Illegal { phase, event }) => {
                if !refusable {
                    w.unexpected_illegal = Some((phase, event));
                }
            }
        }
        self.react(w, n);
    }

    /// What the engine does at once, under the cut's lock, on entering a phase: a thawing cut
    /// thaws every filesystem registered as frozen, then reports AllThawed (refused while freeze
    /// calls are in flight) or, once the last call returned, FreezesReturned.
    fn react(&self, w: &mut World, n: usize) {
        loop {
            let node = &mut w.nodes[n];
            let Some(cut) = node.cut.as_mut() else {
                return;
            };
            let CutPhase::Thawing {
                freezes_in_flight, ..
            } = cut.phase
            else {
                return;
            };
            let registered =
                self.rules.registers_each_freeze_at_once || !node.fs.contains(&Fs::FreezeInFlight);
            for fs in node.fs.iter_mut().filter(|_| registered) {
                if *fs == Fs::Frozen {
                    *fs = Fs::Thawed;
                }
            }
            if let Ok(next) = (self.rules.on)(cut.phase, CutEvent::AllThawed) {
                cut.phase = next;
                cut.watchdog = Watchdog::Unarmed;
                continue;
            }
            if freezes_in_flight && !node.fs.contains(&Fs::FreezeInFlight) {
                match (self.rules.on)(cut.phase, CutEvent::FreezesReturned) {
                    Ok(next) => cut.phase = next,
                    Err(Illegal { phase, event }) => {
                        w.unexpected_illegal = Some((phase, event));
                        return;
                    }
                }
                continue;
            }
            return;
        }
    }

    /// Writes the journal for the phase `event` leads to, then applies it; the phase is
    /// published once journaled.
    fn journaled(&self, w: &mut World, n: usize, event: CutEvent) {
        let node = &mut w.nodes[n];
        let Some(cut) = node.cut.as_mut() else {
            return;
        };
        match (self.rules.on)(cut.phase, event) {
            Ok(next) => {
                if let Some(stage) = next.journal_stage() {
                    node.journal = Some(JournalEntry {
                        generation: cut.generation,
                        stage,
                    });
                }
                cut.phase = next;
                // Published right after the journal write (merged: a crash in between is
                // recovered by republishing what the journal says).
                if let (Some(phase), Some(api)) = (next.published(), node.api.as_mut()) {
                    api.phase = phase;
                }
            }
            Err(Illegal { phase, event }) => w.unexpected_illegal = Some((phase, event)),
        }
        self.react(w, n);
    }

    /// Journals the intent and arms the watchdog (before the first freeze), or refuses.
    fn begin(&self, w: &mut World, n: usize, ok: bool) {
        if ok {
            self.journaled(w, n, CutEvent::IntentJournaled);
            if let Some(cut) = w.nodes[n].cut.as_mut()
                && cut.phase == CutPhase::Freezing
            {
                cut.watchdog = Watchdog::Armed {
                    ticks_left: self.bounds.watchdog_ticks,
                    woken: false,
                };
            }
        } else {
            // A refusal, or the intent could not be journaled.
            self.event(w, n, CutEvent::Fail);
        }
    }

    /// The NodeSnapshot is going: delete the cut's snapshots unless kept, drop the journal
    /// entry, then the finalizer.
    fn finish_deletion(&self, w: &mut World, n: usize) -> Option<()> {
        let cut = w.nodes[n].cut.as_ref()?;
        let generation = cut.generation;
        let CutPhase::Deleting { keep } = cut.phase else {
            return None;
        };
        if keep {
            let ready = w.group.is_some_and(|g| g.phase == GroupPhase::Ready);
            for o in w.nodes[n].store.iter_mut().flatten() {
                if o.owner == generation {
                    o.retained = true;
                    w.kept_from_unready |= !ready && self.only == Some(KEPT_ONLY_FROM_READY);
                }
            }
        } else {
            self.delete_own(w, n, generation);
        }
        w.nodes[n].journal = None;
        self.event(w, n, CutEvent::Deleted);
        let node = &mut w.nodes[n];
        if node.cut.as_ref()?.phase == CutPhase::Forgotten {
            node.api = None;
            node.cut = None;
        }
        Some(())
    }

    fn agent_actions(&self, w: &World, n: usize, out: &mut Vec<Action>) {
        let node = &w.nodes[n];
        if !node.up {
            return;
        }
        if node.api.is_some() {
            out.push(Action::Observe(n));
        }
        // (Left out for the state space: a lag from before this agent has a cut. A view taken
        // once there is one lags as any.)
        if self.watches_siblings(node) && node.cut.is_some() {
            for of in (0..w.nodes.len()).filter(|&m| m != n) {
                out.push(Action::SiblingSync { node: n, of });
            }
        }
        if self.may_release_itself(w, n) {
            out.push(Action::ReleaseItself(n));
        }
        if self.bounds.all_failures
            && node.cut.is_none()
            && node.api.is_some_and(|a| {
                a.action == NodeAction::Prepare && a.phase == NodePhase::Pending && !a.deleting
            })
        {
            out.push(Action::PrepareRefused(n));
        }
        let Some(cut) = &node.cut else {
            return;
        };
        if matches!(
            cut.watchdog,
            Watchdog::Armed {
                ticks_left: 0,
                woken: false
            }
        ) {
            out.push(Action::WatchdogWakes(n));
        }
        for (v, fs) in node.fs.iter().enumerate() {
            if *fs == Fs::FreezeInFlight {
                for ok in [true, false] {
                    out.push(Action::FreezeReturns {
                        node: n,
                        volume: v,
                        ok,
                    });
                }
            }
        }
        match cut.phase {
            CutPhase::Planned => {
                for ok in [true, false] {
                    if ok || self.bounds.all_failures {
                        out.push(Action::Begin { node: n, ok });
                    }
                }
            }
            CutPhase::Freezing => {
                if !cut.freezes_issued {
                    out.push(Action::IssueFreezes(n));
                }
            }
            CutPhase::Cutting => {
                for v in 0..self.bounds.volumes {
                    if !cut.made[v] {
                        for result in [
                            CreateResult::Made,
                            CreateResult::FailedLeavingObject,
                            CreateResult::Failed,
                        ]
                        .into_iter()
                        .take(if self.bounds.all_failures { 3 } else { 2 })
                        {
                            out.push(Action::CreateSnapshot {
                                node: n,
                                volume: v,
                                result,
                            });
                        }
                    }
                }
            }
            CutPhase::Held => {
                if node.journal.map(|j| j.stage) != CutPhase::Held.journal_stage() {
                    out.push(Action::JournalHeld(n));
                }
            }
            CutPhase::Thawing { .. } => {}
            CutPhase::Settling { .. } => out.push(Action::JournalEnd(n)),
            CutPhase::Aborted | CutPhase::Failed => out.push(Action::DeleteVoid(n)),
            CutPhase::Released => {}
            CutPhase::Deleting { .. } => out.push(Action::FinishDeletion(n)),
            CutPhase::Forgotten => out.push(Action::RemoveFinalizer(n)),
        }
    }

    /// Whether node `n`'s agent runs a sibling watch: across nodes, while its NodeSnapshot asks
    /// to prepare or cut and is not being deleted.
    /// Who releases: the crate's rule, for this world's group.
    fn release_plan(&self) -> ReleasePlan {
        let names: Vec<String> = (0..self.bounds.nodes).map(node_name).collect();
        barrier::release_plan(
            names.iter().map(String::as_str),
            ReleaseConstraints {
                holds: false,
                central: self.bounds.central,
                siblings_allowed: self.bounds.siblings,
            },
        )
    }

    fn watches_siblings(&self, node: &Node) -> bool {
        matches!(self.release_plan(), ReleasePlan::BySiblings(_))
            && node.seen.len() > 1
            && node.api.is_some_and(|a| {
                matches!(a.action, NodeAction::Prepare | NodeAction::Cut) && !a.deleting
            })
    }

    /// Whether node `n`'s agent holds a published cut it may release on what it saw: every
    /// other node seen in this generation, not being deleted, and the rule says so.
    fn may_release_itself(&self, w: &World, n: usize) -> bool {
        let node = &w.nodes[n];
        let (Some(cut), Some(api)) = (&node.cut, node.api) else {
            return false;
        };
        if !node.up
            || !self.watches_siblings(node)
            || api.action != NodeAction::Cut
            || cut.phase != CutPhase::Held
            || api.phase != NodePhase::Cut
        {
            return false;
        }
        let views: Option<Vec<NodeView>> = node
            .seen
            .iter()
            .enumerate()
            .map(|(m, seen)| {
                if m == n {
                    return Some(NodeView {
                        node: node_name(m),
                        action: api.action,
                        phase: NodePhase::Cut,
                        message: None,
                    });
                }
                seen.map(|s| NodeView {
                    node: node_name(m),
                    action: s.action,
                    phase: s.phase,
                    message: None,
                })
            })
            .collect();
        views.is_some_and(|v| (self.rules.may_release_itself)(&v))
    }

    /// Whether node `n`'s agent still has something to do (time counts while a watchdog is armed).
    fn agent_busy(&self, w: &World, n: usize) -> bool {
        if w.nodes[n]
            .cut
            .as_ref()
            .is_some_and(|c| matches!(c.watchdog, Watchdog::Armed { .. }))
        {
            return true;
        }
        let mut actions = Vec::new();
        self.agent_actions(w, n, &mut actions);
        actions.into_iter().any(|a| self.next_state(w, a).is_some())
    }

    /// The barrier's answer on the controller's cache, if every NodeSnapshot is cached.
    fn decision(&self, w: &World, deadline_passed: bool, give_up: bool) -> Option<Step> {
        let views: Vec<NodeView> = w
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                node.cache.map(|(action, phase)| NodeView {
                    node: node_name(i),
                    action,
                    phase,
                    message: None,
                })
            })
            .collect::<Option<_>>()?;
        Some((self.rules.next_step)(
            &views,
            &self.central_view(w),
            deadline_passed,
            give_up,
        ))
    }

    /// What the controller reads of the central snapshot: its own failure record, else whether
    /// the cluster has the snapshot of this generation's name.
    fn central_view(&self, w: &World) -> Central {
        if !self.bounds.central {
            Central::None
        } else if w.group.is_some_and(|g| g.central_failed) {
            Central::Failed("the call failed".into())
        } else if w.central.is_some_and(|c| c.owner == w.generation) {
            Central::Taken
        } else {
            Central::Pending
        }
    }

    fn controller(&self, w: &mut World) -> Option<()> {
        let group = w.group?;
        let step = self.decision(w, group.deadline_passed, group.give_up)?;
        let count = w.nodes.len();
        let index = |name: &String| (0..count).find(|&i| node_name(i) == *name);
        match step {
            Step::Wait => return None,
            Step::Release(names) => {
                for i in names.iter().filter_map(index) {
                    if let Some(api) = w.nodes[i].api.as_mut() {
                        api.action = NodeAction::Release;
                    }
                }
                w.group.as_mut()?.phase = GroupPhase::Releasing;
            }
            Step::Cut(names) => {
                for i in names.iter().filter_map(index) {
                    if let Some(api) = w.nodes[i].api.as_mut() {
                        api.action = NodeAction::Cut;
                    }
                }
            }
            Step::Abort(names) => {
                for i in names.iter().filter_map(index) {
                    if let Some(api) = w.nodes[i].api.as_mut() {
                        api.action = NodeAction::Abort;
                    }
                }
            }
            Step::CentralCut => {
                let all_frozen = w
                    .nodes
                    .iter()
                    .all(|n| n.fs.iter().all(|f| *f == Fs::Frozen));
                w.central = Some(CentralSnapshot {
                    owner: w.generation,
                    cut_while_frozen: all_frozen,
                });
            }
            Step::RemoveCentral => w.central = None,
            Step::Ready => {
                let generation = w.generation;
                let central_ok = !self.bounds.central
                    || w.central
                        .is_some_and(|c| c.owner == generation && c.cut_while_frozen);
                let one_cut = group.frozen_together
                    && central_ok
                    && w.nodes.iter().all(|node| {
                        node.store
                            .iter()
                            .all(|o| o.is_some_and(|o| o.owner == generation && o.cut_while_frozen))
                    });
                if !one_cut {
                    w.ready_without_one_cut = true;
                }
                w.group.as_mut()?.phase = GroupPhase::Ready;
            }
            Step::Failed(_) => w.group.as_mut()?.phase = GroupPhase::Failed,
        }
        Some(())
    }

    fn step(&self, w: &mut World, action: Action) -> Option<()> {
        let volumes = self.bounds.volumes;
        match action {
            Action::CreateGroupSnapshot { retain } => {
                w.generation += 1;
                w.group = Some(GroupSnapshot {
                    retain,
                    phase: GroupPhase::Cutting,
                    deadline_passed: false,
                    give_up: false,
                    deleting: false,
                    frozen_together: false,
                    central_failed: false,
                });
                // The controller creates every NodeSnapshot at once; across nodes they prepare
                // first.
                let action = if w.nodes.len() > 1 {
                    NodeAction::Prepare
                } else {
                    NodeAction::Cut
                };
                for node in &mut w.nodes {
                    node.api = Some(NodeSnapshot {
                        action,
                        phase: NodePhase::Pending,
                        retain,
                        deleting: false,
                    });
                }
            }
            // The controller's cleanup follows the user's delete (merged: while it has not run
            // yet the controller merely stays idle, which it may anyway).
            Action::DeleteGroupSnapshot => {
                w.group.as_mut()?.deleting = true;
                for api in w.nodes.iter_mut().filter_map(|n| n.api.as_mut()) {
                    api.deleting = true;
                }
            }
            Action::CacheSync(n) => {
                let node = &mut w.nodes[n];
                node.cache = node.api.map(|a| (a.action, a.phase));
            }
            Action::SiblingSync { node, of } => {
                w.nodes[node].seen[of] = w.nodes[of].api.map(|a| Seen {
                    action: a.action,
                    phase: a.phase,
                });
            }
            Action::ReleaseItself(n) => {
                if !self.may_release_itself(w, n) {
                    return None;
                }
                self.event(w, n, CutEvent::Release);
            }
            Action::ControllerDecides => self.controller(w)?,
            Action::CentralCallFails => {
                let group = w.group.as_mut()?;
                if group.central_failed {
                    return None;
                }
                group.central_failed = true;
            }
            Action::ControllerDeadline => w.group.as_mut()?.deadline_passed = true,
            Action::ControllerGivesUp => w.group.as_mut()?.give_up = true,
            Action::GroupSnapshotGone => {
                // The controller's cleanup: the central snapshot stays only if kept (Retain) from
                // a Ready GroupSnapshot.
                let kept = w
                    .group
                    .is_some_and(|g| g.retain && g.phase == GroupPhase::Ready);
                if !kept {
                    w.central = None;
                }
                w.group = None;
                for node in &mut w.nodes {
                    node.cache = None;
                }
            }
            Action::Observe(n) => {
                let node = &mut w.nodes[n];
                let api = node.api?;
                let phase = node.cut.as_ref().map(|c| c.phase);
                match phase {
                    None if api.deleting => node.api = None,
                    // Prepare checks and flushes: no cut, nothing frozen, nothing journaled
                    // (and so nothing a restart forgets). Done once; a refusal is modelled
                    // by `PrepareRefused`.
                    None if api.action == NodeAction::Prepare => {
                        if api.phase != NodePhase::Pending {
                            return None;
                        }
                        node.api.as_mut()?.phase = NodePhase::Prepared;
                    }
                    None => {
                        node.cut = Some(Cut {
                            generation: w.generation,
                            phase: CutPhase::Planned,
                            watchdog: Watchdog::Unarmed,
                            freezes_issued: false,
                            made: vec![false; volumes],
                        });
                        match api.action {
                            // Merged with the intent's journal write unless a refusal is modelled.
                            NodeAction::Cut if !self.bounds.all_failures => self.begin(w, n, true),
                            NodeAction::Cut => {}
                            NodeAction::Prepare => return None,
                            NodeAction::Release => self.event(w, n, CutEvent::Release),
                            NodeAction::Abort => self.event(w, n, CutEvent::Abort),
                        }
                    }
                    Some(CutPhase::Released)
                        if api.deleting
                            && api.action == NodeAction::Abort
                            && self.rules.aborts_before_finalizing =>
                    {
                        self.event(w, n, CutEvent::Abort)
                    }
                    Some(phase) if api.deleting => match phase {
                        CutPhase::Released | CutPhase::Aborted | CutPhase::Failed => {
                            self.event(w, n, CutEvent::Finalize { retain: api.retain });
                            self.finish_deletion(w, n)?;
                        }
                        // Deleted while the cut is on: end it first, finalize once it ended.
                        CutPhase::Planned
                        | CutPhase::Freezing
                        | CutPhase::Cutting
                        | CutPhase::Held
                        | CutPhase::Thawing { .. }
                        | CutPhase::Settling { .. } => self.event(w, n, CutEvent::Abort),
                        CutPhase::Deleting { .. } | CutPhase::Forgotten => return None,
                    },
                    Some(_) => match api.action {
                        NodeAction::Cut | NodeAction::Prepare => return None,
                        NodeAction::Release => self.event(w, n, CutEvent::Release),
                        NodeAction::Abort => self.event(w, n, CutEvent::Abort),
                    },
                }
            }
            Action::PrepareRefused(n) => {
                let api = w.nodes[n].api.as_mut()?;
                if api.action != NodeAction::Prepare || api.phase != NodePhase::Pending {
                    return None;
                }
                api.phase = NodePhase::Failed;
            }
            Action::Begin { node: n, ok } => self.begin(w, n, ok),
            Action::IssueFreezes(n) => {
                let node = &mut w.nodes[n];
                let cut = node.cut.as_mut()?;
                if !cut.phase.accepts_freezes() {
                    return None;
                }
                cut.freezes_issued = true;
                node.fs.fill(Fs::FreezeInFlight);
            }
            Action::FreezeReturns {
                node: n,
                volume,
                ok,
            } => {
                let node = &mut w.nodes[n];
                if node.cut.as_ref()?.phase.accepts_freezes() {
                    node.fs[volume] = if ok { Fs::Frozen } else { Fs::Thawed };
                    let all_frozen = node.fs.iter().all(|f| *f == Fs::Frozen);
                    if !ok {
                        self.event(w, n, CutEvent::Fail);
                    } else if all_frozen {
                        self.event(w, n, CutEvent::FreezesReturned);
                    }
                } else {
                    // The cut was abandoned meanwhile: what froze is thawed at once.
                    node.fs[volume] = Fs::Thawed;
                }
                self.react(w, n);
            }
            Action::CreateSnapshot {
                node: n,
                volume,
                result,
            } => {
                let node = &mut w.nodes[n];
                let cut = node.cut.as_mut()?;
                let object = SnapshotObject {
                    owner: cut.generation,
                    cut_while_frozen: node.fs[volume] == Fs::Frozen,
                    retained: false,
                };
                let failed = if node.store[volume].is_some() {
                    // A name that exists is not this cut's object, unless the backend adopts it.
                    cut.made[volume] = self.rules.adopts_existing_name;
                    !self.rules.adopts_existing_name
                } else {
                    match result {
                        CreateResult::Made => {
                            node.store[volume] = Some(object);
                            cut.made[volume] = true;
                            false
                        }
                        CreateResult::Failed => true,
                        CreateResult::FailedLeavingObject => {
                            node.store[volume] = Some(object);
                            true
                        }
                    }
                };
                let all_made = cut.made.iter().all(|m| *m);
                if failed {
                    self.event(w, n, CutEvent::Fail);
                } else if all_made {
                    self.event(w, n, CutEvent::SnapshotsCut);
                }
            }
            Action::JournalHeld(n) => {
                let node = &mut w.nodes[n];
                let cut = node.cut.as_mut()?;
                node.journal = Some(JournalEntry {
                    generation: cut.generation,
                    stage: cut.phase.journal_stage()?,
                });
                if let (Some(phase), Some(api)) = (cut.phase.published(), node.api.as_mut()) {
                    api.phase = phase;
                }
                // A single-node group needs no round trip (`releaseAfterCut`), unless the
                // controller still has to cut centrally.
                if self.release_plan() == ReleasePlan::AfterCut {
                    self.event(w, n, CutEvent::Release);
                }
            }
            Action::DeleteVoid(n) => {
                let generation = w.nodes[n].cut.as_ref()?.generation;
                self.delete_own(w, n, generation);
            }
            Action::JournalEnd(n) => {
                let node = &w.nodes[n];
                let cut = node.cut.as_ref()?;
                let CutPhase::Settling { outcome } = cut.phase else {
                    return None;
                };
                // An end that deletes is journaled only once its snapshots are gone.
                if !outcome.keeps_snapshots() {
                    let generation = cut.generation;
                    self.delete_own(w, n, generation);
                }
                self.journaled(w, n, CutEvent::EndJournaled);
            }
            Action::FinishDeletion(n) => self.finish_deletion(w, n)?,
            Action::RemoveFinalizer(n) => {
                let node = &mut w.nodes[n];
                node.api = None;
                node.cut = None;
            }
            Action::WatchdogWakes(n) => {
                let cut = w.nodes[n].cut.as_mut()?;
                if let Watchdog::Armed { woken, .. } = &mut cut.watchdog {
                    *woken = true;
                }
                if self.rules.watchdog_fires && cut.phase.may_be_frozen() {
                    self.event(w, n, CutEvent::Abort);
                }
            }
            Action::Tick => {
                for cut in w.nodes.iter_mut().filter_map(|n| n.cut.as_mut()) {
                    cut.watchdog = match cut.watchdog {
                        Watchdog::Armed {
                            ticks_left: 0,
                            woken: true,
                        } => Watchdog::Expired,
                        Watchdog::Armed { ticks_left, woken } => Watchdog::Armed {
                            ticks_left: ticks_left.saturating_sub(1),
                            woken,
                        },
                        other => other,
                    };
                }
            }
            Action::Crash(n) => {
                w.crashes_left -= 1;
                let node = &mut w.nodes[n];
                node.up = false;
                node.cut = None;
                node.seen.fill(None);
                // The kernel completes a FIFREEZE the dead process had issued.
                for fs in node.fs.iter_mut() {
                    if *fs == Fs::FreezeInFlight {
                        *fs = Fs::Frozen;
                    }
                }
            }
            Action::Restart(n) => {
                let node = &mut w.nodes[n];
                node.up = true;
                if let Some(entry) = node.journal {
                    let phase = (self.rules.recovered)(entry.stage);
                    if phase.may_be_frozen() {
                        // Recovery thaws what the journal says may be frozen, before anything else.
                        node.fs.fill(Fs::Thawed);
                    }
                    node.cut = Some(Cut {
                        generation: entry.generation,
                        phase,
                        watchdog: Watchdog::Unarmed,
                        freezes_issued: true,
                        made: vec![false; volumes],
                    });
                    if let (Some(phase), Some(api)) = (phase.published(), node.api.as_mut()) {
                        api.phase = phase;
                    }
                    self.react(w, n);
                }
            }
        }
        Some(())
    }
}

/// Whether the lifecycle may refuse `event` as part of its rules: a Release that reaches a cut
/// that cannot release (it arrives from the API, whatever the phase), and AllThawed while freeze
/// calls are in flight. Exhaustive on purpose: a new event breaks this build until the model
/// says how it treats it.
fn may_be_refused(event: CutEvent) -> bool {
    match event {
        CutEvent::Release | CutEvent::AllThawed => true,
        CutEvent::IntentJournaled
        | CutEvent::Fail
        | CutEvent::FreezesReturned
        | CutEvent::SnapshotsCut
        | CutEvent::Abort
        | CutEvent::EndJournaled
        | CutEvent::Finalize { .. }
        | CutEvent::Deleted => false,
    }
}

impl Model for Tandem {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        let b = self.bounds;
        vec![World {
            generation: 0,
            group: None,
            central: None,
            nodes: vec![
                Node {
                    api: None,
                    cache: None,
                    seen: vec![None; b.nodes],
                    fs: vec![Fs::Thawed; b.volumes],
                    store: vec![None; b.volumes],
                    journal: None,
                    up: true,
                    cut: None,
                };
                b.nodes
            ],
            crashes_left: b.crashes,
            ready_without_one_cut: false,
            retained_deleted: false,
            kept_from_unready: false,
            unexpected_illegal: None,
        }]
    }

    fn actions(&self, w: &World, out: &mut Vec<Action>) {
        match w.group {
            None if w.generation < self.bounds.generations => {
                for retain in [false, true] {
                    out.push(Action::CreateGroupSnapshot { retain });
                }
            }
            None => {}
            Some(group) => {
                if !group.deleting {
                    out.push(Action::DeleteGroupSnapshot);
                    let driving =
                        matches!(group.phase, GroupPhase::Cutting | GroupPhase::Releasing);
                    if driving {
                        out.push(Action::ControllerDecides);
                        if self.bounds.central
                            && self.decision(w, group.deadline_passed, group.give_up)
                                == Some(Step::CentralCut)
                        {
                            out.push(Action::CentralCallFails);
                        }
                        // The controller's clock: a deadline may pass at any moment, but it is
                        // taken only where it changes the barrier's answer (passing earlier
                        // changes nothing until then).
                        // (A Failed's message is not a different answer.)
                        let step = |deadline, give_up| {
                            self.decision(w, deadline, give_up).map(|s| match s {
                                Step::Failed(_) => Step::Failed(String::new()),
                                other => other,
                            })
                        };
                        let now = step(group.deadline_passed, group.give_up);
                        // (The deadline also passes where only the give-up after it matters.)
                        if !group.deadline_passed
                            && (step(true, false) != now || step(true, true) != now)
                        {
                            out.push(Action::ControllerDeadline);
                        } else if group.deadline_passed && !group.give_up && step(true, true) != now
                        {
                            out.push(Action::ControllerGivesUp);
                        }
                    }
                } else if w.nodes.iter().all(|n| n.api.is_none()) {
                    out.push(Action::GroupSnapshotGone);
                }
            }
        }
        // The cache matters only while the controller drives the barrier.
        let driving = w.group.is_some_and(|g| {
            !g.deleting && matches!(g.phase, GroupPhase::Cutting | GroupPhase::Releasing)
        });
        for (n, node) in w.nodes.iter().enumerate() {
            if driving && node.cache != node.api.map(|a| (a.action, a.phase)) {
                out.push(Action::CacheSync(n));
            }
            self.agent_actions(w, n, out);
            // A crash with no cut in memory and nothing frozen changes nothing but the budget.
            let something_to_lose = node.cut.is_some() || node.fs.contains(&Fs::Frozen);
            if node.up && w.crashes_left > 0 && something_to_lose {
                out.push(Action::Crash(n));
            }
            if !node.up {
                out.push(Action::Restart(n));
            }
        }
        // Time moves only while some watchdog is armed, and not past a deadline whose watchdog
        // thread has not run yet (it wakes at its deadline).
        let cuts = || {
            w.nodes
                .iter()
                .filter(|n| n.up)
                .filter_map(|n| n.cut.as_ref())
        };
        let armed = cuts().any(|c| matches!(c.watchdog, Watchdog::Armed { .. }));
        let due = cuts().any(|c| {
            matches!(
                c.watchdog,
                Watchdog::Armed {
                    ticks_left: 0,
                    woken: false
                }
            )
        });
        if armed && !due {
            out.push(Action::Tick);
        }
    }

    fn next_state(&self, last: &World, action: Action) -> Option<World> {
        let mut w = last.clone();
        self.step(&mut w, action)?;
        // Once the controller no longer drives the barrier its cache is never read again.
        if !w.group.is_some_and(|g| {
            !g.deleting && matches!(g.phase, GroupPhase::Cutting | GroupPhase::Releasing)
        }) {
            for node in &mut w.nodes {
                node.cache = None;
            }
        }
        // A sibling watch that stops forgets what it saw.
        for n in 0..w.nodes.len() {
            if !self.watches_siblings(&w.nodes[n]) {
                w.nodes[n].seen.fill(None);
            }
        }
        if let Some(group) = w.group.as_mut()
            && w.nodes
                .iter()
                .all(|n| n.fs.iter().all(|f| *f == Fs::Frozen))
        {
            group.frozen_together = true;
        }
        (w != *last).then_some(w)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let all = vec![
            Property::always(READY_IS_ONE_CUT, |_, w: &World| {
                let ready = w
                    .group
                    .is_some_and(|g| g.phase == GroupPhase::Ready && !g.deleting);
                !w.ready_without_one_cut
                    && (!ready
                        || w.nodes.iter().all(|n| {
                            n.store
                                .iter()
                                .all(|o| o.is_some_and(|o| o.owner == w.generation))
                        }))
            }),
            Property::always(FREEZE_BOUNDED, |_, w: &World| {
                w.nodes.iter().all(|n| {
                    !n.up
                        || !n.fs.contains(&Fs::Frozen)
                        || n.cut
                            .as_ref()
                            .is_some_and(|c| matches!(c.watchdog, Watchdog::Armed { .. }))
                })
            }),
            Property::always(FAILED_LEAVES_NOTHING, |m: &Tandem, w: &World| {
                if !w.group.is_some_and(|g| g.phase == GroupPhase::Failed) {
                    return true;
                }
                let settled = (0..w.nodes.len()).all(|n| w.nodes[n].up && !m.agent_busy(w, n));
                w.central.is_none_or(|c| c.owner != w.generation)
                    && (!settled
                        || w.nodes
                            .iter()
                            .flat_map(|n| n.store.iter().flatten())
                            .all(|o| o.owner != w.generation))
            }),
            Property::always(RETAINED_IS_KEPT, |_, w: &World| !w.retained_deleted),
            Property::always(ONE_TRIGGER, |_, w: &World| {
                let freezing = w.nodes.iter().any(|n| {
                    n.cut.as_ref().is_some_and(|c| c.generation == w.generation)
                        && n.fs
                            .iter()
                            .any(|f| matches!(f, Fs::Frozen | Fs::FreezeInFlight))
                });
                let unprepared = w.nodes.iter().any(|n| {
                    n.api.is_some_and(|a| {
                        a.action == NodeAction::Prepare && a.phase == NodePhase::Pending
                    })
                });
                !(freezing && unprepared)
            }),
            Property::always(THAW_REPORTED_TRUTHFULLY, |_, w: &World| {
                w.nodes.iter().all(|n| {
                    !n.api.is_some_and(|a| {
                        matches!(
                            a.phase,
                            NodePhase::Released | NodePhase::Aborted | NodePhase::Failed
                        )
                    }) || n.fs.iter().all(|f| *f == Fs::Thawed)
                })
            }),
            Property::always(BARRIER_ENDS, |m: &Tandem, w: &World| {
                let driving = w.group.is_some_and(|g| {
                    !g.deleting && matches!(g.phase, GroupPhase::Cutting | GroupPhase::Releasing)
                });
                if !driving {
                    return true;
                }
                let mut actions = Vec::new();
                m.actions(w, &mut actions);
                actions
                    .into_iter()
                    .filter(|a| {
                        !matches!(
                            a,
                            Action::DeleteGroupSnapshot | Action::Crash(_) | Action::Restart(_)
                        )
                    })
                    .any(|a| m.next_state(w, a).is_some())
            }),
            Property::always(EVENTS_ARE_LEGAL, |_, w: &World| {
                w.unexpected_illegal.is_none()
            }),
            Property::sometimes("a group snapshot becomes Ready", |_, w: &World| {
                w.group.is_some_and(|g| g.phase == GroupPhase::Ready)
            }),
            Property::sometimes("a group snapshot fails", |_, w: &World| {
                w.group.is_some_and(|g| g.phase == GroupPhase::Failed)
            }),
            Property::sometimes(
                "the watchdog comes due on a frozen filesystem",
                |_, w: &World| {
                    w.nodes.iter().any(|n| {
                        n.fs.contains(&Fs::Frozen)
                            && n.cut.as_ref().is_some_and(|c| {
                                c.watchdog
                                    == Watchdog::Armed {
                                        ticks_left: 0,
                                        woken: false,
                                    }
                            })
                    })
                },
            ),
            Property::sometimes("a freeze returns after its cut ended", |_, w: &World| {
                w.nodes.iter().any(|n| {
                    n.fs.contains(&Fs::FreezeInFlight)
                        && n.cut.as_ref().is_some_and(|c| c.phase.is_over())
                })
            }),
            Property::sometimes("an agent dies holding a freeze", |_, w: &World| {
                w.nodes.iter().any(|n| !n.up && n.fs.contains(&Fs::Frozen))
            }),
        ];
        let mut all = all;
        if self.bounds.central {
            all.push(Property::sometimes(
                "a central snapshot is taken while a node has already thawed",
                |_, w: &World| w.central.is_some_and(|c| !c.cut_while_frozen),
            ));
            all.push(Property::sometimes(
                "a group snapshot with a central snapshot becomes Ready",
                |_, w: &World| {
                    w.central.is_some() && w.group.is_some_and(|g| g.phase == GroupPhase::Ready)
                },
            ));
            all.push(Property::sometimes(
                "a failed central call fails the group snapshot",
                |_, w: &World| {
                    w.group
                        .is_some_and(|g| g.central_failed && g.phase == GroupPhase::Failed)
                },
            ));
        }
        if self.bounds.generations >= 2 {
            all.push(Property::sometimes(
                REUSED_NAME_MEETS_RETAINED,
                |_, w: &World| {
                    w.generation >= 2
                        && w.nodes
                            .iter()
                            .flat_map(|n| n.store.iter().flatten())
                            .any(|o| o.retained && o.owner < w.generation)
                },
            ));
        }
        if self.bounds.volumes >= 2 {
            all.push(Property::sometimes(
                "the watchdog comes due with one freeze returned and its sibling's in flight",
                |_, w: &World| {
                    w.nodes.iter().any(|n| {
                        n.fs.contains(&Fs::Frozen)
                            && n.fs.contains(&Fs::FreezeInFlight)
                            && n.cut.as_ref().is_some_and(|c| {
                                c.watchdog
                                    == Watchdog::Armed {
                                        ticks_left: 0,
                                        woken: false,
                                    }
                            })
                    })
                },
            ));
        }
        // Not a promise tandem makes today (see `retain_keeps_half_of_a_group_that_never_became_ready`).
        all.push(Property::always(KEPT_ONLY_FROM_READY, |_, w: &World| {
            !w.kept_from_unready
        }));
        match self.only {
            Some(name) => all.into_iter().filter(|p| p.name == name).collect(),
            None => all
                .into_iter()
                .filter(|p| p.name != KEPT_ONLY_FROM_READY)
                .collect(),
        }
    }
}

const READY_IS_ONE_CUT: &str =
    "Ready only if every member was frozen at one instant and every member snapshot is this cut's";
const FREEZE_BOUNDED: &str = "no filesystem stays frozen past its watchdog deadline";
const FAILED_LEAVES_NOTHING: &str =
    "a Failed group snapshot leaves no snapshot of its cut, central or on a node";
const RETAINED_IS_KEPT: &str = "a retained snapshot is never deleted";
const ONE_TRIGGER: &str = "no node freezes while another is still preparing (one trigger)";
const REUSED_NAME_MEETS_RETAINED: &str =
    "a retained snapshot outlives its GroupSnapshot and meets the next one of that name";
const KEPT_ONLY_FROM_READY: &str = "Retain keeps only the snapshots of a Ready GroupSnapshot";
const THAW_REPORTED_TRUTHFULLY: &str =
    "a node reports Released, Aborted or Failed only once nothing is frozen or being frozen";
const BARRIER_ENDS: &str =
    "a group snapshot being cut can always move on without the user or an agent's restart";
const EVENTS_ARE_LEGAL: &str = "the engine never sends the lifecycle an event it refuses";

/// Checks every property over every reachable state (BFS: a counterexample is a shortest one).
fn check_everything(bounds: Bounds) {
    let started = Instant::now();
    let checker = Tandem::new(Rules::default(), bounds)
        .checker()
        .threads(1)
        .spawn_bfs()
        .join();
    println!(
        "model check: {} states, {:.1} s, {bounds:?}",
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    checker.assert_properties();
}

#[test]
fn the_real_rules_keep_every_promise_over_two_generations() {
    check_everything(TWO_GENERATIONS);
}

#[test]
fn the_real_rules_keep_every_promise_with_two_volumes_per_node() {
    check_everything(TWO_VOLUMES);
}

#[test]
fn the_real_rules_keep_every_promise_when_agents_release_themselves() {
    check_everything(SIBLINGS);
}

#[test]
fn the_real_rules_keep_every_promise_on_one_node() {
    check_everything(ONE_NODE);
}

#[test]
fn the_real_rules_keep_every_promise_with_a_central_cut() {
    check_everything(CENTRAL);
}

#[test]
fn the_real_rules_keep_every_promise_with_a_central_cut_on_one_node() {
    check_everything(CENTRAL_ONE_NODE);
}

/// Runs `rules` checking only `property` (BFS: the shortest counterexample) and asserts one is
/// found; prints it.
fn assert_caught(rules: Rules, bounds: Bounds, property: &'static str) {
    let started = Instant::now();
    let model = Tandem {
        only: Some(property),
        ..Tandem::new(rules, bounds)
    };
    let checker = model.checker().threads(1).spawn_bfs().join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("the mutant was not caught by {property:?}"));
    println!(
        "caught by {property:?} after {} states, {:.1} s:",
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    for action in path.into_actions() {
        println!("  {action:?}");
    }
}

fn releases_when_any_node_cut(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    let cut: Vec<String> = nodes
        .iter()
        .filter(|n| n.phase == NodePhase::Cut && n.action == NodeAction::Cut)
        .map(|n| n.node.clone())
        .collect();
    let failing = nodes.iter().any(|n| {
        matches!(n.phase, NodePhase::Failed | NodePhase::Aborted) || n.action == NodeAction::Abort
    });
    if !cut.is_empty() && !failing {
        return Step::Release(cut);
    }
    barrier::next_step(nodes, central, deadline, give_up)
}

#[test]
fn mutant_barrier_releasing_on_any_cut_is_caught() {
    assert_caught(
        Rules {
            next_step: releases_when_any_node_cut,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        READY_IS_ONE_CUT,
    );
}

#[test]
fn mutant_watchdog_that_never_fires_is_caught() {
    assert_caught(
        Rules {
            watchdog_fires: false,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        FREEZE_BOUNDED,
    );
}

#[test]
fn mutant_backend_adopting_an_existing_name_is_caught() {
    assert_caught(
        Rules {
            adopts_existing_name: true,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..TWO_GENERATIONS
        },
        READY_IS_ONE_CUT,
    );
}

#[test]
fn mutant_delete_without_identity_is_caught() {
    assert_caught(
        Rules {
            delete_checks_identity: false,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..TWO_GENERATIONS
        },
        RETAINED_IS_KEPT,
    );
}

fn all_thawed_despite_freezes_in_flight(
    phase: CutPhase,
    event: CutEvent,
) -> Result<CutPhase, Illegal> {
    match (phase, event) {
        (CutPhase::Thawing { outcome, .. }, CutEvent::AllThawed) => {
            Ok(CutPhase::Settling { outcome })
        }
        _ => lifecycle::on(phase, event),
    }
}

#[test]
fn mutant_lifecycle_thawed_while_a_freeze_is_in_flight_is_caught() {
    assert_caught(
        Rules {
            on: all_thawed_despite_freezes_in_flight,
            ..Rules::default()
        },
        ONE_GENERATION,
        FREEZE_BOUNDED,
    );
    assert_caught(
        Rules {
            on: all_thawed_despite_freezes_in_flight,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        THAW_REPORTED_TRUTHFULLY,
    );
}

fn release_survives_abort(phase: CutPhase, event: CutEvent) -> Result<CutPhase, Illegal> {
    match (phase, event) {
        (CutPhase::Released, CutEvent::Abort) => Ok(CutPhase::Released),
        _ => lifecycle::on(phase, event),
    }
}

#[test]
fn mutant_lifecycle_where_a_release_survives_an_abort_is_caught() {
    assert_caught(
        Rules {
            on: release_survives_abort,
            ..Rules::default()
        },
        ONE_GENERATION,
        FAILED_LEAVES_NOTHING,
    );
}

fn recovery_trusting_a_held_cut(stage: Stage) -> CutPhase {
    match stage {
        Stage::Held => CutPhase::Released,
        Stage::Freezing | Stage::Released | Stage::Aborted | Stage::Failed => {
            lifecycle::recovered(stage)
        }
    }
}

#[test]
fn mutant_recovery_that_does_not_thaw_a_held_cut_is_caught() {
    assert_caught(
        Rules {
            recovered: recovery_trusting_a_held_cut,
            ..Rules::default()
        },
        ONE_GENERATION,
        FREEZE_BOUNDED,
    );
}

/// Today's agent (`watch::reconcile` → `Engine::finalize`) finalizes a deleted NodeSnapshot
/// without applying the Abort in its spec. The checker finds: the controller gives up on a node
/// that had released but not yet seen its Abort, the GroupSnapshot is Failed and deleted with
/// Retain, and that node keeps its snapshot of the failed cut.
#[test]
fn finalizing_without_the_pending_abort_keeps_a_failed_cut() {
    assert_caught(
        Rules {
            aborts_before_finalizing: false,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        FAILED_LEAVES_NOTHING,
    );
}

/// A finding, not a promise yet: deleting a GroupSnapshot with Retain before it is Ready keeps the
/// snapshots of the nodes that had released (the others abort), so half a group is retained with
/// nothing accounting for it. The controller could set the NodeSnapshots' policy to Delete (or
/// abort them) when it deletes a GroupSnapshot that is not Ready; until then this asserts the
/// checker still finds the case.
#[test]
fn retain_keeps_half_of_a_group_that_never_became_ready() {
    assert_caught(
        Rules::default(),
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        KEPT_ONLY_FROM_READY,
    );
}

/// A barrier that sends each node its Cut as soon as that node has prepared, not once all have.
fn cuts_each_node_once_prepared(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    let prepared: Vec<String> = nodes
        .iter()
        .filter(|n| n.action == NodeAction::Prepare && n.phase == NodePhase::Prepared)
        .map(|n| n.node.clone())
        .collect();
    let failing = nodes.iter().any(|n| {
        matches!(n.phase, NodePhase::Failed | NodePhase::Aborted) || n.action == NodeAction::Abort
    });
    if !prepared.is_empty() && !failing && !deadline {
        return Step::Cut(prepared);
    }
    barrier::next_step(nodes, central, deadline, give_up)
}

#[test]
fn mutant_barrier_cutting_each_node_once_it_prepared_is_caught() {
    assert_caught(
        Rules {
            next_step: cuts_each_node_once_prepared,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        ONE_TRIGGER,
    );
}

fn ready_when_all_cut(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    let all_cut = nodes
        .iter()
        .all(|n| matches!(n.phase, NodePhase::Cut | NodePhase::Released));
    let aborting = nodes.iter().any(|n| n.action == NodeAction::Abort);
    if all_cut && !aborting {
        return Step::Ready;
    }
    barrier::next_step(nodes, central, deadline, give_up)
}

#[test]
fn mutant_barrier_ready_before_every_node_released_is_caught() {
    assert_caught(
        Rules {
            next_step: ready_when_all_cut,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..ONE_GENERATION
        },
        READY_IS_ONE_CUT,
    );
}

#[test]
fn mutant_engine_registering_freezes_only_once_all_returned_is_caught() {
    assert_caught(
        Rules {
            registers_each_freeze_at_once: false,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..TWO_VOLUMES
        },
        FREEZE_BOUNDED,
    );
}

/// The barrier as it was before the model check found that a release which a node never
/// confirms kept the GroupSnapshot Releasing forever (give-up covered only the abort path).
fn barrier_without_a_release_deadline(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    let releasing = nodes.iter().all(|n| {
        matches!(n.phase, NodePhase::Cut | NodePhase::Released) && n.action != NodeAction::Abort
    });
    barrier::next_step(nodes, central, deadline, give_up && !releasing)
}

#[test]
fn mutant_barrier_without_a_release_deadline_is_caught() {
    assert_caught(
        Rules {
            next_step: barrier_without_a_release_deadline,
            ..Rules::default()
        },
        ONE_GENERATION,
        BARRIER_ENDS,
    );
}

/// An agent that releases itself once it has cut, whatever its siblings show.
fn releases_itself_on_its_own_cut(nodes: &[NodeView]) -> bool {
    nodes
        .iter()
        .any(|n| n.phase == NodePhase::Cut && n.action == NodeAction::Cut)
}

#[test]
fn mutant_agent_releasing_itself_before_every_node_cut_is_caught() {
    assert_caught(
        Rules {
            may_release_itself: releases_itself_on_its_own_cut,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..SIBLINGS
        },
        READY_IS_ONE_CUT,
    );
}

/// A barrier that releases as soon as every node holds, the central snapshot taken or not.
fn releases_without_the_central_cut(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    let central = match central {
        Central::Pending => &Central::Taken,
        other => other,
    };
    barrier::next_step(nodes, central, deadline, give_up)
}

#[test]
fn mutant_barrier_releasing_before_the_central_cut_is_caught() {
    assert_caught(
        Rules {
            next_step: releases_without_the_central_cut,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..CENTRAL
        },
        READY_IS_ONE_CUT,
    );
}

/// A barrier that fails the group snapshot without removing its central snapshot.
fn fails_keeping_the_central_snapshot(
    nodes: &[NodeView],
    central: &Central,
    deadline: bool,
    give_up: bool,
) -> Step {
    match barrier::next_step(nodes, central, deadline, give_up) {
        Step::RemoveCentral => barrier::next_step(nodes, &Central::Pending, deadline, give_up),
        step => step,
    }
}

#[test]
fn mutant_barrier_failing_without_removing_the_central_snapshot_is_caught() {
    assert_caught(
        Rules {
            next_step: fails_keeping_the_central_snapshot,
            ..Rules::default()
        },
        Bounds {
            crashes: 0,
            ..CENTRAL
        },
        FAILED_LEAVES_NOTHING,
    );
}
