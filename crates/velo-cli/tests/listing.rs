//! Listing what a store holds when what it holds is odd (issue 8, items 1 and 4): files
//! dated before 1970, damaged root records. A listing reports and goes on; it never panics.

mod common;

use std::fs;

use common::Env;

#[test]
fn files_dated_before_1970_are_listed_and_shown() {
    let env = Env::new();
    let dir = env.path("old");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    common::touch_ns(&dir.join("f"), -315_619_200, 0);
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "old"]);
    let long = env.ok(&["ls", "-l", "old"]);
    assert!(long.contains("1960-01-01T00:00:00.000000000Z f"), "{long}");
    let shown = env.ok(&["show", "old", "f"]);
    assert!(shown.contains("1960-01-01"), "{shown}");
}

#[test]
fn a_damaged_root_record_is_reported_and_the_others_listed() {
    let env = Env::new();
    let dir = env.path("src");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("f"), b"x").unwrap();
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "good"]);
    env.ok(&["ingest", dir.to_str().unwrap(), "--name", "bad"]);
    let record = env.store.join("refs/roots/bad");
    let text = fs::read_to_string(&record).unwrap();
    let start = text.find("\"root\": \"").unwrap() + 9;
    let end = start + text[start..].find('"').unwrap();
    let damaged = format!("{}abc{}", &text[..start], &text[end..]);
    fs::write(&record, damaged).unwrap();
    let out = env.run(&["roots"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("good"), "{stdout}");
    assert!(stderr.contains("damaged root record"), "{stderr}");
}
