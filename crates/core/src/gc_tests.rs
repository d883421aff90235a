//! Unit tests of `hyperjob gc`: its rule, and its decisions over a backend without VMs.

use super::*;
use crate::plugin::OwnedVm;

/// A job with a ready state, an idle lock, a living runner and its VM present.
fn running_job() -> Observed {
    Observed {
        now: 50,
        deadline: Some(100),
        active: false,
        phase: Some(Phase::Ready),
        runner_alive: Some(true),
        vm: VmSeen::Exists,
        held_until: None,
    }
}

#[test]
fn a_running_job_between_stages_is_kept() {
    assert_eq!(judge(&running_job()), Verdict::Keep);
    let no_runner_recorded = Observed {
        runner_alive: None,
        ..running_job()
    };
    assert_eq!(judge(&no_runner_recorded), Verdict::Keep);
}

#[test]
fn past_deadline_is_garbage_even_while_active() {
    let seen = Observed {
        now: 101,
        active: true,
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::DeadlinePassed);
}

#[test]
fn an_active_job_is_kept_whatever_else_is_seen() {
    for seen in [
        Observed {
            vm: VmSeen::Absent,
            ..running_job()
        },
        Observed {
            phase: Some(Phase::Creating),
            ..running_job()
        },
        Observed {
            runner_alive: Some(false),
            ..running_job()
        },
    ] {
        let seen = Observed {
            active: true,
            ..seen
        };
        assert_eq!(judge(&seen), Verdict::Keep, "{seen:?}");
    }
}

#[test]
fn an_idle_job_without_its_vm_is_gone() {
    let seen = Observed {
        vm: VmSeen::Absent,
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::Gone);
    let files_only = Observed {
        deadline: None,
        phase: None,
        runner_alive: None,
        ..seen
    };
    assert_eq!(judge(&files_only), Verdict::Gone);
}

#[test]
fn a_prepare_that_died_creating_is_dead_at_once() {
    let seen = Observed {
        phase: Some(Phase::Creating),
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::PrepareKilled);
}

#[test]
fn a_cleanup_whose_background_teardown_died_is_finished_at_once_unless_it_still_works() {
    let orphaned = Observed {
        phase: Some(Phase::Destroying),
        ..running_job()
    };
    let finishing = Observed {
        active: true,
        ..orphaned.clone()
    };

    assert_eq!(judge(&orphaned), Verdict::CleanupUnfinished);
    assert_eq!(judge(&finishing), Verdict::Keep);
}

#[test]
fn a_job_whose_runner_is_gone_is_gone() {
    let seen = Observed {
        runner_alive: Some(false),
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::RunnerGone);
}

#[test]
fn a_held_vm_is_kept_until_its_hold_expires_whatever_its_runner_and_deadline() {
    let held = Observed {
        now: 500,
        phase: Some(Phase::Held),
        runner_alive: Some(false),
        held_until: Some(600),
        ..running_job()
    };
    assert_eq!(judge(&held), Verdict::Keep);
    let expired = Observed { now: 601, ..held };
    assert_eq!(judge(&expired), Verdict::HoldExpired);
    assert_eq!(
        crate::metrics::removal_reason(&Verdict::HoldExpired.reason(None)),
        "hold_expired"
    );
    let vm_removed_by_hand = Observed {
        vm: VmSeen::Absent,
        ..held
    };
    assert_eq!(judge(&vm_removed_by_hand), Verdict::Gone);
    let not_ours = Observed {
        vm: VmSeen::NotOurs,
        ..expired
    };
    assert_eq!(judge(&not_ours), Verdict::HoldExpired);
    // `hyperjob hold release` or a new prepare of the job id holds its lock.
    let busy = Observed {
        active: true,
        ..expired
    };
    assert_eq!(judge(&busy), Verdict::DeadlinePassed);
    let busy_in_time = Observed { now: 60, ..busy };
    assert_eq!(judge(&busy_in_time), Verdict::Keep);
}

#[test]
fn a_vm_that_is_not_provably_ours_never_counts_as_gone() {
    let seen = Observed {
        vm: VmSeen::NotOurs,
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::Keep);
    let without_state = Observed {
        deadline: None,
        phase: None,
        runner_alive: None,
        ..seen
    };
    assert_eq!(judge(&without_state), Verdict::Keep);
}

#[test]
fn a_vm_without_state_is_kept_until_its_recorded_deadline() {
    let seen = Observed {
        phase: None,
        runner_alive: None,
        ..running_job()
    };
    assert_eq!(judge(&seen), Verdict::Keep);
    assert_eq!(
        judge(&Observed { now: 101, ..seen }),
        Verdict::DeadlinePassed
    );
}

