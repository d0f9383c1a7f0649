//! Shell completions and man pages generated from a program's clap
//! definition, behind the hidden `completions <shell>` and `man [--dir DIR]`
//! subcommands of `sidecar` and `keyserver` (both include this file with
//! `#[path]`, so the two programs generate theirs the same way).

use std::path::Path;

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to stdout. Hidden
/// subcommands (these two among them) are left out: a user never types
/// them, packaging runs them.
pub fn completions(cmd: clap::Command, shell: Shell) {
    let mut cmd = visible(&cmd);
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// `cmd` without its hidden subcommands (at every level): clap can add
/// subcommands but not remove them, so the tree is built again from the
/// visible ones.
fn visible(cmd: &clap::Command) -> clap::Command {
    // clap takes names as `&'static str` (no `string` feature): this runs
    // once, in a process that prints the script and exits.
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    let mut out = clap::Command::new(leak(cmd.get_name()))
        .args(cmd.get_arguments().cloned())
        .aliases(cmd.get_all_aliases().map(leak).collect::<Vec<_>>());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        out = out.subcommand(visible(sub));
    }
    out
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
