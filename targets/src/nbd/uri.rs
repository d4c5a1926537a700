//! NBD URIs, as nbdkit, qemu and libnbd write them (the NBD project's `doc/uri.md`):
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`. TLS (`nbds`)
//! and vsock are not supported.

use std::fmt;
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix { path: PathBuf },
}

/// A parsed NBD URI: the server and the export's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The URI as given (for messages and the state file).
    pub text: String,
    pub addr: Addr,
    /// The export's name ("" is the server's default export).
    pub export: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl NbdUri {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let u = url::Url::parse(text).map_err(|e| format!("{e}"))?;
        let decode =
            |s: &str| percent_decode(s).ok_or_else(|| "the export name is not valid percent-encoded UTF-8".to_string());
        // The path is "/" followed by the export name (which may itself start with "/").
        let path = u.path();
        let export = decode(path.strip_prefix('/').unwrap_or(path))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err("user names and passwords are not supported".into());
        }
        let addr = match u.scheme() {
            "nbd" => {
                let host = match u.host() {
                    Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
                    Some(url::Host::Ipv4(a)) => a.to_string(),
                    Some(url::Host::Ipv6(a)) => a.to_string(),
                    _ => return Err("nbd:// needs a host (nbd://HOST[:PORT][/EXPORT])".into()),
                };
                if u.query().is_some() {
                    return Err("nbd:// takes no query (did you mean nbd+unix://?socket=PATH)".into());
                }
                Addr::Tcp { host, port: u.port().unwrap_or(DEFAULT_PORT) }
            }
            "nbd+unix" => {
                if u.host_str().is_some_and(|h| !h.is_empty()) || u.port().is_some() {
                    return Err("nbd+unix:// takes no host: nbd+unix:///[EXPORT]?socket=PATH".into());
                }
                let mut socket = None;
                for (k, v) in u.query_pairs() {
                    match &*k {
                        "socket" if socket.is_none() => socket = Some(PathBuf::from(&*v)),
                        "socket" => return Err("socket= is given twice".into()),
                        other => return Err(format!("unknown query parameter {other:?} (nbd+unix takes socket=PATH)")),
                    }
                }
                let path = socket.filter(|p| !p.as_os_str().is_empty());
                Addr::Unix { path: path.ok_or("nbd+unix:// needs ?socket=PATH")? }
            }
            "nbds" | "nbds+unix" => return Err("TLS (nbds) is not supported".into()),
            "nbd+vsock" | "nbds+vsock" => return Err("vsock is not supported".into()),
            other => return Err(format!("scheme {other:?} is not an NBD URI (nbd:// or nbd+unix://)")),
        };
        if u.fragment().is_some() {
            return Err("an NBD URI has no #fragment".into());
        }
        Ok(Self { text: text.to_string(), addr, export })
    }
}

/// Decodes `%XX` escapes; None for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Addr {
        Addr::Tcp { host: host.into(), port }
    }

    #[test]
    fn parses_the_standard_forms() {
        for (text, addr, export) in [
            ("nbd://localhost", tcp("localhost", 10809), ""),
            ("nbd://localhost/", tcp("localhost", 10809), ""),
            ("nbd://127.0.0.1:10810/disk", tcp("127.0.0.1", 10810), "disk"),
            ("nbd://[::1]:7000/a%20b", tcp("::1", 7000), "a b"),
            ("nbd://host//abs/name", tcp("host", 10809), "/abs/name"),
            ("nbd+unix:///?socket=/tmp/s.sock", Addr::Unix { path: "/tmp/s.sock".into() }, ""),
            ("nbd+unix:///exp?socket=/run/x%20y.sock", Addr::Unix { path: "/run/x y.sock".into() }, "exp"),
            ("nbd+unix://?socket=rel.sock", Addr::Unix { path: "rel.sock".into() }, ""),
        ] {
            let u = NbdUri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((u.addr, u.export.as_str()), (addr, export), "{text}");
            assert_eq!(u.text, text);
        }
    }

    #[test]
    fn refuses_what_is_not_an_nbd_uri() {
        for (text, want) in [
            ("localhost:10809", "not an NBD URI"),
            ("nbd:///export", "needs a host"),
            ("nbd://h:99999/", "invalid port"),
            ("nbd://h/?socket=/x", "takes no query"),
            ("nbd+unix:///exp", "needs ?socket=PATH"),
            ("nbd+unix:///exp?socket=", "needs ?socket=PATH"),
            ("nbd+unix://host/exp?socket=/s", "takes no host"),
            ("nbd+unix:///?socket=/a&socket=/b", "twice"),
            ("nbd+unix:///?sock=/a", "unknown query parameter"),
            ("nbds://h/", "TLS"),
            ("nbd+vsock://1/", "vsock"),
            ("nbd://u:p@h/", "user names"),
            ("nbd://h/%zz", "percent-encoded"),
            ("nbd://h/x#frag", "fragment"),
            ("http://h/", "not an NBD URI"),
            ("", "relative URL"),
        ] {
            let e = NbdUri::parse(text).expect_err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
