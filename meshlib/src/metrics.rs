//! The Prometheus text exposition shared by the three programs: a writer
//! that keeps every family's samples together under one `# HELP` and
//! `# TYPE`, whatever order they are added in, and the standard `process_*`
//! families read from `/proc/self`.
//!
//! Names follow one scheme: `istmesh_<program>_…` (`istmesh_keyserver_`,
//! `istmesh_relay_`, `istmesh_gateway_`, `istmesh_dns_`; the sidecar's own
//! series are `istmesh_…`), each program has an `istmesh_<program>_build_info`,
//! and the `process_*` families are the ones every Prometheus client library
//! exports. No series uses the label `instance` (Prometheus sets it to the
//! scraped target).

use std::fmt::{Display, Write as _};

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that only goes up (names end in `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Buckets, sum and count (`_bucket`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: Kind,
    help: String,
    samples: String,
}

/// Families in the order first declared, each with its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a HELP text (backslash, newline).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a family (a second declaration of the same name is a no-op:
    /// the first help and kind stay).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        if !self.families.iter().any(|f| f.name == name) {
            self.families.push(Family {
                name: name.to_owned(),
                kind,
                help: escape_help(help),
                samples: String::new(),
            });
        }
        self
    }

    /// Adds a sample of `family` (declared before; a histogram's samples
    /// name their suffix: `_bucket`, `_sum`, `_count`). Labels are
    /// `(name, value)` pairs; values are escaped here.
    ///
    /// # Panics
    ///
    /// When `family` was not declared: a programming error, caught by the
    /// programs' metrics tests.
    pub fn sample(
        &mut self,
        family: &str,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        let f = self
            .families
            .iter_mut()
            .find(|f| f.name == family)
            .unwrap_or_else(|| panic!("metric family {family} used before it was declared"));
        let _ = write!(f.samples, "{family}{suffix}");
        if !labels.is_empty() {
            f.samples.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    f.samples.push(',');
                }
                let _ = write!(f.samples, "{k}=\"{}\"", escape_label(v));
            }
            f.samples.push('}');
        }
        let _ = writeln!(f.samples, " {value}");
        self
    }

    /// Declares a family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, "", &[], value)
    }

    /// Appends the text form to `out`: every family with at least one
    /// sample, its `# HELP`, `# TYPE` and samples together.
    pub fn render_into(&self, out: &mut String) {
        for f in &self.families {
            if f.samples.is_empty() {
                continue;
            }
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            out.push_str(&f.samples);
        }
    }

    /// The text form.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }
}

/// What `/proc/self` tells about this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors.
    pub max_fds: u64,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// Threads.
    pub threads: u64,
}

/// Parses `/proc/self/stat` (the fields after the command's closing
/// parenthesis), with the clock tick rate, the page size and the boot time
/// (seconds since the Unix epoch). `None` when the text is not a stat line.
fn parse_stat(stat: &str, ticks: f64, page: u64, boot: u64) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let utime = field(14)?;
    let stime = field(15)?;
    let threads = field(20)?;
    let start = field(22)?;
    let vsize = field(23)?;
    let rss = field(24)?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks,
        resident_bytes: rss.saturating_mul(page),
        virtual_bytes: vsize,
        open_fds: 0,
        max_fds: 0,
        start_time_seconds: boot as f64 + start as f64 / ticks,
        threads,
    })
}

/// This process's figures, or `None` where `/proc` cannot be read.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // SAFETY: sysconf reads a configuration value and has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    let mut s = parse_stat(
        &stat,
        if ticks > 0 { ticks as f64 } else { 100.0 },
        u64::try_from(page).unwrap_or(4096),
        boot,
    )?;
    s.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        s.max_fds = lim.rlim_cur;
    }
    Some(s)
}

/// Adds the standard `process_*` families (CPU seconds, resident and
/// virtual memory, open and maximum descriptors, start time, threads).
pub fn process_families(e: &mut Exposition) {
    let Some(p) = process_stats() else { return };
    e.single(
        "process_cpu_seconds_total",
        Kind::Counter,
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    )
    .single(
        "process_resident_memory_bytes",
        Kind::Gauge,
        "Resident memory size in bytes.",
        p.resident_bytes,
    )
    .single(
        "process_virtual_memory_bytes",
        Kind::Gauge,
        "Virtual memory size in bytes.",
        p.virtual_bytes,
    )
    .single(
        "process_open_fds",
        Kind::Gauge,
        "Number of open file descriptors.",
        p.open_fds,
    )
    .single(
        "process_max_fds",
        Kind::Gauge,
        "Maximum number of open file descriptors.",
        p.max_fds,
    )
    .single(
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    )
    .single(
        "process_threads",
        Kind::Gauge,
        "Number of OS threads in the process.",
        p.threads,
    );
}

/// The `process_*` families as text.
pub fn process_text() -> String {
    let mut e = Exposition::new();
    process_families(&mut e);
    e.render()
}

