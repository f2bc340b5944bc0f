//! The local decision log: segmented files of CRC32C frames, written by one thread that
//! batches every waiting append into one write and one fdatasync (group commit).
//!
//! Files in the data directory:
//! - `LOCK`: held (flock) while a coordinator uses the directory;
//! - `epoch`: the coordinator epoch (u64 LE + CRC32C), raised on every open;
//! - `wal-<seq>.log`: segments, `seq` contiguous; a new one starts when the current one
//!   passes `segment_bytes`, and segments whose transactions have all ended are removed.
//!
//! The current segment is zero-filled ahead of its last frame, a chunk at a time
//! ([`WalOptions::preallocate_bytes`]), and frames overwrite that space, one synced frame
//! at a time (a batch is one frame unless it passes the frame limit); see
//! [`ratify_proto::segment`] for why.
//!
//! Unforced records (ENDs) wait in memory, at most [`WalOptions::unforced_linger`], for a
//! forced one to share its write and fdatasync: a transaction's END then costs no fsync
//! of its own, and at low load the disk is not busy with one while the next transaction's
//! prepares are syncing at the participants. They wait beside the writer thread, not in
//! its queue: the next forced append takes them along, so queueing one never wakes the
//! writer (it looks for overdue ones on its own, at least once a linger).
//!
//! On open a torn tail (a damaged last frame of the last segment, nothing valid after it)
//! is cut off; any other damage makes [`Wal::open`] fail with the file and offset, so a
//! logged decision is never skipped silently. This module uses no async runtime.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
#[cfg(feature = "failpoints")]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use ratify_proto::TxnId;
use tracing::{info, warn};

use ratify_proto::segment::SegmentFile;

use super::frame::{self, HEADER_LEN};
use super::{DecisionLog, LogError, LogRecord, LogStats};

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment starts once the current one is at least this large.
    pub segment_bytes: u64,
    /// How long an unforced record may wait for a forced one to share its write and
    /// fdatasync before it is written and synced on its own.
    pub unforced_linger: Duration,
    /// Zero-filled space kept ahead of the last frame, topped up a chunk of this size at a
    /// time (never past `segment_bytes`). 0: frames are appended to a growing file.
    pub preallocate_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            unforced_linger: Duration::from_millis(100),
            preallocate_bytes: 1 << 20,
        }
    }
}

/// Unforced records held back past this many are written at once, whatever their age.
const MAX_HELD_RECORDS: usize = 4096;

/// Why the log cannot be opened. Each message names the file and, for damage, the offset.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the decision log is corrupt at {path} offset {offset}: {why}. Refusing to start: \
         records after this point may hold decisions. Restore the file, or move it aside \
         only if you accept losing them."
    )]
    Corrupt {
        path: PathBuf,
        offset: usize,
        why: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    segments_removed: AtomicU64,
}

struct Request {
    records: Vec<LogRecord>,
    done: Option<oneshot::Sender<Result<(), LogError>>>,
}

/// Unforced records not yet handed to the writer thread.
#[derive(Debug, Default)]
struct Unforced {
    records: Vec<LogRecord>,
    /// When the oldest of them was appended.
    since: Option<Instant>,
}

