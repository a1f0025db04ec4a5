//! The `kbcrm` command.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: the engine's many short-lived buffers of many sizes
/// left glibc's arenas holding freed memory, far above `memory_limit` (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: kbcrm_alloc::MiMalloc = kbcrm_alloc::MiMalloc;

fn main() -> ExitCode {
    let cli = kbcrm::cli::Cli::parse();
    // Before any other thread starts: a load gives freed memory back to the system after a
    // fifth of a second instead of a second, so that its resident size follows `memory_limit`
    // (returning it at once made CSV loads markedly slower). Queries and the server keep
    // mimalloc's delay: reusing freed pages makes heavy queries faster. The environment's
    // MIMALLOC_PURGE_DELAY overrides both. BENCHMARKS.md has the figures.
    if cli.command.builds_tables() {
        kbcrm_alloc::return_freed_memory_soon();
    }
    // No transparent huge pages: Linux zeroes a whole 2 MiB page on its first touch, which was
    // most of a small batch's CPU time; without them batches and loads run faster in less
    // memory, queries as fast (BENCHMARKS.md; MIMALLOC_ALLOW_THP overrides).
    kbcrm_alloc::no_transparent_huge_pages();
    kbcrm::cli::init_tracing(&cli);
    quiet_upload_cleanup_panics();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = miette::set_hook(Box::new(move |_| {
        // Whole lines when a program reads the messages; wrapped and coloured on a terminal.
        Box::new(
            miette::MietteHandlerOpts::new()
                .wrap_lines(terminal)
                .color(terminal)
                .unicode(terminal)
                .build(),
        )
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // `kbcrm serve` moves statements' syntax trees and plans through these threads (their
        // depth bounded by the server's complexity limit); reserved, not used, until needed.
        .thread_stack_size(kbcrm::serve::pool::PROTOCOL_STACK_SIZE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(kbcrm::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            match e {
                kbcrm::Error::Invalid(problems) => {
                    let n = problems.len();
                    for p in problems {
                        eprintln!("{:?}", miette::Report::new(p));
                    }
                    eprintln!("error: {n} problem(s) in the project; nothing was run or written");
                }
                other => eprintln!("{:?}", miette::Report::new(other)),
            }
            ExitCode::from(code)
        }
    }
}

/// object_store's `BufWriter::abort` panics ("Already shut down") when it is called after a
/// failed upload (apache/arrow-rs-object-store#810), and delta-rs calls it from a detached
/// task when a writer that failed is dropped (on a full disk, for one). The panic ends only
/// that cleanup task: the write's error is reported as it is. It is logged at debug level
/// instead of printed; every other panic is printed as before.
fn quiet_upload_cleanup_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_buffered_writer = info.location().is_some_and(|l| {
            l.file().contains("object_store") && l.file().ends_with("buffered.rs")
        });
        let message = info.payload().downcast_ref::<&str>().copied();
        if in_buffered_writer && message == Some("Already shut down") {
            tracing::debug!("an upload's cleanup after a failed write panicked (object_store#810)");
            return;
        }
        default(info);
    }));
}
