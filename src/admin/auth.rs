//! The admin endpoint's bearer token (RFC 6750): one line in `node.admin_token_file`, read
//! at start and again when the file's modification time changes, compared in constant time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

/// Shortest token accepted: a short one can be guessed over the network.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read node.admin_token_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "node.admin_token_file {} holds {len} characters; write a token of at least \
         {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 32 > {}`)", path.display(), path.display()
    )]
    Short { path: PathBuf, len: usize },
}

pub struct Token {
    path: PathBuf,
    /// The token and the modification time of the file it was read from.
    current: Mutex<(Option<SystemTime>, String)>,
}

fn read(path: &PathBuf) -> Result<(Option<SystemTime>, String), TokenError> {
    let err = |source| TokenError::Read {
        path: path.clone(),
        source,
    };
    let mtime = std::fs::metadata(path).map_err(err)?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(err)?;
    let t = text.trim().to_string();
    if t.len() < MIN_TOKEN_LEN {
        return Err(TokenError::Short {
            path: path.clone(),
            len: t.len(),
        });
    }
    Ok((mtime, t))
}

impl Token {
    pub fn load(path: PathBuf) -> Result<Token, TokenError> {
        let current = read(&path)?;
        Ok(Token {
            path,
            current: Mutex::new(current),
        })
    }

    /// Whether `given` is the token. A changed file is re-read first; a file that became
    /// unreadable or too short keeps the last good token (and says so in the log).
    pub fn matches(&self, given: &str) -> bool {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let mtime = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        if mtime != cur.0 {
            match read(&self.path) {
                Ok(fresh) => *cur = fresh,
                Err(e) => {
                    tracing::warn!(error = %e, "admin token file changed but is not usable; the last good token stays");
                    cur.0 = mtime;
                }
            }
        }
        same(given.as_bytes(), cur.1.as_bytes())
    }
}

/// Equality whose time does not depend on where the first difference is (the length may
/// show; the token's length is no secret worth keeping).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_checked_exactly_and_a_rewritten_file_is_picked_up() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef-first\n").unwrap_or_else(|e| panic!("{e}"));
        let t = Token::load(path.clone()).unwrap_or_else(|e| panic!("{e}"));
        assert!(t.matches("0123456789abcdef-first"));
        assert!(!t.matches("0123456789abcdef-firs"));
        assert!(!t.matches(""));
        // A new modification time (set explicitly: two writes may share a timestamp).
        std::fs::write(&path, "0123456789abcdef-second\n").unwrap_or_else(|e| panic!("{e}"));
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{e}"));
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(t.matches("0123456789abcdef-second"));
        assert!(!t.matches("0123456789abcdef-first"));
        std::fs::write(&path, "short").unwrap_or_else(|e| panic!("{e}"));
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(t.matches("0123456789abcdef-second"), "last good token kept");
        assert!(matches!(
            Token::load(path.clone()),
            Err(TokenError::Short { len: 5, .. })
        ));
        assert!(matches!(
            Token::load(dir.path().join("none")),
            Err(TokenError::Read { .. })
        ));
    }
}
