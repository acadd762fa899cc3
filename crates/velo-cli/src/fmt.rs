//! Formatting shared by the commands: sizes, modes, times, JSON of entries.

use serde_json::{json, Map, Value};
use velo_core::{Entry, EntryKind};

/// `1.4 GiB`-style sizes.
pub fn bytes(n: u64) -> String {
    if n == u64::MAX {
        // Saturated statistics (a tree naming one subtree many times).
        return "at least 16 EiB".to_string();
    }
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `drwxr-xr-x`-style mode strings.
pub fn mode_string(entry: &Entry) -> String {
    let bits = entry.mode.bits();
    let mut s = String::with_capacity(10);
    s.push(match entry.kind {
        EntryKind::File { .. } => '-',
        EntryKind::Dir { .. } => 'd',
        EntryKind::Symlink { .. } => 'l',
    });
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, (flag, lower, upper)) in special.iter().enumerate() {
        let shift = 6 - 3 * i;
        let triple = (bits >> shift) & 7;
        s.push(if triple & 4 != 0 { 'r' } else { '-' });
        s.push(if triple & 2 != 0 { 'w' } else { '-' });
        let exec = triple & 1 != 0;
        s.push(match (bits & flag != 0, exec) {
            (true, true) => *lower,
            (true, false) => *upper,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// An RFC 3339 UTC time with nanoseconds.
pub fn time(mtime_ns: i64) -> String {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let nanos = mtime_ns.rem_euclid(1_000_000_000);
    format!("{}.{nanos:09}Z", civil_time(secs))
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) for any second count since 1970, before it included (a
/// tree may record a file dated 1960; humantime refuses those).
pub fn civil_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil, on i64 (valid for every i64 second count's days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// `n` and the noun, plural unless `n` is 1: "1 file", "3 files".
pub fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A count from tree statistics: `u64::MAX` means it saturated ("at least" that many).
pub fn count(n: u64) -> String {
    if n == u64::MAX {
        "2^64 or more".to_string()
    } else {
        n.to_string()
    }
}

/// Bytes as text; not-UTF-8 bytes become U+FFFD (JSON adds `path_bytes` then).
pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A name or path for a line of text output: control characters and backslashes escaped
/// (`\n`, `\t`, `\x1b`, `\\`), so a name holding a newline cannot forge a second line
/// of `ls` or `diff` output; bytes that are not UTF-8 are written `\xNN`. `--json` has the
/// exact bytes.
pub fn shown(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        // Bytes that are not UTF-8 are shown as themselves: two names that differ only
        // there stay two different lines.
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Puts `key` (lossy text) and, when the bytes are not UTF-8, `key_bytes` (exact).
pub fn put_bytes(obj: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    obj.insert(key.into(), Value::String(lossy(bytes)));
    if std::str::from_utf8(bytes).is_err() {
        obj.insert(format!("{key}_bytes"), json!(bytes));
    }
}

/// The JSON object of one entry: `path, kind, mode, size, mtime_ns, hash, target`.
pub fn entry_json(path: &[u8], entry: &Entry) -> Value {
    let mut obj = Map::new();
    put_bytes(&mut obj, "path", path);
    obj.insert("kind".into(), json!(entry.kind.label()));
    obj.insert("mode".into(), json!(entry.mode.bits()));
    obj.insert("mtime_ns".into(), json!(entry.mtime_ns));
    match &entry.kind {
        EntryKind::File { hash, size } => {
            obj.insert("size".into(), json!(size));
            obj.insert("hash".into(), json!(hash.to_hex()));
            obj.insert("target".into(), Value::Null);
        }
        EntryKind::Dir { hash } => {
            obj.insert("size".into(), json!(0));
            obj.insert("hash".into(), json!(hash.to_hex()));
            obj.insert("target".into(), Value::Null);
        }
        EntryKind::Symlink { target } => {
            obj.insert("size".into(), json!(target.len()));
            obj.insert("hash".into(), Value::Null);
            put_bytes(&mut obj, "target", target);
        }
    }
    Value::Object(obj)
}

/// Prints one JSON document on stdout (see [`out_line`] for a stdout that fails).
pub fn print_json(value: &Value) {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| format!("{{\"error\": {{\"message\": \"{e}\"}}}}"));
    out_line(format_args!("{text}"));
}

/// Prints one JSON document on stdout and reports a failed write instead of ending the
/// process: for `velo run`, whose exit status is the command's and must survive a closed
/// stdout.
pub fn try_print_json(value: &Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()
}

/// Writes one line of the command's output on stdout. Output comes after a command's
/// work is done, so a failed write ends the process here: a reader that went away
/// (`| head`) ends it quietly with status 0, as other tools do; any other failure
/// (`> /dev/full`) is an error with its cause, status 1.
pub fn out_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        output_failed(&e);
    }
}

/// Ends the process after a failed write of the command's output (see [`out_line`]).
pub fn output_failed(e: &std::io::Error) -> ! {
    use std::io::Write as _;
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "velo: error: writing the output: {e}");
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_and_far_ahead_print() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(time(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(civil_time(-315_619_200), "1960-01-01T00:00:00");
        assert_eq!(civil_time(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(civil_time(1_764_547_200), "2025-12-01T00:00:00");
        // The extremes do not panic.
        let _ = time(i64::MIN);
        let _ = time(i64::MAX);
    }
}
