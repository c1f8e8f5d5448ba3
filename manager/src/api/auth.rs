//! Who is calling: the API key in `authorization: Bearer ...`, checked once per call by
//! [`super::caller`], which also decides whether the key's role may use the service.
//!
//! Verified keys are cached in memory for [`CACHE_TTL`] so a busy client does not cost a
//! query per call. Failed lookups are not cached. Key text is never logged; the cache
//! holds a SHA-256 of it, not the key itself. An expired key is refused from its expiry
//! on, cached or not (the expiry is checked on every use).
//!
//! Revocation: AdminService announces a revoked key to every replica (a NOTIFY through
//! [`Notifier::key_revoked`]; `agentrun-manager keys revoke` sends the same), and each
//! drops it from its cache and re-checks its open streams at once — typically well under
//! a second, [`REVOCATION_NOTICE_BOUND`]. Should that notice be lost, a call is refused
//! within [`CACHE_TTL`] and a stream ended within [`STREAM_RECHECK_BOUND`].
//!
//! Long-lived streams are re-checked ([`StreamKey`]) at least every
//! [`STREAM_RECHECK_INTERVAL`] (a runner's Connect stream also at each heartbeat and
//! before every assignment); a revoked or expired key ends the stream UNAUTHENTICATED.
//! Re-checks go through the cache, so many streams of one key cost one query per
//! [`CACHE_TTL`].
//!
//! Last use: when a key is verified against the database (a call's or a stream
//! re-check's cache miss, at most every [`CACHE_TTL`] per key and replica) and its `last_used_at` is older than
//! [`api_keys::LAST_USED_RESOLUTION`], it is written — best-effort (a failure is logged,
//! the call goes on), about once a minute per key whatever the traffic.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::Request;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::notify::Notifier;
use crate::store::Tenant;
use crate::store::api_keys::{self, ApiKeyRecord, Refusal, Role};

/// How long a verified key is trusted without asking the database again; also the
/// longest a revoked key may still be accepted by another replica that missed the
/// revocation's NOTIFY.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Streams opened with a key re-check it at least this often (runner streams also at
/// each heartbeat), and at once when a revocation is announced.
pub const STREAM_RECHECK_INTERVAL: Duration = Duration::from_secs(2);
/// The longest a stream outlives its key's revocation or expiry if the revocation's
/// NOTIFY is lost: a cache lifetime plus a re-check period.
pub const STREAM_RECHECK_BOUND: Duration =
    Duration::from_secs(CACHE_TTL.as_secs() + STREAM_RECHECK_INTERVAL.as_secs());
/// How soon a revocation announced by NOTIFY ends the key's streams on every replica
/// (coalescing, delivery, one query): well under a second on a quiet machine, this on a
/// loaded one — still before a missed notice could have been made up by the cache. Not
/// a guarantee (NOTIFY can be lost with the listener's connection):
/// [`STREAM_RECHECK_BOUND`] is.
pub const REVOCATION_NOTICE_BOUND: Duration = Duration::from_secs(4);
/// Entries kept at most; beyond this the cache is emptied (it refills on demand).
const CACHE_CAPACITY: usize = 10_000;

/// The request header carrying the API key.
pub const AUTHORIZATION: &str = "authorization";

/// Who a call acts for, decided from its credential (never from the request body).
#[derive(Debug, Clone)]
pub struct Caller {
    /// Every query the call makes is scoped by it.
    pub tenant: Tenant,
    /// The key's role; `None` when authentication is disabled (any role).
    pub role: Option<Role>,
    /// Projects the key is limited to; empty means all of the tenant's.
    pub projects: Vec<String>,
    /// Whether the tenant came from a key. A runner acting without one (authentication
    /// disabled) serves every tenant.
    pub authenticated: bool,
    /// The key's id, for streams to re-check it; `None` without authentication.
    pub key_id: Option<Uuid>,
}

impl Caller {
    /// The tenant a runner is limited to: its key's, or none without authentication.
    pub fn runner_tenant(&self) -> Option<&Tenant> {
        self.authenticated.then_some(&self.tenant)
    }

