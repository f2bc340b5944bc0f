//! A child daemon process: started with its stdout piped so the "listening on ADDR"
//! line tells where it listens, stderr to a log file; SIGKILL, SIGTERM, restart on the same
//! address; always killed on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// One running (or stopped) daemon.
#[derive(Debug)]
pub struct Proc {
    label: String,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    pub addr: SocketAddr,
}

impl Proc {
    /// Starts `binary` with `args` plus `--listen <listen>`, and waits for its
    /// "listening on ADDR" line. Panics (with the process's log) if it does not start.
    pub fn start(
        label: &str,
        binary: PathBuf,
        args: Vec<String>,
        listen: &str,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Self {
        Self::try_start(label, binary, args, listen, env, log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Proc::start`], returning the failure (with the process's log) instead.
    pub fn try_start(
        label: &str,
        binary: PathBuf,
        args: Vec<String>,
        listen: &str,
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self, String> {
        let mut proc = Self {
            label: label.to_string(),
            binary,
            args,
            child: None,
            log,
            addr: "127.0.0.1:0".parse().expect("an address"),
        };
        proc.spawn(listen, env, true)?;
        Ok(proc)
    }

    fn spawn(
        &mut self,
        listen: &str,
        env: &[(&str, &str)],
        wait_listening: bool,
    ) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("opening {}: {e}", self.log.display()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(&self.args)
            .arg("--listen")
            .arg(listen)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,h2=warn,tower=warn,hyper=warn,sled=warn".into()),
            )
            // Crash points are set per process, never inherited by accident.
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                // Keep draining after the first line so the child never blocks on stdout.
                if !sent && let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        self.child = Some(child);
        if !wait_listening {
            return Ok(());
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                self.addr = addr
                    .parse()
                    .map_err(|e| format!("{} printed a bad address {addr:?}: {e}", self.label))?;
                Ok(())
            }
            Err(_) => {
                self.kill9();
                Err(format!(
                    "{} did not start; its log:\n{}",
                    self.label,
                    self.logs()
                ))
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, like a power cut for this process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process stays alive, holds its sockets and answers nothing, like a
    /// VM frozen by its host.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGCONT);
        }
    }

    /// SIGTERM, then waits for the exit (killing it after 20 s).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Waits for the process to exit by itself (a crash point), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts it again on the same address and data, with `env` (e.g. FAILPOINTS).
    /// Panics if it does not start.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.try_restart(env).unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn try_restart(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        self.respawn(env, true)
    }

    /// Starts it again with a crash point set that fires before it serves, and waits for
    /// it to exit.
    pub fn restart_into_crash(
        &mut self,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Option<ExitStatus> {
        self.respawn(env, false).ok()?;
        self.wait_exit(timeout)
    }

    /// Starts it again without waiting for it to listen (it may stop at a crash point
    /// before it serves).
    pub fn restart_no_wait(&mut self, env: &[(&str, &str)]) -> Result<(), String> {
        self.respawn(env, false)
    }

    fn respawn(&mut self, env: &[(&str, &str)], wait_listening: bool) -> Result<(), String> {
        self.kill9();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old socket may linger for a moment after the kill.
        while std::net::TcpListener::bind(&listen).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn(&listen, env, wait_listening)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
