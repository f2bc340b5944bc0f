//! The sled store's journal: what a participant has promised (prepared branches and the
//! decisions it carried out), group-committed with fdatasync, so that sled itself is
//! never flushed on the hot path.
//!
//! Files under `<data-dir>/journal/`: `journal-<seq>.log`, `seq` contiguous, in the
//! framing of [`ratify_proto::frame`] (magic `RATIFYPJ`). In format 2 each frame holds
//! one batch of [`JournalRecord`]s (a `JournalBatch`); format 1, written by earlier
//! builds, held one record per frame and is still read. One thread writes every waiting
//! record as one frame with one `write` and one `fdatasync`, and then answers the
//! waiters whose records were forced.
//!
//! Frames overwrite zero-filled space kept ahead of the last one ([`PREALLOCATE_BYTES`]),
//! one synced frame at a time (a batch too large for one frame is written and synced
//! frame by frame); see [`ratify_proto::segment`] for why.
//!
//! A checkpoint (see [`super::SledStore`]) starts a new segment whose first record is a
//! snapshot of the prepared branches, flushes sled, and then removes the older segments:
//! everything they held is then either in sled, durable, or in the snapshot.
//!
//! On open a torn tail (a damaged last frame of the last segment, nothing valid after
//! it) is cut off; any other damage refuses the open with the file and offset, because
//! the records after it may hold a YES vote or a carried-out commit.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use prost::Message;
use ratify_proto::TxnId;
use ratify_proto::frame;
use ratify_proto::segment::SegmentFile;
use tokio::sync::oneshot;

use super::PreparedRecord;
use crate::store::{FinishedAs, StoreError};

/// The journal's group-commit counters (for metrics and the bench): fdatasync batches,
/// and the records that waited for one.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub waiters: AtomicU64,
}

const MAGIC: &[u8; 8] = b"RATIFYPJ";
/// The format written: a frame holds a `JournalBatch`.
const FORMAT: u32 = 2;
/// The format earlier builds wrote: a frame holds one `JournalRecord`. Still read.
const FORMAT_ONE_RECORD_PER_FRAME: u32 = 1;
/// Zero-filled space kept ahead of the last frame, topped up by this much at a time once
/// less than half of it is left. Segments last about a second (a checkpoint starts the
/// next), so this is small: filling it costs the writer about 1 ms.
const PREALLOCATE_BYTES: u64 = 256 << 10;
/// How long a record that nobody waits for (an abort) may sit before it is written.
const UNFORCED_LINGER: Duration = Duration::from_millis(100);
/// How long a [`Force::Soon`] record may wait for a [`Force::Now`] one to share its
/// fdatasync.
const SOON_LINGER: Duration = Duration::from_micros(1000);
/// How long a [`Journal::hold`] may hold back a flush that forced records wait for. A
/// hold lasts one pass over an RPC's entries (CPU work, about 1 ms for 25 entries under
/// load); the limit only bounds a pass that stalls. Holding never delays the holder's
/// own answer: it waits for its last record's flush either way.
const HOLD_LIMIT: Duration = Duration::from_millis(10);

/// When an appended record must be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Force {
    /// Nobody waits: written with the next batch, or within [`UNFORCED_LINGER`].
    No,
    /// Waited for, but off the client's critical path (a commit's acknowledgement): the
    /// writer waits up to [`SOON_LINGER`] for a [`Force::Now`] record (a prepare,
    /// which a client is waiting on) so that both share one fdatasync.
    Soon,
    /// Waited for on the critical path (a YES vote): written at once.
    Now,
}

const KIND_PREPARED: u32 = 1;
const KIND_COMMITTED: u32 = 2;
const KIND_ABORTED: u32 = 3;
const KIND_SNAPSHOT: u32 = 4;

/// The largest prepared branch the journal takes (its encoded record); a branch over it
/// votes NO. Half the frame limit, so any record fits a frame.
pub(super) const MAX_RECORD_BYTES: usize = frame::MAX_FRAME_LEN / 2;
/// A snapshot is split into records of about this size (each holds whole branches).
const SNAPSHOT_FRAME_BYTES: usize = 4 << 20;

#[derive(Clone, PartialEq, prost::Message)]
struct JournalRecord {
    #[prost(uint32, tag = "1")]
    kind: u32,
    #[prost(bytes = "vec", tag = "2")]
    txn_id: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    prepared: Option<PreparedRecord>,
    #[prost(message, repeated, tag = "4")]
    snapshot: Vec<SnapshotEntry>,
    /// In a snapshot frame: the snapshot's last frame. A snapshot whose last frame is
    /// missing was never durable as a whole (and the segments before it were kept).
    #[prost(bool, tag = "5")]
    snapshot_complete: bool,
}