    /// PERMISSION_DENIED unless the key may act on `project_id`.
    pub fn check_project(&self, field: &str, project_id: &str) -> Result<()> {
        if self.projects.is_empty() || self.projects.iter().any(|p| p == project_id) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "this API key may not use {field} {project_id:?}"
        )))
    }
}

/// A cached key: the digest of the key text it was verified with (`None` when it was
/// fetched by id, to re-check a stream), the record, and when it was fetched.
struct Entry {
    digest: Option<[u8; 32]>,
    record: ApiKeyRecord,
    fetched: Instant,
}

/// Verifies API keys, with a short-lived cache keyed by key id.
pub struct Authenticator {
    pool: Pool,
    cache: Mutex<HashMap<Uuid, Entry>>,
}

impl Authenticator {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `request`, verified: UNAUTHENTICATED when it is missing, malformed,
    /// unknown, revoked or expired. `notifier` says which keys were revoked lately.
    pub async fn authenticate<T>(
        &self,
        request: &Request<T>,
        notifier: &Notifier,
    ) -> Result<ApiKeyRecord> {
        let header = request.metadata().get(AUTHORIZATION).ok_or_else(|| {
            Error::Unauthenticated("an API key is required (authorization: Bearer ...)".into())
        })?;
        let key = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization header must be `Bearer <API key>`".into())
            })?;
        let invalid = || Error::Unauthenticated("invalid API key".into());
        let (id, _) = api_keys::parse_key(key).ok_or_else(invalid)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(record) = self.cached(id, Some(&digest), notifier) {
            return usable(record);
        }
        let client = self.pool.get().await?;
        let record = api_keys::verify(&client, key).await?.ok_or_else(invalid)?;
        touch_if_due(&client, &record).await;
        self.store(Some(digest), record.clone());
        usable(record)
    }

    /// Re-checks key `id`, which authenticated a stream: UNAUTHENTICATED once it is
    /// revoked or expired (or gone).
    pub async fn recheck(&self, id: Uuid, notifier: &Notifier) -> Result<()> {
        if let Some(record) = self.cached(id, None, notifier) {
            return usable(record).map(drop);
        }
        let client = self.pool.get().await?;
        let record = api_keys::get(&client, id)
            .await?
            .ok_or_else(|| Error::Unauthenticated("API key revoked".into()))?;
        touch_if_due(&client, &record).await;
        self.store(None, record.clone());
        usable(record).map(drop)
    }

    /// The cached record of key `id`, if fresh, not revoked lately, and (when `digest` is
    /// given) verified with the same key text.
    fn cached(
        &self,
        id: Uuid,
        digest: Option<&[u8; 32]>,
        notifier: &Notifier,
    ) -> Option<ApiKeyRecord> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(&id)?;
        let stale = entry.fetched.elapsed() >= CACHE_TTL
            || (entry.record.revoked_at.is_none() && notifier.was_revoked(id));
        if stale {
            cache.remove(&id);
            return None;
        }
        match digest {
            // Not verified with this text (another secret, or fetched by id): ask the
            // database, keeping the entry for the text it was verified with.
            Some(digest) if entry.digest.as_ref() != Some(digest) => None,
            _ => Some(entry.record.clone()),
        }
    }

    fn store(&self, digest: Option<[u8; 32]>, record: ApiKeyRecord) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        // A re-check by id keeps the digest of the text the key was verified with.
        let digest = digest.or_else(|| cache.get(&record.id).and_then(|e| e.digest));
        cache.insert(
            record.id,
            Entry {
                digest,
                record,
                fetched: Instant::now(),
            },
        );
    }
}

/// The record if the key may be used now; UNAUTHENTICATED saying why not otherwise.
fn usable(record: ApiKeyRecord) -> Result<ApiKeyRecord> {
    match record.refusal(SystemTime::now()) {
        None => Ok(record),
        Some(Refusal::Revoked) => Err(Error::Unauthenticated("API key revoked".into())),
        Some(Refusal::Expired) => Err(Error::Unauthenticated("API key expired".into())),
    }
}

