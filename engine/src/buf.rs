//! Buffer modes: how request data moves between the kernel and the target.

use crate::error::{Error, Result};
use crate::sys::features::{self, feature_names};

/// How a request's data reaches the target's IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BufferMode {
    /// The kernel copies data between the request and a per-tag buffer of ours
    /// (registered with the ring as a fixed buffer). Works on every kernel.
    Copy,
    /// `UBLK_F_SUPPORT_ZERO_COPY`: we register the request's own pages in the ring's
    /// buffer table (REGISTER_IO_BUF, linked before the target IO) and unregister them
    /// before committing. Linux 6.15+.
    ZeroCopy,
    /// `UBLK_F_AUTO_BUF_REG`: the kernel registers the request's pages in the ring's
    /// buffer table before delivering it and unregisters them at commit. Linux 6.16+.
    AutoReg,
    /// `UBLK_F_USER_COPY` (Linux 6.5+), for targets that never touch request data
    /// (null): the driver copies nothing (a server would pread/pwrite `/dev/ublkcN` to
    /// move data, and these targets never do). No buffers, no buffer table: target
    /// reads and writes are refused. Shown as `none`.
    #[serde(rename = "none")]
    NoData,
    /// `UBLK_F_USER_COPY` (Linux 6.5+) for targets that move data: the queue copies a
    /// write's data from `/dev/ublkcN` into its per-tag buffer before the target sees the
    /// request, and a read's data back after, with a read or write SQE on the char device
    /// at the request's offset (in the same ring as everything else). The kernel copies
    /// nothing itself. What the INTEGRITY feature and the zoned target need.
    UserCopy,
}

impl BufferMode {
    /// The modes a target that moves data can use.
    pub const ALL: [BufferMode; 4] =
        [BufferMode::Copy, BufferMode::ZeroCopy, BufferMode::AutoReg, BufferMode::UserCopy];

    pub fn name(self) -> &'static str {
        match self {
            BufferMode::Copy => "copy",
            BufferMode::ZeroCopy => "zero-copy",
            BufferMode::AutoReg => "auto-reg",
            BufferMode::NoData => "none",
            BufferMode::UserCopy => "user-copy",
        }
    }

    /// The name with what it means, for people (startup log, `stats`).
    pub fn label(self) -> &'static str {
        match self {
            BufferMode::NoData => "none (no data moved: UBLK_F_USER_COPY)",
            other => other.name(),
        }
    }

    /// The mode named `name` (as [`name`](Self::name) spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        [BufferMode::Copy, BufferMode::ZeroCopy, BufferMode::AutoReg, BufferMode::NoData, BufferMode::UserCopy]
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// The mode a device was created in, from its flags (for `recover`). USER_COPY is
    /// `user-copy` for a target that moves data, `none` for one that does not.
    pub fn from_dev_flags(flags: u64, moves_data: bool) -> Self {
        if flags & features::F_AUTO_BUF_REG != 0 {
            BufferMode::AutoReg
        } else if flags & features::F_SUPPORT_ZERO_COPY != 0 {
            BufferMode::ZeroCopy
        } else if flags & features::F_USER_COPY != 0 && moves_data {
            BufferMode::UserCopy
        } else if flags & features::F_USER_COPY != 0 {
            BufferMode::NoData
        } else {
            BufferMode::Copy
        }
    }

    /// The first Linux version with this mode's feature.
    pub fn since(self) -> &'static str {
        match self {
            BufferMode::Copy => "6.0",
            BufferMode::ZeroCopy => "6.15",
            BufferMode::AutoReg => "6.16",
            BufferMode::NoData | BufferMode::UserCopy => "6.5",
        }
    }

    /// The device flag this mode needs (0 for copy).
    pub fn dev_flag(self) -> u64 {
        match self {
            BufferMode::Copy => 0,
            BufferMode::ZeroCopy => features::F_SUPPORT_ZERO_COPY,
            BufferMode::AutoReg => features::F_AUTO_BUF_REG,
            BufferMode::NoData | BufferMode::UserCopy => features::F_USER_COPY,
        }
    }

    /// Whether the request's pages live in the ring's buffer table (no copy).
    pub fn is_zero_copy(self) -> bool {
        matches!(self, BufferMode::ZeroCopy | BufferMode::AutoReg)
    }

    /// Whether the queue needs per-tag buffers of its own (copy and user-copy): the
    /// request's data is in memory of ours while the target works on it.
    pub fn needs_buffers(self) -> bool {
        matches!(self, BufferMode::Copy | BufferMode::UserCopy)
    }

    /// Whether target reads and writes have a buffer to use (every mode but `none`).
    pub fn moves_data(self) -> bool {
        self != BufferMode::NoData
    }

    /// Is this mode offered by a kernel with these feature bits?
    pub fn supported(self, kernel_features: u64) -> bool {
        kernel_features & self.dev_flag() == self.dev_flag()
    }
}

