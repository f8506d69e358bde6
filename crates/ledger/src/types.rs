//! The ledger's nouns: ids, accounts, transfer events (what a client asks for) and transfers (what
//! the ledger recorded).

use crate::Currency;

/// Nanoseconds since the UNIX epoch, assigned by the engine: unique and strictly increasing.
pub type Timestamp = u64;

/// The largest amount, and the largest value of any balance field: 2^63 − 1 minor units. It keeps
/// every stored number a signed 64-bit integer in both SQLite and PostgreSQL.
pub const AMOUNT_MAX: u64 = i64::MAX as u64;

/// The most events one batch may carry (one request of the batch API, or one group commit).
pub const BATCH_LEN_MAX: usize = 8190;

/// The longest pending timeout: about 68 years, so that `timestamp + timeout` never overflows.
pub const TIMEOUT_SECONDS_MAX: u32 = u32::MAX / 2;

/// The longest metadata document, as canonical JSON text.
pub const METADATA_LEN_MAX: usize = 4096;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub struct $name(pub u128);
    };
}

id_type!(
    /// A tenant: every account and transfer belongs to exactly one.
    TenantId
);
id_type!(
    /// An account id, unique within its tenant.
    AccountId
);
id_type!(
    /// A transfer id, unique within its tenant; it is also the idempotency key.
    TransferId
);

/// An account's identity: ids are scoped by tenant, so another tenant's id is simply not found.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct AccountKey {
    pub tenant: TenantId,
    pub id: AccountId,
}

/// A transfer's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TransferKey {
    pub tenant: TenantId,
    pub id: TransferId,
}

/// Account flags, a bit set.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct AccountFlags(pub u16);

impl AccountFlags {
    /// Debits (posted + pending) may not exceed posted credits plus the credit limit: a customer's
    /// balance that must not go below zero.
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: u16 = 1 << 0;
    /// Credits (posted + pending) may not exceed posted debits plus the credit limit.
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: u16 = 1 << 1;
    /// No new transfer may touch the account; holds already placed may still be posted or voided.
    pub const CLOSED: u16 = 1 << 2;
    const ALL: u16 = (1 << 3) - 1;

    pub fn contains(self, flag: u16) -> bool {
        self.0 & flag == flag
    }
    pub fn debits_must_not_exceed_credits(self) -> bool {
        self.contains(Self::DEBITS_MUST_NOT_EXCEED_CREDITS)
    }
    pub fn credits_must_not_exceed_debits(self) -> bool {
        self.contains(Self::CREDITS_MUST_NOT_EXCEED_DEBITS)
    }
    pub fn closed(self) -> bool {
        self.contains(Self::CLOSED)
    }
    pub fn is_known(self) -> bool {
        self.0 & !Self::ALL == 0
    }
}

/// What a client asks for when opening an account.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct NewAccount {
    pub key: AccountKey,
    pub currency: Currency,
    /// Chart-of-accounts category, chosen by the tenant.
    pub code: u16,
    pub flags: AccountFlags,
    /// How far the flagged side may go past the other (an overdraft); 0 unless a flag is set.
    pub credit_limit: u64,
    /// Canonical JSON text, at most [`METADATA_LEN_MAX`] bytes; opaque to the ledger.
    pub metadata: Option<String>,
    /// Who owns the account (a holder id); opaque to the ledger, which only keeps and compares it.
    pub holder: Option<u128>,
}

/// An account as the ledger holds it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Account {
    pub key: AccountKey,
    pub currency: Currency,
    pub code: u16,
    pub flags: AccountFlags,
    pub credit_limit: u64,
    pub metadata: Option<String>,
    pub holder: Option<u128>,
    pub timestamp: Timestamp,
    pub debits_posted: u64,
    pub credits_posted: u64,
    pub debits_pending: u64,
    pub credits_pending: u64,
}

impl Account {
    /// What can be spent now. For a `debits_must_not_exceed_credits` account (a customer's money):
    /// posted credits + credit limit − posted debits − pending debits. For a
    /// `credits_must_not_exceed_debits` account the mirror image. For an unconstrained account,
    /// the net credit balance less holds, which may be negative.
    pub fn available(&self) -> i128 {
        let (dp, cp, dh, ch) = (
            i128::from(self.debits_posted),
            i128::from(self.credits_posted),
            i128::from(self.debits_pending),
            i128::from(self.credits_pending),
        );
        let limit = i128::from(self.credit_limit);
        if self.flags.credits_must_not_exceed_debits() {
            dp + limit - cp - ch
        } else if self.flags.debits_must_not_exceed_credits() {
            cp + limit - dp - dh
        } else {
            cp - dp - dh
        }
    }

