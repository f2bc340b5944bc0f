//! tonic over turmoil's simulated TCP: a [`Dialer`] for the runtimes and clients, and
//! the accepted-connection stream a tonic server serves.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ratify_proto::dial::Dialer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

/// Lazily connected channels over the simulated network, with the HTTP/2 keepalives of
/// the daemons' TCP dialer (a connection whose peer went silent is dropped and redialed).
pub fn dialer() -> Dialer {
    Dialer::new(|endpoint| {
        channel(endpoint, None, |e| {
            e.http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(10))
        })
    })
}

/// A channel to `endpoint` (e.g. `http://coord:7400`) whose calls time out after
/// `timeout` of simulated time.
pub fn channel(
    endpoint: &str,
    timeout: Option<Duration>,
    settings: impl FnOnce(Endpoint) -> Endpoint,
) -> Option<Channel> {
    let mut e = settings(
        Endpoint::from_shared(endpoint.to_string())
            .ok()?
            .connect_timeout(Duration::from_secs(1)),
    );
    if let Some(timeout) = timeout {
        e = e.timeout(timeout);
    }
    Some(
        e.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        })),
    )
}

/// An accepted simulated connection, as tonic's server wants it.
#[derive(Debug)]
pub struct SimStream(turmoil::net::TcpStream);

impl Connected for SimStream {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepted connections on `port` of this simulated host, for `serve_with_incoming`.
pub async fn incoming(
    port: u16,
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<SimStream>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| SimStream(s));
        Some((accepted, listener))
    }))
}