/// The local write-ahead decision log.
#[derive(Debug)]
pub struct Wal {
    epoch: u64,
    requests: Option<mpsc::Sender<Request>>,
    unforced: Arc<Mutex<Unforced>>,
    writer: Option<std::thread::JoinHandle<()>>,
    recovered: Mutex<Vec<LogRecord>>,
    counters: Arc<Counters>,
    failed: Arc<Mutex<Option<String>>>,
    dir: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("records", &self.records.len())
            .finish()
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("wal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// fsyncs a directory, so a created, renamed or removed entry is durable.
fn sync_dir(dir: &Path) -> Result<(), OpenError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn bump_epoch(dir: &Path) -> Result<u64, OpenError> {
    let path = dir.join("epoch");
    let previous = match fs::read(&path) {
        Ok(bytes) => {
            if bytes.len() != 12
                || crc32c::crc32c(&bytes[..8])
                    != u32::from_le_bytes(bytes[8..12].try_into().expect("4"))
            {
                return Err(OpenError::Corrupt {
                    path,
                    offset: 0,
                    why: "the epoch file is damaged".into(),
                });
            }
            u64::from_le_bytes(bytes[..8].try_into().expect("8"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(&path)(e)),
    };
    let epoch = previous + 1;
    let mut bytes = epoch.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
    let tmp = dir.join("epoch.tmp");
    {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // The new epoch is durable before anything is stamped with it.
    sync_dir(dir)?;
    Ok(epoch)
}

fn create_segment(dir: &Path, seq: u64) -> Result<File, OpenError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    file.write_all(&frame::segment_header())
        .map_err(io_err(&path))?;
    file.sync_all().map_err(io_err(&path))?;
    // The segment's directory entry is durable before any record in it is acknowledged.
    sync_dir(dir)?;
    Ok(file)
}

struct Writer {
    dir: PathBuf,
    options: WalOptions,
    /// The current segment.
    segment: SegmentFile,
    seq: u64,
    /// Segments on disk, oldest first.
    segments: Vec<u64>,
    /// Transactions with a record and no END yet -> the oldest segment holding one.
    live: HashMap<TxnId, u64>,
    counters: Arc<Counters>,
    failed: Arc<Mutex<Option<String>>>,
    unforced: Arc<Mutex<Unforced>>,
}

fn lock_unforced(unforced: &Mutex<Unforced>) -> std::sync::MutexGuard<'_, Unforced> {
    unforced.lock().unwrap_or_else(|p| p.into_inner())
}

impl Wal {
    /// Opens the log in `dir` (creating it if new), repairs a torn tail, raises the epoch
    /// and starts the writer thread.
    pub fn open(dir: &Path, options: WalOptions) -> Result<Self, OpenError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.try_lock().map_err(|_| {
            OpenError::Invalid(format!(
                "{} is in use by another coordinator (its LOCK is held)",
                dir.display()
            ))
        })?;

        let mut segments: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
                segments.push(seq);
            }
        }
        segments.sort_unstable();
        for pair in segments.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(OpenError::Invalid(format!(
                    "decision log segment {} is missing (found {} then {}); refusing to start",
                    segment_path(dir, pair[0] + 1).display(),
                    pair[0],
                    pair[1]
                )));
            }
        }

        let mut records = Vec::new();
        let mut live: HashMap<TxnId, u64> = HashMap::new();
        let last = segments.last().copied();
        let mut tail_len = 0u64;
        let mut tail_allocated = 0u64;
        for &seq in &segments {
            let path = segment_path(dir, seq);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            let is_last = Some(seq) == last;
            let scan = match frame::scan_segment(&bytes) {
                Ok(scan) => scan,
                Err(why) if is_last && bytes.len() <= HEADER_LEN => {
                    // Created but its header never reached the disk whole: holds nothing.
                    warn!(path = %path.display(), %why, "rewriting the header of an empty last segment");
                    drop(create_segment(dir, seq)?);
                    tail_len = HEADER_LEN as u64;
                    tail_allocated = HEADER_LEN as u64;
                    continue;
                }
                Err(why) => {
                    return Err(OpenError::Corrupt {
                        path,
                        offset: 0,
                        why,
                    });
                }
            };
            if scan.zero_tail > 0 && !is_last {
                // A segment is cut to its last frame before the next one starts.
                return Err(OpenError::Corrupt {
                    path,
                    offset: scan.valid_len,
                    why: format!(
                        "{} zero bytes end a segment that is not the last",
                        scan.zero_tail
                    ),
                });
            }
            if let Some(damage) = &scan.damage {
                if !(is_last && damage.torn_tail) {
                    return Err(OpenError::Corrupt {
                        path,
                        offset: damage.offset,
                        why: damage.why.clone(),
                    });
                }
                // A write that was in flight at the crash: it was never acknowledged (the
                // fsync that would have acknowledged it did not return), so cut it off.
                warn!(
                    path = %path.display(),
                    offset = damage.offset,
                    dropped_bytes = bytes.len() - scan.valid_len,
                    why = %damage.why,
                    "truncating a torn tail"
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.set_len(scan.valid_len as u64).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
            }
            if is_last {
                tail_allocated = (scan.valid_len + scan.zero_tail) as u64;
            }
            for record in &scan.records {
                track(&mut live, record, seq);
            }
            if is_last {
                tail_len = scan.valid_len as u64;
            }
            records.extend(scan.records);
        }

        let epoch = bump_epoch(dir)?;
        let (seq, file, len, allocated) = match last {
            Some(seq) => {
                let path = segment_path(dir, seq);
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                (seq, file, tail_len, tail_allocated)
            }
            None => {
                segments.push(1);
                let header = HEADER_LEN as u64;
                (1, create_segment(dir, 1)?, header, header)
            }
        };
        info!(
            dir = %dir.display(),
            epoch,
            segments = segments.len(),
            records = records.len(),
            unfinished = live.len(),
            "decision log opened"
        );

        let counters = Arc::new(Counters::default());
        let failed = Arc::new(Mutex::new(None));
        let unforced = Arc::new(Mutex::new(Unforced::default()));
        let (requests, receiver) = mpsc::channel();
        let segment = SegmentFile::new(
            file,
            len,
            allocated,
            options.preallocate_bytes,
            options.segment_bytes,
        );
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            options,
            segment,
            seq,
            segments,
            live,
            counters: counters.clone(),
            failed: failed.clone(),
            unforced: unforced.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| OpenError::Invalid(format!("starting the WAL writer: {e}")))?;
        Ok(Self {
            epoch,
            requests: Some(requests),
            unforced,
            writer: Some(writer),
            recovered: Mutex::new(records),
            counters,
            failed,
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_failed(&self) -> Result<(), LogError> {
        match self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            Some(message) => Err(LogError::Failed(message)),
            None => Ok(()),
        }
    }

    fn send(&self, request: Request) -> Result<(), LogError> {
        self.check_failed()?;
        self.requests
            .as_ref()
            .ok_or_else(|| LogError::Failed("the log is closed".into()))?
            .send(request)
            .map_err(|_| LogError::Failed("the WAL writer thread is gone".into()))
    }
}

