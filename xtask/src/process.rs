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

/// Runs `cmd` in a new process group, killing the whole group after `timeout`, on
/// interruption, or once `marker` = (file, text) shows `text` in `file`.
pub fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
    marker: Option<(&Path, &str)>,
) -> Result<Outcome> {
    cmd.process_group(0);
    let shown = show_command(cmd);
    let mut child = cmd.spawn().ctx(|| format!("cannot start `{shown}`"))?;
    let deadline = Instant::now() + timeout;
    let mut last_marker_check = Instant::now();
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
        if let Some((file, text)) = marker {
            if last_marker_check.elapsed() >= Duration::from_millis(200) {
                last_marker_check = Instant::now();
                if let Ok(bytes) = std::fs::read(file) {
                    if String::from_utf8_lossy(&bytes).contains(text) {
                        stop(&mut child);
                        return Ok(Outcome::MarkerSeen);
                    }
                }
            }
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
}
