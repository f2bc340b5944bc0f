//! Group commit for sled: one thread runs `Db::flush()` for every waiter that arrived
//! before the flush started, so concurrent one-phase commits and checkpoints share one.
//!
//! sled's `flush_async` deadlocks under concurrent callers (upstream #1308), so every
//! flush goes through here, off the async threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::store::StoreError;

#[derive(Debug)]
pub struct Flusher {
    /// `None` only while dropping.
    requests: Option<mpsc::Sender<oneshot::Sender<Result<(), String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicBool>,
}

impl Flusher {
    pub fn start(db: sled::Db) -> Self {
        let (requests, receiver) = mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        let failed = Arc::new(AtomicBool::new(false));
        let thread_failed = failed.clone();
        let thread = std::thread::Builder::new()
            .name("sled-flusher".into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(receiver.try_iter());
                    // After one failed fsync nothing written since can be trusted to be
                    // durable (the kernel may have dropped the dirty pages): fail for good.
                    let result = if thread_failed.load(Ordering::SeqCst) {
                        Err("an earlier flush failed".to_string())
                    } else {
                        db.flush().map(|_| ()).map_err(|e| {
                            thread_failed.store(true, Ordering::SeqCst);
                            e.to_string()
                        })
                    };
                    for waiter in waiters {
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .expect("spawning the sled flusher thread");
        Self {
            requests: Some(requests),
            thread: Some(thread),
            failed,
        }
    }

    fn request(&self) -> Result<oneshot::Receiver<Result<(), String>>, StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Fatal("an earlier flush failed".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(|| StoreError::Fatal("the flusher is stopped".into()))?
            .send(tx)
            .map_err(|_| StoreError::Fatal("the flusher thread is gone".into()))?;
        Ok(rx)
    }

    fn answer(
        answer: Result<Result<(), String>, oneshot::error::RecvError>,
    ) -> Result<(), StoreError> {
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Fatal(format!("sled flush failed: {e}"))),
            Err(_) => Err(StoreError::Fatal("the flusher thread is gone".into())),
        }
    }

    /// Returns once everything written to the Db before this call is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let rx = self.request()?;
        Self::answer(rx.await)
    }

    /// The same, from a thread outside the async runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let rx = self.request()?;
        Self::answer(rx.blocking_recv())
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the channel ends the thread, which releases its handle on the Db (and
        // with it sled's file lock) before the store's drop returns.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
