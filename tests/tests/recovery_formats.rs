//! End to end with VMDK replicas: a real agent, collector and target
//! (`tidemark-target --format vmdk-flat`, then `--format vmdk-sparse`).
//! Writes through the shim with flushes and tags; after `tidemark wait` the
//! live replica passes `qemu-img check`, has the right create type, and
//! compares identical to the source; every tagged point served by
//! `tidemark mount` (read with nbdcopy) equals the reference copied at the
//! tag; `tidemark failover --format vmdk-stream` passes check and compare.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tidemark_tests::pipe::*;
use tidemark_tests::recovery::*;
use tidemark_tests::*;

const SIZE: u64 = 64 * MIB;

fn qemu_img(args: &[&str]) -> String {
    stdout(&run_ok(Command::new("qemu-img").args(args), Duration::from_secs(120)))
}

/// `qemu-img check`, `info` (create type) and `compare` against `reference`.
fn check_vmdk(vmdk: &Path, create_type: &str, reference: &Path) {
    let out = qemu_img(&["check", "-U", "-f", "vmdk", s(vmdk)]);
    assert!(out.contains("No errors"), "{}: {out}", vmdk.display());
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "-f", "vmdk", "--output=json", s(vmdk)])).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        create_type,
        "{}: {info}",
        vmdk.display()
    );
    let out = qemu_img(&["compare", "-U", "-f", "vmdk", "-F", "raw", s(vmdk), s(reference)]);
    assert!(out.contains("Images are identical"), "{}: {out}", vmdk.display());
}

fn replicate_in(format: &str, create_type: &str) {
    let dir = tmpdir(&format!("fmt-{format}"));
    let d = dir.path();
    let site = Site::start_with(d, &["--format", format], &[]);
    let id = "vm";
    let a = agent(&site, d, id, SIZE, &[]);
    // Later writes overwrite what the tagged points hold.
    let refs = tagged_workload(&a, d, SIZE, 3, 4);
    site.wait(id, Duration::from_secs(180));

    let data = d.join("data");
    let disk_dir = data.join(id);
    assert!(!disk_dir.join("replica.raw").exists(), "a raw replica beside the VMDK");
    let replica = disk_dir.join("replica.vmdk");
    assert_eq!(
        disk_dir.join("replica-flat.vmdk").exists(),
        format == "vmdk-flat",
        "the flat extent exists exactly for vmdk-flat"
    );
    check_vmdk(&replica, create_type, &a.disk);
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "-f", "vmdk", "--output=json", s(&replica)])).unwrap();
    assert_eq!(info["virtual-size"], SIZE, "{info}");
    assert!(site.target.log_text().contains(&format!("created a {format} replica")));

    let sock = d.join("view.sock");
    for (i, (name, seq, reference)) in refs.iter().enumerate() {
        let m = Mount::start(&["--data", s(&data), id, "--at", &format!("tag:{name}")], &sock);
        assert!(
            m.first_line().contains(&format!("seq {seq}")),
            "{name} opened {:?}",
            m.first_line()
        );
        let copy = d.join(format!("view{i}.raw"));
        m.copy_to(&copy, Duration::from_secs(300));
        m.terminate();
        assert_identical(&copy, reference);
    }

    // Failover (last: it stops applying to the disk) to a stream VMDK.
    let (name, _, reference) = &refs[1];
    let out = d.join("failover.vmdk");
    run_ok(
        tidemark().args([
            "failover",
            "--data",
            s(&data),
            id,
            "--at",
            name,
            "--output",
            s(&out),
            "--format",
            "vmdk-stream",
        ]),
        Duration::from_secs(300),
    );
    check_vmdk(&out, "streamOptimized", reference);
    // The live replica is untouched by the export.
    check_vmdk(&replica, create_type, &a.disk);
    a.stop();
}

#[test]
fn vmdk_flat_replica_points_and_failover() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    replicate_in("vmdk-flat", "monolithicFlat");
}

#[test]
fn vmdk_sparse_replica_points_and_failover() {
    for t in ["qemu-io", "qemu-img", "nbdcopy"] {
        need_tool(t);
    }
    replicate_in("vmdk-sparse", "monolithicSparse");
}
