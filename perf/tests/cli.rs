//! The ubd-perf binary end to end on any host, without root or ublk: the `raw`
//! system over a plain file, with a stand-in `fio` on PATH that prints a real
//! fio JSON output (tests/fixtures). Checks the output files, that `regress`
//! passes on its own baseline and fails on one doctored +50%, and the one-line
//! errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fixture {
    dir: tempfile::TempDir,
    path_var: std::ffi::OsString,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fio = bin.join("fio");
        let json = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/randread-2jobs-group.json");
        std::fs::write(
            &fio,
            format!("#!/bin/sh\n[ \"$1\" = --version ] && {{ echo fio-3.33; exit 0; }}\ncat '{}'\n", json.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fio, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::File::create(dir.path().join("backing.img")).unwrap().set_len(1 << 20).unwrap();
        let mut paths = vec![bin];
        paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        Fixture { dir, path_var: std::env::join_paths(paths).unwrap() }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ubd-perf")).args(args).env("PATH", &self.path_var).output().unwrap()
    }

    fn matrix(&self, cmd: &str, out: &str, extra: &[&str]) -> Output {
        let backing = self.p("backing.img");
        let out = self.p(out);
        let mut a = vec![
            cmd,
            "--systems",
            "raw",
            "--backing",
            backing.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rounds",
            "2",
            "--runtime",
            "1",
            "--ramp",
            "0",
            "--workloads",
            "randread-4k-qd1,seqread-128k-qd16",
        ];
        a.extend_from_slice(extra);
        self.run(&a)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn compare_writes_every_file() {
    let f = Fixture::new();
    let o = f.matrix("compare", "c", &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for name in ["results.json", "results.csv", "report.md"] {
        assert!(f.p("c").join(name).is_file(), "{name}");
    }
    let csv = std::fs::read_to_string(f.p("c/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.contains("randread-4k-qd1,raw,2,"), "{csv}");
    let stdout = text(&o.stdout);
    assert!(stdout.contains("### seqread-128k-qd16") && stdout.contains("| raw |"), "{stdout}");
}

#[test]
fn regress_passes_on_its_own_baseline_and_fails_on_a_doctored_one() {
    let f = Fixture::new();
    let bl = f.p("baselines");
    let bl_s = bl.to_str().unwrap().to_string();
    let o = f.matrix("regress", "u", &["--baselines", &bl_s, "--update"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let files: Vec<PathBuf> = std::fs::read_dir(&bl).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    let original = std::fs::read_to_string(&files[0]).unwrap();

    let o = f.matrix("regress", "same", &["--baselines", &bl_s]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("| +0.0% | ok |"), "{}", text(&o.stdout));

    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    for c in v["cells"].as_array_mut().unwrap() {
        c["iops"] = (c["iops"].as_f64().unwrap() * 1.5).into();
    }
    std::fs::write(&files[0], v.to_string()).unwrap();
    let o = f.matrix("regress", "doctored", &["--baselines", &bl_s]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("| -33.3% | REGRESSED (> 5%) |"), "{}", text(&o.stdout));
    assert!(text(&o.stderr).contains("error: 2 of 2 cells regressed by more than 5%"), "{}", text(&o.stderr));
    assert!(f.p("doctored/regress.json").is_file());

    // A looser threshold lets the same run pass.
    let o = f.matrix("regress", "loose", &["--baselines", &bl_s, "--threshold", "40"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

fn one_line_error(o: &Output, want: &str) {
    let err = text(&o.stderr);
    let last = err.lines().last().unwrap_or("");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(last.starts_with("error: ") && last.contains(want), "want {want:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_one_line_error() {
    let f = Fixture::new();
    let bl = f.p("none");
    one_line_error(&f.matrix("regress", "r", &["--baselines", bl.to_str().unwrap()]), "no baseline for this machine");
    one_line_error(&f.matrix("compare", "x", &["--systems", "nvme"]), "unknown system \"nvme\"");
    one_line_error(&f.run(&["compare", "--workloads", "nope", "--backing", "/dev/null"]), "unknown workload \"nope\"");
    one_line_error(
        &f.run(&["compare", "--backing", "/nonexistent/disk", "--allow-write"]),
        "backing /nonexistent/disk does not exist",
    );
    one_line_error(&f.run(&["compare", "--jobs-dir", "/no/such/dir"]), "cannot read the job dir /no/such/dir");
    one_line_error(&f.run(&["regress", "--threshold", "150", "--backing", "/dev/null"]), "--threshold 150");
    one_line_error(
        &f.run(&["compare", "--backing", "/dev/null", "--workloads", "randread-4k-qd1,randwrite-4k-qd64-2j"]),
        "workloads randwrite-4k-qd64-2j write to /dev/null and destroy its contents: add --allow-write",
    );
    // No fio at all.
    let o = Command::new(env!("CARGO_BIN_EXE_ubd-perf"))
        .args(["compare", "--backing", "/dev/null"])
        .env("PATH", f.p("empty"))
        .output()
        .unwrap();
    one_line_error(&o, "fio is not installed");
    // A usage error is clap's, with status 2.
    assert_eq!(f.run(&["compare", "--runtime", "0"]).status.code(), Some(2));
}
