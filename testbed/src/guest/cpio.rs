//! A writer for the cpio "newc" format, the only format the Linux kernel unpacks as an
//! initramfs.
//!
//! Writing the archive ourselves (instead of calling `cpio`) lets the image hold device
//! nodes such as `/dev/console` without root, keeps ownership at 0:0 whatever user builds
//! it, and lets a test append its own small archive to the cached base image.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// Mode bits of a directory.
const S_IFDIR: u32 = 0o040_000;
/// Mode bits of a regular file.
const S_IFREG: u32 = 0o100_000;
/// Mode bits of a symbolic link.
const S_IFLNK: u32 = 0o120_000;
/// Mode bits of a character device.
const S_IFCHR: u32 = 0o020_000;

/// Streams newc entries to `W`, creating parent directories on first use.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    /// Adds a directory (and its missing parents).
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let path = normalize(path)?;
        if path.is_empty() || self.dirs.contains(&path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.entry(&path, S_IFDIR | 0o755, 0, &[])?;
        self.dirs.insert(path);
        Ok(())
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parent(&path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 0, data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path)?;
        self.parent(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 0, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> io::Result<()> {
        let path = normalize(path)?;
        self.parent(&path)?;
        let rdev = (u64::from(major) << 32) | u64::from(minor);
        self.entry(&path, S_IFCHR | 0o600, rdev, &[])
    }

    /// Writes the trailer, pads the archive to a 512-byte boundary (so that another
    /// archive can be concatenated) and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 0, &[])?;
        let rem = self.written % 512;
        if rem != 0 {
            let pad = usize::try_from(512 - rem).map_err(io::Error::other)?;
            self.out.write_all(&vec![0u8; pad])?;
        }
        self.out.flush()?;
        Ok(self.out)
    }

    fn parent(&mut self, path: &str) -> io::Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    /// `rdev` packs the device's major number in the high and minor in the low 32 bits.
    fn entry(&mut self, name: &str, mode: u32, rdev: u64, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::other(format!("{name}: too large for cpio newc")))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::other(format!("{name}: name too long")))?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let rdev_major = u32::try_from(rdev >> 32).map_err(io::Error::other)?;
        let rdev_minor = u32::try_from(rdev & 0xffff_ffff).map_err(io::Error::other)?;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = rdev_major,
            rmin = rdev_minor,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += u64::try_from(bytes.len()).map_err(io::Error::other)?;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let rem = self.written % 4;
        if rem == 0 {
            return Ok(());
        }
        let pad = usize::try_from(4 - rem).map_err(io::Error::other)?;
        self.put(&[0u8; 3][..pad])
    }
}

/// Archive paths are relative ("bin/sh"); reject anything that could escape the root.
fn normalize(path: &str) -> io::Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed
        .split('/')
        .any(|c| c == ".." || c == "." || c.is_empty())
        && !trimmed.is_empty()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad archive path {path:?}"),
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a newc archive and returns (name, mode, data) of every entry before the trailer.
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&buf[..6], b"070701", "magic at offset {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let mode = u32::try_from(field(1)).unwrap();
            let size = field(6);
            let namesize = field(11);
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            let data_start = (110 + namesize).div_ceil(4) * 4;
            let data = buf[data_start..data_start + size].to_vec();
            let next = (data_start + size).div_ceil(4) * 4;
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data));
            buf = &buf[next..];
            offset += next;
        }
    }

    #[test]
    fn entries_round_trip_with_parents_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/etc/guest/x.sh", 0o755, b"echo hi\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_device("dev/console", 5, 1).unwrap();
        w.dir("etc").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/guest",
                "etc/guest/x.sh",
                "bin",
                "bin/sh",
                "dev",
                "dev/console"
            ]
        );
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[2].2, b"echo hi\n");
        assert_eq!(entries[4].2, b"busybox");
        assert_eq!(entries[6].1, S_IFCHR | 0o600);
    }

    #[test]
    fn rdev_fields_hold_major_and_minor() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_device("null", 1, 3).unwrap();
        let bytes = w.finish().unwrap();
        // rdevmajor is field 9 and rdevminor field 10 (0-based after the magic).
        assert_eq!(&bytes[6 + 9 * 8..6 + 10 * 8], b"00000001");
        assert_eq!(&bytes[6 + 10 * 8..6 + 11 * 8], b"00000003");
    }

    #[test]
    fn rejects_paths_that_escape() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
    }
}
