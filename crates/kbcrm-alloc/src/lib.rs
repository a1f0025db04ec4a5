//! The allocator of the `kbcrm` binary: mimalloc, set to give memory it frees back to the
//! operating system soon (a fifth of a second) rather than after mimalloc's default second, and
//! kept off transparent huge pages.
//!
//! kbcrm itself forbids `unsafe` code; setting one of mimalloc's options is a call into C, so it
//! lives here, behind safe functions.
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: kbcrm_alloc::MiMalloc = kbcrm_alloc::MiMalloc;
//!
//! fn main() {
//!     kbcrm_alloc::return_freed_memory_soon();
//!     kbcrm_alloc::no_transparent_huge_pages();
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

/// mimalloc's `mi_option_allow_thp` (mimalloc 3): whether it asks Linux for transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`) on the memory it maps; 1 by default.
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// The environment variable with which a user decides on transparent huge pages themselves.
pub const ALLOW_THP_ENV: &str = "MIMALLOC_ALLOW_THP";

/// Keep the process off transparent huge pages, unless the user set `MIMALLOC_ALLOW_THP`.
///
/// mimalloc asks for huge pages on the memory it maps; Linux then zeroes a whole 2 MiB page the
/// first time any byte of it is touched, again after every purge. A 1% incremental batch at
/// scale 1 spent 47% of its CPU time in the kernel zeroing huge pages: without them it ran in
/// 5.2-5.4 s instead of 7.3-7.6 s with a third less resident memory, a full scale-1 load in
/// 21-22 s instead of 24-26 s; scale-10 queries were within noise. Both mimalloc's option and
/// the process's THP flag (`PR_SET_THP_DISABLE`, which also covers what mimalloc mapped before
/// `main`) are set. Call it at the start of `main`, before other threads start.
pub fn no_transparent_huge_pages() {
    static SET: Once = Once::new();
    if std::env::var_os(ALLOW_THP_ENV).is_some() {
        return;
    }
    SET.call_once(|| {
        // SAFETY: as in `return_freed_memory_soon`: one entry of the option table, read by
        // mimalloc each time it maps memory; `Once` and the caller keep the write unraced.
        unsafe { libmimalloc_sys::mi_option_set(ALLOW_THP, 0) };
        #[cfg(target_os = "linux")]
        // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` sets a flag of this process's memory
        // map and touches no memory of ours; it fails only on kernels without the flag (before
        // 3.15), where there is nothing to do.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    });
}

/// Whether mimalloc asks for transparent huge pages now.
pub fn allows_thp() -> bool {
    // SAFETY: reading an option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_get(ALLOW_THP) != 0 }
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

    #[test]
    fn no_transparent_huge_pages_turns_them_off_for_mimalloc_and_the_process() {
        if std::env::var_os(ALLOW_THP_ENV).is_some() {
            // The user's setting applies and is left alone.
            let before = allows_thp();
            no_transparent_huge_pages();
            assert_eq!(allows_thp(), before);
            return;
        }
        // Option 43 holds mimalloc 3's default of 1: it is the option meant.
        assert!(allows_thp());
        no_transparent_huge_pages();
        assert!(!allows_thp());
        #[cfg(target_os = "linux")]
        {
            let status = std::fs::read_to_string("/proc/self/status").expect("status");
            // Kernels from 6.1 on show the flag; older ones have no such line.
            if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
                assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
            }
        }
    }
}
