//! How a node opens channels to its peers. The daemons dial plain TCP; the deterministic
//! simulation (`ratify-tests`, `sim`) passes a dialer over its simulated network. The
//! runtimes never call `Endpoint::connect*` themselves.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Makes a lazily connected channel to an endpoint such as `http://127.0.0.1:7401`
/// (no I/O until the first call); `None` for an endpoint it cannot dial.
#[derive(Clone)]
pub struct Dialer(Arc<DialFn>);

type DialFn = dyn Fn(&str) -> Option<Channel> + Send + Sync;

impl Dialer {
    pub fn new(dial: impl Fn(&str) -> Option<Channel> + Send + Sync + 'static) -> Self {
        Self(Arc::new(dial))
    }

    pub fn dial(&self, endpoint: &str) -> Option<Channel> {
        (self.0)(endpoint)
    }

    /// TCP with Nagle off (a 2PC round is a few small messages, each waited for) and
    /// HTTP/2 keepalives while calls are open, so a connection whose peer went silent is
    /// dropped and redialed instead of failing every later call by timeout.
    pub fn tcp() -> Self {
        Self::new(|endpoint| {
            Endpoint::from_shared(endpoint.to_string()).ok().map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .connect_lazy()
            })
        })
    }
}

impl Default for Dialer {
    fn default() -> Self {
        Self::tcp()
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}
