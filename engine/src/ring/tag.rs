//! `user_data` encoding for the queue ring: kind | mem | cookie | tag.
//!
//! bits 0..16 tag, 16..32 cookie (the target's own step id), 32..48 the target memory
//! the SQE names plus one (0: none), 56..64 kind.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// FETCH_REQ / COMMIT_AND_FETCH_REQ on the char device.
    Ublk = 1,
    /// A target SQE on behalf of a request.
    Target = 2,
    /// The wake-up eventfd read.
    Wake = 3,
    /// REGISTER_IO_BUF / UNREGISTER_IO_BUF (zero-copy mode).
    Aux = 4,
    /// The multishot FETCH_IO_CMDS (batch mode).
    Fetch = 5,
    /// PREP_IO_CMDS / COMMIT_IO_CMDS (batch mode); the cookie names the element array.
    Commit = 6,
    /// A target SQE that belongs to the queue, not to a request (a standing receive).
    QueueIo = 7,
    /// The read on the target's waker eventfd.
    Waker = 8,
    /// User-copy mode: the read or write on the char device that moves a request's data
    /// between the kernel and the tag's buffer.
    UserCopy = 9,
}

const KINDS: [Kind; 9] = [
    Kind::Ublk,
    Kind::Target,
    Kind::Wake,
    Kind::Aux,
    Kind::Fetch,
    Kind::Commit,
    Kind::QueueIo,
    Kind::Waker,
    Kind::UserCopy,
];

pub fn encode(kind: Kind, tag: u16, cookie: u16) -> u64 {
    (kind as u64) << 56 | u64::from(cookie) << 16 | u64::from(tag)
}

/// `encode`, for an SQE that names target memory `mem`.
pub fn encode_mem(kind: Kind, tag: u16, cookie: u16, mem: Option<u16>) -> u64 {
    encode(kind, tag, cookie) | mem.map_or(0, |m| (u64::from(m) + 1) << 32)
}

pub fn decode(user_data: u64) -> Option<(Kind, u16, u16)> {
    let kind = *KINDS.iter().find(|k| **k as u64 == user_data >> 56)?;
    let tag = (user_data & 0xffff) as u16;
    let cookie = ((user_data >> 16) & 0xffff) as u16;
    Some((kind, tag, cookie))
}

/// The target memory an SQE names, if any.
pub fn decode_mem(user_data: u64) -> Option<u16> {
    let m = (user_data >> 32) & 0xffff;
    (m > 0).then(|| (m - 1) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(tag: u16, cookie: u16, k in 0usize..9, mem in proptest::option::of(0u16..u16::MAX)) {
            let kind = KINDS[k];
            let ud = encode_mem(kind, tag, cookie, mem);
            prop_assert_eq!(decode(ud), Some((kind, tag, cookie)));
            prop_assert_eq!(decode_mem(ud), mem);
            prop_assert_eq!(decode_mem(encode(kind, tag, cookie)), None);
        }
    }

    #[test]
    fn zero_and_garbage_are_not_ours() {
        assert_eq!(decode(0), None);
        assert_eq!(decode(0xff << 56), None);
    }
}
