//! The plugin contract: a [`Backend`] owns the VM lifecycle, a [`Transport`] reaches the guest.
//!
//! Both traits are synchronous and object-safe: every runner stage is a short-lived process and
//! the libraries underneath (libvirt, libssh2) block, so async would buy nothing. Optional
//! operations are default methods returning [`PluginError::Unsupported`] instead of growing the
//! required surface.

use std::error::Error as StdError;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

pub use crate::endpoint::{Address, Endpoint, EndpointKind};

/// The error every plugin operation returns. Its variant is its class; the stage logic turns all
/// of them into a system failure, with the message as the reason.
///
/// Messages are one line, name what is wrong, and never contain secrets (the script, job
/// variables, private keys). Build them with the variants below, or [`PluginError::msg`] /
/// [`PluginError::system`] for everything else:
///
/// ```
/// use hyperjob_plugin::PluginError;
///
/// let missing = PluginError::NotFound("base image /img/base.qcow2 does not exist".into());
/// let io = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
/// let failed = PluginError::system("cannot write the VM record", io);
/// assert_eq!(failed.to_string(), "cannot write the VM record");
/// assert_eq!(
///     PluginError::Unsupported("halt").to_string(),
///     "halt is not supported by this plugin"
/// );
/// # let _ = missing;
/// ```
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin's configuration table is invalid: name the key (`` `vcpus` must be 1 to 64,
    /// not 0``); hyperjob adds the file and the table. [`crate::config::parse`] gives these.
    #[error("{0}")]
    Config(String),
    /// Something the operation needs does not exist (a base image, a domain, a key file).
    #[error("{0}")]
    NotFound(String),
    /// The plugin does not implement this optional operation (or option, like per-job guest
    /// keys), named by the text: `Unsupported("halt")` reads "halt is not supported by this
    /// plugin". The default methods of [`Backend`] and [`Transport`] return it.
    #[error("{0} is not supported by this plugin")]
    Unsupported(&'static str),
    /// A bounded wait ran out.
    #[error("timed out after {secs} s {what}")]
    Timeout {
        /// What was waited for, completing "timed out after N s …" ("waiting for an address").
        what: String,
        /// How long was waited, in seconds.
        secs: u64,
    },
    /// The work was interrupted on request (SIGTERM/SIGINT).
    #[error("interrupted {0}")]
    Interrupted(String),
    /// Nothing of the work happened (no script was started), for a reason that another way
    /// may not have: a [`Connection`] that was lost, say. `run` then connects anew.
    #[error("{0}")]
    NotStarted(String),
    /// Any other infrastructure fault. Make one with [`PluginError::msg`] or, with the error
    /// that caused it, [`PluginError::system`].
    #[error("{message}")]
    System {
        /// What failed, one line ("cannot start QEMU for hyperjob-job-7").
        message: String,
        /// The underlying error, shown after the message in the error chain.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
}

impl PluginError {
    /// A system error with an underlying cause (kept in the error chain, not in the message).
    pub fn system(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::System {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A system error without an underlying cause.
    pub fn msg(message: impl Into<String>) -> Self {
        Self::System {
            message: message.into(),
            source: None,
        }
    }
}

/// Two errors are equal when their messages are (moved here from hyperjob-core's executable
/// protocol, whose decoded messages compare errors).
impl PartialEq for PluginError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

/// What a backend needs to create one job's VM ([`Backend::create`]). Record `job_id`, the
/// times and `owner` with the VM (a file next to it, its metadata): [`Backend::list_owned`]
/// reports them back as an [`OwnedVm`].
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// Stable name derived from the trusted job id; also the key of everything the VM owns.
    pub vm_name: String,
    /// GitLab job id from `JOB_RESPONSE_FILE`.
    pub job_id: u64,
    /// Unix time (seconds) the VM was requested.
    pub created_unix: u64,
    /// Unix time (seconds) after which the VM is certainly abandoned (job timeout plus margin).
    pub deadline_unix: u64,
    /// The installation that creates the VM: the absolute path of its config's `state_dir`
    /// (hyperjob-core's `ownership::owner_of`). Recorded with the VM and reported back as
    /// [`OwnedVm::owner`]: `hyperjob gc` only acts on VMs of its own installation.
    pub owner: String,
    /// With `guest_keys = "per-job"`: keys the backend must put into the guest before boot.
    /// A backend that cannot inject keys must fail with [`PluginError::Unsupported`].
    pub keys: Option<crate::keys::GuestKeys>,
}

/// A VM a backend created, as recorded on the VM itself (libvirt: domain metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedVm {
    /// [`VmRequest::vm_name`]: the name the VM was created under.
    pub vm_name: String,
    /// [`VmRequest::job_id`] as recorded (0: a warm-pool VM no job has claimed).
    pub job_id: u64,
    /// [`VmRequest::created_unix`] as recorded.
    pub created_unix: u64,
    /// [`VmRequest::deadline_unix`] as recorded: `hyperjob gc` destroys the VM after it.
    pub deadline_unix: u64,
    /// [`VmRequest::owner`] as recorded; `None` for a VM of a hyperjob that recorded no owner.
    pub owner: Option<String>,
}

/// What a backend finds under a VM name right now ([`Backend::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmPresence {
    /// Nothing of that name exists.
    Absent,
    /// A VM hyperjob created, with its ownership record.
    Owned(OwnedVm),
    /// Something of that name exists, but its hyperjob record is missing or cannot be read (the
    /// reason says which). Never counted as gone, and never destroyed by name.
    Unrecognised(String),
}

