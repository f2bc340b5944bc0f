//! The WAL's on-disk format, as pure functions over bytes (the fuzz target's surface).
//!
//! A segment is a 16-byte header (magic `RATIFYWL`, format u32 LE, CRC32C of those 12
//! bytes u32 LE) followed by frames. A frame is `[len u32 LE][crc32c(payload) u32 LE]
//! [payload]`, where the payload is one `ratify.v1.WalBatch` (one group commit). The last
//! segment may end in zero-filled space the writer preallocated. A torn write can only
//! damage the last frame of the last segment.

use prost::Message;
use ratify_proto::frame as framing;
use ratify_proto::v1;

use super::LogRecord;

pub use ratify_proto::frame::{Damage, FRAME_HEADER_LEN, HEADER_LEN, MAX_FRAME_LEN};

pub const MAGIC: &[u8; 8] = b"RATIFYWL";
pub const FORMAT: u32 = 1;
/// The version written in every `WalBatch`.
pub const BATCH_VERSION: u32 = 1;

pub fn segment_header() -> [u8; HEADER_LEN] {
    framing::segment_header(MAGIC, FORMAT)
}

/// Appends one frame holding `records` to `out`.
pub fn encode_frame(records: &[LogRecord], out: &mut Vec<u8>) {
    let batch = v1::WalBatch {
        version: BATCH_VERSION,
        records: records.iter().map(v1::WalRecord::from).collect(),
    };
    framing::encode_frame(&batch.encode_to_vec(), out);
}

/// The result of reading a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<LogRecord>,
    /// Bytes up to the end of the last valid frame.
    pub valid_len: usize,
    pub damage: Option<Damage>,
    /// Zero bytes after `valid_len`: preallocated space no frame reached yet.
    pub zero_tail: usize,
}

/// Checks a segment header.
pub fn check_header(bytes: &[u8]) -> Result<(), String> {
    framing::check_header(bytes, MAGIC, FORMAT, "a Ratify WAL segment")
}

fn decode_batch(payload: &[u8]) -> Result<Vec<LogRecord>, String> {
    let batch = v1::WalBatch::decode(payload).map_err(|e| format!("undecodable batch: {e}"))?;
    if batch.version != BATCH_VERSION {
        return Err(format!(
            "batch version {} is not supported (this build reads {BATCH_VERSION})",
            batch.version
        ));
    }
    batch
        .records
        .into_iter()
        .map(|r| LogRecord::try_from(r).map_err(|e| e.to_string()))
        .collect()
}

/// Reads every frame of a segment (header included) up to the first damage.
pub fn scan_segment(bytes: &[u8]) -> Result<Scan, String> {
    check_header(bytes)?;
    let mut records = Vec::new();
    let scan = framing::scan_frames(bytes, |payload| {
        records.extend(decode_batch(payload)?);
        Ok(())
    });
    Ok(Scan {
        records,
        valid_len: scan.valid_len,
        damage: scan.damage,
        zero_tail: scan.zero_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratify_proto::TxnId;

    fn segment(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = segment_header().to_vec();
        let mut ends = Vec::new();
        for _ in 0..n {
            encode_frame(
                &[LogRecord::End {
                    txn: TxnId::generate(),
                }],
                &mut bytes,
            );
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn a_clean_segment_reads_back_whole() {
        let (bytes, ends) = segment(5);
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(scan.records.len(), 5);
        assert_eq!(scan.valid_len, *ends.last().unwrap());
        assert!(scan.damage.is_none());
    }

    #[test]
    fn garbage_after_the_tail_is_a_torn_tail_and_a_bad_middle_frame_is_not() {
        let (mut bytes, ends) = segment(3);
        bytes.extend_from_slice(&[0xAB; 40]);
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(scan.records.len(), 3);
        assert!(scan.damage.unwrap().torn_tail);

        let (mut bytes, ends2) = segment(3);
        bytes[ends2[0] + 9] ^= 0x01;
        let scan = scan_segment(&bytes).unwrap();
        assert_eq!(scan.records.len(), 1);
        let damage = scan.damage.unwrap();
        assert_eq!(damage.offset, ends2[0]);
        assert!(!damage.torn_tail, "{damage:?}");
        let _ = ends;
    }

    #[test]
    fn a_huge_length_is_rejected_before_allocating() {
        let mut bytes = segment_header().to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        let damage = scan_segment(&bytes).unwrap().damage.unwrap();
        assert!(damage.why.contains("exceeds the maximum"), "{}", damage.why);
    }

    #[test]
    fn a_bad_header_is_refused() {
        assert!(scan_segment(b"RATIFYWX\x01\0\0\0\0\0\0\0").is_err());
        assert!(scan_segment(b"short").is_err());
    }
}
