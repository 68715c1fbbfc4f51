//! systemd's readiness protocol (sd_notify(3)), without libsystemd: when the service manager
//! started us with `Type=notify`, it names a datagram socket in `NOTIFY_SOCKET`; we send
//! `READY=1` once every listener is bound (so `systemctl start` returns when the node takes
//! traffic, and a unit ordered after us starts then), and `STOPPING=1` when shutdown begins.
//! Without `NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) to the socket named `socket`: a
/// path, or an abstract socket name when it starts with `@` (Linux).
pub fn notify_to(socket: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        return Err(std::io::Error::other(format!(
            "abstract socket @{name} needs Linux"
        )));
    }
    sock.send_to(state.as_bytes(), socket)?;
    Ok(())
}

fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = socket.to_string_lossy();
    if let Err(e) = notify_to(&socket, state) {
        tracing::warn!(socket = %socket, error = %e, "cannot notify the service manager");
    }
}

/// Every listener is bound and announced.
pub fn ready() {
    notify("READY=1");
}

/// Shutdown (or drain) has begun.
pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        notify_to(&path.to_string_lossy(), "READY=1").unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("legate-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let rx = UnixDatagram::bind_addr(&addr).unwrap_or_else(|e| panic!("{e}"));
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap_or_else(|e| panic!("{e}"));
        let n = rx.recv(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to(&dir.path().join("none").to_string_lossy(), "READY=1").is_err());
    }
}
