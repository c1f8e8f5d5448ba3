//! API keys: who may call the manager, for which tenant (and projects) and in which role.
//!
//! A key is shown once, when it is created, as `ark_<id: 32 hex>_<secret: 64 hex>`. Only
//! the SHA-256 of the secret is stored; [`verify`] compares it in constant time. The
//! secret is 256 bits from the operating system's CSPRNG (two v4 UUIDs' random bits).
//!
//! A key may expire (`expires_at`): from that instant it is refused like a revoked one.
//! `last_used_at` says roughly when a key last authenticated: it is written only when a
//! manager verifies the key against the database (a cache miss), and then only when the
//! stored time is older than [`LAST_USED_RESOLUTION`], so a busy key costs at most one
//! write a minute, never one per call.

use std::time::{Duration, SystemTime};

use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Prefix of every key's text, so a leaked key is easy to recognise (and to scan for).
pub const KEY_PREFIX: &str = "ark_";

/// How stale `last_used_at` may be: a key in use has it refreshed at most this often.
pub const LAST_USED_RESOLUTION: Duration = Duration::from_secs(60);

/// Longest a key may be made to last (`expires_at` at most this far ahead).
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Why `expires_at` cannot be a new key's expiry at `now`, if it cannot.
pub fn expiry_problem(expires_at: SystemTime, now: SystemTime) -> Option<&'static str> {
    if expires_at <= now {
        Some("must be in the future")
    } else if expires_at > now + MAX_LIFETIME {
        Some("must be at most 10 years ahead")
    } else {
        None
    }
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// RunService and SessionService.
    Client,
    /// RunnerService only.
    Runner,
    /// AdminService: cluster-wide operations and key management.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Runner => "runner",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "client" => Some(Role::Client),
            "runner" => Some(Role::Runner),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// A stored key, without its secret.
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub tenant_id: String,
    /// Empty: every project of the tenant.
    pub project_ids: Vec<String>,
    pub role: Role,
    pub name: String,
    pub created_at: SystemTime,
    pub revoked_at: Option<SystemTime>,
    /// From this instant the key is refused; `None`: never.
    pub expires_at: Option<SystemTime>,
    /// When the key last authenticated, to within [`LAST_USED_RESOLUTION`] (and the
    /// managers' key cache); `None`: never.
    pub last_used_at: Option<SystemTime>,
}

/// Why a key that matched is nevertheless refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Revoked,
    Expired,
}

impl ApiKeyRecord {
    /// Whether the key may be used at `now`; revocation wins over expiry.
    pub fn refusal(&self, now: SystemTime) -> Option<Refusal> {
        if self.revoked_at.is_some() {
            Some(Refusal::Revoked)
        } else if self.expires_at.is_some_and(|at| at <= now) {
            Some(Refusal::Expired)
        } else {
            None
        }
    }

    /// Whether `last_used_at` is stale enough at `now` to be written again.
    pub fn last_use_due(&self, now: SystemTime) -> bool {
        match self.last_used_at {
            None => true,
            Some(at) => now
                .duration_since(at)
                .is_ok_and(|age| age >= LAST_USED_RESOLUTION),
        }
    }
}

impl ApiKeyRecord {
    fn from_row(row: &Row) -> Result<Self> {
        let role: String = row.get("role");
        Ok(Self {
            id: row.get("id"),
            tenant_id: row.get("tenant_id"),
            project_ids: row.get("project_ids"),
            role: super::parse_state("role", &role, Role::parse)?,
            name: row.get("name"),
            created_at: row.get("created_at"),
            revoked_at: row.get("revoked_at"),
            expires_at: row.get("expires_at"),
            last_used_at: row.get("last_used_at"),
        })
    }
}

