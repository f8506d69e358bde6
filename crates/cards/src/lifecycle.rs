//! The card lifecycle. A cancelled card never comes back.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardStatus {
    /// Issued, not yet usable (physical cards until the holder activates them).
    Inactive,
    Active,
    Blocked,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Activate,
    Block,
    Unblock,
    Cancel,
}

impl CardStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Inactive => "inactive",
            CardStatus::Active => "active",
            CardStatus::Blocked => "blocked",
            CardStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<CardStatus> {
        Some(match text {
            "inactive" => CardStatus::Inactive,
            "active" => CardStatus::Active,
            "blocked" => CardStatus::Blocked,
            "cancelled" => CardStatus::Cancelled,
            _ => return None,
        })
    }

    /// The status after `action`, or `None` when the transition is not allowed. A card blocked
    /// before it was activated (`blocked_inactive`) is unblocked back to inactive: a block never
    /// activates a card.
    pub fn after(self, action: Action, blocked_inactive: bool) -> Option<CardStatus> {
        use Action::*;
        use CardStatus::*;
        match (self, action) {
            (Inactive, Activate) => Some(Active),
            (Active, Block) | (Inactive, Block) => Some(Blocked),
            (Blocked, Unblock) if blocked_inactive => Some(Inactive),
            (Blocked, Unblock) => Some(Active),
            (Cancelled, _) => None,
            (_, Cancel) => Some(Cancelled),
            _ => None,
        }
    }
}

impl Action {
    pub fn parse(text: &str) -> Option<Action> {
        Some(match text {
            "activate" => Action::Activate,
            "block" => Action::Block,
            "unblock" => Action::Unblock,
            "cancel" => Action::Cancel,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use Action::*;
        use CardStatus::*;
        assert_eq!(Inactive.after(Activate, false), Some(Active));
        assert_eq!(Active.after(Activate, false), None);
        assert_eq!(Active.after(Block, false), Some(Blocked));
        assert_eq!(Blocked.after(Unblock, false), Some(Active));
        assert_eq!(Active.after(Unblock, false), None);
        // Blocked before activation: back to inactive, still to be activated.
        assert_eq!(Inactive.after(Block, false), Some(Blocked));
        assert_eq!(Blocked.after(Unblock, true), Some(Inactive));
        assert_eq!(Blocked.after(Activate, true), None);
        for s in [Inactive, Active, Blocked] {
            assert_eq!(s.after(Cancel, false), Some(Cancelled));
        }
        for a in [Activate, Block, Unblock, Cancel] {
            assert_eq!(Cancelled.after(a, false), None, "a cancelled card never comes back");
        }
        for s in [Inactive, Active, Blocked, Cancelled] {
            assert_eq!(CardStatus::parse(s.as_str()), Some(s));
        }
    }
}
