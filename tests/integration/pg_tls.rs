//! TLS to PostgreSQL: against a cluster with `ssl = on` that admits only encrypted TCP
//! connections (`hostssl` in pg_hba.conf) and presents a certificate for `localhost`
//! signed by a test CA, the manager honours libpq's `sslmode`: verify-full checks the
//! chain and the host name, verify-ca only the chain, require and prefer encrypt without
//! checking, and disable is refused by the server. The root certificate comes from the
//! URL (`sslrootcert`) or from `--database-ca-file`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use agentrun_manager::Application;
use agentrun_manager::local_postgres::{LocalPostgres, ServerTls};
use agentrun_shared::proto::RunStatus;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

const LONG: Duration = Duration::from_secs(30);

/// The TLS-only cluster shared by this module's tests, and its PEM files: `ca.pem`
/// (signed the server certificate) and `other-ca.pem` (did not). Both live in the
/// cluster's directory, removed with it.
struct TlsCluster {
    pg: LocalPostgres,
    ca: PathBuf,
    other_ca: PathBuf,
}

fn cluster() -> &'static TlsCluster {
    static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (ca_pem, issuer) = test_ca("agentrun database CA");
        let (other_ca_pem, _) = test_ca("some other CA");
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let pg = LocalPostgres::start_tls(ServerTls {
            cert_pem: &cert.pem(),
            key_pem: &key.serialize_pem(),
            require: true,
        })
        .expect("start a PostgreSQL cluster with ssl = on");
        let dir = pg.data_dir().parent().unwrap().to_owned();
        let (ca, other_ca) = (dir.join("ca.pem"), dir.join("other-ca.pem"));
        std::fs::write(&ca, ca_pem).unwrap();
        std::fs::write(&other_ca, other_ca_pem).unwrap();
        TlsCluster { pg, ca, other_ca }
    })
}

/// A self-signed CA: its PEM certificate and the issuer to sign with.
fn test_ca(name: &str) -> (String, CertifiedIssuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    (issuer.pem(), issuer)
}

impl TlsCluster {
    /// `postgres://postgres@HOST:PORT/DATABASE?PARAMS`.
    fn url(&self, host: &str, database: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{database}?{params}",
            self.pg.port()
        )
    }

    /// Creates an empty database (over TLS: nothing else is admitted) and returns its name.
    async fn fresh_database(&self) -> String {
        let admin = db_client(&self.url("localhost", "postgres", "sslmode=require")).await;
        let name = format!("agentrun_tls_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        name
    }
}

/// Why a manager on `url` could not start (it must not).
async fn start_error(url: &str) -> String {
    match Application::build(test_settings(url)).await {
        Ok(_) => panic!("the manager started on {url}"),
        Err(err) => format!("{err:#}"),
    }
}

