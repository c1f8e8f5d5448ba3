//! gRPC handlers. They only convert (proto <-> store types, validating input on the way
//! in), call the store, and map errors — no SQL here, no proto types past this module.

mod admin;
pub mod auth;
mod connect;
mod convert;
mod run_service;
mod runner_messages;
mod runner_service;
mod schedule_service;
mod session_service;
mod validate;
mod watch;
pub(crate) mod watch_hub;
mod webhook_service;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tonic::Request;

pub use admin::AdminApi;
pub use run_service::RunApi;
pub use runner_service::RunnerApi;
pub use schedule_service::ScheduleApi;
pub use session_service::SessionApi;
pub use webhook_service::WebhookApi;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthMode, Settings};
use crate::error::{Error, Result};
use crate::heartbeats::Heartbeats;
use crate::hellos::Hellos;
use crate::notify::Notifier;
use crate::store::Tenant;
use crate::store::api_keys::Role;
use auth::{Authenticator, Caller};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub notifier: Arc<Notifier>,
    /// Cancelled when the manager shuts down: runner streams drain.
    pub shutdown: CancellationToken,
    /// Prometheus metrics, updated where things happen.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Verifies API keys (unused when authentication is disabled).
    pub auth: Arc<Authenticator>,
    /// Renews the heartbeats of every runner on this replica together.
    pub heartbeats: Heartbeats,
    /// Registers the runners connecting to this replica together.
    pub hellos: Hellos,
    /// Claims runs for every runner stream on this replica together.
    pub dispatcher: Arc<crate::dispatcher::Dispatcher>,
    /// Long-lived per-stream tasks (runner sessions, watchers): shutdown waits for them.
    pub tasks: TaskTracker,
    /// Open watchers per tenant on this replica (the `tenant_watchers` quota).
    pub watchers: Arc<crate::limits::Occupancy<crate::store::Tenant>>,
    /// Tails each watched run once for all its watchers on this replica.
    pub watch_hub: Arc<watch_hub::WatchHub>,
    /// Wakes this replica's schedule firing loop when a schedule gets a new due time
    /// here (created, resumed), so it need not poll for it.
    pub schedules_changed: Arc<tokio::sync::Notify>,
}

/// Request metadata naming the caller's tenant when authentication is disabled
/// (development); with authentication the tenant comes from the API key and this header
/// is ignored.
pub const TENANT_METADATA_KEY: &str = "agentrun-tenant";

/// The one place that decides who a call acts for and whether it may use its service:
/// every handler starts here, naming the role its service needs. With authentication
/// required the caller's key must be valid (else UNAUTHENTICATED) and hold `role` (else
/// PERMISSION_DENIED), and the tenant and projects are the key's. With it disabled any
/// caller may do anything, for the tenant of the `agentrun-tenant` header.
///
/// When the manager verifies client certificates (`--tls-client-ca`), a runner must also
/// present one (else UNAUTHENTICATED); other roles may connect without.
async fn caller<T>(state: &AppState, request: &Request<T>, role: Role) -> Result<Caller> {
    let caller = authorize(state, request, role).await?;
    // Every call's span names its tenant.
    crate::observe::record_tenant(caller.tenant.as_str());
    Ok(caller)
}

async fn authorize<T>(state: &AppState, request: &Request<T>, role: Role) -> Result<Caller> {
    if role == Role::Runner && state.settings.tls_client_ca.is_some() {
        let presented = request.peer_certs().is_some_and(|certs| !certs.is_empty());
        if !presented {
            return Err(Error::Unauthenticated(
                "RunnerService requires a TLS client certificate signed by the manager's \
                 client CA (runner --tls-cert and --tls-key)"
                    .into(),
            ));
        }
    }
    if state.settings.auth == AuthMode::Disabled {
        return Ok(Caller {
            tenant: tenant_of(request)?,
            role: None,
            projects: Vec::new(),
            authenticated: false,
            key_id: None,
        });
    }
    let key = state.auth.authenticate(request, &state.notifier).await?;
    if key.role != role {
        return Err(Error::PermissionDenied(format!(
            "a {} key cannot call this service (it needs a {} key)",
            key.role.as_str(),
            role.as_str()
        )));
    }
    Ok(Caller {
        tenant: Tenant(key.tenant_id),
        role: Some(key.role),
        projects: key.project_ids,
        authenticated: true,
        key_id: Some(key.id),
    })
}

/// The tenant named by the `agentrun-tenant` header, or `default`.
fn tenant_of<T>(request: &Request<T>) -> Result<Tenant> {
    let Some(value) = request.metadata().get(TENANT_METADATA_KEY) else {
        return Ok(Tenant("default".into()));
    };
    let text = value
        .to_str()
        .map_err(|_| Error::invalid(TENANT_METADATA_KEY, "must be ASCII"))?;
    Ok(Tenant(
        validate::name(TENANT_METADATA_KEY, text)?.to_owned(),
    ))
}
