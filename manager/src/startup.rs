//! Building and running the manager: pool, migrations, listener, sweeper, gRPC server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::proto::{
    self, admin_service_server::AdminServiceServer, run_service_server::RunServiceServer,
    runner_service_server::RunnerServiceServer, session_service_server::SessionServiceServer,
};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use uuid::Uuid;

use crate::api::auth::Authenticator;
use crate::api::{AdminApi, AppState, RunApi, RunnerApi, SessionApi};
use crate::config::{AuthMode, Settings};
use crate::metrics::{self, Metrics};
use crate::notify::{self, Notifier};
use crate::observe::ObserveLayer;
use crate::{db, health, sweeper};

/// A manager whose listener is bound and schema migrated, ready to [`run`](Self::run).
pub struct Application {
    listener: TcpListener,
    /// The Prometheus endpoint's listener; `None` when metrics are disabled.
    metrics_listener: Option<TcpListener>,
    pool: Pool,
    settings: Settings,
}

impl Application {
    /// Connects, migrates and binds. Binding `127.0.0.1:0` picks a free port (tests).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let url = settings
            .database_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("DATABASE_URL (or --database-url) is required"))?;
        check_auth(&settings)?;
        let pool = db::pool(url, settings.db_pool_size)?;
        if settings.migrate_on_start() {
            db::migrate(&pool).await?;
        }
        let listener = TcpListener::bind(settings.listen).await?;
        let metrics_listener = metrics::bind(&settings.metrics_listen).await?;
        Ok(Self {
            listener,
            metrics_listener,
            pool,
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then stops the sweeper and closes the pool.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            pool,
            settings,
        } = self;
        let database_url = settings.database_url.clone().unwrap_or_default();
        let notifier = Notifier::new(Uuid::new_v4());
        let metrics = Arc::new(Metrics::new());
        let migrated = settings.migrate_on_start();
        let auth = Arc::new(Authenticator::new(pool.clone()));
        let state = AppState {
            pool,
            settings: Arc::new(settings),
            notifier: notifier.clone(),
            shutdown: shutdown.child_token(),
            metrics: metrics.clone(),
            auth,
        };
        let tasks = TaskTracker::new();
        let background = shutdown.child_token();
        let interval = state.settings.sweep_interval();
        tasks.spawn(sweeper::run(
            state.pool.clone(),
            notifier.clone(),
            metrics.clone(),
            interval,
            background.clone(),
        ));
        if let Some(listener) = metrics_listener {
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            tasks.spawn(metrics::serve(
                listener,
                metrics.clone(),
                state.pool.clone(),
                background.clone(),
            ));
        }
        tasks.spawn(notify::publish(
            notifier.clone(),
            state.pool.clone(),
            background.clone(),
        ));
        tasks.spawn(notify::listen(notifier, database_url, background.clone()));

        let (health, health_service) = tonic_health::server::health_reporter();
        let services = vec![
            "",
            <RunServiceServer<RunApi> as NamedService>::NAME,
            <SessionServiceServer<SessionApi> as NamedService>::NAME,
            <RunnerServiceServer<RunnerApi> as NamedService>::NAME,
            <AdminServiceServer<AdminApi> as NamedService>::NAME,
        ];
        // Migrated just now: serving until a probe fails. Otherwise not until the
        // schema is found current.
        let initially = if migrated {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health::set_all(&health, &services, initially).await;
        tasks.spawn(health::watch(
            state.pool.clone(),
            health.clone(),
            services,
            migrated,
            background.clone(),
        ));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        tracing::info!(addr = %listener.local_addr()?, "manager listening");
        let served = tonic::transport::Server::builder()
            .layer(ObserveLayer::new(metrics.clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(RunServiceServer::new(RunApi::new(state.clone())))
            .add_service(SessionServiceServer::new(SessionApi::new(state.clone())))
            .add_service(RunnerServiceServer::new(RunnerApi::new(state.clone())))
            .add_service(AdminServiceServer::new(AdminApi::new(state.clone())))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled());
        // On shutdown the server stops accepting, runner streams are told to drain and
        // end, watchers end; in-flight calls get a grace period, then the manager stops.
        let grace = Duration::from_millis(state.settings.shutdown_grace_ms);
        let served = tokio::select! {
            served = served => served,
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "calls still in flight after the shutdown grace period; stopping anyway");
                Ok(())
            }
        };

        background.cancel();
        tasks.close();
        tasks.wait().await;
        state.pool.close();
        served?;
        tracing::info!("manager stopped");
        Ok(())
    }
}

/// Refuses to serve without authentication anywhere but on a loopback address.
fn check_auth(settings: &Settings) -> anyhow::Result<()> {
    if settings.auth == AuthMode::Disabled && !settings.listen.ip().is_loopback() {
        anyhow::bail!(
            "--auth disabled is only allowed on a loopback address (127.0.0.1 or [::1]), \
             not {}: anyone who can reach it could act for any tenant. Create API keys with \
             `agentrun-manager keys create` and use --auth required",
            settings.listen
        );
    }
    if settings.auth == AuthMode::Disabled {
        tracing::warn!(listen = %settings.listen, "authentication is disabled (development mode)");
    }
    Ok(())
}
