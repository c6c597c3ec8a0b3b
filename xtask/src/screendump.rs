//! Screendumps of the virtio-gpu's heads while QEMU runs, through QMP on a unix
//! socket: the `[[screendump]]` checks of scenarios ([`Session`]) and the periodic
//! PNGs of `cargo xtask run --screenshots DIR` ([`screenshot_loop`]).

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::image::{self, Image};
use crate::scenario::{Scenario, Screendump, ShotExpect, MIN_PRESENT_SHARE};
use crate::{qemu, Context, Paths, Result};

/// The background colour of VM `id`'s test pattern, as guests draw it.
pub use gpu_pv::abi::guest::vm_color;

/// A QMP connection.
pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying for up to `wait` while QEMU
    /// starts, unless `stop` is set) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, wait: Duration, stop: &AtomicBool) -> Result<Qmp> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline || stop.load(Ordering::SeqCst) => {
                    return Err(format!("cannot connect to QMP at {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ctx(|| "QMP: cannot set a read timeout".to_string())?;
        let mut q = Qmp {
            stream: BufReader::new(stream),
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .ctx(|| "QMP: read failed".to_string())?;
        if n == 0 {
            return Err("QMP: connection closed (QEMU exited?)".into());
        }
        serde_json::from_str(&line).ctx(|| format!("QMP: bad message {:?}", line.trim()))
    }

    /// Runs one command; its `return` value, or its error's description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.stream
            .get_mut()
            .write_all(text.as_bytes())
            .ctx(|| format!("QMP: cannot send {command}"))?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(format!("QMP {command}: {desc}"));
            }
            // Asynchronous events ({"event": ...}) are skipped.
        }
    }

    /// Dumps head `head` of the GPU to `file` as PPM (QEMU's default format; the
    /// `format` argument only exists from QEMU 7.1).
    pub fn screendump(&mut self, file: &Path, head: u32) -> Result<()> {
        let args = json!({
            "filename": file.to_string_lossy(),
            "device": qemu::GPU_ID,
            "head": head,
        });
        self.execute("screendump", Some(args)).map(|_| ())
    }
}

/// A unix socket path for QMP: in `dir` when short enough for `sun_path` (108
/// bytes), else in the temporary directory.
pub fn socket_path(dir: &Path, tag: &str) -> PathBuf {
    let p = dir.join("qmp.sock");
    if p.as_os_str().len() < 100 && !p.to_string_lossy().contains(',') {
        return p;
    }
    std::env::temp_dir().join(format!("xtask-{}-{tag}.qmp", std::process::id()))
}

/// Takes a dump of `head` into `ppm`, reads it back and writes a PNG copy next to it.
fn dump_head(qmp: &mut Qmp, ppm: &Path, head: u32) -> Result<Image> {
    let _ = fs::remove_file(ppm);
    qmp.screendump(ppm, head)?;
    let bytes = fs::read(ppm).ctx(|| format!("cannot read {}", ppm.display()))?;
    let img = Image::parse_ppm(&bytes).map_err(|e| format!("{}: {e}", ppm.display()))?;
    let png = ppm.with_extension("png");
    fs::write(&png, img.to_png()).ctx(|| format!("cannot write {}", png.display()))?;
    Ok(img)
}

/// Pixel facts for messages: size and dominant colour.
pub fn facts(img: &Image) -> String {
    let d = img.dominant();
    let mut s = format!(
        "{}x{}, dominant colour {} ({:.1} % of the pixels)",
        img.width,
        img.height,
        image::hex(d.color),
        d.share * 100.0
    );
    if img.is_qemu_placeholder() {
        s.push_str(": QEMU's \"Guest has not initialized the display\" screen");
    }
    s
}

/// Checks head `spec.heads[i]`'s dump against `spec.expect` as one picture (`bands`
/// is not looked at; see [`check_shot`]); the problem, if any.
pub fn check_head(spec: &Screendump, i: usize, img: &Image) -> Option<String> {
    let placeholder = img.is_qemu_placeholder();
    match spec.expect {
        ShotExpect::Any => None,
        ShotExpect::Initialized if placeholder => Some(format!(
            "expected a guest-drawn display, got {}",
            facts(img)
        )),
        ShotExpect::Initialized if img.share_near(0, spec.tolerance()) >= 1.0 => Some(format!(
            "expected a guest-drawn display, got a blank head (every pixel within ±{} of black): {}",
            spec.tolerance(),
            facts(img)
        )),
        ShotExpect::Initialized => None,
        ShotExpect::NotInitialized if !placeholder => Some(format!(
            "expected QEMU's \"Guest has not initialized the display\" screen, got {}",
            facts(img)
        )),
        ShotExpect::NotInitialized => None,
        ShotExpect::VmColors | ShotExpect::Colors => check_color(spec, i, img, false),
        ShotExpect::ColorsPresent => check_present(spec, img),
    }
}

