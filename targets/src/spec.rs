//! [`TargetSpec`]: what a target is opened from, kept in the daemon's state file so
//! that `recover` re-opens exactly the target that was served.

use std::path::PathBuf;
use std::sync::Arc;

use ubd_engine::Target;

use crate::{DirectIo, LoopOptions, LoopTarget, NullTarget};

/// A target to open, as JSON: `{"kind": "loop", "path": ..., "direct": "on", "logical_block_size": 512}`
/// or `{"kind": "null", "size": ..., "logical_block_size": 512}`.
///
/// A served target's own spec ([`LoopTarget::spec`], [`NullTarget::spec`]) pins down what
/// its options left open: a loop target's O_DIRECT (`on` or `off`, never `auto`) and
/// block size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TargetSpec {
    Loop {
        path: PathBuf,
        direct: DirectIo,
        /// None: the backing's (see [`LoopOptions::logical_block_size`]).
        logical_block_size: Option<u32>,
        /// `--read-only` (a backing found read-only is found so again). Absent in state
        /// files from before it existed, and when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
        /// Only the first SIZE bytes of the backing (see [`LoopOptions::size`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    Null {
        size: u64,
        logical_block_size: u32,
    },
    /// An NBD server's export (see [`NbdTarget`](crate::NbdTarget)).
    Nbd {
        uri: String,
        reconnect_timeout_secs: u64,
        io_timeout_secs: Option<u64>,
    },
    /// A Ceph RBD image (see [`RbdTarget`](crate::RbdTarget)).
    Rbd {
        /// `POOL/IMAGE[@SNAP]`.
        image: String,
        conf: Option<PathBuf>,
        id: Option<String>,
        keyring: Option<PathBuf>,
        cluster: Option<String>,
        io_timeout_secs: Option<u64>,
        /// `--ceph-option NAME=VALUE`s, set on the client after the configuration.
        #[serde(default)]
        options: Vec<(String, String)>,
    },
    /// The socket-RAM test target: its data lived in the dead daemon, so it is not
    /// recoverable (opening it again is refused).
    SockRam {
        size: u64,
        logical_block_size: u32,
    },
    /// The in-memory zoned target (see [`ZonedTarget`](crate::ZonedTarget)): its data
    /// lived in the dead daemon, so it is not recoverable either.
    Zoned {
        size: u64,
        zone_size: u64,
        conventional: u32,
        max_open: u32,
        max_active: u32,
        logical_block_size: u32,
    },
}

