//! A small AMQP client for edgehub, built on fe2o3-amqp: TLS, `$cbs` put-token, links by
//! address. The benchmark's load generator and the socket tests use it; it speaks to the hub as
//! the SDKs do (no SASL, token on `$cbs`, relative link addresses). Not part of the hub: built
//! only with the `client` feature (the tests and benchmarks turn it on).

/// The token type the Node and C SDKs name in their put-token requests.
const SERVICEBUS_TOKEN: &str = "servicebus.windows.net:sastoken";

use std::{net::SocketAddr, path::Path, sync::Arc};

use fe2o3_amqp::{
    connection::ConnectionHandle,
    link::{Receiver, Sender},
    session::SessionHandle,
    Connection, Session,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{
    model::identity::{Identity, Key},
    model::sas::{make_token, now_secs, resource_for},
    servers::amqp::cbs_client::{CbsClient, CbsError},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("amqp: {0}")]
    Amqp(String),
    #[error("put-token answered {0}: {1}")]
    Refused(i32, String),
}

fn amqp<E: std::fmt::Debug>(e: E) -> ClientError {
    ClientError::Amqp(format!("{e:?}"))
}

/// One authenticated connection with one session.
pub struct Client {
    pub connection: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
}

impl Client {
    /// Connects over TLS (trusting `ca_pem`), opens a session and puts a token for `identity`.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        iothub: &str,
        identity: &Identity,
        key: &Key,
    ) -> Result<Self, ClientError> {
        Self::connect_until(
            addr,
            server_name,
            ca_pem,
            iothub,
            identity,
            key,
            now_secs() + 3600,
        )
        .await
    }

    /// Like `connect`, with a token that expires at `expiry` (Unix seconds).
    pub async fn connect_until(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        iothub: &str,
        identity: &Identity,
        key: &Key,
        expiry: u64,
    ) -> Result<Self, ClientError> {
        let tls = tls_connect(addr, server_name, ca_pem).await?;
        Self::open_on(tls, server_name, iothub, identity, key, expiry).await
    }

    /// Like `connect`, over a WebSocket (`wss://{server_name}/$iothub/websocket`, subprotocol
    /// `AMQPWSB10`) to the hub's HTTPS listener at `addr`, as the SDKs' `AmqpWs` transports
    /// connect.
    pub async fn connect_ws(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        iothub: &str,
        identity: &Identity,
        key: &Key,
    ) -> Result<Self, ClientError> {
        let ws = ws_connect(addr, server_name, ca_pem).await?;
        Self::open_on(ws, server_name, iothub, identity, key, now_secs() + 3600).await
    }

    /// Connects with a client certificate (`chain`, end entity first, and its `key`) and no
    /// token, as a device with X.509 authentication does: over AMQPS to `addr`, or with `ws`
    /// over a WebSocket to the HTTPS listener at `addr`.
    pub async fn connect_x509(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        cert: ClientCert,
        ws: bool,
    ) -> Result<Self, ClientError> {
        let tls = tls_connect_with(addr, server_name, ca_pem, Some(cert)).await?;
        match ws {
            true => Self::open_plain(ws_upgrade(tls, server_name).await?, server_name).await,
            false => Self::open_plain(tls, server_name).await,
        }
    }

    /// Connects as the service SDK does: TLS, then a service token for `policy` (`sr` = `host`,
    /// `skn` = the policy) put on `$cbs`.
    pub async fn connect_service(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        host: &str,
        policy: &str,
        key: &Key,
    ) -> Result<Self, ClientError> {
        let token = make_token(host, key, now_secs() + 3600, Some(policy));
        Self::connect_service_token(addr, server_name, ca_pem, host, &token).await
    }

    /// Connects over TLS and puts a service-policy `token` for `audience` (as the Event Hubs
    /// SDKs do for `sb://{host}/{eventHubName}`).
    pub async fn connect_service_token(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &Path,
        audience: &str,
        token: &str,
    ) -> Result<Self, ClientError> {
        let tls = tls_connect(addr, server_name, ca_pem).await?;
        let mut client = Self::open_plain(tls, server_name).await?;
        put_token(&mut client.session, audience, token).await?;
        Ok(client)
    }

    /// Opens the AMQP connection and a session on `stream`, without a token.
    async fn open_plain<S>(stream: S, server_name: &str) -> Result<Self, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let mut connection = Connection::builder()
            .container_id(uuid::Uuid::new_v4().to_string())
            .hostname(server_name)
            .max_frame_size(256 * 1024)
            .open_with_stream(stream)
            .await
            .map_err(amqp)?;
        let session = Session::builder()
            .incoming_window(4096)
            .outgoing_window(4096)
            .begin(&mut connection)
            .await
            .map_err(amqp)?;
        Ok(Self {
            connection,
            session,
        })
    }

    /// Opens the AMQP connection and a session on `stream` and puts a token for `identity`.
    async fn open_on<S>(
        stream: S,
        server_name: &str,
        iothub: &str,
        identity: &Identity,
        key: &Key,
        expiry: u64,
    ) -> Result<Self, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let mut connection = Connection::builder()
            .container_id(uuid::Uuid::new_v4().to_string())
            .hostname(server_name)
            .max_frame_size(256 * 1024)
            .open_with_stream(stream)
            .await
            .map_err(amqp)?;
        let mut session = Session::builder()
            .incoming_window(4096)
            .outgoing_window(4096)
            .begin(&mut connection)
            .await
            .map_err(amqp)?;
        let token = make_token(&resource_for(iothub, identity), key, expiry, None);
        put_token(&mut session, &resource_for(iothub, identity), &token).await?;
        Ok(Self {
            connection,
            session,
        })
    }

    pub async fn sender(&mut self, address: &str) -> Result<Sender, ClientError> {
        Sender::attach(
            &mut self.session,
            format!("snd-{}", uuid::Uuid::new_v4()),
            address,
        )
        .await
        .map_err(amqp)
    }

    pub async fn receiver(&mut self, address: &str) -> Result<Receiver, ClientError> {
        Receiver::attach(
            &mut self.session,
            format!("rcv-{}", uuid::Uuid::new_v4()),
            address,
        )
        .await
        .map_err(amqp)
    }

    pub async fn close(mut self) {
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

/// A client certificate chain (end entity first) and its private key.
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

/// A TLS connection to `addr`, trusting the CAs in `ca_pem`, checking the name `server_name`.
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    tls_connect_with(addr, server_name, ca_pem, None).await
}

