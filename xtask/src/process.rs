//! Running an emulator with a hard timeout in its own process group.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{show_command, Context, Result};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this status.
    Exited(i32),
    /// The process was killed by this signal (not by us).
    Signaled(i32),
    /// The hard timeout expired and the process group was killed.
    TimedOut,
    /// SIGINT/SIGTERM reached xtask; the process group was killed.
    Interrupted,
    /// The marker appeared in the watched file; the process group was killed.
    MarkerSeen,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag instead of killing xtask, so a running emulator
/// (in its own process group, out of reach of the terminal's Ctrl-C) is killed first.
pub fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    // SAFETY: `on_signal` is async-signal-safe (one atomic store), and replacing the
    // dispositions of SIGINT and SIGTERM affects only this process.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether SIGINT/SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// What a watcher passed to [`run_watched`] wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Keep running.
    Continue,
    /// Kill the emulator now ([`Outcome::MarkerSeen`]).
    Stop,
}

/// Runs `cmd` in a new process group, killing the whole group after `timeout`, on
/// interruption, or once `marker` = (file, text) shows `text` in `file`.
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
    marker: Option<(&Path, &str)>,
) -> Result<Outcome> {
    let mut last_marker_check = Instant::now();
    run_watched(cmd, timeout, &mut |_| {
        let Some((file, text)) = marker else {
            return Watch::Continue;
        };
        if last_marker_check.elapsed() < Duration::from_millis(200) {
            return Watch::Continue;
        }
        last_marker_check = Instant::now();
        match std::fs::read(file) {
            Ok(bytes) if String::from_utf8_lossy(&bytes).contains(text) => Watch::Stop,
            _ => Watch::Continue,
        }
    })
}

/// Runs `cmd` in a new process group, killing the whole group after `timeout` or on
/// interruption. While it runs, `watch` is called about every 20 ms with the time since
/// the start (it may take longer, e.g. to talk to the emulator); [`Watch::Stop`] kills
/// the group and gives [`Outcome::MarkerSeen`].
pub fn run_watched(
    cmd: &mut Command,
    timeout: Duration,
    watch: &mut dyn FnMut(Duration) -> Watch,
) -> Result<Outcome> {
    cmd.process_group(0);
    let shown = show_command(cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().ctx(|| format!("cannot start `{shown}`"))?;
    let deadline = started + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .ctx(|| "waiting for the emulator".to_string())?
        {
            // Whatever it left behind in its group goes too.
            kill_group(child.id(), libc::SIGKILL);
            return Ok(match (status.code(), status.signal()) {
                (Some(c), _) => Outcome::Exited(c),
                (None, Some(s)) => Outcome::Signaled(s),
                (None, None) => Outcome::Exited(-1),
            });
        }
        if interrupted() {
            stop(&mut child);
            return Ok(Outcome::Interrupted);
        }
        if Instant::now() >= deadline {
            stop(&mut child);
            return Ok(Outcome::TimedOut);
        }
        if watch(started.elapsed()) == Watch::Stop {
            stop(&mut child);
            return Ok(Outcome::MarkerSeen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group we created for the
    // child (its pgid is its pid); it touches no memory of ours.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// SIGTERM to the group, then SIGKILL after a grace period; reaps the child.
fn stop(child: &mut Child) {
    kill_group(child.id(), libc::SIGTERM);
    let grace = Instant::now() + Duration::from_secs(2);
    while Instant::now() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            kill_group(child.id(), libc::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_group(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_and_timeout() {
        let o = run_with_timeout(
            Command::new("sh").args(["-c", "exit 35"]),
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        assert_eq!(o, Outcome::Exited(35));
        let t = Instant::now();
        // The grandchild `sleep` is in the same group and must die too.
        let o = run_with_timeout(
            Command::new("sh").args(["-c", "sleep 30; exit 0"]),
            Duration::from_millis(300),
            None,
        )
        .unwrap();
        assert_eq!(o, Outcome::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn marker() {
        let f = std::env::temp_dir().join(format!("xtask-marker-{}", std::process::id()));
        let script = format!(
            "echo booting > {0}; sleep 0.3; echo 'hv: boot summary' >> {0}; sleep 30",
            f.display()
        );
        let o = run_with_timeout(
            Command::new("sh").args(["-c", &script]),
            Duration::from_secs(20),
            Some((&f, "hv: boot summary")),
        )
        .unwrap();
        assert_eq!(o, Outcome::MarkerSeen);
        let _ = std::fs::remove_file(f);
    }

    #[test]
    fn watcher_sees_time_and_stops() {
        let mut calls = 0;
        let mut last = Duration::ZERO;
        let o = run_watched(
            Command::new("sh").args(["-c", "sleep 30"]),
            Duration::from_secs(20),
            &mut |t| {
                calls += 1;
                assert!(t >= last);
                last = t;
                if t >= Duration::from_millis(200) {
                    Watch::Stop
                } else {
                    Watch::Continue
                }
            },
        )
        .unwrap();
        assert_eq!(o, Outcome::MarkerSeen);
        assert!(
            calls > 2 && last < Duration::from_secs(5),
            "{calls} {last:?}"
        );
    }
}
