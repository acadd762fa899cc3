//! The shim's configuration, read once per process from its environment, and the mapped
//! view index.

use core::cell::UnsafeCell;
use core::ffi::{c_char, CStr};
use core::sync::atomic::{AtomicU8, Ordering};

use rustix::fs::{Mode, OFlags, CWD};
use velo_view::View;

/// A path held without allocation, NUL-terminated.
pub struct PathBuf {
    bytes: [u8; velo_view::PATH_MAX + 1],
    len: usize,
}

impl PathBuf {
    pub const fn new() -> PathBuf {
        PathBuf {
            bytes: [0; velo_view::PATH_MAX + 1],
            len: 0,
        }
    }

    /// Sets the content; false if it does not fit.
    pub fn set(&mut self, parts: &[&[u8]]) -> bool {
        let mut len = 0;
        for part in parts {
            let end = len + part.len();
            if end > velo_view::PATH_MAX {
                return false;
            }
            self.bytes[len..end].copy_from_slice(part);
            len = end;
        }
        self.bytes[len] = 0;
        self.len = len;
        true
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    pub fn as_cstr(&self) -> &CStr {
        // The buffer holds a NUL at `len` (set) and no NUL before it (paths from the
        // environment and the index hold none; `set` callers pass no NUL).
        CStr::from_bytes_until_nul(&self.bytes[..=self.len]).unwrap_or(c"")
    }
}

/// `n` in decimal, in `out`'s last bytes.
pub fn decimal(mut n: u32, out: &mut [u8; 10]) -> &[u8] {
    let mut start = out.len();
    loop {
        start -= 1;
        out[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &out[start..]
}

/// What the shim knows about the run.
pub struct Config {
    pub view: View<'static>,
    /// Where the tree appears: absolute, no trailing `/`.
    pub at: PathBuf,
    /// The store's root.
    pub store: PathBuf,
    /// `views/<root>.d`: executable links, and `e`, an empty directory that descriptors
    /// of tree directories really open.
    pub exec_dir: PathBuf,
    pub placeholder: PathBuf,
    /// The tree node the process started in, if any (`VRIFT_CWD`).
    pub start_cwd: Option<u32>,
    /// A hard-link farm of the tree (`VRIFT_FARM`), for what the dynamic loader must
    /// open by a real path whose directory holds the library's neighbours (`dlopen`).
    pub farm: PathBuf,
    /// The tree path of the program, when it runs from a tree file (what
    /// `/proc/self/exe` shows instead of its executable link in the store); empty if not.
    pub self_exe: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub debug: bool,
    /// The upper directory writes go to (`VRIFT_UPPER`, absolute); empty when the run
    /// has none (every change is then refused with `EROFS`).
    pub upper: PathBuf,
    /// One bit per tree directory, shared by every process of the run (`VRIFT_TOUCHED`,
    /// mapped): set before the upper first holds anything directly in that directory,
    /// so lookups elsewhere never ask the upper.
    pub touched: &'static [AtomicU8],
    /// The shim's own environment entries (`KEY=value`), put back into the environment
    /// of a program exec'd without them (`env -i`, an explicit environment).
    pub own_env: [PathBuf; OWN_ENV.len()],
}

/// The variables that carry the shim into exec'd programs.
pub const OWN_ENV: [&[u8]; 10] = [
    b"LD_PRELOAD=",
    b"VRIFT_VIEW=",
    b"VRIFT_AT=",
    b"VRIFT_STORE=",
    b"VRIFT_EXEC_DIR=",
    b"VRIFT_DEBUG=",
    b"VRIFT_FARM=",
    b"VRIFT_UPPER=",
    b"VRIFT_TOUCHED=",
    b"VRIFT_PLACEHOLDER=",
];

struct Global(UnsafeCell<Option<Config>>);

// SAFETY: the cell is written once, by the thread that moves STATE from UNINIT to
// INITIALIZING, before it publishes ACTIVE with Release ordering; readers read it only
// after seeing ACTIVE with Acquire ordering, and never write it.
unsafe impl Sync for Global {}

static CONFIG: Global = Global(UnsafeCell::new(None));
static STATE: AtomicU8 = AtomicU8::new(UNINIT);
const UNINIT: u8 = 0;
const INITIALIZING: u8 = 1;
const ACTIVE: u8 = 2;
const INACTIVE: u8 = 3;

extern "C" {
    static environ: *const *const c_char;
}

/// The configuration, or `None` when the shim is not active in this process (no view
/// given, a broken one, or a call that came while it was being read: such calls pass
/// through to the host untouched).
pub fn get() -> Option<&'static Config> {
    match STATE.load(Ordering::Acquire) {
        ACTIVE => {
            // SAFETY: ACTIVE is published after the cell was written (see `Global`).
            unsafe { (*CONFIG.0.get()).as_ref() }
        }
        UNINIT => {
            if STATE
                .compare_exchange(UNINIT, INITIALIZING, Ordering::Acquire, Ordering::Acquire)
                .is_err()
            {
                return get_after_race();
            }
            let config = load();
            let active = config.is_some();
            // SAFETY: this thread won the race to INITIALIZING; no one reads the cell
            // before ACTIVE is stored below.
            unsafe { *CONFIG.0.get() = config };
            STATE.store(if active { ACTIVE } else { INACTIVE }, Ordering::Release);
            get_after_race()
        }
        _ => None,
    }
}

fn get_after_race() -> Option<&'static Config> {
    if STATE.load(Ordering::Acquire) == ACTIVE {
        // SAFETY: as in `get`.
        unsafe { (*CONFIG.0.get()).as_ref() }
    } else {
        None
    }
}

/// The value of environment variable `name` (given with its `=`).
fn env(name: &[u8]) -> Option<&'static [u8]> {
    // SAFETY: `environ` is libc's NULL-terminated array of NUL-terminated strings; it is
    // read, never kept past this call's use of the strings, which live as long as the
    // process does unless the program changes its environment (then later reads of
    // these values are not made: everything is copied out during `load`).
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return None;
        }
        while !(*p).is_null() {
            let entry = CStr::from_ptr(*p).to_bytes();
            if let Some(value) = entry.strip_prefix(name) {
                return Some(value);
            }
            p = p.add(1);
        }
    }
    None
}

