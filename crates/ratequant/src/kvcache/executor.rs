//! Runs one attention call's work on the calling pool thread and on the pool's other threads.
//!
//! A decode step is a few hundred microseconds, so how fast the other threads join it
//! matters. Handed to rayon as a job, a helper joins late: rayon's idle workers go to sleep
//! within about 10 µs, and on the VMs measured here waking one took 20–45 µs (the helper's
//! first task started 23–45 µs after the caller's, and the wake-up's system call held up the
//! caller's own start by 3–13 µs, at 16K tokens in steps of 170–270 µs).
//!
//! So a helper that has worked on a call stays for [`LINGER`] after it: it spins on a
//! [`Board`] where the next call publishes itself, and joins it within a few hundred
//! nanoseconds, without a wake-up. While it spins it runs the pool's other pending jobs
//! (`rayon::yield_now`), so the model's other parallel work between two attention calls keeps
//! both cores and keeps the helper there. That is the busy-wait of OpenMP runtimes and of
//! llama.cpp's thread pool, kept short.
//!
//! One call at a time uses the board; a call that finds it taken (a nested call, or calls
//! from several threads at once) hands its helpers to rayon as before. The board is the
//! process's, not a pool's: where several pools run attention at once, a helper lingering
//! in one may join a call from another (every task's result is the same on any thread).
//! Spinning costs a core for up to [`LINGER`] after a call; with `RAYON_NUM_THREADS=1` there
//! are no helpers and nothing spins.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a helper spins for the next call after its last work: longer than the rest of a
/// decode layer (its matmuls), short enough to cost nothing noticeable when no call follows.
pub(super) const LINGER: Duration = Duration::from_millis(2);

/// One published call.
struct Step<'a> {
    work: &'a (dyn Fn() + Sync),
    /// The first panic of a helper's `work`, re-raised by the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    panicked: AtomicBool,
}

impl Step<'_> {
    fn enter(&self) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(self.work)) {
            let mut first = self.panic.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(payload);
            self.panicked.store(true, SeqCst);
        }
    }
}

/// Where a call publishes itself for lingering helpers.
///
/// A helper joins only after counting itself `inside` and then seeing the same call still
/// published under the same epoch; a caller withdraws its call (null) and then waits for
/// `inside` to drop to 0 before its stack frame (the [`Step`]) goes away. With every access
/// sequentially consistent, either the helper sees the withdrawal or the caller sees the
/// helper, never neither. (The count is the board's, not the call's: where another thread
/// publishes the moment a call is withdrawn, the first caller returns only when the second
/// call's helpers leave it. One decode loop never overlaps its calls.)
struct Board {
    step: AtomicPtr<()>,
    /// Bumped before every publication, so that a helper tells a new call from the one it
    /// just left even when the new one sits at the same address.
    epoch: AtomicU64,
    inside: AtomicUsize,
    /// Helpers lingering or spawned and not yet started: a call spawns only the rest.
    available: AtomicUsize,
}

static BOARD: Board = Board {
    step: AtomicPtr::new(std::ptr::null_mut()),
    epoch: AtomicU64::new(0),
    inside: AtomicUsize::new(0),
    available: AtomicUsize::new(0),
};

