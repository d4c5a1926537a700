//! `nbd`: a client of an NBD server (nbdkit, qemu-nbd, nbd-server...) as a block device.
//!
//! Each queue has its own connection, driven from the queue's ring (see `queue.rs`):
//! request headers (and small writes' data) are gathered into one send, large writes'
//! data is sent from the request buffer, and one standing receive takes replies in
//! bulk, a read's data going straight into its request's buffer. The handshake is
//! blocking and happens before the queue takes the connection: at start for every
//! queue, and on a helper thread when a connection is re-made.
//!
//! Several connections are used only when the server says that is safe
//! (NBD_FLAG_CAN_MULTI_CONN: a FLUSH on one covers writes replied to on all);
//! otherwise the device has one queue and one connection.

pub mod proto;
mod queue;
pub mod uri;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ubd_engine::{DiscardInfo, QueueSetup, QueueTarget, Target, TargetInfo};

pub use proto::Export;
pub use uri::{Addr, NbdUri};

use crate::TargetSpec;

/// How the client behaves when the server is slow or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// Connections (= queues); None: one per queue asked for (one if the server does
    /// not allow several).
    pub connections: Option<u16>,
    /// How long a broken connection is retried before its requests fail with EIO.
    pub reconnect_timeout: Duration,
    /// A request without a reply for this long fails (and its connection is re-made).
    /// None: wait forever.
    pub io_timeout: Option<Duration>,
    /// Connecting and each handshake step give up after this long.
    pub connect_timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            connections: None,
            reconnect_timeout: Duration::from_secs(60),
            io_timeout: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A connected socket to the server.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where to connect and what to ask for: everything a (re)connection needs.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: NbdUri,
    pub connect_timeout: Duration,
}

impl Endpoint {
    /// Connects and shakes hands; the error is one line that names the URI.
    pub fn connect(&self) -> Result<(Stream, Export), String> {
        let uri = &self.uri;
        let mut s = self.open_socket().map_err(|e| format!("{uri}: {e}"))?;
        s.set_timeouts(Some(self.connect_timeout)).map_err(|e| format!("{uri}: {e}"))?;
        let export = proto::handshake(&mut s, &uri.export).map_err(|e| format!("{uri}: {e}"))?;
        s.set_timeouts(None).map_err(|e| format!("{uri}: {e}"))?;
        Ok((s, export))
    }

    fn open_socket(&self) -> io::Result<Stream> {
        match &self.uri.addr {
            Addr::Unix { path } => {
                match std::fs::metadata(path) {
                    Ok(m) if !m.file_type().is_socket() => {
                        return Err(io::Error::other(format!("{} is not a socket", path.display())));
                    }
                    Err(e) => return Err(io::Error::new(e.kind(), format!("socket {}: {e}", path.display()))),
                    Ok(_) => {}
                }
                UnixStream::connect(path).map(Stream::Unix)
            }
            Addr::Tcp { host, port } => {
                let addrs = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {host}: {e}")))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
                for a in addrs {
                    match TcpStream::connect_timeout(&a, self.connect_timeout) {
                        Ok(s) => {
                            // Requests are gathered into one send already: no Nagle delay.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = io::Error::new(e.kind(), format!("cannot connect to {a}: {e}")),
                    }
                }
                Err(last)
            }
        }
    }
}

/// The NBD target: the export's geometry, and the connection the probe made (kept for
/// queue 0).
#[derive(Debug)]
pub struct NbdTarget {
    info: TargetInfo,
    endpoint: Arc<Endpoint>,
    export: Export,
    opts: NbdOptions,
    queues: u16,
    first: Mutex<Option<Stream>>,
}

/// The device's largest request for this export: `want`, no larger than the server's
/// maximum payload (32 MiB when it does not say), in whole pages.
pub fn max_io_bytes(export: &Export, want: u32) -> u32 {
    let server = export.block.map_or(32 << 20, |b| b.max);
    let page = 4096;
    (want.min(server) / page * page).max(page)
}

impl NbdTarget {
    /// Connects to `uri` and reads the export's geometry. `queues` (= connections) is
    /// what the user asked for; [`queues`](Self::queues) says how many the device gets:
    /// one if the server does not allow several connections.
    pub fn open(uri: &str, opts: &NbdOptions, queues: u16) -> Result<Self, String> {
        let uri = NbdUri::parse(uri).map_err(|e| format!("{uri}: not an NBD URI: {e}"))?;
        let endpoint = Arc::new(Endpoint { uri, connect_timeout: opts.connect_timeout });
        let (stream, export) = endpoint.connect()?;
        let uri = &endpoint.uri;
        let queues = if queues > 1 && !export.has(proto::TF_CAN_MULTI_CONN) {
            if opts.connections.is_some_and(|n| n > 1) {
                return Err(format!(
                    "{uri}: the server does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN): use --connections 1"
                ));
            }
            tracing::info!(
                "{uri}: the server does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN): one queue, one connection"
            );
            1
        } else {
            queues
        };
        let info = Self::geometry(uri, &export)?;
        Ok(Self { info, endpoint, export, opts: *opts, queues, first: Mutex::new(Some(stream)) })
    }

