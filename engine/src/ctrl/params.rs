//! Builds and checks `ublk_params` from a target's description.

use crate::error::{Error, Result};
use crate::request::TargetInfo;
use crate::sys::uapi::{self, ParamBasic, ParamDiscard, Params};

/// Checks a target's geometry and turns it into SET_PARAMS input.
pub fn build_params(info: &TargetInfo, max_io_buf_bytes: u32) -> Result<Params> {
    let lbs = info.logical_block_size;
    let pbs = info.physical_block_size.max(lbs);
    let page = u32::try_from(crate::sys::page_size()).unwrap_or(4096);
    if !lbs.is_power_of_two() || !(512..=page).contains(&lbs) {
        return Err(Error::Config(format!("logical block size {lbs} must be a power of two from 512 to {page}")));
    }
    if !pbs.is_power_of_two() {
        return Err(Error::Config(format!("physical block size {pbs} is not a power of two")));
    }
    if info.dev_size == 0 {
        return Err(Error::Config("device size is zero".into()));
    }
    if !info.dev_size.is_multiple_of(u64::from(lbs)) {
        return Err(Error::Config(format!(
            "device size {} bytes is not a multiple of the {lbs}-byte logical block size",
            info.dev_size
        )));
    }
    if max_io_buf_bytes < lbs || !max_io_buf_bytes.is_multiple_of(page) {
        return Err(Error::Config(format!(
            "max IO size {max_io_buf_bytes} must be a multiple of the {page}-byte page"
        )));
    }
    let mut attrs = 0;
    if info.read_only {
        attrs |= uapi::ATTR_READ_ONLY;
    }
    if info.rotational {
        attrs |= uapi::ATTR_ROTATIONAL;
    }
    if info.volatile_cache {
        attrs |= uapi::ATTR_VOLATILE_CACHE | uapi::ATTR_FUA;
    }
    let shift = |v: u32| u8::try_from(v.trailing_zeros()).unwrap_or(9);
    let mut p = Params {
        len: Params::WIRE_LEN,
        types: uapi::PARAM_TYPE_BASIC,
        basic: ParamBasic {
            attrs,
            logical_bs_shift: shift(lbs),
            physical_bs_shift: shift(pbs),
            io_opt_shift: shift(pbs),
            io_min_shift: shift(lbs),
            max_sectors: max_io_buf_bytes >> 9,
            chunk_sectors: 0,
            dev_sectors: info.dev_size >> 9,
            virt_boundary_mask: 0,
        },
        ..Default::default()
    };
    if let Some(d) = &info.discard {
        p.types |= uapi::PARAM_TYPE_DISCARD;
        p.discard = ParamDiscard {
            discard_alignment: 0,
            discard_granularity: d.granularity.max(lbs),
            max_discard_sectors: d.max_discard_sectors,
            max_write_zeroes_sectors: d.max_write_zeroes_sectors,
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    if let Some(z) = &info.zoned {
        let zone_sectors = z.zone_size >> 9;
        let nr_zones = info.dev_size / z.zone_size.max(1);
        if !z.zone_size.is_power_of_two()
            || z.zone_size < u64::from(lbs).max(4096)
            || !info.dev_size.is_multiple_of(z.zone_size)
            || zone_sectors > u64::from(u32::MAX)
        {
            return Err(Error::Config(format!(
                "zone size {} must be a power of two of at least 4K that divides the device size {}",
                z.zone_size, info.dev_size
            )));
        }
        for (what, n) in [("open", z.max_open_zones), ("active", z.max_active_zones)] {
            if u64::from(n) > nr_zones {
                return Err(Error::Config(format!("max {what} zones {n} exceeds the {nr_zones} zones of the device")));
            }
        }
        p.types |= uapi::PARAM_TYPE_ZONED;
        p.basic.chunk_sectors = zone_sectors as u32;
        p.zoned = uapi::ParamZoned {
            max_open_zones: z.max_open_zones,
            max_active_zones: z.max_active_zones,
            // A zone append carries at most one request buffer, and stays in its zone.
            max_zone_append_sectors: (max_io_buf_bytes >> 9).min(zone_sectors as u32),
            reserved: [0; 20],
        };
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::DiscardInfo;

    fn info(size: u64, lbs: u32) -> TargetInfo {
        TargetInfo {
            dev_size: size,
            logical_block_size: lbs,
            physical_block_size: 4096,
            read_only: false,
            rotational: false,
            volatile_cache: true,
            discard: Some(DiscardInfo {
                granularity: 4096,
                max_discard_sectors: 1 << 20,
                max_write_zeroes_sectors: 1 << 20,
            }),
            zoned: None,
        }
    }

    #[test]
    fn builds_zoned() {
        let mut z = info(64 << 20, 4096);
        z.discard = None;
        z.zoned = Some(crate::request::ZonedInfo { zone_size: 4 << 20, max_open_zones: 4, max_active_zones: 8 });
        let p = build_params(&z, 512 << 10).unwrap();
        assert_eq!(p.types, uapi::PARAM_TYPE_BASIC | uapi::PARAM_TYPE_ZONED);
        assert_eq!(p.basic.chunk_sectors, 8192);
        assert_eq!((p.zoned.max_open_zones, p.zoned.max_active_zones, p.zoned.max_zone_append_sectors), (4, 8, 1024));
        for (zone_size, open) in [(3 << 20, 0), (128 << 20, 0), (2048, 0), (4 << 20, 17)] {
            z.zoned = Some(crate::request::ZonedInfo { zone_size, max_open_zones: open, max_active_zones: 0 });
            build_params(&z, 512 << 10).unwrap_err();
        }
    }

    #[test]
    fn builds_basic_and_discard() {
        let p = build_params(&info(1 << 30, 512), 512 << 10).unwrap();
        assert_eq!(p.types, uapi::PARAM_TYPE_BASIC | uapi::PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.dev_sectors, 1 << 21);
        assert_eq!((p.basic.logical_bs_shift, p.basic.physical_bs_shift), (9, 12));
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.attrs, uapi::ATTR_VOLATILE_CACHE | uapi::ATTR_FUA);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.len, Params::WIRE_LEN);
    }

    #[test]
    fn rejects_odd_geometry() {
        let e = build_params(&info(1000, 512), 1 << 19).unwrap_err().to_string();
        assert!(e.contains("not a multiple of the 512-byte"), "{e}");
        build_params(&info(0, 512), 1 << 19).unwrap_err();
        build_params(&info(1 << 20, 1000), 1 << 19).unwrap_err();
        build_params(&info(1 << 20, 256), 1 << 19).unwrap_err();
        build_params(&info(1 << 20, 512), 1000).unwrap_err();
        let mut no_discard = info(1 << 20, 4096);
        no_discard.discard = None;
        no_discard.volatile_cache = false;
        let p = build_params(&no_discard, 1 << 19).unwrap();
        assert_eq!((p.types, p.basic.attrs), (uapi::PARAM_TYPE_BASIC, 0));
    }
}