/// The `colors-present` check: every listed colour covers at least
/// [`MIN_PRESENT_SHARE`] of `img`; the problem names those that do not.
fn check_present(spec: &Screendump, img: &Image) -> Option<String> {
    let tol = spec.tolerance();
    let missing: Vec<String> = spec
        .colors
        .iter()
        .flatten()
        .filter_map(|c| c.rgb().ok())
        .filter_map(|c| {
            let share = img.share_near(c, tol);
            (share < MIN_PRESENT_SHARE)
                .then(|| format!("{} ({:.1} %)", image::hex(c), share * 100.0))
        })
        .collect();
    if missing.is_empty() && !img.is_qemu_placeholder() {
        return None;
    }
    Some(format!(
        "expected each of the listed colours on at least {:.0} % of the pixels (±{tol}); short: {}; got {}",
        MIN_PRESENT_SHARE * 100.0,
        if missing.is_empty() { "none".to_string() } else { missing.join(", ") },
        facts(img)
    ))
}

/// The colour check of `expected_color(slot)` on `img` (a head or one band of it);
/// `whole_placeholder`: the head `img` is a band of is QEMU's not-initialized screen.
fn check_color(
    spec: &Screendump,
    slot: usize,
    img: &Image,
    whole_placeholder: bool,
) -> Option<String> {
    let (want, why) = spec.expected_color(slot)?;
    let tol = spec.tolerance();
    let d = img.dominant();
    let own_placeholder = img.is_qemu_placeholder();
    if !own_placeholder && !whole_placeholder && image::colors_match(d.color, want, tol) {
        return None;
    }
    let whole = if whole_placeholder && !own_placeholder {
        " (the whole head is QEMU's \"Guest has not initialized the display\" screen)"
    } else {
        ""
    };
    Some(format!(
        "expected dominant colour {} ({why}) ±{tol}, got {}{whole}; {:.1} % of the pixels are within ±{tol} of {}",
        image::hex(want),
        facts(img),
        img.share_near(want, tol) * 100.0,
        image::hex(want)
    ))
}

/// `band b (rows y0-y1)`, for messages.
fn band_label(height: u32, band: u32, bands: u32) -> String {
    match image::band_rows(height, band, bands) {
        Some((y0, y1)) => format!("band {band} (rows {y0}-{})", y1 - 1),
        None => format!("band {band}"),
    }
}

/// Checks head `spec.heads[i]`'s dump against `spec.expect`: the whole image, or with
/// `bands = N > 1` each of its N equal horizontal bands on its own (band `b` against
/// `expected_color(slot(i, b))`, and none may be part of QEMU's not-initialized
/// screen). The problems; with bands, each starts with `band b (rows y0-y1): `.
pub fn check_shot(spec: &Screendump, i: usize, img: &Image) -> Vec<String> {
    let bands = spec.bands();
    if bands <= 1 {
        return check_head(spec, i, img).into_iter().collect();
    }
    if img.height < bands {
        return vec![format!(
            "{}x{} has fewer rows than `bands = {bands}`",
            img.width, img.height
        )];
    }
    if !matches!(spec.expect, ShotExpect::VmColors | ShotExpect::Colors) {
        return Vec::new();
    }
    let whole_placeholder = img.is_qemu_placeholder();
    let mut out = Vec::new();
    for b in 0..bands {
        let Some(band) = img.band(b, bands) else {
            continue;
        };
        if let Some(p) = check_color(spec, spec.slot(i, b), &band, whole_placeholder) {
            out.push(format!("{}: {p}", band_label(img.height, b, bands)));
        }
    }
    out
}

/// Fewest differing pixels that count as a new frame: a frame-number cell of the test
/// pattern is 36, the bar's step thousands, a console glyph more than this; single
/// pixels (noise, a cursor's dot) are not a frame.
pub const MIN_FRAME_PIXELS: u64 = 32;

/// The problem with `second` as the same head `secs` later showing a new frame.
fn changed_problem(first: &Image, second: &Image, secs: f64, what: &str) -> Option<String> {
    let (w, h) = (first.width, first.height);
    match first.differing_pixels(second) {
        None => Some(format!(
            "size changed in {secs} s ({w}x{h} then {}x{})",
            second.width, second.height
        )),
        Some(0) => Some(format!(
            "did not change in {secs} s (two identical {w}x{h} {what})"
        )),
        Some(n) if n < MIN_FRAME_PIXELS => Some(format!(
            "did not change in {secs} s: only {n} pixel{} of {w}x{h} differ (a new frame \
             changes at least {MIN_FRAME_PIXELS})",
            if n == 1 { "" } else { "s" }
        )),
        Some(_) => None,
    }
}

