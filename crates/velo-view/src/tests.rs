use super::*;
use proptest::prelude::*;

fn file(name: &str) -> NodeSpec {
    NodeSpec {
        kind: Kind::File,
        name: name.as_bytes().to_vec(),
        mode: 0o644,
        mtime_ns: 7,
        size: 3,
        hash: [1; 32],
        target: Vec::new(),
        flags: 0,
    }
}

fn dir(name: &str) -> NodeSpec {
    NodeSpec {
        kind: Kind::Dir,
        mode: 0o755,
        size: 0,
        ..file(name)
    }
}

fn link(name: &str, target: &str) -> NodeSpec {
    NodeSpec {
        kind: Kind::Symlink,
        target: target.as_bytes().to_vec(),
        mode: 0o777,
        ..file(name)
    }
}

/// `/vrift`: a, d/{abs, b, l, loop, out, up}, e/
fn sample() -> Vec<u8> {
    let mut w = IndexWriter::new(0o755, 1);
    let first = w.add_children(0, &[file("a"), dir("d"), dir("e")]).unwrap();
    w.add_children(
        first + 1,
        &[
            link("abs", "/vrift/d/b"),
            file("b"),
            link("l", "../a"),
            link("loop", "loop"),
            link("out", "/etc/passwd"),
            link("up", ".."),
        ],
    )
    .unwrap();
    w.add_children(first + 2, &[]).unwrap();
    w.finish([9; 32], 42, VIEW_HAS_LIBRARIES)
}

fn resolve(view: &View<'_>, path: &str, follow: bool) -> (Resolved, String) {
    let mut scratch = [0u8; PATH_MAX];
    let r = view.resolve(b"/vrift", 0, path.as_bytes(), follow, &mut scratch);
    let outside = match r {
        Resolved::Outside(n) => String::from_utf8_lossy(&scratch[..n]).into_owned(),
        _ => String::new(),
    };
    (r, outside)
}