fn load() -> Option<Config> {
    let view_path = env(b"VRIFT_VIEW=")?;
    let mut view_buf = PathBuf::new();
    let mut at = PathBuf::new();
    let mut store = PathBuf::new();
    let mut exec_dir = PathBuf::new();
    let mut placeholder = PathBuf::new();
    let at_value = env(b"VRIFT_AT=").unwrap_or(b"/vrift");
    let at_value = match at_value {
        [rest @ .., b'/'] if !rest.is_empty() => rest,
        other => other,
    };
    if !view_buf.set(&[view_path])
        || !at.set(&[at_value])
        || at_value.first() != Some(&b'/')
        || at_value.len() < 2
        || !store.set(&[env(b"VRIFT_STORE=")?])
        || !exec_dir.set(&[env(b"VRIFT_EXEC_DIR=")?])
        || !match env(b"VRIFT_PLACEHOLDER=") {
            // The run's own empty directory: what a call the shim does not see makes
            // relative to a tree directory lands there, and goes with the run.
            Some(dir) if dir.first() == Some(&b'/') => placeholder.set(&[dir]),
            _ => placeholder.set(&[exec_dir.as_bytes(), b"/e"]),
        }
    {
        return None;
    }
    let debug = env(b"VRIFT_DEBUG=").is_some_and(|v| !v.is_empty() && v != b"0");
    let mut farm = PathBuf::new();
    if let Some(value) = env(b"VRIFT_FARM=") {
        farm.set(&[value]);
    }
    let view = map_view(&view_buf)?;
    let mut upper = PathBuf::new();
    let mut touched: &'static [AtomicU8] = &[];
    if let (Some(dir), Some(bits)) = (env(b"VRIFT_UPPER="), env(b"VRIFT_TOUCHED=")) {
        let dir = match dir {
            [rest @ .., b'/'] if !rest.is_empty() => rest,
            other => other,
        };
        let mut bits_path = PathBuf::new();
        if dir.first() == Some(&b'/') && upper.set(&[dir]) && bits_path.set(&[bits]) {
            match map_touched(&bits_path, view.len()) {
                Some(map) => touched = map,
                // Without the shared map no process could tell the others what it wrote.
                None => {
                    upper.set(&[]);
                }
            }
        }
    }
    let start_cwd = env(b"VRIFT_CWD=").and_then(|rel| {
        let mut scratch = [0u8; velo_view::PATH_MAX];
        match view.resolve(at.as_bytes(), 0, rel, true, &mut scratch) {
            velo_view::Resolved::Node(n) => Some(n),
            _ => None,
        }
    });
    let mut own_env = [const { PathBuf::new() }; OWN_ENV.len()];
    for (slot, key) in own_env.iter_mut().zip(OWN_ENV) {
        if let Some(value) = env(key) {
            slot.set(&[key, value]);
        }
    }
    let mut self_exe = PathBuf::new();
    let mut exe = [0u8; velo_view::PATH_MAX];
    if let Ok(len) = rustix::fs::readlinkat_raw(CWD, c"/proc/self/exe", &mut exe[..]) {
        let link_dir = exec_dir.as_bytes();
        let number = exe[..len]
            .strip_prefix(link_dir)
            .and_then(|rest| rest.strip_prefix(b"/"))
            .and_then(|digits| core::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u32>().ok());
        if let Some(node) = number {
            let mut buf = [0u8; velo_view::PATH_MAX];
            if let Some(len) = view.path_of(at.as_bytes(), node, &mut buf) {
                self_exe.set(&[&buf[..len]]);
            }
        }
    }
    if let Some(list) = env(b"VRIFT_FDS=") {
        crate::fds::adopt(list, view.len());
    }
    Some(Config {
        upper,
        touched,
        self_exe,
        farm,
        own_env,
        view,
        at,
        store,
        exec_dir,
        placeholder,
        start_cwd,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        debug,
    })
}

