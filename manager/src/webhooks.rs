//! The webhook delivery worker: one per replica. It takes due deliveries from the
//! database (`store::webhooks::claim_due`, `FOR UPDATE SKIP LOCKED`, committed before
//! anything is sent, so two replicas never send the same attempt), POSTs each one signed
//! to its webhook's URL, a bounded number at once, and records how the attempt ended:
//! delivered, retried with back-off, or failed after the last attempt.
//!
//! Appends never wait for it: they only write delivery rows. It is woken in memory when
//! an append on this replica wrote some (each replica delivers what its own appends
//! wrote), by a timer when a retry it scheduled comes due, and otherwise polls every
//! [`POLL`], a safety net for retries scheduled by another replica and attempts a dead
//! replica left behind (due again once their lease has passed). So an idle replica costs
//! the database one statement per [`POLL`].
//!
//! Bounded: at most [`MAX_IN_FLIGHT`] attempts in flight per replica and
//! [`MAX_IN_FLIGHT_PER_WEBHOOK`] per webhook (a receiver that hangs holds only its own
//! share of the slots), at most [`MAX_RESPONSE_BYTES`] read of an answer, and finished
//! deliveries pruned after [`KEEP_FINISHED`].
//!
//! A delivery is `POST <url>` with the JSON body [`body`] and the headers
//! `agentrun-delivery-id`, `agentrun-event-type` and `agentrun-signature: t=<unix
//! seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` ([`signature`]), to public
//! addresses only unless the operator allows others ([`targets`]).

pub mod targets;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::webhooks::{self, DueDelivery, Outcome, WebhookId};

/// How long a receiver has to answer one attempt.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts before a delivery is `failed`.
pub const MAX_ATTEMPTS: i32 = 20;
/// The wait after the first failed attempt; it doubles after each, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long an attempt holds its delivery: past the request timeout, so it is recorded
/// before anyone may take the delivery again.
const LEASE: Duration = Duration::from_secs(30);
/// Attempts in flight per replica, at most (each holds one event, at most 1 MiB).
pub const MAX_IN_FLIGHT: usize = 64;
/// Attempts in flight per replica for one webhook, at most: a receiver that hangs holds
/// this many slots, never all of them.
pub const MAX_IN_FLIGHT_PER_WEBHOOK: usize = 8;
/// Deliveries taken per statement.
const CLAIM_BATCH: usize = 16;
/// The safety-net poll.
pub const POLL: Duration = Duration::from_secs(10);
/// A wake-up is sent before the append commits: look a moment later.
const WAKE_SETTLE: Duration = Duration::from_millis(20);
/// Bytes of a failed answer's body kept in `last_error`; no more is read.
const MAX_RESPONSE_BYTES: usize = 512;
/// Delivered and failed deliveries are kept this long, then pruned.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often, and how many rows at most per statement, finished deliveries are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const PRUNE_BATCH: i64 = 1_000;

