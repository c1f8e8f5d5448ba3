//! What the runner tells operators: Prometheus metrics and a health verdict, served on
//! `--health-listen` (`GET /metrics`, `GET /healthz`) and asked by `agentrun-runner
//! health`.
//!
//! Health is about the failure that looks alive and does nothing: a process that runs
//! but cannot take work. The runner is unhealthy when it has had no session with a
//! manager for longer than `--unhealthy-after-ms` (it keeps failing to connect, or was
//! refused), or when its session is open but the manager has answered nothing — not
//! even the heartbeats sent every interval — for that long (a stream stuck half-open).
//! A runner between two quick reconnects, or busy with long turns, stays healthy.

use std::sync::Mutex;
use std::time::Duration;

use agentrun_shared::http::{self, Reply};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    /// completed, failed, cancelled, blocked (the run's finish), or lost (its lease
    /// ended under it), released (given back on drain).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    /// input or output.
    direction: &'static str,
}

/// The runner's metrics and health state, shared by the connection and the run tasks.
pub struct Observer {
    registry: Registry,
    runs: Family<OutcomeLabel, Counter>,
    active_runs: Gauge,
    time_to_first_token: Histogram,
    turn_duration: Histogram,
    tokens: Family<DirectionLabel, Counter>,
    batch_size: Histogram,
    reconnects: Counter,
    health: Mutex<Health>,
    unhealthy_after: Duration,
}

struct Health {
    /// Set while a session is open.
    connected: bool,
    /// When the last session ended (or the runner started, before the first).
    disconnected_at: Instant,
    /// When the manager last sent anything on the open session.
    heard_at: Instant,
}

impl Observer {
    pub fn new(unhealthy_after: Duration) -> Self {
        let mut registry = Registry::with_prefix("agentrun_runner");
        let runs = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "runs",
            "Runs that left this runner, by outcome",
            runs.clone(),
        );
        let active_runs = Gauge::default();
        registry.register("active_runs", "Runs this runner holds", active_runs.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "From a turn's start to its first content.delta",
            time_to_first_token.clone(),
        );
        let turn_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "turn_duration_seconds",
            "From a turn's start to its end, any outcome",
            turn_duration.clone(),
        );
        let tokens = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "tokens",
            "Tokens of completed turns, as their providers reported them",
            tokens.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "event_batch_size",
            "Events per batch sent to the manager",
            batch_size.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Sessions with a manager opened after the first",
            reconnects.clone(),
        );
        let now = Instant::now();
        Self {
            registry,
            runs,
            active_runs,
            time_to_first_token,
            turn_duration,
            tokens,
            batch_size,
            reconnects,
            health: Mutex::new(Health {
                connected: false,
                disconnected_at: now,
                heard_at: now,
            }),
            unhealthy_after,
        }
    }

    /// A session opened (the manager welcomed us); `first` for the first one.
    pub fn connected(&self, first: bool) {
        if !first {
            self.reconnects.inc();
        }
        let mut health = self.health.lock().expect("health lock");
        health.connected = true;
        health.heard_at = Instant::now();
    }

    pub fn disconnected(&self) {
        let mut health = self.health.lock().expect("health lock");
        if health.connected {
            health.connected = false;
            health.disconnected_at = Instant::now();
        }
    }

    /// The manager sent something on the open session.
    pub fn heard_from_manager(&self) {
        self.health.lock().expect("health lock").heard_at = Instant::now();
    }

    pub fn run_started(&self) {
        self.active_runs.inc();
    }

    /// A run left this runner with `outcome` (see [`OutcomeLabel`]).
    pub fn run_ended(&self, outcome: &str) {
        self.active_runs.dec();
        self.runs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn first_token(&self, after: Duration) {
        self.time_to_first_token.observe(after.as_secs_f64());
    }

    pub fn turn_ended(&self, after: Duration, tokens: Option<(u64, u64)>) {
        self.turn_duration.observe(after.as_secs_f64());
        if let Some((input, output)) = tokens {
            self.tokens
                .get_or_create(&DirectionLabel { direction: "input" })
                .inc_by(input);
            self.tokens
                .get_or_create(&DirectionLabel {
                    direction: "output",
                })
                .inc_by(output);
        }
    }

    pub fn batch_sent(&self, events: usize) {
        self.batch_size.observe(events as f64);
    }

    /// `None` when healthy, else why not.
    pub fn unhealthy(&self) -> Option<String> {
        self.unhealthy_at(Instant::now())
    }

    fn unhealthy_at(&self, now: Instant) -> Option<String> {
        let health = self.health.lock().expect("health lock");
        let limit = self.unhealthy_after;
        if !health.connected {
            let for_ = now.saturating_duration_since(health.disconnected_at);
            return (for_ > limit)
                .then(|| format!("no session with a manager for {:.1} s", for_.as_secs_f64()));
        }
        let quiet = now.saturating_duration_since(health.heard_at);
        (quiet > limit).then(|| {
            format!(
                "the session is open but the manager has sent nothing for {:.1} s",
                quiet.as_secs_f64()
            )
        })
    }

    /// The answer to `GET path`.
    pub fn reply(&self, path: &str) -> Reply {
        match path {
            "/metrics" => {
                let mut body = String::new();
                prometheus_client::encoding::text::encode(&mut body, &self.registry)
                    .expect("writing to a String cannot fail");
                Reply::new("200 OK", http::OPENMETRICS, body)
            }
            "/healthz" => match self.unhealthy() {
                None => Reply::new("200 OK", "text/plain", "ok\n".into()),
                Some(why) => {
                    Reply::new("503 Service Unavailable", "text/plain", format!("{why}\n"))
                }
            },
            _ => Reply::not_found(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_session_and_the_managers_answers() {
        let observer = Observer::new(Duration::from_secs(10));
        let later = |secs| Instant::now() + Duration::from_secs(secs);
        assert_eq!(observer.unhealthy(), None, "starting up");
        assert!(
            observer
                .unhealthy_at(later(11))
                .unwrap()
                .contains("no session")
        );

        observer.connected(true);
        assert_eq!(observer.unhealthy(), None);
        assert!(
            observer
                .unhealthy_at(later(11))
                .unwrap()
                .contains("sent nothing")
        );

        observer.disconnected();
        assert_eq!(
            observer.unhealthy_at(later(5)),
            None,
            "a quick reconnect is fine"
        );
        assert!(
            observer
                .unhealthy_at(later(11))
                .unwrap()
                .contains("no session")
        );
        observer.connected(false);
        assert_eq!(observer.unhealthy_at(later(5)), None);
    }

    #[test]
    fn metrics_are_rendered_with_their_names() {
        let observer = Observer::new(Duration::from_secs(10));
        observer.run_started();
        observer.run_ended("completed");
        observer.turn_ended(Duration::from_millis(30), Some((3, 5)));
        observer.batch_sent(7);
        let text = observer.reply("/metrics").body;
        for line in [
            r#"agentrun_runner_runs_total{outcome="completed"} 1"#,
            "agentrun_runner_active_runs 0",
            r#"agentrun_runner_tokens_total{direction="output"} 5"#,
            "agentrun_runner_turn_duration_seconds_count 1",
            "agentrun_runner_event_batch_size_sum 7.0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(observer.reply("/nope").status, "404 Not Found");
    }
}