/// Checks that a head shows a new frame in the second of two dumps: same size, at
/// least [`MIN_FRAME_PIXELS`] pixels differ. The problem, if any. (What the second
/// dump shows is checked like the first, by [`check_shot`].)
pub fn check_changed(first: &Image, second: &Image, secs: f64) -> Option<String> {
    changed_problem(first, second, secs, "dumps")
}

/// [`check_changed`] for each of `bands` equal horizontal bands (a head showing several
/// VMs, each animating). The problems, each starting with `band b (rows y0-y1): ` when
/// `bands > 1`.
pub fn check_changed_bands(first: &Image, second: &Image, secs: f64, bands: u32) -> Vec<String> {
    if bands <= 1 || (first.width, first.height) != (second.width, second.height) {
        return check_changed(first, second, secs).into_iter().collect();
    }
    let mut out = Vec::new();
    for b in 0..bands {
        let (Some(x), Some(y)) = (first.band(b, bands), second.band(b, bands)) else {
            continue;
        };
        if let Some(p) = changed_problem(&x, &y, secs, "bands") {
            out.push(format!("{}: {p}", band_label(first.height, b, bands)));
        }
    }
    out
}

enum State {
    Waiting {
        /// Bit k: line k of the `after` trigger has appeared in the log.
        seen: u64,
    },
    Changing {
        due: Instant,
        first: Vec<(u32, Image)>,
    },
    Done,
}

/// The `[[screendump]]` tables of one QEMU scenario run: call [`Session::poll`] while
/// QEMU runs and [`Session::finish`] after.
pub struct Session<'a> {
    scenario: &'a Scenario,
    root: PathBuf,
    logs: PathBuf,
    socket: PathBuf,
    serial_log: PathBuf,
    qmp: Option<Qmp>,
    log: Vec<u8>,
    last_read: Option<Instant>,
    states: Vec<State>,
    problems: Vec<String>,
}

