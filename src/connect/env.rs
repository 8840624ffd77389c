//! Where a connection's defaults come from: the process environment, the home directory
//! and the operating-system user (or a stand-in for them in tests).

use std::path::{Path, PathBuf};

/// Where the process's settings come from (the real environment, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    /// The home directory (`HOME`, else the password database).
    fn home(&self) -> Option<PathBuf>;
    /// The operating-system user name, libpq's default user.
    fn os_user(&self) -> Option<String>;
    /// Whether a path exists (the default socket directory, default certificate files).
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// The environment of this process.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from).or_else(|| passwd_entry().map(|(_, home)| home))
    }

    fn os_user(&self) -> Option<String> {
        passwd_entry().map(|(name, _)| name)
    }
}

/// The effective user's name and home directory from the password database.
fn passwd_entry() -> Option<(String, PathBuf)> {
    // SAFETY: getpwuid returns null or a pointer to static storage, read at once; the
    // strings are copied out before any other call could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned();
        let home = std::ffi::CStr::from_ptr((*pw).pw_dir).to_string_lossy().into_owned();
        Some((name, PathBuf::from(home)))
    }
}
