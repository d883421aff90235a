//! Bounded waiting with exponential backoff, shared by plugins that poll (DHCP leases, sshd).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The plugin contract's bound check for the steps of a `Backend::create`.
pub use hyperjob_plugin::wait::still_wanted;

/// Exponential backoff: starts at `initial`, multiplies by 3/2 each step, never above `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { next: initial, max }
    }

    /// The delay to wait now; advances the sequence.
    pub fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = (current * 3 / 2).min(self.max);
        current
    }

    /// Sleeps for the next delay, but never past `deadline` and not beyond a cancel request.
    /// Returns false when the deadline has passed or `cancel` is set (the caller should stop).
    pub fn sleep(&mut self, deadline: Instant, cancel: &AtomicBool) -> bool {
        let wake = Instant::now() + self.next_delay();
        let wake = wake.min(deadline);
        // Sleep in short slices so a cancel request is noticed promptly.
        loop {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= wake {
                return now < deadline;
            }
            std::thread::sleep((wake - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_and_caps_at_max() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));

        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();

        assert_eq!(delays, vec![100, 150, 225, 300, 300]);
    }

    #[test]
    fn sleep_reports_false_once_the_deadline_passed() {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(20));
        let cancel = AtomicBool::new(false);

        let deadline = Instant::now() + Duration::from_millis(5);
        let keep_going = backoff.sleep(deadline, &cancel);

        assert!(!keep_going);
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn sleep_stops_at_once_when_cancelled_before_it_starts() {
        let mut backoff = Backoff::new(Duration::from_secs(600), Duration::from_secs(600));
        let cancel = AtomicBool::new(true);
        let started = Instant::now();

        let keep_going = backoff.sleep(started + Duration::from_secs(600), &cancel);

        assert!(!keep_going);
        // "At once": far from the 600 s it would otherwise sleep, generous for a loaded host.
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn sleep_stops_soon_after_a_cancel_from_another_thread_arrives() {
        const DELAY: Duration = Duration::from_millis(300);
        let mut backoff = Backoff::new(Duration::from_secs(600), Duration::from_secs(600));
        let cancel = AtomicBool::new(false);
        let started = Instant::now();

        let (keep_going, cancelled_at, returned_at) = std::thread::scope(|scope| {
            let canceller = scope.spawn(|| {
                // The cancel arrives while the sleep is under way: DELAY after it began.
                std::thread::sleep(DELAY);
                let at = Instant::now();
                cancel.store(true, Ordering::Relaxed);
                at
            });
            let keep_going = backoff.sleep(started + Duration::from_secs(600), &cancel);
            let returned_at = Instant::now();
            (
                keep_going,
                canceller.join().expect("canceller"),
                returned_at,
            )
        });

        assert!(!keep_going);
        // It slept until the cancel came (it did not return early on its own)...
        assert!(returned_at >= cancelled_at);
        assert!(returned_at - started >= DELAY);
        // ...and stopped soon after: its slices are 50 ms; the bound is generous for a
        // loaded host and far below the 600 s it would otherwise sleep.
        assert!(
            returned_at - cancelled_at < Duration::from_secs(10),
            "took {:?} after the cancel",
            returned_at - cancelled_at
        );
    }
}
