//! Durability levels as distinct types.
//!
//! Each is a *log end offset*: the offset after the last batch that reached that level. A partition
//! always holds `appended ≥ written ≥ durable`; [`OffsetTracker`] asserts it on every change, in
//! release builds too, because a violation means an acknowledgement could be a lie.

use std::fmt;

macro_rules! level {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

level!(
    /// Accepted into the partition's memory: has offsets, is readable by `Visibility::Appended`.
    Appended
);
level!(
    /// Handed to the device by a completed O_DIRECT write; survives a process crash, not a power cut.
    Written
);
level!(
    /// Covered by a completed fdatasync; survives a power cut.
    Durable
);

/// What level an append reached when it completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Durability {
    Appended,
    Written,
    Durable,
}

/// The three log end offsets of a partition, with their order enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetTracker {
    appended: Appended,
    written: Written,
    durable: Durable,
}

impl OffsetTracker {
    /// A log that is entirely on disk (after recovery) ends at `log_end_offset` at every level.
    pub fn recovered(log_end_offset: u64) -> OffsetTracker {
        OffsetTracker {
            appended: Appended(log_end_offset),
            written: Written(log_end_offset),
            durable: Durable(log_end_offset),
        }
    }

    pub fn appended(&self) -> Appended {
        self.appended
    }
    pub fn written(&self) -> Written {
        self.written
    }
    pub fn durable(&self) -> Durable {
        self.durable
    }

    pub fn level(&self, level: Durability) -> u64 {
        match level {
            Durability::Appended => self.appended.0,
            Durability::Written => self.written.0,
            Durability::Durable => self.durable.0,
        }
    }

    pub fn advance_appended(&mut self, to: Appended) {
        assert!(
            to >= self.appended,
            "appended moves back: {} -> {}",
            self.appended,
            to
        );
        self.appended = to;
        self.check();
    }

    pub fn advance_written(&mut self, to: Written) {
        assert!(
            to >= self.written,
            "written moves back: {} -> {}",
            self.written,
            to
        );
        self.written = to;
        self.check();
    }

    pub fn advance_durable(&mut self, to: Durable) {
        assert!(
            to >= self.durable,
            "durable moves back: {} -> {}",
            self.durable,
            to
        );
        self.durable = to;
        self.check();
    }

    /// Forget that the segment holds anything from `to` on (a failed write or fdatasync); what
    /// was appended stays, to be written again.
    pub fn rewind_written(&mut self, to: u64) {
        assert!(
            to >= self.durable.0 && to <= self.written.0,
            "rewind of written to {to} outside durable {} ..= written {}",
            self.durable,
            self.written
        );
        self.written = Written(to);
        self.check();
    }

    /// Drop everything at or after `to` at every level (truncation, or the rollback after a failed
    /// write or fdatasync). Levels below `to` stay where they are.
    pub fn truncate(&mut self, to: u64) {
        self.appended = Appended(self.appended.0.min(to));
        self.written = Written(self.written.0.min(to));
        self.durable = Durable(self.durable.0.min(to));
        self.check();
    }

    fn check(&self) {
        assert!(
            self.appended.0 >= self.written.0 && self.written.0 >= self.durable.0,
            "offset order violated: appended {} written {} durable {}",
            self.appended,
            self.written,
            self.durable
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_holds_through_advances_and_truncation() {
        let mut t = OffsetTracker::recovered(10);
        t.advance_appended(Appended(20));
        t.advance_written(Written(15));
        t.advance_durable(Durable(12));
        assert_eq!(t.level(Durability::Written), 15);
        t.truncate(13);
        assert_eq!((t.appended().0, t.written().0, t.durable().0), (13, 13, 12));
    }

    #[test]
    #[should_panic(expected = "offset order violated")]
    fn written_past_appended_panics() {
        let mut t = OffsetTracker::recovered(10);
        t.advance_written(Written(11));
    }
}