/// A format-2 frame's payload: the records one write carried. Its encoding is the
/// concatenation of each record as field 1, which is how [`Entry::encode`] builds it.
#[derive(Clone, PartialEq, prost::Message)]
struct JournalBatch {
    #[prost(message, repeated, tag = "1")]
    records: Vec<JournalRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotEntry {
    #[prost(bytes = "vec", tag = "1")]
    txn_id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    record: Option<PreparedRecord>,
}

/// One journal record, as replayed by recovery.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Entry {
    /// The branch was prepared (its YES waits for this record).
    Prepared(TxnId, PreparedRecord),
    /// The decision was carried out in sled before this record was written.
    Decided(TxnId, FinishedAs),
    /// The prepared branches at a checkpoint: the set replaces what came before.
    Snapshot(Vec<(TxnId, PreparedRecord)>),
}

/// A frame as read back: an entry, or one frame of a snapshot.
enum Decoded {
    Entry(Entry),
    SnapshotPart {
        branches: Vec<(TxnId, PreparedRecord)>,
        complete: bool,
    },
}

/// Appends `record` as one element of a `JournalBatch`.
fn push_record(record: &JournalRecord, out: &mut Vec<u8>) {
    prost::encoding::message::encode(1, record, out);
}

/// Splits concatenated `JournalBatch` elements into frames of whole records, each
/// payload at most half the frame limit unless a single record is larger.
fn frames_of(records: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < records.len() {
        let mut rest = &records[at..];
        let before = rest.len();
        prost::encoding::decode_key(&mut rest)
            .and_then(|_| prost::encoding::decode_varint(&mut rest))
            .ok()
            .and_then(|len| usize::try_from(len).ok())
            .filter(|len| *len <= rest.len())
            .map(|len| {
                let end = at + (before - rest.len()) + len;
                if end - start > frame::MAX_FRAME_LEN / 2 && at > start {
                    let mut out = Vec::new();
                    frame::encode_frame(&records[start..at], &mut out);
                    frames.push(out);
                    start = at;
                }
                at = end;
            })
            .ok_or("a queued journal record does not parse")?;
    }
    if at > start {
        let mut out = Vec::new();
        frame::encode_frame(&records[start..at], &mut out);
        frames.push(out);
    }
    Ok(frames)
}

impl Entry {
    /// This entry's records, each encoded as an element of a `JournalBatch`: one, or for a
    /// snapshot as many as its size needs. A Prepared record is at most
    /// [`MAX_RECORD_BYTES`] (the store checks before).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Entry::Prepared(txn_id, record) => push_record(
                &JournalRecord {
                    kind: KIND_PREPARED,
                    txn_id: txn_id.as_bytes().to_vec(),
                    prepared: Some(record.clone()),
                    ..JournalRecord::default()
                },
                &mut out,
            ),
            Entry::Decided(txn_id, finished_as) => push_record(
                &JournalRecord {
                    kind: match finished_as {
                        FinishedAs::Committed => KIND_COMMITTED,
                        _ => KIND_ABORTED,
                    },
                    txn_id: txn_id.as_bytes().to_vec(),
                    ..JournalRecord::default()
                },
                &mut out,
            ),
            Entry::Snapshot(branches) => {
                let mut part = JournalRecord {
                    kind: KIND_SNAPSHOT,
                    ..JournalRecord::default()
                };
                for (txn_id, record) in branches {
                    let entry = SnapshotEntry {
                        txn_id: txn_id.as_bytes().to_vec(),
                        record: Some(record.clone()),
                    };
                    if !part.snapshot.is_empty()
                        && part.encoded_len() + entry.encoded_len() > SNAPSHOT_FRAME_BYTES
                    {
                        push_record(&part, &mut out);
                        part.snapshot.clear();
                    }
                    part.snapshot.push(entry);
                }
                part.snapshot_complete = true;
                push_record(&part, &mut out);
            }
        }
        out
    }
}

impl Decoded {
    /// The records of one frame's payload, in a segment of `format`.
    fn decode_frame(format: u32, payload: &[u8]) -> Result<Vec<Self>, String> {
        let records = if format == FORMAT_ONE_RECORD_PER_FRAME {
            vec![JournalRecord::decode(payload).map_err(|e| format!("undecodable record: {e}"))?]
        } else {
            let batch =
                JournalBatch::decode(payload).map_err(|e| format!("undecodable batch: {e}"))?;
            if batch.records.is_empty() {
                return Err("an empty batch".into());
            }
            batch.records
        };
        records.into_iter().map(Self::decode).collect()
    }

