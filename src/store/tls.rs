//! How we reach Postgres: the connection settings and TLS, both read from the database URL the
//! way libpq reads it, so that the URL an operator uses with `psql` works here too.
//!
//! `sslmode=require` (or libpq's `verify-ca` / `verify-full`) connects over TLS only and always
//! verifies the server's certificate and name, against the system's roots plus the PEM file
//! named by `sslrootcert` (a managed database's CA bundle, say). Without `sslmode`, or with
//! `disable` or `prefer`, the connection is in clear: `prefer` would fall back to clear on any
//! TLS failure, and an unverified TLS session protects nothing against the attacker it is for.

use std::path::PathBuf;

use deadpool_postgres::{Manager, ManagerConfig};
use futures_util::StreamExt as _;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;

/// Where and how to connect.
#[derive(Clone)]
pub(crate) struct Target {
    pub config: tokio_postgres::Config,
    /// Set when the URL asks for TLS.
    tls: Option<MakeRustlsConnect>,
}

/// What the server sends unasked (notifications, notices), and the connection's end.
pub(crate) type Messages = mpsc::UnboundedReceiver<Result<AsyncMessage, tokio_postgres::Error>>;

impl Target {
    /// Reads a database URL (or libpq key=value settings). `sslrootcert` and the `verify-*`
    /// modes are understood here, since tokio-postgres does not know them. Connections are
    /// named `copilot-workers` unless the URL gives an `application_name`.
    pub fn parse(database_url: &str) -> Result<Target, StoreError> {
        let (url, root_file) = libpq_extras(database_url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|err: tokio_postgres::Error| StoreError::Url(err.to_string()))?;
        // Every connection shows in `pg_stat_activity` as ours, unless the URL names it.
        if config.get_application_name().is_none() {
            config.application_name("copilot-workers");
        }
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(verifying_connector(root_file)?),
            _ => None,
        };
        Ok(Target { config, tls })
    }

    /// Whether connections use TLS.
    #[cfg(test)]
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A deadpool manager for this target.
    pub fn manager(&self, manager: ManagerConfig) -> Manager {
        match &self.tls {
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager),
            None => Manager::from_config(self.config.clone(), NoTls, manager),
        }
    }

    /// One connection, driven by a task of its own that passes on what the server sends
    /// unasked and ends with the connection (drop the client to close it).
    pub async fn connect(
        &self,
    ) -> Result<(Client, Messages, tokio::task::JoinHandle<()>), StoreError> {
        Ok(match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.clone()).await?;
                let (messages, driver) = drive(connection);
                (client, messages, driver)
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                let (messages, driver) = drive(connection);
                (client, messages, driver)
            }
        })
    }
}

/// Spawns the task that drives `connection`.
fn drive<S, T>(mut connection: Connection<S, T>) -> (Messages, tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, messages) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut incoming = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = incoming.next().await {
            let end = message.is_err();
            // A receiver that is gone only means nobody listens: keep driving.
            let _ = tx.send(message);
            if end {
                break;
            }
        }
    });
    (messages, driver)
}

/// The URL without what only libpq knows, and the `sslrootcert` file: `verify-ca` and
/// `verify-full` become `require` (which verifies here anyway). Key=value settings and URLs
/// without a query pass unchanged.
fn libpq_extras(database_url: &str) -> Result<(String, Option<PathBuf>), StoreError> {
    let is_url =
        database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    if !is_url || !database_url.contains('?') {
        return Ok((database_url.to_owned(), None));
    }
    let mut url = url::Url::parse(database_url).map_err(|err| StoreError::Url(err.to_string()))?;
    let mut root_file = None;
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter_map(|(key, value)| match key.as_ref() {
            "sslrootcert" => {
                root_file = Some(PathBuf::from(value.as_ref()));
                None
            }
            "sslmode" if value == "verify-ca" || value == "verify-full" => {
                Some((key.into_owned(), "require".to_owned()))
            }
            _ => Some((key.into_owned(), value.into_owned())),
        })
        .collect();
    if pairs.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Ok((url.to_string(), root_file))
}

