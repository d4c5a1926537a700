//! Who has a ublk block device (or one of its partitions) open: mounts in any mount
//! namespace, swap, stacked devices (dm, md: sysfs `holders/`), and processes with it
//! among their open files. What the safe stop checks before STOP_DEV on kernels
//! without UBLK_F_SAFE_STOP_DEV, and what a refused stop names.
//!
//! It is a snapshot: something may open the device right after it was taken (the race
//! that TRY_STOP_DEV, Linux 7.0+, closes in the kernel). Opens it cannot see: a
//! process's memory mapping of the device without an open fd, and in-kernel users that
//! are not in `holders/` (a loop device backed by it is seen through `/sys/block/loop*`).

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;

/// One thing that has the device open, as a user would look for it:
/// "mounted on /mnt (ublkb0p1)", "swap", "held by dm-0", "open in process 123 (fio)".
pub type Holder = String;

/// Who has `/dev/ublkbN` or one of its partitions open now (empty: nobody the system
/// shows). The daemon serving it does not count.
pub fn device_holders(dev_id: u32) -> Vec<Holder> {
    let disk = format!("ublkb{dev_id}");
    let sys = format!("/sys/block/{disk}");
    // The disk and its partitions: (name, "major:minor").
    let mut devs = Vec::new();
    if let Ok(d) = fs::read_to_string(format!("{sys}/dev")) {
        devs.push((disk.clone(), d.trim().to_string()));
    }
    if let Ok(entries) = fs::read_dir(&sys) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&disk)
                && let Ok(d) = fs::read_to_string(e.path().join("dev"))
            {
                devs.push((name, d.trim().to_string()));
            }
        }
    }
    let mut out = Vec::new();
    for (name, _) in &devs {
        let dir = if *name == disk { format!("{sys}/holders") } else { format!("{sys}/{name}/holders") };
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                out.push(format!("held by {} ({name})", e.file_name().to_string_lossy()));
            }
        }
    }
    mounts(&devs, &mut out);
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            if let Some(path) = line.split_whitespace().next()
                && devs.iter().any(|(n, _)| path == format!("/dev/{n}"))
            {
                out.push(format!("swap on {path}"));
            }
        }
    }
    for (name, _) in &devs {
        for loopdev in loop_devices_backed_by(name) {
            out.push(format!("backing {loopdev} ({name})"));
        }
    }
    processes(&devs, &mut out);
    out
}

/// Mount points of `devs` in every mount namespace a process is in.
fn mounts(devs: &[(String, String)], out: &mut Vec<Holder>) {
    let mut seen_ns = HashSet::new();
    let mut seen = HashSet::new();
    let pids = std::iter::once("self".to_string()).chain(pid_dirs());
    for pid in pids {
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/mnt")) else { continue };
        if !seen_ns.insert(ns.ino()) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else { continue };
        for line in info.lines() {
            // id parent MAJ:MIN root mountpoint ...
            let mut f = line.split(' ');
            let (Some(majmin), Some(point)) = (f.nth(2), f.nth(1)) else { continue };
            if let Some((name, _)) = devs.iter().find(|(_, d)| d == majmin) {
                let entry = format!("mounted on {} ({name})", unescape(point));
                if seen.insert(entry.clone()) {
                    out.push(entry);
                }
            }
        }
    }
}

/// Loop devices whose backing file is `/dev/NAME`.
fn loop_devices_backed_by(name: &str) -> Vec<String> {
    let want = format!("/dev/{name}");
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let backing = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (n.starts_with("loop") && backing.trim() == want).then_some(format!("/dev/{n}"))
        })
        .collect()
}

/// Processes with one of `devs` among their open files (this process excepted).
fn processes(devs: &[(String, String)], out: &mut Vec<Holder>) {
    let me = std::process::id().to_string();
    let paths: Vec<String> = devs.iter().map(|(n, _)| format!("/dev/{n}")).collect();
    for pid in pid_dirs().filter(|p| *p != me) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        let holds = fds.flatten().find_map(|fd| {
            let target = fs::read_link(fd.path()).ok()?;
            paths.iter().find(|p| target.as_os_str() == p.as_str()).cloned()
        });
        if let Some(path) = holds {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.push(format!("open in process {pid} ({}) as {path}", comm.trim()));
        }
    }
}

fn pid_dirs() -> impl Iterator<Item = String> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
    }

    #[test]
    fn a_device_that_does_not_exist_has_no_holders() {
        assert!(device_holders(u32::MAX - 1).is_empty());
    }
}