impl std::fmt::Display for BufferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The [`name`](BufferMode::name)s.
#[cfg(feature = "clap")]
impl clap::ValueEnum for BufferMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[BufferMode::Copy, BufferMode::ZeroCopy, BufferMode::AutoReg, BufferMode::UserCopy, BufferMode::NoData]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufferChoice {
    /// The fastest mode the kernel offers for the target (copy, or auto-reg where the
    /// kernel has AUTO_BUF_REG; `none` for a target that never touches data).
    #[default]
    Auto,
    Force(BufferMode),
}

/// `auto`, then the [`BufferMode`] names.
#[cfg(feature = "clap")]
impl clap::ValueEnum for BufferChoice {
    fn value_variants<'a>() -> &'a [Self] {
        use BufferMode::{AutoReg, Copy, NoData, UserCopy, ZeroCopy};
        &[
            BufferChoice::Auto,
            Self::Force(Copy),
            Self::Force(ZeroCopy),
            Self::Force(AutoReg),
            Self::Force(UserCopy),
            Self::Force(NoData),
        ]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self {
            BufferChoice::Auto => Some(clap::builder::PossibleValue::new("auto")),
            BufferChoice::Force(mode) => mode.to_possible_value(),
        }
    }
}

/// Picks the buffer mode for a kernel and a target, with the reason, or explains why
/// a forced mode cannot work here.
///
/// A target that never touches request data (`moves_data` false: null) gets `none`
/// (USER_COPY: the driver copies nothing, as null_blk moves nothing) where the kernel
/// offers it. Otherwise `auto` prefers AUTO_BUF_REG, then copy. Measured under QEMU
/// TCG on Debian 7.2 (see the fast-path issue): auto-reg beats copy on every workload,
/// and REGISTER_IO_BUF zero-copy costs two extra commands per request, so it is used
/// only when asked for. A target whose data IO cannot use the request's own pages
/// (`zero_copy` false: it sends request data over a socket) gets copy, and the
/// zero-copy modes are refused for it. `target` names the target in messages.
pub(crate) fn resolve(
    choice: BufferChoice,
    kernel_features: u64,
    moves_data: bool,
    zero_copy: bool,
    target: &str,
) -> Result<(BufferMode, String)> {
    match choice {
        BufferChoice::Force(mode) if mode.is_zero_copy() && !zero_copy => Err(Error::Config(format!(
            "buffer mode {mode} keeps request data in the kernel's pages, which the {target} target cannot reach (it moves data through a socket or a library): use buffer mode copy"
        ))),
        BufferChoice::Force(BufferMode::NoData) if moves_data => Err(Error::Config(format!(
            "buffer mode none moves no request data, so it serves only targets that never touch it (null); the {target} target reads and writes data"
        ))),
        BufferChoice::Force(mode) if mode.supported(kernel_features) => Ok((mode, "forced".into())),
        BufferChoice::Force(mode) => Err(Error::Config(format!(
            "buffer mode {mode} needs the ublk feature {} (Linux {}+), which this kernel does not offer (it offers: {})",
            feature_names(mode.dev_flag()).join(" "),
            mode.since(),
            feature_names(kernel_features).join(" ")
        ))),
        BufferChoice::Auto if !moves_data && BufferMode::NoData.supported(kernel_features) => Ok((
            BufferMode::NoData,
            format!("auto: the {target} target never touches request data and the kernel offers USER_COPY"),
        )),
        BufferChoice::Auto if !zero_copy => Ok((
            BufferMode::Copy,
            format!(
                "auto: the {target} target moves request data through memory of its own (a socket, a library); copying"
            ),
        )),
        BufferChoice::Auto if BufferMode::AutoReg.supported(kernel_features) => {
            Ok((BufferMode::AutoReg, "auto: the kernel offers AUTO_BUF_REG".into()))
        }
        BufferChoice::Auto => {
            Ok((BufferMode::Copy, "auto: the kernel offers no automatic buffer registration; copying".into()))
        }
    }
}

/// The buffer mode of an unprivileged device (UBLK_F_UNPRIVILEGED_DEV): copy, the only
/// one the kernel allows there (it refuses USER_COPY, zero-copy and AUTO_BUF_REG for
/// unprivileged devices: those reach the kernel's request pages). A forced other mode is
/// refused in one line.
pub(crate) fn resolve_unprivileged(choice: BufferChoice) -> Result<(BufferMode, String)> {
    match choice {
        BufferChoice::Auto | BufferChoice::Force(BufferMode::Copy) => Ok((
            BufferMode::Copy,
            "an unprivileged device: the kernel gives request pages only to privileged servers; copying".into(),
        )),
        BufferChoice::Force(mode) => Err(Error::Config(format!(
            "buffer mode {mode} is not allowed on an unprivileged device (the kernel gives request pages to privileged servers only): use buffer mode copy, or run as root"
        ))),
    }
}

