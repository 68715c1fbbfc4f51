//! Bounded writes: a peer that stops reading must not pin a task (and the slots it holds)
//! forever. Every write of an edge goes through [`write_bounded`].

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

/// One `write_all` of `data`, bounded by `limit`.
pub async fn write_bounded<W>(wr: &mut W, data: &[u8], limit: Duration) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    match tokio::time::timeout(limit, wr.write_all(data)).await {
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
}
