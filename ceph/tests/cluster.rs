//! The binding against a real cluster: runs when UBD_CEPH_CONF names one with a pool
//! `rbd` (the e2e suite's `tests/e2e/ceph-cluster.sh start DIR` makes one), and says it
//! was skipped otherwise.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ubd_ceph::{AioQueue, ClusterOptions, Image, Op, Pool, Rados};

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no pointer arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn wait_all(q: &mut AioQueue, n: usize) -> Vec<(u64, i64, Vec<u8>)> {
    let mut out = Vec::new();
    let t = Instant::now();
    while out.len() < n {
        assert!(t.elapsed() < Duration::from_secs(120), "librbd did not finish {n} ops");
        q.poll();
        while let Some(d) = q.next(|d, data| (d.user, d.res, data.to_vec())) {
            out.push(d);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out
}

#[test]
fn aio_through_the_eventfd() {
    let Ok(conf) = std::env::var("UBD_CEPH_CONF") else {
        eprintln!("SKIPPED: UBD_CEPH_CONF is not set (no cluster to test against)");
        return;
    };
    let rados = Rados::connect(&ClusterOptions { conf: Some(conf.into()), ..Default::default() }).unwrap();
    rados.mon_command(r#"{"prefix": "osd pool ls"}"#).unwrap();
    let pool = Pool::open(&rados, "rbd").unwrap();
    let name = format!("binding-test-{}", std::process::id());
    let st = std::process::Command::new("rbd")
        .args(["-c", &std::env::var("UBD_CEPH_CONF").unwrap(), "create", "--size", "16M", &format!("rbd/{name}")])
        .status()
        .unwrap();
    assert!(st.success());
    let image = Image::open(&pool, &name, None, false).unwrap();
    assert_eq!(image.stat().unwrap().size, 16 << 20);
    let efd = eventfd();
    let mut q = AioQueue::new(image, efd.as_fd()).unwrap();
    // 8 writes of distinct patterns, then a flush, then 8 reads.
    for i in 0..8u64 {
        q.submit(Op::Write { off: i * 65536, len: 65536 }, i, |b| {
            b.fill(i as u8 + 1);
            Ok(())
        })
        .unwrap();
    }
    let w = wait_all(&mut q, 8);
    assert!(w.iter().all(|&(_, r, _)| r == 0), "{:?}", w.iter().map(|d| d.1).collect::<Vec<_>>());
    q.submit(Op::Flush, 100, |_| Ok(())).unwrap();
    assert_eq!(wait_all(&mut q, 1)[0].1, 0);
    // The eventfd was written.
    let mut v = [0u8; 8];
    // SAFETY: reads 8 bytes into a local buffer of 8 bytes.
    let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&efd), v.as_mut_ptr().cast(), 8) };
    assert_eq!(n, 8);
    assert!(u64::from_ne_bytes(v) >= 1);
    for i in 0..8u64 {
        q.submit(Op::Read { off: i * 65536, len: 65536 }, i, |_| Ok(())).unwrap();
    }
    for (u, r, data) in wait_all(&mut q, 8) {
        assert_eq!(r, 65536);
        assert!(data.iter().all(|&b| b == u as u8 + 1), "read {u}");
    }
    q.submit(Op::Discard { off: 0, len: 65536 }, 1, |_| Ok(())).unwrap();
    q.submit(Op::WriteZeroes { off: 65536, len: 65536 }, 2, |_| Ok(())).unwrap();
    assert!(wait_all(&mut q, 2).iter().all(|d| d.1 == 0));
    q.submit(Op::Read { off: 0, len: 131072 }, 3, |_| Ok(())).unwrap();
    let r = wait_all(&mut q, 1);
    assert_eq!(r[0].1, 131072);
    assert!(r[0].2.iter().all(|&b| b == 0));
    assert_eq!(q.in_flight(), 0);
    drop(q);
    let e = Image::open(&pool, "no-such-image", None, false).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
}