/// The buffer mode of a zoned device: user-copy (USER_COPY, 6.5+), the one mode in
/// which zone appends and zone reports reach the server (the kernel copies only plain
/// writes into a copy-mode buffer, and 6.12 allows ZONED only with USER_COPY).
pub(crate) fn resolve_zoned(choice: BufferChoice, kernel_features: u64) -> Result<(BufferMode, String)> {
    match choice {
        BufferChoice::Auto | BufferChoice::Force(BufferMode::UserCopy)
            if BufferMode::UserCopy.supported(kernel_features) =>
        {
            Ok((BufferMode::UserCopy, "a zoned device: zone appends and reports move through the char device".into()))
        }
        BufferChoice::Auto | BufferChoice::Force(BufferMode::UserCopy) => Err(Error::Config(
            "a zoned device needs buffer mode user-copy, which needs the ublk feature USER_COPY (Linux 6.5+), which this kernel does not offer".into(),
        )),
        BufferChoice::Force(mode) => Err(Error::Config(format!(
            "buffer mode {mode} cannot serve a zoned device (zone appends and zone reports move only in user-copy): use buffer mode user-copy"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_612: u64 = 0x1fe;
    const DEBIAN_72: u64 = 0xfffff;

    /// For a target that moves data (loop).
    fn data(choice: BufferChoice, kernel_features: u64) -> Result<(BufferMode, String)> {
        resolve(choice, kernel_features, true, true, "loop")
    }

    /// For a target that never touches data (null).
    fn no_data(choice: BufferChoice, kernel_features: u64) -> Result<(BufferMode, String)> {
        resolve(choice, kernel_features, false, true, "null")
    }

    #[test]
    fn zoned_devices_user_copy() {
        assert_eq!(resolve_zoned(BufferChoice::Auto, DEBIAN_612).unwrap().0, BufferMode::UserCopy);
        assert_eq!(
            resolve_zoned(BufferChoice::Force(BufferMode::UserCopy), DEBIAN_72).unwrap().0,
            BufferMode::UserCopy
        );
        let e = resolve_zoned(BufferChoice::Force(BufferMode::Copy), DEBIAN_72).unwrap_err().to_string();
        assert!(e.contains("buffer mode copy cannot serve a zoned device"), "{e}");
        let e = resolve_zoned(BufferChoice::Auto, DEBIAN_612 & !features::F_USER_COPY).unwrap_err().to_string();
        assert!(e.contains("USER_COPY (Linux 6.5+)"), "{e}");
    }

    #[test]
    fn unprivileged_devices_copy() {
        assert_eq!(resolve_unprivileged(BufferChoice::Auto).unwrap().0, BufferMode::Copy);
        assert_eq!(resolve_unprivileged(BufferChoice::Force(BufferMode::Copy)).unwrap().0, BufferMode::Copy);
        for mode in [BufferMode::ZeroCopy, BufferMode::AutoReg, BufferMode::NoData] {
            let e = resolve_unprivileged(BufferChoice::Force(mode)).unwrap_err().to_string();
            assert!(e.contains("not allowed on an unprivileged device"), "{e}");
        }
    }

    #[test]
    fn auto_picks_per_kernel() {
        assert_eq!(data(BufferChoice::Auto, DEBIAN_612).unwrap().0, BufferMode::Copy);
        assert_eq!(data(BufferChoice::Auto, DEBIAN_72).unwrap().0, BufferMode::AutoReg);
        // Zero-copy alone (6.15) is not picked by auto.
        assert_eq!(data(BufferChoice::Auto, DEBIAN_612 | 1).unwrap().0, BufferMode::Copy);
    }

    #[test]
    fn auto_moves_nothing_for_a_target_that_never_touches_data() {
        let (mode, why) = no_data(BufferChoice::Auto, DEBIAN_612).unwrap();
        assert_eq!(mode, BufferMode::NoData);
        assert!(why.contains("null target never touches request data"), "{why}");
        assert_eq!(no_data(BufferChoice::Auto, DEBIAN_72).unwrap().0, BufferMode::NoData);
        // A kernel without USER_COPY (before 6.5): the usual choice.
        let old = DEBIAN_612 & !features::F_USER_COPY;
        assert_eq!(no_data(BufferChoice::Auto, old).unwrap().0, BufferMode::Copy);
        // A target that moves data never gets `none` from auto.
        assert_ne!(data(BufferChoice::Auto, DEBIAN_612).unwrap().0, BufferMode::NoData);
    }

    #[test]
    fn forced_modes_need_their_feature() {
        for mode in BufferMode::ALL {
            assert_eq!(data(BufferChoice::Force(mode), DEBIAN_72).unwrap().0, mode);
            // A forced mode stays forced for null too (tuning studies).
            assert_eq!(no_data(BufferChoice::Force(mode), DEBIAN_72).unwrap(), (mode, "forced".into()));
        }
        assert_eq!(data(BufferChoice::Force(BufferMode::Copy), DEBIAN_612).unwrap().0, BufferMode::Copy);
        assert_eq!(no_data(BufferChoice::Force(BufferMode::Copy), DEBIAN_612).unwrap().0, BufferMode::Copy);
        let e = data(BufferChoice::Force(BufferMode::AutoReg), DEBIAN_612).unwrap_err().to_string();
        assert!(e.contains("buffer mode auto-reg needs the ublk feature AUTO_BUF_REG"), "{e}");
        let e = data(BufferChoice::Force(BufferMode::ZeroCopy), DEBIAN_612).unwrap_err().to_string();
        assert!(e.contains("SUPPORT_ZERO_COPY"), "{e}");
    }

    #[test]
    fn a_target_without_zero_copy_gets_copy() {
        let sock = |choice| resolve(choice, DEBIAN_72, true, false, "sockram");
        let (mode, why) = sock(BufferChoice::Auto).unwrap();
        assert_eq!(mode, BufferMode::Copy);
        assert!(why.contains("sockram target moves request data through memory of its own"), "{why}");
        assert_eq!(sock(BufferChoice::Force(BufferMode::Copy)).unwrap().0, BufferMode::Copy);
        for mode in [BufferMode::ZeroCopy, BufferMode::AutoReg] {
            let e = sock(BufferChoice::Force(mode)).unwrap_err().to_string();
            assert!(e.contains("the sockram target cannot reach (it moves data through a socket or a library): use buffer mode copy"), "{e}");
        }
    }

    #[test]
    fn forced_none() {
        for k in [DEBIAN_612, DEBIAN_72] {
            assert_eq!(no_data(BufferChoice::Force(BufferMode::NoData), k).unwrap().0, BufferMode::NoData);
            let e = data(BufferChoice::Force(BufferMode::NoData), k).unwrap_err().to_string();
            assert!(e.contains("buffer mode none") && e.contains("the loop target reads and writes data"), "{e}");
            assert!(!e.contains('\n'));
        }
        let old = DEBIAN_612 & !features::F_USER_COPY;
        let e = no_data(BufferChoice::Force(BufferMode::NoData), old).unwrap_err().to_string();
        assert!(e.contains("buffer mode none needs the ublk feature USER_COPY"), "{e}");
    }

    #[test]
    fn modes_from_device_flags() {
        use features::*;
        assert_eq!(BufferMode::from_dev_flags(F_CMD_IOCTL_ENCODE | F_USER_RECOVERY, true), BufferMode::Copy);
        for mode in
            [BufferMode::Copy, BufferMode::ZeroCopy, BufferMode::AutoReg, BufferMode::NoData, BufferMode::UserCopy]
        {
            let flags = F_CMD_IOCTL_ENCODE | F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_BATCH_IO | mode.dev_flag();
            // USER_COPY is user-copy for a target that moves data, none for one that does not.
            assert_eq!(BufferMode::from_dev_flags(flags, mode != BufferMode::NoData), mode);
            assert_eq!(BufferMode::from_name(mode.name()), Some(mode));
        }
        assert_eq!(BufferMode::from_name("auto"), None);
    }

    #[test]
    fn flags() {
        assert_eq!(BufferMode::Copy.dev_flag(), 0);
        assert_eq!(BufferMode::ZeroCopy.dev_flag(), 1);
        assert_eq!(BufferMode::AutoReg.dev_flag(), 1 << 11);
        assert!(!BufferMode::Copy.is_zero_copy());
        assert_eq!(BufferMode::NoData.dev_flag(), 1 << 7);
        assert!(!BufferMode::NoData.is_zero_copy() && !BufferMode::NoData.needs_buffers());
        assert!(!BufferMode::NoData.moves_data() && BufferMode::Copy.moves_data());
        assert_eq!(BufferMode::NoData.to_string(), "none");
        assert_eq!(BufferMode::NoData.label(), "none (no data moved: UBLK_F_USER_COPY)");
        assert_eq!(serde_json::to_value(BufferMode::NoData).unwrap(), "none");
        assert_eq!(serde_json::to_value(BufferMode::ZeroCopy).unwrap(), "zero-copy");
    }
}
