//! `generate-docs DIR` (hidden): the manual pages (clap_mangen) and the shell
//! completions (clap_complete), from the same clap definitions as `--help`. The Debian
//! package and `packaging/build-deb.sh` install what it writes.

use std::path::Path;

use anyhow::{Context, Result};
use clap_complete::Shell;

pub fn generate(cmd: clap::Command, dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // ubd-engine.1 (its SUBCOMMANDS section lists every command) and ubd-engine-CMD.1 each.
    clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, "ubd-engine", &comp)
            .with_context(|| format!("writing {shell} completions into {}", comp.display()))?;
    }
    let mut names: Vec<String> = std::fs::read_dir(&man)?
        .chain(std::fs::read_dir(&comp)?)
        .filter_map(|e| e.ok().map(|e| e.path().display().to_string()))
        .collect();
    names.sort();
    for n in names {
        println!("{n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_and_completions_name_every_command() {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        super::generate(crate::Cli::command(), dir.path()).unwrap();
        let main = std::fs::read_to_string(dir.path().join("man/ubd-engine.1")).unwrap();
        let bash = std::fs::read_to_string(dir.path().join("completions/ubd-engine.bash")).unwrap();
        assert!(dir.path().join("completions/_ubd-engine").exists());
        assert!(dir.path().join("completions/ubd-engine.fish").exists());
        for sub in crate::Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            assert!(main.contains(&name.replace('-', "\\-")), "ubd-engine.1 lacks {name}");
            assert!(dir.path().join(format!("man/ubd-engine-{name}.1")).exists(), "no page for {name}");
            assert!(bash.contains(name), "bash completion lacks {name}");
        }
        assert!(!main.contains("generate\\-docs") && !main.contains("sockram"), "hidden commands stay hidden");
    }
}