/// Lists fixed VMs and records what it is asked to destroy: gc's decisions, without VMs.
struct Listed {
    vms: Vec<OwnedVm>,
    /// What a lookup by name finds now, where it differs from the (older) listing.
    now: Vec<(String, VmPresence)>,
    destroyed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Backend for Listed {
    fn create(
        &self,
        _request: &crate::VmRequest,
        _progress: &dyn crate::plugin::Progress,
        _: std::time::Instant,
        _: &std::sync::atomic::AtomicBool,
    ) -> Result<(), PluginError> {
        Err(PluginError::Unsupported("create"))
    }

    fn wait_address(
        &self,
        _vm_name: &str,
        _deadline: std::time::Instant,
        _cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<crate::Endpoint, PluginError> {
        Err(PluginError::Unsupported("wait_address"))
    }

    fn destroy(&self, vm_name: &str) -> Result<(), PluginError> {
        self.destroyed
            .lock()
            .expect("lock")
            .push(vm_name.to_string());
        Ok(())
    }

    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        Ok(self.vms.clone())
    }

    fn inspect(&self, vm_name: &str) -> Result<VmPresence, PluginError> {
        if let Some((_, presence)) = self.now.iter().find(|(name, _)| name == vm_name) {
            return Ok(presence.clone());
        }
        Ok(self
            .vms
            .iter()
            .find(|vm| vm.vm_name == vm_name)
            .cloned()
            .map_or(VmPresence::Absent, VmPresence::Owned))
    }
}

/// Runs gc with `state_dir` over a backend listing `vms`: its report and what it destroyed.
fn gc_over(state_dir: &Path, vms: &[OwnedVm], dry_run: bool) -> (Vec<String>, Vec<String>) {
    gc_seeing(state_dir, vms, &[], dry_run)
}

/// [`gc_over`] with a backend whose lookups by name find `now` where it names a VM.
fn gc_seeing(
    state_dir: &Path,
    vms: &[OwnedVm],
    now: &[(String, VmPresence)],
    dry_run: bool,
) -> (Vec<String>, Vec<String>) {
    use crate::registry::{Entry, Origin};
    let destroyed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (listed, log) = (vms.to_vec(), destroyed.clone());
    let now = now.to_vec();
    let mut registry = Registry::default();
    registry
        .add_backend(Entry {
            name: "listed".into(),
            version: "0".into(),
            origin: Origin::BuiltIn,
            build: std::sync::Arc::new(move |_, _| {
                Ok(Box::new(Listed {
                    vms: listed.clone(),
                    now: now.clone(),
                    destroyed: log.clone(),
                }) as Box<dyn Backend>)
            }),
        })
        .expect("register");
    let config = Config::parse(
        Path::new("/etc/hyperjob/test.toml"),
        &format!(
            "backend = \"listed\"\ntransport = \"ssh\"\nstate_dir = {:?}\n",
            state_dir.display().to_string()
        ),
    )
    .expect("config");
    let mut out = Vec::new();

    gc(&config, &registry, dry_run, &mut out).expect("gc");

    let report = String::from_utf8(out).expect("utf-8");
    let destroyed = destroyed.lock().expect("lock").clone();
    (report.lines().map(str::to_string).collect(), destroyed)
}

fn listed_vm(job_id: u64, deadline_unix: u64, owner: Option<&str>) -> OwnedVm {
    OwnedVm {
        vm_name: format!("hyperjob-job-{job_id}"),
        job_id,
        created_unix: 0,
        deadline_unix,
        owner: owner.map(str::to_string),
    }
}

#[test]
fn gc_removes_expired_vms_of_its_own_or_of_no_owner_and_leaves_others_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let ours = owner_of(&state_dir);
    let vms = [
        listed_vm(1, 1, Some(&ours)),
        listed_vm(2, 1, None),
        listed_vm(3, 1, Some("/srv/other-runner")),
        listed_vm(4, u64::MAX, Some("/srv/other-runner")),
        listed_vm(5, u64::MAX, Some(&ours)),
    ];

    let (dry, dry_destroyed) = gc_over(&state_dir, &vms, true);
    let (real, destroyed) = gc_over(&state_dir, &vms, false);