fn track(live: &mut HashMap<TxnId, u64>, record: &LogRecord, seq: u64) {
    match record {
        LogRecord::End { txn } => {
            live.remove(txn);
        }
        other => {
            live.entry(other.txn()).or_insert(seq);
        }
    }
}

impl Writer {
    fn run(&mut self, receiver: mpsc::Receiver<Request>) {
        let linger = self.options.unforced_linger;
        loop {
            // Unforced records are not sent here: wake in time for the oldest to be written
            // within its linger, and at least once a linger to look for them.
            let wait = match lock_unforced(&self.unforced).since {
                Some(since) => (since + linger).saturating_duration_since(Instant::now()),
                None => linger,
            };
            let mut batch = Vec::new();
            let closed = match receiver.recv_timeout(wait) {
                Ok(first) => {
                    batch.push(first);
                    batch.extend(receiver.try_iter().take(65_536));
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            // Overdue unforced records go now; so does everything at close. They go after
            // the requests received: a request sent after one of them was appended would
            // have taken it along. So when requests came, the unforced records left were
            // appended after every one of them was sent; they are looked for on the next
            // pass that receives nothing (at once if they are overdue: the wait above is
            // then zero). That also keeps the writer off the lock its waker may still hold.
            if batch.is_empty() || closed {
                let mut unforced = lock_unforced(&self.unforced);
                let overdue = unforced
                    .since
                    .is_some_and(|since| since.elapsed() >= linger);
                if (closed || overdue) && !unforced.records.is_empty() {
                    unforced.since = None;
                    let records = std::mem::take(&mut unforced.records);
                    batch.push(Request {
                        records,
                        done: None,
                    });
                }
            }
            // Every batch is written at once: forced ones are waited for, and unforced ones
            // arrive here only when overdue, too many, or with a forced one.
            if !batch.is_empty() {
                self.write_and_answer(batch);
            }
            if closed {
                break;
            }
        }
        // Closed (clean shutdown): everything written is durable too.
        let _ = self.segment.file().sync_data();
    }

    fn write_and_answer(&mut self, batch: Vec<Request>) {
        let result = self.write_batch(&batch);
        if let Err(message) = &result {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
        }
        for request in batch {
            if let Some(done) = request.done {
                let _ = done.send(result.clone().map_err(LogError::Failed));
            }
        }
        // After the answers, so that no waiter pays for it.
        if result.is_ok()
            && let Err(message) = self.top_up()
        {
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
        }
    }

    /// Zero-fills more of the segment ahead of its last frame when it runs short.
    fn top_up(&mut self) -> Result<(), String> {
        // A failed fdatasync poisons the log, as in `write_frame`.
        let preallocated = self
            .segment
            .top_up()
            .map_err(|e| format!("segment {}: {e}", self.seq))?;
        if !preallocated {
            // Out of space, most likely. Nothing acknowledged is at stake.
            warn!(
                segment = self.seq,
                "preallocating the decision log failed; appending instead"
            );
        }
        Ok(())
    }

    fn write_batch(&mut self, batch: &[Request]) -> Result<(), String> {
        if let Some(message) = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(message);
        }
        let records: Vec<LogRecord> = batch
            .iter()
            .flat_map(|r| r.records.iter().cloned())
            .collect();
        // One frame per group commit, split only if it would pass the frame limit.
        let mut frames = Vec::new();
        let mut chunk_start = 0;
        let mut chunk_bytes = 0;
        for (i, record) in records.iter().enumerate() {
            let size = approximate_size(record);
            if chunk_bytes + size > frame::MAX_FRAME_LEN / 2 && i > chunk_start {
                let mut buf = Vec::new();
                frame::encode_frame(&records[chunk_start..i], &mut buf);
                frames.push(buf);
                chunk_start = i;
                chunk_bytes = 0;
            }
            chunk_bytes += size;
        }
        if chunk_start < records.len() {
            let mut buf = Vec::new();
            frame::encode_frame(&records[chunk_start..], &mut buf);
            frames.push(buf);
        }
        for buf in &frames {
            self.write_frame(buf)?;
        }
        self.counters
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("ratify_wal_batch_records").record(records.len() as f64);
        for record in &records {
            track(&mut self.live, record, self.seq);
        }
        if self.segment.frames_end() >= self.options.segment_bytes {
            self.roll()?;
        }
        Ok(())
    }

    /// Writes one frame after the last and syncs it.
    fn write_frame(&mut self, buf: &[u8]) -> Result<(), String> {
        #[cfg(feature = "failpoints")]
        if let Some(argument) = fail::eval("coordinator::wal::torn_write", |a| a) {
            if argument.as_deref() == Some("pause") {
                crate::crash::pause("coordinator::wal::torn_write");
            } else {
                // Crash with half of this batch written (C4: a torn decision record).
                eprintln!("crash point coordinator::wal::torn_write: abort");
                let file = self.segment.file();
                let _ = file.write_all_at(&buf[..buf.len() / 2], self.segment.frames_end());
                let _ = file.sync_data();
                std::process::abort()
            }
        }
        // Every frame is synced before the next is written, waited for or not: then a
        // valid frame on disk always follows durable ones, so damage before a valid frame
        // is corruption, never a torn or reordered write-back of unsynced pages after a
        // power loss. The written bytes (and the file size) are durable on return. Any
        // failure poisons the log: after a failed fsync the kernel may have dropped the
        // dirty pages, so retrying and going on would acknowledge lost records.
        let synced = self
            .segment
            .write_frame(buf)
            .map_err(|e| format!("segment {}: {e}", self.seq))?;
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("ratify_wal_fsync_seconds").record(synced.as_secs_f64());
        Ok(())
    }

    /// Starts a new segment and removes the ones no unfinished transaction needs.
    fn roll(&mut self) -> Result<(), String> {
        // Everything in the old segment (ENDs included) is durable before any segment is
        // removed because of it: each frame was synced as it was written. Its zero-filled
        // space is cut off, durably, before the next segment exists: only the last
        // segment may end in zeros (recovery refuses any other that does).
        self.segment
            .cut()
            .map_err(|e| format!("segment {}: {e}", self.seq))?;
        let next = self.seq + 1;
        let file = create_segment(&self.dir, next).map_err(|e| e.to_string())?;
        let header = HEADER_LEN as u64;
        self.segment = SegmentFile::new(
            file,
            header,
            header,
            self.options.preallocate_bytes,
            self.options.segment_bytes,
        );
        self.seq = next;
        self.segments.push(next);
        let keep_from = self.live.values().copied().min().unwrap_or(next).min(next);
        crash_point!("coordinator::wal::checkpoint");
        let mut removed = 0;
        while let Some(&oldest) = self.segments.first() {
            if oldest >= keep_from {
                break;
            }
            let path = segment_path(&self.dir, oldest);
            fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir).map_err(|e| e.to_string())?;
            self.counters
                .segments_removed
                .fetch_add(removed, Ordering::Relaxed);
            info!(removed, keep_from, "checkpoint removed finished segments");
        }
        Ok(())
    }
}

