//! The NBD protocol, from its specification (the NBD project's `doc/proto.md`): the
//! fixed newstyle handshake (blocking, on a connection of its own before the queue
//! takes it over) and the transmission phase's wire formats (request headers, simple
//! replies, structured reply chunks), parsed without trusting the server.

use std::io::{self, Read, Write};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options and their replies.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Transmission flag names, for messages.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    const NAMES: [&str; 13] = [
        "has-flags",
        "read-only",
        "flush",
        "fua",
        "rotational",
        "trim",
        "write-zeroes",
        "df",
        "multi-conn",
        "resize",
        "cache",
        "fast-zero",
        "block-status-payload",
    ];
    NAMES.iter().enumerate().filter(|&(bit, _)| flags & (1 << bit) != 0).map(|(_, n)| *n).collect()
}

// Requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REQUEST_LEN: usize = 28;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const SIMPLE_LEN: usize = 16;
pub const CHUNK_LEN: usize = 20;
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Block size constraints (NBD_INFO_BLOCK_SIZE), if the server sent them.
    pub block: Option<BlockSize>,
    /// Structured replies were negotiated.
    pub structured: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Export {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    /// The server closed the connection.
    Closed,
    /// The server does not speak (fixed) newstyle NBD, or broke the protocol.
    Protocol(String),
    /// The server refused the export.
    Refused(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                write!(f, "the server did not answer the handshake in time")
            }
            Self::Io(e) => write!(f, "handshake: {e}"),
            Self::Closed => write!(f, "the server closed the connection during the handshake"),
            Self::Protocol(m) => write!(f, "handshake: {m}"),
            Self::Refused(m) => write!(f, "{m}"),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        if matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted) {
            Self::Closed
        } else {
            Self::Io(e)
        }
    }
}

fn read_n<const N: usize>(s: &mut impl Read) -> Result<[u8; N], HandshakeError> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}
fn read_u16(s: &mut impl Read) -> Result<u16, HandshakeError> {
    Ok(u16::from_be_bytes(read_n(s)?))
}
fn read_u32(s: &mut impl Read) -> Result<u32, HandshakeError> {
    Ok(u32::from_be_bytes(read_n(s)?))
}
fn read_u64(s: &mut impl Read) -> Result<u64, HandshakeError> {
    Ok(u64::from_be_bytes(read_n(s)?))
}

/// The largest option reply we read (an NBD string is at most 4096 bytes).
const MAX_OPT_REPLY: u32 = 64 << 10;

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> Result<(), HandshakeError> {
    let len = u32::try_from(data.len()).map_err(|_| HandshakeError::Protocol("option too long".into()))?;
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)?;
    Ok(())
}

/// One option reply: (type, data).
fn read_reply(s: &mut impl Read, opt: u32) -> Result<(u32, Vec<u8>), HandshakeError> {
    if read_u64(s)? != OPT_REPLY_MAGIC {
        return Err(HandshakeError::Protocol("bad option reply magic".into()));
    }
    let got = read_u32(s)?;
    let ty = read_u32(s)?;
    let len = read_u32(s)?;
    if got != opt {
        return Err(HandshakeError::Protocol(format!("reply to option {got}, but option {opt} was sent")));
    }
    if len > MAX_OPT_REPLY {
        return Err(HandshakeError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((ty, data))
}

/// The server's words on an error reply (its data is a message), if any.
fn server_says(data: &[u8]) -> String {
    let m = String::from_utf8_lossy(data);
    let m = m.trim();
    if m.is_empty() { String::new() } else { format!(" (server: {m})") }
}

/// The fixed newstyle handshake for `export`: structured replies if the server has
/// them, then NBD_OPT_GO with NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE, or
/// NBD_OPT_EXPORT_NAME where the server has no OPT_GO (or is not fixed newstyle).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Export, HandshakeError> {
    if read_u64(s)? != NBDMAGIC {
        return Err(HandshakeError::Protocol("not an NBD server (no NBDMAGIC)".into()));
    }
    match read_u64(s)? {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(HandshakeError::Protocol("the server speaks oldstyle NBD, which is not supported".into()));
        }
        _ => return Err(HandshakeError::Protocol("not an NBD server (bad magic)".into())),
    }
    let hflags = read_u16(s)?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = (if fixed { FLAG_C_FIXED_NEWSTYLE } else { 0 }) | (if no_zeroes { FLAG_C_NO_ZEROES } else { 0 });
    s.write_all(&cflags.to_be_bytes())?;
    if export.len() > 4096 {
        return Err(HandshakeError::Refused("the export name is longer than 4096 bytes".into()));
    }
    let mut structured = false;
    if fixed {
        send_option(s, OPT_STRUCTURED_REPLY, &[])?;
        let (ty, data) = read_reply(s, OPT_STRUCTURED_REPLY)?;
        match ty {
            REP_ACK => structured = true,
            t if t & (1 << 31) != 0 => {
                tracing::debug!("nbd: no structured replies (reply {t:#x}){}", server_says(&data))
            }
            t => return Err(HandshakeError::Protocol(format!("reply {t} to NBD_OPT_STRUCTURED_REPLY"))),
        }
        if let Some(e) = go(s, export)? {
            return Ok(Export { structured, ..e });
        }
    }
    export_name(s, export, no_zeroes).map(|e| Export { structured, ..e })
}

