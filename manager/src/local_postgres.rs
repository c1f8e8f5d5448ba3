//! Throwaway PostgreSQL clusters for tests and the `dev` command.
//!
//! [`LocalPostgres`] owns one temporary directory holding a freshly `initdb`-ed
//! cluster, its Unix socket and its log, and the postmaster serving it on
//! `127.0.0.1:<free port>`. Removing it must not depend on the owner exiting
//! cleanly: statics are never dropped and test processes get SIGKILLed. So
//! besides [`Drop`], `start` spawns a detached shell watchdog (own session,
//! stdio on /dev/null) that waits for the owner pid to disappear and then runs
//! the same cleanup script as `Drop`: SIGQUIT (immediate shutdown) to the
//! postmaster named in `postmaster.pid`, then `rm -rf` of the directory.
//!
//! PostgreSQL refuses to run as root, so when the effective uid is 0 every
//! server command runs as the `postgres` user through `runuser`.

use std::fmt;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Stops the postmaster of cluster dir `$1` immediately and deletes the dir.
/// Shared by `Drop` and the watchdog so both paths are exercised by tests.
/// Waits for `postmaster.pid` to vanish (postgres removes it on exit) so the
/// port is free when this returns; SIGKILL is only a fallback after ~10 s.
const CLEANUP: &str = r#"
pf="$1/data/postmaster.pid"
pm=$(head -n 1 "$pf" 2>/dev/null)
if [ -n "$pm" ] && kill -QUIT "$pm" 2>/dev/null; then
  i=0
  while [ -f "$pf" ] && kill -0 "$pm" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  [ -f "$pf" ] && kill -KILL "$pm" 2>/dev/null
fi
rm -rf "$1"
"#;

/// Polls owner pid `$2`; HUP/INT are ignored so a closing terminal or Ctrl-C
/// cannot kill the watchdog before the cleanup it exists for. A zombie owner
/// counts as dead: containers whose init never reaps would keep it forever.
const WATCHDOG_LOOP: &str = r#"trap '' HUP INT
while kill -0 "$2" 2>/dev/null && ! grep -qs '^State:[[:space:]]*Z' "/proc/$2/status"; do sleep 0.5; done
"#;

/// Retries when the port picked via `bind(0)` was taken before postgres bound it.
const START_ATTEMPTS: u32 = 5;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running throwaway PostgreSQL cluster; stopped and deleted on drop.
pub struct LocalPostgres {
    dir: PathBuf,
    port: u16,
    watchdog: Option<Child>,
}

/// TLS for a [`LocalPostgres`], for tests of encrypted connections to the database.
#[derive(Debug, Clone, Copy)]
pub struct ServerTls<'a> {
    /// PEM certificate (chain) the server presents.
    pub cert_pem: &'a str,
    /// PEM private key of `cert_pem`.
    pub key_pem: &'a str,
    /// Refuse unencrypted TCP connections (`hostssl` only in `pg_hba.conf`).
    pub require: bool,
}

/// Why a [`LocalPostgres`] could not be started.
#[derive(Debug)]
pub enum LocalPostgresError {
    /// No directory containing both `initdb` and `pg_ctl` was found.
    BinariesNotFound { searched: Vec<PathBuf> },
    /// Running as root, where PostgreSQL must run as `postgres`, but that user is missing.
    NoPostgresUser,
    /// A filesystem operation or process spawn failed.
    Io { what: String, source: io::Error },
    /// `initdb` exited unsuccessfully; carries the tail of its output.
    InitDb { output: String },
    /// `pg_ctl start` failed or timed out; carries its output and the server log tail.
    Start { output: String },
}

impl fmt::Display for LocalPostgresError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BinariesNotFound { searched } => write!(
                f,
                "PostgreSQL server binaries not found (looked for initdb and pg_ctl in PATH, \
                 `pg_config --bindir` and /usr/lib/postgresql/*/bin; searched {searched:?}): \
                 install the postgresql package (Debian: apt-get install postgresql) or set DATABASE_URL"
            ),
            Self::NoPostgresUser => write!(
                f,
                "running as root but user `postgres` does not exist: PostgreSQL refuses to run as \
                 root; create it (useradd --system postgres), install the postgresql package, \
                 run as a non-root user, or set DATABASE_URL"
            ),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
            Self::InitDb { output } => write!(f, "initdb failed:\n{output}"),
            Self::Start { output } => write!(f, "PostgreSQL server failed to start:\n{output}"),
        }
    }
}

impl std::error::Error for LocalPostgresError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LocalPostgresError {
    let what = what.into();
    move |source| LocalPostgresError::Io { what, source }
}

impl LocalPostgres {
    /// Creates a cluster in a fresh temp dir, starts it on `127.0.0.1:<free port>`
    /// and returns once it accepts connections (`pg_ctl -w`, 30 s deadline).
    pub fn start() -> Result<LocalPostgres, LocalPostgresError> {
        Self::start_with(None, "")
    }

