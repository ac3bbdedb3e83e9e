//! Key derivation: PBKDF2 (LUKS1 and LUKS2) and Argon2i/Argon2id (LUKS2), with the limits that
//! keep a damaged or hostile header from asking for hours of CPU or gigabytes of memory, and the
//! benchmarks that turn an `iter-time` into a cost.

use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Params, Version};

use super::hash::HashAlg;

/// Most PBKDF2 iterations accepted from a header (keyslots and digests). A 2-second slot on a fast
/// machine has a few million; this is about two minutes of SHA-256 on one core.
pub const MAX_PBKDF2_ITERATIONS: u32 = 1 << 28;

/// Most Argon2 memory accepted from a header, in KiB: cryptsetup's own maximum (4 GiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 4 * 1024 * 1024;

/// Most Argon2 lanes accepted from a header (cryptsetup writes at most 4).
pub const MAX_ARGON2_LANES: u32 = 16;

/// Most Argon2 work accepted from a header: passes times memory, in KiB. Two hundred and fifty-six
/// times cryptsetup's default of 4 passes over 1 GiB.
pub const MAX_ARGON2_WORK_KIB: u64 = 1 << 30;

/// Fewest Argon2 passes cryptsetup accepts; also the floor of the `iter-time` benchmark.
pub const MIN_ARGON2_TIME: u32 = 4;

/// Fewest Argon2 KiB cryptsetup accepts.
pub const MIN_ARGON2_MEMORY_KIB: u32 = 32;

/// Fewest PBKDF2 iterations written by create (cryptsetup's and QEMU's floor).
pub const MIN_PBKDF2_ITERATIONS: u32 = 1000;

/// Argon2 variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Argon2Variant {
    I,
    Id,
}

impl Argon2Variant {
    pub fn name(self) -> &'static str {
        match self {
            Argon2Variant::I => "argon2i",
            Argon2Variant::Id => "argon2id",
        }
    }
}

/// A key derivation function with its cost parameters (the salt is kept beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    Pbkdf2 {
        hash: HashAlg,
        iterations: u32,
    },
    Argon2 {
        variant: Argon2Variant,
        /// Passes over memory.
        time: u32,
        memory_kib: u32,
        lanes: u32,
    },
}

