//! The programs and sockets the harnesses depend on: a missing program fails the test naming
//! its Debian package; a program that prints nothing when ready is waited for on its socket.

use std::path::PathBuf;

/// The path of `program` (an absolute path, or a name looked up on `PATH`). A missing program
/// fails the test and names the Debian package that provides it: a test never skips because a
/// tool is missing, or a machine without it would pass what it never ran.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let found = if program.contains('/') {
        Some(PathBuf::from(program)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    found.unwrap_or_else(|| {
        panic!(
            "`{program}` is not installed: this test needs it; install the Debian package \
             `{package}` (apt-get install {package}; .ci/run does)"
        )
    })
}

/// Waits (at most `wait`) until some process listens on TCP `port` of a local address, read from
/// the kernel's socket table (`/proc/net/tcp*`, state `0A` = LISTEN). For programs that print
/// nothing when ready (sipp, stunnel); a probe connection instead would be a peer to them.
pub async fn wait_listening(port: u16, wait: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let needle = format!(":{port:04X} ");
    loop {
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && format!("{} ", f[1]).ends_with(&needle) && f[3] == "0A"
                })
            })
        });
        if listening {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on TCP port {port} after {wait:?}"
        );
        // The kernel has no event for "someone listens now": a bounded poll on the socket table.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