/// NBD_OPT_GO; None if the server does not have it.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<Export>, HandshakeError> {
    let mut data = Vec::with_capacity(export.len() + 10);
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&2u16.to_be_bytes());
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let (mut size_flags, mut block) = (None, None);
    let name = if export.is_empty() { "the default export".to_string() } else { format!("export {export:?}") };
    loop {
        let (ty, d) = read_reply(s, OPT_GO)?;
        match ty {
            REP_INFO => {
                let info = d.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                match info {
                    Some(INFO_EXPORT) if d.len() == 12 => {
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
                        size_flags = Some((size, u16::from_be_bytes([d[10], d[11]])));
                    }
                    Some(INFO_BLOCK_SIZE) if d.len() == 14 => {
                        let w = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap_or_default());
                        block = Some(BlockSize { min: w(2), preferred: w(6), max: w(10) });
                    }
                    Some(INFO_EXPORT | INFO_BLOCK_SIZE) | None => {
                        return Err(HandshakeError::Protocol(format!("bad NBD_REP_INFO of {} bytes", d.len())));
                    }
                    Some(_) => {}
                }
            }
            REP_ACK => {
                let (size, flags) = size_flags
                    .ok_or_else(|| HandshakeError::Protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
                return Ok(Some(Export { size, flags, block, structured: false }));
            }
            REP_ERR_UNSUP => return Ok(None),
            REP_ERR_UNKNOWN => {
                return Err(HandshakeError::Refused(format!("the server has no {name}{}", server_says(&d))));
            }
            REP_ERR_POLICY => {
                return Err(HandshakeError::Refused(format!("the server refused {name} by policy{}", server_says(&d))));
            }
            REP_ERR_TLS_REQD => {
                return Err(HandshakeError::Refused(format!(
                    "the server requires TLS for {name}, which is not supported"
                )));
            }
            REP_ERR_SHUTDOWN => {
                return Err(HandshakeError::Refused(format!("the server is shutting down{}", server_says(&d))));
            }
            REP_ERR_BLOCK_SIZE_REQD => {
                return Err(HandshakeError::Protocol(format!(
                    "the server asks for block sizes it was sent{}",
                    server_says(&d)
                )));
            }
            t if t & (1 << 31) != 0 => {
                return Err(HandshakeError::Refused(format!(
                    "the server refused {name} (error {:#x}){}",
                    t,
                    server_says(&d)
                )));
            }
            t => tracing::debug!("nbd: ignoring option reply type {t} to NBD_OPT_GO"),
        }
    }
}

/// NBD_OPT_EXPORT_NAME: a server that refuses the export closes the connection.
fn export_name<S: Read + Write>(s: &mut S, export: &str, no_zeroes: bool) -> Result<Export, HandshakeError> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = match read_u64(s) {
        Err(HandshakeError::Closed) => {
            return Err(HandshakeError::Refused(format!("the server closed the connection: no export {export:?}?")));
        }
        r => r?,
    };
    let flags = read_u16(s)?;
    if !no_zeroes {
        read_n::<124>(s)?;
    }
    Ok(Export { size, flags, block: None, structured: false })
}