    fn decode(record: JournalRecord) -> Result<Self, String> {
        let txn = |bytes: &[u8]| TxnId::try_from(bytes).map_err(|e| e.to_string());
        match record.kind {
            KIND_PREPARED => Ok(Decoded::Entry(Entry::Prepared(
                txn(&record.txn_id)?,
                record
                    .prepared
                    .ok_or("a prepared record without its branch")?,
            ))),
            KIND_COMMITTED => Ok(Decoded::Entry(Entry::Decided(
                txn(&record.txn_id)?,
                FinishedAs::Committed,
            ))),
            KIND_ABORTED => Ok(Decoded::Entry(Entry::Decided(
                txn(&record.txn_id)?,
                FinishedAs::Aborted,
            ))),
            KIND_SNAPSHOT => Ok(Decoded::SnapshotPart {
                branches: record
                    .snapshot
                    .into_iter()
                    .map(|entry| {
                        Ok((
                            txn(&entry.txn_id)?,
                            entry.record.ok_or("a snapshot entry without its branch")?,
                        ))
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                complete: record.snapshot_complete,
            }),
            other => Err(format!("unknown record kind {other}")),
        }
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("journal-{seq:016}.log"))
}

fn segment_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("journal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(seq) = segment_seq(&path) {
            segments.push((seq, path));
        }
    }
    segments.sort();
    Ok(segments)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn refuse(path: &Path, offset: usize, why: &str) -> StoreError {
    StoreError::Io(format!(
        "the participant journal is corrupt at {} offset {offset}: {why}. Refusing to \
         start: records after this point may hold YES votes or carried-out commits. \
         Restore the file, or move it aside only if you accept losing them.",
        path.display()
    ))
}

/// Reads every segment in `dir` (oldest first), cutting a torn tail off the last one.
fn read_segments(dir: &Path) -> Result<(Vec<Entry>, u64), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()))
    };
    let segments = list_segments(dir).map_err(io(dir))?;
    let mut entries = Vec::new();
    let mut next_seq = segments.last().map_or(1, |(seq, _)| seq + 1);
    for (i, (seq, path)) in segments.iter().enumerate() {
        if i > 0 && *seq != segments[i - 1].0 + 1 {
            return Err(StoreError::Io(format!(
                "the participant journal in {} is missing segment {} (found {} after {}). \
                 Refusing to start: it may hold YES votes or carried-out commits.",
                dir.display(),
                segments[i - 1].0 + 1,
                seq,
                segments[i - 1].0
            )));
        }
        let last = i + 1 == segments.len();
        let bytes = fs::read(path).map_err(io(path))?;
        if bytes.len() < frame::HEADER_LEN && last {
            // Created, but the crash came before its header was whole: nothing was in it.
            // Its number is used again, so the sequence stays contiguous.
            fs::remove_file(path).map_err(io(path))?;
            sync_dir(dir).map_err(io(dir))?;
            next_seq = *seq;
            continue;
        }
        let format = match bytes.get(8..12) {
            Some(field) if field == FORMAT_ONE_RECORD_PER_FRAME.to_le_bytes() => {
                FORMAT_ONE_RECORD_PER_FRAME
            }
            _ => FORMAT,
        };
        frame::check_header(
            &bytes,
            MAGIC,
            format,
            "a Ratify participant journal segment",
        )
        .map_err(|why| refuse(path, 0, &why))?;
        // Frames of a snapshot not yet closed by its last frame.
        let mut snapshot: Option<Vec<(TxnId, PreparedRecord)>> = None;
        let scan = frame::scan_frames(&bytes, |payload| {
            for decoded in Decoded::decode_frame(format, payload)? {
                match decoded {
                    Decoded::Entry(entry) => {
                        if snapshot.is_some() {
                            return Err("a record inside an unfinished snapshot".into());
                        }
                        entries.push(entry);
                    }
                    Decoded::SnapshotPart { branches, complete } => {
                        let parts = snapshot.get_or_insert_with(Vec::new);
                        parts.extend(branches);
                        if complete {
                            entries.push(Entry::Snapshot(snapshot.take().unwrap_or_default()));
                        }
                    }
                }
            }
            Ok(())
        });
        if scan.zero_tail > 0 {
            if !last {
                // A segment is cut to its last frame before the next one starts.
                return Err(refuse(
                    path,
                    scan.valid_len,
                    &format!(
                        "{} zero bytes end a segment that is not the last",
                        scan.zero_tail
                    ),
                ));
            }
            // Space the writer zero-filled and never reached. A new segment follows this
            // one, so cut it off (made durable by the sync below).
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|file| file.set_len(scan.valid_len as u64))
                .map_err(io(path))?;
        }
        if let Some(damage) = scan.damage {
            if !(damage.torn_tail && last) {
                return Err(refuse(path, damage.offset, &damage.why));
            }
            // A write the crash cut short: it was never acknowledged (its fdatasync did
            // not return), so cutting it off loses nothing promised.
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            file.set_len(scan.valid_len as u64).map_err(io(path))?;
        }
        if snapshot.is_some() && !last {
            return Err(refuse(
                path,
                scan.valid_len,
                "the segment ends inside a snapshot, and a later segment follows",
            ));
        }
        // A snapshot cut short at the tail was never durable as a whole, so the segments
        // before it are still here: it is ignored. What was read is made durable before
        // anything new is written: the crash may have left it in the page cache only,
        // and a later power loss must not turn it into damage before the tail.
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|file| file.sync_all())
            .map_err(io(path))?;
    }
    Ok((entries, next_seq))
}

fn create_segment(dir: &Path, seq: u64) -> std::io::Result<File> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)?;
    file.write_all(&frame::segment_header(MAGIC, FORMAT))?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok(file)
}

