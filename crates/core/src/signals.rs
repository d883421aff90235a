//! Keeps the stop signals away from the thread that does a stage's work.
//!
//! libssh2 before 1.11 (Debian 12 ships 1.10) ends a blocking wait that a signal interrupts
//! with an error ("Error waiting on socket"): a SIGQUIT, which must not disturb a stage, would
//! fail it, and a second SIGTERM arriving while the first one's kill command is being sent
//! would lose that command. While a [`DeferSignals`] lives, SIGTERM, SIGINT and SIGQUIT are
//! blocked in the calling thread only: the kernel hands them to a thread that does not block
//! them (hyperjob's signal-watching thread, whose handler sets the cancel flag the stage
//! polls, and which logs each signal as it takes it), or keeps them pending until the guard
//! is dropped. The SSH transport and `run`'s relay client hold one while they work. Start no
//! child process while one lives: it would inherit the mask.

/// Blocks SIGTERM, SIGINT and SIGQUIT in the calling thread until dropped.
#[allow(missing_debug_implementations)]
pub struct DeferSignals {
    previous: libc::sigset_t,
    /// Not `Send`: the mask belongs to the thread that made the guard.
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl DeferSignals {
    #[allow(unsafe_code, clippy::new_without_default)]
    pub fn new() -> Self {
        // SAFETY: both sets are locals that outlive the calls; `set` is initialised by
        // sigemptyset before use and `previous` is written by pthread_sigmask, which only
        // changes the calling thread's mask.
        unsafe {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
                libc::sigaddset(set.as_mut_ptr(), signal);
            }
            let mut previous = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(previous.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), previous.as_mut_ptr());
            Self {
                previous: previous.assume_init(),
                _thread_bound: std::marker::PhantomData,
            }
        }
    }
}

impl Drop for DeferSignals {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: `previous` is the mask pthread_sigmask returned in `new`, for this very
        // thread (the guard cannot move to another one).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked_mask() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("status");
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix("SigBlk:"))
            .expect("SigBlk");
        u64::from_str_radix(line.trim(), 16).expect("hex mask")
    }

    #[test]
    fn the_stop_signals_are_blocked_while_the_guard_lives_and_restored_after() {
        let bit = |signal: i32| 1u64 << (signal - 1);
        let wanted = bit(libc::SIGTERM) | bit(libc::SIGINT) | bit(libc::SIGQUIT);
        let before = blocked_mask();

        let during = {
            let _guard = DeferSignals::new();
            blocked_mask()
        };

        assert_eq!(during & wanted, wanted, "{during:x}");
        assert_eq!(blocked_mask(), before);
    }
}