    /// Like [`Self::start`], with `ssl = on` and the given certificate and key.
    pub fn start_tls(tls: ServerTls<'_>) -> Result<LocalPostgres, LocalPostgresError> {
        Self::start_with(Some(tls), "")
    }

    /// Like [`Self::start`], with `settings` (`postgresql.conf` lines) added, such as
    /// `shared_preload_libraries` for the benchmark's statement statistics.
    pub fn start_configured(settings: &str) -> Result<LocalPostgres, LocalPostgresError> {
        Self::start_with(None, settings)
    }

    fn start_with(
        tls: Option<ServerTls<'_>>,
        settings: &str,
    ) -> Result<LocalPostgres, LocalPostgresError> {
        let bindir = find_bindir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        let owner = if as_root {
            Some(postgres_ids().ok_or(LocalPostgresError::NoPostgresUser)?)
        } else {
            None
        };

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("agentrun-pg-{}-{n}", std::process::id()));
        // Same pid and counter means a dead earlier process: the leftover is garbage.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        // From here on, `pg`'s Drop (or the watchdog) removes everything on any error.
        let mut pg = LocalPostgres {
            dir,
            port: 0,
            watchdog: None,
        };
        pg.watchdog = Some(spawn_watchdog(&pg.dir)?);
        let dir = pg.dir.clone();
        let data = dir.join("data");
        let log = data.join("log");

        if let Some((uid, gid)) = owner {
            // `postgres` must reach the dir and create the socket and data dir in it.
            ensure_traversable(&dir)?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(io_err(format!("cannot chown {}", dir.display())))?;
        }
        let server_cmd = |program: &str| {
            let path = bindir.join(program);
            let mut cmd = Command::new(if as_root { Path::new("runuser") } else { &path });
            if as_root {
                cmd.args(["-u", "postgres", "--"]).arg(&path);
            }
            // The caller's cwd may be unreadable for `postgres` (e.g. /root).
            cmd.current_dir(&dir).stdin(Stdio::null());
            cmd
        };