type Waiter = oneshot::Sender<Result<(), String>>;

enum Item {
    /// Records, each encoded as an element of a `JournalBatch`.
    Records(Vec<u8>),
    /// Start segment `seq`: what came before goes to the old one, what follows to this.
    NewSegment(u64),
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    waiters: Vec<Waiter>,
    /// A [`Force::Now`] record is queued.
    forced: bool,
    /// When the oldest queued [`Force::Soon`] record was queued.
    soon_since: Option<std::time::Instant>,
    /// Live [`Journal::hold`]s, and since when they have held the next flush back
    /// (the first hold, or the last flush made while holds lived).
    holds: usize,
    held_since: Option<std::time::Instant>,
    stopping: bool,
    failed: Option<String>,
    next_seq: u64,
}

struct Shared {
    dir: PathBuf,
    /// [`HOLD_LIMIT`], except in tests.
    hold_limit: Duration,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Anything appended since the last checkpoint started.
    dirty: AtomicBool,
    stats: FlushStats,
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// A wait for records to be durable.
pub(super) struct Durable(Option<oneshot::Receiver<Result<(), String>>>);

impl Durable {
    pub(super) async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(result) => result.map_err(StoreError::Fatal),
                Err(_) => Err(StoreError::Fatal("the journal writer is gone".into())),
            },
        }
    }

    /// The same, from a thread outside the async runtime.
    pub(super) fn wait_blocking(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.blocking_recv() {
                Ok(result) => result.map_err(StoreError::Fatal),
                Err(_) => Err(StoreError::Fatal("the journal writer is gone".into())),
            },
        }
    }
}

#[derive(Debug)]
pub(super) struct Journal {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

impl Journal {
    /// Opens the journal under `dir`: returns it (writing to a new segment) and every
    /// record the existing segments hold, oldest first, for recovery to replay.
    pub(super) fn open(dir: &Path) -> Result<(Self, Vec<Entry>), StoreError> {
        Self::open_with_hold_limit(dir, HOLD_LIMIT)
    }

    fn open_with_hold_limit(
        dir: &Path,
        hold_limit: Duration,
    ) -> Result<(Self, Vec<Entry>), StoreError> {
        fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
        let (entries, seq) = read_segments(dir)?;
        let file = create_segment(dir, seq).map_err(|e| {
            StoreError::Io(format!(
                "creating {}: {e}",
                segment_path(dir, seq).display()
            ))
        })?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            hold_limit,
            queue: Mutex::new(Queue {
                next_seq: seq + 1,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            dirty: AtomicBool::new(false),
            stats: FlushStats::default(),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                let mut segment = Segment {
                    dir: writer_shared.dir.clone(),
                    file: new_segment_file(file),
                    seq,
                };
                write_loop(&writer_shared, &mut segment)
            })
            .map_err(|e| StoreError::Io(format!("spawning the journal writer: {e}")))?;
        Ok((
            Self {
                shared,
                writer: Some(writer),
            },
            entries,
        ))
    }

    pub(super) fn stats(&self) -> &FlushStats {
        &self.shared.stats
    }

    /// Queues `records` (from [`Entry::encode`]). Unless `force` is [`Force::No`], the
    /// returned wait ends once they (and everything queued before them) are durable;
    /// otherwise it ends at once.
    pub(super) fn append(&self, records: &[u8], force: Force) -> Result<Durable, StoreError> {
        self.queue(false, records, force)
            .map(|(_, durable)| durable)
    }

    /// Queues `records`, first starting a new segment if `new_segment` (whose sequence
    /// number is returned).
    fn queue(
        &self,
        new_segment: bool,
        records: &[u8],
        force: Force,
    ) -> Result<(u64, Durable), StoreError> {
        let mut queue = lock(&self.shared.queue);
        if let Some(failure) = &queue.failed {
            return Err(StoreError::Fatal(failure.clone()));
        }
        let was_empty = queue.items.is_empty() && queue.waiters.is_empty();
        if new_segment {
            let seq = queue.next_seq;
            queue.items.push(Item::NewSegment(seq));
            queue.next_seq += 1;
            // Appends racing this call land in either segment: each is whole on its own.
            self.shared.dirty.store(false, Ordering::Relaxed);
        } else if !records.is_empty() {
            self.shared.dirty.store(true, Ordering::Relaxed);
        }
        if !records.is_empty() {
            match queue.items.last_mut() {
                Some(Item::Records(buf)) => buf.extend_from_slice(records),
                _ => queue.items.push(Item::Records(records.to_vec())),
            }
        }
        let seq = queue.next_seq - 1;
        let wake = match force {
            Force::No => {
                // The first record of an idle queue starts the writer's linger clock.
                if was_empty {
                    drop(queue);
                    self.shared.wake.notify_one();
                }
                return Ok((seq, Durable(None)));
            }
            // Under a hold the writer learns of it when the hold ends (see `Hold`): waking
            // it now would only put it to sleep again, beside the holder's pass.
            Force::Soon => queue.soon_since.is_none() && !queue.forced && queue.holds == 0,
            // Woken even under a hold: the writer must start the hold's time limit, or a
            // hold that is never released would keep the record waiting for good.
            Force::Now => !queue.forced,
        };
        match force {
            Force::Soon => {
                queue.soon_since.get_or_insert_with(std::time::Instant::now);
            }
            _ => queue.forced = true,
        }
        let (tx, rx) = oneshot::channel();
        queue.waiters.push(tx);
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok((seq, Durable(Some(rx))))
    }

