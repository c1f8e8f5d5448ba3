//! `agentrun.v1.AdminService`: what operators look at and act on — queue and per-tenant
//! statistics, the runners connected (to any replica) with their leases, draining a
//! runner, per-tenant limits on active runs and per-tenant retention of ended runs'
//! deltas, and flow control: rate limits and concurrency-key limits (`store::flow`).
//!
//! A drain is recorded in the database (`runners.draining`); the replica holding the
//! runner's Connect stream notices it within its poll interval, stops assigning, and
//! tells the runner to finish its runs and exit (`api::connect`).

use std::time::SystemTime;

use agentrun_shared::error::FieldError;
use agentrun_shared::ids::RunnerId;
use agentrun_shared::proto::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::{AppState, caller, convert, validate};
use crate::error::Error;
use crate::store::api_keys::{self, ApiKeyRecord, Role};
use crate::store::{flow, runners, runs};

/// Longest API key name.
const MAX_KEY_NAME_BYTES: usize = 200;

fn api_key_role(role: Role) -> proto::ApiKeyRole {
    match role {
        Role::Client => proto::ApiKeyRole::Client,
        Role::Runner => proto::ApiKeyRole::Runner,
        Role::Admin => proto::ApiKeyRole::Admin,
    }
}

fn api_key(k: &ApiKeyRecord) -> proto::ApiKey {
    proto::ApiKey {
        key_id: k.id.simple().to_string(),
        tenant_id: k.tenant_id.clone(),
        project_ids: k.project_ids.clone(),
        role: api_key_role(k.role) as i32,
        name: k.name.clone(),
        created_at: convert::timestamp(Some(k.created_at)),
        revoked_at: convert::timestamp(k.revoked_at),
        expires_at: convert::timestamp(k.expires_at),
        last_used_at: convert::timestamp(k.last_used_at),
    }
}

pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_queue_stats(
        &self,
        request: Request<proto::GetQueueStatsRequest>,
    ) -> Result<Response<proto::GetQueueStatsResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let settings = &self.state.settings;
        let stats = runs::queue_stats(
            &client,
            settings.tenant_max_active_runs,
            settings.event_retention_ms,
        )
        .await?;
        let waiting = flow::waiting(&client).await?;
        Ok(Response::new(proto::GetQueueStatsResponse {
            depths: stats
                .depths
                .iter()
                .map(|d| proto::QueueDepth {
                    queue: d.queue.clone(),
                    status: d.status.to_proto() as i32,
                    runs: d.runs,
                })
                .collect(),
            ages: stats
                .oldest_pending_ms
                .iter()
                .map(|(queue, age)| proto::QueueAge {
                    queue: queue.clone(),
                    oldest_pending_age_ms: *age,
                })
                .collect(),
            tenants: stats
                .tenants
                .iter()
                .map(|t| proto::TenantStats {
                    tenant_id: t.tenant_id.clone(),
                    pending_runs: t.pending_runs,
                    active_runs: t.active_runs,
                    max_active_runs: t.max_active_runs,
                    event_retention_ms: t.event_retention_ms,
                })
                .collect(),
            waiting: waiting
                .into_iter()
                .map(|w| proto::WaitingRuns {
                    tenant_id: w.tenant_id,
                    queue: w.queue,
                    reason: w.reason,
                    runs: w.runs,
                })
                .collect(),
        }))
    }

    async fn list_runners(
        &self,
        request: Request<proto::ListRunnersRequest>,
    ) -> Result<Response<proto::ListRunnersResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let listed = runners::list_recent(&client).await?;
        Ok(Response::new(proto::ListRunnersResponse {
            runners: listed
                .iter()
                .map(|r| proto::RunnerInfo {
                    tenant_id: r.tenant_id.clone(),
                    replica_id: r.replica_id.map(|id| id.to_string()).unwrap_or_default(),
                    runner_id: r.id.to_string(),
                    name: r.name.clone(),
                    labels: r.labels.clone(),
                    backend_profiles: r.backend_profiles.clone(),
                    max_concurrency: r.max_concurrency,
                    version: r.version.clone(),
                    last_heartbeat_at: convert::timestamp(Some(r.last_heartbeat_at)),
                    draining: r.draining,
                    leases: r
                        .leases
                        .iter()
                        .map(|(run_id, epoch)| proto::LeaseRef {
                            run_id: run_id.to_string(),
                            epoch: *epoch,
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn set_tenant_limit(
        &self,
        request: Request<proto::SetTenantLimitRequest>,
    ) -> Result<Response<proto::SetTenantLimitResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let r = request.get_ref();
        let tenant_id = validate::name("tenant_id", &r.tenant_id).map_err(Error::from)?;
        let max_active_runs = match r.max_active_runs {
            0 => None,
            n if n < 0 => {
                return Err(Error::invalid("max_active_runs", "must not be negative").into());
            }
            n => Some(n),
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        runners::set_tenant_limit(&client, tenant_id, max_active_runs).await?;
        // A limit raised or removed may make runs claimable at once.
        self.state.notifier.work_available();
        Ok(Response::new(proto::SetTenantLimitResponse {}))
    }

    async fn set_tenant_retention(
        &self,
        request: Request<proto::SetTenantRetentionRequest>,
    ) -> Result<Response<proto::SetTenantRetentionResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let r = request.get_ref();
        let tenant_id = validate::name("tenant_id", &r.tenant_id).map_err(Error::from)?;
        let event_retention_ms = r
            .event_retention_ms
            .map(|ms| validate::retention_ms("event_retention_ms", ms))
            .transpose()
            .map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        runners::set_tenant_retention(&client, tenant_id, event_retention_ms).await?;
        tracing::info!(
            tenant = tenant_id,
            event_retention_ms,
            "tenant retention set"
        );
        Ok(Response::new(proto::SetTenantRetentionResponse {}))
    }

    async fn drain_runner(
        &self,
        request: Request<proto::DrainRunnerRequest>,
    ) -> Result<Response<proto::DrainRunnerResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let runner_id =
            RunnerId::parse("runner_id", &request.get_ref().runner_id).map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let found = runners::drain(&client, runner_id).await?;
        if found {
            tracing::info!(runner = %runner_id, "runner drain requested");
        }
        Ok(Response::new(proto::DrainRunnerResponse { found }))
    }
    async fn create_api_key(
        &self,
        request: Request<proto::CreateApiKeyRequest>,
    ) -> Result<Response<proto::CreateApiKeyResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let r = request.get_ref();
        let tenant_id = validate::name("tenant_id", &r.tenant_id).map_err(Error::from)?;
        let role = match proto::ApiKeyRole::try_from(r.role) {
            Ok(proto::ApiKeyRole::Client) => Role::Client,
            Ok(proto::ApiKeyRole::Runner) => Role::Runner,
            Ok(proto::ApiKeyRole::Admin) => Role::Admin,
            _ => return Err(Error::invalid("role", "must be client, runner or admin").into()),
        };
        let project_ids = validate::names("project_ids", &r.project_ids).map_err(Error::from)?;
        let name =
            validate::short_text("name", &r.name, MAX_KEY_NAME_BYTES).map_err(Error::from)?;
        let expires_at = match r.expires_at {
            None => None,
            Some(at) => {
                let at = SystemTime::try_from(at)
                    .map_err(|_| Error::invalid("expires_at", "is not a valid timestamp"))?;
                if let Some(problem) = api_keys::expiry_problem(at, SystemTime::now()) {
                    return Err(Error::invalid("expires_at", problem).into());
                }
                Some(at)
            }
        };
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let created =
            api_keys::create(&client, tenant_id, role, &project_ids, name, expires_at).await?;
        tracing::info!(key_id = %created.record.id, tenant = tenant_id, role = role.as_str(), "api key created");
        Ok(Response::new(proto::CreateApiKeyResponse {
            api_key: Some(api_key(&created.record)),
            key: created.key,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<proto::ListApiKeysRequest>,
    ) -> Result<Response<proto::ListApiKeysResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let tenant_id = validate::optional_name("tenant_id", &request.get_ref().tenant_id)
            .map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let keys = api_keys::list(&client, tenant_id.as_deref()).await?;
        Ok(Response::new(proto::ListApiKeysResponse {
            api_keys: keys.iter().map(api_key).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<proto::RevokeApiKeyRequest>,
    ) -> Result<Response<proto::RevokeApiKeyResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let key_id = uuid::Uuid::try_parse(&request.get_ref().key_id)
            .map_err(|_| Error::invalid("key_id", "is not a valid key id"))?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let revoked = api_keys::revoke(&client, key_id).await?;
        // Evicts it from every replica's cache and ends the streams it opened.
        self.state.notifier.key_revoked(key_id);
        tracing::info!(%key_id, "api key revoked");
        Ok(Response::new(proto::RevokeApiKeyResponse {
            api_key: Some(api_key(&revoked)),
        }))
    }

    async fn set_rate_limit(
        &self,
        request: Request<proto::SetRateLimitRequest>,
    ) -> Result<Response<proto::SetRateLimitResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let Some(limit) = request.get_ref().rate_limit.as_ref() else {
            return Err(Error::invalid("rate_limit", "is required").into());
        };
        let (tenant_id, scope, key, setting) = rate_limit_request(limit).map_err(Error::from)?;
        let stored = flow::set_rate_limit(&self.state.pool, tenant_id, scope, key, setting).await?;
        tracing::info!(
            tenant = tenant_id,
            scope = scope.as_str(),
            key,
            runs = limit.runs,
            period_ms = limit.period_ms,
            "rate limit set"
        );
        // A limit raised or removed may make runs claimable at once.
        self.state.notifier.work_available();
        Ok(Response::new(proto::SetRateLimitResponse {
            rate_limit: Some(match stored {
                Some(stored) => rate_limit(&stored),
                None => proto::RateLimit {
                    tenant_id: tenant_id.to_owned(),
                    scope: limit.scope,
                    key: key.to_owned(),
                    ..Default::default()
                },
            }),
        }))
    }

    async fn list_rate_limits(
        &self,
        request: Request<proto::ListRateLimitsRequest>,
    ) -> Result<Response<proto::ListRateLimitsResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let tenant_id = validate::optional_name("tenant_id", &request.get_ref().tenant_id)
            .map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let limits = flow::list_rate_limits(&client, tenant_id.as_deref()).await?;
        Ok(Response::new(proto::ListRateLimitsResponse {
            rate_limits: limits.iter().map(rate_limit).collect(),
        }))
    }

    async fn set_concurrency_limit(
        &self,
        request: Request<proto::SetConcurrencyLimitRequest>,
    ) -> Result<Response<proto::SetConcurrencyLimitResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let r = request.get_ref();
        let tenant_id = validate::name("tenant_id", &r.tenant_id).map_err(Error::from)?;
        let key = validate::concurrency_key("concurrency_key", &r.concurrency_key)
            .map_err(Error::from)?
            .unwrap_or_default();
        let max_active = match r.max_active {
            0 => None,
            n if (1..=MAX_KEY_ACTIVE).contains(&n) => Some(n),
            _ => {
                return Err(Error::invalid(
                    "max_active",
                    format!("must be between 1 and {MAX_KEY_ACTIVE}, or 0 to remove the limit"),
                )
                .into());
            }
        };
        let admitted =
            flow::set_concurrency_limit(&self.state.pool, tenant_id, key, max_active).await?;
        tracing::info!(
            tenant = tenant_id,
            key,
            max_active,
            admitted = admitted.len(),
            "concurrency limit set"
        );
        if !admitted.is_empty() {
            self.state.notifier.work_available();
        }
        Ok(Response::new(proto::SetConcurrencyLimitResponse {}))
    }

    async fn list_concurrency_limits(
        &self,
        request: Request<proto::ListConcurrencyLimitsRequest>,
    ) -> Result<Response<proto::ListConcurrencyLimitsResponse>, Status> {
        caller(&self.state, &request, Role::Admin).await?;
        let tenant_id = validate::optional_name("tenant_id", &request.get_ref().tenant_id)
            .map_err(Error::from)?;
        let client = self.state.pool.get().await.map_err(Error::from)?;
        let limits = flow::list_concurrency_limits(&client, tenant_id.as_deref()).await?;
        Ok(Response::new(proto::ListConcurrencyLimitsResponse {
            concurrency_limits: limits
                .iter()
                .map(|l| proto::ConcurrencyLimit {
                    tenant_id: l.tenant_id.clone(),
                    concurrency_key: l.concurrency_key.clone(),
                    max_active: l.max_active,
                    active_runs: l.active_runs,
                    waiting_runs: l.waiting_runs,
                })
                .collect(),
        }))
    }
}

/// Most runs of one concurrency key at once.
const MAX_KEY_ACTIVE: i32 = 10_000;
/// Most runs per period, and the largest burst, of a rate limit.
const MAX_RATE_RUNS: i32 = 100_000;
/// A rate limit's period: from a second to an hour.
const RATE_PERIOD_MS: std::ops::RangeInclusive<i64> = 1_000..=3_600_000;

/// A SetRateLimit request checked: tenant, scope, key and the setting (`None`: remove).
fn rate_limit_request(
    r: &proto::RateLimit,
) -> Result<(&str, flow::Scope, &str, Option<flow::RateSetting>), FieldError> {
    let tenant_id = validate::name("rate_limit.tenant_id", &r.tenant_id)?;
    let scope = match proto::RateLimitScope::try_from(r.scope) {
        Ok(proto::RateLimitScope::Tenant) => flow::Scope::Tenant,
        Ok(proto::RateLimitScope::Queue) => flow::Scope::Queue,
        Ok(proto::RateLimitScope::ConcurrencyKey) => flow::Scope::ConcurrencyKey,
        _ => {
            return Err(FieldError::new(
                "rate_limit.scope",
                "must be tenant, queue or concurrency_key",
            ));
        }
    };
    let key = match scope {
        flow::Scope::Tenant if !r.key.is_empty() => {
            return Err(FieldError::new(
                "rate_limit.key",
                "must be empty for the tenant scope",
            ));
        }
        flow::Scope::Tenant => "",
        flow::Scope::Queue => validate::name("rate_limit.key", &r.key)?,
        flow::Scope::ConcurrencyKey => validate::concurrency_key("rate_limit.key", &r.key)?
            .ok_or_else(|| FieldError::new("rate_limit.key", "must name the concurrency key"))?,
    };
    if r.runs == 0 {
        return Ok((tenant_id, scope, key, None));
    }
    if !(1..=MAX_RATE_RUNS).contains(&r.runs) {
        return Err(FieldError::new(
            "rate_limit.runs",
            format!("must be between 1 and {MAX_RATE_RUNS}, or 0 to remove the limit"),
        ));
    }
    if !RATE_PERIOD_MS.contains(&r.period_ms) {
        return Err(FieldError::new(
            "rate_limit.period_ms",
            "must be between 1000 (a second) and 3600000 (an hour)",
        ));
    }
    let burst = match r.burst {
        0 => r.runs,
        n if (1..=MAX_RATE_RUNS).contains(&n) => n,
        _ => {
            return Err(FieldError::new(
                "rate_limit.burst",
                format!("must be between 1 and {MAX_RATE_RUNS}, or 0 for `runs`"),
            ));
        }
    };
    Ok((
        tenant_id,
        scope,
        key,
        Some(flow::RateSetting {
            runs: r.runs,
            period_ms: r.period_ms,
            burst,
        }),
    ))
}

fn rate_limit(l: &flow::RateLimit) -> proto::RateLimit {
    let scope = match l.scope {
        flow::Scope::Tenant => proto::RateLimitScope::Tenant,
        flow::Scope::Queue => proto::RateLimitScope::Queue,
        flow::Scope::ConcurrencyKey => proto::RateLimitScope::ConcurrencyKey,
    };
    proto::RateLimit {
        tenant_id: l.tenant_id.clone(),
        scope: scope as i32,
        key: l.key.clone(),
        runs: l.runs,
        period_ms: l.period_ms,
        burst: l.burst,
        tokens: l.tokens,
        waiting_runs: l.waiting_runs,
    }
}
