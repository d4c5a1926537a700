//! The small per-device state file the engine keeps under /run while it serves.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ubd_engine::RingMode;
use ubd_targets::TargetSpec;

/// Root's state directory. Another user's is `$XDG_RUNTIME_DIR/ubd-engine`, or
/// `/tmp/ubd-engine-UID` without one ([`dir`]).
pub const STATE_DIR: &str = "/run/ubd-engine";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub dev_id: u32,
    pub pid: i32,
    /// The target's name and `describe()`, for `list` and `stats`.
    pub target: String,
    pub target_info: serde_json::Value,
    /// What `recover` re-opens (the target without its faults).
    pub target_spec: TargetSpec,
    pub block_path: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub cpus: Vec<Option<Vec<usize>>>,
    pub buffer_mode: String,
    pub ring: Option<RingMode>,
    /// Pages behind the copy-mode buffers.
    pub pages: Option<String>,
    /// The shared memory the device serves from (SHMEM_ZC), with its registration.
    #[serde(default)]
    pub shmem: Option<ubd_engine::ShmemReport>,
    /// The serving process's arguments, for `upgrade` to start its successor with.
    #[serde(default)]
    pub argv: Vec<String>,
    /// `ubd-engine VERSION` of the serving process.
    #[serde(default)]
    pub version: String,
}

/// This user's state directory: [`STATE_DIR`] for root; for others (who serve
/// unprivileged devices) `$XDG_RUNTIME_DIR/ubd-engine`, else `/tmp/ubd-engine-UID`.
pub fn dir() -> PathBuf {
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        return PathBuf::from(STATE_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("ubd-engine"),
        _ => PathBuf::from(format!("/tmp/ubd-engine-{uid}")),
    }
}

pub fn path(dev_id: u32) -> PathBuf {
    dir().join(format!("{dev_id}.json"))
}

/// Creates this user's state directory (0700 for users other than root), and makes sure
/// it is this user's own: a directory someone else made in /tmp is refused.
fn make_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let d = dir();
    let uid = rustix::process::geteuid().as_raw();
    std::fs::DirBuilder::new().recursive(true).mode(if uid == 0 { 0o755 } else { 0o700 }).create(&d)?;
    let m = std::fs::symlink_metadata(&d)?;
    if !m.is_dir() || m.uid() != uid || (uid != 0 && m.mode() & 0o077 != 0) {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of uid {uid}'s own (mode 0700): refusing to keep state there",
            d.display()
        )));
    }
    Ok(d)
}

pub fn write(state: &DeviceState) -> std::io::Result<()> {
    make_dir()?;
    let tmp = path(state.dev_id).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(tmp, path(state.dev_id))
}

/// The state file of `dev_id`: None when there is none, an error naming the file when
/// it cannot be read or is not one this ubd-engine writes.
///
/// Root, whose own directory does not have it, looks in the directories of the users who
/// serve unprivileged devices ([`user_dirs`]).
pub fn read(dev_id: u32) -> anyhow::Result<Option<DeviceState>> {
    if let Some(st) = read_file(&path(dev_id))? {
        return Ok(Some(st));
    }
    if rustix::process::geteuid().as_raw() != 0 {
        return Ok(None);
    }
    for d in user_dirs() {
        if let Some(st) = read_file(&d.join(format!("{dev_id}.json")))? {
            return Ok(Some(st));
        }
    }
    Ok(None)
}

/// For root: the state directories of other users (`/run/user/UID/ubd-engine`,
/// `/tmp/ubd-engine-UID`), each only if it is a directory its user owns and only they
/// can write, so that nobody can plant a state file for someone else's device.
pub fn user_dirs() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let owned_by = |p: &Path, uid: u32| {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
    };
    for e in std::fs::read_dir("/run/user").into_iter().flatten().flatten() {
        if let Some(uid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            let d = e.path().join("ubd-engine");
            if owned_by(&e.path(), uid) && owned_by(&d, uid) {
                out.push(d);
            }
        }
    }
    for e in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
        let name = e.file_name();
        if let Some(uid) = name.to_str().and_then(|n| n.strip_prefix("ubd-engine-")).and_then(|n| n.parse::<u32>().ok())
            && owned_by(&e.path(), uid)
        {
            out.push(e.path());
        }
    }
    out
}