    /// Holds back flushes of forced records while the returned guard (or any other
    /// hold) lives, each flush by at most [`HOLD_LIMIT`]: records queued meanwhile share
    /// that flush.
    pub(super) fn hold(&self) -> Hold {
        let mut queue = lock(&self.shared.queue);
        queue.holds += 1;
        queue.held_since.get_or_insert_with(std::time::Instant::now);
        Hold(self.shared.clone())
    }

    /// Starts a new segment whose first record is `snapshot`; returns its sequence
    /// number and the wait for it to be durable. Records queued before this call go to
    /// the older segments, which [`Journal::remove_segments_before`] may then delete.
    pub(super) fn start_segment(&self, snapshot: &Entry) -> Result<(u64, Durable), StoreError> {
        self.queue(true, &snapshot.encode(), Force::Now)
    }

    /// Whether anything was appended since the last [`Journal::start_segment`].
    pub(super) fn dirty(&self) -> bool {
        self.shared.dirty.load(Ordering::Relaxed)
    }

    /// Deletes every segment older than `seq`.
    pub(super) fn remove_segments_before(&self, seq: u64) -> Result<(), StoreError> {
        let dir = &self.shared.dir;
        let fail = |e: std::io::Error| StoreError::Fatal(format!("{}: {e}", dir.display()));
        for (old, path) in list_segments(dir).map_err(fail)? {
            if old < seq {
                // A concurrent checkpoint may have removed it already.
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
                    _ => {}
                }
            }
        }
        sync_dir(dir).map_err(fail)
    }

