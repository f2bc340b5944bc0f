//! Checksummed frames in segment files, shared by the coordinator's decision log and a
//! sled participant's journal. Pure functions over bytes.
//!
//! A segment is a 16-byte header (an 8-byte magic naming the log, format u32 LE, CRC32C
//! of those 12 bytes u32 LE) followed by frames. A frame is `[len u32 LE][crc32c(payload)
//! u32 LE][payload]`. Frames are only ever appended, so a torn write can only damage the
//! last frame of the last segment; anything else is corruption.
//!
//! A writer may zero-fill space ahead of its last frame (preallocation: overwriting
//! blocks already written makes an fdatasync cheaper than growing the file does). Where
//! the bytes left are all zero, a scan ends cleanly and reports them as
//! [`FrameScan::zero_tail`]; a zero header followed by anything else is damage like any
//! other. A writer that preallocates keeps at most one frame unsynced at a time, so that
//! a torn write still damages only the last frame.

pub const HEADER_LEN: usize = 16;
pub const FRAME_HEADER_LEN: usize = 8;
/// Frames larger than this are corruption (checked before anything is allocated).
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// A segment header for the log named by `magic` at `format`.
pub fn segment_header(magic: &[u8; 8], format: u32) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(magic);
    header[8..12].copy_from_slice(&format.to_le_bytes());
    let crc = crc32c::crc32c(&header[..12]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a segment header: `what` names the log in the message ("a Ratify WAL segment").
pub fn check_header(bytes: &[u8], magic: &[u8; 8], format: u32, what: &str) -> Result<(), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "segment header is {} bytes, expected {HEADER_LEN}",
            bytes.len()
        ));
    }
    if &bytes[..8] != magic {
        return Err(format!("bad magic: not {what}"));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&bytes[..12]) {
        return Err("segment header checksum mismatch".into());
    }
    if found != format {
        return Err(format!(
            "unsupported segment format {found} (this build reads {format})"
        ));
    }
    Ok(())
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
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

/// Where reading a segment stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameScan {
    /// Bytes up to the end of the last valid frame.
    pub valid_len: usize,
    pub damage: Option<Damage>,
    /// Zero bytes from `valid_len` to the end (preallocated space no frame reached yet).
    /// Only the segment a writer was writing may end in such space.
    pub zero_tail: usize,
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

/// Hands each frame's payload after the header to `decode`, in order, up to the first
/// damage. A payload `decode` refuses is corruption (its checksum held).
pub fn scan_frames(bytes: &[u8], mut decode: impl FnMut(&[u8]) -> Result<(), String>) -> FrameScan {
    let mut offset = HEADER_LEN.min(bytes.len());
    while offset < bytes.len() {
        if bytes[offset..].iter().all(|&b| b == 0) {
            return FrameScan {
                valid_len: offset,
                damage: None,
                zero_tail: bytes.len() - offset,
            };
        }
        match read_frame(bytes, offset) {
            Frame::Valid { payload, end } => {
                if let Err(why) = decode(payload) {
                    return FrameScan {
                        valid_len: offset,
                        damage: Some(Damage {
                            offset,
                            why: format!("checksum holds but {why}"),
                            torn_tail: false,
                        }),
                        zero_tail: 0,
                    };
                }
                offset = end;
            }
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
                return FrameScan {
                    valid_len: offset,
                    damage: Some(Damage {
                        offset,
                        why,
                        torn_tail,
                    }),
                    zero_tail: 0,
                };
            }
        }
    }
    FrameScan {
        valid_len: offset,
        damage: None,
        zero_tail: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"RATIFYXX";

    /// A segment of `n` frames; returns it and each frame's end.
    fn segment(n: u8) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = segment_header(MAGIC, 1).to_vec();
        let mut ends = Vec::new();
        for i in 0..n {
            encode_frame(&[i + 1; 40], &mut bytes);
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    fn scan_all(bytes: &[u8]) -> (FrameScan, usize) {
        let mut frames = 0;
        let scan = scan_frames(bytes, |_| {
            frames += 1;
            Ok(())
        });
        (scan, frames)
    }

    #[test]
    fn a_zero_filled_tail_ends_a_scan_cleanly() {
        let (mut bytes, ends) = segment(3);
        bytes.resize(bytes.len() + 4096, 0);
        let (scan, frames) = scan_all(&bytes);
        assert_eq!(frames, 3);
        assert_eq!(scan.damage, None);
        assert_eq!(scan.valid_len, ends[2]);
        assert_eq!(scan.zero_tail, 4096);

        // Preallocated but nothing written yet.
        let mut empty = segment_header(MAGIC, 1).to_vec();
        empty.resize(HEADER_LEN + 100, 0);
        let (scan, frames) = scan_all(&empty);
        assert_eq!(
            (frames, scan.valid_len, scan.zero_tail),
            (0, HEADER_LEN, 100)
        );
        assert_eq!(scan.damage, None);
    }

    #[test]
    fn a_frame_torn_inside_zeroed_space_is_a_torn_tail() {
        let (mut bytes, ends) = segment(3);
        bytes.resize(bytes.len() + 4096, 0);
        // The last frame's payload only partly reached the disk.
        let mut torn = bytes.clone();
        torn[ends[1] + 30..ends[2]].fill(0);
        let (scan, frames) = scan_all(&torn);
        assert_eq!(frames, 2);
        let damage = scan.damage.unwrap();
        assert!(damage.torn_tail && damage.offset == ends[1], "{damage:?}");
        assert_eq!(scan.zero_tail, 0);
        // Its header did not, but a later part did.
        let mut torn = bytes.clone();
        torn[ends[1]..ends[1] + 20].fill(0);
        let damage = scan_all(&torn).0.damage.unwrap();
        assert!(damage.torn_tail && damage.offset == ends[1], "{damage:?}");
    }

    #[test]
    fn zeros_before_a_valid_frame_are_corruption_not_a_tail() {
        let (mut bytes, ends) = segment(3);
        bytes.resize(bytes.len() + 4096, 0);
        bytes[ends[0]..ends[1]].fill(0);
        let (scan, frames) = scan_all(&bytes);
        assert_eq!(frames, 1);
        let damage = scan.damage.unwrap();
        assert_eq!(damage.offset, ends[0]);
        assert!(!damage.torn_tail, "{damage:?}");
    }
}
