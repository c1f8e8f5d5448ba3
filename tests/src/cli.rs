//! Running the `agentrun` command line as a real process in tests, with its output
//! captured as it arrives.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{TestApp, binary};

/// How long a client command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Output shared with the thread draining one pipe of the child.
type Sink = Arc<Mutex<Vec<u8>>>;

/// An `agentrun` process with its stdout and stderr captured as they arrive.
pub struct CliProcess {
    child: Child,
    stdout: Sink,
    stderr: Sink,
    readers: Vec<JoinHandle<()>>,
}

/// How a finished `agentrun` process ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// `agentrun ARGS` talking to the manager at `addr`, with no tenant or OpenAI key
/// inherited from the environment (so the default profile is `scripted`).
pub fn agentrun_command(addr: SocketAddr, args: &[&str]) -> Command {
    let mut command = Command::new(binary("agentrun"));
    command
        .args(args)
        .env("AGENTRUN_MANAGER_URL", format!("http://{addr}"))
        .env_remove("AGENTRUN_TENANT")
        .env_remove("OPENAI_API_KEY")
        .env("NO_COLOR", "1");
    command
}

impl CliProcess {
    pub fn start(addr: SocketAddr, args: &[&str]) -> Self {
        Self::spawn(agentrun_command(addr, args))
    }

    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentrun");
        let (stdout, out_reader) = drain(child.stdout.take().expect("piped stdout"));
        let (stderr, err_reader) = drain(child.stderr.take().expect("piped stderr"));
        Self {
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGINT, as Ctrl-C would.
    pub fn interrupt(&self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
    }

    /// Waits until `check` holds for the output so far; panics with the output after
    /// `timeout`.
    pub async fn wait_output(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str, &str) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !check(&self.stdout(), &self.stderr()) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits (polling, so an in-process manager keeps running) until the process has
    /// exited and its output is drained; kills it and panics after `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("poll agentrun") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "agentrun did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        // The pipes close when the process exits; give the readers a moment to see it.
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies `pipe` into a shared buffer on a thread until EOF.
fn drain(mut pipe: impl Read + Send + 'static) -> (Sink, JoinHandle<()>) {
    let sink = Sink::default();
    let writer = sink.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            writer.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (sink, reader)
}

/// Runs `agentrun ARGS` to completion.
pub async fn agentrun(app: &TestApp, args: &[&str]) -> Finished {
    CliProcess::start(app.addr, args)
        .wait(COMMAND_TIMEOUT)
        .await
}
