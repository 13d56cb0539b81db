//! The catalog's schema is pinned per version: the SQL of every table and
//! index after all migrations must equal `golden/schema-v<N>.sql` for the
//! current version N. A changed schema without a new migration (a version
//! bump) fails here, and so does an edited old migration: tools of one
//! version read catalogs written by another, so the schema of a version
//! never changes once released.
//!
//! After adding a migration, write the new version's file with
//! `TIDEMARK_BLESS=1 cargo test -p tidemark-catalog --test schema`; the
//! files of older versions are never rewritten.

use std::path::PathBuf;

use rusqlite::Connection;
use tidemark_catalog::{Catalog, CATALOG_FILE, MIGRATIONS};

fn schema_text(conn: &Connection) -> String {
    let mut st = conn
        .prepare("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok(format!(
                "-- {} {}\n{};\n",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
}

#[test]
fn schema_matches_the_golden_file_of_its_version() {
    let d = tempfile::tempdir().unwrap();
    drop(Catalog::open(d.path()).unwrap());
    let conn = Connection::open(d.path().join(CATALOG_FILE)).unwrap();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(usize::try_from(version).unwrap(), MIGRATIONS.len());
    let got = format!(
        "-- tidemark catalog schema, user_version {version}\n\n{}",
        schema_text(&conn)
    );
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/schema-v{version}.sql"));
    match std::fs::read_to_string(&golden) {
        Ok(want) => assert!(
            want == got,
            "the catalog schema of version {version} changed (see {}):\n{got}\nA schema change needs a new migration (a version bump); released versions never change.",
            golden.display()
        ),
        Err(_) if std::env::var_os("TIDEMARK_BLESS").is_some() => std::fs::write(&golden, got).unwrap(),
        Err(e) => panic!(
            "no golden schema for version {version} ({}: {e}); after adding a migration, write it with TIDEMARK_BLESS=1",
            golden.display()
        ),
    }
}

#[test]
fn every_migration_step_leaves_a_readable_catalog() {
    // Each prefix of MIGRATIONS applies cleanly on its own (no migration
    // depends on a later one), and opening such a catalog migrates it to
    // the same schema as a new one.
    let fresh = tempfile::tempdir().unwrap();
    drop(Catalog::open(fresh.path()).unwrap());
    let want = schema_text(&Connection::open(fresh.path().join(CATALOG_FILE)).unwrap());
    for n in 0..MIGRATIONS.len() {
        let d = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(d.path().join(CATALOG_FILE)).unwrap();
            for (i, m) in MIGRATIONS[..n].iter().enumerate() {
                conn.execute_batch(m).unwrap();
                conn.pragma_update(None, "user_version", i + 1).unwrap();
            }
        }
        drop(Catalog::open(d.path()).unwrap());
        let got = schema_text(&Connection::open(d.path().join(CATALOG_FILE)).unwrap());
        assert_eq!(got, want, "a catalog at version {n} migrates to the current schema");
    }
}
