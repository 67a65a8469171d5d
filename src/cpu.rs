//! CPU-bound steps on a request's path (sealing, opening, checking a
//! signature). Their cost grows with the size of the text: base58 is
//! quadratic at heart. A large one runs on the blocking pool so that it does
//! not hold up other clients on the async threads; a small one (almost every
//! chat request) runs where it is, because handing it to another thread and
//! back costs two context switches, more than the work itself.

use tokio::task::JoinError;

/// Texts up to this many bytes are handled on the calling task: base58 of
/// 4 KiB takes tens of microseconds, about what a trip through the
/// blocking pool costs.
pub const INLINE_BYTES: usize = 4 * 1024;

/// Run `f`, whose input is `size` bytes: here when small, on the blocking
/// pool when large.
pub async fn run<T, F>(size: usize, f: F) -> Result<T, JoinError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if size <= INLINE_BYTES {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_work_runs_on_the_calling_thread_and_large_work_does_not() {
        let here = std::thread::current().id();
        let small = run(INLINE_BYTES, || std::thread::current().id()).await;
        assert_eq!(small.ok(), Some(here));
        let large = run(INLINE_BYTES + 1, || std::thread::current().id()).await;
        assert_ne!(large.ok(), Some(here));
    }
}
