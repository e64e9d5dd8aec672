//! How we reach Postgres: the connection settings and TLS, both read from the database URL the
//! way libpq reads it, so that the URL an operator uses with `psql` works here too.
//!
//! `sslmode=require` (or libpq's `verify-ca` / `verify-full`) connects over TLS only and always
//! verifies the server's certificate and name, against the system's roots plus the PEM file
//! named by `sslrootcert` (a managed database's CA bundle, say). Without `sslmode`, or with
//! `disable` or `prefer`, the connection is in clear: `prefer` would fall back to clear on any
//! TLS failure, and an unverified TLS session protects nothing against the attacker it is for.

use std::path::PathBuf;
use std::time::Duration;

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
    /// modes are understood here, since tokio-postgres does not know them, and
    /// `tcp_user_timeout` is read in milliseconds, as libpq reads it (tokio-postgres would
    /// read seconds). Connections are named `copilot-workers` unless the URL gives an
    /// `application_name`, and find out a dead peer the way [`dead_peer_defaults`] says
    /// unless the URL sets those settings itself.
    pub fn parse(database_url: &str) -> Result<Target, StoreError> {
        let extras = libpq_extras(database_url)?;
        let mut config: tokio_postgres::Config = extras
            .url
            .parse()
            .map_err(|err: tokio_postgres::Error| StoreError::Url(err.to_string()))?;
        // Every connection shows in `pg_stat_activity` as ours, unless the URL names it.
        if config.get_application_name().is_none() {
            config.application_name("copilot-workers");
        }
        dead_peer_defaults(&mut config, &extras.named);
        if let Some(timeout) = extras.user_timeout {
            config.tcp_user_timeout(timeout);
        }
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(verifying_connector(extras.root_file)?),
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

/// How long a connection may go unheard before the kernel gives it up, unless the URL says
/// otherwise (the operating system's defaults wait two hours before the first keepalive, and
/// about fifteen minutes for unacknowledged data). A Postgres host that vanished (a failover, a
/// network partition, a NAT that forgot the flow) sends no reset: without these, a statement
/// sent to it would wait a quarter of an hour, and an idle pooled connection to it would be
/// handed out as if alive.
/// - `keepalives_idle` 30 s, `keepalives_interval` 10 s, `keepalives_retries` 3: an idle
///   connection to a vanished host is closed within about a minute;
/// - `tcp_user_timeout` 30 s: data the server has not acknowledged for 30 s closes the
///   connection (a long statement sends nothing unacknowledged: it is not cut short).
fn dead_peer_defaults(config: &mut tokio_postgres::Config, named: &[String]) {
    let unnamed = |setting: &str| !named.iter().any(|name| name == setting);
    if unnamed("keepalives_idle") {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if unnamed("keepalives_interval") {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if unnamed("keepalives_retries") {
        config.keepalives_retries(3);
    }
    if unnamed("tcp_user_timeout") {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
}

/// What [`Target::parse`] reads itself before tokio-postgres reads the rest.
#[derive(Debug, Default, PartialEq)]
struct Extras {
    /// The settings without what only libpq knows.
    url: String,
    /// `sslrootcert`.
    root_file: Option<PathBuf>,
    /// `tcp_user_timeout`, in milliseconds as libpq reads it.
    user_timeout: Option<Duration>,
    /// The names of every setting given.
    named: Vec<String>,
}

/// The URL without what only libpq knows, and the settings read here: `verify-ca` and
/// `verify-full` become `require` (which verifies here anyway); every other query setting and
/// the part before the query pass as written. Key=value settings pass unchanged; a key=value
/// `tcp_user_timeout`, which tokio-postgres would read in seconds, is read here too (and set
/// after it).
fn libpq_extras(database_url: &str) -> Result<Extras, StoreError> {
    let millis = |value: &str| {
        value
            .trim_matches('\'')
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| {
                StoreError::Url(format!(
                    "tcp_user_timeout {value:?} is not a number of milliseconds"
                ))
            })
    };
    let mut extras = Extras {
        url: database_url.to_owned(),
        ..Extras::default()
    };
    let is_url =
        database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    if !is_url {
        for (name, value) in database_url
            .split_whitespace()
            .filter_map(|setting| setting.split_once('='))
        {
            let name = name.trim();
            if name == "tcp_user_timeout" {
                extras.user_timeout = Some(millis(value.trim())?);
            }
            extras.named.push(name.to_owned());
        }
        return Ok(extras);
    }
    let Some((base, query)) = database_url.split_once('?') else {
        return Ok(extras);
    };
    // The query is read here and the rest passed on as written, segment by segment: the
    // part before it may name several hosts (`db1:5432,db2:5432`, which the `url` crate
    // refuses), and a value re-encoded on the way (`options=-c%20…`) could change meaning.
    let decode = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut kept = Vec::new();
    for segment in query.split('&').filter(|segment| !segment.is_empty()) {
        let (raw_key, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
        let (key, value) = (decode(raw_key), decode(raw_value));
        match key.as_str() {
            "sslrootcert" => extras.root_file = Some(PathBuf::from(&value)),
            "tcp_user_timeout" => extras.user_timeout = Some(millis(&value)?),
            "sslmode" if value == "verify-ca" || value == "verify-full" => {
                kept.push("sslmode=require");
            }
            _ => kept.push(segment),
        }
        extras.named.push(key);
    }
    extras.url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(extras)
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
        let extras = libpq_extras(
            "postgres://app:p%40ss@db.example:5432/copilot?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x&tcp_user_timeout=2500",
        )
        .unwrap();
        assert_eq!(
            extras.url,
            "postgres://app:p%40ss@db.example:5432/copilot?sslmode=require&application_name=x"
        );
        assert_eq!(extras.root_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(extras.user_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(
            extras.named,
            [
                "sslmode",
                "sslrootcert",
                "application_name",
                "tcp_user_timeout"
            ]
        );
        let plain = "host=db user=app sslmode=disable";
        let extras = libpq_extras(plain).unwrap();
        assert_eq!(extras.url, plain);
        assert_eq!(extras.named, ["host", "user", "sslmode"]);
        let several = "postgres://app@db1:5432,db2:5432/copilot";
        assert_eq!(libpq_extras(several).unwrap().url, several);
        assert!(Target::parse(several).is_ok());
        // Several hosts with a query (a primary and its standby), and a value whose encoding
        // matters: passed on as written.
        let several = "postgres://app@db1:5432,db2:5432/copilot?target_session_attrs=read-write&options=-c%20statement_timeout%3D5000&sslmode=verify-full";
        let extras = libpq_extras(several).unwrap();
        assert_eq!(
            extras.url,
            "postgres://app@db1:5432,db2:5432/copilot?target_session_attrs=read-write&options=-c%20statement_timeout%3D5000&sslmode=require"
        );
        let config = Target::parse(several).unwrap().config;
        assert_eq!(config.get_hosts().len(), 2);
        assert_eq!(config.get_options(), Some("-c statement_timeout=5000"));
        let extras = libpq_extras("postgres://db/copilot?sslrootcert=ca.pem").unwrap();
        assert_eq!(extras.url, "postgres://db/copilot");
        assert!(matches!(
            libpq_extras("postgres://db/copilot?tcp_user_timeout=soon"),
            Err(StoreError::Url(text)) if text.contains("milliseconds")
        ));
    }

    /// A connection to a host that vanished is given up in about a minute, not two hours,
    /// unless the URL says otherwise; `tcp_user_timeout` is in milliseconds, as for libpq,
    /// in both forms.
    #[test]
    fn a_vanished_server_is_found_out_unless_the_url_says_otherwise() {
        let config = Target::parse("postgres://db/x").unwrap().config;
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );

        let own = Target::parse(
            "postgres://db/x?keepalives_idle=600&keepalives_interval=60&keepalives_retries=9&tcp_user_timeout=120000",
        )
        .unwrap()
        .config;
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(own.get_keepalives_interval(), Some(Duration::from_secs(60)));
        assert_eq!(own.get_keepalives_retries(), Some(9));
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(120)));

        let pairs = Target::parse("host=db dbname=x tcp_user_timeout=1500 keepalives_idle=5")
            .unwrap()
            .config;
        assert_eq!(
            pairs.get_tcp_user_timeout(),
            Some(&Duration::from_millis(1500))
        );
        assert_eq!(pairs.get_keepalives_idle(), Duration::from_secs(5));
        assert_eq!(
            pairs.get_keepalives_interval(),
            Some(Duration::from_secs(10))
        );
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
