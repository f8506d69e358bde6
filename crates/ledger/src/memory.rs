//! A whole ledger in memory: the simplest [`State`] there is. Used by tests and by the in-process
//! model of the ledger; storage engines keep their own state and persist [`Changes`].

use crate::machine::{self, AccountCommand, Changes, Clock, Outcome, State};
use crate::types::*;

#[derive(Default, Clone, Debug)]
pub struct MemoryLedger {
    pub accounts: crate::Map<AccountKey, Account>,
    pub transfers: crate::Map<TransferKey, Entry>,
    pub clock: Clock,
}

impl State for MemoryLedger {
    fn account(&self, key: &AccountKey) -> Option<&Account> {
        self.accounts.get(key)
    }
    fn transfer(&self, key: &TransferKey) -> Option<&Entry> {
        self.transfers.get(key)
    }
}

impl MemoryLedger {
    pub fn new() -> MemoryLedger {
        MemoryLedger::default()
    }

    /// Applies persisted changes, as a store would.
    pub fn commit(&mut self, changes: Changes) {
        for account in changes.accounts {
            self.accounts.insert(account.key, account);
        }
        for entry in changes.inserted {
            let previous = self.transfers.insert(entry.key(), entry);
            assert!(previous.is_none(), "inserted entries are new");
        }
        for (key, state) in changes.pending_updates {
            match self.transfers.get_mut(&key) {
                Some(Entry::Created(t)) => t.state = state,
                _ => panic!("pending update of a missing transfer"),
            }
        }
        self.clock = changes.clock;
    }

    pub fn accounts(&mut self, now: Timestamp, commands: &[AccountCommand]) -> Vec<(AccountResult, Option<Account>)> {
        let mut clock = self.clock;
        let (results, changes) = machine::apply_accounts(self, &mut clock, now, commands);
        self.commit(changes);
        results
    }

    pub fn transfers(&mut self, now: Timestamp, events: &[TransferEvent]) -> Vec<Outcome> {
        let mut clock = self.clock;
        let (outcomes, changes) = machine::apply_transfers(self, &mut clock, now, events);
        self.commit(changes);
        outcomes
    }

    /// Expires every pending transfer due by `now`.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        // Due as `expire_pending` judges it: at the ledger's time.
        let now = self.clock.judged_at(now);
        let keys: Vec<TransferKey> = self
            .transfers
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Created(t) if t.state == PendingState::Pending && t.expires_at.is_some_and(|at| at <= now)))
            .map(|(k, _)| *k)
            .collect();
        let (n, changes) = machine::expire_pending(self, self.clock, now, &keys);
        self.commit(changes);
        n
    }
}
