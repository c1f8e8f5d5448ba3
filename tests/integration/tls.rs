//! TLS: the manager serves rustls TLS with a certificate; clients must trust its CA;
//! with a client CA, runners must present a certificate signed by it while other
//! clients need not; a real runner process and the CLI work over TLS; a socket that never
//! starts the TLS handshake is closed after the handshake timeout.

use std::path::PathBuf;
use std::time::Duration;

use agentrun_manager::Application;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::cli::{COMMAND_TIMEOUT, CliProcess, agentrun_command};
use agentrun_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const LONG: Duration = Duration::from_secs(30);

/// A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate,
/// written as PEM files to a temporary directory removed on drop.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn generate() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "agentrun test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "agentrun manager",
        );
        let (client_cert, client_key) = leaf(
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            "agentrun runner",
        );

        let dir = std::env::temp_dir().join(format!("agentrun-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server_cert),
            ("server.key", server_key),
            ("client.pem", client_cert.clone()),
            ("client.key", client_key.clone()),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        Self {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client_cert,
            client_key_pem: client_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn path_str(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("UTF-8 temp path")
            .to_owned()
    }

    /// Trusts this CA, presents no certificate.
    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem))
    }

    /// Trusts this CA and presents the client certificate.
    fn client_with_identity(&self) -> ClientTlsConfig {
        self.client().identity(Identity::from_pem(
            &self.client_cert_pem,
            &self.client_key_pem,
        ))
    }

    /// Manager settings serving the server certificate.
    fn serve(&self, settings: &mut agentrun_manager::Settings) {
        settings.tls_cert = Some(self.path("server.pem"));
        settings.tls_key = Some(self.path("server.key"));
    }

    /// Like [`Self::serve`], also verifying client certificates against this CA.
    fn serve_verifying_clients(&self, settings: &mut agentrun_manager::Settings) {
        self.serve(settings);
        settings.tls_client_ca = Some(self.path("ca.pem"));
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn create(client: &mut RunServiceClient<Channel>, prompt: &str) -> String {
    client
        .create_run(run_request(prompt))
        .await
        .expect("create run over TLS")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

fn claim_request(runner: &proto::RunnerIdentity) -> proto::ClaimRunsRequest {
    proto::ClaimRunsRequest {
        runner: Some(runner.clone()),
        max_runs: 1,
    }
}

#[tokio::test]
async fn clients_reach_a_tls_manager_only_when_they_trust_its_ca() {
    let pki = Pki::generate();
    let mut app = TestApp::spawn_tls(pki.client(), |s| pki.serve(s)).await;

    let run_id = create(&mut app.runs, "over tls").await;
    let run = get_run(&mut app, &run_id).await;
    assert_eq!(run.run_id, run_id);
    assert_eq!(status_of(&run), RunStatus::Pending);

    // Plaintext against the TLS port: the call fails (the handshake never happens).
    let plaintext = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    let refused = RunServiceClient::new(plaintext)
        .get_run(proto::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await;
    assert!(refused.is_err(), "a plaintext call succeeded: {refused:?}");

    // A client trusting another CA refuses the manager's certificate.
    let stranger = Pki::generate();
    let untrusted = tls_channel(app.addr, stranger.client()).await;
    let err = untrusted.expect_err("a client that does not trust the CA connected");
    let chain = format!("{err:?}");
    assert!(
        chain.contains("InvalidCertificate"),
        "unexpected error: {chain}"
    );
}

#[tokio::test]
async fn runners_must_present_a_client_certificate_when_the_manager_verifies_them() {
    let pki = Pki::generate();
    // The typed clients present no certificate.
    let mut app = TestApp::spawn_tls(pki.client(), |s| pki.serve_verifying_clients(s)).await;

    // RunService needs no client certificate.
    let run_id = create(&mut app.runs, "verified runners").await;

    // RunnerService without one is refused, with a message naming what is missing.
    let runner = runner("tls-runner");
    let refused = app
        .runners
        .claim_runs(claim_request(&runner))
        .await
        .expect_err("ClaimRuns without a client certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{}",
        refused.message()
    );

    // With the client certificate it claims the run.
    let channel = tls_channel(app.addr, pki.client_with_identity())
        .await
        .expect("a TLS client with a certificate connects");
    let runners = RunnerServiceClient::new(channel);
    let claimed = wait_for("the run to be claimed", LONG, || {
        let mut runners = runners.clone();
        let request = claim_request(&runner);
        async move {
            let assignments = runners
                .claim_runs(request)
                .await
                .expect("ClaimRuns with a client certificate")
                .into_inner()
                .assignments;
            (!assignments.is_empty()).then_some(assignments)
        }
    })
    .await;
    assert_eq!(claimed[0].run.as_ref().unwrap().run_id, run_id);
    // The client without a certificate still reads the run the runner now holds.
    let run = get_run(&mut app, &run_id).await;
    assert_eq!(status_of(&run), RunStatus::Claimed);
}

#[tokio::test]
async fn a_runner_process_and_the_cli_work_over_tls() {
    let pki = Pki::generate();
    let mut app = TestApp::spawn_tls(pki.client(), |s| pki.serve_verifying_clients(s)).await;
    let url = format!("https://127.0.0.1:{}", app.addr.port());
    let (ca, cert, key) = (
        pki.path_str("ca.pem"),
        pki.path_str("client.pem"),
        pki.path_str("client.key"),
    );

    let run_id = create(&mut app.runs, "hello over tls").await;
    let _runner = RunnerProcess::start(
        app.addr,
        "tls-runner",
        &[
            ("AGENTRUN_MANAGER_URL", &url),
            ("AGENTRUN_TLS_CA", &ca),
            ("AGENTRUN_TLS_CERT", &cert),
            ("AGENTRUN_TLS_KEY", &key),
        ],
    );
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert!(!assistant_text(&events).is_empty(), "no reply streamed");

    // The CLI trusting the CA (no client certificate: it is a client, not a runner).
    let mut command = agentrun_command(app.addr, &["get", &run_id, "--tls-ca", &ca]);
    command.env("AGENTRUN_MANAGER_URL", &url);
    let got = CliProcess::spawn(command).wait(COMMAND_TIMEOUT).await;
    assert_eq!(got.code(), Some(0), "stderr:\n{}", got.stderr);
    assert!(
        got.stdout.contains("status      completed"),
        "{}",
        got.stdout
    );

    // Without the CA (system roots only) the manager's certificate is not trusted.
    let mut command = agentrun_command(app.addr, &["get", &run_id]);
    command
        .env("AGENTRUN_MANAGER_URL", &url)
        .env_remove("AGENTRUN_TLS_CA");
    let untrusted = CliProcess::spawn(command).wait(COMMAND_TIMEOUT).await;
    assert_ne!(untrusted.code(), Some(0), "stdout:\n{}", untrusted.stdout);
    assert!(
        untrusted.stderr.contains("certificate") || untrusted.stderr.contains("UnknownIssuer"),
        "{}",
        untrusted.stderr
    );
}

#[tokio::test]
async fn the_manager_refuses_half_a_tls_configuration() {
    let pki = Pki::generate();
    let mut settings = test_settings("postgres://unused@127.0.0.1:1/unused");
    settings.tls_cert = Some(pki.path("server.pem"));
    let err = Application::build(settings)
        .await
        .err()
        .expect("a certificate without a key is refused");
    assert!(err.to_string().contains("--tls-key"), "{err}");

    let mut settings = test_settings("postgres://unused@127.0.0.1:1/unused");
    settings.tls_client_ca = Some(pki.path("ca.pem"));
    let err = Application::build(settings)
        .await
        .err()
        .expect("a client CA without a certificate is refused");
    assert!(err.to_string().contains("--tls-client-ca"), "{err}");

    let mut settings = test_settings("postgres://unused@127.0.0.1:1/unused");
    settings.tls_cert = Some(pki.path("missing.pem"));
    settings.tls_key = Some(pki.path("server.key"));
    let err = Application::build(settings)
        .await
        .err()
        .expect("an unreadable certificate is refused");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn a_socket_that_never_starts_the_tls_handshake_is_closed_after_the_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::generate();
    let mut app = TestApp::spawn_tls(pki.client(), |s| {
        pki.serve(s);
        s.handshake_timeout_ms = 500;
    })
    .await;
    let started = std::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(LONG, async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a socket without a TLS handshake stayed open"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The timeout is only for handshakes: a client that completes one is served.
    create(&mut app.runs, "after the idle socket").await;
}
