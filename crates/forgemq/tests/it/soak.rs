//! Placeholder; filled in by the fault suite work.
