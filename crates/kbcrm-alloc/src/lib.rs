//! The allocator of the `kbcrm` binary: mimalloc, set to give memory it frees back to the
//! operating system soon (a fifth of a second) rather than after mimalloc's default second.
//!
//! kbcrm itself forbids `unsafe` code; setting one of mimalloc's options is a call into C, so it
//! lives here, behind a safe function.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: kbcrm_alloc::MiMalloc = kbcrm_alloc::MiMalloc;
//!
//! fn main() {
//!     kbcrm_alloc::return_freed_memory_soon();
//! }
//! ```

use std::sync::Once;

pub use mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: milliseconds before freed pages are given back to the
/// operating system (mimalloc 3: 1000 by default). The bindings leave the option numbers out;
/// this is its place in `mi_option_t` (mimalloc 2 and 3), checked by the tests.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variable with which a user sets the purge delay themselves.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

/// The purge delay [`return_freed_memory_soon`] sets, in milliseconds.
pub const SOON_MS: std::ffi::c_long = 200;

/// Make mimalloc give freed memory back to the operating system [`SOON_MS`] after it is freed
/// instead of keeping it a second for reuse, unless the user set `MIMALLOC_PURGE_DELAY` (which
/// then applies).
///
/// The whole scale-10 pipeline in one process under a 2 GiB memory limit peaked at 3.06 GiB
/// resident with mimalloc's 1000 ms, 2.74 GiB with 200 ms (10:45) and 2.53 GiB with 0 (11:05);
/// but 0 made loading a CSV file a quarter slower than 200 ms (pages returned, then asked for
/// again), and 200 ms was as fast as 1000. Call it at the start of `main`, before other threads
/// start: mimalloc's options are not synchronised.
pub fn return_freed_memory_soon() {
    static SET: Once = Once::new();
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return;
    }
    SET.call_once(|| {
        // SAFETY: `mi_option_set` writes one entry of mimalloc's option table, which mimalloc
        // reads each time it schedules a purge; `Once` keeps the write from racing another call
        // of this function, and callers make it before starting threads that allocate.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, SOON_MS) }
    });
}

/// The purge delay mimalloc uses now, in milliseconds.
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reading an option has no preconditions; the option table is initialised with the
    // allocator.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: MiMalloc = MiMalloc;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // mimalloc read its options from the environment when the process started.
        match std::env::var(PURGE_DELAY_ENV) {
            Ok(value) => {
                // The user's setting applies and is left alone.
                return_freed_memory_soon();
                assert_eq!(purge_delay_ms().to_string(), value.trim());
            }
            Err(_) => {
                // Option 15 holds mimalloc 3's default purge delay: it is the option meant.
                assert_eq!(purge_delay_ms(), 1000);
                return_freed_memory_soon();
                assert_eq!(purge_delay_ms(), SOON_MS);
            }
        }
    }
}
