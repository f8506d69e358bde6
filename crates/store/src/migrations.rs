//! Versioned schema migrations, applied in order at start-up and by `rtpay migrate`. A migration
//! is never edited once released: add a new one.

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Refuses a database whose schema is newer than `known` (written by a later rtpay): this binary
/// would write it in a form the later one does not expect (after SQLite's migration 9, transfers
/// no listing shows).
pub fn refuse_newer(newest: Option<u32>, known: &[Migration]) -> crate::Result<()> {
    let ours = known.last().map_or(0, |m| m.version);
    match newest {
        Some(v) if v > ours => Err(crate::StoreError::Unavailable(format!(
            "the database has schema version {v}, newer than this rtpay knows ({ours}): run the rtpay that wrote it"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a database at another schema version than `known`'s last: newer (as
/// [`refuse_newer`]), or older, not yet migrated (a command that reads or writes beside the
/// servers, which migrate at start, would meet columns that are not there yet).
pub fn refuse_other(newest: Option<u32>, known: &[Migration]) -> crate::Result<()> {
    refuse_newer(newest, known)?;
    let ours = known.last().map_or(0, |m| m.version);
    match newest.unwrap_or(0) {
        v if v < ours => Err(crate::StoreError::Unavailable(format!(
            "the database has schema version {v}, older than this rtpay's ({ours}): run `rtpay migrate` first"
        ))),
        _ => Ok(()),
    }
}

pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger, tenants and api keys",
        sql: r#"
CREATE TABLE ledger_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_timestamp INTEGER NOT NULL
);
INSERT INTO ledger_meta (id, last_timestamp) VALUES (1, 0);
CREATE TABLE tenants (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE api_keys (
    id BLOB PRIMARY KEY,
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    secret_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) WITHOUT ROWID;
-- `no` is an internal account number: small integer keys keep the listing indexes compact.
CREATE TABLE accounts (
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    no INTEGER NOT NULL UNIQUE,
    currency TEXT NOT NULL,
    code INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    credit_limit INTEGER NOT NULL,
    metadata TEXT,
    timestamp INTEGER NOT NULL UNIQUE,
    debits_posted INTEGER NOT NULL,
    credits_posted INTEGER NOT NULL,
    debits_pending INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
-- The engine timestamp is unique and increasing, so it is the rowid: inserts append. (Version 1
-- looked ids up through a 64-bit hash of (tenant_id, id); version 2 replaced it.)
CREATE TABLE transfers (
    timestamp INTEGER PRIMARY KEY,
    id_hash INTEGER NOT NULL,
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    result INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    debit_no INTEGER,
    credit_no INTEGER,
    debit_account_id BLOB,
    credit_account_id BLOB,
    amount INTEGER,
    currency TEXT,
    pending_id BLOB,
    amount_defaulted INTEGER NOT NULL,
    timeout_seconds INTEGER NOT NULL,
    expires_at INTEGER,
    code INTEGER NOT NULL,
    metadata TEXT,
    state INTEGER NOT NULL
);
CREATE INDEX transfers_by_id_hash ON transfers (id_hash);
CREATE INDEX transfers_by_debit ON transfers (debit_no, timestamp) WHERE result = 0;
CREATE INDEX transfers_by_credit ON transfers (credit_no, timestamp) WHERE result = 0;
CREATE INDEX transfers_due ON transfers (expires_at) WHERE state = 1;
"#,
    },
    Migration {
        version: 2,
        name: "transfers indexed by id itself",
        sql: r#"
-- Look-ups by id go through an index on the 16-byte id, in id order, instead of a 64-bit hash:
-- time-ordered ids (UUIDv7, ULIDs, counters) then append at the index's right edge instead of
-- dirtying a random page each, and no run of ids can collide on one key. Two tenants may use the
-- same id; the look-up compares tenant_id as well.
DROP INDEX transfers_by_id_hash;
ALTER TABLE transfers DROP COLUMN id_hash;
CREATE INDEX transfers_by_id ON transfers (id);
"#,
    },
    Migration {
        version: 3,
        name: "audit log",
        sql: r#"
-- The audit log: entries numbered from 1, the completed perfect subtrees of their RFC 6962 Merkle
-- tree (level >= 1; level 0 is the entry's leaf_hash), the signed tree heads, and the tree's right
-- edge (size and peaks) next to the ledger clock, updated in the same transactions. Subtrees are
-- keyed by the last leaf they cover, so the ones a batch completes are neighbours in the index
-- (keyed by level first, each level would dirty its own page every batch).
CREATE TABLE audit_entries (
    seq INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    tenant_id BLOB,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    outcome TEXT NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE INDEX audit_entries_by_tenant ON audit_entries (tenant_id, seq) WHERE tenant_id IS NOT NULL;
CREATE TABLE audit_nodes (
    last_leaf INTEGER NOT NULL,
    level INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (last_leaf, level)
) WITHOUT ROWID;
CREATE TABLE audit_heads (
    size INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    root BLOB NOT NULL,
    signature BLOB NOT NULL
);
ALTER TABLE ledger_meta ADD COLUMN audit_frontier BLOB;
"#,
    },
    Migration {
        version: 4,
        name: "vault: data keys and account holders",
        sql: r#"
-- One data-encryption key per tenant, stored wrapped by a KEK (which never is stored here).
CREATE TABLE data_keys (
    tenant_id BLOB PRIMARY KEY,
    kek_version INTEGER NOT NULL,
    wrapped BLOB NOT NULL
) WITHOUT ROWID;
-- Names and documents only sealed; the document's blind index finds a holder by document.
CREATE TABLE holders (
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    kind TEXT NOT NULL,
    name_sealed BLOB NOT NULL,
    document_sealed BLOB NOT NULL,
    document_index BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, document_index)
) WITHOUT ROWID;
"#,
    },
    Migration {
        version: 5,
        name: "oauth clients",
        sql: r#"
CREATE TABLE oauth_clients (
    id BLOB PRIMARY KEY,
    tenant_id BLOB NOT NULL REFERENCES tenants (id),
    secret_hash BLOB NOT NULL,
    scopes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) WITHOUT ROWID;
"#,
    },
    Migration {
        version: 6,
        name: "account holders on accounts, scoped api keys",
        sql: r#"
-- The holder an account belongs to (checked by the server against `holders` of the same tenant).
ALTER TABLE accounts ADD COLUMN holder_id BLOB;
-- NULL: every scope (keys made before scopes existed, and keys made without a list).
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
"#,
    },
    Migration {
        version: 7,
        name: "cards: products, cards, authorizations, answered messages",
        sql: r#"
CREATE TABLE card_products (
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    bin TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
-- The number only sealed (in `body`); found by its blind index.
CREATE TABLE cards (
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    pan_index BLOB NOT NULL UNIQUE,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
CREATE TABLE card_authorizations (
    tenant_id BLOB NOT NULL,
    id BLOB NOT NULL,
    card_id BLOB NOT NULL,
    rrn TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    spend INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
CREATE INDEX card_authorizations_by_card ON card_authorizations (card_id, created_at);
CREATE INDEX card_authorizations_by_rrn ON card_authorizations (card_id, rrn);
-- What each card spent per UTC day (by the day of the authorization), kept with every change to
-- an authorization: limits read at most a month of rows, however busy the card.
CREATE TABLE card_spend (
    card_id BLOB NOT NULL,
    day INTEGER NOT NULL,
    spend INTEGER NOT NULL,
    PRIMARY KEY (card_id, day)
) WITHOUT ROWID;
-- Each network message answered once: a repeat gets the same answer (sealed, without the card number).
CREATE TABLE card_messages (
    key BLOB PRIMARY KEY,
    response BLOB NOT NULL
) WITHOUT ROWID;
"#,
    },
    Migration {
        version: 8,
        name: "documents (Pix keys, payments, charges...) and counters",
        sql: r#"
CREATE TABLE documents (
    kind TEXT NOT NULL,
    tenant_id BLOB NOT NULL,
    id TEXT NOT NULL,
    lookup TEXT,
    owner TEXT,
    created_at INTEGER NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, tenant_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX documents_by_lookup ON documents (kind, lookup);
CREATE INDEX documents_by_owner ON documents (kind, owner);
CREATE INDEX documents_by_time ON documents (kind, tenant_id, created_at, id);
-- Running totals per scope and period (what a Pix payer spent per day and per night).
CREATE TABLE counters (
    scope TEXT NOT NULL,
    period INTEGER NOT NULL,
    total INTEGER NOT NULL,
    PRIMARY KEY (scope, period)
) WITHOUT ROWID;
"#,
    },
    Migration {
        version: 9,
        name: "per-account transfer chains instead of listing indexes",
        sql: r#"
-- Each account's transfers are listed by following a chain, newest first: the account's `head` is
-- its newest listed transfer's timestamp, and each listed transfer holds, for its debit and its
-- credit account, the timestamp of that account's previous one. The two listing indexes this
-- replaces took an entry per transfer each, and the credit index dirtied one page per credited
-- account per batch: more than half the writer's pages.
ALTER TABLE transfers ADD COLUMN debit_prev INTEGER;
ALTER TABLE transfers ADD COLUMN credit_prev INTEGER;
ALTER TABLE accounts ADD COLUMN head INTEGER;
-- Links for the transfers already stored, found through the indexes before they go. Timestamps
-- start at 1, so 0 stands for none.
UPDATE transfers SET
    debit_prev = nullif(max(
        coalesce((SELECT max(p.timestamp) FROM transfers p WHERE p.debit_no = transfers.debit_no AND p.result = 0 AND p.timestamp < transfers.timestamp), 0),
        coalesce((SELECT max(p.timestamp) FROM transfers p WHERE p.credit_no = transfers.debit_no AND p.result = 0 AND p.timestamp < transfers.timestamp), 0)), 0),
    credit_prev = nullif(max(
        coalesce((SELECT max(p.timestamp) FROM transfers p WHERE p.debit_no = transfers.credit_no AND p.result = 0 AND p.timestamp < transfers.timestamp), 0),
        coalesce((SELECT max(p.timestamp) FROM transfers p WHERE p.credit_no = transfers.credit_no AND p.result = 0 AND p.timestamp < transfers.timestamp), 0)), 0)
WHERE result = 0;
UPDATE accounts SET head = nullif(max(
    coalesce((SELECT max(timestamp) FROM transfers WHERE debit_no = accounts.no AND result = 0), 0),
    coalesce((SELECT max(timestamp) FROM transfers WHERE credit_no = accounts.no AND result = 0), 0)), 0);
DROP INDEX transfers_by_debit;
DROP INDEX transfers_by_credit;
"#,
    },
    Migration {
        version: 10,
        name: "documents in a rowid table, lookup and owner indexes partial",
        sql: r#"
-- A WITHOUT ROWID table keeps whole rows in its interior pages as well as its leaves, and a
-- document (a Pix payment, a received Pix, a charge: JSON of half a kilobyte and more) is far
-- past the twentieth of a page where SQLite advises against one: few rows per interior page,
-- deep trees, a split for every few inserts. As a rowid table the bodies sit in leaves appended
-- in insertion order, and the id becomes a small unique index. Documents without a lookup (a
-- received Pix) or an owner take no entry in those indexes.
CREATE TABLE documents_v10 (
    kind TEXT NOT NULL,
    tenant_id BLOB NOT NULL,
    id TEXT NOT NULL,
    lookup TEXT,
    owner TEXT,
    created_at INTEGER NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
INSERT INTO documents_v10 (kind, tenant_id, id, lookup, owner, created_at, version, body)
    SELECT kind, tenant_id, id, lookup, owner, created_at, version, body FROM documents
    ORDER BY created_at, kind, tenant_id, id;
DROP TABLE documents;
ALTER TABLE documents_v10 RENAME TO documents;
CREATE UNIQUE INDEX documents_by_id ON documents (kind, tenant_id, id);
CREATE UNIQUE INDEX documents_by_lookup ON documents (kind, lookup) WHERE lookup IS NOT NULL;
CREATE INDEX documents_by_owner ON documents (kind, owner) WHERE owner IS NOT NULL;
CREATE INDEX documents_by_time ON documents (kind, tenant_id, created_at, id);
"#,
    },
    Migration {
        version: 11,
        name: "owner index in listing order",
        sql: r#"
-- An owner's documents are listed oldest first, a page at a time (a Pix key's account, the
-- in-flight payments the sweep settles): ordered by the index, not by sorting all of them first.
DROP INDEX documents_by_owner;
CREATE INDEX documents_by_owner ON documents (kind, owner, created_at, id) WHERE owner IS NOT NULL;
"#,
    },
    Migration {
        version: 12,
        name: "owner index ties broken by tenant",
        sql: r#"
-- The sweeps read an owner's documents a page at a time, each after the last one read: two
-- tenants' documents under one id made at the same time are told apart by the tenant, in the
-- index's order as well.
DROP INDEX documents_by_owner;
CREATE INDEX documents_by_owner ON documents (kind, owner, created_at, id, tenant_id) WHERE owner IS NOT NULL;
"#,
    },
    Migration {
        version: 13,
        name: "Pix spending counters per tenant",
        sql: r#"
-- A Pix payer's spending totals are named by its tenant and its holder (`pix-day:<tenant>:<holder>`,
-- `pix-night:...`): named by the holder alone, two tenants' holders under one id (holder ids are
-- the tenants' to choose) shared their totals, and one tenant's customer spent another's limit.
-- Each total is copied to every tenant holding a holder under its id, so what was spent under
-- the shared name still counts against each of them (the upgrade loosens no limit); then the
-- old names go.
INSERT INTO counters (scope, period, total)
SELECT substr(c.scope, 1, instr(c.scope, ':')) || h.tenant || ':' || h.holder, c.period, c.total
FROM counters c
JOIN (
    SELECT lower(substr(hex(tenant_id), 1, 8) || '-' || substr(hex(tenant_id), 9, 4) || '-' ||
                 substr(hex(tenant_id), 13, 4) || '-' || substr(hex(tenant_id), 17, 4) || '-' ||
                 substr(hex(tenant_id), 21, 12)) AS tenant,
           lower(substr(hex(id), 1, 8) || '-' || substr(hex(id), 9, 4) || '-' || substr(hex(id), 13, 4) || '-' ||
                 substr(hex(id), 17, 4) || '-' || substr(hex(id), 21, 12)) AS holder
    FROM holders
) h ON h.holder = substr(c.scope, instr(c.scope, ':') + 1)
WHERE (c.scope GLOB 'pix-day:*' OR c.scope GLOB 'pix-night:*') AND length(c.scope) - instr(c.scope, ':') = 36
ON CONFLICT (scope, period) DO UPDATE SET total = total + excluded.total;
DELETE FROM counters
WHERE (scope GLOB 'pix-day:*' OR scope GLOB 'pix-night:*') AND length(scope) - instr(scope, ':') = 36;
"#,
    },
    Migration {
        version: 14,
        name: "card authorizations: when a standing hold lapses",
        sql: r#"
-- When the hold of an approved authorization lapses (nanoseconds; 0: it holds nothing): from
-- then on its spend no longer counts against the card's limits. The index holds only
-- authorizations with a hold, by when it lapses. Those stored before this version take it from
-- their hold's transfer (`hold_id` in the record; a credit holds nothing), found by its id.
ALTER TABLE card_authorizations ADD COLUMN held_until INTEGER NOT NULL DEFAULT 0;
UPDATE card_authorizations SET held_until = coalesce((
    SELECT t.expires_at FROM transfers t
    WHERE t.id = unhex(replace(json_extract(card_authorizations.body, '$.hold_id'), '-', ''))
      AND t.tenant_id = card_authorizations.tenant_id AND t.expires_at > 0), 0)
WHERE json_extract(body, '$.status') = 'approved' AND coalesce(json_extract(body, '$.credit'), 0) = 0
  AND json_extract(body, '$.hold_id') IS NOT NULL;
CREATE INDEX card_authorizations_lapsing ON card_authorizations (card_id, held_until) WHERE held_until > 0;
"#,
    },
];

pub const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger, tenants and api keys",
        sql: r#"
CREATE TABLE ledger_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_timestamp BIGINT NOT NULL
);
INSERT INTO ledger_meta (id, last_timestamp) VALUES (1, 0);
CREATE TABLE tenants (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE api_keys (
    id UUID PRIMARY KEY,
    tenant_id UUID NOT NULL REFERENCES tenants (id),
    secret_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE TABLE accounts (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    currency TEXT NOT NULL,
    code INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    credit_limit BIGINT NOT NULL,
    metadata TEXT,
    timestamp BIGINT NOT NULL UNIQUE,
    debits_posted BIGINT NOT NULL CHECK (debits_posted >= 0),
    credits_posted BIGINT NOT NULL CHECK (credits_posted >= 0),
    debits_pending BIGINT NOT NULL CHECK (debits_pending >= 0),
    credits_pending BIGINT NOT NULL CHECK (credits_pending >= 0),
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE transfers (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    timestamp BIGINT NOT NULL UNIQUE,
    result SMALLINT NOT NULL,
    kind SMALLINT NOT NULL,
    debit_account_id UUID,
    credit_account_id UUID,
    amount BIGINT,
    currency TEXT,
    pending_id UUID,
    amount_defaulted BOOLEAN NOT NULL,
    timeout_seconds BIGINT NOT NULL,
    expires_at BIGINT,
    code INTEGER NOT NULL,
    metadata TEXT,
    state SMALLINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX transfers_by_debit ON transfers (tenant_id, debit_account_id, timestamp) WHERE result = 0;
CREATE INDEX transfers_by_credit ON transfers (tenant_id, credit_account_id, timestamp) WHERE result = 0;
CREATE INDEX transfers_due ON transfers (expires_at) WHERE state = 1;
"#,
    },
    Migration {
        version: 2,
        name: "audit log",
        sql: r#"
CREATE TABLE audit_entries (
    seq BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    tenant_id UUID,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    request_id TEXT NOT NULL,
    source TEXT NOT NULL,
    outcome TEXT NOT NULL,
    leaf_hash BYTEA NOT NULL
);
CREATE INDEX audit_entries_by_tenant ON audit_entries (tenant_id, seq) WHERE tenant_id IS NOT NULL;
CREATE TABLE audit_nodes (
    last_leaf BIGINT NOT NULL,
    level SMALLINT NOT NULL,
    hash BYTEA NOT NULL,
    PRIMARY KEY (last_leaf, level)
);
CREATE TABLE audit_heads (
    size BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    root BYTEA NOT NULL,
    signature BYTEA NOT NULL
);
ALTER TABLE ledger_meta ADD COLUMN audit_frontier BYTEA;
"#,
    },
    Migration {
        version: 3,
        name: "vault: data keys and account holders",
        sql: r#"
CREATE TABLE data_keys (
    tenant_id UUID PRIMARY KEY,
    kek_version INTEGER NOT NULL,
    wrapped BYTEA NOT NULL
);
CREATE TABLE holders (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    kind TEXT NOT NULL,
    name_sealed BYTEA NOT NULL,
    document_sealed BYTEA NOT NULL,
    document_index BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, document_index)
);
"#,
    },
    Migration {
        version: 4,
        name: "oauth clients",
        sql: r#"
CREATE TABLE oauth_clients (
    id UUID PRIMARY KEY,
    tenant_id UUID NOT NULL REFERENCES tenants (id),
    secret_hash BYTEA NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
"#,
    },
    Migration {
        version: 5,
        name: "account holders on accounts, scoped api keys",
        sql: r#"
ALTER TABLE accounts ADD COLUMN holder_id UUID;
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
"#,
    },
    Migration {
        version: 6,
        name: "cards: products, cards, authorizations, answered messages",
        sql: r#"
CREATE TABLE card_products (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    bin TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE cards (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    pan_index BYTEA NOT NULL UNIQUE,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE card_authorizations (
    tenant_id UUID NOT NULL,
    id UUID NOT NULL,
    card_id UUID NOT NULL,
    rrn TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    spend BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX card_authorizations_by_card ON card_authorizations (card_id, created_at);
CREATE INDEX card_authorizations_by_rrn ON card_authorizations (card_id, rrn);
CREATE TABLE card_spend (
    card_id UUID NOT NULL,
    day BIGINT NOT NULL,
    spend BIGINT NOT NULL,
    PRIMARY KEY (card_id, day)
);
CREATE TABLE card_messages (
    key BYTEA PRIMARY KEY,
    response BYTEA NOT NULL
);
"#,
    },
    Migration {
        version: 7,
        name: "documents (Pix keys, payments, charges...) and counters",
        sql: r#"
CREATE TABLE documents (
    kind TEXT NOT NULL,
    tenant_id UUID NOT NULL,
    -- Byte order, as SQLite compares: listings order ties by id the same on both engines.
    id TEXT COLLATE "C" NOT NULL,
    lookup TEXT,
    owner TEXT,
    created_at BIGINT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, tenant_id, id)
);
CREATE UNIQUE INDEX documents_by_lookup ON documents (kind, lookup);
CREATE INDEX documents_by_owner ON documents (kind, owner);
CREATE INDEX documents_by_time ON documents (kind, tenant_id, created_at, id);
-- Running totals per scope and period (what a Pix payer spent per day and per night).
CREATE TABLE counters (
    scope TEXT NOT NULL,
    period BIGINT NOT NULL,
    total BIGINT NOT NULL,
    PRIMARY KEY (scope, period)
);
"#,
    },
    Migration {
        version: 8,
        name: "owner index in listing order",
        sql: r#"
-- As SQLite's version 11: an owner's documents listed a page at a time in index order; and, as
-- there, partial: a document without an owner (a received Pix) takes no entry.
DROP INDEX documents_by_owner;
CREATE INDEX documents_by_owner ON documents (kind, owner, created_at, id) WHERE owner IS NOT NULL;
"#,
    },
    Migration {
        version: 9,
        name: "a count of the writers' commits",
        sql: r#"
-- Every writer's commit adds one, under the batch lock. A writer keeps the accounts it last wrote
-- between batches while the count is the one its own commit left: another node's commit, whatever
-- it changed, moves it. (The ledger clock could not tell: a sweep that only expires holds takes
-- no timestamp, and another node's cache then wrote the released holds back.) Adding a column
-- with a constant default rewrites nothing.
ALTER TABLE ledger_meta ADD COLUMN commits BIGINT NOT NULL DEFAULT 0;
"#,
    },
    Migration {
        version: 10,
        name: "owner index ties broken by tenant",
        sql: r#"
-- As SQLite's version 12: pages of an owner's documents, each after the last one read, in the
-- index's order down to the tenant.
DROP INDEX documents_by_owner;
CREATE INDEX documents_by_owner ON documents (kind, owner, created_at, id, tenant_id) WHERE owner IS NOT NULL;
"#,
    },
    Migration {
        version: 11,
        name: "Pix spending counters per tenant",
        sql: r#"
-- As SQLite's version 13: a Pix payer's totals named by its tenant and holder, each old total
-- copied to every tenant holding a holder under its id, then the old names dropped.
INSERT INTO counters (scope, period, total)
SELECT split_part(c.scope, ':', 1) || ':' || h.tenant_id::text || ':' || h.id::text, c.period, c.total
FROM counters c
JOIN holders h ON h.id::text = split_part(c.scope, ':', 2)
WHERE split_part(c.scope, ':', 1) IN ('pix-day', 'pix-night') AND split_part(c.scope, ':', 3) = ''
ON CONFLICT (scope, period) DO UPDATE SET total = counters.total + excluded.total;
DELETE FROM counters WHERE split_part(scope, ':', 1) IN ('pix-day', 'pix-night') AND split_part(scope, ':', 3) = '';
"#,
    },
    Migration {
        version: 12,
        name: "card authorizations: when a standing hold lapses",
        sql: r#"
-- As SQLite's version 14.
ALTER TABLE card_authorizations ADD COLUMN held_until BIGINT NOT NULL DEFAULT 0;
UPDATE card_authorizations a SET held_until = t.expires_at
FROM transfers t
WHERE a.body::jsonb ->> 'status' = 'approved' AND NOT coalesce((a.body::jsonb ->> 'credit')::boolean, false)
  AND t.tenant_id = a.tenant_id AND t.id = (a.body::jsonb ->> 'hold_id')::uuid AND t.expires_at > 0;
CREATE INDEX card_authorizations_lapsing ON card_authorizations (card_id, held_until) WHERE held_until > 0;
"#,
    },
];

#[cfg(test)]
mod tests {
    #[test]
    fn a_newer_schema_is_refused() {
        assert!(super::refuse_newer(None, super::SQLITE).is_ok());
        assert!(super::refuse_newer(Some(super::SQLITE.len() as u32), super::SQLITE).is_ok());
        let newer = super::refuse_newer(Some(super::SQLITE.len() as u32 + 1), super::SQLITE).unwrap_err();
        assert!(newer.to_string().contains("newer than this rtpay knows"), "{newer}");
        let older = super::refuse_other(Some(super::SQLITE.len() as u32 - 1), super::SQLITE).unwrap_err();
        assert!(older.to_string().contains("run `rtpay migrate` first"), "{older}");
        assert!(super::refuse_other(None, super::SQLITE).is_err(), "no schema at all");
        assert!(super::refuse_other(Some(super::SQLITE.len() as u32 + 1), super::SQLITE).is_err());
        assert!(super::refuse_other(Some(super::SQLITE.len() as u32), super::SQLITE).is_ok());
    }

    #[test]
    fn versions_increase_by_one_from_one() {
        for list in [super::SQLITE, super::POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version as usize, i + 1, "{}", m.name);
            }
        }
    }
}
