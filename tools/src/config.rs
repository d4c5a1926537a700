//! Declarative devices: TOML files naming devices by id, each with its target and the
//! command line's options under the same names.
//!
//! ```toml
//! [device.0]
//! target = "loop"            # loop, null, nbd or rbd: the subcommand
//! path = "/srv/disk0.img"    # the subcommand's argument (loop: path, nbd: uri, rbd: image)
//! cpus = "0-1"               # any option, by its long name without the dashes
//! queues = 2
//! metrics = "127.0.0.1:9101"
//! ```
//!
//! A device's table becomes a command line (`--cpus 0-1 --queues 2 ... loop -- PATH`)
//! that the CLI's own parser checks, so the file takes exactly what the command line
//! takes; every error names the file, the line and the key.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use toml::de::{DeTable, DeValue};

/// Where `run` looks without `--config`: every `*.toml` file in it.
pub const DEFAULT_PATH: &str = "/etc/ubd-engine";

/// The subcommands a device may use.
pub const TARGETS: [&str; 4] = ["loop", "null", "nbd", "rbd"];

/// Options of the command line that a device table may not set.
const NOT_IN_FILE: [(&str, &str); 3] = [
    ("id", "the id is the table's name ([device.N])"),
    ("verbose", "logging is set on the command line (-v) or by UBD_LOG"),
    ("takeover", "it is for `upgrade` only"),
];

/// One device of a configuration.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: u32,
    pub file: PathBuf,
    /// Line of the `[device.N]` header.
    pub line: usize,
    /// The line of each key.
    pub keys: Vec<(String, usize)>,
    /// The command line it stands for, program name first.
    pub argv: Vec<OsString>,
}

impl DeviceConfig {
    /// `FILE:LINE` of `key` (of the table when the key is not in it).
    pub fn at(&self, key: &str) -> String {
        let line = self.keys.iter().find(|(k, _)| k == key).map_or(self.line, |(_, l)| *l);
        format!("{}:{line}", self.file.display())
    }
}

/// The files of `path`: itself, or a directory's `*.toml` files in name order.
fn files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    if out.is_empty() {
        bail!("config {}: no *.toml files in this directory", path.display());
    }
    Ok(out)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Every device of the configuration at `path` (a file or a directory), each checked
/// against the command line `cli` (its options and subcommands).
pub fn load(cli: &clap::Command, path: &Path) -> Result<Vec<DeviceConfig>> {
    let mut all: Vec<DeviceConfig> = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("config {}: {e}", file.display()))?;
        for dev in parse(cli, &file, &text)? {
            if let Some(first) = all.iter().find(|d| d.id == dev.id) {
                bail!(
                    "{}:{}: device {} is defined twice (first at {}:{})",
                    dev.file.display(),
                    dev.line,
                    dev.id,
                    first.file.display(),
                    first.line
                );
            }
            all.push(dev);
        }
    }
    Ok(all)
}

/// Device `id` of the configuration at `path`; the whole configuration is checked.
pub fn find(cli: &clap::Command, path: &Path, id: u32) -> Result<DeviceConfig> {
    let all = load(cli, path)?;
    let ids: Vec<String> = all.iter().map(|d| d.id.to_string()).collect();
    all.into_iter().find(|d| d.id == id).ok_or_else(|| {
        anyhow::anyhow!(
            "config {}: no device {id} (it has {})",
            path.display(),
            if ids.is_empty() { "none".to_string() } else { ids.join(", ") }
        )
    })
}

/// The devices of one file's text.
pub fn parse(cli: &clap::Command, file: &Path, text: &str) -> Result<Vec<DeviceConfig>> {
    let at = |span: std::ops::Range<usize>| format!("{}:{}", file.display(), line_of(text, span.start));
    let doc = DeTable::parse(text).map_err(|e| {
        let where_ = e.span().map_or_else(|| file.display().to_string(), &at);
        anyhow::anyhow!("{where_}: {}", e.message().trim().replace('\n', "; "))
    })?;
    let mut out = Vec::new();
    for (key, value) in doc.get_ref() {
        if key.get_ref() != "device" {
            bail!("{}: unknown key `{}` (devices are tables [device.N])", at(key.span()), key.get_ref());
        }
        let DeValue::Table(devices) = value.get_ref() else {
            bail!("{}: `device` must be tables [device.N]", at(key.span()));
        };
        for (id_key, table) in devices {
            let id: u32 = id_key.get_ref().parse().map_err(|_| {
                anyhow::anyhow!(
                    "{}: device `{}`: the id must be a number (as in [device.0])",
                    at(id_key.span()),
                    id_key.get_ref()
                )
            })?;
            let DeValue::Table(table) = table.get_ref() else {
                bail!("{}: device {id} must be a table ([device.{id}])", at(id_key.span()));
            };
            out.push(device(cli, file, text, id, line_of(text, id_key.span().start), table)?);
        }
    }
    Ok(out)
}

