//! Binding a Unix socket that only this user may reach, shared by the control API and
//! the NBD front-end.
//!
//! The socket is bound under a temporary name, restricted to mode 0600, then renamed
//! into place, so it is never reachable at its path with wider permissions. A stale
//! socket nobody listens on is replaced; a live one, or any other file, is an error
//! rather than something to remove.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Binds a mode-0600 Unix socket at `path`. `busy` is the error text when another
/// process already listens there.
pub(crate) async fn bind_private(
    path: &Path,
    busy: &'static str,
) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Ok(_) if tokio::net::UnixStream::connect(path).await.is_ok() => {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, busy))
        }
        _ => {}
    }
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    if let Err(e) = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}
