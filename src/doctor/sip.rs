//! Step 5 for SIP partners: one OPTIONS request (RFC 3261 §11) over the verified TLS
//! connection on which we presented our certificate. Any SIP response proves the partner
//! speaks SIP and kept the connection after seeing our certificate; a TLS alert or a close
//! instead means it refused our certificate (Lync edges close on an unknown CA or a name they
//! do not federate with). Building the request and reading the status line are pure
//! ([`options_request`], [`classify`]); the exchange is one bounded write and read.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Budget, Step, StepKind};
use crate::config::Domain;
use crate::dns::Target;

/// The OPTIONS request from `local` (our domain) to `domain`, with fresh tags from `nonce`.
pub fn options_request(local: &str, domain: &str, via_host: &str, nonce: u64) -> Vec<u8> {
    format!(
        "OPTIONS sip:{domain} SIP/2.0\r\n\
         Via: SIP/2.0/TLS {via_host};branch=z9hG4bK-doctor-{nonce:x};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:doctor@{local}>;tag=doctor{nonce:x}\r\n\
         To: <sip:{domain}>\r\n\
         Call-ID: doctor-{nonce:x}@{local}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Contact: <sip:doctor@{via_host};transport=tls>\r\n\
         Accept: application/sdp\r\n\
         User-Agent: legate-doctor\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// What came back on the connection.
#[derive(Debug)]
pub enum Answer {
    /// Bytes read (up to the end of the headers or the read limit).
    Bytes(Vec<u8>),
    /// Clean close before any byte.
    Closed,
    /// Read error (a TLS alert travels as an `InvalidData` error carrying the rustls error).
    Error(io::Error),
    TimedOut,
}

/// Step 5's verdict for SIP.
pub fn classify(answer: &Answer, domain: &str, local: &str) -> Step {
    let k = StepKind::Protocol;
    let refused = format!(
        "{domain} refused our certificate: make sure it trusts the CA of our certificate \
         (tls.cert) and federates with {local} (on a Lync/Skype edge: add {local} as an \
         allowed federated domain), and that our certificate carries clientAuth"
    );
    match answer {
        Answer::Bytes(b) => {
            let text = String::from_utf8_lossy(b);
            let line = text.lines().next().unwrap_or("").trim().to_string();
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
                (Some("SIP/2.0"), Some(code)) if (200..300).contains(&code) => {
                    Step::ok(k, format!("OPTIONS answered: {line}"))
                }
                (Some("SIP/2.0"), Some(code)) => Step::warn(
                    k,
                    format!("OPTIONS answered: {line}"),
                    format!(
                        "{domain} speaks SIP and accepted our certificate but answered {code}; \
                         check that it federates with {local} (its logs name the reason)"
                    ),
                )
                .with_details(vec![format!("status {code} is not 2xx")]),
                _ => Step::fail(
                    k,
                    format!("the partner answered something that is not SIP: {line:.80}"),
                    format!("the target is not {domain}'s SIP edge: check the SRV record / route port"),
                ),
            }
        }
        Answer::Closed => Step::fail(
            k,
            "the partner closed the connection after our certificate, without a SIP answer",
            refused,
        ),
        Answer::Error(e) => {
            let alert = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map(|r| r.to_string());
            match alert {
                Some(a) => Step::fail(
                    k,
                    format!("the partner sent a TLS alert after our certificate: {a}"),
                    refused,
                ),
                None => Step::fail(
                    k,
                    format!("the connection failed after our certificate: {e}"),
                    refused,
                ),
            }
        }
        Answer::TimedOut => Step::fail(
            k,
            "no answer to OPTIONS in time",
            format!("{domain}'s edge accepted TLS but does not answer SIP: ask them to check its SIP service"),
        ),
    }
}

/// Step 5 for SIP over the TLS stream of step 4.
pub async fn options_step<IO>(
    mut io: IO,
    local: Option<&Domain>,
    domain: &Domain,
    target: &Target,
    budget: &Budget,
) -> Step
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let local = local.map(Domain::as_str).unwrap_or("invalid");
    let nonce = rand::random::<u64>();
    let req = options_request(local, domain.as_str(), local, nonce);
    let limit = budget.step();
    let exchange = async {
        io.write_all(&req).await?;
        io.flush().await?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        loop {
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, io::Error>(buf);
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 * 1024 {
                return Ok(buf);
            }
        }
    };
    let answer = match tokio::time::timeout(limit, exchange).await {
        Ok(Ok(b)) if b.is_empty() => Answer::Closed,
        Ok(Ok(b)) => Answer::Bytes(b),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Answer::Closed,
        Ok(Err(e)) => Answer::Error(e),
        Err(_) => Answer::TimedOut,
    };
    let mut step = classify(&answer, domain.as_str(), local);
    step.details
        .insert(0, format!("sent OPTIONS to {}", target.addr));
    step
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Verdict;

    #[test]
    fn request_is_a_complete_options() {
        let r = String::from_utf8(options_request(
            "example.test",
            "lync.test",
            "example.test",
            255,
        ))
        .unwrap_or_default();
        assert!(r.starts_with("OPTIONS sip:lync.test SIP/2.0\r\n"));
        assert!(r.contains("branch=z9hG4bK-doctor-ff"));
        assert!(r.ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify(
            &Answer::Bytes(b"SIP/2.0 200 OK\r\n\r\n".to_vec()),
            "lync.test",
            "example.test",
        );
        assert_eq!(ok.verdict, Verdict::Ok);
        let w = classify(
            &Answer::Bytes(b"SIP/2.0 403 Forbidden\r\n\r\n".to_vec()),
            "lync.test",
            "example.test",
        );
        assert_eq!(w.verdict, Verdict::Warn);
        let junk = classify(
            &Answer::Bytes(b"HTTP/1.1 400 Bad\r\n\r\n".to_vec()),
            "lync.test",
            "example.test",
        );
        assert_eq!(junk.verdict, Verdict::Fail);
        let closed = classify(&Answer::Closed, "lync.test", "example.test");
        assert_eq!(closed.verdict, Verdict::Fail);
        assert!(closed
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("refused our certificate")));
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        );
        let a = classify(&Answer::Error(alert), "lync.test", "example.test");
        assert!(a.summary.contains("TLS alert"), "{a:?}");
    }
}
