//! Sessions: conversations that span runs. This module keeps the boundary rule (a session
//! never crosses tenant, project or backend profile) and the version bump on change; the
//! read side (SessionService) is not implemented yet.

use agentrun_shared::ids::SessionId;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::Tenant;
use crate::error::{Error, Result};

/// Creates the session if it does not exist, or checks that the existing one belongs to
/// the same tenant, project and backend profile.
pub(crate) async fn ensure(
    tx: &impl GenericClient,
    tenant: &Tenant,
    session_id: SessionId,
    project_id: &str,
    backend_profile: &str,
) -> Result<()> {
    let upsert = tx
        .prepare_cached(
            "INSERT INTO sessions (id, tenant_id, project_id, backend_profile)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    tx.execute(
        &upsert,
        &[
            &session_id.0,
            &tenant.as_str(),
            &project_id,
            &backend_profile,
        ],
    )
    .await?;
    let stmt = tx
        .prepare_cached(
            "SELECT tenant_id, project_id, backend_profile FROM sessions WHERE id = $1 FOR SHARE",
        )
        .await?;
    let row = tx.query_one(&stmt, &[&session_id.0]).await?;
    // Another tenant's session is reported as absent: its existence is not ours to reveal.
    if row.get::<_, &str>(0) != tenant.as_str() {
        return Err(Error::NotFound { what: "session" });
    }
    if row.get::<_, &str>(1) != project_id {
        return Err(Error::invalid("session_id", "belongs to another project"));
    }
    if row.get::<_, &str>(2) != backend_profile {
        return Err(Error::invalid(
            "session_id",
            "belongs to another backend_profile",
        ));
    }
    Ok(())
}

/// Records that these runs changed in a user-visible way: bumps their sessions' version
/// and remembers the last run.
pub(crate) async fn touch_runs(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE sessions s SET version = s.version + 1, last_run_id = r.id, updated_at = now()
             FROM runs r
             WHERE r.id = ANY($1) AND r.session_id = s.id",
        )
        .await?;
    tx.execute(&stmt, &[&run_ids]).await?;
    Ok(())
}