    fn geometry(uri: &NbdUri, e: &Export) -> Result<TargetInfo, String> {
        let min = e.block.map_or(1, |b| b.min);
        if !min.is_power_of_two() || min > 4096 {
            return Err(format!("{uri}: the server's minimum block size {min} is not a power of two up to 4096"));
        }
        let lbs = min.max(512);
        let pbs = e.block.map_or(lbs, |b| b.preferred).clamp(lbs, 4096);
        let pbs = if pbs.is_power_of_two() { pbs } else { lbs };
        let size = e.size / u64::from(lbs) * u64::from(lbs);
        if size == 0 {
            return Err(format!("{uri}: the export is smaller than one {lbs}-byte block ({} bytes)", e.size));
        }
        if size != e.size {
            tracing::warn!(
                "{uri}: the export's {} bytes are not whole {lbs}-byte blocks: the device has {size}",
                e.size
            );
        }
        // TRIM and WRITE_ZEROES lengths are 32 bits: 1 GiB at a time.
        let most = (1u32 << 30) >> 9;
        let trim = e.has(proto::TF_SEND_TRIM);
        let zeroes = e.has(proto::TF_SEND_WRITE_ZEROES);
        let discard = (trim || zeroes).then_some(DiscardInfo {
            granularity: pbs,
            max_discard_sectors: if trim { most } else { 0 },
            max_write_zeroes_sectors: if zeroes { most } else { 0 },
        });
        Ok(TargetInfo {
            dev_size: size,
            logical_block_size: lbs,
            physical_block_size: pbs,
            read_only: e.has(proto::TF_READ_ONLY),
            rotational: e.has(proto::TF_ROTATIONAL),
            volatile_cache: e.has(proto::TF_SEND_FLUSH),
            discard,
            zoned: None,
        })
    }

    /// The number of queues (= connections) the device gets.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    pub fn export(&self) -> &Export {
        &self.export
    }

    pub fn spec(&self) -> TargetSpec {
        TargetSpec::Nbd {
            uri: self.endpoint.uri.text.clone(),
            reconnect_timeout_secs: self.opts.reconnect_timeout.as_secs(),
            io_timeout_secs: self.opts.io_timeout.map(|d| d.as_secs()),
        }
    }
}

impl Target for NbdTarget {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn info(&self) -> &TargetInfo {
        &self.info
    }
    fn describe(&self) -> serde_json::Value {
        let e = &self.export;
        serde_json::json!({
            "uri": self.endpoint.uri.text,
            "export_size": e.size,
            "flags": proto::flag_names(e.flags),
            "structured_replies": e.structured,
            "block_size": e.block.map(|b| serde_json::json!({ "min": b.min, "preferred": b.preferred, "max": b.max })),
            "connections": self.queues,
        })
    }
    /// Request data goes over a socket from our own buffers: copy mode.
    fn supports_zero_copy(&self) -> bool {
        false
    }
    fn open_queue(&self, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>> {
        let taken = self.first.lock().unwrap_or_else(PoisonError::into_inner).take();
        let stream = match taken {
            Some(s) => s,
            None => {
                let (s, e) = self.endpoint.connect().map_err(io::Error::other)?;
                if e.size != self.export.size || e.flags != self.export.flags || e.structured != self.export.structured
                {
                    return Err(io::Error::other(format!(
                        "{}: connection {} sees another export (size {}, flags {:#x})",
                        self.endpoint.uri,
                        setup.q_id(),
                        e.size,
                        e.flags
                    )));
                }
                s
            }
        };
        let q = queue::NbdQueue::new(setup, Arc::clone(&self.endpoint), self.export.clone(), self.opts, stream)?;
        Ok(Box::new(q))
    }
}
