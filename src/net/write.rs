//! Bounded writes: a peer that stops reading must not pin a task (and the slots it holds)
//! forever. Every write of an edge goes through [`write_bounded`]: the SIP transports, the
//! component links and the s2s streams.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Why a bounded write did not complete.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("write did not complete within {0:?} (peer not reading)")]
    Timeout(Duration),
}

impl WriteError {
    /// Bounded metric label.
    pub fn label(&self) -> &'static str {
        match self {
            WriteError::Io(_) => "write_error",
            WriteError::Timeout(_) => "write_timeout",
        }
    }
}

/// One `write_all` of `data` then a flush, both within `limit`. The flush is what puts the
/// bytes on the wire under TLS: tokio-rustls may accept the last plaintext while the socket
/// is full and keep its records buffered until the next write or flush, so without it a
/// stanza or SIP message could sit in the buffer while the link is quiet. On a plain socket
/// the flush costs nothing.
pub async fn write_bounded<W>(wr: &mut W, data: &[u8], limit: Duration) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    let write = async {
        wr.write_all(data).await?;
        wr.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r.map_err(WriteError::Io),
        Err(_) => Err(WriteError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_reader_that_stops_reading_times_the_write_out() {
        // A 16-byte pipe nobody reads: the write of 1 KiB can never complete.
        let (mut a, b) = tokio::io::duplex(16);
        let r = write_bounded(&mut a, &[7u8; 1024], Duration::from_millis(200)).await;
        assert!(matches!(r, Err(WriteError::Timeout(d)) if d == Duration::from_millis(200)));
        assert_eq!(r.err().map(|e| e.label()), Some("write_timeout"));
        // A small write completes and arrives.
        let (mut a2, mut b2) = tokio::io::duplex(64);
        write_bounded(&mut a2, b"hello", Duration::from_secs(1))
            .await
            .expect("small write");
        let mut got = [0u8; 5];
        b2.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        drop(b);
        let r = write_bounded(&mut a, &[1u8; 64], Duration::from_secs(1)).await;
        // The reader is gone: an error at once, not a wait for the timeout.
        assert!(matches!(r, Err(WriteError::Io(_))), "{r:?}");
    }

    #[tokio::test]
    async fn buffered_writers_are_flushed() {
        // A writer that keeps bytes until flushed (as a TLS stream may keep its records): the
        // bytes must arrive without another write.
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = tokio::io::BufWriter::new(a);
        write_bounded(&mut w, b"<r/>", Duration::from_secs(1))
            .await
            .expect("write");
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(1), b.read_exact(&mut got))
            .await
            .expect("flushed, not kept in the buffer")
            .expect("read");
        assert_eq!(&got, b"<r/>");
    }
}
