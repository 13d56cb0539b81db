//! Replica images against a reference model and against QEMU: every live
//! format (raw, vmdk-flat, vmdk-sparse) is written at random, reopened and
//! read back; the files pass `qemu-img check`, `qemu-img info` names the
//! right create type, and `qemu-img compare` finds them identical to a raw
//! reference. Exports (all four formats) likewise. Images written by
//! `qemu-img`/`qemu-io` are read and written here. Damaged VMDKs give
//! errors that name what was wrong.
//!
//! The QEMU parts need `qemu-img` and `qemu-io` (Debian: qemu-utils); they
//! print why and pass when those are missing.

#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::fs;
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;
use tidemark_formats::replica::{self, ExportFormat, ReplicaFormat, ReplicaImage};
use tidemark_formats::ErrorKind;

const LIVE: [ReplicaFormat; 3] = [ReplicaFormat::Raw, ReplicaFormat::VmdkFlat, ReplicaFormat::VmdkSparse];

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64 },
    Flush,
    Reopen,
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(((offset + i) % 251) as u8) | 1)
        .collect()
}

fn apply(img: &mut Box<dyn ReplicaImage>, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write { offset, len, seed } => {
            let d = pattern(seed, offset, len);
            img.write_at(&d, offset).unwrap();
            model[offset as usize..(offset + len) as usize].copy_from_slice(&d);
        }
        Op::Zero { offset, len } => {
            img.zero_range(offset, len).unwrap();
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        Op::Flush => img.flush().unwrap(),
        Op::Reopen => {}
    }
}

fn check_against(img: &dyn ReplicaImage, model: &[u8]) {
    assert_eq!(img.size(), model.len() as u64);
    let mut got = vec![0xeeu8; model.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "image differs from the model at byte {:?}",
        got.iter().zip(model).position(|(a, b)| a != b)
    );
    // Small unaligned reads agree too.
    let mut b = vec![0u8; 777];
    let at = (model.len() / 3) as u64;
    img.read_at(&mut b, at).unwrap();
    assert_eq!(&b[..], &model[at as usize..at as usize + 777]);
    // Extents tile the disk, and "no data" extents read zeros.
    let ext = img.allocated(0, u64::MAX).unwrap();
    let mut pos = 0;
    for &(o, l, data) in &ext {
        assert_eq!(o, pos, "extents {ext:?} do not tile the disk");
        if !data {
            assert!(
                model[o as usize..(o + l) as usize].iter().all(|&x| x == 0),
                "hole {o}+{l} holds data"
            );
        }
        pos += l;
    }
    assert_eq!(pos, model.len() as u64);
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let range = (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(300_000)));
    let op = prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        2 => range.prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ];
    prop::collection::vec(op, 1..24)
}

