//! Typing on a guest's serial console during a scenario (`[[input]]`): QEMU's COM1
//! is a unix socket it listens on, with its output logged to the serial log
//! (`-chardev socket,...,logfile=LOG`); this connects as the client, keeps reading
//! (and dropping) the output so QEMU never blocks, and writes each input's text
//! once its `after` line has appeared in the log after the previous input.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::scenario::Input;

/// Types a scenario's inputs, in order.
pub struct Typist {
    socket: PathBuf,
    stream: Option<UnixStream>,
    log: PathBuf,
    inputs: Vec<Input>,
    next: usize,
    /// Where in the log the next input's `after` is looked for.
    from: usize,
}

impl Typist {
    /// Types `inputs` into QEMU's COM1 socket at `socket` as `log` grows.
    pub fn new(socket: &Path, log: &Path, inputs: &[Input]) -> Self {
        Self {
            socket: socket.to_path_buf(),
            stream: None,
            log: log.to_path_buf(),
            inputs: inputs.to_vec(),
            next: 0,
            from: 0,
        }
    }

    /// Connects once QEMU listens (a thread then drains the output) and types every
    /// input whose line has appeared.
    pub fn poll(&mut self) {
        if self.stream.is_none() {
            let Ok(s) = UnixStream::connect(&self.socket) else {
                return;
            };
            if let Ok(mut drain) = s.try_clone() {
                std::thread::spawn(move || {
                    let mut sink = [0u8; 4096];
                    while matches!(drain.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
            self.stream = Some(s);
        }
        while let Some(input) = self.inputs.get(self.next) {
            let Ok(log) = fs::read(&self.log) else { return };
            let Some(at) = find_from(&log, self.from, input.after.as_bytes()) else {
                return;
            };
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            if s.write_all(input.send.as_bytes()).is_err() {
                return;
            }
            self.from = at + input.after.len();
            self.next += 1;
        }
    }

    /// Inputs that were never typed (their line never appeared), for the report.
    pub fn untyped(&self) -> Vec<String> {
        self.inputs[self.next..]
            .iter()
            .map(|i| {
                format!(
                    "[[input]] never typed: its line {:?} did not appear",
                    i.after
                )
            })
            .collect()
    }
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let hay = hay.get(from..)?;
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn input(after: &str, send: &str) -> Input {
        Input {
            after: after.into(),
            send: send.into(),
        }
    }

    /// Each input waits for its line after the previous one was typed: the same
    /// prompt twice types twice only when it appears twice.
    #[test]
    fn inputs_are_typed_in_order_once_their_line_appears() {
        let dir = std::env::temp_dir().join(format!("typist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (sock, log) = (dir.join("s"), dir.join("log"));
        let _ = fs::remove_file(&sock);
        let mut t = Typist::new(
            &sock,
            &log,
            &[input("# ", "echo a\n"), input("# ", "echo b\n")],
        );
        t.poll();
        assert!(t.stream.is_none(), "nobody listens yet");
        let listener = UnixListener::bind(&sock).unwrap();
        fs::write(&log, "boot\n").unwrap();
        t.poll();
        let (mut qemu, _) = listener.accept().unwrap();
        assert_eq!(t.next, 0);
        fs::write(&log, "boot\n# ").unwrap();
        t.poll();
        assert_eq!(t.next, 1, "the first prompt types once");
        fs::write(&log, "boot\n# echo a\na\n# ").unwrap();
        t.poll();
        assert_eq!(t.next, 2);
        assert!(t.untyped().is_empty());
        let mut buf = [0u8; 14];
        qemu.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"echo a\necho b\n");
        // Output QEMU writes is drained, so it never blocks.
        qemu.write_all(&[b'x'; 1 << 20]).unwrap();
        drop(t);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn find_from_starts_where_told() {
        assert_eq!(find_from(b"ab ab", 0, b"ab"), Some(0));
        assert_eq!(find_from(b"ab ab", 1, b"ab"), Some(3));
        assert_eq!(find_from(b"ab", 9, b"ab"), None);
    }
}
