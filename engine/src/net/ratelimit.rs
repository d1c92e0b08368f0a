//! Per-port token buckets.
//!
//! A host behind a port may send `rate` bytes per second on average and `burst`
//! bytes at once; what exceeds that is dropped at ingress, before parsing or any
//! table lookup, so a flooding host costs as little as possible. Integer
//! arithmetic in byte-nanoseconds keeps the bucket exact over any interval.

const NS: u128 = 1_000_000_000;

/// A rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained bytes per second.
    pub bytes_per_sec: u64,
    /// Bucket depth in bytes (the largest burst).
    pub burst_bytes: u64,
}

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Tokens in byte-nanoseconds.
    tokens: u128,
    last: u64,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(limit: RateLimit, now: u64) -> Self {
        TokenBucket {
            limit,
            tokens: u128::from(limit.burst_bytes) * NS,
            last: now,
        }
    }

    /// The limit.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes `bytes` if available at `now`; false means drop.
    pub fn admit(&mut self, bytes: usize, now: u64) -> bool {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let cap = u128::from(self.limit.burst_bytes) * NS;
        self.tokens =
            (self.tokens + u128::from(elapsed) * u128::from(self.limit.bytes_per_sec)).min(cap);
        let need = u128::try_from(bytes)
            .unwrap_or(u128::MAX)
            .saturating_mul(NS);
        if self.tokens >= need {
            self.tokens -= need;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_sustained_rate() {
        let mut b = TokenBucket::new(
            RateLimit {
                bytes_per_sec: 1000,
                burst_bytes: 1500,
            },
            0,
        );
        assert!(b.admit(1000, 0));
        assert!(b.admit(500, 0));
        assert!(!b.admit(1, 0));
        // 1 ms later: exactly one byte.
        assert!(b.admit(1, 1_000_000));
        assert!(!b.admit(1, 1_000_000));
        // Over 10 s at 1000 B/s only a bucketful accumulates.
        assert!(!b.admit(1501, 10_000_000_000));
        assert!(b.admit(1500, 10_000_000_000));
        // Time going backwards adds nothing.
        assert!(!b.admit(1, 5));
    }
}