/// One line of `hyperjob doctor`: what was checked, and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Whether the check passed.
    pub ok: bool,
    /// What was checked, and on success what was found ("network default: active, DHCP").
    pub what: String,
    /// On failure: what is wrong and how to fix it, one line.
    pub fix: Option<String>,
}

impl Check {
    /// A passed check: `Check::pass("base image /img/base.qcow2: readable")`.
    pub fn pass(what: impl Into<String>) -> Self {
        Self {
            ok: true,
            what: what.into(),
            fix: None,
        }
    }

    /// A failed check, with how to fix it:
    /// `Check::fail("qemu-system-x86_64", "not found: install qemu-system-x86")`.
    pub fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            ok: false,
            what: what.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Reports progress to the job log. Implemented by the core; plugins only call it.
pub trait Progress {
    /// Shows `message` (one line, no secrets) in the job log at once: "Starting QEMU for
    /// hyperjob-job-7". For steps that take a while, so the job log is not silent.
    fn say(&self, message: &str);
}

/// VM lifecycle, keyed by a stable VM name.
pub trait Backend: Send + Sync {
    /// Creates and boots the VM, by `deadline` at the latest ([`PluginError::Timeout`] after
    /// it); a set `cancel` (SIGTERM/SIGINT) ends the attempt early
    /// ([`PluginError::Interrupted`]). On error the backend removes whatever it created.
    fn create(
        &self,
        request: &VmRequest,
        progress: &dyn Progress,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError>;

    /// Waits until the guest has an address, or `deadline` passes.
    fn wait_address(
        &self,
        vm_name: &str,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<Endpoint, PluginError>;

    /// The kinds of [`Endpoint`] [`Backend::wait_address`] may return, as configured (the
    /// default: TCP only). `hyperjob config` refuses a transport that reaches none of them, and
    /// prepare fails an endpoint of a kind not listed here.
    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        vec![EndpointKind::Tcp]
    }

    /// Destroys the VM and everything it owns. Idempotent: "already gone" is success, and it
    /// must work from the name alone (prepare may have died before recording anything).
    fn destroy(&self, vm_name: &str) -> Result<(), PluginError>;

    /// Stops the VM from running anything at once (pauses or kills it) without waiting for its
    /// resources to be released: cleanup then hands the `destroy` to a background process and
    /// returns (hyperjob-core's `teardown`). A VM that is not running is no error. Backends whose
    /// destroy is quick need not implement it (cleanup then destroys in the foreground).
    fn halt(&self, _vm_name: &str) -> Result<(), PluginError> {
        Err(PluginError::Unsupported("halt"))
    }

    /// Optional: every VM this backend created that still exists, with its ownership record,
    /// for `hyperjob gc`. Must never list anything hyperjob did not create.
    fn list_owned(&self) -> Result<Vec<OwnedVm>, PluginError> {
        Err(PluginError::Unsupported("list_owned"))
    }

    /// Looks the VM up by name at this moment. The default answers from [`Backend::list_owned`]
    /// (a VM not listed is absent); a backend that can tell "not ours" or "record unreadable"
    /// from "absent" overrides it.
    fn inspect(&self, vm_name: &str) -> Result<VmPresence, PluginError> {
        Ok(self
            .list_owned()?
            .into_iter()
            .find(|vm| vm.vm_name == vm_name)
            .map_or(VmPresence::Absent, VmPresence::Owned))
    }

    /// Optional: names of VMs that have files in the backend's storage (overlays, seeds, logs),
    /// whether or not the VM still exists. `hyperjob gc` destroys those whose VM is gone and
    /// whose job nobody works on, so files of a killed process do not pile up.
    fn names_with_files(&self) -> Result<Vec<String>, PluginError> {
        Ok(Vec::new())
    }

    /// Optional: rewrites the ownership record of an existing VM (job id, times, owner) to
    /// `record`, as `list_owned` and `inspect` report it afterwards. The warm pool needs it: a
    /// VM booted ahead belongs to the pool (job id 0) until a job claims it.
    fn relabel(&self, _record: &OwnedVm) -> Result<(), PluginError> {
        Err(PluginError::Unsupported("relabel"))
    }

    /// Optional: a text that changes whenever what a new VM would be made of changes (the base
    /// image's identity and contents' metadata, kernels, boot settings): the warm pool drains
    /// VMs built from anything else. The config tables are accounted for by the core.
    fn fingerprint(&self) -> Result<String, PluginError> {
        Err(PluginError::Unsupported("fingerprint"))
    }

    /// Optional: checks of what this backend needs on the host (`hyperjob doctor`), one
    /// [`Check`] each. Never creates anything.
    fn doctor(&self) -> Vec<Check> {
        Vec::new()
    }

    /// Optional: the last lines the guest printed on its console, to explain a failed boot.
    fn console_tail(&self, _vm_name: &str) -> Result<String, PluginError> {
        Err(PluginError::Unsupported("console_tail"))
    }
}

/// A script to run in the guest.
#[derive(Debug)]
pub struct ScriptRequest<'a> {
    /// Interpreter that reads the script from stdin (`bash`, `sh`).
    pub interpreter: &'a str,
    /// The script itself. It contains job secrets: never log it.
    pub script: &'a [u8],
    /// Set when the driver was asked to stop (SIGTERM/SIGINT).
    pub cancel: &'a AtomicBool,
}

/// A file to copy into the guest ([`Transport::upload`]).
#[derive(Debug)]
pub struct Upload<'a> {
    /// The file on this host. Its length when opened is what arrives.
    pub local: &'a std::path::Path,
    /// Absolute path in the guest; replaced if it exists, never left half-written.
    pub remote: &'a str,
    /// Permission bits of the file in the guest (`0o755`).
    pub mode: u32,
    /// Set when the driver was asked to stop (SIGTERM/SIGINT).
    pub cancel: &'a AtomicBool,
}

