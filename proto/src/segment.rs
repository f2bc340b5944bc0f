//! The writing side of [`crate::frame`]'s segments, shared by the coordinator's decision
//! log and a sled participant's journal: frames written over zero-filled space, one at a
//! time.
//!
//! An fdatasync of bytes written over blocks already written changes no metadata, so it
//! costs a data flush and no filesystem journal commit (on ext4, about 50 µs less than an
//! fdatasync after an append, of about 200 µs). Unlike an append, such a write is not
//! all-or-nothing after a power loss: any of its pages may land. So a frame is synced
//! before the next is written, and a torn write still damages only the last frame. A
//! segment is cut to its last frame before the next one starts ([`SegmentFile::cut`]), so
//! only the last segment of a log may end in zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// One segment file being written: frames up to `len`, zeros from there to `allocated`.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    /// Where the next frame goes: the end of the last frame.
    len: u64,
    /// The file's length: `len` plus the zero-filled space ahead of it.
    allocated: u64,
    /// How much to zero-fill at a time; 0 once preallocating failed (or if never asked).
    preallocate: u64,
    /// Zero-filling stops here.
    limit: u64,
}

impl SegmentFile {
    /// `file` holds frames up to `len` and is `allocated` bytes long (zeros after `len`).
    /// [`Self::top_up`] keeps up to `preallocate` bytes zero-filled ahead of `len`, never
    /// past `limit`.
    pub fn new(file: File, len: u64, allocated: u64, preallocate: u64, limit: u64) -> Self {
        Self {
            file,
            len,
            allocated: allocated.max(len),
            preallocate,
            limit,
        }
    }

    /// The end of the last frame.
    pub fn frames_end(&self) -> u64 {
        self.len
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes `frame` after the last one and fdatasyncs it before returning, so that at
    /// most one frame is ever unsynced. Returns how long the fdatasync took. After an
    /// error nothing written since the last sync can be trusted: the caller must stop.
    pub fn write_frame(&mut self, frame: &[u8]) -> Result<Duration, String> {
        self.file
            .write_all_at(frame, self.len)
            .map_err(|e| format!("writing: {e}"))?;
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| format!("fdatasync failed: {e}"))?;
        let synced = started.elapsed();
        self.len += frame.len() as u64;
        self.allocated = self.allocated.max(self.len);
        Ok(synced)
    }

    /// Zero-fills another chunk ahead of the last frame once less than half a chunk is
    /// left, and syncs it: the file's length is durable before frames overwrite the
    /// zeros, so their fdatasyncs change no metadata. Call it off the waiters' path (after
    /// answering them). If writing the zeros fails (out of space, most likely), they are
    /// cut off again and frames are appended from then on; `Ok(false)` says so. A failed
    /// fdatasync is an error.
    pub fn top_up(&mut self) -> Result<bool, String> {
        let chunk = self.preallocate;
        if chunk == 0 || self.allocated >= self.limit || self.allocated - self.len >= chunk / 2 {
            return Ok(true);
        }
        let from = self.allocated;
        let to = (from + chunk).min(self.limit);
        let zeros = vec![0u8; (to - from).min(64 << 10) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(zeros.len() as u64);
            if self.file.write_all_at(&zeros[..n as usize], at).is_err() {
                self.file
                    .set_len(self.len)
                    .map_err(|e| format!("truncating: {e}"))?;
                self.allocated = self.len;
                self.preallocate = 0;
                return Ok(false);
            }
            at += n;
        }
        self.file
            .sync_data()
            .map_err(|e| format!("fdatasync failed: {e}"))?;
        self.allocated = to;
        Ok(true)
    }

    /// Cuts the zero-filled space off, durably (before the next segment starts, or at a
    /// clean close).
    pub fn cut(&mut self) -> Result<(), String> {
        if self.allocated > self.len {
            self.file
                .set_len(self.len)
                .and_then(|()| self.file.sync_all())
                .map_err(|e| format!("cutting to the last frame: {e}"))?;
            self.allocated = self.len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_go_into_the_zeros_and_a_cut_leaves_only_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut segment = SegmentFile::new(file, 0, 0, 100, 150);
        segment.write_frame(b"abc").unwrap();
        assert!(segment.top_up().unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 103);
        segment.write_frame(b"defg").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            103,
            "written in place"
        );
        // Half a chunk is still left: nothing more yet.
        assert!(segment.top_up().unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 103);
        segment.write_frame(&[1; 60]).unwrap();
        // Less than half a chunk left: topped up, but not past the limit.
        assert!(segment.top_up().unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 150);
        segment.cut().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, segment.frames_end());
        assert_eq!(&bytes[..7], b"abcdefg");
    }
}
