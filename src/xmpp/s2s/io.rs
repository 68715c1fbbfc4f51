//! Byte transport under an s2s stream: plain TCP that may turn into TLS mid-stream (STARTTLS,
//! RFC 6120 §5.4.3.3) or TLS from the first byte (XEP-0368).
//!
//! After `<proceed/>` the framer may already hold the first TLS bytes the peer sent; `Rewind`
//! replays them to the TLS engine before reading the socket again, so nothing is lost or
//! parsed as XML.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any stream we can run XMPP over.
pub trait S2sIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> S2sIo for T {}

pub type BoxIo = Box<dyn S2sIo>;

/// `inner`, with `prefix` read first.
pub struct Rewind {
    prefix: BytesMut,
    inner: BoxIo,
}

impl Rewind {
    pub fn new(prefix: BytesMut, inner: BoxIo) -> Self {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(self.prefix.get(..n).unwrap_or(&[]));
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_is_read_first_then_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(BytesMut::from(&b"\x16\x03\x01"[..]), Box::new(a));
        b.write_all(b"rest").await.unwrap_or_else(|e| panic!("{e}"));
        let mut got = vec![0u8; 7];
        r.read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"\x16\x03\x01rest");
        r.write_all(b"out").await.unwrap_or_else(|e| panic!("{e}"));
        let mut back = [0u8; 3];
        b.read_exact(&mut back)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&back, b"out");
    }
}