/// How the remote script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteExit {
    /// Exited with this status (0 is success; anything else fails the job's step).
    Code(i32),
    /// Killed by a signal, by name as the remote side reports it (`TERM`, `KILL`, ...).
    Signal(String),
}

/// Reaches a guest at an [`Endpoint`].
pub trait Transport: Send + Sync {
    /// How long prepare may wait, from VM creation, until [`Transport::wait_ready`] succeeds.
    fn ready_timeout(&self) -> std::time::Duration;

    /// The user this transport logs in as, if it logs in as a user at all; per-job keys are
    /// authorised for this user.
    fn login_user(&self) -> Option<String> {
        None
    }

    /// Optional: checks of what this transport needs (`hyperjob doctor`): keys, files.
    fn doctor(&self) -> Vec<Check> {
        Vec::new()
    }

    /// The kinds of [`Endpoint`] this transport can reach (the default: TCP only). Every
    /// method taking an endpoint fails one of another kind with [`PluginError::Unsupported`].
    fn endpoint_kinds(&self) -> Vec<EndpointKind> {
        vec![EndpointKind::Tcp]
    }

    /// Waits until the guest accepts a login and runs a command, or `deadline` passes.
    fn wait_ready(
        &self,
        endpoint: &Endpoint,
        deadline: Instant,
        cancel: &AtomicBool,
    ) -> Result<(), PluginError>;

