//! CPU time from `/proc`: of one process, of the PostgreSQL server when it runs on this
//! machine, and of a whole stack (manager, runners, the benchmark itself, the server)
//! over a phase of a scenario — where the machine's time went per unit of work.

use std::collections::HashMap;

use anyhow::Context;

use crate::report::Figure;
use crate::stack::Stack;

/// CPU time (user + system) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may contain spaces; the fields after it do not. After ") " come
    // field 3 (state) onwards, so utime (14) and stime (15) are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<u64>()? as f64)
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) / per_second)
}

/// The PostgreSQL server's main process, when it runs on this machine: the parent of the
/// backend serving `db`.
pub async fn postmaster(db: &tokio_postgres::Client) -> anyhow::Result<Option<u32>> {
    let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    Ok(parent(u32::try_from(backend)?))
}

/// The parent of process `pid` (PPid in /proc/<pid>/status), if `pid` is ours to see.
fn parent(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU seconds so far of the server `postmaster` and of each of its child processes
/// (backends, background workers), by pid.
pub fn server_cpu(postmaster: u32) -> HashMap<u32, f64> {
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|&pid| pid == postmaster || parent(pid) == Some(postmaster))
        .filter_map(|pid| Some((pid, cpu_seconds(pid).ok()?)))
        .collect()
}

/// CPU used between two [`server_cpu`] readings: processes present at both, plus the
/// whole life of those started in between (one that exited in between is lost).
pub fn cpu_delta(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, secs)| secs - before.get(pid).unwrap_or(&0.0))
        .sum()
}

/// The machine's CPU time so far from `/proc/stat`, in clock ticks: (busy, all). Idle
/// and I/O wait are not busy; everything else (user, system, interrupts, steal) is.
fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("malformed cpu line in /proc/stat")?;
    let all: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Ok((all - idle, all))
}

/// The processes of a [`Stack`] (its first manager and its runners), the benchmark and
/// the PostgreSQL server, with their CPU time when the meter started.
pub struct StackCpu {
    manager: (u32, f64),
    runners: Vec<(u32, f64)>,
    bench: (u32, f64),
    server: Option<(u32, HashMap<u32, f64>)>,
    machine: (u64, u64),
}

/// CPU seconds each part of the stack used over a phase; `postgres` is `None` when the
/// server is not on this machine.
pub struct CpuUsed {
    pub manager: f64,
    pub runners: f64,
    pub bench: f64,
    pub postgres: Option<f64>,
    /// Share of the machine's CPU time that was busy (by anything), 0–100.
    pub machine_busy_percent: f64,
}

impl StackCpu {
    /// Starts measuring `stack`'s processes, the benchmark and `db`'s server.
    pub async fn start(stack: &Stack, db: &tokio_postgres::Client) -> anyhow::Result<Self> {
        let reading = |pid: u32| cpu_seconds(pid).map(|secs| (pid, secs));
        Ok(Self {
            manager: reading(stack.manager_pid())?,
            // A runner killed by an earlier phase is gone from /proc: it counts nothing.
            runners: stack
                .runner_pids()
                .into_iter()
                .filter_map(|pid| reading(pid).ok())
                .collect(),
            bench: reading(std::process::id())?,
            server: postmaster(db)
                .await?
                .map(|postmaster| (postmaster, server_cpu(postmaster))),
            machine: machine_ticks()?,
        })
    }

    /// CPU used since [`StackCpu::start`]. A runner that exited since counts nothing.
    pub fn used(&self) -> CpuUsed {
        let since = |(pid, before): (u32, f64)| cpu_seconds(pid).map_or(0.0, |now| now - before);
        CpuUsed {
            manager: since(self.manager),
            runners: self.runners.iter().copied().map(since).sum(),
            bench: since(self.bench),
            postgres: self
                .server
                .as_ref()
                .map(|(postmaster, before)| cpu_delta(before, &server_cpu(*postmaster))),
            machine_busy_percent: machine_ticks().map_or(f64::NAN, |(busy, all)| {
                let (busy_before, all_before) = self.machine;
                100.0 * (busy - busy_before) as f64 / (all - all_before).max(1) as f64
            }),
        }
    }
}

impl CpuUsed {
    /// Microseconds of CPU per unit of work (`units` of them done), per part and in all,
    /// as figures named `names` (manager, runners, bench, postgres, all).
    pub fn per_unit(
        &self,
        scenario: &'static str,
        names: [&'static str; 5],
        units: f64,
    ) -> Vec<Figure> {
        let us = |secs: f64| secs * 1e6 / units.max(1.0);
        let [manager, runners, bench, postgres, all] = names;
        let mut figures = vec![
            Figure::new(scenario, manager, us(self.manager), "µs"),
            Figure::new(scenario, runners, us(self.runners), "µs"),
            Figure::new(scenario, bench, us(self.bench), "µs"),
        ];
        // Without the server's share (not on this machine) there is no total either.
        if let Some(server) = self.postgres {
            figures.push(Figure::new(scenario, postgres, us(server), "µs"));
            figures.push(Figure::new(
                scenario,
                all,
                us(server + self.manager + self.runners + self.bench),
                "µs",
            ));
        }
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_seconds, machine_ticks};

    #[test]
    fn reads_its_own_cpu_time_and_sees_it_grow() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut spin = 0u64;
        while cpu_seconds(pid).unwrap() <= before {
            assert!(std::time::Instant::now() < deadline, "CPU time never grew");
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
    }

    #[test]
    fn reads_the_machines_ticks_busy_within_all() {
        let (busy, all) = machine_ticks().unwrap();
        assert!(all > 0 && busy <= all, "busy {busy} of {all}");
    }
}