fn device(
    cli: &clap::Command,
    file: &Path,
    text: &str,
    id: u32,
    line: usize,
    table: &DeTable<'_>,
) -> Result<DeviceConfig> {
    let at = |line: usize| format!("{}:{line}", file.display());
    let keys: Vec<(String, usize)> =
        table.iter().map(|(k, _)| (k.get_ref().to_string(), line_of(text, k.span().start))).collect();
    let value_of = |name: &str| {
        table.iter().find(|(k, _)| k.get_ref() == name).map(|(k, v)| (line_of(text, k.span().start), v.get_ref()))
    };
    let Some((tline, target)) = value_of("target") else {
        bail!("{}: device {id}: no `target` (one of {})", at(line), TARGETS.join(", "));
    };
    let target = match target {
        DeValue::String(s) if TARGETS.contains(&s.as_ref()) => s.to_string(),
        other => {
            bail!("{}: device {id}: key `target`: {} is not one of {}", at(tline), show(other), TARGETS.join(", "))
        }
    };
    let Some(sub) = cli.find_subcommand(&target) else { bail!("{}: no subcommand {target}", at(tline)) };
    let mut global_args: Vec<OsString> = vec!["--id".into(), id.to_string().into()];
    let mut sub_args: Vec<OsString> = Vec::new();
    let mut positionals: Vec<OsString> = Vec::new();
    for (k, v) in table {
        let (name, kline) = (k.get_ref().as_ref(), line_of(text, k.span().start));
        if name == "target" {
            continue;
        }
        let here = || format!("{}: device {id}: key `{name}`", at(kline));
        if let Some((_, why)) = NOT_IN_FILE.iter().find(|(n, _)| *n == name) {
            bail!("{}: not allowed in a configuration: {why}", here());
        }
        // The target's own argument or option, else a device option (global).
        let (arg, global) = match sub.get_arguments().find(|a| arg_key(a) == name) {
            Some(a) => (a, false),
            None => match cli.get_arguments().find(|a| a.is_global_set() && arg_key(a) == name && !a.is_hide_set()) {
                Some(a) => (a, true),
                None => bail!("{}: unknown key (`{target}` takes: {})", here(), known_keys(cli, sub).join(", ")),
            },
        };
        let flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let values: Vec<String> = match v.get_ref() {
            DeValue::Boolean(b) if flag => {
                if *b {
                    push_opt(if global { &mut global_args } else { &mut sub_args }, arg, None);
                }
                continue;
            }
            _ if flag => bail!("{}: expected true or false", here()),
            DeValue::Array(items) => {
                if !matches!(arg.get_action(), clap::ArgAction::Append) {
                    bail!("{}: takes one value, not a list", here());
                }
                items
                    .iter()
                    .map(|i| {
                        scalar(i.get_ref())
                            .ok_or_else(|| anyhow::anyhow!("{}: list items must be strings or numbers", here()))
                    })
                    .collect::<Result<_>>()?
            }
            other => vec![
                scalar(other)
                    .ok_or_else(|| anyhow::anyhow!("{}: expected a string or a number, not {}", here(), show(other)))?,
            ],
        };
        for val in values {
            if arg.is_positional() {
                positionals.push(val.into());
            } else {
                push_opt(if global { &mut global_args } else { &mut sub_args }, arg, Some(val));
            }
        }
    }
    let mut argv: Vec<OsString> = vec!["ubd-engine".into()];
    argv.extend(global_args);
    argv.push(target.clone().into());
    argv.extend(sub_args);
    if !positionals.is_empty() {
        argv.push("--".into());
        argv.extend(positionals);
    }
    let dev = DeviceConfig { id, file: file.to_path_buf(), line, keys, argv };
    // The CLI's parser checks values, required arguments and conflicts.
    if let Err(e) = cli.clone().try_get_matches_from(&dev.argv) {
        bail!("{}", clap_error(&dev, cli, sub, &e));
    }
    Ok(dev)
}

