//! `user_data` encoding for the queue ring: kind | cookie | tag.
//!
//! bits 0..16 tag, 16..32 cookie (target's own step id), 56..64 kind.

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
}

pub fn encode(kind: Kind, tag: u16, cookie: u16) -> u64 {
    (kind as u64) << 56 | u64::from(cookie) << 16 | u64::from(tag)
}

pub fn decode(user_data: u64) -> Option<(Kind, u16, u16)> {
    let kind = match user_data >> 56 {
        1 => Kind::Ublk,
        2 => Kind::Target,
        3 => Kind::Wake,
        4 => Kind::Aux,
        5 => Kind::Fetch,
        6 => Kind::Commit,
        _ => return None,
    };
    let tag = (user_data & 0xffff) as u16;
    let cookie = ((user_data >> 16) & 0xffff) as u16;
    Some((kind, tag, cookie))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(tag: u16, cookie: u16, k in 0usize..6) {
            let kind = [Kind::Ublk, Kind::Target, Kind::Wake, Kind::Aux, Kind::Fetch, Kind::Commit][k];
            prop_assert_eq!(decode(encode(kind, tag, cookie)), Some((kind, tag, cookie)));
        }
    }

    #[test]
    fn zero_and_garbage_are_not_ours() {
        assert_eq!(decode(0), None);
        assert_eq!(decode(0xff << 56), None);
    }
}