/// The file name prefix of the dumps of `[[screendump]]` number `index` (0-based).
pub fn dump_prefix(scenario: &str, index: usize) -> String {
    if index == 0 {
        scenario.to_string()
    } else {
        format!("{scenario}-{}", index + 1)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<'a> Session<'a> {
    /// A session for `scenario`, whose QEMU serves QMP on `socket` and writes COM1 to
    /// `serial_log`. Removes the dumps of earlier runs.
    pub fn new(
        paths: &Paths,
        scenario: &'a Scenario,
        socket: PathBuf,
        serial_log: PathBuf,
    ) -> Self {
        let logs = paths.logs_dir();
        for i in 0..scenario.screendump.len().max(1) {
            for h in 0..qemu::GPU_HEADS {
                for suffix in ["", "-b"] {
                    for ext in ["ppm", "png"] {
                        let f = format!("{}-head{h}{suffix}.{ext}", dump_prefix(&scenario.name, i));
                        let _ = fs::remove_file(logs.join(f));
                    }
                }
            }
        }
        Session {
            states: scenario
                .screendump
                .iter()
                .map(|_| State::Waiting { seen: 0 })
                .collect(),
            scenario,
            root: paths.root.clone(),
            logs,
            socket,
            serial_log,
            qmp: None,
            log: Vec::new(),
            last_read: None,
            problems: Vec::new(),
        }
    }

    /// Appends what the serial log gained since the last read (at most every 100 ms).
    fn refresh_log(&mut self) {
        if self
            .last_read
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_read = Some(Instant::now());
        if let Ok(mut f) = fs::File::open(&self.serial_log) {
            if f.seek(SeekFrom::Start(self.log.len() as u64)).is_ok() {
                let _ = f.read_to_end(&mut self.log);
            }
        }
    }

    fn problem(&mut self, i: usize, text: String) {
        let spec = &self.scenario.screendump[i];
        self.problems.push(format!(
            "screendump #{} ({}): {text}",
            i + 1,
            spec.trigger()
        ));
    }

    /// Dumps the heads of table `i`; the images of the heads that worked.
    fn take(&mut self, i: usize, suffix: &str) -> Vec<(u32, Image)> {
        if self.qmp.is_none() {
            match Qmp::connect(
                &self.socket,
                Duration::from_secs(10),
                &AtomicBool::new(false),
            ) {
                Ok(q) => self.qmp = Some(q),
                Err(e) => {
                    self.problem(i, e);
                    return Vec::new();
                }
            }
        }
        let prefix = dump_prefix(&self.scenario.name, i);
        let mut out = Vec::new();
        for &h in &self.scenario.screendump[i].heads {
            let ppm = self.logs.join(format!("{prefix}-head{h}{suffix}.ppm"));
            let Some(qmp) = self.qmp.as_mut() else { break };
            match dump_head(qmp, &ppm, h) {
                Ok(img) => out.push((h, img)),
                Err(e) => {
                    if e.contains("connection closed") {
                        self.qmp = None;
                    }
                    self.problem(i, format!("head {h}: {e}"));
                }
            }
        }
        out
    }

    fn png_of(&self, i: usize, head: u32, suffix: &str) -> String {
        let f = format!(
            "{}-head{head}{suffix}.png",
            dump_prefix(&self.scenario.name, i)
        );
        let p = self.logs.join(f);
        p.strip_prefix(&self.root)
            .unwrap_or(&p)
            .display()
            .to_string()
    }

    /// Takes the dumps whose time has come; `elapsed` is the time since QEMU started.
    pub fn poll(&mut self, elapsed: Duration) {
        if self.states.iter().all(|s| matches!(s, State::Done)) {
            return;
        }
        let wants_log = self.states.iter().enumerate().any(|(i, s)| {
            matches!(s, State::Waiting { .. }) && self.scenario.screendump[i].after.is_some()
        });
        if wants_log {
            self.refresh_log();
        }
        let sc: &'a Scenario = self.scenario;
        for i in 0..self.states.len() {
            let spec = &sc.screendump[i];
            let fire = match &mut self.states[i] {
                State::Waiting { seen } => match (&spec.after, spec.at_secs) {
                    (Some(a), _) => {
                        for (k, line) in a.lines().iter().enumerate() {
                            if *seen & (1 << k) == 0 && find(&self.log, line.as_bytes()).is_some() {
                                *seen |= 1 << k;
                            }
                        }
                        (0..a.lines().len()).all(|k| *seen & (1 << k) != 0)
                    }
                    (None, Some(t)) => elapsed.as_secs_f64() >= t,
                    (None, None) => false,
                },
                State::Changing { due, .. } => Instant::now() >= *due,
                State::Done => false,
            };
            if !fire {
                continue;
            }
            let state = std::mem::replace(&mut self.states[i], State::Done);
            match state {
                State::Waiting { .. } => {
                    let shots = self.take(i, "");
                    for (k, h) in spec.heads.iter().enumerate() {
                        let Some((_, img)) = shots.iter().find(|(hh, _)| hh == h) else {
                            continue;
                        };
                        for p in check_shot(spec, k, img) {
                            let png = self.png_of(i, *h, "");
                            self.problem(i, format!("head {h}: {p} ({png})"));
                        }
                    }
                    if let Some(secs) = spec.changes_after_secs {
                        self.states[i] = State::Changing {
                            due: Instant::now() + Duration::from_secs_f64(secs),
                            first: shots,
                        };
                    }
                }
                State::Changing { first, .. } => {
                    let secs = spec.changes_after_secs.unwrap_or(0.0);
                    let shots = self.take(i, "-b");
                    for (h, a) in &first {
                        let Some((_, b)) = shots.iter().find(|(hh, _)| hh == h) else {
                            continue;
                        };
                        let png = self.png_of(i, *h, "-b");
                        for p in check_changed_bands(a, b, secs, spec.bands()) {
                            self.problem(i, format!("head {h}: {p} ({png})"));
                        }
                        // The new frame must show what the first had to.
                        if let Some(k) = spec.heads.iter().position(|hh| hh == h) {
                            for p in check_shot(spec, k, b) {
                                self.problem(i, format!("head {h}: second dump: {p} ({png})"));
                            }
                        }
                    }
                }
                State::Done => {}
            }
        }
    }

    /// The problems found, including dumps never taken because QEMU ended first.
    pub fn finish(mut self) -> Vec<String> {
        for i in 0..self.states.len() {
            let spec = &self.scenario.screendump[i];
            let why = match &self.states[i] {
                State::Waiting { .. } if spec.after.is_some() => Some(
                    "not taken: the trigger never appeared in the serial log while QEMU ran"
                        .to_string(),
                ),
                State::Waiting { .. } => Some("not taken: QEMU ended first".to_string()),
                State::Changing { .. } => Some(format!(
                    "second dump (changes_after_secs = {}) not taken: QEMU ended first",
                    spec.changes_after_secs.unwrap_or(0.0)
                )),
                State::Done => None,
            };
            if let Some(w) = why {
                self.problem(i, w);
            }
        }
        self.problems
    }
}

/// `cargo xtask run --screenshots DIR`: every `every`, dumps each head to
/// `DIR/head<N>.png` (replaced atomically) until QEMU goes away or `stop` is set.
pub fn screenshot_loop(socket: &Path, dir: &Path, every: Duration, stop: &AtomicBool) {
    let mut qmp = match Qmp::connect(socket, Duration::from_secs(60), stop) {
        Ok(q) => q,
        Err(e) => {
            if !stop.load(Ordering::SeqCst) {
                eprint!("xtask: screenshots: {e}\r\n");
            }
            return;
        }
    };
    let mut warned = vec![false; qemu::SHOWN_HEADS as usize];
    loop {
        let round = Instant::now();
        for h in 0..qemu::SHOWN_HEADS {
            let ppm = dir.join(format!(".head{h}.ppm"));
            let r = qmp.screendump(&ppm, h).and_then(|()| {
                let bytes = fs::read(&ppm).ctx(|| format!("cannot read {}", ppm.display()))?;
                let img = Image::parse_ppm(&bytes)?;
                let tmp = dir.join(format!(".head{h}.png.tmp"));
                fs::write(&tmp, img.to_png()).ctx(|| format!("cannot write {}", tmp.display()))?;
                fs::rename(&tmp, dir.join(format!("head{h}.png")))
                    .ctx(|| "cannot rename the screenshot".to_string())
            });
            let _ = fs::remove_file(&ppm);
            if let Err(e) = r {
                if e.contains("connection closed") || e.contains("read failed") {
                    return;
                }
                if !warned[h as usize] {
                    warned[h as usize] = true;
                    eprint!("xtask: screenshots: head {h}: {e}\r\n");
                }
            }
        }
        while round.elapsed() < every {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::placeholder;
    use std::path::Path;

    fn scenario(tables: &str) -> Scenario {
        let text = format!(
            "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n{tables}"
        );
        Scenario::parse("shots", Path::new("shots.toml"), &text).unwrap()
    }

    /// A synthetic test pattern: the VM's colour with a white frame and a dark box.
    fn pattern(vm: u32) -> Image {
        let mut img = Image::new(320, 200, vm_color(vm));
        for x in 0..320 {
            for y in [0, 1, 198, 199] {
                img.set(x, y, 0xffffff);
            }
        }
        for x in 100..160 {
            for y in 50..100 {
                img.set(x, y, 0x101010);
            }
        }
        img
    }

    /// modetest's bars: each listed colour must cover its share; a head with one
    /// bar missing, or a single-colour head, fails and names what is short.
    #[test]
    fn colours_present_needs_every_listed_colour() {
        let s = scenario(
            "[[screendump]]\nafter = \"x\"\nheads = [0]\nexpect = \"colors-present\"\ncolors = [0xc0c000, 0x00c0c0, 0xc000c0]\n",
        );
        let spec = &s.screendump[0];
        let mut bars = Image::new(300, 100, 0);
        for (i, c) in [0xc0c000, 0x00c0c0, 0xc000c0].into_iter().enumerate() {
            for x in i as i64 * 100..i as i64 * 100 + 100 {
                for y in 0..100 {
                    bars.set(x, y, c);
                }
            }
        }
        assert_eq!(check_head(spec, 0, &bars), None);
        for y in 0..100 {
            for x in 200..300 {
                bars.set(x, y, 0);
            }
        }
        let p = check_head(spec, 0, &bars).unwrap();
        assert!(p.contains("short: #c000c0 (0.0 %)"), "{p}");
        assert!(check_head(spec, 0, &Image::new(300, 100, 0xc0c000)).is_some());
        assert!(check_head(spec, 0, &placeholder(640, 480)).is_some());
        let bad = "description = \"d\"\nemulators = [\"qemu\"]\nexpect_exit = \"pass\"\n[[screendump]]\nafter = \"x\"\nexpect = \"colors-present\"\n";
        assert!(
            Scenario::parse("s", Path::new("s.toml"), bad).is_err(),
            "needs colors"
        );
    }

    #[test]
    fn vm_colours_pass_and_fail_with_facts() {
        let s = scenario(
            "[[screendump]]\nafter = \"x\"\nheads = [0, 1, 2, 3]\nexpect = \"vm-colors\"\n",
        );
        let spec = &s.screendump[0];
        for i in 0..4 {
            assert_eq!(check_head(spec, i, &pattern(i as u32)), None);
        }
        // Head 1 showing VM 2's colours.
        let p = check_head(spec, 1, &pattern(2)).unwrap();
        assert!(
            p.contains("expected dominant colour #30a040 (vm_color(1)) ±16"),
            "{p}"
        );
        assert!(p.contains("got 320x200, dominant colour #3050c0"), "{p}");
        assert!(
            p.contains("0.0 % of the pixels are within ±16 of #30a040"),
            "{p}"
        );
        // The not-initialized screen never passes a colour check, even for black.
        let p = check_head(spec, 0, &placeholder(640, 480)).unwrap();
        assert!(p.contains("dominant colour #000000"), "{p}");
        assert!(p.contains("has not initialized"), "{p}");
        // Within tolerance.
        let mut near = pattern(0);
        near = Image {
            rgb: near.rgb.iter().map(|v| v.saturating_add(10)).collect(),
            ..near
        };
        assert_eq!(check_head(spec, 0, &near), None);
        // A VM mapping and a tighter tolerance.
        let s = scenario("[[screendump]]\nat_secs = 1\nheads = [3]\nvms = [5]\nexpect = \"vm-colors\"\ntolerance = 4\n");
        assert_eq!(check_head(&s.screendump[0], 0, &pattern(5)), None);
        assert!(check_head(&s.screendump[0], 0, &near).is_some());
        let mut near5 = pattern(5);
        near5 = Image {
            rgb: near5.rgb.iter().map(|v| v.saturating_add(10)).collect(),
            ..near5
        };
        assert!(check_head(&s.screendump[0], 0, &near5).is_some());
    }

    #[test]
    fn initialized_explicit_colours_and_any() {
        let s = scenario(
            "[[screendump]]\nat_secs = 2\nheads = [1]\nexpect = \"not-initialized\"\n\
             [[screendump]]\nat_secs = 2\nheads = [0]\nexpect = \"initialized\"\n\
             [[screendump]]\nat_secs = 2\nheads = [0, 1]\nexpect = \"colors\"\ncolors = [0x4c0d0d, \"#0d420d\"]\n\
             [[screendump]]\nat_secs = 2\n",
        );
        let ph = placeholder(640, 480);
        let d = &s.screendump;
        assert_eq!(check_head(&d[0], 0, &ph), None);
        assert!(check_head(&d[0], 0, &pattern(0))
            .unwrap()
            .contains("got 320x200"));
        assert_eq!(check_head(&d[1], 0, &pattern(0)), None);
        assert!(check_head(&d[1], 0, &ph)
            .unwrap()
            .contains("has not initialized"));
        assert_eq!(check_head(&d[2], 0, &Image::new(8, 8, 0x4c0d0d)), None);
        assert_eq!(check_head(&d[2], 1, &Image::new(8, 8, 0x0d420d)), None);
        assert!(check_head(&d[2], 1, &Image::new(8, 8, 0x4c0d0d)).is_some());
        assert_eq!(d[3].heads, vec![0, 1, 2, 3]);
        assert_eq!(check_head(&d[3], 0, &ph), None);
    }

    #[test]
    fn changes() {
        let a = pattern(0);
        let mut b = a.clone();
        assert!(check_changed(&a, &b, 1.0)
            .unwrap()
            .contains("did not change in 1 s"));
        // One pixel (noise, a blinking cursor's dot) is not a frame.
        b.set(5, 5, 0x123456);
        let p = check_changed(&a, &b, 1.0).unwrap();
        assert!(p.contains("only 1 pixel"), "{p}");
        // A frame: at least MIN_FRAME_PIXELS differ (a frame-number cell is 36).
        for x in 0..6 {
            for y in 0..6 {
                b.set(10 + x, 10 + y, 0xffd000);
            }
        }
        assert_eq!(check_changed(&a, &b, 1.0), None);
        // A dump of another size is not "the same head, changed".
        let p = check_changed(&a, &Image::new(1, 1, 0), 1.0).unwrap();
        assert!(p.contains("size changed"), "{p}");
        let p = check_changed_bands(&a, &Image::new(1, 2, 0), 1.0, 2);
        assert!(p.len() == 1 && p[0].contains("size changed"), "{p:?}");
    }

    #[test]
    fn a_blank_head_is_not_initialized() {
        let s = scenario("[[screendump]]\nat_secs = 1\nexpect = \"initialized\"\n");
        let d = &s.screendump[0];
        let p = check_head(d, 0, &Image::new(64, 48, 0)).unwrap();
        assert!(p.contains("blank"), "{p}");
        // Near-black noise is blank too; a console's text on black is not.
        let p = check_head(d, 0, &Image::new(64, 48, 0x080808)).unwrap();
        assert!(p.contains("blank"), "{p}");
        let mut text = Image::new(64, 48, 0);
        for x in 8..16 {
            text.set(x, 8, 0xc0c0c0);
        }
        assert_eq!(check_head(d, 0, &text), None);
    }

    /// Images of equal width stacked top to bottom: one head showing several VMs.
    fn stack(parts: &[Image]) -> Image {
        Image {
            width: parts[0].width,
            height: parts.iter().map(|p| p.height).sum(),
            rgb: parts.iter().flat_map(|p| p.rgb.iter().copied()).collect(),
        }
    }

    #[test]
    fn vm_colours_per_band() {
        let s = scenario(
            "[[screendump]]\nat_secs = 1\nheads = [0, 1]\nbands = 2\nexpect = \"vm-colors\"\n\
             [[screendump]]\nat_secs = 1\nheads = [3]\nbands = 3\nexpect = \"vm-colors\"\nvms = [9, 4, 0]\n\
             [[screendump]]\nat_secs = 1\nheads = [2]\nbands = 2\nexpect = \"colors\"\ncolors = [0x4c0d0d, \"#0d420d\"]\n",
        );
        let d = &s.screendump;
        // Head 0 shows VMs 0 and 1, head 1 VMs 2 and 3 (the defaults).
        assert_eq!(
            check_shot(&d[0], 0, &stack(&[pattern(0), pattern(1)])),
            Vec::<String>::new()
        );
        assert_eq!(
            check_shot(&d[0], 1, &stack(&[pattern(2), pattern(3)])),
            Vec::<String>::new()
        );
        // The bands of head 1 swapped: both fail, each naming its band and its VM.
        let p = check_shot(&d[0], 1, &stack(&[pattern(3), pattern(2)]));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("band 0 (rows 0-199): expected dominant colour #3050c0 (vm_color(2)) ±16, got 320x200, dominant colour #c0a020"),
            "{}",
            p[0]
        );
        assert!(p[1].starts_with("band 1 (rows 200-399): "), "{}", p[1]);
        assert!(
            p[1].contains("(vm_color(3))") && p[1].contains("dominant colour #3050c0"),
            "{}",
            p[1]
        );
        // One VM filling the whole head passes a whole-head check but not the bands.
        let whole = stack(&[pattern(0), pattern(0)]);
        assert_eq!(check_head(&d[0], 0, &whole), None);
        let p = check_shot(&d[0], 0, &whole);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "band 1 (rows 200-399): expected dominant colour #30a040 (vm_color(1))"
            ),
            "{}",
            p[0]
        );
        // Explicit VMs, three bands; rows left over at the bottom belong to no band.
        let mut odd = stack(&[
            pattern(9),
            pattern(4),
            pattern(0),
            Image::new(320, 2, 0xffffff),
        ]);
        assert_eq!(odd.height, 602);
        assert_eq!(check_shot(&d[1], 0, &odd), Vec::<String>::new());
        odd.set(0, 601, 0x123456);
        assert_eq!(check_shot(&d[1], 0, &odd), Vec::<String>::new());
        let p = check_shot(&d[1], 0, &stack(&[pattern(9), pattern(5), pattern(0)]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("band 1 (rows 200-399): expected dominant colour"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("(vm_color(4))"), "{}", p[0]);
        // Explicit colours per band.
        let two = stack(&[Image::new(8, 4, 0x4c0d0d), Image::new(8, 4, 0x0d420d)]);
        assert_eq!(check_shot(&d[2], 0, &two), Vec::<String>::new());
        let p = check_shot(&d[2], 0, &Image::new(8, 8, 0x4c0d0d));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("band 1 (rows 4-7): expected dominant colour #0d420d (colors[1])"),
            "{}",
            p[0]
        );
        // Too few rows to split.
        let p = check_shot(&d[1], 0, &Image::new(8, 2, vm_color(9)));
        assert_eq!(p, ["8x2 has fewer rows than `bands = 3`"]);
    }

    #[test]
    fn bands_of_the_not_initialized_screen_fail() {
        // 480 rows in three bands: QEMU's text lies in the middle band only, so the
        // others are plain black; all three fail, the black ones saying why.
        let s = scenario(
            "[[screendump]]\nat_secs = 1\nheads = [0]\nbands = 3\nexpect = \"colors\"\ncolors = [0, 0, 0]\n",
        );
        let p = check_shot(&s.screendump[0], 0, &placeholder(640, 480));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("band 0 (rows 0-159): "), "{}", p[0]);
        assert!(
            p[0].contains(
                "dominant colour #000000 (100.0 % of the pixels) (the whole head is QEMU's"
            ),
            "{}",
            p[0]
        );
        assert!(p[1].starts_with("band 1 (rows 160-319): "), "{}", p[1]);
        assert!(
            p[1].contains(": QEMU's \"Guest has not initialized the display\" screen;"),
            "{}",
            p[1]
        );
        assert!(!p[1].contains("whole head"), "{}", p[1]);
        assert!(p[2].contains("whole head"), "{}", p[2]);
        // Black bands on a head that is not the placeholder pass.
        assert_eq!(
            check_shot(&s.screendump[0], 0, &Image::new(640, 480, 0)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn changes_per_band() {
        /// A frame's worth of change: a 6x6 cell at (x, y).
        fn cell(img: &mut Image, x: i64, y: i64) {
            for dx in 0..6 {
                for dy in 0..6 {
                    img.set(x + dx, y + dy, 0x123456);
                }
            }
        }
        let a = stack(&[pattern(0), pattern(1), pattern(2)]);
        let mut b = a.clone();
        cell(&mut b, 10, 10);
        // Only band 0 changed.
        let p = check_changed_bands(&a, &b, 1.0, 3);
        assert_eq!(
            p,
            [
                "band 1 (rows 200-399): did not change in 1 s (two identical 320x200 bands)",
                "band 2 (rows 400-599): did not change in 1 s (two identical 320x200 bands)"
            ]
        );
        // The whole head changed, which is all one band asks.
        assert_eq!(check_changed_bands(&a, &b, 1.0, 1), Vec::<String>::new());
        cell(&mut b, 10, 210);
        cell(&mut b, 300, 590);
        assert_eq!(check_changed_bands(&a, &b, 1.0, 3), Vec::<String>::new());
        // A band where a single pixel changed did not show a new frame.
        let mut c = a.clone();
        cell(&mut c, 10, 10);
        cell(&mut c, 300, 590);
        c.set(100, 300, 0x654321);
        let p = check_changed_bands(&a, &c, 1.0, 3);
        assert!(
            p.len() == 1
                && p[0].starts_with("band 1 (rows 200-399): did not change in 1 s: only 1 pixel"),
            "{p:?}"
        );
        assert_eq!(
            check_changed_bands(&a, &a, 2.5, 1),
            ["did not change in 2.5 s (two identical 320x600 dumps)"]
        );
        assert_eq!(check_changed_bands(&a, &a, 1.0, 3).len(), 3);
        // A resize is not a new frame of the same head.
        let p = check_changed_bands(&a, &pattern(0), 1.0, 3);
        assert!(
            p.len() == 1 && p[0].contains("size changed in 1 s (320x600 then 320x200)"),
            "{p:?}"
        );
    }

    #[test]
    fn prefixes_sockets_and_search() {
        assert_eq!(dump_prefix("s", 0), "s");
        assert_eq!(dump_prefix("s", 2), "s-3");
        assert_eq!(
            socket_path(Path::new("/tmp/w"), "x"),
            Path::new("/tmp/w/qmp.sock")
        );
        let long = "/tmp/".to_string() + &"d".repeat(120);
        assert!(socket_path(Path::new(&long), "x").as_os_str().len() < 100);
        assert_eq!(find(b"abcdef", b"cd"), Some(2));
        assert_eq!(find(b"abc", b"abcd"), None);
    }

    /// A fake QMP server on a socket: greeting, capabilities, an event in between, a
    /// screendump that writes a PPM file and an error.
    #[test]
    fn qmp_client_against_a_fake_server() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("xtask-qmp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("q.sock");
        let _ = fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            writeln!(
                w,
                "{{\"QMP\": {{\"version\": {{}}, \"capabilities\": []}}}}"
            )
            .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"));
            writeln!(w, "{{\"return\": {{}}}}").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["execute"], "screendump");
            assert_eq!(v["arguments"]["device"], "gpu0");
            assert_eq!(v["arguments"]["head"], 2);
            let file = v["arguments"]["filename"].as_str().unwrap().to_string();
            let mut ppm = b"P6\n2 1\n255\n".to_vec();
            ppm.extend_from_slice(&[0xc0, 0x30, 0x30, 0, 0, 0]);
            fs::write(file, ppm).unwrap();
            writeln!(
                w,
                "{{\"event\": \"X\", \"data\": {{}}}}\r\n{{\"return\": {{}}}}"
            )
            .unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            writeln!(w, "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"Device gpu0 (head 7) is not bound to a QemuConsole\"}}}}").unwrap();
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5), &AtomicBool::new(false)).unwrap();
        let ppm = dir.join("d-head2.ppm");
        let img = dump_head(&mut q, &ppm, 2).unwrap();
        assert_eq!(img.get(0, 0), Some(0xc03030));
        let png = fs::read(dir.join("d-head2.png")).unwrap();
        assert_eq!(crate::image::tests::decode_png(&png), img);
        let e = q.screendump(&dir.join("x.ppm"), 7).unwrap_err();
        assert!(e.contains("not bound"), "{e}");
        server.join().unwrap();
        let e = q.screendump(&dir.join("x.ppm"), 0).unwrap_err();
        assert!(e.contains("connection closed") || e.contains("QMP"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