/// `istmesh_<program>_build_info{version="…"} 1` as text.
pub fn build_info_text(program: &str, version: &str) -> String {
    let mut e = Exposition::new();
    let name = format!("istmesh_{program}_build_info");
    e.family(
        &name,
        Kind::Gauge,
        &format!("The {program}'s version (always 1)."),
    )
    .sample(&name, "", &[("version", version)], 1);
    e.render()
}

/// Checks a text exposition the way `promtool check metrics` does for what
/// our programs can get wrong: every sample belongs to a family announced by
/// `# HELP` and `# TYPE` before it, a family's samples are not split by
/// another family's, counters end in `_total`, a histogram's samples end in
/// `_bucket`, `_sum` or `_count`, and no series carries the label
/// `instance`. Returns the first problem found.
pub fn lint(text: &str) -> Result<(), String> {
    use std::collections::{HashMap, HashSet};
    let mut help: HashSet<&str> = HashSet::new();
    let mut kinds: HashMap<&str, &str> = HashMap::new();
    let mut finished: HashSet<&str> = HashSet::new();
    let mut current: Option<&str> = None;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !help.insert(name) {
                return Err(format!("line {n}: second HELP for {name}"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            if kinds.insert(name, kind).is_some() {
                return Err(format!("line {n}: second TYPE for {name}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("line {n}: counter {name} does not end in _total"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let series = line.split(['{', ' ']).next().unwrap_or_default();
        let family = kinds
            .iter()
            .filter(|(name, kind)| {
                series == **name
                    || (**kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| series.strip_suffix(s) == Some(**name)))
            })
            .map(|(name, _)| *name)
            .next();
        let Some(family) = family else {
            return Err(format!("line {n}: {series} has no TYPE before it"));
        };
        if !help.contains(family) {
            return Err(format!("line {n}: {family} has no HELP"));
        }
        if current != Some(family) {
            if let Some(previous) = current {
                finished.insert(previous);
            }
            if finished.contains(family) {
                return Err(format!(
                    "line {n}: samples of {family} are split by another family"
                ));
            }
            current = Some(family);
        }
        if let Some(labels) = line.split_once('{').and_then(|(_, r)| r.split_once('}')) {
            let mut rest = labels.0;
            while let Some((name, after)) = rest.split_once("=\"") {
                if name.trim_start_matches(',') == "instance" {
                    return Err(format!("line {n}: {series} uses the label instance"));
                }
                // Skip the value (escaped quotes included).
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(end) = end else {
                    return Err(format!("line {n}: unterminated label value"));
                };
                rest = &after[end + 1..];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_stay_together_with_help_and_type() {
        let mut e = Exposition::new();
        e.family("a_total", Kind::Counter, "A things.")
            .family("b", Kind::Gauge, "B now.");
        e.sample("a_total", "", &[("group", "x")], 1)
            .sample("b", "", &[("group", "x")], 2)
            .sample("a_total", "", &[("group", "y\"\n\\")], 3);
        assert_eq!(
            e.render(),
            "# HELP a_total A things.\n# TYPE a_total counter\na_total{group=\"x\"} 1\na_total{group=\"y\\\"\\n\\\\\"} 3\n# HELP b B now.\n# TYPE b gauge\nb{group=\"x\"} 2\n"
        );
    }

    #[test]
    fn lint_finds_what_promtool_refuses() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"i\\\"nstance=\\\"\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.1\nh_count 1\n";
        assert_eq!(lint(good), Ok(()));
        let cases = [
            ("a_total 1\n", "no TYPE"),
            ("# TYPE a_total counter\na_total 1\n", "no HELP"),
            ("# HELP a A.\n# TYPE a counter\na 1\n", "_total"),
            (
                "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 2\n",
                "split",
            ),
            ("# HELP a A.\n# TYPE a gauge\na{instance=\"x\"} 1\n", "label instance"),
            ("# HELP a A.\n# TYPE a gauge\n# HELP a A.\n", "second HELP"),
        ];
        for (text, want) in cases {
            let err = lint(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn families_without_samples_are_left_out() {
        let mut e = Exposition::new();
        e.family("empty", Kind::Gauge, "Nothing.");
        assert_eq!(e.render(), "");
    }

    #[test]
    fn parses_a_stat_line_with_spaces_and_parentheses_in_the_name() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 150 0 0 20 0 7 0 5000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line, 100.0, 4096, 1_700_000_000).expect("parses");
        assert!((s.cpu_seconds - 4.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.threads, 7);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.resident_bytes, 2560 * 4096);
        assert!((s.start_time_seconds - 1_700_000_050.0).abs() < 1e-9);
        assert_eq!(parse_stat("garbage", 100.0, 4096, 0), None);
        assert_eq!(parse_stat("1 (x) S 1 2", 100.0, 4096, 0), None);
    }

    #[test]
    fn reads_this_process() {
        let p = process_stats().expect("/proc/self");
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.max_fds >= p.open_fds);
        assert!(p.threads >= 1 && p.start_time_seconds > 1e9);
        let text = process_text();
        assert_eq!(lint(&text), Ok(()));
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}: {text}");
        }
    }
}
