//! The wall clock, injectable.
//!
//! Whatever reads "now" as a date (payment windows, challenge expiry, ledger
//! and usage timestamps, attestation times) asks a [`Clock`]. Production
//! code holds [`Clock::system`]; tests hold a [`ManualClock`] and move it,
//! so expiry is tested by advancing time instead of sleeping. Durations
//! between two events of one process (timeouts, heartbeats) use
//! `std::time::Instant` and are not this module's business.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::timefmt;

/// A source of unix time. Cheap to clone; clones of a manual clock share
/// its hands.
#[derive(Clone, Debug, Default)]
pub struct Clock(Source);

#[derive(Clone, Debug, Default)]
enum Source {
    #[default]
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// The operating system's clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Source::System => timefmt::unix_ms(SystemTime::now()),
            Source::Manual(ms) => ms.load(Ordering::SeqCst),
        }
    }

    /// Unix time in whole seconds (0 before 1970).
    pub fn now_secs(&self) -> u64 {
        timefmt::ms_to_secs(self.now_ms())
    }

    /// `now + d` in RFC 3339 (UTC, whole seconds).
    pub fn rfc3339_in(&self, d: Duration) -> String {
        timefmt::format_rfc3339(self.now_secs().saturating_add(d.as_secs()))
    }

    /// Now in RFC 3339 (UTC, whole seconds).
    pub fn rfc3339_now(&self) -> String {
        timefmt::format_rfc3339(self.now_secs())
    }
}

/// A clock that only moves when told to (tests). [`ManualClock::clock`]
/// hands out [`Clock`]s that read it.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock stopped at `unix_ms`.
    pub fn at_ms(unix_ms: i64) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(unix_ms)))
    }

    /// A clock stopped at the system's present time.
    pub fn starting_now() -> ManualClock {
        ManualClock::at_ms(Clock::system().now_ms())
    }

    /// A [`Clock`] that reads this one.
    pub fn clock(&self) -> Clock {
        Clock(Source::Manual(self.0.clone()))
    }

    /// Move the clock forward.
    pub fn advance(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Move the clock back (a client whose clock runs behind).
    pub fn rewind(&self, d: Duration) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.0.fetch_sub(ms, Ordering::SeqCst);
    }

    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clocks_move_only_when_told() {
        let hand = ManualClock::at_ms(1_894_709_100_000);
        let clock = hand.clock();
        assert_eq!(clock.now_secs(), 1_894_709_100);
        assert_eq!(clock.rfc3339_now(), "2030-01-15T12:05:00Z");
        hand.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now_ms(), 1_894_709_101_500);
        assert_eq!(clock.clone().now_secs(), 1_894_709_101);
        hand.rewind(Duration::from_secs(2));
        assert_eq!(hand.now_ms(), 1_894_709_099_500);
        assert_eq!(
            clock.rfc3339_in(Duration::from_secs(60)),
            "2030-01-15T12:05:59Z"
        );
    }

    #[test]
    fn the_system_clock_is_after_2024() {
        assert!(Clock::system().now_secs() > 1_700_000_000);
        assert!(Clock::default().now_ms() > 1_700_000_000_000);
    }
}