fn approximate_size(record: &LogRecord) -> usize {
    match record {
        LogRecord::Decision { participants, .. } => {
            64 + participants
                .iter()
                .map(|p| p.name.len() + p.endpoint.len() + 16)
                .sum::<usize>()
                + match record {
                    LogRecord::Decision { actor, reason, .. } => actor.len() + reason.len(),
                    _ => 0,
                }
        }
        LogRecord::End { .. } => 24,
    }
}

impl DecisionLog for Wal {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn append(
        &self,
        records: Vec<LogRecord>,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send + use<> {
        // Queued at the call, not when first polled: the unforced records taken along
        // are then exactly those appended before this call.
        let (done, wait) = oneshot::channel();
        let sent = {
            let mut unforced = lock_unforced(&self.unforced);
            let mut all = std::mem::take(&mut unforced.records);
            unforced.since = None;
            all.extend(records);
            // Under the lock, so that no unforced record appended later can reach the
            // writer before these.
            self.send(Request {
                records: all,
                done: Some(done),
            })
        };
        async move {
            sent?;
            wait.await
                .map_err(|_| LogError::Failed("the WAL writer thread is gone".into()))?
        }
    }

    fn append_unforced(&self, records: Vec<LogRecord>) -> Result<(), LogError> {
        self.check_failed()?;
        let mut unforced = lock_unforced(&self.unforced);
        unforced.records.extend(records);
        unforced.since.get_or_insert_with(Instant::now);
        if unforced.records.len() < MAX_HELD_RECORDS {
            return Ok(());
        }
        // Too many to hold: written at once, without waiting for a forced append.
        unforced.since = None;
        let records = std::mem::take(&mut unforced.records);
        self.send(Request {
            records,
            done: None,
        })
    }

    fn take_recovered(&self) -> Vec<LogRecord> {
        std::mem::take(&mut *self.recovered.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn stats(&self) -> LogStats {
        LogStats {
            records: self.counters.records.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
            fsyncs: self.counters.fsyncs.load(Ordering::Relaxed),
            segments_removed: self.counters.segments_removed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}
