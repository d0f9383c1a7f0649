//! `sidecar ist-names`: the seed-004 encodings of service names, as TSV.

use std::io::{self, BufRead, Write};
use std::process::ExitCode;

use meshlib::ist::encode;

/// Arguments of `sidecar ist-names`.
#[derive(clap::Args)]
pub struct Args {
    /// Service names; read from stdin, one per line, when none are given.
    names: Vec<String>,
}

/// Prints one line per valid name, in input order; reports each invalid one
/// on stderr and exits 1 if there was any.
pub fn run(args: Args) -> ExitCode {
    let mut out = io::stdout().lock();
    let mut printer = Printer { failed: false };
    let result = if args.names.is_empty() {
        for_each_stdin_line(|line| printer.one(&mut out, line))
    } else {
        args.names
            .into_iter()
            .try_for_each(|n| printer.one(&mut out, Ok(n)))
    };
    match result.and_then(|()| out.flush()) {
        Ok(()) if !printer.failed => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            if e.kind() != io::ErrorKind::BrokenPipe {
                eprintln!("sidecar ist-names: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

struct Printer {
    failed: bool,
}

impl Printer {
    /// Prints the names of one input, or reports why it has none.
    fn one(&mut self, out: &mut impl Write, input: Result<String, String>) -> io::Result<()> {
        match input.and_then(|name| encode(&name).map_err(|e| e.to_string())) {
            Ok(names) => writeln!(out, "{names}"),
            Err(message) => {
                self.failed = true;
                eprintln!("sidecar ist-names: {message}");
                Ok(())
            }
        }
    }
}

/// Calls `f` with each line of stdin (without `\n` / `\r\n`), or with why the
/// line is unusable (not UTF-8). Stops at the first read error.
fn for_each_stdin_line(
    mut f: impl FnMut(Result<String, String>) -> io::Result<()>,
) -> io::Result<()> {
    let mut stdin = io::stdin().lock();
    let mut buf = Vec::new();
    for line_no in 1.. {
        buf.clear();
        if stdin.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8(line.to_vec())
            .map_err(|_| format!("stdin line {line_no} is not UTF-8"));
        f(text)?;
    }
    Ok(())
}
