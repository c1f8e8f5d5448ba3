//! Who is calling: the API key in `authorization: Bearer ...`, checked once per call by
//! [`super::caller`], which also decides whether the key's role may use the service.
//!
//! Verified keys are cached in memory for [`CACHE_TTL`] so a busy client does not cost a
//! query per call. A key revoked through this replica's AdminService is evicted at once;
//! one revoked elsewhere (another replica, `agentrun-manager keys revoke`) is refused
//! within [`CACHE_TTL`] at most. Failed lookups are not cached. Key text is never
//! logged; the cache holds a SHA-256 of it, not the key itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use tonic::Request;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Tenant;
use crate::store::api_keys::{self, ApiKeyRecord, Role};

/// How long a verified key is trusted without asking the database again; also the
/// longest a revoked key may still be accepted by another replica.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
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

/// Verifies API keys, with a short-lived cache.
pub struct Authenticator {
    pool: Pool,
    cache: Mutex<HashMap<[u8; 32], (ApiKeyRecord, Instant)>>,
}

impl Authenticator {
    pub fn new(pool: Pool) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The key of `request`, verified: UNAUTHENTICATED when it is missing, malformed,
    /// unknown or revoked.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<ApiKeyRecord> {
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
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(record) = self.cached(&digest) {
            return Ok(record);
        }
        let client = self.pool.get().await?;
        let record = api_keys::verify(&client, key)
            .await?
            .ok_or_else(|| Error::Unauthenticated("invalid or revoked API key".into()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(digest, (record.clone(), Instant::now()));
        Ok(record)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<ApiKeyRecord> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(digest) {
            Some((record, at)) if at.elapsed() < CACHE_TTL => Some(record.clone()),
            Some(_) => {
                cache.remove(digest);
                None
            }
            None => None,
        }
    }

    /// Forgets a revoked key at once (on this replica).
    pub fn evict(&self, key_id: Uuid) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|_, (record, _)| record.id != key_id);
    }
}