    assert_eq!(
        dry,
        [
            "skipping hyperjob-job-3: owned by /srv/other-runner",
            "would remove hyperjob-job-1: its deadline has passed",
            "would remove hyperjob-job-2: its deadline has passed",
        ]
    );
    assert!(dry_destroyed.is_empty());
    assert_eq!(
        real,
        [
            "removed hyperjob-job-1: its deadline has passed",
            "removed hyperjob-job-2: its deadline has passed",
        ]
    );
    assert_eq!(destroyed, ["hyperjob-job-1", "hyperjob-job-2"]);
}

/// A ready job of `state_dir` with a far deadline, as prepare records it.
fn save_ready_job(state_dir: &Path, job_id: u64, phase_ready: bool) {
    let store = StateStore::new(state_dir);
    let record = crate::state::JobState::creating(
        job_id,
        format!("hyperjob-job-{job_id}"),
        ("listed", "ssh"),
        (unix_now(), u64::MAX),
    );
    let record = if phase_ready {
        record.ready(crate::Endpoint::new("192.0.2.1", None))
    } else {
        record
    };
    store.save(&record).expect("save");
}

#[test]
fn a_job_is_judged_by_what_its_vm_is_at_the_moment_of_the_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let ours = owner_of(&state_dir);
    save_ready_job(&state_dir, 9, true);
    // The listing was made before prepare created the VM; a lookup now finds it.
    let now = [(
        "hyperjob-job-9".to_string(),
        VmPresence::Owned(listed_vm(9, u64::MAX, Some(&ours))),
    )];

    let (report, destroyed) = gc_seeing(&state_dir, &[], &now, false);

    assert!(report.is_empty(), "{report:?}");
    assert!(destroyed.is_empty());
    assert!(state_dir.join("job-9.json").exists());
}

#[test]
fn a_vm_whose_record_cannot_be_read_or_of_another_owner_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    save_ready_job(&state_dir, 3, true);
    save_ready_job(&state_dir, 4, false);
    let now = [
        (
            "hyperjob-job-3".to_string(),
            VmPresence::Unrecognised("the domain carries no hyperjob metadata".into()),
        ),
        (
            "hyperjob-job-4".to_string(),
            VmPresence::Owned(listed_vm(4, u64::MAX, Some("/srv/other"))),
        ),
    ];

    let (report, destroyed) = gc_seeing(&state_dir, &[], &now, false);

    assert_eq!(
        report,
        [
            "left hyperjob-job-3 alone: a VM named hyperjob-job-3 exists but hyperjob cannot \
             tell it is its own (the domain carries no hyperjob metadata)",
            "left hyperjob-job-4 alone: VM hyperjob-job-4 belongs to another hyperjob \
             installation (state_dir /srv/other); give each installation its own `name_prefix`",
        ]
    );
    assert!(destroyed.is_empty(), "{destroyed:?}");
    assert!(state_dir.join("job-3.json").exists());
}

#[test]
fn a_killed_prepare_and_leftover_files_are_removed_at_once_but_a_busy_job_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    save_ready_job(&state_dir, 5, false);
    save_ready_job(&state_dir, 6, false);
    let store = StateStore::new(&state_dir);
    let _busy = store.lock_activity(6).expect("lock");
    std::fs::write(state_dir.join("job-7.lock"), "").expect("lone lock file");

    let (report, destroyed) = gc_over(&state_dir, &[], false);

    assert_eq!(
        report,
        [
            "removed hyperjob-job-5: its prepare was killed before the VM was ready",
            "removed hyperjob-job-7: its VM is gone and no stage is running",
        ]
    );
    assert_eq!(destroyed, ["hyperjob-job-5", "hyperjob-job-7"]);
    let left = crate::state::StateStore::new(&state_dir)
        .job_ids_with_files()
        .expect("list");
    assert_eq!(left, [6]);
}

#[test]
fn a_vm_of_no_job_and_no_pool_is_removed_once_its_deadline_passed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("state");
    let ours = owner_of(&state_dir);
    let doctor = |name: &str, deadline_unix| OwnedVm {
        vm_name: name.to_string(),
        job_id: crate::pool::POOL_JOB_ID,
        created_unix: 0,
        deadline_unix,
        owner: Some(ours.clone()),
    };
    let vms = [
        doctor("hyperjob-job-doctor-1", 1),
        doctor("hyperjob-job-doctor-2", u64::MAX),
    ];

    let (report, destroyed) = gc_over(&state_dir, &vms, false);

    assert_eq!(
        report,
        ["removed hyperjob-job-doctor-1: its deadline has passed"]
    );
    assert_eq!(destroyed, ["hyperjob-job-doctor-1"]);
}
