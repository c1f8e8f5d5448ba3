//! The connection to a manager: one channel, the RunService, SessionService and
//! AdminService clients on it, and the API key (or, without authentication, the tenant
//! header) every request carries.

use agentrun_shared::proto::{
    self, admin_service_client::AdminServiceClient, run_service_client::RunServiceClient,
    session_service_client::SessionServiceClient,
};
use agentrun_shared::tls::{ClientTls, TlsError};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::error::{CliError, error_chain};

/// Request metadata naming the tenant; the manager reads it until API keys exist.
pub const TENANT_HEADER: &str = "agentrun-tenant";

/// A connected manager.
pub struct Manager {
    url: String,
    tenant: Option<MetadataValue<Ascii>>,
    /// `Bearer <API key>`, sent with every call when set.
    authorization: Option<MetadataValue<Ascii>>,
    runs: RunServiceClient<Channel>,
    sessions: SessionServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    /// For the clients of services whose commands live in their own modules.
    channel: Channel,
}

impl Manager {
    /// Connects to the manager at `url` (eagerly, so an unreachable manager is reported
    /// before anything else happens); an `https://` URL trusts the system roots.
    pub async fn connect(url: &str, tenant: Option<&str>) -> Result<Self, CliError> {
        Self::connect_with_tls(url, tenant, &ClientTls::default()).await
    }