/// A TLS connector that verifies the server against the system's roots and `root_file`.
fn verifying_connector(root_file: Option<PathBuf>) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = crate::system_roots();
    if let Some(path) = &root_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| StoreError::Url(format!("sslrootcert {}: {err}", path.display())))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(StoreError::Url(format!(
                "sslrootcert {} holds no usable certificate",
                path.display()
            )));
        }
    }
    if roots.is_empty() {
        return Err(StoreError::Url(
            "sslmode=require, but this system has no root certificates: name the server's CA \
             with sslrootcert=/path/to/ca.pem"
                .into(),
        ));
    }
    let config = crate::verifying_tls(roots).map_err(|err| StoreError::Url(err.to_string()))?;
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_only_settings_are_taken_out_of_the_url() {
        let (url, root) = libpq_extras(
            "postgres://app:p%40ss@db.example:5432/copilot?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://app:p%40ss@db.example:5432/copilot?sslmode=require&application_name=x"
        );
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let plain = "host=db user=app sslmode=disable";
        assert_eq!(libpq_extras(plain).unwrap(), (plain.to_owned(), None));
        let (url, _) = libpq_extras("postgres://db/copilot?sslrootcert=ca.pem").unwrap();
        assert_eq!(url, "postgres://db/copilot");
    }

    /// The local server's certificate file and the DNS name it is issued to (Debian's
    /// PostgreSQL runs with TLS on and a self-signed "snakeoil" certificate).
    async fn local_server_certificate() -> (String, String) {
        let plain = Target::parse("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
        let (client, _, _) = plain.connect().await.unwrap();
        let show = |name: &'static str| {
            let client = &client;
            async move {
                let row = client
                    .query_one(&format!("SHOW {name}"), &[])
                    .await
                    .unwrap();
                row.get::<_, String>(0)
            }
        };
        assert_eq!(
            show("ssl").await,
            "on",
            "the local PostgreSQL must have ssl = on"
        );
        let file = show("ssl_cert_file").await;
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in", &file])
            .output()
            .expect("openssl, to read the server certificate's name");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let name = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .find_map(|part| part.strip_prefix("DNS:"))
            .expect("a DNS name in the certificate")
            .to_owned();
        (file, name)
    }

    /// Against the local server: `sslmode=require` gets an encrypted session when the
    /// certificate verifies (its CA named by `sslrootcert`, its name as `host`, the address as
    /// `hostaddr`), and no session when it does not (the same certificate reached by an
    /// address it does not name); without `sslmode` the session is in clear.
    #[tokio::test]
    async fn require_means_a_verified_encrypted_session() {
        let (file, name) = local_server_certificate().await;
        let in_tls = |client: Client| async move {
            let row = client
                .query_one(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            row.get::<_, bool>(0)
        };
        let verified = Target::parse(&format!(
            "postgres://postgres@{name}:5432/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={file}"
        ))
        .unwrap();
        let (client, _, _) = verified.connect().await.unwrap();
        assert!(in_tls(client).await);

        let misnamed = Target::parse(&format!(
            "postgres://postgres@127.0.0.1:5432/postgres?sslmode=require&sslrootcert={file}"
        ))
        .unwrap();
        let Err(refused) = misnamed.connect().await else {
            panic!("a certificate for another name must be refused");
        };
        let text = refused.to_string();
        assert!(text.contains("certificate"), "{text}");

        let plain = Target::parse("postgres://postgres@127.0.0.1:5432/postgres").unwrap();
        let (client, _, _) = plain.connect().await.unwrap();
        assert!(!in_tls(client).await);
    }

    #[test]
    fn tls_only_when_the_url_requires_it() {
        assert!(!Target::parse("postgres://db/x").unwrap().uses_tls());
        assert!(
            !Target::parse("postgres://db/x?sslmode=prefer")
                .unwrap()
                .uses_tls()
        );
        assert!(
            Target::parse("postgres://db/x?sslmode=verify-ca")
                .unwrap()
                .uses_tls()
        );
        let missing = Target::parse("postgres://db/x?sslmode=require&sslrootcert=/nonexistent.pem");
        assert!(matches!(missing, Err(StoreError::Url(text)) if text.contains("/nonexistent.pem")));
    }
}
