-- tidemark catalog schema, user_version 8

-- index drills_by_disk
CREATE INDEX drills_by_disk ON drills (disk_id, id);

-- index points_tag
CREATE UNIQUE INDEX points_tag ON points (disk_id, tag) WHERE tag IS NOT NULL;

-- index undo_by_end
CREATE INDEX undo_by_end ON undo (disk_id, end_block);

-- index undo_by_segment
CREATE INDEX undo_by_segment ON undo (disk_id, segment);

-- table disks
CREATE TABLE disks (
        disk_id        TEXT PRIMARY KEY NOT NULL,
        disk_uuid      TEXT NOT NULL,
        applied_seq    INTEGER NOT NULL DEFAULT 0 CHECK (applied_seq >= 0),
        sync_state     TEXT NOT NULL DEFAULT 'awaiting-full-sync'
                       CHECK (sync_state IN ('awaiting-full-sync', 'consistent')),
        first_seq      INTEGER,
        full_sync_seen INTEGER NOT NULL DEFAULT 0,
        halted_seq     INTEGER,
        replaced_uuid  TEXT,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL
    , sync_from INTEGER, undo_captured_seq INTEGER NOT NULL DEFAULT 0, retention_window_s INTEGER NOT NULL DEFAULT 86400, retention_max_bytes INTEGER, on_full TEXT NOT NULL DEFAULT 'prune', point_interval_ms INTEGER NOT NULL DEFAULT 1000, failed_over INTEGER NOT NULL DEFAULT 0, format TEXT NOT NULL DEFAULT 'raw'
        CHECK (format IN ('raw', 'vmdk-flat', 'vmdk-sparse')), applied_time_ns INTEGER NOT NULL DEFAULT 0, generations BLOB, reprotect_source_seq INTEGER, reprotect_tracked_after INTEGER NOT NULL DEFAULT 0, reprotect_discard_divergent INTEGER NOT NULL DEFAULT 0) STRICT;

-- table drills
CREATE TABLE drills (
        id            INTEGER PRIMARY KEY,
        disk_id       TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        point_time_ns INTEGER NOT NULL,
        started_ns    INTEGER NOT NULL,
        duration_ms   INTEGER NOT NULL,
        result        TEXT NOT NULL CHECK (result IN ('passed', 'failed', 'skipped', 'error')),
        summary       TEXT NOT NULL,
        output        TEXT NOT NULL,
        trigger       TEXT NOT NULL,
        found         TEXT NOT NULL DEFAULT '[]'
    ) STRICT;

-- table failovers
CREATE TABLE failovers (
        disk_id    TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        at_ns      INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        point_time_ns INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        tag        TEXT,
        output     TEXT NOT NULL
    , generation TEXT) STRICT;

-- table halts
CREATE TABLE halts (
        disk_id       TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        kind          TEXT NOT NULL,
        offset        INTEGER NOT NULL,
        length        INTEGER NOT NULL,
        pending       TEXT NOT NULL,
        pending_bytes INTEGER NOT NULL,
        covered       INTEGER NOT NULL DEFAULT 0,
        covered_seq   INTEGER,
        reason        TEXT NOT NULL,
        detected_at   INTEGER NOT NULL,
        covered_at    INTEGER,
        PRIMARY KEY (disk_id, seq)
    ) STRICT;

-- table points
CREATE TABLE points (
        disk_id TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        time_ns INTEGER NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('crash', 'app', 'tag')),
        tag     TEXT,
        PRIMARY KEY (disk_id, seq)
    ) STRICT;

-- table reprotect_owed
CREATE TABLE reprotect_owed (
        disk_id TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        offset  INTEGER NOT NULL,
        length  INTEGER NOT NULL
    ) STRICT;

-- table undo
CREATE TABLE undo (
        disk_id     TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        capture_seq INTEGER NOT NULL,
        start_block INTEGER NOT NULL,
        end_block   INTEGER NOT NULL,
        segment     INTEGER NOT NULL,
        seg_offset  INTEGER NOT NULL,
        zero        INTEGER NOT NULL,
        PRIMARY KEY (disk_id, capture_seq, start_block)
    ) STRICT;

-- table undo_segments
CREATE TABLE undo_segments (
        disk_id   TEXT NOT NULL REFERENCES disks(disk_id) ON DELETE CASCADE,
        segment   INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq  INTEGER NOT NULL,
        bytes     INTEGER NOT NULL,
        PRIMARY KEY (disk_id, segment)
    ) STRICT;
