//! Building and running the manager: pool, migrations, listener, sweeper, gRPC server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::proto::{
    self, admin_service_server::AdminServiceServer, run_service_server::RunServiceServer,
    runner_service_server::RunnerServiceServer, schedule_service_server::ScheduleServiceServer,
    session_service_server::SessionServiceServer, webhook_service_server::WebhookServiceServer,
};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use uuid::Uuid;

use crate::api::auth::Authenticator;
use crate::api::watch_hub::{self, WatchHub};
use crate::api::{AdminApi, AppState, RunApi, RunnerApi, ScheduleApi, SessionApi, WebhookApi};
use crate::config::{AuthMode, Settings};
use crate::dispatcher::Dispatcher;
use crate::heartbeats::Heartbeats;
use crate::hellos::Hellos;
use crate::metrics::{self, Metrics};
use crate::notify::{self, Notifier};
use crate::observe::ObserveLayer;
use crate::ui::{self, UiAddress};
use crate::wire_errors::WireErrorsLayer;
use crate::{db, health, listener, retention, schedules, sweeper, webhooks};

/// A service with the message size limits set explicitly, both ways (tonic's default
/// for what a server sends is unlimited).
macro_rules! limited {
    ($service:expr) => {
        $service
            .max_decoding_message_size(crate::config::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::config::MAX_MESSAGE_BYTES)
    };
}

/// Database connections renewing leases, besides `--db-pool-size`.
pub const HEARTBEAT_POOL_SIZE: usize = 2;
/// The database connection settling hellos (one batch at a time), besides
/// `--db-pool-size`.
pub const HELLO_POOL_SIZE: usize = 1;

/// A manager whose listener is bound and schema migrated (or to be, once the database
/// answers), ready to [`run`](Self::run).
pub struct Application {
    listener: TcpListener,
    /// The Prometheus endpoint's listener; `None` when metrics are disabled.
    metrics_listener: Option<TcpListener>,
    /// The web UI's listener and base path; `None` when the UI is off.
    ui: Option<(TcpListener, UiAddress)>,
    pool: Pool,
    /// Where the LISTEN connection goes (as the pool's connections do).
    database: db::Database,
    /// TLS for the gRPC listener; `None` serves plaintext.
    tls: Option<ServerTlsConfig>,
    /// The schema was migrated at start (else it is checked, and with `--migrate`
    /// migrated, once the database answers).
    migrated: bool,
    settings: Settings,
}

