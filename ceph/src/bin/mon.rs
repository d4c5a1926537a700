//! `ubd-ceph-mon [--conf PATH] [--timeout SECS] JSON...`: sends each JSON monitor command
//! in turn and prints its output (a test helper: the suite's throwaway cluster is set up
//! with it, as the `ceph` CLI takes 20-30 s a call under TCG).

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut o = ubd_ceph::ClusterOptions::default();
    let mut cmds = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--conf" => o.conf = args.next().map(Into::into),
            "--timeout" => {
                let Some(s) = args.next().and_then(|s| s.parse().ok()) else {
                    eprintln!("ubd-ceph-mon: --timeout takes whole seconds");
                    return ExitCode::from(2);
                };
                o.connect_timeout = Duration::from_secs(s);
            }
            _ => cmds.push(a),
        }
    }
    if cmds.is_empty() {
        eprintln!("usage: ubd-ceph-mon [--conf PATH] [--timeout SECS] JSON...");
        return ExitCode::from(2);
    }
    let rados = match ubd_ceph::Rados::connect(&o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ubd-ceph-mon: {e}");
            return ExitCode::FAILURE;
        }
    };
    for c in cmds {
        match rados.mon_command(&c) {
            Ok(out) => println!("{}", out.trim_end()),
            Err(e) => {
                eprintln!("ubd-ceph-mon: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