    /// Like [`Self::connect`], with `tls` for an `https://` URL (a CA to trust, a client
    /// certificate to present).
    pub async fn connect_with_tls(
        url: &str,
        tenant: Option<&str>,
        tls: &ClientTls,
    ) -> Result<Self, CliError> {
        let tenant = tenant
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<MetadataValue<Ascii>>()
                    .map_err(|_| CliError::Usage(format!("invalid --tenant {t:?}: must be ASCII")))
            })
            .transpose()?;
        let endpoint = tls.endpoint(url).map_err(|err| match err {
            TlsError::Transport { .. } => {
                CliError::Usage(format!("invalid --manager URL {url:?}: {err}"))
            }
            err => CliError::Usage(err.to_string()),
        })?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| CliError::Unreachable {
                url: url.to_owned(),
                reason: error_chain(&err),
            })?;
        Ok(Self {
            url: url.to_owned(),
            tenant,
            authorization: None,
            runs: RunServiceClient::new(channel.clone()),
            sessions: SessionServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel.clone()),
            channel,
        })
    }

    /// Sends `key` as `authorization: Bearer <key>` with every call (none when `None` or
    /// empty).
    pub fn with_api_key(mut self, key: Option<&str>) -> Result<Self, CliError> {
        self.authorization = key
            .filter(|k| !k.is_empty())
            .map(|k| {
                format!("Bearer {k}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| CliError::Usage("invalid --api-key: must be ASCII".into()))
            })
            .transpose()?;
        Ok(self)
    }

    /// The URL this manager was reached at.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection, for a service client of a command's own module.
    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `message` as a request acting for the configured tenant.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(tenant) = &self.tenant {
            request.metadata_mut().insert(TENANT_HEADER, tenant.clone());
        }
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }

    /// CreateRun.
    pub async fn create_run(
        &mut self,
        message: proto::CreateRunRequest,
    ) -> Result<proto::CreateRunResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.create_run(request).await?.into_inner())
    }

    /// GetRun.
    pub async fn get_run(&mut self, run_id: &str) -> Result<proto::Run, Status> {
        let request = self.request(proto::GetRunRequest {
            run_id: run_id.to_owned(),
        });
        let response = self.runs.get_run(request).await?.into_inner();
        response
            .run
            .ok_or_else(|| Status::internal("the manager answered GetRun without a run"))
    }

    /// ListRuns (one page).
    pub async fn list_runs(
        &mut self,
        message: proto::ListRunsRequest,
    ) -> Result<proto::ListRunsResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.list_runs(request).await?.into_inner())
    }

    /// ListRequests (one page).
    pub async fn list_requests(
        &mut self,
        message: proto::ListRequestsRequest,
    ) -> Result<proto::ListRequestsResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.list_requests(request).await?.into_inner())
    }

    /// CancelRun; returns the run as it is afterwards.
    pub async fn cancel_run(&mut self, run_id: &str, reason: &str) -> Result<proto::Run, Status> {
        let request = self.request(proto::CancelRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        });
        let response = self.runs.cancel_run(request).await?.into_inner();
        response
            .run
            .ok_or_else(|| Status::internal("the manager answered CancelRun without a run"))
    }

    /// RerunRun.
    pub async fn rerun_run(
        &mut self,
        message: proto::RerunRunRequest,
    ) -> Result<proto::RerunRunResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.rerun_run(request).await?.into_inner())
    }

    /// ForkRun.
    pub async fn fork_run(
        &mut self,
        message: proto::ForkRunRequest,
    ) -> Result<proto::ForkRunResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.fork_run(request).await?.into_inner())
    }

    /// CancelRuns: one call, up to 1,000 runs.
    pub async fn cancel_runs(
        &mut self,
        message: proto::CancelRunsRequest,
    ) -> Result<proto::CancelRunsResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.cancel_runs(request).await?.into_inner())
    }

    /// SendCommand.
    pub async fn send_command(
        &mut self,
        message: proto::SendCommandRequest,
    ) -> Result<proto::SendCommandResponse, Status> {
        let request = self.request(message);
        Ok(self.runs.send_command(request).await?.into_inner())
    }

    /// ListEvents: up to `limit` stored events with `seq > after_seq`.
    pub async fn list_events(
        &mut self,
        run_id: &str,
        after_seq: i64,
        limit: i32,
    ) -> Result<proto::ListEventsResponse, Status> {
        let request = self.request(proto::ListEventsRequest {
            run_id: run_id.to_owned(),
            after_seq,
            limit,
        });
        Ok(self.runs.list_events(request).await?.into_inner())
    }

    /// WatchRun: the stream of events with `seq > after_seq`, ending after `run.terminal`.
    pub async fn watch_run(
        &mut self,
        run_id: &str,
        after_seq: i64,
    ) -> Result<Streaming<proto::Event>, Status> {
        let request = self.request(proto::WatchRunRequest {
            run_id: run_id.to_owned(),
            after_seq,
        });
        Ok(self.runs.watch_run(request).await?.into_inner())
    }

    /// ResolveRequest: answers an open request of a run with `decision`.
    pub async fn resolve_request(
        &mut self,
        run_id: &str,
        request_id: &str,
        decision: &str,
    ) -> Result<proto::ResolveRequestResponse, Status> {
        let request = self.request(proto::ResolveRequestRequest {
            run_id: run_id.to_owned(),
            request_id: request_id.to_owned(),
            decision: decision.to_owned(),
            ..Default::default()
        });
        Ok(self.runs.resolve_request(request).await?.into_inner())
    }

    /// GetSession, as `reader` sees it.
    pub async fn get_session(
        &mut self,
        session_id: &str,
        reader: &str,
    ) -> Result<proto::SessionView, Status> {
        let request = self.request(proto::GetSessionRequest {
            session_id: session_id.to_owned(),
            reader: reader.to_owned(),
        });
        let response = self.sessions.get_session(request).await?.into_inner();
        response
            .session
            .ok_or_else(|| Status::internal("the manager answered GetSession without a session"))
    }

    /// ListSessions (one page).
    pub async fn list_sessions(
        &mut self,
        message: proto::ListSessionsRequest,
    ) -> Result<proto::ListSessionsResponse, Status> {
        let request = self.request(message);
        Ok(self.sessions.list_sessions(request).await?.into_inner())
    }

    /// MarkSessionRead: `reader` has seen the session up to `version`.
    pub async fn mark_session_read(
        &mut self,
        session_id: &str,
        reader: &str,
        version: i64,
    ) -> Result<proto::SessionView, Status> {
        let request = self.request(proto::MarkSessionReadRequest {
            session_id: session_id.to_owned(),
            reader: reader.to_owned(),
            version,
        });
        let response = self.sessions.mark_session_read(request).await?.into_inner();
        response.session.ok_or_else(|| {
            Status::internal("the manager answered MarkSessionRead without a session")
        })
    }

    /// ListSessionEvents (one page).
    pub async fn list_session_events(
        &mut self,
        message: proto::ListSessionEventsRequest,
    ) -> Result<Vec<proto::Event>, Status> {
        let request = self.request(message);
        Ok(self
            .sessions
            .list_session_events(request)
            .await?
            .into_inner()
            .events)
    }

    /// WatchSession: the session's events after the cursor, then live ones; it has no
    /// end of its own.
    pub async fn watch_session(
        &mut self,
        message: proto::WatchSessionRequest,
    ) -> Result<Streaming<proto::SessionEvent>, Status> {
        let request = self.request(message);
        Ok(self.sessions.watch_session(request).await?.into_inner())
    }

    /// GetQueueStats.
    pub async fn queue_stats(&mut self) -> Result<proto::GetQueueStatsResponse, Status> {
        let request = self.request(proto::GetQueueStatsRequest {});
        Ok(self.admin.get_queue_stats(request).await?.into_inner())
    }

    /// ListRunners.
    pub async fn list_runners(&mut self) -> Result<Vec<proto::RunnerInfo>, Status> {
        let request = self.request(proto::ListRunnersRequest {});
        Ok(self.admin.list_runners(request).await?.into_inner().runners)
    }
    /// DrainRunner: whether a connected runner has that id.
    pub async fn drain_runner(&mut self, runner_id: &str) -> Result<bool, Status> {
        let request = self.request(proto::DrainRunnerRequest {
            runner_id: runner_id.to_owned(),
        });
        Ok(self.admin.drain_runner(request).await?.into_inner().found)
    }

    /// SetTenantLimit.
    pub async fn set_tenant_limit(
        &mut self,
        tenant_id: &str,
        max_active_runs: i32,
    ) -> Result<(), Status> {
        let request = self.request(proto::SetTenantLimitRequest {
            tenant_id: tenant_id.to_owned(),
            max_active_runs,
        });
        self.admin.set_tenant_limit(request).await?;
        Ok(())
    }

    /// SetRateLimit: the limit as stored.
    pub async fn set_rate_limit(
        &mut self,
        rate_limit: proto::RateLimit,
    ) -> Result<proto::RateLimit, Status> {
        let request = self.request(proto::SetRateLimitRequest {
            rate_limit: Some(rate_limit),
        });
        self.admin
            .set_rate_limit(request)
            .await?
            .into_inner()
            .rate_limit
            .ok_or_else(|| Status::internal("the manager answered SetRateLimit without a limit"))
    }

    /// ListRateLimits (empty tenant: all).
    pub async fn list_rate_limits(
        &mut self,
        tenant_id: String,
    ) -> Result<Vec<proto::RateLimit>, Status> {
        let request = self.request(proto::ListRateLimitsRequest { tenant_id });
        Ok(self
            .admin
            .list_rate_limits(request)
            .await?
            .into_inner()
            .rate_limits)
    }

    /// SetConcurrencyLimit.
    pub async fn set_concurrency_limit(
        &mut self,
        message: proto::SetConcurrencyLimitRequest,
    ) -> Result<(), Status> {
        let request = self.request(message);
        self.admin.set_concurrency_limit(request).await?;
        Ok(())
    }

    /// ListConcurrencyLimits (empty tenant: all).
    pub async fn list_concurrency_limits(
        &mut self,
        tenant_id: String,
    ) -> Result<Vec<proto::ConcurrencyLimit>, Status> {
        let request = self.request(proto::ListConcurrencyLimitsRequest { tenant_id });
        Ok(self
            .admin
            .list_concurrency_limits(request)
            .await?
            .into_inner()
            .concurrency_limits)
    }

    /// SetTenantRetention (`None`: back to the manager's default).
    pub async fn set_tenant_retention(
        &mut self,
        tenant_id: &str,
        event_retention_ms: Option<i64>,
    ) -> Result<(), Status> {
        let request = self.request(proto::SetTenantRetentionRequest {
            tenant_id: tenant_id.to_owned(),
            event_retention_ms,
        });
        self.admin.set_tenant_retention(request).await?;
        Ok(())
    }

    /// CreateApiKey.
    pub async fn create_api_key(
        &mut self,
        message: proto::CreateApiKeyRequest,
    ) -> Result<proto::CreateApiKeyResponse, Status> {
        let request = self.request(message);
        Ok(self.admin.create_api_key(request).await?.into_inner())
    }

    /// ListApiKeys (of one tenant, or all with an empty `tenant_id`).
    pub async fn list_api_keys(&mut self, tenant_id: &str) -> Result<Vec<proto::ApiKey>, Status> {
        let request = self.request(proto::ListApiKeysRequest {
            tenant_id: tenant_id.to_owned(),
        });
        Ok(self
            .admin
            .list_api_keys(request)
            .await?
            .into_inner()
            .api_keys)
    }

    /// RevokeApiKey; returns the key as it is afterwards.
    pub async fn revoke_api_key(&mut self, key_id: &str) -> Result<proto::ApiKey, Status> {
        let request = self.request(proto::RevokeApiKeyRequest {
            key_id: key_id.to_owned(),
        });
        self.admin
            .revoke_api_key(request)
            .await?
            .into_inner()
            .api_key
            .ok_or_else(|| Status::internal("the manager answered RevokeApiKey without a key"))
    }
}
