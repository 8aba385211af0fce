//! Time as agents exchange it: Unix seconds, and the one check that every signed message's clock
//! fields pass before anything else reads them.
//!
//! A peer chooses `issued_at` and `expires_at` freely, so nothing here subtracts or adds them in
//! `i64`: the differences are taken in `i128`, where two `i64`s cannot overflow. A leaf module: it
//! imports nothing of the crate.

use std::time::Duration;

/// How far ahead of this agent's clock another agent's message may say it was issued, for
/// clocks that disagree.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

/// Unix seconds now; 0 for a clock before 1970.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// What a kind of message may claim about its own time, for [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// How far ahead of this agent's clock `issued_at` may be, for clocks that disagree.
    pub max_skew: Duration,
    /// The longest `expires_at - issued_at` may be, for messages that expire.
    pub max_lifetime: Duration,
    /// How long ago `issued_at` may be, for messages that carry no expiry of their own (a
    /// message with an expiry is judged by it instead).
    pub max_age: Option<Duration>,
}

/// Why a message's clock fields are refused; each reads after "the advert", "the request"….
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// `expires_at` has passed.
    #[error("expired {ago} s ago")]
    Expired {
        /// Seconds since it expired.
        ago: u128,
    },
    /// `issued_at` is further ahead than the skew allows.
    #[error("was issued in the future, {ahead} s ahead of this agent's clock; check the clocks")]
    FromTheFuture {
        /// Seconds ahead of this agent's clock.
        ahead: u128,
    },
    /// `issued_at` is older than the message may be.
    #[error("is stale: issued {age} s ago, more than the {max} s allowed; check the clocks")]
    Stale {
        /// Seconds since it was issued.
        age: u128,
        /// The most accepted.
        max: u64,
    },
    /// `expires_at` is before `issued_at`.
    #[error("expires before it was issued")]
    Inverted,
    /// The message claims to stay valid longer than this kind may.
    #[error("claims to stay valid for {lifetime} s, more than the {max} s allowed")]
    TooLong {
        /// `expires_at - issued_at`.
        lifetime: u128,
        /// The most accepted.
        max: u64,
    },
}

/// Checks a message's `issued_at` and, where it has one, `expires_at` against `now`, all Unix
/// seconds, under `rules`. Never overflows, whatever the fields hold.
pub fn check(issued_at: i64, expires_at: Option<i64>, now: i64, rules: &Rules) -> Result<(), ClockError> {
    let (issued, now_wide) = (i128::from(issued_at), i128::from(now));
    let ahead = issued - now_wide;
    if ahead > i128::from(rules.max_skew.as_secs()) {
        return Err(ClockError::FromTheFuture { ahead: ahead.unsigned_abs() });
    }
    match expires_at {
        Some(expires_at) => {
            let expires = i128::from(expires_at);
            if expires <= now_wide {
                return Err(ClockError::Expired { ago: (now_wide - expires).unsigned_abs() });
            }
            let lifetime = expires - issued;
            if lifetime < 0 {
                return Err(ClockError::Inverted);
            }
            if lifetime > i128::from(rules.max_lifetime.as_secs()) {
                return Err(ClockError::TooLong {
                    lifetime: lifetime.unsigned_abs(),
                    max: rules.max_lifetime.as_secs(),
                });
            }
        }
        None => {
            if let Some(max_age) = rules.max_age
                && -ahead > i128::from(max_age.as_secs())
            {
                return Err(ClockError::Stale { age: ahead.unsigned_abs(), max: max_age.as_secs() });
            }
        }
    }
    Ok(())
}

/// `at + by` in Unix seconds, held at `i64::MAX` rather than wrapping.
pub fn after(at: i64, by: Duration) -> i64 {
    at.saturating_add(i64::try_from(by.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        max_skew: Duration::from_secs(60),
        max_lifetime: Duration::from_secs(3600),
        max_age: Some(Duration::from_secs(60)),
    };

    #[test]
    fn every_extreme_is_refused_without_overflow() {
        let now = 1_800_000_000;
        let table: [(i64, Option<i64>, Result<(), ClockError>); 14] = [
            (now, Some(now + 600), Ok(())),
            (now + 60, Some(now + 600), Ok(())),
            (now - 100, Some(now + 3500), Ok(())),
            (now, None, Ok(())),
            (now - 60, None, Ok(())),
            (now + 61, Some(now + 600), Err(ClockError::FromTheFuture { ahead: 61 })),
            (now, Some(now), Err(ClockError::Expired { ago: 0 })),
            (now, Some(now + 3601), Err(ClockError::TooLong { lifetime: 3601, max: 3600 })),
            (now - 61, None, Err(ClockError::Stale { age: 61, max: 60 })),
            (
                i64::MIN,
                Some(now + 600),
                Err(ClockError::TooLong {
                    lifetime: (i128::from(now) + 600 - i128::from(i64::MIN)) as u128,
                    max: 3600,
                }),
            ),
            (i64::MIN, Some(i64::MAX), Err(ClockError::TooLong { lifetime: u64::MAX as u128, max: 3600 })),
            (i64::MAX, Some(i64::MAX), Err(ClockError::FromTheFuture { ahead: (i64::MAX - now) as u128 })),
            (
                now,
                Some(i64::MIN),
                Err(ClockError::Expired { ago: (i128::from(now) - i128::from(i64::MIN)) as u128 }),
            ),
            (
                i64::MIN,
                None,
                Err(ClockError::Stale { age: (i128::from(now) - i128::from(i64::MIN)) as u128, max: 60 }),
            ),
        ];
        for (issued, expires, expected) in table {
            assert_eq!(check(issued, expires, now, &RULES), expected, "issued {issued}, expires {expires:?}");
        }
    }

    #[test]
    fn the_clock_extremes_of_now_itself_do_not_overflow() {
        for now in [i64::MIN, -1, 0, i64::MAX] {
            for issued in [i64::MIN, 0, i64::MAX] {
                for expires in [None, Some(i64::MIN), Some(0), Some(i64::MAX)] {
                    let _ = check(issued, expires, now, &RULES);
                }
            }
        }
    }

    #[test]
    fn a_message_without_expiry_and_no_age_limit_is_only_checked_for_the_future() {
        let rules = Rules { max_age: None, ..RULES };
        assert_eq!(check(i64::MIN, None, 0, &rules), Ok(()));
        assert!(check(61, None, 0, &rules).is_err());
    }

    #[test]
    fn after_saturates() {
        assert_eq!(after(10, Duration::from_secs(5)), 15);
        assert_eq!(after(i64::MAX - 1, Duration::from_secs(5)), i64::MAX);
        assert_eq!(after(0, Duration::MAX), i64::MAX);
    }
}