impl Kdf {
    /// The LUKS2 name: `pbkdf2`, `argon2i` or `argon2id`.
    pub fn name(&self) -> &'static str {
        match self {
            Kdf::Pbkdf2 { .. } => "pbkdf2",
            Kdf::Argon2 { variant, .. } => variant.name(),
        }
    }

    /// Refuses costs beyond the limits above, before any work or allocation.
    pub fn check_limits(&self) -> Result<(), String> {
        match *self {
            Kdf::Pbkdf2 { iterations, .. } => {
                if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
                    return Err(format!(
                        "PBKDF2 iteration count {iterations} is out of range (1 to \
                         {MAX_PBKDF2_ITERATIONS})"
                    ));
                }
            }
            Kdf::Argon2 {
                time,
                memory_kib,
                lanes,
                ..
            } => {
                if memory_kib > MAX_ARGON2_MEMORY_KIB {
                    return Err(format!(
                        "Argon2 memory cost of {memory_kib} KiB is above the limit of \
                         {MAX_ARGON2_MEMORY_KIB} KiB"
                    ));
                }
                if lanes == 0 || lanes > MAX_ARGON2_LANES {
                    return Err(format!(
                        "Argon2 parallelism {lanes} is out of range (1 to {MAX_ARGON2_LANES})"
                    ));
                }
                if time == 0 || u64::from(time) * u64::from(memory_kib) > MAX_ARGON2_WORK_KIB {
                    return Err(format!(
                        "Argon2 cost of {time} passes over {memory_kib} KiB is out of range \
                         (at most {MAX_ARGON2_WORK_KIB} KiB in total)"
                    ));
                }
                if memory_kib < 8 * lanes {
                    return Err(format!(
                        "Argon2 memory cost of {memory_kib} KiB is too small for {lanes} lanes"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Derives `out.len()` bytes from `password` and `salt`. Checks the limits first.
    pub fn derive(&self, password: &[u8], salt: &[u8], out: &mut [u8]) -> Result<(), String> {
        self.check_limits()?;
        match *self {
            Kdf::Pbkdf2 { hash, iterations } => {
                hash.pbkdf2(password, salt, iterations, out);
                Ok(())
            }
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                lanes,
            } => {
                let params = Params::new(memory_kib, time, lanes, Some(out.len()))
                    .map_err(|e| format!("invalid Argon2 parameters: {e}"))?;
                let alg = match variant {
                    Argon2Variant::I => Algorithm::Argon2i,
                    Argon2Variant::Id => Algorithm::Argon2id,
                };
                Argon2::new(alg, Version::V0x13, params)
                    .hash_password_into(password, salt, out)
                    .map_err(|e| format!("Argon2 failed: {e}"))
            }
        }
    }
}

/// Runs `f(count)` with doubling counts until one run takes at least `min`; returns the count and
/// the time it took.
fn measure(
    mut count: u32,
    min: Duration,
    max_count: u32,
    mut f: impl FnMut(u32),
) -> (u32, Duration) {
    loop {
        let start = Instant::now();
        f(count);
        let took = start.elapsed();
        if took >= min || count >= max_count {
            return (count, took.max(Duration::from_micros(1)));
        }
        count = count.saturating_mul(2).min(max_count);
    }
}

/// How long a benchmark runs before trusting its rate.
const BENCH_TIME: Duration = Duration::from_millis(40);

/// PBKDF2 iterations that take about `ms` milliseconds on this machine for an `out_len`-byte
/// result, at least [`MIN_PBKDF2_ITERATIONS`] and at most [`MAX_PBKDF2_ITERATIONS`].
pub fn pbkdf2_iterations_for(hash: HashAlg, out_len: usize, ms: u64) -> u32 {
    let mut out = vec![0u8; out_len];
    let (count, took) = measure(1024, BENCH_TIME, MAX_PBKDF2_ITERATIONS, |n| {
        hash.pbkdf2(b"benchmark", &[0u8; 32], n, &mut out)
    });
    let per_ms = f64::from(count) / took.as_secs_f64() / 1000.0;
    let want = per_ms * ms as f64;
    (want.min(f64::from(MAX_PBKDF2_ITERATIONS)) as u32).max(MIN_PBKDF2_ITERATIONS)
}

/// Argon2 passes over `memory_kib` that take about `ms` milliseconds, at least
/// [`MIN_ARGON2_TIME`] and within [`MAX_ARGON2_WORK_KIB`].
pub fn argon2_time_for(variant: Argon2Variant, memory_kib: u32, lanes: u32, ms: u64) -> u32 {
    let max = (MAX_ARGON2_WORK_KIB / u64::from(memory_kib.max(1))).min(u64::from(u32::MAX)) as u32;
    let mut out = [0u8; 32];
    let (count, took) = measure(1, BENCH_TIME, max, |t| {
        let kdf = Kdf::Argon2 {
            variant,
            time: t,
            memory_kib,
            lanes,
        };
        // Parameters were checked by the caller; a failure here only shortens the benchmark.
        let _ = kdf.derive(b"benchmark", &[0u8; 32], &mut out);
    });
    let per_ms = f64::from(count) / took.as_secs_f64() / 1000.0;
    ((per_ms * ms as f64).min(f64::from(max)) as u32).max(MIN_ARGON2_TIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_matches_rfc9106_parameters_shape() {
        // RFC 9106 5.3 uses secret and associated data, which LUKS never does; check instead that
        // the variants differ and that the output is deterministic.
        let mk = |variant| Kdf::Argon2 {
            variant,
            time: 1,
            memory_kib: 64,
            lanes: 2,
        };
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        mk(Argon2Variant::Id)
            .derive(b"pw", &[1; 32], &mut a)
            .unwrap();
        mk(Argon2Variant::Id)
            .derive(b"pw", &[1; 32], &mut b)
            .unwrap();
        assert_eq!(a, b);
        mk(Argon2Variant::I)
            .derive(b"pw", &[1; 32], &mut b)
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn absurd_costs_are_refused_before_any_work() {
        let big_mem = Kdf::Argon2 {
            variant: Argon2Variant::Id,
            time: 4,
            memory_kib: MAX_ARGON2_MEMORY_KIB + 1,
            lanes: 1,
        };
        let mut out = [0u8; 32];
        let e = big_mem.derive(b"pw", &[0; 32], &mut out).unwrap_err();
        assert!(e.contains("memory"), "{e}");
        let long = Kdf::Argon2 {
            variant: Argon2Variant::I,
            time: u32::MAX,
            memory_kib: 1024,
            lanes: 1,
        };
        assert!(long.check_limits().is_err());
        let lanes = Kdf::Argon2 {
            variant: Argon2Variant::I,
            time: 4,
            memory_kib: 1024,
            lanes: MAX_ARGON2_LANES + 1,
        };
        assert!(lanes.check_limits().is_err());
        let iters = Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: MAX_PBKDF2_ITERATIONS + 1,
        };
        assert!(iters.derive(b"pw", &[0; 32], &mut out).is_err());
        let limit = Kdf::Pbkdf2 {
            hash: HashAlg::Sha256,
            iterations: MAX_PBKDF2_ITERATIONS,
        };
        assert!(limit.check_limits().is_ok());
    }

    #[test]
    fn benchmarks_respect_their_floors() {
        assert!(pbkdf2_iterations_for(HashAlg::Sha256, 32, 1) >= MIN_PBKDF2_ITERATIONS);
        assert!(argon2_time_for(Argon2Variant::Id, 64, 1, 1) >= MIN_ARGON2_TIME);
    }
}
