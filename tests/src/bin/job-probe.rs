//! A native program the job tests run inside the sandbox: each mode tries one thing a hostile or
//! busy job would do and prints what happened, one line, so a test can assert on it.
//!
//! `job-probe MODE [ARG]`; exit code 0 means the attempt was refused as it should be (or, for
//! `threads` and `balloon`, never returns on its own).

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let arg = args.get(2).cloned().unwrap_or_default();
    let result = match mode {
        "ptrace" => ptrace(arg.parse().unwrap_or(1)),
        "tiocsti" => tiocsti(),
        "mknod" => mknod(),
        "mount" => mount(),
        "fds" => fds(),
        "connect" => connect(&arg),
        "read" => read(&arg),
        "threads" => threads(arg.parse().unwrap_or(8)),
        "balloon" => balloon(),
        "caps" => caps(),
        other => Err(format!("unknown mode {other:?}")),
    };
    match result {
        Ok(line) => println!("refused: {line}"),
        Err(line) => {
            println!("ALLOWED: {line}");
            std::process::exit(1);
        }
    }
}

type Probe = Result<String, String>;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn ptrace(pid: i32) -> Probe {
    #[allow(unsafe_code)]
    // SAFETY: PTRACE_ATTACH takes no pointers; a refusal is the expected outcome.
    let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    if rc == 0 { Err(format!("attached to pid {pid}")) } else { Ok(format!("ptrace {pid}: {}", errno())) }
}

/// The terminal ioctl that pushes a byte into the input queue (asm-generic/ioctls.h).
const TIOCSTI: u64 = 0x5412;

fn tiocsti() -> Probe {
    let tty = fs::OpenOptions::new().read(true).write(true).open("/dev/tty");
    let mut seen = Vec::new();
    if let Err(error) = &tty {
        seen.push(format!("/dev/tty: {error}"));
    }
    let byte: u8 = b'x';
    // The plain request, and the same with high bits set that the kernel also takes as TIOCSTI.
    for request in [TIOCSTI, TIOCSTI | (1 << 32)] {
        for fd in [0, 1, 2] {
            #[allow(unsafe_code)]
            // SAFETY: TIOCSTI reads one byte from the pointer, which points at a live u8.
            let rc = unsafe { libc::ioctl(fd, request as _, &byte as *const u8) };
            if rc == 0 {
                return Err(format!("TIOCSTI {request:#x} on fd {fd} pushed a byte"));
            }
            seen.push(format!("fd {fd} {request:#x}: {}", errno()));
        }
    }
    Ok(seen.join("; "))
}

fn mknod() -> Probe {
    let path = std::ffi::CString::new("/work/mem").unwrap_or_default();
    #[allow(unsafe_code)]
    // SAFETY: the path is a valid NUL-terminated string.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 1)) };
    if rc == 0 { Err("created /dev/mem's twin".into()) } else { Ok(format!("mknod: {}", errno())) }
}

fn mount() -> Probe {
    let _ = fs::create_dir_all("/work/mnt");
    let (source, target, fstype) = (c"none", c"/work/mnt", c"tmpfs");
    #[allow(unsafe_code)]
    // SAFETY: all strings are valid and NUL-terminated; data is null.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Err("mounted a tmpfs".into()) } else { Ok(format!("mount: {}", errno())) }
}

fn fds() -> Probe {
    let mut fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    // The listing itself holds one descriptor, the highest.
    fds.pop();
    if fds == [0, 1, 2] { Ok("only 0, 1, 2".into()) } else { Err(format!("descriptors {fds:?}")) }
}

fn connect(address: &str) -> Probe {
    let address: SocketAddr = address.parse().map_err(|e| format!("bad address: {e}"))?;
    match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
        Ok(_) => Err(format!("connected to {address}")),
        Err(error) => Ok(format!("connect {address}: {error}")),
    }
}

fn read(path: &str) -> Probe {
    match fs::read(path) {
        Ok(bytes) if bytes.is_empty() => Ok(format!("{path}: empty")),
        Ok(bytes) => Err(format!("read {} bytes of {path}", bytes.len())),
        Err(error) => Ok(format!("{path}: {error}")),
    }
}

fn caps() -> Probe {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("?").to_owned()
    };
    let (eff, bnd, nnp, seccomp) =
        (field("CapEff:"), field("CapBnd:"), field("NoNewPrivs:"), field("Seccomp:"));
    let summary = format!("CapEff {eff} CapBnd {bnd} NoNewPrivs {nnp} Seccomp {seccomp}");
    let none = "0000000000000000";
    if eff == none && bnd == none && nnp == "1" && seccomp == "2" { Ok(summary) } else { Err(summary) }
}

/// Starts `n` busy threads; each keeps writing its own progress counter to `/out/t<i>`.
fn threads(n: usize) -> Probe {
    let workers: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let mut count: u64 = 0;
                loop {
                    let until = std::time::Instant::now() + Duration::from_millis(5);
                    while std::time::Instant::now() < until {
                        std::hint::black_box(count.wrapping_mul(31));
                    }
                    count += 1;
                    if let Ok(mut file) = fs::File::create(format!("/out/t{i}.tmp")) {
                        let _ = write!(file, "{count}");
                        let _ = fs::rename(format!("/out/t{i}.tmp"), format!("/out/t{i}"));
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    Err("the threads ended".into())
}

/// Touches memory a mebibyte at a time, forever.
fn balloon() -> Probe {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        kept.push(vec![1u8; 1 << 20]);
        if kept.len().is_multiple_of(64) {
            println!("holding {} MiB", kept.len());
        }
    }
}