/// Like `tls_connect`, presenting `cert` when the server asks for one.
pub async fn tls_connect_with(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
    cert: Option<ClientCert>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem)?;
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| ClientError::Tls(format!("{}: {e}", ca_pem.display())))?;
        roots.add(c).map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots);
    let config = match cert {
        Some(c) => config
            .with_client_auth_cert(c.chain, c.key)
            .map_err(|e| ClientError::Tls(e.to_string()))?,
        None => config.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

/// A WebSocket for AMQP to the HTTPS listener at `addr`: TLS as `tls_connect`, then the
/// upgrade on `/$iothub/websocket` with the subprotocol `AMQPWSB10`.
pub async fn ws_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &Path,
) -> Result<crate::servers::ws::WsIo<tokio_rustls::client::TlsStream<TcpStream>>, ClientError> {
    ws_upgrade(tls_connect(addr, server_name, ca_pem).await?, server_name).await
}

/// The WebSocket upgrade for AMQP on a TLS connection to the HTTPS listener.
pub async fn ws_upgrade(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    server_name: &str,
) -> Result<crate::servers::ws::WsIo<tokio_rustls::client::TlsStream<TcpStream>>, ClientError> {
    crate::servers::ws::connect(tls, server_name)
        .await
        .map_err(|e| ClientError::Tls(format!("WebSocket upgrade: {e}")))
}

/// Sends a put-token on a fresh `$cbs` link pair and checks the status.
pub async fn put_token<R>(
    session: &mut SessionHandle<R>,
    audience: &str,
    token: &str,
) -> Result<(), ClientError> {
    let mut cbs = CbsClient::attach(session, "cbs-snd", "cbs")
        .await
        .map_err(amqp)?;
    match cbs.put_token(SERVICEBUS_TOKEN, audience, token).await {
        Ok(()) => {}
        Err(CbsError::Refused(status, why)) => {
            return Err(ClientError::Refused(
                i32::try_from(status).unwrap_or(i32::MAX),
                why,
            ))
        }
        Err(e) => return Err(amqp(e)),
    }
    cbs.close().await;
    Ok(())
}
