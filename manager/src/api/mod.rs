//! gRPC handlers. They only convert (proto <-> store types, validating input on the way
//! in), call the store, and map errors — no SQL here, no proto types past this module.

mod admin;
mod connect;
mod convert;
mod run_service;
mod runner_service;
mod session_service;
mod validate;
mod watch;

use std::sync::Arc;

use deadpool_postgres::Pool;
use tonic::Request;

pub use admin::AdminApi;
pub use run_service::RunApi;
pub use runner_service::RunnerApi;
pub use session_service::SessionApi;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::notify::Notifier;
use crate::store::Tenant;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    pub settings: Arc<Settings>,
    pub notifier: Arc<Notifier>,
    /// Cancelled when the manager shuts down: runner streams drain.
    pub shutdown: CancellationToken,
}

/// Request metadata naming the caller's tenant. Authentication (API keys bound to a
/// tenant) is not built yet; until it is, the tenant is this header or `default`.
pub const TENANT_METADATA_KEY: &str = "agentrun-tenant";

/// The tenant a request acts for.
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
