//! The throwaway cluster starts, serves, and is removed on drop and after a SIGKILL.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentrun_manager::local_postgres::LocalPostgres;

/// Set in the re-executed test binary to make `sigkill_child_helper` act.
const CHILD_ENV: &str = "LOCAL_POSTGRES_SIGKILL_CHILD";

fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

fn port_refuses(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_cleaned(data_dir: &Path, port: u16, timeout: Duration) {
    let temp_dir = data_dir.parent().expect("data dir has a parent").to_owned();
    wait_until("the temp dir is removed", timeout, || !temp_dir.exists());
    wait_until("the port refuses connections", timeout, || {
        port_refuses(port)
    });
}

#[test]
fn start_query_create_database_and_drop() {
    let pg = LocalPostgres::start().expect("start local postgres");
    assert!(
        pg.url("postgres")
            .ends_with(&format!(":{}/postgres", pg.port()))
    );
    assert_eq!(psql(&pg.url("postgres"), "select 1"), "1");
    psql(&pg.url("postgres"), "create database app_test");
    assert_eq!(
        psql(&pg.url("app_test"), "select current_database()"),
        "app_test"
    );

    let (data_dir, port) = (pg.data_dir(), pg.port());
    assert!(data_dir.join("PG_VERSION").exists());
    drop(pg);
    // Drop is synchronous: the dir must already be gone, the port shortly after.
    assert!(!data_dir.exists(), "{} survived drop", data_dir.display());
    assert_cleaned(&data_dir, port, Duration::from_secs(10));
}

/// Not a test by itself: the body of the child process in `watchdog_cleans_up_after_sigkill`.
#[test]
fn sigkill_child_helper() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let pg = LocalPostgres::start().expect("start local postgres in child");
    println!(
        "LOCAL_PG port={} data_dir={}",
        pg.port(),
        pg.data_dir().display()
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn watchdog_cleans_up_after_sigkill() {
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "sigkill_child_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child test process");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (port, data_dir) = loop {
        let mut line = String::new();
        let n = stdout.read_line(&mut line).expect("read child stdout");
        assert!(n > 0, "child exited before reporting its cluster");
        // libtest prints "test sigkill_child_helper ... " on the same line first.
        if let Some((_, rest)) = line.trim().split_once("LOCAL_PG port=") {
            let (port, dir) = rest.split_once(" data_dir=").expect("data_dir field");
            break (port.parse::<u16>().expect("port"), PathBuf::from(dir));
        }
    };
    assert!(data_dir.exists());
    assert!(!port_refuses(port), "server should be up before the kill");

    child.kill().expect("SIGKILL child");
    // Deliberately not reaped until the end: the watchdog must treat a zombie
    // owner as dead (a non-reaping container init leaves exactly that).

    // Neither the watchdog nor postgres may hold the child's stdout open.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(stdout.read_to_end(&mut Vec::new()).is_ok()));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "child stdout never reached EOF"
    );

    assert_cleaned(&data_dir, port, Duration::from_secs(15));
    child.wait().expect("reap child");
}
