//! Checksummed frames in segment files, shared by the coordinator's decision log and a
//! sled participant's journal. Pure functions over bytes.
//!
//! A segment is a 16-byte header (an 8-byte magic naming the log, format u32 LE, CRC32C
//! of those 12 bytes u32 LE) followed by frames. A frame is `[len u32 LE][crc32c(payload)
//! u32 LE][payload]`. Frames are only ever appended, so a torn write can only damage the
//! last frame of the last segment; anything else is corruption.

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
                };
            }
        }
    }
    FrameScan {
        valid_len: offset,
        damage: None,
    }
}
