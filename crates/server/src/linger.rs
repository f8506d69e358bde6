//! Lingering close: a connection that rtpay closes first lets the peer finish sending.
//!
//! Closing a socket whose receive buffer still holds unread bytes makes the kernel reset the
//! connection, and the reset can reach the peer before it has read the answer already sent. A
//! client still sending a body that was refused at once (`413`: its `Content-Length` is over the
//! limit) then saw "connection reset" instead of the `413`. So, on close, the write side is shut
//! first (the peer reads the answer, then the end of the stream), and what the peer still sends
//! is read and discarded, for at most [`LINGER_MAX`] and [`LINGER_BYTES_MAX`], before the socket
//! closes — as nginx's `lingering_close` does.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a closing connection reads what its peer still sends, at most.
pub const LINGER_MAX: Duration = Duration::from_secs(2);
/// How much it reads, at most.
pub const LINGER_BYTES_MAX: usize = 16 << 20;

pub struct Lingering<I> {
    io: I,
    closing: Option<Closing>,
}

struct Closing {
    write_shut: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    drained: usize,
}

impl<I> Lingering<I> {
    pub fn new(io: I) -> Lingering<I> {
        Lingering { io, closing: None }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    /// Shuts the write side, then reads until the peer's end of stream, an error, or the limits.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let closing = this.closing.get_or_insert_with(|| Closing {
            write_shut: false,
            deadline: Box::pin(tokio::time::sleep(LINGER_MAX)),
            drained: 0,
        });
        if !closing.write_shut {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            closing.write_shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if closing.drained >= LINGER_BYTES_MAX || closing.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => closing.drained += buf.filled().len(),
                // Reset by the peer, or a TLS stream that reads nothing more: closed either way.
                Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The peer, still sending when rtpay answers and closes, reads the whole answer, and the
    /// close waits for no more than the peer's end of stream.
    #[tokio::test]
    async fn a_peer_still_sending_reads_the_answer_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = super::Lingering::new(tcp);
            let mut head = [0u8; 16];
            conn.read_exact(&mut head).await.unwrap();
            conn.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            let started = std::time::Instant::now();
            conn.shutdown().await.unwrap();
            started.elapsed()
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // 8 MiB after the answer was written: far more than the socket buffers hold, so the
        // server is closing while the client still sends.
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            client.write_all(&chunk).await.expect("the server reads what is still sent");
        }
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
        let lingered = server.await.unwrap();
        assert!(lingered < super::LINGER_MAX, "it closed at the peer's end of stream: {lingered:?}");
    }
}
