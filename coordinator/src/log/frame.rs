//! The WAL's on-disk format, as pure functions over bytes (the fuzz target's surface).
//!
//! A segment is a 16-byte header (magic `RATIFYWL`, format u32 LE, CRC32C of those 12
//! bytes u32 LE) followed by frames. A frame is `[len u32 LE][crc32c(payload) u32 LE]
//! [payload]`, where the payload is one `ratify.v1.WalBatch` (one group commit). A torn
//! write can therefore only damage the last frame of the last segment.

use prost::Message;
use ratify_proto::v1;

use super::LogRecord;

pub const MAGIC: &[u8; 8] = b"RATIFYWL";
pub const FORMAT: u32 = 1;
pub const HEADER_LEN: usize = 16;
pub const FRAME_HEADER_LEN: usize = 8;
/// Frames larger than this are corruption (checked before anything is allocated).
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// The version written in every `WalBatch`.
pub const BATCH_VERSION: u32 = 1;

pub fn segment_header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Appends one frame holding `records` to `out`.
pub fn encode_frame(records: &[LogRecord], out: &mut Vec<u8>) {
    let batch = v1::WalBatch {
        version: BATCH_VERSION,
        records: records.iter().map(v1::WalRecord::from).collect(),
    };
    let payload = batch.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// What is wrong at some offset of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: usize,
    pub why: String,
    /// Whether a torn write could explain it: the frame is short or fails its CRC and no
    /// valid frame follows it. A damaged frame followed by a valid one, or a frame whose
    /// CRC holds but whose content does not decode, is corruption.
    pub torn_tail: bool,
}

/// The result of reading a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub records: Vec<LogRecord>,
    /// Bytes up to the end of the last valid frame.
    pub valid_len: usize,
    pub damage: Option<Damage>,
}

/// Checks a segment header.
pub fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "segment header is {} bytes, expected {HEADER_LEN}",
            bytes.len()
        ));
    }
    if &bytes[..8] != MAGIC {
        return Err("bad magic: not a Ratify WAL segment".into());
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..12]) {
        return Err("segment header checksum mismatch".into());
    }
    if format != FORMAT {
        return Err(format!(
            "unsupported segment format {format} (this build reads {FORMAT})"
        ));
    }
    Ok(())
}

enum Frame<'a> {
    Valid { payload: &'a [u8], end: usize },
    Bad(String),
}

fn read_frame(bytes: &[u8], offset: usize) -> Frame<'_> {
    let rest = &bytes[offset..];
    if rest.len() < FRAME_HEADER_LEN {
        return Frame::Bad(format!(
            "{} stray bytes where a frame header should be",
            rest.len()
        ));
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 {
        return Frame::Bad("zero-length frame".into());
    }
    if len > MAX_FRAME_LEN {
        return Frame::Bad(format!(
            "frame length {len} exceeds the maximum {MAX_FRAME_LEN}"
        ));
    }
    if rest.len() - FRAME_HEADER_LEN < len {
        return Frame::Bad(format!(
            "frame of {len} bytes cut short at {} bytes",
            rest.len() - FRAME_HEADER_LEN
        ));
    }
    let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    if crc32c::crc32c(payload) != crc {
        return Frame::Bad("frame checksum mismatch".into());
    }
    Frame::Valid {
        payload,
        end: offset + FRAME_HEADER_LEN + len,
    }
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
    let mut offset = HEADER_LEN;
    while offset < bytes.len() {
        match read_frame(bytes, offset) {
            Frame::Valid { payload, end } => match decode_batch(payload) {
                Ok(batch) => {
                    records.extend(batch);
                    offset = end;
                }
                Err(why) => {
                    return Ok(Scan {
                        records,
                        valid_len: offset,
                        damage: Some(Damage {
                            offset,
                            why: format!("checksum holds but {why}"),
                            torn_tail: false,
                        }),
                    });
                }
            },
            Frame::Bad(why) => {
                let later = (offset + 1..bytes.len())
                    .find(|o| matches!(read_frame(bytes, *o), Frame::Valid { .. }));
                let (why, torn_tail) = match later {
                    Some(at) => (
                        format!("{why}; a valid frame follows at offset {at}"),
                        false,
                    ),
                    None => (why, true),
                };
                return Ok(Scan {
                    records,
                    valid_len: offset,
                    damage: Some(Damage {
                        offset,
                        why,
                        torn_tail,
                    }),
                });
            }
        }
    }
    Ok(Scan {
        records,
        valid_len: offset,
        damage: None,
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
