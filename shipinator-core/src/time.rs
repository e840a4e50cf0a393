//! Time as a value. The orchestrator never reads a clock: `now` is an input, and only the
//! driver (or a test's fake clock) produces it.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An instant in UTC with microsecond precision, as microseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_unix_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_unix_millis(self) -> i64 {
        self.0 / 1000
    }

    /// The current wall-clock time. Called by drivers, servers and tests, never by the
    /// orchestrator or the state machines.
    pub fn now() -> Self {
        Self::from_offset_date_time(time::OffsetDateTime::now_utc())
    }

    /// From a `time::OffsetDateTime` (truncated to microseconds; saturating far outside ±292k
    /// years).
    pub fn from_offset_date_time(t: time::OffsetDateTime) -> Self {
        let micros = t.unix_timestamp_nanos() / 1000;
        Self(i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX }))
    }

    /// As a `time::OffsetDateTime` in UTC.
    pub fn to_offset_date_time(self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        let micros = self.0.saturating_sub(earlier.0);
        Duration::from_micros(u64::try_from(micros).unwrap_or(0))
    }

    /// RFC 3339 text, e.g. `2026-11-23T10:15:00.123456Z`.
    pub fn to_rfc3339(self) -> String {
        self.to_offset_date_time()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| self.0.to_string())
    }

    /// Parses RFC 3339 text.
    pub fn parse_rfc3339(s: &str) -> Result<Self, time::error::Parse> {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map(Self::from_offset_date_time)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.to_rfc3339())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        self.saturating_add(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::from_unix_micros(1_795_000_000_123_456);
        let text = t.to_rfc3339();
        assert_eq!(Timestamp::parse_rfc3339(&text).unwrap(), t);
        assert_eq!(
            t + Duration::from_millis(1),
            Timestamp::from_unix_micros(1_795_000_000_124_456)
        );
    }
}