/// Maps the index read-only for the life of the process.
fn map_view(path: &PathBuf) -> Option<View<'static>> {
    // Non-blocking, and only a regular file: a fifo or device named by VRIFT_VIEW must
    // not hang or feed the program.
    let fd = rustix::fs::openat(
        CWD,
        path.as_cstr(),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return None;
    }
    let len = st.st_size as usize;
    if len == 0 {
        return None;
    }
    // SAFETY: a fresh private read-only mapping of a file velo never changes after
    // publishing it (a new version is a new file renamed over it; this mapping keeps the
    // old inode). It is never unmapped, so the 'static slice stays valid.
    let bytes: &'static [u8] = unsafe {
        let ptr = rustix::mm::mmap(
            core::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::PRIVATE,
            &fd,
            0,
        )
        .ok()?;
        core::slice::from_raw_parts(ptr as *const u8, len)
    };
    View::new(bytes)
}

/// Maps the run's shared bitmap of touched directories read-write, for the life of the
/// process; `None` unless it is a regular file with a bit for each of `nodes`.
fn map_touched(path: &PathBuf, nodes: u32) -> Option<&'static [AtomicU8]> {
    let fd = rustix::fs::openat(
        CWD,
        path.as_cstr(),
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let len = st.st_size as usize;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
        || len < (nodes as usize).div_ceil(8)
        || len == 0
    {
        return None;
    }
    // SAFETY: a shared mapping of a file velo made for this run and never shrinks; it is
    // never unmapped, and it is only ever accessed through atomics (several processes
    // set bits in it at once).
    unsafe {
        let ptr = rustix::mm::mmap(
            core::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &fd,
            0,
        )
        .ok()?;
        Some(core::slice::from_raw_parts(ptr as *const AtomicU8, len))
    }
}

/// Reads the configuration as soon as the library is loaded, so the first intercepted
/// call finds it ready.
extern "C" fn init() {
    let _ = get();
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
