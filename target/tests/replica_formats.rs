//! Replica formats through the service: `Config::format` (`--format`) is
//! the format of new disks, kept in the catalog; the Hello's disk size
//! creates a VMDK replica (rounded up to 512 bytes); a VMDK replica never
//! grows; a forced rebind moves all of a VMDK's files aside.

mod common;

use common::*;
use tidemark_target::catalog::disk_states;
use tidemark_target::replica::ReplicaFormat;
use tidemark_wire::frame::{ErrorCode, Hello, ReplicaState, HELLO_FORCE_RESYNC};

const MIB: u64 = 1 << 20;

fn sized(disk: &str, u: [u8; 16], flags: u32, size: u64) -> Hello {
    Hello {
        disk_size: size,
        ..hello(disk, u, flags)
    }
}

fn read_image(dir: &std::path::Path, disk: &str) -> Vec<u8> {
    let img = tidemark_formats::replica::open_read_only(&dir.join(disk)).unwrap();
    let mut b = vec![0u8; usize::try_from(img.size()).unwrap()];
    img.read_at(&mut b, 0).unwrap();
    b
}

#[tokio::test]
async fn vmdk_replicas_are_created_from_the_hello_size_and_moved_aside_on_rebind() {
    for format in [ReplicaFormat::VmdkFlat, ReplicaFormat::VmdkSparse] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t = Running::start_with(d, |c| c.format = format).await;
        // Without a size there is nothing to create the replica with.
        let (code, why) = refused(t.addr, sized("vm", uuid(1), 0, 0)).await;
        assert_eq!(code, ErrorCode::Internal);
        assert!(why.contains("disk_size 0"), "{why}");

        let size = MIB + 100;
        let (mut c, _, _) = Conn::open(t.addr, sized("vm", uuid(1), 0, size)).await;
        let mut src = Source::new(1);
        let start = src.next_seq;
        let mut recs = vec![
            src.sync(0, pattern(1, 65536), true),
            src.sync(MIB - 4096, pattern(2, 4096), true),
        ];
        recs.push(src.sync_done(start));
        c.ship(&recs).await;
        let w = src.write(MIB + 4, pattern(3, 96));
        let z = src.trim(4096, 8192);
        c.ship(&[w, z]).await;
        c.state_where(|s| s.state == ReplicaState::Consistent).await;
        let dir_files: Vec<String> = std::fs::read_dir(d.join("vm"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(dir_files.contains(&"replica.vmdk".to_string()), "{dir_files:?}");
        assert!(!dir_files.contains(&"replica.raw".to_string()), "{dir_files:?}");
        let got = read_image(d, "vm");
        assert_eq!(got.len() as u64, MIB + 512, "rounded up to a whole sector");
        let mut want = src.disk.clone();
        want.resize(got.len(), 0);
        assert!(got == want, "{format}: the replica holds the stream");
        let st = disk_states(d).unwrap();
        assert_eq!(st[0].format, format);
        assert_eq!(
            serde_json::to_value(&st[0]).unwrap()["format"],
            format.as_str(),
            "status carries the format"
        );

        // A bigger disk cannot be followed by a VMDK replica.
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (code, why) = refused(t.addr, sized("vm", uuid(1), 0, 2 * MIB)).await;
        assert_eq!(code, ErrorCode::Internal);
        assert!(why.contains("does not grow"), "{why}");

        // A forced rebind: the old VMDK (every file of it) is kept as the
        // history of a disk of its own.
        let (c, acked, _) = Conn::open(t.addr, sized("vm", uuid(2), HELLO_FORCE_RESYNC, 2 * MIB)).await;
        assert_eq!(acked, 0);
        drop(c);
        let old = d.join(format!(
            "vm.replaced-{}",
            &tidemark_target::catalog::format_uuid(&uuid(1))[..8]
        ));
        let old_img = tidemark_formats::replica::open_read_only(&old).unwrap();
        assert_eq!(old_img.format(), format);
        let mut b = vec![0u8; 65536];
        old_img.read_at(&mut b, 0).unwrap();
        assert!(
            b[..] == src.disk[..65536],
            "the old replica is intact and opens where it went"
        );
        assert_eq!(
            tidemark_formats::replica::open_read_only(&d.join("vm")).unwrap().size(),
            2 * MIB,
            "a new replica at the new size"
        );
        t.stop().await;
    }
}

#[tokio::test]
async fn a_disks_format_is_fixed_when_first_seen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = Running::start(d).await;
    let (c, _, _) = Conn::open(t.addr, sized("old", uuid(1), 0, MIB)).await;
    drop(c);
    t.stop().await;
    // The default changes; the existing disk stays raw, a new one is sparse.
    let t = Running::start_with(d, |c| c.format = ReplicaFormat::VmdkSparse).await;
    let (c, _, _) = Conn::open(t.addr, sized("old", uuid(1), 0, MIB)).await;
    drop(c);
    let (c, _, _) = Conn::open(t.addr, sized("new", uuid(2), 0, MIB)).await;
    drop(c);
    t.stop().await;
    assert!(d.join("old/replica.raw").exists() && !d.join("old/replica.vmdk").exists());
    assert!(d.join("new/replica.vmdk").exists() && !d.join("new/replica.raw").exists());
    let st = disk_states(d).unwrap();
    let f: Vec<(String, ReplicaFormat)> = st.iter().map(|s| (s.disk_id.clone(), s.format)).collect();
    assert_eq!(
        f,
        vec![
            ("new".into(), ReplicaFormat::VmdkSparse),
            ("old".into(), ReplicaFormat::Raw)
        ]
    );
}
