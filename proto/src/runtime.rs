//! The tokio runtime the coordinator and participant daemons serve on.

/// A multi-threaded runtime with `worker_threads` workers (None: one per core), with
/// tokio's LIFO slot turned off where the build allows it (`--cfg tokio_unstable`, set
/// in `.cargo/config.toml`; without it the slot stays on and nothing else changes).
///
/// With the slot, a task woken by the running one runs right after it: when a group
/// commit answers many Execute calls at once, each handler that finishes wakes the
/// HTTP/2 connection task, which then runs at once and writes that one answer, so every
/// answer costs a `writev` (and the loopback delivery it carries). Without it the
/// connection task waits its turn behind the other handlers and writes their answers
/// together; the same holds for the answers a participant streams back. Measured with
/// `ratify bench`, the same build with the slot on and off, alternating run by run, 8
/// rounds each: 19,960 against 18,520 committed/s at 64 clients (p99 9.0 against 9.4
/// ms); at 1 client a p50 of 0.67 against 0.66 ms, within the noise. The bench's echo
/// server keeps the slot: a request-response echo is faster with it (about 8%), so its
/// ceiling stays the higher one.
pub fn daemon_runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.enable_all().build()
}