/// Ends the handshake without an export (a probe connection that is not kept).
pub fn abort(s: &mut impl Write) {
    let _ = send_option(s, OPT_ABORT, &[]);
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub ty: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.ty.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
    }
}

/// A reply header read from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply (a read's data follows if `error` is 0).
    Simple { handle: u64, error: u32 },
    /// A structured reply chunk with `len` bytes of payload.
    Chunk { flags: u16, ty: u16, handle: u64, len: u32 },
}

/// The reply header at the start of `b`: Ok(None) if more bytes are needed, Err if
/// these are not reply bytes (a simple or, when negotiated, structured reply magic).
pub fn parse_reply(b: &[u8], structured: bool) -> Result<Option<(Reply, usize)>, String> {
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or_default());
    if b.len() < 4 {
        return Ok(None);
    }
    match be32(0) {
        SIMPLE_REPLY_MAGIC if b.len() < SIMPLE_LEN => Ok(None),
        SIMPLE_REPLY_MAGIC => Ok(Some((Reply::Simple { error: be32(4), handle: be64(8) }, SIMPLE_LEN))),
        STRUCTURED_REPLY_MAGIC if !structured => Err("a structured reply, which was not negotiated".into()),
        STRUCTURED_REPLY_MAGIC if b.len() < CHUNK_LEN => Ok(None),
        STRUCTURED_REPLY_MAGIC => {
            Ok(Some((Reply::Chunk { flags: be16(4), ty: be16(6), handle: be64(8), len: be32(16) }, CHUNK_LEN)))
        }
        m => Err(format!("bad reply magic {m:#010x}")),
    }
}

