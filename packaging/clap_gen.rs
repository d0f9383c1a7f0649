//! Shell completions and man pages generated from a program's clap
//! definition, behind the hidden `completions <shell>` and `man [--dir DIR]`
//! subcommands of `sidecar` and `keyserver` (both include this file with
//! `#[path]`, so the two programs generate theirs the same way).

use std::path::Path;

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to stdout.
pub fn completions(mut cmd: clap::Command, shell: Shell) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes the man pages of `cmd` into `dir` (`<program>.1`, and one per
/// visible subcommand, `<program>-<sub>.1`), or the program's own page to
/// stdout when no directory is given.
pub fn man(cmd: clap::Command, dir: Option<&Path>) -> std::io::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
    }
}
