//! Deadlines that interrupt llguidance while it works. A matcher made cancellable hands out a
//! [`CancellationHandle`]; [`arm`] registers it with one process-wide timer thread, which cancels
//! it when the deadline passes. The running mask computation notices at its next checkpoint and
//! returns `Cancelled`, so a slow grammar stops at its budget instead of being measured after it
//! finished. Dropping the returned [`Armed`] disarms it.

use llguidance::CancellationHandle;
use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Watchdog {
    armed: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    next_id: u64,
    deadlines: BTreeMap<(Instant, u64), CancellationHandle>,
}

/// A registered deadline; disarmed on drop.
pub struct Armed {
    key: (Instant, u64),
}

impl Armed {
    /// Whether the deadline has passed (and the handle was cancelled or is about to be).
    pub fn expired(&self) -> bool {
        Instant::now() >= self.key.0
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let dog = watchdog();
        dog.armed.lock().unwrap_or_else(|p| p.into_inner()).deadlines.remove(&self.key);
    }
}

fn watchdog() -> &'static Watchdog {
    static DOG: OnceLock<&'static Watchdog> = OnceLock::new();
    DOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog { armed: Mutex::new(State::default()), wake: Condvar::new() }));
        std::thread::Builder::new()
            .name("helpline-guard-watchdog".into())
            .spawn(move || run(dog))
            .expect("spawning the grammar watchdog thread");
        dog
    })
}

fn run(dog: &'static Watchdog) {
    let mut state = dog.armed.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let now = Instant::now();
        let first = state.deadlines.keys().next().copied();
        state = match first {
            None => dog.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            Some(key) if key.0 <= now => {
                if let Some(handle) = state.deadlines.remove(&key) {
                    handle.cancel();
                }
                state
            }
            Some(key) => dog.wake.wait_timeout(state, key.0 - now).unwrap_or_else(|p| p.into_inner()).0,
        };
    }
}

/// Cancels `handle` once `budget` has passed, unless the returned guard is dropped first.
pub fn arm(handle: CancellationHandle, budget: Duration) -> Armed {
    let deadline = Instant::now() + budget;
    let dog = watchdog();
    let mut state = dog.armed.lock().unwrap_or_else(|p| p.into_inner());
    let id = state.next_id;
    state.next_id += 1;
    let key = (deadline, id);
    let earliest = state.deadlines.keys().next().is_none_or(|first| key < *first);
    state.deadlines.insert(key, handle);
    drop(state);
    if earliest {
        dog.wake.notify_one();
    }
    Armed { key }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_cancel_in_time_and_disarm_on_drop() {
        let late = CancellationHandle::default();
        let soon = CancellationHandle::default();
        let _a = arm(late.clone(), Duration::from_secs(30));
        let b = arm(soon.clone(), Duration::from_millis(20));
        let start = Instant::now();
        while !soon.is_cancelled() {
            assert!(start.elapsed() < Duration::from_secs(10), "the short deadline never fired");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(b.expired());
        assert!(!late.is_cancelled(), "only the passed deadline fires");
        let dropped = CancellationHandle::default();
        drop(arm(dropped.clone(), Duration::from_millis(5)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!dropped.is_cancelled(), "a disarmed deadline does not fire");
    }
}