/// The wait before attempt `attempt + 1`, after attempt `attempt` (from 1) failed.
pub fn backoff(attempt: i32) -> Duration {
    let doublings = attempt.saturating_sub(1).clamp(0, 20) as u32;
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// The `agentrun-signature` header value for `body` sent at unix time `t`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<hmac_sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// The request body: the same bytes on every attempt.
pub fn body(d: &DueDelivery) -> Vec<u8> {
    json!({
        "delivery_id": d.id.to_string(),
        "webhook_id": d.webhook_id.to_string(),
        "type": d.event.event_type,
        "created_at": webhooks::rfc3339(d.event.created_at),
        "run_id": d.event.run_id.to_string(),
        "seq": d.event.seq,
        "event": webhooks::event_json(&d.event),
    })
    .to_string()
    .into_bytes()
}

/// How deliveries are sent: the HTTP client, and whether non-public addresses may be
/// reached (`--webhook-private-targets`).
#[derive(Clone)]
struct Sender {
    client: reqwest::Client,
    private_targets: bool,
}

impl Sender {
    /// No redirects followed (a receiver answers itself, and a redirect could lead
    /// anywhere), every attempt bounded by [`REQUEST_TIMEOUT`], host names resolved to
    /// public addresses only unless `private_targets`.
    fn new(private_targets: bool) -> Self {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentrun-webhooks/", env!("CARGO_PKG_VERSION")));
        if !private_targets {
            builder = builder.dns_resolver(Arc::new(targets::PublicResolver));
        }
        Self {
            client: builder.build().expect("a plain HTTP client builds"),
            private_targets,
        }
    }
}

/// Delivers until `shutdown` is cancelled; attempts in flight then are recorded as
/// interrupted (due again at once, for any replica) before it returns. Sends to
/// non-public addresses only with `private_targets`.
pub async fn run(
    pool: Pool,
    metrics: Arc<Metrics>,
    private_targets: bool,
    shutdown: CancellationToken,
) {
    let sender = Sender::new(private_targets);
    let mut wake = webhooks::new_deliveries();
    let mut in_flight: JoinSet<(WebhookId, Option<Duration>)> = JoinSet::new();
    // The earliest retry this replica's attempts scheduled: looked at when it is due.
    let mut next_retry: Option<Instant> = None;
    let mut per_webhook: HashMap<WebhookId, usize> = HashMap::new();
    let mut next_prune = Instant::now() + PRUNE_INTERVAL;
    // Whether the last look may have left due deliveries behind (it was full).
    let mut more_due = true;
    loop {
        let room = MAX_IN_FLIGHT - in_flight.len();
        if more_due && room > 0 {
            let limit = room.min(CLAIM_BATCH);
            match claim(&pool, limit, &per_webhook).await {
                Ok(due) => {
                    more_due = due.len() == limit;
                    for delivery in due {
                        *per_webhook.entry(delivery.webhook_id).or_default() += 1;
                        in_flight.spawn(deliver(
                            sender.clone(),
                            pool.clone(),
                            metrics.clone(),
                            delivery,
                            shutdown.clone(),
                        ));
                    }
                }
                Err(err) => {
                    more_due = false;
                    tracing::warn!(error = ?err, "taking due webhook deliveries failed; retrying");
                }
            }
            if more_due && in_flight.len() < MAX_IN_FLIGHT {
                continue;
            }
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + PRUNE_INTERVAL;
            prune(&pool).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                // A slot is free: look again at once if the last look was full, or it
                // was one of a webhook at its cap (whose other deliveries may wait).
                if let Ok((webhook, retry_in)) = done {
                    more_due |= release(&mut per_webhook, webhook);
                    if let Some(retry_in) = retry_in {
                        let at = Instant::now() + retry_in;
                        next_retry = Some(next_retry.map_or(at, |next| next.min(at)));
                    }
                }
            }
            changed = wake.changed() => {
                if changed.is_ok() {
                    tokio::time::sleep(WAKE_SETTLE).await;
                    more_due = true;
                }
            }
            _ = tokio::time::sleep(
                next_retry.map_or(POLL, |at| at.saturating_duration_since(Instant::now()).min(POLL))
            ) => {
                more_due = true;
                next_retry = next_retry.filter(|at| *at > Instant::now());
            }
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// One attempt of `webhook` ended; true if the webhook was at its cap.
fn release(per_webhook: &mut HashMap<WebhookId, usize>, webhook: WebhookId) -> bool {
    let Some(n) = per_webhook.get_mut(&webhook) else {
        return false;
    };
    let was_full = *n >= MAX_IN_FLIGHT_PER_WEBHOOK;
    *n -= 1;
    if *n == 0 {
        per_webhook.remove(&webhook);
    }
    was_full
}

async fn claim(
    pool: &Pool,
    limit: usize,
    per_webhook: &HashMap<WebhookId, usize>,
) -> Result<Vec<DueDelivery>> {
    let busy: Vec<(WebhookId, i64)> = per_webhook.iter().map(|(id, n)| (*id, *n as i64)).collect();
    let client = pool.get().await?;
    webhooks::claim_due(
        &client,
        limit as i64,
        MAX_IN_FLIGHT_PER_WEBHOOK as i64,
        &busy,
        LEASE,
    )
    .await
}

async fn prune(pool: &Pool) {
    let pruned = async {
        let client = pool.get().await?;
        webhooks::prune(&client, KEEP_FINISHED, PRUNE_BATCH).await
    }
    .await;
    match pruned {
        Ok(0) => {}
        Ok(n) => tracing::debug!(deliveries = n, "old webhook deliveries pruned"),
        Err(err) => tracing::warn!(error = ?err, "pruning webhook deliveries failed"),
    }
}

/// One attempt of one delivery, then its record; returns the delivery's webhook and,
/// when the attempt failed and is to be retried, after how long.
async fn deliver(
    sender: Sender,
    pool: Pool,
    metrics: Arc<Metrics>,
    delivery: DueDelivery,
    shutdown: CancellationToken,
) -> (WebhookId, Option<Duration>) {
    let outcome = tokio::select! {
        outcome = attempt(&sender, &delivery) => outcome,
        _ = shutdown.cancelled() => Outcome::Failed {
            status_code: 0,
            error: "interrupted: the manager shut down".into(),
            retry_in: Some(Duration::ZERO),
        },
    };
    metrics.webhook_attempt(
        matches!(outcome, Outcome::Delivered { .. }),
        matches!(outcome, Outcome::Failed { retry_in: None, .. }),
    );
    match &outcome {
        Outcome::Delivered { status_code } => tracing::debug!(
            delivery = %delivery.id, webhook = %delivery.webhook_id, attempt = delivery.attempt,
            status_code, "webhook delivered"
        ),
        Outcome::Failed {
            status_code,
            error,
            retry_in,
        } => tracing::info!(
            delivery = %delivery.id, webhook = %delivery.webhook_id, attempt = delivery.attempt,
            status_code, error = %error, retry_in = ?retry_in, "webhook attempt failed"
        ),
    }
    let recorded = async {
        let client = pool.get().await?;
        webhooks::record(&client, delivery.id, delivery.attempt, &outcome).await
    }
    .await;
    if let Err(err) = recorded {
        // The delivery comes due again when its lease passes: sent again, at least once.
        tracing::warn!(delivery = %delivery.id, error = ?err, "recording a webhook attempt failed");
    }
    let retry_in = match outcome {
        Outcome::Failed { retry_in, .. } => retry_in,
        Outcome::Delivered { .. } => None,
    };
    (delivery.webhook_id, retry_in)
}

async fn attempt(sender: &Sender, d: &DueDelivery) -> Outcome {
    let failed = |status_code: i32, error: String| Outcome::Failed {
        status_code,
        error,
        retry_in: (d.attempt < MAX_ATTEMPTS).then(|| backoff(d.attempt)),
    };
    // An address in the URL is connected to without resolving: checked here. (Stored
    // while a replica allowed it; retried, as the setting may change.)
    if !sender.private_targets
        && let Err(refused) = reqwest::Url::parse(&d.url)
            .map_err(|err| err.to_string())
            .and_then(|url| targets::check_url(&url))
    {
        return failed(0, format!("not sent: {refused}"));
    }
    let client = &sender.client;
    let body = body(d);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let request = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("agentrun-delivery-id", d.id.to_string())
        .header("agentrun-event-type", d.event.event_type.as_str())
        .header("agentrun-signature", signature(&d.secret, t, &body))
        .body(body);
    // The client's timeout bounds the request; this one also bounds reading the answer.
    let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut response = client.execute(request.build()?).await?;
        let status = response.status();
        if status.is_success() {
            return Ok((status, String::new()));
        }
        let mut excerpt = Vec::new();
        while excerpt.len() < MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                _ => break,
            }
        }
        excerpt.truncate(MAX_RESPONSE_BYTES);
        Ok::<_, reqwest::Error>((status, String::from_utf8_lossy(&excerpt).into_owned()))
    })
    .await;
    match answered {
        Err(_) => failed(0, format!("no answer within {REQUEST_TIMEOUT:?}")),
        Ok(Err(err)) if err.is_timeout() => {
            failed(0, format!("no answer within {REQUEST_TIMEOUT:?}"))
        }
        Ok(Err(err)) => failed(0, error_text(&err)),
        Ok(Ok((status, _))) if status.is_success() => Outcome::Delivered {
            status_code: status.as_u16().into(),
        },
        Ok(Ok((status, excerpt))) => {
            let excerpt = excerpt.replace('\0', "");
            let error = if excerpt.trim().is_empty() {
                format!("the receiver answered {status}")
            } else {
                format!("the receiver answered {status}: {}", excerpt.trim())
            };
            failed(status.as_u16().into(), error)
        }
    }
}

/// A send error with its causes (reqwest's own text is only the outermost).
fn error_text(err: &reqwest::Error) -> String {
    let mut text = if err.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(10), Duration::from_secs(512));
        assert_eq!(backoff(11), MAX_BACKOFF);
        assert_eq!(backoff(19), MAX_BACKOFF);
    }

    #[test]
    fn signature_is_hmac_sha256_over_time_and_body() {
        // Computed independently (Python's hmac module).
        assert_eq!(
            signature("Jefe", 1, b"what do ya want for nothing?"),
            "t=1,v1=a9049465ce89cfb8e9aac62333abda66f80e3403f51f57f6bae3c3a4485eca38"
        );
    }
}
