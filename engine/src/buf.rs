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
}

impl BufferMode {
    pub const ALL: [BufferMode; 3] = [BufferMode::Copy, BufferMode::ZeroCopy, BufferMode::AutoReg];

    pub fn name(self) -> &'static str {
        match self {
            BufferMode::Copy => "copy",
            BufferMode::ZeroCopy => "zero-copy",
            BufferMode::AutoReg => "auto-reg",
        }
    }

    /// The device flag this mode needs (0 for copy).
    pub fn dev_flag(self) -> u64 {
        match self {
            BufferMode::Copy => 0,
            BufferMode::ZeroCopy => features::F_SUPPORT_ZERO_COPY,
            BufferMode::AutoReg => features::F_AUTO_BUF_REG,
        }
    }

    /// Whether the request's pages live in the ring's buffer table (no copy).
    pub fn is_zero_copy(self) -> bool {
        self != BufferMode::Copy
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

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufferChoice {
    /// The fastest mode the kernel offers (see [`resolve`]).
    #[default]
    Auto,
    Force(BufferMode),
}

/// Picks the buffer mode for a kernel, with the reason, or explains why a forced
/// mode cannot work here.
///
/// `auto` prefers AUTO_BUF_REG, then copy. Measured under QEMU TCG on Debian 7.2
/// (see the fast-path issue): auto-reg beats copy on every workload, and
/// REGISTER_IO_BUF zero-copy costs two extra commands per request, so it is used only
/// when asked for.
pub fn resolve(choice: BufferChoice, kernel_features: u64) -> Result<(BufferMode, String)> {
    match choice {
        BufferChoice::Force(mode) if mode.supported(kernel_features) => Ok((mode, "forced".into())),
        BufferChoice::Force(mode) => Err(Error::Config(format!(
            "buffer mode {mode} needs the ublk feature {}, which this kernel does not offer (it offers: {})",
            feature_names(mode.dev_flag()).join(" "),
            feature_names(kernel_features).join(" ")
        ))),
        BufferChoice::Auto if BufferMode::AutoReg.supported(kernel_features) => {
            Ok((BufferMode::AutoReg, "auto: the kernel offers AUTO_BUF_REG".into()))
        }
        BufferChoice::Auto => {
            Ok((BufferMode::Copy, "auto: the kernel offers no automatic buffer registration; copying".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_612: u64 = 0x1fe;
    const DEBIAN_72: u64 = 0xfffff;

    #[test]
    fn auto_picks_per_kernel() {
        assert_eq!(resolve(BufferChoice::Auto, DEBIAN_612).unwrap().0, BufferMode::Copy);
        assert_eq!(resolve(BufferChoice::Auto, DEBIAN_72).unwrap().0, BufferMode::AutoReg);
        // Zero-copy alone (6.15) is not picked by auto.
        assert_eq!(resolve(BufferChoice::Auto, DEBIAN_612 | 1).unwrap().0, BufferMode::Copy);
    }

    #[test]
    fn forced_modes_need_their_feature() {
        for mode in BufferMode::ALL {
            assert_eq!(resolve(BufferChoice::Force(mode), DEBIAN_72).unwrap().0, mode);
        }
        assert_eq!(resolve(BufferChoice::Force(BufferMode::Copy), DEBIAN_612).unwrap().0, BufferMode::Copy);
        let e = resolve(BufferChoice::Force(BufferMode::AutoReg), DEBIAN_612).unwrap_err().to_string();
        assert!(e.contains("buffer mode auto-reg needs the ublk feature AUTO_BUF_REG"), "{e}");
        let e = resolve(BufferChoice::Force(BufferMode::ZeroCopy), DEBIAN_612).unwrap_err().to_string();
        assert!(e.contains("SUPPORT_ZERO_COPY"), "{e}");
    }

    #[test]
    fn flags() {
        assert_eq!(BufferMode::Copy.dev_flag(), 0);
        assert_eq!(BufferMode::ZeroCopy.dev_flag(), 1);
        assert_eq!(BufferMode::AutoReg.dev_flag(), 1 << 11);
        assert!(!BufferMode::Copy.is_zero_copy());
    }
}
