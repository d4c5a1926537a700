//! The small per-device state file the engine keeps under /run while it serves.

use std::path::PathBuf;

pub const STATE_DIR: &str = "/run/ubd-engine";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub dev_id: u32,
    pub pid: i32,
    pub target: String,
    pub target_info: serde_json::Value,
    pub block_path: PathBuf,
    pub queues: u16,
    pub depth: u16,
    pub cpus: Vec<Option<Vec<usize>>>,
    pub buffer_mode: String,
    pub ring: Option<serde_json::Value>,
    /// Pages behind the copy-mode buffers.
    pub pages: Option<String>,
}

pub fn path(dev_id: u32) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{dev_id}.json"))
}

pub fn write(state: &DeviceState) -> std::io::Result<()> {
    std::fs::create_dir_all(STATE_DIR)?;
    let tmp = path(state.dev_id).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(tmp, path(state.dev_id))
}

pub fn read(dev_id: u32) -> Option<DeviceState> {
    serde_json::from_slice(&std::fs::read(path(dev_id)).ok()?).ok()
}

pub fn remove(dev_id: u32) {
    let _ = std::fs::remove_file(path(dev_id));
    let _ = std::fs::remove_file(stats_path(dev_id));
}

pub fn stats_path(dev_id: u32) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{dev_id}.stats.json"))
}

/// Replaces the stats file atomically (readers never see half a file).
pub fn write_stats(stats: &ubd_engine::DeviceStats) -> std::io::Result<()> {
    let tmp = stats_path(stats.dev_id).with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(stats)?)?;
    std::fs::rename(tmp, stats_path(stats.dev_id))
}

pub fn read_stats(dev_id: u32) -> anyhow::Result<ubd_engine::DeviceStats> {
    Ok(serde_json::from_slice(&std::fs::read(stats_path(dev_id))?)?)
}
