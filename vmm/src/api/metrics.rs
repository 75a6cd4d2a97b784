//! The metrics file: one JSON object per line, written on `FlushMetrics`
//! and every [`PERIOD`], as Firecracker writes its metrics
//! (`docs/metrics.md`): counters are what happened since the previous line,
//! so a consumer sums lines; `utc_timestamp_ms` dates each.
//!
//! Sections: `api_server` (requests by result), `vcpu` (VM exits by kind),
//! `vmm` (pauses, resumes, lines written and lost), `block` and `net` (the
//! sums over devices) and `block_<drive_id>`, `net_<iface_id>` per device:
//! the device's own counters (`devices::virtio::block::BlockMetrics`,
//! `net::NetMetrics`) with its transport's (`transport_*`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// How often lines are written without being asked.
pub const PERIOD: Duration = Duration::from_secs(60);

/// The metrics file and the values of the last line written.
#[derive(Debug)]
pub struct MetricsFile {
    file: File,
    previous: Map<String, Value>,
    /// Lines written, and lines lost to a full pipe or a write error.
    pub written: u64,
    /// Lines that could not be written.
    pub lost: u64,
    logged: bool,
}

impl MetricsFile {
    /// Opens (creating) `path` for appending; a named pipe is opened
    /// without waiting for a reader.
    pub fn open(path: &Path) -> io::Result<MetricsFile> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(MetricsFile {
            file,
            previous: Map::new(),
            written: 0,
            lost: 0,
            logged: false,
        })
    }

    /// Writes one line of what changed since the last line, given the
    /// current totals (an object of sections of counters).
    pub fn write(&mut self, totals: Map<String, Value>) -> io::Result<()> {
        let mut line = delta(&totals, &self.previous);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        line.insert("utc_timestamp_ms".into(), (now.as_millis() as u64).into());
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        match self.file.write_all(text.as_bytes()) {
            Ok(()) => {
                self.written += 1;
                self.previous = totals;
                Ok(())
            }
            Err(e) => {
                // The counters are not lost: the next line carries them.
                self.lost += 1;
                if !std::mem::replace(&mut self.logged, true) {
                    log::warn!("cannot write the metrics file: {e} (logged once)");
                }
                Err(e)
            }
        }
    }
}

/// `now - before`, leaf by leaf (numbers subtract, wrapping as counters do;
/// objects recurse; anything else is taken as it is now).
fn delta(now: &Map<String, Value>, before: &Map<String, Value>) -> Map<String, Value> {
    now.iter()
        .map(|(k, v)| {
            let d = match (v, before.get(k)) {
                (Value::Number(n), Some(Value::Number(b))) => match (n.as_u64(), b.as_u64()) {
                    (Some(n), Some(b)) => Value::from(n.wrapping_sub(b)),
                    _ => v.clone(),
                },
                (Value::Object(n), Some(Value::Object(b))) => Value::Object(delta(n, b)),
                _ => v.clone(),
            };
            (k.clone(), d)
        })
        .collect()
}

/// The sum of `sections`, leaf by leaf (for the `block` and `net` totals).
pub fn sum<'a>(sections: impl Iterator<Item = &'a Map<String, Value>>) -> Map<String, Value> {
    let mut total = Map::new();
    for s in sections {
        for (k, v) in s {
            if let Some(n) = v.as_u64() {
                let t = total.get(k).and_then(Value::as_u64).unwrap_or(0);
                total.insert(k.clone(), t.wrapping_add(n).into());
            }
        }
    }
    total
}

/// The fields of a serializable value as a section (an object), with an
/// optional prefix on each name.
pub fn section<T: serde::Serialize>(value: &T, prefix: &str) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect(),
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn lines_carry_what_changed_since_the_previous_line() {
        let path = std::env::temp_dir().join(format!("minivmm-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut m = MetricsFile::open(&path).unwrap();
        m.write(obj(
            json!({"block": {"reads": 5, "writes": 1}, "vmm": {"x": 1}}),
        ))
        .unwrap();
        m.write(obj(
            json!({"block": {"reads": 7, "writes": 1}, "vmm": {"x": 1}}),
        ))
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["block"]["reads"], 5);
        assert_eq!(lines[1]["block"]["reads"], 2);
        assert_eq!(lines[1]["block"]["writes"], 0);
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert_eq!(m.written, 2);
    }

    #[test]
    fn sums_and_sections_are_per_field() {
        let a = obj(json!({"reads": 1, "name": "x"}));
        let b = obj(json!({"reads": 2, "writes": 3}));
        assert_eq!(
            Value::Object(sum([&a, &b].into_iter())),
            json!({"reads": 3, "writes": 3})
        );
        #[derive(serde::Serialize)]
        struct S {
            a: u64,
        }
        assert_eq!(Value::Object(section(&S { a: 4 }, "p_")), json!({"p_a": 4}));
    }
}