impl TargetSpec {
    /// Opens the target.
    pub fn open(&self) -> ubd_engine::Result<Arc<dyn Target>> {
        Ok(match self {
            TargetSpec::Loop { path, direct, logical_block_size, read_only, size } => {
                let opts = LoopOptions {
                    direct: *direct,
                    logical_block_size: *logical_block_size,
                    read_only: *read_only,
                    size: *size,
                };
                Arc::new(LoopTarget::open(path, &opts)?)
            }
            TargetSpec::Null { size, logical_block_size } => Arc::new(NullTarget::new(*size, *logical_block_size)),
            TargetSpec::Nbd { uri, reconnect_timeout_secs, io_timeout_secs } => {
                let opts = crate::NbdOptions {
                    reconnect_timeout: std::time::Duration::from_secs(*reconnect_timeout_secs),
                    io_timeout: io_timeout_secs.map(std::time::Duration::from_secs),
                    ..Default::default()
                };
                // The device has its queues: each opens its own connection.
                Arc::new(crate::NbdTarget::open(uri, &opts, 1).map_err(ubd_engine::Error::Config)?)
            }
            TargetSpec::Rbd { image, conf, id, keyring, cluster, io_timeout_secs, options } => {
                let opts = crate::RbdOptions {
                    conf: conf.clone(),
                    id: id.clone(),
                    keyring: keyring.clone(),
                    cluster: cluster.clone(),
                    io_timeout: io_timeout_secs.map(std::time::Duration::from_secs),
                    connect_timeout: None,
                    options: options.clone(),
                };
                Arc::new(crate::RbdTarget::open(image, &opts).map_err(ubd_engine::Error::Config)?)
            }
            TargetSpec::SockRam { .. } => {
                return Err(ubd_engine::Error::Config(
                    "the sockram test target kept its data in the daemon that died: it cannot be recovered (delete the device with `ubd-engine del`)".into(),
                ));
            }
            TargetSpec::Zoned { .. } => {
                return Err(ubd_engine::Error::Config(
                    "the zoned target kept its zones in memory in the daemon that died: it cannot be recovered (delete the device with `ubd-engine del`)".into(),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(spec: &TargetSpec) -> serde_json::Value {
        let json = serde_json::to_value(spec).unwrap();
        assert_eq!(&serde_json::from_value::<TargetSpec>(json.clone()).unwrap(), spec);
        assert_eq!(&serde_json::from_str::<TargetSpec>(&serde_json::to_string_pretty(spec).unwrap()).unwrap(), spec);
        json
    }

    #[test]
    fn json_round_trip() {
        let null = TargetSpec::Null { size: 1 << 30, logical_block_size: 4096 };
        assert_eq!(
            round_trip(&null),
            serde_json::json!({ "kind": "null", "size": 1u64 << 30, "logical_block_size": 4096 })
        );
        let lp = TargetSpec::Loop {
            path: "/dev/nvme0n1".into(),
            direct: DirectIo::On,
            logical_block_size: Some(512),
            read_only: false,
            size: None,
        };
        assert_eq!(
            round_trip(&lp),
            serde_json::json!({ "kind": "loop", "path": "/dev/nvme0n1", "direct": "on", "logical_block_size": 512 })
        );
        let limited = TargetSpec::Loop {
            path: "/dev/ram0".into(),
            direct: DirectIo::On,
            logical_block_size: Some(512),
            read_only: true,
            size: Some(1 << 27),
        };
        assert_eq!(round_trip(&limited)["read_only"], true);
        assert_eq!(round_trip(&limited)["size"], 1u64 << 27);
        for direct in [DirectIo::Auto, DirectIo::Off] {
            round_trip(&TargetSpec::Loop {
                path: "/x.img".into(),
                direct,
                logical_block_size: None,
                read_only: false,
                size: None,
            });
        }
        let e = serde_json::from_str::<TargetSpec>(r#"{"kind": "nfs", "host": "h"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `nfs`"), "{e}");
        let nbd =
            TargetSpec::Nbd { uri: "nbd://127.0.0.1/x".into(), reconnect_timeout_secs: 60, io_timeout_secs: None };
        assert_eq!(
            round_trip(&nbd),
            serde_json::json!({ "kind": "nbd", "uri": "nbd://127.0.0.1/x", "reconnect_timeout_secs": 60, "io_timeout_secs": null })
        );
        let rbd = TargetSpec::Rbd {
            image: "rbd/img@s1".into(),
            conf: Some("/etc/ceph/x.conf".into()),
            id: Some("csi".into()),
            keyring: None,
            cluster: None,
            io_timeout_secs: Some(30),
            options: vec![("rbd_cache".into(), "false".into())],
        };
        round_trip(&rbd);
        // A state file written before options existed still opens.
        let old = r#"{"kind": "rbd", "image": "rbd/x", "conf": null, "id": null, "keyring": null, "cluster": null, "io_timeout_secs": null}"#;
        let TargetSpec::Rbd { options, .. } = serde_json::from_str::<TargetSpec>(old).unwrap() else { panic!() };
        assert!(options.is_empty());
        let e = serde_json::from_str::<TargetSpec>(r#"{"kind": "null", "logical_block_size": 512}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `size`"), "{e}");
    }

    #[test]
    fn null_spec_reopens() {
        let t = NullTarget::new(1 << 30, 4096);
        let again = round_trip(&t.spec());
        let reopened = serde_json::from_value::<TargetSpec>(again).unwrap().open().unwrap();
        assert_eq!(reopened.name(), "null");
        assert_eq!(reopened.info(), t.info());
    }

    #[test]
    fn loop_spec_reopens_with_the_same_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
        let served = [
            LoopOptions::default(),
            LoopOptions { direct: DirectIo::Off, logical_block_size: Some(4096), ..Default::default() },
            LoopOptions { direct: DirectIo::Off, logical_block_size: None, ..Default::default() },
        ];
        for opts in served {
            let t = LoopTarget::open(&path, &opts).unwrap();
            let spec = t.spec();
            let TargetSpec::Loop { path: p, direct, logical_block_size, .. } = &spec else { panic!("{spec:?}") };
            assert_eq!(p, &path);
            assert_eq!(*direct, if t.direct_io() { DirectIo::On } else { DirectIo::Off });
            assert_eq!(*logical_block_size, Some(t.info().logical_block_size));
            let spec: TargetSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
            let reopened = spec.open().unwrap();
            assert_eq!(reopened.name(), "loop");
            assert_eq!(reopened.info(), t.info(), "{opts:?}");
            assert_eq!(reopened.describe(), t.describe(), "{opts:?}");
        }
    }
}