    /// Whether the identity-defining fields equal a creation request (balances excluded). An
    /// account closed since its creation still matches the request that created it open; one
    /// open does not match a request to create it closed.
    pub fn matches(&self, new: &NewAccount) -> bool {
        let closed_since = self.flags.closed() && !new.flags.closed();
        let compared = if closed_since { !AccountFlags::CLOSED } else { u16::MAX };
        self.currency == new.currency
            && self.code == new.code
            && self.flags.0 & compared == new.flags.0 & compared
            && self.credit_limit == new.credit_limit
            && self.metadata == new.metadata
            && self.holder == new.holder
    }
}

/// What a client asks the ledger to do with money.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TransferEvent {
    pub key: TransferKey,
    pub kind: EventKind,
    pub code: u16,
    /// Canonical JSON text, at most [`METADATA_LEN_MAX`] bytes.
    pub metadata: Option<String>,
    /// Links this event to the next one in the batch: the chain applies all or nothing.
    pub linked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventKind {
    /// Moves `amount` from `debit` to `credit` now.
    Posted { debit: AccountId, credit: AccountId, amount: u64 },
    /// Holds `amount`; it is posted, voided, or expires after `timeout_seconds` (0 = never).
    Pending { debit: AccountId, credit: AccountId, amount: u64, timeout_seconds: u32 },
    /// Posts a pending transfer, in full (`None`) or in part.
    PostPending { pending_id: TransferId, amount: Option<u64> },
    /// Releases a pending transfer.
    VoidPending { pending_id: TransferId },
}

/// The kind of a recorded transfer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TransferKind {
    Posted = 0,
    Pending = 1,
    PostPending = 2,
    VoidPending = 3,
}

impl TransferKind {
    pub fn from_u8(v: u8) -> Option<TransferKind> {
        Some(match v {
            0 => TransferKind::Posted,
            1 => TransferKind::Pending,
            2 => TransferKind::PostPending,
            3 => TransferKind::VoidPending,
            _ => return None,
        })
    }
}

/// Where a pending transfer stands. Other kinds are always `Final`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PendingState {
    Final = 0,
    Pending = 1,
    Posted = 2,
    Voided = 3,
    Expired = 4,
}

impl PendingState {
    pub fn from_u8(v: u8) -> Option<PendingState> {
        Some(match v {
            0 => PendingState::Final,
            1 => PendingState::Pending,
            2 => PendingState::Posted,
            3 => PendingState::Voided,
            4 => PendingState::Expired,
            _ => return None,
        })
    }
}

/// A transfer the ledger created.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transfer {
    pub key: TransferKey,
    pub debit_account_id: AccountId,
    pub credit_account_id: AccountId,
    /// The amount moved (or held, for a pending transfer).
    pub amount: u64,
    pub currency: Currency,
    pub kind: TransferKind,
    /// For post/void: the pending transfer acted upon.
    pub pending_id: Option<TransferId>,
    /// For a post that named no amount: the full pending amount was posted.
    pub amount_defaulted: bool,
    pub timeout_seconds: u32,
    /// For a pending transfer with a timeout: when it expires.
    pub expires_at: Option<Timestamp>,
    pub code: u16,
    pub metadata: Option<String>,
    pub timestamp: Timestamp,
    pub state: PendingState,
}

impl Transfer {
    /// Whether a client event asks for exactly this transfer (so a repeat is `exists`).
    pub fn matches(&self, event: &TransferEvent) -> bool {
        if self.code != event.code || self.metadata != event.metadata {
            return false;
        }
        match event.kind {
            EventKind::Posted { debit, credit, amount } => {
                self.kind == TransferKind::Posted
                    && self.debit_account_id == debit
                    && self.credit_account_id == credit
                    && self.amount == amount
            }
            EventKind::Pending { debit, credit, amount, timeout_seconds } => {
                self.kind == TransferKind::Pending
                    && self.debit_account_id == debit
                    && self.credit_account_id == credit
                    && self.amount == amount
                    && self.timeout_seconds == timeout_seconds
            }
            EventKind::PostPending { pending_id, amount } => {
                self.kind == TransferKind::PostPending
                    && self.pending_id == Some(pending_id)
                    && match amount {
                        None => self.amount_defaulted,
                        Some(amount) => !self.amount_defaulted && self.amount == amount,
                    }
            }
            EventKind::VoidPending { pending_id } => {
                self.kind == TransferKind::VoidPending && self.pending_id == Some(pending_id)
            }
        }
    }
}

/// What the ledger remembers under a transfer id: the transfer, or the failure it answered with.
/// Remembering failures is what keeps a retry from ever flipping an outcome.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Entry {
    Created(Transfer),
    Failed { event: TransferEvent, result: TransferResult, timestamp: Timestamp },
}

