//! Handlers: thin. Each parses and checks its input (dto), hands the ledger work to the store's
//! writer, and renders the result. No balance is computed here.

pub mod accounts;
pub mod api_pix;
pub mod audit;
pub mod cards;
pub mod holders;
pub mod keys;
pub mod med;
pub mod ops;
pub mod pix;
pub mod pix_loc;
pub mod tenants;
pub mod transfers;

use axum::http::StatusCode;
use ledger::TransferResult;
use store::{Command, Queries, Reply};

use crate::audit_trail::Audit;
use crate::problem::Problem;
use crate::AppState;

/// Sends a command to the writer, with the request's audit entry, and waits until both are
/// durable (one commit).
pub async fn submit(state: &AppState, audit: &Audit, command: Command) -> Result<Reply, Problem> {
    submit_recorded(state, audit, command, None).await
}

/// Records the request's audit entry, as answered `status`, before the answer goes out: what the
/// answer shows (a card's number, the webhooks' signing secret, a new credential's secret) never
/// leaves without its entry. `503` when it cannot be recorded (the middleware then records the
/// refusal, if it can).
pub async fn record_before_answer(state: &AppState, audit: &Audit, status: StatusCode) -> Result<(), Problem> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let draft = audit.0.draft(status.as_u16().to_string());
    state.store.engine.submit(Command::Audit(vec![draft]), Box::new(move |r| drop(tx.send(r))))?;
    rx.await.map_err(|_| Problem::unavailable("the writer stopped", 2))??;
    audit.0.mark_recorded();
    Ok(())
}

/// Submits `command` without the request's audit entry: a step a request takes on its way (opening
/// a settlement account), which the entry the middleware records for the request, with its own
/// outcome, covers. (Through the request's entry, a request refused afterwards was recorded with
/// the step's outcome, `created`.)
pub async fn submit_unrecorded(state: &AppState, command: Command) -> Result<Reply, Problem> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.store.engine.submit(command, Box::new(move |r| drop(tx.send(r))))?;
    Ok(rx.await.map_err(|_| Problem::unavailable("the writer stopped", 2))??)
}

/// As [`submit`], with the records `records` makes from the ledger's reply inside the batch (a
/// payment's documents, a card authorization), all in the same commit.
pub async fn submit_recorded(
    state: &AppState,
    audit: &Audit,
    command: Command,
    records: Option<store::RecordsFn>,
) -> Result<Reply, Problem> {
    submit_guarded(state, audit, command, records, Vec::new()).await
}

/// Like [`submit_recorded`], applied only if the guarded documents are still at the versions read
/// (whichever node changed them): else nothing is applied and the answer is 503 with `Retry-After`.
pub async fn submit_guarded(
    state: &AppState,
    audit: &Audit,
    command: Command,
    records: Option<store::RecordsFn>,
    guards: Vec<store::Guard>,
) -> Result<Reply, Problem> {
    let guarded = !guards.is_empty();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let draft = audit.0.draft(String::new());
    state.store.engine.submit_guarded(command, Some(draft), records, guards, Box::new(move |r| drop(tx.send(r))))?;
    audit.0.mark_recorded();
    let result = rx.await.map_err(|_| Problem::unavailable("the writer stopped", 2))?;
    // A failure of the whole batch rolled back the entry it carried: the middleware records the
    // request. Not a guard's refusal (recorded in the batch, as `conflict`), nor a commit whose
    // outcome is unknown (its entry may be in).
    let rolled_back = |e: &store::StoreError| !(e.in_doubt() || guarded && matches!(e, store::StoreError::Conflict(_)));
    if result.as_ref().is_err_and(rolled_back) {
        audit.0.mark_unrecorded();
    }
    match result {
        // A guard lost a race with another request: nothing applied; the retry sees what won.
        Err(store::StoreError::Conflict(why)) if guarded => Err(Problem::unavailable(why, 1)),
        other => Ok(other?),
    }
}

/// Runs a blocking `Queries` call (a read, or a control-plane write such as creating a tenant)
/// off the async threads.
pub async fn query<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Queries) -> store::Result<T> + Send + 'static,
) -> Result<T, Problem> {
    let queries = state.store.queries.clone();
    let result = tokio::task::spawn_blocking(move || f(queries.as_ref())).await.map_err(|_| Problem::internal())?;
    Ok(result?)
}

/// A point read (a few index pages): on an embedded engine, run on the calling task's thread —
/// a read of tens of microseconds costs less than handing it to the blocking pool and waking this
/// task back; on PostgreSQL, on the blocking pool like any other query.
///
/// An embedded read may have seen a commit whose sync is still running: its answer then waits
/// for that sync, awaited here rather than blocking the thread.
pub async fn read_now<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Queries) -> store::Result<T> + Send + 'static,
) -> Result<T, Problem> {
    let owed = ReadsOwed::default();
    let result = owed.read(state, f).await;
    owed.settle().await?;
    result
}

/// The durability waits a flow's point reads (see [`read_now`]) owe until its own commit
/// (see [`store::FencesOwed`]): the reads of a card authorization, three of them, each waited
/// about one sync before the authorization's own commit and sync.
#[derive(Default)]
pub struct ReadsOwed(store::FencesOwed);

