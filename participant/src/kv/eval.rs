//! Evaluates a branch's operations against committed values: pure, no locks, no I/O.

use std::collections::BTreeMap;

use ratify_proto::v1::{self, kv_op::Op};

/// A committed value with its version (0 and `None` for a key never written).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versioned {
    pub version: u64,
    pub value: Option<Vec<u8>>,
}

/// The result of evaluating a branch: the value each written key will take (`None`
/// deletes), in key order.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Why a branch votes NO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

/// The key an operation touches.
pub fn key_of(op: &Op) -> &[u8] {
    match op {
        Op::Put(p) => &p.key,
        Op::Delete(d) => &d.key,
        Op::Add(a) => &a.key,
        Op::Check(c) => &c.key,
    }
}

/// Evaluates `ops` in order. `committed` reads a key's committed value. Checks compare
/// against the committed version; Add reads the value as written by earlier operations
/// of the same branch.
pub fn evaluate(
    ops: &[v1::KvOp],
    mut committed: impl FnMut(&[u8]) -> Versioned,
) -> Result<Writes, Rejection> {
    let mut writes = Writes::new();
    for (index, op) in ops.iter().enumerate() {
        let op = op
            .op
            .as_ref()
            .ok_or_else(|| Rejection(format!("operation {index} is empty")))?;
        match op {
            Op::Put(put) => {
                writes.insert(put.key.to_vec(), Some(put.value.to_vec()));
            }
            Op::Delete(delete) => {
                writes.insert(delete.key.to_vec(), None);
            }
            Op::Check(check) => {
                let current = committed(&check.key).version;
                if current != check.version {
                    return Err(Rejection(format!(
                        "check failed on key {}: version is {current}, expected {}",
                        show_key(&check.key),
                        check.version
                    )));
                }
            }
            Op::Add(add) => {
                let current = match writes.get(add.key.as_ref()) {
                    Some(staged) => staged.clone(),
                    None => committed(&add.key).value,
                };
                let current = match current {
                    None => 0,
                    Some(bytes) => parse_integer(&bytes).ok_or_else(|| {
                        Rejection(format!(
                            "key {} does not hold a decimal integer",
                            show_key(&add.key)
                        ))
                    })?,
                };
                let result = current.checked_add(add.delta).ok_or_else(|| {
                    Rejection(format!("add overflows on key {}", show_key(&add.key)))
                })?;
                if let Some(min) = add.min
                    && result < min
                {
                    return Err(Rejection(format!(
                        "add of {} to key {} gives {result}, below its bound {min}",
                        add.delta,
                        show_key(&add.key)
                    )));
                }
                writes.insert(add.key.to_vec(), Some(result.to_string().into_bytes()));
            }
        }
    }
    Ok(writes)
}

fn parse_integer(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

/// A key for messages: text when printable, hex otherwise, cut at 64 characters.
pub fn show_key(key: &[u8]) -> String {
    let text = match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    };
    if text.chars().count() > 64 {
        let cut: String = text.chars().take(64).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn op(op: Op) -> v1::KvOp {
        v1::KvOp { op: Some(op) }
    }

    fn add(key: &str, delta: i64, min: Option<i64>) -> v1::KvOp {
        op(Op::Add(v1::Add {
            key: key.as_bytes().to_vec().into(),
            delta,
            min,
        }))
    }

    fn store(entries: &[(&str, u64, &str)]) -> HashMap<Vec<u8>, Versioned> {
        entries
            .iter()
            .map(|(k, v, val)| {
                (
                    k.as_bytes().to_vec(),
                    Versioned {
                        version: *v,
                        value: Some(val.as_bytes().to_vec()),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn add_respects_its_bound_and_sees_earlier_ops_of_the_branch() {
        let s = store(&[("a", 1, "10")]);
        let read = |k: &[u8]| s.get(k).cloned().unwrap_or_default();
        let w = evaluate(&[add("a", -4, Some(0)), add("a", -6, Some(0))], read).unwrap();
        assert_eq!(w[b"a".as_slice()], Some(b"0".to_vec()));
        let err = evaluate(&[add("a", -11, Some(0))], read).unwrap_err();
        assert!(err.0.contains("below its bound"), "{}", err.0);
        // A missing key counts as zero.
        let w = evaluate(&[add("new", 5, None)], read).unwrap();
        assert_eq!(w[b"new".as_slice()], Some(b"5".to_vec()));
    }

    #[test]
    fn check_compares_the_committed_version() {
        let s = store(&[("a", 3, "x")]);
        let read = |k: &[u8]| s.get(k).cloned().unwrap_or_default();
        let check = |v| {
            op(Op::Check(v1::Check {
                key: b"a".to_vec().into(),
                version: v,
            }))
        };
        assert!(evaluate(&[check(3)], read).unwrap().is_empty());
        assert!(evaluate(&[check(2)], read).is_err());
    }

    #[test]
    fn add_on_a_non_integer_or_overflow_is_rejected() {
        let s = store(&[("t", 1, "text"), ("m", 1, &i64::MAX.to_string())]);
        let read = |k: &[u8]| s.get(k).cloned().unwrap_or_default();
        assert!(evaluate(&[add("t", 1, None)], read).is_err());
        assert!(evaluate(&[add("m", 1, None)], read).is_err());
        assert!(evaluate(&[v1::KvOp { op: None }], read).is_err());
    }
}