/// A clap error as one line naming the key it is about.
fn clap_error(dev: &DeviceConfig, cli: &clap::Command, sub: &clap::Command, e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
    let arg_text = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    let key = arg_text.and_then(|t| {
        let long = t.trim_start_matches("--").split([' ', '=']).next().unwrap_or("").to_string();
        cli.get_arguments()
            .chain(sub.get_arguments())
            .find(|a| {
                a.get_long() == Some(long.as_str())
                    || a.get_value_names().is_some_and(|n| n.iter().any(|n| t.contains(n.as_str())))
                        && a.is_positional()
            })
            .map(arg_key)
    });
    match key {
        Some(k) => format!("{}: device {}: key `{k}`: {first}", dev.at(&k), dev.id),
        None => format!("{}: device {}: {first}", dev.at(""), dev.id),
    }
}

/// The key an argument has in a file: its long name, or a positional's id (`path`).
fn arg_key(a: &clap::Arg) -> String {
    a.get_long().map_or_else(|| a.get_id().as_str().replace('_', "-"), str::to_string)
}

fn known_keys(cli: &clap::Command, sub: &clap::Command) -> Vec<String> {
    let mut k: Vec<String> = sub
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_id() != "help")
        .map(arg_key)
        .chain(
            cli.get_arguments()
                .filter(|a| a.is_global_set() && !a.is_hide_set() && !NOT_IN_FILE.iter().any(|(n, _)| *n == arg_key(a)))
                .map(arg_key),
        )
        .collect();
    k.dedup();
    k
}

fn push_opt(args: &mut Vec<OsString>, arg: &clap::Arg, value: Option<String>) {
    let long = arg.get_long().unwrap_or_else(|| arg.get_id().as_str());
    match value {
        // --opt=VALUE: a value that starts with '-' stays a value.
        Some(v) => args.push(format!("--{long}={v}").into()),
        None => args.push(format!("--{long}").into()),
    }
}

fn scalar(v: &DeValue<'_>) -> Option<String> {
    match v {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix()).ok().map(|n| n.to_string()),
        DeValue::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

fn show(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{s:?}"),
        other => format!("a {}", other.type_str()),
    }
}