/// Records the key's use when its `last_used_at` is stale; best-effort.
async fn touch_if_due(client: &impl deadpool_postgres::GenericClient, record: &ApiKeyRecord) {
    if record.refusal(SystemTime::now()).is_some() || !record.last_use_due(SystemTime::now()) {
        return;
    }
    if let Err(err) = api_keys::touch(client, record.id).await {
        tracing::debug!(key_id = %record.id, error = %err, "could not record the key's last use");
    }
}

/// The key that opened a long-lived stream (runner Connect, WatchRun, WatchSession), and
/// when it is next to be re-checked: every [`STREAM_RECHECK_INTERVAL`], or at once when a
/// key was revoked anywhere.
pub struct StreamKey {
    key: Option<Uuid>,
    revocations: watch::Receiver<u64>,
    next_check: tokio::time::Instant,
}

impl StreamKey {
    /// `key`: the caller's key id; `None` (authentication disabled) is never re-checked.
    pub fn new(key: Option<Uuid>, notifier: &Notifier) -> Self {
        Self {
            key,
            revocations: notifier.subscribe_key_revocations(),
            next_check: tokio::time::Instant::now() + STREAM_RECHECK_INTERVAL,
        }
    }

    /// Re-checks the key now: UNAUTHENTICATED ("API key revoked" / "expired") ends the
    /// stream.
    pub async fn check(&mut self, auth: &Authenticator, notifier: &Notifier) -> Result<()> {
        let Some(key) = self.key else {
            return Ok(());
        };
        self.revocations.borrow_and_update();
        self.next_check = tokio::time::Instant::now() + STREAM_RECHECK_INTERVAL;
        auth.recheck(key, notifier).await
    }

    /// Re-checks the key if a re-check is due (see [`Self::due`]).
    pub async fn check_if_due(&mut self, auth: &Authenticator, notifier: &Notifier) -> Result<()> {
        let noticed = self.revocations.has_changed().unwrap_or(false);
        if noticed || tokio::time::Instant::now() >= self.next_check {
            self.check(auth, notifier).await
        } else {
            Ok(())
        }
    }

    /// Resolves when a re-check is due: a key was revoked somewhere, or the period
    /// passed. Never, without a key.
    pub async fn due(&mut self) {
        if self.key.is_none() {
            return std::future::pending().await;
        }
        tokio::select! {
            changed = self.revocations.changed() => {
                if changed.is_err() {
                    // The notifier is gone (shutting down): the period still applies.
                    tokio::time::sleep_until(self.next_check).await;
                }
            }
            _ = tokio::time::sleep_until(self.next_check) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_millis(100);

    async fn resolves_soon(key: &mut StreamKey) -> bool {
        tokio::time::timeout(SOON, key.due()).await.is_ok()
    }

    #[tokio::test]
    async fn a_stream_key_is_due_at_once_when_a_key_is_revoked() {
        let notifier = Notifier::new(Uuid::new_v4());
        let mut keyed = StreamKey::new(Some(Uuid::new_v4()), &notifier);
        let mut keyless = StreamKey::new(None, &notifier);
        assert!(
            !resolves_soon(&mut keyed).await,
            "due long before its period"
        );
        notifier.key_revoked(Uuid::new_v4());
        assert!(
            resolves_soon(&mut keyed).await,
            "a revocation did not make it due"
        );
        assert!(
            !resolves_soon(&mut keyless).await,
            "a stream without a key was due"
        );
    }

    #[test]
    fn refusals_say_why() {
        let now = SystemTime::now();
        let mut record = ApiKeyRecord {
            id: Uuid::new_v4(),
            tenant_id: "acme".into(),
            project_ids: vec![],
            role: Role::Client,
            name: String::new(),
            created_at: now,
            revoked_at: None,
            expires_at: Some(now - Duration::from_secs(1)),
            last_used_at: None,
        };
        let expired = usable(record.clone()).expect_err("an expired key was usable");
        assert!(expired.to_string().contains("expired"), "{expired}");
        record.revoked_at = Some(now);
        let revoked = usable(record).expect_err("a revoked key was usable");
        assert!(revoked.to_string().contains("revoked"), "{revoked}");
    }
}