    /// Runs a script, streaming its stdout and stderr live and separately.
    fn run_script(
        &self,
        endpoint: &Endpoint,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError>;

    /// Optional: copies a file into the guest, streamed (it may be large), creating missing
    /// parent directories. The file appears at `remote` only complete and with its full size
    /// (written aside, checked, then renamed). prepare uses it to put `gitlab-runner` into
    /// guests that lack it; without it, such guests go without.
    fn upload(&self, _endpoint: &Endpoint, _upload: &Upload<'_>) -> Result<(), PluginError> {
        Err(PluginError::Unsupported("upload"))
    }

    /// Whether [`Transport::connect`] is implemented. prepare starts a job's relay (a process
    /// that keeps one connection open for all of the job's stages) only for a transport that
    /// says so.
    fn can_connect(&self) -> bool {
        false
    }

    /// Optional: opens one connection to the guest that runs script after script, verified
    /// exactly like [`Transport::run_script`]'s own. Bounded like `run_script`'s connection;
    /// a set `cancel` ends the attempt.
    fn connect(
        &self,
        _endpoint: &Endpoint,
        _cancel: &AtomicBool,
    ) -> Result<Box<dyn Connection>, PluginError> {
        Err(PluginError::Unsupported("connect"))
    }

    /// Optional: the command (program and arguments) with which the host's administrator
    /// reaches the guest at `endpoint` (a VM held for debugging, `[debug_hold]`): with the
    /// credentials this transport already uses, never new ones, and the guest's host key
    /// pinned. Files the command needs (a known_hosts file, say) go to `dir`, a private (0700)
    /// directory of the job that is removed with the job.
    fn access_command(
        &self,
        _endpoint: &Endpoint,
        _dir: &std::path::Path,
    ) -> Result<Vec<String>, PluginError> {
        Err(PluginError::Unsupported("access_command"))
    }
}

/// One open connection to a guest ([`Transport::connect`]), used by one process (the job's
/// relay) for one script at a time.
pub trait Connection: Send {
    /// Runs a script over this connection, with every guarantee of [`Transport::run_script`]
    /// (live separate output, the exact exit, a stop of the remote process tree on `cancel`).
    /// A failure before anything of the script ran in the guest is
    /// [`PluginError::NotStarted`]: the caller may then run it another way.
    fn run_script(
        &mut self,
        request: &ScriptRequest<'_>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RemoteExit, PluginError>;

    /// Called while no script runs: right after connecting, after every script, and every few
    /// seconds in between. Keeps the connection alive and gets ready for the next script (the
    /// SSH transport starts the next script's shell ahead). An error means the connection is
    /// lost: its user stops using it.
    fn idle(&mut self) -> Result<(), PluginError>;
}
