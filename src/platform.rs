//! Platform code: the Linux system calls the mirror makes beyond what std and tokio offer,
//! each behind a safe function. Nothing else in the crate calls `libc`.
//!
//! - positional reads into uninitialised memory (`pread`), and positional writes;
//! - page-cache residency of a file range (`cachestat(2)`, else `mincore(2)`), so that a
//!   `sendfile` on an async worker never waits for the disk;
//! - `sendfile(2)` and `sendmsg(2)` with `MSG_MORE` for zero-copy bodies;
//! - "no space left on device" recognised by its errno;
//! - the open-files limit;
//! - the storage directory's lock (`fcntl` record locks).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

/// Reads `file[pos..pos + len]` into fresh, uninitialised memory. `FileExt::read_at` needs an
/// initialised buffer, and zeroing one per chunk cost a quarter of the CPU of serving a hit.
/// A file that ends early is an `UnexpectedEof` error. Blocking.
pub fn read_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let filled = buf.len();
        let offset = libc::off_t::try_from(pos + filled as u64).map_err(io::Error::other)?;
        // SAFETY: the destination is the vector's spare capacity, `len - filled` bytes that it
        // owns; pread writes at most that many and reports how many it wrote.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(filled).cast(),
                len - filled,
                offset,
            )
        };
        match n {
            n if n > 0 => {
                // SAFETY: pread initialised exactly `n` more bytes after `filled`, within the
                // capacity reserved above.
                unsafe { buf.set_len(filled + n as usize) }
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cached file is shorter than expected",
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(Bytes::from(buf))
}

/// Reads into `buf` at `pos` without moving the descriptor's cursor (it is shared). Blocking.
pub fn read_into_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    file.read_at(buf, pos)
}

/// Writes all of `buf` at `offset`, without moving the descriptor's cursor. Blocking.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

/// Takes an exclusive lock on the whole of `file`, without waiting: `Ok(None)` when taken,
/// `Ok(Some(pid))` when another process holds it. A POSIX record lock (`F_SETLK`), not
/// `flock`: it belongs to the process, so opening the same storage twice in one process (a
/// restart in tests) does not conflict, and the kernel drops it when the process ends,
/// however it ends. Blocking.
pub fn try_lock(file: &File) -> io::Result<Option<i32>> {
    // SAFETY: `flock` is a plain C struct for which all zeroes is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = l_len = 0: the whole file, however long.
    // SAFETY: the descriptor is open for as long as `file` is borrowed, and `lock` is a valid
    // `flock` that fcntl only reads.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } == 0 {
        return Ok(None);
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EACCES | libc::EAGAIN)) {
        return Err(e);
    }
    // SAFETY: as above; F_GETLK writes the conflicting lock (with its holder) into `lock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The holder may have let go in between: say so as "held by an unknown process".
    Ok(Some(if lock.l_type == libc::F_UNLCK as libc::c_short {
        0
    } else {
        lock.l_pid
    }))
}

/// Whether a failed write failed because the file system is full.
pub fn is_no_space(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}

/// Whether every page of `file[offset..offset + len]` is in the page cache: `cachestat(2)`
/// (Linux 6.5+, which counts whole folios at a time), else `mincore(2)`.
pub fn is_resident(file: &File, offset: u64, len: usize) -> bool {
    static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);
    if !NO_CACHESTAT.load(Ordering::Relaxed) {
        match cached_pages(file, offset, len) {
            Ok(cached) => return cached >= pages_spanned(offset, len) as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_CACHESTAT.store(true, Ordering::Relaxed)
            }
            Err(_) => return false,
        }
    }
    mincore_resident(file, offset, len)
}

fn pages_spanned(offset: u64, len: usize) -> usize {
    let page = page_size() as u64;
    let first = offset / page;
    let last = (offset + len as u64).div_ceil(page);
    (last - first) as usize
}