/// The other sessions on `database` (the manager's): whether each is encrypted, and
/// what it last ran.
async fn sessions_on(db: &tokio_postgres::Client, database: &str) -> Vec<(bool, String)> {
    db.query(
        "SELECT s.ssl, a.query FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
        &[&database],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

#[tokio::test]
async fn verify_full_serves_a_run_over_encrypted_connections() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let params = format!("sslmode=verify-full&sslrootcert={}", cluster.ca.display());
    let mut app = TestApp::spawn_on(&cluster.url("localhost", &database, &params), |_| {}).await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let run_id = create(&mut app, "hello over TLS").await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert!(assistant_text(&events_of(&mut app, &run_id).await).contains("hello over TLS"));

    // Server side: the pool's sessions and the LISTEN session are all encrypted.
    let db = app.db().await;
    let sessions = wait_for("the manager's LISTEN session", LONG, || async {
        let sessions = sessions_on(&db, &database).await;
        sessions
            .iter()
            .any(|(_, query)| query.starts_with("LISTEN"))
            .then_some(sessions)
    })
    .await;
    assert!(sessions.len() >= 2, "{sessions:?}");
    assert!(sessions.iter().all(|(ssl, _)| *ssl), "{sessions:?}");
}

#[tokio::test]
async fn the_ca_file_setting_serves_the_binary_and_its_commands() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let url = cluster.url("localhost", &database, "sslmode=verify-full");
    let ca = cluster.ca.display().to_string();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("AGENTRUN_DATABASE_CA_FILE", &ca),
    ];
    let manager = |args: &'static [&'static str]| {
        let mut command = Command::new(binary("agentrun-manager"));
        command.args(args).envs(env);
        tokio::task::spawn_blocking(move || command.output().expect("run agentrun-manager"))
    };

    let migrated = manager(&["migrate"]).await.unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    let created = manager(&["keys", "create", "--tenant", "acme", "--role", "client"])
        .await
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    assert!(String::from_utf8_lossy(&created.stdout).starts_with("ark_"));

    let process = ManagerProcess::start(&url, &[("AGENTRUN_DATABASE_CA_FILE", &ca)]).await;
    let mut runs = RunServiceClient::new(process.channel().await);
    let run = runs
        .create_run(run_request("hello"))
        .await
        .expect("create a run")
        .into_inner()
        .run
        .unwrap();
    assert_eq!(status_of(&run), RunStatus::Pending);
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_checking_the_certificate() {
    let cluster = cluster();
    for mode in ["require", "prefer"] {
        let database = cluster.fresh_database().await;
        // 127.0.0.1 is not a name in the certificate, and no root certificate is given.
        let url = cluster.url("127.0.0.1", &database, &format!("sslmode={mode}"));
        let mut app = TestApp::spawn_on(&url, |_| {}).await;
        let run_id = create(&mut app, "hello").await;
        assert_eq!(get_run(&mut app, &run_id).await.run_id, run_id);
        let sessions = sessions_on(&app.db().await, &database).await;
        assert!(!sessions.is_empty(), "{mode}");
        assert!(sessions.iter().all(|(ssl, _)| *ssl), "{mode}: {sessions:?}");
    }
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let params = format!("sslmode=verify-full&sslrootcert={}", cluster.ca.display());
    let err = start_error(&cluster.url("127.0.0.1", &database, &params)).await;
    assert!(
        err.contains("error performing TLS handshake")
            && err.contains("certificate not valid for name \"127.0.0.1\""),
        "{err}"
    );
}

#[tokio::test]
async fn verify_ca_checks_the_chain_but_not_the_host_name() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let with_ca = |ca: &PathBuf, mode: &str| {
        let params = format!("sslmode={mode}&sslrootcert={}", ca.display());
        cluster.url("127.0.0.1", &database, &params)
    };
    let app = TestApp::spawn_on(&with_ca(&cluster.ca, "verify-ca"), |_| {}).await;
    drop(app);

    // A CA that did not sign the server's certificate: refused. With a root
    // certificate, require checks the chain too (as libpq does).
    for mode in ["verify-ca", "require"] {
        let err = start_error(&with_ca(&cluster.other_ca, mode)).await;
        assert!(
            err.contains("error performing TLS handshake") && err.contains("UnknownIssuer"),
            "{mode}: {err}"
        );
    }
}

#[tokio::test]
async fn disable_is_refused_by_a_server_that_requires_tls() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let err = start_error(&cluster.url("localhost", &database, "sslmode=disable")).await;
    assert!(err.contains("no encryption"), "{err}");
}

#[tokio::test]
async fn bad_tls_settings_stop_the_manager_with_the_setting_named() {
    let cluster = cluster();
    let database = cluster.fresh_database().await;
    let url = cluster.url("localhost", &database, "sslmode=verify-fool");
    let err = start_error(&url).await;
    assert!(err.contains("unknown sslmode \"verify-fool\""), "{err}");

    let url = cluster.url("localhost", &database, "sslmode=verify-full");
    let mut settings = test_settings(&url);
    settings.database_ca_file = Some("/nonexistent/ca.pem".into());
    let err = format!("{:#}", Application::build(settings).await.err().unwrap());
    assert!(
        err.contains(
            "cannot read --database-ca-file (AGENTRUN_DATABASE_CA_FILE) \"/nonexistent/ca.pem\""
        ),
        "{err}"
    );
}