/// An NBD error number as a negative errno.
pub fn errno(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => -libc::EPERM,
        12 => -libc::ENOMEM,
        22 => -libc::EINVAL,
        28 => -libc::ENOSPC,
        75 => -libc::EOVERFLOW,
        95 => -libc::EOPNOTSUPP,
        108 => -libc::ESHUTDOWN,
        _ => -libc::EIO,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn request_encodes_big_endian() {
        let mut b = [0u8; REQUEST_LEN];
        Request { flags: CMD_FLAG_FUA, ty: CMD_WRITE, handle: 0x0102_0304_0506_0708, offset: 1 << 40, len: 4096 }
            .encode(&mut b);
        assert_eq!(&b[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..], &[0, 0, 0x10, 0]);
    }

    #[test]
    fn replies_parse_and_garbage_does_not() {
        let mut simple = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28];
        simple.extend_from_slice(&7u64.to_be_bytes());
        for n in 0..SIMPLE_LEN {
            assert_eq!(parse_reply(&simple[..n], false), Ok(None), "{n}");
        }
        assert_eq!(parse_reply(&simple, false), Ok(Some((Reply::Simple { handle: 7, error: 28 }, 16))));
        let mut chunk = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2];
        chunk.extend_from_slice(&9u64.to_be_bytes());
        chunk.extend_from_slice(&12u32.to_be_bytes());
        assert!(parse_reply(&chunk, false).unwrap_err().contains("not negotiated"));
        assert_eq!(parse_reply(&chunk[..19], true), Ok(None));
        assert_eq!(
            parse_reply(&chunk, true),
            Ok(Some((Reply::Chunk { flags: REPLY_FLAG_DONE, ty: REPLY_TYPE_OFFSET_HOLE, handle: 9, len: 12 }, 20)))
        );
        assert!(parse_reply(b"HTTP/1.1 200", true).unwrap_err().contains("bad reply magic"));
    }

    /// A scripted server end of a handshake: what it does with each option.
    #[derive(Clone, Copy, PartialEq)]
    pub(crate) enum Script {
        /// Fixed newstyle with OPT_GO and structured replies, `flags` on the export.
        Modern { flags: u16 },
        /// Fixed newstyle without OPT_GO or structured replies (EXPORT_NAME only).
        NoGo,
        /// Closes after the greeting.
        CloseEarly,
        /// Knows no export.
        Unknown,
    }

    fn opt_reply(s: &mut impl Write, opt: u32, ty: u32, data: &[u8]) {
        let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// Serves the handshake on `s` per `script`; returns the export name asked for.
    pub(crate) fn serve_handshake<S: Read + Write>(s: &mut S, script: Script, size: u64) -> Option<String> {
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).unwrap();
        if script == Script::CloseEarly {
            return None;
        }
        let mut cflags = [0u8; 4];
        s.read_exact(&mut cflags).ok()?;
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).ok()?;
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
            s.read_exact(&mut data).ok()?;
            match (opt, script) {
                (OPT_STRUCTURED_REPLY, Script::Modern { .. }) => opt_reply(s, opt, REP_ACK, &[]),
                (OPT_GO, Script::Modern { flags }) => {
                    let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                    let name = String::from_utf8(data[4..4 + n].to_vec()).unwrap();
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&size.to_be_bytes());
                    info.extend_from_slice(&flags.to_be_bytes());
                    opt_reply(s, opt, REP_INFO, &info);
                    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [512u32, 4096, 1 << 20] {
                        bs.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(s, opt, REP_INFO, &bs);
                    opt_reply(s, opt, REP_ACK, &[]);
                    return Some(name);
                }
                (OPT_GO, Script::Unknown) => {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export");
                }
                (OPT_EXPORT_NAME, Script::NoGo) => {
                    let mut r = size.to_be_bytes().to_vec();
                    r.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
                    s.write_all(&r).unwrap();
                    return Some(String::from_utf8(data).unwrap());
                }
                (OPT_EXPORT_NAME, _) => return None,
                _ => opt_reply(s, opt, REP_ERR_UNSUP, &[]),
            }
        }
    }

    fn shake(script: Script, export: &str) -> (Result<Export, HandshakeError>, Option<String>) {
        let (mut c, mut srv) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || serve_handshake(&mut srv, script, 1 << 30));
        let r = handshake(&mut c, export);
        drop(c);
        (r, t.join().unwrap())
    }

    #[test]
    fn handshake_with_go_structured_and_block_sizes() {
        let flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
        let (r, name) = shake(Script::Modern { flags }, "disk");
        let e = r.unwrap();
        assert_eq!(name.as_deref(), Some("disk"));
        assert_eq!(
            e,
            Export {
                size: 1 << 30,
                flags,
                block: Some(BlockSize { min: 512, preferred: 4096, max: 1 << 20 }),
                structured: true
            }
        );
    }

    #[test]
    fn handshake_falls_back_to_export_name() {
        let (r, name) = shake(Script::NoGo, "old");
        let e = r.unwrap();
        assert_eq!(name.as_deref(), Some("old"));
        assert_eq!((e.size, e.flags, e.block, e.structured), (1 << 30, TF_HAS_FLAGS | TF_SEND_FLUSH, None, false));
    }

    #[test]
    fn handshake_errors_say_what_happened() {
        let (r, _) = shake(Script::Unknown, "nope");
        let m = r.unwrap_err().to_string();
        assert!(m.contains("no export \"nope\"") && m.contains("no such export"), "{m}");
        let (r, _) = shake(Script::CloseEarly, "x");
        assert_eq!(r.unwrap_err().to_string(), "the server closed the connection during the handshake");
        // Not an NBD server at all.
        let (mut c, mut srv) = std::os::unix::net::UnixStream::pair().unwrap();
        srv.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        let m = handshake(&mut c, "").unwrap_err().to_string();
        assert!(m.contains("not an NBD server"), "{m}");
    }

    #[test]
    fn errnos_map() {
        assert_eq!(errno(28), -libc::ENOSPC);
        assert_eq!(errno(5), -libc::EIO);
        assert_eq!(errno(95), -libc::EOPNOTSUPP);
        assert_eq!(errno(12345), -libc::EIO);
        assert_eq!(flag_names(TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN), ["has-flags", "flush", "multi-conn"]);
    }
}