/// How many pages of the range are in the page cache, by `cachestat(2)`.
fn cached_pages(file: &File, offset: u64, len: usize) -> io::Result<u64> {
    /// The syscall's number in the generic table, shared by x86_64 and aarch64.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range {
        off: offset,
        len: len as u64,
    };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live, correctly laid out locals.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.nr_cache)
}

/// The largest range [`mincore_resident`] answers for; longer ones count as not resident.
const MINCORE_MAX: usize = 1024 * 1024;

/// `mincore` on a mapping that is never touched asks the page cache without faulting anything
/// in.
fn mincore_resident(file: &File, offset: u64, len: usize) -> bool {
    const MAX_PAGES: usize = MINCORE_MAX / 4096 + 1;
    let page = page_size();
    let start = offset - offset % page as u64;
    let span = (offset - start) as usize + len;
    let pages = span.div_ceil(page);
    let Ok(map_offset) = libc::off_t::try_from(start) else {
        return false;
    };
    if pages > MAX_PAGES {
        return false;
    }
    let mut vec = [0u8; MAX_PAGES];
    // SAFETY: a fresh read-only shared mapping of `span` bytes that is never dereferenced;
    // mincore writes one byte per page into `vec`, which holds `pages` <= MAX_PAGES bytes;
    // the mapping is removed before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            map_offset,
        );
        if addr == libc::MAP_FAILED {
            return false;
        }
        let rc = libc::mincore(addr, span, vec.as_mut_ptr());
        libc::munmap(addr, span);
        rc == 0 && vec[..pages].iter().all(|b| b & 1 == 1)
    }
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
    })
}

/// `writev` with `MSG_MORE` (more data follows at once) on a non-blocking socket.
pub fn send_more(socket: &impl AsRawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid; it points at `bufs`, whose IoSlices are laid out as
    // iovecs and outlive the call; sendmsg only reads them.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024) as _;
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `sendfile(2)`: up to `count` bytes of `file` from `offset` to a non-blocking socket.
pub fn send_file(
    socket: &impl AsRawFd,
    file: &File,
    offset: u64,
    count: usize,
) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
    // pointer to a local that sendfile updates.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit and returns
/// `(from, to)`. Every connection and every open cached file costs a descriptor, and the soft
/// limit that services inherit is often 1024 while the hard limit is far higher.
pub fn raise_open_files_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the live local it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let from = lim.rlim_cur;
    if from >= lim.rlim_max {
        return Ok((from, from));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads the live local it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((from, lim.rlim_cur))
}

/// Gives the allocator's free memory back to the system: glibc keeps what it freed in its
/// arenas (measured: a debug build stayed at 424 MiB after 1,000 HTTP/2 connections that
/// never read had gone, and was back at its 92 MiB once trimmed). Nothing with other
/// allocators.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer; it walks the allocator's own arenas under their
    // locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_past_the_end_of_a_file_are_not_resident() {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(&[1u8; 3 * 4096]).unwrap();
        tmp.set_len(2 * 4096 + 10).unwrap();
        for check in [is_resident, mincore_resident] {
            assert!(check(&tmp, 0, 4096));
            assert!(check(&tmp, 100, 2 * 4096));
            assert!(!check(&tmp, 0, 4 * 4096));
        }
        match cached_pages(&tmp, 0, 4 * 4096) {
            Ok(n) => assert_eq!(n, 3),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOSYS), "{e}"),
        }
    }

    #[test]
    fn read_at_reads_the_range_and_reports_a_short_file() {
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(b"0123456789").unwrap();
        assert_eq!(&read_at(&tmp, 2, 5).unwrap()[..], b"23456");
        let e = read_at(&tmp, 8, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn enospc_is_no_space() {
        assert!(is_no_space(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_no_space(&io::Error::from_raw_os_error(libc::EIO)));
    }

    #[test]
    fn soft_open_files_limit_ends_at_the_hard_limit() {
        let (from, to) = raise_open_files_limit().unwrap();
        assert!(to >= from);
        let (again_from, again_to) = raise_open_files_limit().unwrap();
        assert_eq!(
            (again_from, again_to),
            (to, to),
            "a second raise changes nothing"
        );
    }
}