/// `argv` as one shell-quoted line (for `check-config` and logs).
pub fn shell_words(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| {
            let a = a.to_string_lossy();
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c)) {
                a.into_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    fn parse_one(text: &str) -> Result<Vec<DeviceConfig>> {
        parse(&crate::Cli::command(), Path::new("/etc/ubd-engine/d.toml"), text)
    }

    fn err(text: &str) -> String {
        let e = format!("{:#}", parse_one(text).unwrap_err());
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    fn argv(d: &DeviceConfig) -> Vec<String> {
        d.argv.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn devices_become_command_lines_the_cli_accepts() {
        let text = r#"
# two devices
[device.0]
target = "loop"
path = "/srv/-disk0.img"
cpus = "0-1"
queues = 2
no-hugepages = true
buffer-mode = "copy"
direct = "off"
metrics = "127.0.0.1:9101"

[device.7]
target = "rbd"
image = "rbd/img"
ceph-option = ["rbd_cache=false", "debug_rbd=0/0"]
connect-timeout = 0x1e
shmem = "/mnt/huge/buf,size=64M"
"#;
        let devs = parse_one(text).unwrap();
        assert_eq!(devs.len(), 2);
        let d0 = &devs[0];
        assert_eq!((d0.id, d0.line), (0, 3));
        assert_eq!(d0.at("queues"), "/etc/ubd-engine/d.toml:7");
        assert_eq!(
            argv(d0),
            [
                "ubd-engine",
                "--id",
                "0",
                "--buffer-mode=copy",
                "--cpus=0-1",
                "--metrics=127.0.0.1:9101",
                "--no-hugepages",
                "--queues=2",
                "loop",
                "--direct=off",
                "--",
                "/srv/-disk0.img"
            ]
        );
        let cli = crate::Cli::try_parse_from(&d0.argv).unwrap();
        assert_eq!(cli.dev.queues, Some(2));
        assert!(cli.dev.no_hugepages);
        assert!(matches!(cli.command, crate::Command::Loop { ref path, .. } if path == Path::new("/srv/-disk0.img")));
        let cli = crate::Cli::try_parse_from(&devs[1].argv).unwrap();
        let crate::Command::Rbd { image, ceph_option, connect_timeout, .. } = cli.command else { panic!() };
        assert_eq!((image.as_str(), connect_timeout), ("rbd/img", 30));
        assert_eq!(ceph_option, ["rbd_cache=false", "debug_rbd=0/0"]);
        assert_eq!(cli.dev.shmem.as_deref(), Some("/mnt/huge/buf,size=64M"));
    }

    #[test]
    fn bad_configurations_name_file_line_and_key() {
        let f = "/etc/ubd-engine/d.toml";
        for (text, want) in [
            (
                "[device.0]\ntarget = \"loop\"\npath = \"/x\"\nqueus = 2\n",
                format!("{f}:4: device 0: key `queus`: unknown key (`loop` takes: path, direct, block-size, cpus,"),
            ),
            ("[device.0]\ntarget = \"loop\"\npath = \"/x\"\n\n[device.0]\ntarget = \"null\"\n", format!("{f}:5: ")),
            (
                "[device.1]\ntarget = \"loop\"\npath = \"/x\"\nqueues = \"many\"\n",
                format!("{f}:4: device 1: key `queues`: invalid value 'many' for '--queues <N>'"),
            ),
            ("[device.1]\ntarget = \"loop\"\n", format!("{f}:1: device 1: ")),
            ("[device.1]\npath = \"/x\"\n", format!("{f}:1: device 1: no `target` (one of loop, null, nbd, rbd)")),
            (
                "[device.1]\ntarget = \"nfs\"\n",
                format!("{f}:2: device 1: key `target`: \"nfs\" is not one of loop, null, nbd, rbd"),
            ),
            (
                "[device.1]\ntarget = \"null\"\nsize = \"1G\"\nid = 3\n",
                format!("{f}:4: device 1: key `id`: not allowed in a configuration: the id is the table's name"),
            ),
            ("[device.x]\ntarget = \"null\"\n", format!("{f}:1: device `x`: the id must be a number")),
            ("[devices.1]\ntarget = \"null\"\n", format!("{f}:1: unknown key `devices`")),
            (
                "[device.1]\ntarget = \"null\"\nsize = \"1G\"\nno-hugepages = 1\n",
                format!("{f}:4: device 1: key `no-hugepages`: expected true or false"),
            ),
            (
                "[device.1]\ntarget = \"null\"\nsize = [\"1G\"]\n",
                format!("{f}:3: device 1: key `size`: takes one value, not a list"),
            ),
            (
                "[device.1]\ntarget = \"null\"\nsize = \"1G\"\ntakeover = 1\n",
                format!("{f}:4: device 1: key `takeover`: not allowed"),
            ),
            (
                "[device.1]\ntarget = \"null\"\nsize = \"1G\"\nsockram = 1\n",
                format!("{f}:4: device 1: key `sockram`: unknown key"),
            ),
            ("[device.1\n", format!("{f}:1: ")),
        ] {
            let e = err(text);
            assert!(e.starts_with(&want), "{text:?}:\n got {e}\nwant {want}");
        }
        assert!(err("[device.1]\ntarget = \"loop\"\n").contains("path"), "the missing argument is named");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../packaging/devices.toml");
        let devs = parse_one(text).unwrap();
        assert_eq!(devs.len(), 1);
        // Its commented-out devices are valid too.
        let uncommented: String = text
            .lines()
            .map(|l| l.strip_prefix("# ").filter(|r| r.starts_with('[') || r.contains(" = ")).unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let all = parse_one(&uncommented).unwrap();
        assert_eq!(all.iter().map(|d| d.id).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn directories_and_ids_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let cli = crate::Cli::command();
        let e = format!("{:#}", load(&cli, dir.path()).unwrap_err());
        assert!(e.contains("no *.toml files"), "{e}");
        std::fs::write(dir.path().join("a.toml"), "[device.0]\ntarget = \"null\"\nsize = \"1G\"\n").unwrap();
        std::fs::write(dir.path().join("b.toml"), "\n[device.1]\ntarget = \"null\"\nsize = \"1G\"\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a config").unwrap();
        assert_eq!(load(&cli, dir.path()).unwrap().len(), 2);
        assert_eq!(find(&cli, dir.path(), 1).unwrap().file, dir.path().join("b.toml"));
        let e = format!("{:#}", find(&cli, dir.path(), 5).unwrap_err());
        assert!(e.ends_with("no device 5 (it has 0, 1)"), "{e}");
        std::fs::write(dir.path().join("c.toml"), "[device.1]\ntarget = \"null\"\nsize = \"2G\"\n").unwrap();
        let e = format!("{:#}", load(&cli, dir.path()).unwrap_err());
        let (c, b) = (dir.path().join("c.toml"), dir.path().join("b.toml"));
        assert_eq!(e, format!("{}:1: device 1 is defined twice (first at {}:2)", c.display(), b.display()));
        let e = format!("{:#}", load(&cli, &dir.path().join("missing.toml")).unwrap_err());
        assert!(e.starts_with("config ") && e.contains("No such file"), "{e}");
    }
}
