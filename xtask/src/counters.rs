//! The hypervisor's GPU-PV counters in a serial log: the periodic
//! `gpu-pv sample: {json}` lines become a utilization plot (`<name>-util.png`) and a
//! CSV, the last `gpu-pv counters: {json}` line (`GlobalCounters::write_json`) becomes
//! `<name>-counters.json`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::plot::{Chart, Series};
use crate::{screendump, Context, Paths, Result};

/// Prefix of the periodic utilization samples.
pub const SAMPLE_PREFIX: &str = "gpu-pv sample: ";
/// Prefix of the end-of-run counters.
pub const COUNTERS_PREFIX: &str = "gpu-pv counters: ";

/// One `gpu-pv sample:` line.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sample {
    /// Hypervisor time of the sample, in milliseconds.
    pub t_ms: u64,
    /// Every live VM.
    #[serde(default)]
    pub vms: Vec<VmSample>,
}

/// One VM in a [`Sample`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VmSample {
    /// VM id (its index in the configuration).
    pub vm: u32,
    /// VM name.
    #[serde(default)]
    pub name: String,
    /// GPU time used since the previous sample over the time between them, in ppm.
    #[serde(default)]
    pub util_ppm: u64,
    /// Operations completed so far.
    #[serde(default)]
    pub completed: u64,
    /// Bytes copied so far.
    #[serde(default)]
    pub bytes: u64,
}

/// What a serial log holds.
#[derive(Debug, Default)]
pub struct Capture {
    /// Samples in log order.
    pub samples: Vec<Sample>,
    /// The JSON of the last `gpu-pv counters:` line: its text (key order kept) and
    /// its parsed value.
    pub counters: Option<(String, serde_json::Value)>,
    /// Lines with either prefix that did not parse (line number, error).
    pub bad_lines: Vec<(usize, String)>,
}

/// The JSON after `prefix` on `line` (the prefix may follow other text, e.g. a log
/// level), or `None`.
fn after<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.find(prefix).map(|i| line[i + prefix.len()..].trim())
}

/// Collects samples and counters from a serial log.
pub fn parse_log(log: &str) -> Capture {
    let mut cap = Capture::default();
    for (i, line) in log.lines().enumerate() {
        if let Some(json) = after(line, SAMPLE_PREFIX) {
            match serde_json::from_str::<Sample>(json) {
                Ok(s) => cap.samples.push(s),
                Err(e) => cap.bad_lines.push((i + 1, format!("sample: {e}"))),
            }
        } else if let Some(json) = after(line, COUNTERS_PREFIX) {
            match serde_json::from_str::<serde_json::Value>(json) {
                Ok(v) if v.is_object() => cap.counters = Some((json.to_string(), v)),
                Ok(_) => cap
                    .bad_lines
                    .push((i + 1, "counters: not a JSON object".into())),
                Err(e) => cap.bad_lines.push((i + 1, format!("counters: {e}"))),
            }
        }
    }
    cap
}

/// The chart of per-VM utilization (percent) over time (seconds), one colour per VM
/// ([`screendump::vm_color`]), plus the sum over all VMs in black.
pub fn util_chart(name: &str, samples: &[Sample]) -> Chart {
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for s in samples {
        for v in &s.vms {
            let n = names.entry(v.vm).or_default();
            if n.is_empty() {
                n.clone_from(&v.name);
            }
        }
    }
    let mut series: Vec<Series> = names
        .iter()
        .map(|(&id, n)| {
            let points = samples
                .iter()
                .map(|s| {
                    s.vms
                        .iter()
                        .find(|v| v.vm == id)
                        .map(|v| (s.t_ms as f64 / 1000.0, v.util_ppm as f64 / 10_000.0))
                })
                .collect();
            Series {
                label: if n.is_empty() {
                    format!("vm {id}")
                } else {
                    format!("{n} ({id})")
                },
                color: screendump::vm_color(id),
                width: 2,
                points,
            }
        })
        .collect();
    let total: Vec<Option<(f64, f64)>> = samples
        .iter()
        .map(|s| {
            let sum: u64 = s.vms.iter().map(|v| v.util_ppm).sum();
            Some((s.t_ms as f64 / 1000.0, sum as f64 / 10_000.0))
        })
        .collect();
    let top = total.iter().flatten().map(|p| p.1).fold(100.0f64, f64::max);
    series.push(Series {
        label: "total".into(),
        color: 0x000000,
        width: 1,
        points: total,
    });
    Chart {
        title: format!("{name}: GPU utilization per VM"),
        x_label: "time since boot (s)".into(),
        y_label: "GPU %".into(),
        y_range: (0.0, (top / 20.0).ceil() * 20.0),
        series,
    }
}

