//! Races of the per-file store step, replayed exactly through the `content::race` hooks
//! (a churn test from outside cannot hit windows one system call wide).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use velo_core::EntryKind;
use velo_store::Store;

use crate::content::race::{self, Point};
use crate::{ingest, IngestOptions, Progress};

/// Under CI a missing capability fails the test; elsewhere it is a skip that says so and
/// is listed by scripts/test.sh.
fn require(capability: bool, what: &str) -> bool {
    if capability {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}, which this CI machine lacks: install it or run as root");
    }
    eprintln!("skipping: this test needs {what}");
    if let Some(log) = std::env::var_os("VELO_SKIPPED_LOG") {
        use std::io::Write as _;
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(file, "{test}: needs {what}");
        }
    }
    false
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

struct XfsLoop(PathBuf);

impl XfsLoop {
    fn new(image: &Path, point: &Path) -> Option<XfsLoop> {
        if !require(
            rustix::process::geteuid().is_root(),
            "root (for a loop mount)",
        ) {
            return None;
        }
        let Some(mkfs) = tool("mkfs.xfs") else {
            require(false, "mkfs.xfs (scripts/test.sh installs xfsprogs)");
            return None;
        };
        std::fs::File::create(image)
            .and_then(|f| f.set_len(512 << 20))
            .expect("create the image");
        let made = Command::new(mkfs).args(["-q", "-f"]).arg(image).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfs.xfs failed");
        std::fs::create_dir_all(point).expect("create the mount point");
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(point)
            .status()
            .is_ok_and(|s| s.success());
        if !require(mounted, "loop mounts (mount -o loop failed)") {
            return None;
        }
        Some(XfsLoop(point.to_path_buf()))
    }
}

impl Drop for XfsLoop {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(&self.0).status();
        if !done.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// What the interleaving saw; one lock, one condvar.
#[derive(Default)]
struct Steps {
    first_staged: bool,
    second_staged: bool,
}

/// On xfs (reflinks, workers insert in parallel): file `a` is hashed, then rewritten in
/// place before its clone, so the clone holds other bytes than the hash names; file `b`,
/// with `a`'s old content, is hashed meanwhile and finds `a`'s blob staged. The code this
/// replaces staged the clone and then discarded it; `b`'s entry named a blob that was never
/// published (fsck: missing-blob). Every blob the root names must be in the store with
/// the bytes its name says.
#[test]
fn a_duplicate_that_finds_a_blob_staged_can_rely_on_it_when_the_first_source_changed() {
    if !require(
        std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
        "two CPUs (the two files must be stored by two workers at once)",
    ) {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let Some(mount) = XfsLoop::new(&temp.path().join("xfs.img"), &temp.path().join("mnt")) else {
        return;
    };
    let src = mount.0.join("src");
    std::fs::create_dir(&src).unwrap();
    let old: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("a"), &old).unwrap();
    std::fs::write(src.join("b"), &old).unwrap();
    // Only files whose ctime is two seconds older than the walk are cloned.
    std::thread::sleep(Duration::from_millis(2500));
    let store = Store::open_or_create(mount.0.join("store")).unwrap();

    let steps = Arc::new((Mutex::new(Steps::default()), Condvar::new()));
    let wait_until = |steps: &(Mutex<Steps>, Condvar), done: fn(&Steps) -> bool| {
        let (lock, wake) = steps;
        let guard = lock.lock().unwrap();
        let (_guard, timeout) = wake
            .wait_timeout_while(guard, Duration::from_secs(20), |s| !done(s))
            .unwrap();
        !timeout.timed_out()
    };
    let a_path = src.join("a");
    let hook_steps = Arc::clone(&steps);
    let rewritten = Arc::new(Mutex::new(false));
    let hook_rewritten = Arc::clone(&rewritten);
    *race::HOOK.lock().unwrap() = Some(Arc::new(move |point: Point, rel: &[u8]| {
        let (lock, wake) = &*hook_steps;
        match (point, rel) {
            (Point::Hashed, b"a") => {
                // Once, same size, new bytes: the clone will copy these.
                let mut rewritten = hook_rewritten.lock().unwrap();
                if !*rewritten {
                    let new: Vec<u8> = old.iter().map(|b| b.wrapping_add(1)).collect();
                    std::fs::write(&a_path, new).unwrap();
                    *rewritten = true;
                }
            }
            (Point::Hashed, b"b") => {
                wait_until(&hook_steps, |s| s.first_staged);
            }
            (Point::Staged, b"a") => {
                lock.lock().unwrap().first_staged = true;
                wake.notify_all();
                wait_until(&hook_steps, |s| s.second_staged);
            }
            (Point::Staged, b"b") => {
                lock.lock().unwrap().second_staged = true;
                wake.notify_all();
            }
            _ => {}
        }
    }));
    let report = ingest(
        &store,
        &src,
        &IngestOptions::default(),
        &Progress::default(),
    );
    *race::HOOK.lock().unwrap() = None;
    let report = report.expect("ingest");

    assert!(
        *rewritten.lock().unwrap(),
        "the hook never saw file a hashed"
    );
    let seen = steps.0.lock().unwrap();
    assert!(
        seen.first_staged && seen.second_staged,
        "the two files were not stored in the order the test needs"
    );
    assert!(report.reflinked, "xfs should have cloned file a");
    let tree = store.get_tree(&report.root).unwrap();
    for entry in tree.entries() {
        let EntryKind::File { hash, .. } = &entry.kind else {
            continue;
        };
        let name = String::from_utf8_lossy(entry.name.as_bytes()).into_owned();
        let bytes = std::fs::read(store.blob_path(hash)).unwrap_or_else(|e| {
            panic!(
                "{name}: its blob {hash} is not in the store ({e}): the root names a missing blob"
            )
        });
        assert_eq!(
            velo_core::Hash::from(blake3::hash(&bytes)),
            *hash,
            "{name}: its blob holds other bytes than its name says"
        );
    }
}
