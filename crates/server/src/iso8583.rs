//! The card network's TCP listener: ISO 8583 messages, each after a 2-byte big-endian length.
//! Many messages may be in flight on one connection; each is answered as soon as it is decided,
//! in any order (the network matches answers by STAN and RRN). A frame that cannot be read as a
//! request gets a format-error answer (DE39 `30`), or the connection is closed when not even its
//! type can be read; other connections never notice. With a certificate (`--tls-cert`), the
//! listener speaks TLS, and with `--tls-client-ca` requires the network's client certificate
//! (`--iso8583-plain` keeps plain TCP, for a link encrypted below it).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::AppState;

/// The longest message accepted (the default_ascii layout's largest is far below).
pub const FRAME_LEN_MAX: usize = 8192;
/// Messages of one connection being decided at once; the next waits for a free slot.
pub const IN_FLIGHT_MAX: usize = 256;
/// Connections open at once, at most, and from one address (a card network holds a few links
/// from a few addresses); beyond either, a new one is closed at once. Without a bound, peers that
/// open connections and send nothing (each may sit out [`IDLE_TIMEOUT`], or the TLS handshake's
/// time) would use up the descriptors the HTTP listener shares; with the node's bound alone, one
/// such peer could fill it and shut the network out. Counted from the accept, before any
/// handshake: a peer without a certificate holds its share too. Well below the 1,024
/// descriptors a process is commonly allowed; an IPv6 peer's address is its /64.
pub const CONNECTIONS_MAX: usize = 512;
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 64;

/// The connections open, in all and by the peer's address.
#[derive(Default)]
struct Open {
    by_address: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
}

/// One connection's place among the [`Open`] ones, given back when dropped.
struct Place {
    open: Arc<Open>,
    address: std::net::IpAddr,
}

impl Open {
    fn take(self: &Arc<Self>, address: std::net::IpAddr) -> Option<Place> {
        let mut open = self.by_address.lock().expect("open connections");
        let (total, by_address) = &mut *open;
        let here = by_address.entry(address).or_default();
        if *total >= CONNECTIONS_MAX || *here >= CONNECTIONS_PER_ADDRESS_MAX {
            if *here == 0 {
                by_address.remove(&address);
            }
            return None;
        }
        *here += 1;
        *total += 1;
        Some(Place { open: self.clone(), address })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.open.by_address.lock().expect("open connections");
        let (total, by_address) = &mut *open;
        *total -= 1;
        if let Some(here) = by_address.get_mut(&self.address) {
            *here -= 1;
            if *here == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an answer may wait for the peer to take it (its receive window full): then the
/// connection closes.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The listener's TLS (see `tls::iso8583_tls`).
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The client's certificate (required at the handshake) must name the card network
    /// ([`crate::tls::CARD_NETWORK_URI`]).
    pub network_certificate: bool,
}

pub async fn serve(
    listener: TcpListener,
    state: AppState,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let open = Arc::new(Open::default());
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "iso8583 accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(place) = open.take(crate::auth::canonical(peer.ip())) else {
                    tracing::warn!(
                        %peer,
                        "an ISO 8583 connection closed at once: {CONNECTIONS_MAX} are open, or \
                         {CONNECTIONS_PER_ADDRESS_MAX} from its address"
                    );
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (state, tls) = (state.clone(), tls.clone());
                tokio::spawn(async move {
                    let _place = place;
                    let ended = match tls {
                        None => connection(stream, state).await,
                        // A peer that does not finish its handshake in time, or presents no
                        // certificate the client CA signed, is closed before any message is read.
                        Some(tls) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => {
                                let certificate = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                                if tls.network_certificate
                                    && !certificate.is_some_and(|c| crate::tls::names_card_network(c))
                                {
                                    tracing::info!(%peer, "an ISO 8583 peer's certificate does not name the card network; closed");
                                    return;
                                }
                                connection(stream, state).await
                            }
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake")),
                        },
                    };
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "iso8583 connection ended");
                    }
                });
            }
        }
    }
}

/// How long a peer has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn connection<S>(stream: S, state: AppState) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(IN_FLIGHT_MAX);
    // Set when a frame was unreadable beyond answering, or the peer stopped taking answers: the
    // connection closes.
    let close = Arc::new(tokio::sync::Notify::new());
    let stopped = close.clone();
    let write = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            // A peer that sends and never reads would otherwise hold this task, every message in
            // flight (waiting to queue its answer) and the reading loop (waiting for their slots)
            // for good. Dropping `rx` fails those waits, which frees the slots.
            match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    stopped.notify_one();
                    break;
                }
            }
        }
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    let result = loop {
        let mut len = [0u8; 2];
        let read = tokio::select! {
            read = tokio::time::timeout(IDLE_TIMEOUT, reader.read_exact(&mut len)) => read,
            _ = close.notified() => break Ok(()),
        };
        match read {
            Err(_) => break Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Ok(Ok(_)) => {}
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > FRAME_LEN_MAX {
            tracing::info!(len, "iso8583 frame length out of range; closing the connection");
            break Ok(());
        }
        let mut frame = vec![0u8; len];
        match tokio::time::timeout(IDLE_TIMEOUT, reader.read_exact(&mut frame)).await {
            Ok(Ok(_)) => {}
            _ => break Ok(()),
        }
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (state, tx, close) = (state.clone(), tx.clone(), close.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // A panic in one message's handling costs that message only.
            let answer = crate::catch_panic(async move { crate::card_network::handle(&state, &frame).await }).await;
            match answer {
                Ok(Some(bytes)) if bytes.is_empty() => {}
                Ok(Some(bytes)) => {
                    let _ = tx.send(cards::iso8583::frame(&bytes)).await;
                }
                Ok(None) => close.notify_one(),
                Err(_) => tracing::error!("an ISO 8583 message's handling panicked"),
            }
        });
    };
    drop(tx);
    // Answers already being decided still go out before the connection closes.
    let _ = slots.acquire_many(IN_FLIGHT_MAX as u32).await;
    let _ = write.await;
    result
}

#[cfg(test)]
mod tests {
    use super::{Open, CONNECTIONS_MAX, CONNECTIONS_PER_ADDRESS_MAX};
    use std::sync::Arc;

    /// An address holds at most its share, the node at most its bound, and places come back.
    #[test]
    fn connections_are_bounded_by_address_and_in_all() {
        let open = Arc::new(Open::default());
        let address = |n: u32| std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + n));
        let first: Vec<_> = (0..CONNECTIONS_PER_ADDRESS_MAX).map(|_| open.take(address(0)).unwrap()).collect();
        assert!(open.take(address(0)).is_none(), "one address holds its share at most");
        let mut others = Vec::new();
        for n in 1.. {
            match open.take(address(n)) {
                Some(place) => others.push(place),
                None => break,
            }
        }
        assert_eq!(first.len() + others.len(), CONNECTIONS_MAX);
        drop(first);
        assert!(open.take(address(0)).is_some(), "given back when dropped");
        drop(others);
        assert_eq!(open.by_address.lock().unwrap().0, 0);
        assert!(open.by_address.lock().unwrap().1.is_empty());
    }
}
