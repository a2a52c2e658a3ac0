//! An `rmc` process under test: its stdout and stderr read line by line on threads of their
//! own (every line kept, tagged with its stream), waits for its events (start it with
//! `rmc --json`) with deadlines, SIGKILLed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::kill_within;

/// The longest a killed process may take to go away and to end its output.
const EXIT: Duration = Duration::from_secs(30);

/// A line of a child's output: whether it came on stderr, and its text.
pub type Line = (bool, String);

fn forward_tagged(r: impl Read + Send + 'static, stderr: bool, tx: Sender<Line>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send((stderr, line));
        }
    });
}

/// An `rmc` process (see the module doc).
#[derive(Debug)]
pub struct Rmc {
    child: Child,
    what: String,
    out: Receiver<Line>,
    lines: Vec<Line>,
}

impl Rmc {
    /// Starts `cmd` (an `rmc` command line, possibly through `ip netns exec`); `what` names
    /// it in messages. No colours, no `RUST_LOG` from the test's environment.
    pub fn spawn(what: String, mut cmd: Command) -> Rmc {
        let mut child = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, out) = mpsc::channel();
        forward_tagged(child.stdout.take().expect("piped"), false, tx.clone());
        forward_tagged(child.stderr.take().expect("piped"), true, tx);
        Rmc {
            child,
            what,
            out,
            lines: Vec::new(),
        }
    }

    /// What it is, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits at most `deadline` for an event `E` on stdout (a JSON line of `rmc --json`, see
    /// the crate doc) that `pick` takes, keeping every line; returns what `pick` made of it.
    /// Panics, naming the `awaited` event, with everything the process printed if none comes.
    pub fn wait_event<E: FromStr, T>(
        &mut self,
        awaited: &str,
        deadline: Duration,
        mut pick: impl FnMut(E) -> Option<T>,
    ) -> T {
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    let (stderr, text) = line;
                    if !stderr {
                        if let Some(t) = text.parse().ok().and_then(&mut pick) {
                            return t;
                        }
                    }
                }
                Err(e) => panic!(
                    "{} reported no {awaited} ({}); it printed:\n{}",
                    self.what,
                    match e {
                        RecvTimeoutError::Timeout => format!("within {deadline:?}"),
                        RecvTimeoutError::Disconnected => "and ended its output".to_string(),
                    },
                    self.all()
                ),
            }
        }
    }

    /// Takes the lines printed so far without waiting.
    pub fn poll(&mut self) {
        while let Ok(line) = self.out.try_recv() {
            self.lines.push(line);
        }
    }

    /// The first event `E` on stdout read so far that `pick` takes.
    pub fn find_event<E: FromStr, T>(&self, mut pick: impl FnMut(E) -> Option<T>) -> Option<T> {
        self.lines
            .iter()
            .filter(|(stderr, _)| !stderr)
            .find_map(|(_, l)| l.parse().ok().and_then(&mut pick))
    }

    /// SIGKILLs the process and reaps it; returns when it is gone.
    pub fn kill(&mut self) -> Instant {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "{} had exited before it was to be killed:\n{}",
            self.what,
            self.all()
        );
        assert!(
            kill_within(&mut self.child, EXIT, &self.what),
            "{} did not go away after SIGKILL",
            self.what
        );
        Instant::now()
    }

    /// Ends the process (SIGKILL) and reads the rest of its output; returns how it had
    /// exited if it was gone already.
    pub fn finish(&mut self) -> Option<String> {
        let early = match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} had exited by itself: {status}", self.what)),
            _ => None,
        };
        kill_within(&mut self.child, EXIT, &self.what);
        let until = Instant::now() + EXIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    eprintln!("warning: the output of {} did not end", self.what);
                    break;
                }
            }
        }
        early
    }

    fn show(lines: &[Line]) -> String {
        lines
            .iter()
            .map(|(err, l)| format!("    {}{l}", if *err { "[stderr] " } else { "" }))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything read so far, stderr lines marked.
    pub fn all(&self) -> String {
        Self::show(&self.lines)
    }

    /// Everything read so far under a heading naming the process.
    pub fn report(&self) -> String {
        format!("  --- {}:\n{}", self.what, self.all())
    }

    /// The last `n` lines read, under a heading naming the process.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        format!(
            "  --- {} (last {} lines):\n{}",
            self.what,
            self.lines.len() - from,
            Self::show(&self.lines[from..])
        )
    }
}

impl Drop for Rmc {
    fn drop(&mut self) {
        kill_within(&mut self.child, EXIT, &self.what);
    }
}