        let initdb_args = "-U postgres --auth=trust -E UTF8 --locale=C --no-sync".split(' ');
        let out = run(server_cmd("initdb").arg("-D").arg(&data).args(initdb_args))?;
        if !out.status.success() {
            return Err(LocalPostgresError::InitDb {
                output: tail(&output_text(&out)),
            });
        }
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n\
             synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 128MB\n",
            dir.display().to_string().replace('\'', "''")
        );
        conf.push_str(settings);
        conf.push('\n');
        if let Some(tls) = tls {
            configure_tls(&data, tls, owner)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(io_err("cannot append to postgresql.conf"))?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let _ = fs::remove_file(&log);
            // pg_ctl setsid()s the postmaster and points its stdio at the log,
            // so it holds none of our pipes and survives our process group.
            let mut pg_ctl = server_cmd("pg_ctl");
            pg_ctl
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!("-p {port}"));
            let out = run(pg_ctl.args(["-w", "-t", "30", "-s", "start"]))?;
            if out.status.success() {
                pg.port = port;
                return Ok(pg);
            }
            let server_log = fs::read_to_string(&log).unwrap_or_default();
            if attempt < START_ATTEMPTS && server_log.contains("could not bind") {
                continue;
            }
            return Err(LocalPostgresError::Start {
                output: tail(&format!("{}{server_log}", output_text(&out))),
            });
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` (trust auth, superuser `postgres`).
    /// `database` is inserted verbatim, so it must be URL-safe.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory; it and its parent temp dir are deleted on drop.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server (fast shutdown: open connections are closed) and waits for it
    /// to exit. The data directory stays; [`Self::restart`] brings it back. For tests
    /// of how clients behave while the database is away.
    pub fn stop(&self) -> Result<(), LocalPostgresError> {
        let mut pg_ctl = self.server_cmd("pg_ctl")?;
        pg_ctl.arg("-D").arg(self.data_dir());
        let out = run(pg_ctl.args(["-m", "fast", "-w", "-t", "30", "-s", "stop"]))?;
        if !out.status.success() {
            return Err(LocalPostgresError::Start {
                output: tail(&output_text(&out)),
            });
        }
        Ok(())
    }

    /// Starts a [stopped](Self::stop) server again, on the same data and port.
    pub fn restart(&self) -> Result<(), LocalPostgresError> {
        let data = self.data_dir();
        let mut pg_ctl = self.server_cmd("pg_ctl")?;
        pg_ctl
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(data.join("log"))
            .arg("-o")
            .arg(format!("-p {}", self.port));
        let out = run(pg_ctl.args(["-w", "-t", "30", "-s", "start"]))?;
        if !out.status.success() {
            let server_log = fs::read_to_string(data.join("log")).unwrap_or_default();
            return Err(LocalPostgresError::Start {
                output: tail(&format!("{}{server_log}", output_text(&out))),
            });
        }
        Ok(())
    }

    /// A server command for this cluster, run as `postgres` when we are root (as in
    /// [`Self::start`]).
    fn server_cmd(&self, program: &str) -> Result<Command, LocalPostgresError> {
        let path = find_bindir()?.join(program);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        let mut cmd = Command::new(if as_root { Path::new("runuser") } else { &path });
        if as_root {
            cmd.args(["-u", "postgres", "--"]).arg(&path);
        }
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        Ok(cmd)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let cleaned = Command::new("sh")
            .args(["-c", CLEANUP, "agentrun-pg-cleanup"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !cleaned {
            let _ = fs::remove_dir_all(&self.dir);
        }
        // Only now: had we died during cleanup, the watchdog would have finished it.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// Writes the server's certificate and key into the data dir (the key owned by the server's
/// user with mode 0600, or PostgreSQL refuses it) and, if TLS is required, a `pg_hba.conf`
/// that only admits encrypted TCP connections.
fn configure_tls(
    data: &Path,
    tls: ServerTls<'_>,
    owner: Option<(u32, u32)>,
) -> Result<(), LocalPostgresError> {
    for (name, pem, mode) in [
        ("server.crt", tls.cert_pem, 0o644),
        ("server.key", tls.key_pem, 0o600),
    ] {
        let path = data.join(name);
        let what = format!("cannot write {}", path.display());
        fs::write(&path, pem).map_err(io_err(what.clone()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err(what.clone()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io_err(what))?;
        }
    }
    if tls.require {
        let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n";
        fs::write(data.join("pg_hba.conf"), hba).map_err(io_err("cannot write pg_hba.conf"))?;
    }
    Ok(())
}

/// Spawns the watchdog in its own session with stdio on /dev/null, so it never
/// holds a test harness's pipes open and outlives Ctrl-C or terminal hangup.
/// If the owner dies while the server is still starting, `rm -rf` removes the
/// pid file and the postmaster shuts itself down at its next lock-file check.
fn spawn_watchdog(dir: &Path) -> Result<Child, LocalPostgresError> {
    let mut cmd = Command::new("sh");
    let script = format!("{WATCHDOG_LOOP}{CLEANUP}");
    cmd.args(["-c", &script, "agentrun-pg-watchdog"])
        .arg(dir)
        .arg(std::process::id().to_string())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe and touches no parent memory; it only
    // fails for a process-group leader, which a freshly forked child is not.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    cmd.spawn()
        .map_err(io_err("cannot spawn cleanup watchdog (sh)"))
}

/// First directory holding both `initdb` and `pg_ctl`: PATH, `pg_config --bindir`,
/// then /usr/lib/postgresql/*/bin, newest version first.
fn find_bindir() -> Result<PathBuf, LocalPostgresError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Ok(out) = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    // Empty PATH entries or pg_config output would mean the cwd: never look there.
    candidates.retain(|p| p.is_absolute());
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versioned.sort_by_key(|v| std::cmp::Reverse(v.0));
    candidates.extend(versioned.into_iter().map(|(_, p)| p));
    let is_exec = |p: PathBuf| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    candidates
        .iter()
        .find(|d| is_exec(d.join("initdb")) && is_exec(d.join("pg_ctl")))
        .cloned()
        .ok_or(LocalPostgresError::BinariesNotFound {
            searched: candidates,
        })
}

/// uid and gid of the `postgres` user, if it exists.
fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY: passwd is plain old data; all-zero is a valid placeholder.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` outlives our reads of `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            c"postgres".as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// Adds the search (o+x, not read) bit to ancestors of `dir` lacking it, so the
/// `postgres` user can reach a temp dir under e.g. a private TMPDIR.
fn ensure_traversable(dir: &Path) -> Result<(), LocalPostgresError> {
    for p in dir.ancestors() {
        let meta = fs::metadata(p).map_err(io_err(format!("cannot stat {}", p.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if p == dir { 0o755 } else { mode | 0o001 };
        if mode != wanted {
            let what = format!("cannot make {} traversable for user postgres", p.display());
            fs::set_permissions(p, fs::Permissions::from_mode(wanted)).map_err(io_err(what))?;
        }
    }
    Ok(())
}

/// A port that was free a moment ago; `start` retries if postgres loses the race.
fn free_port() -> Result<u16, LocalPostgresError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("cannot bind 127.0.0.1:0"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("cannot read local port"))
}

fn run(cmd: &mut Command) -> Result<Output, LocalPostgresError> {
    cmd.output().map_err(io_err(format!("cannot run {cmd:?}")))
}

fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&[&out.stdout[..], &out.stderr[..]].concat()).into_owned()
}

/// The last lines of a command's output: enough to see the error, not a flood.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