impl ReadsOwed {
    /// A point read as [`read_now`], whose durability wait is owed rather than waited for.
    pub async fn read<T: Send + 'static>(
        &self,
        state: &AppState,
        f: impl FnOnce(&dyn Queries) -> store::Result<T> + Send + 'static,
    ) -> Result<T, Problem> {
        if !state.store.queries.point_reads_inline() {
            return query(state, f).await;
        }
        let (result, fence) = store::read_deferring(|| f(state.store.queries.as_ref()));
        self.0.owe(fence);
        Ok(result?)
    }

    /// A commit of the flow's own, made after its reads so far, is durable.
    pub fn committed(&self) {
        self.0.committed();
    }

    /// Waits until everything the flow's reads saw is durable: before an answer goes out.
    pub async fn settle(&self) -> Result<(), Problem> {
        for fence in self.0.take() {
            let (passed, wait) = tokio::sync::oneshot::channel();
            fence.when_passed(Box::new(move || {
                let _ = passed.send(());
            }));
            wait.await.map_err(|_| Problem::internal())?;
        }
        Ok(())
    }
}

/// The problem for a ledger result that is not `created`/`exists`.
pub fn ledger_problem(code: TransferResult, prefix: &str) -> Problem {
    use TransferResult as R;
    let (status, field, detail) = match code {
        R::ExistsWithDifferentFields => {
            (StatusCode::CONFLICT, "id", "a transfer with this id exists with different fields")
        }
        R::IdAlreadyFailed => {
            (StatusCode::CONFLICT, "id", "a different request under this id failed before; ids are never reused")
        }
        R::DebitAccountNotFound => (StatusCode::UNPROCESSABLE_ENTITY, "debit_account_id", "no account with this id"),
        R::CreditAccountNotFound => (StatusCode::UNPROCESSABLE_ENTITY, "credit_account_id", "no account with this id"),
        R::CurrencyMismatch => {
            (StatusCode::UNPROCESSABLE_ENTITY, "credit_account_id", "the two accounts hold different currencies")
        }
        R::DebitAccountClosed => (StatusCode::UNPROCESSABLE_ENTITY, "debit_account_id", "the debit account is closed"),
        R::CreditAccountClosed => {
            (StatusCode::UNPROCESSABLE_ENTITY, "credit_account_id", "the credit account is closed")
        }
        R::InsufficientFunds => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount",
            "the debit account's available balance is less than the amount",
        ),
        R::ExceedsDebits => {
            (StatusCode::UNPROCESSABLE_ENTITY, "amount", "the credit account may not be credited beyond its debits")
        }
        R::PendingTransferNotFound => (StatusCode::NOT_FOUND, "pending_id", "no pending transfer with this id"),
        R::PendingTransferNotPending => (StatusCode::CONFLICT, "pending_id", "the transfer is not a hold"),
        R::PendingTransferAlreadyPosted => (StatusCode::CONFLICT, "pending_id", "the hold was already posted"),
        R::PendingTransferAlreadyVoided => (StatusCode::CONFLICT, "pending_id", "the hold was already voided"),
        R::PendingTransferExpired => (StatusCode::CONFLICT, "pending_id", "the hold expired"),
        R::ExceedsPendingTransferAmount => (StatusCode::UNPROCESSABLE_ENTITY, "amount", "the amount exceeds the hold"),
        R::PendingTransferInconsistent => (
            StatusCode::CONFLICT,
            "pending_id",
            "the hold's accounts do not cover it: storage is inconsistent (see `rtpay verify`)",
        ),
        R::LinkedEventFailed => (StatusCode::UNPROCESSABLE_ENTITY, "id", "another transfer of the linked batch failed"),
        R::OverflowsDebitsPending
        | R::OverflowsCreditsPending
        | R::OverflowsDebitsPosted
        | R::OverflowsCreditsPosted
        | R::OverflowsDebits
        | R::OverflowsCredits => {
            (StatusCode::UNPROCESSABLE_ENTITY, "amount", "an account balance would exceed 2^63-1 minor units")
        }
        _ => (StatusCode::UNPROCESSABLE_ENTITY, "id", "the transfer is not acceptable"),
    };
    let field = if prefix.is_empty() { field.to_owned() } else { format!("{prefix}.{field}") };
    Problem::new(status, code.as_str(), detail).field(field)
}

/// Parses the limit and cursor of a listing.
pub fn page_params(params: &std::collections::HashMap<String, String>) -> Result<store::Page, Problem> {
    // The first unknown name in order: the same answer whatever the map's order.
    if let Some(name) = params.keys().filter(|n| *n != "limit" && *n != "cursor").min() {
        return Err(crate::json::unknown_parameter(name, "`limit` or `cursor`"));
    }
    let limit = match params.get("limit") {
        None => 50,
        Some(v) => match crate::dto::digits::<usize>(v) {
            Some(n) if (1..=store::PAGE_LEN_MAX).contains(&n) => n,
            _ => {
                return Err(Problem::invalid(
                    "limit",
                    "invalid_limit",
                    format!("`limit` must be an integer in 1..={}", store::PAGE_LEN_MAX),
                ))
            }
        },
    };
    let before = match params.get("cursor") {
        None => None,
        Some(v) => Some(
            crate::auth::unhex(v)
                .filter(|b| b.len() == 8)
                .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
                .ok_or_else(|| {
                    Problem::invalid("cursor", "invalid_cursor", "`cursor` must be a value returned as `next_cursor`")
                })?,
        ),
    };
    Ok(store::Page { before, limit })
}

pub fn cursor_of(timestamp: u64) -> String {
    crate::auth::hex(&timestamp.to_be_bytes())
}