    /// Refuses every later append with `why` (a checkpoint failed: durability can no
    /// longer be promised).
    pub(super) fn fail(&self, why: String) {
        let mut queue = lock(&self.shared.queue);
        queue.failed.get_or_insert(why);
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Ends a [`Journal::hold`] when dropped.
pub(super) struct Hold(Arc<Shared>);

impl Drop for Hold {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.holds -= 1;
        if queue.holds == 0 {
            queue.held_since = None;
        }
        // A forced record waits for the last hold to end; a record forced soon, queued
        // under a hold without waking the writer, starts its linger now.
        let wake =
            (queue.forced && queue.holds == 0) || (!queue.forced && queue.soon_since.is_some());
        drop(queue);
        if wake {
            self.0.wake.notify_one();
        }
    }
}

/// The writer thread: takes everything queued, writes it in order (one frame and one
/// fdatasync per segment touched, unless a batch needs more than one frame), then
/// answers the waiters.
fn write_loop(shared: &Shared, segment: &mut Segment) {
    loop {
        let (items, waiters, stopping) = {
            let mut queue = lock(&shared.queue);
            loop {
                // Forced records wait out a hold (at most HOLD_LIMIT): the rest of the
                // holder's batch is about to join them.
                while queue.forced && !queue.stopping {
                    let Some(since) = queue.held_since else { break };
                    let left = shared.hold_limit.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    queue = shared
                        .wake
                        .wait_timeout(queue, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if queue.forced || queue.stopping {
                    break;
                }
                // Nothing forced yet: unforced and Soon records linger.
                while !queue.forced && !queue.stopping {
                    let linger = match queue.soon_since {
                        Some(since) => SOON_LINGER.saturating_sub(since.elapsed()),
                        None if queue.items.is_empty() => Duration::MAX,
                        None => UNFORCED_LINGER,
                    };
                    if linger.is_zero() {
                        break;
                    }
                    if linger == Duration::MAX {
                        queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    let (next, timeout) = shared
                        .wake
                        .wait_timeout(queue, linger)
                        .unwrap_or_else(|p| p.into_inner());
                    queue = next;
                    if timeout.timed_out() && queue.soon_since.is_none() {
                        break;
                    }
                }
                if !queue.forced {
                    // A linger ran out (or stopping): write what lingered.
                    break;
                }
                // A forced record arrived while others lingered: respect a hold first.
            }
            queue.forced = false;
            queue.soon_since = None;
            if queue.holds > 0 {
                // Holds outlived this flush (the limit ran out): the next flush gets a
                // full limit of its own.
                queue.held_since = Some(std::time::Instant::now());
            }
            (
                std::mem::take(&mut queue.items),
                std::mem::take(&mut queue.waiters),
                queue.stopping,
            )
        };
        let failed = lock(&shared.queue).failed.clone();
        let result = match failed {
            Some(failure) => Err(failure),
            None => segment.write_batch(items),
        };
        shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .waiters
            .fetch_add(waiters.len() as u64, Ordering::Relaxed);
        if let Err(failure) = &result {
            // After one failed fdatasync nothing written since can be trusted to be
            // durable (the kernel may have dropped the dirty pages): fail for good.
            tracing::error!("participant journal: {failure}");
            lock(&shared.queue).failed.get_or_insert(failure.clone());
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        if stopping {
            // A clean close leaves no zero-filled space behind (the next open would cut it
            // off anyway). Best effort: what is written is durable either way.
            if result.is_ok() {
                let _ = segment.file.cut();
            }
            return;
        }
        // After the answers, so that no waiter pays for it.
        if result.is_ok()
            && let Err(failure) = segment.top_up()
        {
            tracing::error!("participant journal: {failure}");
            lock(&shared.queue).failed.get_or_insert(failure);
        }
    }
}

/// A freshly created segment (its header written), to be zero-filled ahead of its last
/// frame [`PREALLOCATE_BYTES`] at a time.
fn new_segment_file(file: File) -> SegmentFile {
    let header = frame::HEADER_LEN as u64;
    SegmentFile::new(file, header, header, PREALLOCATE_BYTES, u64::MAX)
}

/// The segment the writer thread writes to.
struct Segment {
    dir: PathBuf,
    file: SegmentFile,
    seq: u64,
}

impl Segment {
    fn path(&self) -> String {
        segment_path(&self.dir, self.seq).display().to_string()
    }

    fn write_batch(&mut self, items: Vec<Item>) -> Result<(), String> {
        for item in items {
            match item {
                Item::Records(records) => {
                    for frame in frames_of(&records)? {
                        // Synced before the next is written: a power loss then tears at
                        // most this frame, even inside zero-filled space.
                        self.file
                            .write_frame(&frame)
                            .map_err(|e| format!("{}: {e}", self.path()))?;
                    }
                }
                Item::NewSegment(next) => {
                    // Every frame of the old segment is durable already (each was synced
                    // before the next was written), so a snapshot is never durable while
                    // a record before it is not. Its zero-filled space is cut off, durably,
                    // before the new segment exists: only the last may end in zeros.
                    self.file
                        .cut()
                        .map_err(|e| format!("{}: {e}", self.path()))?;
                    let file = create_segment(&self.dir, next).map_err(|e| {
                        format!("creating {}: {e}", segment_path(&self.dir, next).display())
                    })?;
                    self.file = new_segment_file(file);
                    self.seq = next;
                }
            }
        }
        Ok(())
    }

    /// Zero-fills more of the segment ahead of its last frame when it runs short. A failed
    /// fdatasync fails the journal, as everywhere else.
    fn top_up(&mut self) -> Result<(), String> {
        let preallocated = self
            .file
            .top_up()
            .map_err(|e| format!("{}: {e}", self.path()))?;
        if !preallocated {
            // Out of space, most likely. Nothing promised is at stake.
            tracing::warn!(segment = %self.path(), "preallocating the journal failed; appending instead");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> PreparedRecord {
        PreparedRecord {
            format: 1,
            epoch: 1,
            digest: u64::from(n),
            incarnation: 0,
            prepared_at_unix_ms: 0,
            writes: Vec::new(),
            lock_keys: vec![vec![n]],
        }
    }

    /// Writes `n` Prepared records to a fresh journal in `dir`, each forced on its own (so
    /// each is one frame), and closes it.
    fn write(dir: &Path, n: u8) -> Vec<Entry> {
        let (journal, _) = Journal::open(dir).unwrap();
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry::Prepared(TxnId::generate(), record(i)))
            .collect();
        for entry in &entries {
            append_now(&journal, entry);
        }
        entries
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let segments = list_segments(dir).unwrap();
        let with_records: Vec<_> = segments
            .into_iter()
            .filter(|(_, p)| fs::metadata(p).unwrap().len() > frame::HEADER_LEN as u64)
            .collect();
        assert_eq!(with_records.len(), 1);
        with_records[0].1.clone()
    }

    #[test]
    fn records_read_back_in_order_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), 3);
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, first);
        let more = Entry::Decided(TxnId::generate(), FinishedAs::Committed);
        futures::executor::block_on(journal.append(&more.encode(), Force::Now).unwrap().wait())
            .unwrap();
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay.len(), 4);
        assert_eq!(replay[3], more);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_later_opens_accept_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let entries = write(dir.path(), 3);
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&path, &bytes).unwrap();
        // The damaged segment is the last one holding records, but opening created an
        // empty one after it: remove that so the torn one is last, as after a crash.
        for (_, p) in list_segments(dir.path()).unwrap() {
            if p != path {
                fs::remove_file(p).unwrap();
            }
        }
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries[..2]);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries[..2], "the cut tail is not corruption later");
    }

    #[test]
    fn damage_before_the_tail_refuses_to_open_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 3);
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[frame::HEADER_LEN + 12] ^= 0xFF;
        fs::write(&path, &bytes).unwrap();
        let error = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(&path.display().to_string())
                && error.contains(&format!("offset {}", frame::HEADER_LEN)),
            "{error}"
        );
    }

    #[test]
    fn a_missing_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1);
        write(dir.path(), 1);
        write(dir.path(), 1);
        let segments = list_segments(dir.path()).unwrap();
        fs::remove_file(&segments[1].1).unwrap();
        let error = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains("missing segment 2"), "{error}");
    }

    /// Starts a segment with `snapshot`, removes the older ones, reopens, and checks that
    /// the snapshot is all that is left.
    fn checkpoint_reopen_and_find_only(journal: Journal, snapshot: &Entry, dir: &Path) {
        let (seq, durable) = journal.start_segment(snapshot).unwrap();
        assert!(!journal.dirty());
        durable.wait_blocking().unwrap();
        journal.remove_segments_before(seq).unwrap();
        drop(journal);
        let (_, replay) = Journal::open(dir).unwrap();
        assert_eq!(replay, vec![snapshot.clone()]);
    }

    #[test]
    fn a_new_segment_starts_with_its_snapshot_and_the_old_ones_can_go() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let old = Entry::Prepared(TxnId::generate(), record(1));
        journal.append(&old.encode(), Force::No).unwrap();
        let snapshot = Entry::Snapshot(vec![(TxnId::generate(), record(2))]);
        checkpoint_reopen_and_find_only(journal, &snapshot, dir.path());
    }

    #[test]
    fn a_record_forced_soon_is_durable_without_a_record_forced_now() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let entry = Entry::Decided(TxnId::generate(), FinishedAs::Committed);
        journal
            .append(&entry.encode(), Force::Soon)
            .unwrap()
            .wait_blocking()
            .unwrap();
        assert_eq!(journal.stats().waiters.load(Ordering::Relaxed), 1);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, vec![entry]);
    }

    #[test]
    fn records_forced_during_a_hold_share_one_fdatasync_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open_with_hold_limit(dir.path(), Duration::from_secs(60)).unwrap();
        let first = Entry::Prepared(TxnId::generate(), record(1));
        let second = Entry::Prepared(TxnId::generate(), record(2));
        let hold = journal.hold();
        let first_durable = journal.append(&first.encode(), Force::Now).unwrap();
        // Time enough for the writer to flush the first record alone, were it not held.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(journal.stats().flushes.load(Ordering::Relaxed), 0);
        let second_durable = journal.append(&second.encode(), Force::Now).unwrap();
        drop(hold);
        first_durable.wait_blocking().unwrap();
        second_durable.wait_blocking().unwrap();
        assert_eq!(journal.stats().flushes.load(Ordering::Relaxed), 1);
        assert_eq!(journal.stats().waiters.load(Ordering::Relaxed), 2);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, vec![first, second]);
    }

    #[test]
    fn a_record_forced_soon_under_a_hold_is_durable_once_the_hold_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open_with_hold_limit(dir.path(), Duration::from_secs(60)).unwrap();
        let hold = journal.hold();
        let entry = Entry::Decided(TxnId::generate(), FinishedAs::Committed);
        let durable = journal.append(&entry.encode(), Force::Soon).unwrap();
        drop(hold);
        durable.wait_blocking().unwrap();
        assert_eq!(journal.stats().flushes.load(Ordering::Relaxed), 1);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, vec![entry]);
    }

    #[test]
    fn a_hold_that_is_never_released_delays_a_forced_record_only_up_to_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) =
            Journal::open_with_hold_limit(dir.path(), Duration::from_millis(20)).unwrap();
        let _hold = journal.hold();
        let entry = Entry::Prepared(TxnId::generate(), record(1));
        journal
            .append(&entry.encode(), Force::Now)
            .unwrap()
            .wait_blocking()
            .unwrap();
        assert_eq!(journal.stats().flushes.load(Ordering::Relaxed), 1);
    }

    fn big_record(n: u8, bytes: usize) -> PreparedRecord {
        let mut record = record(n);
        record.writes.push(super::super::StoredWrite {
            key: vec![n],
            value: Some(vec![n; bytes]),
            version: 1,
        });
        record
    }

    #[test]
    fn a_large_snapshot_spans_frames_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let branches: Vec<(TxnId, PreparedRecord)> = (0..7)
            .map(|i| (TxnId::generate(), big_record(i, 3 << 20)))
            .collect();
        let snapshot = Entry::Snapshot(branches);
        let frames = snapshot.encode();
        assert!(
            frames.len() > frame::MAX_FRAME_LEN,
            "larger than one frame may be"
        );
        checkpoint_reopen_and_find_only(journal, &snapshot, dir.path());
    }

    #[test]
    fn a_snapshot_cut_short_at_the_tail_is_ignored_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = write(dir.path(), 2);
        let snapshot = Entry::Snapshot(
            (0..3)
                .map(|i| (TxnId::generate(), big_record(i, 3 << 20)))
                .collect(),
        );
        // The crash: the snapshot's first frame reached the disk, its last did not.
        let path = segment_path(dir.path(), 2);
        let mut bytes = frame::segment_header(MAGIC, FORMAT).to_vec();
        let frames = frames_of(&snapshot.encode()).unwrap();
        assert!(frames.len() > 1);
        bytes.extend_from_slice(&frames[0]);
        fs::write(&path, &bytes).unwrap();
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, kept);
    }

    #[test]
    fn an_empty_last_segment_is_removed_and_its_number_used_again() {
        let dir = tempfile::tempdir().unwrap();
        let entries = write(dir.path(), 2);
        // A crash inside the creation of segment 2 left it without a header.
        fs::write(segment_path(dir.path(), 2), b"RATI").unwrap();
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries);
        drop(journal);
        let seqs: Vec<u64> = list_segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries, "no gap, nothing refused");
    }

    /// The end of the frames of the segment at `path`, and the zero-filled space after.
    fn written(path: &Path) -> (u64, u64) {
        let bytes = fs::read(path).unwrap();
        let scan = frame::scan_frames(&bytes, |_| Ok(()));
        assert_eq!(scan.damage, None);
        (scan.valid_len as u64, scan.zero_tail as u64)
    }

    fn append_now(journal: &Journal, entry: &Entry) {
        journal
            .append(&entry.encode(), Force::Now)
            .unwrap()
            .wait_blocking()
            .unwrap();
    }

    #[test]
    fn frames_overwrite_zero_filled_space_which_a_reopen_cuts_off() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        let entries: Vec<Entry> = (0..3)
            .map(|i| Entry::Prepared(TxnId::generate(), record(i)))
            .collect();
        append_now(&journal, &entries[0]);
        // The writer zero-filled space after answering the first; the second went into it.
        append_now(&journal, &entries[1]);
        let path = only_segment(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        drop(journal);
        let (frames_end, zeros) = written(&path);
        assert_eq!(
            (zeros, fs::metadata(&path).unwrap().len()),
            (0, frames_end),
            "a clean close cuts the zeros off"
        );
        assert!(
            bytes.len() as u64 >= frames_end + PREALLOCATE_BYTES / 2,
            "{} bytes, frames end at {frames_end}",
            bytes.len()
        );
        assert!(bytes[frames_end as usize..].iter().all(|&b| b == 0));

        // The crash: a third record torn inside the zero-filled space (half written).
        let mut frame = Vec::new();
        frame::encode_frame(&entries[2].encode(), &mut frame);
        let at = frames_end as usize;
        bytes[at..at + frame.len() / 2].copy_from_slice(&frame[..frame.len() / 2]);
        fs::write(&path, &bytes).unwrap();
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries[..2]);
        // The segment is cut to its last frame, since a new one follows it.
        assert_eq!(written(&path), (frames_end, 0));
        append_now(&journal, &entries[2]);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries);
    }

    #[test]
    fn zeros_at_the_end_of_a_segment_that_is_not_the_last_refuse_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let entries = write(dir.path(), 3);
        let path = only_segment(dir.path());
        // Its last record's frame lost to zeros, with a later segment after it.
        let bytes = fs::read(&path).unwrap();
        let mut frame = Vec::new();
        frame::encode_frame(&entries[2].encode(), &mut frame);
        let cut = bytes.len() - frame.len();
        let mut damaged = bytes[..cut].to_vec();
        damaged.resize(bytes.len() + 4096, 0);
        fs::write(&path, &damaged).unwrap();
        let (journal, _) = Journal::open(dir.path()).unwrap();
        drop(journal);
        assert!(list_segments(dir.path()).unwrap().last().unwrap().1 != path);
        // Opened as the last segment its zeros were cut off; put them back.
        fs::write(&path, &damaged).unwrap();
        let error = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(&path.display().to_string())
                && error.contains(&format!("offset {cut}"))
                && error.contains("not the last"),
            "{error}"
        );
    }

    #[test]
    fn segments_of_one_record_per_frame_from_earlier_builds_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            Entry::Prepared(TxnId::generate(), record(1)),
            Entry::Decided(TxnId::generate(), FinishedAs::Committed),
            Entry::Snapshot(vec![(TxnId::generate(), record(2))]),
            Entry::Decided(TxnId::generate(), FinishedAs::Aborted),
        ];
        let mut bytes = frame::segment_header(MAGIC, FORMAT_ONE_RECORD_PER_FRAME).to_vec();
        for entry in &entries {
            for record in JournalBatch::decode(&entry.encode()[..]).unwrap().records {
                frame::encode_frame(&record.encode_to_vec(), &mut bytes);
            }
        }
        fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay, entries);
        let more = Entry::Decided(TxnId::generate(), FinishedAs::Committed);
        append_now(&journal, &more);
        drop(journal);
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay.len(), 5);
        assert_eq!(replay[4], more);
    }
}
