//! Process limits the mirror adjusts for itself at start-up.

use std::io;

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

#[cfg(test)]
mod tests {
    #[test]
    fn soft_open_files_limit_ends_at_the_hard_limit() {
        let (from, to) = super::raise_open_files_limit().unwrap();
        assert!(to >= from);
        let (again_from, again_to) = super::raise_open_files_limit().unwrap();
        assert_eq!(
            (again_from, again_to),
            (to, to),
            "a second raise changes nothing"
        );
    }
}