/// The samples as CSV: `t_ms,vm,name,util_ppm,completed,bytes`.
pub fn samples_csv(samples: &[Sample]) -> String {
    let mut out = String::from("t_ms,vm,name,util_ppm,completed,bytes\n");
    for s in samples {
        for v in &s.vms {
            let name = v.name.replace([',', '"', '\n'], "_");
            out.push_str(&format!(
                "{},{},{name},{},{},{}\n",
                s.t_ms, v.vm, v.util_ppm, v.completed, v.bytes
            ));
        }
    }
    out
}

/// The files written by [`capture`].
#[derive(Debug, Default)]
pub struct Written {
    /// `<name>-counters.json`.
    pub counters: Option<PathBuf>,
    /// `<name>-util.png` and `<name>-util.csv`.
    pub plot: Option<(PathBuf, PathBuf)>,
    /// Samples plotted.
    pub samples: usize,
    /// Lines that did not parse.
    pub bad_lines: Vec<(usize, String)>,
}

impl Written {
    /// One line for the run's report, or `None` when nothing was found.
    pub fn summary(&self, paths: &Paths) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(c) = &self.counters {
            parts.push(format!("counters {}", paths.show(c)));
        }
        if let Some((png, _)) = &self.plot {
            parts.push(format!(
                "utilization plot {} ({} samples)",
                paths.show(png),
                self.samples
            ));
        }
        if let Some((line, e)) = self.bad_lines.first() {
            parts.push(format!(
                "{} unparsable gpu-pv line(s), first at line {line}: {e}",
                self.bad_lines.len()
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Reads `serial_log` and, if it has them, writes `<logs>/<name>-counters.json` (the
/// JSON of the last counters line, as printed) and `<logs>/<name>-util.png` + `-util.csv`
/// (the samples). Stale files of an earlier run of `name` are removed first.
pub fn capture(logs: &Path, name: &str, serial_log: &Path) -> Result<Written> {
    let json_path = logs.join(format!("{name}-counters.json"));
    let png_path = logs.join(format!("{name}-util.png"));
    let csv_path = logs.join(format!("{name}-util.csv"));
    for f in [&json_path, &png_path, &csv_path] {
        let _ = fs::remove_file(f);
    }
    let bytes = fs::read(serial_log).unwrap_or_default();
    let log = String::from_utf8_lossy(&bytes);
    let cap = parse_log(&log);
    let mut w = Written {
        samples: cap.samples.len(),
        bad_lines: cap.bad_lines,
        ..Written::default()
    };
    if let Some((raw, _)) = &cap.counters {
        let text = format!("{raw}\n");
        fs::write(&json_path, text).ctx(|| format!("cannot write {}", json_path.display()))?;
        w.counters = Some(json_path);
    }
    if !cap.samples.is_empty() {
        let png = util_chart(name, &cap.samples).render().to_png();
        fs::write(&png_path, png).ctx(|| format!("cannot write {}", png_path.display()))?;
        fs::write(&csv_path, samples_csv(&cap.samples))
            .ctx(|| format!("cannot write {}", csv_path.display()))?;
        w.plot = Some((png_path, csv_path));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic serial log: two VMs sharing the GPU, vm1 leaving half-way, a
    /// malformed sample, some noise and two counters lines (the last one wins).
    pub(crate) fn synthetic_log() -> String {
        let mut log = String::from("\x1b[2Jboot: config ok\r\nhv: boot summary\n");
        for i in 0..40u64 {
            let t = 500 + i * 250;
            let a = 300_000 + (i * 37_000) % 400_000;
            let mut vms = format!(
                "{{\"vm\":0,\"name\":\"vm0\",\"util_ppm\":{a},\"completed\":{},\"bytes\":{}}}",
                i * 10,
                i * 4096
            );
            if i < 25 {
                vms.push_str(&format!(
                    ",{{\"vm\":1,\"name\":\"vm1\",\"util_ppm\":{},\"completed\":{i},\"bytes\":0}}",
                    900_000 - a
                ));
            }
            log.push_str(&format!(
                "gpu-pv sample: {{\"t_ms\":{t},\"vms\":[{vms}]}}\r\n"
            ));
            if i == 3 {
                log.push_str("[vm0] draw vm0: frame 20\n");
                log.push_str("gpu-pv sample: {\"t_ms\":oops}\n");
            }
        }
        log.push_str("gpu-pv counters: {\"elapsed_ns\":1,\"vms\":[]}\n");
        log.push_str("gpu-pv counters: {\"elapsed_ns\":10500000000,\"gpu_util_ppm\":640000,\"total\":{\"context_switches\":3},\"vms\":[{\"vm\":0,\"context_switches\":2}]}\r\n");
        log.push_str("HV-EXIT: PASS\n");
        log
    }

    #[test]
    fn parses_samples_and_last_counters() {
        let cap = parse_log(&synthetic_log());
        assert_eq!(cap.samples.len(), 40);
        assert_eq!(cap.samples[0].t_ms, 500);
        assert_eq!(cap.samples[0].vms.len(), 2);
        assert_eq!(cap.samples[39].vms.len(), 1);
        assert_eq!(cap.samples[1].vms[1].name, "vm1");
        assert_eq!(cap.samples[1].vms[0].completed, 10);
        assert_eq!(cap.bad_lines.len(), 1);
        assert_eq!(cap.bad_lines[0].0, 8);
        let (raw, c) = cap.counters.unwrap();
        assert!(raw.starts_with("{\"elapsed_ns\":10500000000,\"gpu_util_ppm\""));
        assert_eq!(c["gpu_util_ppm"], 640_000);
        assert_eq!(c["vms"][0]["context_switches"], 2);
        let none = parse_log("nothing here\n");
        assert!(none.samples.is_empty() && none.counters.is_none());
        // Unknown fields are tolerated (the hypervisor may add some).
        let cap = parse_log("gpu-pv sample: {\"t_ms\":1,\"x\":2,\"vms\":[{\"vm\":3,\"new\":1}]}");
        assert_eq!(cap.samples[0].vms[0].vm, 3);
    }

    #[test]
    fn chart_series_and_csv() {
        let cap = parse_log(&synthetic_log());
        let chart = util_chart("demo", &cap.samples);
        assert_eq!(chart.series.len(), 3);
        assert_eq!(chart.series[0].label, "vm0 (0)");
        assert_eq!(chart.series[0].color, screendump::vm_color(0));
        assert_eq!(chart.series[1].color, screendump::vm_color(1));
        // vm1 is missing from the later samples: gaps, not zeros.
        assert!(chart.series[1].points[30].is_none());
        assert_eq!(chart.series[2].label, "total");
        assert_eq!(chart.series[2].points[0], Some((0.5, 90.0)));
        assert_eq!(chart.y_range, (0.0, 100.0));
        let img = chart.render();
        let red = img
            .colors()
            .filter(|&c| c == screendump::vm_color(0))
            .count();
        let green = img
            .colors()
            .filter(|&c| c == screendump::vm_color(1))
            .count();
        assert!(red > 1000 && green > 500, "{red} {green}");
        let csv = samples_csv(&cap.samples);
        assert!(csv.starts_with("t_ms,vm,name,util_ppm,completed,bytes\n500,0,vm0,300000,0,0\n"));
        assert_eq!(csv.lines().count(), 1 + 40 + 25);
    }

    #[test]
    fn capture_writes_files() {
        let dir = std::env::temp_dir().join(format!("xtask-counters-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("demo-qemu.log");
        fs::write(&log, synthetic_log()).unwrap();
        let w = capture(&dir, "demo", &log).unwrap();
        assert_eq!(w.samples, 40);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("demo-counters.json")).unwrap()).unwrap();
        assert_eq!(json["elapsed_ns"], 10_500_000_000u64);
        let png = fs::read(dir.join("demo-util.png")).unwrap();
        let img = crate::image::tests::decode_png(&png);
        assert_eq!((img.width, img.height), (960, 480));
        // A log without samples removes the stale outputs.
        fs::write(&log, "HV-EXIT: PASS\n").unwrap();
        let w = capture(&dir, "demo", &log).unwrap();
        assert!(w.counters.is_none() && w.plot.is_none());
        assert!(!dir.join("demo-util.png").exists());
        assert!(!dir.join("demo-counters.json").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