/// A new key: its record and the key text, which is never stored or shown again.
pub struct NewKey {
    pub record: ApiKeyRecord,
    pub key: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("NewKey")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Equal in time independent of where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Splits key text into its id and secret; `None` when it is not shaped like a key.
pub fn parse_key(text: &str) -> Option<(Uuid, &str)> {
    let rest = text.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.len() < 32 || secret.len() > 256 {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

/// Creates a key for `tenant_id` in `role`, limited to `project_ids` when not empty,
/// expiring at `expires_at` (`None`: never). Callers validate the expiry.
pub async fn create(
    client: &impl GenericClient,
    tenant_id: &str,
    role: Role,
    project_ids: &[String],
    name: &str,
    expires_at: Option<SystemTime>,
) -> Result<NewKey> {
    let id = Uuid::new_v4();
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let stmt = client
        .prepare_cached(
            "INSERT INTO api_keys (id, tenant_id, project_ids, role, secret_hash, name, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
        )
        .await?;
    let row = client
        .query_one(
            &stmt,
            &[
                &id,
                &tenant_id,
                &project_ids,
                &role.as_str(),
                &hash(&secret),
                &name,
                &expires_at,
            ],
        )
        .await?;
    Ok(NewKey {
        record: ApiKeyRecord::from_row(&row)?,
        key: format!("{KEY_PREFIX}{}_{secret}", id.simple()),
    })
}

/// The key whose text is `key`, if it exists and its secret matches — revoked or expired
/// ones too: the caller refuses those (see [`ApiKeyRecord::refusal`]) and may say why,
/// since whoever presents the secret is its holder.
pub async fn verify(client: &impl GenericClient, key: &str) -> Result<Option<ApiKeyRecord>> {
    let Some((id, secret)) = parse_key(key) else {
        return Ok(None);
    };
    let stmt = client
        .prepare_cached("SELECT * FROM api_keys WHERE id = $1")
        .await?;
    let Some(row) = client.query_opt(&stmt, &[&id]).await? else {
        return Ok(None);
    };
    let stored: Vec<u8> = row.get("secret_hash");
    if !constant_time_eq(&stored, &hash(secret)) {
        return Ok(None);
    }
    ApiKeyRecord::from_row(&row).map(Some)
}

/// The key `id`, if it exists (for re-checking a key that authenticated a stream).
pub async fn get(client: &impl GenericClient, id: Uuid) -> Result<Option<ApiKeyRecord>> {
    let stmt = client
        .prepare_cached("SELECT * FROM api_keys WHERE id = $1")
        .await?;
    let row = client.query_opt(&stmt, &[&id]).await?;
    row.as_ref().map(ApiKeyRecord::from_row).transpose()
}

/// Records that key `id` was used now, unless another writer (a replica, a moment ago)
/// did within [`LAST_USED_RESOLUTION`]: the guard keeps it to about one write a minute
/// per key across every replica.
pub async fn touch(client: &impl GenericClient, id: Uuid) -> Result<()> {
    let stmt = client
        .prepare_cached(
            "UPDATE api_keys SET last_used_at = now()
             WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - $2::bigint * interval '1 second')",
        )
        .await?;
    let resolution = LAST_USED_RESOLUTION.as_secs() as i64;
    client.execute(&stmt, &[&id, &resolution]).await?;
    Ok(())
}

/// Keys, newest first, of one tenant or of all.
pub async fn list(
    client: &impl GenericClient,
    tenant_id: Option<&str>,
) -> Result<Vec<ApiKeyRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT * FROM api_keys WHERE $1::text IS NULL OR tenant_id = $1
             ORDER BY created_at DESC, id",
        )
        .await?;
    let rows = client.query(&stmt, &[&tenant_id]).await?;
    rows.iter().map(ApiKeyRecord::from_row).collect()
}

/// Revokes a key; revoking it again changes nothing. NOT_FOUND when there is no such key.
pub async fn revoke(client: &impl GenericClient, id: Uuid) -> Result<ApiKeyRecord> {
    let stmt = client
        .prepare_cached(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
             RETURNING *",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&id])
        .await?
        .ok_or(Error::NotFound { what: "api key" })?;
    ApiKeyRecord::from_row(&row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_when_well_formed() {
        let id = Uuid::new_v4();
        let secret = "a".repeat(64);
        let key = format!("ark_{}_{secret}", id.simple());
        assert_eq!(parse_key(&key), Some((id, secret.as_str())));
        assert_eq!(parse_key("Bearer nonsense"), None);
        assert_eq!(parse_key(&format!("ark_{}_short", id.simple())), None);
        assert_eq!(parse_key(&format!("xyz_{}_{secret}", id.simple())), None);
    }

    fn record() -> ApiKeyRecord {
        ApiKeyRecord {
            id: Uuid::new_v4(),
            tenant_id: "acme".into(),
            project_ids: vec![],
            role: Role::Client,
            name: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
            revoked_at: None,
            expires_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn a_key_is_refused_from_its_expiry_on_and_revocation_wins() {
        let now = SystemTime::now();
        let mut key = record();
        assert_eq!(key.refusal(now), None);
        key.expires_at = Some(now + Duration::from_secs(1));
        assert_eq!(key.refusal(now), None);
        key.expires_at = Some(now);
        assert_eq!(key.refusal(now), Some(Refusal::Expired));
        key.revoked_at = Some(now);
        assert_eq!(key.refusal(now), Some(Refusal::Revoked));
    }

    #[test]
    fn last_use_is_written_at_most_once_per_resolution() {
        let now = SystemTime::now();
        let mut key = record();
        assert!(key.last_use_due(now), "never used");
        key.last_used_at = Some(now - Duration::from_secs(5));
        assert!(!key.last_use_due(now));
        key.last_used_at = Some(now - LAST_USED_RESOLUTION);
        assert!(key.last_use_due(now));
        // A clock behind the database's: not due.
        key.last_used_at = Some(now + Duration::from_secs(5));
        assert!(!key.last_use_due(now));
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
