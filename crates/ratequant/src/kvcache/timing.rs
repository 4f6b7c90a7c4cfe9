//! Where a packed attention step's time goes: an opt-in breakdown by phase, for profiling on
//! machines without hardware counters (a sampling profiler cannot tell a cold step's phases
//! from a warm one's, and the difference between the two is what a decode pays).
//!
//! Off by default; while off every timing point costs one relaxed load and a branch. While on
//! ([`enable`]), each point reads the time-stamp counter (x86-64; a monotonic clock
//! elsewhere) and adds to one global counter per phase. [`take`] returns the totals in seconds
//! and clears them.
//!
//! Phases inside tasks ([`Phase::KeyWeights`] to [`Phase::ValueAccumulate`]) are summed over
//! every thread that ran tasks (thread time); the step's stages ([`Phase::Prepare`],
//! [`Phase::Tasks`], [`Phase::Merge`]) are wall time of the calling thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A part of a packed attention step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The queries scaled (and rotated for QuaRot keys), once per (KV head, query).
    Prepare,
    /// Integer kernels, per-channel keys: each block's channel scales folded into the
    /// query and rounded to `i8` (reads the key scales and zero-points).
    KeyWeights,
    /// The scores of quantized keys (reads the key codes), less [`Phase::KeyWeights`].
    KeyScores,
    /// The unquantized (residual) rows of keys and values, and the softmax's glue.
    Residual,
    /// Integer kernels: the probabilities times the value scales rounded to `i8` per tile
    /// (reads the value scales and zero-points).
    ValueWeights,
    /// The quantized values accumulated (reads the value codes), less
    /// [`Phase::ValueWeights`].
    ValueAccumulate,
    /// Wall time from handing the tasks out to the last one's end (the caller's view:
    /// includes waiting for the slowest thread).
    Tasks,
    /// Wall time of merging the tasks' partial softmaxes and outputs.
    Merge,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Prepare,
        Phase::KeyWeights,
        Phase::KeyScores,
        Phase::Residual,
        Phase::ValueWeights,
        Phase::ValueAccumulate,
        Phase::Tasks,
        Phase::Merge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::KeyWeights => "key weights",
            Phase::KeyScores => "key scores",
            Phase::Residual => "residual+softmax",
            Phase::ValueWeights => "value weights",
            Phase::ValueAccumulate => "value accumulate",
            Phase::Tasks => "tasks (wall)",
            Phase::Merge => "merge",
        }
    }

    /// Summed over threads (true) or wall time of the caller (false).
    pub fn is_thread_time(self) -> bool {
        !matches!(self, Phase::Prepare | Phase::Tasks | Phase::Merge)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TICKS: [AtomicU64; Phase::ALL.len()] = [const { AtomicU64::new(0) }; Phase::ALL.len()];
/// When timing was last enabled or taken, in both clocks: the tick rate over the interval.
static EPOCH: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

/// Turns timing on or off (totals are kept; [`take`] clears them).
pub fn enable(on: bool) {
    if on {
        let mut epoch = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
        if epoch.is_none() {
            *epoch = Some((Instant::now(), ticks()));
        }
    }
    ENABLED.store(on, Ordering::SeqCst);
}

/// Totals in seconds per phase, in [`Phase::ALL`] order, since the last `take` (or since
/// timing was first enabled); clears them.
pub fn take() -> [f64; Phase::ALL.len()] {
    let mut epoch = EPOCH.lock().unwrap_or_else(|e| e.into_inner());
    let now = (Instant::now(), ticks());
    let per_second = match *epoch {
        Some((t0, k0)) if now.0 > t0 => now.1.wrapping_sub(k0) as f64 / (now.0 - t0).as_secs_f64(),
        _ => f64::NAN,
    };
    *epoch = Some(now);
    std::array::from_fn(|i| TICKS[i].swap(0, Ordering::Relaxed) as f64 / per_second)
}

/// The time now if timing is on.
#[inline(always)]
pub(crate) fn start() -> Option<u64> {
    ENABLED.load(Ordering::Relaxed).then(ticks)
}

/// Adds the time since `*at` to `phase` and restarts `*at` (nothing when timing is off).
#[inline(always)]
pub(crate) fn lap(phase: Phase, at: &mut Option<u64>) {
    if let Some(t0) = *at {
        let now = ticks();
        TICKS[phase as usize].fetch_add(now.wrapping_sub(t0), Ordering::Relaxed);
        *at = Some(now);
    }
}

/// Moves the time since `at` from `outer` (which will count it) to `inner`, a phase nested
/// inside it.
#[inline(always)]
pub(crate) fn nested(inner: Phase, outer: Phase, at: Option<u64>) {
    if let Some(t0) = at {
        let dt = ticks().wrapping_sub(t0);
        TICKS[inner as usize].fetch_add(dt, Ordering::Relaxed);
        TICKS[outer as usize].fetch_sub(dt, Ordering::Relaxed);
    }
}

#[inline(always)]
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86-64 CPU; it only reads the counter.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}