thread_local! {
    /// Set while this thread runs [`helper`]: a helper job met again further down its own
    /// stack (through `rayon::yield_now`) returns at once.
    static LINGERING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work` on this thread and on up to `helpers` other threads of the current pool, and
/// returns once `finished()` and no other thread is inside `work` any more. `work` must
/// return when there is nothing left for the thread calling it (it claims its share itself).
/// A panic in `work`, on any thread, is re-raised here after the others have left.
pub(super) fn run(helpers: usize, work: &(dyn Fn() + Sync), finished: &(dyn Fn() -> bool + Sync)) {
    if helpers == 0 {
        work();
        return;
    }
    let step = Step {
        work,
        panic: Mutex::new(None),
        panicked: AtomicBool::new(false),
    };
    let at = &step as *const Step as *mut ();
    BOARD.epoch.fetch_add(1, SeqCst);
    if BOARD
        .step
        .compare_exchange(std::ptr::null_mut(), at, SeqCst, SeqCst)
        .is_err()
    {
        return run_scoped(helpers, work, finished);
    }
    // Helpers to recruit: those not already lingering (this thread may be one of them, if
    // it runs this call from inside its own lingering).
    let mut available = BOARD.available.load(SeqCst);
    if LINGERING.get() {
        available = available.saturating_sub(1);
    }
    for _ in available..helpers {
        BOARD.available.fetch_add(1, SeqCst);
        #[cfg(test)]
        tests::SPAWNED.with(|c| c.set(c.get() + 1));
        rayon::spawn(helper);
    }
    let own = catch_unwind(AssertUnwindSafe(work));
    if own.is_ok() {
        // The helpers' last tasks.
        wait_until(&|| finished() || step.panicked.load(SeqCst));
    }
    BOARD.step.store(std::ptr::null_mut(), SeqCst);
    wait_until(&|| BOARD.inside.load(SeqCst) == 0);
    if let Err(payload) = own {
        resume_unwind(payload);
    }
    let helper_panic = step.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = helper_panic {
        resume_unwind(payload);
    }
}

/// Spins until `done()`: a task is microseconds; past about 50 µs of `pause` a helper lost
/// its core, so give it ours.
fn wait_until(done: &dyn Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        if spins < 1 << 10 {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// A helper: joins the published call, then lingers for the next ones. One that arrives
/// after the call it was spawned for has ended leaves at once: it has nothing to linger for.
fn helper() {
    if LINGERING.get() {
        BOARD.available.fetch_sub(1, SeqCst);
        return;
    }
    LINGERING.set(true);
    let _unset = Unset;
    let mut last = 0;
    let mut joined = false;
    let mut since = Instant::now();
    loop {
        if try_join(&mut last) {
            joined = true;
            since = Instant::now();
            continue;
        }
        if !joined {
            break;
        }
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => since = Instant::now(),
            _ => std::hint::spin_loop(),
        }
        if since.elapsed() > LINGER && !held() {
            break;
        }
    }
    BOARD.available.fetch_sub(1, SeqCst);
    // A call published after its caller counted this helper as available.
    try_join(&mut last);
}

/// Whether a test holds lingering helpers past [`LINGER`] (so that a loaded test machine,
/// which may leave a caller off its core for milliseconds, does not send them away).
fn held() -> bool {
    #[cfg(test)]
    return tests::HOLD.load(SeqCst);
    #[cfg(not(test))]
    false
}

/// Clears [`LINGERING`] however [`helper`] ends.
struct Unset;

impl Drop for Unset {
    fn drop(&mut self) {
        LINGERING.set(false);
    }
}

/// Joins the published call unless it is the one of epoch `last`; whether it joined.
fn try_join(last: &mut u64) -> bool {
    let epoch = BOARD.epoch.load(SeqCst);
    let at = BOARD.step.load(SeqCst);
    if at.is_null() || epoch == *last {
        return false;
    }
    BOARD.inside.fetch_add(1, SeqCst);
    let same = BOARD.step.load(SeqCst) == at && BOARD.epoch.load(SeqCst) == epoch;
    if same {
        *last = epoch;
        // SAFETY: the call is still published under its epoch after this thread counted
        // itself inside, so its caller waits for `inside` to drop before the `Step` goes.
        let step = unsafe { &*(at as *const Step) };
        step.enter();
    }
    BOARD.inside.fetch_sub(1, SeqCst);
    same
}

/// [`run`] with its helpers handed to rayon as jobs of a scope (the board is taken).
fn run_scoped(helpers: usize, work: &(dyn Fn() + Sync), finished: &(dyn Fn() -> bool + Sync)) {
    let (started, left) = (AtomicUsize::new(0), AtomicUsize::new(0));
    // Set when a helper's work panics: what it claimed will never be done, and the scope
    // re-raises.
    let panicked = AtomicBool::new(false);
    rayon::in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| {
                started.fetch_add(1, SeqCst);
                let _leave = Leave {
                    left: &left,
                    panicked: &panicked,
                };
                work();
            });
        }
        work();
        // Wait for the running helpers' last tasks here rather than in the scope, which would
        // put this thread to sleep and need a wake-up. (A helper that has not started is left
        // to the scope: spinning for it could starve the pool thread that would run it.)
        wait_until(&|| {
            (finished() && left.load(SeqCst) >= started.load(SeqCst)) || panicked.load(SeqCst)
        });
    });
}

/// Counts a helper out of [`run_scoped`], also when its work panics.
struct Leave<'a> {
    left: &'a AtomicUsize,
    panicked: &'a AtomicBool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.panicked.store(true, SeqCst);
        }
        self.left.fetch_add(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Helpers this thread's calls handed to rayon.
        pub(super) static SPAWNED: Cell<usize> = const { Cell::new(0) };
    }

    /// While set, lingering helpers do not time out.
    pub(super) static HOLD: AtomicBool = AtomicBool::new(false);

    /// Who ran a task in [`call`].
    const NOT_RUN: u8 = 0;
    const CALLER: u8 = 1;
    const OTHER: u8 = 2;

    /// `run` with `n` tasks of about `spin` pauses each, claimed from one counter; returns
    /// who ran each task. Checks that every helper has left `work` when `run` returns.
    fn call(n: usize, spin: usize, inside_any: &AtomicUsize) -> Vec<u8> {
        let next = AtomicUsize::new(0);
        let done = AtomicUsize::new(0);
        let ran: Vec<std::sync::atomic::AtomicU8> = (0..n)
            .map(|_| std::sync::atomic::AtomicU8::new(NOT_RUN))
            .collect();
        let caller = std::thread::current().id();
        let work = || {
            inside_any.fetch_add(1, SeqCst);
            loop {
                let t = next.fetch_add(1, SeqCst);
                if t >= n {
                    break;
                }
                for _ in 0..spin {
                    std::hint::spin_loop();
                }
                let who = if std::thread::current().id() == caller {
                    CALLER
                } else {
                    OTHER
                };
                ran[t].store(who, SeqCst);
                done.fetch_add(1, SeqCst);
            }
            inside_any.fetch_sub(1, SeqCst);
        };
        run(1, &work, &|| done.load(SeqCst) >= n);
        assert_eq!(
            inside_any.load(SeqCst),
            0,
            "a helper is still inside a finished call"
        );
        ran.iter().map(|t| t.load(SeqCst)).collect()
    }

    /// Clears [`HOLD`] however the test ends.
    struct Release;

    impl Drop for Release {
        fn drop(&mut self) {
            HOLD.store(false, SeqCst);
        }
    }

    #[test]
    fn a_helper_stays_for_the_next_calls_and_leaves_each_before_it_returns() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        HOLD.store(true, SeqCst);
        let _release = Release;
        pool.install(|| {
            let inside = AtomicUsize::new(0);
            let (calls, mut helped) = (200, 0);
            let spawned = SPAWNED.with(|c| c.get());
            // Back to back, as a decode's layers: after the first, the helper is lingering.
            for i in 0..calls {
                let ran = call(8, 20_000, &inside);
                assert!(!ran.contains(&NOT_RUN), "call {i}: a task did not run");
                helped += ran.contains(&OTHER) as usize;
            }
            let spawned = SPAWNED.with(|c| c.get()) - spawned;
            assert!(helped > 0, "the helper never ran a task");
            // Every call that finds no helper lingering spawns one (1–2 of 200 here, 191–200
            // when helpers leave after each call).
            assert!(
                spawned <= calls / 4,
                "{spawned} of {calls} calls found no helper lingering"
            );
        });
    }

    #[test]
    fn calls_from_several_threads_at_once_each_get_their_own_work_done() {
        // One call holds the board; the others run their helpers as rayon jobs.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..300 {
                        let inside = AtomicUsize::new(0);
                        let ran = rayon::scope(|_| call(1 + i % 40, 100, &inside));
                        assert!(!ran.contains(&NOT_RUN), "a task did not run");
                    }
                });
            }
        });
    }

    #[test]
    fn a_helpers_panic_reaches_the_caller_after_the_helpers_leave() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let mut raised = 0;
            for round in 0..50 {
                let caller = rayon::current_thread_index();
                let next = AtomicUsize::new(0);
                let work = || {
                    // The helper panics at its first task; the caller runs the rest.
                    while next.fetch_add(1, SeqCst) < 1000 {
                        if rayon::current_thread_index() != caller {
                            panic!("helper fails in round {round}");
                        }
                        std::thread::yield_now();
                    }
                };
                let result = catch_unwind(AssertUnwindSafe(|| {
                    run(1, &work, &|| next.load(SeqCst) >= 1000)
                }));
                // A helper that came after the caller had claimed everything did not panic.
                if let Err(payload) = result {
                    let message = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_default();
                    assert_eq!(message, format!("helper fails in round {round}"));
                    raised += 1;
                }
            }
            assert!(raised > 0, "no helper's panic reached the caller");
        });
    }
}
