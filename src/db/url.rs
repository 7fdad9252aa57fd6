//! Database URLs and TLS. A URL is parsed once into what this program understands:
//! `tokio_postgres::Config` for everything libpq-style that tokio-postgres knows, plus the two
//! TLS settings it does not (`sslmode=verify-ca|verify-full` and `sslrootcert`). Every
//! connection (the diesel pool, the raw clients, the admin connections of the scratch
//! databases) is made with rustls through [`connect`].
//!
//! `sslmode` follows libpq: `disable` (plain), `prefer` (the default: TLS when the server
//! offers it, certificate not checked), `require` (TLS, certificate not checked — unless
//! `sslrootcert` is given, when it is checked as with `verify-ca`), `verify-ca` (the chain
//! must lead to `sslrootcert`, or to the public web roots without it) and `verify-full` (the
//! chain, and the host name or IP address in the certificate).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::DbError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed database URL.
#[derive(Clone)]
pub struct DbUrl {
    pub pg: tokio_postgres::Config,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
}

fn bad(url: &str, why: impl std::fmt::Display) -> DbError {
    DbError::Connect(format!("database URL {}: {why}", super::redact_url(url)))
}

impl DbUrl {
    pub fn parse(url: &str) -> Result<DbUrl, DbError> {
        let mut u = url::Url::parse(url).map_err(|e| bad(url, e))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(bad(url, "the scheme must be postgres:// or postgresql://"));
        }
        let (mut sslmode, mut sslrootcert) = (SslMode::Prefer, None);
        let mut rest = Vec::new();
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    sslmode = match v.as_ref() {
                        "disable" => SslMode::Disable,
                        // libpq's allow: plain first; here TLS first, like prefer
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(bad(
                                url,
                                format!("sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"),
                            ))
                        }
                    }
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v.as_ref())),
                _ => rest.push((k.into_owned(), v.into_owned())),
            }
        }
        if rest.is_empty() {
            u.set_query(None);
        } else {
            u.query_pairs_mut().clear().extend_pairs(rest);
        }
        let mut pg = tokio_postgres::Config::from_str(u.as_str()).map_err(|e| bad(url, e))?;
        pg.ssl_mode(match sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(DbUrl {
            pg,
            sslmode,
            sslrootcert,
        })
    }

    /// The rustls connector for this URL's TLS settings.
    pub fn tls(&self) -> Result<MakeRustlsConnect, DbError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &self.sslrootcert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        DbError::Connect(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                if certs.is_empty() {
                    return Err(DbError::Connect(format!(
                        "sslrootcert {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                for c in certs {
                    roots.add(c).map_err(|e| {
                        DbError::Connect(format!("sslrootcert {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let webpki = || {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
                .build()
                .map_err(|e| DbError::Connect(format!("TLS roots: {e}")))
        };
        let verifier: Arc<dyn ServerCertVerifier> = match self.sslmode {
            SslMode::VerifyFull => webpki()?,
            SslMode::VerifyCa => Arc::new(IgnoreName(webpki()?)),
            SslMode::Require | SslMode::Prefer if self.sslrootcert.is_some() => {
                Arc::new(IgnoreName(webpki()?))
            }
            SslMode::Require | SslMode::Prefer | SslMode::Disable => {
                Arc::new(Unchecked(provider.clone()))
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| DbError::Connect(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct IgnoreName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, the certificate not checked
/// (libpq's behaviour; the handshake's signatures still are).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `url` naming database `name` instead (query and credentials kept).
pub fn with_database(url: &str, name: &str) -> Result<String, DbError> {
    let mut u = url::Url::parse(url).map_err(|e| bad(url, e))?;
    u.set_path(&format!("/{name}"));
    Ok(u.to_string())
}

/// The database named by `url`.
pub fn database_name(url: &str) -> Result<String, DbError> {
    let u = DbUrl::parse(url)?;
    u.pg.get_dbname()
        .map(str::to_string)
        .ok_or_else(|| bad(url, "no database name"))
}

/// One connection on its own (admin statements, the scratch databases' set-up).
pub async fn connect(url: &DbUrl) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = url
        .pg
        .connect(url.tls()?)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed with an error");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_and_the_rest_is_libpq() {
        let u = DbUrl::parse(
            "postgres://u:p%40ss@db.example:6432/billing?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=arrears",
        )
        .unwrap();
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(
            u.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(u.pg.get_dbname(), Some("billing"));
        assert_eq!(u.pg.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(u.pg.get_application_name(), Some("arrears"));
        assert_eq!(
            DbUrl::parse("postgres://h/d").unwrap().sslmode,
            SslMode::Prefer
        );
        assert!(DbUrl::parse("postgres://h/d?sslmode=sometimes").is_err());
        assert!(DbUrl::parse("mysql://h/d").is_err());
    }

    #[test]
    fn another_database_keeps_the_query() {
        assert_eq!(
            with_database("postgres://u@h:5432/db?sslmode=require", "arrears_demo").unwrap(),
            "postgres://u@h:5432/arrears_demo?sslmode=require"
        );
        assert_eq!(
            database_name("postgres://u@h:5432/db?sslmode=require").unwrap(),
            "db"
        );
    }
}