fn name_of(view: &View<'_>, r: Resolved) -> String {
    match r {
        Resolved::Node(i) => {
            let node = view.node(i).unwrap();
            String::from_utf8_lossy(view.name(&node).unwrap()).into_owned()
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn paths_resolve_through_the_tree_and_its_symlinks() {
    let bytes = sample();
    let view = View::new(&bytes).unwrap();
    assert_eq!(view.root_hash(), [9; 32]);
    assert_eq!(view.device(), 42);
    assert_eq!(view.view_flags(), VIEW_HAS_LIBRARIES);
    for (path, follow, want) in [
        ("/vrift", true, ""),
        ("/vrift/", true, ""),
        ("/vrift/a", true, "a"),
        ("/vrift//d/./b", true, "b"),
        ("/vrift/d/../a", true, "a"),
        ("/vrift/d/l", true, "a"),
        ("/vrift/d/l", false, "l"),
        ("/vrift/d/abs", true, "b"),
        ("/vrift/d/up/a", true, "a"),
        ("/vrift/d/up/", false, ""),
        ("d/b", true, "b"),
        ("/vrift/e", true, "e"),
    ] {
        let (r, _) = resolve(&view, path, follow);
        assert_eq!(name_of(&view, r), want, "{path}");
    }
    let node = view.node(match resolve(&view, "/vrift/d/b", true).0 {
        Resolved::Node(i) => i,
        other => panic!("{other:?}"),
    });
    let node = node.unwrap();
    assert_eq!(
        (node.kind, node.mode, node.mtime_ns, node.size),
        (Kind::File, 0o644, 7, 3)
    );
}

#[test]
fn paths_that_leave_the_tree_give_the_host_path() {
    let bytes = sample();
    let view = View::new(&bytes).unwrap();
    assert_eq!(
        resolve(&view, "/vrift/../etc/passwd", true),
        (Resolved::Outside(11), "/etc/passwd".to_string())
    );
    assert_eq!(
        resolve(&view, "/vrift/d/out", true),
        (Resolved::Outside(11), "/etc/passwd".to_string())
    );
    assert_eq!(
        resolve(&view, "/vrift/d/out", false).0,
        Resolved::Node(view.child(&view.node(2).unwrap(), b"out").unwrap().unwrap())
    );
    assert_eq!(
        resolve(&view, "/vrift/..", true),
        (Resolved::Outside(1), "/".to_string())
    );
    assert_eq!(
        resolve(&view, "/vriftx/a", true),
        (Resolved::Outside(9), "/vriftx/a".to_string())
    );
}

#[test]
fn errors_are_the_kernel_s() {
    let bytes = sample();
    let view = View::new(&bytes).unwrap();
    assert_eq!(
        resolve(&view, "/vrift/nope", true).0,
        Resolved::Missing {
            parent: 0,
            last: true
        }
    );
    assert_eq!(
        resolve(&view, "/vrift/nope/x", true).0,
        Resolved::Missing {
            parent: 0,
            last: false
        }
    );
    assert_eq!(resolve(&view, "/vrift/a/x", true).0, Resolved::NotDir);
    assert_eq!(resolve(&view, "/vrift/a/", true).0, Resolved::NotDir);
    assert_eq!(resolve(&view, "/vrift/d/loop", true).0, Resolved::Loop);
    assert_eq!(
        name_of(&view, resolve(&view, "/vrift/d/loop", false).0),
        "loop"
    );
    let long = format!("/vrift/{}", "a/".repeat(3000));
    assert_eq!(resolve(&view, &long, true).0, Resolved::TooLong);
}

proptest! {
    /// Whatever the bytes, reading them never panics.
    #[test]
    fn a_damaged_index_gives_errors_not_panics(
        flips in proptest::collection::vec((0usize..2048, any::<u8>()), 0..64),
        path in "(/vrift)?(/[a-z.]{0,3}){0,6}/?",
        cut in 0usize..4096,
    ) {
        let mut bytes = sample();
        for (at, b) in flips {
            if at < bytes.len() {
                bytes[at] = b;
            }
        }
        bytes.truncate(cut.max(8));
        if let Some(view) = View::new(&bytes) {
            let mut scratch = [0u8; PATH_MAX];
            let _ = view.resolve(b"/vrift", 0, path.as_bytes(), true, &mut scratch);
            for i in 0..view.len().min(64) {
                if let Ok(node) = view.node(i) {
                    let _ = view.name(&node);
                    let _ = view.target(&node);
                    let _ = view.child(&node, b"a");
                }
            }
        }
    }
}

#[test]
fn a_node_s_path_is_its_names_under_at() {
    let bytes = sample();
    let view = View::new(&bytes).unwrap();
    let mut scratch = [0u8; PATH_MAX];
    let Resolved::Node(b) = view.resolve(b"/vrift", 0, b"/vrift/d/b", true, &mut scratch) else {
        panic!("d/b")
    };
    let mut out = [0u8; PATH_MAX];
    let len = view.path_of(b"/vrift", b, &mut out).unwrap();
    assert_eq!(&out[..len], b"/vrift/d/b");
    let len = view.path_of(b"/vrift", 0, &mut out).unwrap();
    assert_eq!(&out[..len], b"/vrift");
}

#[test]
fn shebang_lines_split_as_the_kernel_splits_them() {
    assert_eq!(shebang(b"#!/bin/sh\necho"), Some((&b"/bin/sh"[..], None)));
    assert_eq!(
        shebang(b"#! /usr/bin/env  python3 -u \r\n"),
        Some((&b"/usr/bin/env"[..], Some(&b"python3 -u"[..])))
    );
    assert_eq!(shebang(b"#!\n"), None);
    assert_eq!(
        shebang(b"#!/bin/sh"),
        None,
        "no end of line in the head read"
    );
    assert_eq!(shebang(b"\x7fELF"), None);
}

/// An upper layer held in a map (rel path → entry), touching every directory that holds
/// something.
struct MapLayer {
    entries: std::collections::HashMap<&'static str, (UpperEntry, &'static str)>,
    touch_all: bool,
}

impl Layer for MapLayer {
    fn touched(&self, _dir: u32) -> bool {
        self.touch_all
    }
    fn entry(&self, rel: &[u8], target: &mut [u8; PATH_MAX]) -> UpperEntry {
        match self.entries.get(std::str::from_utf8(rel).unwrap()) {
            Some((UpperEntry::Symlink(_), t)) => {
                target[..t.len()].copy_from_slice(t.as_bytes());
                UpperEntry::Symlink(t.len())
            }
            Some((e, _)) => *e,
            None => UpperEntry::Absent,
        }
    }
}

fn layered(view: &View<'_>, layer: &MapLayer, path: &str, follow: bool) -> (Layered, String) {
    let (mut scratch, mut rel, mut len) = ([0u8; PATH_MAX], [0u8; PATH_MAX], 0);
    let r = view.resolve_layered(
        b"/vrift",
        0,
        path.as_bytes(),
        follow,
        layer,
        &mut scratch,
        &mut rel,
        &mut len,
    );
    let text = match r {
        Layered::Outside(n) => String::from_utf8_lossy(&scratch[..n]).into_owned(),
        _ => String::from_utf8_lossy(&rel[..len]).into_owned(),
    };
    (r, text)
}

#[test]
fn the_upper_hides_deletes_and_adds_to_the_tree() {
    let bytes = sample();
    let view = View::new(&bytes).unwrap();
    let layer = MapLayer {
        entries: [
            ("a", (UpperEntry::Whiteout, "")),
            ("d", (UpperEntry::Dir { opaque: false }, "")),
            ("d/b", (UpperEntry::File, "")),
            ("d/new", (UpperEntry::Dir { opaque: false }, "")),
            ("d/new/f", (UpperEntry::File, "")),
            ("d/sl", (UpperEntry::Symlink(0), "../e")),
            ("e", (UpperEntry::Dir { opaque: true }, "")),
        ]
        .into_iter()
        .collect(),
        touch_all: true,
    };
    let d = match view.resolve(b"/vrift", 0, b"/vrift/d", true, &mut [0; PATH_MAX]) {
        Resolved::Node(n) => n,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        layered(&view, &layer, "/vrift/a", true),
        (
            Layered::Missing {
                parent: Some(0),
                last: true
            },
            "a".into()
        ),
        "a whiteout deletes"
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d", true),
        (Layered::Tree(d), "d".into()),
        "a directory in both is merged"
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/b", true),
        (Layered::Upper, "d/b".into()),
        "the upper's file hides the tree's"
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/new/f", true),
        (Layered::Upper, "d/new/f".into())
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/new/f/", true).0,
        Layered::NotDir
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/new/nothing/x", true),
        (
            Layered::Missing {
                parent: None,
                last: false
            },
            "d/new/nothing".into()
        )
    );
    // An upper symlink is followed like a tree one, and `..` from an upper-only
    // directory finds the tree again.
    assert_eq!(
        layered(&view, &layer, "/vrift/d/sl", true),
        (Layered::Upper, "e".into()),
        "the opaque e is the upper's"
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/sl", false),
        (Layered::Upper, "d/sl".into())
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/new/../l", true),
        (
            Layered::Missing {
                parent: Some(0),
                last: true
            },
            "a".into()
        ),
        "the tree's symlink d/l -> ../a leads to the deleted a"
    );
    assert_eq!(
        layered(&view, &layer, "/vrift/d/new/../../e/..", true),
        (Layered::Tree(0), "".into())
    );
    // From a start directory, the path the upper is asked about is spelled out whole.
    let from_d = |path: &str| {
        let (mut scratch, mut rel, mut len) = ([0u8; PATH_MAX], [0u8; PATH_MAX], 0);
        let r = view.resolve_layered(
            b"/vrift",
            d,
            path.as_bytes(),
            true,
            &layer,
            &mut scratch,
            &mut rel,
            &mut len,
        );
        (r, String::from_utf8_lossy(&rel[..len]).into_owned())
    };
    assert_eq!(from_d("new/f"), (Layered::Upper, "d/new/f".into()));
    assert_eq!(
        from_d("../a"),
        (
            Layered::Missing {
                parent: Some(0),
                last: true
            },
            "a".into()
        )
    );
    assert_eq!(
        from_d("../e/x").0,
        Layered::Missing {
            parent: None,
            last: true
        }
    );
    assert_eq!(from_d("../e/x").1, "e/x");
    assert_eq!(from_d("..").0, Layered::Tree(0));
    // Untouched directories are never asked about.
    let untouched = MapLayer {
        entries: layer.entries.clone(),
        touch_all: false,
    };
    assert_eq!(
        layered(&view, &untouched, "/vrift/a", true).0,
        Layered::Tree(1)
    );
    assert_eq!(
        layered(&view, &untouched, "/vrift/../etc", true),
        (Layered::Outside(4), "/etc".into())
    );
}

proptest! {
    /// With nothing in the upper, the layered walk is the tree's own resolution.
    #[test]
    fn an_empty_upper_changes_nothing(path in "(/vrift)?(/(a|d|e|b|l|abs|up|out|loop|\\.|\\.\\.|x)){0,6}/?", follow: bool) {
        let bytes = sample();
        let view = View::new(&bytes).unwrap();
        let empty = MapLayer { entries: Default::default(), touch_all: true };
        let (mut scratch, mut rel, mut len) = ([0u8; PATH_MAX], [0u8; PATH_MAX], 0);
        let plain = view.resolve(b"/vrift", 0, path.as_bytes(), follow, &mut scratch);
        let through = view.resolve_layered(b"/vrift", 0, path.as_bytes(), follow, &empty, &mut scratch, &mut rel, &mut len);
        let same = match (plain, through) {
            (Resolved::Node(a), Layered::Tree(b)) => a == b,
            (Resolved::Missing { parent, last }, Layered::Missing { parent: p, last: l }) => Some(parent) == p && last == l,
            (Resolved::NotDir, Layered::NotDir) | (Resolved::Loop, Layered::Loop) | (Resolved::TooLong, Layered::TooLong) => true,
            (Resolved::Outside(a), Layered::Outside(b)) => a == b,
            _ => false,
        };
        prop_assert!(same, "{path}: {plain:?} vs {through:?}");
    }
}
