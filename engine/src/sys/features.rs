//! ublk feature bits (`UBLK_F_*`) with their names, for `features` and startup reports.

/// (bit, name) for every feature bit the engine knows by name.
pub const FEATURE_NAMES: &[(u32, &str)] = &[
    (0, "SUPPORT_ZERO_COPY"),
    (1, "URING_CMD_COMP_IN_TASK"),
    (2, "NEED_GET_DATA"),
    (3, "USER_RECOVERY"),
    (4, "USER_RECOVERY_REISSUE"),
    (5, "UNPRIVILEGED_DEV"),
    (6, "CMD_IOCTL_ENCODE"),
    (7, "USER_COPY"),
    (8, "ZONED"),
    (9, "USER_RECOVERY_FAIL_IO"),
    (10, "UPDATE_SIZE"),
    (11, "AUTO_BUF_REG"),
    (12, "QUIESCE"),
    (13, "PER_IO_DAEMON"),
    (14, "BUF_REG_OFF_DAEMON"),
    (15, "BATCH_IO"),
    (16, "INTEGRITY"),
    (17, "SAFE_STOP_DEV"),
    (18, "NO_AUTO_PART_SCAN"),
    (19, "SHMEM_ZC"),
];

pub const F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const F_UNPRIVILEGED_DEV: u64 = 1 << 5;
pub const F_USER_COPY: u64 = 1 << 7;
pub const F_ZONED: u64 = 1 << 8;
pub const F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
pub const F_UPDATE_SIZE: u64 = 1 << 10;
pub const F_AUTO_BUF_REG: u64 = 1 << 11;
pub const F_QUIESCE: u64 = 1 << 12;
pub const F_PER_IO_DAEMON: u64 = 1 << 13;
pub const F_BATCH_IO: u64 = 1 << 15;
pub const F_SAFE_STOP_DEV: u64 = 1 << 17;
pub const F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
pub const F_SHMEM_ZC: u64 = 1 << 19;

/// Names of the bits set in `mask`; unknown bits are shown as `BIT<n>`.
pub fn feature_names(mask: u64) -> Vec<String> {
    (0..64u32)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| match FEATURE_NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => (*name).to_string(),
            None => format!("BIT{bit}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_debian_612_mask() {
        // Debian 6.12 was seen to return 0x1fe.
        let names = feature_names(0x1fe);
        assert_eq!(
            names,
            [
                "URING_CMD_COMP_IN_TASK",
                "NEED_GET_DATA",
                "USER_RECOVERY",
                "USER_RECOVERY_REISSUE",
                "UNPRIVILEGED_DEV",
                "CMD_IOCTL_ENCODE",
                "USER_COPY",
                "ZONED"
            ]
        );
        assert_eq!(feature_names(1 << 40), ["BIT40"]);
        assert!(feature_names(0).is_empty());
    }

    #[test]
    fn constants_agree_with_table() {
        for (mask, name) in [
            (F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
            (F_USER_COPY, "USER_COPY"),
            (F_AUTO_BUF_REG, "AUTO_BUF_REG"),
            (F_BATCH_IO, "BATCH_IO"),
            (F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
        ] {
            assert_eq!(feature_names(mask), [name]);
        }
    }
}