fn read_file(path: &Path) -> anyhow::Result<Option<DeviceState>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read state file {}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).with_context(|| format!("bad state file {}", path.display()))
}

pub fn remove(dev_id: u32) {
    let _ = std::fs::remove_file(path(dev_id));
    let _ = std::fs::remove_file(stats_path(dev_id));
}

/// The stats file next to the state file that [`read`] finds (this user's by default).
pub fn stats_path(dev_id: u32) -> PathBuf {
    let own = dir().join(format!("{dev_id}.stats.json"));
    if own.exists() || rustix::process::geteuid().as_raw() != 0 {
        return own;
    }
    user_dirs().into_iter().map(|d| d.join(format!("{dev_id}.stats.json"))).find(|p| p.exists()).unwrap_or(own)
}

/// Replaces the stats file atomically (readers never see half a file).
pub fn write_stats(stats: &ubd_engine::DeviceStats) -> std::io::Result<()> {
    let own = dir().join(format!("{}.stats.json", stats.dev_id));
    let tmp = own.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(stats)?)?;
    std::fs::rename(tmp, own)
}

pub fn read_stats(dev_id: u32) -> anyhow::Result<ubd_engine::DeviceStats> {
    Ok(serde_json::from_slice(&std::fs::read(stats_path(dev_id))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        DeviceState {
            dev_id: 3,
            pid: 1234,
            target: "loop".into(),
            target_info: serde_json::json!({ "path": "/tmp/disk.img", "direct_io": true }),
            target_spec: TargetSpec::Loop {
                path: "/tmp/disk.img".into(),
                direct: ubd_targets::DirectIo::On,
                logical_block_size: Some(4096),
                read_only: false,
                size: None,
            },
            block_path: "/dev/ublkb3".into(),
            queues: 2,
            depth: 128,
            cpus: vec![Some(vec![0]), None],
            buffer_mode: "copy".into(),
            ring: Some(RingMode::CoopTaskrun),
            pages: Some("2 MiB hugepages".into()),
            shmem: None,
            argv: vec!["--queues=2".into(), "loop".into(), "/tmp/disk.img".into()],
            version: "ubd-engine 0.1.0".into(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("3.json");
        assert!(read_file(&p).unwrap().is_none());
        let st = sample();
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["ring"], "coop-taskrun");
        assert_eq!(json["target_spec"]["kind"], "loop");
        assert_eq!(json["target_spec"]["direct"], "on");
        std::fs::write(&p, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
        let back = read_file(&p).unwrap().unwrap();
        assert_eq!(back.target_spec, st.target_spec);
        assert_eq!(back.ring, st.ring);
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
    }

    #[test]
    fn bad_files_name_the_file_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("3.json");
        let mut json = serde_json::to_value(sample()).unwrap();
        json["target_spec"] = serde_json::json!({ "kind": "nfs", "host": "h" });
        let cases = [
            b"{ not json".to_vec(),
            serde_json::to_vec_pretty(&json).unwrap(),
            br#"{"dev_id": 3, "target": "loop", "target_info": {"path": "/x"}}"#.to_vec(),
        ];
        for (bytes, what) in cases.iter().zip(["key must be a string", "unknown variant `nfs`", "missing field"]) {
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", read_file(&p).unwrap_err());
            assert!(e.starts_with(&format!("bad state file {}: ", p.display())), "{e}");
            assert!(e.contains(what), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = format!("{:#}", read_file(dir.path()).unwrap_err());
        assert!(e.starts_with(&format!("cannot read state file {}: ", dir.path().display())), "{e}");
    }
}