fn run_model(format: ReplicaFormat, size: u64, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut img = replica::create(dir.path(), format, size).unwrap();
    assert_eq!(img.format(), format);
    for op in ops {
        if let Op::Reopen = op {
            img.flush().unwrap();
            drop(img);
            img = replica::open(dir.path()).unwrap();
        } else {
            apply(&mut img, &mut model, op);
        }
    }
    img.flush().unwrap();
    check_against(img.as_ref(), &model);
    drop(img);
    assert_eq!(replica::detect(dir.path()).unwrap(), format);
    let ro = replica::open_read_only(dir.path()).unwrap();
    check_against(ro.as_ref(), &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn raw_matches_model(ops in ops(1 << 20)) { run_model(ReplicaFormat::Raw, 1 << 20, &ops) }
    #[test]
    fn vmdk_flat_matches_model(ops in ops(1 << 20)) { run_model(ReplicaFormat::VmdkFlat, 1 << 20, &ops) }
    #[test]
    fn vmdk_sparse_matches_model(ops in ops(1 << 20)) { run_model(ReplicaFormat::VmdkSparse, 1 << 20, &ops) }
    // A size that is not a whole number of grains nor of grain tables.
    #[test]
    fn vmdk_sparse_odd_size_matches_model(ops in ops(33 * 1024 * 1024 + 1536)) {
        run_model(ReplicaFormat::VmdkSparse, 33 * 1024 * 1024 + 1536, &ops)
    }
}

// ---- QEMU ----

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("qemu-io")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    // CI installs qemu-utils (.ci/run): a missing qemu is an error, never a skip.
    assert!(
        ok,
        "qemu-img / qemu-io are not installed (Debian: qemu-utils; .ci/run installs them)"
    );
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img check` passes, `info` shows `create_type` (None: raw), and
/// `compare` with the raw reference `reference` says identical.
fn qemu_agrees(image: &Path, create_type: Option<&str>, reference: &Path) {
    let fmt = if create_type.is_some() { "vmdk" } else { "raw" };
    if fmt == "vmdk" {
        run("qemu-img", &["check", "-f", fmt, p(image)]);
    }
    let info = run("qemu-img", &["info", "-f", fmt, "--output=json", p(image)]);
    if let Some(ct) = create_type {
        assert!(info.contains(&format!("\"create-type\": \"{ct}\"")), "{info}");
    }
    let out = run("qemu-img", &["compare", "-f", fmt, "-F", "raw", p(image), p(reference)]);
    assert!(out.contains("Images are identical"), "{out}");
}

fn scripted_ops(size: u64) -> Vec<Op> {
    let mut v = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..60u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % size;
        let len = (x >> 20) % 200_000 % (size - offset) + 1;
        v.push(match i % 7 {
            5 => Op::Zero { offset, len },
            6 => Op::Flush,
            _ => Op::Write {
                offset,
                len,
                seed: i as u8,
            },
        });
    }
    v
}

fn create_type(f: ReplicaFormat) -> Option<&'static str> {
    match f {
        ReplicaFormat::Raw => None,
        ReplicaFormat::VmdkFlat => Some("monolithicFlat"),
        ReplicaFormat::VmdkSparse => Some("monolithicSparse"),
    }
}

#[test]
fn live_formats_pass_qemu_img() {
    if !have_qemu() {
        return;
    }
    let size = 40 << 20; // two grain tables' worth for vmdk-sparse
    for format in LIVE {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; size as usize];
        let mut img = replica::create(dir.path(), format, size).unwrap();
        for op in scripted_ops(size) {
            apply(&mut img, &mut model, &op);
        }
        img.flush().unwrap();
        drop(img);
        let reference = dir.path().join("reference.raw");
        fs::write(&reference, &model).unwrap();
        let file = dir.path().join(if format == ReplicaFormat::Raw {
            replica::RAW_FILE
        } else {
            replica::VMDK_FILE
        });
        qemu_agrees(&file, create_type(format), &reference);
        check_against(replica::open(dir.path()).unwrap().as_ref(), &model);
    }
}

#[test]
fn unflushed_new_grains_leave_a_consistent_sparse_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let mut img = replica::create(dir.path(), ReplicaFormat::VmdkSparse, size).unwrap();
    img.write_at(&[7u8; 4096], 0).unwrap();
    img.flush().unwrap();
    // Written, never flushed: the grain lands at the end of the file, but
    // no table names it until a flush has made it durable.
    img.write_at(&[9u8; 4096], 1 << 20).unwrap();
    drop(img);
    let mut model = vec![0u8; size as usize];
    model[..4096].fill(7);
    let reference = dir.path().join("reference.raw");
    fs::write(&reference, &model).unwrap();
    qemu_agrees(
        &dir.path().join(replica::VMDK_FILE),
        Some("monolithicSparse"),
        &reference,
    );
    // The next allocation skips the leaked grain.
    let mut img = replica::open(dir.path()).unwrap();
    img.write_at(&[5u8; 100], 2 << 20).unwrap();
    img.flush().unwrap();
    model[2 << 20..(2 << 20) + 100].fill(5);
    check_against(img.as_ref(), &model);
}

#[test]
fn exports_pass_qemu_img() {
    if !have_qemu() {
        return;
    }
    // Not a whole number of grains; zeros, data and a long run of zeros.
    let size: u64 = 36 * 1024 * 1024 + 3 * 512;
    let mut model = vec![0u8; size as usize];
    for op in scripted_ops(size) {
        if let Op::Write { offset, len, seed } = op {
            model[offset as usize..(offset + len) as usize].copy_from_slice(&pattern(seed, offset, len));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.raw");
    fs::write(&reference, &model).unwrap();
    let read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        buf.copy_from_slice(&model[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    for (format, name, ct) in [
        (ExportFormat::Raw, "out.raw", None),
        (ExportFormat::VmdkFlat, "out-f.vmdk", Some("monolithicFlat")),
        (ExportFormat::VmdkSparse, "out-s.vmdk", Some("monolithicSparse")),
        (ExportFormat::VmdkStream, "out-o.vmdk", Some("streamOptimized")),
    ] {
        let out = dir.path().join(name);
        let mut calls = 0;
        let mut last = (0, 0);
        replica::export(&read, size, &out, format, &mut |d, t| {
            calls += 1;
            last = (d, t);
        })
        .unwrap();
        assert_eq!(last, (size, size), "{format}");
        assert!(calls >= 36, "{format}: {calls} progress calls");
        assert!(!dir.path().join(format!("{name}.part")).exists());
        qemu_agrees(&out, ct, &reference);
        if format == ExportFormat::VmdkFlat {
            assert!(dir.path().join("out-f-flat.vmdk").exists());
        }
    }
    // The stream is compressed: far smaller than the data it holds.
    let stream = fs::metadata(dir.path().join("out-o.vmdk")).unwrap().len();
    assert!(stream < size / 4, "stream of {stream} bytes");
    // A stream is export-only.
    let e = tidemark_formats::replica::vmdk::open(&dir.path().join("out-o.vmdk"), false)
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::UnsupportedVersion, "{e}");
    assert!(e.to_string().contains("export-only"), "{e}");
}

#[test]
fn images_written_by_qemu_are_read_and_written() {
    if !have_qemu() {
        return;
    }
    for (sub, format) in [
        ("monolithicSparse", ReplicaFormat::VmdkSparse),
        ("monolithicFlat", ReplicaFormat::VmdkFlat),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img_path = dir.path().join(replica::VMDK_FILE);
        let size: u64 = 48 << 20;
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&img_path),
                "48M",
            ],
        );
        let mut model = vec![0u8; size as usize];
        for (pat, off, len) in [
            (0xabu8, 100 * 1024, 200 * 1024),
            (0x5a, 33 << 20, 70_000),
            (0x11, (48 << 20) - 4096, 4096),
        ] {
            run(
                "qemu-io",
                &["-f", "vmdk", "-c", &format!("write -P {pat} {off} {len}"), p(&img_path)],
            );
            model[off..off + len].fill(pat);
        }
        assert_eq!(replica::detect(dir.path()).unwrap(), format, "{sub}");
        let mut img = replica::open(dir.path()).unwrap();
        check_against(img.as_ref(), &model);
        // Now write through Tidemark (overwrite, new grains, zero) and let QEMU judge.
        for op in [
            Op::Write {
                offset: 150 * 1024,
                len: 4096,
                seed: 3,
            },
            Op::Write {
                offset: 20 << 20,
                len: 300_000,
                seed: 4,
            },
            Op::Zero {
                offset: 33 << 20,
                len: 65536,
            },
            Op::Write {
                offset: (48 << 20) - 100,
                len: 100,
                seed: 5,
            },
        ] {
            apply(&mut img, &mut model, &op);
        }
        img.flush().unwrap();
        drop(img);
        let reference = dir.path().join("reference.raw");
        fs::write(&reference, &model).unwrap();
        qemu_agrees(&img_path, Some(sub), &reference);
        // And QEMU reads back what it wrote plus what Tidemark wrote.
        let out = run(
            "qemu-io",
            &["-f", "vmdk", "-c", "read -P 0x11 50327552 3900", p(&img_path)],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
}

// ---- damaged images ----

fn sparse_file() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut img = replica::create(dir.path(), ReplicaFormat::VmdkSparse, 4 << 20).unwrap();
    img.write_at(&[1u8; 8192], 65536).unwrap();
    img.flush().unwrap();
    drop(img);
    let path = dir.path().join(replica::VMDK_FILE);
    let bytes = fs::read(&path).unwrap();
    (dir, path, bytes)
}

fn open_err(dir: &Path) -> tidemark_formats::Error {
    match replica::open(dir) {
        Ok(_) => panic!("a damaged image opened"),
        Err(e) => e,
    }
}

#[test]
fn damaged_sparse_headers_are_named() {
    let (dir, path, good) = sparse_file();
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("bad magic", Box::new(|b| b[0..4].copy_from_slice(b"KDMX")), "bad magic"),
        (
            "absurd grain size",
            Box::new(|b| b[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            "absurd grain size",
        ),
        (
            "grain size not a power of two",
            Box::new(|b| b[20..28].copy_from_slice(&100u64.to_le_bytes())),
            "absurd grain size",
        ),
        (
            "GD past EOF",
            Box::new(|b| b[56..64].copy_from_slice(&(1u64 << 30).to_le_bytes())),
            "grain directory at sector",
        ),
        (
            "version 9",
            Box::new(|b| b[4..8].copy_from_slice(&9u32.to_le_bytes())),
            "version 9",
        ),
        ("newline bytes", Box::new(|b| b[75] = b'\n'), "newline test"),
        (
            "too many GTEs",
            Box::new(|b| b[44..48].copy_from_slice(&100_000u32.to_le_bytes())),
            "entries per grain table",
        ),
        (
            "capacity over 2 TiB",
            Box::new(|b| b[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes())),
            "capacity",
        ),
        (
            "truncated",
            Box::new(|b| b.truncate(300)),
            "shorter than the 512-byte header",
        ),
        (
            "GD entry past EOF",
            Box::new(|b| {
                let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
                b[gd..gd + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
            }),
            "grain directory entry 0 points at sector",
        ),
        (
            "unknown createType",
            Box::new(|b| {
                let at = find(b, b"monolithicSparse");
                b[at..at + 16].copy_from_slice(b"monolithicSpars3");
            }),
            "createType \"monolithicSpars3\" is not supported",
        ),
        (
            "missing extent",
            Box::new(|b| {
                let at = find(b, b"RW ");
                b[at..at + 2].copy_from_slice(b"# ");
            }),
            "no extent line",
        ),
    ];
    for (what, damage, expect) in cases {
        let mut b = good.clone();
        damage(&mut b);
        fs::write(&path, &b).unwrap();
        let e = open_err(dir.path());
        let msg = e.to_string();
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(msg.contains("replica.vmdk"), "{what}: the message names no file: {msg}");
    }
    // A grain table entry pointing past the end is found when it is read.
    let mut b = good.clone();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    b[gt + 4..gt + 8].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    fs::write(&path, &b).unwrap();
    let img = replica::open(dir.path()).unwrap();
    let e = img.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(e.to_string().contains("grain table 0 entry 1 points at sector"), "{e}");
    assert_eq!(e.kind, ErrorKind::Corrupt);
}

type Damage = Box<dyn Fn(&mut Vec<u8>)>;

fn find(h: &[u8], n: &[u8]) -> usize {
    h.windows(n.len()).position(|w| w == n).unwrap()
}

#[test]
fn damaged_flat_descriptors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    drop(replica::create(dir.path(), ReplicaFormat::VmdkFlat, 1 << 20).unwrap());
    let desc = dir.path().join(replica::VMDK_FILE);
    let good = fs::read_to_string(&desc).unwrap();
    for (what, text, expect) in [
        (
            "unknown createType",
            good.replace("monolithicFlat", "fancyNewType"),
            "createType \"fancyNewType\" is not supported",
        ),
        (
            "split disk",
            good.replace("monolithicFlat", "twoGbMaxExtentFlat"),
            "not supported",
        ),
        (
            "missing extent",
            good.replace("RW 2048 FLAT \"replica-flat.vmdk\" 0", ""),
            "no extent line",
        ),
        (
            "no createType",
            good.replace("createType=\"monolithicFlat\"", ""),
            "no createType",
        ),
        (
            "extent elsewhere",
            good.replace("\"replica-flat.vmdk\"", "\"../../etc/passwd\""),
            "not a plain file name",
        ),
        (
            "extent missing",
            good.replace("replica-flat.vmdk", "gone-flat.vmdk"),
            "gone-flat.vmdk",
        ),
        ("extent too long", good.replace("RW 2048", "RW 4096"), "shorter than"),
        ("binary garbage", "\u{1}\u{2}\u{3}\u{4}\u{5}".to_string(), "bad magic"),
        (
            "not a descriptor",
            "hello world\n".to_string(),
            "neither key=value nor an extent",
        ),
    ] {
        fs::write(&desc, &text).unwrap();
        let e = open_err(dir.path());
        let msg = e.to_string();
        assert!(msg.contains(expect), "{what}: {msg}");
    }
    fs::write(&desc, &good).unwrap();
    replica::open(dir.path()).unwrap();
}

#[test]
fn bounds_and_modes() {
    for format in LIVE {
        let dir = tempfile::tempdir().unwrap();
        let mut img = replica::create(dir.path(), format, 1 << 20).unwrap();
        assert_eq!(img.write_at(&[1], 1 << 20).unwrap_err().kind, ErrorKind::OutOfBounds);
        assert_eq!(
            img.zero_range(1 << 19, 1 << 20).unwrap_err().kind,
            ErrorKind::OutOfBounds
        );
        assert_eq!(
            img.read_at(&mut [0; 2], (1 << 20) - 1).unwrap_err().kind,
            ErrorKind::OutOfBounds
        );
        assert_eq!(img.write_at(&[1], u64::MAX).unwrap_err().kind, ErrorKind::OutOfBounds);
        img.write_at(&[1; 10], 0).unwrap();
        img.flush().unwrap();
        drop(img);
        // create refuses to overwrite a replica.
        assert!(replica::create(dir.path(), format, 1 << 20).is_err());
        let mut ro = replica::open_read_only(dir.path()).unwrap();
        assert!(ro.write_at(&[2], 0).is_err(), "{format}");
        assert!(ro.zero_range(0, 1).is_err(), "{format}");
        let mut b = [0u8; 11];
        ro.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
    }
    let dir = tempfile::tempdir().unwrap();
    let e = replica::create(dir.path(), ReplicaFormat::VmdkSparse, 1000)
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::OutOfBounds);
    let e = replica::open(dir.path()).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Io);
    assert_eq!(
        "vmdk-sparse".parse::<ReplicaFormat>().unwrap(),
        ReplicaFormat::VmdkSparse
    );
    assert_eq!("vmdk-stream".parse::<ExportFormat>().unwrap(), ExportFormat::VmdkStream);
    assert!("vmdk-stream".parse::<ReplicaFormat>().is_err());
}