impl Application {
    /// Migrates (when the database answers: [`migrate_if_answering`]) and binds. Binding
    /// `127.0.0.1:0` picks a free port (tests).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database = db::Database::from_settings(&settings)?;
        let ui_address = UiAddress::parse(&settings.ui_listen, &settings.ui_base_path)?;
        check_auth(&settings, ui_address.as_ref())?;
        settings.check_limits()?;
        let tls = server_tls(&settings)?;
        tracing::info!(sslmode = %database.ssl_mode(), "database connection");
        let pool = database.pool(settings.db_pool_size)?;
        let migrated = settings.migrate_on_start() && migrate_if_answering(&pool).await?;
        let listener = TcpListener::bind(settings.listen).await?;
        let metrics_listener = metrics::bind(&settings.metrics_listen).await?;
        let ui = match ui_address {
            Some(address) => Some((TcpListener::bind(address.listen).await?, address)),
            None => None,
        };
        Ok(Self {
            listener,
            metrics_listener,
            ui,
            pool,
            database,
            tls,
            migrated,
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

    /// The web UI's address to open in a browser, if it is served.
    pub fn ui_url(&self) -> Option<String> {
        let (listener, address) = self.ui.as_ref()?;
        Some(address.url(listener.local_addr().ok()?))
    }

    /// Serves until `shutdown` is cancelled, then stops the sweeper and closes the pool.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            ui,
            pool,
            database,
            tls,
            migrated,
            settings,
        } = self;
        let notifier = Notifier::new(Uuid::new_v4());
        let metrics = Arc::new(Metrics::new());
        let auth = Arc::new(Authenticator::new(pool.clone()));
        let background = shutdown.child_token();
        // Renewals get connections of their own: no other work may delay them past the TTL.
        let heartbeat_pool = database.pool(HEARTBEAT_POOL_SIZE)?;
        let heartbeats = Heartbeats::start(
            heartbeat_pool.clone(),
            settings.lease_ttl(),
            settings.heartbeat_interval(),
            background.clone(),
        );
        // Hellos too: a reconnect storm's claims must not queue ahead of its welcomes.
        let hello_pool = database.pool(HELLO_POOL_SIZE)?;
        let hellos = Hellos::start(
            hello_pool.clone(),
            settings.lease_ttl(),
            notifier.replica_id(),
            background.clone(),
        );
        let tasks = TaskTracker::new();
        let app_shutdown = shutdown.child_token();
        let watch_hub = WatchHub::new(
            pool.clone(),
            notifier.clone(),
            app_shutdown.clone(),
            tasks.clone(),
        );
        let settings = Arc::new(settings);
        let dispatcher = Dispatcher::start(
            pool.clone(),
            settings.clone(),
            notifier.clone(),
            metrics.clone(),
            background.clone(),
        );
        let state = AppState {
            pool,
            settings,
            dispatcher,
            notifier: notifier.clone(),
            shutdown: app_shutdown,
            metrics: metrics.clone(),
            auth,
            heartbeats,
            hellos,
            tasks: tasks.clone(),
            watchers: Default::default(),
            watch_hub: watch_hub.clone(),
            schedules_changed: Default::default(),
        };
        let interval = state.settings.sweep_interval();
        tasks.spawn(sweeper::run(
            state.pool.clone(),
            notifier.clone(),
            metrics.clone(),
            interval,
            background.clone(),
        ));
        tasks.spawn(retention::run(
            state.pool.clone(),
            metrics.clone(),
            state.settings.event_retention_ms,
            state.settings.event_compaction_interval(),
            background.clone(),
        ));
        tasks.spawn(schedules::run(
            state.pool.clone(),
            notifier.clone(),
            state.schedules_changed.clone(),
            schedules::Timing {
                quotas: state.settings.quotas(),
                grace: Duration::from_millis(state.settings.schedule_catch_up_grace_ms),
                poll: Duration::from_millis(state.settings.schedule_poll_interval_ms),
            },
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
        // Webhook deliveries: sent from this replica, never in the way of appends.
        tasks.spawn(webhooks::run(
            state.pool.clone(),
            metrics.clone(),
            state.settings.webhook_private_targets,
            background.clone(),
        ));
        tasks.spawn(notify::publish(
            notifier.clone(),
            state.pool.clone(),
            background.clone(),
        ));
        tasks.spawn(notify::poll_work(
            notifier.clone(),
            state.pool.clone(),
            Duration::from_millis(state.settings.runner_poll_interval_ms.max(10)),
            background.clone(),
        ));
        // One safety-net poll for every watched run on this replica.
        tasks.spawn(watch_hub::poll(
            watch_hub.clone(),
            state.settings.watch_poll_interval(),
            background.clone(),
        ));
        // Other replicas' ephemeral events (a `final` run's deltas) to watchers here.
        tasks.spawn(watch_hub::relay_live(watch_hub, background.clone()));
        tasks.spawn(notify::listen(notifier, database, background.clone()));

        let (health, health_service) = tonic_health::server::health_reporter();
        let services = vec![
            "",
            <RunServiceServer<RunApi> as NamedService>::NAME,
            <SessionServiceServer<SessionApi> as NamedService>::NAME,
            <RunnerServiceServer<RunnerApi> as NamedService>::NAME,
            <AdminServiceServer<AdminApi> as NamedService>::NAME,
            <ScheduleServiceServer<ScheduleApi> as NamedService>::NAME,
            <WebhookServiceServer<WebhookApi> as NamedService>::NAME,
        ];
        // Migrated just now: serving until a probe fails. Otherwise not until the
        // schema is found current.
        let initially = if migrated {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health::set_all(&health, &services, initially).await;
        let self_stop = health::SelfStop::new(shutdown.clone());
        tasks.spawn(health::watch(
            state.pool.clone(),
            health.clone(),
            services,
            migrated,
            state.settings.migrate_on_start() && !migrated,
            self_stop.clone(),
            background.clone(),
        ));
        // Reflection in both versions: grpcurl 1.8 and other tools still ask v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let (reflection_v1, reflection_v1alpha) =
            (reflection().build_v1()?, reflection().build_v1alpha()?);

        let settings = &state.settings;
        let limits = listener::Limits {
            max_connections: listener::effective_max_connections(
                settings.max_connections as usize,
                settings.db_pool_size,
            ),
            handshake_timeout: settings.handshake_timeout(),
            idle_timeout: settings.idle_timeout(),
            tls: tls.is_some(),
            http1: false,
        };
        tracing::info!(
            addr = %listener.local_addr()?,
            tls = tls.is_some(),
            max_connections = limits.max_connections,
            "manager listening"
        );
        if let Some((ui_listener, address)) = ui {
            tracing::info!(url = %address.url(ui_listener.local_addr()?), "web UI listening");
            let mut api = RoutesBuilder::default();
            api.add_service(limited!(RunServiceServer::new(RunApi::new(state.clone()))))
                .add_service(limited!(SessionServiceServer::new(SessionApi::new(
                    state.clone()
                ))))
                .add_service(limited!(AdminServiceServer::new(AdminApi::new(
                    state.clone()
                ))))
                .add_service(limited!(ScheduleServiceServer::new(ScheduleApi::new(
                    state.clone()
                ))))
                .add_service(limited!(WebhookServiceServer::new(WebhookApi::new(
                    state.clone()
                ))));
            let routes = ui::routes(
                api,
                &address.base_path,
                metrics.clone(),
                settings.auth == AuthMode::Disabled,
            );
            let mut server = tonic::transport::Server::builder().accept_http1(true);
            if let Some(tls) = tls.clone() {
                server = server.tls_config(tls.timeout(settings.handshake_timeout()))?;
            }
            // Browsers send nothing while a watch streams and HTTP/1.1 has no pings: no
            // idle timeout here (the connection cap still holds).
            let ui_limits = listener::Limits {
                http1: true,
                idle_timeout: None,
                ..limits
            };
            let served = server.add_routes(routes).serve_with_incoming_shutdown(
                listener::incoming(ui_listener, ui_limits),
                shutdown.clone().cancelled_owned(),
            );
            tasks.spawn(async move {
                if let Err(err) = served.await {
                    tracing::error!(error = %err, "web UI server failed");
                }
            });
        }
        // No per-call `timeout`: Connect and the watches are meant to last.
        let mut server = tonic::transport::Server::builder()
            .max_concurrent_streams(settings.max_concurrent_streams)
            .http2_keepalive_interval(settings.keepalive_interval())
            .http2_keepalive_timeout(Some(settings.keepalive_timeout()));
        if let Some(tls) = tls {
            server = server.tls_config(tls.timeout(settings.handshake_timeout()))?;
        }
        let served = server
            .layer(ObserveLayer::new(metrics.clone()))
            .layer(WireErrorsLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(limited!(RunServiceServer::new(RunApi::new(state.clone()))))
            .add_service(limited!(SessionServiceServer::new(SessionApi::new(
                state.clone()
            ))))
            .add_service(limited!(RunnerServiceServer::new(RunnerApi::new(
                state.clone()
            ))))
            .add_service(limited!(AdminServiceServer::new(AdminApi::new(
                state.clone()
            ))))
            .add_service(limited!(ScheduleServiceServer::new(ScheduleApi::new(
                state.clone()
            ))))
            .add_service(limited!(WebhookServiceServer::new(WebhookApi::new(
                state.clone()
            ))))
            .serve_with_incoming_shutdown(
                listener::incoming(listener, limits),
                shutdown.cancelled(),
            );
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
        heartbeat_pool.close();
        hello_pool.close();
        served?;
        if let Some(reason) = self_stop.reason() {
            anyhow::bail!("the manager stopped: {reason}");
        }
        tracing::info!("manager stopped");
        Ok(())
    }
}

/// The listener's TLS configuration from the certificate, key and client CA files:
/// `None` (plaintext) when no certificate is set. With a client CA, client certificates
/// are verified but optional here; RunnerService requires one (see `api::caller`).
fn server_tls(settings: &Settings) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (cert, key) = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            anyhow::ensure!(
                settings.tls_client_ca.is_none(),
                "--tls-client-ca needs --tls-cert and --tls-key: client certificates are \
                 only verified over TLS"
            );
            return Ok(None);
        }
        _ => anyhow::bail!(
            "TLS needs both --tls-cert (AGENTRUN_TLS_CERT) and --tls-key (AGENTRUN_TLS_KEY), \
             or neither for plaintext"
        ),
    };
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|err| anyhow::anyhow!("cannot read {what} {path:?}: {err}"))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("--tls-cert", cert)?,
        read("--tls-key", key)?,
    ));
    if let Some(ca) = &settings.tls_client_ca {
        tls = tls
            .client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// Applies the migrations if the database answers; true when it did. A database that
/// does not answer yet ([`db::not_answering_yet`]: a deploy racing it, a failover) is
/// not an error: the replica listens, reports NOT_SERVING and migrates once it answers
/// ([`health::watch`]), rather than exiting into an orchestrator's growing restart
/// back-off. Anything else that fails (a misconfigured connection, the migration) stops
/// the start, with the reason.
async fn migrate_if_answering(pool: &deadpool_postgres::Pool) -> anyhow::Result<bool> {
    match pool.get().await {
        Err(err) if db::not_answering_yet(&err) => {
            tracing::warn!(
                error = %err,
                "the database does not answer: not serving until it does, then migrating"
            );
            Ok(false)
        }
        Err(err) => Err(err.into()),
        Ok(_) => {
            db::migrate(pool).await?;
            Ok(true)
        }
    }
}

/// Refuses to serve without authentication anywhere but on a loopback address.
fn check_auth(settings: &Settings, ui: Option<&UiAddress>) -> anyhow::Result<()> {
    if settings.auth == AuthMode::Disabled
        && let Some(ui) = ui.filter(|ui| !ui.listen.ip().is_loopback())
    {
        anyhow::bail!(
            "--auth disabled is only allowed on loopback addresses, and --ui-listen {} is \
             not one: anyone who can reach it could act for any tenant",
            ui.listen
        );
    }
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
