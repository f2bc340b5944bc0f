//! A fault-injecting TCP proxy for one direction of one link (e.g. coordinator → p1).
//!
//! This kernel has no `netem`, so delay and partitions between processes on loopback are
//! made here, in user space: every byte between the two ends passes through the proxy,
//! which can forward it, hold it back, or cut the link.
//!
//! - [`LinkFault::Cut`] is a silent partition: nothing more crosses open connections and
//!   neither end hears a FIN or a reset (their calls time out; only keepalives notice),
//!   new connections are accepted but never forwarded (connects succeed, requests hang),
//!   and at the heal those connections are closed, as after a partition longer than
//!   TCP's retransmission timeout.
//! - [`LinkFault::Delay`] forwards every chunk in order, each held back by a fixed time,
//!   so phase-2 messages arrive late, after other traffic has gone on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link does to its traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFault {
    /// Forward everything as soon as it arrives.
    None,
    /// A silent partition.
    Cut,
    /// Hold every chunk back by this long.
    Delay(Duration),
}

#[derive(Debug)]
struct Shared {
    target: Mutex<Option<SocketAddr>>,
    fault: watch::Sender<LinkFault>,
}

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port. The target may be set later (a process
    /// listening on port 0 learns its address only once started). Must be called inside a
    /// tokio runtime, which runs the proxy.
    pub fn start(target: Option<SocketAddr>) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            fault: watch::channel(LinkFault::None).0,
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().expect("proxy state") = Some(target);
    }

    pub fn set_fault(&self, fault: LinkFault) {
        self.shared.fault.send_replace(fault);
    }

    pub fn fault(&self) -> LinkFault {
        *self.shared.fault.borrow()
    }

    pub fn heal(&self) {
        self.set_fault(LinkFault::None);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    let _ = inbound.set_nodelay(true);
                    connections.spawn(connection(inbound, shared.clone()));
                }
                // Out of descriptors or similar: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

fn is_cut(fault: &mut watch::Receiver<LinkFault>) -> bool {
    *fault.borrow_and_update() == LinkFault::Cut
}

/// Waits while the link is cut; returns when traffic may flow again.
async fn wait_uncut(fault: &mut watch::Receiver<LinkFault>) {
    while is_cut(fault) {
        if fault.changed().await.is_err() {
            return;
        }
    }
}

/// How one direction of a connection ended.
enum Ended {
    /// End of stream or an error: the connection closes.
    Closed,
    /// The link was cut: the connection stays open and silent until the heal.
    Cut,
}

async fn connection(inbound: TcpStream, shared: Arc<Shared>) {
    let mut fault = shared.fault.subscribe();
    // A connection opened during a cut hangs (connect succeeded, nothing answers) and is
    // closed when the cut ends, like a SYN that got through just before the partition.
    if is_cut(&mut fault) {
        wait_uncut(&mut fault).await;
        return;
    }
    let target = *shared.target.lock().expect("proxy state");
    let Some(target) = target else { return };
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let forward = pump(in_read, out_write, shared.fault.subscribe());
    let backward = pump(out_read, in_write, shared.fault.subscribe());
    let ended = tokio::select! {
        ended = forward => ended,
        ended = backward => ended,
    };
    // A cut is silent: neither end hears a FIN or a reset; both sockets stay open (their
    // writes pile up unread) until the heal, and only then is the connection closed.
    if matches!(ended, Ended::Cut) {
        wait_uncut(&mut fault).await;
    }
}

/// Copies one direction, applying the link's fault to each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    fault: watch::Receiver<LinkFault>,
) -> Ended {
    // Delayed chunks go through an ordered queue so a delay never reorders bytes.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let mut writer_fault = fault.clone();
    let writer = async move {
        let mut to = to;
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // Held-back bytes do not get through a cut that began meanwhile.
            if is_cut(&mut writer_fault) {
                return Ended::Cut;
            }
            if to.write_all(&chunk).await.is_err() {
                return Ended::Closed;
            }
        }
        Ended::Closed
    };
    let mut fault = fault;
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                read = from.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return Ended::Closed,
                        Ok(n) => n,
                    };
                    let delay = match *fault.borrow_and_update() {
                        LinkFault::Cut => return Ended::Cut,
                        LinkFault::None => Duration::ZERO,
                        LinkFault::Delay(d) => d,
                    };
                    if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return Ended::Closed;
                    }
                }
                changed = fault.changed() => {
                    if changed.is_err() {
                        return Ended::Closed;
                    }
                    if is_cut(&mut fault) {
                        return Ended::Cut;
                    }
                }
            }
        }
    };
    tokio::pin!(writer);
    tokio::select! {
        ended = &mut writer => ended,
        ended = reader => match ended {
            // At end of stream the bytes still held back are delivered first.
            Ended::Closed => writer.await,
            Ended::Cut => Ended::Cut,
        },
    }
}
