//! Building and running the manager: pool, migrations, listener, sweeper, gRPC server.

use std::net::SocketAddr;
use std::sync::Arc;

use agentrun_shared::proto::{
    self, admin_service_server::AdminServiceServer, run_service_server::RunServiceServer,
    runner_service_server::RunnerServiceServer, session_service_server::SessionServiceServer,
};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::api::{AdminApi, AppState, RunApi, RunnerApi, SessionApi};
use crate::config::Settings;
use crate::notify::{self, Notifier};
use crate::{db, sweeper};

/// A manager whose listener is bound and schema migrated, ready to [`run`](Self::run).
pub struct Application {
    listener: TcpListener,
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
        let pool = db::pool(url, settings.db_pool_size)?;
        db::migrate(&pool).await?;
        let listener = TcpListener::bind(settings.listen).await?;
        Ok(Self {
            listener,
            pool,
            settings,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` is cancelled, then stops the sweeper and closes the pool.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            pool,
            settings,
        } = self;
        let database_url = settings.database_url.clone().unwrap_or_default();
        let notifier = Notifier::new(Uuid::new_v4());
        let state = AppState {
            pool,
            settings: Arc::new(settings),
            notifier: notifier.clone(),
            shutdown: shutdown.child_token(),
        };
        let tasks = TaskTracker::new();
        let background = shutdown.child_token();
        let interval = state.settings.sweep_interval();
        tasks.spawn(sweeper::run(
            state.pool.clone(),
            notifier.clone(),
            interval,
            background.clone(),
        ));
        tasks.spawn(notify::publish(
            notifier.clone(),
            state.pool.clone(),
            background.clone(),
        ));
        tasks.spawn(notify::listen(notifier, database_url, background.clone()));

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<RunServiceServer<RunApi>>().await;
        health.set_serving::<RunnerServiceServer<RunnerApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        tracing::info!(addr = %listener.local_addr()?, "manager listening");
        let served = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(RunServiceServer::new(RunApi::new(state.clone())))
            .add_service(SessionServiceServer::new(SessionApi::new(state.clone())))
            .add_service(RunnerServiceServer::new(RunnerApi::new(state.clone())))
            .add_service(AdminServiceServer::new(AdminApi::new(state.clone())))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
            .await;

        background.cancel();
        tasks.close();
        tasks.wait().await;
        state.pool.close();
        served?;
        tracing::info!("manager stopped");
        Ok(())
    }
}
