//! Integration tests of the forgemq crate, each on its own private `redis-server`.
//!
//! One test binary for the whole crate keeps link time down. Tests that need a real
//! process to kill re-run this binary as a child (see [`child_process_entry`]).

// Test helpers are `pub` for the modules of this one binary, not for other crates.
#![allow(unreachable_pub, missing_docs)]

mod common;

mod bad_input;
mod chaos;
mod delayed;
mod faults;
mod features;
mod groups;
mod hardening;
mod hostile;
mod inspect;
mod limit;
mod observe;
mod partitions;
mod publish;
mod regressions;
mod scaleout;
mod schedule;
mod soak;
mod status;
mod worker;

/// Entry point for child processes spawned by fault tests; not a test by itself, so it
/// is ignored in normal runs and the parent runs it with `--ignored`.
#[test]
#[ignore = "entry point for child processes that fault tests start and kill"]
fn child_process_entry() {
    common::child::run_from_env();
}