impl Entry {
    /// The id the entry is stored under.
    pub fn key(&self) -> TransferKey {
        match self {
            Entry::Created(t) => t.key,
            Entry::Failed { event, .. } => event.key,
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        match self {
            Entry::Created(t) => t.timestamp,
            Entry::Failed { timestamp, .. } => *timestamp,
        }
    }
}

macro_rules! result_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $code:literal => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $code,)*
        }
        impl $name {
            /// The stable, machine-readable code, e.g. `insufficient_funds`.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
            /// The stored numeric form.
            pub fn as_u16(self) -> u16 { self as u16 }
            pub fn from_u16(v: u16) -> Option<$name> {
                match v { $($code => Some($name::$variant),)* _ => None }
            }
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

result_enum!(
    /// The outcome of one transfer event. The numbers are stored; never renumber.
    TransferResult {
        Created = 0 => "created",
        /// Same id, same fields: the first outcome stands.
        Exists = 1 => "exists",
        ExistsWithDifferentFields = 2 => "exists_with_different_fields",
        /// The id failed before and this request differs from the one that failed.
        IdAlreadyFailed = 3 => "id_already_failed",
        LinkedEventFailed = 4 => "linked_event_failed",
        LinkedEventChainOpen = 5 => "linked_event_chain_open",
        IdMustNotBeZero = 10 => "id_must_not_be_zero",
        AmountMustNotBeZero = 11 => "amount_must_not_be_zero",
        AmountExceedsMax = 12 => "amount_exceeds_max",
        AccountsMustBeDifferent = 13 => "accounts_must_be_different",
        PendingIdMustBeDifferent = 14 => "pending_id_must_be_different",
        TimeoutExceedsMax = 15 => "timeout_exceeds_max",
        MetadataTooLong = 16 => "metadata_too_long",
        DebitAccountNotFound = 20 => "debit_account_not_found",
        CreditAccountNotFound = 21 => "credit_account_not_found",
        CurrencyMismatch = 22 => "currency_mismatch",
        DebitAccountClosed = 23 => "debit_account_closed",
        CreditAccountClosed = 24 => "credit_account_closed",
        /// The debit account is `debits_must_not_exceed_credits` and lacks the funds.
        InsufficientFunds = 25 => "insufficient_funds",
        /// The credit account is `credits_must_not_exceed_debits` and would exceed it.
        ExceedsDebits = 26 => "exceeds_debits",
        PendingTransferNotFound = 30 => "pending_transfer_not_found",
        PendingTransferNotPending = 31 => "pending_transfer_not_pending",
        PendingTransferAlreadyPosted = 32 => "pending_transfer_already_posted",
        PendingTransferAlreadyVoided = 33 => "pending_transfer_already_voided",
        PendingTransferExpired = 34 => "pending_transfer_expired",
        ExceedsPendingTransferAmount = 35 => "exceeds_pending_transfer_amount",
        /// The hold's accounts are missing or their pending balances do not cover it (storage
        /// edited or restored behind the ledger): it cannot be resolved; `rtpay verify` reports it.
        PendingTransferInconsistent = 36 => "pending_transfer_inconsistent",
        OverflowsDebitsPending = 40 => "overflows_debits_pending",
        OverflowsCreditsPending = 41 => "overflows_credits_pending",
        OverflowsDebitsPosted = 42 => "overflows_debits_posted",
        OverflowsCreditsPosted = 43 => "overflows_credits_posted",
        OverflowsDebits = 44 => "overflows_debits",
        OverflowsCredits = 45 => "overflows_credits",
    }
);

impl TransferResult {
    /// Whether the event was applied or had been applied before.
    pub fn is_ok(self) -> bool {
        matches!(self, TransferResult::Created | TransferResult::Exists)
    }

    /// Failures that follow from the request alone, whatever the state: the ledger does not
    /// remember them under the id, since a retry fails the same way anyway.
    pub fn is_validation(self) -> bool {
        (self as u16) >= 5 && (self as u16) < 20
    }

    /// Failures the ledger remembers under the id: those of its state — not the request's own
    /// (validation), nor storage found inconsistent (once repaired, the same request must go
    /// through: rails retry with the ids they made).
    pub fn is_remembered(self) -> bool {
        !self.is_validation() && self != TransferResult::PendingTransferInconsistent
    }
}

result_enum!(
    /// The outcome of one account command.
    AccountResult {
        Created = 0 => "created",
        Exists = 1 => "exists",
        ExistsWithDifferentFields = 2 => "exists_with_different_fields",
        IdMustNotBeZero = 10 => "id_must_not_be_zero",
        FlagsAreMutuallyExclusive = 11 => "flags_are_mutually_exclusive",
        CreditLimitRequiresBalanceFlag = 12 => "credit_limit_requires_balance_flag",
        CreditLimitExceedsMax = 13 => "credit_limit_exceeds_max",
        UnknownFlags = 14 => "unknown_flags",
        MetadataTooLong = 15 => "metadata_too_long",
        AccountNotFound = 20 => "account_not_found",
        Closed = 21 => "closed",
        AlreadyClosed = 22 => "already_closed",
    }
);
