//! Small blocking helpers over `rustix`: directory-relative opens that never follow a symlink
//! below the base directory.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

/// Opens a directory by path. The base directory itself may be a symlink (it is configured by
/// the operator); nothing below it is followed.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` inside `dir`, failing (`ELOOP`/`ENOTDIR`) on a symlink.
pub(crate) fn open_dir_at(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` inside `dir`, creating it first if it is missing.
pub(crate) fn ensure_dir_at(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    open_dir_at(dir, name)
}

/// Opens the regular file `name` inside `dir` for reading, never following a symlink.
pub(crate) fn open_file_at(dir: &OwnedFd, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Creates the new file `name` inside `dir`; fails if anything exists under that name.
pub(crate) fn create_file_at(dir: &OwnedFd, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    Ok(File::from(fd))
}

/// What is at `name` inside `dir`, without following a symlink; `None` when nothing is.
pub(crate) fn kind_at(dir: &OwnedFd, name: &str) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Flushes a directory's entries to stable storage.
pub(crate) fn fsync_dir(dir: &OwnedFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

/// Whether an open failed because the name is missing or is not a real directory/file (a
/// symlink swapped in is treated as missing: it is never followed).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw_os_error),
        Some(Errno::NOENT | Errno::LOOP | Errno::NOTDIR)
    )
}

/// Renames `from` in `from_dir` to `to` in `to_dir`, failing with `AlreadyExists` if `to`
/// exists. Uses `renameat2(RENAME_NOREPLACE)`; where the filesystem does not support it (some
/// NFS servers), falls back to a check and a plain `rename`, which still refuses a non-empty
/// target directory (`ENOTEMPTY`), so only an empty directory or a file created in between
/// could be replaced.
pub(crate) fn rename_noreplace(
    from_dir: &OwnedFd,
    from: &str,
    to_dir: &OwnedFd,
    to: &str,
) -> io::Result<()> {
    let exists = || io::Error::from(io::ErrorKind::AlreadyExists);
    match rustix::fs::renameat_with(
        from_dir,
        from,
        to_dir,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST | Errno::NOTEMPTY) => Err(exists()),
        Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            if kind_at(to_dir, to)?.is_some() {
                return Err(exists());
            }
            match rustix::fs::renameat(from_dir, from, to_dir, to) {
                Ok(()) => Ok(()),
                Err(Errno::EXIST | Errno::NOTEMPTY | Errno::ISDIR | Errno::NOTDIR) => Err(exists()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}
